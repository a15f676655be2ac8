"""Benchmark and sanity check of the code sandbox: score every T3 bench row's gold answer through the scorers.

Each HumanEval row's canonical solution and each codeio row's reference (as its own candidate) must score 1;
anything else is a scorer or sandbox defect. Prints the count, the failures, and the wall time per check.

    python bench_sandbox.py                      # data/split/T3_code_bench.jsonl, 2 threads
    python bench_sandbox.py --workers 8 --bench path/to/T3_code_bench.jsonl
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from evaluation.code_score import score_codeio, score_humaneval
from evaluation.sandbox import isolation_problem
from utils_io import read_jsonl


def gold_score(row, timeout_s):
    if row["kind"] == "humaneval":
        return score_humaneval(row, row["canonical_solution"], timeout_s=timeout_s)
    if row["kind"] == "codeio":
        return score_codeio(row["reference_code"], row["reference_code"], row["inputs"], timeout_s=timeout_s)
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default="data/split/T3_code_bench.jsonl")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout_s", type=float, default=20.0, help="per check (generous: this checks correctness)")
    args = ap.parse_args(argv)
    problem = isolation_problem()
    if problem:
        raise SystemExit(f"sandbox unavailable: {problem}")
    rows = [r for r in read_jsonl(args.bench, required=("id", "kind")) if r["kind"] in ("humaneval", "codeio")]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        scores = list(tqdm(pool.map(lambda r: gold_score(r, args.timeout_s), rows), total=len(rows), desc="gold"))
    wall = time.perf_counter() - start
    failed = [r["id"] for r, s in zip(rows, scores) if s != 1]
    by_kind = {k: sum(1 for r in rows if r["kind"] == k) for k in ("humaneval", "codeio")}
    print(f"gold answers scoring 1: {len(rows) - len(failed)} / {len(rows)} "
          f"(humaneval {by_kind['humaneval']}, codeio {by_kind['codeio']})")
    print(f"wall time: {wall:.1f} s with {args.workers} threads = {wall / max(1, len(rows)):.3f} s per row "
          f"(each check starts two sandboxes)")
    if failed:
        print("FAILED:", ", ".join(failed))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
