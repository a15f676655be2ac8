"""T2 math: gsm8k strict (`#### N`) and flexible (last number) extraction, as lm-evaluation-harness v3."""
import re
from decimal import Decimal, InvalidOperation


MATH_STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
MATH_FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def extract_math_strict(text):
    """First `#### N` answer in the text, or None."""
    m = MATH_STRICT_RE.search(text)
    return m.group(1) if m else None


def extract_math_flexible(text):
    """Last number-like span in the text (lm-eval gsm8k `flexible-extract`), or None."""
    matches = MATH_FLEXIBLE_RE.findall(text)  # list of (group1, group2) tuples
    if not matches:
        return None
    g1, g2 = matches[-1]
    return g1 or g2


def normalize_number(s):
    """Strip `,` and `$` and one trailing `.`, then surrounding whitespace: "$1,234." -> "1234"."""
    s = s.strip().replace(",", "").replace("$", "")
    if s.endswith("."):
        s = s[:-1]
    return s.strip()


def numbers_equal(a, b):
    """Equal after `normalize_number`; exactly as decimals when both parse ("72.0" == "72",
    10000000001 != 10000000000), else as strings."""
    a, b = normalize_number(str(a)), normalize_number(str(b))
    try:
        return Decimal(a) == Decimal(b)  # exact: a float tolerance would merge large integers
    except InvalidOperation:  # not a number (or a signalling NaN): compare the text
        return a == b


def math_reference_answer(output):
    """Reference answer from a gsm8k-style output ("... #### 72") or a bare answer ("72")."""
    output = str(output)
    if "####" in output:
        output = output.split("####")[-1]
    return normalize_number(output)


def score_math(completion, reference_answer):
    """-> {"strict": 0/1, "flexible": 0/1}; a large strict-minus-flexible gap is format drift."""
    ref = math_reference_answer(reference_answer)
    strict = extract_math_strict(completion)
    flexible = extract_math_flexible(completion)
    return {
        "strict": int(strict is not None and numbers_equal(strict, ref)),
        "flexible": int(flexible is not None and numbers_equal(flexible, ref)),
    }
