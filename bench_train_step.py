"""Benchmark: one DS-LoRA training step on the configured model, full-sequence logits vs logits on
supervised positions only (utils_train.supervised_logits). Prints seconds per step for both.

    python bench_train_step.py                         # SmolLM2-135M, batch 8 x 192 tokens, 3 timed steps
    python bench_train_step.py --steps 5 --seq_len 256 --response_frac 0.3
The batch is made of real token ids from the training split when present (else random ids), with the last
`response_frac` of each sequence supervised, as in instruction tuning.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from configs.base_config import parse_args_and_config
from models.ds_lora import (get_ds_lora_param_groups, mark_only_lora_as_trainable, replace_with_ds_lora,
                            start_new_task)
from utils_data import IGNORE_INDEX
from utils_model import load_model_and_tokenizer
from utils_train import make_optimizer, supervised_logits


def full_logits_loss(model, batch):
    """The naive loss: logits for every position (B, T, V), then mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def supervised_only_loss(model, batch):
    logits, targets, _ = supervised_logits(model, batch)
    return F.cross_entropy(logits, targets)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq_len", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--response_frac", type=float, default=0.4)
    args, cfg = parse_args_and_config(parser, argv)
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
    for name, fn in (("full logits", full_logits_loss), ("supervised positions only", supervised_only_loss)):
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
        print(f"{name:>28}: {results[name]:.2f} s/step (mean of {len(times)}; loss {float(loss):.3f})")
    a, b = results["full logits"], results["supervised positions only"]
    print(f"saving: {100 * (a - b) / a:.1f}% of a step")


if __name__ == "__main__":
    main()
