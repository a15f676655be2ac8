"""Split data/full/{task}_full.jsonl into train/val/test/tiny/toy files under cfg.data_dir (default data/split).

Stage 2 of the data pipeline (stage 1 is prepare_datasets.py). Per task, deterministic by cfg.seed:
  1. read the rows (a malformed line raises JsonlError naming file and line);
  2. drop rows whose instruction or output is empty after strip();
  3. drop exact duplicates by (instruction, input), so no prompt appears in two splits;
  4. drop rows whose full formatted sequence (prompt + response + EOS, the training builder, cfg.prompt_format,
     the tokenizer of cfg.model_name) is longer than cfg.max_seq_len;
  5. cap at --max_rows_per_task rows by seeded sampling; shuffle; 80/10/10 -> train/val/test;
  6. tiny = min(1000, 10% of train) rows sampled from train; toy = 16 rows of train (smoke runs);
  7. bench: {task}_bench.jsonl copied beside them, keeping rows whose prompt fits (prompt tokens < max_seq_len;
     a longer prompt would be cut from the left at generation) and whose prompt is not a training prompt.
Prints every drop reason with its count, a summary table, and writes stats.json (counts and token-length
percentiles per split). Every write is atomic.

    python split_datasets.py                                  # all tasks, config defaults
    python split_datasets.py --max_seq_len 320 --seed 1 --max_rows_per_task 5000
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from tqdm import tqdm

from configs.base_config import parse_args_and_config
from utils_data import atomic_write_text, example_lengths, read_jsonl, read_records, write_jsonl
from utils_model import load_tokenizer, resolve_model_dir

SPLITS = ("train", "val", "test", "tiny", "toy", "bench")
TOY_ROWS = 16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--in_dir", default=None, help="folder with {task}_full.jsonl and {task}_bench.jsonl "
                                                  "(default: the config's full_dir, data/full)")
    p.add_argument("--max_rows_per_task", type=int, default=10000, help="cap per task, by seeded sampling (0 = none)")
    return p


def percentiles(lengths) -> dict:
    if not len(lengths):
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    a = np.asarray(lengths)
    return {"p50": int(np.percentile(a, 50)), "p90": int(np.percentile(a, 90)),
            "p99": int(np.percentile(a, 99)), "max": int(a.max())}


def filter_rows(rows, tokenizer, cfg, drops) -> tuple[list[dict], list[int]]:
    """Steps 2-4: (kept rows, their full-sequence token lengths); `drops` counts each reason."""
    kept, seen = [], set()
    for r in rows:
        if not r["instruction"].strip() or not r["output"].strip():
            drops["empty instruction or output"] += 1
            continue
        key = (r["instruction"], r.get("input", ""))
        if key in seen:
            drops["duplicate (instruction, input)"] += 1
            continue
        seen.add(key)
        kept.append(r)
    lengths = example_lengths(tokenizer, kept, cfg.prompt_format)
    out, out_len = [], []
    for r, n in zip(kept, lengths):
        if n > cfg.max_seq_len:
            drops[f"longer than max_seq_len={cfg.max_seq_len} tokens"] += 1
            continue
        out.append(r)
        out_len.append(n)
    return out, out_len


def split_task(task, in_dir: Path, out_dir: Path, tokenizer, cfg, max_rows: int) -> dict:
    path = in_dir / f"{task}_full.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run `python prepare_datasets.py` first "
                                f"(or pass --in_dir to the folder with {task}_full.jsonl)")
    rows = read_records(path)
    drops = {"empty instruction or output": 0, "duplicate (instruction, input)": 0,
             f"longer than max_seq_len={cfg.max_seq_len} tokens": 0, "over --max_rows_per_task cap": 0}
    rows, lengths = filter_rows(rows, tokenizer, cfg, drops)
    rng = random.Random(f"{cfg.seed}:{task}:split")
    idx = list(range(len(rows)))
    rng.shuffle(idx)
    if max_rows and len(idx) > max_rows:
        drops["over --max_rows_per_task cap"] = len(idx) - max_rows
        idx = idx[:max_rows]
    n = len(idx)
    n_train, n_val = int(0.8 * n), int(0.1 * n)
    parts = {"train": idx[:n_train], "val": idx[n_train:n_train + n_val], "test": idx[n_train + n_val:]}
    train_idx = parts["train"]
    parts["tiny"] = random.Random(f"{cfg.seed}:{task}:tiny").sample(train_idx, min(1000, int(0.1 * len(train_idx))))
    parts["toy"] = random.Random(f"{cfg.seed}:{task}:toy").sample(train_idx, min(TOY_ROWS, len(train_idx)))
    stats = {}
    for split, ids in parts.items():
        write_jsonl(out_dir / f"{task}_{split}.jsonl", [rows[i] for i in ids])
        stats[split] = {"rows": len(ids), "tokens": percentiles([lengths[i] for i in ids])}

    # Bench: prompts only (outputs there are references, not training targets).
    bench, bdrops = [], {f"prompt of max_seq_len={cfg.max_seq_len} tokens or more": 0, "prompt also in training data": 0}
    bpath = in_dir / f"{task}_bench.jsonl"
    if bpath.exists():
        brows = read_jsonl(bpath, required=("instruction", "input", "kind"), string_fields=("instruction", "input"))
        train_keys = {(r["instruction"], r.get("input", "")) for r in rows}
        plens = example_lengths(tokenizer, [dict(r, output="") for r in brows], cfg.prompt_format)
        blens = []
        for r, n_tok in zip(brows, plens):
            if n_tok - 1 >= cfg.max_seq_len:  # example_lengths counts the EOS after an empty response
                bdrops[f"prompt of max_seq_len={cfg.max_seq_len} tokens or more"] += 1
                continue
            if (r["instruction"], r["input"]) in train_keys:
                bdrops["prompt also in training data"] += 1
                continue
            bench.append(r)
            blens.append(n_tok - 1)
        kinds = {}
        for r in bench:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        stats["bench"] = {"rows": len(bench), "read": len(brows), "kinds": kinds, "prompt_tokens": percentiles(blens)}
    else:
        stats["bench"] = {"rows": 0, "read": 0, "kinds": {}, "prompt_tokens": percentiles([])}
    write_jsonl(out_dir / f"{task}_bench.jsonl", bench)
    stats["full_kept"] = len(rows)
    stats["drops"] = drops
    stats["bench_drops"] = bdrops
    return stats


def main(argv=None) -> dict:
    args, cfg = parse_args_and_config(build_parser(), argv)
    in_dir, out_dir = Path(args.in_dir or cfg.full_dir), Path(cfg.data_dir)
    tokenizer = load_tokenizer(resolve_model_dir(cfg.model_name))
    print(f"[split] {in_dir} -> {out_dir}; seed={cfg.seed} max_seq_len={cfg.max_seq_len} "
          f"prompt_format={cfg.prompt_format} model={cfg.model_name}")
    all_stats = {}
    for task in tqdm(cfg.tasks, desc="split tasks"):
        all_stats[task] = split_task(task, in_dir, out_dir, tokenizer, cfg, args.max_rows_per_task)
        for reason, n in {**all_stats[task]["drops"], **{"bench: " + k: v for k, v in all_stats[task]["bench_drops"].items()}}.items():
            if n:
                tqdm.write(f"[split] {task}: dropped {n} rows: {reason}")
    print(f"\n{'task':<11} {'kept':>6} " + " ".join(f"{s:>6}" for s in SPLITS) + "   train tokens p50/p90/p99/max  bench kinds")
    for task, st in all_stats.items():
        t = st["train"]["tokens"]
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(st["bench"]["kinds"].items()))
        print(f"{task:<11} {st['full_kept']:>6} " + " ".join(f"{st[s]['rows']:>6}" for s in SPLITS)
              + f"   {t['p50']}/{t['p90']}/{t['p99']}/{t['max']:<14} {kinds}")
    meta = {"seed": cfg.seed, "max_seq_len": cfg.max_seq_len, "prompt_format": cfg.prompt_format,
            "model_name": cfg.model_name, "max_rows_per_task": args.max_rows_per_task, "in_dir": str(in_dir)}
    atomic_write_text(out_dir / "stats.json", json.dumps({"config": meta, "tasks": all_stats}, indent=2) + "\n")
    print(f"[split] wrote {out_dir}/{{task}}_{{{','.join(SPLITS)}}}.jsonl and stats.json")
    return all_stats


if __name__ == "__main__":
    main()
