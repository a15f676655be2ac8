"""The frozen-trunk cache (utils_forward.TrunkCache): evaluation passes start at the first adapted layer from the
stored output of the frozen layers below, and give the same numbers as running every layer."""
import json

import pytest
import torch

from conftest import make_tiny_llama
from models.ds_lora import fast_mode, replace_with_ds_lora, start_new_task
from models.lora_simple import replace_with_lora
from utils_forward import TrunkCache, trunk_bypass, trunk_cache


def lora_model(vocab: int, frozen: int = 2, seed: int = 0):
    """A tiny 4-layer LLaMA with non-zero LoRA on layers >= `frozen`."""
    model = make_tiny_llama(vocab, seed=seed)
    replace_with_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0, num_frozen_layers=frozen)
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return model.eval()


def batch(vocab: int, seed: int = 0, B: int = 3, T: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0  # right padding in one row
    return ids, mask


def hidden(model, ids, mask, **kw):
    with torch.no_grad():
        return model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False, **kw).last_hidden_state


def test_second_pass_starts_at_the_first_adapted_layer_and_matches_the_full_pass(tiny_tokenizer):
    V = len(tiny_tokenizer)
    model = lora_model(V)
    ids, mask = batch(V)
    want = hidden(model, ids, mask)
    cache = TrunkCache(model)
    assert cache.enabled and cache.first == 2
    ran = []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, layer in
               enumerate(model.get_decoder().layers)]
    with cache:
        first = hidden(model, ids, mask)
        assert ran == [0, 1, 2, 3] and cache.stats()["misses"] == 1 and cache.stats()["entries"] == 1
        ran.clear()
        second = hidden(model, ids, mask)
    # the first hit is checked against one full pass (run under bypass), then only layers 2-3 run
    assert ran[:2] == [2, 3] and cache.verified and cache.enabled
    ran.clear()
    with cache:
        third = hidden(model, ids, mask)
    for h in handles:
        h.remove()
    assert ran == [2, 3] and cache.stats()["hits"] == 2
    assert len(model.get_decoder().layers) == 4  # the full layer list is back after every pass
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(second, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(third, want, rtol=1e-6, atol=1e-6)


def test_changed_adapters_change_the_cached_pass_like_the_full_one(tiny_tokenizer):
    """What is cached sits below every adapter: new adapter weights (the next stage) act on a hit exactly as on a
    full pass, and a different batch (ids, mask or position ids) is a different key."""
    V = len(tiny_tokenizer)
    model = lora_model(V)
    ids, mask = batch(V)
    cache = trunk_cache(model)
    with cache:
        hidden(model, ids, mask)
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.data.mul_(-2.0)
        got = hidden(model, ids, mask)
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids) + 3
        got_pos = hidden(model, ids, mask, position_ids=pos)
        other_mask = mask.clone()
        other_mask[0, 9:] = 0
        got_mask = hidden(model, ids, other_mask)
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 3
    torch.testing.assert_close(got, hidden(model, ids, mask), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_pos, hidden(model, ids, mask, position_ids=pos), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_mask, hidden(model, ids, other_mask), rtol=1e-6, atol=1e-6)
    assert trunk_cache(model) is cache  # one per model, kept across stages


def test_generation_training_grad_and_bypass_passes_neither_store_nor_hit(tiny_tokenizer):
    V = len(tiny_tokenizer)
    model = lora_model(V)
    ids, mask = batch(V)
    cache = trunk_cache(model)
    with cache:
        with torch.no_grad():
            out = model.generate(input_ids=ids[:1, :6], attention_mask=mask[:1, :6], max_new_tokens=4, do_sample=False,
                                 pad_token_id=2)
        assert cache.stats()["entries"] == 0  # a KV-cached pass is never stored
        with trunk_bypass(model):
            hidden(model, ids, mask)
        model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)  # grad enabled
        model.train()
        with torch.no_grad():
            model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
        model.eval()
    assert cache.stats()["entries"] == 0 and cache.stats()["hits"] == 0
    with torch.no_grad():
        again = model.generate(input_ids=ids[:1, :6], attention_mask=mask[:1, :6], max_new_tokens=4, do_sample=False,
                               pad_token_id=2)
    assert torch.equal(out, again)


def test_off_when_an_adapter_sits_on_layer_0_or_the_size_is_0(tiny_tokenizer):
    import contextlib
    from types import SimpleNamespace
    V = len(tiny_tokenizer)
    assert not TrunkCache(lora_model(V, frozen=0)).enabled
    model = lora_model(V)
    assert isinstance(trunk_cache(model, SimpleNamespace(trunk_cache_mb=0)), contextlib.nullcontext)
    assert not hasattr(model, "_cit_trunk_cache")


def test_a_full_cache_stops_storing_but_stays_correct(tiny_tokenizer):
    V = len(tiny_tokenizer)
    model = lora_model(V)
    cache = TrunkCache(model, max_mb=3 * 11 * 64 * 4 / 2 ** 20)  # room for exactly one (3, 11, 64) fp32 batch
    a, b = batch(V, seed=0), batch(V, seed=1)
    with cache:
        hidden(model, *a)
        hidden(model, *b)
        got = hidden(model, *b)
    assert cache.stats()["entries"] == 1 and cache.stats()["misses"] == 3
    torch.testing.assert_close(got, hidden(model, *b), rtol=0, atol=0)


def test_gemma_scales_in_its_embedding_so_the_cache_serves_it(tiny_tokenizer):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = transformers.GemmaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    replace_with_lora(model, ["q_proj"], r=4, alpha=8, dropout=0.0, num_frozen_layers=2)
    ids, mask = batch(len(tiny_tokenizer))
    want = hidden(model, ids, mask)
    cache = TrunkCache(model)
    with cache:
        hidden(model, ids, mask)
        got = hidden(model, ids, mask)
    assert cache.enabled and cache.stats()["hits"] == 1
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_decoder_that_transforms_inputs_embeds_turns_the_cache_off(tiny_tokenizer):
    """A decoder that changes its inputs_embeds (as older Gemma code scaled them inside the decoder) would change
    the stored states too: the first hit is checked against the full pass, which is returned, and the cache goes
    off for good."""
    import types
    V = len(tiny_tokenizer)
    model = lora_model(V)
    decoder = model.get_decoder()
    plain = decoder.forward

    def scaling_forward(self, input_ids=None, inputs_embeds=None, **kw):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        return plain(inputs_embeds=inputs_embeds * 1.5, **kw)

    decoder.forward = types.MethodType(scaling_forward, decoder)
    ids, mask = batch(V)
    want = hidden(model, ids, mask)
    cache = TrunkCache(model)
    with cache:
        hidden(model, ids, mask)
        got = hidden(model, ids, mask)
        after = hidden(model, ids, mask)
    assert not cache.enabled and cache.stats()["entries"] == 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(after, want, rtol=0, atol=0)


def test_ds_lora_views_and_packed_masks_hit_the_same_entries(tiny_tokenizer):
    """Every fast-weight view of DS-LoRA shares the trunk; a 4D packed mask with position ids (the knowledge
    score's) is cached like a 2D one."""
    V = len(tiny_tokenizer)
    model = make_tiny_llama(V)
    replace_with_ds_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, num_frozen_layers=2)
    for i, task in enumerate(("A", "B")):
        start_new_task(model, task, seed=i)
        for m in model.modules():
            if hasattr(m, "lora_B_fast"):
                m.lora_B_fast.data = torch.randn(m.lora_B_fast.shape) * 0.5
                m.lora_B_slow.data = torch.randn(m.lora_B_slow.shape) * 0.1
    model.eval()
    ids, _ = batch(V, B=2, T=8)
    allowed = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
    allowed[1, 0, 5:, :5] = False  # row 1: two packed segments
    pos = torch.tensor([list(range(8)), [0, 1, 2, 3, 4, 2, 3, 4]])
    views = [("own_task", "A"), ("own_task", "B"), ("none",)]
    want = []
    for v in views:
        with fast_mode(model, *v):
            want.append(hidden(model, ids, allowed, position_ids=pos))
    cache = trunk_cache(model)
    with cache:
        got = []
        for v in views:
            with fast_mode(model, *v):
                got.append(hidden(model, ids, allowed, position_ids=pos))
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(want[0], want[1])  # the views differ, so the check has teeth


def test_training_run_logs_the_same_evaluation_with_and_without_the_cache(tmp_path, tiny_model_dir, monkeypatch):
    """End to end on toy data, DS-LoRA with routed views, generated scores, knowledge and drift: every eval loss,
    metric and drift row of a run with the trunk cache equals that of the same run with --trunk_cache_mb 0."""
    import train_slsd_seq
    from test_knowledge import write_bench
    from test_train import TASKS, toy_rows
    data = tmp_path / "data"
    data.mkdir()
    for t in TASKS:
        for split, n in (("train", 8), ("val", 4)):
            (data / f"{t}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(t, n, split)))
    write_bench(data, TASKS)

    def run(name, *extra):
        root = tmp_path / name
        train_slsd_seq.main(["--model_name", str(tiny_model_dir), "--data_dir", str(data), "--tasks", ",".join(TASKS),
                             "--max_steps_per_task", "2", "--per_device_batch_size", "4", "--eval_max_samples", "4",
                             "--log_dir", str(root / "logs"), "--save_dir", str(root / "ckpt"), "--device", "cpu",
                             "--num_frozen_layers", "2", "--router_layer", "1", "--router_rows_per_task", "4",
                             "--use_slsd", "false", "--gen_rows_per_task", "2", "--knowledge_rows_per_task", "3",
                             "--knowledge_distractors", "2", "--drift_num_probes", "2",
                             "--max_new_tokens", '{"T1_general": 4, "T2_math": 4, "drift": 4}',
                             "--eval_fast_modes", "current", "--final_fast_modes", "own_task,routed",
                             "--metric_fast_modes", "current,routed", *extra])
        rows = {}
        for f in ("seq_eval_loss.jsonl", "seq_eval_metrics.jsonl", "seq_drift.jsonl"):
            p = root / "logs" / f
            rows[f] = [{k: v for k, v in json.loads(line).items() if k != "time_s"}
                       for line in p.read_text().splitlines()] if p.exists() else []
        return rows

    made = []
    init = TrunkCache.__init__
    monkeypatch.setattr(TrunkCache, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    with_cache = run("cached")
    assert len(made) == 1 and made[0].enabled and made[0].verified
    assert made[0].stats()["hits"] > made[0].stats()["misses"] > 0  # stages 1 and 2 reuse the base stage's batches
    without = run("uncached", "--trunk_cache_mb", "0")
    assert len(made) == 1
    assert len(with_cache["seq_eval_loss.jsonl"]) >= 3 * 2 + 2 * 2
    assert {r["metric"] for r in with_cache["seq_eval_metrics.jsonl"]} >= {"knowledge", "format"}
    assert with_cache["seq_drift.jsonl"]
    for f in with_cache:
        assert len(with_cache[f]) == len(without[f]), f
        for a, b in zip(with_cache[f], without[f]):
            assert a.keys() == b.keys(), f
            for k in a:
                if isinstance(a[k], float):
                    assert a[k] == pytest.approx(b[k], abs=2e-5), (f, k, a, b)
                else:
                    assert a[k] == b[k], (f, k)
