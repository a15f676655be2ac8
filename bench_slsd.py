"""Benchmark: what SLSD costs over plain DS-LoRA for one stage, on the configured model (default SmolLM2-135M).

Each variant runs the real train_slsd_seq.main in its own process on one task (--task), with the per-stage
evaluation and checkpoint writing stubbed out (both are the same for every variant), and measures the stage from
start_new_task to the point where the adapters would be saved: data loading, optimizers, [probe scoring, KL at
the start], the training steps [with their KD terms], [KL at the end].
  * time: wall seconds of that stage. The supervised steps and SLSD's own parts (probe scoring, the two KL
    passes, the KD terms) are timed too, and the ratio for other stage lengths S is extrapolated from them:
    1 + (scoring + KL logs + S / kd_interval * KD term) / (DS-LoRA's setup + S * step).
  * memory: the peak resident set size of the process during the stage (Linux: VmHWM, reset at the stage start
    through /proc/self/clear_refs), which counts the loaded model too, and that peak minus the resident size at the
    stage start (what the stage itself adds: activations, logits, gradients, optimizer state, SLSD's cache).
    On CUDA also torch.cuda.max_memory_allocated over the stage. Python's tracemalloc cannot see torch's CPU
    allocations, which is why the OS figure is used. With glibc's default allocator the resident size also holds
    freed blocks the allocator keeps (on SmolLM2 the 128-row probe scoring left about 1.2 GB resident that the
    training steps then reuse), so the peak depends on the order of the work; `--live_memory` runs the workers with
    MALLOC_MMAP_THRESHOLD_=131072, which hands freed blocks back, so the peak follows the live tensors (every
    variant gets slower by page faults: compare times only within one mode).

    python bench_slsd.py                             # 16 steps, T2_math: ds_lora vs ds_lora_slsd (kd_loss topk_tail)
    python bench_slsd.py --steps 8 --variants ds_lora,slsd,slsd_topk,slsd_nolog
    python bench_slsd.py --steps 32 --kd_interval 4  # config overrides apply to every variant
    python bench_slsd.py --steps 4 --live_memory     # peak memory of the live tensors
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from configs.base_config import make_config

VARIANTS = {  # name -> the overrides that make it
    "ds_lora": ["--use_slsd", "false"],
    "slsd": [],  # the configured SLSD (default kd_loss topk_tail)
    "slsd_topk": ["--kd_loss", "topk"],
    "slsd_nolog": ["--probe_kl_log", "false"],  # without the two KL passes that only log
    "slsd_kd0": ["--kd_lambda", "0"],  # probe scoring and KL logs only, no KD terms
}
RESULT = "BENCH_RESULT "


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(variant: str, task: str, steps: int, overrides: list[str]) -> dict:
    """Run one stage of train_slsd_seq.main in this process and return its measurements."""
    import torch

    import train_slsd_seq as script
    marks, parts, calls = {"cuda": False}, defaultdict(float), defaultdict(int)

    def sync():
        if marks["cuda"]:
            torch.cuda.synchronize()

    def timed(name, fn):
        def wrap(*a, **kw):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            parts[name] += time.perf_counter() - t0
            calls[name] += 1
            return out
        return wrap

    real_start = script.start_new_task

    def stage_start(model, task_name, seed=0):
        marks["cuda"] = next(model.parameters()).is_cuda
        sync()
        if marks["cuda"]:
            torch.cuda.reset_peak_memory_stats()
        marks["hwm_reset"] = reset_peak_rss()
        marks["rss_start_kb"] = rss_kb("VmRSS")
        marks["t0"] = time.perf_counter()
        return real_start(model, task_name, seed=seed)

    def stage_end(model, out_dir):  # replaces save_ds_lora: the stage's training is over
        sync()
        marks["t1"] = time.perf_counter()
        marks["peak_kb"] = rss_kb("VmHWM") if marks["hwm_reset"] else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if marks["cuda"]:
            marks["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        return []

    script.start_new_task = stage_start
    script.save_ds_lora = stage_end
    script.run_stage_eval = lambda *a, **kw: []
    script.mark_done = lambda *a, **kw: None
    script.build_probe_buffer = timed("probe_scoring_s", script.build_probe_buffer)
    script.probe_kl = timed("probe_kl_s", script.probe_kl)
    script.add_kd_grads = timed("kd_terms_s", script.add_kd_grads)
    script.accumulate_grads = timed("steps_s", script.accumulate_grads)  # the supervised forward and backward
    script.apply_step = timed("steps_s", script.apply_step)
    with tempfile.TemporaryDirectory() as tmp:
        script.main(["--tasks", task, "--max_steps_per_task", str(steps), "--run_metrics", "false",
                     "--eval_max_samples", "1", "--log_dir", f"{tmp}/logs", "--save_dir", f"{tmp}/ckpt",
                     "--log_interval", "1000000", *VARIANTS[variant], *overrides])
    return {"variant": variant, "stage_s": marks["t1"] - marks["t0"], **{k: v for k, v in parts.items()},
            "kd_terms": calls["kd_terms_s"], "steps": steps,
            "rss_start_mb": marks["rss_start_kb"] / 1024,
            "peak_rss_mb": marks["peak_kb"] / 1024, "exact_stage_peak": marks["hwm_reset"],
            "stage_added_mb": (marks["peak_kb"] - marks["rss_start_kb"]) / 1024,
            **({"cuda_peak_mb": marks["cuda_peak_mb"]} if "cuda_peak_mb" in marks else {})}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps in the stage (0 = max_steps_per_task)")
    parser.add_argument("--task", default="T2_math", help="the task the stage trains on")
    parser.add_argument("--variants", default="ds_lora,slsd", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--live_memory", action="store_true",
                        help="workers return freed memory to the OS (MALLOC_MMAP_THRESHOLD_), so the peak RSS "
                             "follows live tensors; slower")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    args, overrides = parser.parse_known_args(argv)
    cfg = make_config(overrides)  # the config every variant starts from (a bad key fails here, once)
    steps = args.steps or cfg.max_steps_per_task
    if args.worker:
        print(RESULT + json.dumps(worker(args.worker, args.task, steps, overrides)), flush=True)
        return 0
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "ds_lora" not in variants:
        sys.exit(f"--variants: unknown {unknown} or no ds_lora (the reference); choose from {', '.join(VARIANTS)}")
    results = {}
    for v in variants:  # one process each: peak memory and allocator state are per process
        print(f"[bench] {v}: one {args.task} stage of {steps} steps ...", flush=True)
        env = os.environ | ({"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
                            if args.live_memory else {})
        proc = subprocess.run([sys.executable, __file__, "--worker", v, "--task", args.task, "--steps", str(steps),
                               *overrides], capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
        if proc.returncode or not lines:
            sys.exit(f"[bench] {v} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[v] = json.loads(lines[-1][len(RESULT):])
    report(results, args.task, steps, cfg, overrides + (["(--live_memory)"] if args.live_memory else []))
    return 0


def report(results: dict, task: str, steps: int, cfg, overrides) -> None:
    ref = results["ds_lora"]
    print(f"\none {task} stage of {steps} steps on {cfg.model_name}, batch {cfg.per_device_batch_size}, "
          f"kd_interval {cfg.kd_interval}, kd_batch_size {cfg.kd_batch_size}, probe_size_per_task "
          f"{cfg.probe_size_per_task}; overrides: {' '.join(overrides) or '(none)'}")
    print(f"{'variant':<10} {'stage s':>8} {'x time':>7} {'steps s':>8} {'peak RSS MB':>12} {'x peak':>7} "
          f"{'stage adds MB':>14} {'x adds':>7}  SLSD parts (s)")
    for v, r in results.items():
        parts = ", ".join(f"{k[:-2]} {r[k]:.1f}" for k in ("probe_scoring_s", "probe_kl_s", "kd_terms_s") if k in r)
        if "kd_terms_s" in r:
            parts += f" ({r['kd_terms']} terms)"
        print(f"{v:<10} {r['stage_s']:>8.1f} {r['stage_s'] / ref['stage_s']:>7.3f} {r.get('steps_s', 0):>8.1f} "
              f"{r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] / ref['peak_rss_mb']:>7.3f} {r['stage_added_mb']:>14.0f} "
              f"{r['stage_added_mb'] / max(ref['stage_added_mb'], 1e-9):>7.3f}  {parts}")
        if "cuda_peak_mb" in r:
            print(f"{'':<10} CUDA peak {r['cuda_peak_mb']:.0f} MB (x {r['cuda_peak_mb'] / ref['cuda_peak_mb']:.3f})")
    if not all(r["exact_stage_peak"] for r in results.values()):
        print("note: /proc/self/clear_refs was not writable: peaks are the process's lifetime ru_maxrss")
    # Extrapolation to other stage lengths from the measured parts (DS-LoRA's step time for both).
    step = ref["steps_s"] / steps
    setup = ref["stage_s"] - ref["steps_s"]
    lengths = sorted({steps, 16, 64, 256, 1024})
    for v, r in results.items():
        if v == "ds_lora":
            continue
        fixed = r.get("probe_scoring_s", 0.0) + r.get("probe_kl_s", 0.0)
        per_term = r["kd_terms_s"] / r["kd_terms"] if r.get("kd_terms") else 0.0
        ratios = [1 + (fixed + s / cfg.kd_interval * per_term) / (setup + s * step) for s in lengths]
        print(f"{v}: extrapolated x time for a stage of " + ", ".join(f"{s} steps {x:.2f}" for s, x in
                                                                          zip(lengths, ratios))
              + f" (fixed {fixed:.1f} s, KD term {per_term:.2f} s, supervised step {step:.2f} s, setup {setup:.1f} s)")
    print("targets (issue 10): x time <= 1.15, x peak <= 1.05")


if __name__ == "__main__":
    sys.exit(main())
