"""Plot the JSONL logs of the training scripts and write the continual-learning results table.

Usage (config overrides such as --log_dir and --tasks go after the subcommand):

    python plot_loss.py single T1_general  # logs/single_T1_general_train_loss.png (no task: every single run)
    python plot_loss.py seq                # logs/seq_eval_loss.png (eval loss by stage), logs/seq_train_loss.png
    python plot_loss.py heatmap            # logs/cl_heatmap_{method}.png: R matrices, score and loss
    python plot_loss.py cl                 # logs/cl_ap_bwt.png: AP and BWT per method, on score and on loss
    python plot_loss.py drift              # logs/seq_drift.png: drift metrics by stage
    python plot_loss.py results            # logs/cl_summary_{method}.json, logs/results.md (printed)
    python plot_loss.py all --log_dir logs # everything the logs allow; absent logs are skipped with a note

DS-LoRA runs may log several fast-weight views; `--fast_mode own_task` (or routed, routed_soft, none)
plots that view instead of "current". The task order per method comes from `--tasks` if given, else the run's saved
`config_{method}.json`, else the logs. Summaries and tables come from utils_results.py.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from configs.base_config import FAST_MODES, parse_args_and_config  # noqa: E402
from utils_results import (DRIFT_ORDER, build_R, cl_summary, load_glob, load_rows, methods_in,  # noqa: E402
                           resolve_tasks, select_cells, short_task, stage_labels, train_curves, write_results_md)

SUBCOMMANDS = ("single", "seq", "heatmap", "cl", "drift", "results", "all")
STYLE = {"ds_lora_slsd": ("tab:red", "o"), "ds_lora": ("tab:orange", "s"), "seq_lora": ("tab:blue", "^"),
         "seq_lora_r16": ("tab:cyan", "<"), "replay": ("tab:green", "D"), "ewc": ("tab:purple", "v"),
         "single": ("tab:gray", "x")}  # other run names (--run_name) get the next free color
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
                     "xtick.labelsize": 9, "ytick.labelsize": 9, "figure.titlesize": 12})


VARIANT_MARKERS = {"key": "*", "low_ppl": "X"}  # token-selective variants (seq_lora+key): its method's color


def style(method: str, i: int = 0):
    base, _, variant = method.partition("+")
    if variant and base in STYLE:
        return STYLE[base][0], VARIANT_MARKERS.get(variant, "P")
    return STYLE.get(method, (f"C{(i + 5) % 10}", "P"))


def save_png(fig, path) -> Path:
    """Save to a temp file in the same folder, then rename: a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"[plot] wrote {path}")
    return path


def smooth(y, frac: float = 0.05):
    """Centred moving average over ~frac of the points (at least 1), shrinking at the edges."""
    y = np.asarray(y, dtype=float)
    w = max(1, int(len(y) * frac)) | 1  # odd window
    if w == 1:
        return y
    kernel = np.ones(w)
    return np.convolve(y, kernel, "same") / np.convolve(np.ones_like(y), kernel, "same")


def grid(n: int, ncols: int, panel=(4.2, 3.2)):
    """n panels in rows of ncols; returns (fig, axes list of n, spare axes list)."""
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), squeeze=False)
    flat = list(axes.flat)
    return fig, flat[:n], flat[n:]


def method_legend(fig, spare, handles, labels, title="method"):
    """Legend in the first spare panel if there is one, else centred below the figure."""
    for ax in spare:
        ax.axis("off")
    if spare:
        spare[0].legend(handles, labels, loc="center", title=title, frameon=False, fontsize=10)
    else:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 6),
                   title=title, frameon=False)


def stage_axis(ax, tasks):
    ax.set_xticks(range(len(tasks) + 1))
    ax.set_xticklabels(stage_labels(tasks))
    ax.set_xlim(-0.4, len(tasks) + 0.4)
    ax.grid(alpha=0.3)


# ----------------------------------------------------------------------------- single task
def plot_single(log_dir: Path, task: str, fast_mode: str = "current"):
    rows = load_rows(log_dir / f"single_{task}_train_loss.jsonl")
    if not rows:
        print(f"[plot] skip single {task}: no {log_dir / f'single_{task}_train_loss.jsonl'}")
        return None
    method = "single" if any(r.get("method") == "single" for r in rows) else rows[0].get("method")
    train = [r for r in train_curves(rows, method).get("train", []) if r.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    if train:
        x, y = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(x, y, color="tab:blue", alpha=0.3, lw=1, label="train (raw)")
        ax.plot(x, smooth(y), color="tab:blue", lw=2, label="train (smoothed)")
    evals = {}
    for r in load_rows(log_dir / f"single_{task}_eval_loss.jsonl"):
        if r.get("loss") is not None and "step" in r and r.get("fast_mode") in (None, fast_mode):
            evals[r["step"]] = r  # last row per step wins
    if evals:
        steps = sorted(evals)
        split = evals[steps[-1]].get("split", "eval")
        ax.plot(steps, [evals[s]["loss"] for s in steps], "o--", color="tab:red", ms=6, label=f"{split} loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title=f"single-task DS-LoRA: {task}")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, log_dir / f"single_{task}_train_loss.png")


# ----------------------------------------------------------------------------- sequential runs
def plot_seq_eval(log_dir: Path, tasks_by_method: dict, fast_mode: str):
    rows = load_rows(log_dir / "seq_eval_loss.jsonl")
    methods = methods_in(rows)
    if not methods:
        print(f"[plot] skip seq eval loss: no rows in {log_dir / 'seq_eval_loss.jsonl'}")
        return None
    tasks = tasks_by_method[methods[0]]
    if any(tasks_by_method[m] != tasks for m in methods):
        print(f"[plot] note: methods differ in task order; x labels follow {methods[0]}: {tasks}")
    mats = {m: build_R(rows, m, tasks_by_method[m], fast_mode=fast_mode) for m in methods}
    fig, axes, spare = grid(len(tasks), 3)
    handles = {}
    for i, (ax, task) in enumerate(zip(axes, tasks)):
        ax.axvspan(i + 0.5, i + 1.5, color="gold", alpha=0.25, lw=0)
        for j, m in enumerate(methods):
            R = mats[m]
            if R is None or task not in tasks_by_method[m]:
                continue
            col = tasks_by_method[m].index(task)
            y = [np.nan if r[col] is None else r[col] for r in R]
            color, marker = style(m, j)
            handles[m], = ax.plot(range(len(y)), y, marker=marker, color=color, lw=1.8, ms=5, label=m)
        stage_axis(ax, tasks)
        ax.set_title(f"eval loss on {task}")
        ax.set_xlabel("after stage")
    axes[0].set_ylabel("eval loss")
    if len(axes) > 3:
        axes[3].set_ylabel("eval loss")
    fig.suptitle(f"Eval loss per task after each stage (shaded: the stage that trains the panel's task; "
                 f"fast_mode={fast_mode})")
    fig.tight_layout()
    method_legend(fig, spare, list(handles.values()), list(handles))
    return save_png(fig, log_dir / "seq_eval_loss.png")


def _stage_bounds(rows):
    """[(first step, last step, task)] per stage of one method's train rows."""
    spans = {}
    for r in rows:
        s = spans.setdefault(r.get("stage"), [r["step"], r["step"], r.get("task", "")])
        s[0], s[1] = min(s[0], r["step"]), max(s[1], r["step"])
    return [tuple(v) for _, v in sorted(spans.items(), key=lambda kv: kv[1][0])]


def _by_stage(ax, rows, key, label=None, raw=False, **kw):
    """Plot rows[key] over step, one segment per stage (smoothed within the stage unless raw)."""
    stages = {}
    for r in rows:
        if r.get(key) is not None:
            stages.setdefault(r.get("stage"), []).append(r)
    for k, seg in enumerate(sorted(stages.values(), key=lambda seg: seg[0]["step"])):
        y = [r[key] for r in seg]
        ax.plot([r["step"] for r in seg], y if raw else smooth(y, 0.08), label=None if k else label, **kw)


def plot_seq_train(log_dir: Path):
    rows = load_glob(log_dir, "seq_*_train_loss.jsonl")
    methods = methods_in(rows)
    if not methods:
        print(f"[plot] skip seq train loss: no {log_dir}/seq_*_train_loss.jsonl")
        return None
    fig, axes = plt.subplots(len(methods), 1, figsize=(11, 2.7 * len(methods)), squeeze=False)
    for ax, m in zip(axes[:, 0], methods):
        curves = train_curves(rows, m)
        train = [r for r in curves.get("train", []) if r.get("loss") is not None]
        _by_stage(ax, train, "loss", color="tab:blue", alpha=0.25, lw=0.8, raw=True)
        _by_stage(ax, train, "loss", color="tab:blue", lw=1.8, label="train loss")
        _by_stage(ax, train, "replay_loss", color="tab:green", lw=1.4, label="replay loss")
        _by_stage(ax, train, "kd_loss", color="tab:red", lw=1.4, label="KD loss")
        ewc = [r for r in train if r.get("ewc_penalty") is not None]
        if ewc:
            ax2 = ax.twinx()
            _by_stage(ax2, ewc, "ewc_penalty", color="tab:purple", lw=1.2, ls=":", label="EWC penalty (right)",
                      raw=True)
            ax2.set_ylabel("EWC penalty", color="tab:purple")
            ax2.tick_params(axis="y", colors="tab:purple")
        for k, (lo, hi, task) in enumerate(_stage_bounds(train)):
            if k:
                ax.axvline(lo - 0.5, color="k", ls="--", lw=0.8, alpha=0.6)
            ax.text((lo + hi) / 2, 1.01, short_task(task), transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        if ewc:
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        if handles:
            ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.09 if ewc else 1.01, 1.0), fontsize=9,
                      frameon=False)
        ax.set_ylabel("loss")
        ax.set_title(m, loc="left", fontweight="bold", pad=16)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("global optimizer step (dashed: stage boundaries)")
    fig.tight_layout()
    return save_png(fig, log_dir / "seq_train_loss.png")


# ----------------------------------------------------------------------------- CL matrices
def plot_heatmap(log_dir: Path, summary: dict):
    method, tasks = summary["method"], summary["tasks"]
    names = [n for n in ("score", "loss", "knowledge", "format") if n in summary["matrices"]]
    ncols = min(2, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(0.95 * len(tasks) * ncols + 2.5 * ncols, 4.6 * nrows),
                             squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        entry = summary["matrices"][name]
        R = np.array([[np.nan if v is None else v for v in row] for row in entry["R"]], dtype=float)
        cmap = plt.get_cmap("RdYlGn" if entry["higher_is_better"] else "RdYlGn_r").with_extremes(bad="lightgrey")
        im = ax.imshow(np.ma.masked_invalid(R), cmap=cmap, aspect="auto")
        for t in range(R.shape[0]):
            for i in range(R.shape[1]):
                se = (entry.get("se") or [[None] * R.shape[1]] * R.shape[0])[t][i]
                label = "·" if np.isnan(R[t, i]) else f"{R[t, i]:.2f}" + (f"\n±{se:.2f}" if se else "")
                ax.text(i, t, label, ha="center", va="center",
                        fontsize=8 if se else 9, fontweight="bold" if t == i + 1 else "normal")
                if t == i + 1:  # the stage that trains this task
                    ax.add_patch(plt.Rectangle((i - 0.5, t - 0.5), 1, 1, fill=False, lw=1.8, ec="black"))
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([short_task(t) for t in tasks])
        ax.set_yticks(range(len(tasks) + 1))
        ax.set_yticklabels(["base"] + [f"after {short_task(t)}" for t in tasks])
        ax.set_xlabel("evaluated task")
        m = entry["metrics"]
        arrow = "higher" if entry["higher_is_better"] else "lower"
        stats = (f"AP {m['ap']:.3f}, BWT {m['bwt']:+.3f}" if m.get("bwt") is not None
                 else f"AP {m['ap']:.3f}" if m.get("ap") is not None else "metrics n/a (missing cells)")
        ax.set_title(f"{name} ({arrow} is better)\n{stats}")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{method}: R[stage][task] ± standard error (boxed: the task just trained; ·: not scored)")
    fig.tight_layout()
    return save_png(fig, log_dir / f"cl_heatmap_{method}.png")


def plot_cl_bars(log_dir: Path, summaries: dict):
    methods = list(summaries)
    panels = [("score", "ap", "AP on score (higher is better)"), ("score", "bwt", "BWT on score (higher is better)"),
              ("loss", "ap", "AP on loss = mean final loss (lower is better)"),
              ("loss", "bwt", "BWT on -loss (higher is better)")]
    fig, axes = plt.subplots(2, 2, figsize=(max(8.0, 1.6 * len(methods) * 2), 7.0))
    for ax, (name, key, title) in zip(axes.flat, panels):
        vals = [(summaries[m]["matrices"].get(name) or {}).get("metrics", {}).get(key) for m in methods]
        x = np.arange(len(methods))
        bars = ax.bar(x, [0 if v is None else v for v in vals], color=[style(m, j)[0] for j, m in enumerate(methods)])
        for b, v in zip(bars, vals):
            if v is None:  # centred in the panel, away from the title and the zero line
                ax.text(b.get_x() + b.get_width() / 2, 0.5, "n/a", transform=ax.get_xaxis_transform(),
                        ha="center", va="center", color="grey")
                continue
            txt = f"{v:+.3f}" if key == "bwt" else f"{v:.3f}"
            ax.annotate(txt, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom" if b.get_height() >= 0 else "top", fontsize=9,
                        xytext=(0, 2 if b.get_height() >= 0 else -2), textcoords="offset points")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(methods, rotation=20, ha="right")
        ax.set_title(title)
        ax.margins(y=0.18)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Continual-learning summary per method")
    fig.tight_layout()
    return save_png(fig, log_dir / "cl_ap_bwt.png")


def plot_drift(log_dir: Path, tasks_by_method: dict, fast_mode: str):
    rows = load_rows(log_dir / "seq_drift.jsonl")
    methods = methods_in(rows)
    if not methods:
        print(f"[plot] skip drift: no rows in {log_dir / 'seq_drift.jsonl'}")
        return None
    pairs = {(r.get("eval_task"), r.get("metric")) for r in rows if r.get("metric")}
    rank = {m: i for i, m in enumerate(DRIFT_ORDER)}
    pairs = sorted(pairs, key=lambda p: (rank.get(p[1], len(rank)), p[1], str(p[0])))
    tasks = tasks_by_method[methods[0]]
    fig, axes, spare = grid(len(pairs), 4, panel=(3.9, 3.0))
    handles = {}
    for ax, (eval_task, metric) in zip(axes, pairs):
        for j, m in enumerate(methods):
            cells = select_cells(rows, m, fast_mode, None, metric=metric)
            n = len(tasks_by_method[m]) + 1
            y = [np.nan] * n
            for (stage, task), r in cells.items():
                if task == eval_task and 0 <= stage < n and r.get("value") is not None:
                    y[stage] = r["value"]
            color, marker = style(m, j)
            handles[m], = ax.plot(range(n), y, marker=marker, color=color, lw=1.6, ms=4, label=m)
        if metric == "length_ratio":
            ax.axhline(1.0, color="k", lw=0.8, ls=":")
        stage_axis(ax, tasks)
        ax.set_title(metric if eval_task in (None, "drift") else f"{short_task(eval_task)}: {metric}")
    fig.suptitle(f"Drift on benign probe prompts by stage (base = the untrained model; fast_mode={fast_mode})")
    fig.tight_layout()
    method_legend(fig, spare, list(handles.values()), list(handles))
    return save_png(fig, log_dir / "seq_drift.png")


# ----------------------------------------------------------------------------- CLI
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("what", choices=SUBCOMMANDS, help="what to plot or write")
    parser.add_argument("task", nargs="?", help="task of `single` (default: every single_{task} log found)")
    parser.add_argument("--fast_mode", default="current", choices=FAST_MODES,
                        help="DS-LoRA fast-weight view to plot; rows without fast_mode are in every view")
    parser.add_argument("--note", default="", help="free text written under the results table")
    args, cfg = parse_args_and_config(parser, argv)
    log_dir = Path(cfg.log_dir)
    explicit_tasks = any(a == "--tasks" or a.startswith("--tasks=") for a in argv)
    eval_rows = (load_rows(log_dir / "seq_eval_loss.jsonl") + load_rows(log_dir / "seq_eval_metrics.jsonl")
                 + load_rows(log_dir / "seq_drift.jsonl"))
    tasks_by_method = {m: list(cfg.tasks) if explicit_tasks else resolve_tasks(log_dir, m, eval_rows, cfg.tasks)
                       for m in methods_in(eval_rows)}
    todo = SUBCOMMANDS[:-1] if args.what == "all" else (args.what,)

    if "single" in todo:
        if args.task:
            singles = [args.task]
        else:
            singles = [p.name[len("single_"):-len("_train_loss.jsonl")]
                       for p in sorted(log_dir.glob("single_*_train_loss.jsonl"))]
            if not singles:
                print(f"[plot] skip single: no {log_dir}/single_*_train_loss.jsonl")
        for task in singles:
            plot_single(log_dir, task, args.fast_mode)
    if "seq" in todo:
        plot_seq_eval(log_dir, tasks_by_method, args.fast_mode)
        plot_seq_train(log_dir)
    summaries = {}
    if {"heatmap", "cl"} & set(todo):
        for m, tasks in tasks_by_method.items():
            if (s := cl_summary(log_dir, m, tasks, args.fast_mode)) is not None:
                summaries[m] = s
        if not summaries:
            print(f"[plot] skip heatmap / cl: no eval rows in {log_dir}")
    if "heatmap" in todo:
        for s in summaries.values():
            plot_heatmap(log_dir, s)
    if "cl" in todo and summaries:
        plot_cl_bars(log_dir, summaries)
    if "drift" in todo:
        plot_drift(log_dir, tasks_by_method, args.fast_mode)
    if "results" in todo:
        md = write_results_md(log_dir, cfg.tasks, args.note, args.fast_mode, tasks_by_method)
        print(md)
        print(f"[plot] wrote {log_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
