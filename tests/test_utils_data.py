"""utils_data.py: JSONL I/O that names file and line, the one prompt builder and its exact label mask, collate_fn.

Two tokenizers: the byte-level BPE with a chat template from conftest (SmolLM2-like, pad == eos), and a real
SentencePiece model trained here in milliseconds and wrapped as transformers' LlamaTokenizer (LLaMA-2-like:
BOS added by the tokenizer, byte fallback, identity normalization)."""
import io
import json
import re

import pytest
import torch

from conftest import CORPUS
from configs.base_config import make_config
from utils_data import (
    IGNORE_INDEX,
    InstructionDataset,
    JsonlError,
    append_jsonl,
    build_prompt,
    collate_fn,
    encode_example,
    encode_prompt,
    example_lengths,
    read_jsonl,
    read_records,
    response_text,
    show_supervised,
    user_message,
    write_jsonl,
)

FORMATS = ("chat_template", "llama2")
ROW = {"instruction": "What is the capital of France?", "input": "Answer in one sentence.",
       "output": "Paris is the capital of France."}


def make_llama_sp_tokenizer():
    """A tiny SentencePiece BPE model (LLaMA-2 settings: ids unk 0 / bos 1 / eos 2, no pad, byte fallback,
    no normalization) as a transformers LlamaTokenizer, built offline.

    transformers 5 converts a tokenizer.model through protobuf, which is not installed, so the vocab is read
    with sentencepiece itself and the merges rebuilt by transformers' own `generate_merges`, as its
    SentencePieceExtractor does. Byte fallback needs 256 byte pieces, hence a vocab of 400."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS + ["[INST] Give a short answer. [/INST] Paris"]), model_writer=buf,
        vocab_size=400, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = generate_merges(vocab, {p: sp.get_score(i) for i, p in enumerate(pieces)})
    tok = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                         add_bos_token=True)
    tok.pad_token = tok.eos_token  # what utils_model.load_tokenizer does for LLaMA-2
    return tok, sp


@pytest.fixture(scope="module")
def llama_sp():
    return make_llama_sp_tokenizer()


@pytest.fixture(params=FORMATS)
def fmt_tok(request, tiny_tokenizer, llama_sp):
    """(format, tokenizer) for both prompt formats."""
    return request.param, (tiny_tokenizer if request.param == "chat_template" else llama_sp[0])


def split_at_prompt(tok, row, fmt, max_seq_len=10_000):
    ids, labels = encode_example(tok, row, fmt, max_seq_len)
    n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
    return ids, labels, n_prompt


def rows_for_lengths():
    rows = []
    for i in range(40):
        r = {"instruction": CORPUS[i % len(CORPUS)] + " " * (i % 3), "output": CORPUS[(i * 5 + 2) % len(CORPUS)]}
        if i % 4:
            r["input"] = ("" if i % 4 == 1 else "  ") if i % 2 else CORPUS[(i * 7) % len(CORPUS)] * (1 + i % 3)
        rows.append(r)
    return rows


# ----------------------------------------------------------------------------- JSONL I/O
@pytest.mark.parametrize("bad_line, reader, message", [
    ('{"instruction": "a", "output": ', read_jsonl, "not valid JSON"),
    ('["instruction", "output"]', read_jsonl, "expected a JSON object, got list"),
    ('"just a string"', read_jsonl, "expected a JSON object, got str"),
    ('{"instruction": "a", "input": "b"}', read_records, 'missing field "output"'),
    ('{"output": "a"}', read_records, 'missing field "instruction"'),
    ('{"instruction": "a", "input": 5, "output": "b"}', read_records, 'field "input" is not a string (got int)'),
    ('{"instruction": null, "output": "b"}', read_records, 'field "instruction" is not a string (got NoneType)'),
    ('{"instruction": "a", "output": ["b"]}', read_records, 'field "output" is not a string (got list)'),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, reader, message):
    path = tmp_path / "T2_math_val.jsonl"
    good = json.dumps({"instruction": "i", "input": "", "output": "o"})
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n")  # the blank line still counts: the bad row is line 3
    with pytest.raises(JsonlError) as e:
        reader(path)
    assert str(e.value).startswith(f"{path} line 3: {message}")


def test_read_records_defaults_input_and_keeps_extra_keys(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"instruction": "a", "output": "b", "id": "x1"}\n\n{"instruction": "c", "input": "d", "output": "e"}\n')
    assert read_records(path) == [{"instruction": "a", "output": "b", "id": "x1", "input": ""},
                                  {"instruction": "c", "input": "d", "output": "e", "id": "r.jsonl:3"}]  # id = line


def test_read_jsonl_on_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_write_jsonl_round_trips_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    rows = [{"a": 1, "text": "caf\u00e9 \u2713"}, {"b": [1, 2], "c": None}]
    assert write_jsonl(path, iter(rows)) == 2
    assert read_jsonl(path) == rows
    assert "caf\u00e9" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]


def test_write_jsonl_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])
    old = path.read_bytes()
    with pytest.raises(TypeError):  # a row that json cannot serialize
        write_jsonl(path, [{"a": 2}, {"b": object()}])
    assert path.read_bytes() == old
    with pytest.raises(UnicodeEncodeError):  # serializes, but fails while the temp file is being written
        write_jsonl(path, [{"a": 3}, {"b": "lone surrogate \ud800"}])
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_write_jsonl_failure_at_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])
    old = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr("utils_io.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_jsonl(path, [{"a": 2}])
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_append_jsonl_adds_whole_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, [{"step": 1}])  # creates the file
    append_jsonl(path, [{"step": 2}, {"step": 3}])
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    path.write_text(path.read_text() + '{"step": 4}')  # a file someone left without a final newline
    append_jsonl(path, [{"step": 5}])
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5]
    assert path.read_text().endswith('{"step": 4}\n{"step": 5}\n')
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]


# ----------------------------------------------------------------------------- prompt and labels
def test_llama_tokenizer_fixture_matches_sentencepiece(llama_sp):
    tok, sp = llama_sp
    for text in ["[INST] What is the capital of France? [/INST]", "def add(a, b):\n    return a + b", "caf\u00e9 #### 72"]:
        assert tok(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)


def test_prompt_tokens_are_ignored_and_response_tokens_are_their_ids(fmt_tok):
    fmt, tok = fmt_tok
    ids, labels, n_prompt = split_at_prompt(tok, ROW, fmt)
    prompt = encode_prompt(tok, ROW, fmt)
    response = tok(response_text(ROW["output"], fmt), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(labels) == len(prompt) + len(response) + 1
    assert n_prompt == len(prompt)
    assert ids[:n_prompt] == prompt
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] == response + [tok.eos_token_id]
    assert labels[-1] == ids[-1] == tok.eos_token_id  # the last supervised token is EOS
    assert tok.decode(ids[n_prompt:-1]).strip() == ROW["output"]


def test_chat_template_prompt_is_the_tokenizers_template(tiny_tokenizer):
    text = build_prompt(tiny_tokenizer, ROW["instruction"], ROW["input"], "chat_template")
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n"
                    f"<|im_start|>user\n{ROW['instruction']}\n\n{ROW['input']}<|im_end|>\n<|im_start|>assistant\n")
    ids = encode_prompt(tiny_tokenizer, ROW, "chat_template")
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")  # written by the template, not added twice
    assert ids.count(tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def test_llama2_prompt_starts_with_bos_and_inst_and_response_ends_with_eos(llama_sp):
    tok, _ = llama_sp
    ids, labels, n_prompt = split_at_prompt(tok, ROW, "llama2")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[1:n_prompt]) == f"[INST] {ROW['instruction']}\n{ROW['input']} [/INST]"
    assert ids[-1] == labels[-1] == tok.eos_token_id
    assert tok.eos_token_id not in ids[:-1]


@pytest.mark.parametrize("empty", ["", "   ", "\n", None])
def test_empty_input_leaves_no_stray_separator(tiny_tokenizer, empty):
    chat = build_prompt(tiny_tokenizer, "Say hi. ", empty, "chat_template")
    assert "<|im_start|>user\nSay hi.<|im_end|>\n" in chat
    assert "\n\n<|im_end|>" not in chat
    assert build_prompt(None, "Say hi. ", empty, "llama2") == "[INST] Say hi. [/INST]"
    assert user_message("Say hi.", empty) == "Say hi."


def test_non_empty_input_is_separated_from_the_instruction(tiny_tokenizer):
    assert build_prompt(None, " Add. ", " 2 and 3 ", "llama2") == "[INST] Add.\n2 and 3 [/INST]"
    assert "<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>" in build_prompt(tiny_tokenizer, " Add. ", " 2 and 3 ")


def test_llama2_prompt_without_input_tokenizes_like_instruction_only(llama_sp):
    tok, _ = llama_sp
    with_empty = encode_prompt(tok, {"instruction": "Say hi.", "input": "", "output": "hi"}, "llama2")
    without = encode_prompt(tok, {"instruction": "Say hi.", "output": "hi"}, "llama2")
    assert with_empty == without == tok("[INST] Say hi. [/INST]")["input_ids"]


def test_unknown_prompt_format_and_missing_chat_template_are_rejected(llama_sp):
    with pytest.raises(ValueError, match="'alpaca'"):
        build_prompt(None, "a", "", "alpaca")
    with pytest.raises(ValueError, match="--prompt_format llama2"):
        build_prompt(llama_sp[0], "a", "", "chat_template")


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_whole_response(fmt_tok):
    fmt, tok = fmt_tok
    long_row = dict(ROW, input=" ".join(CORPUS) * 20)
    full_ids, _, full_prompt_len = split_at_prompt(tok, long_row, fmt)
    max_seq_len = 48
    ids, labels, n_prompt = split_at_prompt(tok, long_row, fmt, max_seq_len)
    response = full_ids[full_prompt_len:]
    assert full_prompt_len > max_seq_len  # the prompt alone would not fit
    assert len(ids) == len(labels) == max_seq_len
    assert ids[-len(response):] == labels[-len(response):] == response  # every response token, EOS last
    assert n_prompt == max_seq_len - len(response)
    assert ids[:n_prompt] == full_ids[full_prompt_len - n_prompt:full_prompt_len]  # the prompt's end survives


def test_response_that_cannot_fit_is_dropped(fmt_tok):
    fmt, tok = fmt_tok
    ids, _, n_prompt = split_at_prompt(tok, ROW, fmt)
    n_response = len(ids) - n_prompt  # includes EOS
    assert encode_example(tok, ROW, fmt, n_response) is None  # no room for a single prompt token
    ids1, labels1 = encode_example(tok, ROW, fmt, n_response + 1)
    assert ids1 == ids[n_prompt - 1:] and labels1 == [IGNORE_INDEX] + ids[n_prompt:]


def test_dataset_drops_and_counts_rows_whose_response_cannot_fit(tmp_path, tiny_tokenizer, capsys):
    path = tmp_path / "T1_general_val.jsonl"
    rows = [dict(ROW, output="ok"), dict(ROW, output=" ".join(CORPUS) * 3), dict(ROW, output="fine"),
            dict(ROW, output=" ".join(CORPUS) * 5)]
    write_jsonl(path, rows)
    ds = InstructionDataset(path, tiny_tokenizer, make_config(["--max_seq_len", "64"]))
    assert ds.num_dropped == 2
    assert len(ds) == 2 and [r["output"] for r in ds.rows] == ["ok", "fine"]
    assert ds.ids == ["T1_general_val.jsonl:1", "T1_general_val.jsonl:3"]
    assert "dropped 2 of 4" in capsys.readouterr().out
    item = ds[1]
    assert item["idx"] == 1 and item["input_ids"].dtype == torch.long
    assert item["input_ids"].tolist() == encode_example(tiny_tokenizer, rows[2], "chat_template", 64)[0]


# ----------------------------------------------------------------------------- batching and debugging
def test_collate_pads_to_longest_with_masks_from_lengths_even_when_pad_is_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the SmolLM2 situation the mask must survive
    rows = [dict(ROW, output="Paris."), dict(ROW, input="", output="Paris is the capital of France, in Europe.")]
    encs = [encode_example(tok, r, "chat_template", 512) for r in rows]
    batch = collate_fn([{"input_ids": torch.tensor(i), "labels": torch.tensor(l), "idx": k}
                        for k, (i, l) in enumerate(encs)], pad_token_id=tok.pad_token_id)
    lengths = [len(i) for i, _ in encs]
    T = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, T)
    assert batch["idx"].tolist() == [0, 1]
    for b, (ids, labels) in enumerate(encs):
        n = len(ids)
        assert batch["input_ids"][b, :n].tolist() == ids
        assert batch["labels"][b, :n].tolist() == labels
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
        assert batch["input_ids"][b, n:].tolist() == [tok.pad_token_id] * (T - n)
        assert batch["labels"][b, n:].tolist() == [IGNORE_INDEX] * (T - n)
        # the final EOS looks exactly like padding, yet it is attended and supervised
        assert batch["input_ids"][b, n - 1] == tok.eos_token_id
        assert batch["attention_mask"][b, n - 1] == 1 and batch["labels"][b, n - 1] == tok.eos_token_id
    assert lengths[0] != lengths[1]  # so one row really was padded


def test_show_supervised_wraps_exactly_the_supervised_tokens(fmt_tok):
    fmt, tok = fmt_tok
    ids, labels, n_prompt = split_at_prompt(tok, ROW, fmt)
    batch = collate_fn([{"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "idx": 0},
                        {"input_ids": torch.tensor(ids + ids), "labels": torch.tensor(labels + labels), "idx": 1}],
                       pad_token_id=tok.eos_token_id)
    text = show_supervised(tok, batch["input_ids"][0], batch["labels"][0])  # padded row: pads stay unwrapped
    wrapped = re.findall(r"\[\[(.*?)\]\]", text, flags=re.S)
    assert wrapped == [tok.decode([t]) for t in ids[n_prompt:]]
    assert wrapped[-1] == tok.eos_token
    assert text.startswith("".join(tok.decode([t]) for t in ids[:n_prompt]) + "[[")
    assert text.endswith(f"[[{tok.eos_token}]]" + tok.decode([tok.eos_token_id]) * len(ids))  # the padding


def test_example_lengths_equal_encoded_lengths(fmt_tok):
    fmt, tok = fmt_tok
    rows = rows_for_lengths()
    expected = [len(encode_example(tok, r, fmt, 10**6)[0]) for r in rows]
    assert example_lengths(tok, rows, fmt, batch_size=7) == expected
    assert example_lengths(tok, rows, fmt) == expected
    assert len(set(expected)) > 10  # the rows really differ


# ----------------------------------------------------------------------------- dataset sampling and ids
def write_numbered_rows(path, n, with_id_every=0):
    rows = []
    for i in range(n):
        r = {"instruction": f"Question number {i}?", "output": f"Answer {i}."}
        if with_id_every and i % with_id_every == 0:
            r["id"] = f"q{i}"
        rows.append(r)
    write_jsonl(path, rows)
    return rows


def test_dataset_without_cap_keeps_file_order_and_ids(tmp_path, tiny_tokenizer):
    path = tmp_path / "T3_code_tiny.jsonl"
    write_numbered_rows(path, 6, with_id_every=3)
    ds = InstructionDataset(path, tiny_tokenizer, make_config(), verbose=False)
    assert ds.ids == ["q0", "T3_code_tiny.jsonl:2", "T3_code_tiny.jsonl:3", "q3",
                      "T3_code_tiny.jsonl:5", "T3_code_tiny.jsonl:6"]
    assert [r["instruction"] for r in ds.rows] == [f"Question number {i}?" for i in range(6)]


def test_dataset_ids_are_file_line_even_after_blank_lines(tmp_path, tiny_tokenizer):
    path = tmp_path / "T1_general_val.jsonl"
    a, b = (json.dumps({"instruction": f"Q{i}", "output": f"A{i}"}) for i in range(2))
    path.write_text(f"{a}\n\n{b}\n")
    ds = InstructionDataset(path, tiny_tokenizer, make_config(), verbose=False)
    assert ds.ids == ["T1_general_val.jsonl:1", "T1_general_val.jsonl:3"]



def test_dataset_rejects_a_duplicate_id_naming_file_and_id(tmp_path, tiny_tokenizer):
    path = tmp_path / "T2_math_train.jsonl"
    rows = [{"id": "m1", "instruction": "Q1", "output": "A1"}, {"id": "m1", "instruction": "Q2", "output": "A2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"T2_math_train\.jsonl: duplicate id 'm1'"):
        InstructionDataset(path, tiny_tokenizer, make_config(), verbose=False)

def test_max_samples_draws_a_seeded_subset(tmp_path, tiny_tokenizer):
    path = tmp_path / "T2_math_val.jsonl"
    write_numbered_rows(path, 30, with_id_every=4)
    cfg = make_config(["--seed", "7"])
    one = InstructionDataset(path, tiny_tokenizer, cfg, max_samples=6, verbose=False)
    same = InstructionDataset(path, tiny_tokenizer, cfg, max_samples=6, verbose=False)
    other = InstructionDataset(path, tiny_tokenizer, cfg, max_samples=6, seed=8, verbose=False)
    cfg_seed = InstructionDataset(path, tiny_tokenizer, make_config(["--seed", "8"]), max_samples=6, verbose=False)
    assert len(one) == len(other) == 6
    assert one.ids == same.ids
    assert other.ids == cfg_seed.ids  # `seed` defaults to cfg.seed
    assert one.ids != other.ids
    assert one.ids != InstructionDataset(path, tiny_tokenizer, cfg, verbose=False).ids[:6]  # not the file's head
    full = InstructionDataset(path, tiny_tokenizer, cfg, verbose=False)
    position = {sid: k for k, sid in enumerate(full.ids)}
    assert [position[s] for s in one.ids] == sorted(position[s] for s in one.ids)  # file order is kept
    for k, sid in enumerate(one.ids):  # an id names the same row whatever the subset
        assert one[k]["input_ids"].tolist() == full[position[sid]]["input_ids"].tolist()


def test_max_samples_at_or_above_the_row_count_keeps_every_row(tmp_path, tiny_tokenizer):
    path = tmp_path / "T2_math_val.jsonl"
    write_numbered_rows(path, 5)
    assert len(InstructionDataset(path, tiny_tokenizer, make_config(), max_samples=5, verbose=False)) == 5
    assert len(InstructionDataset(path, tiny_tokenizer, make_config(), max_samples=50, verbose=False)) == 5
