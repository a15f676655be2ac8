"""T1 general: program-checkable instructions, IFEval-style strict and loose."""
import json
import re

from evaluation.math_score import numbers_equal
from evaluation.tool_score import strip_fence


_NUMBER_RE = re.compile(r"(?:(?<!\w)-)?\d[\d,]*(?:\.\d+)?")  # "-" after a digit or letter is a range: "3-5"


def _check_one(text, check):
    """One check on one response variant; an empty response fails every check (as in IFEval)."""
    kind = check.get("type")
    if kind not in _GENERAL_CHECKS:
        raise ValueError(f"unknown general check type {kind!r}; known: {sorted(_GENERAL_CHECKS)}")
    if not text.strip():
        return False
    return _GENERAL_CHECKS[kind](text, check)


def _check_contains(text, check):
    answers = check["answer"] if isinstance(check["answer"], list) else [check["answer"]]
    return all(str(a).lower() in text.lower() for a in answers)


def _check_json(text, check):
    try:
        json.loads(strip_fence(text))
    except json.JSONDecodeError:
        return False
    return True


def _check_number(text, check):
    numbers = _NUMBER_RE.findall(text)
    return bool(numbers) and numbers_equal(numbers[-1], str(check["answer"]))


def _check_bullets(text, check):  # IFEval's bullet regexes: "* item" and "- item" lines
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == check["n"]


def _list_item(s):
    return s.strip().removesuffix(".").strip().lower()  # "red, green, blue." ends a sentence, not an item


def _check_list_exact(text, check):
    got = [_list_item(x) for x in text.strip().split(",")]
    return got == [_list_item(str(a)) for a in check["answer"]]


_GENERAL_CHECKS = {
    "exact": lambda text, c: text.strip() == str(c["answer"]).strip(),  # case-sensitive
    "contains": _check_contains,  # case-insensitive; a list answer needs every item
    "lowercase": lambda text, c: text == text.lower(),
    "num_bullets": _check_bullets,
    "json": _check_json,  # whole reply, a surrounding ``` fence allowed (as IFEval)
    "number": _check_number,  # last number in the text equals the answer numerically
    "word_count_max": lambda text, c: len(text.split()) <= c["n"],
    "list_exact": _check_list_exact,  # comma-separated items, strip + lower-case, one trailing "." dropped
    "starts_with": lambda text, c: text.lstrip().startswith(str(c["answer"])),  # case-sensitive
}


def _loose_variants(text):
    """IFEval loose: the reply, without its first / last / both lines, each with and without `*`."""
    lines = text.split("\n")
    base = [text, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return base + [t.replace("*", "") for t in base]


def score_general(text, row):
    """-> {"strict": 0/1, "loose": 0/1} for row["check"] (see _GENERAL_CHECKS for the types)."""
    check = row["check"]
    strict = _check_one(text, check)
    loose = strict or any(_check_one(t, check) for t in _loose_variants(text))
    return {"strict": int(strict), "loose": int(loose)}
