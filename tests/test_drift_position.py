"""Drift KL split by reply position (first N tokens vs the rest) on a tiny random LLaMA (CPU, seconds).

The base replies are written into the drift cache by hand, so each probe has a chosen length (some shorter
than N, one ending with EOS) and the split can be checked against a naive one-probe-at-a-time computation."""
import json
from pathlib import Path

import pytest
import torch

from configs.base_config import make_config
from evaluation.drift import DRIFT_PROMPTS, drift_metrics
from models.lora_simple import adapters_disabled, replace_with_lora
from utils_data import encode_prompt

FIRST = 5
REPLY_LENGTHS = (2, 5, 6, 9)  # two probes with no rest (<= FIRST tokens), two with one
MAX_NEW_TOKENS = {"T1_general": 8, "T2_math": 8, "T3_code": 8, "T4_tool": 8, "T5_safety": 8, "drift": 4}


def make_cfg(tmp_path, **kw):
    # eval_batch_size 3 over 4 probes: two batches, the first one padded (lengths differ)
    base = dict(data_dir=str(tmp_path / "split"), log_dir=str(tmp_path / "logs"), model_name="tiny-test",
                eval_batch_size=3, max_seq_len=512, drift_num_probes=len(REPLY_LENGTHS),
                drift_first_tokens=FIRST, max_new_tokens=dict(MAX_NEW_TOKENS))
    return make_config(**(base | kw))


def write_base_replies(cfg, tokenizer, lengths=REPLY_LENGTHS) -> list[list[int]]:
    """Put base replies of the given lengths into the drift cache (the last one ends with EOS); return them."""
    words = tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of France.")
    assert len(words) > max(lengths)
    replies = [words[:n] for n in lengths]
    replies[-1] = replies[-1][:-1] + [tokenizer.eos_token_id]  # EOS counts as a reply position, as in kl_base
    cache = {json.dumps([cfg.model_name, cfg.prompt_format, cfg.max_new_tokens["drift"], p]):
             {"ids": ids, "text": tokenizer.decode(ids)} for p, ids in zip(DRIFT_PROMPTS, replies)}
    Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.log_dir) / "drift_base_responses.json").write_text(json.dumps(cache))
    return replies


def lora_with_random_b(model, seed=0, std=0.3):
    """LoRA on q/v with nonzero B, so the model differs from its base."""
    replace_with_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@torch.no_grad()
def naive_kl_per_position(model, tokenizer, cfg, k, reply) -> torch.Tensor:
    """KL(base || current) at each token of probe k's reply, alone, from full (1, T, V) logits, in float64."""
    prompt = encode_prompt(tokenizer, {"instruction": DRIFT_PROMPTS[k], "input": ""}, cfg.prompt_format)
    ids = torch.tensor([prompt + reply])
    span = slice(len(prompt) - 1, len(prompt) + len(reply) - 1)  # logits at t predict token t + 1
    cur = torch.log_softmax(model(input_ids=ids).logits[0, span].double(), -1)  # (n_reply, V)
    with adapters_disabled(model):
        base = torch.log_softmax(model(input_ids=ids).logits[0, span].double(), -1)
    return (base.exp() * (base - cur)).sum(-1)  # (n_reply,)


def test_first_and_rest_equal_a_naive_per_position_computation(tiny_llama, tiny_tokenizer, tmp_path):
    cfg = make_cfg(tmp_path)
    replies = write_base_replies(cfg, tiny_tokenizer)
    model = lora_with_random_b(tiny_llama)
    metrics, records = drift_metrics(model, tiny_tokenizer, cfg, "cpu")

    naive = [naive_kl_per_position(model, tiny_tokenizer, cfg, k, r) for k, r in enumerate(replies)]
    heads = [float(x[:FIRST].mean()) for x in naive]
    rests = [float(x[FIRST:].mean()) if len(x) > FIRST else None for x in naive]
    assert all(h > 1e-4 for h in heads)  # the adapters really moved the model
    for rec, h, r, x in zip(records, heads, rests, naive):
        assert rec["scores"]["kl_first"] == pytest.approx(h, rel=1e-4)
        assert rec["scores"]["kl_base"] == pytest.approx(float(x.mean()), rel=1e-4)
        if r is None:
            assert rec["scores"]["kl_rest"] is None
        else:
            assert rec["scores"]["kl_rest"] == pytest.approx(r, rel=1e-4)
    assert metrics["kl_base_first"] == pytest.approx(sum(heads) / len(heads), rel=1e-4)
    with_rest = [r for r in rests if r is not None]
    assert len(with_rest) == 2  # the 2- and 5-token replies contribute nothing to the rest
    assert metrics["kl_base_rest"] == pytest.approx(sum(with_rest) / len(with_rest), rel=1e-4)
    assert metrics["kl_base"] == pytest.approx(sum(float(x.mean()) for x in naive) / len(naive), rel=1e-4)


def test_token_weighted_first_and_rest_give_back_the_probe_kl(tiny_llama, tiny_tokenizer, tmp_path):
    cfg = make_cfg(tmp_path)
    replies = write_base_replies(cfg, tiny_tokenizer)
    _, records = drift_metrics(lora_with_random_b(tiny_llama, seed=1), tiny_tokenizer, cfg, "cpu")
    for rec, reply in zip(records, replies):
        s, n = rec["scores"], len(reply)
        n_first, n_rest = min(n, FIRST), max(0, n - FIRST)
        combined = (n_first * s["kl_first"] + n_rest * (s["kl_rest"] or 0.0)) / n
        assert combined == pytest.approx(s["kl_base"], rel=1e-9)
        assert (s["kl_rest"] is None) == (n_rest == 0)


def test_first_and_rest_are_zero_for_the_untouched_model(tiny_llama, tiny_tokenizer, tmp_path):
    cfg = make_cfg(tmp_path)
    write_base_replies(cfg, tiny_tokenizer)
    plain, _ = drift_metrics(tiny_llama, tiny_tokenizer, cfg, "cpu")  # no adapters: its own base
    replace_with_lora(tiny_llama, ["q_proj", "v_proj"], r=4, alpha=8)  # B = 0 at init: still the base
    at_init, records = drift_metrics(tiny_llama, tiny_tokenizer, cfg, "cpu")
    for m in (plain, at_init):
        assert {"kl_base", "kl_base_first", "kl_base_rest"} <= m.keys()
        assert all(abs(m[k]) < 1e-6 for k in ("kl_base", "kl_base_first", "kl_base_rest"))
    assert all(abs(r["scores"]["kl_first"]) < 1e-6 for r in records)


def test_zero_first_tokens_reports_no_first_or_rest(tiny_llama, tiny_tokenizer, tmp_path):
    cfg = make_cfg(tmp_path, drift_first_tokens=0)
    write_base_replies(cfg, tiny_tokenizer)
    metrics, records = drift_metrics(lora_with_random_b(tiny_llama), tiny_tokenizer, cfg, "cpu")
    assert metrics["kl_base"] > 1e-4
    assert not {"kl_base_first", "kl_base_rest"} & metrics.keys()
    assert all(not {"kl_first", "kl_rest"} & r["scores"].keys() for r in records)


def test_rest_is_left_out_when_no_reply_is_longer_than_n(tiny_llama, tiny_tokenizer, tmp_path):
    cfg = make_cfg(tmp_path)
    write_base_replies(cfg, tiny_tokenizer, lengths=(2, 3, 5, 4))
    metrics, records = drift_metrics(lora_with_random_b(tiny_llama), tiny_tokenizer, cfg, "cpu")
    assert "kl_base_first" in metrics and "kl_base_rest" not in metrics
    assert metrics["kl_base_first"] == pytest.approx(metrics["kl_base"], rel=1e-9)  # every token is a first token
    assert all(r["scores"]["kl_rest"] is None for r in records)


def test_kl_base_does_not_depend_on_the_batch_size(tiny_llama, tiny_tokenizer, tmp_path):
    model = lora_with_random_b(tiny_llama, seed=2)
    out = []
    for bs in (1, 3, 16):  # one probe per batch, a padded batch plus a remainder, all in one batch
        cfg = make_cfg(tmp_path / f"bs{bs}", eval_batch_size=bs)
        write_base_replies(cfg, tiny_tokenizer)
        out.append(drift_metrics(model, tiny_tokenizer, cfg, "cpu")[0])
    for m in out[1:]:
        for k in ("kl_base", "kl_base_first", "kl_base_rest"):
            assert m[k] == pytest.approx(out[0][k], rel=1e-4), k


def test_drift_kl_sees_disabled_adapters_under_an_outer_bf16_autocast(tiny_llama, tiny_tokenizer, tmp_path):
    """Regression: with autocast's cast cache on, an outer autocast region (run_stage_metrics) kept the bf16 copy of
    lora_B from the student pass, so adapters_disabled changed nothing and KL(base || current) read 0."""
    import evaluation.drift as drift
    from models.lora_simple import adapter_layers, replace_with_lora
    from utils_forward import autocast
    cfg = make_config([], log_dir=str(tmp_path), drift_num_probes=2, eval_batch_size=2,
                      max_new_tokens={"T1_general": 4, "T2_math": 4, "T3_code": 4, "T4_tool": 4, "T5_safety": 4,
                                      "drift": 6})
    replace_with_lora(tiny_llama, ("q_proj", "v_proj"), r=4, alpha=8.0)
    torch.manual_seed(3)
    for _, layer in adapter_layers(tiny_llama):
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    plain, _ = drift.drift_metrics(tiny_llama, tiny_tokenizer, cfg, "cpu")
    tiny_llama._cit_autocast = True
    with autocast(tiny_llama):
        amp, _ = drift.drift_metrics(tiny_llama, tiny_tokenizer, cfg, "cpu")
    assert plain["kl_base"] > 1e-4
    assert amp["kl_base"] == pytest.approx(plain["kl_base"], rel=0.25)  # bf16 numerics, not zero
