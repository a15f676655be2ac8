"""Multi-process training with torchrun: data-parallel LoRA training, evaluation and files on rank 0.

    torchrun --nproc_per_node 8 train_slsd_seq.py --preset paper ...      # 8 GPUs (NCCL)
    torchrun --nproc_per_node 2 train_seq_baselines.py --method seq_lora  # 2 CPU processes (gloo)

What each rank does (a plain `python script.py` is world size 1 and none of this changes anything):
  * every rank holds the whole model (LoRA adapters are a few MB; the frozen base is replicated, as in DDP);
  * every rank builds the same shuffled batch order from the same seed and takes every world-th micro-batch,
    starting at its rank (`shard`), so one optimizer step over W ranks x A accumulation steps sees exactly the
    micro-batches that a single process with accumulation W x A sees, in the same grouping;
  * after the backward passes, the trainable gradients are averaged over ranks (`average_grads`: one flat
    all_reduce, what DistributedDataParallel's bucketed hooks do) before clipping and the step, so the ranks stay
    identical without broadcasting weights; the logged loss is the mean over ranks;
  * state built from seeds (replay buffers, SLSD's probe buffer and its cached teacher targets, EWC's Fisher over
    the same batches, the router) is built identically on every rank;
  * rank 0 alone evaluates, writes logs, plots and checkpoints; the other ranks wait at a barrier.
The gradient is averaged by hand rather than by wrapping the model in DistributedDataParallel: the training code
calls the decoder and the LM head apart (logits only on supervised positions) and calls extra backward passes (the
EWC penalty, SLSD's KD term), which DDP's forward-bound hooks do not see.
"""
from __future__ import annotations

import contextlib
import itertools
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_distributed(device_kind: str | None = None, timeout_hours: float = 12.0) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment); True when distributed.
    The backend is NCCL when CUDA is used, else gloo (CPU). The timeout is long because the other ranks wait at
    a barrier while rank 0 evaluates a stage. Ranks other than 0 print nothing and show no progress bars."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return world_size() > 1
    import builtins
    from datetime import timedelta
    use_cuda = torch.cuda.is_available() and device_kind != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(hours=timeout_hours))
    if rank() != 0:
        os.environ["TQDM_DISABLE"] = "1"
        builtins.print = lambda *a, **k: None
    return True


def local_device(device: torch.device) -> torch.device:
    """The device this rank trains on: its own GPU under torchrun, else `device`."""
    if device.type == "cuda" and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(batches, offset: int | None = None, every: int | None = None):
    """This rank's micro-batches of the shared order: items offset, offset + every, ... (rank and world size)."""
    offset, every = (rank() if offset is None else offset), (world_size() if every is None else every)
    return batches if every == 1 else itertools.islice(batches, offset, None, every)


def average_grads(params) -> None:
    """Average the .grad of `params` over ranks in one flat all_reduce (a missing grad counts as zero)."""
    W = world_size()
    if W == 1:
        return
    params = [p for p in params if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= W
    off = 0
    for p in params:
        n = p.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n


def sync_step_stats(stats: dict, extras: dict) -> tuple[dict, dict]:
    """Sum an accumulation's un-normalized statistics over ranks (the summed loss, the micro-batch and skip
    counts, the summed extras), so the logged loss is the mean over every rank's micro-batches and every rank
    agrees on whether the step has anything to apply. Every rank must have the same extras keys."""
    if world_size() == 1:
        return stats, extras
    names, enames = sorted(stats), sorted(extras)
    t = torch.tensor([float(stats[k]) for k in names] + [float(extras[k]) for k in enames], dtype=torch.float64)
    dist.all_reduce(t)
    vals = t.tolist()
    out = {k: (int(round(v)) if isinstance(stats[k], int) else v) for k, v in zip(names, vals)}
    return out, dict(zip(enames, vals[len(names):]))


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the body (evaluation, writing files); the others wait at a barrier until it is done."""
    try:
        yield is_main()
    finally:
        barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
