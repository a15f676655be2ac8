"""plot_loss.py and utils_results.py on hand-made logs: 2 methods x 3 tasks, one of them interrupted."""
import json

import pytest

import plot_loss
from utils_data import write_jsonl
from utils_results import PRIMARY_METRIC, build_R, load_rows, write_cl_summary, write_results_md

TASKS = ["T1_general", "T2_math", "T5_safety"]
TASKS_ARG = ["--tasks", ",".join(TASKS)]
# seq_lora: complete. R[t][i] = after stage t (0 = base) on TASKS[i].
LOSS_SEQ = [[2.0, 3.0, 2.5],
            [1.0, 2.8, 2.6],
            [1.4, 1.5, 2.4],
            [1.6, 1.7, 1.2]]
SCORE_SEQ = [[0.1, 0.0, 0.2],
             [0.8, 0.1, 0.2],
             [0.6, 0.7, 0.3],
             [0.5, 0.4, 0.9]]
# ds_lora_slsd: interrupted after stage 2, logs two fast-weight views.
LOSS_DS = [[2.0, 3.0, 2.5],
           [1.2, 2.9, 2.5],
           [1.3, 1.4, 2.45]]
OWN_TASK_SHIFT = 0.5  # the own_task view logs loss + 0.5


def _eval_rows(method, R, extra=None, **fields):
    rows = []
    for t, row in enumerate(R):
        for task, v in zip(TASKS, row):
            rows.append({"method": method, "stage": t, "stage_task": "base" if t == 0 else TASKS[t - 1],
                         "eval_task": task, "task": task, "step": 10 * t, **fields,
                         **({"loss": v} if extra is None else {"metric": extra(task), "value": v})})
    return rows


def write_logs(d):
    loss = [{"method": "seq_lora", "stage": 1, "stage_task": "T1_general", "eval_task": "T1_general",
             "task": "T1_general", "step": 10, "split": "val", "loss": 9.9}]  # stale: overwritten below
    loss += _eval_rows("seq_lora", LOSS_SEQ, split="val", n=4)
    loss += _eval_rows("ds_lora_slsd", LOSS_DS, split="val", n=4, fast_mode="current")
    loss += _eval_rows("ds_lora_slsd", [[v + OWN_TASK_SHIFT for v in r] for r in LOSS_DS], split="val", n=4,
                       fast_mode="own_task")
    write_jsonl(d / "seq_eval_loss.jsonl", loss)
    metrics = _eval_rows("seq_lora", SCORE_SEQ, extra=PRIMARY_METRIC.get, split="bench", n=2)
    metrics += _eval_rows("seq_lora", [[0.5] * 3] * 4, extra=lambda t: "exact_match", split="bench", n=2)
    metrics += [{"method": "seq_lora", "stage": t, "stage_task": "base", "eval_task": "T5_safety", "task": "T5_safety",
                 "step": 10 * t, "split": "bench", "metric": "over_refusal", "value": 0.1 * t} for t in range(4)]
    metrics += [{"method": "seq_lora", "stage": t, "stage_task": "base", "eval_task": "T2_math", "task": "T2_math",
                 "step": 10 * t, "split": "bench", "metric": "math_flexible", "value": 0.2} for t in range(4)]
    metrics += _eval_rows("ds_lora_slsd", SCORE_SEQ[:3], extra=PRIMARY_METRIC.get, split="bench", n=2,
                          fast_mode="current")
    write_jsonl(d / "seq_eval_metrics.jsonl", metrics)
    drift = [{"method": m, "stage": t, "eval_task": "drift", "task": "drift", "step": 10 * t, "split": "bench",
              "metric": k, "value": v * t + (k == "length_ratio")}
             for m, n in (("seq_lora", 4), ("ds_lora_slsd", 3)) for t in range(n)
             for k, v in (("kl_base", 0.25), ("length_ratio", 0.1))]
    write_jsonl(d / "seq_drift.jsonl", drift)
    for method, stages, prefix in (("seq_lora", 3, "seq_seq_lora_"), ("ds_lora_slsd", 2, "seq_")):
        for s, task in enumerate(TASKS[:stages], 1):
            rows = [{"method": method, "stage": s, "task": task, "step": 5 * (s - 1) + k, "stage_step": k,
                     "split": "train", "loss": 2.0 - 0.1 * k, "lr": 1e-3} for k in range(1, 6)]
            if method == "ds_lora_slsd" and s > 1:
                rows += [{**r, "split": "kd", "loss": 0.3} for r in rows[::2]]
            write_jsonl(d / f"{prefix}{task}_train_loss.jsonl", rows)
    write_jsonl(d / "single_T1_general_train_loss.jsonl",
                [{"method": "single", "stage": 1, "task": "T1_general", "step": k, "stage_step": k, "split": "train",
                  "loss": 2.0 / k, "lr": 1e-3} for k in range(1, 21)])
    write_jsonl(d / "single_T1_general_eval_loss.jsonl",
                [{"method": "single", "stage": 1, "task": "T1_general", "step": k, "split": "val", "loss": 2.0 / (k + 1),
                  "n": 4} for k in (0, 10, 20)])
    for method, slsd in (("seq_lora", False), ("ds_lora_slsd", True)):
        cfg = {"method": method, "seed": 7, "model_name": "tiny", "max_steps_per_task": 5, "train_split": "toy",
               "tasks": TASKS, "use_slsd": slsd}
        (d / f"config_{method}.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture
def logs(tmp_path):
    return write_logs(tmp_path)


def is_png(path):
    return path.exists() and path.stat().st_size > 100 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_build_R_returns_logged_matrix_and_last_row_wins(logs):
    loss_rows = load_rows(logs / "seq_eval_loss.jsonl")
    assert build_R(loss_rows, "seq_lora", TASKS) == LOSS_SEQ  # the stale 9.9 row is overwritten
    metric_rows = load_rows(logs / "seq_eval_metrics.jsonl")
    assert build_R(metric_rows, "seq_lora", TASKS, metric=PRIMARY_METRIC) == SCORE_SEQ
    assert build_R(loss_rows, "ewc", TASKS) is None


def test_build_R_reads_the_requested_fast_mode_and_leaves_missing_stage_empty(logs):
    rows = load_rows(logs / "seq_eval_loss.jsonl")
    assert build_R(rows, "ds_lora_slsd", TASKS) == LOSS_DS + [[None, None, None]]
    own = build_R(rows, "ds_lora_slsd", TASKS, fast_mode="own_task")
    assert own[1] == [v + OWN_TASK_SHIFT for v in LOSS_DS[1]]
    # rows without fast_mode (single-branch baselines) belong to every view
    assert build_R(rows, "seq_lora", TASKS, fast_mode="own_task") == LOSS_SEQ


def test_build_R_rejects_a_task_order_the_run_did_not_use(logs, capsys):
    rows = load_rows(logs / "seq_eval_loss.jsonl")
    assert build_R(rows, "seq_lora", ["T2_math", "T1_general", "T5_safety"]) is None
    assert "stage 1 trained T1_general" in capsys.readouterr().out


def test_cl_summary_metrics_equal_hand_computed_values(logs):
    write_cl_summary(logs, "seq_lora", TASKS)
    s = json.loads((logs / "cl_summary_seq_lora.json").read_text())
    assert s["method"] == "seq_lora" and s["tasks"] == TASKS
    assert {"loss", "score", "exact_match"} <= set(s["matrices"])
    assert "math_flexible" not in s["matrices"]  # logged on T2 only: a series, not a matrix
    loss, score = s["matrices"]["loss"], s["matrices"]["score"]
    assert loss["R"] == LOSS_SEQ and loss["higher_is_better"] is False
    assert score["R"] == SCORE_SEQ and score["higher_is_better"] is True
    # loss, sign made explicit (computed on -loss): BWT = mean(-(1.6-1.0), -(1.7-1.5)) = -0.4,
    # FWT = mean(-(2.8-3.0), -(2.4-2.5)) = 0.15, forgetting = mean(1.6-1.0, 1.7-1.5) = 0.4, AP = mean final loss
    assert loss["metrics"]["ap"] == pytest.approx(1.5)
    assert loss["metrics"]["bwt"] == pytest.approx(-0.4)
    assert loss["metrics"]["fwt"] == pytest.approx(0.15)
    assert loss["metrics"]["forgetting"] == pytest.approx(0.4)
    # score: AP = mean(.5,.4,.9), BWT = mean(.5-.8, .4-.7), FWT = mean(.1-0, .3-.2), forgetting = mean(.3, .3)
    assert score["metrics"]["ap"] == pytest.approx(0.6)
    assert score["metrics"]["bwt"] == pytest.approx(-0.3)
    assert score["metrics"]["fwt"] == pytest.approx(0.1)
    assert score["metrics"]["forgetting"] == pytest.approx(0.3)
    assert s["series"]["T5_safety/over_refusal"] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert s["series"]["drift/kl_base"] == pytest.approx([0.0, 0.25, 0.5, 0.75])


def test_partial_method_gets_no_metrics_and_says_which_cells_are_missing(logs, capsys):
    s = write_cl_summary(logs, "ds_lora_slsd", TASKS)
    loss = s["matrices"]["loss"]
    assert loss["metrics"] == {"ap": None, "bwt": None, "fwt": None, "forgetting": None}
    assert "stage 3 x T1_general" in loss["note"]
    assert "metrics not computed" in capsys.readouterr().out


def test_results_md_has_a_row_per_method_and_the_config(logs):
    md = write_results_md(logs, TASKS)
    assert (logs / "results.md").read_text() == md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert {"seq_lora", "ds_lora_slsd"} <= set(rows)
    cells = [c.strip() for c in rows["seq_lora"].split("|")[2:-1]]
    assert cells[:8] == ["0.600", "-0.300", "+0.100", "0.300", "1.500", "-0.400", "+0.150", "0.400"]
    assert cells[8:] == ["0.900", "0.300", "0.750", "1.300"]  # refusal, over-refusal, KL, length ratio
    assert rows["ds_lora_slsd"].count("n/a") >= 8
    assert "seed=7" in md and "`use_slsd` differs" in md
    assert "### Eval loss by stage: seq_lora" in md and "**1.000**" in md  # T1 loss right after T1



def test_results_md_compares_fast_weight_views_on_the_final_stage(tmp_path):
    loss = _eval_rows("ds_lora", LOSS_SEQ, split="val", n=4, fast_mode="current")
    own_final = [1.1, 1.6, 1.2]  # own_task logged after the last stage only
    loss += [{**r, "fast_mode": "own_task", "loss": v}
             for r, v in zip(_eval_rows("ds_lora", [LOSS_SEQ[-1]], split="val", n=4), own_final)]
    for r in loss[-3:]:
        r["stage"], r["stage_task"] = 3, TASKS[-1]
    loss += _eval_rows("ds_lora_slsd", LOSS_DS, split="val", n=4, fast_mode="current")  # interrupted
    write_jsonl(tmp_path / "seq_eval_loss.jsonl", loss)
    md = write_results_md(tmp_path, TASKS)
    assert "### Final eval loss by fast-weight view: ds_lora" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    # current: final (1.6, 1.7, 1.2), AP 1.5; BWT = mean(1.0 - 1.6, 1.5 - 1.7) = -0.4 (diagonal 1.0, 1.5)
    assert "| 1.500 | -0.400 |" in rows["current"]
    # own_task: final (1.1, 1.6, 1.2), AP 1.3; BWT = mean(1.0 - 1.1, 1.5 - 1.6) = -0.1, same diagonal
    assert "| 1.100 | 1.600 | 1.200 | 1.300 | -0.100 |" in rows["own_task"]
    assert "fast-weight view: ds_lora_slsd" not in md

@pytest.mark.parametrize("argv, pngs", [
    (["single", "T1_general"], ["single_T1_general_train_loss.png"]),
    (["seq"], ["seq_eval_loss.png", "seq_train_loss.png"]),
    (["heatmap"], ["cl_heatmap_seq_lora.png", "cl_heatmap_ds_lora_slsd.png"]),
    (["cl"], ["cl_ap_bwt.png"]),
    (["drift"], ["seq_drift.png"]),
])
def test_every_plot_subcommand_writes_a_png(logs, argv, pngs):
    assert plot_loss.main(argv + ["--log_dir", str(logs)] + TASKS_ARG) == 0
    for name in pngs:
        assert is_png(logs / name), name
    assert not list(logs.glob(".*.tmp"))  # atomic save leaves no temp file behind


def test_results_subcommand_prints_table_and_writes_summaries(logs, capsys):
    plot_loss.main(["results", "--log_dir", str(logs)])  # task order from config_{method}.json
    out = capsys.readouterr().out
    assert "| seq_lora | 0.600 |" in out
    assert (logs / "cl_summary_seq_lora.json").exists() and (logs / "cl_summary_ds_lora_slsd.json").exists()


def test_all_skips_absent_logs_with_a_note(tmp_path, capsys):
    assert plot_loss.main(["all", "--log_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "skip single" in out and "skip drift" in out and "No eval rows" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob("*.png"))


def test_all_on_partial_logs_plots_what_exists(logs):
    for name in ("seq_drift.jsonl", "seq_eval_metrics.jsonl", "single_T1_general_eval_loss.jsonl"):
        (logs / name).unlink()
    plot_loss.main(["all", "--log_dir", str(logs)] + TASKS_ARG)
    for name in ("single_T1_general_train_loss.png", "seq_eval_loss.png", "seq_train_loss.png", "cl_ap_bwt.png",
                 "cl_heatmap_ds_lora_slsd.png"):
        assert is_png(logs / name), name
    assert not (logs / "seq_drift.png").exists()
    assert "ds_lora_slsd" in (logs / "results.md").read_text()
