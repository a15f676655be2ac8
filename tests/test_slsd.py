"""SLSD's KD term on a tiny random LLaMA: the loss forms against hand computations, the gradient routed to the
slow branch only, kd_lambda = 0 bit-identical to plain DS-LoRA, a larger kd_lambda keeping the student closer to
its teacher, and both teacher views. Whole-script runs use 2 tasks and a few steps; everything runs on CPU."""
import math

import pytest
import torch
from safetensors.torch import load_file

import train_slsd_seq
from models.ds_lora import adapter_branch, fast_mode, get_ds_lora_param_groups, use_adapter_weights
from models.lora_simple import get_adapter_snapshot
from test_train import (CPU, TASKS, data_dir, probe_setup, randomize, read_jsonl, run_script,  # noqa: F401 (fixtures)
                        slsd_cfg, trained_ds_model)
from train_slsd_seq import (TeacherTargets, add_kd_grads, build_probe_buffer, kd_divergence, kd_loss, probe_kl,
                            teacher_targets)
from utils_data import InstructionDataset, collate_fn
from utils_train import mean_token_loss


# ----------------------------------------------------------------------------- the loss, by hand
def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(P, Q):
    return sum(p * math.log(p / q) for p, q in zip(P, Q) if p > 0)


Z = [3.0, 1.0, 0.5, -1.0, 0.0, 2.0]  # teacher logits, V = 6: its top-2 are ids 0 and 5
S = [1.0, 2.0, 0.0, 0.5, -0.5, 1.5]  # student logits
T, K = 2.0, 2


def targets_of(z, k=K, temp=T) -> TeacherTargets:
    return teacher_targets(torch.tensor([z]), k, temp)


def test_teacher_targets_hold_the_top_k_the_normalizer_and_the_tail_mass():
    t = targets_of(Z)
    p = softmax([z / T for z in Z])
    assert t.idx.tolist() == [[0, 5]] and t.vals.tolist() == [[3.0, 2.0]]
    assert float(t.log_z) == pytest.approx(math.log(sum(math.exp(z / T) for z in Z)), rel=1e-6)
    assert float(t.log_tail) == pytest.approx(math.log(1 - p[0] - p[5]), rel=1e-6)


def test_topk_tail_kd_equals_a_hand_computation():
    p, q = softmax([z / T for z in Z]), softmax([s / T for s in S])
    P = [p[0], p[5], 1 - p[0] - p[5]]  # the teacher's top-2, then one class for the rest
    Q = [q[0], q[5], 1 - q[0] - q[5]]  # the student's mass on those ids, then its rest
    got = kd_divergence(torch.tensor([S]), targets_of(Z), T, "topk_tail")
    assert got.shape == (1,) and float(got) == pytest.approx(T * T * kl(P, Q), rel=1e-5)


def test_topk_kd_equals_a_hand_computation_on_the_renormalized_support():
    p, q = softmax([z / T for z in Z]), softmax([s / T for s in S])
    P = [p[0] / (p[0] + p[5]), p[5] / (p[0] + p[5])]
    Q = [q[0] / (q[0] + q[5]), q[5] / (q[0] + q[5])]
    got = kd_divergence(torch.tensor([S]), targets_of(Z), T, "topk")
    assert float(got) == pytest.approx(T * T * kl(P, Q), rel=1e-5)


def test_topk_tail_penalizes_student_mass_outside_the_top_k_where_topk_cannot():
    """A student with the teacher's top-2 ratio but most of its mass elsewhere: topk sees nothing, topk_tail does."""
    s = [Z[0], -5.0, 9.0, 9.0, 9.0, Z[5]]  # same logits on ids 0 and 5, large ones elsewhere
    t = targets_of(Z)
    assert float(kd_divergence(torch.tensor([s]), t, T, "topk")) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_divergence(torch.tensor([s]), t, T, "topk_tail")) > 1.0


def test_topk_tail_is_exact_and_finite_when_the_student_tail_is_tiny():
    """1 - sum(q on the top-k) in float32 would be 0 here (log -> -inf); the logsumexp over the other ids is exact."""
    z = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5]
    s = torch.tensor([[60.0, 59.0, -60.0, -60.0, -60.0, -60.0]], requires_grad=True)
    t = targets_of(z, k=2, temp=1.0)
    got = kd_divergence(s, t, 1.0, "topk_tail")
    p = softmax(z)
    sd = s.detach()[0].double()
    log_zs = float(torch.logsumexp(sd, 0))
    log_q = [float(sd[0]) - log_zs, float(sd[1]) - log_zs, float(torch.logsumexp(sd[2:], 0)) - log_zs]
    P = [p[0], p[1], sum(p[2:])]
    expected = sum(Pi * (math.log(Pi) - lq) for Pi, lq in zip(P, log_q))
    assert log_q[2] < -110  # a tail of about 1e-52: no float32 subtraction from 1 can see it
    assert torch.isfinite(got).all() and float(got.detach()) == pytest.approx(expected, rel=1e-5)
    got.sum().backward()
    assert torch.isfinite(s.grad).all() and float(s.grad.abs().sum()) > 0


def test_with_k_equal_to_the_vocabulary_both_forms_are_the_full_kl():
    p, q = softmax([z / T for z in Z]), softmax([s / T for s in S])
    t = targets_of(Z, k=len(Z))
    assert float(t.log_tail) == float("-inf")
    for form in ("topk", "topk_tail"):
        assert float(kd_divergence(torch.tensor([S]), t, T, form)) == pytest.approx(T * T * kl(p, q), rel=1e-5)


# ----------------------------------------------------------------------------- the gradient goes to slow only
@pytest.fixture
def kd_setup(tiny_tokenizer, data_dir):  # noqa: F811
    cfg = slsd_cfg(data_dir, kd_lambda=3.0, slsd_teacher="full")  # the routing holds for either teacher
    model = trained_ds_model(tiny_tokenizer)
    teacher = get_adapter_snapshot(model)
    randomize(model, "lora_B_slow", seed=5)  # the student's slow branch has left its teacher
    ds = InstructionDataset(cfg.task_path("T2_math", "train"), tiny_tokenizer, cfg)
    probes = build_probe_buffer(model, teacher, ds, cfg, CPU, tiny_tokenizer.pad_token_id, seed=3)
    return model, probes, ds, cfg


def test_step_gradient_is_ce_on_fast_and_ce_plus_lambda_kd_on_slow(kd_setup, tiny_tokenizer):
    model, probes, ds, cfg = kd_setup
    pad = tiny_tokenizer.pad_token_id
    slow, fast = (g["params"] for g in get_ds_lora_param_groups(model, 1e-3, 1e-3, 0.0))
    batch = collate_fn([ds[j] for j in range(4)], pad)
    idxs = probes.idxs[:cfg.kd_batch_size]
    g_ce = torch.autograd.grad(mean_token_loss(model, batch)[0], slow + fast)
    g_kd = torch.autograd.grad(kd_loss(model, probes, idxs, cfg, CPU, pad), slow)

    mean_token_loss(model, batch)[0].backward()  # what the script does: supervised backward, then the KD term
    out = add_kd_grads(model, probes, idxs, slow, cfg, CPU, pad)
    assert out is not None and out["kd_loss"] > 1e-3
    for p, g in zip(fast, g_ce[len(slow):]):
        assert torch.equal(p.grad, g)  # exactly the supervised gradient
    for p, gc, gk in zip(slow, g_ce, g_kd):
        assert torch.allclose(p.grad, gc + cfg.kd_lambda * gk, rtol=1e-5, atol=1e-8)
    assert out["kd_grad_norm"] == pytest.approx(
        cfg.kd_lambda * float(torch.norm(torch.stack([g.norm() for g in g_kd]))), rel=1e-5)
    assert sum(float(g.abs().sum()) for g in g_kd) > 0


def test_slow_teacher_distils_the_slow_branch_alone(kd_setup, tiny_tokenizer):
    """slsd_teacher slow: the cache is the previous slow branch without any fast weights, and the student is
    compared in the same slow-only view, so a student whose slow branch equals the teacher's has KL 0."""
    model, _, ds, cfg = kd_setup
    pad = tiny_tokenizer.pad_token_id
    slow_cfg = slsd_cfg(cfg.data_dir, slsd_teacher="slow")
    probes = build_probe_buffer(model, get_adapter_snapshot(model), ds, slow_cfg, CPU, pad, seed=3)
    batch = collate_fn([ds[j] for j in probes.idxs], pad)
    with torch.no_grad(), fast_mode(model, "none"):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    vals = torch.cat([probes.cache[ds.ids[j]].vals for j in probes.idxs])
    assert torch.allclose(vals, logits[:, :-1][mask].topk(cfg.kd_topk, -1).values, atol=1e-5)
    assert probe_kl(model, probes, slow_cfg, CPU, pad) < 1e-6
    full = build_probe_buffer(model, get_adapter_snapshot(model), ds, cfg, CPU, pad, seed=3)
    assert probe_kl(model, full, cfg, CPU, pad) < 1e-6  # the full view against itself
    assert probe_kl(model, full, slow_cfg, CPU, pad) > 1e-3  # the slow-only student is not the full teacher


# ----------------------------------------------------------------------------- whole-script properties
def adapters(root, method) -> dict:
    """{(stage dir, file, key): tensor} of every adapter file a run saved."""
    return {(d.name, f.name, k): v for d in sorted((root / "ckpt" / method).iterdir())
            for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


def train_losses(root, method):
    return [r["loss"] for t in TASKS for r in read_jsonl(root / "logs" / f"seq_{t}_train_loss.jsonl")
            if r["method"] == method and r["split"] == "train"]


@pytest.mark.parametrize("dropout", ["0.0", "0.05"])
def test_kd_lambda_zero_is_bit_identical_to_use_slsd_false(dropout, tmp_path, tiny_model_dir, data_dir,  # noqa: F811
                                                            monkeypatch):
    """Every weight (slow, fast, bank) of both stages. With dropout > 0 this also shows that the probe scoring
    and the KL logs draw no random numbers: one extra draw would change every later dropout mask."""
    extra = ("--lora_dropout", dropout, "--lr_slow", "1e-2")
    run_script(train_slsd_seq, tmp_path / "kd0", tiny_model_dir, data_dir, "--kd_lambda", "0", *extra)
    run_script(train_slsd_seq, tmp_path / "ds", tiny_model_dir, data_dir, "--use_slsd", "false", *extra)
    a, b = adapters(tmp_path / "kd0", "ds_lora_slsd"), adapters(tmp_path / "ds", "ds_lora")
    assert len(a) == len(b) > 0 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "kd0", "ds_lora_slsd") == train_losses(tmp_path / "ds", "ds_lora")
    kl_rows = [r for r in read_jsonl(tmp_path / "kd0" / "logs" / f"seq_{TASKS[1]}_train_loss.jsonl")
               if r["split"] == "probe_kl"]
    assert kl_rows[0]["kl_end"] > 0  # the KL is still measured at kd_lambda 0: the control's drift

    run_script(train_slsd_seq, tmp_path / "kd1", tiny_model_dir, data_dir, "--kd_lambda", "1", *extra)
    c = adapters(tmp_path / "kd1", "ds_lora_slsd")
    assert any(not torch.equal(c[k], b[k]) for k in b if adapter_branch(k[2]) == "slow")  # KD does act
    if dropout != "0.0":  # the test can see a stray random draw
        real = train_slsd_seq.build_probe_buffer
        monkeypatch.setattr(train_slsd_seq, "build_probe_buffer", lambda *a, **kw: (torch.rand(1), real(*a, **kw))[1])
        run_script(train_slsd_seq, tmp_path / "stray", tiny_model_dir, data_dir, "--kd_lambda", "0", *extra)
        d = adapters(tmp_path / "stray", "ds_lora_slsd")
        assert any(not torch.equal(d[k], b[k]) for k in b)


def probe_kl_rows(root) -> list[dict]:
    return [r for t in TASKS for r in read_jsonl(root / "logs" / f"seq_{t}_train_loss.jsonl")
            if r["split"] == "probe_kl"]


KL_ARGS = ("--max_steps_per_task", "8", "--num_epochs", "4", "--lr_slow", "1e-2", "--lr_fast", "1e-2",
           "--lora_dropout", "0", "--probe_size_per_task", "8", "--probe_keep_fraction", "1", "--kd_interval", "1")


@pytest.mark.parametrize("teacher", ["full", "slow"])
def test_larger_kd_lambda_gives_lower_end_of_stage_probe_kl(teacher, tmp_path, tiny_model_dir, data_dir):  # noqa: F811
    """On this tiny model the KD gradient is small next to the supervised one (about 10% at kd_lambda 3, so the
    KL falls by 3-26%); the assertion is the ordering 0 > 3 > 30 at every stage, and a clear drop at 30."""
    kl = {}
    for lam in ("0", "3", "30"):
        root = run_script(train_slsd_seq, tmp_path / lam, tiny_model_dir, data_dir, *KL_ARGS, "--kd_lambda", lam,
                          "--slsd_teacher", teacher)
        kl[lam] = probe_kl_rows(root)
    assert [r["stage"] for r in kl["0"]] == [1, 2] and all(r["teacher"] == teacher for r in kl["0"])
    assert all(kl[lam][0]["kl_start"] < 1e-6 for lam in kl)  # stage 1: the student is the base, like its teacher
    if teacher == "slow":  # every stage starts at its teacher: the slow branch has not moved yet
        assert all(r["kl_start"] < 1e-6 for rows in kl.values() for r in rows)
    else:  # stage 2 starts without the previous fast branch, which the teacher has
        assert kl["0"][1]["kl_start"] > 1e-5
    for r0, r3, r30 in zip(kl["0"], kl["3"], kl["30"]):
        assert r0["kl_end"] > 1e-4
        assert r0["kl_end"] > r3["kl_end"] > r30["kl_end"], (r0, r3, r30)
        assert r30["kl_end"] < 0.9 * r0["kl_end"]


def test_probe_kl_logs_change_no_weight_and_can_be_turned_off(tmp_path, tiny_model_dir, data_dir):  # noqa: F811
    """The two KL passes per stage run in eval mode and draw no random numbers: with dropout on, a run without
    them trains bit-identical weights."""
    run_script(train_slsd_seq, tmp_path / "on", tiny_model_dir, data_dir, "--lr_slow", "1e-2")
    run_script(train_slsd_seq, tmp_path / "off", tiny_model_dir, data_dir, "--lr_slow", "1e-2",
               "--probe_kl_log", "false")
    a, b = adapters(tmp_path / "on", "ds_lora_slsd"), adapters(tmp_path / "off", "ds_lora_slsd")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(probe_kl_rows(tmp_path / "on")) == 2 and probe_kl_rows(tmp_path / "off") == []
    probe = read_jsonl(tmp_path / "off" / "logs" / f"seq_{TASKS[0]}_train_loss.jsonl")[0]
    assert probe["split"] == "probe" and probe["kl_start"] is None and probe["n_kept"] == 4


def test_prompt_only_entropy_equals_the_full_row_entropy_at_the_first_response_token(probe_setup, tiny_tokenizer):
    """The probe buffer scores candidates on their prompts alone: the entropy there is the full row's entropy at
    the last prompt token (a causal model cannot see the response), and the kept rows' cached targets are the
    full rows' top-k."""
    from train_slsd_seq import first_token_entropies, prompt_length
    from utils_forward import supervised_logits
    model, teacher, ds, cfg = probe_setup
    pad = tiny_tokenizer.pad_token_id
    idxs = list(range(len(ds)))
    assert len({prompt_length(ds[j]) for j in idxs}) > 1  # prompts of several lengths: the padding is exercised
    with torch.no_grad(), use_adapter_weights(model, teacher):
        got = first_token_entropies(model, ds, idxs, cfg, CPU, pad)
        for j in idxs:
            z, _, _ = supervised_logits(model, collate_fn([ds[j]], pad))
            p0 = torch.log_softmax(z[0], -1)
            assert got[ds.ids[j]] == pytest.approx(float(-(p0.exp() * p0).sum()), abs=1e-5)
    probes = build_probe_buffer(model, teacher, ds, cfg, CPU, pad, seed=3)
    assert set(probes.cache) == set(probes.entropies) and probes.n_scored == len(probes.scored)


@pytest.mark.parametrize("teacher", ["slow", "full"])
def test_probe_kl_starts_from_the_trunk_the_teacher_pass_cached_and_gives_the_full_pass_value(
        teacher, tiny_tokenizer, data_dir):  # noqa: F811
    """build_probe_buffer keeps the frozen layers' output for its batches; both probe-KL passes run the same batches
    from the first adapted layer on (TrunkCache hits, checked against a full pass) and equal a run without it."""
    import dataclasses

    from conftest import make_tiny_llama
    from models.ds_lora import replace_with_ds_lora, start_new_task
    from test_train import TARGETS
    from utils_forward import trunk_cache
    model = make_tiny_llama(len(tiny_tokenizer))
    replace_with_ds_lora(model, TARGETS, r=4, alpha=8, dropout=0.0, num_frozen_layers=2, r_fast=2)
    start_new_task(model, "T1_general", seed=0)
    randomize(model, "lora_B", seed=1)
    start_new_task(model, "T2_math", seed=1)
    randomize(model, "lora_B_fast", seed=2)
    cfg, pad = slsd_cfg(data_dir, slsd_teacher=teacher), tiny_tokenizer.pad_token_id
    teacher_weights = get_adapter_snapshot(model)
    randomize(model, "lora_B_slow", seed=5)  # the student's slow branch has left its teacher
    ds = InstructionDataset(cfg.task_path("T2_math", "train"), tiny_tokenizer, cfg)
    probes = build_probe_buffer(model, teacher_weights, ds, cfg, CPU, pad, seed=3)
    cache = trunk_cache(model, cfg)
    assert cache.enabled and cache.first == 2 and cache.misses == math.ceil(len(probes.idxs) / cfg.eval_batch_size)
    got = probe_kl(model, probes, cfg, CPU, pad)
    assert cache.hits == cache.misses and cache.verified and cache.enabled  # every batch served, the first checked
    want = probe_kl(model, probes, dataclasses.replace(cfg, trunk_cache_mb=0.0), CPU, pad)  # every layer runs
    assert cache.hits == cache.misses and got == pytest.approx(want, rel=1e-5) and got > 1e-6  # a real distance
