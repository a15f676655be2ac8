"""Benchmark: what the task router costs (models/router.py) on the configured model.

Every task gets a DS-LoRA fast branch (random B, so the fast matmuls run) and a router description from its
training rows; then, on `--rows` eval rows per task (all tasks mixed, batches of eval_batch_size):
  feature pass   the router's one pass per prompt: the base model up to router_layer, adapters off, mean-pooled
  eval own_task  the eval-loss forward with each task's own branch (one task per call, no routing)
  eval routed    the same rows in the routed view, features computed afresh (the memo cleared before each run)
  describe       one task's description at the end of its stage (2 x router_rows_per_task training rows)
and with --gen_tokens N > 0 also greedy generation of N tokens on the eval prompts, own_task against routed.
Prints the median seconds of --repeats runs and the routing overhead as a share of the routed forward.

    python bench_router.py                                  # SmolLM2-135M, 12 eval rows per task, 3 repeats
    python bench_router.py --rows 32 --router_layer 8 --gen_tokens 32
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from configs.base_config import parse_args_and_config
from evaluation.generation import generate_ids
from models.ds_lora import fast_mode, replace_with_ds_lora, start_new_task
from models.router import TaskRouter, attach_router, dataset_prompts, describe_task, prompt_features
from utils_model import load_model_and_tokenizer
from utils_train import eval_loss, load_task_dataset


def timed(fn, repeats: int) -> float:
    """Median wall seconds of `repeats` calls (after one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--rows", type=int, default=12, help="eval rows per task (the eval split, seeded sample)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measure (median reported)")
    parser.add_argument("--gen_tokens", type=int, default=0, help="also time greedy generation of this many tokens")
    args, cfg = parse_args_and_config(parser, argv)
    torch.manual_seed(cfg.seed)
    model, tok, device = load_model_and_tokenizer(cfg)
    replace_with_ds_lora(model, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                         cfg.num_frozen_layers, r_fast=cfg.r_fast)
    model.to(device).eval()
    router = TaskRouter.from_config(cfg)
    routing = attach_router(model, router, cfg.eval_batch_size)
    describe_s = []
    for i, task in enumerate(cfg.tasks):
        start_new_task(model, task, seed=i)
        for m in model.modules():
            if hasattr(m, "lora_B_fast"):
                torch.nn.init.normal_(m.lora_B_fast, std=0.01)
        train = load_task_dataset(cfg, tok, task, cfg.train_split, max_samples=2 * cfg.router_rows_per_task)
        t0 = time.perf_counter()
        router.add_task(task, *describe_task(model, dataset_prompts(train), cfg.router_rows_per_task,
                                             cfg.router_layer, cfg.eval_batch_size, seed=cfg.seed))
        describe_s.append(time.perf_counter() - t0)
    evals = {t: load_task_dataset(cfg, tok, t, cfg.eval_split, args.rows, cfg.eval_seed) for t in cfg.tasks}
    prompts = [p for ds in evals.values() for p in dataset_prompts(ds)]
    n_layers = len(model.get_decoder().layers)
    print(f"model {cfg.model_name} on {device}, threads {torch.get_num_threads()}, router layer {cfg.router_layer} "
          f"of {n_layers}, {len(prompts)} eval rows ({args.rows} per task), mean prompt "
          f"{sum(map(len, prompts)) / len(prompts):.0f} tokens, batch {cfg.eval_batch_size}")
    pad = tok.pad_token_id

    def own_task_loss():
        for t, ds in evals.items():
            with fast_mode(model, "own_task", t):
                eval_loss(model, ds, cfg, pad, device)

    def routed_loss():
        routing.features.clear()  # the routed run pays for its features
        with fast_mode(model, "routed"):
            for ds in evals.values():
                eval_loss(model, ds, cfg, pad, device)

    results = {
        "feature pass": timed(lambda: prompt_features(model, prompts, cfg.router_layer, cfg.eval_batch_size),
                              args.repeats),
        "eval own_task": timed(own_task_loss, args.repeats),
        "eval routed": timed(routed_loss, args.repeats),
    }
    if args.gen_tokens > 0:
        rows = [r for ds in evals.values() for r in ds.rows]

        def gen(mode):
            def run():
                routing.features.clear()
                if mode == "routed":
                    with fast_mode(model, "routed"):
                        generate_ids(model, tok, rows, cfg, device, args.gen_tokens)
                else:
                    for t, ds in evals.items():
                        with fast_mode(model, "own_task", t):
                            generate_ids(model, tok, ds.rows, cfg, device, args.gen_tokens)
            return run
        results["generate own_task"] = timed(gen("own_task"), args.repeats)
        results["generate routed"] = timed(gen("routed"), args.repeats)
    for name, s in results.items():
        print(f"  {name:<18} {s:8.3f} s")
    feat, routed = results["feature pass"], results["eval routed"]
    print(f"  routing overhead: the feature pass is {feat / routed:.1%} of the routed eval forward "
          f"(routed - own_task = {routed - results['eval own_task']:+.3f} s); describing one task at the end of "
          f"its stage: {statistics.median(describe_s):.3f} s")


if __name__ == "__main__":
    main()
