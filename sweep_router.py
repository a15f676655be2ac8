"""Router feature sweep: how well the task router (models/router.py) tells the tasks apart from the base model's
prompt features, per layer, pooling and covariance shrinkage, on held-out validation rows.

Each task is described as the training scripts do (router_rows_per_task training rows fit the centroid, as many
calibrate the fallback radius; split_rows with the run's seed); then up to --val_rows validation rows per task are
routed, and the share routed to their own task is printed (a fallback to the slow branch counts as a miss).
Poolings: `mean` over every prompt token (what the router uses), `content` over the tokens between the prefix and
suffix every prompt shares (the chat template's system turn and assistant header), `last` the last prompt token.
`--show_misses T` prints the misrouted prompts of task T for the first layer and pooling.

    python sweep_router.py                                   # layers 3,6,9,12,15 x 3 poolings x shrinkage 0.2,0.5
    python sweep_router.py --layers 3 --poolings mean --show_misses T1_general
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from configs.base_config import parse_args_and_config
from models.router import TaskRouter, dataset_prompts, split_rows
from utils_forward import autocast
from utils_model import load_model_and_tokenizer
from utils_train import load_task_dataset

POOLINGS = ("mean", "content", "last")


@torch.no_grad()
def hidden_states(model, prompts: list[list[int]], layers: list[int], batch_size: int) -> list[dict]:
    """Per prompt, {layer: (n, H) float32 hidden states after that decoder layer} (0 = embeddings)."""
    out: list[dict] = [{} for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        T = max(len(prompts[i]) for i in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, i in enumerate(chunk):
            ids[b, :len(prompts[i])], mask[b, :len(prompts[i])] = torch.tensor(prompts[i]), 1
        with autocast(model):
            hs = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     output_hidden_states=True, use_cache=False).hidden_states
        for b, i in enumerate(chunk):
            out[i] = {L: hs[L][b, :len(prompts[i])].float().cpu() for L in layers}
    return out


def pooled(states: list[dict], layer: int, how: str, prefix: int, suffix: int) -> torch.Tensor:
    rows = []
    for st in states:
        h = st[layer]
        n = h.shape[0]
        rows.append(h.mean(0) if how == "mean" else h[-1] if how == "last"
                    else h[prefix:max(prefix + 1, n - suffix)].mean(0))
    return torch.stack(rows)


def common_ends(prompts: list[list[int]]) -> tuple[int, int]:
    """Lengths of the token prefix and suffix that every prompt shares."""
    first = prompts[0]
    pre = 0
    while all(len(p) > pre and p[pre] == first[pre] for p in prompts):
        pre += 1
    suf = 0
    while all(len(p) > suf + pre and p[-1 - suf] == first[-1 - suf] for p in prompts):
        suf += 1
    return pre, suf


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--layers", default="3,6,9,12,15")
    ap.add_argument("--poolings", default=",".join(POOLINGS))
    ap.add_argument("--shrinkages", default="0.2,0.5")
    ap.add_argument("--val_rows", type=int, default=100, help="validation rows per task (fewer where a task has fewer)")
    ap.add_argument("--show_misses", default=None, help="a task whose misrouted prompts to print")
    args, cfg = parse_args_and_config(ap, argv)
    layers = [int(x) for x in args.layers.split(",")]
    poolings = args.poolings.split(",")
    if set(poolings) - set(POOLINGS):
        raise SystemExit(f"--poolings: choose from {', '.join(POOLINGS)}")
    model, tok, _ = load_model_and_tokenizer(cfg)
    model.eval()
    fit, cal, val = {}, {}, {}
    for t in cfg.tasks:
        train = dataset_prompts(load_task_dataset(cfg, tok, t, cfg.train_split))
        f, c = split_rows(len(train), cfg.router_rows_per_task, seed=cfg.seed)
        fit[t], cal[t] = [train[i] for i in f], [train[i] for i in c]
        val[t] = dataset_prompts(load_task_dataset(cfg, tok, t, cfg.eval_split, args.val_rows, cfg.eval_seed))
    pre, suf = common_ends([p for t in cfg.tasks for p in fit[t] + cal[t] + val[t]])
    print(f"[sweep] shared prefix {pre} tokens, suffix {suf}; validation rows "
          + ", ".join(f"{t} {len(v)}" for t, v in val.items()))
    t0 = time.perf_counter()
    H = {t: [hidden_states(model, rows, layers, cfg.eval_batch_size) for rows in (fit[t], cal[t], val[t])]
         for t in cfg.tasks}
    print(f"[sweep] features in {time.perf_counter() - t0:.0f} s")
    print("| layer | pooling | shrinkage | lowest | " + " | ".join(cfg.tasks) + " |")
    print("|---:|---|---:|---:|" + "---:|" * len(cfg.tasks))
    for L in layers:
        for how in poolings:
            for shrink in (float(x) for x in args.shrinkages.split(",")):
                router = TaskRouter(layer=L, shrinkage=shrink, fallback_quantile=cfg.router_fallback_quantile,
                                    temperature=cfg.router_temperature, topk=cfg.router_topk)
                for t in cfg.tasks:
                    router.add_task(t, pooled(H[t][0], L, how, pre, suf), pooled(H[t][1], L, how, pre, suf))
                acc, misses = {}, {}
                for t in cfg.tasks:
                    went = router.decide(pooled(H[t][2], L, how, pre, suf))
                    acc[t] = sum(w == t for w in went) / len(went)
                    misses[t] = [(w, p) for w, p in zip(went, val[t]) if w != t]
                print(f"| {L} | {how} | {shrink} | {min(acc.values()):.3f} | "
                      + " | ".join(f"{acc[t]:.3f}" for t in cfg.tasks) + " |")
                if args.show_misses and (L, how) == (layers[0], poolings[0]):
                    m = misses[args.show_misses]
                    print(f"  {args.show_misses} misses: {dict(Counter(str(w) for w, _ in m))}")
                    for w, p in m:
                        print(f"    -> {w}: {tok.decode(p[pre:len(p) - suf])[:120]!r}")


if __name__ == "__main__":
    main()
