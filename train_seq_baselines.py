"""Sequential single-branch LoRA baselines: seq_lora, replay, ewc, inscl.

One LoRA adapter (models/lora_simple.py) is trained through cfg.tasks in order, on the same data, steps and
evaluation as train_slsd_seq.py. Each method is two visible hooks around the same loop:
  * seq_lora: nothing; plain sequential fine-tuning, the forgetting reference.
  * replay:   end_of_task() refills a buffer of `replay_buffer_size` training rows split evenly over the
              tasks seen so far (seeded); every step a replay batch (half the batch size) is mixed into the
              forward pass and its mean loss is weighted by `replay_lambda`.
  * ewc:      end_of_task() estimates the diagonal empirical Fisher of the LoRA parameters in a separate
              pass in eval mode (mean of squared gradients over `ewc_fisher_batches` batches, divided by the
              true count) and stores theta*; penalty() = 0.5 * ewc_lambda * sum_t sum F_t (theta - theta*_t)^2,
              logged every step so a silent zero shows.
  * inscl:    replay whose buffer for task t is rebuilt at its start (inscl.InsCLReplay.start_of_task): the budget
              split over earlier tasks in proportion to the Wasserstein distance of their instruction embeddings
              from task t's, rows drawn within a task with probability rising with InsInfo (logged as split "inscl").

    python train_seq_baselines.py --method seq_lora
    python train_seq_baselines.py --method ewc --ewc_lambda 5000
    python train_seq_baselines.py --method seq_lora --lora_r 16 --lora_alpha 32 --run_name seq_lora_r16
Logs: logs/seq_{method}_{task}_train_loss.jsonl, logs/seq_eval_loss.jsonl (+ metrics); adapters:
checkpoints/{method}/seq_{stage}_{task}/, where {method} is --run_name when given (so an r=16 run keeps its
own rows and checkpoints beside the r=8 one). Resumes after the last finished stage; --restart trains afresh.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from configs.base_config import parse_args_and_config, print_config, save_config
from models.lora_simple import (atomic_save_safetensors, get_lora_param_groups, load_lora, mark_only_lora_as_trainable,
                                print_trainable_parameters, replace_with_lora, save_lora)
from utils_dist import barrier, init_distributed, is_main
from utils_model import load_model_and_tokenizer
from utils_replay import Replay
from utils_train import (JsonlLogger, Timer, accumulate_grads, apply_step, check_resume_config, check_run_name,
                         forget_method_rows, infinite_batches, is_done, load_bench, load_eval_sets, load_knowledge,
                         load_task_dataset, make_loader, make_optimizer, make_scheduler, mark_done, mean_token_loss,
                         needs_recovery, read_done, run_recovery, run_stage_eval, set_seed, stage_dir, steps_per_stage,
                         to_device, token_losses)

METHODS = ("seq_lora", "replay", "ewc", "inscl")


class EWC:
    """Diagonal-Fisher EWC over the LoRA parameters, accumulated over past tasks."""

    def __init__(self, params: dict[str, torch.nn.Parameter], cfg):
        self.params, self.cfg = params, cfg
        self.fishers: list[dict] = []  # one {name: F} per past task
        self.anchors: list[dict] = []  # one {name: theta*} per past task

    def end_of_task(self, model, dataset, device, pad_id: int, seed: int) -> dict:
        """A separate pass after the task, in eval mode: F = mean over batches of grad^2 (true count)."""
        was_training = model.training
        model.eval()
        fisher = {n: torch.zeros_like(p) for n, p in self.params.items()}
        count = 0
        loader = make_loader(dataset, self.cfg.per_device_batch_size, pad_id, shuffle=True, seed=seed)
        for batch in loader:
            if count >= self.cfg.ewc_fisher_batches:
                break
            batch = to_device(batch, device)
            model.zero_grad(set_to_none=True)
            loss, _ = mean_token_loss(model, batch)
            if not torch.isfinite(loss):
                continue
            loss.backward()
            for n, p in self.params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2
            count += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        if count == 0:
            raise RuntimeError("EWC Fisher pass saw no usable batch; check the training split")
        fisher = {n: f / count for n, f in fisher.items()}
        self.fishers.append(fisher)
        self.anchors.append({n: p.detach().clone() for n, p in self.params.items()})
        return {"fisher_batches": count, "fisher_mean": float(torch.cat([f.flatten() for f in fisher.values()]).mean())}

    def penalty(self) -> torch.Tensor:
        total = next(iter(self.params.values())).new_zeros(())
        for fisher, anchor in zip(self.fishers, self.anchors):
            for n, p in self.params.items():
                total = total + (fisher[n] * (p - anchor[n]) ** 2).sum()
        return 0.5 * self.cfg.ewc_lambda * total

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for t, (fisher, anchor) in enumerate(zip(self.fishers, self.anchors)):
            out |= {f"fisher.{t}.{n}": v for n, v in fisher.items()} | {f"anchor.{t}.{n}": v for n, v in anchor.items()}
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], device) -> None:
        n_tasks = len({k.split(".")[1] for k in tensors})
        self.fishers = [{n: tensors[f"fisher.{t}.{n}"].to(device) for n in self.params} for t in range(n_tasks)]
        self.anchors = [{n: tensors[f"anchor.{t}.{n}"].to(device) for n in self.params} for t in range(n_tasks)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--restart", action="store_true", help="delete this method's checkpoints and log rows first")
    parser.add_argument("--run_name", default=None,
                        help="method name in logs and checkpoints (default: --method); e.g. seq_lora_r16 for a "
                             "capacity-matched run beside the r=8 one")
    args, cfg = parse_args_and_config(parser, argv)
    init_distributed(cfg.device)  # under torchrun: join the group (utils_dist.py); a plain run is world size 1
    method = check_run_name(args.run_name, args.method)
    print_config(cfg, method)
    log_dir = Path(cfg.log_dir)
    train_logs = [log_dir / f"seq_{method}_{t}_train_loss.jsonl" for t in cfg.tasks]
    if args.restart:
        if is_main():
            shutil.rmtree(Path(cfg.save_dir) / method, ignore_errors=True)
            forget_method_rows(cfg, method, 0, train_logs)
        barrier()
    set_seed(cfg.seed)
    model, tok, device = load_model_and_tokenizer(cfg)
    names = replace_with_lora(model, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                              cfg.num_frozen_layers)
    model.to(device)
    mark_only_lora_as_trainable(model)
    print(f"[{method}] LoRA on {len(names)} modules ({names[0]} ... {names[-1]})")
    print_trainable_parameters(model)
    pad = tok.pad_token_id
    lora_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if args.method == "inscl":  # Replay with InsCL's distance-weighted budget and InsInfo sampling (inscl.py)
        from inscl import InsCLReplay
        replay = InsCLReplay(cfg, tok, pad, model)
    else:
        replay = Replay(cfg, tok, pad) if args.method == "replay" else None
    ewc = EWC(lora_params, cfg) if args.method == "ewc" else None
    eval_sets = load_eval_sets(cfg, tok)
    bench, knowledge = load_bench(cfg), load_knowledge(cfg)

    stages = list(enumerate(cfg.tasks, 1))
    first_todo = next((s for s, t in stages if not is_done(stage_dir(cfg, method, s, t))), None)
    recovery = lambda: run_recovery(  # noqa: E731  (every method recovers with plain CE on its LoRA weights)
        model, tok, cfg, method, device, eval_sets, knowledge,
        param_groups_fn=lambda: get_lora_param_groups(model, cfg.lr, cfg.weight_decay))
    if first_todo is None:
        last = stage_dir(cfg, method, len(stages), cfg.tasks[-1])
        check_resume_config(last, cfg)
        print(f"[{method}] all {len(stages)} stages are done; pass --restart to train again")
        if needs_recovery(cfg, method):
            load_lora(model, last / "adapter.safetensors")
            recovery()
        return
    global_step = 0
    if first_todo == 1:
        forget_method_rows(cfg, method, 0, train_logs)
        run_stage_eval(model, tok, cfg, method, 0, "base", 0, device, eval_sets, None, bench, knowledge)
    else:
        prev = stage_dir(cfg, method, first_todo - 1, cfg.tasks[first_todo - 2])
        check_resume_config(prev, cfg)
        load_lora(model, prev / "adapter.safetensors")
        global_step = read_done(prev)["step"]
        if replay:
            replay.end_of_task(list(cfg.tasks[:first_todo - 1]))  # deterministic: the same buffer as before
        if ewc:
            ewc.load_state(load_file(prev / "ewc_state.safetensors"), device)
        print(f"[{method}] resuming after stage {first_todo - 1} ({prev})")

    save_config(cfg, log_dir, name=f"config_{method}.json", extra={"method": method})  # the recipe of these logs
    timer = Timer()
    for stage, task in stages[first_todo - 1:]:
        forget_method_rows(cfg, method, stage, train_logs)
        set_seed(cfg.seed + stage)
        train_ds = load_task_dataset(cfg, tok, task, cfg.train_split)
        params = list(lora_params.values())
        opt = make_optimizer(get_lora_param_groups(model, cfg.lr, cfg.weight_decay))
        total = steps_per_stage(cfg, len(train_ds))
        sched = make_scheduler(opt, total, cfg.warmup_ratio)
        batches = infinite_batches(make_loader(train_ds, cfg.per_device_batch_size, pad, shuffle=True,
                                               seed=cfg.seed + stage))
        loss_fn = replay.loss_fn if replay else mean_token_loss
        logger = JsonlLogger(log_dir / f"seq_{method}_{task}_train_loss.jsonl")
        if args.method == "inscl":  # the buffer for this task: distances to the earlier tasks, allocation, InsInfo
            info = replay.start_of_task(task, list(cfg.tasks[:stage - 1]))
            logger.log({"method": method, "stage": stage, "task": task, "step": global_step, "split": "inscl", **info})
        print(f"[{method}] stage {stage}/{len(stages)} {task}: {len(train_ds)} rows, {total} steps")

        model.train()
        skipped_nan = skipped_empty = 0
        for step in (bar := tqdm_range(total, f"{method} {task}")):
            st = accumulate_grads(model, batches, cfg, device, loss_fn)
            skipped_nan, skipped_empty = skipped_nan + st["skipped_nan"], skipped_empty + st["skipped_empty"]
            penalty = None
            if ewc and ewc.fishers and st["micro"]:
                penalty = ewc.penalty()  # added to the objective before the step
                penalty.backward()
            lr = sched.get_last_lr()[0]  # the lr this step uses
            grad_norm = apply_step(params, [opt], [sched], cfg.max_grad_norm) if st["micro"] else None
            if grad_norm is None:
                skipped_nan += st["micro"] > 0
                logger.log({"method": method, "stage": stage, "task": task, "step": global_step, "split": "skip",
                            "skipped_nan": skipped_nan, "skipped_empty": skipped_empty})
                continue
            global_step += 1
            rec = {"method": method, "stage": stage, "task": task, "step": global_step, "stage_step": step + 1,
                   "split": "train", "loss": round(st.get("task_loss", st["loss"]), 5), "lr": lr,
                   "grad_norm": round(grad_norm, 4), "time_s": timer()}
            if ewc:
                rec["ewc_penalty"] = float(penalty.detach()) if penalty is not None else 0.0
            if "replay_loss" in st:  # "loss" stays the current task's, comparable across methods
                rec["replay_loss"], rec["objective"] = round(st["replay_loss"], 5), round(st["loss"], 5)
            logger.log(rec)
            bar.set_postfix(loss=rec["loss"])
            if global_step % cfg.log_interval == 0:
                print(f"[{method}] {task} step {step + 1}/{total} loss {rec['loss']:.4f}"
                      + (f" ewc {rec['ewc_penalty']:.3g}" if ewc else "") + f" ({timer():.0f}s)")
                logger.flush()
        if skipped_nan or skipped_empty:
            print(f"[{method}] {task}: skipped {skipped_nan} non-finite and {skipped_empty} unsupervised batches")

        # end_of_task hooks, then save (adapter, plus EWC's Fisher/anchors so a resume can go on)
        if replay:
            replay.end_of_task(list(cfg.tasks[:stage]))
        ckpt = stage_dir(cfg, method, stage, task)
        if ewc:
            info = ewc.end_of_task(model, train_ds, device, pad, seed=cfg.seed + stage)
            logger.log({"method": method, "stage": stage, "task": task, "step": global_step, "split": "fisher", **info})
            print(f"[ewc] {task}: Fisher over {info['fisher_batches']} batches, mean {info['fisher_mean']:.3g}")
            atomic_save_safetensors(ewc.state(), str(ckpt / "ewc_state.safetensors"))
        logger.flush()
        save_lora(model, str(ckpt / "adapter.safetensors"))
        run_stage_eval(model, tok, cfg, method, stage, task, global_step, device, eval_sets, None, bench, knowledge)
        mark_done(ckpt, cfg, {"method": method, "stage": stage, "task": task, "step": global_step,
                              "skipped_nan": skipped_nan, "skipped_empty": skipped_empty, "time_s": timer()})
    if cfg.recovery_probe:
        recovery()
    print(f"[{method}] done in {timer():.0f}s; logs in {log_dir}, adapters in {cfg.save_dir}/{method}")


def tqdm_range(n: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(range(n), desc=desc)


if __name__ == "__main__":
    main()
