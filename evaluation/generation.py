"""The bench rows every stage is scored on, and batched greedy generation with per-row budgets and stops."""
import random
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from utils_io import read_jsonl
from utils_data import encode_prompt


def _spread(counts, n):
    """{kind: rows to take}: n split evenly over the kinds; a kind with fewer rows than its share gives the
    rest to the others (water filling); when n does not divide evenly, kinds earlier by name get one more."""
    quota, left = {}, n
    pending = sorted(counts, key=lambda k: (counts[k], k))  # smallest first: they may not fill their share
    while pending and counts[pending[0]] <= left // len(pending):
        kind = pending.pop(0)
        quota[kind] = counts[kind]
        left -= counts[kind]
    for i, kind in enumerate(sorted(pending)):  # every pending kind has more rows than its share
        quota[kind] = left // len(pending) + (i < left % len(pending))
    return quota


def load_bench_sets(cfg):
    """{task: rows} from each task's bench file: a seeded sample of cfg.gen_rows_per_task rows spread evenly
    over the task's `kind`s (0 = all), kept in file order. The sample depends only on the file and
    cfg.eval_seed, so every stage and every method sees the same rows; a larger gen_rows_per_task keeps the
    smaller one's rows and adds to them. A missing file is skipped with a note."""
    bench = {}
    for task in cfg.tasks:
        path = Path(cfg.task_path(task, "bench"))
        if not path.exists():
            print(f"[metrics] {path} not found: no generation metrics for {task} "
                  f"(write it with split_datasets.py)")
            continue
        rows = read_jsonl(path, required=("id", "instruction", "kind"))
        if not cfg.gen_rows_per_task or cfg.gen_rows_per_task >= len(rows):
            bench[task] = rows
            continue
        by_kind = {}
        for i, row in enumerate(rows):
            by_kind.setdefault(row["kind"], []).append(i)
        quota = _spread({kind: len(idx) for kind, idx in by_kind.items()}, cfg.gen_rows_per_task)
        keep = []
        for kind, idx in sorted(by_kind.items()):
            idx = list(idx)
            random.Random(f"{cfg.eval_seed}/{task}/{kind}").shuffle(idx)  # str seeds are stable across processes
            keep += idx[:quota[kind]]  # a prefix of one fixed shuffle: samples are nested across sizes
        bench[task] = [rows[i] for i in sorted(keep)]
    return bench


# ----------------------------------------------------------------------------------------------
# Stop rules: generation ends once the reply holds what its scorer reads

# Per task, regular expressions searched in the decoded reply; the reply ends right after the first match.
# A stop must never cut what the scorer reads:
#   T2_math  the first `#### N` line, up to its newline (a number still being written, "#### 1,0", does not
#            match yet). Strict extraction reads that first `#### N`; flexible reads the last number of the kept
#            text, the one on that line, so numbers written after the answer no longer count (lm-eval's gsm8k
#            also stops generation, at "Question:").
#   T3_code  the closing fence of the first ```python / ```py block, opened as extract_code opens it (the
#            opening fence alone does not match); extract_code takes that block whatever follows. A reply whose
#            first block has another language is not stopped: a later python block would be the one scored.
# No stop for T1 (checks read the whole reply), T4 (the whole reply must parse as the call: text after the
# JSON is what tool_json_valid measures; a call can also be a list) and T5 (a refusal may come anywhere).
STOP_STRINGS = {
    "T2_math": [r"#### -?[0-9.,]+[^\n]*\n"],
    "T3_code": [r"(?is)```(?:python|py)[ \t]*\n.*?```"],
}


def stop_end(text, patterns):
    """End of the earliest stop match in `text` (the reply is cut there), or None."""
    ends = [m.end() for m in (re.search(p, text) for p in patterns or ()) if m]
    return min(ends) if ends else None


class RowStops(StoppingCriteria):
    """Per-row stopping for one left-padded batch whose prompts end at column `prompt_len`: a row is done at
    EOS, at its own budget, or once its decoded new text matches one of its stop patterns (`cut[b]` = new
    tokens then). Returns a (B,) bool tensor, so generate ends the batch when every row is done."""

    def __init__(self, tokenizer, prompt_len, budgets, patterns, eos):
        self.tokenizer, self.prompt_len, self.budgets, self.patterns, self.eos = (
            tokenizer, prompt_len, budgets, patterns, eos)
        self.done = [False] * len(budgets)
        self.cut = [None] * len(budgets)

    def __call__(self, input_ids, scores, **kwargs):  # input_ids: (B, prompt_len + new)
        new = input_ids[:, self.prompt_len:].tolist()  # one device-to-host copy per step
        for b, done in enumerate(self.done):
            if done:  # finished rows get pad tokens from here on: never look at them again
                continue
            if new[b][-1] == self.eos or len(new[b]) >= self.budgets[b]:
                self.done[b] = True
            elif self.patterns[b] and stop_end(self.tokenizer.decode(new[b], skip_special_tokens=True),
                                               self.patterns[b]) is not None:
                self.done[b], self.cut[b] = True, len(new[b])
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


# ----------------------------------------------------------------------------------------------
# Batched greedy generation


def _prompt_ids(tokenizer, rows, cfg):
    """Prompt token ids of each row (the one prompt builder), truncated from the left to max_seq_len."""
    return [encode_prompt(tokenizer, r, cfg.prompt_format)[-cfg.max_seq_len:] for r in rows]


def _row_stops(stop_strings, n):
    """One tuple of stop patterns per row (empty = no stop), checked against the number of rows."""
    if stop_strings is None:
        return [()] * n
    if len(stop_strings) != n or any(isinstance(s, str) for s in stop_strings):
        raise ValueError(f"stop_strings must be None or one list of patterns (or None) per row ({n} rows), "
                         f"got {stop_strings!r}; e.g. [STOP_STRINGS.get(task) for task in row_tasks]")
    return [tuple(s or ()) for s in stop_strings]


@torch.no_grad()
def generate_ids(model, tokenizer, rows, cfg, device, max_new_tokens, desc="generate", stop_strings=None):
    """Greedy continuations as token-id lists, in the order of `rows`: the new tokens up to and
    including the first EOS (no EOS when the row's budget ran out first), or up to the token that completes
    the row's stop (see STOP_STRINGS).

    `max_new_tokens` is one budget for every row or a list with one per row; `stop_strings` is None or one
    list of stop regexes (or None) per row. Rows are sorted by budget, then stop rule, then prompt length
    (largest first) into batches of cfg.eval_batch_size and left-padded, so every row's last prompt token sits
    at the same position; the attention mask comes from lengths. A batch decodes until every row has hit EOS,
    its budget or its stop, and each row is cut to its own: greedy decoding is per row, so the first k tokens
    of a longer run are exactly the k-token run, and tasks with different budgets can share one batch."""
    if not rows:
        return []
    budgets = [max_new_tokens] * len(rows) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(rows) or min(budgets) < 1:
        raise ValueError(f"max_new_tokens must be a positive int or one per row ({len(rows)}), got {max_new_tokens}")
    stops = _row_stops(stop_strings, len(rows))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts = _prompt_ids(tokenizer, rows, cfg)
    # same budget and stop rule together (so a batch of one task can end at its stops), long prompts first
    order = sorted(range(len(rows)), key=lambda i: (-budgets[i], stops[i], -len(prompts[i])))
    results = [None] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), cfg.eval_batch_size), desc=desc, leave=False):
            chunk = order[start:start + cfg.eval_batch_size]
            T = max(len(prompts[i]) for i in chunk)
            input_ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for b, i in enumerate(chunk):
                n = len(prompts[i])
                input_ids[b, T - n:] = torch.tensor(prompts[i])
                attention_mask[b, T - n:] = 1
            row_stops = RowStops(tokenizer, T, [budgets[i] for i in chunk], [stops[i] for i in chunk], eos)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 do_sample=False, use_cache=True, max_new_tokens=max(budgets[i] for i in chunk),
                                 pad_token_id=pad, eos_token_id=eos,
                                 stopping_criteria=StoppingCriteriaList([row_stops]))  # (B, T + new)
            for b, i in enumerate(chunk):
                new = out[b, T:T + budgets[i]].tolist()
                if row_stops.cut[b] is not None:  # stopped before any EOS: keep through the completing token
                    results[i] = new[:row_stops.cut[b]]
                else:
                    results[i] = new[:new.index(eos) + 1] if eos in new else new
    finally:
        model.train(was_training)
    return results


def generate(model, tokenizer, rows, cfg, device, max_new_tokens, desc="generate", stop_strings=None):
    """Greedy replies (text, special tokens skipped, cut at EOS) to `rows`, in their order (budgets and stops
    as in generate_ids); a stopped reply ends exactly at its stop match (the completing token may carry more)."""
    ids = generate_ids(model, tokenizer, rows, cfg, device, max_new_tokens, desc=desc, stop_strings=stop_strings)
    texts = []
    for x, stops in zip(ids, _row_stops(stop_strings, len(rows))):
        text = tokenizer.decode(x, skip_special_tokens=True)
        end = stop_end(text, stops)
        texts.append(text if end is None else text[:end])
    return texts


def _num_tokens(ids, eos):
    """Reply length in tokens, EOS not counted."""
    return len(ids) - (1 if ids and ids[-1] == eos else 0)
