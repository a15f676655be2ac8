"""Single-task DS-LoRA: the upper reference (no sequence, so nothing to forget).

Trains one fresh DS-LoRA (slow branch at lr_slow, fast branch at lr_fast) on one task, evaluating that task's
eval loss at the start, every quarter of training and at the end; with run_metrics, its bench scores at the
end (method "single", stage 1 in logs/seq_eval_metrics.jsonl), which is the reference R[i][i] of the
sequential methods should reach.

    python train_single_task.py --task T2_math
    python plot_loss.py single T2_math          # -> logs/single_T2_math_train_loss.png
Writes logs/single_{task}_train_loss.jsonl, logs/single_{task}_eval_loss.jsonl, checkpoints/single_task/{task}/.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from configs.base_config import KNOWN_TASKS, parse_args_and_config, print_config
from models.ds_lora import (fast_mode, get_ds_lora_param_groups, mark_only_lora_as_trainable,
                            print_trainable_parameters, replace_with_ds_lora, save_ds_lora, start_new_task)
from evaluation.stage import run_stage_metrics
from utils_dist import barrier, init_distributed, is_main, main_first
from utils_model import load_model_and_tokenizer
from utils_train import (JsonlLogger, Timer, accumulate_grads, apply_step, drop_log_rows, eval_loss, infinite_batches,
                         is_done, load_bench, load_knowledge, load_task_dataset, make_loader, make_optimizer,
                         make_scheduler, mark_done, set_seed, steps_per_stage)

METHOD = "single"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--task", required=True, choices=KNOWN_TASKS)
    parser.add_argument("--restart", action="store_true", help="train again even if a finished checkpoint exists")
    args, cfg = parse_args_and_config(parser, argv)
    if cfg.loss_tokens != "all":  # the upper reference is plain supervised training; its rows carry no suffix
        raise SystemExit(f"train_single_task.py trains the single-task reference on every response token; got "
                         f"--loss_tokens {cfg.loss_tokens} (a token-selective loss is for the sequential methods)")
    init_distributed(cfg.device)  # under torchrun: join the group (utils_dist.py); a plain run is world size 1
    task = args.task
    print_config(cfg, f"{METHOD} {task}")
    log_dir, ckpt = Path(cfg.log_dir), Path(cfg.save_dir) / "single_task" / task
    train_log, eval_log = log_dir / f"single_{task}_train_loss.jsonl", log_dir / f"single_{task}_eval_loss.jsonl"
    if is_done(ckpt) and not args.restart:
        print(f"[{METHOD}] {task} is already trained ({ckpt}); pass --restart to train again")
        return
    if is_main():
        shutil.rmtree(ckpt, ignore_errors=True)
        for path in (train_log, eval_log, log_dir / "seq_eval_metrics.jsonl", log_dir / "seq_drift.jsonl"):
            drop_log_rows(path, lambda r: r.get("method") == METHOD and r.get("stage_task", r.get("task")) == task)
    barrier()

    set_seed(cfg.seed)
    model, tok, device = load_model_and_tokenizer(cfg)
    replace_with_ds_lora(model, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                         cfg.num_frozen_layers, r_fast=cfg.r_fast)
    model.to(device)
    mark_only_lora_as_trainable(model)
    start_new_task(model, task, seed=cfg.seed + 1)
    print_trainable_parameters(model)
    pad = tok.pad_token_id
    train_ds = load_task_dataset(cfg, tok, task, cfg.train_split)
    eval_ds = load_task_dataset(cfg, tok, task, cfg.eval_split, cfg.eval_max_samples, cfg.eval_seed)
    slow_group, fast_group = get_ds_lora_param_groups(model, cfg.lr_slow, cfg.lr_fast, cfg.weight_decay)
    params = slow_group["params"] + fast_group["params"]
    opt = make_optimizer([slow_group, fast_group])
    total = steps_per_stage(cfg, len(train_ds))
    sched = make_scheduler(opt, total, cfg.warmup_ratio)
    batches = infinite_batches(make_loader(train_ds, cfg.per_device_batch_size, pad, shuffle=True, seed=cfg.seed + 1))
    logger, eval_logger = JsonlLogger(train_log), JsonlLogger(eval_log)
    eval_every = max(1, total // 4)
    timer = Timer()

    def evaluate(step):
        if not is_main():  # rank 0 alone evaluates under torchrun
            return barrier()
        with main_first():
            _evaluate(step)

    def _evaluate(step):
        loss, n = eval_loss(model, eval_ds, cfg, pad, device, desc=f"eval {task}")
        if loss is not None:
            eval_logger.log({"method": METHOD, "stage": 1, "task": task, "step": step, "split": cfg.eval_split,
                             "loss": round(loss, 6), "n": n})
            print(f"[{METHOD}] {task} step {step}: eval loss {loss:.4f} (n={n})")
        eval_logger.flush()

    print(f"[{METHOD}] {task}: {len(train_ds)} rows, {total} steps")
    evaluate(0)
    model.train()
    skipped_nan = skipped_empty = 0
    for step in (bar := tqdm(range(1, total + 1), desc=f"{METHOD} {task}")):
        st = accumulate_grads(model, batches, cfg, device)
        skipped_nan, skipped_empty = skipped_nan + st["skipped_nan"], skipped_empty + st["skipped_empty"]
        lr_slow, lr = sched.get_last_lr()  # the lrs this step uses (groups: slow, fast)
        grad_norm = apply_step(params, [opt], [sched], cfg.max_grad_norm) if st["micro"] else None
        if grad_norm is None:
            skipped_nan += st["micro"] > 0
            logger.log({"method": METHOD, "stage": 1, "task": task, "step": step, "split": "skip",
                        "skipped_nan": skipped_nan, "skipped_empty": skipped_empty})
            continue
        logger.log({"method": METHOD, "stage": 1, "task": task, "step": step, "split": "train",
                    "loss": round(st["loss"], 5), "lr": lr, "lr_slow": lr_slow,
                    "grad_norm": round(grad_norm, 4), "time_s": timer()})
        bar.set_postfix(loss=round(st["loss"], 4))
        if step % cfg.log_interval == 0:
            logger.flush()
        if step % eval_every == 0 or step == total:
            evaluate(step)
            model.train()
    logger.flush()

    save_ds_lora(model, ckpt)
    bench, knowledge = load_bench(cfg), load_knowledge(cfg)
    if bench is not None and task in bench and is_main():
        with fast_mode(model, "current"):
            run_stage_metrics(model, tok, cfg, METHOD, 1, task, total, device, {task: bench[task]},
                              fast_mode="current", knowledge={task: knowledge[task]} if task in knowledge else {})
    mark_done(ckpt, cfg, {"method": METHOD, "stage": 1, "task": task, "step": total, "skipped_nan": skipped_nan,
                          "skipped_empty": skipped_empty, "time_s": timer()})
    print(f"[{METHOD}] {task} done in {timer():.0f}s; adapters in {ckpt}")


if __name__ == "__main__":
    main()
