"""Task routing for DS-LoRA (models/router.py): per-row fast selection, routing accuracy on separable synthetic
tasks, the fallback for an unseen task, saving, and the routed views through the training script. Tiny random
LLaMA on CPU; synthetic tasks are prompts drawn from disjoint small vocabularies."""
import json
import math
import shutil

import pytest
import torch

import train_slsd_seq
from configs.base_config import ConfigError, make_config
from conftest import make_tiny_llama
from evaluation.generation import _prompt_ids, generate_ids
from models.ds_lora import (fast_mode, get_fast_mode, merge_lora, replace_with_ds_lora, set_fast_mode,
                            start_new_task)
from models.router import (ROUTER_FILE, TaskRouter, attach_router, batch_prompts, describe_task, get_routing,
                           prompt_features, routing_prompts, split_rows)
from utils_data import IGNORE_INDEX, collate_fn, read_jsonl
from utils_results import write_results_md

LAYER = 1  # of the tiny model's 4 decoder layers
VOCAB = {"A": range(10, 18), "B": range(18, 26), "C": range(26, 34)}  # C is never trained: the unseen task


def synthetic_prompts(task: str, n: int, seed: int) -> list[list[int]]:
    """n prompts of 8..15 tokens drawn from the task's own 8-token vocabulary."""
    g = torch.Generator().manual_seed(seed)
    vocab = torch.tensor(list(VOCAB[task]))
    return [vocab[torch.randint(0, len(vocab), (int(torch.randint(8, 16, (1,), generator=g)),), generator=g)].tolist()
            for _ in range(n)]


def make_router(**kw) -> TaskRouter:
    args = dict(layer=LAYER, shrinkage=0.2, fallback_quantile=0.99, temperature=1.0, topk=2) | kw
    return TaskRouter(**args)


@pytest.fixture
def routed_model(tiny_tokenizer):
    """A DS-LoRA tiny LLaMA with distinct random fast branches for tasks A and B (and a non-zero slow branch),
    a router describing A and B from 64 prompts each (32 describe, 32 held out), attached."""
    model = make_tiny_llama(len(tiny_tokenizer))
    replace_with_ds_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    router = make_router()
    for i, task in enumerate(("A", "B")):
        start_new_task(model, task, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        for m in model.modules():
            if hasattr(m, "lora_B_fast"):
                m.lora_B_fast.data = torch.randn(m.lora_B_fast.shape, generator=g) * 0.5
                m.lora_B_slow.data = torch.randn(m.lora_B_slow.shape, generator=g) * 0.1
        router.add_task(task, *describe_task(model, synthetic_prompts(task, 64, seed=i), 32, LAYER, 16, seed=0))
    attach_router(model, router, batch_size=8)
    return model


def padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the mask from lengths."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
    return ids, mask


def logits_of(model, rows):
    ids, mask = padded(rows)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits, mask


def alone(model, row, task):
    """Logits of one row run by itself with its task's own branch (slow only when task is None)."""
    with fast_mode(model, *(("own_task", task) if task else ("none",))):
        return logits_of(model, [row])[0][0]


# ----------------------------------------------------------------------------- per-row selection
def test_routed_batch_equals_each_row_alone_with_own_task(routed_model):
    model = routed_model
    rows = [synthetic_prompts(t, 2, seed=50 + i) for i, t in enumerate("ABC")]
    rows = [rows[0][0], rows[1][0], rows[2][0], rows[1][1], rows[0][1], rows[2][1]]  # tasks mixed in one batch
    decided = get_routing(model).decide(rows)
    assert decided == ["A", "B", None, "B", "A", None]  # the batch mixes both branches and the fallback
    with fast_mode(model, "routed"):
        batch, mask = logits_of(model, rows)
    for b, (row, task) in enumerate(zip(rows, decided)):
        single = alone(model, row, task)
        assert torch.allclose(batch[b, :len(row)], single, atol=1e-5), (b, task)
    # the branches really differ: a row under the other task's branch gives other logits
    assert not torch.allclose(alone(model, rows[0], "B"), alone(model, rows[0], "A"), atol=1e-3)


def test_routed_equals_own_task_bit_for_bit_when_every_row_goes_to_one_task(routed_model):
    rows = synthetic_prompts("B", 4, seed=60)
    assert get_routing(routed_model).decide(rows) == ["B"] * 4
    with fast_mode(routed_model, "routed"):
        routed, _ = logits_of(routed_model, rows)
    with fast_mode(routed_model, "own_task", "B"):
        own, _ = logits_of(routed_model, rows)
    assert torch.equal(routed, own)


def test_teacher_forced_rows_are_routed_on_their_prompt_not_their_response(routed_model):
    """A response in task B's vocabulary after a task A prompt: routed on the prompt, the row gets A's branch."""
    prompt, response = synthetic_prompts("A", 1, seed=70)[0], synthetic_prompts("B", 1, seed=71)[0] * 3
    routing = get_routing(routed_model)
    assert routing.decide([prompt]) == ["A"] and routing.decide([prompt + response]) != ["A"]  # the row is not A's
    item = {"input_ids": torch.tensor(prompt + response),
            "labels": torch.tensor([IGNORE_INDEX] * len(prompt) + response), "idx": 0}
    batch = collate_fn([item], pad_token_id=0)
    assert batch_prompts(batch) == [prompt]
    with fast_mode(routed_model, "routed"), routing_prompts(routed_model, batch_prompts(batch)), torch.no_grad():
        routed = routed_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
    assert torch.allclose(routed, alone(routed_model, prompt + response, "A"), atol=1e-5)
    with fast_mode(routed_model, "routed"), routing_prompts(routed_model, [[1, 2, 3]]):
        with pytest.raises(ValueError, match="starts with none of the 1 prompts"):
            routed_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_routed_soft_layer_output_is_the_weighted_mix_of_own_task_outputs(routed_model):
    layer = next(m for m in routed_model.modules() if hasattr(m, "fast_route"))
    routing = get_routing(routed_model)
    x = torch.randn(3, 5, layer.in_features)
    weights = torch.tensor([[0.7, 0.3], [0.0, 1.0], [0.0, 0.0]])  # a mix, one branch, the fallback
    outs = {}
    for mode, task in (("own_task", "A"), ("own_task", "B"), ("none", None)):
        set_fast_mode(routed_model, mode, task)
        outs[task] = layer(x)
    set_fast_mode(routed_model, "routed_soft")
    routing.set_weights(weights)
    mixed = layer(x)
    expected = torch.stack([0.7 * outs["A"][0] + 0.3 * outs["B"][0], outs["B"][1], outs[None][2]])
    assert torch.allclose(mixed, expected, atol=1e-6)
    set_fast_mode(routed_model, "current")


def test_router_soft_weights_are_a_softmax_over_the_topk_and_topk_1_is_hard(routed_model):
    router = get_routing(routed_model).router
    feats = prompt_features(routed_model, synthetic_prompts("A", 6, seed=80), LAYER, 8)
    d = router.distances(feats)  # (6, 2)
    soft = router.weights(feats, soft=True)
    kept = soft.sum(1) > 0
    assert kept.any()
    expected = torch.softmax(-d.pow(2) / 2, dim=1).float()  # T = 1, top-2 of 2 tasks
    assert torch.allclose(soft[kept], expected[kept], atol=1e-6)
    cold = make_router(temperature=1e3, topk=2)
    for t in router.tasks:
        cold.add_task(t, router.fit_features[t], router.cal_features[t])
    assert torch.equal(cold.distances(feats), d) and cold.weights(feats, soft=True)[kept].min() > 0.2  # softer
    hard = make_router(topk=1)
    for t in router.tasks:
        hard.add_task(t, router.fit_features[t], router.cal_features[t])
    assert torch.equal(hard.weights(feats, soft=True), router.weights(feats, soft=False))


def test_generation_routes_each_row_on_its_prompt_for_the_whole_generate_call(routed_model, tiny_tokenizer):
    """Left-padded batched greedy decoding with a KV cache in the routed view gives each row exactly the tokens
    it gets alone with its own task's branch."""
    cfg = make_config(eval_batch_size=4, max_seq_len=64, device="cpu")
    prompts = [synthetic_prompts("A", 1, seed=90)[0], synthetic_prompts("B", 1, seed=91)[0][:9],
               synthetic_prompts("C", 1, seed=92)[0]]
    tok_rows = [{"instruction": tiny_tokenizer.decode(p), "input": ""} for p in prompts]
    routing = get_routing(routed_model)
    decided = routing.decide(_prompt_ids(tiny_tokenizer, tok_rows, cfg))
    with fast_mode(routed_model, "routed"):
        batched = generate_ids(routed_model, tiny_tokenizer, tok_rows, cfg, "cpu", 6)
    for row, task, out in zip(tok_rows, decided, batched):
        with fast_mode(routed_model, *(("own_task", task) if task else ("none",))):
            assert generate_ids(routed_model, tiny_tokenizer, [row], cfg, "cpu", 6) == [out]


def test_routed_mode_needs_a_router_and_cannot_be_merged(tiny_tokenizer, routed_model):
    bare = make_tiny_llama(len(tiny_tokenizer))
    replace_with_ds_lora(bare, ["q_proj", "v_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="needs a task router"):
        set_fast_mode(bare, "routed")
    before = {n: p.clone() for n, p in routed_model.named_parameters()}
    with fast_mode(routed_model, "routed"):
        with pytest.raises(ValueError, match="selects fast weights per input row"):
            merge_lora(routed_model)
    assert all(torch.equal(p, before[n]) for n, p in routed_model.named_parameters())  # rolled back
    assert get_fast_mode(routed_model) == ("current", None)


def text_prompt_rows(kind: str, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    words = ["sea", "fox", "dog", "quick", "brown", "lazy", "haiku", "text"]
    if kind == "A":
        return [{"instruction": f"Solve the math problem. Natalia sold {int(torch.randint(10, 99, (1,), generator=g))}"
                                f" clips in April and half as many in May.", "input": ""} for _ in range(n)]
    return [{"instruction": "Write a haiku about the " + " ".join(words[int(i)] for i in
                                                               torch.randint(0, 8, (4,), generator=g)), "input": ""}
            for _ in range(n)]


def test_knowledge_in_the_routed_view_scores_each_item_with_its_prompts_branch(routed_model, tiny_tokenizer,
                                                                              tmp_path):
    """evaluation.stage routes knowledge's packed rows (prompt + every candidate) on the item's prompt: each item's
    log-probabilities equal those it gets alone with own_task of the task its prompt is routed to."""
    from evaluation.knowledge import score_knowledge
    from evaluation.stage import run_stage_metrics
    from utils_data import encode_prompt
    cfg = make_config(log_dir=str(tmp_path), drift_num_probes=0, eval_batch_size=4, device="cpu")
    router = make_router(fallback_quantile=0.0)  # no fallback: this test is about where the routing applies
    for i, kind in enumerate("AB"):  # describe A and B by text prompts, as the training script does
        prompts = [encode_prompt(tiny_tokenizer, r, cfg.prompt_format) for r in text_prompt_rows(kind, 32, seed=i)]
        router.add_task(kind, *describe_task(routed_model, prompts, 16, LAYER, 8, seed=0))
    routing = attach_router(routed_model, router, batch_size=8)
    cands = ["Paris is the capital.", "the quick brown fox", "She sold half as many in May. #### 72"]
    items = [{"id": f"{kind}{j}", "task": "T1_general", "kind": "general", "row": row, "candidates": cands, "gold": 0}
             for kind in "AB" for j, row in enumerate(text_prompt_rows(kind, 3, seed=10 + ord(kind)))]
    decided = routing.decide([encode_prompt(tiny_tokenizer, it["row"], cfg.prompt_format) for it in items])
    assert decided == ["A"] * 3 + ["B"] * 3
    with fast_mode(routed_model, "routed"):
        run_stage_metrics(routed_model, tiny_tokenizer, cfg, "m", 1, "A", 0, "cpu", {}, fast_mode="routed",
                          knowledge={"T1_general": items})
    records = read_jsonl(tmp_path / "generations" / "m_stage1_A_routed_knowledge.jsonl")
    assert [r["id"] for r in records] == [it["id"] for it in items]
    for it, task, rec in zip(items, decided, records):
        with fast_mode(routed_model, "own_task", task):
            alone_rec = score_knowledge(routed_model, tiny_tokenizer, cfg, "cpu", [it])[0]
        assert rec["logp"] == pytest.approx(alone_rec["logp"], abs=1e-5)
    with fast_mode(routed_model, "own_task", "B"):  # the branches differ on these items: routing matters
        assert score_knowledge(routed_model, tiny_tokenizer, cfg, "cpu", items[:1])[0]["logp"] != \
            pytest.approx(records[0]["logp"], abs=1e-4)


# ----------------------------------------------------------------------------- accuracy and fallback
def test_router_routes_held_out_rows_of_separable_synthetic_tasks_to_their_task(routed_model):
    routing = get_routing(routed_model)
    for i, task in enumerate(("A", "B")):
        held_out = synthetic_prompts(task, 24, seed=200 + i)
        decided = routing.decide(held_out)
        assert sum(d == task for d in decided) / len(decided) >= 0.9, decided
        assert set(decided) <= {task, None}  # never the other task's branch: at worst the fallback
        nearest = routing.router.distances(routing.features_of([tuple(p) for p in held_out])).argmin(1)
        assert (nearest == i).all()  # without the fallback every row is routed home


def test_rows_of_an_unseen_task_fall_back_to_the_slow_branch(routed_model):
    unseen = synthetic_prompts("C", 24, seed=300)
    router = get_routing(routed_model).router
    assert get_routing(routed_model).decide(unseen) == [None] * 24
    d = router.distances(prompt_features(routed_model, unseen, LAYER, 8))
    assert (d > router.radii).all()  # far outside both tasks' radii, not a near miss
    with fast_mode(routed_model, "routed"):
        routed, mask = logits_of(routed_model, unseen[:4])
    with fast_mode(routed_model, "none"):
        slow, _ = logits_of(routed_model, unseen[:4])
    assert torch.equal(routed, slow)
    never = make_router(fallback_quantile=0.0)  # quantile 0: no fallback, the nearest task always
    for t in router.tasks:
        never.add_task(t, router.fit_features[t], router.cal_features[t])
    assert None not in never.decide(prompt_features(routed_model, unseen, LAYER, 8))


def test_fallback_radius_is_the_quantile_of_held_out_distances(routed_model):
    router = get_routing(routed_model).router
    for k, t in enumerate(router.tasks):
        d = router.distances(router.cal_features[t])[:, k]
        assert float(router.radii[k]) == pytest.approx(float(torch.quantile(d, 0.99)))
        assert (d <= router.radii[k]).float().mean() >= 0.9  # nearly every held-out row is inside


def test_features_come_from_the_base_model_with_adapters_off(routed_model, tiny_tokenizer):
    prompts = synthetic_prompts("A", 3, seed=400)
    base = make_tiny_llama(len(tiny_tokenizer))  # same seed: the untouched base weights
    assert torch.allclose(prompt_features(routed_model, prompts, LAYER, 2), prompt_features(base, prompts, LAYER, 2),
                          atol=1e-6)
    hidden = []
    hook = base.model.layers[LAYER - 1].register_forward_hook(lambda m, a, out: hidden.append(out))
    with torch.no_grad():
        base.model(input_ids=torch.tensor([prompts[0]]))
    hook.remove()
    assert torch.allclose(prompt_features(base, prompts[:1], LAYER, 2)[0], hidden[0][0].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match=r"router_layer must be an integer in \[0, 4\]"):
        prompt_features(base, prompts, 5, 2)


def test_split_rows_describes_and_holds_out_disjoint_rows():
    fit, cal = split_rows(200, 64, seed=3)
    assert (len(fit), len(cal)) == (64, 64) and not set(fit) & set(cal)
    assert split_rows(200, 64, seed=3) == (fit, cal)
    assert tuple(map(len, split_rows(9, 64, seed=0))) == (5, 4)  # few rows: half each
    with pytest.raises(ValueError, match="at least 3 training rows"):
        split_rows(2, 64, seed=0)


# ----------------------------------------------------------------------------- saving
def test_router_save_load_round_trip(routed_model, tmp_path):
    router = get_routing(routed_model).router
    router.save(tmp_path / ROUTER_FILE)
    loaded = TaskRouter.load(tmp_path / ROUTER_FILE, LAYER, 0.2, 0.99, 1.0, 2)
    assert loaded.tasks == router.tasks
    for t in router.tasks:
        assert torch.equal(loaded.fit_features[t], router.fit_features[t])
        assert torch.equal(loaded.cal_features[t], router.cal_features[t])
    feats = prompt_features(routed_model, synthetic_prompts("B", 5, seed=500), LAYER, 8)
    assert torch.equal(loaded.distances(feats), router.distances(feats))
    assert torch.equal(loaded.radii, router.radii)
    assert (tmp_path / ROUTER_FILE).stat().st_size < 40_000  # 2 tasks x 64 rows x 64 float32
    with pytest.raises(ValueError, match="--router_layer 1"):
        TaskRouter.load(tmp_path / ROUTER_FILE, 2, 0.2, 0.99, 1.0, 2)
    with pytest.raises(FileNotFoundError, match="TaskRouter.save"):
        TaskRouter.load(tmp_path / "missing.safetensors", LAYER, 0.2, 0.99, 1.0, 2)


def test_router_rejects_bad_input():
    with pytest.raises(ValueError, match="shrinkage must be in"):
        make_router(shrinkage=1.5)
    r = make_router()
    with pytest.raises(ValueError, match="at least 2 description rows"):
        r.add_task("A", torch.zeros(1, 4), torch.zeros(1, 4))
    r.add_task("A", torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="already described"):
        r.add_task("A", torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"must be \(rows, 4\)"):
        r.add_task("B", torch.randn(3, 5), torch.randn(2, 5))
    for argv, msg in ((["--metric_fast_modes", "own_task"], "own_task needs a task per row"),
                      (["--eval_fast_modes", "current,routd"], "routd"), (["--router_topk", "0"], "router_topk"),
                      (["--router_rows_per_task", "1"], "router_rows_per_task")):
        with pytest.raises(ConfigError, match=msg):
            make_config(argv)
    assert make_config(["--final_fast_modes", "routed,routed_soft"]).final_fast_modes == ("routed", "routed_soft")


# ----------------------------------------------------------------------------- through the training script
TASKS = ("T1_general", "T2_math")


def toy_rows(task: str, n: int, split: str) -> list[dict]:
    rows = []
    for i in range(n):
        if task == "T1_general":
            row = {"instruction": f"Write a haiku about the sea in lowercase. ({split} {i})", "input": "",
                   "output": "the quick brown fox" + " sea" * (i % 3)}
        else:
            row = {"instruction": "Solve the math problem.", "input": f"Natalia sold {4 * i + 8} clips in April.",
                   "output": f"She sold half as many in May. #### {6 * i + 12}"}
        rows.append({"id": f"{task}-{split}-{i}", **row})
    return rows


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("router_toy")
    for task in TASKS:
        for split, n in (("train", 12), ("val", 4), ("toy", 10)):
            (d / f"{task}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(task, n, split)))
    return d


def smoke(root, model_dir, data_dir, *extra):
    train_slsd_seq.main(["--preset", "smoke", "--model_name", str(model_dir), "--data_dir", str(data_dir),
                         "--tasks", ",".join(TASKS), "--log_dir", str(root / "logs"), "--save_dir", str(root / "ckpt"),
                         "--device", "cpu", "--num_frozen_layers", "2", "--router_layer", "1",
                         "--eval_fast_modes", "current,routed", "--final_fast_modes", "own_task,routed_soft",
                         "--metric_fast_modes", "current,routed", "--bench_metrics", "false", *extra])
    return root


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory, tiny_model_dir, toy_dir):
    return smoke(tmp_path_factory.mktemp("routed_run"), tiny_model_dir, toy_dir)


def test_training_script_logs_the_routed_views_and_the_router(routed_run):
    logs = routed_run / "logs"
    loss = read_jsonl(logs / "seq_eval_loss.jsonl")
    cells = sorted((r["stage"], r["eval_task"], r["fast_mode"]) for r in loss)
    expected = [(s, t, m) for s in (0, 1, 2) for t in TASKS for m in ("current", "routed")]
    expected += [(2, t, m) for t in TASKS for m in ("own_task", "routed_soft")]
    assert cells == sorted(expected)
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in loss)
    by = {(r["stage"], r["eval_task"], r["fast_mode"]): r["loss"] for r in loss}
    assert all(by[(0, t, "routed")] == by[(0, t, "current")] for t in TASKS)  # stage 0: every view is the base
    router = read_jsonl(logs / "seq_router.jsonl")
    assert [(r["stage"], r["eval_task"]) for r in router] == [(s, t) for s in (1, 2) for t in TASKS]
    for r in router:
        assert {"method", "stage", "eval_task", "n", "accuracy", "routed_to"} <= r.keys()
        assert r["n"] == 4 and sum(r["routed_to"].values()) == 4 and 0 <= r["accuracy"] <= 1
        assert r["seen"] == (TASKS.index(r["eval_task"]) < r["stage"])
        right = r["eval_task"] if r["seen"] else "none"
        assert r["accuracy"] == r["routed_to"].get(right, 0) / 4
    # drift ran in both metric views (the routed one generates and teacher-forces through the router)
    drift = read_jsonl(logs / "seq_drift.jsonl")
    assert {(r["stage"], r["fast_mode"]) for r in drift if r["metric"] == "kl_base"} == \
        {(s, m) for s in (0, 1, 2) for m in ("current", "routed")}
    assert (logs / "generations" / f"ds_lora_slsd_stage2_{TASKS[1]}_routed.jsonl").exists()


def test_training_script_saves_a_router_per_stage_that_matches_the_logged_routing(routed_run, tiny_model_dir,
                                                                                toy_dir):
    cfg = make_config(["--preset", "smoke", "--data_dir", str(toy_dir), "--tasks", ",".join(TASKS),
                       "--router_layer", "1"])
    for stage, task in enumerate(TASKS, 1):
        router = TaskRouter.load_for(routed_run / "ckpt" / "ds_lora_slsd" / f"seq_{stage}_{task}" / ROUTER_FILE, cfg)
        assert router.tasks == list(TASKS[:stage])
        assert [len(router.fit_features[t]) for t in router.tasks] == [5] * stage  # 10 toy rows: 5 + 5 held out
    md = write_results_md(routed_run / "logs", TASKS)
    assert "### Task router: ds_lora_slsd" in md and "| routed_soft − own_task |" in md
    view_rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| routed")}
    assert {"routed", "routed_soft", "routed − own_task", "routed_soft − own_task"} <= set(view_rows)


def test_resumed_run_loads_the_router_and_logs_the_same_routing(routed_run, tmp_path, tiny_model_dir, toy_dir,
                                                               capsys):
    root = tmp_path / "run"
    shutil.copytree(routed_run, root)
    (root / "ckpt" / "ds_lora_slsd" / f"seq_2_{TASKS[1]}" / "done.json").unlink()
    capsys.readouterr()
    smoke(root, tiny_model_dir, toy_dir)
    out = capsys.readouterr().out
    assert "resuming after stage 1" in out and "describing" not in out  # the saved router was loaded
    assert read_jsonl(root / "logs" / "seq_router.jsonl") == read_jsonl(routed_run / "logs" / "seq_router.jsonl")
    # a checkpoint from before routing existed: the tasks are described again, to the same features
    (root / "ckpt" / "ds_lora_slsd" / f"seq_2_{TASKS[1]}" / "done.json").unlink()
    (root / "ckpt" / "ds_lora_slsd" / f"seq_1_{TASKS[0]}" / ROUTER_FILE).unlink()
    smoke(root, tiny_model_dir, toy_dir)
    assert "describing T1_general from their training rows" in capsys.readouterr().out
    assert read_jsonl(root / "logs" / "seq_router.jsonl") == read_jsonl(routed_run / "logs" / "seq_router.jsonl")


def test_eval_loss_in_the_routed_view_equals_own_task_when_every_row_is_routed_home(routed_run, tiny_model_dir,
                                                                                  toy_dir):
    """The logged routed loss of a task whose rows all went to its own branch equals its own_task loss."""
    loss = {(r["stage"], r["eval_task"], r["fast_mode"]): r["loss"]
            for r in read_jsonl(routed_run / "logs" / "seq_eval_loss.jsonl")}
    router = {r["eval_task"]: r for r in read_jsonl(routed_run / "logs" / "seq_router.jsonl") if r["stage"] == 2}
    home = [t for t in TASKS if router[t]["accuracy"] == 1.0]
    assert home, "the toy tasks should be routed home"
    for t in home:
        assert loss[(2, t, "routed")] == pytest.approx(loss[(2, t, "own_task")], abs=1e-6)


def test_sweep_pools_the_prompt_between_the_shared_template_ends():
    from sweep_router import common_ends, pooled
    prompts = [[1, 2, 9, 8, 5], [1, 2, 7, 5], [1, 2, 6, 6, 6, 5]]
    assert common_ends(prompts) == (2, 1)
    states = [{0: torch.arange(len(p) * 2, dtype=torch.float32).view(len(p), 2)} for p in prompts]
    mean, content, last = (pooled(states, 0, how, 2, 1) for how in ("mean", "content", "last"))
    assert torch.equal(mean[1], torch.tensor([3.0, 4.0]))  # rows (0,1) (2,3) (4,5) (6,7)
    assert torch.equal(content[0], torch.tensor([5.0, 6.0]))  # rows 2, 3 of prompt 0: (4,5), (6,7)
    assert torch.equal(content[1], torch.tensor([4.0, 5.0]))  # prompt 1: only its row 2
    assert torch.equal(last[2], torch.tensor([10.0, 11.0]))
