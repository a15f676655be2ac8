"""Lowest-level I/O shared by every module (the config included): atomic writes and JSONL that fails loudly.

Nothing here imports another project module, so `configs.base_config`, `utils_data` and the evaluation
package can all use it without an import circle.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

RECORD_FIELDS = ("instruction", "input", "output")


class JsonlError(ValueError):
    """A JSONL line that cannot be used; the message names file, line and problem."""


# ----------------------------------------------------------------------------- atomic I/O
def is_writer() -> bool:
    """False in the processes of a torchrun job other than rank 0: they train alongside rank 0 but write no file
    (logs, checkpoints, configs), so no two processes rewrite the same file (utils_dist.py)."""
    return os.environ.get("RANK", "0") == "0"


def atomic_write_text(path, text: str) -> None:
    """Write `text` to a temp file in the same folder, fsync, then rename: readers never see half a file.
    Does nothing outside rank 0 of a torchrun job (is_writer)."""
    if not is_writer():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def dumps_jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(path, rows) -> int:
    """Atomically (re)write `path` with `rows`; returns the row count."""
    rows = list(rows)
    atomic_write_text(path, dumps_jsonl(rows))
    return len(rows)


def append_jsonl(path, rows) -> None:
    """Append whole lines: the file is rewritten atomically with the new rows at the end.

    Logs here are small (hundreds of lines), so a rewrite is cheap and an interrupted run can never
    leave half a line behind."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + dumps_jsonl(rows))


def iter_jsonl(path, required: tuple[str, ...] = (), string_fields: tuple[str, ...] = ()):
    """Yield (line_number, row) for each non-blank line. A malformed line raises JsonlError naming file and
    line: not UTF-8, not JSON, not an object, a missing `required` field, or a `string_fields` value that is
    not a string."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:  # bytes, decoded per line, so a bad byte is reported with its line number
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JsonlError(f"{path} line {lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1}); re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonlError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise JsonlError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            for k in required:
                if k not in row:
                    raise JsonlError(f'{path} line {lineno}: missing field "{k}"')
            for k in string_fields:
                if k in row and not isinstance(row[k], str):
                    raise JsonlError(f'{path} line {lineno}: field "{k}" is not a string '
                                     f'(got {type(row[k]).__name__})')
            yield lineno, row


def read_jsonl(path, required: tuple[str, ...] = (), string_fields: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file (blank lines skipped); errors as in `iter_jsonl`."""
    return [row for _, row in iter_jsonl(path, required, string_fields)]


def read_records(path) -> list[dict]:
    """Read unified instruction records: instruction and output required, input optional; all strings.
    A row without an "id" gets "{file name}:{line number}", a stable key for caches."""
    rows = []
    for lineno, r in iter_jsonl(path, required=("instruction", "output"), string_fields=RECORD_FIELDS):
        r.setdefault("input", "")
        r.setdefault("id", f"{Path(path).name}:{lineno}")
        rows.append(r)
    return rows
