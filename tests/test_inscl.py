"""InsCL replay (inscl.py): the OT solver against known answers, the replay allocation, InsInfo on hand-made
instructions, and InsCLReplay's buffer (deterministic, resumable, the ablation switches) on a tiny random LLaMA
with toy files read the way the smoke preset reads them (`use_toy_data`)."""
import itertools
import json
import math

import pytest
import torch

import inscl
from configs.base_config import ConfigError, make_config
from conftest import make_tiny_llama
from inscl import (InsCLReplay, allocate, insinfo, instruction_tags, row_text, sinkhorn, wasserstein,
                   weighted_order)
from models.lora_simple import replace_with_lora
from models.router import dataset_prompts, prompt_features
from test_train import data_dir  # noqa: F401  (fixture)
from train_seq_baselines import Replay
from utils_data import collate_fn
from utils_train import load_task_dataset

TASKS = ("T1_general", "T2_math", "T3_code")
ADJ = ("famous", "modern", "quiet", "royal", "small")


# ----------------------------------------------------------------------------- optimal transport
def exact_1d(x: list[float], y: list[float], p: int) -> float:
    """W_p of two uniform empirical 1-D distributions: the integral over u of |F^-1(u) - G^-1(u)|^p."""
    x, y = sorted(x), sorted(y)
    cuts = sorted({k / len(x) for k in range(len(x) + 1)} | {k / len(y) for k in range(len(y) + 1)})
    total = 0.0
    for lo, hi in itertools.pairwise(cuts):
        mid = (lo + hi) / 2
        total += (hi - lo) * abs(x[int(mid * len(x))] - y[int(mid * len(y))]) ** p
    return total ** (1 / p)


@pytest.mark.parametrize("p", [1, 2])
def test_wasserstein_of_equal_size_1d_sets_is_the_sorted_matching_cost(p):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 1, generator=g, dtype=torch.float64), torch.rand(12, 1, generator=g, dtype=torch.float64)
    sorted_cost = float((x.flatten().sort().values - y.flatten().sort().values).abs().pow(p).mean()) ** (1 / p)
    assert wasserstein(x, y, p=p)[0] == pytest.approx(sorted_cost, rel=1e-3)


@pytest.mark.parametrize("p", [1, 2])
def test_wasserstein_of_unequal_size_1d_sets_is_the_quantile_integral(p):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 1, generator=g, dtype=torch.float64), torch.randn(5, 1, generator=g, dtype=torch.float64) + 1
    expected = exact_1d(x.flatten().tolist(), y.flatten().tolist(), p)
    assert wasserstein(x, y, p=p)[0] == pytest.approx(expected, rel=1e-3)
    assert expected > 0.5  # a real shift, not a trivially small distance


@pytest.mark.parametrize("p", [1, 2])
def test_a_translated_point_cloud_is_at_distance_the_translation_norm(p):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    v = torch.randn(16, generator=g, dtype=torch.float64) * 0.3
    w, info = wasserstein(x, x + v, p=p)
    assert w == pytest.approx(float(v.norm()), rel=1e-3)
    assert info["marginal_err"] < inscl.SINKHORN_TOL and info["iters"] < 5000  # converged, not stopped


def test_sinkhorn_matches_the_best_permutation_on_small_2d_sets():
    """For equal-size uniform sets the exact optimum is a permutation (Birkhoff): try all 720."""
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
        C = torch.cdist(x, y) ** 2
        best = min(float(C[range(6), list(perm)].mean()) for perm in itertools.permutations(range(6)))
        assert wasserstein(x, y)[0] == pytest.approx(math.sqrt(best), rel=1e-3)


def test_sinkhorn_plan_has_uniform_marginals_and_its_cost_is_reported():
    g = torch.Generator().manual_seed(4)
    C = torch.rand(5, 8, generator=g, dtype=torch.float64)
    cost, P, _ = sinkhorn(C)
    assert torch.allclose(P.sum(1), torch.full((5,), 1 / 5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(P.sum(0), torch.full((8,), 1 / 8, dtype=torch.float64), atol=1e-6)
    assert cost == pytest.approx(float((P * C).sum()))
    assert cost < float(C.mean())  # better than the independent coupling


def test_wasserstein_is_zero_on_identical_sets_and_symmetric():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 4, generator=g), torch.randn(11, 4, generator=g)
    assert wasserstein(x, x[torch.randperm(9, generator=g)])[0] < 1e-6
    assert wasserstein(x, y)[0] == pytest.approx(wasserstein(y, x)[0], rel=1e-6)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        wasserstein(x, y, p=3)
    with pytest.raises(ValueError, match="must be"):
        sinkhorn(torch.zeros(0, 3))


# ----------------------------------------------------------------------------- allocation
def test_allocation_is_largest_remainder_with_one_row_each_and_sums_to_the_budget():
    # 1 each, then 7 split 0.7 / 1.4 / 4.9: floors 0 1 4, the 2 rows left to the largest remainders (.9, .7)
    assert allocate(10, [1, 2, 7]) == [2, 2, 6]
    assert allocate(6, [0.0, 1.0]) == [1, 5]  # a task at distance 0 still gets its one row
    assert allocate(7, [1, 1, 1]) == [3, 2, 2]  # ties go to the earlier task
    assert allocate(5, [0, 0]) == [3, 2]  # all distances zero: an even split
    g = torch.Generator().manual_seed(0)
    for budget in (3, 8, 64, 1000):
        w = torch.rand(3, generator=g).tolist()
        n = allocate(budget, w)
        assert sum(n) == budget and min(n) >= 1
        order = sorted(range(3), key=lambda i: w[i])
        assert [n[i] for i in order] == sorted(n)  # more dissimilar, at least as much replay


def test_allocation_respects_capacity_and_resplits_the_excess():
    assert allocate(10, [1, 1], capacity=[2, 100]) == [2, 8]
    assert allocate(10, [5, 1, 1], capacity=[3, 100, 100]) == [3, 4, 3]
    assert allocate(10, [1, 1], capacity=[2, 3]) == [2, 3]  # fewer rows than the budget: every row
    with pytest.raises(ValueError, match="at least one"):
        allocate(2, [1, 1, 1])
    with pytest.raises(ValueError, match="finite and >= 0"):
        allocate(4, [1, -1])
    with pytest.raises(ValueError, match="capacity >= 1"):
        allocate(4, [1, 1], capacity=[0, 5])


# ----------------------------------------------------------------------------- InsInfo
def test_instruction_tags_are_the_distinct_content_words():
    assert instruction_tags("Please write a HAIKU about the sea, the sea!") == {"write", "haiku", "sea"}
    assert instruction_tags("Solve it: 12 + 30 = ?") == {"solve"}
    assert row_text({"instruction": "Sort words.", "input": "pear, fig"}) == "Sort words.\npear, fig"


def test_insinfo_sums_the_log_inverse_frequency_of_each_tag():
    rows = ["Sort the words.", "Sort these words.", "Sort the words alphabetically, quickly.", "Translate words."]
    scores = insinfo([instruction_tags(r) for r in rows])
    # sort: 3 of 4 rows, words: 4 of 4, alphabetically / quickly / translate: 1 of 4
    s, one = math.log(4 / 3), math.log(4)
    assert scores.tolist() == pytest.approx([s, s, s + 2 * one, one])
    assert insinfo([frozenset({"a"})] * 3).tolist() == [0.0, 0.0, 0.0]  # shared by all: no information


def test_weighted_order_draws_in_proportion_to_the_weights_and_puts_zeros_last():
    w = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0])
    firsts = torch.zeros(5)
    for seed in range(3000):
        order = weighted_order(w, torch.Generator().manual_seed(seed))
        assert sorted(order) == list(range(5)) and set(order[3:]) == {3, 4}
        firsts[order[0]] += 1
    assert (firsts / 3000).tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6, 0, 0], abs=0.03)
    assert weighted_order(w, torch.Generator().manual_seed(9)) == weighted_order(w, torch.Generator().manual_seed(9))


# ----------------------------------------------------------------------------- the replay buffer
def toy_rows(task: str, n: int = 10) -> list[dict]:
    """T1: every row asks for the capital of France, the odd rows add a longer request with a rare word (so only
    they have InsInfo > 0). T3: T1's prompts with other answers (the same instruction distribution). T2: math."""
    rows = []
    for i in range(n):
        if task in ("T1_general", "T3_code"):
            extra = f"Also name its longest river, oldest bridge and a {ADJ[i // 2]} museum." if i % 2 else ""
            row = {"instruction": "What is the capital of France?", "input": extra,
                   "output": f"Paris is the capital. ({task} {i})"}
        else:
            row = {"instruction": "Solve the math problem step by step.",
                   "input": f"Natalia sold {4 * i + 8} clips in April and half as many in May.",
                   "output": f"She sold {6 * i + 12} clips. #### {6 * i + 12}"}
        rows.append({"id": f"{task}-toy-{i}", **row})
    return rows


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("inscl_toy")
    for task in TASKS:
        (d / f"{task}_toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(task)))
    return d


def cfg_of(toy_dir, **kw):
    return make_config(**(dict(data_dir=str(toy_dir), tasks=TASKS, use_toy_data=True, replay_buffer_size=6,
                               inscl_embed_rows=16, per_device_batch_size=2, device="cpu") | kw))


@pytest.fixture(scope="module")
def lora_model(tiny_tokenizer):
    """A tiny LLaMA with LoRA whose B is random, so an adapter left on would change every hidden state."""
    model = make_tiny_llama(len(tiny_tokenizer))
    replace_with_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def make(toy_dir, tok, model, **kw) -> InsCLReplay:
    return InsCLReplay(cfg_of(toy_dir, **kw), tok, tok.pad_token_id, model)


def rows_of(items) -> list[tuple]:
    return [(it["idx"], tuple(it["input_ids"].tolist())) for it in items]


def test_features_come_from_the_frozen_base_with_adapters_off(toy_dir, tiny_tokenizer, lora_model):
    replay = make(toy_dir, tiny_tokenizer, lora_model, inscl_layer=2)
    ds = load_task_dataset(replay.cfg, tiny_tokenizer, "T2_math", "train")
    feats = replay.task_features("T2_math", ds)
    assert feats.shape == (len(ds), 64)  # inscl_embed_rows 16 > 10 rows: every row
    base = make_tiny_llama(len(tiny_tokenizer))  # the same seed: the base weights without any adapter
    g = torch.Generator().manual_seed(replay.cfg.seed + 200 + 1)
    rows = torch.randperm(len(ds), generator=g).tolist()
    prompts = [dataset_prompts(ds)[i] for i in rows]
    assert torch.allclose(feats, prompt_features(base, prompts, 2, 16), atol=1e-5)
    with torch.no_grad():  # the adapters on: other hidden states (so the check above can fail)
        ids = torch.tensor([prompts[0]])
        on = lora_model(input_ids=ids, output_hidden_states=True).hidden_states[2][0].mean(0)
    assert not torch.allclose(on, feats[0], atol=1e-3)
    assert all(p.grad is None for p in lora_model.parameters())


def test_the_more_dissimilar_earlier_task_gets_more_replay(toy_dir, tiny_tokenizer, lora_model):
    replay = make(toy_dir, tiny_tokenizer, lora_model)
    info = replay.start_of_task("T3_code", ["T1_general", "T2_math"])
    d = info["distance"]
    assert d["T1_general"] < 0.01 * d["T2_math"]  # T3's prompts are T1's
    assert replay.per_task == info["allocation"] == {"T1_general": 1, "T2_math": 5}
    assert len(replay.items) == 6
    json.dumps(info)  # the main loop writes it as a log row


def test_inscl_dynamic_false_splits_evenly_and_still_logs_distances(toy_dir, tiny_tokenizer, lora_model):
    replay = make(toy_dir, tiny_tokenizer, lora_model, inscl_dynamic=False)
    info = replay.start_of_task("T3_code", ["T1_general", "T2_math"])
    assert replay.per_task == {"T1_general": 3, "T2_math": 3}
    assert info["distance"]["T1_general"] < info["distance"]["T2_math"]


def test_infosample_draws_only_informative_rows_and_false_draws_replays_rows(toy_dir, tiny_tokenizer, lora_model):
    pad = tiny_tokenizer.pad_token_id
    guided = make(toy_dir, tiny_tokenizer, lora_model, replay_buffer_size=4)
    info = guided.start_of_task("T2_math", ["T1_general"])
    picked = [it["idx"] for it in guided.items]
    assert len(picked) == 4 and all(i % 2 == 1 for i in picked)  # only the odd rows carry rare tags
    stats = info["insinfo"]["T1_general"]
    assert stats["insinfo_zero_share"] == 0.5 and stats["picked_insinfo_mean"] > stats["insinfo_mean"]
    assert stats["picked_insinfo_mean"] == pytest.approx(6 * math.log(2) + math.log(10), abs=1e-4)

    uniform = make(toy_dir, tiny_tokenizer, lora_model, replay_buffer_size=4, inscl_infosample=False)
    uniform.start_of_task("T2_math", ["T1_general"])
    plain = Replay(uniform.cfg, tiny_tokenizer, pad)
    plain.end_of_task(["T1_general"])
    assert rows_of(uniform.items) == rows_of(plain.items)
    assert any(it["idx"] % 2 == 0 for it in uniform.items)  # for this seed the uniform draw takes an even row


def test_both_ablations_off_is_replay_buffer_and_batches(toy_dir, tiny_tokenizer, lora_model):
    replay = make(toy_dir, tiny_tokenizer, lora_model, inscl_dynamic=False, inscl_infosample=False)
    replay.start_of_task("T3_code", ["T1_general", "T2_math"])
    plain = Replay(replay.cfg, tiny_tokenizer, tiny_tokenizer.pad_token_id)
    plain.end_of_task(["T1_general", "T2_math"])
    assert rows_of(replay.items) == rows_of(plain.items) and replay.per_task == plain.per_task
    assert torch.equal(torch.randint(6, (8,), generator=replay.gen), torch.randint(6, (8,), generator=plain.gen))


def test_buffer_is_deterministic_the_same_when_resumed_and_seeded(toy_dir, tiny_tokenizer, lora_model):
    first = make(toy_dir, tiny_tokenizer, lora_model)
    first.end_of_task(["T1_general"])  # after stage 1: the buffer stage 2 (T2) trains with
    assert first.built == ("T2_math", ("T1_general",)) and first.per_task == {"T1_general": 6}
    first.end_of_task(["T1_general", "T2_math"])  # after stage 2: stage 3's buffer
    resumed = make(toy_dir, tiny_tokenizer, lora_model)  # a run resumed after stage 2 builds only this one
    resumed.end_of_task(["T1_general", "T2_math"])
    assert rows_of(resumed.items) == rows_of(first.items) and resumed.info == first.info
    assert resumed.info["allocation"] == {"T1_general": 1, "T2_math": 5}
    other = make(toy_dir, tiny_tokenizer, lora_model, seed=7)
    other.end_of_task(["T1_general", "T2_math"])
    assert rows_of(other.items) != rows_of(first.items)


def test_start_of_task_reuses_the_buffer_end_of_task_built(toy_dir, tiny_tokenizer, lora_model, monkeypatch):
    replay = make(toy_dir, tiny_tokenizer, lora_model)
    assert replay.start_of_task("T1_general", []) == {"inscl_task": "T1_general", "earlier": [], "dynamic": True,
                                                      "infosample": True, "layer": 0}
    assert replay.items == [] and replay.per_task == {}
    replay.end_of_task(["T1_general"])
    items, before = list(replay.items), torch.randint(100, (4,), generator=replay.gen)
    monkeypatch.setattr(inscl, "wasserstein", lambda *a, **k: pytest.fail("rebuilt a buffer that was built"))
    info = replay.start_of_task("T2_math", ["T1_general"])
    assert info["allocation"] == {"T1_general": 6} and replay.items == items
    assert torch.equal(torch.randint(100, (4,), generator=replay.gen), before)  # reseeded as when it was built
    replay.end_of_task(list(TASKS))  # after the last stage: nothing to build
    assert replay.built == ("T2_math", ("T1_general",))
    with pytest.raises(ValueError, match="first tasks"):
        replay.end_of_task(["T2_math"])
    with pytest.raises(ValueError, match="exclude the current task"):
        replay.start_of_task("T2_math", ["T2_math"])


def test_inherited_loss_mixes_current_and_replayed_rows(toy_dir, tiny_tokenizer, lora_model):
    replay = make(toy_dir, tiny_tokenizer, lora_model)
    replay.start_of_task("T2_math", ["T1_general"])
    ds = load_task_dataset(replay.cfg, tiny_tokenizer, "T2_math", "train")
    loss, extra = replay.loss_fn(lora_model, collate_fn([ds[0], ds[1]], tiny_tokenizer.pad_token_id))
    assert torch.isfinite(loss) and float(extra["replay_loss"]) > 0
    assert float(loss.detach()) == pytest.approx(float(extra["task_loss"]) + float(extra["replay_loss"]), rel=1e-5)


def test_config_rejects_bad_inscl_values_naming_the_key(toy_dir, tiny_tokenizer, lora_model):
    for key, value in (("inscl_embed_rows", 0), ("inscl_layer", -1), ("inscl_sinkhorn_eps", 0.0),
                       ("inscl_sinkhorn_eps", 2.0)):
        with pytest.raises(ConfigError, match=key):
            make_config(**{key: value})
    with pytest.raises(ConfigError, match="inscl_dynamic"):
        make_config(["--inscl_dynamic", "maybe"])
    assert make_config(["--inscl_infosample", "false"]).inscl_infosample is False
    with pytest.raises(ValueError, match=r"inscl_layer must be an integer in \[0, 4\]"):
        make(toy_dir, tiny_tokenizer, lora_model, inscl_layer=5)


def test_inscl_trains_end_to_end_logs_its_choices_and_resumes(tmp_path, tiny_model_dir, data_dir):  # noqa: F811
    """train_seq_baselines --method inscl on toy data: the full eval grid, one `inscl` row per stage (stage 2 splits
    the budget over T1 alone), replayed rows from stage 2 on, and an interrupted run resumes to the same adapter."""
    import json

    import train_seq_baselines
    from safetensors.torch import load_file
    from test_train import TASKS, run_script
    root = run_script(train_seq_baselines, tmp_path / "a", tiny_model_dir, data_dir, "--method", "inscl",
                      "--replay_buffer_size", "4", "--inscl_embed_rows", "4")
    evals = [json.loads(x) for x in (root / "logs" / "seq_eval_loss.jsonl").read_text().splitlines()]
    assert {(r["stage"], r["eval_task"]) for r in evals if r["method"] == "inscl"} == \
        {(s, t) for s in range(len(TASKS) + 1) for t in TASKS}
    rows = [json.loads(x) for t in TASKS
            for x in (root / "logs" / f"seq_inscl_{t}_train_loss.jsonl").read_text().splitlines()]
    info = {r["stage"]: r for r in rows if r["split"] == "inscl"}
    assert set(info) == {1, 2}
    assert sum(info[2]["allocation"].values()) == 4 and set(info[2]["allocation"]) == {"T1_general"}
    assert all("replay_loss" in r for r in rows if r["split"] == "train" and r["stage"] == 2)
    # interrupted after stage 1 (stage 2's checkpoint gone): the resumed run ends with the same adapter
    import shutil
    last = f"inscl/seq_2_{TASKS[1]}"
    a = load_file(root / "ckpt" / last / "adapter.safetensors")
    shutil.rmtree(root / "ckpt" / last)
    run_script(train_seq_baselines, root, tiny_model_dir, data_dir, "--method", "inscl", "--replay_buffer_size", "4",
               "--inscl_embed_rows", "4")
    b = load_file(root / "ckpt" / last / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
