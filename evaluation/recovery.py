"""Recovery probe: how much of an old task's forgetting is spurious (Spurious Forgetting, ICLR 2025).

After the last stage, for each earlier task i: start from the final model, take `recovery_steps` optimizer steps on
`recovery_rows` rows of task i's training split, re-score task i, then put every adapter tensor back bit for bit
before the next task. Per task and score:

    recovered_share = (recovered - final) / (just_learned - final)

with just_learned = R[i][i] (right after task i's own stage) and final = R[T][i]. 1 means a few steps bring back
all that was lost (the loss was task alignment, not knowledge), 0 nothing; it leaves [0, 1] when the probe goes
past the just-learned score or makes things worse. The same formula serves a loss (lower is better) and an
accuracy, as it is a ratio of differences. It is None when |just_learned - final| < SHARE_TOL: with nothing
forgotten there is no share to recover.

Rows go to {log_dir}/seq_recovery.jsonl (split "recovery"), one per earlier task and score.

evaluation.* sits below utils_train in the import order (tests/test_imports.py), so the few-step loop below uses
torch directly, with the guards of utils_train.accumulate_grads / apply_step (skip unsupervised micro-batches and
non-finite losses, drop a step with a non-finite gradient, joint clipping).

    just, final = scores_from_logs(cfg.log_dir, method, cfg.tasks)
    recovery_probe(model, tok, cfg, device, method, cfg.tasks,
                   lambda: get_lora_param_groups(model, cfg.lr, cfg.weight_decay),
                   {"loss": lambda t: eval_loss(model, eval_sets[t], cfg, pad, device)[0]}, just, final)
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models.lora_simple import LORA_PREFIX
from utils_data import IGNORE_INDEX, InstructionDataset, collate_fn
from utils_forward import to_device, token_losses
from utils_io import append_jsonl, read_jsonl, write_jsonl

SHARE_TOL = 1e-6  # |just_learned - final| below this: nothing was forgotten, the share is undefined (None)
LOG_NAME = "seq_recovery.jsonl"


def recovered_share(just_learned: float | None, final: float | None, recovered: float | None,
                    tol: float = SHARE_TOL) -> float | None:
    """(recovered - final) / (just_learned - final); None when a score is missing or |just_learned - final| < tol."""
    if just_learned is None or final is None or recovered is None or abs(just_learned - final) < tol:
        return None
    return (recovered - final) / (just_learned - final)


def scores_from_logs(log_dir, method: str, tasks, metrics=("loss",)) -> tuple[dict, dict]:
    """(just_learned, final), each {metric: {task: score}}, of `method`'s earlier tasks from the stage logs: R[i][i]
    and R[T][i] in fast mode 'current' (the task-agnostic view; single-branch methods log no fast mode). "loss" comes
    from seq_eval_loss.jsonl, any other metric from seq_eval_metrics.jsonl. A cell that was not logged is left out
    (its share is None); the last row of a cell wins."""
    log_dir, tasks = Path(log_dir), list(tasks)
    stage_of = {t: i for i, t in enumerate(tasks, 1)}
    just = {m: {} for m in metrics}
    final = {m: {} for m in metrics}
    for metric in metrics:
        path = log_dir / ("seq_eval_loss.jsonl" if metric == "loss" else "seq_eval_metrics.jsonl")
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the recovery probe reads the stage scores of {method!r} "
                                    f"from it; run the stages (with --log_dir {log_dir}) first")
        for r in read_jsonl(path):
            task = r.get("eval_task")
            if (r.get("method") != method or r.get("fast_mode", "current") != "current" or task not in stage_of
                    or (metric != "loss" and r.get("metric") != metric)):
                continue
            value = r.get("loss") if metric == "loss" else r.get("value")
            if r.get("stage") == stage_of[task]:
                just[metric][task] = value
            if r.get("stage") == len(tasks):
                final[metric][task] = value
    return just, final


def recovery_dataset(cfg, tokenizer, task: str) -> InstructionDataset:
    """`recovery_rows` rows of `task`'s training split, a sample seeded by cfg.seed (the same rows for every method)."""
    path = cfg.task_path(task, cfg.train_split)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing: the recovery probe trains on {task}'s {cfg.train_split!r} split; "
                                f"build it (make data) or pass --recovery_probe false")
    ds = InstructionDataset(path, tokenizer, cfg, max_samples=cfg.recovery_rows, seed=cfg.seed, verbose=False)
    if len(ds) == 0:
        raise ValueError(f"{path}: no training row of {task} fits max_seq_len={cfg.max_seq_len}; the recovery probe "
                         f"needs at least one (rebuild the split or pass --recovery_probe false)")
    return ds


def _adapter_state(model, groups) -> dict[str, torch.Tensor]:
    """The live tensors the probe may change: every `lora_` parameter and buffer (DS-LoRA's banked fast weights are
    buffers) plus any other parameter in `groups`, by state-dict name."""
    trained = {id(p) for g in groups for p in g["params"]}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if LORA_PREFIX in k or id(v) in trained}


@torch.no_grad()
def _restore(model, groups, saved: dict[str, torch.Tensor]) -> None:
    live = _adapter_state(model, groups)
    if live.keys() != saved.keys():
        changed = sorted(live.keys() ^ saved.keys())
        raise RuntimeError(f"the model's adapter tensors changed during the recovery probe ({changed[:4]}); a score "
                           f"function must not add or remove adapter tensors (e.g. call start_new_task)")
    for k, v in live.items():
        v.copy_(saved[k])  # same dtype and shape: bit for bit


def _cycle(loader):
    while True:  # each pass reshuffles with the loader's own generator
        yield from loader


def _train(model, dataset, groups, cfg, device, pad_id: int, desc: str) -> int:
    """cfg.recovery_steps AdamW steps on `dataset` with a fresh optimizer, constant learning rates (those of `groups`),
    dropout on as in training and joint clipping at cfg.max_grad_norm. Returns the number of steps applied."""
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW([dict(g) for g in groups], betas=(0.9, 0.999), eps=1e-8)  # as utils_train.make_optimizer
    loader = DataLoader(dataset, batch_size=cfg.per_device_batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed),
                        collate_fn=partial(collate_fn, pad_token_id=pad_id))
    batches = _cycle(loader)
    model.train()
    applied = 0
    for _ in tqdm(range(cfg.recovery_steps), desc=desc, leave=False):
        micro = 0
        for _ in range(cfg.gradient_accumulation_steps):
            batch = to_device(next(batches), device)
            if not (batch["labels"][:, 1:] != IGNORE_INDEX).any():
                continue  # nothing supervised: the mean loss would be NaN
            losses, _ = token_losses(model, batch)  # (N,) per supervised token
            loss = losses.mean()
            if not torch.isfinite(loss):
                continue
            (loss / cfg.gradient_accumulation_steps).backward()
            micro += 1
        grads = [p.grad for p in params if p.grad is not None]
        if micro and grads and all(torch.isfinite(g).all() for g in grads):
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            applied += 1
        opt.zero_grad(set_to_none=True)
    return applied


def recovery_probe(model, tokenizer, cfg, device, method: str, tasks, param_groups_fn: Callable[[], list[dict]],
                   score_fns: dict[str, Callable[[str], float | None]], just_learned: dict, final: dict,
                   log_path=None) -> list[dict]:
    """Run the probe for every task but the last of `tasks` (the model is the final one) and log one row per task
    and score; return the rows. The model comes back bit for bit after each task, and its training flag, the
    parameters' gradients and torch's global random state as they were.

    param_groups_fn() -> AdamW groups of the parameters to train, each with its "lr" and "weight_decay" (a method's
    own: DS-LoRA its slow and active fast branch, single-branch LoRA its lora_ parameters); called once per task.
    score_fns: {metric: fn(task) -> score of the current model, or None}, e.g. {"loss": eval loss on the eval split}.
    just_learned, final: {metric: {task: score}} from the R matrix (scores_from_logs reads them from the logs)."""
    if cfg.recovery_rows <= 0 or cfg.recovery_steps <= 0:
        raise ValueError(f"the recovery probe needs recovery_rows > 0 and recovery_steps > 0, got {cfg.recovery_rows} "
                         f"and {cfg.recovery_steps}; set them (e.g. --recovery_rows 32 --recovery_steps 24) or pass "
                         f"--recovery_probe false")
    if not isinstance(score_fns, dict) or not score_fns:
        raise ValueError(f"score_fns must map metric names to fn(task) -> score, e.g. {{'loss': ...}}, "
                         f"got {score_fns!r}")
    tasks = list(tasks)
    if len(tasks) < 2:
        print(f"[recovery] {method}: one task ({tasks}), no earlier task to probe")
    log_path = Path(log_path) if log_path is not None else Path(cfg.log_dir) / LOG_NAME
    if log_path.exists():  # a re-run replaces this method's rows and keeps the others'
        write_jsonl(log_path, [r for r in read_jsonl(log_path) if r.get("method") != method])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = torch.device(device)
    devices = [torch.cuda.current_device() if dev.index is None else dev.index] if dev.type == "cuda" else []
    was_training = model.training
    out = []
    for task in tasks[:-1]:
        groups = list(param_groups_fn())
        saved = {k: v.detach().clone() for k, v in _adapter_state(model, groups).items()}
        grads = {id(p): p.grad for g in groups for p in g["params"]}  # put back afterwards, kept out of the probe
        data = recovery_dataset(cfg, tokenizer, task)
        try:
            for g in groups:
                for p in g["params"]:
                    p.grad = None
            with torch.random.fork_rng(devices=devices):  # the probe's dropout draws leave the caller's stream alone
                torch.manual_seed(cfg.seed)  # the same draws for every method and task
                steps = _train(model, data, groups, cfg, device, pad_id, desc=f"recovery {task}")
                model.eval()
                recovered = {m: fn(task) for m, fn in score_fns.items()}
        finally:
            _restore(model, groups, saved)
            for g in groups:
                for p in g["params"]:
                    p.grad = grads[id(p)]
            model.train(was_training)
        rows = []
        for metric, value in recovered.items():
            jl, fin = just_learned.get(metric, {}).get(task), final.get(metric, {}).get(task)
            rows.append({"method": method, "stage": len(tasks), "task": task, "eval_task": task,
                         "step": cfg.recovery_steps, "split": "recovery", "metric": metric, "just_learned": jl,
                         "final": fin, "recovered": value, "recovered_share": recovered_share(jl, fin, value),
                         "n_rows": len(data), "steps": steps})
            share = rows[-1]["recovered_share"]
            print(f"[recovery] {method} {task} {metric}: just learned {_fmt(jl)}, final {_fmt(fin)}, recovered "
                  f"{_fmt(value)} after {steps} steps on {len(data)} rows; share {_fmt(share, '.2f')}")
        append_jsonl(log_path, rows)
        out += rows
    return out


def _fmt(x, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)
