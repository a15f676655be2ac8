"""Token-selective losses (`--loss_tokens key | low_ppl`): supervise only some response tokens of each training row,
chosen by the frozen base model's per-token loss. An option for every method: utils_train.accumulate_grads masks
the other labels (IGNORE_INDEX) before the method's loss_fn sees the batch.

  * key:     the `key_token_frac` share of each row's response tokens the base model predicts worst, what it does not
             yet know (in the spirit of Rho-1's selective language modelling, Lin et al. 2024, which keeps the tokens
             of highest excess loss against a reference model);
  * low_ppl: the `low_ppl_token_frac` share it predicts best, i.e. the highest-perplexity tokens masked (Selective
             Token Masking, Wu et al., "Mitigating Forgetting in LLM Fine-Tuning via Low-Perplexity Token Learning",
             NeurIPS 2025), or with `low_ppl_threshold` = tau > 1 the paper's rule: mask every token whose base
             perplexity exp(loss) exceeds tau.
Every row keeps at least one token, so no micro-batch becomes empty. The base model is the model being trained with
its adapters off (evaluation.drift's base view); each row is scored once, lazily, on the step that first draws it (one
no-grad forward of the rows not seen before), and its per-token losses are cached under its sample id and a digest of
its tokens (two datasets' "row:0" never share scores).
"""
from __future__ import annotations

import hashlib
import math

import torch

from utils_data import IGNORE_INDEX
from utils_forward import token_losses

SUFFIX_SEP = "+"  # method name + "+" + loss_tokens: seq_lora+key


# ----------------------------------------------------------------------------- the selection
def select_tokens(losses: torch.Tensor, mode: str, frac: float, threshold: float = 0.0) -> torch.Tensor:
    """Which of one row's response tokens to supervise, from their base-model losses (n,): a bool mask (n,).

    key: the round(frac * n) highest losses; low_ppl: the round(frac * n) lowest, or with threshold > 1 every token
    with exp(loss) <= threshold. At least one token is kept (the row's worst for key, its best for low_ppl); ties go
    to the earlier position; a non-finite loss counts as the highest."""
    if mode not in ("key", "low_ppl"):
        raise ValueError(f"select_tokens: mode must be key or low_ppl, got {mode!r}")
    losses = torch.nan_to_num(losses.detach().float().cpu(), nan=math.inf)
    n = losses.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    if n == 0:
        return keep
    if mode == "low_ppl" and threshold > 0:
        keep = losses <= math.log(threshold)
        if not keep.any():
            keep[int(torch.argmin(losses))] = True  # argmin: the first of equal minima
        return keep
    k = min(n, max(1, int(frac * n + 0.5)))  # round half up (Python's round() goes to even)
    order = torch.sort(losses, descending=(mode == "key"), stable=True).indices  # (n,) stable: ties keep position order
    keep[order[:k]] = True
    return keep


def mode_settings(cfg) -> tuple[str, float, float]:
    """(mode, fraction, threshold) of cfg's selection."""
    if cfg.loss_tokens == "key":
        return "key", cfg.key_token_frac, 0.0
    if cfg.loss_tokens == "low_ppl":
        return "low_ppl", cfg.low_ppl_token_frac, cfg.low_ppl_threshold
    raise ValueError(f"loss_tokens={cfg.loss_tokens!r} selects no tokens (select with key or low_ppl)")


# ----------------------------------------------------------------------------- the base model's scores, cached
def row_key(sample_id, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(sample id or None, digest of the row's unpadded input ids and labels)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(input_ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return (sample_id, h.hexdigest())


class BaseTokenScores:
    """Per-token losses of training rows under the frozen base model, computed once per row.

    `cache[key]` = (n,) float32 CPU losses on the row's supervised positions (row-major, as utils_forward.token_losses
    orders them). `rows_scored` and `passes` count the rows scored and the no-grad forwards that scored them."""

    def __init__(self):
        self.cache: dict[tuple, torch.Tensor] = {}
        self.rows_scored = 0
        self.passes = 0

    def row_losses(self, model, batch) -> list[torch.Tensor]:
        """The base losses of every row of `batch` ({"input_ids", "attention_mask", "labels"} (B, T), optional
        "ids": B sample ids); rows not cached yet are scored in one no-grad pass with the adapters off."""
        lengths = batch["attention_mask"].sum(1).tolist()
        ids = batch.get("ids") or [None] * len(lengths)
        input_ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()  # one copy each, not one per row
        keys = [row_key(ids[i], input_ids[i, :n], labels[i, :n]) for i, n in enumerate(lengths)]
        todo, seen = [], set()
        for i, k in enumerate(keys):
            if k not in self.cache and k not in seen:  # a row drawn twice in one batch is scored once
                todo.append(i)
                seen.add(k)
        if todo:
            for i, losses in zip(todo, self._score(model, batch, todo, max(lengths[i] for i in todo))):
                self.cache[keys[i]] = losses
            self.rows_scored += len(todo)
            self.passes += 1
        return [self.cache[k] for k in keys]

    @torch.no_grad()
    def _score(self, model, batch, rows: list[int], T: int) -> list[torch.Tensor]:
        from evaluation.drift import _base_context  # the one definition of "the untouched base" (DS-LoRA: fast off)
        sub = {k: batch[k][rows, :T] for k in ("input_ids", "attention_mask", "labels")}  # (R, T): padding trimmed
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # no dropout, so no random numbers drawn: training after this pass is as without it
        try:
            with _base_context(model):
                losses, row = token_losses(model, sub)  # (N,), (N,)
        finally:
            for m, training in modes:  # each module's own mode back (a model may mix them)
                m.training = training
        losses = losses.float().cpu()
        row = row.cpu()
        return [losses[row == r].clone() for r in range(len(rows))]


def base_scores(model) -> BaseTokenScores:
    """The model's cache of base-model token losses (created on first use; it lives as long as the model)."""
    scores = getattr(model, "_cit_base_token_scores", None)
    if scores is None:
        scores = BaseTokenScores()
        model._cit_base_token_scores = scores
    return scores


def select_loss_tokens(model, batch, cfg) -> tuple[dict, int, int]:
    """`batch` with the labels of unselected response tokens set to IGNORE_INDEX (a new labels tensor), and the
    counts (kept, supervised) of its response tokens. Call it before the training forward."""
    mode, frac, threshold = mode_settings(cfg)
    per_row = base_scores(model).row_losses(model, batch)
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    labels = batch["labels"].clone()
    kept = total = 0
    for i, losses in enumerate(per_row):
        pos = (targets[i] != IGNORE_INDEX).nonzero().squeeze(1)  # (n,) supervised positions of row i
        if pos.numel() != losses.numel():
            raise RuntimeError(f"row {i} has {pos.numel()} supervised tokens but {losses.numel()} cached base "
                               f"losses; the cache key did not follow the row's tokens")
        keep = select_tokens(losses, mode, frac, threshold).to(pos.device)
        labels[i, pos[~keep] + 1] = IGNORE_INDEX
        kept += int(keep.sum())
        total += pos.numel()
    return {**batch, "labels": labels}, kept, total


def method_suffix(cfg) -> str:
    """'' for loss_tokens all, else '+key' / '+low_ppl': what a run's method name ends with."""
    return "" if cfg.loss_tokens == "all" else SUFFIX_SEP + cfg.loss_tokens
