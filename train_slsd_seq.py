"""DS-LoRA + SLSD over the task sequence: the main method.

Protocol, for each stage t = 1..T over cfg.tasks:
  1. teacher := the adapter weights at the end of stage t-1 (stage 0 = the untouched base). The base is
     frozen, so the teacher differs from the student only in adapter weights: we keep a snapshot of those
     (a few MB) and swap it in for teacher forwards; no second model copy. `slsd_teacher` picks its view:
     `full` = previous slow + previous fast branch, `slow` = previous slow branch alone. The student is seen
     through the same view (current slow + current fast, or current slow alone), so a slow teacher
     anchors the shared branch to its own past and never pulls it against the new fast branch.
  2. a fresh fast branch for task t (B = 0); earlier tasks' fast weights stay in the bank.
  3. SLSD probe buffer: `probe_size_per_task` current-task training rows scored by the teacher in no-grad
     batched passes over their prompts alone; keep the `probe_keep_fraction` of them with the lowest teacher
     entropy at the last prompt token (the prediction of the first response token), at least `kd_batch_size`;
     run the kept rows whole and cache, keyed by sample id, the teacher's top-k logits at every supervised
     position and its log-mass outside the top-k.
  4. train. Each optimizer step minimizes
         CE(current batch)  [+ kd_lambda * KD(probe batch), every `kd_interval` steps]
     where KD = KL(teacher || student) at temperature T (times T^2) on supervised positions, over the
     teacher's top-k plus one class for the remaining mass (`kd_loss topk_tail`) or renormalized on the top-k
     (`topk`). The KD gradient reaches the slow branch only: it is computed with torch.autograd.grad with
     respect to the slow parameters and added to their .grad after the supervised backward. Then ONE step
     (joint clipping, one AdamW step per branch): the fast branch gets exactly its supervised gradient, the
     slow branch gets the gradient of CE + kd_lambda * KD, and Adam's moments see one gradient per step, so
     there is no extra update that replays the supervised momentum. kd_lambda = 0 skips the KD work and
     consumes no random numbers: the weights are bit-identical to --use_slsd false.
     KL(teacher || student) over the whole probe buffer (the same loss, eval mode) is logged at the stage's
     start and end (`split: probe_kl`; `probe_kl_log false` skips these two no-grad passes), so one can check
     that a larger kd_lambda keeps the student closer.
  5. add task t to the task router (models/router.py): base-model features of `router_rows_per_task` of its
     training rows, and of as many others held out to set its fallback radius (adapters off, so the description
     cannot drift; computed at the stage's start, which changes nothing but stops a task that cannot be described
     before it trains); the routed views (`routed`, `routed_soft`) pick each input's fast branch without a task id.
  6. save adapters and the router to checkpoints/{method}/seq_{t}_{task}/, then evaluate every task (seen and
     unseen).
With --use_slsd false the same script is plain DS-LoRA (method "ds_lora").

    python train_slsd_seq.py                       # ds_lora_slsd on the embedded default
    python train_slsd_seq.py --use_slsd false      # ds_lora, the control
    python train_slsd_seq.py --kd_lambda 3 --slsd_teacher slow --run_name slsd_slow_l3 --log_dir logs/abl
    python train_slsd_seq.py --final_fast_modes own_task,none,routed,routed_soft   # + the task-agnostic routed views
    python train_slsd_seq.py --preset paper --model_name /models/llama-2-7b-hf
A run that is interrupted resumes after the last finished stage; --restart trains afresh.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from configs.base_config import parse_args_and_config, print_config, save_config
from models.ds_lora import (fast_mode, get_adapter_snapshot, get_ds_lora_param_groups, load_ds_lora,
                            mark_only_lora_as_trainable, print_trainable_parameters, replace_with_ds_lora,
                            save_ds_lora, start_new_task, use_adapter_weights)
from models.router import ROUTER_FILE, TaskRouter, attach_router, dataset_prompts, describe_task
from utils_data import IGNORE_INDEX, collate_fn
from utils_dist import barrier, init_distributed, is_main
from utils_forward import autocast, trunk_cache
from utils_model import load_model_and_tokenizer
from utils_train import (JsonlLogger, Timer, accumulate_grads, apply_step, check_resume_config, forget_method_rows,
                         infinite_batches, is_done, kept_tokens_field, load_bench, load_eval_sets, load_knowledge,
                         load_task_dataset, make_loader, make_optimizer, make_scheduler, mark_done, method_name,
                         needs_recovery, read_done, run_recovery, run_stage_eval, set_seed, stage_dir, steps_per_stage,
                         supervised_logits, to_device)


# ----------------------------------------------------------------------------- SLSD
class TeacherTargets(NamedTuple):
    """The teacher at one sample's n supervised positions, at temperature T = kd_temperature."""
    vals: torch.Tensor  # (n, k) float32: top-k logits, sorted descending
    idx: torch.Tensor  # (n, k) int64: their token ids
    log_z: torch.Tensor  # (n,) float32: logsumexp(z / T) over the full vocabulary
    log_tail: torch.Tensor  # (n,) float32: log of the probability mass outside the top-k (-inf when k = V)


@dataclass
class ProbeBuffer:
    dataset: object  # the current task's InstructionDataset
    idxs: list[int]  # dataset indices of the kept probes
    cache: dict  # sample id -> TeacherTargets, looked up by id (never by step or position in a batch)
    entropies: dict  # sample id -> teacher entropy (nats) at the first response token, kept probes only
    scored: list[float]  # entropies of every scored row
    n_scored: int
    fallback: bool  # True when probe_keep_fraction kept fewer than kd_batch_size rows and kd_batch_size were kept


def teacher_targets(z: torch.Tensor, k: int, T: float) -> TeacherTargets:
    """What KD needs from the teacher logits z (n, V): top-k logits and ids, the log-normalizer at temperature T
    and the log-mass outside the top-k (a logsumexp over the other ids: exact even when that mass is tiny)."""
    z = z.float()
    vals, idx = z.topk(min(k, z.shape[-1]), dim=-1)  # (n, k)
    zt = z / T  # (n, V)
    log_z = torch.logsumexp(zt, -1)  # (n,)
    log_tail = torch.logsumexp(zt.scatter(1, idx, float("-inf")), -1) - log_z  # (n,); -inf when k = V
    return TeacherTargets(vals, idx, log_z, log_tail)


def per_sample_logits(model, batch):
    """Yield (r, logits (n_r, V) float32) for each batch row r, at its supervised positions (as supervised_logits),
    from ONE decoder pass; the LM head runs per sample, so a no-grad pass over eval_batch_size rows never holds the
    whole batch's (N, V) logits (about 300 MB for 16 rows of SmolLM2 with its 49k vocabulary) or their temporaries."""
    with autocast(model):
        out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False)
    hidden = out.last_hidden_state[:, :-1]  # (B, T-1, H): position t predicts token t+1
    mask = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1)
    head = model.get_output_embeddings()
    for r in range(mask.shape[0]):
        with autocast(model):
            z = head(hidden[r][mask[r]])
        yield r, z.float()  # (n_r, V)


def by_length(dataset, idxs: list[int]) -> list[int]:
    """`idxs` sorted by token length (ties by index), for no-grad passes where the order does not matter."""
    return sorted(idxs, key=lambda j: (len(dataset[j]["input_ids"]), j))


def slsd_view(model, cfg):
    """The view SLSD compares teacher and student in: slow + fast (slsd_teacher full), or slow alone (slow)."""
    return fast_mode(model, "none") if cfg.slsd_teacher == "slow" else contextlib.nullcontext()


def prompt_length(item: dict) -> int:
    """Tokens before the first supervised one: the prompt from which the first response token is predicted
    (the whole row when nothing is supervised)."""
    sup = (item["labels"] != IGNORE_INDEX).nonzero()
    return int(sup[0]) if len(sup) else len(item["labels"])


def first_token_entropies(model, dataset, idxs: list[int], cfg, device, pad_id: int) -> dict:
    """{sample id: entropy (nats) of the model's next-token distribution at the last prompt token}, from no-grad
    passes over the prompts alone (the response cannot change a causal model's prediction there), right-padded in
    batches of similar length; rows with no supervised token are left out."""
    todo = [j for j in idxs if prompt_length(dataset[j]) < len(dataset[j]["labels"])]
    todo.sort(key=lambda j: (prompt_length(dataset[j]), j))
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    out = {}
    for i in tqdm(range(0, len(todo), cfg.eval_batch_size), desc="probe entropy", leave=False):
        chunk = todo[i:i + cfg.eval_batch_size]
        lens = [prompt_length(dataset[j]) for j in chunk]
        ids = torch.full((len(chunk), max(lens)), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (j, n) in enumerate(zip(chunk, lens)):
            ids[b, :n], mask[b, :n] = dataset[j]["input_ids"][:n], 1
        with autocast(model):
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
            z = head(hidden[torch.arange(len(chunk), device=hidden.device), torch.tensor(lens, device=hidden.device) - 1])
        logp = F.log_softmax(z.float(), -1)  # (b, V)
        for b, j in enumerate(chunk):
            out[dataset.ids[j]] = float(-(logp[b].exp() * logp[b]).sum())
    return out


@torch.no_grad()
def build_probe_buffer(model, teacher: dict, dataset, cfg, device, pad_id: int, seed: int) -> ProbeBuffer:
    """Score `probe_size_per_task` rows with the teacher (no-grad, eval mode: no dropout, no random numbers drawn
    from the global generator); keep the most confident fraction; cache the kept rows' targets by id.

    Two passes: the teacher's entropy at the last prompt token needs only the prompts, so every candidate is scored
    on its prompt alone; the full rows (prompt + response, every supervised position's top-k) are then run for
    the kept fraction only (a quarter by default), which is what the KD term reads."""
    g = torch.Generator().manual_seed(seed)
    n = min(cfg.probe_size_per_task, len(dataset))
    candidates = torch.randperm(len(dataset), generator=g)[:n].tolist()
    T = cfg.kd_temperature
    was_training = model.training
    model.eval()
    cache = {}
    # the teacher = same base + previous adapter weights, in the view slsd_teacher names
    with use_adapter_weights(model, teacher), slsd_view(model, cfg):
        entropies = first_token_entropies(model, dataset, candidates, cfg, device, pad_id)
        by_id = {dataset.ids[j]: j for j in candidates}
        ranked = sorted(entropies, key=lambda s: (entropies[s], s))  # ties broken by id: deterministic
        min_keep = min(cfg.kd_batch_size, len(ranked))
        n_keep = math.ceil(cfg.probe_keep_fraction * len(ranked) - 1e-9)  # 0.3 * 10 is 3.0000000000000004
        fallback = n_keep < min_keep
        if fallback:
            print(f"[slsd] probe_keep_fraction={cfg.probe_keep_fraction} of {len(ranked)} scored rows keeps {n_keep}, "
                  f"fewer than kd_batch_size; keeping the {min_keep} lowest-entropy ones")
        keep = ranked[:max(n_keep, min_keep)]
        order = by_length(dataset, [by_id[s] for s in keep])  # batches of similar length: little padding
        # the frozen trunk's output for these batches is kept (utils_forward.TrunkCache): probe_kl runs the same
        # batches, at the stage's start and end, from the first adapted layer on
        with trunk_cache(model, cfg):
            for i in tqdm(range(0, len(order), cfg.eval_batch_size), desc="probe targets", leave=False):
                chunk = order[i:i + cfg.eval_batch_size]
                batch = to_device(collate_fn([dataset[j] for j in chunk], pad_id), device)
                for r, z in per_sample_logits(model, batch):  # z (n_r, V): this sample's supervised positions
                    cache[dataset.ids[chunk[r]]] = TeacherTargets(*(x.cpu() for x in teacher_targets(z, cfg.kd_topk,
                                                                                                     T)))
    model.train(was_training)
    return ProbeBuffer(dataset, [by_id[s] for s in keep], cache, {s: entropies[s] for s in keep},
                       sorted(entropies.values()), n, fallback)


def entropy_stats(probes: ProbeBuffer) -> dict:
    """The scored entropy distribution (min, quantiles, max) and the kept probes' largest entropy (the cutoff)."""
    if not probes.scored:
        return {}
    e = torch.tensor(probes.scored, dtype=torch.float64)
    qs = {f"entropy_q{int(q * 100):02d}": float(torch.quantile(e, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
    kept = list(probes.entropies.values())
    return {"entropy_min": float(e.min()), **qs, "entropy_max": float(e.max()),
            "entropy_kept_max": max(kept) if kept else None}


def kd_divergence(logits: torch.Tensor, t: TeacherTargets, T: float, form: str) -> torch.Tensor:
    """Per-position KL(teacher || student) at temperature T, times T^2: (N,) from student logits (N, V).

    topk:      both distributions renormalized on the teacher's top-k support.
    topk_tail: the teacher's top-k probabilities plus one class holding its remaining mass; the student's tail
               class = 1 - (its mass on those k ids), computed as a logsumexp over the other ids (exact and
               stable even when the tail is tiny). With k = V the tail is empty and both forms are the full KL."""
    s = logits / T  # (N, V)
    if form == "topk" or t.idx.shape[1] >= s.shape[1]:
        log_p = F.log_softmax(t.vals / T, -1)  # (N, k) teacher, renormalized over its top-k
        log_q = F.log_softmax(s.gather(1, t.idx), -1)  # (N, k) student on the same support
        return (log_p.exp() * (log_p - log_q)).sum(-1) * T * T
    log_zs = torch.logsumexp(s, -1)  # (N,)
    log_q = s.gather(1, t.idx) - log_zs[:, None]  # (N, k) student log-probs on the teacher's top-k
    log_q_tail = torch.logsumexp(s.scatter(1, t.idx, float("-inf")), -1) - log_zs  # (N,) the rest, in log space
    log_p = t.vals / T - t.log_z[:, None]  # (N, k) teacher log-probs (full-vocabulary normalizer)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) + t.log_tail.exp() * (t.log_tail - log_q_tail)
    return kl * T * T


def check_aligned(logits: torch.Tensor, t: TeacherTargets) -> torch.Tensor:
    if t.vals.shape[0] != logits.shape[0]:
        raise RuntimeError(f"teacher cache has {t.vals.shape[0]} positions, the student {logits.shape[0]}: "
                           f"the probe samples changed since the cache was built")
    return logits


def probe_batch(probes: ProbeBuffer, idxs: list[int], pad_id: int, device):
    """(batch, TeacherTargets of its supervised positions in row-major order), the teacher looked up by sample id."""
    ds = probes.dataset
    batch = to_device(collate_fn([ds[j] for j in idxs], pad_id), device)
    parts = [probes.cache[ds.ids[j]] for j in idxs]
    return batch, TeacherTargets(*(torch.cat(x).to(device) for x in zip(*parts)))


def kd_per_position(model, probes: ProbeBuffer, idxs: list[int], cfg, device, pad_id: int) -> torch.Tensor:
    """(N,) KD divergence of the model (as it is, in its current fast view) on the probes `idxs`."""
    batch, t = probe_batch(probes, idxs, pad_id, device)
    logits, _, _ = supervised_logits(model, batch)  # (N, V), the same positions the cache was built on
    return kd_divergence(check_aligned(logits, t), t, cfg.kd_temperature, cfg.kd_loss)


def kd_loss(model, probes: ProbeBuffer, idxs: list[int], cfg, device, pad_id: int) -> torch.Tensor:
    """Mean KD divergence over the supervised positions of the probes `idxs` (the student in its view)."""
    with slsd_view(model, cfg):
        return kd_per_position(model, probes, idxs, cfg, device, pad_id).mean()


@torch.no_grad()
def probe_kl(model, probes: ProbeBuffer, cfg, device, pad_id: int) -> float | None:
    """The KD loss over the whole probe buffer (position-weighted mean), in eval mode: no dropout, no random draws."""
    if not probes.idxs:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = by_length(probes.dataset, probes.idxs)  # build_probe_buffer's batches: their trunk output is cached
    with slsd_view(model, cfg), trunk_cache(model, cfg):
        for i in range(0, len(order), cfg.eval_batch_size):
            chunk = order[i:i + cfg.eval_batch_size]
            batch = to_device(collate_fn([probes.dataset[j] for j in chunk], pad_id), device)
            for r, logits in per_sample_logits(model, batch):  # one sample at a time: bounded memory
                t = TeacherTargets(*(x.to(device) for x in probes.cache[probes.dataset.ids[chunk[r]]]))
                kl = kd_divergence(check_aligned(logits, t), t, cfg.kd_temperature, cfg.kd_loss)  # (n_r,)
                total, count = total + float(kl.sum()), count + kl.numel()
    model.train(was_training)
    return total / count if count else None


def add_kd_grads(model, probes: ProbeBuffer, idxs: list[int], slow_params: list, cfg, device,
                 pad_id: int) -> dict | None:
    """Add the gradient of kd_lambda * KD with respect to the slow parameters to their .grad (the supervised
    gradient is already there); the fast parameters get nothing. KD is the mean over the supervised positions of
    the probes `idxs`, taken one probe at a time (each probe's sum / all positions): the same gradient as one
    batch, without padding and with 1/len(idxs) of its activation and (n, V) logit memory, so a KD term never
    needs more memory than the supervised step (measured on SmolLM2: also 15% faster than one batch of 4).
    Returns {"kd_loss", "kd_grad_norm"} (the norm of the added gradient, before clipping), or None when the KD
    loss or its gradient is not finite (then nothing is added)."""
    n_total = sum(probes.cache[probes.dataset.ids[j]].vals.shape[0] for j in idxs)
    grads = [torch.zeros_like(p) for p in slow_params]
    kd = 0.0
    with slsd_view(model, cfg):
        for j in idxs:
            part = kd_per_position(model, probes, [j], cfg, device, pad_id).sum() / n_total
            if not torch.isfinite(part):
                return None
            for g, d in zip(grads, torch.autograd.grad(cfg.kd_lambda * part, slow_params, allow_unused=True)):
                if d is not None:
                    g.add_(d)
            kd += float(part.detach())
    if not all(torch.isfinite(g).all() for g in grads):
        return None
    for p, g in zip(slow_params, grads):
        p.grad = g if p.grad is None else p.grad.add_(g)
    norm = float(torch.norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
    return {"kd_loss": round(kd, 5), "kd_grad_norm": round(norm, 5)}


# ----------------------------------------------------------------------------- task router
def describe(model, dataset, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Router features of a task from its training rows (models.router.describe_task: the frozen base, adapters
    off, so it makes no difference whether this runs before or after the stage's training; a seeded sample from
    its own generator, so training's random stream is untouched)."""
    return describe_task(model, dataset_prompts(dataset), cfg.router_rows_per_task, cfg.router_layer,
                         cfg.eval_batch_size, seed=cfg.seed)


def add_task_to_router(router: TaskRouter, task: str, features: tuple[torch.Tensor, torch.Tensor]) -> None:
    router.add_task(task, *features)
    print(f"[router] {task}: described by {len(features[0])} training rows, {len(features[1])} held out; fallback "
          f"radius {float(router.radii[-1]):.3g}")


def resume_router(model, tok, cfg, ckpt: Path, done_tasks: list[str]) -> TaskRouter:
    """The router saved with stage checkpoint `ckpt`; a checkpoint written before routing existed has none, and
    its tasks are described again from their training rows (the same rows and the same frozen base: the same
    features)."""
    if (ckpt / ROUTER_FILE).exists():
        router = TaskRouter.load_for(ckpt / ROUTER_FILE, cfg)
        if router.tasks != done_tasks:
            raise SystemExit(f"{ckpt / ROUTER_FILE} describes tasks {router.tasks}, the finished stages are "
                             f"{done_tasks}; pass --restart to train this method afresh")
        return router
    print(f"[router] {ckpt} has no {ROUTER_FILE}; describing {', '.join(done_tasks)} from their training rows")
    router = TaskRouter.from_config(cfg)
    for task in done_tasks:
        add_task_to_router(router, task, describe(model, load_task_dataset(cfg, tok, task, cfg.train_split), cfg))
    return router


# ----------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--restart", action="store_true", help="delete this method's checkpoints and log rows first")
    parser.add_argument("--run_name", default=None,
                        help="method name in logs and checkpoints (default ds_lora_slsd, or ds_lora with --use_slsd "
                             "false); give ablations their own, e.g. slsd_teacher_slow, to keep them in one log folder")
    args, cfg = parse_args_and_config(parser, argv)
    init_distributed(cfg.device)  # under torchrun: join the group (utils_dist.py); a plain run is world size 1
    method = method_name(cfg, args.run_name, "ds_lora_slsd" if cfg.use_slsd else "ds_lora")  # + "+key" / "+low_ppl"
    print_config(cfg, method)
    log_dir = Path(cfg.log_dir)
    train_logs = [log_dir / f"seq_{t}_train_loss.jsonl" for t in cfg.tasks]
    if args.restart:
        if is_main():
            shutil.rmtree(Path(cfg.save_dir) / method, ignore_errors=True)
            forget_method_rows(cfg, method, 0, train_logs)
        barrier()
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
    bench, knowledge = load_bench(cfg), load_knowledge(cfg)
    ctx = lambda mode, task: fast_mode(model, mode, task if mode == "own_task" else None)  # noqa: E731
    router = TaskRouter.from_config(cfg)  # no task yet: the routed views fall back to the slow branch
    attach_router(model, router, cfg.eval_batch_size)

    # Resume: the first stage without done.json is where we start; earlier stages are loaded, not retrained.
    stages = list(enumerate(cfg.tasks, 1))
    first_todo = next((s for s, t in stages if not is_done(stage_dir(cfg, method, s, t))), None)
    recovery = lambda: run_recovery(  # noqa: E731
        model, tok, cfg, method, device, eval_sets, knowledge, view=fast_mode(model, "current"),
        param_groups_fn=lambda: get_ds_lora_param_groups(model, cfg.lr_slow, cfg.lr_fast, cfg.weight_decay))
    if first_todo is None:
        last = stage_dir(cfg, method, len(stages), cfg.tasks[-1])
        check_resume_config(last, cfg)
        print(f"[{method}] all {len(stages)} stages are done (checkpoints in {cfg.save_dir}/{method}); "
              f"pass --restart to train again")
        if needs_recovery(cfg, method):
            load_ds_lora(model, last)
            recovery()
        return
    global_step = 0
    if first_todo == 1:
        forget_method_rows(cfg, method, 0, train_logs)
        run_stage_eval(model, tok, cfg, method, 0, "base", 0, device, eval_sets, ctx, bench, knowledge)
    else:
        prev = stage_dir(cfg, method, first_todo - 1, cfg.tasks[first_todo - 2])
        check_resume_config(prev, cfg)
        load_ds_lora(model, prev)  # slow, active fast and the bank of earlier tasks' fast weights
        router = resume_router(model, tok, cfg, prev, list(cfg.tasks[:first_todo - 1]))
        attach_router(model, router, cfg.eval_batch_size)
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
        features = describe(model, train_ds, cfg)  # now: a task the router cannot describe stops before training
        slow_group, fast_group = get_ds_lora_param_groups(model, cfg.lr_slow, cfg.lr_fast, cfg.weight_decay)
        slow_params, fast_params = slow_group["params"], fast_group["params"]
        opt_slow, opt_fast = make_optimizer([slow_group]), make_optimizer([fast_group])
        total = steps_per_stage(cfg, len(train_ds))
        sched_slow = make_scheduler(opt_slow, total, cfg.warmup_ratio)
        sched_fast = make_scheduler(opt_fast, total, cfg.warmup_ratio)
        batches = infinite_batches(make_loader(train_ds, cfg.per_device_batch_size, pad, shuffle=True,
                                               seed=cfg.seed + stage))
        logger = JsonlLogger(log_dir / f"seq_{task}_train_loss.jsonl")
        head = {"method": method, "stage": stage, "task": task}
        probes = kl_start = None
        if cfg.use_slsd:  # built even at kd_lambda 0 (its KL log is the control); draws no global random numbers
            probes = build_probe_buffer(model, teacher, train_ds, cfg, device, pad, seed=cfg.seed + stage)
            kl_start = probe_kl(model, probes, cfg, device, pad) if cfg.probe_kl_log else None
            ent = list(probes.entropies.values())
            logger.log({**head, "step": global_step, "split": "probe", "n_scored": probes.n_scored,
                        "n_kept": len(probes.idxs), "keep_fraction": cfg.probe_keep_fraction,
                        "fallback": probes.fallback, "entropy_kept_mean": sum(ent) / max(1, len(ent)),
                        **entropy_stats(probes), "teacher": cfg.slsd_teacher, "kl_start": kl_start})
            kd_gen = torch.Generator().manual_seed(cfg.seed + 1000 + stage)
        kd_on = bool(probes is not None and probes.idxs and cfg.kd_lambda > 0)
        del teacher  # the cache holds what SLSD needs from the teacher
        print(f"[{method}] stage {stage}/{len(stages)} {task}: {len(train_ds)} rows, {total} steps"
              + (f", {len(probes.idxs)} of {probes.n_scored} probes kept" if probes else "")
              + (f", KL(teacher || student) {kl_start:.4g}" if kl_start is not None else ""))

        model.train()
        skipped_nan = skipped_empty = skipped_kd = 0
        for step in (bar := tqdm(range(total), desc=f"{method} {task}")):
            # --- supervised gradient: slow and fast
            st = accumulate_grads(model, batches, cfg, device)
            skipped_nan, skipped_empty = skipped_nan + st["skipped_nan"], skipped_empty + st["skipped_empty"]
            # --- SLSD: + kd_lambda * KD on a probe batch, its gradient added to the slow branch only
            kd = None
            if kd_on and st["micro"] and (step + 1) % cfg.kd_interval == 0:
                pick = torch.randperm(len(probes.idxs), generator=kd_gen)[:cfg.kd_batch_size].tolist()
                kd = add_kd_grads(model, probes, [probes.idxs[i] for i in pick], slow_params, cfg, device, pad)
                skipped_kd += kd is None  # a non-finite KD term adds nothing; the supervised step goes on
            # --- one step: joint clipping, each branch at its own learning rate
            lr, lr_slow = sched_fast.get_last_lr()[0], sched_slow.get_last_lr()[0]  # the lrs this step uses
            grad_norm = apply_step(slow_params + fast_params, [opt_slow, opt_fast], [sched_slow, sched_fast],
                                   cfg.max_grad_norm) if st["micro"] else None
            if grad_norm is None:  # nothing finite to apply: counted and logged, never applied
                skipped_nan += st["micro"] > 0
                logger.log({**head, "step": global_step, "split": "skip", "skipped_nan": skipped_nan,
                            "skipped_empty": skipped_empty})
                continue
            global_step += 1
            rec = {**head, "step": global_step, "stage_step": step + 1, "split": "train",
                   "loss": round(st["loss"], 5), "lr": lr, "lr_slow": lr_slow, "grad_norm": round(grad_norm, 4),
                   **(kd or {}), **kept_tokens_field(st), "time_s": timer()}
            logger.log(rec)
            bar.set_postfix(loss=rec["loss"], kd=rec.get("kd_loss", "-"))
            if global_step % cfg.log_interval == 0:
                print(f"[{method}] {task} step {step + 1}/{total} loss {rec['loss']:.4f}"
                      + (f" kd {rec['kd_loss']:.4f}" if "kd_loss" in rec else "") + f" ({timer():.0f}s)")
                logger.flush()
        if skipped_nan or skipped_empty or skipped_kd:
            print(f"[{method}] {task}: skipped {skipped_nan} non-finite and {skipped_empty} unsupervised batches, "
                  f"{skipped_kd} non-finite KD terms")
        if probes is not None and cfg.probe_kl_log:  # how far the student went from its teacher on the probes
            kl_end = probe_kl(model, probes, cfg, device, pad)
            logger.log({**head, "step": global_step, "split": "probe_kl", "kl_start": kl_start, "kl_end": kl_end,
                        "n_probes": len(probes.idxs), "kd_lambda": cfg.kd_lambda, "teacher": cfg.slsd_teacher,
                        "kd_form": cfg.kd_loss})
            if kl_end is not None:
                print(f"[{method}] {task}: KL(teacher || student) on the probes {kl_start:.4g} -> {kl_end:.4g}")
        logger.flush()

        add_task_to_router(router, task, features)  # the stage's task is routable from its evaluation on
        ckpt = stage_dir(cfg, method, stage, task)
        save_ds_lora(model, ckpt)
        router.save(ckpt / ROUTER_FILE)
        run_stage_eval(model, tok, cfg, method, stage, task, global_step, device, eval_sets, ctx, bench, knowledge)
        mark_done(ckpt, cfg, {"method": method, "stage": stage, "task": task, "step": global_step,
                              "skipped_nan": skipped_nan, "skipped_empty": skipped_empty, "skipped_kd": skipped_kd,
                              "time_s": timer()})
    if cfg.recovery_probe:
        recovery()
    print(f"[{method}] done in {timer():.0f}s; logs in {log_dir}, adapters in {cfg.save_dir}/{method}")


if __name__ == "__main__":
    main()
