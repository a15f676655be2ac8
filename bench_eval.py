"""Benchmark: seconds per stage of the per-stage evaluation, before and after issue 16's changes, on the configured
model (default SmolLM2-135M-Instruct), and what that means for one run and for `make demo`.

Each variant evaluates the same model (the base with rank-8 LoRA on the upper layers, B drawn small and non-zero so
the adapters are live) with the real `utils_train.run_stage_eval` at a few stages, in a fresh log folder each time
(so nothing is reused from a cache), and times its parts: eval loss, generation, scoring (with the code sandbox),
knowledge ranking, drift.
  * before: the evaluation as it was: every stage scores every task (eval_grid full), fp32, 2 generated rows per
    kind (16 per stage), no knowledge score, no stop sequences.
  * after: the defaults: eval_grid needed (generated and knowledge scores only on the cells the CL metrics read),
    bf16 autocast where the CPU has native bf16, gen_rows_per_task 32, knowledge_rows_per_task 64, stop sequences,
    and the frozen-trunk cache: the stages of a variant share one model, so the base stage fills the cache and
    the later stages start their passes at the first adapted layer, as in a training run.
  * no_trunk_cache: the defaults with trunk_cache_mb 0 (every pass runs every layer).
A run of T tasks evaluates the base once (shared by every method in a log folder), then T stages; with eval_grid
needed the middle stages score 2 tasks and the last stage all. The per-run figure is a sum of the measured stages,
(T - 1) x middle + last, and "base + run" adds the base: what `make demo`'s fully scored DS-LoRA + SLSD run spends
on evaluation (its controls run with --bench_metrics false: loss and drift only). The middle stage measured stands
for all T - 1 (stage 2 scores T2 and T3, among the dearest pairs). `--demo_seconds` (a measured `time make demo`)
adds that evaluation's share of the demo's time.

    python bench_eval.py                       # both variants at stages 0, 2 and 5 (about 20 min on 2 cores)
    python bench_eval.py --variants after --demo_seconds 1700
    python bench_eval.py --variants no_trunk_cache,after --stages 0,2    # what the trunk cache saves
"""
from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

import evaluation.stage as stage_mod
import utils_train
from configs.base_config import make_config
from models.lora_simple import adapter_layers, replace_with_lora
from utils_model import enable_autocast, load_model_and_tokenizer

VARIANTS = {
    "before": dict(eval_grid="full", bf16_autocast=False, knowledge_rows_per_task=0, gen_rows_per_task=0),
    "no_trunk_cache": dict(trunk_cache_mb=0),  # the defaults without the frozen-trunk cache (utils_forward.TrunkCache)
    "after": {},
}
OLD_ROWS_PER_KIND = 2  # the old default metrics_max_samples: generated rows per kind of each task


@contextmanager
def timed(parts: dict):
    """Wrap the evaluation's parts so each call adds its wall seconds to parts[name]."""
    targets = [(utils_train, "eval_loss", "eval loss"), (stage_mod, "generate", "generate"),
               (stage_mod, "score_rows", "score"), (stage_mod, "score_knowledge", "knowledge"),
               (stage_mod, "drift_metrics", "drift")]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in targets]

    def wrap(fn, label):
        def inner(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[label] += time.perf_counter() - t0
        return inner
    for (mod, name, label), (_, _, fn) in zip(targets, saved):
        setattr(mod, name, wrap(fn, label))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


@contextmanager
def no_stops():
    """Generation without stop sequences (before): every reply runs to EOS or its budget."""
    saved = stage_mod.STOP_STRINGS
    stage_mod.STOP_STRINGS = {}
    try:
        yield
    finally:
        stage_mod.STOP_STRINGS = saved


def old_bench(bench: dict) -> dict:
    """The bench rows the old default generated: the first OLD_ROWS_PER_KIND rows of each kind in a seeded order."""
    out = {}
    for task, rows in bench.items():
        by_kind = defaultdict(list)
        for r in rows:
            by_kind[r["kind"]].append(r)
        keep = []
        for kind, rs in sorted(by_kind.items()):
            keep += random.Random(f"42/{task}/{kind}").sample(rs, min(OLD_ROWS_PER_KIND, len(rs)))
        out[task] = keep
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="before,after", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--stages", default="0,2,5", help="stages to time: the base (0), a middle stage, the last")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the machine's cores)")
    ap.add_argument("--demo_seconds", type=float, default=None, help="a measured `time make demo`, for the share")
    args, rest = ap.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    stages = [int(s) for s in args.stages.split(",")]
    results = {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown {variant!r}; choose from {', '.join(VARIANTS)}")
        cfg = make_config(rest, **VARIANTS[variant])
        torch.manual_seed(0)
        model, tok, device = load_model_and_tokenizer(cfg)
        replace_with_lora(model, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, 0.0, cfg.num_frozen_layers)
        for _, layer in adapter_layers(model):
            torch.nn.init.normal_(layer.lora_B, std=1e-3)  # live adapters, as after training
        amp = enable_autocast(model, cfg, device)
        eval_sets = utils_train.load_eval_sets(cfg, tok)
        bench = utils_train.load_bench(cfg)
        if variant == "before":
            bench = old_bench(bench)
        knowledge = utils_train.load_knowledge(cfg)
        T = len(cfg.tasks)
        results[variant] = {}
        for stage in stages:
            if not 0 <= stage <= T:
                raise SystemExit(f"--stages: {stage} is not in 0..{T}")
            parts = defaultdict(float)
            with tempfile.TemporaryDirectory() as tmp, timed(parts):
                cfg.log_dir = tmp
                scored = utils_train.scored_tasks(cfg, stage)
                t0 = time.perf_counter()
                with no_stops() if variant == "before" else contextlib.nullcontext():
                    utils_train.run_stage_eval(model, tok, cfg, "bench_eval", stage,
                                               "base" if stage == 0 else cfg.tasks[stage - 1], 0, device, eval_sets,
                                               None, bench, knowledge)
                total = time.perf_counter() - t0
            results[variant][stage] = {"total": total, **parts}
            n_gen = sum(len(bench.get(t, [])) for t in scored)
            print(f"[bench_eval] {variant:6s} stage {stage}: {total:6.1f} s  (scored tasks {len(scored)}, generated "
                  f"rows {n_gen}, bf16 autocast {'on' if amp else 'off'}) "
                  + "  ".join(f"{k} {v:.1f}" for k, v in parts.items()))
        del model

    print()
    print("| variant | " + " | ".join(f"stage {s} (s)" for s in stages) + " | per run (s) | base + run (s) |")
    print("|---|" + "---:|" * (len(stages) + 2))
    for variant, per in results.items():
        first, mid, last = per.get(0, {}).get("total"), per.get(stages[1] if len(stages) > 2 else -1, {}).get("total"), \
            per.get(stages[-1], {}).get("total")
        run = demo = None
        if None not in (first, mid, last):
            T = len(make_config(rest).tasks)
            run = (T - 1) * mid + last
            demo = first + run
        cells = [f"{per[s]['total']:.1f}" for s in stages] + [f"{run:.0f}" if run else "n/a",
                                                               f"{demo:.0f}" if demo else "n/a"]
        print(f"| {variant} | " + " | ".join(cells) + " |")
        if demo and args.demo_seconds:
            print(f"  {variant}: evaluation {demo:.0f} s = {100 * demo / args.demo_seconds:.0f}% of the "
                  f"{args.demo_seconds:.0f} s demo")


if __name__ == "__main__":
    main()
