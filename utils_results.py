"""Read the training logs back: continual-learning matrices, per-method summaries and the results table.

`plot_loss.py` draws from here; nothing in this module plots. Logs are JSONL rows with `method`, `stage`,
`task`, `step`, `split` (see the training scripts). Where a cell was logged twice, the last row wins.

    R = build_R(load_rows("logs/seq_eval_loss.jsonl"), "seq_lora", tasks)    # (T+1) x T, row 0 = base
    write_cl_summary("logs", "seq_lora", tasks)                            # logs/cl_summary_seq_lora.json
    print(write_results_md("logs", tasks))                                 # logs/results.md

A DS-LoRA method may log several `fast_mode` views of one cell; the default view is "current", and
rows without `fast_mode` (the single-branch baselines) belong to every view. The routed views' router decisions
(logs/seq_router.jsonl) get a table of their own.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from configs.base_config import KNOWN_TASKS, ROUTED_MODES
from utils_data import JsonlError, atomic_write_text, read_jsonl
from evaluation.cl_metrics import cl_metrics, required_cells

METHOD_ORDER = ("ds_lora_slsd", "ds_lora", "seq_lora", "seq_lora_r16", "replay", "ewc", "single")
PRIMARY_METRIC = {"T1_general": "general_strict", "T2_math": "math_strict", "T3_code": "code_pass1",
                  "T4_tool": "tool_ast", "T5_safety": "refusal"}  # higher is better for each
LOWER_IS_BETTER = {"loss", "over_refusal", "math_strict_minus_flexible", "kl_base", "kl_base_first", "kl_base_rest",
                   "over_refusal_rate"}
DRIFT_ORDER = ("kl_base", "kl_base_first", "kl_base_rest", "length_ratio", "json_rate", "markdown_rate",
               "code_fence_rate", "refusal_rate",
               "over_refusal_rate", "math_strict_minus_flexible")
CL_KEYS = ("ap", "bwt", "fwt", "forgetting")
SPLIT_METRICS = ("knowledge", "format")  # knowledge (likelihood rank of the gold answer) vs format (the reply's form)
# config keys that are bookkeeping, not a setting that could explain a difference between methods
_CONFIG_SKIP = {"method", "stage", "data_paths", "log_dir", "save_dir"}


# ----------------------------------------------------------------------------- reading
def load_rows(path) -> list[dict]:
    """All rows of a JSONL log; [] when the file is absent. A malformed line is skipped with a note."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        return read_jsonl(path)
    except JsonlError as e:
        print(f"[results] note: {e}; skipping unreadable lines of {path}")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_glob(log_dir, pattern: str) -> list[dict]:
    """Rows of every file in `log_dir` matching `pattern`, in sorted file order."""
    return [r for p in sorted(Path(log_dir).glob(pattern)) for r in load_rows(p)]


def ordered_methods(methods) -> list[str]:
    """Known methods in METHOD_ORDER, then any others alphabetically; a token-selective variant (`seq_lora+key`,
    utils_tokens.py) right after the method it varies."""
    def key(m):
        base, _, variant = m.partition("+")
        return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), base, variant)
    return sorted(set(methods), key=key)


def methods_in(rows, exclude=("single",)) -> list[str]:
    return ordered_methods({r["method"] for r in rows if "method" in r} - set(exclude))


def short_task(task: str) -> str:
    """'T2_math' -> 'T2' (the axis label); other names unchanged."""
    head = task.split("_")[0]
    return head if head[:1] == "T" and head[1:].isdigit() else task


def stage_labels(tasks) -> list[str]:
    return ["base"] + [short_task(t) for t in tasks]


def train_curves(rows, method: str) -> dict[str, list[dict]]:
    """{split: rows sorted by global step} of one method; the last row per (stage, step, split) wins."""
    last = {}
    for r in rows:
        if r.get("method") == method and "step" in r:
            last[(r.get("stage"), r["step"], r.get("split", "train"))] = r
    out: dict[str, list[dict]] = {}
    for (_, _, split), r in last.items():
        out.setdefault(split, []).append(r)
    return {s: sorted(v, key=lambda r: r["step"]) for s, v in out.items()}


# ----------------------------------------------------------------------------- per-stage cells
def select_cells(rows, method: str, fast_mode: str = "current", split: str | None = None,
                 **equal) -> dict[tuple[int, str], dict]:
    """{(stage, eval_task): row} for `method` in the `fast_mode` view, rows matching every `equal` field.

    A row with `fast_mode == fast_mode` beats one without `fast_mode`; among equals the last row wins.
    `split=None` takes the split most rows of this method have (noted when there are several)."""
    kept = [r for r in rows if r.get("method") == method and r.get("fast_mode") in (None, fast_mode)
            and all(r.get(k) == v for k, v in equal.items()) and "stage" in r]
    if split is None:
        counts = Counter(r.get("split") for r in kept)
        if len(counts) > 1:
            split = counts.most_common(1)[0][0]
            print(f"[results] note: {method} rows have splits {dict(counts)}; using split {split!r}")
    best: dict[tuple[int, str], tuple[bool, dict]] = {}
    for r in kept:
        if split is not None and r.get("split") != split:
            continue
        key = (int(r["stage"]), r.get("eval_task", r.get("task")))
        exact = r.get("fast_mode") == fast_mode
        if key not in best or exact >= best[key][0]:
            best[key] = (exact, r)
    return {k: r for k, (_, r) in best.items()}


def build_R(rows, method: str, tasks, metric=None, value_key: str | None = None, fast_mode: str = "current",
            split: str | None = None):
    """(T+1) x T matrix R[t][i] = value on tasks[i] after stage t (row 0 = base); None if `method` has no row.

    metric=None reads `value_key` (default "loss") of eval-loss rows; a metric name, or a {task: metric}
    dict such as PRIMARY_METRIC, reads `value_key` (default "value") of metric rows. A cell nobody logged
    is None. A row whose `stage_task` disagrees with `tasks` (another task order) gives None, with a note."""
    tasks = list(tasks)
    value_key = value_key or ("loss" if metric is None else "value")
    per_task = metric if isinstance(metric, dict) else {t: metric for t in tasks}
    names = {per_task.get(t) for t in tasks} - ({None} if isinstance(metric, dict) else set())
    cells = {}
    for name in names:
        equal = {} if name is None else {"metric": name}
        cells.update({k: r for k, r in select_cells(rows, method, fast_mode, split, **equal).items()
                      if k[1] in tasks and per_task.get(k[1]) == name})
    if not cells:
        return None
    for (stage, _), r in cells.items():
        st = r.get("stage_task")
        if 1 <= stage <= len(tasks) and st not in (None, "base", tasks[stage - 1]):
            print(f"[results] note: {method} stage {stage} trained {st}, but tasks[{stage - 1}] is "
                  f"{tasks[stage - 1]}; pass --tasks in the run's order")
            return None
    R = [[None] * len(tasks) for _ in range(len(tasks) + 1)]
    for (stage, task), r in cells.items():
        if 0 <= stage <= len(tasks) and r.get(value_key) is not None:
            R[stage][tasks.index(task)] = float(r[value_key])
    return R


def _gap_cells(R) -> list[tuple[int, int]]:
    return [(t, i) for t, row in enumerate(R) for i, v in enumerate(row) if v is None]


def missing_cells(R, tasks) -> list[str]:
    return [f"stage {t} x {task}" for t, row in enumerate(R) for task, v in zip(tasks, row) if v is None]


def stage_series(rows, method: str, eval_task: str, metric: str, n_stages: int, fast_mode: str = "current"):
    """[value at stage 0 .. n_stages-1] (None where not logged) of one metric on one eval task."""
    cells = select_cells(rows, method, fast_mode, None, metric=metric)
    out = [None] * n_stages
    for (stage, task), r in cells.items():
        if task == eval_task and 0 <= stage < n_stages and r.get("value") is not None:
            out[stage] = float(r["value"])
    return out


# ----------------------------------------------------------------------------- summaries
def read_method_config(log_dir, method: str) -> dict | None:
    path = Path(log_dir) / f"config_{method}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def resolve_tasks(log_dir, method: str, rows, default) -> list[str]:
    """The method's task order: its saved config, else the stage order in its eval rows when these cover
    other tasks than `default`, else `default`."""
    saved = read_method_config(log_dir, method)
    if saved and saved.get("tasks"):
        return list(saved["tasks"])
    mine = [r for r in rows if r.get("method") == method]
    seen = {r.get("eval_task", r.get("task")) for r in mine} & set(KNOWN_TASKS)
    if not seen or seen == set(default):
        return list(default)
    by_stage = {int(r["stage"]): r.get("stage_task") for r in mine if r.get("stage", 0) >= 1}
    order = [by_stage[s] for s in sorted(by_stage) if by_stage[s] in KNOWN_TASKS]
    order = list(dict.fromkeys(order))
    return order + [t for t in KNOWN_TASKS if t in seen and t not in order]


def _matrix_entry(R, tasks, higher_is_better: bool, name: str, method: str, N=None, SE=None) -> dict:
    """{"R", "higher_is_better", "metrics"} (+ "n" and "se" matrices when given). A matrix missing only cells
    that no CL metric reads (eval_grid "needed") gets its metrics, forgetting over the stages evaluated."""
    entry = {"R": R, "higher_is_better": higher_is_better, "metrics": {k: None for k in CL_KEYS}}
    if N is not None:
        entry["n"] = N
    if SE is not None:
        entry["se"] = SE
    gaps = missing_cells(R, tasks)
    needed_gaps = [g for g in gaps if (int(g.split()[1]), tasks.index(g.split(" x ")[1])) in required_cells(len(tasks))]
    if needed_gaps:
        entry["note"] = f"metrics not computed: missing {', '.join(needed_gaps)}"
        print(f"[results] {method} {name}: {entry['note']}")
        return entry
    m = cl_metrics(R, higher_is_better=higher_is_better, sparse=bool(gaps))
    entry["metrics"] = {k: m[k] for k in CL_KEYS} | {"forgetting_per_task": m["forgetting_per_task"]}
    if gaps:
        entry["sparse"] = True  # eval_grid needed: forgetting's max runs over the evaluated stages
    if SE is not None and all(v is not None for v in SE[len(tasks)]):
        # AP's standard error, the final cells taken as independent samples
        entry["metrics"]["ap_se"] = math.sqrt(sum(v * v for v in SE[len(tasks)])) / len(tasks)
    return entry


def cl_summary(log_dir, method: str, tasks, fast_mode: str = "current") -> dict | None:
    """The summary `write_cl_summary` saves, or None (with a note) when `method` logged no eval at all."""
    log_dir, tasks = Path(log_dir), list(tasks)
    loss_rows = load_rows(log_dir / "seq_eval_loss.jsonl")
    metric_rows = load_rows(log_dir / "seq_eval_metrics.jsonl")
    drift_rows = load_rows(log_dir / "seq_drift.jsonl")
    matrices = {}
    R = build_R(loss_rows, method, tasks, fast_mode=fast_mode)
    if R is not None:
        matrices["loss"] = _matrix_entry(R, tasks, False, "loss", method)
    def with_spread(metric):
        return [build_R(metric_rows, method, tasks, metric=metric, value_key=key, fast_mode=fast_mode)
                for key in ("value", "n", "se")]
    R, N, SE = with_spread(PRIMARY_METRIC)
    if R is not None:
        matrices["score"] = _matrix_entry(R, tasks, True, "score", method, N, SE)
    # any other metric logged on every task at (at least) every stage the CL metrics read gets its own matrix;
    # knowledge and format always do (the two kinds of forgetting), even with a gap to report
    names = {r.get("metric") for r in metric_rows if r.get("method") == method} - {None}
    for name in sorted(names - set(PRIMARY_METRIC.values())):
        R, N, SE = with_spread(name)
        if R is None:
            continue
        covered = not (set(_gap_cells(R)) & required_cells(len(tasks)))
        if covered or name in SPLIT_METRICS:
            matrices[name] = _matrix_entry(R, tasks, name not in LOWER_IS_BETTER, name, method, N, SE)
    if not matrices:
        print(f"[results] note: no eval rows for {method} in {log_dir}; no summary")
        return None
    # everything else as per-stage series, e.g. "T5_safety/over_refusal", "drift/kl_base"
    series = {}
    for rows in (metric_rows, drift_rows):
        pairs = {(r.get("eval_task", r.get("task")), r.get("metric")) for r in rows if r.get("method") == method}
        for task, name in sorted(p for p in pairs if None not in p):
            series[f"{task}/{name}"] = stage_series(rows, method, task, name, len(tasks) + 1, fast_mode)
    return {"method": method, "tasks": tasks, "fast_mode": fast_mode, "matrices": matrices, "series": series}


def write_cl_summary(log_dir, method: str, tasks, fast_mode: str = "current") -> dict | None:
    """Write `log_dir/cl_summary_{method}.json`: {"method", "tasks", "matrices": {name: {"R",
    "higher_is_better", "metrics": {"ap","bwt","fwt","forgetting"}}}, "series"}; returns it (or None)."""
    summary = cl_summary(log_dir, method, tasks, fast_mode)
    if summary is not None:
        atomic_write_text(Path(log_dir) / f"cl_summary_{method}.json", json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------- the results table
def _fmt(v, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _last(series) -> float | None:
    return series[-1] if series else None


def _config_lines(log_dir, methods) -> list[str]:
    configs = {m: c for m in methods if (c := read_method_config(log_dir, m)) is not None}
    if not configs:
        return ["Config: no `config_{method}.json` in the log folder."]
    keys = sorted({k for c in configs.values() for k in c} - _CONFIG_SKIP)
    same, differ = [], []
    for k in keys:
        vals = {m: json.dumps(c.get(k)) for m, c in configs.items()}
        (same if len(set(vals.values())) == 1 else differ).append((k, vals))
    shown = ("seed", "model_name", "max_steps_per_task", "train_split", "eval_split", "tasks")
    common = [f"{k}={v[next(iter(v))]}" for k, v in same if k in shown]
    lines = [f"Config (from {', '.join(f'config_{m}.json' for m in configs)}): " + ", ".join(common) + "."]
    for k, vals in differ:
        lines.append(f"* `{k}` differs: " + ", ".join(f"{m}={v}" for m, v in vals.items()))
    missing = [m for m in methods if m not in configs]
    if missing:
        lines.append(f"* no saved config for: {', '.join(missing)}")
    return lines


def eval_loss_table(summary) -> list[str]:
    """Stage x task eval-loss table of one method (markdown lines); the task just trained is in bold."""
    R, tasks = summary["matrices"]["loss"]["R"], summary["tasks"]
    lines = ["| stage | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for t, row in enumerate(R):
        label = "0 base" if t == 0 else f"{t} {tasks[t - 1]}"
        cells = [f"**{_fmt(v)}**" if t == i + 1 and v is not None else _fmt(v) for i, v in enumerate(row)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _pm(v, se) -> str:
    return "n/a" if v is None else (f"{v:.3f} ± {se:.3f}" if se is not None else f"{v:.3f}")


def spread_table(entry, tasks) -> list[str]:
    """Stage x task table of one matrix with its standard errors and sample sizes (markdown lines); a cell the
    run did not score (eval_grid needed) is '·'; the task just trained is in bold."""
    R, N, SE = entry["R"], entry.get("n"), entry.get("se")
    lines = ["| stage | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for t, row in enumerate(R):
        label = "0 base" if t == 0 else f"{t} {tasks[t - 1]}"
        cells = []
        for i, v in enumerate(row):
            if v is None:
                cells.append("·")
                continue
            se = SE[t][i] if SE else None
            n = f" ({int(N[t][i])})" if N and N[t][i] is not None else ""
            cell = _pm(v, se) + n
            cells.append(f"**{cell}**" if t == i + 1 else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def knowledge_format_table(summaries) -> list[str]:
    """Knowledge (likelihood rank of the gold answer: content) against format (the reply's form) per method:
    AP ± standard error, BWT, FWT, forgetting; the two kinds of forgetting side by side."""
    if not any(name in s["matrices"] for s in summaries.values() for name in SPLIT_METRICS):
        return []
    head = ["method"] + [f"{name} {col}" for name in SPLIT_METRICS
                         for col in ("AP ↑", "BWT ↑", "FWT ↑", "forgetting ↓")]
    lines = ["", "### Knowledge and format", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method, s in summaries.items():
        cells = [method]
        for name in SPLIT_METRICS:
            m = s["matrices"].get(name, {}).get("metrics", {})
            cells += [_pm(m.get("ap"), m.get("ap_se")), _fmt(m.get("bwt"), signed=True),
                      _fmt(m.get("fwt"), signed=True), _fmt(m.get("forgetting"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Knowledge = share of held-out rows whose gold answer is the most likely of 1 + K candidates "
              "(`knowledge_distractors`; chance 1/(1+K)), scored without generation, so a lost answer format cannot "
              "hide it. Format = share of generated replies with the task's form (evaluation/format_score.py). "
              "Knowledge falling = essential forgetting; format falling with knowledge kept = superficial "
              "(illusory) forgetting. AP ± standard error of one run (final cells taken as independent)."]
    return lines


def single_reference(log_dir, tasks) -> str | None:
    """'T1_general 0.950, ...': the last eval loss of each single-task run, or None without such logs."""
    parts = []
    for task in tasks:
        rows = [r for r in load_rows(Path(log_dir) / f"single_{task}_eval_loss.jsonl") if "loss" in r]
        if rows:
            parts.append(f"{task} {max(rows, key=lambda r: r.get('step', 0))['loss']:.3f}")
    return ", ".join(parts) or None


def view_matrix(R, Rv):
    """A fast-weight view's loss matrix with the cells it did not log taken from the main view's matrix `R` (a view
    in final_fast_modes is logged after the last stage only)."""
    return [[v if v is not None else R[t][i] for i, v in enumerate(row)] for t, row in enumerate(Rv)]


def fast_view_table(R, tasks, mode: str, others: dict) -> list[str]:
    """Final-stage eval loss of a DS-LoRA run under each fast-weight view (markdown lines), with AP, BWT and
    forgetting (evaluation.cl_metrics on -loss), and each routed view's gap to own_task.

    `R` is the main view's loss matrix, `others` = {fast_mode: its (partial) matrix}. A view's unlogged cells are
    the main view's (view_matrix), so a view logged after the last stage only has the main view's diagonal (BWT)
    and earlier stages (forgetting): right after learning a task, the active fast weights are that task's, so
    "current" and "own_task" coincide there; for "none" it measures the loss against the trained model. A view
    in eval_fast_modes is logged at every stage and uses its own cells."""
    T = len(tasks)
    lines = ["| fast weights | " + " | ".join(tasks) + " | AP loss ↓ | BWT loss ↑ | forgetting loss ↓ |",
             "|---|" + "---:|" * (T + 3)]
    done = {}
    for name, Rv in [(mode, R)] + list(others.items()):
        M = view_matrix(R, Rv)
        try:
            m = cl_metrics(M, higher_is_better=False, sparse=True)
        except ValueError:  # a cell AP or BWT reads is missing in this view and in the main one
            continue
        done[name] = (M[T], m)
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in M[T]) + f" | {_fmt(m['ap'])} | "
                     f"{_fmt(m['bwt'], signed=True)} | {_fmt(m['forgetting'])} |")
    for name in ROUTED_MODES:
        if name in done and "own_task" in done:
            (final, m), (own, m_own) = done[name], done["own_task"]
            diff = lambda a, b: None if a is None or b is None else a - b  # noqa: E731
            lines.append(f"| {name} − own_task | " + " | ".join(_fmt(a - b, signed=True) for a, b in zip(final, own))
                         + f" | {_fmt(diff(m['ap'], m_own['ap']), signed=True)} | "
                         f"{_fmt(diff(m['bwt'], m_own['bwt']), signed=True)} | "
                         f"{_fmt(diff(m['forgetting'], m_own['forgetting']), signed=True)} |")
    return lines


def router_table(rows, method: str, tasks) -> list[str]:
    """Stage x task router accuracy of `method` (logs/seq_router.jsonl; markdown lines, empty without rows): the
    share of a task's eval rows routed to the branch own_task uses (its own once learned, the slow branch alone
    before), with n; then where each task's rows went after the last stage."""
    cells = {}
    for r in rows:
        if r.get("method") == method and r.get("eval_task") in tasks:
            cells[(int(r["stage"]), r["eval_task"])] = r  # the last row of a cell wins
    if not cells:
        return []
    T = len(tasks)
    lines = ["| stage | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (T + 1)]
    for stage in sorted({s for s, _ in cells}):
        row = [cells.get((stage, t)) for t in tasks]
        accs = [r["accuracy"] for r in row if r is not None]
        label = f"{stage} {tasks[stage - 1]}" if 1 <= stage <= T else str(stage)
        lines.append(f"| {label} | " + " | ".join("·" if r is None else f"{r['accuracy']:.3f} ({r['n']})" for r in row)
                     + f" | {_fmt(sum(accs) / len(accs)) if accs else 'n/a'} |")
    last = max(s for s, _ in cells)
    routed = [f"{short_task(t)} → " + ", ".join(f"{short_task(k) if k != 'none' else 'none'} {v}"
                                                 for k, v in cells[(last, t)]["routed_to"].items())
              for t in tasks if (last, t) in cells]
    lines += ["", f"Accuracy = share of a task's eval rows routed to its own fast branch once the task is learned, "
              f"to the slow branch alone (\"none\", the fallback) before. Routed after stage {last}: "
              + "; ".join(routed) + "."]
    return lines


def results_markdown(log_dir, summaries: dict, config_note: str = "", other_views: dict | None = None,
                     router_rows: list | None = None) -> str:
    """The results table (methods as rows) from {method: cl_summary}, then config and eval-loss tables.

    `other_views` = {method: {fast_mode: loss matrix}}: the other fast-weight views a DS-LoRA run logged
    (e.g. own_task after the last stage), compared on the final stage after the method's table. `router_rows`
    (logs/seq_router.jsonl) give each routed DS-LoRA method its router accuracy table."""
    head = ["method", "AP score ↑", "BWT score ↑", "FWT score ↑", "forgetting score ↓",
            "AP loss ↓", "BWT loss ↑", "FWT loss ↑", "forgetting loss ↓",
            "refusal ↑", "over-refusal ↓", "KL(base‖cur) ↓", "length ratio"]
    lines = ["## Results", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    notes = []
    for method, s in summaries.items():
        cells = [method]
        for name in ("score", "loss"):
            m = s["matrices"].get(name)
            if m is None:
                notes.append(f"{method}: no {name} rows")
            elif m.get("note"):
                notes.append(f"{method} {name}: {m['note']}")
            metrics = m["metrics"] if m else {}
            cells += [_fmt(metrics.get("ap"))] + [_fmt(metrics.get(k), signed=True) for k in ("bwt", "fwt")]
            cells.append(_fmt(metrics.get("forgetting")))
        series = s["series"]
        cells += [_fmt(_last(series.get(k))) for k in ("T5_safety/refusal", "T5_safety/over_refusal",
                                                       "drift/kl_base", "drift/length_ratio")]
        lines.append("| " + " | ".join(cells) + " |")
    score_names = ", ".join(f"{short_task(t)} `{m}`" for t, m in PRIMARY_METRIC.items())
    lines += ["", f"Score = primary metric per task ({score_names}); loss = teacher-forced eval loss. "
              "AP is the mean over tasks after the last stage, in the matrix's units. On loss, BWT, FWT and "
              "forgetting are computed on -loss: positive BWT/FWT = better, positive forgetting = worse. "
              "Refusal and over-refusal: T5 bench after the last stage. KL(base‖cur) and length ratio: "
              "drift probes after the last stage. n/a = not logged or a matrix with a missing cell."]
    if notes:
        lines += [""] + [f"* {n}" for n in notes]
    lines += knowledge_format_table(summaries)
    lines += [""] + _config_lines(log_dir, list(summaries))
    if config_note:
        lines += ["", config_note]
    for method, s in summaries.items():
        if "loss" in s["matrices"]:
            lines += ["", f"### Eval loss by stage: {method}", ""] + eval_loss_table(s)
        for name in ("score", *SPLIT_METRICS):
            if name in s["matrices"]:
                lines += ["", f"### {name.capitalize()} by stage: {method} (value ± standard error, n rows)", ""]
                lines += spread_table(s["matrices"][name], s["tasks"])
        if "loss" in s["matrices"] and (other_views or {}).get(method):
            lines += ["", f"### Final eval loss by fast-weight view: {method}", ""]
            lines += fast_view_table(s["matrices"]["loss"]["R"], s["tasks"], s["fast_mode"], other_views[method])
        router = router_table(router_rows or [], method, s["tasks"])
        if router:
            lines += ["", f"### Task router: {method} (routed views)", ""] + router
    tasks = list(dict.fromkeys(t for s in summaries.values() for t in s["tasks"]))
    ref = single_reference(log_dir, tasks or KNOWN_TASKS)
    if ref:
        lines += ["", f"Single-task DS-LoRA reference (final eval loss): {ref}."]
    return "\n".join(lines) + "\n"


def write_results_md(log_dir, tasks, config_note: str = "", fast_mode: str = "current",
                     tasks_by_method: dict | None = None) -> str:
    """Write every method's `cl_summary_{method}.json` and `log_dir/results.md`; return the markdown.

    `tasks_by_method` overrides `tasks` for methods run on another task order."""
    log_dir = Path(log_dir)
    loss_rows = load_rows(log_dir / "seq_eval_loss.jsonl")
    rows = loss_rows + load_rows(log_dir / "seq_eval_metrics.jsonl")
    summaries, other_views = {}, {}
    for method in methods_in(rows):
        method_tasks = list((tasks_by_method or {}).get(method, tasks))
        s = write_cl_summary(log_dir, method, method_tasks, fast_mode)
        if s is not None:
            summaries[method] = s
        modes = sorted({r["fast_mode"] for r in loss_rows if r.get("method") == method and r.get("fast_mode")}
                       - {fast_mode})
        for mode in modes:  # other fast-weight views (e.g. own_task, logged after the last stage)
            R = build_R(loss_rows, method, method_tasks, fast_mode=mode)
            if R is not None:
                other_views.setdefault(method, {})[mode] = R
    if not summaries:
        md = f"## Results\n\nNo eval rows in {log_dir} (seq_eval_loss.jsonl, seq_eval_metrics.jsonl).\n"
    else:
        md = results_markdown(log_dir, summaries, config_note, other_views, load_rows(log_dir / "seq_router.jsonl"))
    atomic_write_text(log_dir / "results.md", md)
    return md
