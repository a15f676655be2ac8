"""Scoring one generated row: the dispatch from a bench row's `kind` to its task scorer."""
import os
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from evaluation.code_score import extract_code, humaneval_completion, score_codeio, score_humaneval
from evaluation.format_score import has_task_format
from evaluation.general_score import score_general
from evaluation.math_score import score_math
from evaluation.safety_score import is_over_refusal, is_refusal, is_supportive
from evaluation.tool_score import score_tool


CODE_KINDS = ("humaneval", "codeio")  # rows whose reply is executed (in evaluation.sandbox)
TOOL_KINDS = ("bfcl", "glaive", "tool", "hf")  # bfcl rows carry ground_truth; glaive rows (--source hf) a reference


def score_row(task, row, text):
    """Metric values of one reply, keyed by the metric names of run_stage_metrics: `format` (the reply has its
    task's form, evaluation.format_score), then the task metrics that apply to this row's `kind`."""
    scores = _task_scores(task, row, text)  # first: an unknown kind is reported with the task's name
    return {"format": has_task_format(row, text), **scores}


def _task_scores(task, row, text):
    """The task scorer's metrics of one reply, by the row's `kind`."""
    kind = row.get("kind")
    if kind == "general":
        s = score_general(text, row)
        return {"general_strict": s["strict"], "general_loose": s["loose"]}
    if kind == "math":
        s = score_math(text, row["answer"])
        return {"math_strict": s["strict"], "math_flexible": s["flexible"],
                "math_strict_minus_flexible": s["strict"] - s["flexible"]}
    if kind == "humaneval":
        passed = score_humaneval(row, humaneval_completion(row, text))
        return {"code_pass1": passed, "humaneval_pass1": passed}
    if kind == "codeio":
        passed = score_codeio(extract_code(text), row["reference_code"], row["inputs"])
        return {"code_pass1": passed, "codeio_pass1": passed}
    if kind in TOOL_KINDS:
        s = score_tool(text, row)
        out = {"tool_ast": s["ast"], "tool_json_valid": s["json_valid"]}
        if s["exact"] is not None:
            out["tool_exact"] = s["exact"]
        return out
    if kind == "harmful":
        return {"refusal": int(is_refusal(text))}
    if kind == "benign":
        return {"over_refusal": int(is_over_refusal(text))}
    if kind == "supportive":
        return {"supportive": int(is_supportive(text))}
    raise ValueError(f"{task} bench row {row.get('id')!r}: unknown kind {kind!r}; expected general, math, "
                     f"humaneval, codeio, {', '.join(TOOL_KINDS)}, harmful, benign or supportive")


# Printed per stage, in this order (a metric with no rows is left out).
STAGE_METRICS = {
    "T1_general": ("format", "general_strict", "general_loose"),
    "T2_math": ("format", "math_strict", "math_flexible", "math_strict_minus_flexible"),
    "T3_code": ("format", "code_pass1", "humaneval_pass1", "codeio_pass1"),
    "T4_tool": ("format", "tool_ast", "tool_json_valid", "tool_exact"),
    "T5_safety": ("format", "refusal", "over_refusal", "supportive"),
}


def score_rows(task, rows, texts):
    """score_row over all rows; threads, because code rows wait on sandbox subprocesses."""
    workers = min(8, os.cpu_count() or 1, max(1, len(rows)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(lambda rt: score_row(task, *rt), zip(rows, texts)), total=len(rows),
                         desc=f"score {task}", leave=False))
