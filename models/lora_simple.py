"""Hand-written LoRA for nn.Linear layers (as microsoft/LoRA `loralib` and peft's LoRA layer).

A target nn.Linear is wrapped as `LoRALinear(base_layer)`:  y = base(x) + alpha/r * B A drop(x),
with A (r, in) kaiming-uniform and B (out, r) zero, so the adapted model equals the base at step 0.
Every adapter tensor name starts with `lora_`, so marking, grouping and saving are one loop each.
The generic pieces (target matching, merging, saving, weight snapshots) also serve `models.ds_lora`.

    names = replace_with_lora(model, ["q_proj", "v_proj"], r=8, alpha=16, dropout=0.05)
    optimizer = torch.optim.AdamW(get_lora_param_groups(model, lr=3e-4, weight_decay=0.0))
    save_lora(model, "outputs/T1/adapter.safetensors")
"""

import contextlib
import math
import os
import re
import tempfile
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

LORA_PREFIX = "lora_"  # every adapter parameter and buffer name starts with this
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")  # LLaMA: model.layers.{i}.self_attn.q_proj


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """fp32 adapters for a fp16/bf16 base (as peft's autocast_adapter_dtype), so small AdamW updates survive."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def check_rank(r, alpha, what: str = "lora") -> None:
    """Raise unless r is a positive int and alpha a positive number."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{what} r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"{what} alpha must be a positive number, got {alpha!r}")


class AdapterLinear(nn.Module):
    """A frozen `base_layer` plus an additive adapter; subclasses define the adapter.

    Subclasses implement `adapter_output(h)` (the added output for the dropped-out input h) and
    `delta_weight()` (the same map as an (out, in) matrix), which `merge()` folds into the base weight.
    """

    # `lora_` parameters of this layer that are never trained (I-LoRA's EMA copy, O-LoRA's earlier tasks:
    # models/lora_variants.py). They stay parameters, not buffers, so saving sees them and adapters_disabled zeroes
    # their lora_B; mark_only_lora_as_trainable leaves them frozen.
    frozen_adapter_params: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Linear, dropout: float):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"adapters wrap nn.Linear, got {type(base_layer).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        # Dropout acts on the adapter input only; the frozen base path always sees the full x.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while the adapter is folded into base_layer.weight

    def _new_weight(self, rows: int, cols: int) -> nn.Parameter:
        w = self.base_layer.weight
        return nn.Parameter(torch.zeros(rows, cols, dtype=adapter_dtype(w.dtype), device=w.device))

    def adapter_output(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., out)
        if self.merged:
            return out  # the adapter is already inside base_layer.weight
        return out + self.adapter_output(self.lora_dropout(x)).to(out.dtype)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        w = self.base_layer.weight  # (out, in)
        delta = self.delta_weight()  # (out, in), adapter dtype
        new = w.to(delta.dtype) + sign * delta
        if not torch.isfinite(new).all():
            raise ValueError("merging the adapter gives NaN/Inf weights; the adapter weights are not finite "
                             "(check the training loss and learning rate before merging)")
        w.copy_(new)

    def merge(self) -> None:
        """Fold the adapter into base_layer.weight; the forward then costs one matmul. Do not train while merged."""
        if self.merged:
            raise RuntimeError("adapter is already merged; call unmerge() first")
        self._fold(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the adapter from base_layer.weight again (exact in fp32, rounded for a bf16 base)."""
        if not self.merged:
            raise RuntimeError("adapter is not merged; call merge() first")
        self._fold(-1.0)
        self.merged = False


class LoRALinear(AdapterLinear):
    """y = base(x) + scaling * B A drop(x), with scaling = alpha / r."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base_layer, dropout)
        check_rank(r, alpha)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = self._new_weight(r, self.in_features)  # (r, in)
        self.lora_B = self._new_weight(self.out_features, r)  # (out, r); zero so the model starts as the base
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # same init as peft

    def adapter_output(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.lora_A.dtype)
        return F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling  # (..., r) -> (..., out)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


# ---------------------------------------------------------------- target matching and replacement

def matches_target(name: str, target_modules) -> bool:
    """A module name matches a target if it equals it or ends with '.' + target."""
    return any(name == t or name.endswith("." + t) for t in target_modules)


def layer_index(name: str) -> int | None:
    """Transformer layer index from a name containing 'layers.{i}', else None."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def unmatched_targets_message(model: nn.Module, unmatched: list[str], linear_names: list[str]) -> str:
    """Why `unmatched` targets select nothing, with the model's Linear module names to pick from instead."""
    kind = type(model).__name__
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear_names))  # distinct, in model order
    other = {type(m).__name__ for n, m in model.named_modules()
             if not isinstance(m, nn.Linear) and any(matches_target(n, [t]) for t in unmatched)}
    msg = f"target_modules {unmatched} match no nn.Linear in this {kind}"
    if other:
        msg += (f" (they name {', '.join(sorted(other))} modules; adapters wrap torch.nn.Linear only, so this "
                f"model family is not supported)")
    if not linear_names:
        return msg + "; it has no nn.Linear module at all"
    return (msg + f"; its nn.Linear modules are named {leaves} (full names like {linear_names[0]!r}); pass some "
            f"of these, e.g. --lora_target_modules {','.join(leaves[:2])}")


def find_target_linears(model: nn.Module, target_modules, num_frozen_layers: int = 0) -> list[str]:
    """Names of the nn.Linear modules to adapt: matching a target and in layer >= num_frozen_layers."""
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a non-empty list like ['q_proj', 'v_proj'], got {target_modules!r}")
    if isinstance(num_frozen_layers, bool) or not isinstance(num_frozen_layers, int) or num_frozen_layers < 0:
        raise ValueError(f"num_frozen_layers must be a non-negative integer, got {num_frozen_layers!r}")
    if any(LORA_PREFIX in n for n, _ in model.named_parameters()):
        raise ValueError("model already has adapter parameters (names containing 'lora_'); "
                         "add adapters to a fresh base model")
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [t for t in target_modules if not any(matches_target(n, [t]) for n in linear_names)]
    if unmatched:
        raise ValueError(unmatched_targets_message(model, unmatched, linear_names))
    matched = [n for n in linear_names if matches_target(n, target_modules)]
    if num_frozen_layers == 0:
        return matched
    indices = [i for n, _ in model.named_modules() if (i := layer_index(n)) is not None]
    if not indices:
        raise ValueError(f"num_frozen_layers={num_frozen_layers} needs module names with 'layers.{{i}}.', "
                         f"found none (e.g. {linear_names[:8]}); use num_frozen_layers=0")
    num_layers = max(indices) + 1
    kept = [n for n in matched if (i := layer_index(n)) is None or i >= num_frozen_layers]
    if num_frozen_layers >= num_layers or not kept:
        raise ValueError(f"num_frozen_layers={num_frozen_layers} leaves no target to adapt in a model with "
                         f"{num_layers} layers; use a value below {num_layers}")
    return kept


def replace_linears(model: nn.Module, target_modules, num_frozen_layers: int,
                    make_adapter: Callable[[nn.Linear], AdapterLinear]) -> list[str]:
    """Freeze the model, swap each target nn.Linear for make_adapter(linear), mark only `lora_` params trainable."""
    names = find_target_linears(model, target_modules, num_frozen_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make_adapter(getattr(parent, child)))
    mark_only_lora_as_trainable(model)
    return names


def replace_with_lora(model: nn.Module, target_modules, r: int, alpha: float, dropout: float = 0.0,
                      num_frozen_layers: int = 0) -> list[str]:
    """Wrap the target Linear layers (in layers >= num_frozen_layers) as LoRALinear; return their names."""
    check_rank(r, alpha)
    return replace_linears(model, target_modules, num_frozen_layers,
                           lambda base: LoRALinear(base, r, alpha, dropout))


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLinear]]:
    """(name, layer) of every adapter layer (LoRA or DS-LoRA) in the model."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]
    if not layers:
        raise ValueError("model has no adapter layers; call replace_with_lora / replace_with_ds_lora first")
    return layers


# ---------------------------------------------------------------- training helpers

def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """requires_grad is True exactly for parameters whose name contains 'lora_', except those an adapter layer
    lists in its frozen_adapter_params."""
    frozen = {f"{name}.{leaf}" if name else leaf for name, m in model.named_modules() if isinstance(m, AdapterLinear)
              for leaf in m.frozen_adapter_params}
    for n, p in model.named_parameters():
        p.requires_grad_(LORA_PREFIX in n and n not in frozen)


def check_param_groups(model: nn.Module, groups) -> None:
    """Raise unless every trainable parameter lands in exactly one optimizer group (and no frozen one does)."""
    names = {id(p): n for n, p in model.named_parameters()}
    owner = {}
    for g in groups:
        for p in g["params"]:
            if id(p) in owner:
                raise ValueError(f"parameter {names.get(id(p), '?')} is in groups {owner[id(p)]!r} and {g['name']!r}")
            if not p.requires_grad:
                raise ValueError(f"frozen parameter {names.get(id(p), '?')} is in group {g['name']!r}")
            owner[id(p)] = g["name"]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if missing:
        raise ValueError(f"{len(missing)} trainable parameters are in no optimizer group, e.g. {missing[:5]}; "
                         "call mark_only_lora_as_trainable(model) or add them to a group")


def get_lora_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """One AdamW group named 'lora' holding every trainable `lora_` parameter."""
    params = [p for n, p in model.named_parameters() if p.requires_grad and LORA_PREFIX in n]
    if not params:
        raise ValueError("model has no trainable 'lora_' parameters; call replace_with_lora first")
    groups = [{"name": "lora", "params": params, "lr": lr, "weight_decay": weight_decay}]
    check_param_groups(model, groups)
    return groups


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print and return (trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    percent = 100 * trainable / max(total, 1)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}")
    return trainable, total


def merge_lora(model: nn.Module) -> None:
    """merge() every adapter layer; all or nothing: if one layer fails, the ones already merged are unmerged."""
    done = []
    for name, layer in adapter_layers(model):
        try:
            layer.merge()
        except ValueError as e:
            for merged_layer in done:
                merged_layer.unmerge()
            raise ValueError(f"{name}: {e}") from e
        done.append(layer)


def unmerge_lora(model: nn.Module) -> None:
    """unmerge() every adapter layer."""
    for name, layer in adapter_layers(model):
        try:
            layer.unmerge()
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e


def _check_not_merged(model: nn.Module, action: str) -> None:
    if any(layer.merged for _, layer in adapter_layers(model)):
        raise RuntimeError(f"call unmerge_lora(model) before {action}: merged weights would be inconsistent")


# ---------------------------------------------------------------- saving and loading

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every `lora_` tensor of the model's state dict (parameters and buffers), detached, by full name."""
    return {k: v for k, v in model.state_dict().items() if LORA_PREFIX in k}


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str,
                            metadata: dict[str, str] | None = None) -> None:
    """Write via a temporary file in the same folder + os.replace, so readers never see half a file.
    Does nothing outside rank 0 of a torchrun job (rank 0 alone writes checkpoints; utils_dist.py)."""
    if os.environ.get("RANK", "0") != "0":
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def copy_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], expected_keys, source: str) -> None:
    """Copy `tensors` into the model's adapter tensors; the keys must equal expected_keys and shapes must agree."""
    current = lora_state_dict(model)  # detached views sharing storage with the parameters / buffers
    expected = set(expected_keys)
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: adapter keys do not match the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; build the model with the same target_modules and num_frozen_layers")
    with torch.no_grad():
        for k in sorted(expected):
            if current[k].shape != tensors[k].shape:
                raise ValueError(f"{source}: {k} has shape {tuple(tensors[k].shape)}, the model expects "
                                 f"{tuple(current[k].shape)}; build the model with the same lora r")
            current[k].copy_(tensors[k])


def save_lora(model: nn.Module, path: str) -> None:
    """Save every `lora_` tensor to one safetensors file (atomically)."""
    tensors = lora_state_dict(model)
    if not tensors:
        raise ValueError("model has no 'lora_' tensors to save; call replace_with_lora first")
    atomic_save_safetensors(tensors, path, metadata={"format": "pt"})


def load_lora(model: nn.Module, path: str) -> None:
    """Load adapter weights written by save_lora into a model built with the same adapter layout."""
    _check_not_merged(model, "loading adapter weights")
    copy_adapter_tensors(model, load_file(path), lora_state_dict(model).keys(), source=path)


# ---------------------------------------------------------------- PEFT's layout (export_adapter.py)

PEFT_KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model


def peft_key(module_name: str, which: str) -> str:
    """The key PEFT saves for the LoRA `which` ('A' (r, in) or 'B' (out, r)) of the Linear at `module_name` (its
    name in the HF model, e.g. model.layers.3.self_attn.q_proj); PEFT drops the adapter name ('default') on save."""
    if which not in ("A", "B"):
        raise ValueError(f"which must be 'A' or 'B', got {which!r}")
    return f"{PEFT_KEY_PREFIX}{module_name}.lora_{which}.weight"


def stack_loras(branches: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA (A, B, scaling) equal to the sum of several (A_i (r_i, in), B_i (out, r_i), scaling_i) on one Linear.

    sum_i s_i B_i A_i = s [B_1 s_1/s | B_2 s_2/s | ...] [A_1; A_2; ...] with s = s_1: A's rows and B's columns are
    concatenated (rank sum r_i) and each B_i is rescaled by s_i / s_1, which is exactly 1 (no rescaling, the
    weights are copied) when the scalings agree. One branch comes back as it is."""
    if not branches:
        raise ValueError("stack_loras needs at least one (A, B, scaling) branch")
    s = branches[0][2]
    a = torch.cat([a for a, _, _ in branches], 0)  # (sum r_i, in)
    b = torch.cat([bi if si == s else bi * (si / s) for _, bi, si in branches], 1)  # (out, sum r_i)
    return a, b, s


# ---------------------------------------------------------------- weight snapshots (self-distillation teacher)

def get_adapter_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every `lora_` parameter (for DS-LoRA: slow and active fast; the bank buffers are not parameters)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if LORA_PREFIX in n}


@contextlib.contextmanager
def use_adapter_weights(model: nn.Module, snapshot: dict[str, torch.Tensor]):
    """Run the body with the `lora_` parameters pointing at `snapshot`'s tensors, under torch.no_grad().

    Swaps `param.data` (no copies) and swaps it back on exit, so the live weights come back
    bit-identical and a student graph built before the context still backpropagates: the
    parameters' version counters are untouched. no_grad is required, not a convenience: a graph
    built inside would save tensors whose data changes on exit.
    """
    params = {n: p for n, p in model.named_parameters() if LORA_PREFIX in n}
    if snapshot.keys() != params.keys():
        missing, extra = sorted(params.keys() - snapshot.keys()), sorted(snapshot.keys() - params.keys())
        raise ValueError(f"snapshot keys do not match the model's lora_ parameters: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}; take it with get_adapter_snapshot(model)")
    for n, p in params.items():
        t = snapshot[n]
        if (t.shape, t.dtype, t.device) != (p.shape, p.dtype, p.device):
            raise ValueError(f"snapshot {n} is {tuple(t.shape)} {t.dtype} on {t.device}, the parameter is "
                             f"{tuple(p.shape)} {p.dtype} on {p.device}; take the snapshot after moving the model")
    _check_not_merged(model, "swapping adapter weights")
    live = {}
    with torch.no_grad():
        try:
            for n, p in params.items():
                live[n] = p.data
                p.data = snapshot[n]
            yield
        finally:
            for n, data in live.items():
                params[n].data = data


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the body as the untouched base model: every `lora_B*` parameter is swapped for zeros (so each
    adapter adds nothing), under torch.no_grad(). For DS-LoRA use it with fast mode 'current' or 'none'
    (banked fast weights are buffers, not swapped). No second model copy is made."""
    snapshot = {n: torch.zeros_like(t) if "lora_B" in n else t for n, t in get_adapter_snapshot(model).items()}
    with use_adapter_weights(model, snapshot):
        yield
