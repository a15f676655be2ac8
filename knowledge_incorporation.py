"""Knowledge incorporation by self-edits (SEAL, Zweiger et al. 2025, `knowledge-incorporation/`), offline.

The model reads a passage of facts it cannot know, writes "self-edits" (implications of the passage), a fresh LoRA
is trained a few steps on the passage plus those lines, and the passage's questions are answered WITHOUT the
passage, before and after. SEAL's vLLM server, hub SQuAD and GPT-4.1 grader are replaced by the repo's batched
generation, a generated corpus (or your SQuAD file) and offline grading.

  data       invented biographies (utils_ki.make_corpus: birth date, city, university, employer, field; 3-5
             questions each), deterministic by --seed, written as unified QA rows to {log_dir}/ki_data.jsonl;
             --source local --squad_file F reads a SQuAD v1/v2 file instead. Passages are split into
             --n_train (the generator's training passages) and --n_eval (held out) passages.
  inner      one adapter per (passage, training rows): attach a fresh LoRA (the config's lora_* keys; seeded by the
             passage, so every condition of a passage starts alike), --inner_steps AdamW steps at --inner_lr on the rows
             ("Topic: {title}" -> the passage, and -> each self-edit line), answer the questions greedily, remove
             the adapter. Graded per question: `correct` (--grade: the normalised gold answer contained in the
             reply by default, SEAL's grader rule; em; f1 >= 0.5), exact match, token F1 and the gold answer's mean
             token log-probability. adapter_gain = acc_after - acc_before; gains +1 / -1 / 0 per question.
  outer      ReST-EM: the generator (base model, then base + a generator LoRA) samples --k self-edits per training
             passage; each is scored by its own inner loop; the best per passage (adapter_gain, ties by the gain in
             gold log-probability) becomes an SFT row (self-edit prompt -> that self-edit) and the generator LoRA
             trains --gen_steps steps on them; --rounds times. Held-out passages are scored under four conditions:
             no_training, passage_only, base_self_edits (round 0) and trained_self_edits (round r). The inner loop
             always adapts the base model, so the conditions differ only in their training rows.
  continual  --n_sequences sequences of --n_continual held-out passages: at step k the current model writes one
             self-edit, a fresh LoRA learns passage k + self-edit and is merged into the weights, then every
             passage of the sequence is answered: R[k+1][i] (row 0 = the base). AP / BWT / FWT / forgetting from
             evaluation.cl_metrics, per sequence and their mean; the base weights are restored between sequences.

Resume: a run whose ki_config.json (every flag and config key) matches goes on where an interrupted one stopped: inner
loops already in ki_inner.jsonl are reused when their self-edit text is the same (the sampling is seeded, so it
is regenerated identically), finished continual sequences are kept; --restart (or other settings) starts afresh.

Outputs (under --log_dir, atomic): ki_inner.jsonl (one row per inner loop: round, condition, split, passage_id,
edit, acc_before, acc_after, adapter_gain, gains, em/f1/logprob before and after), ki_answers.jsonl (every
question's replies), ki_self_edits.jsonl, ki_continual.json ({"R", "metrics", "n_sequences", ...}),
ki_continual.png, ki_summary.json, ki_config.json.

    python knowledge_incorporation.py --preset smoke          # end to end in a few minutes on 2 CPU cores
    python knowledge_incorporation.py                         # the default run (README, "Knowledge incorporation")
    python knowledge_incorporation.py --source local --squad_file dev-v1.1.json --stages outer --n_eval 20
Config keys (--lora_r, --lora_target_modules, --num_frozen_layers, --per_device_batch_size, --model_name, --device, ...) work as in
every script; --preset here names this script's presets (smoke, default), not the config's.
"""
from __future__ import annotations

import argparse
import json
import random
import time
import zlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from configs.base_config import config_to_dict, parse_args_and_config, print_config, save_config
from evaluation.cl_metrics import cl_metrics
from models.lora_simple import find_target_linears
from utils_io import append_jsonl, atomic_write_text, read_jsonl, write_jsonl
from utils_ki import (GRADERS, SELF_EDIT_PROMPTS, adapter_weights, answer_questions, attach_lora, detach_lora,
                      lora_attached, make_corpus, mean, passage_rows, question_gains, read_squad,
                      sample_texts, self_edit_row, train_adapter, training_rows)
from utils_model import load_model_and_tokenizer

# This script's presets: explicit flags win over them.
PRESETS = {
    "smoke": dict(n_train=2, n_eval=2, k=2, k_eval=1, rounds=1, inner_steps=8, gen_steps=4, self_edit_tokens=64,
                  answer_tokens=24, n_sequences=1, n_continual=2),
    "default": dict(n_train=8, n_eval=8, k=3, k_eval=1, rounds=1, inner_steps=12, gen_steps=12, self_edit_tokens=128,
                    answer_tokens=32, n_sequences=3, n_continual=5),
}
# Config defaults for this experiment (SEAL's inner loop: no LoRA dropout); the command line still overrides them.
KI_CONFIG = dict(lora_dropout=0.0)
CONDITIONS = ("no_training", "passage_only", "base_self_edits", "trained_self_edits")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="sizes below (explicit flags win)")
    p.add_argument("--stages", default="outer,continual", help="comma-separated: outer, continual (data is always built)")
    p.add_argument("--source", choices=("generated", "local"), default="generated")
    p.add_argument("--squad_file", default=None, help="--source local: a SQuAD v1/v2 JSON file")
    p.add_argument("--n_train", type=int, help="passages the generator is trained on (ReST-EM)")
    p.add_argument("--n_eval", type=int, help="held-out passages (conditions; continual sequences draw from them)")
    p.add_argument("--k", type=int, help="self-edits sampled per training passage per round")
    p.add_argument("--k_eval", type=int, help="self-edits per held-out passage per condition (one inner loop each)")
    p.add_argument("--rounds", type=int, help="ReST-EM rounds (0 = no generator training)")
    p.add_argument("--inner_steps", type=int, help="optimizer steps of each inner-loop LoRA")
    p.add_argument("--inner_lr", type=float, default=1e-2,
                   help="inner-loop LoRA learning rate (1e-2: 12 steps memorize a passage; 3e-3 leaves its loss at 1.5)")
    p.add_argument("--gen_steps", type=int, help="optimizer steps of the generator LoRA per round")
    p.add_argument("--gen_lr", type=float, default=1e-3, help="generator LoRA learning rate")
    p.add_argument("--self_edit_prompt", choices=sorted(SELF_EDIT_PROMPTS), default="implications")
    p.add_argument("--self_edit_tokens", type=int, help="new tokens per self-edit")
    p.add_argument("--temperature", type=float, default=0.8, help="self-edit sampling temperature (0 = greedy, k=1)")
    p.add_argument("--top_p", type=float, default=0.95, help="self-edit nucleus sampling")
    p.add_argument("--answer_tokens", type=int, help="new tokens per answer (greedy, cut at the first newline)")
    p.add_argument("--grade", choices=sorted(GRADERS), default="contains", help="what counts as a correct answer")
    p.add_argument("--n_sequences", type=int, help="continual: sequences (each its own draw of passages)")
    p.add_argument("--n_continual", type=int, help="continual: passages per sequence")
    p.add_argument("--restart", action="store_true",
                   help="start afresh; by default a run whose ki_config.json matches resumes: inner loops already "
                        "logged (same self-edit text) and finished continual sequences are reused")
    return p


def resolve_args(args) -> argparse.Namespace:
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    bad = [s for s in args.stages if s not in ("outer", "continual")]
    if bad:
        raise SystemExit(f"--stages: unknown stage(s) {bad}; use outer, continual")
    for key in ("n_eval", "k", "k_eval", "inner_steps", "gen_steps", "self_edit_tokens", "answer_tokens",
                "n_sequences", "n_continual"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key} must be >= 1, got {getattr(args, key)}")
    for key in ("n_train", "rounds"):
        if getattr(args, key) < 0:
            raise SystemExit(f"--{key} must be >= 0, got {getattr(args, key)}")
    if args.rounds and not args.n_train:
        raise SystemExit("--rounds > 0 needs training passages: set --n_train >= 1 (or --rounds 0)")
    if args.n_continual > args.n_eval and "continual" in args.stages:
        raise SystemExit(f"--n_continual {args.n_continual} exceeds --n_eval {args.n_eval}: a sequence draws "
                         f"distinct held-out passages")
    if args.source == "local" and not args.squad_file:
        raise SystemExit("--source local needs --squad_file PATH (a SQuAD v1/v2 JSON file)")
    if args.temperature <= 0 and max(args.k, args.k_eval) > 1:
        raise SystemExit(f"--temperature {args.temperature} is greedy, which gives one self-edit; use --k 1 "
                         f"--k_eval 1 or a temperature > 0")
    for key in ("inner_lr", "gen_lr"):
        if not 0 < getattr(args, key) < 1:
            raise SystemExit(f"--{key} must be in (0, 1), got {getattr(args, key)}")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"--top_p must be in (0, 1], got {args.top_p}")
    return args


def load_passages(args, cfg) -> tuple[list[dict], list[dict]]:
    """(training passages, held-out passages): the generated corpus, or a seeded sample of the SQuAD file."""
    n = args.n_train + args.n_eval
    if args.source == "generated":
        passages = make_corpus(n, cfg.seed)
    else:
        passages = read_squad(args.squad_file)
        if len(passages) < n:
            raise SystemExit(f"{args.squad_file}: {len(passages)} answerable paragraphs, fewer than --n_train + "
                             f"--n_eval = {n}")
        random.Random(f"ki-squad/{cfg.seed}").shuffle(passages)
        passages = passages[:n]
    return passages[:args.n_train], passages[args.n_train:]


class Experiment:
    """The model, its tokenizer and the settings, with the two steps every stage repeats: answer a passage's
    questions, and run one inner loop. Base-model answers are computed once per passage and reused."""

    def __init__(self, model, tokenizer, cfg, device, args, log_dir: Path):
        self.model, self.tok, self.cfg, self.device, self.args, self.log_dir = model, tokenizer, cfg, device, args, log_dir
        self.qrows: dict[str, list[dict]] = {}
        self._base: dict[str, list[dict]] = {}
        # resume: the inner loops and self-edits an interrupted run of the same settings already logged
        inner, edits = log_dir / "ki_inner.jsonl", log_dir / "ki_self_edits.jsonl"
        self.done = {inner_key(r): r for r in read_jsonl(inner)} if inner.exists() else {}
        self.edits_logged = ({(r["round"], r["split"], r["passage_id"], r["edit"]) for r in read_jsonl(edits)}
                             if edits.exists() else set())
        self.reused = 0

    def questions(self, passage) -> list[dict]:
        return self.qrows.setdefault(passage["passage_id"], passage_rows([passage]))

    def answer(self, passages) -> dict[str, list[dict]]:
        """{passage_id: graded answers} for several passages in one batched pass, with the model as it is now."""
        rows = [r for p in passages for r in self.questions(p)]
        graded = answer_questions(self.model, self.tok, rows, self.cfg, self.device, self.args.answer_tokens,
                                  self.args.grade)
        out, i = {}, 0
        for p in passages:
            n = len(self.questions(p))
            out[p["passage_id"]], i = graded[i:i + n], i + n
        return out

    def base_answers(self, passages) -> dict[str, list[dict]]:
        todo = [p for p in passages if p["passage_id"] not in self._base]
        if todo:
            self._base.update(self.answer(todo))
        return {p["passage_id"]: self._base[p["passage_id"]] for p in passages}

    def seed_for(self, passage) -> int:
        return zlib.crc32(f"{self.cfg.seed}/{passage['passage_id']}".encode()) % (2 ** 31)

    def inner_loop(self, passage, self_edits: list[str], merge: bool = False) -> tuple[list[dict], dict]:
        """Fresh LoRA on passage + self-edits, then the passage's questions; merge=True keeps the update."""
        rows = training_rows(passage, self_edits)
        attach_lora(self.model, self.cfg, self.seed_for(passage))
        try:
            stats = train_adapter(self.model, self.tok, rows, self.cfg, self.device, self.args.inner_steps,
                                  self.args.inner_lr, self.seed_for(passage))
            after = None if merge else self.answer([passage])[passage["passage_id"]]
        finally:
            detach_lora(self.model, merge=merge)
        return after, stats

    def self_edits(self, passages, k: int, seed: int, generator: dict | None = None) -> list[list[str]]:
        """k sampled self-edits per passage from the model, with the generator LoRA `generator` when given."""
        rows = [self_edit_row(p, self.args.self_edit_prompt) for p in passages]
        def sample():
            return sample_texts(self.model, self.tok, rows, self.cfg, self.device, self.args.self_edit_tokens, k,
                                self.args.temperature, self.args.top_p, seed)
        if generator is None:
            return sample()
        with lora_attached(self.model, self.cfg, seed, weights=generator):
            return sample()

    def logged(self, round_, condition, split, passage, edit=None, texts=None) -> dict | None:
        """The ki_inner.jsonl row of this inner loop from an interrupted run, if its self-edit text is the same."""
        row = self.done.get((round_, condition, split, passage["passage_id"], edit))
        if row is not None and row.get("edit_sha") == text_sha(texts):
            self.reused += 1
            return row
        return None

    def record(self, round_, condition, split, passage, before, after, edit=None, stats=None, texts=None) -> dict:
        """Append one ki_inner.jsonl row (and the passage's answers to ki_answers.jsonl); returns the row."""
        acc_b, acc_a = mean(a["correct"] for a in before), mean(a["correct"] for a in after)
        row = {"round": round_, "condition": condition, "split": split, "passage_id": passage["passage_id"],
               "edit": edit, "acc_before": acc_b, "acc_after": acc_a, "adapter_gain": acc_a - acc_b,
               "gains": question_gains([a["correct"] for a in before], [a["correct"] for a in after]),
               "em_before": mean(a["em"] for a in before), "em_after": mean(a["em"] for a in after),
               "f1_before": mean(a["f1"] for a in before), "f1_after": mean(a["f1"] for a in after),
               "logprob_before": mean(a["logprob"] for a in before), "logprob_after": mean(a["logprob"] for a in after),
               "n_questions": len(before), "edit_sha": text_sha(texts)}
        row["logprob_gain"] = row["logprob_after"] - row["logprob_before"]
        if stats:
            row.update(train_rows=stats["rows"], loss_first=stats["loss_first"], loss_last=stats["loss_last"])
        append_jsonl(self.log_dir / "ki_inner.jsonl", [row])
        append_jsonl(self.log_dir / "ki_answers.jsonl", [
            {"round": round_, "condition": condition, "passage_id": passage["passage_id"], "edit": edit,
             "question": q["question"], "gold": q["output"], "pred_before": b["pred"], "pred_after": a["pred"],
             "correct_before": b["correct"], "correct_after": a["correct"], "logprob_before": b["logprob"],
             "logprob_after": a["logprob"]} for q, b, a in zip(self.questions(passage), before, after)])
        return row

    def log_edits(self, round_, split, passages, edits, selected=None) -> None:
        rows = [{"round": round_, "split": split, "passage_id": p["passage_id"], "edit": j, "text": text,
                 "selected": selected is not None and selected[i] == j}
                for i, (p, texts) in enumerate(zip(passages, edits)) for j, text in enumerate(texts)]
        rows = [r for r in rows if (r["round"], r["split"], r["passage_id"], r["edit"]) not in self.edits_logged]
        self.edits_logged |= {(r["round"], r["split"], r["passage_id"], r["edit"]) for r in rows}
        append_jsonl(self.log_dir / "ki_self_edits.jsonl", rows)


def inner_key(row: dict) -> tuple:
    return (row["round"], row["condition"], row["split"], row["passage_id"], row["edit"])


def text_sha(texts) -> str | None:
    """A digest of an inner loop's self-edit texts (None for the passage alone): a resumed row must match it."""
    return None if texts is None else zlib.crc32("\x00".join(texts).encode()).to_bytes(4, "big").hex()


# ----------------------------------------------------------------------------- outer loop (ReST-EM)
def score_edits(ex: Experiment, round_, condition, split, passages, edits) -> list[list[dict]]:
    """One inner loop per (passage, self-edit); returns the logged rows, per passage."""
    base = ex.base_answers(passages)
    out = []
    bar = tqdm(total=sum(len(e) for e in edits), desc=f"round {round_} {condition}")
    for p, texts in zip(passages, edits):
        rows = []
        for j, text in enumerate(texts):
            row = ex.logged(round_, condition, split, p, edit=j, texts=[text])
            if row is None:
                after, stats = ex.inner_loop(p, [text])
                row = ex.record(round_, condition, split, p, base[p["passage_id"]], after, edit=j, stats=stats,
                                texts=[text])
            rows.append(row)
            bar.update()
        out.append(rows)
    bar.close()
    return out


def run_outer(ex: Experiment, train_p, eval_p) -> dict:
    args, cfg = ex.args, ex.cfg
    base = ex.base_answers(train_p + eval_p)
    for p in tqdm(eval_p, desc="round 0 no_training / passage_only"):
        if ex.logged(0, "no_training", "eval", p) is None:
            ex.record(0, "no_training", "eval", p, base[p["passage_id"]], base[p["passage_id"]])
        if ex.logged(0, "passage_only", "eval", p) is None:
            after, stats = ex.inner_loop(p, [])
            ex.record(0, "passage_only", "eval", p, base[p["passage_id"]], after, stats=stats)
    edits = ex.self_edits(eval_p, args.k_eval, seed=cfg.seed)
    ex.log_edits(0, "eval", eval_p, edits)
    score_edits(ex, 0, "base_self_edits", "eval", eval_p, edits)

    generator, sft_rows, gen_log = None, [], []
    for r in range(args.rounds):
        cands = ex.self_edits(train_p, args.k, seed=cfg.seed + 1000 * (r + 1), generator=generator)
        scored = score_edits(ex, r, "candidates", "train", train_p, cands)
        best = [max(range(len(rows)), key=lambda j: (rows[j]["adapter_gain"], rows[j]["logprob_gain"]))
                for rows in scored]
        ex.log_edits(r, "train", train_p, cands, selected=best)
        # SFT rows accumulate over rounds: ReST-EM fine-tunes on every round's best samples so far
        sft_rows += [{**self_edit_row(p, args.self_edit_prompt), "output": texts[b]}
                     for p, texts, b in zip(train_p, cands, best) if texts[b].strip()]
        if not sft_rows:
            raise RuntimeError(f"round {r}: every selected self-edit is empty; raise --self_edit_tokens")
        with lora_attached(ex.model, cfg, cfg.seed + r, weights=generator):
            stats = train_adapter(ex.model, ex.tok, sft_rows, cfg, ex.device, args.gen_steps, args.gen_lr, cfg.seed + r)
            generator = adapter_weights(ex.model)
        gen_log.append({"round": r + 1, "sft_rows": len(sft_rows), **stats,
                        "selected_gain": mean(rows[b]["adapter_gain"] for rows, b in zip(scored, best)),
                        "selected_logprob_gain": mean(rows[b]["logprob_gain"] for rows, b in zip(scored, best))})
        print(f"[ki] round {r + 1} generator: {len(sft_rows)} SFT rows, loss {stats['loss_first']:.3f} -> "
              f"{stats['loss_last']:.3f}")
        edits = ex.self_edits(eval_p, args.k_eval, seed=cfg.seed, generator=generator)
        ex.log_edits(r + 1, "eval", eval_p, edits)
        score_edits(ex, r + 1, "trained_self_edits", "eval", eval_p, edits)
    return {"generator": gen_log}


# ----------------------------------------------------------------------------- continual self-edits
def target_weights(model, cfg) -> dict:
    """Clones of the weights merges change (the LoRA target Linears), to restore the base between sequences."""
    names = find_target_linears(model, cfg.lora_target_modules, cfg.num_frozen_layers)
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


def run_continual(ex: Experiment, pool) -> dict:
    args, cfg = ex.args, ex.cfg
    N = args.n_continual
    snapshot = target_weights(ex.model, cfg)
    path = ex.log_dir / "ki_continual.json"
    seqs = json.loads(path.read_text())["sequences"] if path.exists() else []  # finished sequences (resume)
    try:
        for s in range(len(seqs), args.n_sequences):
            items = random.Random(f"ki-continual/{cfg.seed}/{s}").sample(pool, N)
            base = ex.base_answers(items)
            acc = [[mean(a["correct"] for a in base[p["passage_id"]]) for p in items]]
            logp = [[mean(a["logprob"] for a in base[p["passage_id"]]) for p in items]]
            for k, p in enumerate(tqdm(items, desc=f"continual sequence {s + 1}/{args.n_sequences}")):
                edit = ex.self_edits([p], 1, seed=cfg.seed + 7919 * (s + 1) + k)[0]
                ex.log_edits(k, f"continual{s}", [p], [edit])
                ex.inner_loop(p, edit, merge=True)  # the update stays in the weights
                now = ex.answer(items)
                acc.append([mean(a["correct"] for a in now[q["passage_id"]]) for q in items])
                logp.append([mean(a["logprob"] for a in now[q["passage_id"]]) for q in items])
            seqs.append({"passages": [p["passage_id"] for p in items], "R": acc, "R_logprob": logp,
                         "metrics": _metrics(acc), "metrics_logprob": _metrics(logp)})
            for name, w in snapshot.items():  # back to the base model for the next sequence
                ex.model.get_submodule(name).weight.data.copy_(w)
            write_continual(ex.log_dir, seqs, args)
    finally:
        for name, w in snapshot.items():
            ex.model.get_submodule(name).weight.data.copy_(w)
    return json.loads((ex.log_dir / "ki_continual.json").read_text())


def _metrics(R) -> dict:
    m = cl_metrics(R)
    return {k: m[k] for k in ("ap", "bwt", "fwt", "forgetting")}


def write_continual(log_dir: Path, seqs: list[dict], args) -> None:
    """ki_continual.json: R = the mean accuracy matrix over sequences; metrics = the mean of each sequence's
    AP / BWT / FWT / forgetting (forgetting takes a max, so it is computed per sequence, then averaged)."""
    def avg(key):
        return np.mean([s[key] for s in seqs], axis=0).tolist()

    def avg_metrics(key):
        return {m: float(np.mean([s[key][m] for s in seqs])) for m in seqs[0][key]}

    def std_metrics(key):
        return {m: float(np.std([s[key][m] for s in seqs])) for m in seqs[0][key]}
    out = {"R": avg("R"), "metrics": avg_metrics("metrics"), "metrics_std": std_metrics("metrics"),
           "R_logprob": avg("R_logprob"), "metrics_logprob": avg_metrics("metrics_logprob"),
           "n_sequences": len(seqs), "n_passages": args.n_continual, "grade": args.grade, "sequences": seqs}
    atomic_write_text(log_dir / "ki_continual.json", json.dumps(out, indent=1) + "\n")


def plot_continual(log_dir: Path, result: dict) -> Path:
    from plot_loss import plt, save_png  # matplotlib (Agg) and the atomic PNG writer
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key, title in ((axes[0], "R", f"accuracy ({result['grade']})"),
                           (axes[1], "R_logprob", "gold answer log-prob per token")):
        R = np.array(result[key], dtype=float)
        im = ax.imshow(R, cmap="RdYlGn", aspect="auto")
        for t in range(R.shape[0]):
            for i in range(R.shape[1]):
                ax.text(i, t, f"{R[t, i]:.2f}", ha="center", va="center", fontsize=9,
                        fontweight="bold" if t == i + 1 else "normal")
        ax.set_xticks(range(R.shape[1]))
        ax.set_xticklabels([f"d{i}" for i in range(R.shape[1])])
        ax.set_yticks(range(R.shape[0]))
        ax.set_yticklabels(["base"] + [f"after d{k}" for k in range(R.shape[0] - 1)])
        ax.set_xlabel("passage evaluated")
        m = result["metrics" if key == "R" else "metrics_logprob"]
        ax.set_title(f"{title}\nAP {m['ap']:.3f}, BWT {m['bwt']:+.3f}, forgetting {m['forgetting']:.3f}"
                     if m["bwt"] is not None else f"{title}\nAP {m['ap']:.3f}")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"continual self-edits: each LoRA merged before the next passage "
                 f"(mean of {result['n_sequences']} sequences; bold: the passage just learned)")
    fig.tight_layout()
    return save_png(fig, log_dir / "ki_continual.png")


# ----------------------------------------------------------------------------- summary
def summarize(rows: list[dict]) -> list[dict]:
    """Mean of each score per (round, condition, split), in log order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["round"], r["condition"], r["split"]), []).append(r)
    keys = ("acc_before", "acc_after", "adapter_gain", "em_after", "f1_after", "logprob_before", "logprob_after",
            "logprob_gain")
    return [{"round": rd, "condition": c, "split": sp, "n": len(g), **{k: mean(r[k] for r in g) for k in keys},
             "questions_up": sum(x == 1 for r in g for x in r["gains"]),
             "questions_down": sum(x == -1 for r in g for x in r["gains"])}
            for (rd, c, sp), g in groups.items()]


def print_summary(table: list[dict], continual: dict | None) -> None:
    print(f"{'round':>5} {'condition':<19} {'split':<5} {'n':>3} {'acc_before':>10} {'acc_after':>9} {'gain':>7} "
          f"{'up/down':>7} {'f1_after':>8} {'logp_gain':>9}")
    for t in table:
        print(f"{t['round']:>5} {t['condition']:<19} {t['split']:<5} {t['n']:>3} {t['acc_before']:>10.3f} "
              f"{t['acc_after']:>9.3f} {t['adapter_gain']:>+7.3f} {t['questions_up']:>3}/{t['questions_down']:<3} "
              f"{t['f1_after']:>8.3f} {t['logprob_gain']:>+9.3f}")
    if continual:
        for key in ("metrics", "metrics_logprob"):
            m = continual[key]
            print(f"[ki] continual {key}: " + ", ".join(f"{k} {v:+.3f}" if v is not None else f"{k} n/a"
                                                       for k, v in m.items()))


def same_run(log_dir: Path, cfg, args) -> bool:
    """Whether log_dir holds an earlier run of these settings (its ki_config.json), which this one may resume."""
    path = log_dir / "ki_config.json"
    if not path.exists():
        return False
    old = json.loads(path.read_text())
    mine = {k: v for k, v in vars(args).items() if k != "restart"}
    theirs = {k: v for k, v in old.get("ki_args", {}).items() if k != "restart"}
    cfg_now = json.loads(json.dumps(config_to_dict(cfg)))
    skip = ("log_dir", "save_dir", "log_interval")
    same = (json.loads(json.dumps(mine)) == theirs
            and {k: v for k, v in cfg_now.items() if k not in skip}
            == {k: v for k, v in old.items() if k not in skip and k != "ki_args"})
    if same:
        print(f"[ki] resuming the run in {log_dir} (--restart starts afresh)")
    return same


def main(argv=None):
    t0 = time.time()
    args, cfg = parse_args_and_config(build_parser(), argv, **KI_CONFIG)
    args = resolve_args(args)
    print_config(cfg, "ki")
    print(f"[ki] {json.dumps({k: v for k, v in vars(args).items()})}")
    log_dir = Path(cfg.log_dir)
    train_p, eval_p = load_passages(args, cfg)
    write_jsonl(log_dir / "ki_data.jsonl", [{**r, "split": s} for s, ps in (("train", train_p), ("eval", eval_p))
                                            for r in passage_rows(ps)])
    resume = not args.restart and same_run(log_dir, cfg, args)
    if not resume:  # a new run (other settings, or --restart) replaces the logs
        for name in ("ki_inner.jsonl", "ki_answers.jsonl", "ki_self_edits.jsonl"):
            write_jsonl(log_dir / name, [])
        (log_dir / "ki_continual.json").unlink(missing_ok=True)
    save_config(cfg, log_dir, name="ki_config.json", extra={"ki_args": vars(args)})
    print(f"[ki] {len(train_p)} training + {len(eval_p)} held-out passages ({args.source}), "
          f"{sum(len(p['questions']) for p in train_p + eval_p)} questions -> {log_dir / 'ki_data.jsonl'}")

    model, tok, device = load_model_and_tokenizer(cfg)
    ex = Experiment(model, tok, cfg, device, args, log_dir)
    summary = {"args": vars(args), "timing_s": {}}
    if "outer" in args.stages:
        t = time.time()
        summary |= run_outer(ex, train_p, eval_p)
        summary["timing_s"]["outer"] = round(time.time() - t, 1)
    summary["outer"] = summarize(read_jsonl(log_dir / "ki_inner.jsonl"))
    continual = None
    if "continual" in args.stages:
        t = time.time()
        continual = run_continual(ex, eval_p)
        plot_continual(log_dir, continual)
        summary["timing_s"]["continual"] = round(time.time() - t, 1)
        summary["continual"] = {k: continual[k] for k in ("R", "metrics", "metrics_std", "R_logprob",
                                                          "metrics_logprob", "n_sequences", "n_passages")}
    summary["timing_s"]["total"] = round(time.time() - t0, 1)
    summary["resumed_inner_loops"] = ex.reused
    atomic_write_text(log_dir / "ki_summary.json", json.dumps(summary, indent=1) + "\n")
    print_summary(summary["outer"], continual)
    print(f"[ki] done in {summary['timing_s']['total']:.0f} s; logs in {log_dir}")
    return summary


if __name__ == "__main__":
    main()
