"""Two LoRA layers for the continual-learning baselines of train_seq_baselines.py (`--method ilora`, `--method olora`).

* I-LoRA (Ren et al., 2024): `EMALoRALinear` holds a fast LoRA (`lora_A`, `lora_B`, trained) and a slow one
  (`lora_A_ema`, `lora_B_ema`), the exponential moving average of the fast one, updated after every optimizer step
  by `ema_update(model, decay)`. `lora_view(model, "slow")` makes the forward use the slow LoRA (evaluation), "fast"
  (the default) the fast one (training).
* O-LoRA (Wang et al., 2023): `OLoRALinear` holds the current task's LoRA (`lora_A`, `lora_B`, trained) and the
  earlier tasks' LoRAs stacked by rank (`lora_A_old` (k r, in), `lora_B_old` (out, k r), frozen); the forward adds
  both, which is the sum of every task's LoRA (no task id). `start_olora_task` moves the current LoRA onto the stack
  and starts a fresh one; `orth_penalty` measures the overlap of the current A with the earlier A's.

The slow and the earlier tasks' tensors are frozen nn.Parameters, listed in `frozen_adapter_params` (so
mark_only_lora_as_trainable leaves them frozen), not buffers: their `lora_` names put them in save_lora / load_lora
files, and adapters_disabled (the base-model view of drift, token scoring and prompt features) zeroes every
`lora_B*` parameter, so theirs too.

    replace_with_ilora(model, ["q_proj", "v_proj"], r=8, alpha=16, num_frozen_layers=15)
    ...optimizer step...; ema_update(model, 0.9)
    with lora_view(model, "slow"): ...evaluate...
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from configs.base_config import OLORA_ORTH_NORMS
from models.lora_simple import LoRALinear, check_rank, copy_adapter_tensors, lora_state_dict, replace_linears

VIEWS = ("fast", "slow")  # which I-LoRA LoRA the forward uses


def _frozen_like(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


# ---------------------------------------------------------------- I-LoRA: a fast LoRA and its moving average

class EMALoRALinear(LoRALinear):
    """y = base(x) + scaling * B A drop(x) with (A, B) the fast LoRA or, in view "slow", its EMA."""

    frozen_adapter_params = ("lora_A_ema", "lora_B_ema")

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base_layer, r, alpha, dropout)
        self.lora_A_ema = _frozen_like(self.lora_A)  # (r, in): starts equal to the fast LoRA
        self.lora_B_ema = _frozen_like(self.lora_B)  # (out, r), zero
        self.view = "fast"

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the LoRA the forward uses in the current view."""
        return (self.lora_A, self.lora_B) if self.view == "fast" else (self.lora_A_ema, self.lora_B_ema)

    def adapter_output(self, h: torch.Tensor) -> torch.Tensor:
        a, b = self.weights()
        return F.linear(F.linear(h.to(a.dtype), a), b) * self.scaling  # (..., r) -> (..., out)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.weights()
        return (b @ a) * self.scaling  # (out, in)

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        """slow <- decay * slow + (1 - decay) * fast, for A and B alike."""
        self.lora_A_ema.mul_(decay).add_(self.lora_A, alpha=1.0 - decay)
        self.lora_B_ema.mul_(decay).add_(self.lora_B, alpha=1.0 - decay)

    @torch.no_grad()
    def copy_slow_to_fast(self) -> None:
        self.lora_A.copy_(self.lora_A_ema)
        self.lora_B.copy_(self.lora_B_ema)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", view={self.view}"


def replace_with_ilora(model: nn.Module, target_modules, r: int, alpha: float, dropout: float = 0.0,
                       num_frozen_layers: int = 0) -> list[str]:
    """Wrap the target Linear layers (in layers >= num_frozen_layers) as EMALoRALinear; return their names."""
    check_rank(r, alpha)
    return replace_linears(model, target_modules, num_frozen_layers,
                           lambda base: EMALoRALinear(base, r, alpha, dropout))


def ilora_layers(model: nn.Module) -> list[EMALoRALinear]:
    layers = [m for m in model.modules() if isinstance(m, EMALoRALinear)]
    if not layers:
        raise ValueError("model has no EMALoRALinear layers; call replace_with_ilora(model, ...) first")
    return layers


def ema_update(model: nn.Module, decay: float) -> None:
    """The slow LoRA of every layer moves toward the fast one: slow <- decay * slow + (1 - decay) * fast."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay!r}")
    for layer in ilora_layers(model):
        layer.ema_update(decay)


def copy_slow_to_fast(model: nn.Module) -> None:
    """Make the fast LoRA equal to the slow one (the evaluated model), e.g. before a recovery probe trains it."""
    for layer in ilora_layers(model):
        layer.copy_slow_to_fast()


@contextlib.contextmanager
def lora_view(model: nn.Module, view: str):
    """Inside, every I-LoRA layer computes with the `view` LoRA ("fast" or "slow"); the previous one is back after."""
    if view not in VIEWS:
        raise ValueError(f"I-LoRA view must be one of {VIEWS}, got {view!r}")
    layers = ilora_layers(model)
    if any(layer.merged for layer in layers):
        raise RuntimeError("call unmerge_lora(model) before changing the I-LoRA view: the merged weights hold the "
                           "old one")
    previous = [layer.view for layer in layers]
    for layer in layers:
        layer.view = view
    try:
        yield
    finally:
        for layer, v in zip(layers, previous):
            layer.view = v


def consistency_loss(h_fast: torch.Tensor, h_slow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between two passes' hidden states (B, T, H) over the positions where mask (B, T) is 1: the mean over those
    positions and the H features of (h_fast - h_slow)^2, in float32."""
    if h_fast.shape != h_slow.shape or h_fast.shape[:2] != mask.shape:
        raise ValueError(f"consistency_loss needs hidden states of one shape (B, T, H) and a (B, T) mask, got "
                         f"{tuple(h_fast.shape)}, {tuple(h_slow.shape)} and {tuple(mask.shape)}")
    keep = mask.bool()
    if not keep.any():
        raise ValueError("consistency_loss: the mask selects no position")
    return (h_fast[keep].float() - h_slow[keep].float()).pow(2).mean()  # (N, H) -> ()


@contextlib.contextmanager
def record_decoder(decoder: nn.Module, layer: int):
    """Record what the decoder passes inside compute (the last one wins), graph kept: a dict with "attention_mask"
    and "input_ids" (the call's), "entering" (the hidden states entering decoder.layers[layer]) and "last" (the
    decoder's last_hidden_state, (B, T, H))."""
    rec: dict = {}

    def before(module, args, kwargs):
        rec["input_ids"], rec["attention_mask"] = kwargs.get("input_ids"), kwargs.get("attention_mask")

    def entering(module, args, kwargs):
        rec["entering"] = args[0] if args else kwargs["hidden_states"]

    def after(module, args, kwargs, output):
        rec["last"] = output.last_hidden_state

    handles = [decoder.register_forward_pre_hook(before, with_kwargs=True),
               decoder.layers[layer].register_forward_pre_hook(entering, with_kwargs=True),
               decoder.register_forward_hook(after, with_kwargs=True)]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def decoder_from_layer(decoder: nn.Module, first: int):
    """Inside, the decoder runs only layers[first:]: call it with inputs_embeds = the hidden states entering layer
    `first` (as utils_forward.TrunkCache does; a decoder that transforms inputs_embeds, as Gemma scales them, would
    give something else, so a caller checks the result against a full pass once)."""
    full = decoder.layers
    decoder.layers = nn.ModuleList(list(full)[first:])
    try:
        yield
    finally:
        decoder.layers = full


# ---------------------------------------------------------------- O-LoRA: one LoRA per task, orthogonal A's

class OLoRALinear(LoRALinear):
    """y = base(x) + scaling * (B A + B_old A_old) drop(x): the current task's LoRA plus every earlier task's, stacked
    by rank (A_old = [A_1; ...; A_k] (k r, in), B_old = [B_1 | ... | B_k] (out, k r)), which is their sum."""

    frozen_adapter_params = ("lora_A_old", "lora_B_old")

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base_layer, r, alpha, dropout)
        self.resize_old(0)

    @property
    def n_old(self) -> int:
        """Earlier tasks on the stack."""
        return self.lora_A_old.shape[0] // self.r

    def resize_old(self, n_tasks: int) -> None:
        """A zero stack for `n_tasks` earlier tasks (load_olora then copies the saved values in)."""
        self.lora_A_old = _frozen_like(self._new_weight(n_tasks * self.r, self.in_features))  # (k r, in)
        self.lora_B_old = _frozen_like(self._new_weight(self.out_features, n_tasks * self.r))  # (out, k r)

    def adapter_output(self, h: torch.Tensor) -> torch.Tensor:
        out = super().adapter_output(h)  # the current task's LoRA
        if self.lora_A_old.shape[0]:
            out = out + F.linear(F.linear(h.to(self.lora_A_old.dtype), self.lora_A_old), self.lora_B_old) * self.scaling
        return out

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A + self.lora_B_old @ self.lora_A_old) * self.scaling  # (out, in)

    @torch.no_grad()
    def push_current(self, generator: torch.Generator) -> None:
        """Append the current LoRA to the stack and start a fresh one: A kaiming-uniform from `generator` (a CPU
        generator, so the seed fixes it on any device), B = 0 (the model is unchanged by the call)."""
        self.lora_A_old = _frozen_like(torch.cat([self.lora_A_old, self.lora_A], 0))
        self.lora_B_old = _frozen_like(torch.cat([self.lora_B_old, self.lora_B], 1))
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A.copy_(a)
        self.lora_B.zero_()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", earlier_tasks={self.n_old}"


def replace_with_olora(model: nn.Module, target_modules, r: int, alpha: float, dropout: float = 0.0,
                       num_frozen_layers: int = 0) -> list[str]:
    """Wrap the target Linear layers (in layers >= num_frozen_layers) as OLoRALinear; return their names."""
    check_rank(r, alpha)
    return replace_linears(model, target_modules, num_frozen_layers,
                           lambda base: OLoRALinear(base, r, alpha, dropout))


def olora_layers(model: nn.Module) -> list[tuple[str, OLoRALinear]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, OLoRALinear)]
    if not layers:
        raise ValueError("model has no OLoRALinear layers; call replace_with_olora(model, ...) first")
    return layers


def start_olora_task(model: nn.Module, seed: int) -> None:
    """Freeze the current task's LoRA onto every layer's stack and start a fresh one (A drawn from `seed`, B = 0).
    Create the optimizer afterwards: the stacks are new tensors and the fresh LoRA's AdamW moments must restart."""
    layers = olora_layers(model)
    if any(layer.merged for _, layer in layers):
        raise RuntimeError("call unmerge_lora(model) before start_olora_task")
    generator = torch.Generator().manual_seed(seed)
    for _, layer in layers:
        layer.push_current(generator)


def orth_penalty(a_new: torch.Tensor, a_old: torch.Tensor, norm: str = "abs") -> torch.Tensor:
    """The overlap of the current task's A (r, in) with the earlier tasks' A's stacked (k r, in): the entries of
    A_new A_old^T (r, k r), which are those of every A_new A_i^T, summed as absolute values ("abs", as O-LoRA's code)
    or as squares ("fro2", the squared Frobenius norm of the paper's equation)."""
    if norm not in OLORA_ORTH_NORMS:
        raise ValueError(f"orthogonality norm must be one of {OLORA_ORTH_NORMS}, got {norm!r}")
    overlap = a_new @ a_old.T  # (r, k r)
    return overlap.abs().sum() if norm == "abs" else overlap.pow(2).sum()


def olora_penalty(model: nn.Module, norm: str = "abs") -> tuple[torch.Tensor, torch.Tensor]:
    """(orth, l2) summed over the adapted modules: orth_penalty of each layer's current A against its stack (0 with
    no earlier task), and the squared L2 norm of the current LoRA (A and B)."""
    layers = olora_layers(model)
    a = layers[0][1].lora_A
    orth, l2 = a.new_zeros(()), a.new_zeros(())
    for _, layer in layers:
        if layer.lora_A_old.shape[0]:
            orth = orth + orth_penalty(layer.lora_A, layer.lora_A_old, norm)
        l2 = l2 + layer.lora_A.pow(2).sum() + layer.lora_B.pow(2).sum()
    return orth, l2


def load_olora(model: nn.Module, path: str) -> None:
    """Load a save_lora file of an O-LoRA model: each layer's stack is first sized to the file's (k r rows)."""
    tensors = load_file(path)
    layers = olora_layers(model)
    if any(layer.merged for _, layer in layers):
        raise RuntimeError("call unmerge_lora(model) before load_olora")
    for name, layer in layers:
        key = f"{name}.lora_A_old"
        if key not in tensors:
            raise ValueError(f"{path}: no {key}; not an O-LoRA checkpoint of this model (build it with the same "
                             f"target_modules and num_frozen_layers, and --method olora)")
        rows = tensors[key].shape[0]
        if rows % layer.r:
            raise ValueError(f"{path}: {key} has {rows} rows, not a multiple of lora r = {layer.r}; build the model "
                             f"with the same lora r")
        layer.resize_old(rows // layer.r)
    copy_adapter_tensors(model, tensors, lora_state_dict(model).keys(), source=path)
