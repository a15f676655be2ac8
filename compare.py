"""The full comparison: every method and named configuration x seeds x task orders, then one aggregate.

    python compare.py --jobs 2             # run what is missing, then aggregate (logs/compare/); make compare
    python compare.py --quick              # a short version: 4 steps per task, seed 42 only, loss and drift only
    python compare.py --aggregate_only     # only the tables and figures, from the logs there are
    python compare.py --preset paper --model_name /path/to/llama-2-7b-hf   # config overrides reach every run
    python compare.py --configs ds_lora,seq_lora --seeds 42 --orders forward

Each (order, seed) pair is one log folder, logs/compare/{order}/seed{S}/ (checkpoints under checkpoints/compare/),
shared by every configuration of that pair, as the training scripts expect (the base-model stage is computed once
per folder and reused). A configuration is one training-script command (CONFIGS); the DS-LoRA runs also log their
own_task and routed views after the last stage. Every run is a subprocess: its wall time and peak resident memory
(os.wait4) go to logs/compare/runs.jsonl. Resumable: a configuration whose run finished is skipped (the scripts
themselves also resume after their last finished stage), so an interrupted comparison goes on where it stopped.
Configurations that need a method the training scripts do not offer yet are skipped with a note.

The aggregate reads every folder (summarize_seeds.run_metrics: the loss matrix's AP / BWT / forgetting, the
own_task and routed views, knowledge and format, drift; plus FWT and the primary-score matrix here) and writes
logs/compare/results.md: per order, each method's mean ± std over seeds, the change between the orders, wall time
and peak memory; and the figures logs/compare/ap_bwt.png (AP against BWT on loss, with the seed std as error
bars, one panel per order) and logs/compare/loss_heatmaps.png (the mean loss matrix of each method).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from evaluation.cl_metrics import cl_metrics
from summarize_seeds import _rows, fmt, run_metrics
from utils_io import append_jsonl, atomic_write_text

ROOT = Path(__file__).resolve().parent
TASKS = ("T1_general", "T2_math", "T3_code", "T4_tool", "T5_safety")
ORDER_NAMES = ("forward", "reverse")


def task_orders(tasks) -> dict:
    """forward = the design's order (or --tasks), reverse = the same tasks backwards."""
    return {"forward": tuple(tasks), "reverse": tuple(reversed(tasks))}

# name -> (script, arguments, method name the script logs under, what it needs to exist)
CONFIGS = {
    "ds_lora_slsd": ("train_slsd_seq.py", [], "ds_lora_slsd", None),
    "ds_lora": ("train_slsd_seq.py", ["--use_slsd", "false"], "ds_lora", None),
    "seq_lora": ("train_seq_baselines.py", ["--method", "seq_lora"], "seq_lora", "seq_lora"),
    "seq_lora_r16": ("train_seq_baselines.py", ["--method", "seq_lora", "--lora_r", "16", "--lora_alpha", "32",
                                                "--run_name", "seq_lora_r16"], "seq_lora_r16", "seq_lora"),
    "seq_lora_all_layers": ("train_seq_baselines.py", ["--method", "seq_lora", "--num_frozen_layers", "0",
                                                       "--run_name", "seq_lora_all_layers"], "seq_lora_all_layers",
                            "seq_lora"),
    "replay": ("train_seq_baselines.py", ["--method", "replay"], "replay", "replay"),
    "ewc": ("train_seq_baselines.py", ["--method", "ewc"], "ewc", "ewc"),
    "inscl": ("train_seq_baselines.py", ["--method", "inscl"], "inscl", "inscl"),
    "ilora": ("train_seq_baselines.py", ["--method", "ilora"], "ilora", "ilora"),
    "olora": ("train_seq_baselines.py", ["--method", "olora"], "olora", "olora"),
    # compute-matched replay: the replayed rows take half of each batch's places (a Seq-LoRA step's rows and cost)
    "replay_mix": ("train_seq_baselines.py", ["--method", "replay", "--replay_mode", "mix"], "replay_mix",
                   "replay_mode"),
    "inscl_mix": ("train_seq_baselines.py", ["--method", "inscl", "--replay_mode", "mix"], "inscl_mix", "replay_mode"),
    "ilora_mix": ("train_seq_baselines.py", ["--method", "ilora", "--replay_mode", "mix"], "ilora_mix", "replay_mode"),
    "seq_lora+key": ("train_seq_baselines.py", ["--method", "seq_lora", "--loss_tokens", "key"], "seq_lora+key",
                     "loss_tokens"),
    "seq_lora+low_ppl": ("train_seq_baselines.py", ["--method", "seq_lora", "--loss_tokens", "low_ppl"],
                         "seq_lora+low_ppl", "loss_tokens"),
}
SINGLE = "single_task"  # the upper reference: train_single_task.py once per task (its own fast branch, no sequence);
#                        it does not depend on the order, so it runs in the first order only and serves both
# the short version: 4 steps per task, loss + drift only (no generation, no knowledge ranking), smaller SLSD probe
# buffer (32 scored rows), router description (16 + 16 rows) and drift (2 probes)
QUICK_ARGS = ["--max_steps_per_task", "4", "--bench_metrics", "false", "--eval_max_samples", "8",
              "--probe_size_per_task", "32", "--router_rows_per_task", "16", "--drift_num_probes", "2"]
# the default comparison, sized for about 3 hours on 2 CPU cores with --jobs 2 (105 runs: 15 configurations x 3
# seeds x 2 orders + 5 single-task references x 3 seeds; measured in parts: 2 h 4 min for 87 runs, 23 min for the
# 18 mix runs): 8 steps per task (32 rows of batch 4; the scripts' default is 16), loss + drift (generation and
# knowledge are the dearest part of an evaluation; `make demo` measures them for DS-LoRA + SLSD); --with_metrics
# scores them for every run
DEFAULT_ARGS = ["--max_steps_per_task", "8", "--bench_metrics", "false"]


def available(need: str | None) -> bool:
    """Whether the training scripts offer what a configuration needs (a baseline method or a config key)."""
    if need is None:
        return True
    if need in ("loss_tokens", "replay_mode"):  # config keys
        from configs.base_config import BaseConfig
        return need in BaseConfig.__dataclass_fields__
    import train_seq_baselines
    return need in train_seq_baselines.METHODS


def run_command(cmd: list[str], log_path: Path, threads: int | None = None) -> dict:
    """Run `cmd` as a child process (output to log_path; `threads` caps its torch/OpenMP threads); its exit code,
    wall seconds and peak RSS (MB)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def finished(runs: list[dict], order: str, seed: int, config: str) -> bool:
    return any(r["order"] == order and r["seed"] == seed and r["config"] == config and r["rc"] == 0 for r in runs)


def run_all(args, overrides: list[str], out: Path) -> None:
    orders_map = task_orders(args.tasks)
    runs_path = out / "runs.jsonl"
    runs = _rows(runs_path)
    todo = []
    for order in args.orders:
        tasks = orders_map[order]
        for seed in args.seeds:
            folder = f"{order}/seed{seed}"
            common = ["--tasks", ",".join(tasks), "--seed", str(seed), "--log_dir", str(out / folder),
                      "--save_dir", str(Path(args.save_root) / folder)]
            for name in args.configs:
                if name == SINGLE:  # the same in every order: run in the first one only
                    if order != args.orders[0]:
                        continue
                    for t in tasks:
                        todo.append((order, seed, f"{SINGLE}:{t}",
                                     ["train_single_task.py", "--task", t, *common, *overrides]))
                    continue
                script, extra, _, need = CONFIGS[name]
                if not available(need):
                    print(f"[compare] {name}: skipped, the training scripts do not offer {need!r} yet")
                    continue
                todo.append((order, seed, name, [script, *extra, *common, *overrides]))
    print(f"[compare] {len(todo)} runs, {sum(finished(runs, o, s, c) for o, s, c, _ in todo)} already finished")
    from tqdm.auto import tqdm
    todo = [t for t in todo if not finished(runs, *t[:3])]
    # --jobs: folders (order, seed) in parallel, each folder's runs in turn (its runs share log files and the
    # base-model stage, so two of them must never run at once); each child gets cpu_count / jobs threads
    groups: dict[tuple, list] = {}
    for t in sorted(todo, key=lambda t: args.seeds.index(t[1])):  # seed by seed (both orders of a seed together), so
        groups.setdefault(t[:2], []).append(t)                    # an interrupted comparison has whole seeds
    jobs = max(1, min(args.jobs, len(groups)))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    lock = threading.Lock()
    bar = tqdm(total=len(todo), desc="compare")

    def run_group(items):
        for order, seed, config, cmd in items:
            res = run_command([sys.executable, *cmd], out / "run_logs" / f"{order}_seed{seed}_{config}.log", threads)
            rec = {"order": order, "seed": seed, "config": config, **res, "jobs": jobs, "command": " ".join(cmd)}
            with lock:
                append_jsonl(runs_path, [rec])
                runs.append(rec)
                bar.update()
                print(f"[compare] {order} seed {seed} {config}: rc {res['rc']}, {res['wall_s']:.0f} s, "
                      f"peak {res['peak_rss_mb']:.0f} MB")
                if res["rc"] != 0:
                    print(f"[compare] {config} failed; see {out / 'run_logs'}; the comparison goes on without it")
    if jobs == 1:
        for items in groups.values():
            run_group(items)
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(run_group, groups.values()))
    bar.close()
    for order in args.orders:  # per-folder plots and results.md (the per-run heatmaps, drift curves)
        for seed in args.seeds:
            folder = out / order / f"seed{seed}"
            if (folder / "seq_eval_loss.jsonl").exists():
                run_command([sys.executable, "plot_loss.py", "all", "--log_dir", str(folder),
                             "--tasks", ",".join(orders_map[order])], out / "run_logs" / f"{order}_seed{seed}_plot.log")


# ----------------------------------------------------------------------------- aggregate
EXTRA_COLUMNS = [("fwt_loss", "FWT loss ↑", "{:+.3f}"), ("ap_score", "AP score ↑", "{:.3f}"),
                 ("bwt_score", "BWT score ↑", "{:+.3f}"), ("fwt_knowledge", "FWT knowledge ↑", "{:+.3f}"),
                 ("forgetting_knowledge", "forgetting knowledge ↓", "{:.3f}"),
                 ("forgetting_format", "forgetting format ↓", "{:.3f}"),
                 ("kl_base_first", "KL first 5 ↓", "{:.4f}"), ("kl_base_rest", "KL rest ↓", "{:.4f}"),
                 ("wall_s", "wall s", "{:.0f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}")]


def method_measures(seed_dir: Path, method: str) -> dict:
    """summarize_seeds' measures plus FWT on loss and knowledge, the primary-score matrix and drift by position."""
    out = run_metrics(seed_dir, method)
    if not out:
        return {}
    loss = [r for r in _rows(seed_dir / "seq_eval_loss.jsonl")
            if r.get("method") == method and r.get("fast_mode", "current") == "current"]
    tasks = list(dict.fromkeys(r["eval_task"] for r in loss if r["stage"] == 0))
    T = len(tasks)
    cell = {(r["stage"], r["eval_task"]): r["loss"] for r in loss}
    out["fwt_loss"] = cl_metrics([[cell[(s, t)] for t in tasks] for s in range(T + 1)], higher_is_better=False)["fwt"]
    summary = seed_dir / f"cl_summary_{method}.json"
    if summary.exists():
        mats = json.loads(summary.read_text()).get("matrices", {})
        for name in ("score", "knowledge"):
            m = mats.get(name, {}).get("metrics")
            if m:
                key = "score" if name == "score" else "knowledge"
                out.setdefault(f"ap_{key}", m.get("ap"))
                out.setdefault(f"bwt_{key}", m.get("bwt"))
                out[f"fwt_{key}"] = m.get("fwt")
    drift = {r["metric"]: r["value"] for r in _rows(seed_dir / "seq_drift.jsonl")
             if r.get("method") == method and r.get("stage") == T and r.get("fast_mode", "current") == "current"}
    for k in ("kl_base_first", "kl_base_rest"):
        if k in drift:
            out[k] = drift[k]
    return out


def single_task_measures(seed_dir: Path, tasks) -> dict:
    """The upper reference: each task's final eval loss after training on it alone; AP = their mean."""
    final = {}
    for t in tasks:
        rows = [r for r in _rows(seed_dir / f"single_{t}_eval_loss.jsonl") if r.get("split") != "train"]
        if rows:
            final[t] = max(rows, key=lambda r: r["step"])["loss"]
    return {"ap_loss": float(np.mean(list(final.values())))} if len(final) == len(tasks) else {}


def aggregate(out: Path, orders, seeds, configs, tasks=TASKS) -> str:
    from summarize_seeds import COLUMNS
    orders_map = task_orders(tasks)
    runs = _rows(out / "runs.jsonl")
    methods = [CONFIGS[c][2] if c in CONFIGS else c for c in configs]
    per = {}  # (order, method) -> {seed: measures}
    for order in orders:
        for seed in seeds:
            d = out / order / f"seed{seed}"
            if not d.exists():
                continue
            for c, m in zip(configs, methods):
                found = (single_task_measures(out / orders[0] / f"seed{seed}", orders_map[order]) if c == SINGLE
                         else method_measures(d, m))
                if not found:
                    continue
                cost = [r for r in runs if r["order"] == (orders[0] if c == SINGLE else order) and r["seed"] == seed
                        and r["rc"] == 0
                        and (r["config"] == c or r["config"].startswith(f"{c}:"))]
                if cost:
                    found["wall_s"] = sum(r["wall_s"] for r in cost)
                    found["peak_rss_mb"] = max(r["peak_rss_mb"] for r in cost)
                per.setdefault((order, m), {})[seed] = found
    cols = [c for c in COLUMNS + EXTRA_COLUMNS if c[0] not in ("probe_kl_start",)
            and any(c[0] in v for runs_ in per.values() for v in runs_.values())]
    lines = ["# Comparison", "",
             f"Mean ± sample std over seeds ({', '.join(map(str, seeds))}); n = seeds with that measure. Loss: lower "
             "is better; BWT/FWT > 0 is better; forgetting > 0 is worse. Knowledge, format and score: higher is "
             "better. Wall time: the method's training and evaluation (a single-task reference sums its 5 runs).", ""]
    for order in orders:
        lines += [f"## Order {order}: {' -> '.join(t.split('_')[0] for t in orders_map[order])}", "",
                  "| method | " + " | ".join(h for _, h, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
        for m in methods:
            vals = list(per.get((order, m), {}).values())
            if vals:
                lines.append(f"| {m} | " + " | ".join(fmt([v.get(k) for v in vals], f) for k, _, f in cols) + " |")
        lines.append("")
    if len(orders) == 2:
        a, b = orders
        lines += [f"## Change between orders ({b} − {a}, paired by seed)", "",
                  "| method | AP loss | BWT loss | forgetting loss | AP knowledge | AP format |", "|---|---:|---:|---:|---:|---:|"]
        for m in methods:
            pa, pb = per.get((a, m), {}), per.get((b, m), {})
            both = [s for s in pa if s in pb]
            if not both:
                continue
            cells = []
            for k in ("ap_loss", "bwt_loss", "forgetting_loss", "ap_knowledge", "ap_format"):
                d = [pb[s][k] - pa[s][k] for s in both if k in pa[s] and k in pb[s]]
                cells.append(fmt(d, "{:+.3f}"))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "results.md", text)
    atomic_write_text(out / "results.json", json.dumps({f"{o}/{m}": v for (o, m), v in per.items()}, indent=1) + "\n")
    plot_ap_bwt(per, orders, methods, out / "ap_bwt.png")
    plot_heatmaps(out, orders[0], orders_map[orders[0]], seeds, configs, methods, out / "loss_heatmaps.png")
    return text


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_ap_bwt(per: dict, orders, methods, path: Path) -> None:
    """AP loss against BWT loss, mean ± std over seeds, one panel per order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(orders), figsize=(6 * len(orders), 4.5), squeeze=False)
    for ax, order in zip(axes[0], orders):
        for k, m in enumerate(methods):
            vals = [v for v in per.get((order, m), {}).values() if "bwt_loss" in v]
            if not vals:
                continue
            x, y = [v["ap_loss"] for v in vals], [v["bwt_loss"] for v in vals]
            ax.errorbar(np.mean(x), np.mean(y), xerr=np.std(x, ddof=1) if len(x) > 1 else 0,
                        yerr=np.std(y, ddof=1) if len(y) > 1 else 0, fmt="o", capsize=3, label=f"{m} (n={len(x)})",
                        color=plt.cm.tab20(k % 20))
        ax.set_xlabel("AP loss (lower is better)")
        ax.set_ylabel("BWT loss (higher is better)")
        ax.set_title(f"order {order}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    _save(fig, path)


def plot_heatmaps(out: Path, order: str, tasks, seeds, configs, methods, path: Path) -> None:
    """The mean over seeds of each method's stage x task loss matrix (first order)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mats = {}
    for c, m in zip(configs, methods):
        if c == SINGLE:
            continue
        Rs = []
        for seed in seeds:
            rows = [r for r in _rows(out / order / f"seed{seed}" / "seq_eval_loss.jsonl")
                    if r.get("method") == m and r.get("fast_mode", "current") == "current"]
            cell = {(r["stage"], r["eval_task"]): r["loss"] for r in rows}
            if all((s, t) in cell for s in range(len(tasks) + 1) for t in tasks):
                Rs.append([[cell[(s, t)] for t in tasks] for s in range(len(tasks) + 1)])
        if Rs:
            mats[m] = np.mean(np.array(Rs), axis=0), len(Rs)
    if not mats:
        return
    n = len(mats)
    cols = min(4, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.6 * cols, 3.2 * ((n + cols - 1) // cols)),
                             squeeze=False)
    lo = min(float(M.min()) for M, _ in mats.values())
    hi = max(float(M.max()) for M, _ in mats.values())
    for ax, (m, (M, k)) in zip(axes.flat, mats.items()):
        ax.imshow(M, cmap="viridis_r", vmin=lo, vmax=hi)
        ax.set_title(f"{m} (n={k})", fontsize=9)
        ax.set_xticks(range(M.shape[1]), [t.split("_")[0] for t in tasks], fontsize=7)
        ax.set_yticks(range(M.shape[0]), ["base"] + [t.split("_")[0] for t in tasks], fontsize=7)
        for i in range(M.shape[0]):
            for j in range(M.shape[1]):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"eval loss by stage (rows) and task (columns), mean over seeds, order {order}", fontsize=10)
    _save(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--configs", default=",".join([*CONFIGS, SINGLE]),
                    help=f"comma-separated, of {', '.join([*CONFIGS, SINGLE])}")
    ap.add_argument("--seeds", default=None, help="comma-separated (default 42,43,44; --quick: 42)")
    ap.add_argument("--orders", default="forward,reverse", help=f"comma-separated, of {', '.join(ORDER_NAMES)}")
    ap.add_argument("--tasks", default=",".join(TASKS), help="the forward order (reverse: the same backwards)")
    ap.add_argument("--out", default="logs/compare", help="log root (one folder per order and seed below it)")
    ap.add_argument("--save_root", default="checkpoints/compare")
    ap.add_argument("--quick", action="store_true", help="4 steps per task, loss and drift only, seed 42")
    ap.add_argument("--with_metrics", action="store_true",
                    help="score generation and knowledge in every run (hours per run on 2 CPU cores)")
    ap.add_argument("--aggregate_only", action="store_true")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once, each in its own (order, seed) folder, with cpu_count / jobs threads each")
    args, overrides = ap.parse_known_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in args.configs if c not in CONFIGS and c != SINGLE]
    args.orders = [o for o in args.orders.split(",") if o]
    args.tasks = [t for t in args.tasks.split(",") if t]
    if bad or set(args.orders) - set(ORDER_NAMES):
        raise SystemExit(f"unknown --configs {bad} or --orders {args.orders}; choose from {[*CONFIGS, SINGLE]} and "
                         f"{list(ORDER_NAMES)}")
    args.seeds = [int(s) for s in (args.seeds or ("42" if args.quick else "42,43,44")).split(",")]
    base = QUICK_ARGS if args.quick else ([] if args.with_metrics else DEFAULT_ARGS)
    out = Path(args.out)
    if not args.aggregate_only:
        run_all(args, base + overrides, out)
    print(aggregate(out, args.orders, args.seeds, args.configs, args.tasks))
    print(f"[compare] wrote {out / 'results.md'}, {out / 'ap_bwt.png'}, {out / 'loss_heatmaps.png'}")


if __name__ == "__main__":
    main()
