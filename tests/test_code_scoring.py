"""Code scoring through two sandboxes (evaluation.code_score + evaluation.sandbox.run_check)."""
import json
from pathlib import Path

import pytest

from evaluation.code_score import score_codeio, score_humaneval
from evaluation.sandbox import run_check

FIXTURE = Path(__file__).parent / "fixtures" / "codeio_bench_rows.jsonl"


@pytest.mark.parametrize("row", [json.loads(line) for line in FIXTURE.read_text().splitlines()],
                         ids=lambda r: r["id"])
def test_real_codeio_rows_that_need_sympy_score_their_own_reference(row):
    # On the old Python-level guard (ctypes blocked) these scored 0 even with the reference as candidate.
    assert "sympy" in row["reference_code"]
    assert score_codeio(row["reference_code"], row["reference_code"], row["inputs"], timeout_s=60) == 1
    wrong = "def main_solution(**kwargs):\n    return None\n"
    assert score_codeio(wrong, row["reference_code"], row["inputs"], timeout_s=60) == 0


def test_humaneval_test_that_calls_the_entry_point_by_name():
    # HumanEval/33's test compares candidate(...) with sort_third(...) called by name.
    row = {"prompt": "def double(x):\n    \"\"\"Return 2 * x.\"\"\"\n",
           "test": "def check(candidate):\n    assert candidate(3) == double(3) == 6\n", "entry_point": "double"}
    assert score_humaneval(row, "    return 2 * x\n") == 1
    assert score_humaneval(row, "    return 3 * x\n") == 0


def test_humaneval_test_can_use_the_prompts_helpers():
    row = {"prompt": "def enc(s):\n    return s[::-1]\n\n\ndef dec(s):\n    \"\"\"Invert enc.\"\"\"\n",
           "test": "def check(candidate):\n    assert candidate(enc('abc')) == 'abc'\n", "entry_point": "dec"}
    assert score_humaneval(row, "    return s[::-1]\n") == 1
    assert score_humaneval(row, "    return s\n") == 0


def test_values_cross_the_pipe_with_their_types():
    candidate = ("import numpy as np\n"
                 "def f():\n    return (1, [2.5, float('inf')], {'a': {3, 4}}, b'x', None, True, np.int64(7), -2**70)\n"
                 "def g(*args, **kw):\n    return [args, kw]\n")
    harness = ("r = candidate('f')()\n"
               "assert r == (1, [2.5, float('inf')], {'a': {3, 4}}, b'x', None, True, 7, -2**70), r\n"
               "assert type(r) is tuple and type(r[1]) is list and type(r[5]) is bool\n"
               "assert candidate('g')(1, (2,), k={1: 'a'}) == [(1, (2,)), {'k': {1: 'a'}}]\n")
    assert run_check(candidate, harness, timeout_s=30).passed


def test_candidate_exceptions_reach_the_test_as_the_same_builtin_type():
    candidate = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n"
    harness = ("try:\n    candidate('f')(-1)\n    raise AssertionError('no error')\nexcept ValueError as e:\n"
               "    assert 'negative' in str(e)\n")
    assert run_check(candidate, harness).passed


def test_a_candidate_object_cannot_answer_for_the_test():
    # An object whose __eq__ is always True cannot cross: only plain data does.
    candidate = "class Yes:\n    def __eq__(self, o):\n        return True\ndef f():\n    return Yes()\n"
    assert not run_check(candidate, "assert candidate('f')() == 42\n").passed
