"""Training pieces shared by train_single_task.py, train_slsd_seq.py and train_seq_baselines.py.

Each script keeps its loop visible; what two scripts need lives here once: seeding, loaders, the loss on
supervised positions only, optimizers and schedules, NaN guards, the JSONL logger, checkpoints and resume,
and the per-stage evaluation every method shares.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from configs.base_config import ROUTED_MODES, config_to_dict, save_config
from evaluation.generation import load_bench_sets
from evaluation.stage import run_stage_metrics
from models.router import batch_prompts, dataset_prompts, get_routing, routing_prompts
from utils_dist import average_grads, barrier, is_main, main_first, shard, sync_step_stats, world_size
from utils_forward import autocast, supervised_logits, to_device, token_losses, trunk_cache  # noqa: F401  (re-exported)
from utils_data import IGNORE_INDEX, InstructionDataset, append_jsonl, atomic_write_text, collate_fn, read_jsonl, write_jsonl
from utils_tokens import SUFFIX_SEP, base_scores, method_suffix, select_loss_tokens


# ----------------------------------------------------------------------------- setup
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def make_loader(dataset, batch_size: int, pad_id: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g,
                      collate_fn=partial(collate_fn, pad_token_id=pad_id))


def load_task_dataset(cfg, tokenizer, task: str, split: str, max_samples: int = 0,
                      seed: int | None = None) -> InstructionDataset:
    """One task's split; a cap draws a sample seeded by `seed` (default cfg.seed). The training split must
    keep at least one row (an empty eval split is allowed: its loss is reported as None)."""
    path = cfg.task_path(task, split)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing: run `python prepare_datasets.py && python split_datasets.py` "
                                f"(or `make data`) first")
    ds = InstructionDataset(path, tokenizer, cfg, max_samples=max_samples, seed=seed)
    if len(ds) == 0 and split == cfg.train_split:  # else torch's sampler fails with a bare `num_samples=0`
        raise ValueError(f"{path}: no training rows for task {task} (split {split!r}): the file is empty or "
                         f"every row was dropped for not fitting max_seq_len={cfg.max_seq_len}; rebuild the split "
                         f"(split_datasets.py) or point --data_paths at a non-empty file")
    return ds


def steps_per_stage(cfg, n_rows: int, batch_rows: int | None = None) -> int:
    """Optimizer steps for one stage: num_epochs over the rows, capped by max_steps_per_task. A step takes
    batch_rows (default per_device_batch_size; fewer where replay_mode mix leaves places to replayed rows) x
    gradient_accumulation_steps of the stage's rows on each of the world_size() processes."""
    batch_rows = batch_rows or cfg.per_device_batch_size
    per_epoch = math.ceil(n_rows / (batch_rows * cfg.gradient_accumulation_steps * world_size()))
    steps = max(1, per_epoch * cfg.num_epochs)
    return min(steps, cfg.max_steps_per_task) if cfg.max_steps_per_task else steps


def infinite_batches(loader):
    """Cycle a (shuffling) loader forever; each pass reshuffles with the loader's own generator. Under torchrun
    every rank cycles the same order and keeps every world-th micro-batch from its rank on (utils_dist.shard).
    Each batch also carries "ids", its rows' sample ids (InstructionDataset.ids), which key cached per-row scores."""
    ids = getattr(loader.dataset, "ids", None)

    def cycle():
        while True:
            for batch in loader:
                yield batch if ids is None else {**batch, "ids": [ids[i] for i in batch["idx"].tolist()]}
    return shard(cycle())


def has_supervision(batch) -> bool:
    return bool((batch["labels"][:, 1:] != IGNORE_INDEX).any())


def all_finite_grads(params) -> bool:
    return all(p.grad is None or torch.isfinite(p.grad).all() for p in params)


def mean_token_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """The default objective: mean cross-entropy over the batch's supervised tokens."""
    losses, _ = token_losses(model, batch)
    return losses.mean(), {}


def accumulate_grads(model, batches, cfg, device, loss_fn=mean_token_loss) -> dict:
    """Forward/backward over `gradient_accumulation_steps` micro-batches drawn from `batches`.

    Guards from the design: a batch whose labels are all IGNORE_INDEX is skipped, a non-finite loss is
    skipped (never backpropagated); both are counted. `loss_fn(model, batch) -> (loss, extras)` lets a
    method change the objective (replay mixes in old rows). Returns {"loss", "micro", "skipped_nan",
    "skipped_empty", **mean extras}; micro == 0 means nothing was backpropagated.
    With cfg.loss_tokens key | low_ppl the unselected response tokens' labels become IGNORE_INDEX before loss_fn
    (utils_tokens.py; the rows a loss_fn adds itself, e.g. replayed ones, keep all theirs), and the result also has
    "kept_token_frac": kept / response tokens over the micro-batches backpropagated."""
    select = cfg.loss_tokens != "all"
    stats = {"loss": 0.0, "micro": 0, "skipped_nan": 0, "skipped_empty": 0}
    if select:
        stats |= {"tokens_kept": 0, "tokens_supervised": 0}
    extras: dict = {}
    for _ in range(cfg.gradient_accumulation_steps):
        batch = to_device(next(batches), device)
        if not has_supervision(batch):
            stats["skipped_empty"] += 1
            continue
        if select:  # one no-grad base-model pass over the rows not scored before, then the mask (every row keeps >= 1)
            batch, kept, supervised = select_loss_tokens(model, batch, cfg)
        with base_scores(model).training_forward(model) if select else contextlib.nullcontext():
            loss, extra = loss_fn(model, batch)  # with a selection: from the scoring pass's frozen trunk when it can
        if not torch.isfinite(loss):
            stats["skipped_nan"] += 1
            continue
        (loss / cfg.gradient_accumulation_steps).backward()
        stats["loss"] += float(loss.detach())
        stats["micro"] += 1
        if select:
            stats["tokens_kept"] += kept
            stats["tokens_supervised"] += supervised
        for k, v in extra.items():
            extras[k] = extras.get(k, 0.0) + float(v)
    if world_size() > 1:  # the step's loss over every rank's micro-batches, and whether any rank has one
        stats, extras = sync_step_stats(stats, extras)
    if stats["micro"]:
        stats["loss"] /= stats["micro"]
        stats.update({k: v / stats["micro"] for k, v in extras.items()})
    if select:
        kept, supervised = stats.pop("tokens_kept"), stats.pop("tokens_supervised")
        if supervised:
            stats["kept_token_frac"] = kept / supervised
    return stats


def kept_tokens_field(stats: dict) -> dict:
    """{"kept_token_frac": ...} for a train log row when the step selected loss tokens, else {}."""
    return {"kept_token_frac": round(stats["kept_token_frac"], 4)} if "kept_token_frac" in stats else {}


def apply_step(params, optimizers, schedulers, max_grad_norm: float) -> float | None:
    """Clip and step when every gradient is finite; otherwise drop the gradients. Returns the gradient norm,
    or None when the step was skipped (the caller counts and logs it). Gradients are always zeroed. Under torchrun
    the gradients are first averaged over ranks (utils_dist.average_grads), so every rank takes the same step."""
    average_grads(params)
    ok = all_finite_grads(params)
    grad_norm = clip_grads(params, max_grad_norm) if ok else None
    if ok:
        for opt in optimizers:
            opt.step()
        for sched in schedulers:
            sched.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return grad_norm


# ----------------------------------------------------------------------------- optimizers and schedule
def make_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    groups = [{k: v for k, v in g.items()} for g in groups]
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


def make_scheduler(opt, total_steps: int, warmup_ratio: float):
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def clip_grads(params, max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.norm(torch.stack([p.grad.norm() for p in params])))


# ----------------------------------------------------------------------------- logging
class JsonlLogger:
    """Buffered JSONL logger: every record carries method, stage, task, step, split; `flush()` appends the
    buffered lines whole (atomic rewrite), so an interrupted run never leaves half a line."""

    REQUIRED = ("method", "stage", "task", "step", "split")

    def __init__(self, path):
        self.path = Path(path)
        self.buffer: list[dict] = []

    def log(self, record: dict) -> None:
        missing = [k for k in self.REQUIRED if k not in record]
        if missing:
            raise ValueError(f"log record for {self.path} lacks {missing}: {record}")
        self.buffer.append(record)

    def flush(self) -> None:
        if self.buffer:
            append_jsonl(self.path, self.buffer)
            self.buffer = []


def drop_log_rows(path, predicate) -> int:
    """Remove rows matching `predicate` (e.g. this method's rows from an unfinished stage), atomically.
    This is how a resumed or re-run method replaces its own rows without touching other methods'."""
    path = Path(path)
    if not path.exists():
        return 0
    rows = read_jsonl(path)
    keep = [r for r in rows if not predicate(r)]
    if len(keep) != len(rows):
        write_jsonl(path, keep)
    return len(rows) - len(keep)


# ----------------------------------------------------------------------------- checkpoints and resume
DONE = "done.json"
RESERVED_NAMES = ("single", "single_task", "base")  # names the scripts or the logs already use for something else
METHOD_NAMES = ("ds_lora_slsd", "ds_lora", "seq_lora", "replay", "ewc", "inscl", "ilora", "olora",
                "replay_mix", "inscl_mix", "ilora_mix")  # the default method names of the scripts


def check_run_name(name: str, default: str) -> str:
    """The method name for logs and checkpoint folders: `name` (a --run_name) or the script's `default`.
    Letters, digits, '_' and '-' only, and never another method's default name (its rows would mix with ours)."""
    if name is None:
        return default
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) or name in RESERVED_NAMES:
        raise SystemExit(f"--run_name {name!r} cannot name a method: use letters, digits, '_' and '-' (e.g. "
                         f"seq_lora_r16), not one of {RESERVED_NAMES}")
    if name in METHOD_NAMES and name != default:
        raise SystemExit(f"--run_name {name!r} is the name of another method's runs (this one is {default}); "
                         f"pick a new name, e.g. {default}_r16")
    return name


def method_name(cfg, name: str | None, default: str) -> str:
    """The method name a run logs and saves under: check_run_name(name, default) plus the suffix of a token-selective
    loss (`seq_lora+key`, `ds_lora_slsd+low_ppl`), so runs with and without it keep apart. The one place it is built."""
    return check_run_name(name, default) + method_suffix(cfg)


def check_method_suffix(cfg, method: str) -> None:
    """Refuse a method name whose suffix does not match cfg.loss_tokens (its checkpoints and rows would mix with
    another selection's)."""
    base, sep, tail = method.partition(SUFFIX_SEP)
    if sep + tail != method_suffix(cfg):
        raise SystemExit(f"method name {method!r} does not match --loss_tokens {cfg.loss_tokens}: such runs are "
                         f"named {base}{method_suffix(cfg)}; build the name with utils_train.method_name(cfg, "
                         f"run_name, default)")


def stage_dir(cfg, method: str, stage: int, task: str) -> Path:
    check_method_suffix(cfg, method)
    return Path(cfg.save_dir) / method / f"seq_{stage}_{task}"


def mark_done(ckpt: Path, cfg, info: dict) -> None:
    """Written last: a checkpoint folder without done.json is an unfinished stage."""
    save_config(cfg, ckpt, extra={k: v for k, v in info.items() if k in ("method", "stage", "task")})
    atomic_write_text(ckpt / DONE, json.dumps(info, indent=2) + "\n")


def is_done(ckpt: Path) -> bool:
    return (ckpt / DONE).exists()


def read_done(ckpt: Path) -> dict:
    return json.loads((ckpt / DONE).read_text())


# evaluation-only settings; the router's also are (its features are saved per stage, and a checkpoint built at another
# router_layer is refused when it is loaded)
RESUME_KEYS_IGNORED = {"log_dir", "save_dir", "log_interval", "eval_fast_modes", "final_fast_modes",
                       "metric_fast_modes", "router_layer", "router_rows_per_task", "router_shrinkage",
                       "router_fallback_quantile", "router_temperature", "router_topk", "run_metrics",
                       "gen_rows_per_task", "knowledge_rows_per_task", "knowledge_distractors", "knowledge_max_tokens",
                       "eval_grid",
                       "drift_first_tokens", "recovery_probe", "recovery_rows", "recovery_steps",
                       "drift_num_probes", "eval_max_samples", "eval_seed", "eval_batch_size",
                       "max_new_tokens", "device", "allow_unconfined_code", "bench_metrics", "probe_kl_log",
                       "trunk_cache_mb", "knowledge_batch_tokens"}


def check_resume_config(ckpt: Path, cfg) -> None:
    """Refuse to resume from a stage trained with a different recipe (it would silently mix runs)."""
    saved = json.loads((ckpt / "config.json").read_text())
    now = config_to_dict(cfg)
    diff = [k for k in now if k not in RESUME_KEYS_IGNORED and k in saved and saved[k] != now[k]]
    if diff:
        raise SystemExit(f"{ckpt} was trained with a different config ({', '.join(diff)}); "
                         f"pass --restart to train this method afresh, or --run_name NAME (or --save_dir and "
                         f"--log_dir) to keep both")


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def eval_loss(model, dataset, cfg, pad_id: int, device, desc: str = "eval") -> tuple[float | None, int]:
    """Token-weighted mean loss over `dataset` (None when empty: never logged as 0). Returns (loss, n_samples).
    In a routed DS-LoRA view each row is routed on its prompt alone (routing_prompts)."""
    if len(dataset) == 0:
        print(f"[eval] {desc}: the evaluation set is empty ({dataset.path}); no loss reported")
        return None, 0
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    loader = make_loader(dataset, cfg.eval_batch_size, pad_id)
    for batch in tqdm(loader, desc=desc, leave=False):
        batch = to_device(batch, device)
        if not has_supervision(batch):
            continue
        with routing_prompts(model, batch_prompts(batch)):
            losses, _ = token_losses(model, batch)
        total += float(losses.sum())
        count += losses.numel()
    model.train(was_training)
    return (total / count if count else None), len(dataset)


# Stage 0 is the untouched base model for every method (LoRA B = 0 adds exactly zero), so its rows are computed
# once per log folder and reused by the next method with the same model, data and evaluation settings.
BASE_CACHE = "base_stage_cache.json"
BASE_KEY_FIELDS = ("model_name", "tasks", "data_dir", "full_dir", "use_toy_data", "eval_split", "eval_max_samples",
                   "eval_batch_size", "max_seq_len", "prompt_format", "run_metrics", "bench_metrics", "gen_rows_per_task",
                   "knowledge_rows_per_task", "knowledge_distractors", "knowledge_max_tokens", "bf16_autocast",
                   "drift_first_tokens",
                   "max_new_tokens", "drift_num_probes", "eval_seed", "device")


def base_stage_key(cfg) -> str:
    """What stage-0 results depend on: the evaluation settings plus size and mtime of the model and eval files."""
    import hashlib
    files = [Path(cfg.task_path(t, split)) for t in cfg.tasks for split in (cfg.eval_split, "bench")]
    model_dir = Path(cfg.model_name)
    if model_dir.is_dir():
        files += sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    fields = {k: getattr(cfg, k) for k in BASE_KEY_FIELDS}
    return hashlib.sha256(json.dumps([fields, stats], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reuse_base_stage(cfg, method: str, modes, is_ds: bool) -> bool:
    """Log another method's stage-0 rows as `method`'s when the cache key matches; True if it did."""
    log_dir = Path(cfg.log_dir)
    path = log_dir / BASE_CACHE
    entry = json.loads(path.read_text()).get(base_stage_key(cfg)) if path.exists() else None
    if entry is None:
        return False
    head = {"method": method}
    loss = [{**r, **head, **({"fast_mode": m} if m else {})} for r in entry["loss"] for m in modes]
    append_jsonl(log_dir / "seq_eval_loss.jsonl", loss)
    tags = [{"fast_mode": m} for m in cfg.metric_fast_modes] if is_ds else [{}]  # the base is the same in every view
    for name in ("seq_eval_metrics.jsonl", "seq_drift.jsonl"):
        if entry.get(name):
            append_jsonl(log_dir / name, [{**r, **head, **tag} for tag in tags for r in entry[name]])
    for suffix in ("", "_knowledge"):  # the generated replies and the knowledge items of the base model
        src = log_dir / "generations" / f"{entry['method']}_stage0_base{suffix}.jsonl"
        if src.exists():
            write_jsonl(log_dir / "generations" / f"{method}_stage0_base{suffix}.jsonl", read_jsonl(src))
    print(f"[eval] {method} stage 0 (base): reused {entry['method']}'s base-model rows from {path} "
          f"(same model, data and evaluation settings; delete the file to recompute)")
    return True


def _store_base_stage(cfg, method: str, loss_rows: list[dict], metric_rows: list[dict]) -> None:
    path = Path(cfg.log_dir) / BASE_CACHE
    cache = json.loads(path.read_text()) if path.exists() else {}
    strip = lambda r: {k: v for k, v in r.items() if k not in ("method", "fast_mode")}  # noqa: E731
    loss = [strip(r) for r in loss_rows if r.get("fast_mode") in (None, "current")]
    first = metric_rows[0].get("fast_mode") if metric_rows else None  # every view of the base is the same: keep one
    metric_rows = [r for r in metric_rows if r.get("fast_mode") == first]
    cache[base_stage_key(cfg)] = {
        "method": method, "loss": loss,
        "seq_eval_metrics.jsonl": [strip(r) for r in metric_rows if r.get("split") != "drift"],
        "seq_drift.jsonl": [strip(r) for r in metric_rows if r.get("split") == "drift"]}
    atomic_write_text(path, json.dumps(cache, indent=1) + "\n")


def scored_tasks(cfg, stage: int) -> list[str]:
    """The tasks whose generated and knowledge scores are computed after `stage` (the loss is on every task).

    eval_grid "full": all. "needed": the cells AP, BWT, FWT and forgetting read (0-indexed task i is learned at
    stage i+1): the base model and the last stage on every task; in between, the task just learned (its
    diagonal cell, for BWT) and the next one (the stage before it is learned, for FWT). Forgetting then takes
    its maximum over the stages evaluated (base, the stage before, right after)."""
    T = len(cfg.tasks)
    if cfg.eval_grid == "full" or stage in (0, T):
        return list(cfg.tasks)
    return list(cfg.tasks[stage - 1:stage + 1])


def run_stage_eval(model, tokenizer, cfg, method: str, stage: int, stage_task: str, step: int, device,
                   eval_sets: dict, fast_mode_ctx=None, bench=None, knowledge=None) -> list[dict]:
    """Eval loss of every task (seen and unseen) after `stage`, plus the generation metrics when enabled, on
    the tasks `scored_tasks` names (`bench`: {task: rows}, `knowledge`: {task: items}).

    `fast_mode_ctx(mode, task)` (DS-LoRA methods) returns a context manager selecting which fast weights
    are active; each mode in cfg.eval_fast_modes (plus cfg.final_fast_modes after the last stage) is
    evaluated and logged with a `fast_mode` field, and the generated metrics in each of cfg.metric_fast_modes.
    Rows go to logs/seq_eval_loss.jsonl (and seq_eval_metrics.jsonl / seq_drift.jsonl via evaluation.stage); when a
    routed view is evaluated after a trained stage, the router's decisions on every eval row go to seq_router.jsonl.
    The frozen layers below the first adapter run once per eval batch per run (utils_forward.TrunkCache)."""
    modes = (None,)
    if fast_mode_ctx is not None:
        last = stage == len(cfg.tasks)
        modes = tuple(dict.fromkeys(tuple(cfg.eval_fast_modes) + (tuple(cfg.final_fast_modes) if last else ())))
    if not is_main():  # under torchrun rank 0 alone evaluates; the others wait for it
        barrier()
        return []
    with main_first():
        if stage == 0 and _reuse_base_stage(cfg, method, modes, fast_mode_ctx is not None):
            return []
        return _cached_stage_eval(model, tokenizer, cfg, method, stage, stage_task, step, device, eval_sets,
                                  fast_mode_ctx, bench, knowledge, modes)


def _cached_stage_eval(model, tokenizer, cfg, method, stage, stage_task, step, device, eval_sets, fast_mode_ctx, bench,
                       knowledge, modes) -> list[dict]:
    with trunk_cache(model, cfg):  # the frozen layers below the adapters run once per eval batch, not per stage
        return _run_stage_eval(model, tokenizer, cfg, method, stage, stage_task, step, device, eval_sets,
                               fast_mode_ctx, bench, knowledge, modes)


def _run_stage_eval(model, tokenizer, cfg, method, stage, stage_task, step, device, eval_sets, fast_mode_ctx, bench,
                    knowledge, modes) -> list[dict]:
    log_dir = Path(cfg.log_dir)
    rows = []
    for mode in modes:
        for task, ds in eval_sets.items():
            ctx = fast_mode_ctx(mode, task) if mode else _null_ctx()
            with ctx:
                loss, n = eval_loss(model, ds, cfg, tokenizer.pad_token_id, device, desc=f"eval {task}")
            if loss is None:
                continue
            row = {"method": method, "stage": stage, "stage_task": stage_task, "eval_task": task, "task": task,
                   "step": step, "split": cfg.eval_split, "loss": round(loss, 6), "n": n}
            if mode:
                row["fast_mode"] = mode
            rows.append(row)
    append_jsonl(log_dir / "seq_eval_loss.jsonl", rows)
    cur = {r["eval_task"]: r["loss"] for r in rows if r.get("fast_mode", "current") == "current"}
    print(f"[eval] {method} stage {stage} ({stage_task}): " + "  ".join(f"{t}={v:.3f}" for t, v in cur.items()))
    if stage > 0 and set(modes) & set(ROUTED_MODES):
        log_router_rows(model, cfg, method, stage, stage_task, step, eval_sets)
    metric_rows = []
    if cfg.run_metrics and bench is not None:
        keep = scored_tasks(cfg, stage)
        for mode in cfg.metric_fast_modes if fast_mode_ctx is not None else (None,):
            with fast_mode_ctx(mode, None) if mode else _null_ctx():
                metric_rows += run_stage_metrics(model, tokenizer, cfg, method, stage, stage_task, step, device,
                                                 {t: r for t, r in bench.items() if t in keep}, fast_mode=mode,
                                                 knowledge={t: k for t, k in (knowledge or {}).items() if t in keep})
    if stage == 0:
        _store_base_stage(cfg, method, rows, metric_rows)
    return rows


def log_router_rows(model, cfg, method: str, stage: int, stage_task: str, step: int, eval_sets: dict) -> list[dict]:
    """Where `routed` sends each task's eval rows after `stage`: one row per task in logs/seq_router.jsonl with
    {"method", "stage", "eval_task", "n", "accuracy", "routed_to": {task or "none": count}}. Correct = the branch
    own_task would use: the task's own if it has been learned, the slow branch alone ("none") if not."""
    routing = get_routing(model)
    if routing is None:
        raise RuntimeError("a routed fast mode was evaluated but the model has no task router attached")
    rows = []
    for task, ds in eval_sets.items():
        decisions = routing.decide(dataset_prompts(ds))
        if not decisions:
            continue
        expected = task if task in routing.router.tasks else None
        counts = {name: sum(1 for d in decisions if d == name) for name in routing.router.tasks + [None]}
        rows.append({"method": method, "stage": stage, "stage_task": stage_task, "eval_task": task, "task": task,
                     "step": step, "split": cfg.eval_split, "n": len(decisions), "seen": expected is not None,
                     "accuracy": round(sum(d == expected for d in decisions) / len(decisions), 6),
                     "routed_to": {name or "none": c for name, c in counts.items() if c}})
    append_jsonl(Path(cfg.log_dir) / "seq_router.jsonl", rows)
    print(f"[router] {method} stage {stage}: accuracy " + "  ".join(f"{r['eval_task']}={r['accuracy']:.2f}"
                                                                     for r in rows))
    return rows


class _null_ctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def forget_method_rows(cfg, method: str, from_stage: int, train_logs: list[Path]) -> None:
    """Before (re)running stages >= from_stage of `method`, drop its rows for those stages from every log,
    so a resumed run appends each row exactly once."""
    pred = lambda r: r.get("method") == method and int(r.get("stage", -1)) >= from_stage  # noqa: E731
    log_dir = Path(cfg.log_dir)
    for path in [*train_logs, log_dir / "seq_eval_loss.jsonl", log_dir / "seq_eval_metrics.jsonl",
                 log_dir / "seq_drift.jsonl", log_dir / "seq_recovery.jsonl", log_dir / "seq_router.jsonl"]:
        drop_log_rows(path, pred)


def load_eval_sets(cfg, tokenizer) -> dict:
    return {t: load_task_dataset(cfg, tokenizer, t, cfg.eval_split, cfg.eval_max_samples, cfg.eval_seed)
            for t in cfg.tasks}


def load_bench(cfg) -> dict | None:
    """Bench rows per task for the generation metrics (None when metrics are off; {} when only drift is scored)."""
    if not cfg.run_metrics:
        return None
    return load_bench_sets(cfg) if cfg.bench_metrics else {}


def run_recovery(model, tokenizer, cfg, method: str, device, eval_sets: dict, knowledge: dict, param_groups_fn,
                 view=None) -> list[dict]:
    """The recovery probe after the last stage (cfg.recovery_probe; evaluation.recovery): for each earlier task a
    few steps on a few of its rows, re-scored on eval loss and, when scored, knowledge; the weights are restored
    after each task. `view` (DS-LoRA) is the fast-weight context the probe trains and scores in."""
    from evaluation.knowledge import knowledge_summary, score_knowledge
    from evaluation.recovery import recovery_probe, scores_from_logs
    pad = tokenizer.pad_token_id
    scores = {"loss": lambda t: eval_loss(model, eval_sets[t], cfg, pad, device, desc=f"recovery {t}")[0]}
    if knowledge:
        def knowledge_score(t):
            if not knowledge.get(t):
                return None
            with autocast(model):
                return knowledge_summary(score_knowledge(model, tokenizer, cfg, device, knowledge[t]))["value"]
        scores["knowledge"] = knowledge_score
    just, final = scores_from_logs(cfg.log_dir, method, cfg.tasks, metrics=tuple(scores))
    with view if view is not None else _null_ctx():
        return recovery_probe(model, tokenizer, cfg, device, method, cfg.tasks, param_groups_fn, scores, just, final)


def needs_recovery(cfg, method: str) -> bool:
    """cfg.recovery_probe is on and `method` has no recovery rows yet (a finished run can add them later)."""
    path = Path(cfg.log_dir) / "seq_recovery.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    return bool(cfg.recovery_probe) and not any(r.get("method") == method for r in rows)


def load_knowledge(cfg) -> dict:
    """Knowledge items per task (evaluation.knowledge); {} when metrics, bench metrics or the score are off."""
    if not (cfg.run_metrics and cfg.bench_metrics and cfg.knowledge_rows_per_task):
        return {}
    from evaluation.knowledge import load_knowledge_sets
    return load_knowledge_sets(cfg)


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self) -> float:
        return round(time.time() - self.t0, 2)
