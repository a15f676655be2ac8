"""One stage's evaluation: bench metrics on every task, then drift, logged as JSONL."""
from pathlib import Path

from utils_data import build_prompt
from utils_io import append_jsonl, write_jsonl
from evaluation.cl_metrics import aggregate
from evaluation.drift import drift_metrics
from evaluation.generation import generate
from evaluation.sandbox import allow_unconfined, require_isolation
from evaluation.scoring import CODE_KINDS, STAGE_METRICS, score_rows


def run_stage_metrics(model, tokenizer, cfg, method, stage, stage_task, step, device, bench, fast_mode=None):
    """Generate on every task's bench rows, score, and append one row per metric to
    {log_dir}/seq_eval_metrics.jsonl; then the drift metrics to {log_dir}/seq_drift.jsonl (when
    cfg.drift_num_probes > 0). Every generation goes to
    {log_dir}/generations/{method}_stage{stage}_{stage_task}.jsonl. `fast_mode` (DS-LoRA methods: the fast
    weights active while generating) is logged on every row. Returns all logged rows."""
    log_dir = Path(cfg.log_dir)
    head = {"method": method, "stage": stage, "stage_task": stage_task} | ({"fast_mode": fast_mode} if fast_mode else {})
    metric_rows, records, summary = [], [], []
    bench = {task: rows for task, rows in bench.items() if rows}
    for task in bench:
        if task not in cfg.max_new_tokens:
            raise ValueError(f"max_new_tokens has no budget for {task}; add it, e.g. "
                             f"--max_new_tokens '{{\"{task}\": 128, ...}}'")
    if any(r.get("kind") in CODE_KINDS for rows in bench.values() for r in rows):
        allow_unconfined(cfg.allow_unconfined_code)
        require_isolation()  # stop before generating if model code could not run confined
    # every task's rows in one batched pass, each row with its task's budget
    flat = [(task, r) for task, rows in bench.items() for r in rows]
    flat_texts = generate(model, tokenizer, [r for _, r in flat], cfg, device,
                          [cfg.max_new_tokens[task] for task, _ in flat], desc=f"generate stage {stage}") if flat else []
    texts_by_task = {task: [] for task in bench}
    for (task, _), text in zip(flat, flat_texts):
        texts_by_task[task].append(text)
    for task, rows in bench.items():
        texts = texts_by_task[task]
        scores = score_rows(task, rows, texts)
        means = aggregate(scores)
        for metric in STAGE_METRICS.get(task, tuple(means)):
            if means.get(metric) is None:
                continue
            n = sum(1 for s in scores if s.get(metric) is not None)
            metric_rows.append({**head, "eval_task": task, "task": task, "step": step, "split": "bench",
                                "metric": metric, "value": means[metric], "n": n})
            summary.append(f"{metric}={means[metric]:.3f}")
        records += [{"id": r.get("id"), "task": task, "kind": r.get("kind"),
                     "prompt": build_prompt(tokenizer, r["instruction"], r.get("input", ""), cfg.prompt_format),
                     "output": t, "scores": s} for r, t, s in zip(rows, texts, scores)]
    if metric_rows:
        append_jsonl(log_dir / "seq_eval_metrics.jsonl", metric_rows)

    drift_rows = []
    if cfg.drift_num_probes > 0:
        metrics, probe_records = drift_metrics(model, tokenizer, cfg, device)
        records += probe_records
        drift_rows = [{**head, "eval_task": "drift", "task": "drift", "step": step, "split": "drift",
                       "metric": k, "value": v, "n": len(probe_records)} for k, v in metrics.items()]
        drift_rows += [{**r, "split": "drift"} for r in metric_rows
                       if r["eval_task"] == "T2_math" and r["metric"] == "math_strict_minus_flexible"]
        append_jsonl(log_dir / "seq_drift.jsonl", drift_rows)
        summary += [f"kl_base={metrics['kl_base']:.4f}"] + (
            [f"length_ratio={metrics['length_ratio']:.2f}"] if "length_ratio" in metrics else [])
    write_jsonl(log_dir / "generations" / f"{method}_stage{stage}_{stage_task}.jsonl", records)
    print(f"[metrics] {method} stage {stage} ({stage_task}): " + ("  ".join(summary) or "nothing to score"))
    return metric_rows + drift_rows
