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

import contextlib
import hashlib
import math

import torch
from torch import nn

from utils_data import IGNORE_INDEX
from models.lora_variants import decoder_from_layer, record_decoder
from utils_forward import autocast, kv_cache, token_losses

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
        # the trunk handoff (see training_forward): the scoring pass's hidden states entering the first adapted layer,
        # for the training forward over the same rows that follows it; `handoffs` counts those it served
        self.first: int | None = None  # the first adapted decoder layer; 0 = no frozen trunk (no handoff)
        self.handoff_ok: bool | None = None  # whether starting at `first` gives the full pass (checked once)
        self.handoff: tuple | None = None  # (input_ids, attention_mask, hidden) of the last scoring pass
        self.handoffs = 0

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
        self.handoff = None
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
        # the whole batch, untrimmed: the training forward over it can start from this pass's trunk (handoff)
        whole = len(rows) == batch["input_ids"].shape[0] and T == batch["input_ids"].shape[1]
        decoder = model.get_decoder()
        if self.first is None:
            self.first = frozen_trunk_depth(model)
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # no dropout, so no random numbers drawn: training after this pass is as without it
        try:
            with _base_context(model):
                if whole and self.first and self.handoff_ok is not False:
                    with record_decoder(decoder, self.first) as rec:
                        losses, row = token_losses(model, sub)  # (N,), (N,)
                    if self.handoff_ok is None:
                        self.handoff_ok = self._upper_pass_matches(model, sub, rec)
                    if self.handoff_ok:
                        self.handoff = (sub["input_ids"], sub["attention_mask"], rec["entering"].detach())
                else:
                    losses, row = token_losses(model, sub)  # (N,), (N,)
        finally:
            for m, training in modes:  # each module's own mode back (a model may mix them)
                m.training = training
        losses = losses.float().cpu()
        row = row.cpu()
        return [losses[row == r].clone() for r in range(len(rows))]

    def _upper_pass_matches(self, model, sub, rec) -> bool:
        """Whether the decoder's layers from `first` on, fed the recorded input of that layer, give the whole pass's
        last hidden state (they do unless the decoder transforms inputs_embeds, as Gemma scales them)."""
        decoder = model.get_decoder()
        with autocast(model), decoder_from_layer(decoder, self.first):
            upper = decoder(inputs_embeds=rec["entering"], attention_mask=sub["attention_mask"],
                            use_cache=False).last_hidden_state
        same = torch.equal(upper, rec["last"])
        if not same:
            print(f"[loss_tokens] the training forward cannot start at layer {self.first} of "
                  f"{type(decoder).__name__} (differs from the whole pass by "
                  f"{float((upper.float() - rec['last'].float()).abs().max()):.3g}); it runs every layer")
        return same

    @contextlib.contextmanager
    def training_forward(self, model):
        """Around a method's loss: the first decoder forward inside, when it runs on exactly the rows the scoring pass
        just ran (same input ids and mask: Seq-LoRA, EWC, O-LoRA, DS-LoRA; not Replay, which appends rows), starts
        from that pass's hidden states entering the first adapted layer instead of recomputing the frozen layers
        below it (no adapter, no dropout and no gradient there, so the values are the same: bit-identical, tested).
        The handoff is used once, then dropped."""
        handoff, self.handoff = self.handoff, None
        if handoff is None:
            yield
            return
        decoder, state = model.get_decoder(), {}

        def before(module, args, kwargs):
            nonlocal handoff
            if handoff is None:
                return None
            ids, mask, hidden = handoff
            handoff = None  # one decoder forward only
            x, m = kwargs.get("input_ids"), kwargs.get("attention_mask")
            if (args or x is None or kwargs.get("inputs_embeds") is not None or kv_cache(kwargs) is not None
                    or m is None or x.shape != ids.shape or not torch.equal(x, ids) or not torch.equal(m, mask)):
                return None
            state["layers"] = decoder.layers
            decoder.layers = nn.ModuleList(list(decoder.layers)[self.first:])
            self.handoffs += 1
            return (), {**kwargs, "input_ids": None, "inputs_embeds": hidden, "use_cache": False}

        def after(module, args, kwargs, output):
            if "layers" in state:
                decoder.layers = state.pop("layers")

        handles = [decoder.register_forward_pre_hook(before, with_kwargs=True),
                   decoder.register_forward_hook(after, with_kwargs=True)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            if "layers" in state:  # the forward raised between the hooks
                decoder.layers = state.pop("layers")


def frozen_trunk_depth(model) -> int:
    """The index of the first decoder layer with an adapter when every parameter below it is frozen, else 0 (no
    frozen trunk a training forward could skip)."""
    from models.lora_simple import LORA_PREFIX
    decoder = model.get_decoder()
    adapted = [i for i, layer in enumerate(decoder.layers) if any(LORA_PREFIX in n for n, _ in layer.named_parameters())]
    if not adapted:
        return 0
    first = adapted[0]
    below = [p for i in range(first) for p in decoder.layers[i].parameters()] + list(decoder.embed_tokens.parameters())
    return 0 if any(p.requires_grad for p in below) else first


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
