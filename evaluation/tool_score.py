"""T4 tool calls: BFCL AST match (Python flavour), JSON-valid rate, exact match for the hf source."""
import json
import re


_FENCE_RE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def strip_fence(text):
    """Whitespace and one surrounding ```json ... ``` fence removed."""
    text = text.strip()
    m = _FENCE_RE.match(text)
    return m.group(1).strip() if m else text


def parse_tool_calls(text):
    """Model output -> [{"name": str, "arguments": dict}, ...], or None if not that JSON shape.

    Accepts one call object or a list of them (an empty list = "no call"); any key other than
    `name` and `arguments` makes the output invalid.
    """
    try:
        obj = json.loads(strip_fence(text))
    except json.JSONDecodeError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for item in items:
        if not (isinstance(item, dict) and set(item) == {"name", "arguments"}
                and isinstance(item["name"], str) and isinstance(item["arguments"], dict)):
            return None
        calls.append({"name": item["name"], "arguments": item["arguments"]})
    return calls


# Gorilla type names -> Python types (BFCL PYTHON_TYPE_MAPPING plus the JSON-schema names).
BFCL_TYPES = {"string": str, "any": str, "integer": int, "float": float, "number": float,
              "boolean": bool, "array": list, "tuple": list, "dict": dict, "object": dict}


def bfcl_normalize(s):
    """BFCL `standardize_string`: drop ` ,./-_*^`, lower-case, `'` -> `"`."""
    return re.sub(r"[ \,\.\/\-\_\*\^]", "", s).lower().replace("'", '"')


def _type_ok(value, type_name, items=None):
    """BFCL type check; ints are accepted for float; bools are never numbers; an unknown type name fails."""
    if not isinstance(type_name, str) or type_name not in BFCL_TYPES:
        return False  # a schema we cannot check scores 0 rather than aborting the whole stage
    expected = BFCL_TYPES[type_name]
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if ok and expected is list and items and "type" in items:
        ok = all(_type_ok(v, items["type"], items.get("items")) for v in value)
    return ok


def _value_equal(value, allowed):
    """One value against one allowed value: strings normalized, lists element-wise, dicts by key."""
    if isinstance(allowed, str):
        return isinstance(value, str) and bfcl_normalize(value) == bfcl_normalize(allowed)
    if isinstance(allowed, bool) or isinstance(value, bool):
        return type(value) is type(allowed) and value == allowed
    if isinstance(allowed, (int, float)):
        return isinstance(value, (int, float)) and value == allowed
    if isinstance(allowed, list):
        return (isinstance(value, list) and len(value) == len(allowed)
                and all(_value_equal(v, a) for v, a in zip(value, allowed)))
    if isinstance(allowed, dict):  # BFCL nests possible answers: {key: [allowed values]}
        return isinstance(value, dict) and _args_match(value, allowed)
    return value == allowed


def _value_allowed(value, allowed_list):
    allowed_list = allowed_list if isinstance(allowed_list, list) else [allowed_list]
    return any(_value_equal(value, a) for a in allowed_list)


def _args_match(args, possible):
    """Arguments vs {arg: [allowed values]}: no unexpected key, each value allowed, omissions need ""."""
    for key, value in args.items():
        if key not in possible or not _value_allowed(value, possible[key]):
            return False
    return all(key in args or (isinstance(allowed, list) and "" in allowed)
               for key, allowed in possible.items())


def _call_matches(call, functions_by_name, gt_call):
    """One parsed call against one ground-truth call {fn_name: {arg: [allowed values]}}."""
    (gt_name, gt_args), = gt_call.items()
    if call["name"] != gt_name or gt_name not in functions_by_name:
        return False
    params = functions_by_name[gt_name].get("parameters", {})
    properties, required = params.get("properties", {}), params.get("required", [])
    args = call["arguments"]
    if any(r not in args for r in required):
        return False
    for key, value in args.items():
        if key not in properties:
            return False
        spec = properties[key]
        if "type" in spec and not (_type_ok(value, spec["type"], spec.get("items"))
                                   or _is_variable(value, spec, gt_args.get(key))):
            return False
    return _args_match(args, gt_args)


def _schema_known(spec):
    """Every type name in a parameter schema and its nested `items` is one of BFCL_TYPES."""
    while isinstance(spec, dict) and "type" in spec:
        if not (isinstance(spec["type"], str) and spec["type"] in BFCL_TYPES):
            return False
        spec = spec.get("items")
    return True


def _is_variable(value, spec, allowed):
    """BFCL's variable rule (gorilla berkeley-function-call-leaderboard/bfcl_eval/eval_checker/ast_eval/
    ast_checker.py, `type_checker` and `simple_function_checker`): a value of the wrong declared type still
    passes when its type is that of the possible answers, e.g. "data['sales']" for an `array` parameter whose
    gold answer is that string (a Python variable name); such a value is then compared exactly, not normalized."""
    if not _schema_known(spec) or not isinstance(allowed, list):  # an unknown type name always fails
        return False
    answer_type = next((type(a) for a in allowed if a != ""), None)  # BFCL get_possible_answer_type
    return answer_type is not None and type(value) is answer_type and value in allowed


def _perfect_matching(ok):
    """True if the square boolean matrix ok[i][j] admits a perfect matching (Kuhn's algorithm)."""
    n = len(ok)
    match_of_col = [-1] * n

    def augment(i, seen):
        for j in range(n):
            if ok[i][j] and not seen[j]:
                seen[j] = True
                if match_of_col[j] < 0 or augment(match_of_col[j], seen):
                    match_of_col[j] = i
                    return True
        return False

    return all(augment(i, [False] * n) for i in range(n))


def bfcl_ast_match(calls, functions, ground_truth):
    """BFCL AST check of parsed calls against ground truth, order-free for parallel calls.

    Rules: exact function name present in `functions`; all `required` params given; no param
    outside `properties` or the ground truth; Gorilla type check (an unknown type name fails; a wrong-typed
    value passes if it is exactly one of the possible answers of its type: BFCL's variable rule); each value
    in its allowed list (`bfcl_normalize` on strings, element-wise on lists, per key on dicts); a param may be
    omitted only if "" is among its allowed values; as many calls as ground-truth calls.
    """
    if calls is None or len(calls) != len(ground_truth):
        return False
    by_name = {f["name"]: f for f in functions}
    ok = [[_call_matches(c, by_name, g) for g in ground_truth] for c in calls]
    return _perfect_matching(ok)


def _canonical_json(obj):
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _as_possible(value):
    """A plain reference value in BFCL possible-answer form (dict values become one-item lists)."""
    if isinstance(value, dict):
        return {k: [_as_possible(v)] for k, v in value.items()}
    if isinstance(value, list):
        return [_as_possible(v) for v in value]
    return value


def score_tool(text, row):
    """-> {"ast": 0/1, "json_valid": 0/1, "exact": 0/1 or None}.

    BFCL rows carry `ground_truth`; `ground_truth == []` (irrelevance) passes when no call is made
    (unparseable text or `[]`). hf rows carry `reference`, one call as a JSON string or dict: `exact`
    compares canonical JSON, `ast` treats each reference argument as the only allowed value.
    """
    calls = parse_tool_calls(text)
    result = {"json_valid": int(calls is not None), "exact": None}
    if "ground_truth" in row:
        if not row["ground_truth"]:
            result["ast"] = int(not calls)
        else:
            result["ast"] = int(bfcl_ast_match(calls, row["functions"], row["ground_truth"]))
    elif "reference" in row:
        ref = row["reference"]
        ref = json.loads(ref) if isinstance(ref, str) else ref
        ref_calls = ref if isinstance(ref, list) else [ref]
        result["exact"] = int(calls is not None and _canonical_json(calls) == _canonical_json(ref_calls))
        gt = [{c["name"]: {k: [_as_possible(v)] for k, v in c.get("arguments", {}).items()}}
              for c in ref_calls]
        result["ast"] = int(bfcl_ast_match(calls, row["functions"], gt))
    else:
        raise ValueError(f"tool row needs 'ground_truth' (BFCL) or 'reference' (hf); keys: {sorted(row)}")
    return result
