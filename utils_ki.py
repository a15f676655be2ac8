"""Pieces of the knowledge-incorporation experiment (knowledge_incorporation.py): the corpus, the SQuAD reader,
offline grading, self-edit prompts and parsing, sampled generation, and one adapter's life (attach, train, score,
detach or merge).

A *passage* is {"passage_id", "title", "context", "questions": [{"question", "answer"}]}. On disk it is written as
unified records, one per question (`passage_rows`), so every QA row is an ordinary instruction row of this repo:
    {"id": "p007_q2", "instruction": QA_INSTRUCTION, "input": "Topic: {title}\\n{question}", "output": answer,
     "passage_id": "p007", "title": ..., "context": ..., "question": ...}
`rows_to_passages` groups them back.
"""
from __future__ import annotations

import contextlib
import json
import random
import re
import string
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from evaluation.generation import generate
from models.lora_simple import (adapter_layers, copy_adapter_tensors, get_lora_param_groups, lora_state_dict,
                                merge_lora, replace_with_lora)
from utils_data import IGNORE_INDEX, InstructionDataset, collate_fn, encode_example, encode_prompt
from utils_forward import to_device, token_losses
from utils_train import accumulate_grads, apply_step, infinite_batches, make_loader, make_optimizer, make_scheduler, set_seed

# SEAL's instruct answering prompt ("an assistant to answer a question directly and concisely", question prefixed
# with "Topic: {title}"), as one user turn of the repo's prompt builder
QA_INSTRUCTION = "Answer the question directly and concisely."
TRAIN_INSTRUCTION = "Topic: {title}"  # inner-loop rows: the topic as the prompt, one passage or self-edit line as the reply
# Self-edit prompts, after SEAL's make_squad_data.py templates (implications / rewrite / self-qa)
SELF_EDIT_PROMPTS = {
    "implications": "Read the following passage and produce a list of implications derived directly or indirectly "
                    "from the content, one per line.",
    "rewrite": "Read the following passage and rewrite it in a few different ways, each one on its own line.",
    "self-qa": "Read the following passage and rewrite it in a question-answer format, as lines "
               "'Question 1: ...' and 'Answer: ...'.",
}

# ----------------------------------------------------------------------------- the generated corpus
_ONSETS = ["Bra", "Cal", "Dre", "Esk", "Fal", "Gor", "Hal", "Ith", "Jor", "Kel", "Lun", "Mor", "Nev", "Ors", "Pel",
           "Quen", "Rav", "Sel", "Tor", "Ulv", "Vey", "Wen", "Yar", "Zol"]
_MIDDLES = ["a", "e", "i", "o", "u", "ae", "io", "ou"]
_CODAS = ["n", "r", "th", "l", "s", "v", "d", "m", "nd", "rk"]
_FIRST_ENDS = ["a", "en", "is", "o", "ian", "eth", "ara", "el", "wyn", "ric"]
_SURNAME_ENDS = ["stad", "berg", "wick", "mont", "ley", "ford", "vane", "holt", "ard", "by"]
_CITY_ENDS = ["haven", "mere", "gate", "port", "vale", "burg", "fall", "crest", "moor", "well"]
_EMPLOYER_KINDS = ["Dynamics", "Labs", "Biotech", "Robotics", "Analytics", "Foods", "Aerospace", "Textiles",
                   "Instruments", "Energy"]
FIELDS = ["marine acoustics", "soil chemistry", "glacier hydrology", "computational linguistics", "paleobotany",
          "urban ecology", "materials science", "medieval history", "optical engineering", "sports nutrition",
          "volcanology", "textile design", "cryptography", "bird migration", "coastal geology", "ceramic art"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
PASSAGE_TEMPLATES = [
    ("{name} was born on {date} in {city}. {He} studied {field} at {university}. After graduating, {he} joined "
     "{employer}, where {he} has worked ever since."),
    ("Born in {city} on {date}, {name} is a specialist in {field}. {He} earned a degree from {university} and now "
     "works at {employer}."),
    ("{name} works at {employer} as an expert in {field}. {He} was born in {city} on {date} and attended "
     "{university}."),
]
QUESTION_TEMPLATES = [  # (fact, question); the fact's value is the short answer
    ("date", "When was {name} born?"),
    ("city", "In which city was {name} born?"),
    ("university", "Which university did {name} attend?"),
    ("employer", "Which company does {name} work for?"),
    ("field", "What is {name}'s field?"),
]


def _word(rng: random.Random, ends) -> str:
    return rng.choice(_ONSETS) + rng.choice(_MIDDLES) + rng.choice(_CODAS) + rng.choice(ends)


def make_corpus(n: int, seed: int, min_questions: int = 3, max_questions: int = 5) -> list[dict]:
    """`n` biographies of invented people (name, birth date, city, university, employer, field), each with
    min..max questions whose short answers are stated in the passage. Deterministic in (n, seed); names are unique."""
    if n < 1:
        raise ValueError(f"n_passages must be >= 1, got {n}")
    if not 1 <= min_questions <= max_questions <= len(QUESTION_TEMPLATES):
        raise ValueError(f"need 1 <= min_questions <= max_questions <= {len(QUESTION_TEMPLATES)}, "
                         f"got {min_questions}, {max_questions}")
    rng = random.Random(f"ki-corpus/{seed}")  # a str seed is stable across processes and Python versions
    passages, names = [], set()
    while len(passages) < n:
        name = f"{_word(rng, _FIRST_ENDS)} {_word(rng, _SURNAME_ENDS)}"
        if name in names:
            continue
        names.add(name)
        he = rng.choice(["he", "she"])
        facts = {"name": name, "he": he, "He": he.capitalize(),
                 "date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1941, 1999)}",
                 "city": _word(rng, _CITY_ENDS),
                 "university": rng.choice(["University of {}", "{} Institute of Technology", "{} College"]).format(
                     _word(rng, _CITY_ENDS)),
                 "employer": f"{_word(rng, _FIRST_ENDS)} {rng.choice(_EMPLOYER_KINDS)}",
                 "field": rng.choice(FIELDS)}
        context = rng.choice(PASSAGE_TEMPLATES).format(**facts)
        chosen = sorted(rng.sample(range(len(QUESTION_TEMPLATES)), rng.randint(min_questions, max_questions)))
        questions = [{"question": QUESTION_TEMPLATES[i][1].format(name=name), "answer": facts[QUESTION_TEMPLATES[i][0]]}
                     for i in chosen]
        passages.append({"passage_id": f"p{len(passages):03d}", "title": name, "context": context,
                         "questions": questions})
    return passages


# ----------------------------------------------------------------------------- SQuAD files (--source local)
class SquadFormatError(ValueError):
    """A SQuAD file that cannot be read; the message names the file and the field."""


def read_squad(path, max_questions: int = 5) -> list[dict]:
    """Passages from a SQuAD v1/v2 JSON file: data[i].title, .paragraphs[j].context, .qas[k].question and
    .answers[0].text (the first gold answer). Unanswerable v2 questions (is_impossible) are skipped, a paragraph
    keeps at most `max_questions`, and paragraphs left without a question are dropped. Ids are
    "sq{article:03d}_{paragraph:02d}". A malformed file raises SquadFormatError naming file and field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such SQuAD file (--squad_file)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SquadFormatError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); expected SQuAD's "
                               f'{{"data": [{{"title", "paragraphs": [...]}}]}}') from None
    except UnicodeDecodeError:
        raise SquadFormatError(f"{path}: not valid UTF-8; re-save the file as UTF-8") from None

    def field(obj, key, kind, where):
        if not isinstance(obj, dict):
            raise SquadFormatError(f"{path}: {where} must be a JSON object, got {type(obj).__name__}")
        if key not in obj:
            raise SquadFormatError(f'{path}: {where} has no field "{key}"')
        value = obj[key]
        if not isinstance(value, kind):
            raise SquadFormatError(f"{path}: {where}.{key} must be a {kind.__name__}, got {type(value).__name__}")
        return value

    passages = []
    for a, article in enumerate(field(doc, "data", list, "the top level")):
        where_a = f"data[{a}]"
        if not isinstance(article, dict):
            raise SquadFormatError(f"{path}: {where_a} must be a JSON object, got {type(article).__name__}")
        title = article.get("title", f"article {a}")
        if not isinstance(title, str):
            raise SquadFormatError(f"{path}: {where_a}.title must be a string, got {type(title).__name__}")
        for p, par in enumerate(field(article, "paragraphs", list, where_a)):
            where_p = f"{where_a}.paragraphs[{p}]"
            context = field(par, "context", str, where_p)
            questions = []
            for q, qa in enumerate(field(par, "qas", list, where_p)):
                where_q = f"{where_p}.qas[{q}]"
                question = field(qa, "question", str, where_q)
                answers = field(qa, "answers", list, where_q)
                if not answers:
                    if qa.get("is_impossible"):
                        continue  # SQuAD v2: no answer to grade against
                    raise SquadFormatError(f"{path}: {where_q}.answers is empty (and is_impossible is not true)")
                text = field(answers[0], "text", str, f"{where_q}.answers[0]")
                if not text.strip():
                    raise SquadFormatError(f"{path}: {where_q}.answers[0].text is empty")
                questions.append({"question": question.strip(), "answer": text.strip()})
            if questions and context.strip():
                passages.append({"passage_id": f"sq{a:03d}_{p:02d}", "title": title.strip(),
                                 "context": context.strip(), "questions": questions[:max_questions]})
    if not passages:
        raise SquadFormatError(f"{path}: no paragraph with an answerable question")
    return passages


# ----------------------------------------------------------------------------- unified rows
def passage_rows(passages) -> list[dict]:
    """One unified instruction row per question (see the module docstring)."""
    rows = []
    for p in passages:
        for i, q in enumerate(p["questions"]):
            rows.append({"id": f"{p['passage_id']}_q{i}", "instruction": QA_INSTRUCTION,
                         "input": f"Topic: {p['title']}\n{q['question']}", "output": q["answer"],
                         "passage_id": p["passage_id"], "title": p["title"], "context": p["context"],
                         "question": q["question"]})
    return rows


def rows_to_passages(rows) -> list[dict]:
    """Group unified QA rows back into passages, in first-seen order."""
    passages: dict[str, dict] = {}
    for r in rows:
        p = passages.setdefault(r["passage_id"], {"passage_id": r["passage_id"], "title": r["title"],
                                                  "context": r["context"], "questions": []})
        p["questions"].append({"question": r["question"], "answer": r["output"]})
    return list(passages.values())


# ----------------------------------------------------------------------------- offline grading
def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    """SQuAD's token F1 between the normalised prediction and gold."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def contains_answer(pred: str, gold: str) -> float:
    """1 when the normalised gold appears as a whole-word span of the normalised prediction: a reply may add words
    but must convey the gold answer (the rule SEAL gives its GPT-4.1 grader)."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    return float(bool(g) and any(p[i:i + len(g)] == g for i in range(len(p) - len(g) + 1)))


GRADERS = {"contains": contains_answer, "em": exact_match, "f1": token_f1}


def question_gains(before: list[bool], after: list[bool]) -> list[int]:
    """Per question, as SEAL logs it: +1 wrong -> right, -1 right -> wrong, 0 unchanged."""
    return [int(a and not b) - int(b and not a) for b, a in zip(before, after)]


# ----------------------------------------------------------------------------- self-edits
def self_edit_row(passage: dict, prompt: str) -> dict:
    """The generator's input for one passage (an instruction row; `output` is filled with a self-edit for SFT)."""
    if prompt not in SELF_EDIT_PROMPTS:
        raise ValueError(f"unknown self-edit prompt {prompt!r}; use one of {', '.join(SELF_EDIT_PROMPTS)}")
    return {"instruction": SELF_EDIT_PROMPTS[prompt], "input": f"{passage['title']}\n{passage['context']}"}


_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|\(\d+\))\s*")


def split_self_edit(text: str, max_rows: int = 12) -> list[str]:
    """A self-edit as training lines (SEAL's build_train_sequences with split_newlines): "Question N:" blocks stay
    whole with their answer; otherwise one line each, without list markers or header lines ending in ':';
    duplicates and lines of fewer than 3 words dropped; at most `max_rows`."""
    text = text.strip()
    if re.search(r"Question\s+\d+\s*:", text) and re.search(r"Answer\s*:", text):
        segs = re.split(r"\n(?=\s*Question\s+\d+\s*:)", text)
        segs = [" ".join(s.split()) for s in segs]
    else:
        segs = [_LIST_MARKER.sub("", ln).strip() for ln in text.splitlines()]
        segs = [s for s in segs if not s.endswith(":")]
    out = []
    for s in segs:
        if len(s.split()) >= 3 and s not in out:
            out.append(s)
    return out[:max_rows]


def training_rows(passage: dict, self_edits: list[str], max_rows_per_edit: int = 12) -> list[dict]:
    """Inner-loop rows: the passage itself (always, as in SEAL) and each self-edit's lines, each as the reply to
    "Topic: {title}"; exact duplicates of an earlier row are dropped."""
    texts = [passage["context"].strip()]
    for edit in self_edits:
        texts += [s for s in split_self_edit(edit, max_rows_per_edit) if s not in texts]
    instruction = TRAIN_INSTRUCTION.format(title=passage["title"])
    return [{"instruction": instruction, "input": "", "output": t} for t in texts]


# ----------------------------------------------------------------------------- sampled batched generation
@torch.no_grad()
def sample_texts(model, tokenizer, rows, cfg, device, max_new_tokens: int, k: int, temperature: float,
                 top_p: float, seed: int, desc: str = "self-edits") -> list[list[str]]:
    """k replies per row: sampled (temperature, top-p, no top-k) when temperature > 0, else the one greedy reply
    of evaluation.generation.generate (k must be 1). Prompts come from the one prompt builder, left-padded, in
    batches of about cfg.eval_batch_size sequences; the torch RNG is seeded per batch, so a run repeats exactly."""
    if k < 1:
        raise ValueError(f"k (self-edits per passage) must be >= 1, got {k}")
    if temperature <= 0:
        if k != 1:
            raise ValueError(f"k={k} self-edits per passage need sampling: set --temperature > 0 (greedy gives one)")
        return [[t.strip()] for t in generate(model, tokenizer, rows, cfg, device, max_new_tokens, desc=desc)]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts = [encode_prompt(tokenizer, r, cfg.prompt_format)[-cfg.max_seq_len:] for r in rows]
    per_batch = max(1, cfg.eval_batch_size // k)
    out: list[list[str]] = []
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(rows), per_batch), desc=desc, leave=False):
            chunk = prompts[start:start + per_batch]
            T = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for b, p in enumerate(chunk):  # left padding: every prompt ends at column T
                input_ids[b, T - len(p):] = torch.tensor(p)
                attention_mask[b, T - len(p):] = 1
            torch.manual_seed(seed * 100_003 + start)
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                 num_return_sequences=k, max_new_tokens=max_new_tokens, use_cache=True,
                                 pad_token_id=pad, eos_token_id=eos)  # (B * k, T + new), row b's samples together
            for b in range(len(chunk)):
                texts = []
                for j in range(k):
                    new = gen[b * k + j, T:].tolist()
                    new = new[:new.index(eos)] if eos in new else new
                    texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
                out.append(texts)
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------- one adapter's life
def attach_lora(model, cfg, seed: int) -> list[str]:
    """Wrap the config's target Linears with a fresh LoRA (A drawn from `seed`, B = 0: the model is unchanged)."""
    set_seed(seed)
    return replace_with_lora(model, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                             cfg.num_frozen_layers)


def detach_lora(model, merge: bool) -> None:
    """Put each wrapped Linear back in place; with merge=True its adapter is folded into the weight first
    (lora_simple.merge_lora), so the model keeps what it learned and the next attach_lora starts from it."""
    layers = adapter_layers(model)
    if merge:
        merge_lora(model)
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)


@contextlib.contextmanager
def lora_attached(model, cfg, seed: int, weights: dict | None = None):
    """A fresh LoRA (or one holding `weights`, a lora_state_dict) for the body; removed unmerged on exit."""
    attach_lora(model, cfg, seed)
    try:
        if weights is not None:
            copy_adapter_tensors(model, weights, lora_state_dict(model).keys(), source="generator adapter")
        yield model
    finally:
        detach_lora(model, merge=False)


def adapter_weights(model) -> dict:
    """Clones of the attached adapter's tensors (to re-attach later with lora_attached(weights=...))."""
    return {k: v.detach().clone() for k, v in lora_state_dict(model).items()}


def train_adapter(model, tokenizer, rows, cfg, device, steps: int, lr: float, seed: int) -> dict:
    """`steps` AdamW steps on the attached adapter over `rows` (unified rows, the repo's prompt/label builder),
    batches of cfg.per_device_batch_size drawn in a seeded shuffled cycle, warmup + cosine schedule, clipping and
    NaN guards from utils_train. Returns the first and last step's loss and the row count."""
    if steps < 1:
        raise ValueError(f"inner/generator steps must be >= 1, got {steps}")
    ds = InstructionDataset("ki-train", tokenizer, cfg, rows=rows, verbose=False)
    if len(ds) == 0:
        raise ValueError(f"none of the {len(rows)} training rows fits max_seq_len={cfg.max_seq_len}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(get_lora_param_groups(model, lr, cfg.weight_decay))
    sched = make_scheduler(opt, steps, cfg.warmup_ratio)
    batches = infinite_batches(make_loader(ds, cfg.per_device_batch_size, tokenizer.pad_token_id, shuffle=True,
                                           seed=seed))
    losses = []
    model.train()
    try:
        for _ in range(steps):
            st = accumulate_grads(model, batches, cfg, device)
            if st["micro"]:
                apply_step(params, [opt], [sched], cfg.max_grad_norm)
                losses.append(st["loss"])
    finally:
        model.eval()
    if not losses:
        raise RuntimeError("every training batch was empty or non-finite; check the rows and the learning rate")
    return {"loss_first": losses[0], "loss_last": losses[-1], "rows": len(ds)}


@torch.no_grad()
def gold_logprobs(model, tokenizer, rows, cfg, device) -> list[float]:
    """Mean per-token log-probability of each row's gold answer given its prompt (teacher-forced; EOS not scored)."""
    items = []
    for i, r in enumerate(rows):
        enc = encode_example(tokenizer, r, cfg.prompt_format, cfg.max_seq_len)
        if enc is None:
            raise ValueError(f"question {r.get('id', i)}: its answer does not fit max_seq_len={cfg.max_seq_len}")
        ids, labels = enc
        labels = labels[:-1] + [IGNORE_INDEX]  # the last supervised token is EOS
        items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "idx": i})
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), cfg.eval_batch_size):
            batch = to_device(collate_fn(items[start:start + cfg.eval_batch_size], tokenizer.pad_token_id), device)
            losses, row = token_losses(model, batch)  # (N,), (N,)
            B = batch["input_ids"].shape[0]
            sums = torch.zeros(B, device=losses.device).index_add_(0, row, losses.float())
            counts = torch.bincount(row, minlength=B).clamp(min=1)
            out += (-sums / counts).tolist()
    finally:
        model.train(was_training)
    return out


def answer_questions(model, tokenizer, rows, cfg, device, max_new_tokens: int, grade: str = "contains") -> list[dict]:
    """Greedy answers (cut at the first newline) to QA rows, graded offline: `correct` by the `grade` rule
    (contains / em, or f1 >= 0.5), plus normalised exact match, token F1 and the gold answer's mean log-probability."""
    if grade not in GRADERS:
        raise ValueError(f"unknown grade {grade!r}; use one of {', '.join(GRADERS)}")
    preds = generate(model, tokenizer, rows, cfg, device, max_new_tokens, desc="qa", stop_strings=[[r"\n"]] * len(rows))
    logps = gold_logprobs(model, tokenizer, rows, cfg, device)
    out = []
    for r, pred, lp in zip(rows, preds, logps):
        pred = pred.strip()
        out.append({"id": r["id"], "pred": pred, "correct": GRADERS[grade](pred, r["output"]) >= 0.5,
                    "em": exact_match(pred, r["output"]), "f1": token_f1(pred, r["output"]), "logprob": lp})
    return out


def mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None
