"""Benchmark: one training step on the configured model. Prints seconds per step for
  1. DS-LoRA, full-sequence logits vs logits on supervised positions only (utils_train.supervised_logits);
  2. each --methods entry of train_seq_baselines.py: its whole optimizer step (train_seq_baselines.train_step:
     forward and backward with the method's loss, its penalty, the clipped AdamW step, I-LoRA's EMA) at a late stage:
     replay and I-LoRA with a full buffer, O-LoRA with --earlier_tasks LoRAs stacked; each against seq_lora's.

    python bench_train_step.py                         # SmolLM2-135M, batch 8 x 192 tokens, 3 timed steps
    python bench_train_step.py --steps 5 --seq_len 256 --response_frac 0.3
    python bench_train_step.py --methods seq_lora,ilora,olora --compare_logits false
    python bench_train_step.py --methods seq_lora,seq_lora+key,seq_lora+low_ppl --compare_logits false
    python bench_train_step.py --methods seq_lora,replay,replay_mix,ilora,ilora_mix --compare_logits false
The batch is random token ids with the last `response_frac` of each sequence supervised, as in instruction tuning;
replay and I-LoRA replay rows of the same batch (the cost depends on the rows' lengths, not their content); their
`_mix` forms (replay_mode mix) take the batch's first half as the current rows and fill the rest with replayed ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F

import train_seq_baselines as tsb
from configs.base_config import parse_args_and_config
from models.ds_lora import (get_ds_lora_param_groups, mark_only_lora_as_trainable, replace_with_ds_lora,
                            start_new_task)
from models.lora_simple import get_lora_param_groups, replace_with_lora
from models.lora_variants import start_olora_task
from utils_data import IGNORE_INDEX
from utils_model import load_model_and_tokenizer
from utils_replay import Replay
from utils_tokens import base_scores
from utils_train import make_optimizer, make_scheduler, mean_token_loss, supervised_logits


def full_logits_loss(model, batch):
    """The naive loss: logits for every position (B, T, V), then mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def supervised_only_loss(model, batch):
    logits, targets, _ = supervised_logits(model, batch)
    return F.cross_entropy(logits, targets)


def method_step_time(cfg, method: str, batch: dict, steps: int, earlier_tasks: int) -> float:
    """Mean seconds of train_seq_baselines.train_step for `method` on a fresh model, over `steps` steps after one
    untimed warm-up step (ewc: its penalty with one past task's Fisher and anchor). A `+key` / `+low_ppl` suffix
    times that token-selective loss (utils_tokens.py) with the base-score cache emptied before every step: each step's
    rows are new to it, as in a stage that draws a few rows out of thousands (the default's case)."""
    method, _, selection = method.partition("+")
    if selection:
        cfg = dataclasses.replace(cfg, loss_tokens=selection)
    if method.endswith("_mix"):  # replay_mode mix: the loader's batch leaves half of its places to replayed rows
        method, cfg = method[:-len("_mix")], dataclasses.replace(cfg, replay_mode="mix")
    torch.manual_seed(cfg.seed)
    model, tok, device = load_model_and_tokenizer(cfg)
    tsb.ADAPTERS.get(method, replace_with_lora)(model, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha,
                                                cfg.lora_dropout, cfg.num_frozen_layers)
    model.to(device)
    if method == "olora":  # the stage after `earlier_tasks` others: that many frozen LoRAs in every forward
        for k in range(earlier_tasks):
            start_olora_task(model, seed=cfg.seed + k)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn, ewc = mean_token_loss, None
    if method in ("replay", "ilora"):
        replay = Replay(cfg, tok, tok.pad_token_id)
        n = batch["attention_mask"].sum(1).tolist()  # the buffer: the rows of the whole batch
        replay.items = [{"input_ids": batch["input_ids"][i, :n[i]].cpu(), "labels": batch["labels"][i, :n[i]].cpu(),
                         "idx": i} for i in range(len(n))]
        batch = {k: v[:replay.current_rows(stage=2)] for k, v in batch.items()}  # a late stage's current rows
        loss_fn = tsb.ILoRA(model, replay, cfg).loss_fn if method == "ilora" else replay.loss_fn
    elif method == "ewc":
        ewc = tsb.EWC({n: p for n, p in model.named_parameters() if p.requires_grad}, cfg)
        ewc.fishers = [{n: torch.ones_like(p) for n, p in ewc.params.items()}]
        ewc.anchors = [{n: p.detach().clone() for n, p in ewc.params.items()}]
    elif method not in ("seq_lora", "olora"):
        raise SystemExit(f"--methods: {method!r} cannot be timed here; use seq_lora, replay, ewc, ilora, olora "
                         f"(replay_mix, ilora_mix: replay_mode mix)")
    if cfg.replay_mode == "mix" and method not in ("replay", "ilora"):
        raise SystemExit(f"--methods: a _mix suffix applies to replay and ilora, not {method!r}")
    opt = make_optimizer(get_lora_param_groups(model, cfg.lr, cfg.weight_decay))
    sched = make_scheduler(opt, steps + 1, 0.0)

    def same_batch():
        while True:
            yield batch
    batches = same_batch()
    model.train()
    times = []
    for i in range(steps + 1):  # the first step warms up and is not timed
        if selection:  # the rows are new to the base-score cache (its one-time trunk-handoff check stays done)
            base_scores(model).cache.clear()
        t0 = time.perf_counter()
        st, grad_norm, _ = tsb.train_step(model, batches, cfg, device, loss_fn, params, opt, sched, method, ewc)
        if grad_norm is None:
            raise RuntimeError(f"{method}: the benchmark step was skipped ({st}); the batch has no supervised token")
        if i:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq_len", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--response_frac", type=float, default=0.4)
    parser.add_argument("--methods", default="seq_lora,replay,replay_mix,ewc,ilora,ilora_mix,olora,seq_lora+key,"
                                              "seq_lora+low_ppl",
                        help="train_seq_baselines methods to time, comma-separated (seq_lora first: the reference); "
                             "a +key / +low_ppl suffix times that token-selective loss with every row new (e.g. "
                             "seq_lora+key); a _mix suffix (replay_mix, ilora_mix) times replay_mode mix; inscl's "
                             "step is replay's (only its buffer differs); '' for none")
    parser.add_argument("--earlier_tasks", type=int, default=4,
                        help="olora: earlier tasks' LoRAs stacked (4 = the fifth task's step, the dearest)")
    parser.add_argument("--compare_logits", default="true", choices=("true", "false"),
                        help="false: skip part 1 (the DS-LoRA logits comparison) and time only --methods")
    args, cfg = parse_args_and_config(parser, argv)
    # the timed steps draw nothing from a loader: one batch of --batch rows per step, no accumulation
    cfg.per_device_batch_size, cfg.gradient_accumulation_steps = args.batch, 1
    methods = [m for m in args.methods.split(",") if m]
    torch.manual_seed(cfg.seed)
    model, tok, device = load_model_and_tokenizer(cfg)
    replace_with_ds_lora(model, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                         cfg.num_frozen_layers)
    model.to(device)
    mark_only_lora_as_trainable(model)
    start_new_task(model, "bench")
    slow, fast = get_ds_lora_param_groups(model, cfg.lr_slow, cfg.lr_fast, 0.0)
    opt = make_optimizer([slow, fast])
    ids = torch.randint(10, len(tok), (args.batch, args.seq_len), device=device)
    labels = ids.clone()
    labels[:, : int(args.seq_len * (1 - args.response_frac))] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    print(f"model {cfg.model_name} on {device}, threads {torch.get_num_threads()}, batch {args.batch} x "
          f"{args.seq_len} tokens, {int((labels != IGNORE_INDEX).sum())} supervised, LoRA on layers >= "
          f"{cfg.num_frozen_layers}")
    results = {}
    for name, fn in ((("full logits", full_logits_loss), ("supervised positions only", supervised_only_loss))
                     if args.compare_logits == "true" else ()):
        model.train()
        times = []
        for i in range(args.steps + 1):  # the first step warms up and is not timed
            t0 = time.perf_counter()
            loss = fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t0)
        results[name] = sum(times) / len(times)
        print(f"{name:>28}: {results[name]:.2f} s/step (mean of {len(times)}; loss {float(loss.detach()):.3f})")
    if results:
        a, b = results["full logits"], results["supervised positions only"]
        print(f"saving: {100 * (a - b) / a:.1f}% of a step")
    del model, opt
    times = {}
    for method in methods:
        times[method] = method_step_time(cfg, method, {k: v.to(device) for k, v in batch.items()}, args.steps,
                                         args.earlier_tasks)
        ref = f" = {times[method] / times['seq_lora']:.2f}x seq_lora" if "seq_lora" in times else ""
        print(f"{method:>28}: {times[method]:.3f} s/step (mean of {args.steps}){ref}")


if __name__ == "__main__":
    main()
