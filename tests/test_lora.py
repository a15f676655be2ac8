"""Hand-written LoRA / DS-LoRA on a tiny random LLaMA; peft's LoRA is the reference implementation."""
import copy
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

from models.ds_lora import (
    DSLoRALinear,
    ds_lora_layers,
    ds_lora_state_dict,
    fast_mode,
    get_ds_lora_param_groups,
    get_fast_mode,
    load_ds_lora,
    replace_with_ds_lora,
    save_ds_lora,
    set_fast_mode,
    start_new_task,
)
from models.lora_simple import (
    LoRALinear,
    adapter_layers,
    get_adapter_snapshot,
    get_lora_param_groups,
    load_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    print_trainable_parameters,
    replace_with_lora,
    save_lora,
    unmerge_lora,
    use_adapter_weights,
)

TARGETS = ["q_proj", "v_proj"]


def input_ids(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, V)


@torch.no_grad()
def randomize(model, which="lora_B", seed=1, std=1.0):
    """Give every adapter tensor whose name contains `which` random values (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if which in n:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def ds_model(base, r=4, alpha=8, r_fast=2, alpha_fast=4, num_frozen_layers=0):
    replace_with_ds_lora(base, TARGETS, r=r, alpha=alpha, dropout=0.0, num_frozen_layers=num_frozen_layers,
                         r_fast=r_fast, alpha_fast=alpha_fast)
    return base


def two_task_ds_model(base):
    """DS-LoRA after training T1 (now banked) and T2 (active), with different random weights per task."""
    model = ds_model(base)
    start_new_task(model, "T1", seed=0)
    randomize(model, "lora_B", seed=1)
    start_new_task(model, "T2", seed=1)
    randomize(model, "lora_B_fast", seed=2)
    randomize(model, "lora_A_slow", seed=3, std=0.1)
    return model


def copy_into(model, tensors):
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, t in tensors.items():
            params[n].copy_(t)


# ---------------------------------------------------------------- equivalences

def test_lora_equals_base_at_init(tiny_llama):
    ids = input_ids(tiny_llama)
    base = logits(tiny_llama, ids)
    names = replace_with_lora(tiny_llama, TARGETS, r=8, alpha=16, dropout=0.0)
    assert len(names) == 8
    assert all(layer.lora_A.abs().sum() > 0 for _, layer in adapter_layers(tiny_llama))  # A is not zero, B is
    torch.testing.assert_close(logits(tiny_llama, ids), base, atol=1e-6, rtol=0)


def test_ds_lora_equals_base_at_init(tiny_llama):
    ids = input_ids(tiny_llama)
    base = logits(tiny_llama, ids)
    model = ds_model(tiny_llama)
    torch.testing.assert_close(logits(model, ids), base, atol=1e-6, rtol=0)
    start_new_task(model, "T1")
    torch.testing.assert_close(logits(model, ids), base, atol=1e-6, rtol=0)


def test_lora_merged_equals_unmerged_and_unmerge_restores_base(tiny_llama):
    ids = input_ids(tiny_llama)
    base = logits(tiny_llama, ids)
    replace_with_lora(tiny_llama, TARGETS, r=8, alpha=16, dropout=0.0)
    randomize(tiny_llama)
    weights = {n: layer.base_layer.weight.clone() for n, layer in adapter_layers(tiny_llama)}
    unmerged = logits(tiny_llama, ids)
    assert (unmerged - base).abs().max() > 1e-2  # the adapter changes the output
    merge_lora(tiny_llama)
    assert all(layer.merged for _, layer in adapter_layers(tiny_llama))
    torch.testing.assert_close(logits(tiny_llama, ids), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(tiny_llama)
    for n, layer in adapter_layers(tiny_llama):
        torch.testing.assert_close(layer.base_layer.weight, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(tiny_llama, ids), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode,task", [("current", None), ("own_task", "T1"), ("none", None)])
def test_ds_lora_merged_equals_unmerged_in_each_fast_mode(tiny_llama, mode, task):
    model = two_task_ds_model(tiny_llama)
    ids = input_ids(model)
    set_fast_mode(model, mode, task)
    unmerged = logits(model, ids)
    merge_lora(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        set_fast_mode(model, "current")
    unmerge_lora(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)


def test_lora_matches_peft_with_same_weights(tiny_llama):
    peft = pytest.importorskip("peft")
    reference = copy.deepcopy(tiny_llama)
    replace_with_lora(tiny_llama, TARGETS, r=4, alpha=8, dropout=0.0)
    randomize(tiny_llama)
    peft_model = peft.get_peft_model(reference, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                lora_dropout=0.0))
    with torch.no_grad():
        for name, layer in adapter_layers(tiny_llama):
            peft_layer = peft_model.base_model.model.get_submodule(name)
            assert peft_layer.scaling["default"] == layer.scaling == 2.0
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    ids = input_ids(tiny_llama)
    torch.testing.assert_close(logits(tiny_llama, ids), logits(peft_model, ids), atol=1e-5, rtol=0)


def test_ds_lora_matches_peft_lora_of_concatenated_rank(tiny_llama):
    peft = pytest.importorskip("peft")
    reference = copy.deepcopy(tiny_llama)
    model = ds_model(tiny_llama, r=4, alpha=8, r_fast=2, alpha_fast=4)  # both scalings 2.0
    randomize(model, "lora_B")  # slow and fast B
    peft_model = peft.get_peft_model(reference, peft.LoraConfig(r=6, lora_alpha=12, target_modules=TARGETS,
                                                                lora_dropout=0.0))
    with torch.no_grad():
        for name, layer in ds_lora_layers(model):
            peft_layer = peft_model.base_model.model.get_submodule(name)
            assert peft_layer.scaling["default"] == layer.scaling_slow == layer.scaling_fast
            peft_layer.lora_A["default"].weight.copy_(torch.cat([layer.lora_A_slow, layer.lora_A_fast], 0))  # (6, in)
            peft_layer.lora_B["default"].weight.copy_(torch.cat([layer.lora_B_slow, layer.lora_B_fast], 1))  # (out, 6)
    ids = input_ids(model)
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), atol=1e-5, rtol=0)


def test_dropout_acts_on_adapter_input_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), r=2, alpha=2, dropout=0.5).train()
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.5
    assert isinstance(LoRALinear(nn.Linear(16, 8), r=2, alpha=2, dropout=0.0).lora_dropout, nn.Identity)
    with torch.no_grad():
        layer.lora_A.zero_()  # the adapter adds nothing, so any change would come from dropping the base input
        layer.lora_B.normal_()
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)


# ---------------------------------------------------------------- trainable parameters and groups

@pytest.mark.parametrize("kind", ["lora", "ds_lora"])
def test_only_lora_params_are_trainable(tiny_llama, kind):
    if kind == "lora":
        replace_with_lora(tiny_llama, TARGETS, r=8, alpha=16, dropout=0.0)
        per_layer = lambda m: 8 * (m.in_features + m.out_features)
    else:
        ds_model(tiny_llama, r=4, r_fast=2)
        per_layer = lambda m: (4 + 2) * (m.in_features + m.out_features)
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in tiny_llama.named_parameters() if "lora_" in n}
    assert len(trainable) == 8 * (2 if kind == "lora" else 4)
    expected = sum(per_layer(m) for _, m in adapter_layers(tiny_llama))
    total = sum(p.numel() for p in tiny_llama.parameters())
    assert print_trainable_parameters(tiny_llama) == (expected, total)
    tiny_llama.model.embed_tokens.weight.requires_grad_(True)
    mark_only_lora_as_trainable(tiny_llama)
    assert not tiny_llama.model.embed_tokens.weight.requires_grad


def test_slow_and_fast_groups_partition_trainable_params(tiny_llama):
    model = ds_model(tiny_llama)
    slow, fast = get_ds_lora_param_groups(model, lr_slow=1e-4, lr_fast=3e-4, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    slow_names = {names[id(p)] for p in slow["params"]}
    fast_names = {names[id(p)] for p in fast["params"]}
    assert (slow["name"], slow["lr"], fast["name"], fast["lr"]) == ("slow", 1e-4, "fast", 3e-4)
    assert slow_names and fast_names and not slow_names & fast_names
    assert slow_names | fast_names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A_slow", "lora_B_slow")) for n in slow_names)
    assert all(n.endswith(("lora_A_fast", "lora_B_fast")) for n in fast_names)
    torch.optim.AdamW([slow, fast])  # the groups are valid optimizer input


def test_param_groups_reject_trainable_param_outside_groups(tiny_llama):
    lora = copy.deepcopy(tiny_llama)
    replace_with_lora(lora, TARGETS, r=4, alpha=8)
    assert len(get_lora_param_groups(lora, lr=1e-3, weight_decay=0.0)[0]["params"]) == 16  # A and B of 8 layers
    lora.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="no optimizer group"):
        get_lora_param_groups(lora, lr=1e-3, weight_decay=0.0)
    model = ds_model(tiny_llama)
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="model.norm.weight"):
        get_ds_lora_param_groups(model, lr_slow=1e-4, lr_fast=1e-4, weight_decay=0.0)


# ---------------------------------------------------------------- targets and frozen layers

@pytest.mark.parametrize("kind", ["lora", "ds_lora"])
def test_num_frozen_layers_keeps_bottom_layers_plain(tiny_llama, kind):
    if kind == "lora":
        names = replace_with_lora(tiny_llama, TARGETS, r=4, alpha=8, num_frozen_layers=2)
    else:
        names = replace_with_ds_lora(tiny_llama, TARGETS, r=4, alpha=8, num_frozen_layers=2)
    assert names == [f"model.layers.{i}.self_attn.{t}" for i in (2, 3) for t in TARGETS]
    layers = tiny_llama.model.layers
    for i in (0, 1):
        assert type(layers[i].self_attn.q_proj) is nn.Linear and type(layers[i].self_attn.v_proj) is nn.Linear
    adapter_type = LoRALinear if kind == "lora" else DSLoRALinear
    assert all(isinstance(layers[i].self_attn.q_proj, adapter_type) for i in (2, 3))
    assert not any(f"layers.{i}." in n for n in lora_state_dict(tiny_llama) for i in (0, 1))


def test_target_matches_exact_name_or_dotted_suffix(tiny_llama):
    names = replace_with_lora(copy.deepcopy(tiny_llama), ["self_attn.q_proj"], r=2, alpha=2)
    assert names == [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
    with pytest.raises(ValueError, match="'proj'"):  # a bare substring is not a suffix match
        replace_with_lora(tiny_llama, ["proj"], r=2, alpha=2)


def test_unmatched_target_raises_naming_target_and_existing_modules(tiny_llama):
    with pytest.raises(ValueError) as err:
        replace_with_lora(tiny_llama, ["q_proj", "qkv_proj"], r=4, alpha=8)
    assert "qkv_proj" in str(err.value) and "model.layers.0.self_attn.q_proj" in str(err.value)
    with pytest.raises(ValueError, match="qkv_proj"):
        replace_with_ds_lora(tiny_llama, ["qkv_proj"], r=4, alpha=8)
    assert not any(isinstance(m, (LoRALinear, DSLoRALinear)) for m in tiny_llama.modules())  # model untouched


def test_num_frozen_layers_covering_all_layers_raises(tiny_llama):
    with pytest.raises(ValueError, match="num_frozen_layers=4 .*4 layers"):
        replace_with_lora(tiny_llama, TARGETS, r=4, alpha=8, num_frozen_layers=4)
    with pytest.raises(ValueError, match="num_frozen_layers=9"):
        replace_with_ds_lora(tiny_llama, TARGETS, r=4, alpha=8, num_frozen_layers=9)


def test_invalid_rank_raises_naming_value(tiny_llama):
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        replace_with_lora(tiny_llama, TARGETS, r=0, alpha=8)
    with pytest.raises(ValueError, match="fast r must be a positive integer, got -1"):
        replace_with_ds_lora(tiny_llama, TARGETS, r=4, alpha=8, r_fast=-1)


# ---------------------------------------------------------------- per-task fast bank and modes

def test_start_new_task_banks_old_fast_and_starts_fresh_fast_branch(tiny_llama):
    model = ds_model(tiny_llama)
    start_new_task(model, "T1", seed=0)
    randomize(model, "lora_B", seed=1)  # "train" T1
    old_fast = {n: (l.lora_A_fast.clone(), l.lora_B_fast.clone()) for n, l in ds_lora_layers(model)}
    ids = input_ids(model)
    with fast_mode(model, "none"):
        slow_only = logits(model, ids)
    fresh_copy = copy.deepcopy(model)
    start_new_task(model, "T2", seed=5)
    for n, layer in ds_lora_layers(model):
        assert (layer.bank_tasks, layer.active_task) == (["T1"], "T2")
        assert torch.equal(layer.get_buffer("lora_fast_bank_T1_A"), old_fast[n][0])
        assert torch.equal(layer.get_buffer("lora_fast_bank_T1_B"), old_fast[n][1])
        assert torch.all(layer.lora_B_fast == 0) and layer.lora_A_fast.abs().sum() > 0
        assert not torch.equal(layer.lora_A_fast, old_fast[n][0])
    assert "model.layers.0.self_attn.q_proj.lora_fast_bank_T1_A" in model.state_dict()
    assert not any("bank" in n for n, _ in model.named_parameters())  # bank is never trained
    torch.testing.assert_close(logits(model, ids), slow_only, atol=1e-6, rtol=0)
    start_new_task(fresh_copy, "T2", seed=5)  # the seed fixes the fresh A
    assert all(torch.equal(a.lora_A_fast, b.lora_A_fast)
               for (_, a), (_, b) in zip(ds_lora_layers(model), ds_lora_layers(fresh_copy)))
    with pytest.raises(ValueError, match="'T1' already has fast weights"):
        start_new_task(model, "T1")


def test_fast_modes_select_expected_weights(tiny_llama):
    model = two_task_ds_model(tiny_llama)
    ids = input_ids(model)
    current = logits(model, ids)  # default mode: the active (T2) fast branch

    # References: models whose *active* fast branch holds the weights each mode should use.
    t1_ref, zero_ref = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for (_, t1), (_, zero) in zip(ds_lora_layers(t1_ref), ds_lora_layers(zero_ref)):
            t1.lora_A_fast.copy_(t1.get_buffer("lora_fast_bank_T1_A"))
            t1.lora_B_fast.copy_(t1.get_buffer("lora_fast_bank_T1_B"))
            zero.lora_B_fast.zero_()
    t1_out, slow_only = logits(t1_ref, ids), logits(zero_ref, ids)
    assert (current - slow_only).abs().max() > 1e-2 and (t1_out - current).abs().max() > 1e-2

    expected = {("current", None): current, ("own_task", "T2"): current, ("own_task", "T1"): t1_out,
                ("own_task", "unseen"): slow_only, ("none", None): slow_only}
    for (mode, task), want in expected.items():
        set_fast_mode(model, mode, task)
        assert get_fast_mode(model) == (mode, task)
        torch.testing.assert_close(logits(model, ids), want, atol=1e-6, rtol=0, msg=f"mode={mode} task={task}")


def test_fast_mode_context_restores_previous_mode(tiny_llama):
    model = two_task_ds_model(tiny_llama)
    set_fast_mode(model, "own_task", "T1")
    with fast_mode(model, "none"):
        assert get_fast_mode(model) == ("none", None)
    assert get_fast_mode(model) == ("own_task", "T1")
    with pytest.raises(KeyError):
        with fast_mode(model, "current"):
            raise KeyError("body failed")
    assert get_fast_mode(model) == ("own_task", "T1")
    with pytest.raises(ValueError, match="'latest'"):
        set_fast_mode(model, "latest")
    with pytest.raises(ValueError, match="only used with mode='own_task'"):
        set_fast_mode(model, "current", "T1")


# ---------------------------------------------------------------- saving and loading

def test_lora_save_load_roundtrip_restores_outputs(tiny_llama, tmp_path):
    fresh = copy.deepcopy(tiny_llama)
    replace_with_lora(tiny_llama, TARGETS, r=4, alpha=8)
    randomize(tiny_llama)
    path = tmp_path / "T1" / "adapter.safetensors"
    save_lora(tiny_llama, str(path))
    assert os.listdir(path.parent) == ["adapter.safetensors"]  # no temporary file left behind
    replace_with_lora(fresh, TARGETS, r=4, alpha=8)
    load_lora(fresh, str(path))
    ids = input_ids(fresh)
    assert torch.equal(logits(fresh, ids), logits(tiny_llama, ids))
    wrong_rank = copy.deepcopy(tiny_llama)
    for _, layer in adapter_layers(wrong_rank):
        layer.lora_A = nn.Parameter(torch.zeros(2, layer.in_features))
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 64\), the model expects \(2, 64\)"):
        load_lora(wrong_rank, str(path))


def test_ds_save_load_by_branch_restores_outputs(tiny_llama, tmp_path):
    fresh_slow, fresh_all = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    model = two_task_ds_model(tiny_llama)
    save_ds_lora(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_fast.safetensors", "adapter_slow.safetensors"]
    with safe_open(str(tmp_path / "adapter_fast.safetensors"), framework="pt") as f:
        assert (f.metadata()["tasks"], f.metadata()["active_task"]) == ('["T1"]', '"T2"')
        assert set(f.keys()) == set(ds_lora_state_dict(model, "fast"))
    with safe_open(str(tmp_path / "adapter_slow.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(ds_lora_state_dict(model, "slow"))
        assert all(k.endswith(("lora_A_slow", "lora_B_slow")) for k in f.keys())
    ids = input_ids(model)

    # Slow branch only: the slow-only outputs match; the fast branch stays fresh.
    ds_model(fresh_slow)
    load_ds_lora(fresh_slow, str(tmp_path), branch="slow")
    with fast_mode(model, "none"), fast_mode(fresh_slow, "none"):
        assert torch.equal(logits(fresh_slow, ids), logits(model, ids))
    assert ds_lora_layers(fresh_slow)[0][1].bank_tasks == []

    # Both branches into a model that never saw a task: the bank is rebuilt and every mode matches.
    ds_model(fresh_all)
    load_ds_lora(fresh_all, str(tmp_path))
    layer = ds_lora_layers(fresh_all)[0][1]
    assert (layer.bank_tasks, layer.active_task) == (["T1"], "T2")
    for mode, task in [("current", None), ("own_task", "T1"), ("own_task", "T2"), ("none", None)]:
        with fast_mode(model, mode, task), fast_mode(fresh_all, mode, task):
            assert torch.equal(logits(fresh_all, ids), logits(model, ids)), (mode, task)
    start_new_task(fresh_all, "T3")  # the loaded state continues like the saved one
    assert layer.bank_tasks == ["T1", "T2"]


# ---------------------------------------------------------------- teacher snapshots and merge safety

def test_adapter_snapshot_context_restores_weights_bit_identically(tiny_llama):
    model = two_task_ds_model(tiny_llama)
    snapshot = get_adapter_snapshot(model)  # the teacher: weights at the end of the previous stage
    assert set(snapshot) == {n for n, _ in model.named_parameters() if "lora_" in n}
    randomize(model, "lora_B", seed=7)  # the student moves on
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = input_ids(model)
    student = logits(model, ids)
    teacher = copy.deepcopy(model)
    copy_into(teacher, snapshot)
    with use_adapter_weights(model, snapshot):
        assert not torch.is_grad_enabled()
        inside = model(input_ids=ids).logits
    assert torch.equal(inside, logits(teacher, ids))
    assert not torch.equal(inside, student)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(logits(model, ids), student)


def test_student_backward_survives_teacher_forward_in_snapshot_context(tiny_llama):
    model = ds_model(tiny_llama)
    randomize(model, "lora_B", seed=1)
    snapshot = get_adapter_snapshot(model)
    randomize(model, "lora_B", seed=2)
    ids = input_ids(model)
    model(input_ids=ids).logits.square().mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    loss = model(input_ids=ids).logits.square().mean()  # student graph first
    with use_adapter_weights(model, snapshot):
        model(input_ids=ids)  # teacher forward between the student forward and backward
    loss.backward()
    assert all(torch.equal(p.grad, reference[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_merge_with_inf_weight_raises_and_leaves_model_unmerged(tiny_llama):
    replace_with_lora(tiny_llama, TARGETS, r=4, alpha=8)
    randomize(tiny_llama)
    layers = adapter_layers(tiny_llama)
    weights = [layer.base_layer.weight.clone() for _, layer in layers]
    with torch.no_grad():
        layers[-1][1].lora_B[0, 0] = float("inf")  # the last layer fails after the others merged
    with pytest.raises(ValueError, match=r"model.layers.3.self_attn.v_proj: .*NaN/Inf"):
        merge_lora(tiny_llama)
    assert not any(layer.merged for _, layer in layers)
    for (_, layer), w in zip(layers, weights):
        torch.testing.assert_close(layer.base_layer.weight, w, atol=1e-6, rtol=0)
