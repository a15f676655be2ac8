"""Replay of past tasks' training rows (the replay baseline; inscl.InsCLReplay builds on it): a memory split evenly
over the tasks seen so far, and a seeded sampler that mixes a replay batch into each forward pass.

replay_mode append: the k = per_device_batch_size // 2 replayed rows join the loader's batch (1.5x the rows of a
Seq-LoRA step, every current row of the stage is seen); mix: the loader gives per_device_batch_size - k current rows
and the k replayed ones fill the batch (a Seq-LoRA step's rows and cost; with a step cap, fewer current rows per
stage). Both weight the parts alike: mean loss of the current rows + replay_lambda x mean loss of the replayed."""
from __future__ import annotations

import torch

from utils_data import collate_fn
from utils_dist import rank, world_size
from utils_forward import to_device, token_losses
from utils_train import load_task_dataset, mean_token_loss


class Replay:
    """A memory of past tasks' training rows, split evenly over them, and a seeded sampler of replay batches."""

    def __init__(self, cfg, tokenizer, pad_id: int):
        self.cfg, self.tok, self.pad = cfg, tokenizer, pad_id
        self.items: list[dict] = []  # tokenized rows ({"input_ids", "labels", "idx"})
        self.per_task: dict[str, int] = {}
        if cfg.replay_buffer_size < len(cfg.tasks):
            raise ValueError(f"replay_buffer_size={cfg.replay_buffer_size} is smaller than the {len(cfg.tasks)} tasks: "
                             "the buffer is split evenly over past tasks, so some would get no row")
        self.gen = torch.Generator()

    def replay_rows(self) -> int:
        """Replayed rows per forward pass (micro-batch): half a batch, at least one."""
        return max(1, self.cfg.per_device_batch_size // 2)

    def current_rows(self, stage: int) -> int:
        """Current-task rows per micro-batch the loader should give at `stage` (1-based): the whole batch while
        nothing is replayed (stage 1) or with replay_mode append; with mix, the places the replayed rows leave."""
        if self.cfg.replay_mode == "mix" and stage > 1:
            return self.cfg.per_device_batch_size - self.replay_rows()
        return self.cfg.per_device_batch_size

    def end_of_task(self, seen_tasks: list[str]) -> None:
        """Rebuild the buffer over every task seen so far: replay_buffer_size // len(seen) rows from each."""
        per = self.cfg.replay_buffer_size // len(seen_tasks)
        self.gen.manual_seed(self.cfg.seed + 7 + len(seen_tasks))  # same draws whether resumed or not
        self.items, self.per_task = [], {}
        for k, task in enumerate(seen_tasks):
            ds = load_task_dataset(self.cfg, self.tok, task, self.cfg.train_split)
            g = torch.Generator().manual_seed(self.cfg.seed + 100 + k)
            pick = torch.randperm(len(ds), generator=g)[:per].tolist()
            self.items += [ds[i] for i in pick]
            self.per_task[task] = len(pick)
        print(f"[replay] buffer: {self.per_task}")

    def loss_fn(self, model, batch) -> tuple[torch.Tensor, dict]:
        """Current batch plus a replay batch in one forward; loss = mean_cur + replay_lambda * mean_replay."""
        if not self.items:
            return mean_token_loss(model, batch)
        k = self.replay_rows()
        # under torchrun every rank draws the picks of all ranks' micro-batches and keeps its own share, so the
        # replayed rows are those a single process with accumulation x ranks would replay (utils_dist.py)
        W, r = world_size(), rank()
        pick = torch.randint(len(self.items), (W * k,), generator=self.gen).tolist()[r * k:(r + 1) * k]
        cur = [{"input_ids": ids[:n], "labels": lab[:n], "idx": 0} for ids, lab, n in
               zip(batch["input_ids"].cpu(), batch["labels"].cpu(), batch["attention_mask"].sum(1).tolist())]
        both = to_device(collate_fn(cur + [self.items[i] for i in pick], self.pad), batch["input_ids"].device)
        losses, row = token_losses(model, both)
        is_replay = row >= len(cur)
        cur_loss = losses[~is_replay].mean()
        rep_loss = losses[is_replay].mean() if is_replay.any() else losses.new_zeros(())
        return cur_loss + self.cfg.replay_lambda * rep_loss, {"task_loss": cur_loss.detach(),
                                                              "replay_loss": rep_loss.detach()}
