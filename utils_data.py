"""Data helpers shared by every script: atomic JSONL I/O, the one prompt builder, InstructionDataset, collate_fn.

Record format (one JSON object per line): {"instruction": str, "input": str, "output": str, ...extra keys}.
Prompt and response are tokenized separately and concatenated, so the label mask is exact:
labels are IGNORE_INDEX on the prompt and on padding, and equal the ids on the response (+ EOS).
"""
from __future__ import annotations


import torch
from torch.utils.data import Dataset

# atomic JSONL I/O lives in utils_io (the config imports it too); re-exported here for the scripts
from utils_io import (RECORD_FIELDS, JsonlError, append_jsonl, atomic_write_text, dumps_jsonl,  # noqa: F401
                      iter_jsonl, read_jsonl, read_records, write_jsonl)

IGNORE_INDEX = -100
PROMPT_FORMATS = ("chat_template", "llama2")


# ----------------------------------------------------------------------------- the one prompt builder
def user_message(instruction: str, input_text: str = "") -> str:
    """Instruction and optional input as one user turn; an empty input leaves no separator behind."""
    instruction, input_text = instruction.strip(), (input_text or "").strip()
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def build_prompt(tokenizer, instruction: str, input_text: str = "", fmt: str = "chat_template") -> str:
    """The text the model sees before its answer, for training and evaluation alike.

    llama2:        "[INST] {instruction}\\n{input} [/INST]"  (BOS comes from the tokenizer, EOS after the output)
    chat_template: the tokenizer's own template with one user turn and the generation prompt."""
    if fmt == "llama2":
        instruction, input_text = instruction.strip(), (input_text or "").strip()
        body = f"{instruction}\n{input_text}" if input_text else instruction
        return f"[INST] {body} [/INST]"
    if fmt == "chat_template":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format=chat_template but the tokenizer has no chat template; "
                             "use --prompt_format llama2")
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message(instruction, input_text)}],
                                             tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt format {fmt!r}; use one of {PROMPT_FORMATS}")


def response_text(output: str, fmt: str) -> str:
    """The supervised answer text (EOS is appended as a token id, not as text)."""
    return " " + output.strip() if fmt == "llama2" else output.strip()


def encode_prompt(tokenizer, row: dict, fmt: str) -> list[int]:
    """Token ids of the prompt alone (what generation is conditioned on)."""
    text = build_prompt(tokenizer, row["instruction"], row.get("input", ""), fmt)
    # llama2 relies on the tokenizer's BOS; the chat template writes its own special tokens as text.
    return tokenizer(text, add_special_tokens=(fmt == "llama2"))["input_ids"]


def encode_example(tokenizer, row: dict, fmt: str, max_seq_len: int):
    """(input_ids, labels) with labels IGNORE_INDEX on the prompt, or None when the response cannot fit.

    Over-long samples lose prompt tokens from the left, so the response start always survives."""
    prompt = encode_prompt(tokenizer, row, fmt)
    response = tokenizer(response_text(row["output"], fmt), add_special_tokens=False)["input_ids"]
    response = response + [tokenizer.eos_token_id]
    room = max_seq_len - len(response)
    if room < 1:  # not even one prompt token fits beside the response
        return None
    prompt = prompt[-room:]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def example_lengths(tokenizer, rows: list[dict], fmt: str, batch_size: int = 512) -> list[int]:
    """Full sequence length (prompt + response + EOS) of each row, tokenized in batches; the same
    builder as `encode_example`, so the split's length filter and training agree."""
    lengths = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        prompts = [build_prompt(tokenizer, r["instruction"], r.get("input", ""), fmt) for r in chunk]
        p_ids = tokenizer(prompts, add_special_tokens=(fmt == "llama2"))["input_ids"]
        r_ids = tokenizer([response_text(r["output"], fmt) for r in chunk], add_special_tokens=False)["input_ids"]
        lengths += [len(p) + len(r) + 1 for p, r in zip(p_ids, r_ids)]
    return lengths


class InstructionDataset(Dataset):
    """Tokenized instruction records from a JSONL file.

    Each item: {"input_ids": LongTensor(T), "labels": LongTensor(T), "idx": int}; `self.ids[idx]` is the
    sample's stable id (the row's "id" field, else "{file}:{line}", or "row:{i}" for rows given directly), used e.g. to key cached teacher logits.
    Rows whose response cannot fit in `max_seq_len` are dropped and counted in `self.num_dropped`."""

    def __init__(self, path, tokenizer, cfg, max_samples: int = 0, rows: list[dict] | None = None,
                 seed: int | None = None, verbose: bool = True):
        self.path = str(path)
        if rows is None:
            rows = read_records(path)
        else:  # rows given directly: ids from their position in the input, before any sampling or drop
            rows = [r if "id" in r else {**r, "id": f"row:{i}"} for i, r in enumerate(rows)]
        if max_samples and len(rows) > max_samples:
            # A seeded sample, not the head of the file, so capped evaluations stay representative.
            g = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
            keep = sorted(torch.randperm(len(rows), generator=g)[:max_samples].tolist())
            rows = [rows[i] for i in keep]
        self.rows, self.examples, self.ids = [], [], []
        self.num_dropped = 0
        seen = set()
        for r in rows:
            rid = str(r["id"])
            if rid in seen:  # sample ids key the SLSD teacher cache: they must be unique
                raise ValueError(f"{self.path}: duplicate id {rid!r}; ids key cached teacher logits and must be "
                                 f"unique (rebuild the split with split_datasets.py)")
            seen.add(rid)
            enc = encode_example(tokenizer, r, cfg.prompt_format, cfg.max_seq_len)
            if enc is None:
                self.num_dropped += 1
                continue
            self.rows.append(r)
            self.examples.append(enc)
            self.ids.append(str(r["id"]))
        if verbose and self.num_dropped:
            print(f"[data] {self.path}: dropped {self.num_dropped} of {len(rows)} rows whose response "
                  f"does not fit in max_seq_len={cfg.max_seq_len}")

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, idx):
        ids, labels = self.examples[idx]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "idx": idx}


def collate_fn(batch, pad_token_id: int = 0) -> dict:
    """Right-pad to the longest sequence in the batch. The attention mask comes from lengths, never from
    `ids != pad` (pad often equals EOS, which is supervised). Returns input_ids, attention_mask, labels
    (B, T) and idx (B,)."""
    T = max(len(b["input_ids"]) for b in batch)
    B = len(batch)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[i, :n] = b["input_ids"]
        labels[i, :n] = b["labels"]
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "idx": torch.tensor([b["idx"] for b in batch], dtype=torch.long)}


def show_supervised(tokenizer, input_ids, labels) -> str:
    """Debug view: prompt tokens as they are, supervised tokens wrapped in [[...]]."""
    out = []
    for tok, lab in zip(list(input_ids), list(labels)):
        piece = tokenizer.decode([int(tok)])
        out.append(f"[[{piece}]]" if int(lab) != IGNORE_INDEX else piece)
    return "".join(out)


if __name__ == "__main__":
    # Debug view: python utils_data.py data/split/T2_math_toy.jsonl [n] [--key value config overrides]
    import sys

    from configs.base_config import make_config
    from utils_model import load_tokenizer, resolve_model_dir

    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 and not sys.argv[2].startswith("--") else 2
    cfg = make_config([a for a in sys.argv[2:] if not a.isdigit()])
    tok = load_tokenizer(resolve_model_dir(cfg.model_name))
    ds = InstructionDataset(path, tok, cfg, max_samples=n)
    for i in range(len(ds)):
        item = ds[i]
        print(f"--- {ds.ids[i]} ({len(item['input_ids'])} tokens, {int((item['labels'] != IGNORE_INDEX).sum())} "
              f"supervised, shown in [[...]])\n{show_supervised(tok, item['input_ids'], item['labels'])}")
