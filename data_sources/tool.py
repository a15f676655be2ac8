"""T4 tool calling: BFCL (wheel: training rows and the bench) and the hub's Glaive function-calling converter."""
from __future__ import annotations

import json
import random
import re

from data_sources.common import WHEELS, read_member_jsonl, record, wheel_origin

# =============================================================================================== T4 tools
TOOL_INSTRUCTION = ("You can call these functions:\n{functions}\n"
                    "Reply with the function call as JSON {{\"name\": ..., \"arguments\": {{...}}}}, "
                    "or a JSON list of such calls when several are needed.")


def _drop_descriptions(schema):
    """A parameter schema without its "description" keys, at any depth (types, enums, required stay)."""
    if isinstance(schema, dict):
        return {k: _drop_descriptions(v) for k, v in schema.items() if k != "description"}
    if isinstance(schema, list):
        return [_drop_descriptions(v) for v in schema]
    return schema


def render_functions(functions: list[dict]) -> str:
    """Compact JSON of the function list, one line, used for training and bench prompts alike. Function
    descriptions stay; parameter descriptions are dropped, which lets about 1.7x more BFCL rows fit in
    320 tokens. The bench rows keep the complete schema in their `functions` field for scoring."""
    slim = [{**f, "parameters": _drop_descriptions(f["parameters"])} if isinstance(f.get("parameters"), dict) else f
            for f in functions]
    return json.dumps(slim, separators=(",", ":"), ensure_ascii=False)


def tool_prompt(functions: list[dict], messages: list[dict]) -> tuple[str, str]:
    """(instruction, input) for a BFCL-style row: schemas in the instruction, the conversation in the input.
    A single user message is the input as is; system messages and history are prefixed with their role."""
    instruction = TOOL_INSTRUCTION.format(functions=render_functions(functions))
    if len(messages) == 1 and messages[0].get("role") == "user":
        return instruction, messages[0]["content"].strip()
    return instruction, "\n".join(f"{m['role'].capitalize()}: {m['content'].strip()}" for m in messages)


class NoValidValue(ValueError):
    pass


_OMIT = object()  # an argument whose only allowed value is "" (may be omitted)


def first_allowed(allowed):
    """BFCL possible answers for one argument -> one concrete value: the first non-"" allowed value,
    recursing into nested dicts ({key: [allowed values]}) and lists of them. An empty allowed list has no
    valid value (NoValidValue); a list holding only "" means the argument may be omitted (_OMIT)."""
    if not isinstance(allowed, list) or not allowed:
        raise NoValidValue(f"no allowed value in {allowed!r}")
    values = [v for v in allowed if v != ""]
    if not values:
        return _OMIT
    return _concrete(values[0])


def _concrete(v):
    if isinstance(v, dict):
        out = {}
        for k, vals in v.items():
            val = first_allowed(vals)
            if val is not _OMIT:
                out[k] = val
        return out
    if isinstance(v, list):
        return [_concrete(x) for x in v]
    return v


def bfcl_target(ground_truth: list[dict]) -> list[dict]:
    """BFCL ground truth -> [{"name", "arguments"}] with the first allowed value per argument."""
    calls = []
    for call in ground_truth:
        if not isinstance(call, dict) or len(call) != 1:
            raise NoValidValue(f"a ground-truth call must be {{name: args}}, got {call!r}")
        (name, args), = call.items()
        out = {}
        for k, vals in args.items():
            val = first_allowed(vals)
            if val is not _OMIT:
                out[k] = val
        calls.append({"name": name, "arguments": out})
    return calls


def bfcl_category(zf, cat: str, answers: bool = True):
    q = read_member_jsonl(zf, f"bfcl_eval/data/BFCL_v4_{cat}.json")
    if not answers:
        return q, {}
    a = read_member_jsonl(zf, f"bfcl_eval/data/possible_answer/BFCL_v4_{cat}.json")
    return q, {r["id"]: r["ground_truth"] for r in a}


def bfcl_train_rows(zf, stats, cats=("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple"),
                    task="T4_tool") -> list[dict]:
    src, lic = "bfcl_live", WHEELS["bfcl-eval"][3]
    stats.register(src, lic, wheel_origin("bfcl-eval") + " bfcl_eval/data/BFCL_v4_live_*.json + possible_answer")
    out = []
    for cat in cats:
        qs, gts = bfcl_category(zf, cat)
        for r in qs:
            stats.read[src] += 1
            gt = gts.get(r["id"])
            if not gt:
                stats.skip(src, "no possible answer")
                continue
            if len(r["question"]) != 1:
                stats.skip(src, "multi-turn question")
                continue
            try:
                calls = bfcl_target(gt)
            except (NoValidValue, ValueError):
                stats.skip(src, "no valid value for an argument")
                continue
            ins, inp = tool_prompt(r["function"], r["question"][0])
            output = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            out.append(record(task, src, r["id"], ins, inp, output, lic, category=cat))
            stats.kept[src] += 1
    return out


def bfcl_bench_rows(zf, stats, per_cat: int, seed: int,
                    cats=("simple_python", "multiple", "parallel", "parallel_multiple"), task="T4_tool") -> list[dict]:
    src, lic = "bfcl_eval", WHEELS["bfcl-eval"][3]
    stats.register(src, lic, wheel_origin("bfcl-eval") + " simple_python/multiple/parallel/parallel_multiple "
                   "(evaluation only)")
    out = []
    for cat in cats:
        qs, gts = bfcl_category(zf, cat)
        rows = []
        for r in qs:
            stats.read[src] += 1
            if r["id"] not in gts or len(r["question"]) != 1:
                stats.skip(src, "no possible answer or multi-turn")
                continue
            ins, inp = tool_prompt(r["function"], r["question"][0])
            rows.append(record(task, src, r["id"], ins, inp, "", lic, kind="bfcl", category=cat,
                               functions=r["function"], ground_truth=gts[r["id"]]))
        # Shorter prompts first (they must fit max_seq_len), then a seeded pick among them.
        rows.sort(key=lambda x: (len(x["instruction"]) + len(x["input"]), x["id"]))
        pick = rows[: per_cat * 2]
        pick = random.Random(f"{seed}:bfcl:{cat}").sample(pick, min(per_cat, len(pick)))
        for r in pick:
            try:
                calls = bfcl_target(r["ground_truth"])
                r["output"] = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            except (NoValidValue, ValueError):
                r["output"] = ""
            stats.kept[src] += 1
        out += sorted(pick, key=lambda x: x["id"])
    return out


# --- Glaive function calling ---------------------------------------------------------------------
GLAIVE_ARGS_RE = re.compile(r"\"arguments\"\s*:\s*'(.*)'\s*}$", re.DOTALL)
GLAIVE_NAME_RE = re.compile(r"^\{\s*\"name\"\s*:\s*\"([^\"]+)\"")


def parse_glaive_call(text: str) -> dict | None:
    """`{"name": "f", "arguments": '{"x": 5}'}` (and its variants) -> {"name", "arguments": dict}, or None.

    json.loads first (raw-object arguments, missing arguments); else the anchored greedy regex captures the
    single-quoted arguments whole, so an apostrophe inside them ("don't") survives."""
    text = text.strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        m, n = GLAIVE_ARGS_RE.search(text), GLAIVE_NAME_RE.match(text)
        if not (m and n):
            return None
        try:
            args = json.loads(m.group(1))
        except json.JSONDecodeError:
            return None
        obj = {"name": n.group(1), "arguments": args}
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": obj["name"], "arguments": args}


def parse_glaive_functions(system: str) -> list[dict] | None:
    """The concatenated pretty-printed JSON objects after the system text -> list of function dicts."""
    start = system.find("{")
    if start < 0:
        return None
    dec, funcs, pos = json.JSONDecoder(), [], start
    while pos < len(system):
        while pos < len(system) and system[pos] in " \t\r\n,-":
            pos += 1
        if pos >= len(system) or system[pos] != "{":
            break
        try:
            obj, pos = dec.raw_decode(system, pos)
        except json.JSONDecodeError:
            return None
        funcs.append(obj)
    return funcs or None


GLAIVE_TURN_RE = re.compile(r"(USER:|ASSISTANT:|FUNCTION RESPONSE:)")


def glaive_turns(chat: str) -> list[tuple[str, str]]:
    parts = GLAIVE_TURN_RE.split(chat)
    turns = []
    for i in range(1, len(parts) - 1, 2):
        role = {"USER:": "user", "ASSISTANT:": "assistant", "FUNCTION RESPONSE:": "function"}[parts[i]]
        turns.append((role, parts[i + 1].replace("<|endoftext|>", "").strip()))
    return turns


def hf_glaive(rows, stats, task="T4_tool"):
    """Each row's first function call -> (instruction with schemas, dialogue history, call JSON)."""
    src, lic = "glaive", "Apache-2.0"
    stats.register(src, lic, "glaiveai/glaive-function-calling-v2 train")
    out = []
    for i, r in enumerate(rows):
        stats.read[src] += 1
        system, chat = r.get("system") or "", r.get("chat") or ""
        funcs = parse_glaive_functions(system)
        if not funcs:
            stats.skip(src, "no functions in system prompt")
            continue
        turns = glaive_turns(chat)
        k = next((j for j, (role, text) in enumerate(turns) if role == "assistant" and "<functioncall>" in text), None)
        if k is None:
            stats.skip(src, "no function call in the chat")
            continue
        call = parse_glaive_call(turns[k][1].split("<functioncall>", 1)[1])
        if call is None:
            stats.skip(src, "function call does not parse")
            continue
        history = turns[:k]
        last_user = max((j for j, (role, _) in enumerate(history) if role == "user"), default=None)
        if last_user is None:
            stats.skip(src, "no user turn before the call")
            continue
        history = history[: last_user + 1]
        messages = [{"role": role if role != "function" else "function response", "content": text}
                    for role, text in history]
        ins, inp = tool_prompt(funcs, messages)
        output = json.dumps(call, ensure_ascii=False)
        out.append(record(task, src, i, ins, inp, output, lic, functions=funcs))
        stats.kept[src] += 1
    return out
