"""Forward-pass helpers that training and evaluation both use (so neither imports the other)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from utils_data import IGNORE_INDEX


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- bf16 autocast on CPU
def autocast(model):
    """The context every forward pass of `model` runs in: bf16 autocast when utils_model.enable_autocast turned it
    on, else nothing. Backward passes run outside it (as torch recommends); their dtypes follow the forward's.
    The cast cache is off: it keeps the bf16 copy of each trainable (adapter) weight for the whole region, so a
    weight changed in place inside it (adapters_disabled for the drift KL, DS-LoRA's fast views, SLSD's teacher
    swap) would go on being computed with its old value. The frozen base weights are never cached anyway."""
    if getattr(model, "_cit_autocast", False):
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- loss on supervised positions
def supervised_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits only where a next token is supervised.

    Runs the decoder, keeps hidden states at positions t whose label at t+1 is not IGNORE_INDEX, and applies
    the LM head to those alone: (N, V) instead of (B, T, V), which saves about a quarter of a CPU step.
    Returns logits (N, V) float32, targets (N,), and row (N,) = the batch row of each position, in
    row-major order (so per-sample slices are contiguous)."""
    with autocast(model):
        out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = out.last_hidden_state[:, :-1]  # (B, T-1, H): position t predicts token t+1
        targets = batch["labels"][:, 1:]  # (B, T-1)
        mask = targets != IGNORE_INDEX
        logits = model.get_output_embeddings()(hidden[mask]).float()  # (N, V)
    row = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    return logits, targets[mask], row


def token_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (N,) on supervised positions and the batch row of each token (N,)."""
    logits, targets, row = supervised_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="none"), row
