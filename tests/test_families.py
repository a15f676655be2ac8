"""Model families beyond LLaMA: tiny random Qwen2, Mistral, Gemma and Phi-3, each with its own target module names and
a chat template in its family's style, through the adapter layers, the PEFT export, generation, knowledge scoring and
the training script; models the code would compute wrongly are refused at load with the reason (CPU, seconds)."""
import json
import math

import pytest
import torch
import transformers
from transformers import AutoTokenizer

import train_slsd_seq
import utils_eval as ue
from configs.base_config import make_config
from conftest import make_tiny_tokenizer
from evaluation.knowledge import score_knowledge
from export_adapter import export
from models.ds_lora import fast_mode, replace_with_ds_lora, start_new_task
from models.lora_simple import merge_lora, replace_with_lora, unmerge_lora
from test_export import (TASKS, ds_checkpoint, input_ids, load_base, logits, lora_checkpoint, merged_logits,
                         peft_logits, project_model_from, randomize, smoke_run, write_toy_split)
from test_generation import PROMPTS, make_cfg, manual_greedy
from test_knowledge import naive_logp, scoring_items
from utils_data import IGNORE_INDEX, build_prompt, encode_example, encode_prompt, read_jsonl
from utils_model import check_supported_model, load_model_and_tokenizer

CHAT_TEMPLATES = {  # the structure of each family's own template (system turn, roles, generation prompt)
    "qwen2": ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. ' }}"
              "{{ 'You are a helpful assistant.<|im_end|>\n' }}"
              "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"),
    "gemma": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
              "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "phi3": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}

# family: (config class, model class, config settings, target modules, the end of its generation prompt)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False},  # q/k/v with bias
              ["q_proj", "k_proj", "v_proj", "o_proj"], "<|im_start|>assistant\n"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False, "sliding_window": 4096},
                ["q_proj", "v_proj", "gate_proj", "down_proj"], "[/INST]"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16, "tie_word_embeddings": True},
              ["q_proj", "o_proj", "up_proj"], "<start_of_turn>model\n"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"tie_word_embeddings": False, "original_max_position_embeddings": 512},
             ["qkv_proj", "gate_up_proj"], "<|assistant|>\n"),  # fused q/k/v and gate/up projections
}
NAMES = list(FAMILIES)


EXTRA_MODELS = {  # built only to be refused or compared: (config class, model class, config settings)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16}),  # soft-capped
}


def family_tokenizer(family: str):
    tok = make_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATES[family]
    return tok


def make_model(family: str, vocab_size: int, num_layers: int = 4, seed: int = 0):
    """A tiny random model of `family` (FAMILIES or EXTRA_MODELS) with the conftest LLaMA's sizes and token ids."""
    cfg_name, model_name, extra = FAMILIES[family][:3] if family in FAMILIES else EXTRA_MODELS[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, **extra)
    model = getattr(transformers, model_name)(cfg).eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def make_gpt2(vocab_size: int):
    """GPT-2 projects with transformers' Conv1D (not nn.Linear) and names its decoder layers `h`."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return transformers.GPT2LMHeadModel(cfg).eval()


def save_model(model, tok, d):
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """family -> a saved tiny model + tokenizer folder (built once per module, on first use)."""
    cache = {}

    def get(family):
        if family not in cache:
            tok = family_tokenizer(family)
            cache[family] = save_model(make_model(family, len(tok)), tok, tmp_path_factory.mktemp(f"tiny_{family}"))
        return cache[family]
    return get


def targets_of(family):
    return FAMILIES[family][3]


# ----------------------------------------------------------------------------- the layers
@pytest.mark.parametrize("family", NAMES)
def test_adapters_start_as_the_base_and_merge_exactly(family, family_dir):
    d, targets = family_dir(family), targets_of(family)
    model = load_base(d)
    check_supported_model(model)  # no error: a supported family
    ids = input_ids(model)
    base = logits(model, ids)
    names = replace_with_ds_lora(model, targets, r=4, alpha=8, r_fast=2, num_frozen_layers=1)
    assert len(names) == 3 * len(targets) and {n.rsplit(".", 1)[-1] for n in names} == set(targets)
    torch.testing.assert_close(logits(model, ids), base, atol=1e-6, rtol=0)
    start_new_task(model, "T1_general")
    randomize(model, "lora_B", seed=1)
    unmerged = logits(model, ids)
    assert (unmerged - base).abs().max() > 1e-3
    merge_lora(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    with fast_mode(model, "none"):
        assert (logits(model, ids) - unmerged).abs().max() > 1e-4  # the fast branch acts in this family too


@pytest.mark.parametrize("family", NAMES)
def test_exported_views_load_in_peft_and_merge_with_the_project_logits(family, family_dir, tmp_path):
    d, targets = family_dir(family), targets_of(family)
    ckpt, model = ds_checkpoint(d, tmp_path / "ds", targets=targets, k=1)
    ids = input_ids(model)
    for view, mode, task in [("slow", "none", None), ("task:T1_general", "own_task", "T1_general")]:
        export(ckpt, tmp_path / view.replace(":", "_"), view=view)
        config = json.loads((tmp_path / view.replace(":", "_") / "adapter_config.json").read_text())
        assert config["target_modules"] == sorted(targets) and config["layers_to_transform"] == [1, 2, 3]
        with fast_mode(model, mode, task):
            torch.testing.assert_close(peft_logits(d, tmp_path / view.replace(":", "_"), ids), logits(model, ids),
                                       atol=1e-5, rtol=0)
    export(ckpt, tmp_path / "merged", view="current", merge=True)
    torch.testing.assert_close(merged_logits(tmp_path / "merged", ids), logits(model, ids), atol=1e-5, rtol=0)
    lora, lora_model = lora_checkpoint(d, tmp_path / "lora", targets=targets)
    export(lora, tmp_path / "lora_out")
    torch.testing.assert_close(peft_logits(d, tmp_path / "lora_out", ids), logits(lora_model, ids), atol=1e-5,
                               rtol=0)


# ----------------------------------------------------------------------------- prompts, generation, knowledge
@pytest.mark.parametrize("family", NAMES)
def test_prompts_use_the_familys_chat_template_and_supervise_only_the_response(family):
    tok = family_tokenizer(family)
    row = {"instruction": "What is the capital of France?", "input": "", "output": "Paris is the capital."}
    prompt = build_prompt(tok, row["instruction"], "", "chat_template")
    assert "What is the capital of France?" in prompt and prompt.endswith(FAMILIES[family][4])
    ids, labels = encode_example(tok, row, "chat_template", 320)
    response = tok("Paris is the capital.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == encode_prompt(tok, row, "chat_template") + response
    assert labels == [IGNORE_INDEX] * (len(ids) - len(response)) + response


@pytest.mark.parametrize("family", NAMES)
def test_batched_generation_and_packed_knowledge_scoring_match_references(family, family_dir, tmp_path):
    """Left-padded batched generation with a KV cache equals one-prompt greedy decoding, and knowledge scoring (all
    candidates packed in one sequence under a 4D attention mask) equals scoring each candidate alone, with live
    DS-LoRA adapters on the family's own targets."""
    d = family_dir(family)
    tok = AutoTokenizer.from_pretrained(d)
    model = load_base(d)
    replace_with_ds_lora(model, targets_of(family), r=4, alpha=8)
    start_new_task(model, "T1_general")
    randomize(model, "lora_B", seed=3)
    cfg = make_cfg(tmp_path, eval_batch_size=8)
    batched = ue.generate_ids(model, tok, PROMPTS, cfg, "cpu", 10)
    for row, got in zip(PROMPTS, batched):
        assert got == manual_greedy(model, encode_prompt(tok, row, cfg.prompt_format), 10, tok.eos_token_id)
    kcfg = make_config([], eval_batch_size=3, knowledge_max_tokens=0)
    items = scoring_items()
    records = score_knowledge(model, tok, kcfg, "cpu", items)
    with torch.no_grad():
        for it, rec in zip(items, records):
            assert rec["logp"] == pytest.approx(naive_logp(model, tok, kcfg, it), abs=1e-4)


# ----------------------------------------------------------------------------- the training script
@pytest.mark.parametrize("family", NAMES)
def test_training_script_trains_each_family_and_its_checkpoint_exports(family, family_dir, tmp_path):
    d, targets = family_dir(family), targets_of(family)
    data = write_toy_split(tmp_path / "split")
    ckpts = smoke_run(train_slsd_seq, d, data, tmp_path / "run", targets) / "ds_lora_slsd"  # DS-LoRA + SLSD (KD on)
    assert all((ckpts / f"seq_{s}_{t}" / "done.json").exists() for s, t in enumerate(TASKS, 1))
    logs = tmp_path / "run" / "logs"
    train = [r for r in read_jsonl(logs / f"seq_{TASKS[1]}_train_loss.jsonl") if r["split"] == "train"]
    assert [r["stage_step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    assert any("kd_loss" in r and math.isfinite(r["kd_loss"]) for r in train)  # SLSD distilled on stage 2
    evals = read_jsonl(logs / "seq_eval_loss.jsonl")
    assert {(r["stage"], r["eval_task"]) for r in evals} >= {(s, t) for s in (0, 1, 2) for t in TASKS}
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in evals)
    ckpt = ckpts / f"seq_2_{TASKS[1]}"
    model = project_model_from(ckpt, d)
    ids = input_ids(model)
    export(ckpt, tmp_path / "out", view="task:T1_general")
    with fast_mode(model, "own_task", "T1_general"):
        torch.testing.assert_close(peft_logits(d, tmp_path / "out", ids), logits(model, ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- clear errors
def test_unmatched_targets_name_the_models_linear_modules(family_dir, tmp_path):
    phi3 = load_base(family_dir("phi3"))
    with pytest.raises(ValueError) as err:
        replace_with_lora(phi3, ["q_proj", "v_proj"], r=4, alpha=8)
    msg = str(err.value)
    assert "target_modules ['q_proj', 'v_proj'] match no nn.Linear in this Phi3ForCausalLM" in msg
    assert all(f"'{n}'" in msg for n in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"))
    assert "model.layers.0.self_attn." in msg and "--lora_target_modules " in msg
    # the training script stops with the same message before any training (the default targets are q_proj,v_proj)
    with pytest.raises(ValueError, match=r"qkv_proj.*gate_up_proj"):
        train_slsd_seq.main(["--model_name", str(family_dir("phi3")), "--device", "cpu", "--num_frozen_layers", "0",
                             "--log_dir", str(tmp_path / "logs"), "--save_dir", str(tmp_path / "ckpt")])
    # GPT-2 projects with transformers' Conv1D, not nn.Linear: named as such
    gpt2 = make_gpt2(300)
    with pytest.raises(ValueError, match=r"\['c_attn'\] match no nn.Linear .*they name Conv1D modules; adapters wrap "
                                         r"torch.nn.Linear only.*\['lm_head'\]"):
        replace_with_ds_lora(gpt2, ["c_attn"], r=4, alpha=8)


def test_models_the_code_would_compute_wrongly_are_refused_at_load(tmp_path):
    tok = family_tokenizer("gemma")
    gemma2 = save_model(make_model("gemma2", len(tok)), tok, tmp_path / "gemma2")
    with pytest.raises(ValueError, match=r"Gemma2ForCausalLM .* is not supported: its forward changes the logits after "
                                         r"the LM head \(final_logit_softcapping=30.0\)"):
        load_model_and_tokenizer(make_config([], model_name=str(gemma2), device="cpu"))

    class DoubledLogits(transformers.LlamaForCausalLM):  # an unknown transform after the head: caught by the forward
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    doubled = DoubledLogits(make_model("llama", len(tok)).config).eval()
    with pytest.raises(ValueError, match="its logits are not the output embedding of the decoder's last hidden state"):
        check_supported_model(doubled)
    gpt2 = make_gpt2(len(tok))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel .* has no `.layers` list"):
        check_supported_model(gpt2)


def test_tokenizer_without_chat_template_is_refused_unless_llama2_format(tmp_path):
    tok = family_tokenizer("mistral")
    tok.chat_template = None  # a base (not instruct) model
    d = save_model(make_model("mistral", len(tok)), tok, tmp_path / "base_mistral")
    with pytest.raises(ValueError, match="the tokenizer has no chat template.*--prompt_format llama2"):
        load_model_and_tokenizer(make_config([], model_name=str(d), device="cpu"))
    model, loaded, _ = load_model_and_tokenizer(make_config([], model_name=str(d), device="cpu",
                                                            prompt_format="llama2"))
    assert type(model).__name__ == "MistralForCausalLM" and loaded.pad_token_id == 2
