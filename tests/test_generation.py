"""Batched generation, stops, bench sampling, per-stage metrics and drift on a tiny random LLaMA (CPU, seconds)."""
import json
import math
import re

import pytest
import torch

import evaluation.drift
import evaluation.generation
import evaluation.stage
import utils_eval as ue
from configs.base_config import make_config
from evaluation.generation import STOP_STRINGS, stop_end
from models.ds_lora import replace_with_ds_lora
from models.lora_simple import adapters_disabled
from utils_data import encode_prompt, read_jsonl, write_jsonl

PROMPTS = [  # different lengths, deliberately not sorted by length
    {"instruction": "Give a short answer to the question.", "input": "What is the capital of France?"},
    {"instruction": "Hi", "input": ""},
    {"instruction": "Summarize the text below in one sentence.",
     "input": "The quick brown fox jumps over the lazy dog 0123456789. " * 3},
    {"instruction": "Write a haiku about the sea in lowercase.", "input": ""},
    {"instruction": "Solve the math problem.", "input": "Natalia sold 48 clips in April and half as many in May."},
]

MAX_NEW_TOKENS = {"T1_general": 8, "T2_math": 8, "T3_code": 8, "T4_tool": 8, "T5_safety": 8, "drift": 6}


def make_cfg(tmp_path, **kw):
    base = dict(data_dir=str(tmp_path / "split"), log_dir=str(tmp_path / "logs"), model_name="tiny-test",
                eval_batch_size=8, max_seq_len=512, gen_rows_per_task=0, drift_num_probes=0,
                max_new_tokens=dict(MAX_NEW_TOKENS))
    return make_config(**(base | kw))


@torch.no_grad()
def manual_greedy(model, prompt_ids, max_new_tokens, eos):
    """Reference: one prompt, full forward each step (no cache, no padding), stop after EOS."""
    ids, new = list(prompt_ids), []
    for _ in range(max_new_tokens):
        tok = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        new.append(tok)
        ids.append(tok)
        if tok == eos:
            break
    return new


def untied_tiny_llama(vocab_size, seed=0):
    """Like conftest's tiny LLaMA but with its own lm_head, so the EOS output row can be rigged alone."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


# ---------------------------------------------------------------- generation


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_llama, tiny_tokenizer, tmp_path):
    cfg8, cfg1 = make_cfg(tmp_path, eval_batch_size=8), make_cfg(tmp_path, eval_batch_size=1)
    lengths = [len(encode_prompt(tiny_tokenizer, r, cfg8.prompt_format)) for r in PROMPTS]
    assert len(set(lengths)) == len(PROMPTS)  # the batch really needs padding
    tiny_llama.train()
    batched = ue.generate_ids(tiny_llama, tiny_tokenizer, PROMPTS, cfg8, "cpu", 10)
    assert tiny_llama.training  # training mode restored
    single = ue.generate_ids(tiny_llama, tiny_tokenizer, PROMPTS, cfg1, "cpu", 10)
    assert batched == single
    # Original order: row i's reply is the manual greedy continuation of prompt i.
    eos = tiny_tokenizer.eos_token_id
    for row, got in zip(PROMPTS, batched):
        assert got == manual_greedy(tiny_llama, encode_prompt(tiny_tokenizer, row, cfg8.prompt_format), 10, eos)
    texts = ue.generate(tiny_llama, tiny_tokenizer, PROMPTS, cfg8, "cpu", 10)
    assert texts == [tiny_tokenizer.decode(x, skip_special_tokens=True) for x in single]



def test_per_row_budgets_in_one_batch_equal_separate_runs(tiny_llama, tiny_tokenizer, tmp_path):
    cfg = make_cfg(tmp_path, eval_batch_size=8)
    budgets = [3, 10, 6][:len(PROMPTS)] + [4] * max(0, len(PROMPTS) - 3)
    mixed = ue.generate_ids(tiny_llama, tiny_tokenizer, PROMPTS, cfg, "cpu", budgets)
    for row, budget, got in zip(PROMPTS, budgets, mixed):
        alone = ue.generate_ids(tiny_llama, tiny_tokenizer, [row], cfg, "cpu", budget)[0]
        assert got == alone and len(got) <= budget
    assert max(len(x) for x in mixed) > min(budgets)  # the budgets really differ in effect
    with pytest.raises(ValueError, match="one per row"):
        ue.generate_ids(tiny_llama, tiny_tokenizer, PROMPTS, cfg, "cpu", budgets[:-1])

def test_generation_stops_at_eos_and_drops_what_follows(tiny_tokenizer, tmp_path):
    cfg = make_cfg(tmp_path)
    model = untied_tiny_llama(len(tiny_tokenizer))
    eos, k = tiny_tokenizer.eos_token_id, 3
    prompt = encode_prompt(tiny_tokenizer, PROMPTS[0], cfg.prompt_format)
    before = manual_greedy(model, prompt, k + 1, eos)
    assert eos not in before
    with torch.no_grad():  # rig lm_head so EOS just beats the token greedy picks at step k
        h = model.model(input_ids=torch.tensor([prompt + before[:k]])).last_hidden_state[0, -1]  # (H,)
        model.lm_head.weight[eos] = model.lm_head.weight[before[k]] + 0.05 * h / h.norm() ** 2
    expected = manual_greedy(model, prompt, 20, eos)
    assert expected == before[:k] + [eos]  # EOS is argmax exactly after k tokens
    rows = [PROMPTS[2], PROMPTS[0], PROMPTS[1]]  # the stopping row shares a batch with others
    ids = ue.generate_ids(model, tiny_tokenizer, rows, cfg, "cpu", 20)
    assert ids[1] == expected
    texts = ue.generate(model, tiny_tokenizer, rows, cfg, "cpu", 20)
    assert texts[1] == tiny_tokenizer.decode(before[:k])
    for row, got in zip(rows, ids):
        assert got == manual_greedy(model, encode_prompt(tiny_tokenizer, row, cfg.prompt_format), 20, eos)


def test_long_prompt_is_truncated_from_the_left(tiny_tokenizer, tmp_path):
    cfg = make_cfg(tmp_path, max_seq_len=16)
    full = encode_prompt(tiny_tokenizer, PROMPTS[2], cfg.prompt_format)
    assert len(full) > 16
    assert evaluation.generation._prompt_ids(tiny_tokenizer, [PROMPTS[2]], cfg) == [full[-16:]]


# ---------------------------------------------------------------- stops

MATH_REPLY = "48 + 24 = 72\n#### 72\nBut maybe it is 80."
CODE_REPLY = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds two numbers."


def test_math_stop_ends_after_the_complete_answer_line():
    math = STOP_STRINGS["T2_math"]
    assert MATH_REPLY[:stop_end(MATH_REPLY, math)] == "48 + 24 = 72\n#### 72\n"
    for unfinished in ("48 + 24 = 72\n#### 7", "#### 1,0", "#### 72", "####\n", "The answer is 72.\n"):
        assert stop_end(unfinished, math) is None, unfinished  # the number may still grow, or no answer line yet
    kept = MATH_REPLY[:stop_end(MATH_REPLY, math)]
    assert ue.extract_math_strict(kept) == ue.extract_math_strict(MATH_REPLY) == "72"


def test_code_stop_needs_the_closing_fence_of_the_first_python_block():
    code = STOP_STRINGS["T3_code"]
    opened = CODE_REPLY[:CODE_REPLY.index("```\nIt")]
    assert "```python" in opened and stop_end(opened, code) is None  # the opening fence alone never stops
    kept = CODE_REPLY[:stop_end(CODE_REPLY, code)]
    assert kept == "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert ue.extract_code(kept) == ue.extract_code(CODE_REPLY)
    # a first block in another language is not the one scored when a python block follows: no stop there
    two = "```text\nadd two numbers\n```\n```python\ndef add(a, b):\n    return a + b\n```\nmore"
    assert two[:stop_end(two, code)].endswith("return a + b\n```")
    assert ue.extract_code(two[:stop_end(two, code)]) == ue.extract_code(two)
    assert stop_end("```PY\nx = 1\n```", code) == len("```PY\nx = 1\n```")  # extract_code's case rule
    assert set(STOP_STRINGS) == {"T2_math", "T3_code"}  # T1, T4, T5 read the whole reply


def scripted_llama(tokenizer, scripts, prompt_format):
    """A tiny LLaMA whose greedy reply to each prompt is a fixed text, then EOS: a large logit bonus on the
    script's next token, found by prompt at prefill and by the forwards since then. Counts forwards."""
    from transformers import LlamaForCausalLM
    eos = tokenizer.eos_token_id
    by_prompt = {tuple(encode_prompt(tokenizer, row, prompt_format)): tokenizer.encode(text, add_special_tokens=False)
                 for row, text in scripts}

    class Scripted(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kw):
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kw)
            self.forwards += 1
            if input_ids.shape[1] > 1:  # prefill: left-padded prompts (later steps feed one token, with the cache)
                mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask  # None: no padding
                self.replies = [by_prompt[tuple(ids[m.bool()].tolist())] for ids, m in zip(input_ids, mask)]
                self.step = 0
            for b, reply in enumerate(self.replies):
                out.logits[b, -1, reply[self.step] if self.step < len(reply) else eos] += 1e4
            self.step += 1
            return out

    base = make_tiny_llama(len(tokenizer))
    model = Scripted(base.config).eval()
    model.load_state_dict(base.state_dict())
    model.requires_grad_(False)
    model.forwards = 0
    return model


def make_tiny_llama(vocab_size):
    from conftest import make_tiny_llama as make
    return make(vocab_size, num_layers=2)


def test_stops_cut_right_after_the_answer_and_keep_the_greedy_prefix(tiny_tokenizer, tmp_path):
    cfg = make_cfg(tmp_path)
    rows = [PROMPTS[4], PROMPTS[3], PROMPTS[0], PROMPTS[1]]
    general = "Paris is the capital."  # tokens "Pari", "s", ...: a stop "Pa" ends inside the first token
    model = scripted_llama(tiny_tokenizer, list(zip(rows, [MATH_REPLY, CODE_REPLY, general, general])),
                           cfg.prompt_format)
    stops = [STOP_STRINGS["T2_math"], STOP_STRINGS["T3_code"], None, ["Pa"]]
    full = ue.generate_ids(model, tiny_tokenizer, rows, cfg, "cpu", 80)
    assert ue.generate(model, tiny_tokenizer, rows, cfg, "cpu", 80) == [MATH_REPLY, CODE_REPLY, general, general]
    model.forwards = 0
    ids = ue.generate_ids(model, tiny_tokenizer, rows, cfg, "cpu", 80, stop_strings=stops)
    assert model.forwards == max(len(x) for x in ids)  # one batch, done when its longest row is
    for got, whole in zip(ids, full):
        assert got == whole[:len(got)]  # exactly what greedy decoding produced, cut
    assert len(ids[0]) < len(full[0]) and len(ids[1]) < len(full[1])
    assert ids[2] == full[2]  # a row without stops is unchanged
    assert ids[3] == full[3][:1]  # kept through the token that completes the match...
    texts = ue.generate(model, tiny_tokenizer, rows, cfg, "cpu", 80, stop_strings=stops)
    assert texts == ["48 + 24 = 72\n#### 72\n", "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```",
                     general, "Pa"]  # ...and the text ends at the match
    for row in (rows[2], rows[0]):  # a row stopped alone equals itself stopped in a batch
        alone = ue.generate_ids(model, tiny_tokenizer, [row], cfg, "cpu", 80, stop_strings=[stops[rows.index(row)]])
        assert alone == [ids[rows.index(row)]]


def test_batch_ends_when_every_row_has_stopped_or_spent_its_budget(tiny_tokenizer, tmp_path):
    cfg = make_cfg(tmp_path)
    rows = [PROMPTS[4], PROMPTS[1], PROMPTS[2]]
    long_reply = "The quick brown fox jumps over the lazy dog. " * 3  # about 100 tokens, no stop in it
    model = scripted_llama(tiny_tokenizer, [(rows[0], MATH_REPLY), (rows[1], "#### 5\nand then much more text"),
                                            (rows[2], long_reply)], cfg.prompt_format)
    math = STOP_STRINGS["T2_math"]
    ue.generate_ids(model, tiny_tokenizer, rows[:2], cfg, "cpu", 40)
    unstopped = model.forwards
    model.forwards = 0
    ids = ue.generate_ids(model, tiny_tokenizer, rows[:2], cfg, "cpu", 40, stop_strings=[math, math])
    assert model.forwards == max(len(x) for x in ids) < unstopped
    model.forwards = 0  # one batch: the stopped row and a row that runs out of its smaller budget
    ids = ue.generate_ids(model, tiny_tokenizer, [rows[0], rows[2]], cfg, "cpu", [60, 30], stop_strings=[math, None])
    assert len(ids[0]) < 30 and len(ids[1]) == 30 and model.forwards == 30
    with pytest.raises(ValueError, match="one list of patterns"):
        ue.generate_ids(model, tiny_tokenizer, rows, cfg, "cpu", 40, stop_strings=math * 3)
    with pytest.raises(ValueError, match="one list of patterns"):
        ue.generate_ids(model, tiny_tokenizer, rows, cfg, "cpu", 40, stop_strings=[None])


def test_stop_on_a_random_model_keeps_the_other_rows_unchanged(tiny_llama, tiny_tokenizer, tmp_path):
    cfg = make_cfg(tmp_path)
    full = ue.generate_ids(tiny_llama, tiny_tokenizer, PROMPTS, cfg, "cpu", 10)
    k = next(k for k in range(3, 10) if "\ufffd" not in tiny_tokenizer.decode(full[0][:k]))  # whole characters
    stops = [[re.escape(tiny_tokenizer.decode(full[0][:k]))]] + [None] * (len(PROMPTS) - 1)
    ids = ue.generate_ids(tiny_llama, tiny_tokenizer, PROMPTS, cfg, "cpu", 10, stop_strings=stops)
    assert 1 <= len(ids[0]) <= k and ids[0] == full[0][:len(ids[0])]
    assert ids[1:] == full[1:]


# ---------------------------------------------------------------- bench sets


def write_bench(tmp_path, task, rows):
    write_jsonl(tmp_path / "split" / f"{task}_bench.jsonl", rows)


def test_load_bench_sets_samples_rows_per_task_and_is_identical_across_calls(tmp_path, capsys):
    write_bench(tmp_path, "T1_general", [{"id": f"g{i}", "instruction": "x", "input": "", "kind": "general",
                                          "check": {"type": "lowercase"}} for i in range(10)])
    kinds = ["harmful"] * 5 + ["benign"] * 2 + ["supportive"] * 7
    write_bench(tmp_path, "T5_safety", [{"id": f"s{i}", "instruction": "x", "input": "", "kind": k}
                                        for i, k in enumerate(kinds)])
    cfg = make_cfg(tmp_path, tasks=("T1_general", "T2_math", "T5_safety"), gen_rows_per_task=8)
    bench = ue.load_bench_sets(cfg)
    assert "T2_math_bench.jsonl not found" in capsys.readouterr().out
    assert list(bench) == ["T1_general", "T5_safety"]
    assert len(bench["T1_general"]) == 8
    per_kind = {k: sum(r["kind"] == k for r in bench["T5_safety"]) for k in ("harmful", "benign", "supportive")}
    assert per_kind == {"harmful": 3, "benign": 2, "supportive": 3}  # benign's unused share goes to the others
    ids = [int(r["id"][1:]) for r in bench["T5_safety"]]
    assert ids == sorted(ids)  # file order kept
    assert ue.load_bench_sets(cfg) == bench
    other_seeds = [ue.load_bench_sets(make_cfg(tmp_path, tasks=("T1_general",), gen_rows_per_task=3, eval_seed=s))
                   for s in range(5)]
    assert any(b["T1_general"] != other_seeds[0]["T1_general"] for b in other_seeds)  # eval_seed picks the sample
    three = ue.load_bench_sets(make_cfg(tmp_path, tasks=("T1_general",), gen_rows_per_task=3))["T1_general"]
    train_seed = ue.load_bench_sets(make_cfg(tmp_path, tasks=("T1_general",), gen_rows_per_task=3, seed=1))
    assert train_seed["T1_general"] == three  # the training seed does not
    assert all(r in bench["T1_general"] for r in three)  # a larger sample keeps the smaller one's rows
    for n in (0, len(kinds), 100):  # 0 = all rows; so is any count at least the file's
        everything = ue.load_bench_sets(make_cfg(tmp_path, tasks=("T5_safety",), gen_rows_per_task=n))
        assert len(everything["T5_safety"]) == len(kinds)


@pytest.mark.parametrize("task, counts, n, expected", [
    ("T5_safety", {"harmful": 40, "benign": 40, "supportive": 8}, 32, {"harmful": 12, "benign": 12, "supportive": 8}),
    ("T5_safety", {"harmful": 40, "benign": 40, "supportive": 8}, 31, {"harmful": 11, "benign": 12, "supportive": 8}),
    ("T5_safety", {"harmful": 40, "benign": 40, "supportive": 8}, 12, {"harmful": 4, "benign": 4, "supportive": 4}),
    ("T3_code", {"humaneval": 30, "codeio": 20}, 32, {"humaneval": 16, "codeio": 16}),
    ("T3_code", {"humaneval": 30, "codeio": 10}, 32, {"humaneval": 22, "codeio": 10}),
])
def test_gen_rows_per_task_are_spread_evenly_over_kinds(tmp_path, task, counts, n, expected):
    rows = [{"id": f"{kind}{i}", "instruction": "x", "input": "", "kind": kind}
            for i in range(max(counts.values())) for kind in counts if i < counts[kind]]  # kinds interleaved
    write_bench(tmp_path, task, rows)
    got = ue.load_bench_sets(make_cfg(tmp_path, tasks=(task,), gen_rows_per_task=n))[task]
    assert len(got) == n
    assert {k: sum(r["kind"] == k for r in got) for k in counts} == expected


# ---------------------------------------------------------------- scoring

HE_ROW = {"id": "he0", "kind": "humaneval", "entry_point": "hyp",
          "prompt": 'import math\n\n\ndef hyp(a, b):\n    """Length of the hypotenuse."""\n',
          "test": "def check(candidate):\n    assert candidate(3, 4) == 5\n"}


def test_humaneval_redefinition_keeps_the_prompt_imports():
    fenced = "Here you go:\n```python\ndef hyp(a, b):\n    return math.sqrt(a * a + b * b)\n```\nDone."
    assert ue.humaneval_completion(HE_ROW, fenced).startswith("\ndef hyp(")
    assert ue.score_row("T3_code", HE_ROW, fenced) == {"format": 1, "code_pass1": 1, "humaneval_pass1": 1}


def test_humaneval_body_only_completion_continues_the_prompt():
    assert ue.score_row("T3_code", HE_ROW, "    return math.hypot(a, b)\n")["humaneval_pass1"] == 1
    assert ue.score_row("T3_code", HE_ROW, "```python\ndef hyp(a, b):\n    return a + b\n```")["code_pass1"] == 0


def test_score_row_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind 'essay'"):
        ue.score_row("T1_general", {"id": "x", "kind": "essay"}, "text")


WEATHER = [{"name": "get_weather", "parameters": {"type": "dict", "properties": {"city": {"type": "string"}},
                                                  "required": ["city"]}}]
CALL = '{"name": "get_weather", "arguments": {"city": "paris"}}'

# (task, row, model output): expected means below.
FIXTURE = [
    ("T1_general", {"kind": "general", "check": {"type": "lowercase"}}, "hello world"),
    ("T1_general", {"kind": "general", "check": {"type": "exact", "answer": "Paris"}}, "**Paris**"),
    ("T2_math", {"kind": "math", "answer": "72"}, "48 + 24 = 72\n#### 72"),
    ("T2_math", {"kind": "math", "answer": "5"}, "The answer is 5"),
    ("T3_code", HE_ROW, "```python\ndef hyp(a, b):\n    return math.sqrt(a * a + b * b)\n```"),
    ("T3_code", {"kind": "codeio", "reference_code": "def main_solution(x):\n    return 2 * x\n",
                 "inputs": [{"x": 1}, {"x": 5}]}, "```python\ndef main_solution(x):\n    return x + x\n```"),
    ("T3_code", {"kind": "codeio", "reference_code": "def main_solution(x):\n    return 2 * x\n",
                 "inputs": [{"x": 1}, {"x": 5}]}, "def main_solution(x):\n    return x * x\n"),
    ("T4_tool", {"kind": "bfcl", "functions": WEATHER, "ground_truth": [{"get_weather": {"city": ["Paris"]}}]}, CALL),
    ("T4_tool", {"kind": "bfcl", "functions": WEATHER,
                 "reference": '{"name": "get_weather", "arguments": {"city": "Paris"}}'}, "It is sunny."),
    ("T5_safety", {"kind": "harmful"}, "I'm sorry, I cannot help with that."),
    ("T5_safety", {"kind": "benign"}, "Sure! Kill the process with `kill -9`."),
    ("T5_safety", {"kind": "supportive"}, "You are not alone. Please reach out to a crisis hotline."),
]
EXPECTED = {  # metric: (value, n)
    "general_strict": (0.5, 2), "general_loose": (1.0, 2),
    "math_strict": (0.5, 2), "math_flexible": (1.0, 2), "math_strict_minus_flexible": (-0.5, 2),
    "code_pass1": (2 / 3, 3), "humaneval_pass1": (1.0, 1), "codeio_pass1": (0.5, 2),
    "tool_ast": (0.5, 2), "tool_json_valid": (0.5, 2), "tool_exact": (0.0, 1),
    "refusal": (1.0, 1), "over_refusal": (0.0, 1), "supportive": (1.0, 1),
}
EXPECTED_FORMAT = {  # task: (value, n); the misses: math without `#### N`, tool reply that is no call
    "T1_general": (1.0, 2), "T2_math": (0.5, 2), "T3_code": (1.0, 3), "T4_tool": (0.5, 2), "T5_safety": (1.0, 3),
}
METRIC_KEYS = {"method", "stage", "stage_task", "eval_task", "task", "step", "split", "metric", "value", "n", "se"}
DRIFT_METRICS = {"kl_base", "kl_base_first", "length_ratio", "json_rate", "markdown_rate", "code_fence_rate",
                 "refusal_rate", "over_refusal_rate"}  # + kl_base_rest when a base reply is longer than drift_first_tokens


def test_run_stage_metrics_logs_fixed_metric_names_and_keys(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    outputs, by_task = {}, {}
    for i, (task, row, text) in enumerate(FIXTURE):
        row = {**row, "id": f"r{i}", "instruction": "Do it.", "input": ""}
        outputs[row["id"]] = text
        by_task.setdefault(task, []).append(row)
    for task, rows in by_task.items():
        write_bench(tmp_path, task, rows)
    monkeypatch.setattr(evaluation.stage, "generate", lambda model, tok, rows, cfg, device, max_new_tokens, **kw:
                        [outputs[r["id"]] for r in rows])
    cfg = make_cfg(tmp_path, drift_num_probes=2)
    bench = ue.load_bench_sets(cfg)
    returned = ue.run_stage_metrics(tiny_llama, tiny_tokenizer, cfg, "seq_lora", 1, "T1_general", 24, "cpu", bench)

    logs = tmp_path / "logs"
    metrics = read_jsonl(logs / "seq_eval_metrics.jsonl")
    assert all(set(r) == METRIC_KEYS for r in metrics)
    assert all(r["split"] == "bench" and r["eval_task"] == r["task"] and r["method"] == "seq_lora"
               and r["stage"] == 1 and r["stage_task"] == "T1_general" and r["step"] == 24 for r in metrics)
    got = {r["metric"]: (r["value"], r["n"]) for r in metrics if r["metric"] != "format"}
    assert got.keys() == EXPECTED.keys()
    for metric, (value, n) in EXPECTED.items():
        assert got[metric][0] == pytest.approx(value) and got[metric][1] == n, metric
    formats = {r["eval_task"]: (r["value"], r["n"]) for r in metrics if r["metric"] == "format"}
    assert formats.keys() == EXPECTED_FORMAT.keys()
    for task, (value, n) in EXPECTED_FORMAT.items():
        assert formats[task][0] == pytest.approx(value) and formats[task][1] == n, task
    for task in EXPECTED_FORMAT:  # format is logged first for each task
        assert next(r["metric"] for r in metrics if r["eval_task"] == task) == "format"
    assert all(0 <= r["value"] <= 1 for r in metrics if r["metric"] != "math_strict_minus_flexible")

    drift = read_jsonl(logs / "seq_drift.jsonl")
    assert all(set(r) == METRIC_KEYS and r["split"] == "drift" for r in drift)
    assert {r["metric"] for r in drift if r["eval_task"] == "drift"} - {"kl_base_rest"} == DRIFT_METRICS
    # the standard error of a rate over n rows: sqrt(p (1 - p) / (n - 1)) with the sample std
    for r in metrics:
        if r["metric"] == "format" and r["eval_task"] == "T2_math":
            assert r["se"] == pytest.approx(math.sqrt(0.5 * 0.5 / (r["n"] - 1)), abs=1e-6)
    assert all(r["se"] is None for r in drift if r["metric"] == "length_ratio")
    gap = [r for r in drift if r["eval_task"] == "T2_math"]
    assert [(r["metric"], r["value"]) for r in gap] == [("math_strict_minus_flexible", -0.5)]
    assert all(0 <= r["value"] <= 1 for r in drift if r["metric"].endswith("_rate"))
    assert returned == metrics + drift

    gens = read_jsonl(logs / "generations" / "seq_lora_stage1_T1_general.jsonl")
    assert len(gens) == len(FIXTURE) + 2
    assert all({"id", "task", "kind", "prompt", "output", "scores"} <= set(g) for g in gens)
    math_row = next(g for g in gens if g["id"] == "r2")
    assert math_row["output"] == "48 + 24 = 72\n#### 72" and math_row["scores"]["math_strict"] == 1
    assert "Do it." in math_row["prompt"]


# ---------------------------------------------------------------- drift


def test_drift_prompts_ask_for_no_json_code_or_list():
    assert len(DRIFT := ue.DRIFT_PROMPTS) >= 24 and len(set(DRIFT)) == len(DRIFT)
    for p in DRIFT:
        assert not any(w in p.lower() for w in ("json", "code", "list", "bullet", "python", "table")), p


def drift_value(rows, metric="kl_base"):
    (value,) = [r["value"] for r in rows if r["eval_task"] == "drift" and r["metric"] == metric]
    return value


def test_drift_kl_is_zero_for_the_base_and_positive_after_changing_lora_b(tiny_llama, tiny_tokenizer, tmp_path):
    cfg = make_cfg(tmp_path, drift_num_probes=3)
    plain = ue.run_stage_metrics(tiny_llama, tiny_tokenizer, cfg, "seq_lora", 0, "base", 0, "cpu", {})
    assert abs(drift_value(plain)) < 1e-6  # a model without adapters is its own base
    replace_with_ds_lora(tiny_llama, ["q_proj", "v_proj"], r=4, alpha=8)
    at_init = ue.run_stage_metrics(tiny_llama, tiny_tokenizer, cfg, "ds_lora", 0, "base", 0, "cpu", {})
    assert abs(drift_value(at_init)) < 1e-6  # lora_B = 0 at init: the model is the base
    assert drift_value(at_init, "length_ratio") == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in tiny_llama.named_parameters():
            if "lora_B_fast" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    changed = ue.run_stage_metrics(tiny_llama, tiny_tokenizer, cfg, "ds_lora", 1, "T1_general", 5, "cpu", {})
    assert drift_value(changed) > 1e-3
    with adapters_disabled(tiny_llama):
        disabled = ue.run_stage_metrics(tiny_llama, tiny_tokenizer, cfg, "ds_lora", 1, "T1_general", 5, "cpu", {})
    assert abs(drift_value(disabled)) < 1e-6


def test_base_drift_responses_are_cached_and_reused(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    calls = []
    real = ue.generate_ids

    def counting(*args, desc="generate", **kw):
        calls.append(desc)
        return real(*args, desc=desc, **kw)

    monkeypatch.setattr(evaluation.drift, "generate_ids", counting)
    cfg = make_cfg(tmp_path, drift_num_probes=2)
    first = ue.run_stage_metrics(tiny_llama, tiny_tokenizer, cfg, "seq_lora", 0, "base", 0, "cpu", {})
    assert calls == ["drift base", "drift"]
    cache = json.loads((tmp_path / "logs" / "drift_base_responses.json").read_text())
    assert len(cache) == 2
    calls.clear()
    second = ue.run_stage_metrics(tiny_llama, tiny_tokenizer, cfg, "ewc", 1, "T1_general", 3, "cpu", {})
    assert calls == ["drift"]  # the base replies come from the cache
    assert drift_value(second) == drift_value(first)
    calls.clear()
    more = make_cfg(tmp_path, drift_num_probes=3)
    ue.run_stage_metrics(tiny_llama, tiny_tokenizer, more, "ewc", 2, "T2_math", 3, "cpu", {})
    assert calls == ["drift base", "drift"]  # only the new probe is generated for the base
    assert len(json.loads((tmp_path / "logs" / "drift_base_responses.json").read_text())) == 3
