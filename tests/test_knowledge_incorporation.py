"""knowledge_incorporation.py and utils_ki.py: the corpus, the SQuAD reader, offline grading, self-edit parsing, the
adapter life cycle (fresh, trained, removed or merged), and the whole script end to end on a tiny random LLaMA."""
import json
import re

import pytest
import torch

import knowledge_incorporation as ki
from configs.base_config import make_config
from conftest import make_tiny_llama
from evaluation.cl_metrics import cl_metrics
from models.lora_simple import lora_state_dict
from utils_io import read_jsonl, write_jsonl
from utils_ki import (SquadFormatError, answer_questions, attach_lora, contains_answer, detach_lora, exact_match,
                      gold_logprobs, lora_attached, make_corpus, normalize_answer, passage_rows, question_gains,
                      read_squad, rows_to_passages, sample_texts, self_edit_row, split_self_edit, token_f1,
                      train_adapter, training_rows)

CPU = torch.device("cpu")


def tiny_cfg(**kw):
    return make_config([], **{"device": "cpu", "num_frozen_layers": 2, "lora_dropout": 0.0, "eval_batch_size": 4,
                              "per_device_batch_size": 2, "bf16_autocast": False, **kw})


# ----------------------------------------------------------------------------- corpus and unified rows
def test_corpus_is_deterministic_by_seed_and_answers_are_in_the_passage():
    a, b, c = make_corpus(12, seed=3), make_corpus(12, seed=3), make_corpus(12, seed=4)
    assert a == b
    assert a != c
    assert len({p["title"] for p in a}) == 12 and len({p["passage_id"] for p in a}) == 12
    for p in a:
        assert 3 <= len(p["questions"]) <= 5
        assert p["title"] in p["context"]
        for q in p["questions"]:
            assert q["answer"] in p["context"], (q, p["context"])
            assert p["title"] in q["question"]
    assert make_corpus(5, seed=3) == a[:5]  # a larger corpus extends a smaller one


def test_unified_rows_are_instruction_rows_and_group_back_into_passages():
    passages = make_corpus(4, seed=0)
    rows = passage_rows(passages)
    assert len(rows) == sum(len(p["questions"]) for p in passages)
    assert len({r["id"] for r in rows}) == len(rows)
    r = rows[0]
    assert set(r) >= {"id", "instruction", "input", "output", "passage_id"}
    assert r["input"] == f"Topic: {passages[0]['title']}\n{passages[0]['questions'][0]['question']}"
    assert r["output"] == passages[0]["questions"][0]["answer"]
    assert passages[0]["context"] not in r["instruction"] + r["input"]  # the passage is never shown with a question
    assert rows_to_passages(rows) == passages


# ----------------------------------------------------------------------------- SQuAD (--source local)
SQUAD = {"version": "v2.0", "data": [
    {"title": "Zorblat", "paragraphs": [
        {"context": "Zorblat is a moon of Quenmere discovered in 1911 by Ada Pellwick.",
         "qas": [{"question": "Who discovered Zorblat?", "id": "a", "answers": [{"text": "Ada Pellwick", "answer_start": 48}]},
                 {"question": "When was Zorblat discovered?", "id": "b",
                  "answers": [{"text": "1911", "answer_start": 40}, {"text": "in 1911", "answer_start": 37}]},
                 {"question": "How heavy is Zorblat?", "id": "c", "answers": [], "is_impossible": True}]},
        {"context": "Nothing answerable here.",
         "qas": [{"question": "What?", "id": "d", "answers": [], "is_impossible": True}]}]},
    {"title": "Velmoor", "paragraphs": [
        {"context": "Velmoor hosts the Brightfall festival every March.",
         "qas": [{"question": "What festival does Velmoor host?", "id": "e",
                  "answers": [{"text": "the Brightfall festival", "answer_start": 14}]}]}]}]}


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_squad_reader_takes_first_answers_and_skips_unanswerable(tmp_path):
    passages = read_squad(write_json(tmp_path / "squad.json", SQUAD))
    assert [p["passage_id"] for p in passages] == ["sq000_00", "sq001_00"]  # the all-impossible paragraph is gone
    assert passages[0]["title"] == "Zorblat"
    assert passages[0]["questions"] == [{"question": "Who discovered Zorblat?", "answer": "Ada Pellwick"},
                                        {"question": "When was Zorblat discovered?", "answer": "1911"}]
    assert passages[1]["questions"][0]["answer"] == "the Brightfall festival"
    assert len(read_squad(tmp_path / "squad.json", max_questions=1)[0]["questions"]) == 1


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("data"), 'has no field "data"'),
    (lambda d: d["data"][1].pop("paragraphs"), 'data[1] has no field "paragraphs"'),
    (lambda d: d["data"][0]["paragraphs"][0].update(context=7), "data[0].paragraphs[0].context must be a str"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("question"), 'data[0].paragraphs[0].qas[0] has no field "question"'),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(answers=[]), "data[0].paragraphs[0].qas[1].answers is empty"),
    (lambda d: d["data"][1]["paragraphs"][0]["qas"][0]["answers"][0].update(text=None),
     "data[1].paragraphs[0].qas[0].answers[0].text must be a str"),
])
def test_malformed_squad_names_file_and_field(tmp_path, mutate, field):
    doc = json.loads(json.dumps(SQUAD))
    mutate(doc)
    path = write_json(tmp_path / "bad.json", doc)
    with pytest.raises(SquadFormatError) as e:
        read_squad(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_squad_reader_rejects_non_json_and_seal_flat_lists(tmp_path):
    (tmp_path / "x.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SquadFormatError, match=r"x\.json: not valid JSON"):
        read_squad(tmp_path / "x.json")
    with pytest.raises(SquadFormatError, match="the top level must be a JSON object, got list"):
        read_squad(write_json(tmp_path / "flat.json", [{"title": "t", "context": "c", "questions": []}]))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_squad(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- grading
def test_grading_matches_hand_computed_values():
    assert normalize_answer("The  Brightfall, festival!") == "brightfall festival"
    assert exact_match("the Brightfall festival.", "Brightfall festival") == 1.0
    assert exact_match("Brightfall", "Brightfall festival") == 0.0
    # pred {born, in, drenhaven, 1971}, gold {drenhaven, 1971, march}: 2 common -> P 2/4, R 2/3, F1 4/7
    assert token_f1("born in Drenhaven 1971", "March Drenhaven 1971") == pytest.approx(4 / 7)
    assert token_f1("nothing", "Drenhaven") == 0.0
    assert contains_answer("She was born on March 3, 1971.", "March 3, 1971") == 1.0
    assert contains_answer("She was born on March 31, 1971.", "March 3, 1971") == 0.0  # whole words only
    assert contains_answer("Drenhavenport", "Drenhaven") == 0.0
    assert contains_answer("anything", "") == 0.0
    assert question_gains([False, True, True, False], [True, False, True, False]) == [1, -1, 0, 0]


# ----------------------------------------------------------------------------- self-edits and training rows
def test_split_self_edit_drops_headers_markers_and_short_lines():
    text = ("Here are some implications:\n1. Velmora was born in Drenhaven.\n2) She studied soil chemistry there.\n"
            "- ok\n* Velmora was born in Drenhaven.\n\nShe works at Kelis Labs today.")
    assert split_self_edit(text) == ["Velmora was born in Drenhaven.", "She studied soil chemistry there.",
                                     "She works at Kelis Labs today."]
    assert split_self_edit(text, max_rows=1) == ["Velmora was born in Drenhaven."]
    qa = "Question 1: Where was Velmora born?\nAnswer: In Drenhaven.\nQuestion 2: What did she study?\nAnswer: Soil chemistry."
    assert split_self_edit(qa) == ["Question 1: Where was Velmora born? Answer: In Drenhaven.",
                                   "Question 2: What did she study? Answer: Soil chemistry."]
    assert split_self_edit("") == [] and split_self_edit("yes") == []


def test_training_rows_always_start_with_the_passage():
    p = make_corpus(1, seed=0)[0]
    assert training_rows(p, []) == [{"instruction": f"Topic: {p['title']}", "input": "", "output": p["context"]}]
    rows = training_rows(p, ["1. A first implication here.\n2. " + p["context"], "A second edit line here."])
    assert [r["output"] for r in rows] == [p["context"], "A first implication here.", "A second edit line here."]
    assert self_edit_row(p, "implications")["input"] == f"{p['title']}\n{p['context']}"
    with pytest.raises(ValueError, match="unknown self-edit prompt 'summary'"):
        self_edit_row(p, "summary")


# ----------------------------------------------------------------------------- generation and adapters
def test_sampled_self_edits_repeat_with_the_seed_and_give_k_per_row(tiny_tokenizer):
    model, cfg = make_tiny_llama(len(tiny_tokenizer)), tiny_cfg()
    rows = [self_edit_row(p, "implications") for p in make_corpus(3, seed=0)]
    a = sample_texts(model, tiny_tokenizer, rows, cfg, CPU, 6, k=3, temperature=1.0, top_p=1.0, seed=5)
    b = sample_texts(model, tiny_tokenizer, rows, cfg, CPU, 6, k=3, temperature=1.0, top_p=1.0, seed=5)
    c = sample_texts(model, tiny_tokenizer, rows, cfg, CPU, 6, k=3, temperature=1.0, top_p=1.0, seed=6)
    assert a == b and a != c
    assert [len(x) for x in a] == [3, 3, 3]
    assert len({t for x in a for t in x}) > 3  # sampling, not three copies of one reply
    greedy = sample_texts(model, tiny_tokenizer, rows, cfg, CPU, 6, k=1, temperature=0.0, top_p=1.0, seed=0)
    assert greedy == sample_texts(model, tiny_tokenizer, rows, cfg, CPU, 6, k=1, temperature=0.0, top_p=1.0, seed=9)
    with pytest.raises(ValueError, match="need sampling"):
        sample_texts(model, tiny_tokenizer, rows, cfg, CPU, 6, k=2, temperature=0.0, top_p=1.0, seed=0)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_removed_adapter_leaves_the_base_and_merged_adapter_keeps_the_update(tiny_tokenizer):
    model, cfg = make_tiny_llama(len(tiny_tokenizer)), tiny_cfg(lr=5e-2)
    ids = torch.tensor([tiny_tokenizer("Topic: Velmora Quistad was born in Drenhaven.")["input_ids"]])
    base = logits(model, ids)
    rows = training_rows(make_corpus(1, seed=0)[0], [])
    attach_lora(model, cfg, seed=0)
    assert torch.equal(logits(model, ids), base)  # B = 0: a fresh adapter changes nothing
    train_adapter(model, tiny_tokenizer, rows, cfg, CPU, steps=3, lr=5e-2, seed=0)
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3
    detach_lora(model, merge=False)
    assert not lora_state_dict(model) and torch.equal(logits(model, ids), base)
    attach_lora(model, cfg, seed=0)
    train_adapter(model, tiny_tokenizer, rows, cfg, CPU, steps=3, lr=5e-2, seed=0)
    assert torch.allclose(logits(model, ids), adapted, atol=1e-5)  # the same seed trains the same adapter
    detach_lora(model, merge=True)
    assert not lora_state_dict(model)
    assert torch.allclose(logits(model, ids), adapted, atol=1e-4)  # folded into the weights


def test_lora_attached_restores_generator_weights_and_removes_them(tiny_tokenizer):
    model, cfg = make_tiny_llama(len(tiny_tokenizer)), tiny_cfg()
    ids = torch.tensor([[5, 6, 7, 8]])
    base = logits(model, ids)
    with lora_attached(model, cfg, seed=0):
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.fill_(0.01)
        weights = {k: v.clone() for k, v in lora_state_dict(model).items()}
        adapted = logits(model, ids)
    assert torch.equal(logits(model, ids), base)
    with lora_attached(model, cfg, seed=1, weights=weights):  # another seed: A comes from the weights
        assert torch.allclose(logits(model, ids), adapted, atol=1e-6)
    assert not lora_state_dict(model)


def test_training_on_the_questions_raises_the_gold_likelihood(tiny_tokenizer):
    # a random tiny LLaMA's logits are capped near uniform (RMSNorm'd states times 0.02-scale tied embeddings), so the
    # rise is small in absolute terms: 16 steps give about +0.16 nats per token; an adapter that learns nothing gives 0
    model, cfg = make_tiny_llama(len(tiny_tokenizer)), tiny_cfg(num_frozen_layers=0)
    qrows = passage_rows(make_corpus(2, seed=1))
    before = gold_logprobs(model, tiny_tokenizer, qrows, cfg, CPU)
    with lora_attached(model, cfg, seed=0):
        stats = train_adapter(model, tiny_tokenizer, qrows, cfg, CPU, steps=16, lr=5e-2, seed=0)
        after = gold_logprobs(model, tiny_tokenizer, qrows, cfg, CPU)
        graded = answer_questions(model, tiny_tokenizer, qrows, cfg, CPU, max_new_tokens=4)
    assert stats["loss_last"] < stats["loss_first"]
    assert sum(after) / len(after) > sum(before) / len(before) + 0.08
    assert [g["id"] for g in graded] == [r["id"] for r in qrows]
    for g in graded:
        assert set(g) == {"id", "pred", "correct", "em", "f1", "logprob"} and isinstance(g["correct"], bool)
        assert "\n" not in g["pred"]


def test_gold_logprob_scores_the_answer_tokens_alone(tiny_tokenizer):
    """One row scored in a batch equals log-softmax summed by hand over its answer tokens (EOS excluded)."""
    from utils_data import encode_example
    model, cfg = make_tiny_llama(len(tiny_tokenizer)), tiny_cfg()
    rows = passage_rows(make_corpus(1, seed=2))[:2]
    got = gold_logprobs(model, tiny_tokenizer, rows, cfg, CPU)
    for r, g in zip(rows, got):
        ids, labels = encode_example(tiny_tokenizer, r, cfg.prompt_format, cfg.max_seq_len)
        logp = torch.log_softmax(logits(model, torch.tensor([ids]))[0].float(), -1)
        pos = [t for t in range(len(ids) - 1) if labels[t + 1] != -100][:-1]  # drop the EOS target
        want = sum(float(logp[t, ids[t + 1]]) for t in pos) / len(pos)
        assert g == pytest.approx(want, abs=1e-4)


# ----------------------------------------------------------------------------- the script end to end
def run_main(tmp_path, model_dir, *extra):
    log_dir = tmp_path / "logs"
    argv = ["--preset", "smoke", "--model_name", str(model_dir), "--device", "cpu", "--log_dir", str(log_dir),
            "--num_frozen_layers", "2", "--bf16_autocast", "false", "--self_edit_tokens", "12",
            "--answer_tokens", "4", "--inner_steps", "2", "--gen_steps", "2", *extra]
    return ki.main(argv), log_dir


def test_script_end_to_end_writes_both_logs(tmp_path, tiny_model_dir):
    summary, log_dir = run_main(tmp_path, tiny_model_dir, "--n_sequences", "2", "--n_eval", "3")
    rows = read_jsonl(log_dir / "ki_inner.jsonl")
    for r in rows:
        assert {"round", "condition", "passage_id", "acc_before", "acc_after", "adapter_gain"} <= set(r)
        assert r["adapter_gain"] == pytest.approx(r["acc_after"] - r["acc_before"])
        assert len(r["gains"]) == r["n_questions"] and 0 <= r["acc_after"] <= 1
        assert r["logprob_gain"] == pytest.approx(r["logprob_after"] - r["logprob_before"])
    count = {}
    for r in rows:
        count[(r["round"], r["condition"], r["split"])] = count.get((r["round"], r["condition"], r["split"]), 0) + 1
    # smoke: 2 training passages x k=2 candidates in round 0; 3 held-out passages x each condition
    assert count == {(0, "no_training", "eval"): 3, (0, "passage_only", "eval"): 3, (0, "base_self_edits", "eval"): 3,
                     (0, "candidates", "train"): 4, (1, "trained_self_edits", "eval"): 3}
    for r in rows:
        if r["condition"] == "no_training":
            assert r["acc_after"] == r["acc_before"] and r["gains"] == [0] * r["n_questions"]
    # the held-out passages' "before" is the same untouched base model in every condition
    before = {}
    for r in rows:
        if r["split"] == "eval":
            assert before.setdefault(r["passage_id"], r["logprob_before"]) == r["logprob_before"]
    edits = read_jsonl(log_dir / "ki_self_edits.jsonl")
    assert sum(e["selected"] for e in edits if e["split"] == "train") == 2  # one best self-edit per passage
    assert len(read_jsonl(log_dir / "ki_answers.jsonl")) == sum(r["n_questions"] for r in rows)
    data = read_jsonl(log_dir / "ki_data.jsonl")
    assert {r["split"] for r in data} == {"train", "eval"} and len({r["passage_id"] for r in data}) == 5

    cont = json.loads((log_dir / "ki_continual.json").read_text())
    assert cont["n_sequences"] == 2 and len(cont["sequences"]) == 2
    assert len(cont["R"]) == 3 and all(len(row) == 2 for row in cont["R"])  # (N+1) x N, N = 2
    assert {"ap", "bwt", "forgetting"} <= set(cont["metrics"])
    for s in cont["sequences"]:
        m = cl_metrics(s["R"])
        assert s["metrics"]["bwt"] == pytest.approx(m["bwt"]) and s["metrics"]["ap"] == pytest.approx(m["ap"])
    assert cont["metrics"]["ap"] == pytest.approx(cl_metrics(cont["R"])["ap"])  # AP is linear in R
    assert (log_dir / "ki_continual.png").stat().st_size > 0
    assert summary["continual"]["metrics"] == cont["metrics"]
    assert {(t["round"], t["condition"]) for t in summary["outer"]} == {k[:2] for k in count}
    assert json.loads((log_dir / "ki_config.json").read_text())["ki_args"]["k"] == 2

    # --restart replaces the logs instead of appending to them, and repeats the numbers exactly
    again, _ = run_main(tmp_path, tiny_model_dir, "--n_sequences", "2", "--n_eval", "3", "--restart")
    assert read_jsonl(log_dir / "ki_inner.jsonl") == rows and again["resumed_inner_loops"] == 0
    answers, edits = read_jsonl(log_dir / "ki_answers.jsonl"), read_jsonl(log_dir / "ki_self_edits.jsonl")

    # an interrupted run (half its inner loops logged, the second continual sequence not) resumes to the same logs
    write_jsonl(log_dir / "ki_inner.jsonl", rows[:len(rows) // 2])
    cut = [e for e in edits if e["split"] != "continual1" and not (e["split"] == "eval" and e["round"] == 1)]
    assert 0 < len(cut) < len(edits)
    write_jsonl(log_dir / "ki_self_edits.jsonl", cut)
    n_answers = sum(r["n_questions"] for r in rows[:len(rows) // 2])
    write_jsonl(log_dir / "ki_answers.jsonl", answers[:n_answers])
    cont["sequences"] = cont["sequences"][:1]
    (log_dir / "ki_continual.json").write_text(json.dumps(cont))
    resumed, _ = run_main(tmp_path, tiny_model_dir, "--n_sequences", "2", "--n_eval", "3")
    assert resumed["resumed_inner_loops"] == len(rows) // 2
    assert read_jsonl(log_dir / "ki_inner.jsonl") == rows[:len(rows) // 2] + rows[len(rows) // 2:]
    assert sorted(map(json.dumps, read_jsonl(log_dir / "ki_self_edits.jsonl"))) == sorted(map(json.dumps, edits))
    assert read_jsonl(log_dir / "ki_answers.jsonl") == answers
    assert resumed["continual"]["metrics"] == summary["continual"]["metrics"]
    # other settings start afresh
    other, _ = run_main(tmp_path, tiny_model_dir, "--n_sequences", "1", "--n_eval", "3")
    assert other["resumed_inner_loops"] == 0 and other["continual"]["n_sequences"] == 1


def test_continual_merges_then_restores_the_base_weights(tmp_path, tiny_model_dir, tiny_tokenizer):
    from utils_model import load_model_and_tokenizer
    cfg = make_config(["--model_name", str(tiny_model_dir), "--device", "cpu", "--num_frozen_layers", "2",
                       "--log_dir", str(tmp_path), "--bf16_autocast", "false", "--lora_dropout", "0"])
    args = ki.resolve_args(ki.build_parser().parse_args(["--preset", "smoke", "--n_eval", "2", "--inner_steps", "2",
                                                          "--self_edit_tokens", "8", "--answer_tokens", "3"]))
    model, tok, device = load_model_and_tokenizer(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = ki.Experiment(model, tok, cfg, device, args, tmp_path)
    result = ki.run_continual(ex, make_corpus(2, seed=0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    R = result["sequences"][0]["R_logprob"]
    assert R[1][0] != R[0][0]  # the merged update changed the model between rows


def test_local_source_runs_on_a_squad_file(tmp_path, tiny_model_dir):
    path = write_json(tmp_path / "squad.json", SQUAD)
    summary, log_dir = run_main(tmp_path, tiny_model_dir, "--source", "local", "--squad_file", str(path),
                                "--n_train", "0", "--rounds", "0", "--n_eval", "2", "--stages", "outer")
    assert {r["passage_id"] for r in read_jsonl(log_dir / "ki_data.jsonl")} == {"sq000_00", "sq001_00"}
    assert {t["condition"] for t in summary["outer"]} == {"no_training", "passage_only", "base_self_edits"}
    assert "continual" not in summary


@pytest.mark.parametrize("argv, message", [
    (["--stages", "outer,train"], "unknown stage"),
    (["--source", "local"], "needs --squad_file"),
    (["--n_continual", "5", "--n_eval", "2"], "exceeds --n_eval"),
    (["--temperature", "0"], "is greedy"),
    (["--rounds", "1", "--n_train", "0"], "needs training passages"),
    (["--inner_lr", "0"], "--inner_lr must be in (0, 1)"),
    (["--k", "0"], "--k must be >= 1"),
])
def test_bad_flags_exit_with_a_message(argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        ki.resolve_args(ki.build_parser().parse_args(["--preset", "smoke", *argv]))
