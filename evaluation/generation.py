"""The bench rows every stage is scored on, and batched greedy generation with per-row budgets."""
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from utils_io import read_jsonl
from utils_data import encode_prompt


def load_bench_sets(cfg):
    """{task: rows} from each task's bench file; a seeded sample of up to cfg.metrics_max_samples rows
    per `kind` (0 = all), kept in file order. The sample depends only on the file and cfg.eval_seed, so every
    stage and every method sees the same rows. A missing file is skipped with a note."""
    bench = {}
    for task in cfg.tasks:
        path = Path(cfg.task_path(task, "bench"))
        if not path.exists():
            print(f"[metrics] {path} not found: no generation metrics for {task} "
                  f"(write it with split_datasets.py)")
            continue
        rows = read_jsonl(path, required=("id", "instruction", "kind"))
        by_kind = {}
        for i, row in enumerate(rows):
            by_kind.setdefault(row["kind"], []).append(i)
        keep = []
        for kind, idx in sorted(by_kind.items()):
            if cfg.metrics_max_samples and len(idx) > cfg.metrics_max_samples:
                rng = random.Random(f"{cfg.eval_seed}/{task}/{kind}")  # str seeds are stable across processes
                idx = rng.sample(idx, cfg.metrics_max_samples)
            keep += idx
        bench[task] = [rows[i] for i in sorted(keep)]
    return bench


# ----------------------------------------------------------------------------------------------
# Batched greedy generation


def _prompt_ids(tokenizer, rows, cfg):
    """Prompt token ids of each row (the one prompt builder), truncated from the left to max_seq_len."""
    return [encode_prompt(tokenizer, r, cfg.prompt_format)[-cfg.max_seq_len:] for r in rows]


@torch.no_grad()
def generate_ids(model, tokenizer, rows, cfg, device, max_new_tokens, desc="generate"):
    """Greedy continuations as token-id lists, in the order of `rows`: the new tokens up to and
    including the first EOS (no EOS when the row's budget ran out first).

    `max_new_tokens` is one budget for every row or a list with one per row. Rows are sorted by budget,
    then prompt length (largest first) into batches of cfg.eval_batch_size and left-padded, so every
    row's last prompt token sits at the same position; the attention mask comes from lengths. A batch
    decodes up to its largest budget and each row is cut to its own: greedy decoding is per row, so the
    first k tokens of a longer run are exactly the k-token run, and tasks with different budgets can
    share one batch."""
    if not rows:
        return []
    budgets = [max_new_tokens] * len(rows) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(rows) or min(budgets) < 1:
        raise ValueError(f"max_new_tokens must be a positive int or one per row ({len(rows)}), got {max_new_tokens}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts = _prompt_ids(tokenizer, rows, cfg)
    order = sorted(range(len(rows)), key=lambda i: (-budgets[i], -len(prompts[i])))
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
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 do_sample=False, use_cache=True, max_new_tokens=max(budgets[i] for i in chunk),
                                 pad_token_id=pad, eos_token_id=eos)  # (B, T + new)
            for b, i in enumerate(chunk):
                new = out[b, T:T + budgets[i]].tolist()
                results[i] = new[:new.index(eos) + 1] if eos in new else new
    finally:
        model.train(was_training)
    return results


def generate(model, tokenizer, rows, cfg, device, max_new_tokens, desc="generate"):
    """Greedy replies (text, special tokens skipped, cut at EOS) to `rows`, in their order (budgets as in
    generate_ids)."""
    ids = generate_ids(model, tokenizer, rows, cfg, device, max_new_tokens, desc=desc)
    return [tokenizer.decode(x, skip_special_tokens=True) for x in ids]


def _num_tokens(ids, eos):
    """Reply length in tokens, EOS not counted."""
    return len(ids) - (1 if ids and ids[-1] == eos else 0)
