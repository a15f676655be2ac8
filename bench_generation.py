"""Benchmark: batched left-padded greedy generation (evaluation.generation.generate) versus one prompt at a time.

Loads the configured model (default SmolLM2-135M-Instruct), takes up to 16 prompts from the T1/T5 bench
files (else the built-in drift probes), and times `generate` at each batch size with the same prompts and
the same token budget. Greedy decoding runs until every row of a batch hits EOS or the budget, so
prompts/s counts whole prompts answered. Any config override works (--device cpu, --model_name ...).

    python bench_generation.py                                   # batch 1, 8, 16 at 64 new tokens
    python bench_generation.py --batch_sizes 1,4 --new_tokens 32 --device cpu --threads 1

On a shared CPU, other processes skew the timings (oversubscribed threads hurt large batches most);
run it on a quiet machine, or with --threads 1 for a steadier comparison.
"""
import argparse
import time
from pathlib import Path

import torch

from evaluation.drift import DRIFT_PROMPTS
from evaluation.generation import generate_ids
from configs.base_config import parse_args_and_config
from utils_data import read_jsonl
from utils_model import load_model_and_tokenizer


def bench_prompts(cfg, n):
    """Up to n rows, alternating between the T1 and T5 bench files; the drift probes when both are missing."""
    pools = []
    for task in ("T1_general", "T5_safety"):
        path = Path(cfg.data_paths.get(task, {}).get("bench", ""))
        if path.is_file():
            pools.append(read_jsonl(path, required=("instruction",)))
    rows = [pool[i] for i in range(max((len(p) for p in pools), default=0)) for pool in pools if i < len(pool)]
    if rows:
        return rows[:n], "T1/T5 bench files"
    return [{"instruction": p, "input": ""} for p in DRIFT_PROMPTS[:n]], "built-in drift probes"


def timed_generate(model, tokenizer, rows, cfg, device, new_tokens, batch_size):
    """(seconds, token-id replies) of one generate pass at `batch_size`."""
    cfg.eval_batch_size = batch_size
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ids = generate_ids(model, tokenizer, rows, cfg, device, new_tokens, desc=f"batch {batch_size}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, ids


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--num_prompts", type=int, default=16, help="prompts answered at every batch size")
    parser.add_argument("--batch_sizes", default="1,8,16", help="comma-separated batch sizes to time")
    parser.add_argument("--new_tokens", type=int, default=64, help="max_new_tokens of every reply")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args, cfg = parse_args_and_config(parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    model, tokenizer, device = load_model_and_tokenizer(cfg)
    rows, source = bench_prompts(cfg, args.num_prompts)
    dtype = next(model.parameters()).dtype
    print(f"[bench] {cfg.model_name} on {device} ({dtype}), {len(rows)} prompts from {source}, "
          f"max_new_tokens={args.new_tokens}, torch threads={torch.get_num_threads()}")
    timed_generate(model, tokenizer, rows[:2], cfg, device, 4, 2)  # warm-up: kernels, allocator

    results, reference = [], None
    for bs in batch_sizes:
        seconds, ids = timed_generate(model, tokenizer, rows, cfg, device, args.new_tokens, bs)
        reference = ids if reference is None else reference
        tokens = sum(len(x) for x in ids)
        same = sum(a == b for a, b in zip(ids, reference))
        results.append((bs, seconds, len(rows) / seconds, tokens / seconds, same))
    base = results[0][2]
    print(f"{'batch':>5} {'seconds':>8} {'prompts/s':>10} {'new tok/s':>10} {'speedup':>8} "
          f"{'same as batch ' + str(batch_sizes[0]):>16}")
    for bs, seconds, pps, tps, same in results:
        print(f"{bs:>5} {seconds:>8.2f} {pps:>10.2f} {tps:>10.1f} {pps / base:>7.1f}x {same:>12}/{len(rows)}")


if __name__ == "__main__":
    main()
