"""Mean and spread over seeds of the runs in one folder per seed: loss-matrix CL metrics, drift, SLSD probe KL.

Each seed's logs live in `{log_root}/seed{S}/` (every method of that seed in the same folder, as the training
scripts write them with --log_dir). For every method (its name in the logs: the script's default or
--run_name) and seed this reads the JSONL logs directly:
  * loss matrix (stage x task eval loss, DS-LoRA `fast_mode` current) -> AP, BWT, forgetting (evaluation.cl_metrics;
    for losses BWT > 0 is improvement, forgetting > 0 is getting worse);
  * own_task view after the last stage (DS-LoRA only): AP and BWT with each task's own fast branch;
  * routed view (DS-LoRA with a task router, when logged): AP, BWT and forgetting (cells it did not log are the
    current view's, as in results.md), its AP minus own_task's, and the router accuracy after the last stage
    (mean and lowest over tasks, logs/seq_router.jsonl);
  * knowledge and format matrices (when generated metrics ran): AP and BWT (evaluation.cl_metrics, sparse cells);
  * drift: KL(base || current) on the drift probes after the last stage, and its mean over stages 1..T;
  * SLSD: KL(teacher || student) on the probe buffer at each stage's end, mean over stages 2..T (stage 1's
    teacher is the base model), when logged.
Prints one Markdown table (mean ± std over seeds, n = seeds) and writes it to {log_root}/seeds_summary.md,
with the per-seed values in {log_root}/seeds_summary.json.

    python summarize_seeds.py --log_root logs/slsd_ablation
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from evaluation.cl_metrics import cl_metrics, required_cells
from utils_io import atomic_write_text, read_jsonl

COLUMNS = [  # (key, header, format)
    ("ap_loss", "AP loss ↓", "{:.3f}"),
    ("bwt_loss", "BWT loss ↑", "{:+.3f}"),
    ("forgetting_loss", "forgetting loss ↓", "{:.3f}"),
    ("ap_loss_own_task", "AP loss, own_task ↓", "{:.3f}"),
    ("bwt_loss_own_task", "BWT loss, own_task ↑", "{:+.3f}"),
    ("ap_loss_routed", "AP loss, routed ↓", "{:.3f}"),
    ("bwt_loss_routed", "BWT loss, routed ↑", "{:+.3f}"),
    ("forgetting_loss_routed", "forgetting loss, routed ↓", "{:.3f}"),
    ("routed_minus_own_task_ap", "AP loss, routed − own_task", "{:+.4f}"),
    ("router_accuracy_mean", "router accuracy, mean ↑", "{:.3f}"),
    ("router_accuracy_min", "router accuracy, lowest task ↑", "{:.3f}"),
    ("ap_knowledge", "AP knowledge ↑", "{:.3f}"),
    ("bwt_knowledge", "BWT knowledge ↑", "{:+.3f}"),
    ("ap_format", "AP format ↑", "{:.3f}"),
    ("bwt_format", "BWT format ↑", "{:+.3f}"),
    ("kl_base_final", "KL(base‖cur) final ↓", "{:.4f}"),
    ("kl_base_mean", "KL(base‖cur) mean ↓", "{:.4f}"),
    ("probe_kl_end", "probe KL(teacher‖student) end ↓", "{:.4f}"),
    ("probe_kl_start", "probe KL at stage start", "{:.4f}"),
]


def _rows(path):
    return read_jsonl(path) if path.exists() else []


def run_metrics(seed_dir: Path, method: str) -> dict:
    """The measures of one method in one seed folder ({} when its loss matrix is incomplete)."""
    loss_rows = [r for r in _rows(seed_dir / "seq_eval_loss.jsonl") if r.get("method") == method]
    if not loss_rows:
        return {}
    tasks = list(dict.fromkeys(r["eval_task"] for r in loss_rows if r["stage"] == 0))
    T = len(tasks)
    cur = {(r["stage"], r["eval_task"]): r["loss"] for r in loss_rows if r.get("fast_mode", "current") == "current"}
    out = {}
    if not all((s, t) in cur for s in range(T + 1) for t in tasks):
        return {}  # an unfinished run: left out, not half counted
    R = [[cur[(s, t)] for t in tasks] for s in range(T + 1)]
    m = cl_metrics(R, higher_is_better=False)
    out.update(ap_loss=m["ap"], bwt_loss=m["bwt"], forgetting_loss=m["forgetting"])
    own = {r["eval_task"]: r["loss"] for r in loss_rows if r.get("fast_mode") == "own_task" and r["stage"] == T}
    if len(own) == T:
        m_own = cl_metrics(R[:T] + [[own[t] for t in tasks]], higher_is_better=False)
        out.update(ap_loss_own_task=m_own["ap"], bwt_loss_own_task=m_own["bwt"])
    routed = {(r["stage"], r["eval_task"]): r["loss"] for r in loss_rows if r.get("fast_mode") == "routed"}
    if all((T, t) in routed for t in tasks):
        m_r = cl_metrics([[routed.get((s, t), R[s][i]) for i, t in enumerate(tasks)] for s in range(T + 1)],
                         higher_is_better=False)
        out.update(ap_loss_routed=m_r["ap"], bwt_loss_routed=m_r["bwt"], forgetting_loss_routed=m_r["forgetting"])
        if "ap_loss_own_task" in out:
            out["routed_minus_own_task_ap"] = m_r["ap"] - out["ap_loss_own_task"]
    acc = {r["eval_task"]: r["accuracy"] for r in _rows(seed_dir / "seq_router.jsonl")
           if r.get("method") == method and r.get("stage") == T}
    if len(acc) == T:
        out.update(router_accuracy_mean=float(np.mean(list(acc.values()))), router_accuracy_min=min(acc.values()))
    drift = {r["stage"]: r["value"] for r in _rows(seed_dir / "seq_drift.jsonl")
             if r.get("method") == method and r.get("metric") == "kl_base" and r.get("fast_mode", "current") == "current"}
    if T in drift:
        out["kl_base_final"] = drift[T]
    if all(s in drift for s in range(1, T + 1)):
        out["kl_base_mean"] = float(np.mean([drift[s] for s in range(1, T + 1)]))
    metric_rows = [r for r in _rows(seed_dir / "seq_eval_metrics.jsonl")
                   if r.get("method") == method and r.get("fast_mode", "current") == "current"]
    for name in ("knowledge", "format"):
        cells = {(r["stage"], r["eval_task"]): r["value"] for r in metric_rows if r.get("metric") == name}
        Rm = [[cells.get((s, t)) for t in tasks] for s in range(T + 1)]
        if all(Rm[s][i] is not None for s, i in required_cells(T)):
            m = cl_metrics(Rm, higher_is_better=True, sparse=True)
            out.update({f"ap_{name}": m["ap"], f"bwt_{name}": m["bwt"], f"forgetting_{name}": m["forgetting"]})
    probe = {}
    for path in sorted(seed_dir.glob("seq_*_train_loss.jsonl")):
        for r in _rows(path):
            if r.get("method") == method and r.get("split") == "probe_kl" and r.get("kl_end") is not None:
                probe[r["stage"]] = (r["kl_start"], r["kl_end"])
    later = [s for s in probe if s >= 2]
    if later:
        out["probe_kl_end"] = float(np.mean([probe[s][1] for s in later]))
        out["probe_kl_start"] = float(np.mean([probe[s][0] for s in later]))
        out["probe_kl_by_stage"] = {str(s): probe[s] for s in sorted(probe)}
    return out


def fmt(values, spec):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    mean = float(np.mean(vals))
    if len(vals) == 1:
        return spec.format(mean) + " (n=1)"
    digits = int(spec.split(".")[1][0])  # the std with the mean's precision
    return f"{spec.format(mean)} ± {float(np.std(vals, ddof=1)):.{digits}f} (n={len(vals)})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log_root", required=True,
                    help="folder with one seed{S}/ log folder per seed; several, comma-separated, are merged by seed "
                         "(each method's seed taken from the first root that has it)")
    ap.add_argument("--methods", default="", help="comma-separated method names (default: every method found)")
    ap.add_argument("--control", default="", help="also print each method minus this one, paired by seed")
    args = ap.parse_args(argv)
    roots = [Path(r) for r in args.log_root.split(",") if r]
    root = roots[0]
    seed_dirs = sorted(p for r in roots for p in r.glob("seed*") if p.is_dir())
    if not seed_dirs:
        raise SystemExit(f"{args.log_root}: no seed*/ folders")
    methods = [m for m in args.methods.split(",") if m] or sorted(
        {r["method"] for d in seed_dirs for r in _rows(d / "seq_eval_loss.jsonl")})
    seeds = sorted({d.name for d in seed_dirs})
    per_seed = {m: {} for m in methods}
    for m in methods:
        for seed in seeds:
            for d in (d for d in seed_dirs if d.name == seed):
                found = run_metrics(d, m)
                if found:
                    per_seed[m][seed] = {**found, "log_dir": str(d)}
                    break
    cols = [c for c in COLUMNS if any(c[0] in v for m in methods for v in per_seed[m].values())]
    lines = ["| method | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for m in methods:
        runs = [v for v in per_seed[m].values() if v]
        lines.append(f"| {m} | " + " | ".join(fmt([r.get(k) for r in runs], f) for k, _, f in cols) + " |")
    if args.control:
        ctrl = per_seed.get(args.control, {})
        lines += ["", f"Paired by seed, method minus {args.control} (mean ± std of the per-seed differences):", "",
                  "| method | " + " | ".join(h for _, h, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
        for m in methods:
            if m == args.control:
                continue
            both = [s for s in per_seed[m] if s in ctrl]
            cells = []
            for k, _, _ in cols:
                d = [per_seed[m][s][k] - ctrl[s][k] for s in both if k in per_seed[m][s] and k in ctrl[s]]
                cells.append(fmt(d, "{:+.4f}"))
            lines.append(f"| {m} − {args.control} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    note = (f"Mean ± sample std over seeds ({', '.join(seeds)} in {args.log_root}); "
            f"n = seeds with that measure. Loss metrics: BWT > 0 is improvement, forgetting > 0 is getting worse.\n")
    print(table + "\n" + note)
    atomic_write_text(root / "seeds_summary.md", table + "\n" + note)
    atomic_write_text(root / "seeds_summary.json", json.dumps(per_seed, indent=1) + "\n")


if __name__ == "__main__":
    main()
