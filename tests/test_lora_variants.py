"""I-LoRA and O-LoRA (models/lora_variants.py, train_seq_baselines --method ilora | olora): the EMA update, the
consistency loss, the orthogonality penalty's value and gradient on hand-made matrices, frozen earlier LoRAs, the
base-model view, save/load of every branch, and both methods end to end on a tiny random LLaMA with a resume."""
import contextlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import train_seq_baselines
from configs.base_config import ConfigError, make_config
from conftest import make_tiny_llama
from models.lora_simple import (adapters_disabled, get_lora_param_groups, load_lora, lora_state_dict,
                                mark_only_lora_as_trainable, merge_lora, replace_with_lora, save_lora,
                                unmerge_lora)
from models.lora_variants import (EMALoRALinear, OLoRALinear, consistency_loss, decoder_from_layer, ema_update,
                                  ilora_layers, load_olora, lora_view, olora_layers, olora_penalty, orth_penalty,
                                  record_decoder, replace_with_ilora, replace_with_olora, start_olora_task)
from test_train import (TASKS, check_adapter_only_checkpoint, check_seq_eval_rows, data_dir,  # noqa: F401 (fixture)
                        rows_of, run_script, snapshot_files, stage_rows)
from utils_data import collate_fn, read_jsonl
from utils_replay import Replay
from utils_train import load_task_dataset

TARGETS = ["q_proj", "v_proj"]


def linear(in_f=3, out_f=2, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=False)


def set_(p: torch.Tensor, value) -> None:
    with torch.no_grad():
        p.copy_(torch.as_tensor(value, dtype=p.dtype))


def randomize_b(model, seed: int, names=("lora_B",)) -> None:
    """Give every adapter's lora_B (or the named leaves) random values, so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1] in names:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def tiny(tok, kind: str, frozen: int = 2):
    model = make_tiny_llama(len(tok))
    add = {"ilora": replace_with_ilora, "olora": replace_with_olora}[kind]
    add(model, TARGETS, r=4, alpha=8, dropout=0.0, num_frozen_layers=frozen)
    return model


def batch_of(tok, data_dir, task="T1_general", n=3):  # noqa: F811
    cfg = make_config(data_dir=str(data_dir), tasks=",".join(TASKS), device="cpu")
    ds = load_task_dataset(cfg, tok, task, "train")
    return collate_fn([ds[i] for i in range(n)], tok.pad_token_id)


# ----------------------------------------------------------------------------- I-LoRA: EMA, views, consistency
def test_ema_update_moves_the_slow_lora_by_one_minus_decay_toward_the_fast_one_exactly():
    layer = EMALoRALinear(linear(), r=2, alpha=2)
    set_(layer.lora_A, [[3.0, 3.0, 3.0], [-1.0, 0.0, 2.0]])
    set_(layer.lora_A_ema, [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    set_(layer.lora_B, [[4.0, 0.0], [0.0, 8.0]])  # lora_B_ema is still 0
    layer.ema_update(0.75)
    assert layer.lora_A_ema.tolist() == [[1.5, 1.5, 1.5], [0.5, 0.75, 1.25]]  # 0.75 slow + 0.25 fast
    assert layer.lora_B_ema.tolist() == [[1.0, 0.0], [0.0, 2.0]]
    layer.ema_update(0.75)  # compounds: the fast one did not move
    assert layer.lora_A_ema.tolist() == [[1.875, 1.875, 1.875], [0.125, 0.5625, 1.4375]]
    assert layer.lora_A.tolist() == [[3.0, 3.0, 3.0], [-1.0, 0.0, 2.0]]  # the fast LoRA is untouched
    layer.ema_update(0.0)  # decay 0: the slow LoRA becomes the fast one
    assert torch.equal(layer.lora_A_ema, layer.lora_A) and torch.equal(layer.lora_B_ema, layer.lora_B)


def test_ema_update_reaches_every_layer_of_a_model_and_rejects_a_decay_outside_0_1(tiny_tokenizer):
    model = tiny(tiny_tokenizer, "ilora")
    randomize_b(model, 0)
    ema_update(model, 0.5)
    for layer in ilora_layers(model):
        assert torch.allclose(layer.lora_B_ema, 0.5 * layer.lora_B)
    with pytest.raises(ValueError, match="decay"):
        ema_update(model, 1.5)


def test_ilora_slow_lora_is_frozen_saved_and_out_of_the_optimizer(tiny_tokenizer):
    model = tiny(tiny_tokenizer, "ilora")
    mark_only_lora_as_trainable(model)  # a second call keeps the slow LoRA frozen
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    grouped = {id(p) for g in get_lora_param_groups(model, 1e-3, 0.0) for p in g["params"]}
    assert all(id(p) not in grouped for n, p in model.named_parameters() if "_ema" in n)
    assert {k.rsplit(".", 1)[-1] for k in lora_state_dict(model)} == {"lora_A", "lora_B", "lora_A_ema", "lora_B_ema"}


def test_slow_view_computes_with_the_ema_lora_and_the_fast_view_comes_back(tiny_tokenizer, data_dir):  # noqa: F811
    model = tiny(tiny_tokenizer, "ilora")
    randomize_b(model, 1, ("lora_B",))
    randomize_b(model, 2, ("lora_B_ema",))
    batch = batch_of(tiny_tokenizer, data_dir)
    args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        fast = model(**args).logits
        with lora_view(model, "slow"):
            slow = model(**args).logits
            assert all(layer.view == "slow" for layer in ilora_layers(model))
        again = model(**args).logits
        reference = make_tiny_llama(len(tiny_tokenizer))  # a plain LoRA holding the slow weights gives the same
        replace_with_lora(reference, TARGETS, r=4, alpha=8, num_frozen_layers=2)
        ref = dict(reference.named_parameters())
        for n, p in model.named_parameters():
            if n.endswith("_ema"):
                ref[n.removesuffix("_ema")].copy_(p)
        expected = reference(**args).logits
    assert torch.equal(fast, again) and not torch.allclose(fast, slow)
    assert torch.allclose(slow, expected, atol=1e-6)
    with pytest.raises(ValueError, match="view"), lora_view(model, "medium"):
        pass


def test_consistency_loss_is_the_mse_over_the_masked_positions_with_its_gradient():
    h_fast = torch.tensor([[[1.0, 2.0], [3.0, 5.0], [9.0, 9.0]]], requires_grad=True)  # (1, 3, 2)
    h_slow = torch.tensor([[[1.0, 0.0], [1.0, 5.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third position is padding
    loss = consistency_loss(h_fast, h_slow, mask)
    assert float(loss.detach()) == pytest.approx((0 + 4 + 4 + 0) / 4)  # 2 positions x 2 features
    loss.backward()
    assert h_fast.grad.tolist() == [[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]]  # 2 (h_f - h_s) / 4; none at padding
    assert float(consistency_loss(h_slow, h_slow, mask)) == 0.0
    with pytest.raises(ValueError, match="no position"):
        consistency_loss(h_fast, h_slow, torch.zeros(1, 3))


def test_ilora_slow_pass_from_the_first_adapted_layer_equals_the_whole_decoder(tiny_tokenizer, data_dir):  # noqa: F811
    model = tiny(tiny_tokenizer, "ilora")
    randomize_b(model, 3, ("lora_B_ema",))
    cfg = make_config(data_dir=str(data_dir), tasks=",".join(TASKS), device="cpu", replay_buffer_size=4)
    ilora = train_seq_baselines.ILoRA(model, Replay(cfg, tiny_tokenizer, tiny_tokenizer.pad_token_id), cfg)
    assert ilora.first == 2 and ilora.from_first is None
    batch = batch_of(tiny_tokenizer, data_dir)
    decoder = model.get_decoder()
    with torch.no_grad():
        with record_decoder(decoder, 2) as rec:  # the training forward's input of layer 2 (fast view)
            decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        h = ilora.slow_hidden(model, batch["input_ids"], batch["attention_mask"], rec["entering"])
        with lora_view(model, "slow"):
            whole = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            with decoder_from_layer(decoder, 2):
                assert len(decoder.layers) == 2
            assert len(decoder.layers) == 4
    assert ilora.from_first is True and torch.allclose(h, whole, atol=1e-5)
    assert all(layer.view == "fast" for layer in ilora_layers(model)) and model.training is False


def test_ilora_loss_adds_lambda_times_the_consistency_on_the_replayed_rows_and_trains_only_the_fast_lora(
        tiny_tokenizer, data_dir):  # noqa: F811
    model = tiny(tiny_tokenizer, "ilora")
    cfg = make_config(data_dir=str(data_dir), tasks=",".join(TASKS), device="cpu", replay_buffer_size=4,
                      ilora_lambda=3.0, bf16_autocast=False)
    replay = Replay(cfg, tiny_tokenizer, tiny_tokenizer.pad_token_id)
    ilora = train_seq_baselines.ILoRA(model, replay, cfg)
    batch = batch_of(tiny_tokenizer, data_dir, "T2_math", 2)
    loss, extras = ilora.loss_fn(model, batch)  # stage 1: no buffer, plain CE
    assert extras == {}
    replay.end_of_task(["T1_general"])
    model.train()
    replay.gen.manual_seed(0)
    loss, extras = ilora.loss_fn(model, batch)  # slow == fast (both B = 0): the term is 0 up to rounding
    assert float(extras["consistency"]) < 1e-10
    randomize_b(model, 4, ("lora_B",))  # the fast LoRA moves away from the slow one
    replay.gen.manual_seed(0)
    loss, extras = ilora.loss_fn(model, batch)
    replay.gen.manual_seed(0)
    base_loss, base_extras = replay.loss_fn(model, batch)  # the same replayed rows, without the term
    assert float(extras["consistency"]) > 0
    expected = float(base_loss.detach()) + 3.0 * float(extras["consistency"])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(extras["replay_loss"]) == pytest.approx(float(base_extras["replay_loss"]), rel=1e-6)
    model.zero_grad(set_to_none=True)
    loss.backward()
    for n, p in model.named_parameters():
        if "_ema" in n or "lora_" not in n:
            assert p.grad is None, n
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.endswith(("lora_A", "lora_B")))


def test_ilora_save_load_restores_the_fast_and_the_slow_lora(tiny_tokenizer, tmp_path, data_dir):  # noqa: F811
    model = tiny(tiny_tokenizer, "ilora")
    randomize_b(model, 5, ("lora_B", "lora_B_ema"))
    ema_update(model, 0.3)
    save_lora(model, str(tmp_path / "adapter.safetensors"))
    fresh = tiny(tiny_tokenizer, "ilora")
    load_lora(fresh, str(tmp_path / "adapter.safetensors"))
    a, b = lora_state_dict(model), lora_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = batch_of(tiny_tokenizer, data_dir)
    with torch.no_grad():
        for view in ("fast", "slow"):
            with lora_view(model, view), lora_view(fresh, view):
                ids = batch["input_ids"]
                assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)


# ----------------------------------------------------------------------------- O-LoRA: penalty, stack, freezing
@pytest.mark.parametrize("norm, value, grad", [("abs", 3.0, [[1.0, -1.0, -1.0]]), ("fro2", 5.0, [[2.0, -4.0, -4.0]])])
def test_orth_penalty_value_and_gradient_on_hand_made_matrices(norm, value, grad):
    a_new = torch.tensor([[1.0, -2.0, 0.0]], requires_grad=True)  # r = 1, in = 3
    a_old = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # two earlier tasks of r = 1: A_new A_old^T = [[1, -2]]
    penalty = orth_penalty(a_new, a_old, norm)
    assert float(penalty.detach()) == value  # abs: |1| + |-2|; fro2: 1 + 4
    penalty.backward()
    assert a_new.grad.tolist() == grad  # abs: sign(A_new A_old^T) A_old; fro2: 2 (A_new A_old^T) A_old
    orthogonal = torch.tensor([[0.0, 1.0, -1.0]])  # orthogonal to both earlier rows: no penalty
    assert float(orth_penalty(orthogonal, a_old, norm)) == 0.0
    with pytest.raises(ValueError, match="norm"):
        orth_penalty(a_new, a_old, "l3")


@pytest.mark.parametrize("norm", ["abs", "fro2"])
def test_orth_penalty_on_the_stack_is_the_sum_over_earlier_tasks(norm):
    g = torch.Generator().manual_seed(0)
    a_new, a1, a2 = (torch.randn(2, 5, generator=g) for _ in range(3))  # r = 2
    stacked = orth_penalty(a_new, torch.cat([a1, a2]), norm)
    assert float(stacked) == pytest.approx(float(orth_penalty(a_new, a1, norm) + orth_penalty(a_new, a2, norm)),
                                           rel=1e-6)


def test_olora_forward_is_the_sum_of_every_tasks_lora_and_merges_to_it():
    base = linear(in_f=3, out_f=2)
    layer = OLoRALinear(base, r=1, alpha=2)  # scaling 2
    x = torch.tensor([[1.0, 2.0, 3.0]])
    with torch.no_grad():
        before = layer(x)
    assert torch.equal(before, base(x))  # B = 0: the base
    set_(layer.lora_A, [[1.0, 0.0, 0.0]])
    set_(layer.lora_B, [[1.0], [0.0]])
    start_olora_task_on(layer, seed=0)  # task 1's LoRA joins the stack; task 2's starts with B = 0
    assert layer.n_old == 1 and layer.lora_A_old.tolist() == [[1.0, 0.0, 0.0]]
    set_(layer.lora_A, [[0.0, 1.0, 0.0]])
    set_(layer.lora_B, [[0.0], [1.0]])
    with torch.no_grad():
        y = layer(x)
    assert torch.allclose(y, base(x) + 2 * torch.tensor([[1.0, 2.0]]))  # task 1: 2 x0 to out 0; task 2: 2 x1 to out 1
    assert torch.allclose(layer.delta_weight(), torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    layer.merge()
    with torch.no_grad():
        assert torch.allclose(layer(x), y)
    layer.unmerge()


def start_olora_task_on(layer: OLoRALinear, seed: int) -> None:
    layer.push_current(torch.Generator().manual_seed(seed))


def test_start_olora_task_stacks_the_current_lora_keeps_the_output_and_draws_a_seeded_fresh_a(tiny_tokenizer,
                                                                                               data_dir):  # noqa: F811
    model, twin = tiny(tiny_tokenizer, "olora"), tiny(tiny_tokenizer, "olora")
    for m in (model, twin):
        randomize_b(m, 6)
    batch = batch_of(tiny_tokenizer, data_dir)
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"]).logits
        task1 = {n: (layer.lora_A.clone(), layer.lora_B.clone()) for n, layer in olora_layers(model)}
        start_olora_task(model, seed=7)
        start_olora_task(twin, seed=7)
        after = model(input_ids=batch["input_ids"]).logits
    assert torch.allclose(before, after, atol=1e-6)  # the fresh LoRA has B = 0
    for (n, layer), (_, other) in zip(olora_layers(model), olora_layers(twin)):
        assert torch.equal(layer.lora_A_old, task1[n][0]) and torch.equal(layer.lora_B_old, task1[n][1])
        assert not layer.lora_A_old.requires_grad and layer.lora_A.requires_grad
        assert torch.equal(layer.lora_A, other.lora_A) and not torch.equal(layer.lora_A, task1[n][0])
        assert not layer.lora_B.any()
    start_olora_task(model, seed=8)
    assert all(layer.n_old == 2 and layer.lora_A_old.shape == (8, layer.in_features)
               for _, layer in olora_layers(model))


def test_olora_penalty_sums_the_orthogonality_over_modules_and_l2_is_the_squared_norm(tiny_tokenizer):
    model = tiny(tiny_tokenizer, "olora")
    randomize_b(model, 9)
    layers = olora_layers(model)
    with torch.no_grad():
        orth, l2 = olora_penalty(model, "abs")
        assert float(orth) == 0.0  # no earlier task yet
        assert float(l2) == pytest.approx(sum(float(m.lora_A.pow(2).sum() + m.lora_B.pow(2).sum()) for _, m in layers),
                                          rel=1e-6)
        start_olora_task(model, seed=1)
        for norm in ("abs", "fro2"):
            orth, _ = olora_penalty(model, norm)
            assert float(orth) > 0 and float(orth) == pytest.approx(
                sum(float(orth_penalty(m.lora_A, m.lora_A_old, norm)) for _, m in layers), rel=1e-6)
    orth, l2 = olora_penalty(model, "abs")
    (orth + l2).backward()  # the gradient reaches the current LoRA only
    assert all(m.lora_A.grad is not None and m.lora_A_old.grad is None for _, m in layers)


def test_olora_earlier_tasks_lora_do_not_change_while_a_later_task_trains(tiny_tokenizer, data_dir):  # noqa: F811
    model = tiny(tiny_tokenizer, "olora")
    randomize_b(model, 10)
    start_olora_task(model, seed=2)
    mark_only_lora_as_trainable(model)
    old = {n: t.clone() for n, t in lora_state_dict(model).items() if n.endswith("_old")}
    current = {n: t.clone() for n, t in lora_state_dict(model).items() if n.endswith(("lora_A", "lora_B"))}
    opt = torch.optim.AdamW([p for g in get_lora_param_groups(model, 1e-2, 0.1) for p in g["params"]], lr=1e-2,
                            weight_decay=0.1)
    batch = batch_of(tiny_tokenizer, data_dir, "T2_math")
    model.train()
    for _ in range(3):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        orth, l2 = olora_penalty(model, "abs")
        (out.loss + 0.5 * orth + 0.1 * l2).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    now = lora_state_dict(model)
    assert all(torch.equal(now[n], t) for n, t in old.items())
    assert all(not torch.equal(now[n], t) for n, t in current.items() if n.endswith("lora_A"))


def test_olora_save_load_sizes_the_stack_from_the_file(tiny_tokenizer, tmp_path, data_dir):  # noqa: F811
    model = tiny(tiny_tokenizer, "olora")
    for seed in (11, 12):
        randomize_b(model, seed)
        start_olora_task(model, seed=seed)
    randomize_b(model, 13)
    save_lora(model, str(tmp_path / "adapter.safetensors"))
    fresh = tiny(tiny_tokenizer, "olora")
    with pytest.raises(ValueError, match="shape"):  # a plain load cannot size the stack
        load_lora(fresh, str(tmp_path / "adapter.safetensors"))
    load_olora(fresh, str(tmp_path / "adapter.safetensors"))
    a, b = lora_state_dict(model), lora_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(layer.n_old == 2 and not layer.lora_A_old.requires_grad for _, layer in olora_layers(fresh))
    batch = batch_of(tiny_tokenizer, data_dir)
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, fresh(input_ids=batch["input_ids"]).logits)
    plain = make_tiny_llama(len(tiny_tokenizer))
    replace_with_ilora(plain, TARGETS, r=4, alpha=8, num_frozen_layers=2)
    with pytest.raises(ValueError, match="OLoRALinear"):
        load_olora(plain, str(tmp_path / "adapter.safetensors"))


# ----------------------------------------------------------------------------- both: the base-model view, config
@pytest.mark.parametrize("kind", ["ilora", "olora"])
def test_adapters_disabled_gives_the_base_model_in_every_view(kind, tiny_tokenizer, data_dir):  # noqa: F811
    """Drift, token scoring and prompt features read the base model through adapters_disabled: it must zero the slow
    and the earlier tasks' LoRAs too."""
    model = tiny(tiny_tokenizer, kind)
    base = make_tiny_llama(len(tiny_tokenizer))
    if kind == "olora":
        randomize_b(model, 14)
        start_olora_task(model, seed=3)
    randomize_b(model, 15, ("lora_B", "lora_B_ema"))
    batch = batch_of(tiny_tokenizer, data_dir)
    with torch.no_grad():
        expected = base(input_ids=batch["input_ids"]).logits
        views = ("fast", "slow") if kind == "ilora" else (None,)
        for view in views:
            with lora_view(model, view) if view else contextlib.nullcontext():
                assert not torch.allclose(model(input_ids=batch["input_ids"]).logits, expected, atol=1e-4)
                with adapters_disabled(model):
                    assert torch.allclose(model(input_ids=batch["input_ids"]).logits, expected, atol=1e-6)


def test_merge_of_an_ilora_model_folds_the_viewed_lora_and_unmerges(tiny_tokenizer, data_dir):  # noqa: F811
    model = tiny(tiny_tokenizer, "ilora")
    randomize_b(model, 16, ("lora_B", "lora_B_ema"))
    ids = batch_of(tiny_tokenizer, data_dir)["input_ids"]
    with torch.no_grad(), lora_view(model, "slow"):
        slow = model(input_ids=ids).logits
        merge_lora(model)
        assert torch.allclose(model(input_ids=ids).logits, slow, atol=1e-5)
        with pytest.raises(RuntimeError, match="unmerge"), lora_view(model, "fast"):
            pass
        unmerge_lora(model)


def test_config_rejects_bad_ilora_and_olora_values_naming_the_key():
    for key, value in (("ilora_ema", 1.0), ("ilora_ema", -0.1), ("ilora_lambda", -1.0), ("olora_lambda_orth", -0.5),
                       ("olora_lambda_l2", -1e-3), ("olora_orth_norm", "l2")):
        with pytest.raises(ConfigError, match=key):
            make_config(**{key: value})
    assert make_config(["--olora_orth_norm", "fro2", "--ilora_ema", "0"]).ilora_ema == 0.0


def test_named_run_must_come_with_its_settings(tmp_path, tiny_model_dir, data_dir):  # noqa: F811
    with pytest.raises(SystemExit, match="--num_frozen_layers 0"):
        run_script(train_seq_baselines, tmp_path, tiny_model_dir, data_dir, "--method", "seq_lora", "--run_name",
                   "seq_lora_all_layers")  # smoke_args pass --num_frozen_layers 2
    with pytest.raises(SystemExit, match="--method seq_lora"):
        run_script(train_seq_baselines, tmp_path, tiny_model_dir, data_dir, "--method", "replay", "--run_name",
                   "seq_lora_all_layers", "--num_frozen_layers", "0")
    assert not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------- end to end, with a resume
RUN_ARGS = {"ilora": ["--method", "ilora", "--replay_buffer_size", "4"], "olora": ["--method", "olora"]}


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory, tiny_model_dir, data_dir):  # noqa: F811
    """ilora and olora in one log/checkpoint folder."""
    root = tmp_path_factory.mktemp("variants")
    for args in RUN_ARGS.values():
        run_script(train_seq_baselines, root, tiny_model_dir, data_dir, *args)
    return root


@pytest.mark.parametrize("method", ["ilora", "olora"])
def test_variant_run_logs_the_full_grid_its_terms_and_adapter_only_checkpoints(variant_runs, method, tiny_model_dir):
    logs = variant_runs / "logs"
    check_seq_eval_rows(logs / "seq_eval_loss.jsonl", method, (None,))  # stages 0..2 x both tasks, once each
    for stage, task in enumerate(TASKS, 1):
        rows = read_jsonl(logs / f"seq_{method}_{task}_train_loss.jsonl")
        assert [(r["method"], r["stage"], r["split"], r["stage_step"]) for r in rows] == \
            [(method, stage, "train", 1), (method, stage, "train", 2)]
        if method == "ilora":  # replay and the consistency term from the second task on
            assert all(("consistency" in r) == ("replay_loss" in r) == (stage == 2) for r in rows)
            assert all(r["consistency"] > 0 and r["objective"] > r["loss"] for r in rows if stage == 2)
        else:  # no earlier task in stage 1: orthogonality 0; then A_2 overlaps A_1 a little
            assert all((r["olora_orth"] > 0) == (stage == 2) and r["olora_l2"] > 0 for r in rows)
        ckpt = variant_runs / "ckpt" / method / f"seq_{stage}_{task}"
        check_adapter_only_checkpoint(ckpt, tiny_model_dir, {"adapter.safetensors"})
        tensors = load_file(ckpt / "adapter.safetensors")
        if method == "ilora":
            assert {k.rsplit(".", 1)[-1] for k in tensors} == {"lora_A", "lora_B", "lora_A_ema", "lora_B_ema"}
            for k in (k for k in tensors if k.endswith("lora_B")):  # the slow LoRA moved, and lags the fast one
                assert tensors[k + "_ema"].abs().sum() > 0 and not torch.allclose(tensors[k + "_ema"], tensors[k])
        else:  # the stack holds the earlier tasks: none after stage 1, T1 after stage 2 (r = 8)
            assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A_old")} == {8 * (stage - 1)}
    assert json.loads((logs / f"config_{method}.json").read_text())["method"] == method


def test_ilora_evaluates_the_slow_lora(variant_runs, tiny_model_dir, data_dir):  # noqa: F811
    """The logged stage-2 eval loss is the slow LoRA's (the fast LoRA's differs)."""
    import utils_train
    from utils_model import load_model_and_tokenizer
    cfg = make_config(["--model_name", str(tiny_model_dir), "--data_dir", str(data_dir), "--tasks", ",".join(TASKS),
                       "--eval_max_samples", "4", "--device", "cpu"])
    model, tok, device = load_model_and_tokenizer(cfg)
    replace_with_ilora(model, TARGETS, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, 2)
    load_lora(model, str(variant_runs / "ckpt" / "ilora" / f"seq_2_{TASKS[1]}" / "adapter.safetensors"))
    ds = utils_train.load_eval_sets(cfg, tok)[TASKS[0]]
    logged = rows_of(variant_runs / "logs" / "seq_eval_loss.jsonl", method="ilora", stage=2, eval_task=TASKS[0])[0]
    with lora_view(model, "slow"):
        slow, _ = utils_train.eval_loss(model, ds, cfg, tok.pad_token_id, device)
    fast, _ = utils_train.eval_loss(model, ds, cfg, tok.pad_token_id, device)
    assert logged["loss"] == pytest.approx(slow, abs=1e-5) and abs(fast - slow) > 1e-5


@pytest.mark.parametrize("method", ["ilora", "olora"])
def test_variant_resumes_after_an_interrupted_stage_to_the_same_state(variant_runs, method, tmp_path, tiny_model_dir,
                                                                      data_dir, capsys):  # noqa: F811
    root = tmp_path / "run"
    shutil.copytree(variant_runs, root)  # a finished run whose stage 2 then "crashed" before done.json
    last = root / "ckpt" / method / f"seq_2_{TASKS[1]}"
    (last / "done.json").unlink()
    logs = {t: root / "logs" / f"seq_{method}_{t}_train_loss.jsonl" for t in TASKS}
    stage1 = read_jsonl(logs[TASKS[0]])
    capsys.readouterr()
    run_script(train_seq_baselines, root, tiny_model_dir, data_dir, *RUN_ARGS[method])
    out = capsys.readouterr().out
    assert "resuming after stage 1" in out and "stage 1/2" not in out and "stage 2/2" in out
    assert read_jsonl(logs[TASKS[0]]) == stage1
    original = variant_runs / "logs" / f"seq_{method}_{TASKS[1]}_train_loss.jsonl"
    assert stage_rows(logs[TASKS[1]], 2) == stage_rows(original, 2)  # same losses, terms and grad norms
    check_seq_eval_rows(root / "logs" / "seq_eval_loss.jsonl", method, (None,))
    a = load_file(variant_runs / "ckpt" / method / f"seq_2_{TASKS[1]}" / "adapter.safetensors")
    b = load_file(last / "adapter.safetensors")  # both branches (ilora) / the stack and the current LoRA (olora)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    before = snapshot_files(root)
    run_script(train_seq_baselines, root, tiny_model_dir, data_dir, *RUN_ARGS[method])
    assert "all 2 stages are done" in capsys.readouterr().out and snapshot_files(root) == before


def test_layer_freezing_control_adapts_every_layer_under_its_own_name(tmp_path, tiny_model_dir, data_dir):  # noqa: F811
    run_script(train_seq_baselines, tmp_path, tiny_model_dir, data_dir, "--method", "seq_lora", "--num_frozen_layers",
               "0", "--run_name", "seq_lora_all_layers")
    check_seq_eval_rows(tmp_path / "logs" / "seq_eval_loss.jsonl", "seq_lora_all_layers", (None,))
    tensors = load_file(tmp_path / "ckpt" / "seq_lora_all_layers" / f"seq_2_{TASKS[1]}" / "adapter.safetensors")
    assert {int(k.split("layers.")[1].split(".")[0]) for k in tensors} == {0, 1, 2, 3}  # all 4 layers of the tiny model
    assert json.loads((tmp_path / "logs" / "config_seq_lora_all_layers.json").read_text())["num_frozen_layers"] == 0


def test_recovery_probe_of_ilora_starts_from_the_slow_lora(variant_runs, tmp_path, tiny_model_dir, monkeypatch,
                                                          data_dir):  # noqa: F811
    """The probe trains the fast LoRA, so it first becomes a copy of the slow one (the model every stage evaluated)."""
    root = tmp_path / "run"
    shutil.copytree(variant_runs, root)
    saved = load_file(root / "ckpt" / "ilora" / f"seq_2_{TASKS[1]}" / "adapter.safetensors")
    seen = {}

    def fake_recovery(model, *args, **kwargs):
        seen.update({n: t.clone() for n, t in lora_state_dict(model).items()})
    monkeypatch.setattr(train_seq_baselines, "run_recovery", fake_recovery)
    run_script(train_seq_baselines, root, tiny_model_dir, data_dir, *RUN_ARGS["ilora"], "--recovery_probe", "true")
    assert seen.keys() == saved.keys()
    for n, t in seen.items():
        slow = n if n.endswith("_ema") else n + "_ema"
        assert torch.equal(t, saved[slow]), n  # fast = slow = the saved slow LoRA
    assert any(not torch.equal(saved[n], saved[n + "_ema"]) for n in saved if n.endswith("lora_B"))


def test_bench_train_step_times_every_method_on_a_tiny_model(tiny_model_dir, capsys):
    import bench_train_step
    bench_train_step.main(["--model_name", str(tiny_model_dir), "--num_frozen_layers", "2", "--device", "cpu",
                           "--steps", "1", "--seq_len", "24", "--batch", "2", "--compare_logits", "false",
                           "--methods", "seq_lora,replay,ewc,ilora,olora", "--earlier_tasks", "2"])
    out = capsys.readouterr().out
    for method in ("seq_lora", "replay", "ewc", "ilora", "olora"):
        assert f"{method}: " in out and "x seq_lora" in out.split(f"{method}: ")[1].splitlines()[0]
