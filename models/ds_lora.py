"""DS-LoRA: a shared slow LoRA branch plus a per-task fast LoRA branch on each target nn.Linear.

    y = base(x) + scaling_slow * B_slow A_slow drop(x) + scaling_fast * B_fast A_fast drop(x)

Per-task fast bank:
* The active fast branch, trained on the current task, is the parameters `lora_A_fast` (r_fast, in)
  and `lora_B_fast` (out, r_fast); the layer's `active_task` names its task (None before the first
  `start_new_task`).
* `start_new_task(model, task)` copies the active fast weights into buffers
  `lora_fast_bank_{old_task}_A` / `_B` of the same layer, then re-initialises the active branch
  (A kaiming-uniform from a seeded generator, B = 0) in place, so optimizer references stay valid.
  Buffers move with `.to(device)` and appear in `state_dict()`, but are not parameters, so
  `mark_only_lora_as_trainable` and the optimizer groups never see them; their `lora_` names make
  the saving loop pick them up. `load_ds_lora` recreates them from the file's metadata.
* The fast mode picks the fast weights the forward uses: "current" (the active branch, the
  task-agnostic default), "own_task" (the weights of a given task: active, banked, or a zero
  contribution if the task was never trained), "none" (slow branch only), and, with a task router
  attached (models.router), "routed" / "routed_soft": each row of a batch gets the branch of its
  nearest task, or a weighted mix of the nearest ones; `fast_route` holds that per-row selection.

    replace_with_ds_lora(model, ["q_proj", "v_proj"], r=8, alpha=16, dropout=0.05)
    for task in tasks:
        start_new_task(model, task, seed=cfg.seed)
        slow, fast = get_ds_lora_param_groups(model, lr_slow=1e-4, lr_fast=3e-4, weight_decay=0.0)
        ...train...
        with fast_mode(model, "own_task", task): ...evaluate...
    save_ds_lora(model, "outputs/T2")
"""

import contextlib
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from configs.base_config import FAST_MODES, ROUTED_MODES
from models.lora_simple import (  # noqa: F401  (re-exported: the training code imports them from here too)
    LORA_PREFIX,
    AdapterLinear,
    adapter_layers,
    atomic_save_safetensors,
    check_param_groups,
    check_rank,
    copy_adapter_tensors,
    get_adapter_snapshot,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    print_trainable_parameters,
    replace_linears,
    unmerge_lora,
    use_adapter_weights,
    adapters_disabled,
)

ROUTING_ATTR = "_ds_routing"  # the model attribute holding models.router.Routing (the routed modes need one)
BRANCHES = ("slow", "fast", "all")
_BANK_PREFIX = "lora_fast_bank_"


def _bank_name(task: str, which: str) -> str:
    return f"{_BANK_PREFIX}{task}_{which}"  # which: "A" (r_fast, in) or "B" (out, r_fast)


def fast_weight_names(task: str, active_task: str | None) -> tuple[str, str]:
    """Leaf names (A, B) of `task`'s fast weights in a DSLoRALinear's state dict (as `DSLoRALinear.branch` reads
    them): the active branch's parameters for the active task, else that task's bank buffers."""
    if task == active_task:
        return "lora_A_fast", "lora_B_fast"
    return _bank_name(task, "A"), _bank_name(task, "B")


def _check_task(task) -> None:
    # The name becomes part of a buffer name, so it cannot contain '.'.
    if not isinstance(task, str) or not task or "." in task:
        raise ValueError(f"task must be a non-empty string without '.', got {task!r}")


class DSLoRALinear(AdapterLinear):
    """base(x) + slow LoRA (shared by all tasks) + fast LoRA (active, banked or none, per the fast mode)."""

    def __init__(self, base_layer: nn.Linear, r_slow: int, alpha_slow: float, r_fast: int, alpha_fast: float,
                 dropout: float = 0.0):
        super().__init__(base_layer, dropout)
        check_rank(r_slow, alpha_slow, "slow")
        check_rank(r_fast, alpha_fast, "fast")
        self.r_slow, self.alpha_slow, self.scaling_slow = r_slow, alpha_slow, alpha_slow / r_slow
        self.r_fast, self.alpha_fast, self.scaling_fast = r_fast, alpha_fast, alpha_fast / r_fast
        self.lora_A_slow = self._new_weight(r_slow, self.in_features)  # (r_slow, in)
        self.lora_B_slow = self._new_weight(self.out_features, r_slow)  # (out, r_slow), zero
        self.lora_A_fast = self._new_weight(r_fast, self.in_features)  # (r_fast, in)
        self.lora_B_fast = self._new_weight(self.out_features, r_fast)  # (out, r_fast), zero
        nn.init.kaiming_uniform_(self.lora_A_slow, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_A_fast, a=math.sqrt(5))
        self.active_task: str | None = None  # task of lora_A_fast / lora_B_fast
        self.bank_tasks: list[str] = []  # finished tasks, in order, each with two bank buffers
        self.fast_mode, self.fast_task = "current", None
        # routed modes: (batch rows, [(task, rows (n,), weights (n,)), ...]), set before each forward by
        # models.router; a row in no entry gets no fast contribution (the router's fallback)
        self.fast_route: tuple[int, list] | None = None

    def branch(self, task: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of `task`'s fast weights (active or banked), or None if the task was never trained."""
        if task == self.active_task:
            return self.lora_A_fast, self.lora_B_fast
        if task in self.bank_tasks:
            return self.get_buffer(_bank_name(task, "A")), self.get_buffer(_bank_name(task, "B"))
        return None

    def selected_fast(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of the fast weights the forward uses, or None for no fast contribution."""
        if self.fast_mode in ROUTED_MODES:  # ValueError: merge_lora rolls back the layers it merged
            raise ValueError(f"fast mode {self.fast_mode!r} selects fast weights per input row, so there is no "
                             f"single selection to merge or read; use own_task, current or none for that")
        if self.fast_mode == "current":
            return self.lora_A_fast, self.lora_B_fast
        if self.fast_mode == "own_task":
            return self.branch(self.fast_task)  # None for a task that was never trained
        return None  # mode "none"

    def adapter_output(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.lora_A_slow.dtype)  # one dropout mask shared by both branches
        out = F.linear(F.linear(h, self.lora_A_slow), self.lora_B_slow) * self.scaling_slow  # (..., out)
        if self.fast_mode in ROUTED_MODES:
            return out + self.routed_fast_output(h, out)
        fast = self.selected_fast()
        if fast is not None:
            out = out + F.linear(F.linear(h, fast[0]), fast[1]) * self.scaling_fast
        return out

    def routed_fast_output(self, h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Each row's fast contribution under `fast_route`: the rows routed to one branch go through it together
        (gather, two matmuls, index_add), scaled by their weight (1 for `routed`); rows routed nowhere get 0.
        A row gets what `own_task` gives it alone; bit for bit when every row goes to one branch (0 + x and x * 1
        are exact, and the matmuls are the same)."""
        if self.fast_route is None:
            raise RuntimeError(f"fast mode {self.fast_mode!r} has no routing for this forward: attach a router with "
                               f"models.router.attach_router(model, router) and call the model's decoder (its "
                               f"forward pre-hook sets the per-row selection)")
        batch, entries = self.fast_route
        if h.shape[0] != batch:
            raise RuntimeError(f"the routing was set for {batch} rows but this forward has {h.shape[0]}; a routed "
                               f"forward must start a sequence (no KV cache) or continue the one routed last")
        fast = torch.zeros_like(like)  # (B, ..., out), the slow output's dtype (bf16 under autocast)
        for task, rows, weights in entries:
            ab = self.branch(task)
            if ab is None:
                raise RuntimeError(f"the router routes rows to task {task!r}, which has no fast weights in this layer "
                                   f"(tasks: {self.bank_tasks + [self.active_task]}); attach the router that was "
                                   f"built with these adapters")
            part = F.linear(F.linear(h[rows], ab[0]), ab[1]) * self.scaling_fast  # (n, ..., out)
            part = part * weights.view(-1, *([1] * (part.dim() - 1)))
            fast.index_add_(0, rows, part.to(fast.dtype))
        return fast

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B_slow @ self.lora_A_slow) * self.scaling_slow  # (out, in)
        fast = self.selected_fast()
        if fast is not None:
            delta = delta + (fast[1] @ fast[0]) * self.scaling_fast
        return delta

    @torch.no_grad()
    def store_active_in_bank(self) -> None:
        """Copy the active fast weights into the bank under active_task (no-op before the first task)."""
        if self.active_task is None:
            return
        self.register_buffer(_bank_name(self.active_task, "A"), self.lora_A_fast.detach().clone())
        self.register_buffer(_bank_name(self.active_task, "B"), self.lora_B_fast.detach().clone())
        self.bank_tasks.append(self.active_task)

    @torch.no_grad()
    def reset_fast(self, task: str, generator: torch.Generator) -> None:
        """Fresh active fast branch for `task`: A kaiming-uniform from `generator` (a CPU generator), B = 0."""
        a = torch.empty(self.lora_A_fast.shape, dtype=torch.float32)  # drawn on CPU so the seed fixes it on any device
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A_fast.copy_(a)
        self.lora_B_fast.zero_()
        self.active_task = task

    def reset_bank(self, tasks: list[str]) -> None:
        """Replace the bank by zero entries for `tasks` (load_ds_lora then copies the saved values in)."""
        for task in self.bank_tasks:
            delattr(self, _bank_name(task, "A"))
            delattr(self, _bank_name(task, "B"))
        self.bank_tasks = []
        for task in tasks:
            self.register_buffer(_bank_name(task, "A"), torch.zeros_like(self.lora_A_fast, requires_grad=False))
            self.register_buffer(_bank_name(task, "B"), torch.zeros_like(self.lora_B_fast, requires_grad=False))
            self.bank_tasks.append(task)

    def extra_repr(self) -> str:
        return (f"r_slow={self.r_slow}, scaling_slow={self.scaling_slow:g}, r_fast={self.r_fast}, "
                f"scaling_fast={self.scaling_fast:g}, active_task={self.active_task!r}, bank={self.bank_tasks}")


def adapter_branch(name: str) -> str | None:
    """'slow' or 'fast' for a DS-LoRA tensor name, else None."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf.startswith(_BANK_PREFIX) or (leaf.startswith(LORA_PREFIX) and leaf.endswith("_fast")):
        return "fast"
    if leaf.startswith(LORA_PREFIX) and leaf.endswith("_slow"):
        return "slow"
    return None


def ds_lora_layers(model: nn.Module) -> list[tuple[str, DSLoRALinear]]:
    """(name, layer) of every DSLoRALinear in the model."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, DSLoRALinear)]
    if not layers:
        raise ValueError("model has no DSLoRALinear layers; call replace_with_ds_lora(model, ...) first")
    return layers


def replace_with_ds_lora(model: nn.Module, target_modules, r: int, alpha: float, dropout: float = 0.0,
                         num_frozen_layers: int = 0, r_fast: int | None = None,
                         alpha_fast: float | None = None) -> list[str]:
    """Wrap the target Linear layers as DSLoRALinear (slow rank r, fast rank r_fast, default r); return their names."""
    r_fast = r if r_fast is None else r_fast
    alpha_fast = alpha if alpha_fast is None else alpha_fast
    check_rank(r, alpha, "slow")
    check_rank(r_fast, alpha_fast, "fast")
    return replace_linears(model, target_modules, num_frozen_layers,
                           lambda base: DSLoRALinear(base, r, alpha, r_fast, alpha_fast, dropout))


def get_ds_lora_param_groups(model: nn.Module, lr_slow: float, lr_fast: float,
                             weight_decay: float) -> tuple[dict, dict]:
    """AdamW groups named 'slow' and 'fast' that partition the trainable parameters."""
    params = {"slow": [], "fast": []}
    for n, p in model.named_parameters():
        if p.requires_grad and adapter_branch(n) is not None:
            params[adapter_branch(n)].append(p)
    slow = {"name": "slow", "params": params["slow"], "lr": lr_slow, "weight_decay": weight_decay}
    fast = {"name": "fast", "params": params["fast"], "lr": lr_fast, "weight_decay": weight_decay}
    check_param_groups(model, [slow, fast])
    return slow, fast


# ---------------------------------------------------------------- tasks and fast modes

def start_new_task(model: nn.Module, task: str, seed: int = 0) -> None:
    """Bank the active fast weights under the previous task (if any) and start a fresh fast branch for `task`.

    The fresh branch has B = 0, so right after this call the model equals its slow-only version.
    Create a new optimizer afterwards: AdamW moments of the old fast branch no longer apply.
    """
    _check_task(task)
    layers = ds_lora_layers(model)
    first = layers[0][1]
    if task == first.active_task or task in first.bank_tasks:
        seen = first.bank_tasks + [first.active_task]
        raise ValueError(f"task {task!r} already has fast weights (tasks so far: {seen}); use a new task name")
    if any(layer.merged for _, layer in layers):
        raise RuntimeError("call unmerge_lora(model) before start_new_task")
    generator = torch.Generator().manual_seed(seed)
    for _, layer in layers:
        layer.store_active_in_bank()
        layer.reset_fast(task, generator)


def set_fast_mode(model: nn.Module, mode: str, task: str | None = None) -> None:
    """Select the fast weights: 'current' (active), 'own_task' (those of `task`, zero if unseen), 'none', or per
    input row with the attached task router: 'routed' (nearest task), 'routed_soft' (a mix of the nearest)."""
    if mode not in FAST_MODES:
        raise ValueError(f"fast mode must be one of {FAST_MODES}, got {mode!r}")
    if mode == "own_task":
        _check_task(task)
    elif task is not None:
        raise ValueError(f"task is only used with mode='own_task', got mode={mode!r} and task={task!r}")
    if mode in ROUTED_MODES and getattr(model, ROUTING_ATTR, None) is None:
        raise ValueError(f"fast mode {mode!r} needs a task router: models.router.attach_router(model, router) "
                         f"(train_slsd_seq.py attaches one and adds each task to it after its stage)")
    layers = ds_lora_layers(model)
    if any(layer.merged for _, layer in layers):
        raise RuntimeError("call unmerge_lora(model) before changing the fast mode: "
                           "the merged weights hold the old selection")
    for _, layer in layers:
        layer.fast_mode, layer.fast_task, layer.fast_route = mode, task, None


def get_fast_mode(model: nn.Module) -> tuple[str, str | None]:
    """(mode, task) currently selected."""
    layer = ds_lora_layers(model)[0][1]
    return layer.fast_mode, layer.fast_task


@contextlib.contextmanager
def fast_mode(model: nn.Module, mode: str, task: str | None = None):
    """Use a fast mode inside the block and restore the previous one afterwards."""
    previous = get_fast_mode(model)
    set_fast_mode(model, mode, task)
    try:
        yield
    finally:
        set_fast_mode(model, *previous)


@contextlib.contextmanager
def base_model_view(model: nn.Module):
    """Run the body as the untouched base model: fast mode 'none' (banked fast weights are buffers, which
    adapters_disabled does not swap) and every lora_B zeroed, under no_grad; the previous mode comes back after."""
    with fast_mode(model, "none"), adapters_disabled(model):
        yield


# ---------------------------------------------------------------- saving and loading by branch

def ds_lora_state_dict(model: nn.Module, branch: str) -> dict[str, torch.Tensor]:
    """Adapter tensors of one branch: 'slow', 'fast' (active fast + bank) or 'all'."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    return {k: v for k, v in lora_state_dict(model).items() if branch == "all" or adapter_branch(k) == branch}


def save_ds_lora(model: nn.Module, out_dir: str) -> list[str]:
    """Write adapter_slow.safetensors and adapter_fast.safetensors (each atomically); return their paths.

    The metadata holds the bank's task list and the active task, so load_ds_lora can rebuild the bank.
    """
    layer = ds_lora_layers(model)[0][1]
    metadata = {"format": "pt", "tasks": json.dumps(layer.bank_tasks), "active_task": json.dumps(layer.active_task),
                "r_slow": str(layer.r_slow), "alpha_slow": str(layer.alpha_slow),
                "r_fast": str(layer.r_fast), "alpha_fast": str(layer.alpha_fast)}
    paths = []
    for branch in ("slow", "fast"):
        path = os.path.join(out_dir, f"adapter_{branch}.safetensors")
        atomic_save_safetensors(ds_lora_state_dict(model, branch), path, {**metadata, "branch": branch})
        paths.append(path)
    return paths


def load_ds_lora(model: nn.Module, in_dir: str, branch: str = "all") -> None:
    """Load the files written by save_ds_lora ('all', or only 'slow' / 'fast'); loading 'fast' rebuilds the bank."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    layers = ds_lora_layers(model)
    if any(layer.merged for _, layer in layers):
        raise RuntimeError("call unmerge_lora(model) before load_ds_lora")
    for b in ("slow", "fast") if branch == "all" else (branch,):
        path = os.path.join(in_dir, f"adapter_{b}.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; write it with save_ds_lora(model, {in_dir!r})")
        tensors = load_file(path)
        if b == "fast":
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
            if "tasks" not in metadata or "active_task" not in metadata:
                raise ValueError(f"{path} has no 'tasks'/'active_task' metadata; it was not written by save_ds_lora")
            tasks, active = json.loads(metadata["tasks"]), json.loads(metadata["active_task"])
            for _, layer in layers:
                layer.reset_bank(tasks)
                layer.active_task = active
        copy_adapter_tensors(model, tensors, ds_lora_state_dict(model, b).keys(), source=path)
