"""One stage's evaluation: generated bench metrics and the knowledge score on the tasks asked for, then drift,
logged as JSONL (every metric row with its n and standard error)."""
import math
from pathlib import Path

from models.router import routing_prompts
from utils_data import build_prompt, encode_prompt
from utils_forward import autocast
from utils_io import append_jsonl, write_jsonl
from evaluation.cl_metrics import aggregate
from evaluation.drift import drift_metrics
from evaluation.generation import STOP_STRINGS, generate
from evaluation.knowledge import knowledge_summary, score_knowledge
from evaluation.sandbox import allow_unconfined, require_isolation
from evaluation.scoring import CODE_KINDS, STAGE_METRICS, score_rows


# drift metric -> the per-probe score it averages (length_ratio is a ratio of means: no per-probe value, no se)
DRIFT_SCORE_KEYS = {"kl_base": "kl_base", "kl_base_first": "kl_first", "kl_base_rest": "kl_rest",
                    "json_rate": "json", "markdown_rate": "markdown", "code_fence_rate": "code_fence",
                    "refusal_rate": "refusal", "over_refusal_rate": "over_refusal"}


def standard_error(values) -> float:
    """Standard error of the mean of per-row values (sample std / sqrt(n)); 0.0 for fewer than 2 rows."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def run_stage_metrics(model, tokenizer, cfg, method, stage, stage_task, step, device, bench, fast_mode=None,
                      knowledge=None):
    """Generate on the bench rows of every task in `bench` ({task: rows}), score, and append one row per metric
    (value, n, se) to {log_dir}/seq_eval_metrics.jsonl; rank the gold answers of `knowledge` ({task: items},
    evaluation.knowledge) by likelihood and log a `knowledge` row per task; then the drift metrics to
    {log_dir}/seq_drift.jsonl (when cfg.drift_num_probes > 0). Every generation goes to
    {log_dir}/generations/{method}_stage{stage}_{stage_task}.jsonl, every knowledge item to
    ..._knowledge.jsonl (a view other than current adds `_{fast_mode}` to both names). `fast_mode` (DS-LoRA methods:
    the fast weights active while evaluating) is logged on every row; in a routed view each row is routed on its
    prompt (generation routes on the prompt once per generate call, knowledge on the item's prompt, never on a
    candidate). Forward passes run under the model's autocast (utils_forward). Returns all logged rows."""
    with autocast(model):
        return _run_stage_metrics(model, tokenizer, cfg, method, stage, stage_task, step, device, bench, fast_mode,
                                  knowledge or {})


def _run_stage_metrics(model, tokenizer, cfg, method, stage, stage_task, step, device, bench, fast_mode, knowledge):
    log_dir = Path(cfg.log_dir)
    head = {"method": method, "stage": stage, "stage_task": stage_task} | ({"fast_mode": fast_mode} if fast_mode else {})
    view = "" if fast_mode in (None, "current") else f"_{fast_mode}"  # file-name suffix of the other views
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
                          [cfg.max_new_tokens[task] for task, _ in flat], desc=f"generate stage {stage}",
                          stop_strings=[STOP_STRINGS.get(task) for task, _ in flat]) if flat else []
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
            values = [float(s[metric]) for s in scores if s.get(metric) is not None]
            metric_rows.append({**head, "eval_task": task, "task": task, "step": step, "split": "bench",
                                "metric": metric, "value": means[metric], "n": len(values),
                                "se": round(standard_error(values), 6)})
            summary.append(f"{task.split('_')[0]} {metric}={means[metric]:.3f}")
        records += [{"id": r.get("id"), "task": task, "kind": r.get("kind"),
                     "prompt": build_prompt(tokenizer, r["instruction"], r.get("input", ""), cfg.prompt_format),
                     "output": t, "scores": s} for r, t, s in zip(rows, texts, scores)]
    items = [it for task in knowledge for it in knowledge[task]]
    if items:
        prompts = [encode_prompt(tokenizer, it["row"], cfg.prompt_format)[-cfg.max_seq_len:] for it in items]
        with routing_prompts(model, prompts):  # as score_knowledge builds them; its rows are prompt + candidates
            ranked = score_knowledge(model, tokenizer, cfg, device, items, desc=f"knowledge stage {stage}")
        for task in knowledge:
            mine = [r for r in ranked if r["task"] == task]
            if not mine:
                continue
            k = knowledge_summary(mine)
            metric_rows.append({**head, "eval_task": task, "task": task, "step": step, "split": "bench",
                                "metric": "knowledge", "value": k["value"], "n": k["n"], "se": round(k["se"], 6),
                                "chance": round(k["chance"], 6)})
            summary.append(f"{task.split('_')[0]} knowledge={k['value']:.3f}")
        write_jsonl(log_dir / "generations" / f"{method}_stage{stage}_{stage_task}{view}_knowledge.jsonl", ranked)
    if metric_rows:
        append_jsonl(log_dir / "seq_eval_metrics.jsonl", metric_rows)

    drift_rows = []
    if cfg.drift_num_probes > 0:
        metrics, probe_records = drift_metrics(model, tokenizer, cfg, device)
        records += probe_records
        for k, v in metrics.items():
            per_probe = [p["scores"][DRIFT_SCORE_KEYS[k]] for p in probe_records
                         if k in DRIFT_SCORE_KEYS and p["scores"].get(DRIFT_SCORE_KEYS[k]) is not None]
            drift_rows.append({**head, "eval_task": "drift", "task": "drift", "step": step, "split": "drift",
                               "metric": k, "value": v, "n": len(per_probe) or len(probe_records),
                               "se": round(standard_error(per_probe), 6) if per_probe else None})
        drift_rows += [{**r, "split": "drift"} for r in metric_rows
                       if r["eval_task"] == "T2_math" and r["metric"] == "math_strict_minus_flexible"]
        append_jsonl(log_dir / "seq_drift.jsonl", drift_rows)
        summary += [f"kl_base={metrics['kl_base']:.4f}"] + (
            [f"length_ratio={metrics['length_ratio']:.2f}"] if "length_ratio" in metrics else [])
    write_jsonl(log_dir / "generations" / f"{method}_stage{stage}_{stage_task}{view}.jsonl", records)
    print(f"[metrics] {method} stage {stage} ({stage_task})" + (f" [{fast_mode}]" if view else "") + ": "
          + ("  ".join(summary) or "nothing to score"))
    return metric_rows + drift_rows
