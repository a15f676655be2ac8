"""compare.py on a tiny model and toy data: every configuration x order runs once, a second call runs nothing, and
the aggregate table, the AP/BWT figure and the heatmaps come from the logs."""
import json

import pytest

import compare
from test_train import TASKS, data_dir  # noqa: F401  (fixture)


def tiny(model_dir, data) -> list[str]:
    return ["--model_name", str(model_dir), "--data_dir", str(data), "--device", "cpu", "--num_frozen_layers", "2",
            "--router_layer", "1", "--router_rows_per_task", "2", "--per_device_batch_size", "2",
            "--probe_size_per_task", "6", "--max_new_tokens", json.dumps({t: 4 for t in (*TASKS, "drift")})]


def in_process(cmd, log_path, threads=None):
    """compare.run_command without a new interpreter per run (each would re-import torch): the script's main()."""
    import importlib
    import resource
    import time
    t0 = time.perf_counter()
    importlib.import_module(cmd[1].removesuffix(".py")).main(cmd[2:])
    return {"rc": 0, "wall_s": round(time.perf_counter() - t0, 3),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def test_run_command_measures_the_child_alone(tmp_path):
    import sys
    res = compare.run_command([sys.executable, "-c", "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])"],
                              tmp_path / "log.txt")
    assert res["rc"] == 0 and 300 < res["peak_rss_mb"] < 1000 and res["wall_s"] > 0
    assert compare.run_command([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log.txt")["rc"] == 3


def test_compare_runs_each_configuration_and_order_once_and_aggregates(tmp_path, tiny_model_dir, data_dir,  # noqa: F811
                                                                      capsys, monkeypatch):
    monkeypatch.setattr(compare, "run_command", in_process)
    out = tmp_path / "compare"
    argv = ["--configs", "ds_lora,seq_lora,single_task",
            "--seeds", "42", "--orders", "forward,reverse", "--tasks", ",".join(TASKS), "--quick",
            "--out", str(out), "--save_root", str(tmp_path / "ckpt"), *tiny(tiny_model_dir, data_dir)]
    compare.main(argv)
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    configs = sorted({(r["order"], r["config"]) for r in runs})
    assert configs == sorted([(o, c) for o in ("forward", "reverse") for c in ("ds_lora", "seq_lora")]
                             + [("forward", "single_task:T1_general"), ("forward", "single_task:T2_math")])
    assert all(r["rc"] == 0 and r["wall_s"] > 0 and r["peak_rss_mb"] > 50 for r in runs), runs
    rev = [json.loads(line) for line in (out / "reverse" / "seed42" / "seq_eval_loss.jsonl").read_text().splitlines()]
    assert [r["eval_task"] for r in rev if r["stage"] == 1][:1] and \
        {r["stage_task"] for r in rev if r["stage"] == 1} == {"T2_math"}  # the reverse order trains T2 first
    text = (out / "results.md").read_text()
    for m in ("ds_lora", "seq_lora", "single_task"):
        assert f"| {m} |" in text
    assert "## Change between orders (reverse − forward, paired by seed)" in text
    assert (out / "ap_bwt.png").stat().st_size > 1000 and (out / "loss_heatmaps.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    fwd = res["forward/ds_lora"]["42"]
    assert fwd["ap_loss"] > 0 and "bwt_loss" in fwd and "fwt_loss" in fwd and fwd["wall_s"] > 0
    assert res["forward/single_task"]["42"]["ap_loss"] > 0
    assert res["reverse/single_task"]["42"]["ap_loss"] == res["forward/single_task"]["42"]["ap_loss"]  # run once

    capsys.readouterr()
    compare.main(argv)  # everything finished: nothing runs again
    assert "6 runs, 6 already finished" in capsys.readouterr().out
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(runs)


def test_jobs_run_folders_in_parallel_and_each_folder_in_turn(tmp_path, monkeypatch):
    import argparse
    import threading
    import time
    calls, lock = [], threading.Lock()

    def fake(cmd, log_path, threads=None):  # records when each run of each folder was live
        t0 = time.perf_counter()
        time.sleep(0.05)
        with lock:
            calls.append((cmd[cmd.index("--log_dir") + 1], t0, time.perf_counter(), threads))
        return {"rc": 0, "wall_s": 0.05, "peak_rss_mb": 1.0}
    monkeypatch.setattr(compare, "run_command", fake)
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 4)
    args = argparse.Namespace(tasks=list(TASKS), orders=["forward", "reverse"], seeds=[42, 43], jobs=2,
                              configs=["seq_lora", "ewc", "replay"], save_root=str(tmp_path / "ckpt"))
    compare.run_all(args, [], tmp_path / "out")
    assert len(calls) == 12 and {c[3] for c in calls} == {2}  # 4 folders x 3 configs; 4 cores / 2 jobs
    by_folder = {}
    for folder, t0, t1, _ in calls:
        by_folder.setdefault(folder, []).append((t0, t1))
    for spans in by_folder.values():  # a folder's runs share its logs: never two at once
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    spans = sorted((t0, t1) for _, t0, t1, _ in calls)
    assert any(a[1] > b[0] for a, b in zip(spans, spans[1:]))  # two folders did run at once
    rows = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["jobs"] == 2 for r in rows)
    calls.clear()
    compare.run_all(args, [], tmp_path / "out")  # all finished: nothing runs
    assert calls == []


def test_unknown_configuration_is_refused():
    with pytest.raises(SystemExit, match="unknown --configs"):
        compare.main(["--configs", "nope", "--aggregate_only"])
