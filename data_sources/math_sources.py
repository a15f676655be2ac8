"""T2 math: GSM-Symbolic problems from reasoning-gym (wheel) and the hub's GSM8K converter."""
from __future__ import annotations

import random
import re

from data_sources.common import FINAL_ANSWER_RE, record

GSM8K_NOTE_RE = re.compile(r"<<[^>]*>>")


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
