"""Token-selective losses (`--loss_tokens key | low_ppl`, utils_tokens.py): the selection on hand-made per-token losses,
the base model's scores computed once per row and equal to the untouched base, `all` unchanged (and a keep-everything
selection bit-identical to it), method-name suffixes, and seq_lora end to end under both selections (tiny random
model, CPU)."""
import json
import math
from pathlib import Path

import pytest
import torch

import plot_loss
import train_seq_baselines
import train_slsd_seq
import utils_tokens
from configs.base_config import ConfigError, make_config
from conftest import make_tiny_llama
from test_train import TASKS, data_dir, toy_rows  # noqa: F401  (data_dir: fixture)
from models.ds_lora import replace_with_ds_lora, start_new_task
from models.lora_simple import lora_state_dict, mark_only_lora_as_trainable, replace_with_lora
from utils_data import IGNORE_INDEX, InstructionDataset, collate_fn, read_jsonl
from utils_forward import to_device, token_losses
from utils_results import ordered_methods, write_results_md
from utils_tokens import base_scores, select_loss_tokens, select_tokens
from utils_train import (accumulate_grads, apply_step, infinite_batches, kept_tokens_field, make_loader,
                         make_optimizer, mean_token_loss, method_name, stage_dir)

TARGETS = ["q_proj", "v_proj"]
CPU = torch.device("cpu")


def cfg_for(data_dir, **kw):
    return make_config(data_dir=str(data_dir), tasks=TASKS, device="cpu", **kw)


def lora_model(tok, dropout=0.0, seed=0, frozen=0):
    model = make_tiny_llama(len(tok), seed=seed)
    replace_with_lora(model, TARGETS, r=4, alpha=8, dropout=dropout, num_frozen_layers=frozen)
    mark_only_lora_as_trainable(model)
    return model


def randomize_b(model, seed=1):
    """Non-zero lora_B*, so the adapted model differs from the base (at init B = 0 and they are equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ----------------------------------------------------------------------------- 1. the selection
def test_key_keeps_the_highest_loss_fraction_at_exact_positions():
    losses = torch.tensor([0.1, 2.0, 0.5, 3.0, 1.0])
    keep = select_tokens(losses, "key", 0.6)  # round(0.6 * 5) = 3: positions 3, 1, 4
    assert keep.tolist() == [False, True, False, True, True]


def test_low_ppl_keeps_the_lowest_loss_fraction_at_exact_positions():
    losses = torch.tensor([0.1, 2.0, 0.5, 3.0, 1.0])
    assert select_tokens(losses, "low_ppl", 0.6).tolist() == [True, False, True, False, True]
    assert select_tokens(losses, "low_ppl", 0.8).tolist() == [True, True, True, False, True]  # only the worst masked


def test_key_and_low_ppl_at_one_half_split_an_even_row_into_complements():
    losses = torch.tensor([0.3, 5.0, 0.2, 4.0, 1.5, 0.9])
    key, low = select_tokens(losses, "key", 0.5), select_tokens(losses, "low_ppl", 0.5)
    assert key.sum() == low.sum() == 3 and torch.equal(key, ~low)


@pytest.mark.parametrize("n, frac, kept", [(1, 0.1, 1), (3, 0.1, 1), (10, 0.7, 7), (10, 0.75, 8), (10, 0.74, 7),
                                           (7, 1.0, 7)])
def test_the_kept_count_is_the_rounded_fraction_and_at_least_one(n, frac, kept):
    losses = torch.linspace(0, 1, n)
    for mode in ("key", "low_ppl"):
        assert int(select_tokens(losses, mode, frac).sum()) == kept


def test_ties_go_to_the_earlier_position_and_nan_counts_as_the_highest_loss():
    assert select_tokens(torch.ones(4), "key", 0.5).tolist() == [True, True, False, False]
    assert select_tokens(torch.ones(4), "low_ppl", 0.5).tolist() == [True, True, False, False]
    losses = torch.tensor([0.5, float("nan"), 0.2])
    assert select_tokens(losses, "key", 0.3).tolist() == [False, True, False]
    assert select_tokens(losses, "low_ppl", 0.7).tolist() == [True, False, True]


def test_low_ppl_threshold_masks_tokens_whose_perplexity_exceeds_tau_and_keeps_the_best_if_all_do():
    losses = torch.tensor([math.log(2.0), math.log(3.0), math.log(2.4), math.log(1.1), math.log(9.0)])
    assert select_tokens(losses, "low_ppl", 0.1, threshold=2.5).tolist() == [True, False, True, True, False]
    high = torch.tensor([math.log(4.0), math.log(3.0), math.log(3.0)])
    assert select_tokens(high, "low_ppl", 0.1, threshold=2.5).tolist() == [False, True, False]


def test_config_rejects_bad_selection_values_naming_the_field():
    for kw, field in ((dict(loss_tokens="rho"), "loss_tokens"), (dict(key_token_frac=0.0), "key_token_frac"),
                      (dict(low_ppl_token_frac=1.5), "low_ppl_token_frac"),
                      (dict(low_ppl_threshold=0.5), "low_ppl_threshold")):
        with pytest.raises(ConfigError, match=field):
            make_config(**kw)


# ----------------------------------------------------------------------------- 2. masking a batch, base scores once
@pytest.mark.parametrize("kw, mode, frac, tau", [(dict(loss_tokens="key", key_token_frac=0.5), "key", 0.5, 0.0),
                                                 (dict(loss_tokens="low_ppl"), "low_ppl", 0.75, 0.0),
                                                 (dict(loss_tokens="low_ppl", low_ppl_threshold=300.0), "low_ppl",
                                                  0.75, 300.0)])
def test_masking_sets_exactly_the_unselected_response_labels_to_ignore(tiny_tokenizer, data_dir, kw, mode, frac,
                                                                       tau):
    cfg = cfg_for(data_dir, **kw)
    model = lora_model(tiny_tokenizer)
    ds = InstructionDataset(cfg.task_path("T2_math", "train"), tiny_tokenizer, cfg)
    batch = collate_fn([ds[i] for i in range(4)], tiny_tokenizer.pad_token_id)
    before = batch["labels"].clone()
    masked, kept, total = select_loss_tokens(model, batch, cfg)
    with torch.no_grad():
        losses, row = token_losses(model, batch)  # the model is the base here (B = 0)
    assert total == losses.numel() and kept == int(masked["labels"][:, 1:].ne(IGNORE_INDEX).sum())
    assert 0 < kept < total  # a real selection (tau = 300 sits inside the random model's perplexities ~ vocab size)
    for i in range(4):
        pos = (batch["labels"][i, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
        want = select_tokens(losses[row == i], mode, frac, tau)
        still = masked["labels"][i, 1:][pos] != IGNORE_INDEX
        assert torch.equal(still, want), i
        assert torch.equal(masked["labels"][i, 1:][pos[want]], batch["labels"][i, 1:][pos[want]])
        off = torch.ones_like(batch["labels"][i], dtype=torch.bool)
        off[pos + 1] = False
        assert torch.equal(masked["labels"][i][off], batch["labels"][i][off])  # prompt and padding untouched
    assert torch.equal(batch["labels"], before)  # the input batch is not modified in place
    assert torch.equal(masked["input_ids"], batch["input_ids"])


def test_base_scores_are_computed_once_per_sample_id_and_equal_the_untouched_base(tiny_tokenizer, data_dir,
                                                                                  monkeypatch):
    cfg = cfg_for(data_dir, loss_tokens="low_ppl", per_device_batch_size=4)
    model = lora_model(tiny_tokenizer)
    randomize_b(model)  # the adapted model is not the base: scores must come with the adapters off
    ds = InstructionDataset(cfg.task_path("T1_general", "train"), tiny_tokenizer, cfg)  # 8 rows
    scored = []
    real = utils_tokens.token_losses
    monkeypatch.setattr(utils_tokens, "token_losses",
                        lambda m, b: (scored.append(b["input_ids"].shape[0]), real(m, b))[1])
    batches = infinite_batches(make_loader(ds, 4, tiny_tokenizer.pad_token_id, shuffle=True, seed=3))
    opt = make_optimizer([{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-2}])
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(6):  # three passes over the 8 rows
        st = accumulate_grads(model, batches, cfg, CPU)
        apply_step(params, [opt], [], 1.0)
        assert 0 < st["kept_token_frac"] < 1
    cache = base_scores(model)
    assert scored == [4, 4] and (cache.rows_scored, cache.passes) == (8, 2)  # the first pass only
    assert sorted(k[0] for k in cache.cache) == sorted(ds.ids)
    base = make_tiny_llama(len(tiny_tokenizer))
    for i, sid in enumerate(ds.ids):
        b = collate_fn([ds[i]], tiny_tokenizer.pad_token_id)
        with torch.no_grad():
            want, _ = token_losses(base, b)
        got = next(v for k, v in cache.cache.items() if k[0] == sid)
        assert torch.allclose(got, want, atol=1e-5), sid


def test_ds_lora_rows_are_scored_by_the_base_with_slow_fast_and_banked_branches_off(tiny_tokenizer, data_dir):
    cfg = cfg_for(data_dir, loss_tokens="key")
    model = make_tiny_llama(len(tiny_tokenizer))
    replace_with_ds_lora(model, TARGETS, 4, 8, 0.0, r_fast=2)
    mark_only_lora_as_trainable(model)
    start_new_task(model, "T1_general", seed=1)
    randomize_b(model, seed=2)
    start_new_task(model, "T2_math", seed=3)  # T1's fast weights go to the bank
    randomize_b(model, seed=4)
    ds = InstructionDataset(cfg.task_path("T2_math", "train"), tiny_tokenizer, cfg)
    batch = collate_fn([ds[i] for i in range(3)], tiny_tokenizer.pad_token_id)
    per_row = base_scores(model).row_losses(model, batch)
    with torch.no_grad():
        want, row = token_losses(make_tiny_llama(len(tiny_tokenizer)), batch)
        adapted, _ = token_losses(model, batch)
    assert not torch.allclose(adapted, want, atol=1e-3)
    assert torch.allclose(torch.cat(per_row), want, atol=1e-5)


def test_rows_sharing_an_id_but_not_their_tokens_get_their_own_scores(tiny_tokenizer, data_dir):
    cfg = cfg_for(data_dir)
    model = lora_model(tiny_tokenizer)
    rows = toy_rows("T1_general", 2, "x")
    a = InstructionDataset("a", tiny_tokenizer, cfg, rows=[{k: v for k, v in rows[0].items() if k != "id"}])
    b = InstructionDataset("b", tiny_tokenizer, cfg, rows=[{k: v for k, v in rows[1].items() if k != "id"}])
    assert a.ids == b.ids == ["row:0"]
    ba, bb = (next(infinite_batches(make_loader(d, 1, tiny_tokenizer.pad_token_id))) for d in (a, b))
    cache = base_scores(model)
    la, lb = cache.row_losses(model, ba)[0], cache.row_losses(model, bb)[0]
    assert cache.rows_scored == 2 and la.numel() != lb.numel()


# ----------------------------------------------------------------------------- 3. `all` is the old training
def train_steps(model, ds, cfg, tok, steps=3):
    torch.manual_seed(7)  # dropout draws
    model.train()  # as the scripts train: LoRA dropout on
    batches = infinite_batches(make_loader(ds, 4, tok.pad_token_id, shuffle=True, seed=5))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer([{"params": params, "lr": 1e-2}])
    out = []
    for _ in range(steps):
        st = accumulate_grads(model, batches, cfg, CPU)
        apply_step(params, [opt], [], 1.0)
        out.append(st)
    return out, {k: v.clone() for k, v in lora_state_dict(model).items()}


def reference_steps(model, ds, tok, steps=3):
    """The training step before token selection existed: mean CE over every response token, backward, step."""
    torch.manual_seed(7)
    model.train()
    loader = make_loader(ds, 4, tok.pad_token_id, shuffle=True, seed=5)
    batches = (b for _ in range(steps) for b in loader)  # the plain reshuffling cycle
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer([{"params": params, "lr": 1e-2}])
    losses = []
    for _ in range(steps):
        loss, _ = mean_token_loss(model, to_device(next(batches), CPU))
        loss.backward()
        apply_step(params, [opt], [], 1.0)
        losses.append(float(loss.detach()))
    return losses, {k: v.clone() for k, v in lora_state_dict(model).items()}


def test_all_is_bit_identical_to_the_training_step_before_selection(tiny_tokenizer, data_dir):
    cfg = cfg_for(data_dir)
    assert cfg.loss_tokens == "all"
    ds = InstructionDataset(cfg.task_path("T2_math", "train"), tiny_tokenizer, cfg)
    stats, weights = train_steps(lora_model(tiny_tokenizer, dropout=0.1), ds, cfg, tiny_tokenizer)
    ref_losses, ref_weights = reference_steps(lora_model(tiny_tokenizer, dropout=0.1), ds, tiny_tokenizer)
    assert [s["loss"] for s in stats] == ref_losses
    assert all(set(s) == {"loss", "micro", "skipped_nan", "skipped_empty"} for s in stats)  # no selection fields
    assert all(kept_tokens_field(s) == {} for s in stats)
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


@pytest.mark.parametrize("mode", ["key", "low_ppl"])
def test_keeping_every_token_is_bit_identical_to_all_despite_the_scoring_pass(tiny_tokenizer, data_dir, mode):
    """The extra no-grad pass leaves no trace: weights restored, train mode restored, no random numbers drawn."""
    ds = InstructionDataset(cfg_for(data_dir).task_path("T2_math", "train"), tiny_tokenizer, cfg_for(data_dir))
    base_stats, base_w = train_steps(lora_model(tiny_tokenizer, dropout=0.1, frozen=2), ds, cfg_for(data_dir),
                                     tiny_tokenizer)
    cfg = cfg_for(data_dir, loss_tokens=mode, key_token_frac=1.0, low_ppl_token_frac=1.0)
    model = lora_model(tiny_tokenizer, dropout=0.1, frozen=2)  # layers 0-1 frozen: the handoff can skip them
    stats, w = train_steps(model, ds, cfg, tiny_tokenizer)
    assert [s["loss"] for s in stats] == [s["loss"] for s in base_stats]
    assert all(s["kept_token_frac"] == 1.0 for s in stats)
    assert all(torch.equal(w[k], base_w[k]) for k in w)
    # and the training forwards started from the scoring pass's frozen trunk (the handoff), bit-identically
    scores = base_scores(model)
    assert scores.first == 2 and scores.handoff_ok and scores.handoffs == scores.passes >= 1  # a pass per new batch


def test_the_trunk_handoff_is_skipped_when_the_training_rows_differ(tiny_tokenizer, data_dir):
    """Replay appends rows inside its loss: the forward is not the scored one, so it runs every layer."""
    cfg = cfg_for(data_dir, loss_tokens="key")
    ds = InstructionDataset(cfg.task_path("T2_math", "train"), tiny_tokenizer, cfg)
    model = lora_model(tiny_tokenizer, frozen=2)
    batch = to_device(next(iter(make_loader(ds, 4, tiny_tokenizer.pad_token_id, shuffle=False, seed=0))), CPU)
    masked, _, _ = select_loss_tokens(model, batch, cfg)
    scores = base_scores(model)
    assert scores.handoff is not None
    decoder = model.get_decoder()
    n_layers = len(decoder.layers)
    seen = []
    hook = decoder.layers[0].register_forward_pre_hook(lambda m, a: seen.append(1))
    try:
        with scores.training_forward(model):
            doubled = {k: torch.cat([v, v]) for k, v in masked.items() if torch.is_tensor(v)}
            token_losses(model, doubled)  # other rows: the whole decoder runs (layer 0 is called)
            token_losses(model, masked)  # the handoff was for one forward only: this one runs every layer too
    finally:
        hook.remove()
    assert len(seen) == 2 and scores.handoffs == 0 and scores.handoff is None and len(decoder.layers) == n_layers


def test_a_selection_changes_the_loss_and_logs_the_kept_share(tiny_tokenizer, data_dir):
    ds = InstructionDataset(cfg_for(data_dir).task_path("T2_math", "train"), tiny_tokenizer, cfg_for(data_dir))
    base_stats, _ = train_steps(lora_model(tiny_tokenizer), ds, cfg_for(data_dir), tiny_tokenizer, steps=1)
    key, _ = train_steps(lora_model(tiny_tokenizer), ds, cfg_for(data_dir, loss_tokens="key"), tiny_tokenizer, 1)
    low, _ = train_steps(lora_model(tiny_tokenizer), ds, cfg_for(data_dir, loss_tokens="low_ppl"), tiny_tokenizer, 1)
    assert low[0]["loss"] < base_stats[0]["loss"] < key[0]["loss"]  # the easiest tokens vs the hardest ones
    assert 0.5 < key[0]["kept_token_frac"] < 0.7 and 0.65 < low[0]["kept_token_frac"] < 0.85
    assert kept_tokens_field(key[0]) == {"kept_token_frac": round(key[0]["kept_token_frac"], 4)}


# ----------------------------------------------------------------------------- 4. method names
def test_method_name_gets_the_selection_suffix_and_stage_dirs_refuse_a_mismatch(tmp_path):
    all_, key, low = (make_config(loss_tokens=m, save_dir=str(tmp_path)) for m in ("all", "key", "low_ppl"))
    assert method_name(all_, None, "seq_lora") == "seq_lora"
    assert method_name(key, None, "seq_lora") == "seq_lora+key"
    assert method_name(low, None, "ds_lora_slsd") == "ds_lora_slsd+low_ppl"
    assert method_name(key, "seq_lora_r16", "seq_lora") == "seq_lora_r16+key"
    with pytest.raises(SystemExit, match="letters, digits"):  # a user name cannot fake a suffix
        method_name(all_, "seq_lora+key", "seq_lora")
    assert stage_dir(key, "seq_lora+key", 1, "T1_general") == tmp_path / "seq_lora+key" / "seq_1_T1_general"
    for cfg, name in ((key, "seq_lora"), (all_, "seq_lora+key"), (low, "seq_lora+key")):
        with pytest.raises(SystemExit, match="does not match --loss_tokens"):
            stage_dir(cfg, name, 1, "T1_general")


def test_results_order_puts_each_variant_after_its_method():
    methods = ["seq_lora+low_ppl", "zeta", "replay", "seq_lora", "seq_lora+key", "ds_lora_slsd+key", "ds_lora_slsd"]
    assert ordered_methods(methods) == ["ds_lora_slsd", "ds_lora_slsd+key", "seq_lora", "seq_lora+key",
                                        "seq_lora+low_ppl", "replay", "zeta"]
    assert plot_loss.style("seq_lora+key")[0] == plot_loss.style("seq_lora")[0]


# ----------------------------------------------------------------------------- 5. end to end
def smoke_args(model_dir, data_dir, root, *extra) -> list[str]:
    return ["--model_name", str(model_dir), "--data_dir", str(data_dir), "--tasks", ",".join(TASKS),
            "--max_steps_per_task", "2", "--log_dir", str(root / "logs"), "--save_dir", str(root / "ckpt"),
            "--run_metrics", "false", "--per_device_batch_size", "4", "--num_frozen_layers", "2",
            "--eval_max_samples", "4", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def selective_runs(tmp_path_factory, tiny_model_dir, data_dir):
    """seq_lora, inscl, ilora and olora with --loss_tokens key and with low_ppl, and DS-LoRA+SLSD with key, in one
    log and checkpoint folder."""
    root = tmp_path_factory.mktemp("selective")
    for mode in ("key", "low_ppl"):
        for method in SELECTIVE_METHODS:
            train_seq_baselines.main(smoke_args(tiny_model_dir, data_dir, root, "--method", method,
                                                "--loss_tokens", mode, "--replay_buffer_size", "4",
                                                "--inscl_embed_rows", "4"))
    train_slsd_seq.main(smoke_args(tiny_model_dir, data_dir, root, "--loss_tokens", "key", "--probe_size_per_task",
                                   "4", "--eval_fast_modes", "current", "--final_fast_modes", "none",
                                   "--router_rows_per_task", "2"))
    return root


SELECTIVE_METHODS = ("seq_lora", "inscl", "ilora", "olora")


@pytest.mark.parametrize("base, mode", [(m, mode) for mode in ("key", "low_ppl") for m in SELECTIVE_METHODS]
                         + [("ds_lora_slsd", "key")])
def test_a_method_with_a_selection_writes_the_full_grid_under_the_suffixed_name(selective_runs, mode, base):
    root, method = selective_runs, f"{base}+{mode}"
    logs = root / "logs"
    rows = [r for r in read_jsonl(logs / "seq_eval_loss.jsonl")  # DS-LoRA: the current view (its others add rows)
            if r["method"] == method and r.get("fast_mode") in (None, "current")]
    cells = sorted((r["stage"], r["eval_task"]) for r in rows)
    assert cells == [(s, t) for s in (0, 1, 2) for t in TASKS]  # base + both stages, every task, once each
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    for stage, task in enumerate(TASKS, 1):
        assert (root / "ckpt" / method / f"seq_{stage}_{task}" / "done.json").exists()
        train_log = logs / (f"seq_{task}_train_loss.jsonl" if base == "ds_lora_slsd"
                            else f"seq_{method}_{task}_train_loss.jsonl")
        train = [r for r in read_jsonl(train_log) if r["split"] == "train" and r["method"] == method]
        assert [r["stage_step"] for r in train] == [1, 2]
        assert all(0 < r["kept_token_frac"] < 1 for r in train)
    assert not (root / "ckpt" / base).exists()  # nothing under the plain name
    assert json.loads((logs / f"config_{method}.json").read_text())["loss_tokens"] == mode


def test_selective_runs_reach_the_results_table_and_plots(selective_runs):
    logs = selective_runs / "logs"
    table = write_results_md(logs, TASKS)
    assert table.index("| seq_lora+key |") < table.index("| seq_lora+low_ppl |")
    for method in ("seq_lora+key", "seq_lora+low_ppl"):
        summary = json.loads((logs / f"cl_summary_{method}.json").read_text())
        assert summary["method"] == method and summary["matrices"]["loss"]["R"][2][0] > 0
    assert plot_loss.main(["seq", "--log_dir", str(logs), "--tasks", ",".join(TASKS)]) == 0
    assert (logs / "seq_eval_loss.png").exists() and (logs / "seq_train_loss.png").exists()
    assert Path(logs / "results.md").exists()
