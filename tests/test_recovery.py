"""The recovery probe (spurious forgetting) on a tiny random LLaMA with tiny data files (CPU, seconds)."""
import json
from dataclasses import replace

import pytest
import torch

from configs.base_config import make_config
from conftest import make_tiny_llama
from evaluation.recovery import (LOG_NAME, recovered_share, recovery_dataset, recovery_probe,
                                 scores_from_logs)
from models.ds_lora import (fast_mode, get_ds_lora_param_groups, get_fast_mode, replace_with_ds_lora,
                            start_new_task)
from models.lora_simple import get_lora_param_groups, replace_with_lora
from utils_io import read_jsonl, write_jsonl
from utils_train import eval_loss, load_task_dataset

TASKS = ("T1_general", "T2_math", "T3_code")
TARGETS = ["q_proj", "v_proj"]
ROW_KEYS = {"method", "stage", "task", "eval_task", "step", "split", "metric", "just_learned", "final", "recovered",
            "recovered_share", "n_rows", "steps"}


def toy_rows(task: str, n: int, split: str) -> list[dict]:
    """Short templated rows in the repo's JSONL schema; one template per task, so training on a task's rows
    lowers the loss on its other rows."""
    rows = []
    for i in range(n):
        if task == "T1_general":
            row = {"instruction": f"What is the capital of France? ({split} {i})", "input": "",
                   "output": "Paris is the capital." + " Paris." * (i % 3)}
        elif task == "T2_math":
            row = {"instruction": "Solve the math problem.", "input": f"Natalia sold {4 * i + 8} clips in April.",
                   "output": f"She sold half as many in May. #### {6 * i + 12}"}
        else:
            row = {"instruction": "Write the function.", "input": f"add {i}",
                   "output": f"def add(a, b):\n    return a + b + {i}\n"}
        rows.append({"id": f"{task}-{split}-{i}", **row})
    return rows


@pytest.fixture
def cfg(tmp_path):
    d = tmp_path / "split"
    d.mkdir()
    for task in TASKS:
        for split, n in (("train", 10), ("val", 4)):
            (d / f"{task}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(task, n, split)))
    return make_config(data_dir=str(d), log_dir=str(tmp_path / "logs"), model_name="tiny-test", tasks=TASKS,
                       recovery_rows=6, recovery_steps=6, per_device_batch_size=3, lr=1e-2, lr_slow=1e-2,
                       lr_fast=1e-2, lora_dropout=0.1, eval_batch_size=8, max_seq_len=128, device="cpu")


@torch.no_grad()
def randomize(model, which: str, seed: int, std: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if which in n:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def lora_model(tok, dropout=0.1):
    """A 'final' single-branch model: LoRA with nonzero B (with B = 0 the gradient of A is zero)."""
    model = make_tiny_llama(len(tok))
    replace_with_lora(model, TARGETS, r=4, alpha=8, dropout=dropout)
    randomize(model, "lora_B", seed=1)
    return model


def ds_model(tok, dropout=0.1):
    """DS-LoRA after T1 and T2 (both banked) and into T3, every adapter tensor nonzero."""
    model = make_tiny_llama(len(tok))
    replace_with_ds_lora(model, TARGETS, r=4, alpha=8, dropout=dropout, r_fast=2)
    for k, task in enumerate(TASKS):
        start_new_task(model, task, seed=k)
        randomize(model, "lora_B", seed=10 + k)
    return model


def all_tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not), cloned."""
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def loss_fn(model, tok, cfg):
    sets = {t: load_task_dataset(cfg, tok, t, cfg.eval_split) for t in TASKS}
    return lambda task: eval_loss(model, sets[task], cfg, tok.pad_token_id, "cpu")[0]


def run_probe(model, tok, cfg, groups_fn, score_fn, method="seq_lora"):
    final = {"loss": {t: 5.0 for t in TASKS}}
    just = {"loss": {t: 2.0 for t in TASKS}}
    return recovery_probe(model, tok, cfg, "cpu", method, TASKS, groups_fn, {"loss": score_fn}, just, final)


# ----------------------------------------------------------------------------- the share
@pytest.mark.parametrize("just, final, recovered, share", [
    (1.0, 2.0, 1.5, 0.5),  # loss: forgetting raised it 1.0, the probe took half of that back
    (0.8, 0.4, 0.7, 0.75),  # accuracy: the same ratio of differences
    (1.0, 2.0, 0.5, 1.5),  # recovered past the just-learned score
    (1.0, 2.0, 2.5, -0.5),  # the probe made it worse
    (1.0, 1.0 + 1e-7, 0.9, None),  # nothing forgotten: undefined
    (1.0, 2.0, None, None),  # no recovered score
    (None, 2.0, 1.5, None),  # the cell was never logged
])
def test_recovered_share_is_the_ratio_of_differences_or_none(just, final, recovered, share):
    got = recovered_share(just, final, recovered)
    assert got == (None if share is None else pytest.approx(share))


# ----------------------------------------------------------------------------- the probe, single-branch LoRA
def test_probe_trains_then_restores_every_model_tensor_and_the_rng_bit_for_bit(tiny_tokenizer, cfg):
    model = lora_model(tiny_tokenizer)
    model.eval()
    before = all_tensors(model)
    rng = torch.get_rng_state()
    score = loss_fn(model, tiny_tokenizer, cfg)
    moved = []

    def spy(task):  # called on the recovered model: the adapter must have moved, the base not
        now = dict(model.named_parameters())
        moved.append({n for n, p in now.items() if not torch.equal(p, before[n])})
        return score(task)

    run_probe(model, tiny_tokenizer, cfg, lambda: get_lora_param_groups(model, cfg.lr, cfg.weight_decay), spy)
    assert len(moved) == 2  # T1 and T2; the last task is not probed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(m and m <= trainable for m in moved)
    after = all_tensors(model)
    assert after.keys() == before.keys()
    assert [n for n in before if not torch.equal(before[n], after[n])] == []
    assert torch.equal(torch.get_rng_state(), rng)  # the probe's dropout draws came from a forked stream
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_training_on_the_task_lowers_its_loss_on_a_tiny_model(tiny_tokenizer, cfg):
    model = lora_model(tiny_tokenizer)
    score = loss_fn(model, tiny_tokenizer, cfg)
    final = {"loss": {t: score(t) for t in TASKS}}
    just = {"loss": {t: final["loss"][t] - 1.0 for t in TASKS}}
    rows = recovery_probe(model, tiny_tokenizer, cfg, "cpu", "seq_lora", TASKS,
                          lambda: get_lora_param_groups(model, cfg.lr, cfg.weight_decay), {"loss": score}, just, final)
    assert [r["task"] for r in rows] == list(TASKS[:2])
    for r in rows:
        assert r["steps"] == cfg.recovery_steps and r["recovered"] < r["final"] - 0.05, r
        assert r["recovered_share"] == pytest.approx((r["recovered"] - r["final"]) / (r["just_learned"] - r["final"]))
        assert r["recovered_share"] > 0
    assert all(score(t) == final["loss"][t] for t in TASKS)  # the final model came back


def test_log_rows_carry_the_documented_fields_and_a_rerun_replaces_only_its_own(tiny_tokenizer, cfg):
    path = cfg.log_dir + "/" + LOG_NAME
    other = {"method": "ewc", "stage": 3, "task": "T1_general", "split": "recovery", "metric": "loss"}
    write_jsonl(path, [other])
    model = lora_model(tiny_tokenizer)
    score = loss_fn(model, tiny_tokenizer, cfg)
    groups = lambda: get_lora_param_groups(model, cfg.lr, cfg.weight_decay)  # noqa: E731
    first = run_probe(model, tiny_tokenizer, cfg, groups, score)
    torch.rand(8)  # the caller's random stream moves on; the probe's draws come from cfg.seed alone
    second = run_probe(model, tiny_tokenizer, cfg, groups, score)
    assert first == second  # seeded: the same rows, order and dropout draws on every run
    logged = read_jsonl(path)
    assert logged[0] == other and logged[1:] == second  # the first run's rows were replaced, ewc's kept
    for task, r in zip(TASKS, second):
        assert set(r) == ROW_KEYS
        assert (r["method"], r["stage"], r["task"], r["eval_task"], r["split"], r["metric"]) == \
            ("seq_lora", 3, task, task, "recovery", "loss")
        assert (r["step"], r["steps"], r["n_rows"]) == (cfg.recovery_steps, cfg.recovery_steps, cfg.recovery_rows)
        assert (r["just_learned"], r["final"]) == (2.0, 5.0)


def test_recovery_rows_are_a_seeded_sample_of_the_train_split(tiny_tokenizer, cfg):
    a, b = (recovery_dataset(cfg, tiny_tokenizer, "T2_math") for _ in range(2))
    assert a.ids == b.ids and len(a) == cfg.recovery_rows
    assert all(i.startswith("T2_math-train-") for i in a.ids)
    assert a.ids != [f"T2_math-train-{i}" for i in range(cfg.recovery_rows)]  # a sample, not the head of the file


def test_probe_refuses_zero_rows_or_steps(tiny_tokenizer, cfg):
    model = lora_model(tiny_tokenizer)
    for bad in ({"recovery_rows": 0}, {"recovery_steps": 0}):
        with pytest.raises(ValueError, match="recovery_rows > 0 and recovery_steps > 0"):
            run_probe(model, tiny_tokenizer, replace(cfg, **bad),
                      lambda: get_lora_param_groups(model, cfg.lr, 0.0), lambda t: 0.0)


# ----------------------------------------------------------------------------- DS-LoRA
def test_ds_lora_probe_trains_slow_and_active_fast_and_restores_the_bank(tiny_tokenizer, cfg):
    model = ds_model(tiny_tokenizer)
    before = all_tensors(model)
    layer = next(m for m in model.modules() if hasattr(m, "bank_tasks"))
    bank_before = (list(layer.bank_tasks), layer.active_task)
    banks = [n for n in before if "lora_fast_bank_" in n]
    assert len(banks) == 2 * 2 * 4 * len(TARGETS)  # T1 and T2, A and B, in q and v of each of 4 layers
    score = loss_fn(model, tiny_tokenizer, cfg)
    seen = []

    def spy(task):
        changed = {n for n, t in [*model.named_parameters(), *model.named_buffers()] if not torch.equal(t, before[n])}
        seen.append(changed)
        # A score function that writes into the bank (the probe's training never does) shows that the restore
        # covers buffers, not only parameters.
        with torch.no_grad():
            model.get_buffer(banks[0]).add_(1.0)
        with fast_mode(model, "current"):
            return score(task)

    groups = lambda: get_ds_lora_param_groups(model, cfg.lr_slow, cfg.lr_fast, cfg.weight_decay)  # noqa: E731
    run_probe(model, tiny_tokenizer, cfg, groups, spy, method="ds_lora")
    assert len(seen) == 2
    for changed in seen:
        assert any("lora_B_slow" in n for n in changed) and any("lora_B_fast" in n for n in changed)
        assert not any("bank" in n for n in changed - {banks[0]})  # training leaves the bank alone
    after = all_tensors(model)
    assert [n for n in before if not torch.equal(before[n], after[n])] == []
    assert (list(layer.bank_tasks), layer.active_task) == bank_before and get_fast_mode(model) == ("current", None)


# ----------------------------------------------------------------------------- scores from the logs
def test_scores_from_logs_read_the_diagonal_and_the_last_row_in_current_mode(tmp_path):
    rows = []
    for stage in range(4):
        for i, task in enumerate(TASKS):
            loss = 10 * stage + i
            rows.append({"method": "ds_lora", "stage": stage, "eval_task": task, "loss": loss, "fast_mode": "current"})
            rows.append({"method": "ds_lora", "stage": stage, "eval_task": task, "loss": -1, "fast_mode": "own_task"})
            rows.append({"method": "seq_lora", "stage": stage, "eval_task": task, "loss": -2})
    (tmp_path / "seq_eval_loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = [{"method": "seq_lora", "stage": s, "eval_task": "T2_math", "metric": "math_strict", "value": s / 10}
               for s in (2, 3)]
    (tmp_path / "seq_eval_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    just, final = scores_from_logs(tmp_path, "ds_lora", TASKS)
    assert just == {"loss": {"T1_general": 10, "T2_math": 21, "T3_code": 32}}
    assert final == {"loss": {"T1_general": 30, "T2_math": 31, "T3_code": 32}}
    just, final = scores_from_logs(tmp_path, "seq_lora", TASKS, metrics=("loss", "math_strict"))
    assert just["loss"]["T1_general"] == -2 and just["math_strict"] == {"T2_math": 0.2}
    assert final["math_strict"] == {"T2_math": 0.3}
    with pytest.raises(FileNotFoundError, match="seq_eval_loss.jsonl is missing"):
        scores_from_logs(tmp_path / "nowhere", "ds_lora", TASKS)
