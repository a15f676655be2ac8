"""DS-LoRA + SLSD over the task sequence: the main method.

Protocol, for each stage t = 1..T over cfg.tasks:
  1. teacher := the adapter weights at the end of stage t-1 (stage 0 = the untouched base). The base is
     frozen, so the teacher differs from the student only in adapter weights: we keep a snapshot of those
     (a few MB) and swap it in for teacher forwards; no second model copy.
  2. a fresh fast branch for task t (B = 0); earlier tasks' fast weights stay in the bank.
  3. SLSD probe buffer: `probe_size_per_task` current-task training rows scored by the teacher; keep those
     whose teacher entropy at the last prompt token (the prediction of the first response token) is below
     `entropy_threshold`; cache the teacher's top-k logits at every supervised position, keyed by sample id.
  4. train: the supervised loss updates slow (lr_slow) and fast (lr_fast) with their own optimizers; every
     `kd_interval` steps a probe batch gives KL(teacher || student) over the cached top-k support with
     temperature, on supervised positions only, weighted by kd_lambda, and ONLY the slow optimizer steps.
  5. save adapters to checkpoints/{method}/seq_{t}_{task}/, then evaluate every task (seen and unseen).
With --use_slsd false the same script is plain DS-LoRA (method "ds_lora").

    python train_slsd_seq.py                       # ds_lora_slsd on the embedded default
    python train_slsd_seq.py --use_slsd false      # ds_lora
    python train_slsd_seq.py --preset paper --model_name /models/llama-2-7b-hf
A run that is interrupted resumes after the last finished stage; --restart trains afresh.
"""
from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from configs.base_config import parse_args_and_config, print_config, save_config
from models.ds_lora import (fast_mode, get_adapter_snapshot, get_ds_lora_param_groups, load_ds_lora,
                            mark_only_lora_as_trainable, print_trainable_parameters, replace_with_ds_lora,
                            save_ds_lora, start_new_task, use_adapter_weights)
from utils_data import collate_fn
from utils_model import load_model_and_tokenizer
from utils_train import (JsonlLogger, Timer, accumulate_grads, apply_step, check_resume_config, forget_method_rows,
                         infinite_batches, is_done, load_bench, load_eval_sets, load_task_dataset, make_loader,
                         make_optimizer, make_scheduler, mark_done, read_done, run_stage_eval, set_seed, stage_dir,
                         steps_per_stage, supervised_logits, to_device)


# ----------------------------------------------------------------------------- SLSD
@dataclass
class ProbeBuffer:
    dataset: object  # the current task's InstructionDataset
    idxs: list[int]  # dataset indices of the kept probes
    cache: dict  # sample id -> (topk_values (n_i, k) float32, topk_indices (n_i, k) int64), n_i = supervised positions
    entropies: dict  # sample id -> teacher entropy (nats) at the first response token
    n_scored: int
    fallback: bool  # True when too few passed the threshold and the lowest-entropy ones were kept


@torch.no_grad()
def build_probe_buffer(model, teacher: dict, dataset, cfg, device, pad_id: int, seed: int) -> ProbeBuffer:
    """Score `probe_size_per_task` rows with the teacher; keep the confident ones and cache top-k logits by id."""
    g = torch.Generator().manual_seed(seed)
    n = min(cfg.probe_size_per_task, len(dataset))
    candidates = torch.randperm(len(dataset), generator=g)[:n].tolist()
    was_training = model.training
    model.eval()
    cache, entropies = {}, {}
    with use_adapter_weights(model, teacher):  # the teacher = same base + previous adapter weights
        for i in tqdm(range(0, n, cfg.eval_batch_size), desc="probe buffer", leave=False):
            chunk = candidates[i:i + cfg.eval_batch_size]
            batch = to_device(collate_fn([dataset[j] for j in chunk], pad_id), device)
            logits, _, row = supervised_logits(model, batch)  # (N, V), rows in row-major order
            for r, j in enumerate(chunk):
                z = logits[row == r]  # (n_r, V): this sample's supervised positions
                if len(z) == 0:
                    continue
                p0 = F.log_softmax(z[0], -1)  # position of the last prompt token -> first response token
                sid = dataset.ids[j]
                entropies[sid] = float(-(p0.exp() * p0).sum())
                vals, idx = z.topk(min(cfg.kd_topk, z.shape[-1]), dim=-1)
                cache[sid] = (vals.float().cpu(), idx.cpu())
    model.train(was_training)
    by_id = {dataset.ids[j]: j for j in candidates}
    ranked = sorted(entropies, key=entropies.get)
    keep = [s for s in ranked if entropies[s] < cfg.entropy_threshold]
    min_keep = min(cfg.kd_batch_size, len(ranked))
    fallback = len(keep) < min_keep
    if fallback:
        print(f"[slsd] only {len(keep)} of {len(ranked)} probes under entropy_threshold={cfg.entropy_threshold}; "
              f"keeping the {min_keep} lowest-entropy ones instead")
        keep = ranked[:min_keep]
    cache = {s: cache[s] for s in keep}
    return ProbeBuffer(dataset, [by_id[s] for s in keep], cache, {s: entropies[s] for s in keep}, n, fallback)


def kd_loss(model, probes: ProbeBuffer, idxs: list[int], cfg, device, pad_id: int) -> torch.Tensor:
    """KL(teacher || student) on the cached top-k support, supervised positions only, times T^2."""
    ds = probes.dataset
    batch = to_device(collate_fn([ds[j] for j in idxs], pad_id), device)
    logits, _, _ = supervised_logits(model, batch)  # (N, V), the same positions the cache was built on
    t_vals = torch.cat([probes.cache[ds.ids[j]][0] for j in idxs]).to(device)  # (N, k), looked up by sample id
    t_idx = torch.cat([probes.cache[ds.ids[j]][1] for j in idxs]).to(device)  # (N, k)
    if t_vals.shape[0] != logits.shape[0]:
        raise RuntimeError(f"teacher cache has {t_vals.shape[0]} positions, the student {logits.shape[0]}: "
                           f"the probe samples changed since the cache was built")
    T = cfg.kd_temperature
    log_p = F.log_softmax(t_vals / T, -1)  # teacher, renormalized over its top-k
    log_q = F.log_softmax(logits.gather(1, t_idx) / T, -1)  # student on the same support
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * T * T


# ----------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--restart", action="store_true", help="delete this method's checkpoints and log rows first")
    args, cfg = parse_args_and_config(parser, argv)
    method = "ds_lora_slsd" if cfg.use_slsd else "ds_lora"
    print_config(cfg, method)
    log_dir = Path(cfg.log_dir)
    train_logs = [log_dir / f"seq_{t}_train_loss.jsonl" for t in cfg.tasks]
    if args.restart:
        shutil.rmtree(Path(cfg.save_dir) / method, ignore_errors=True)
        forget_method_rows(cfg, method, 0, train_logs)
    set_seed(cfg.seed)
    model, tok, device = load_model_and_tokenizer(cfg)
    names = replace_with_ds_lora(model, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                 cfg.num_frozen_layers, r_fast=cfg.r_fast)
    model.to(device)
    mark_only_lora_as_trainable(model)
    print(f"[{method}] DS-LoRA on {len(names)} modules ({names[0]} ... {names[-1]})")
    print_trainable_parameters(model)
    pad = tok.pad_token_id
    eval_sets = load_eval_sets(cfg, tok)
    bench = load_bench(cfg)
    ctx = lambda mode, task: fast_mode(model, mode, task if mode == "own_task" else None)  # noqa: E731

    # Resume: the first stage without done.json is where we start; earlier stages are loaded, not retrained.
    stages = list(enumerate(cfg.tasks, 1))
    first_todo = next((s for s, t in stages if not is_done(stage_dir(cfg, method, s, t))), None)
    if first_todo is None:
        check_resume_config(stage_dir(cfg, method, len(stages), cfg.tasks[-1]), cfg)
        print(f"[{method}] all {len(stages)} stages are done (checkpoints in {cfg.save_dir}/{method}); "
              f"pass --restart to train again")
        return
    global_step = 0
    if first_todo == 1:
        forget_method_rows(cfg, method, 0, train_logs)
        run_stage_eval(model, tok, cfg, method, 0, "base", 0, device, eval_sets, ctx, bench)
    else:
        prev = stage_dir(cfg, method, first_todo - 1, cfg.tasks[first_todo - 2])
        check_resume_config(prev, cfg)
        load_ds_lora(model, prev)  # slow, active fast and the bank of earlier tasks' fast weights
        global_step = read_done(prev)["step"]
        print(f"[{method}] resuming after stage {first_todo - 1} ({prev})")

    save_config(cfg, log_dir, name=f"config_{method}.json", extra={"method": method})  # the recipe of these logs
    timer = Timer()
    for stage, task in stages[first_todo - 1:]:
        forget_method_rows(cfg, method, stage, train_logs)
        set_seed(cfg.seed + stage)  # each stage is reproducible on its own, so resuming changes nothing
        teacher = get_adapter_snapshot(model)  # the model as it was at the end of stage - 1
        start_new_task(model, task, seed=cfg.seed + stage)
        train_ds = load_task_dataset(cfg, tok, task, cfg.train_split)
        slow_group, fast_group = get_ds_lora_param_groups(model, cfg.lr_slow, cfg.lr_fast, cfg.weight_decay)
        slow_params, fast_params = slow_group["params"], fast_group["params"]
        opt_slow, opt_fast = make_optimizer([slow_group]), make_optimizer([fast_group])
        total = steps_per_stage(cfg, len(train_ds))
        sched_slow = make_scheduler(opt_slow, total, cfg.warmup_ratio)
        sched_fast = make_scheduler(opt_fast, total, cfg.warmup_ratio)
        batches = infinite_batches(make_loader(train_ds, cfg.per_device_batch_size, pad, shuffle=True,
                                               seed=cfg.seed + stage))
        logger = JsonlLogger(log_dir / f"seq_{task}_train_loss.jsonl")
        probes = None
        if cfg.use_slsd:
            probes = build_probe_buffer(model, teacher, train_ds, cfg, device, pad, seed=cfg.seed + stage)
            ent = list(probes.entropies.values())
            logger.log({"method": method, "stage": stage, "task": task, "step": global_step, "split": "probe",
                        "n_scored": probes.n_scored, "n_kept": len(probes.idxs), "fallback": probes.fallback,
                        "entropy_mean": sum(ent) / max(1, len(ent)), "threshold": cfg.entropy_threshold})
            kd_gen = torch.Generator().manual_seed(cfg.seed + 1000 + stage)
        del teacher  # the cache holds what SLSD needs from the teacher
        print(f"[{method}] stage {stage}/{len(stages)} {task}: {len(train_ds)} rows, {total} steps"
              + (f", {len(probes.idxs)} probes" if probes else ""))

        model.train()
        skipped_nan = skipped_empty = 0
        for step in (bar := tqdm(range(total), desc=f"{method} {task}")):
            # --- supervised step: slow and fast, each with its own learning rate
            st = accumulate_grads(model, batches, cfg, device)
            skipped_nan, skipped_empty = skipped_nan + st["skipped_nan"], skipped_empty + st["skipped_empty"]
            lr, lr_slow = sched_fast.get_last_lr()[0], sched_slow.get_last_lr()[0]  # the lrs this step uses
            grad_norm = apply_step(slow_params + fast_params, [opt_slow, opt_fast], [sched_slow, sched_fast],
                                   cfg.max_grad_norm) if st["micro"] else None
            if grad_norm is None:  # nothing finite to apply: counted and logged, never applied
                skipped_nan += st["micro"] > 0
                logger.log({"method": method, "stage": stage, "task": task, "step": global_step, "split": "skip",
                            "skipped_nan": skipped_nan, "skipped_empty": skipped_empty})
                continue
            global_step += 1
            rec = {"method": method, "stage": stage, "task": task, "step": global_step, "stage_step": step + 1,
                   "split": "train", "loss": round(st["loss"], 5), "lr": lr,
                   "lr_slow": lr_slow, "grad_norm": round(grad_norm, 4), "time_s": timer()}

            # --- SLSD step: KL on a probe batch, only the slow branch moves (fast weights untouched)
            if probes and probes.idxs and (step + 1) % cfg.kd_interval == 0:
                pick = torch.randperm(len(probes.idxs), generator=kd_gen)[:cfg.kd_batch_size].tolist()
                for p in fast_params:
                    p.requires_grad_(False)  # no fast gradients at all: cheaper and provably untouched
                kd = kd_loss(model, probes, [probes.idxs[i] for i in pick], cfg, device, pad)
                if torch.isfinite(kd):
                    (cfg.kd_lambda * kd).backward()
                    if apply_step(slow_params, [opt_slow], [], cfg.max_grad_norm) is None:
                        skipped_nan += 1  # non-finite gradients: not applied, so no kd_loss logged
                    else:
                        rec["kd_loss"] = round(float(kd.detach()), 5)
                else:
                    skipped_nan += 1
                for p in fast_params:
                    p.requires_grad_(True)
            logger.log(rec)
            bar.set_postfix(loss=rec["loss"], kd=rec.get("kd_loss", "-"))
            if global_step % cfg.log_interval == 0:
                print(f"[{method}] {task} step {step + 1}/{total} loss {rec['loss']:.4f}"
                      + (f" kd {rec['kd_loss']:.4f}" if "kd_loss" in rec else "") + f" ({timer():.0f}s)")
                logger.flush()
        if skipped_nan or skipped_empty:
            print(f"[{method}] {task}: skipped {skipped_nan} non-finite and {skipped_empty} unsupervised batches")
        logger.flush()

        ckpt = stage_dir(cfg, method, stage, task)
        save_ds_lora(model, ckpt)
        run_stage_eval(model, tok, cfg, method, stage, task, global_step, device, eval_sets, ctx, bench)
        mark_done(ckpt, cfg, {"method": method, "stage": stage, "task": task, "step": global_step,
                              "skipped_nan": skipped_nan, "skipped_empty": skipped_empty, "time_s": timer()})
    print(f"[{method}] done in {timer():.0f}s; logs in {log_dir}, adapters in {cfg.save_dir}/{method}")


if __name__ == "__main__":
    main()
