"""configs/base_config.py: strict `--key value` / `--key=value` overrides, presets, validation, save and reload."""
import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from configs.base_config import (
    KNOWN_TASKS,
    PRESETS,
    SPLIT_KINDS,
    BaseConfig,
    ConfigError,
    field_comments,
    make_config,
    parse_args_and_config,
    parse_config,
    save_config,
    validate,
)

FIELD_NAMES = [f.name for f in dataclasses.fields(BaseConfig)]


def both_forms(key, value):
    """The two spellings of one override."""
    return [["--" + key, value], [f"--{key}={value}"]]


def test_defaults_validate():
    cfg = validate(BaseConfig())
    assert cfg == make_config([])
    assert cfg.tasks == KNOWN_TASKS
    assert cfg.r_fast == cfg.lora_r  # lora_r_fast = 0 means "same as lora_r"
    # every task has a path for every split kind, under data_dir
    assert set(cfg.data_paths) == set(KNOWN_TASKS)
    assert cfg.task_path("T2_math", "val") == str(Path("data/split") / "T2_math_val.jsonl")


@pytest.mark.parametrize("key, raw, expected", [
    ("lora_r", "16", 16),                                     # int
    ("lr_fast", "2e-4", 2e-4),                                # float
    ("lora_alpha", "32", 32.0),                               # float given as an int literal
    ("use_toy_data", "true", True),                           # bool
    ("use_slsd", "0", False),
    ("run_metrics", "no", False),
    ("prompt_format", "llama2", "llama2"),                    # str
    ("lora_target_modules", "q_proj,v_proj,k_proj", ("q_proj", "v_proj", "k_proj")),  # tuple
    ("tasks", "T2_math, T1_general", ("T2_math", "T1_general")),
    ("max_new_tokens", '{"T1_general": 5, "drift": 7}', {**BaseConfig().max_new_tokens, "T1_general": 5, "drift": 7}),  # dict (JSON), merged into the defaults
])
def test_override_space_and_equals_forms_give_the_typed_value(key, raw, expected):
    for argv in both_forms(key, raw):
        value = getattr(make_config(argv), key)
        assert value == expected, argv
        assert type(value) is type(expected), argv


def test_override_changes_only_its_key():
    cfg = make_config(["--lora_r", "4"])
    default = BaseConfig()
    assert cfg.lora_r == 4
    assert {k for k in FIELD_NAMES if getattr(cfg, k) != getattr(default, k)} == {"lora_r"}


def test_dashes_in_a_key_mean_underscores():
    assert make_config(["--lora-r", "4", "--lr-fast=0.5"]).lora_r == 4
    assert make_config(["--lr-fast=0.5"]).lr_fast == 0.5


def test_value_with_an_equals_sign_is_kept_whole():
    cfg = make_config(['--data_paths={"T1_general": {"val": "a=b.jsonl"}}', "--tasks", "T1_general"])
    assert cfg.data_paths == {"T1_general": {"val": "a=b.jsonl"}}


def test_unknown_key_is_rejected_naming_the_key():
    with pytest.raises(ConfigError, match="lora_rank"):
        make_config(["--lora_rank", "4"])
    with pytest.raises(ConfigError, match="learning_rate"):
        make_config(["--learning_rate=1e-3"])
    with pytest.raises(ConfigError, match="bogus_kwarg"):
        make_config(bogus_kwarg=1)


def test_unknown_key_suggests_close_keys():
    with pytest.raises(ConfigError) as e:
        make_config(["--lora_rank", "4"])
    assert "lora_r" in str(e.value.args[0].split("did you mean")[1])


@pytest.mark.parametrize("argv, key, value", [
    (["--lora_r", "abc"], "lora_r", "abc"),
    (["--lora_r=8.0"], "lora_r", "8.0"),
    (["--lr_fast", "fast"], "lr_fast", "fast"),
    (["--use_toy_data", "maybe"], "use_toy_data", "maybe"),
    (["--max_new_tokens", "[1, 2]"], "max_new_tokens", "[1, 2]"),
    (["--data_paths", "{not json"], "data_paths", "{not json"),
    (["--lora_target_modules", ","], "lora_target_modules", ","),
])
def test_wrong_type_is_rejected_naming_the_key_and_value(argv, key, value):
    with pytest.raises(ConfigError) as e:
        make_config(argv)
    msg = str(e.value)
    assert f"--{key}" in msg and repr(value) in msg


def test_programmatic_override_of_the_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="lora_r"):
        make_config(lora_r=True)  # a bool is not an int here
    with pytest.raises(ConfigError, match="lr_fast"):
        make_config(lr_fast="x")
    assert make_config(lr_fast=1).lr_fast == 1.0 and isinstance(make_config(lr_fast=1).lr_fast, float)
    assert make_config(tasks=["T1_general"]).tasks == ("T1_general",)


def test_flag_without_a_value_is_rejected():
    with pytest.raises(ConfigError, match="--lora_r needs a value"):
        make_config(["--lora_r"])
    with pytest.raises(ConfigError, match="'lora_r'"):
        make_config(["lora_r", "4"])  # not an override at all


@pytest.mark.parametrize("argv, words", [
    (["--lora_r", "0"], ["lora_r", "got 0"]),
    (["--lr_fast", "-1"], ["lr_fast", "got -1"]),
    (["--lr_fast=-1"], ["lr_fast", "got -1"]),
    (["--tasks", "T1_general,T9_bogus"], ["T9_bogus"]),
    (["--tasks", "T1_general,T1_general"], ["duplicate"]),
    (["--lora_dropout", "1.0"], ["lora_dropout", "got 1.0"]),
    (["--prompt_format", "alpaca"], ["'alpaca'"]),
    (["--train_split", "everything"], ["'everything'"]),
    (["--eval_fast_modes", "current,sometimes"], ["'sometimes'"]),
    (["--device", "tpu"], ["'tpu'"]),
    (["--per_device_batch_size", "0"], ["per_device_batch_size", "got 0"]),
    (["--num_frozen_layers", "-2"], ["num_frozen_layers", "got -2"]),
    (["--probe_keep_fraction", "0"], ["probe_keep_fraction", "got 0.0"]),
    (["--probe_keep_fraction", "1.5"], ["probe_keep_fraction", "got 1.5"]),
    (["--slsd_teacher", "bank"], ["slsd_teacher", "'bank'"]),
    (["--kd_loss", "mse"], ["kd_loss", "'mse'"]),
    (["--entropy_threshold", "2.5"], ["entropy_threshold", "removed", "probe_keep_fraction"]),
])
def test_invalid_value_is_rejected_naming_the_value(argv, words):
    with pytest.raises(ConfigError) as e:
        make_config(argv)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_data_paths_must_cover_every_task():
    with pytest.raises(ConfigError, match="T2_math"):
        make_config(["--data_paths", '{"T1_general": {"val": "x.jsonl"}}', "--tasks", "T1_general,T2_math"])


def test_probe_buffer_defaults_are_the_design_size():
    """The design asks for 100-500 scored probes per task: at least 128 here, 256 in the paper preset."""
    assert BaseConfig().probe_size_per_task >= 128 and 256 <= PRESETS["paper"]["probe_size_per_task"] <= 500
    assert 0 < BaseConfig().probe_keep_fraction < 1


def test_paper_preset_is_the_paper_setting():
    cfg = make_config(["--preset", "paper"])
    assert cfg.num_frozen_layers == 16
    assert cfg.prompt_format == "llama2"
    assert 5e-6 <= cfg.lr_slow <= 1e-5
    assert 2e-5 <= cfg.lr_fast <= 5e-5
    assert cfg.lr_slow < cfg.lr_fast
    assert make_config(["--preset=paper"]) == cfg
    assert make_config(preset="paper") == cfg


def test_every_preset_names_only_real_fields_and_validates():
    for name, values in PRESETS.items():
        assert set(values) <= set(FIELD_NAMES), name
        cfg = make_config(["--preset", name])
        for k, v in values.items():
            assert getattr(cfg, k) == (tuple(v) if isinstance(v, list) else v), (name, k)


def test_unknown_preset_is_rejected_naming_it():
    with pytest.raises(ConfigError, match="'papr'"):
        make_config(["--preset", "papr"])


def test_command_line_override_beats_preset_wherever_it_stands():
    after = make_config(["--preset", "paper", "--num_frozen_layers", "3", "--lr_fast=4e-5"])
    before = make_config(["--num_frozen_layers", "3", "--preset", "paper"])
    assert after.num_frozen_layers == 3 and before.num_frozen_layers == 3
    assert after.lr_fast == 4e-5
    assert after.prompt_format == before.prompt_format == "llama2"  # the rest of the preset still applies


def test_command_line_beats_keyword_override_which_beats_preset():
    cfg = make_config(["--lora_r", "2"], preset="paper", lora_r=4, lora_alpha=3.0)
    assert cfg.lora_r == 2 and cfg.lora_alpha == 3.0 and cfg.num_frozen_layers == 16


def test_data_dir_rederives_data_paths():
    cfg = make_config(["--data_dir", "elsewhere/split"])
    assert cfg.data_dir == "elsewhere/split"
    for task in KNOWN_TASKS:
        for split in SPLIT_KINDS:
            folder = "data/full" if split == "full" else "elsewhere/split"  # full = prepare's output (full_dir)
            assert cfg.data_paths[task][split] == str(Path(folder) / f"{task}_{split}.jsonl")
    moved = make_config(["--full_dir", "raw"])
    assert moved.task_path("T2_math", "full") == str(Path("raw") / "T2_math_full.jsonl")
    assert moved.task_path("T2_math", "train") == str(Path("data/split") / "T2_math_train.jsonl")
    sub = make_config(["--data_dir=d", "--tasks", "T3_code"])
    assert set(sub.data_paths) == {"T3_code"}
    assert sub.task_path("T3_code", "test") == str(Path("d") / "T3_code_test.jsonl")


def test_use_toy_data_redirects_train_and_eval_splits_to_toy():
    cfg = make_config(["--use_toy_data", "true"])
    toy = str(Path("data/split") / "T1_general_toy.jsonl")
    assert cfg.task_path("T1_general", "tiny") == toy
    assert cfg.task_path("T1_general", "val") == toy
    assert cfg.task_path("T1_general", "bench") == str(Path("data/split") / "T1_general_bench.jsonl")
    with pytest.raises(KeyError, match="T4_tool"):
        make_config(["--tasks", "T1_general"]).task_path("T4_tool", "val")


def test_save_config_round_trips_through_make_config(tmp_path):
    cfg = make_config(["--preset", "paper", "--lora_target_modules", "q_proj,k_proj", "--tasks", "T2_math,T1_general",
                       "--max_new_tokens", '{"T1_general": 5}', "--lora_alpha", "32", "--use_slsd", "false"])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json"]  # no temp file left behind
    loaded = json.loads(path.read_text())
    assert set(loaded) == set(FIELD_NAMES)
    again = make_config(**loaded)  # nothing dropped, nothing converted by hand
    assert again == cfg


def test_save_config_writes_extra_keys_and_overwrites(tmp_path):
    save_config(make_config(["--lora_r", "2"]), tmp_path)
    path = save_config(make_config(["--lora_r", "3"]), tmp_path, extra={"method": "ewc", "stage": 2})
    loaded = json.loads(path.read_text())
    assert loaded["lora_r"] == 3 and loaded["method"] == "ewc" and loaded["stage"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_parse_config_exits_with_a_message_on_a_bad_key(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--lora_rank", "4"])
    assert isinstance(e.value.code, str)  # a string code: printed to stderr, exit status 1
    assert e.value.code.startswith("config error:") and "--lora_rank" in e.value.code
    with pytest.raises(SystemExit) as e:
        parse_config(["--lora_r", "0"])
    assert "lora_r must be a positive integer, got 0" in e.value.code
    assert parse_config(["--lora_r", "4"]).lora_r == 4


def test_parse_config_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--help"], description="my script")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("my script")
    for name in FIELD_NAMES:
        assert f"--{name} " in out, name
    assert "paper" in out and "smoke" in out


def test_every_field_has_a_comment():
    comments = field_comments()
    assert set(comments) == set(FIELD_NAMES)
    empty = [k for k, v in comments.items() if len(v) < 5]
    assert not empty, f"fields with an empty comment: {empty}"
    assert "rank" in comments["lora_r"]


def make_script_parser():
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--method", default="seq_lora")
    p.add_argument("--task", default=None)
    p.add_argument("--dry_run", action="store_true")
    return p


def test_parse_args_and_config_splits_script_flags_from_config_keys():
    args, cfg = parse_args_and_config(make_script_parser(), [
        "--lora_r", "4", "--method", "ewc", "--lr_fast=2e-4", "--task=T2_math", "--dry_run",
        "--tasks", "T1_general,T2_math", "--lora_dropout", "0"])
    assert (args.method, args.task, args.dry_run) == ("ewc", "T2_math", True)
    assert (cfg.lora_r, cfg.lr_fast, cfg.tasks, cfg.lora_dropout) == (4, 2e-4, ("T1_general", "T2_math"), 0.0)
    assert not hasattr(args, "lora_r")
    args, cfg = parse_args_and_config(make_script_parser(), [], lora_r=2)
    assert (args.method, cfg.lora_r) == ("seq_lora", 2)


def test_parse_args_and_config_rejects_bad_config_keys_and_values():
    with pytest.raises(SystemExit) as e:
        parse_args_and_config(make_script_parser(), ["--method", "ewc", "--lora_rank", "4"])
    assert "--lora_rank" in e.value.code
    with pytest.raises(SystemExit) as e:  # a negative number still reaches the strict parser as a value
        parse_args_and_config(make_script_parser(), ["--lr_fast", "-1", "--method", "ewc"])
    assert "lr_fast must be a finite number >= 0, got -1" in e.value.code
    with pytest.raises(SystemExit) as e:
        parse_args_and_config(make_script_parser(), ["--lora_r", "abc"])
    assert "--lora_r" in e.value.code and "'abc'" in e.value.code
