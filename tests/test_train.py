"""The training scripts end to end on a tiny random LLaMA, and the pieces they share (SLSD, EWC, replay, NaN guards,
resume). Whole-script runs use 2 tasks x 2 steps and are built once per module; everything runs on CPU."""
import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import train_seq_baselines
import utils_replay
import train_single_task
import train_slsd_seq
from configs.base_config import ConfigError, make_config
from conftest import make_tiny_llama
from models.ds_lora import (adapter_branch, ds_lora_state_dict, get_ds_lora_param_groups, replace_with_ds_lora,
                            start_new_task)
from models.lora_simple import get_adapter_snapshot, lora_state_dict, replace_with_lora
from train_seq_baselines import EWC, Replay
from train_slsd_seq import add_kd_grads, build_probe_buffer, entropy_stats, kd_loss
from utils_data import IGNORE_INDEX, InstructionDataset, collate_fn, read_jsonl
from utils_results import write_results_md
from utils_train import (accumulate_grads, apply_step, eval_loss, load_eval_sets, make_loader, make_optimizer,
                         make_scheduler, mean_token_loss, run_stage_eval, steps_per_stage, supervised_logits)

TASKS = ("T1_general", "T2_math")
TARGETS = ["q_proj", "v_proj"]
CPU = torch.device("cpu")
KEYS = ("method", "stage", "task", "step", "split")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core box spinning threads make them ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- toy data and smoke runs
def toy_rows(task: str, n: int, split: str) -> list[dict]:
    """Short rows of varied length (so batches pad and samples differ in supervised-token count)."""
    rows = []
    for i in range(n):
        if task == "T1_general":
            row = {"instruction": f"What is the capital of France? ({split} {i})", "input": "",
                   "output": "Paris is the capital." + " Paris." * (i % 3)}
        else:
            row = {"instruction": "Solve the math problem.", "input": f"Natalia sold {4 * i + 8} clips in April.",
                   "output": f"She sold half as many in May. #### {6 * i + 12}" + " 72" * (i % 2)}
        rows.append({"id": f"{task}-{split}-{i}", **row})
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy_split")
    for task in TASKS:
        for split, n in (("train", 8), ("tiny", 8), ("val", 4), ("test", 4), ("toy", 4)):
            with open(d / f"{task}_{split}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in toy_rows(task, n, split))
    return d


def smoke_args(model_dir, data_dir, root, *extra) -> list[str]:
    return ["--model_name", str(model_dir), "--data_dir", str(data_dir), "--tasks", ",".join(TASKS),
            "--max_steps_per_task", "2", "--log_dir", str(root / "logs"), "--save_dir", str(root / "ckpt"),
            "--run_metrics", "false", "--per_device_batch_size", "4", "--probe_size_per_task", "6",
            "--kd_interval", "1", "--num_frozen_layers", "2", "--eval_max_samples", "4", "--device", "cpu",
            "--eval_fast_modes", "current", *extra]  # a later --eval_fast_modes in extra wins


def run_script(script, root: Path, model_dir, data_dir, *extra) -> Path:
    script.main(smoke_args(model_dir, data_dir, root, *extra))
    return root


@pytest.fixture(scope="module")
def slsd_run(tmp_path_factory, tiny_model_dir, data_dir):
    """ds_lora_slsd, evaluated in all three fast modes."""
    return run_script(train_slsd_seq, tmp_path_factory.mktemp("slsd"), tiny_model_dir, data_dir,
                      "--eval_fast_modes", "current,own_task,none", "--slsd_teacher", "full")


@pytest.fixture(scope="module")
def ds_lora_run(tmp_path_factory, tiny_model_dir, data_dir):
    return run_script(train_slsd_seq, tmp_path_factory.mktemp("ds_lora"), tiny_model_dir, data_dir,
                      "--use_slsd", "false")


@pytest.fixture(scope="module")
def baseline_runs(tmp_path_factory, tiny_model_dir, data_dir):
    """seq_lora, replay and ewc in one log/checkpoint folder (as in a real run of all baselines)."""
    root = tmp_path_factory.mktemp("baselines")
    for method in train_seq_baselines.METHODS:
        run_script(train_seq_baselines, root, tiny_model_dir, data_dir, "--method", method)
    return root


def rows_of(path, **match) -> list[dict]:
    return [r for r in read_jsonl(path) if all(r.get(k) == v for k, v in match.items())]


def snapshot_files(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def model_weight_bytes(model_dir) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def check_adapter_only_checkpoint(ckpt: Path, model_dir, expect_files: set):
    """Only adapter safetensors (every key naming a lora_ tensor) + config.json + done.json, tiny on disk."""
    assert {p.name for p in ckpt.iterdir()} == expect_files | {"config.json", "done.json"}
    n_keys = 0
    for f in ckpt.glob("adapter*.safetensors"):  # router.safetensors holds base-model features (tests/test_router.py)
        with safe_open(f, framework="pt") as st:
            keys = list(st.keys())
        assert keys and all("lora_" in k for k in keys), f"{f.name}: non-adapter keys {keys[:3]}"
        n_keys += len(keys)
    assert n_keys > 0
    size = sum(p.stat().st_size for p in ckpt.iterdir())
    assert size < model_weight_bytes(model_dir) / 4, f"{ckpt}: {size} bytes is not adapter-only"


def check_seq_eval_rows(path, method: str, modes, final_modes=()):
    """Stage 0 (base) to 2 x both tasks, exactly one finite positive loss per (stage, eval_task, fast_mode);
    `final_modes` are evaluated after the last stage only."""
    rows = rows_of(path, method=method)
    cells = [(r["stage"], r["eval_task"], r.get("fast_mode")) for r in rows]
    expected = [(s, t, m) for s in (0, 1, 2) for t in TASKS for m in modes]
    expected += [(2, t, m) for t in TASKS for m in final_modes if m not in modes]
    assert sorted(cells, key=str) == sorted(expected, key=str)
    assert all(set(KEYS) <= r.keys() and math.isfinite(r["loss"]) and r["loss"] > 0 and r["n"] == 4 for r in rows)
    assert {r["stage_task"] for r in rows if r["stage"] == 0} == {"base"}
    assert {(r["stage"], r["stage_task"]) for r in rows if r["stage"] > 0} == {(1, TASKS[0]), (2, TASKS[1])}


# ----------------------------------------------------------------------------- 1. log rows and checkpoints
def test_slsd_run_logs_two_train_rows_per_task_with_kd_loss_a_probe_row_and_a_probe_kl_row(slsd_run):
    for stage, task in enumerate(TASKS, 1):
        rows = read_jsonl(slsd_run / "logs" / f"seq_{task}_train_loss.jsonl")
        assert all(set(KEYS) <= r.keys() and r["method"] == "ds_lora_slsd" and r["stage"] == stage for r in rows)
        assert [r["split"] for r in rows] == ["probe", "train", "train", "probe_kl"]
        train = [r for r in rows if r["split"] == "train"]
        assert [r["stage_step"] for r in train] == [1, 2]
        assert [r["step"] for r in train] == [2 * stage - 1, 2 * stage]  # global step runs on across stages
        assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
        assert all(math.isfinite(r["kd_loss"]) and r["kd_loss"] >= 0 and r["kd_grad_norm"] >= 0
                   for r in train)  # kd_interval 1: a KD term at every step
        probe, kl = rows[0], rows[-1]
        # 6 scored, keep_fraction 0.25 keeps ceil(1.5) = 2 < kd_batch_size 4: the 4 lowest-entropy rows
        assert (probe["n_scored"], probe["n_kept"], probe["fallback"], probe["task"]) == (6, 4, True, task)
        quantiles = [probe[k] for k in ("entropy_min", "entropy_q10", "entropy_q25", "entropy_q50", "entropy_q75",
                                        "entropy_q90", "entropy_max")]
        assert quantiles == sorted(quantiles) and quantiles[0] < quantiles[-1]
        assert quantiles[0] <= probe["entropy_kept_max"] <= quantiles[-1]
        assert kl["kl_start"] == probe["kl_start"] and kl["n_probes"] == 4 and kl["teacher"] == "full"
        assert math.isfinite(kl["kl_end"]) and kl["kl_end"] >= 0
    assert train[-1]["kd_loss"] > 0  # stage 2: the student has left its teacher


def test_slsd_run_evaluates_stages_0_to_2_in_every_requested_fast_mode(slsd_run):
    check_seq_eval_rows(slsd_run / "logs" / "seq_eval_loss.jsonl", "ds_lora_slsd", ("current", "own_task", "none"), ("routed",))


def test_ds_lora_run_logs_no_kd_and_no_probe_and_evaluates_current_mode(ds_lora_run):
    for stage, task in enumerate(TASKS, 1):
        rows = read_jsonl(ds_lora_run / "logs" / f"seq_{task}_train_loss.jsonl")
        assert [(r["method"], r["stage"], r["split"], r["stage_step"]) for r in rows] == \
            [("ds_lora", stage, "train", 1), ("ds_lora", stage, "train", 2)]
        assert not any("kd_loss" in r for r in rows)
    # final_fast_modes (default own_task, none, routed) adds those views after the last stage only
    check_seq_eval_rows(ds_lora_run / "logs" / "seq_eval_loss.jsonl", "ds_lora", ("current",), ("own_task", "none", "routed"))


@pytest.mark.parametrize("run", ["slsd_run", "ds_lora_run"])
def test_ds_checkpoints_are_adapter_only(request, run, tiny_model_dir):
    root = request.getfixturevalue(run)
    method = "ds_lora_slsd" if run == "slsd_run" else "ds_lora"
    for stage, task in enumerate(TASKS, 1):
        ckpt = root / "ckpt" / method / f"seq_{stage}_{task}"
        check_adapter_only_checkpoint(ckpt, tiny_model_dir, {"adapter_slow.safetensors", "adapter_fast.safetensors",
                                                             "router.safetensors"})
        assert json.loads((ckpt / "done.json").read_text())["step"] == 2 * stage
    with safe_open(root / "ckpt" / method / f"seq_2_{TASKS[1]}" / "adapter_fast.safetensors", "pt") as st:
        assert any(f"lora_fast_bank_{TASKS[0]}_A" in k for k in st.keys())  # stage 1's fast weights are kept


@pytest.mark.parametrize("method", train_seq_baselines.METHODS)
def test_baseline_run_logs_train_and_eval_rows(baseline_runs, method):
    for stage, task in enumerate(TASKS, 1):
        rows = read_jsonl(baseline_runs / "logs" / f"seq_{method}_{task}_train_loss.jsonl")
        assert all(set(KEYS) <= r.keys() and r["method"] == method and r["stage"] == stage for r in rows)
        train = [r for r in rows if r["split"] == "train"]
        assert [r["stage_step"] for r in train] == [1, 2]
        assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
        if method == "ewc":
            assert [r["split"] for r in rows] == ["train", "train", "fisher"]
            assert rows[-1]["fisher_batches"] == 2 and rows[-1]["fisher_mean"] > 0
            assert train[0]["ewc_penalty"] == 0.0  # at the anchor (stage 2) or no anchor yet (stage 1)
            if stage == 2:
                assert train[1]["ewc_penalty"] > 0  # moved away from theta*_1: the penalty is not silently 0
        elif method == "inscl":  # the buffer's choices are logged at the start of every stage
            assert [r["split"] for r in rows] == ["inscl", "train", "train"]
        else:
            assert [r["split"] for r in rows] == ["train", "train"]
        if method in ("replay", "inscl"):  # replay rows exist only once a task has been seen
            assert all(("replay_loss" in r) == (stage == 2) for r in train)
    check_seq_eval_rows(baseline_runs / "logs" / "seq_eval_loss.jsonl", method, (None,))



def test_base_stage_is_computed_once_per_log_folder_and_equals_a_fresh_computation(baseline_runs, slsd_run):
    logs = baseline_runs / "logs"
    cache = json.loads((logs / "base_stage_cache.json").read_text())
    assert [e["method"] for e in cache.values()] == ["seq_lora"]  # computed by the first method only
    base = {m: {r["eval_task"]: r["loss"] for r in rows_of(logs / "seq_eval_loss.jsonl", method=m, stage=0)}
            for m in train_seq_baselines.METHODS}
    assert len(base["seq_lora"]) == len(TASKS) and base["replay"] == base["ewc"] == base["seq_lora"]
    # DS-LoRA computed its base row afresh in its own folder (one row per fast mode): the same numbers
    fresh = rows_of(slsd_run / "logs" / "seq_eval_loss.jsonl", stage=0)
    assert len(fresh) == 3 * len(TASKS)
    assert all(r["loss"] == base["seq_lora"][r["eval_task"]] for r in fresh)



def test_run_name_keeps_a_rank_16_seq_lora_apart_from_the_rank_8_one(baseline_runs, tmp_path, tiny_model_dir,
                                                                     data_dir):
    root = tmp_path / "run"
    shutil.copytree(baseline_runs, root)
    before = {p: p.read_bytes() for p in (root / "ckpt" / "seq_lora").rglob("*") if p.is_file()}
    before |= {p: p.read_bytes() for p in (root / "logs").glob("seq_seq_lora_*_train_loss.jsonl")}
    run_script(train_seq_baselines, root, tiny_model_dir, data_dir, "--method", "seq_lora", "--lora_r", "16",
               "--lora_alpha", "32", "--run_name", "seq_lora_r16")
    assert all(p.read_bytes() == b for p, b in before.items())  # the r=8 run is untouched
    with safe_open(root / "ckpt" / "seq_lora_r16" / f"seq_2_{TASKS[1]}" / "adapter.safetensors", "pt") as st:
        assert {st.get_tensor(k).shape[0] for k in st.keys() if k.endswith("lora_A")} == {16}
    for task in TASKS:
        rows = read_jsonl(root / "logs" / f"seq_seq_lora_r16_{task}_train_loss.jsonl")
        assert {r["method"] for r in rows} == {"seq_lora_r16"}
    check_seq_eval_rows(root / "logs" / "seq_eval_loss.jsonl", "seq_lora_r16", (None,))
    check_seq_eval_rows(root / "logs" / "seq_eval_loss.jsonl", "seq_lora", (None,))  # still once each
    assert json.loads((root / "logs" / "config_seq_lora_r16.json").read_text())["lora_r"] == 16
    table = write_results_md(root / "logs", TASKS)
    assert "seq_lora_r16" in table and table.index("| seq_lora |") < table.index("| seq_lora_r16 |")


@pytest.mark.parametrize("name, words", [("replay", "another method"), ("r16 run", "letters, digits"),
                                         ("single", "letters, digits")])
def test_run_name_that_would_mix_with_other_rows_is_refused(name, words, tmp_path, tiny_model_dir, data_dir):
    with pytest.raises(SystemExit, match=words):
        run_script(train_seq_baselines, tmp_path, tiny_model_dir, data_dir, "--method", "seq_lora",
                   "--run_name", name)
    assert not (tmp_path / "ckpt").exists()


def test_capped_eval_rows_follow_eval_seed_not_the_training_seed(data_dir, tiny_tokenizer):
    def ids(**kw):
        cfg = make_config(data_dir=str(data_dir), tasks=TASKS, eval_split="train", eval_max_samples=3, **kw)
        return {t: ds.ids for t, ds in load_eval_sets(cfg, tiny_tokenizer).items()}
    assert ids(seed=1) == ids(seed=2)  # every training seed is scored on the same rows
    assert all(len(v) == 3 for v in ids(seed=1).values())
    assert ids(eval_seed=1) != ids(eval_seed=2)

@pytest.mark.parametrize("method", train_seq_baselines.METHODS)
def test_baseline_checkpoints_are_adapter_only(baseline_runs, method, tiny_model_dir):
    for stage, task in enumerate(TASKS, 1):
        ckpt = baseline_runs / "ckpt" / method / f"seq_{stage}_{task}"
        extra = {"ewc_state.safetensors"} if method == "ewc" else set()
        check_adapter_only_checkpoint(ckpt, tiny_model_dir, {"adapter.safetensors"} | extra)
        if method == "ewc":  # Fisher and anchor of every past task, for the lora parameters only
            with safe_open(ckpt / "ewc_state.safetensors", "pt") as st:
                keys = list(st.keys())
            with safe_open(ckpt / "adapter.safetensors", "pt") as st:
                lora = list(st.keys())
            assert sorted(keys) == sorted(f"{kind}.{t}.{n}" for kind in ("fisher", "anchor")
                                          for t in range(stage) for n in lora)


def test_single_task_run_logs_train_and_eval_rows_and_saves_adapters(tmp_path, tiny_model_dir, data_dir):
    run_script(train_single_task, tmp_path, tiny_model_dir, data_dir, "--task", "T2_math")
    train = read_jsonl(tmp_path / "logs" / "single_T2_math_train_loss.jsonl")
    assert [(r["method"], r["stage"], r["task"], r["step"], r["split"]) for r in train] == \
        [("single", 1, "T2_math", s, "train") for s in (1, 2)]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    evals = read_jsonl(tmp_path / "logs" / "single_T2_math_eval_loss.jsonl")
    assert [r["step"] for r in evals] == [0, 1, 2]  # start, every quarter (here every step), end
    assert all(set(KEYS) <= r.keys() and r["n"] == 4 and r["loss"] > 0 for r in evals)
    check_adapter_only_checkpoint(tmp_path / "ckpt" / "single_task" / "T2_math", tiny_model_dir,
                                  {"adapter_slow.safetensors", "adapter_fast.safetensors"})


# ----------------------------------------------------------------------------- SLSD pieces on a tiny model
def slsd_cfg(data_dir, **kw):
    base = dict(data_dir=str(data_dir), tasks=TASKS, probe_size_per_task=6, eval_batch_size=4, kd_topk=8,
                kd_batch_size=3, probe_keep_fraction=1.0, lora_dropout=0.0, device="cpu",
                slsd_teacher="full")  # these tests were written for the full view; test_slsd.py covers slow
    return make_config(**(base | kw))


@torch.no_grad()
def randomize(model, which, seed, std=0.5):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if which in n:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def trained_ds_model(tok):
    """DS-LoRA after one task (banked) and into a second one, every adapter tensor nonzero."""
    model = make_tiny_llama(len(tok))
    replace_with_ds_lora(model, TARGETS, r=4, alpha=8, dropout=0.0, r_fast=2)
    start_new_task(model, "T1_general", seed=0)
    randomize(model, "lora_B", seed=1)
    start_new_task(model, "T2_math", seed=1)
    randomize(model, "lora_B_fast", seed=2)
    return model


@pytest.fixture
def probe_setup(tiny_tokenizer, data_dir):
    """(model, teacher snapshot, dataset, cfg): the student's slow branch has moved away from the teacher."""
    cfg = slsd_cfg(data_dir)
    model = trained_ds_model(tiny_tokenizer)
    teacher = get_adapter_snapshot(model)
    randomize(model, "lora_B_slow", seed=5)
    ds = InstructionDataset(cfg.task_path("T2_math", "train"), tiny_tokenizer, cfg)
    return model, teacher, ds, cfg


def n_supervised(ds, j) -> int:
    return int((ds[j]["labels"][1:] != IGNORE_INDEX).sum())


def test_probe_cache_is_keyed_by_sample_id_with_one_entry_per_supervised_position(probe_setup, tiny_tokenizer):
    model, teacher, ds, cfg = probe_setup
    probes = build_probe_buffer(model, teacher, ds, cfg, CPU, tiny_tokenizer.pad_token_id, seed=3)
    assert len(probes.idxs) == 6 and not probes.fallback and set(probes.cache) == {ds.ids[j] for j in probes.idxs}
    assert len({n_supervised(ds, j) for j in probes.idxs}) > 1  # varied lengths, so a misaligned cache shows
    for j in probes.idxs:
        vals, idx, log_z, log_tail = probes.cache[ds.ids[j]]
        assert vals.shape == idx.shape == (n_supervised(ds, j), cfg.kd_topk) and vals.dtype == torch.float32
        assert log_z.shape == log_tail.shape == (n_supervised(ds, j),) and bool((log_tail < 0).all())
        assert torch.all(vals[:, :-1] >= vals[:, 1:])  # top-k, sorted


def test_kd_loss_is_independent_of_probe_order(probe_setup, tiny_tokenizer):
    model, teacher, ds, cfg = probe_setup
    pad = tiny_tokenizer.pad_token_id
    probes = build_probe_buffer(model, teacher, ds, cfg, CPU, pad, seed=3)
    idxs = probes.idxs[:5]
    perm = [idxs[k] for k in (3, 0, 4, 2, 1)]
    with torch.no_grad():
        a, b = kd_loss(model, probes, idxs, cfg, CPU, pad), kd_loss(model, probes, perm, cfg, CPU, pad)
    assert a > 1e-3  # student != teacher, so the test has something to compare
    assert torch.allclose(a, b, atol=1e-6)


def test_kd_loss_is_zero_when_the_teacher_is_the_student(probe_setup, tiny_tokenizer):
    model, _, ds, cfg = probe_setup
    pad = tiny_tokenizer.pad_token_id
    probes = build_probe_buffer(model, get_adapter_snapshot(model), ds, cfg, CPU, pad, seed=3)
    with torch.no_grad():
        kd = kd_loss(model, probes, probes.idxs, cfg, CPU, pad)
    assert abs(float(kd)) < 1e-6


def test_kd_gradients_reach_the_slow_branch_only(probe_setup, tiny_tokenizer):
    """The script's KD term: add_kd_grads adds to slow .grad, leaves fast .grad None; the step moves slow only."""
    model, teacher, ds, cfg = probe_setup
    pad = tiny_tokenizer.pad_token_id
    model.train()
    probes = build_probe_buffer(model, teacher, ds, cfg, CPU, pad, seed=3)
    slow_group, fast_group = get_ds_lora_param_groups(model, 1e-2, 1e-2, weight_decay=0.1)
    slow_params, fast_params = slow_group["params"], fast_group["params"]
    opt_slow, opt_fast = make_optimizer([slow_group]), make_optimizer([fast_group])
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert any("lora_fast_bank_" in k for k in before)

    out = add_kd_grads(model, probes, probes.idxs[:cfg.kd_batch_size], slow_params, cfg, CPU, pad)
    assert out is not None and out["kd_loss"] > 0 and out["kd_grad_norm"] > 0
    assert all(p.grad is None for p in fast_params)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in slow_params)
    grad_norm = apply_step(slow_params + fast_params, [opt_slow, opt_fast], [], cfg.max_grad_norm)
    assert grad_norm == pytest.approx(out["kd_grad_norm"], rel=1e-4)

    after = lora_state_dict(model)
    for k, v in before.items():
        if adapter_branch(k) == "fast":
            assert torch.equal(after[k], v), f"{k} changed in a KD step"
        else:
            assert not torch.equal(after[k], v), f"{k} did not move in a KD step"


def test_slsd_script_kd_terms_leave_fast_gradients_untouched(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """Inside train_slsd_seq.main, around every KD term: the fast gradients are bit-identical before and after
    (they stay the supervised ones), every slow gradient changes, and no weight moves until the one step."""
    real = train_slsd_seq.add_kd_grads
    checks = []

    def spy(model, probes, idxs, slow_params, *a, **kw):
        named = dict(model.named_parameters())
        fast = {n: p.grad.clone() for n, p in named.items() if adapter_branch(n) == "fast"}
        slow = [p.grad.clone() for p in slow_params]
        weights = {k: v.clone() for k, v in ds_lora_state_dict(model, "all").items()}
        out = real(model, probes, idxs, slow_params, *a, **kw)
        checks.append((out is not None, all(torch.equal(named[n].grad, g) for n, g in fast.items()),
                       all(not torch.equal(p.grad, g) for p, g in zip(slow_params, slow)),
                       all(torch.equal(v, weights[k]) for k, v in ds_lora_state_dict(model, "all").items())))
        return out

    monkeypatch.setattr(train_slsd_seq, "add_kd_grads", spy)
    run_script(train_slsd_seq, tmp_path, tiny_model_dir, data_dir)
    assert len(checks) == 4  # kd_interval 1: every step of both stages
    assert [c[:2] + c[3:] for c in checks] == [(True, True, True)] * 4
    # every slow gradient changes, except at the very first step, where the student is still its teacher
    assert [c[2] for c in checks[1:]] == [True] * 3


def test_probe_keep_fraction_keeps_the_lowest_entropy_quantile(probe_setup, tiny_tokenizer):
    model, teacher, ds, cfg = probe_setup
    pad = tiny_tokenizer.pad_token_id
    every = build_probe_buffer(model, teacher, ds, cfg, CPU, pad, seed=3)  # keep_fraction 1: all 6
    assert len(every.entropies) == 6 == every.n_scored and len(set(every.entropies.values())) == 6
    assert every.scored == sorted(every.entropies.values())
    ranked = sorted(every.entropies, key=every.entropies.get)

    half = build_probe_buffer(model, teacher, ds, slsd_cfg(cfg.data_dir, probe_keep_fraction=0.5, kd_batch_size=2),
                              CPU, pad, seed=3)  # 3 of 6, above the kd_batch_size floor
    assert not half.fallback and [ds.ids[j] for j in half.idxs] == ranked[:3] and set(half.cache) == set(ranked[:3])
    assert half.scored == every.scored  # the log sees every scored entropy, not only the kept ones
    assert max(half.entropies.values()) < min(every.entropies[s] for s in ranked[3:])

    floor = build_probe_buffer(model, teacher, ds, slsd_cfg(cfg.data_dir, probe_keep_fraction=0.1, kd_batch_size=4),
                               CPU, pad, seed=3)  # ceil(0.6) = 1 < kd_batch_size 4: the 4 lowest
    assert floor.fallback and [ds.ids[j] for j in floor.idxs] == ranked[:4]
    stats = entropy_stats(floor)
    assert stats["entropy_min"] == pytest.approx(every.entropies[ranked[0]])
    assert stats["entropy_max"] == pytest.approx(every.entropies[ranked[-1]])
    assert stats["entropy_kept_max"] == pytest.approx(every.entropies[ranked[3]])


# ----------------------------------------------------------------------------- 3. no second model copy
def test_probe_buffer_uses_the_teacher_weights_without_copying_the_model(probe_setup, tiny_tokenizer, monkeypatch):
    model, teacher, ds, cfg = probe_setup
    pad = tiny_tokenizer.pad_token_id
    live = {k: v.clone() for k, v in lora_state_dict(model).items()}
    n_tensors, n_numel = len(list(model.parameters())), sum(p.numel() for p in model.parameters())
    n_modules = len(list(model.modules()))
    created = []
    module_init = nn.Module.__init__

    def counting_init(self, *a, **kw):
        created.append(type(self).__name__)
        module_init(self, *a, **kw)

    def no_deepcopy(*a, **kw):
        raise AssertionError("build_probe_buffer deep-copied something")

    monkeypatch.setattr(nn.Module, "__init__", counting_init)
    monkeypatch.setattr(copy, "deepcopy", no_deepcopy)
    probes = build_probe_buffer(model, teacher, ds, cfg, CPU, pad, seed=3)
    monkeypatch.undo()

    assert set(created) <= {"ModuleList"}  # LlamaModel.forward slices self.layers: a view, no new tensors
    assert len(list(model.parameters())) == n_tensors and sum(p.numel() for p in model.parameters()) == n_numel
    assert len(list(model.modules())) == n_modules
    for k, v in lora_state_dict(model).items():  # the student's weights come back bit-identical
        assert torch.equal(v, live[k]), k

    # The cache equals the top-k of a separate model that holds the teacher's weights.
    teacher_model = make_tiny_llama(len(tiny_tokenizer))
    replace_with_ds_lora(teacher_model, TARGETS, r=4, alpha=8, dropout=0.0, r_fast=2)
    with torch.no_grad():
        for n, p in teacher_model.named_parameters():
            if "lora_" in n:
                p.copy_(teacher[n])
    batch = collate_fn([ds[j] for j in probes.idxs], pad)
    with torch.no_grad():
        full_t = teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full_s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    t_logits, s_logits = full_t[:, :-1][mask], full_s[:, :-1][mask]  # (N, V), row-major like the cache
    vals = torch.cat([probes.cache[ds.ids[j]][0] for j in probes.idxs])
    idx = torch.cat([probes.cache[ds.ids[j]][1] for j in probes.idxs])
    assert torch.allclose(vals, t_logits.topk(cfg.kd_topk, -1).values, atol=1e-5)
    assert torch.allclose(t_logits.gather(1, idx), vals, atol=1e-5)
    assert not torch.allclose(s_logits.gather(1, idx), vals, atol=1e-3)  # the student is not the teacher


# ----------------------------------------------------------------------------- 4. EWC
def lora_model(tok, perturb_b=True):
    model = make_tiny_llama(len(tok))
    replace_with_lora(model, TARGETS, r=4, alpha=8, dropout=0.0)
    if perturb_b:
        randomize(model, "lora_B", seed=1)  # with B = 0 the gradient of A is 0
    return model


def ewc_setup(tok, data_dir, perturb_b=True):
    cfg = make_config(data_dir=str(data_dir), tasks=TASKS, per_device_batch_size=1, ewc_fisher_batches=100,
                      ewc_lambda=10.0, lora_dropout=0.0, device="cpu")
    model = lora_model(tok, perturb_b)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ds = InstructionDataset(cfg.task_path("T1_general", "val"), tok, cfg)
    return model, EWC(params, cfg), ds, cfg


def test_ewc_fisher_is_the_mean_squared_gradient_nonnegative_and_nonzero(tiny_tokenizer, data_dir):
    model, ewc, ds, cfg = ewc_setup(tiny_tokenizer, data_dir)
    info = ewc.end_of_task(model, ds, CPU, tiny_tokenizer.pad_token_id, seed=0)
    assert info["fisher_batches"] == len(ds) == 4  # divided by the true count, not ewc_fisher_batches
    assert all(p.grad is None for p in ewc.params.values())  # the Fisher pass leaves no gradients behind
    (fisher,) = ewc.fishers
    assert set(fisher) == set(ewc.params) and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in fisher)
    assert all(bool((f >= 0).all()) for f in fisher.values())
    assert sum(float(f.sum()) for n, f in fisher.items() if "lora_A" in n) > 0
    assert sum(float(f.sum()) for n, f in fisher.items() if "lora_B" in n) > 0
    expected = {n: torch.zeros_like(p) for n, p in ewc.params.items()}  # batch size 1: order does not matter
    for j in range(len(ds)):
        model.zero_grad(set_to_none=True)
        mean_token_loss(model, collate_fn([ds[j]], tiny_tokenizer.pad_token_id))[0].backward()
        for n, p in ewc.params.items():
            expected[n] += p.grad ** 2 / len(ds)
    for n in fisher:
        assert torch.allclose(fisher[n], expected[n], rtol=1e-4, atol=1e-12), n


def test_ewc_fisher_of_lora_a_is_zero_while_b_is_zero(tiny_tokenizer, data_dir):
    """Why the Fisher must be estimated after training: at init (B = 0) it says nothing about A."""
    model, ewc, ds, cfg = ewc_setup(tiny_tokenizer, data_dir, perturb_b=False)
    ewc.end_of_task(model, ds, CPU, tiny_tokenizer.pad_token_id, seed=0)
    assert all(float(f.abs().sum()) == 0 for n, f in ewc.fishers[0].items() if "lora_A" in n)


def test_ewc_penalty_is_zero_at_the_anchor_positive_after_a_move_and_sums_over_tasks(tiny_tokenizer, data_dir):
    model, ewc, ds, cfg = ewc_setup(tiny_tokenizer, data_dir)
    pad = tiny_tokenizer.pad_token_id
    assert float(ewc.penalty()) == 0.0  # no past task yet
    ewc.end_of_task(model, ds, CPU, pad, seed=0)
    assert float(ewc.penalty().detach()) == 0.0  # exactly at theta*
    name = next(n for n in ewc.params if "lora_B" in n)
    with torch.no_grad():
        ewc.params[name].add_(0.1)
    p1 = ewc.penalty()
    assert float(p1.detach()) == pytest.approx(0.5 * cfg.ewc_lambda * float((ewc.fishers[0][name] * 0.01).sum()),
                                               rel=1e-4)
    assert float(p1.detach()) > 0
    p1.backward()  # the penalty is differentiable and reaches the moved parameter
    assert float(ewc.params[name].grad.abs().sum()) > 0
    model.zero_grad(set_to_none=True)

    ewc.end_of_task(model, ds, CPU, pad, seed=1)  # task 2: new anchor at the moved weights
    assert len(ewc.fishers) == len(ewc.anchors) == 2
    with torch.no_grad():
        ewc.params[name].add_(0.1)
    with torch.no_grad():
        by_task = [0.5 * cfg.ewc_lambda * float(sum((f[n] * (p - a[n]) ** 2).sum() for n, p in ewc.params.items()))
                   for f, a in zip(ewc.fishers, ewc.anchors)]
    assert all(v > 0 for v in by_task)
    assert float(ewc.penalty().detach()) == pytest.approx(sum(by_task), rel=1e-5)

    restored = EWC(ewc.params, cfg)  # what a resumed run loads from ewc_state.safetensors
    restored.load_state(ewc.state(), CPU)
    assert float(restored.penalty().detach()) == pytest.approx(float(ewc.penalty().detach()), rel=1e-6)


# ----------------------------------------------------------------------------- 5. replay
def replay_cfg(data_dir, **kw):
    return make_config(**(dict(data_dir=str(data_dir), tasks=TASKS, replay_buffer_size=6, per_device_batch_size=4,
                               device="cpu") | kw))


def test_replay_buffer_is_split_evenly_over_past_tasks_and_seeded(tiny_tokenizer, data_dir):
    cfg, pad = replay_cfg(data_dir), tiny_tokenizer.pad_token_id
    replay = Replay(cfg, tiny_tokenizer, pad)
    replay.end_of_task([TASKS[0]])
    assert replay.per_task == {TASKS[0]: 6} and len(replay.items) == 6
    replay.end_of_task(list(TASKS))
    assert replay.per_task == {TASKS[0]: 3, TASKS[1]: 3} and len(replay.items) == 6
    sources = {t: InstructionDataset(cfg.task_path(t, cfg.train_split), tiny_tokenizer, cfg) for t in TASKS}
    for task, items in zip(TASKS, (replay.items[:3], replay.items[3:])):
        pool = [sources[task][j]["input_ids"].tolist() for j in range(len(sources[task]))]
        assert all(it["input_ids"].tolist() in pool for it in items)
        assert len({tuple(it["input_ids"].tolist()) for it in items}) == 3  # drawn without replacement
    again = Replay(cfg, tiny_tokenizer, pad)
    again.end_of_task(list(TASKS))
    assert [it["input_ids"].tolist() for it in again.items] == [it["input_ids"].tolist() for it in replay.items]
    other = Replay(replay_cfg(data_dir, seed=7), tiny_tokenizer, pad)
    other.end_of_task(list(TASKS))
    assert [it["input_ids"].tolist() for it in other.items] != [it["input_ids"].tolist() for it in replay.items]


def test_replay_batch_rows_come_from_the_buffer_and_the_loss_mixes_both(tiny_tokenizer, data_dir, monkeypatch):
    cfg, pad = replay_cfg(data_dir, replay_lambda=0.5), tiny_tokenizer.pad_token_id
    seen = []

    def fake_token_losses(model, batch):  # one loss per token: 1 on current rows, 3 on replay rows
        seen.append(batch)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        row = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask]
        return torch.where(row >= 4, 3.0, 1.0), row

    monkeypatch.setattr(utils_replay, "token_losses", fake_token_losses)
    cur_ds = InstructionDataset(cfg.task_path(TASKS[1], "train"), tiny_tokenizer, cfg)
    cur = collate_fn([cur_ds[j] for j in range(4)], pad)

    def draws(seed_cfg):
        replay = Replay(seed_cfg, tiny_tokenizer, pad)
        replay.end_of_task([TASKS[0]])
        buffer = [it["input_ids"].tolist() for it in replay.items]
        out = []
        for _ in range(3):
            loss, extra = replay.loss_fn(None, cur)
            assert float(loss) == pytest.approx(1.0 + 0.5 * 3.0) and float(extra["replay_loss"]) == 3.0
            both = seen[-1]
            assert both["input_ids"].shape[0] == 4 + 2  # half a batch of replay rows
            assert torch.equal(both["input_ids"][:4, :cur["input_ids"].shape[1]], cur["input_ids"])
            lengths = both["attention_mask"].sum(1).tolist()
            rep = [both["input_ids"][i, :lengths[i]].tolist() for i in range(4, 6)]
            assert all(r in buffer for r in rep)
            out.append(rep)
        return out

    first = draws(cfg)
    assert draws(cfg) == first  # the same replay batches for the same seed
    assert len({tuple(map(tuple, d)) for d in first}) > 1  # but not the same batch every step


def test_replay_mode_mix_leaves_half_the_batch_to_replayed_rows_from_stage_2_and_append_adds_them(tiny_tokenizer,
                                                                                                  data_dir):
    for mode, b, want in (("append", 4, (4, 4, 4)), ("mix", 4, (4, 2, 2)), ("mix", 5, (5, 3, 3)), ("mix", 2, (2, 1, 1))):
        replay = Replay(replay_cfg(data_dir, replay_mode=mode, per_device_batch_size=b), tiny_tokenizer, 0)
        assert tuple(replay.current_rows(stage) for stage in (1, 2, 5)) == want, (mode, b)
        assert replay.replay_rows() == max(1, b // 2)  # current + replayed = the batch (mix) or 1.5x it (append)
    cfg = replay_cfg(data_dir, max_steps_per_task=0)
    assert (steps_per_stage(cfg, 8), steps_per_stage(cfg, 8, 2), steps_per_stage(cfg, 9, 2)) == (2, 4, 5)
    with pytest.raises(ConfigError, match="replay_mode must be append or mix"):
        replay_cfg(data_dir, replay_mode="swap")
    with pytest.raises(ConfigError, match="replay_mode mix needs per_device_batch_size >= 2"):
        replay_cfg(data_dir, replay_mode="mix", per_device_batch_size=1)


@pytest.mark.parametrize("method", ["replay", "inscl", "ilora"])
def test_replay_mix_run_trains_on_a_seq_lora_batch_logs_apart_and_refuses_non_replay_methods(
        method, tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """--method M --replay_mode mix: every forward has per_device_batch_size rows (4 current in stage 1; 2 current
    + 2 replayed in stage 2), the full grid is logged under M_mix, and seq_lora refuses the mode."""
    shapes, real = [], utils_replay.token_losses

    def spy(model, batch):
        shapes.append(int(batch["input_ids"].shape[0]))
        return real(model, batch)

    monkeypatch.setattr(utils_replay, "token_losses", spy)
    root = run_script(train_seq_baselines, tmp_path, tiny_model_dir, data_dir, "--method", method,
                      "--replay_mode", "mix", "--replay_buffer_size", "4", "--inscl_embed_rows", "4")
    assert shapes == [4, 4]  # stage 2's two steps (stage 1 replays nothing: plain loss, not this function)
    check_seq_eval_rows(root / "logs" / "seq_eval_loss.jsonl", f"{method}_mix", (None,))
    assert not rows_of(root / "logs" / "seq_eval_loss.jsonl", method=method)
    train = [r for t in TASKS for r in read_jsonl(root / "logs" / f"seq_{method}_mix_{t}_train_loss.jsonl")
             if r["split"] == "train"]
    assert [(r["stage"], "replay_loss" in r) for r in train] == [(1, False), (1, False), (2, True), (2, True)]
    assert (root / "ckpt" / f"{method}_mix" / f"seq_2_{TASKS[1]}" / "adapter.safetensors").exists()
    if method != "replay":
        return
    with pytest.raises(SystemExit, match="replay_mode mix applies to the replay methods"):
        run_script(train_seq_baselines, tmp_path / "b", tiny_model_dir, data_dir, "--method", "seq_lora",
                   "--replay_mode", "mix")


# ----------------------------------------------------------------------------- 6. NaN and empty guards
def test_accumulate_grads_skips_nan_loss_without_backward(tiny_tokenizer, data_dir):
    model = lora_model(tiny_tokenizer)
    cfg = make_config(data_dir=str(data_dir), gradient_accumulation_steps=2, device="cpu")
    ds = InstructionDataset(cfg.task_path("T1_general", "val"), tiny_tokenizer, cfg)
    batches = iter(make_loader(ds, 2, tiny_tokenizer.pad_token_id))
    nan_loss = lambda m, b: (mean_token_loss(m, b)[0] * float("nan"), {})  # noqa: E731
    st = accumulate_grads(model, batches, cfg, CPU, nan_loss)
    assert (st["skipped_nan"], st["skipped_empty"], st["micro"]) == (2, 0, 0)
    assert all(p.grad is None for p in model.parameters())


def test_accumulate_grads_counts_an_all_ignored_batch_as_empty(tiny_tokenizer, data_dir):
    model = lora_model(tiny_tokenizer)
    cfg = make_config(data_dir=str(data_dir), gradient_accumulation_steps=2, device="cpu")
    ds = InstructionDataset(cfg.task_path("T1_general", "val"), tiny_tokenizer, cfg)
    good = collate_fn([ds[0], ds[1]], tiny_tokenizer.pad_token_id)
    empty = {**good, "labels": torch.full_like(good["labels"], IGNORE_INDEX)}
    st = accumulate_grads(model, iter([empty, good]), cfg, CPU)
    assert (st["skipped_nan"], st["skipped_empty"], st["micro"]) == (0, 1, 1)
    with torch.no_grad():
        assert st["loss"] == pytest.approx(float(mean_token_loss(model, good)[0]), rel=1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_apply_step_with_a_nan_grad_skips_the_step_and_zeroes_grads():
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = make_optimizer([{"params": [p, q], "lr": 0.1, "weight_decay": 0.0}])
    sched = make_scheduler(opt, total_steps=10, warmup_ratio=0.0)
    p.grad, q.grad = torch.tensor([1.0, float("nan"), 1.0]), torch.ones(2)
    assert apply_step([p, q], [opt], [sched], max_grad_norm=1.0) is None
    assert torch.equal(p.detach(), torch.ones(3)) and torch.equal(q.detach(), torch.ones(2))
    assert p.grad is None and q.grad is None and sched.last_epoch == 0 and not opt.state
    p.grad, q.grad = torch.full((3,), 2.0), torch.zeros(2)  # the finite case does step
    assert apply_step([p, q], [opt], [sched], max_grad_norm=1.0) == pytest.approx(math.sqrt(12))
    assert not torch.equal(p.detach(), torch.ones(3)) and sched.last_epoch == 1 and p.grad is None


def test_empty_eval_set_reports_no_loss_and_writes_no_row(tiny_tokenizer, data_dir, tmp_path):
    model = lora_model(tiny_tokenizer)
    cfg = make_config(data_dir=str(data_dir), tasks=TASKS, log_dir=str(tmp_path), device="cpu")
    pad = tiny_tokenizer.pad_token_id
    empty = InstructionDataset("nowhere.jsonl", tiny_tokenizer, cfg, rows=[])
    full = InstructionDataset(cfg.task_path(TASKS[1], "val"), tiny_tokenizer, cfg)
    assert eval_loss(model, empty, cfg, pad, CPU) == (None, 0)
    rows = run_stage_eval(model, tiny_tokenizer, cfg, "seq_lora", 1, TASKS[0], 2, CPU,
                          {TASKS[0]: empty, TASKS[1]: full})
    written = read_jsonl(tmp_path / "seq_eval_loss.jsonl")
    assert written == rows and [r["eval_task"] for r in rows] == [TASKS[1]] and rows[0]["loss"] > 0


# ----------------------------------------------------------------------------- 7. resume
def stage_rows(path, stage):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_jsonl(path) if r["stage"] == stage]


@pytest.mark.parametrize("method", ["ds_lora_slsd", "ewc"])
def test_resume_skips_finished_stages_and_writes_each_row_once(request, method, tmp_path, tiny_model_dir, data_dir,
                                                               capsys):
    if method == "ds_lora_slsd":
        full_run, script, extra = request.getfixturevalue("slsd_run"), train_slsd_seq, ["--eval_fast_modes",
                                                                                      "current,own_task,none",
                                                                                      "--slsd_teacher", "full"]
        logs = {t: f"seq_{t}_train_loss.jsonl" for t in TASKS}
        modes, final = ("current", "own_task", "none"), ("routed",)
    else:
        full_run, script, extra = request.getfixturevalue("baseline_runs"), train_seq_baselines, ["--method", "ewc"]
        logs = {t: f"seq_ewc_{t}_train_loss.jsonl" for t in TASKS}
        modes, final = (None,), ()
    root = tmp_path / "run"
    shutil.copytree(full_run, root)  # a finished run whose stage 2 then "crashed" before done.json
    (root / "ckpt" / method / f"seq_2_{TASKS[1]}" / "done.json").unlink()
    stage1_before = read_jsonl(root / "logs" / logs[TASKS[0]])
    capsys.readouterr()

    run_script(script, root, tiny_model_dir, data_dir, *extra)
    out = capsys.readouterr().out
    assert "resuming after stage 1" in out and "stage 1/2" not in out and "stage 2/2" in out
    assert read_jsonl(root / "logs" / logs[TASKS[0]]) == stage1_before  # stage 1 not retrained, not rewritten
    assert stage_rows(root / "logs" / logs[TASKS[1]], 2) == stage_rows(full_run / "logs" / logs[TASKS[1]], 2)
    check_seq_eval_rows(root / "logs" / "seq_eval_loss.jsonl", method, modes, final)  # each cell exactly once
    resumed = rows_of(root / "logs" / "seq_eval_loss.jsonl", method=method, stage=2)
    original = rows_of(full_run / "logs" / "seq_eval_loss.jsonl", method=method, stage=2)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in original], abs=1e-5)
    if method == "ewc":  # the Fisher state of stage 1 was reloaded: the stage-2 penalty is not silently 0
        assert [r["ewc_penalty"] > 0 for r in stage_rows(root / "logs" / logs[TASKS[1]], 2)
                if r["split"] == "train"] == [False, True]

    before = snapshot_files(root)
    run_script(script, root, tiny_model_dir, data_dir, *extra)
    assert "all 2 stages are done" in capsys.readouterr().out
    assert snapshot_files(root) == before


def test_resume_with_a_changed_training_key_refuses_and_restart_trains_afresh(slsd_run, tmp_path, tiny_model_dir,
                                                                           data_dir, capsys):
    root = tmp_path / "run"
    shutil.copytree(slsd_run, root)
    (root / "ckpt" / "ds_lora_slsd" / f"seq_2_{TASKS[1]}" / "done.json").unlink()
    logs_before = {p.name: p.read_bytes() for p in (root / "logs").glob("*.jsonl")}
    with pytest.raises(SystemExit, match="lr_fast"):
        run_script(train_slsd_seq, root, tiny_model_dir, data_dir, "--lr_fast", "5e-4")
    assert {p.name: p.read_bytes() for p in (root / "logs").glob("*.jsonl")} == logs_before

    capsys.readouterr()
    run_script(train_slsd_seq, root, tiny_model_dir, data_dir, "--lr_fast", "5e-4", "--restart")
    assert "stage 1/2" in capsys.readouterr().out
    for stage, task in enumerate(TASKS, 1):
        rows = read_jsonl(root / "logs" / f"seq_{task}_train_loss.jsonl")
        assert [r["stage_step"] for r in rows if r["split"] == "train"] == [1, 2]
        assert json.loads((root / "ckpt" / "ds_lora_slsd" / f"seq_{stage}_{task}" / "config.json").read_text())[
            "lr_fast"] == 5e-4
    check_seq_eval_rows(root / "logs" / "seq_eval_loss.jsonl", "ds_lora_slsd", ("current",), ("own_task", "none", "routed"))


# ----------------------------------------------------------------------------- 8. supervised_logits
def test_supervised_logits_equal_full_model_logits_at_supervised_positions(tiny_tokenizer, data_dir):
    cfg = make_config(data_dir=str(data_dir), device="cpu")
    model = trained_ds_model(tiny_tokenizer)
    ds = InstructionDataset(cfg.task_path("T2_math", "val"), tiny_tokenizer, cfg)
    batch = collate_fn([ds[j] for j in range(len(ds))], tiny_tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # padded rows are part of the check
    with torch.no_grad():
        logits, targets, row = supervised_logits(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    assert logits.shape == (int(mask.sum()), full.shape[-1])
    assert torch.allclose(logits, full[:, :-1][mask], atol=1e-5)
    assert torch.equal(targets, batch["labels"][:, 1:][mask])
    assert row.tolist() == sorted(row.tolist()) and torch.equal(torch.bincount(row), mask.sum(1))


def test_bench_metrics_false_keeps_only_the_drift_probes(monkeypatch):
    import utils_train
    monkeypatch.setattr(utils_train, "load_bench_sets", lambda cfg: {"T1_general": [{"id": "x"}]})
    assert utils_train.load_bench(make_config(run_metrics=False)) is None
    assert utils_train.load_bench(make_config()) == {"T1_general": [{"id": "x"}]}
    assert utils_train.load_bench(make_config(bench_metrics=False)) == {}  # run_stage_metrics({}) = drift only


def test_recovery_probe_runs_after_the_last_stage_and_once_on_a_finished_run(tmp_path, tiny_model_dir, data_dir):
    extra = ("--recovery_probe", "true", "--recovery_rows", "4", "--recovery_steps", "2")
    root = run_script(train_seq_baselines, tmp_path / "seq", tiny_model_dir, data_dir, "--method", "seq_lora", *extra)
    rows = read_jsonl(root / "logs" / "seq_recovery.jsonl")
    assert [(r["method"], r["task"], r["metric"]) for r in rows] == [("seq_lora", TASKS[0], "loss")]
    r = rows[0]
    assert r["final"] == rows_of(root / "logs" / "seq_eval_loss.jsonl", stage=2, eval_task=TASKS[0])[0]["loss"]
    assert r["recovered"] < r["final"]  # two steps on the task's own rows bring its loss down
    run_script(train_seq_baselines, root, tiny_model_dir, data_dir, "--method", "seq_lora", *extra)
    assert len(read_jsonl(root / "logs" / "seq_recovery.jsonl")) == 1  # all stages done, rows there: nothing re-run
    # a DS-LoRA run finished without the probe gets it from its last checkpoint when asked later
    ds = run_script(train_slsd_seq, tmp_path / "ds", tiny_model_dir, data_dir, "--use_slsd", "false")
    assert not (ds / "logs" / "seq_recovery.jsonl").exists()
    run_script(train_slsd_seq, ds, tiny_model_dir, data_dir, "--use_slsd", "false", *extra)
    rows = read_jsonl(ds / "logs" / "seq_recovery.jsonl")
    assert [(r["method"], r["task"]) for r in rows] == [("ds_lora", TASKS[0])] and rows[0]["recovered"] < rows[0]["final"]
