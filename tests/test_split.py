"""split_datasets.py on small synthetic full files with the tiny tokenizer: ratios, cap, determinism, no
overlap, length filter, bench handling, malformed input. No network; seconds."""
import json

import pytest

import split_datasets
from utils_data import JsonlError, example_lengths, read_jsonl, write_jsonl

TASKS = "T1_general,T2_math"


def make_full(d, n=200, n_dup=10, n_long=5, n_empty=3):
    """Synthetic full files: n distinct rows plus duplicates, over-long rows and empty outputs."""
    for task in TASKS.split(","):
        rows = [{"instruction": f"Question {i} for {task}?", "input": f"x{i % 7}", "output": f"Answer {i}.",
                 "id": f"{task}:syn:{i}"} for i in range(n)]
        rows += [dict(rows[i], output="a different answer", id=f"{task}:dup:{i}") for i in range(n_dup)]
        rows += [{"instruction": f"Long {i} " + "word " * 400, "input": "", "output": "ok", "id": f"{task}:long:{i}"}
                 for i in range(n_long)]
        rows += [{"instruction": f"Empty {i}", "input": "", "output": "   ", "id": f"{task}:empty:{i}"}
                 for i in range(n_empty)]
        write_jsonl(d / f"{task}_full.jsonl", rows)
        bench = [{"instruction": f"Bench {i}?", "input": "", "kind": "general", "id": f"{task}:b:{i}",
                  "check": {"type": "lowercase"}} for i in range(6)]
        bench += [{"instruction": "Too long " + "word " * 400, "input": "", "kind": "general", "id": f"{task}:b:long",
                   "check": {"type": "lowercase"}},
                  {"instruction": f"Question 3 for {task}?", "input": "x3", "kind": "general", "id": f"{task}:b:leak",
                   "check": {"type": "lowercase"}}]
        write_jsonl(d / f"{task}_bench.jsonl", bench)


def run_split(tmp_path, model_dir, out="split", *extra):
    full = tmp_path / "full"
    if not full.exists():
        full.mkdir()
        make_full(full)
    argv = ["--in_dir", str(full), "--data_dir", str(tmp_path / out), "--model_name", str(model_dir),
            "--tasks", TASKS, "--max_seq_len", "256", *extra]
    return split_datasets.main(argv), tmp_path / out


def keys(path):
    return {(r["instruction"], r["input"]) for r in read_jsonl(path)}


def test_split_ratios_drops_and_tiny_toy(tmp_path, tiny_model_dir):
    stats, out = run_split(tmp_path, tiny_model_dir)
    st = stats["T1_general"]
    assert st["drops"]["empty instruction or output"] == 3
    assert st["drops"]["duplicate (instruction, input)"] == 10
    assert st["drops"]["longer than max_seq_len=256 tokens"] == 5
    assert (st["train"]["rows"], st["val"]["rows"], st["test"]["rows"]) == (160, 20, 20)
    assert st["tiny"]["rows"] == 16 and st["toy"]["rows"] == 16
    assert keys(out / "T1_general_tiny.jsonl") <= keys(out / "T1_general_train.jsonl")
    saved = json.loads((out / "stats.json").read_text())
    assert saved["tasks"]["T2_math"]["train"]["rows"] == 160 and "p99" in saved["tasks"]["T2_math"]["train"]["tokens"]


def test_no_prompt_in_two_splits(tmp_path, tiny_model_dir):
    _, out = run_split(tmp_path, tiny_model_dir)
    for task in TASKS.split(","):
        tr, va, te = (keys(out / f"{task}_{s}.jsonl") for s in ("train", "val", "test"))
        assert not (tr & va) and not (tr & te) and not (va & te)


def test_length_filter_keeps_only_rows_that_fit(tmp_path, tiny_model_dir):
    from utils_model import load_tokenizer
    _, out = run_split(tmp_path, tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    rows = read_jsonl(out / "T1_general_train.jsonl")
    assert max(example_lengths(tok, rows, "chat_template")) <= 256
    assert not any(r["instruction"].startswith("Long ") for r in rows)


def test_cap_samples_max_rows_per_task(tmp_path, tiny_model_dir):
    stats, _ = run_split(tmp_path, tiny_model_dir, "capped", "--max_rows_per_task", "50")
    st = stats["T2_math"]
    assert (st["train"]["rows"], st["val"]["rows"], st["test"]["rows"]) == (40, 5, 5)
    assert st["drops"]["over --max_rows_per_task cap"] == 150 and st["tiny"]["rows"] == 4


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path, tiny_model_dir):
    _, a = run_split(tmp_path, tiny_model_dir, "a")
    _, b = run_split(tmp_path, tiny_model_dir, "b")
    _, c = run_split(tmp_path, tiny_model_dir, "c", "--seed", "7")
    for s in ("train", "val", "test", "tiny", "toy", "bench"):
        assert (a / f"T1_general_{s}.jsonl").read_bytes() == (b / f"T1_general_{s}.jsonl").read_bytes()
    assert (a / "T1_general_train.jsonl").read_bytes() != (c / "T1_general_train.jsonl").read_bytes()


def test_bench_copied_without_long_or_training_prompts(tmp_path, tiny_model_dir):
    stats, out = run_split(tmp_path, tiny_model_dir)
    bench = read_jsonl(out / "T1_general_bench.jsonl")
    assert len(bench) == 6 and all(r["check"] == {"type": "lowercase"} for r in bench)
    assert stats["T1_general"]["bench_drops"] == {"prompt of max_seq_len=256 tokens or more": 1,
                                                  "prompt also in training data": 1}


def test_malformed_input_names_file_and_line(tmp_path, tiny_model_dir):
    full = tmp_path / "full"
    full.mkdir()
    make_full(full)
    p = full / "T2_math_full.jsonl"
    p.write_text(p.read_text() + "{not json\n")
    n = len(p.read_text().splitlines())
    with pytest.raises(JsonlError, match=rf"T2_math_full.jsonl line {n}: not valid JSON"):
        run_split(tmp_path, tiny_model_dir)


def test_missing_full_file_tells_to_run_prepare(tmp_path, tiny_model_dir):
    (tmp_path / "full").mkdir()
    with pytest.raises(FileNotFoundError, match="prepare_datasets.py"):
        run_split(tmp_path, tiny_model_dir)
