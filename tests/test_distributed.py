"""torchrun with the gloo backend on CPU: 2 processes train exactly what 1 process trains with the same global batch
(per-device batch x processes x accumulation), and rank 0 alone writes logs and checkpoints (utils_dist.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_slsd_seq
from test_train import TASKS, data_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def args(model_dir, data, root, *extra) -> list[str]:
    return ["--model_name", str(model_dir), "--data_dir", str(data), "--tasks", ",".join(TASKS),
            "--max_steps_per_task", "2", "--per_device_batch_size", "2", "--lora_dropout", "0",
            "--log_dir", str(root / "logs"), "--save_dir", str(root / "ckpt"), "--run_metrics", "false",
            "--probe_size_per_task", "6", "--kd_interval", "1", "--kd_batch_size", "2", "--num_frozen_layers", "2",
            "--eval_max_samples", "4", "--device", "cpu", "--eval_fast_modes", "current",
            "--final_fast_modes", "own_task", "--router_layer", "1", "--router_rows_per_task", "2", *extra]


def tensors(ckpt_root: Path) -> dict:
    out = {}
    for f in sorted(ckpt_root.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.relative_to(ckpt_root)}:{k}"] = v
    return out


def train_rows(root: Path) -> list[dict]:
    rows = []
    for t in TASKS:
        rows += [json.loads(line) for line in (root / "logs" / f"seq_{t}_train_loss.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, data_dir):  # noqa: F811
    one = tmp_path / "one"
    train_slsd_seq.main(args(tiny_model_dir, data_dir, one, "--gradient_accumulation_steps", "2"))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(ROOT / "train_slsd_seq.py"),
                           *args(tiny_model_dir, data_dir, two, "--gradient_accumulation_steps", "1")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = tensors(one / "ckpt"), tensors(two / "ckpt")
    assert a.keys() == b.keys() and len(a) >= 4  # stage 1 and 2: slow, fast (and the bank), the router
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
    moved = [k for k in a if "lora_B" in k and float(a[k].abs().max()) > 0]
    assert moved, "the adapters did not train, so the comparison would be empty"

    ra, rb = train_rows(one), train_rows(two)
    assert len(ra) == len(rb) == 4  # 2 steps x 2 tasks, written once (by rank 0 only)
    for x, y in zip(ra, rb):
        assert (x["stage"], x["step"]) == (y["stage"], y["step"])
        assert y["loss"] == pytest.approx(x["loss"], abs=2e-5)  # the mean over both ranks' micro-batches
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        if "kd_loss" in x:
            assert y["kd_loss"] == pytest.approx(x["kd_loss"], abs=1e-5)
    ea = [json.loads(line) for line in (one / "logs" / "seq_eval_loss.jsonl").read_text().splitlines()]
    eb = [json.loads(line) for line in (two / "logs" / "seq_eval_loss.jsonl").read_text().splitlines()]
    assert len(ea) == len(eb) > 0  # rank 0 alone evaluated: no duplicated rows
    for x, y in zip(ea, eb):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)


def baseline_rows(root: Path, method: str) -> list[dict]:
    rows = []
    for t in TASKS:
        p = root / "logs" / f"seq_{method}_{t}_train_loss.jsonl"
        rows += [json.loads(line) for line in p.read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("method", ["replay", "ewc"])
def test_two_gloo_processes_equal_one_process_for_the_baselines(method, tmp_path, tiny_model_dir, data_dir):  # noqa: F811
    """Replay draws every rank's replayed rows and keeps its own share; EWC's Fisher pass is the same on each rank."""
    import train_seq_baselines
    extra = ["--method", method, "--replay_buffer_size", "4", "--ewc_fisher_batches", "2"]
    one = tmp_path / "one"
    train_seq_baselines.main(args(tiny_model_dir, data_dir, one, "--gradient_accumulation_steps", "2", *extra))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train_seq_baselines.py"),
                           *args(tiny_model_dir, data_dir, two, "--gradient_accumulation_steps", "1", *extra)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = tensors(one / "ckpt"), tensors(two / "ckpt")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
    ra, rb = baseline_rows(one, method), baseline_rows(two, method)
    assert len(ra) == len(rb) == 4
    for x, y in zip(ra, rb):
        assert y["loss"] == pytest.approx(x["loss"], abs=2e-5)
        for key in ("replay_loss", "ewc_penalty"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7), key
    assert any(x.get("replay_loss") or x.get("ewc_penalty") for x in ra)  # the method's own term was active
