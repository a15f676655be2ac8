"""export_adapter.py on a tiny random LLaMA (CPU, seconds): every view loads in PEFT (`PeftModel.from_pretrained`) and
gives the project's logits in the matching fast mode; merged folders load with AutoModelForCausalLM and match too;
views PEFT cannot express and bad checkpoints are refused with messages that say why. The last tests export real
checkpoints written by the training scripts."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import export_adapter
import train_seq_baselines
import train_slsd_seq
from configs.base_config import make_config
from conftest import make_tiny_llama
from export_adapter import ExportError, export
from models.ds_lora import (ds_lora_layers, fast_mode, load_ds_lora, replace_with_ds_lora, save_ds_lora,
                            start_new_task)
from models.lora_simple import adapter_layers, load_lora, peft_key, replace_with_lora, save_lora
from utils_train import mark_done

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]
TASKS = ("T1_general", "T2_math")


# ----------------------------------------------------------------------------- helpers (test_families.py uses them)
def load_base(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def input_ids(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=g)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def randomize(model, which: str, seed: int, std: float = 0.2):
    """Random values for every adapter tensor whose name contains `which` (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if which in n:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def ds_checkpoint(model_dir, root: Path, targets=TARGETS, r=4, r_fast=2, alpha=8.0, k=1, tasks=TASKS):
    """A finished DS-LoRA stage checkpoint (as train_slsd_seq.py writes it) after training `tasks` with different
    random weights per task: the last task active, the others banked. Returns (folder, the project's model)."""
    cfg = make_config([], model_name=str(model_dir), lora_r=r, lora_r_fast=r_fast, lora_alpha=alpha,
                      lora_target_modules=tuple(targets), num_frozen_layers=k, tasks=tuple(tasks))
    model = load_base(model_dir)
    replace_with_ds_lora(model, targets, r, alpha, 0.0, k, r_fast=cfg.r_fast)
    for i, task in enumerate(tasks):
        start_new_task(model, task, seed=i)
        randomize(model, "lora_B", seed=10 + i)  # slow and this task's fast branch
    randomize(model, "lora_A_slow", seed=99, std=0.1)
    ckpt = root / "ckpt" / "ds_lora" / f"seq_{len(tasks)}_{tasks[-1]}"
    save_ds_lora(model, ckpt)
    mark_done(ckpt, cfg, {"method": "ds_lora", "stage": len(tasks), "task": tasks[-1], "step": 4})
    return ckpt, model


def lora_checkpoint(model_dir, root: Path, targets=TARGETS, r=4, alpha=8.0, k=0):
    """A finished Seq-LoRA stage checkpoint (as train_seq_baselines.py writes it) and the project's model."""
    cfg = make_config([], model_name=str(model_dir), lora_r=r, lora_alpha=alpha, lora_target_modules=tuple(targets),
                      num_frozen_layers=k)
    model = load_base(model_dir)
    replace_with_lora(model, targets, r, alpha, 0.0, k)
    randomize(model, "lora_B", seed=1)
    ckpt = root / "ckpt" / "seq_lora" / "seq_2_T2_math"
    save_lora(model, str(ckpt / "adapter.safetensors"))
    mark_done(ckpt, cfg, {"method": "seq_lora", "stage": 2, "task": "T2_math", "step": 4})
    return ckpt, model


def peft_logits(model_dir, out, ids):
    """Logits of the base model with the exported adapter loaded by PEFT itself."""
    model = peft.PeftModel.from_pretrained(load_base(model_dir), str(out)).eval()
    return logits(model, ids)


def merged_logits(out, ids):
    return logits(load_base(out), ids)


DS_VIEWS = [("slow", "none", None), ("task:T1_general", "own_task", "T1_general"),
            ("task:T2_math", "own_task", "T2_math"), ("current", "current", None)]


# ----------------------------------------------------------------------------- every view equals the project's model
@pytest.mark.parametrize("view,mode,task", DS_VIEWS)
def test_ds_view_loaded_by_peft_gives_the_project_logits_in_the_matching_fast_mode(tiny_model_dir, tmp_path, view,
                                                                                   mode, task):
    ckpt, model = ds_checkpoint(tiny_model_dir, tmp_path)  # scalings differ: slow 8/4 = 2, fast 8/2 = 4
    ids = input_ids(model)
    with fast_mode(model, mode, task):
        want = logits(model, ids)
    with fast_mode(model, "none"):
        slow = logits(model, ids)
    base = logits(load_base(tiny_model_dir), ids)
    assert (want - base).abs().max() > 1e-2  # the adapters do something
    if mode != "none":
        assert (want - slow).abs().max() > 1e-2  # the fast branch matters, so a wrong branch would show
    info = export(ckpt, tmp_path / "out", view=view)
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "out", ids), want, atol=1e-5, rtol=0)
    assert info["view"] == ("task:T2_math" if view == "current" else view)


def test_seq_lora_adapter_loaded_by_peft_gives_the_project_logits(tiny_model_dir, tmp_path):
    ckpt, model = lora_checkpoint(tiny_model_dir, tmp_path, targets=["q_proj", "o_proj", "down_proj"])
    ids = input_ids(model)
    want = logits(model, ids)
    assert (want - logits(load_base(tiny_model_dir), ids)).abs().max() > 1e-2
    info = export(ckpt, tmp_path / "out")
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "out", ids), want, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], info["view"]) == (4, 8, "adapter")  # one to one, alpha kept
    assert config["target_modules"] == ["down_proj", "o_proj", "q_proj"] and config["layers_to_transform"] is None
    # exactly the project's tensors under PEFT's names
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), framework="pt") as f:
        for name, layer in adapter_layers(model):
            assert torch.equal(f.get_tensor(peft_key(name, "A")), layer.lora_A)
            assert torch.equal(f.get_tensor(peft_key(name, "B")), layer.lora_B)


def variant_checkpoint(model_dir, root: Path, method: str, r=4, alpha=8.0, k=1):
    """A finished I-LoRA or O-LoRA stage-3 checkpoint (as train_seq_baselines.py writes it) whose every LoRA holds
    different random weights (I-LoRA: fast and EMA; O-LoRA: the current task and two earlier ones)."""
    from models.lora_variants import replace_with_ilora, replace_with_olora, start_olora_task
    cfg = make_config([], model_name=str(model_dir), lora_r=r, lora_alpha=alpha, lora_target_modules=tuple(TARGETS),
                      num_frozen_layers=k)
    model = load_base(model_dir)
    (replace_with_ilora if method == "ilora" else replace_with_olora)(model, TARGETS, r, alpha, 0.0, k)
    if method == "ilora":
        randomize(model, "lora_B", seed=1)  # lora_B and lora_B_ema
        randomize(model, "lora_A_ema", seed=2)
    else:
        for task in range(3):
            if task:
                start_olora_task(model, seed=task)
            randomize(model, "lora_B", seed=10 + task)  # this task's B (earlier ones are rewritten alike below)
        randomize(model, "lora_B_old", seed=20)
    ckpt = root / "ckpt" / method / "seq_3_T3_code"
    save_lora(model, str(ckpt / "adapter.safetensors"))
    mark_done(ckpt, cfg, {"method": method, "stage": 3, "task": "T3_code", "step": 6})
    return ckpt, model


@pytest.mark.parametrize("view", [None, "slow", "fast"])
def test_ilora_views_loaded_by_peft_give_the_project_logits(tiny_model_dir, tmp_path, view):
    from models.lora_variants import lora_view
    ckpt, model = variant_checkpoint(tiny_model_dir, tmp_path, "ilora")
    ids = input_ids(model)
    with lora_view(model, view or "slow"):  # the default is the EMA LoRA, the one I-LoRA's evaluation uses
        want = logits(model, ids)
    with lora_view(model, "fast" if view != "fast" else "slow"):
        other = logits(model, ids)
    assert (want - other).abs().max() > 1e-2  # the views differ, so the wrong one would show
    info = export(ckpt, tmp_path / "out", view=view)
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "out", ids), want, atol=1e-5, rtol=0)
    assert (info["view"], info["r"], info["method"]) == (view or "slow", 4, "ilora")
    with pytest.raises(ExportError, match="I-LoRA checkpoint: export --view slow"):
        export(ckpt, tmp_path / "bad", view="task:T1_general")


def test_olora_export_is_the_sum_of_every_task_lora(tiny_model_dir, tmp_path):
    ckpt, model = variant_checkpoint(tiny_model_dir, tmp_path, "olora")
    ids = input_ids(model)
    want = logits(model, ids)
    info = export(ckpt, tmp_path / "out")
    got = peft_logits(tiny_model_dir, tmp_path / "out", ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (info["r"], info["lora_alpha"], info["view"]) == (12, 24, "adapter")  # 3 tasks x r 4, scaling kept
    # the earlier tasks' LoRAs matter (an export of the current task's alone would not match)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B_old" in n:
                p.zero_()
    assert (want - logits(model, ids)).abs().max() > 1e-2
    export(ckpt, tmp_path / "merged", merge=True)
    torch.testing.assert_close(merged_logits(tmp_path / "merged", ids), want, atol=1e-5, rtol=0)


def test_adapter_files_have_peft_key_names_config_and_stacked_weights(tiny_model_dir, tmp_path):
    ckpt, model = ds_checkpoint(tiny_model_dir, tmp_path, r=4, r_fast=2, alpha=8.0, k=1)
    out = tmp_path / "out"
    export(ckpt, out, view="task:T1_general")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "export_info.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}  # shareable, not private
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["bias"]) == ("LORA", "CAUSAL_LM", "none")
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert (config["r"], config["lora_alpha"]) == (6, 12)  # stacked rank 4 + 2; lora_alpha / r = the slow scaling 2
    assert config["target_modules"] == TARGETS and config["layers_to_transform"] == [1, 2, 3]  # layer 0 frozen
    assert config["layers_pattern"] == "layers" and config["use_rslora"] is False and config["use_dora"] is False
    names = [n for n, _ in ds_lora_layers(model)]
    assert len(names) == 6 and not any(".layers.0." in n for n in names)
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert keys == {peft_key(n, w) for n in names for w in "AB"}
        for name, layer in ds_lora_layers(model):
            a, b = f.get_tensor(peft_key(name, "A")), f.get_tensor(peft_key(name, "B"))
            bank_a, bank_b = (layer.get_buffer(f"lora_fast_bank_T1_general_{w}") for w in "AB")
            assert torch.equal(a, torch.cat([layer.lora_A_slow, bank_a], 0))  # (6, in): rows stacked
            assert torch.equal(b[:, :4], layer.lora_B_slow)  # slow columns copied
            torch.testing.assert_close(b[:, 4:], bank_b * 2.0, atol=0, rtol=0)  # fast columns * s_fast / s_slow = 4 / 2
    # PEFT builds the same keys from this config on the same base model
    fields = ("r", "lora_alpha", "target_modules", "layers_to_transform", "layers_pattern", "lora_dropout", "bias")
    reference = peft.get_peft_model(load_base(tiny_model_dir), peft.LoraConfig(**{k: config[k] for k in fields}))
    assert set(peft.get_peft_model_state_dict(reference)) == keys
    info = json.loads((out / "export_info.json").read_text())
    assert [b["branch"] for b in info["branches"]] == ["slow", "fast:T1_general"]
    assert (info["method"], info["stage"], info["view"], info["format"]) == ("ds_lora", 2, "task:T1_general",
                                                                             "peft_lora")


def test_equal_scalings_stack_without_rescaling(tiny_model_dir, tmp_path):
    ckpt, model = ds_checkpoint(tiny_model_dir, tmp_path, r=4, r_fast=0, alpha=8.0, k=0)  # r_fast = r: same scaling
    export(ckpt, tmp_path / "out", view="current")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["layers_to_transform"]) == (8, 16, None)
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), framework="pt") as f:
        for name, layer in ds_lora_layers(model):
            assert torch.equal(f.get_tensor(peft_key(name, "B")), torch.cat([layer.lora_B_slow, layer.lora_B_fast], 1))
    ids = input_ids(model)
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "out", ids), logits(model, ids), atol=1e-5,
                               rtol=0)


def test_target_without_layer_index_falls_back_to_exact_module_names(tiny_model_dir, tmp_path):
    """lm_head has no 'layers.{i}', so num_frozen_layers keeps it adapted, which layers_to_transform cannot say."""
    ckpt, model = lora_checkpoint(tiny_model_dir, tmp_path, targets=["q_proj", "lm_head"], k=2)
    export(ckpt, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["lm_head", "model.layers.2.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]
    assert config["layers_to_transform"] is None
    ids = input_ids(model)
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "out", ids), logits(model, ids), atol=1e-5,
                               rtol=0)
    with pytest.raises(ExportError, match=r"lm_head.weight is tied to \['model.embed_tokens.weight'\]"):
        export(ckpt, tmp_path / "merged", merge=True)  # the tiny LLaMA ties lm_head to the embeddings
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.tmp_*"))


# ----------------------------------------------------------------------------- merged models
@pytest.mark.parametrize("kind,view,mode,task", [("ds", "task:T1_general", "own_task", "T1_general"),
                                                 ("ds", "slow", "none", None), ("lora", None, None, None)])
def test_merged_folder_loads_with_automodel_and_matches(tiny_model_dir, tmp_path, kind, view, mode, task):
    if kind == "ds":
        ckpt, model = ds_checkpoint(tiny_model_dir, tmp_path)
    else:
        ckpt, model = lora_checkpoint(tiny_model_dir, tmp_path)
    ids = input_ids(model)
    if kind == "ds":
        with fast_mode(model, mode, task):
            want = logits(model, ids)
    else:
        want = logits(model, ids)
    out = tmp_path / "merged"
    info = export(ckpt, out, view=view, merge=True)
    assert info["format"] == "merged_hf_model"
    merged = load_base(out)
    assert not any("lora" in n for n in merged.state_dict())  # a plain model
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-5, rtol=0)
    # only the adapted weights changed
    base_sd, merged_sd = load_base(tiny_model_dir).state_dict(), merged.state_dict()
    adapted = {f"{n}.weight" for n, _ in adapter_layers(model)}
    assert all(torch.equal(base_sd[k], merged_sd[k]) for k in base_sd if k not in adapted)
    assert all(not torch.equal(base_sd[k], merged_sd[k]) for k in adapted)
    tok = AutoTokenizer.from_pretrained(out)  # the tokenizer (with its chat template) travels with the model
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template


# ----------------------------------------------------------------------------- refusals and bad input
@pytest.mark.parametrize("view", ["routed", "routed_soft"])
def test_routed_views_are_refused_with_the_reason_and_write_nothing(tiny_model_dir, tmp_path, view):
    ckpt, _ = ds_checkpoint(tiny_model_dir, tmp_path)
    with pytest.raises(ExportError, match=f"--view {view} cannot be exported.*for each input row at run time"):
        export(ckpt, tmp_path / "out", view=view)
    with pytest.raises(SystemExit) as exit_info:
        export_adapter.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--view", view])
    message = str(exit_info.value.code)
    assert message.startswith("export_adapter: ") and "--view task:T for T in ['T1_general', 'T2_math']" in message
    assert not (tmp_path / "out").exists()


def test_ds_checkpoint_needs_a_view_and_names_the_choices(tiny_model_dir, tmp_path):
    ckpt, _ = ds_checkpoint(tiny_model_dir, tmp_path)
    with pytest.raises(ExportError, match=r"choose what to export with --view \(slow, task:T1_general, "
                                          r"task:T2_math, current\)"):
        export(ckpt, tmp_path / "out")
    with pytest.raises(ExportError, match=r"no fast branch for task 'T3_code'; it holds \['T1_general', 'T2_math'\]"):
        export(ckpt, tmp_path / "out", view="task:T3_code")
    with pytest.raises(ExportError, match="own_task needs its task"):
        export(ckpt, tmp_path / "out", view="own_task")
    with pytest.raises(ExportError, match="unknown --view 'fast'"):
        export(ckpt, tmp_path / "out", view="fast")


def test_lora_checkpoint_has_no_views(tiny_model_dir, tmp_path):
    ckpt, _ = lora_checkpoint(tiny_model_dir, tmp_path)
    with pytest.raises(ExportError, match="single-adapter LoRA checkpoint: it has no views, so drop --view slow"):
        export(ckpt, tmp_path / "out", view="slow")


def test_missing_or_unfinished_checkpoint_is_named(tiny_model_dir, tmp_path):
    missing = tmp_path / "ckpt" / "ds_lora" / "seq_9_T5_safety"
    with pytest.raises(ExportError, match=re.escape(f"{missing}: no such checkpoint folder")):
        export(missing, tmp_path / "out")
    ckpt, _ = ds_checkpoint(tiny_model_dir, tmp_path)
    (ckpt / "done.json").unlink()  # the stage crashed before finishing
    with pytest.raises(ExportError, match=re.escape(f"{ckpt}: no done.json, so this stage did not finish")):
        export(ckpt, tmp_path / "out", view="slow")
    (ckpt / "done.json").write_text("{}")
    (ckpt / "adapter_fast.safetensors").unlink()
    with pytest.raises(ExportError, match=r"expected adapter.safetensors \(LoRA\) or adapter_slow.safetensors \+ "
                                          r"adapter_fast.safetensors \(DS-LoRA\)"):
        export(ckpt, tmp_path / "out", view="slow")


def test_checkpoint_of_another_base_model_is_refused(tiny_model_dir, tiny_tokenizer, tmp_path):
    ckpt, _ = ds_checkpoint(tiny_model_dir, tmp_path)
    other = tmp_path / "two_layer_llama"
    make_tiny_llama(len(tiny_tokenizer), num_layers=2).save_pretrained(other)
    with pytest.raises(ExportError, match="adapts 6 modules .* select 2 in the base model .* --base_model"):
        export(ckpt, tmp_path / "out", view="slow", base_model=other)


def test_existing_output_needs_overwrite_and_is_replaced_whole(tiny_model_dir, tmp_path):
    ckpt, model = ds_checkpoint(tiny_model_dir, tmp_path)
    out = tmp_path / "out"
    export(ckpt, out, view="slow")
    with pytest.raises(ExportError, match="already exists and is not empty; pass --overwrite"):
        export(ckpt, out, view="task:T1_general")
    assert json.loads((out / "export_info.json").read_text())["view"] == "slow"  # untouched
    export(ckpt, out, view="task:T1_general", overwrite=True)
    assert json.loads((out / "export_info.json").read_text())["view"] == "task:T1_general"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]  # no temporary or old folder left
    ids = input_ids(model)
    with fast_mode(model, "own_task", "T1_general"):
        torch.testing.assert_close(peft_logits(tiny_model_dir, out, ids), logits(model, ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- real checkpoints of the scripts
def toy_rows(task: str, n: int, split: str) -> list[dict]:
    rows = []
    for i in range(n):
        if task == "T1_general":
            row = {"instruction": f"What is the capital of France? ({split} {i})", "input": "",
                   "output": "Paris is the capital." + " Paris." * (i % 3)}
        else:
            row = {"instruction": "Solve the math problem.", "input": f"Natalia sold {4 * i + 8} clips in April.",
                   "output": f"She sold half as many in May. #### {6 * i + 12}"}
        rows.append({"id": f"{task}-{split}-{i}", **row})
    return rows


def write_toy_split(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        for split, n in (("train", 8), ("val", 4), ("toy", 8)):
            (d / f"{task}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(task, n, split)))
    return d


def smoke_run(script, model_dir, data_dir, root: Path, targets=TARGETS, *extra) -> Path:
    """2 tasks x 2 steps of a training script (the smoke preset) with large learning rates, so the adapters move."""
    script.main(["--preset", "smoke", "--model_name", str(model_dir), "--data_dir", str(data_dir),
                 "--tasks", ",".join(TASKS), "--log_dir", str(root / "logs"), "--save_dir", str(root / "ckpt"),
                 "--run_metrics", "false", "--device", "cpu", "--num_frozen_layers", "1",
                 "--lora_target_modules", ",".join(targets), "--lr", "0.05", "--lr_slow", "0.05", "--lr_fast", "0.05",
                 "--eval_fast_modes", "current", "--final_fast_modes", "none", "--probe_size_per_task", "4",
                 "--router_rows_per_task", "2", *extra])
    return root / "ckpt"


def project_model_from(ckpt: Path, model_dir):
    """The project's model rebuilt from a stage checkpoint, as the scripts' resume code does."""
    cfg = json.loads((ckpt / "config.json").read_text())
    model = load_base(model_dir)
    if (ckpt / "adapter.safetensors").exists():
        replace_with_lora(model, cfg["lora_target_modules"], cfg["lora_r"], cfg["lora_alpha"], 0.0,
                          cfg["num_frozen_layers"])
        load_lora(model, str(ckpt / "adapter.safetensors"))
    else:
        replace_with_ds_lora(model, cfg["lora_target_modules"], cfg["lora_r"], cfg["lora_alpha"], 0.0,
                             cfg["num_frozen_layers"], r_fast=cfg["lora_r_fast"] or cfg["lora_r"])
        load_ds_lora(model, ckpt)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("export_runs")
    data = write_toy_split(root / "split")
    ds = smoke_run(train_slsd_seq, tiny_model_dir, data, root / "ds", TARGETS, "--use_slsd", "false")
    lora = smoke_run(train_seq_baselines, tiny_model_dir, data, root / "lora", TARGETS, "--method", "seq_lora")
    return {"ds": ds / "ds_lora" / f"seq_2_{TASKS[1]}", "lora": lora / "seq_lora" / f"seq_2_{TASKS[1]}"}


@pytest.mark.parametrize("view,mode,task", DS_VIEWS[:3])
def test_trained_ds_checkpoint_round_trips_through_peft(trained, tiny_model_dir, tmp_path, view, mode, task, capsys):
    ckpt = trained["ds"]
    model = project_model_from(ckpt, tiny_model_dir)
    ids = input_ids(model)
    with fast_mode(model, mode, task):
        want = logits(model, ids)
    assert (want - logits(load_base(tiny_model_dir), ids)).abs().max() > 1e-3  # two steps at lr 0.05 moved it
    info = export_adapter.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--view", view])
    r = 8 if view == "slow" else 16  # lora_r 8; a fast branch stacks lora_r_fast (= lora_r) 8 more
    assert f"view {view}: PEFT LoRA adapter with r={r}, lora_alpha={2 * r} on 6 modules" in capsys.readouterr().out
    assert (info["method"], info["stage"], info["layers_to_transform"]) == ("ds_lora", 2, [1, 2, 3])
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "out", ids), want, atol=1e-5, rtol=0)


def test_trained_checkpoints_merge_and_seq_lora_round_trips(trained, tiny_model_dir, tmp_path):
    model = project_model_from(trained["lora"], tiny_model_dir)
    ids = input_ids(model)
    export(trained["lora"], tmp_path / "lora")
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "lora", ids), logits(model, ids), atol=1e-5,
                               rtol=0)
    ds_model = project_model_from(trained["ds"], tiny_model_dir)
    export(trained["ds"], tmp_path / "merged", view="task:T1_general", merge=True)
    with fast_mode(ds_model, "own_task", "T1_general"):
        torch.testing.assert_close(merged_logits(tmp_path / "merged", ids), logits(ds_model, ids), atol=1e-5, rtol=0)
