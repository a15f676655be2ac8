"""The needed-cells evaluation grid, sparse CL metrics, and knowledge/format matrices with n and se in the results."""
import json

import pytest

import plot_loss
from configs.base_config import make_config
from evaluation.cl_metrics import cl_metrics, required_cells
from utils_data import write_jsonl
from utils_results import write_results_md
from utils_train import scored_tasks

TASKS = ("T1_general", "T2_math", "T3_code", "T4_tool", "T5_safety")


def test_needed_grid_scores_base_last_diagonal_and_next_task_only():
    cfg = make_config([])
    assert cfg.eval_grid == "needed"
    assert scored_tasks(cfg, 0) == list(TASKS) and scored_tasks(cfg, 5) == list(TASKS)
    assert scored_tasks(cfg, 1) == ["T1_general", "T2_math"]
    assert scored_tasks(cfg, 4) == ["T4_tool", "T5_safety"]
    full = make_config([], eval_grid="full")
    assert all(scored_tasks(full, s) == list(TASKS) for s in range(6))
    # what the needed grid scores is exactly what AP, BWT and FWT read
    scored = {(s, TASKS.index(t)) for s in range(6) for t in scored_tasks(cfg, s)}
    assert scored == required_cells(5)


def test_sparse_cl_metrics_equal_full_ones_where_no_metric_reads_the_gap():
    R = [[0.2, 0.1, 0.3, 0.4],
         [0.6, 0.2, 0.1, 0.3],
         [0.9, 0.5, 0.3, 0.2],  # T1's best stage: dropped below, so forgetting must change
         [0.5, 0.7, 0.6, 0.1],
         [0.4, 0.6, 0.5, 0.8]]
    full = cl_metrics(R)
    sparse_R = [[v if (t, i) in required_cells(4) else None for i, v in enumerate(row)] for t, row in enumerate(R)]
    sparse = cl_metrics(sparse_R, sparse=True)
    for k in ("ap", "bwt", "fwt"):
        assert sparse[k] == pytest.approx(full[k])
    # T1 (i = 0): full max over stages 0..3 is 0.9 (stage 2, not scored); sparse max over 0, 1 is 0.6
    assert full["forgetting_per_task"][0] == pytest.approx(0.9 - 0.4)
    assert sparse["forgetting_per_task"][0] == pytest.approx(0.6 - 0.4)
    sparse_R[4][1] = None  # a final cell: AP needs it
    with pytest.raises(ValueError, match=r"R\[4\]\[1\] is missing"):
        cl_metrics(sparse_R, sparse=True)
    with pytest.raises(ValueError, match="missing"):
        cl_metrics(sparse_R)  # the dense form refuses any gap


def _metric_rows(method, metric, value_of, n, tasks=TASKS):
    rows = []
    for s in range(len(tasks) + 1):
        for i, t in enumerate(tasks):
            if (s, i) not in required_cells(len(tasks)):
                continue
            v = value_of(s, i)
            rows.append({"method": method, "stage": s, "stage_task": "base" if s == 0 else tasks[s - 1],
                         "eval_task": t, "task": t, "step": s, "split": "bench", "metric": metric, "value": v,
                         "n": n, "se": (v * (1 - v) / n) ** 0.5})
    return rows


def test_results_have_knowledge_and_format_matrices_with_n_and_se(tmp_path):
    loss = [{"method": "m", "stage": s, "stage_task": "base" if s == 0 else TASKS[s - 1], "eval_task": t, "task": t,
             "step": s, "split": "val", "loss": 1.0 + 0.1 * s - 0.05 * i, "n": 12}
            for s in range(6) for i, t in enumerate(TASKS)]
    write_jsonl(tmp_path / "seq_eval_loss.jsonl", loss)
    know = _metric_rows("m", "knowledge", lambda s, i: 0.5 + 0.05 * i - (0.1 if s == 5 and i < 4 else 0), 64)
    fmt = _metric_rows("m", "format", lambda s, i: 0.75, 32)
    write_jsonl(tmp_path / "seq_eval_metrics.jsonl", know + fmt)
    md = write_results_md(tmp_path, TASKS)
    summary = json.loads((tmp_path / "cl_summary_m.json").read_text())
    k = summary["matrices"]["knowledge"]
    assert k["higher_is_better"] and k.get("sparse")
    assert k["metrics"]["bwt"] == pytest.approx(-0.1) and k["metrics"]["ap"] == pytest.approx(0.6 - 0.08)
    assert k["n"][5] == [64] * 5 and k["se"][2][0] is None  # stage 2 x T1 was not scored
    final_se = k["se"][5]
    assert k["metrics"]["ap_se"] == pytest.approx(sum(v * v for v in final_se) ** 0.5 / 5)
    assert summary["matrices"]["format"]["metrics"]["bwt"] == pytest.approx(0.0)
    assert "### Knowledge and format" in md and "### Knowledge by stage: m" in md
    assert "0.750 ± 0.077 (32)" in md  # format cell: value ± se (n)
    assert "| 2 T2_math | · |" in md  # a cell the needed grid did not score
    assert plot_loss.plot_heatmap(tmp_path, summary).exists()
