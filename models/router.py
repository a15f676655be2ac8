"""Task routing for DS-LoRA without a task id: each input row gets the fast branch of its nearest task.

A task is described by the frozen base model, so its description cannot drift: the hidden states after decoder
layer `router_layer` (every adapter off), mean-pooled over the prompt's tokens. After stage t, task t gets
`router_rows_per_task` of its training rows as its description and as many other training rows held out to
calibrate its fallback radius; earlier tasks keep the features they got at their own stage (no old task's rows
are read again). The router file holds those features; the fit is recomputed from them:

    mu_k   = mean of task k's description features                                      (K, H)
    S      = pooled within-task covariance of the description features (n - K dof)      (H, H)
    Sigma  = (1 - s) S + s diag(S)            s = router_shrinkage; the diagonal target keeps each hidden
                                              dimension's own scale (they differ by orders of magnitude)
    d_k(x) = sqrt((x - mu_k)^T Sigma^-1 (x - mu_k))                                    Mahalanobis distance
    r_k    = the router_fallback_quantile quantile of d_k over task k's held-out rows   (fallback radius)

Routing of a row with features x (k* = argmin_k d_k(x)):
    routed       the fast branch of k*; the slow branch alone when d_k*(x) > r_k* (far from every task)
    routed_soft  the top-k nearest tasks, weighted by softmax(-d_k^2 / (2 T)) (T = router_temperature; at T = 1
                 the posterior of a Gaussian model with the shared covariance and equal priors); same fallback

Applying it: `attach_router(model, router)` puts one forward pre-hook on the decoder. In a routed fast mode, a
forward that starts a sequence (no KV cache yet) is routed first: ONE pass of the base model through its first
router_layer layers per prompt (memoized by prompt ids, as the base is frozen), then every DSLoRALinear gets the
per-row selection. A forward that continues a KV cache (generate's decoding steps) keeps its prompt's routing.
A row's prompt is its unpadded input (generation: the input is the prompt), or, inside
`routing_prompts(model, prompts)`, the given prompt its input starts with (teacher-forced prompt + response,
knowledge's packed candidates): the response never influences the routing.

    router = TaskRouter.from_config(cfg)
    attach_router(model, router, batch_size=cfg.eval_batch_size)
    router.add_task("T1_general", *describe_task(model, prompts_t1, cfg.router_rows_per_task, cfg.router_layer, 16))
    with fast_mode(model, "routed"), routing_prompts(model, batch_prompts(batch)):
        losses, _ = token_losses(model, batch)
"""
from __future__ import annotations

import contextlib
import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from models.ds_lora import (ROUTED_MODES, ROUTING_ATTR, AdapterLinear, DSLoRALinear, adapters_disabled,
                            atomic_save_safetensors, base_model_view, ds_lora_layers)
from utils_data import IGNORE_INDEX
from utils_forward import autocast, kv_cache, trunk_bypass

ROUTER_FILE = "router.safetensors"  # saved in every DS-LoRA stage checkpoint


# ----------------------------------------------------------------------------- features from the frozen base
class _StopForward(Exception):
    """Raised by a forward hook on the router layer: nothing after that layer runs."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def check_layer(model: nn.Module, layer) -> int:
    n = len(model.get_decoder().layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
        raise ValueError(f"router_layer must be an integer in [0, {n}] (0 = token embeddings; this model has {n} "
                         f"decoder layers), got {layer!r}")
    return layer


@torch.no_grad()
def prompt_features(model: nn.Module, prompts: list[list[int]], layer: int, batch_size: int) -> torch.Tensor:
    """(N, H) float32 on CPU: per prompt, the mean over its tokens of the base model's hidden state after decoder
    layer `layer` (0 = the token embeddings). Adapters off; the forward stops at that layer (a hook raises), so
    the cost is layer / num_layers of one forward. Prompts are batched by length, right-padded, masked."""
    check_layer(model, layer)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompt_features: an empty prompt has no hidden states to pool; every row needs a prompt")
    decoder = model.get_decoder()
    if not prompts:
        return torch.zeros(0, model.get_input_embeddings().weight.shape[1])
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding per batch
    out: list[torch.Tensor | None] = [None] * len(prompts)

    def stop(module, args, output):
        raise _StopForward(output[0] if isinstance(output, tuple) else output)

    handle = decoder.layers[layer - 1].register_forward_hook(stop) if layer > 0 else None
    was_training = model.training
    model.eval()
    kinds = {type(m) for m in model.modules() if isinstance(m, AdapterLinear)}
    view = (base_model_view(model) if DSLoRALinear in kinds else adapters_disabled(model) if kinds
            else contextlib.nullcontext())
    try:
        with view, autocast(model), trunk_bypass(model):  # a pass that stops early stores nothing
            for s in range(0, len(order), batch_size):
                chunk = order[s:s + batch_size]
                T = max(len(prompts[i]) for i in chunk)
                ids = torch.zeros((len(chunk), T), dtype=torch.long)
                mask = torch.zeros((len(chunk), T), dtype=torch.long)  # from lengths, never from a pad id
                for b, i in enumerate(chunk):
                    ids[b, :len(prompts[i])] = torch.tensor(prompts[i])
                    mask[b, :len(prompts[i])] = 1
                ids, mask = ids.to(device), mask.to(device)
                if layer == 0:
                    hidden = model.get_input_embeddings()(ids)
                else:
                    try:
                        decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                        raise RuntimeError(f"decoder layer {layer - 1} never ran; the decoder skips layers?")
                    except _StopForward as stop_at:
                        hidden = stop_at.hidden  # (b, T, H)
                m = mask.unsqueeze(-1).float()  # (b, T, 1)
                pooled = (hidden.float() * m).sum(1) / m.sum(1)  # (b, H)
                for b, i in enumerate(chunk):
                    out[i] = pooled[b].cpu()
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    return torch.stack(out)


def batch_prompts(batch: dict) -> list[list[int]]:
    """Each row's prompt in a collated (right-padded) batch: its tokens before the first supervised label (its
    whole unpadded input when nothing is supervised)."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    sup = labels != IGNORE_INDEX  # (B, T)
    first = torch.where(sup.any(1), sup.int().argmax(1), mask.sum(1))  # (B,)
    return [ids[b, :int(first[b])].tolist() for b in range(ids.shape[0])]


def dataset_prompts(dataset) -> list[list[int]]:
    """The prompt of every example of an InstructionDataset (the tokens whose label is IGNORE_INDEX before the
    response), as training and the eval loss see it."""
    out = []
    for ids, labels in dataset.examples:
        first = next((t for t, y in enumerate(labels) if y != IGNORE_INDEX), len(ids))
        out.append(list(ids[:first]))
    return out


def split_rows(n: int, rows_per_task: int, seed: int) -> tuple[list[int], list[int]]:
    """(description rows, held-out rows) among n: a seeded permutation (its own generator, so training's random
    stream is untouched), min(rows_per_task, ceil(n / 2)) rows first, then min(rows_per_task, the rest)."""
    if n < 3:
        raise ValueError(f"the task router needs at least 3 training rows of a task (2 to describe it, 1 held out "
                         f"for its fallback radius), got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_fit = min(rows_per_task, math.ceil(n / 2))
    n_cal = min(rows_per_task, n - n_fit)
    return perm[:n_fit], perm[n_fit:n_fit + n_cal]


def describe_task(model: nn.Module, prompts: list[list[int]], rows_per_task: int, layer: int, batch_size: int,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(description features (n, H), held-out features (m, H)) of one task from its training prompts."""
    fit, cal = split_rows(len(prompts), rows_per_task, seed)
    feats = prompt_features(model, [prompts[i] for i in fit + cal], layer, batch_size)
    return feats[:len(fit)], feats[len(fit):]


# ----------------------------------------------------------------------------- the router
class TaskRouter:
    """Nearest-task routing on base-model prompt features (see the module docstring). It holds each task's
    description and held-out features; the fit (centroids, whitening, fallback radii) is recomputed from them
    whenever a task is added or the router is loaded, with this router's shrinkage and quantile."""

    def __init__(self, layer: int, shrinkage: float, fallback_quantile: float, temperature: float, topk: int):
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"router layer must be an integer >= 0, got {layer!r}")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"router shrinkage must be in [0, 1], got {shrinkage}")
        if not 0.0 <= fallback_quantile <= 1.0:
            raise ValueError(f"router fallback quantile must be in [0, 1] (0 = no fallback), got {fallback_quantile}")
        if not temperature > 0:
            raise ValueError(f"router temperature must be positive, got {temperature}")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"router topk must be an integer >= 1, got {topk!r}")
        self.layer, self.shrinkage, self.fallback_quantile = layer, shrinkage, fallback_quantile
        self.temperature, self.topk = temperature, topk
        self.tasks: list[str] = []
        self.fit_features: dict[str, torch.Tensor] = {}  # task -> (n_k, H) float32: its description
        self.cal_features: dict[str, torch.Tensor] = {}  # task -> (m_k, H) float32: held out, sets its radius
        self._fit()

    @classmethod
    def from_config(cls, cfg) -> "TaskRouter":
        return cls(cfg.router_layer, cfg.router_shrinkage, cfg.router_fallback_quantile, cfg.router_temperature,
                   cfg.router_topk)

    # --- building
    def add_task(self, task: str, fit_features: torch.Tensor, cal_features: torch.Tensor) -> None:
        if not isinstance(task, str) or not task or "." in task:
            raise ValueError(f"task must be a non-empty string without '.', got {task!r}")
        if task in self.tasks:
            raise ValueError(f"task {task!r} is already described (tasks: {self.tasks}); each task is added once")
        H = self.fit_features[self.tasks[0]].shape[1] if self.tasks else fit_features.shape[-1]
        for name, f in (("description", fit_features), ("held-out", cal_features)):
            if f.dim() != 2 or f.shape[1] != H:
                raise ValueError(f"{task}: {name} features must be (rows, {H}), got {tuple(f.shape)}")
            if not torch.isfinite(f).all():
                raise ValueError(f"{task}: {name} features are not finite")
        if fit_features.shape[0] < 2:
            raise ValueError(f"{task}: at least 2 description rows are needed (a centroid and a spread), "
                             f"got {fit_features.shape[0]}")
        self.tasks.append(task)
        self.fit_features[task] = fit_features.detach().float().cpu()
        self.cal_features[task] = cal_features.detach().float().cpu()
        self._fit()

    def _fit(self) -> None:
        """Centroids, the whitening W (Sigma^-1 = W^T W) and each task's fallback radius, in float64."""
        if not self.tasks:
            self.centroids = self._whitened_centroids = self._whiten = None
            self.radii = torch.zeros(0, dtype=torch.float64)
            return
        feats = [self.fit_features[t].double() for t in self.tasks]
        mu = torch.stack([f.mean(0) for f in feats])  # (K, H)
        X = torch.cat([f - m for f, m in zip(feats, mu)])  # (n, H) within-task deviations
        S = X.T @ X / (X.shape[0] - len(feats))  # (H, H) pooled covariance; n - K >= K since n_k >= 2
        diag = S.diagonal().clone()
        sigma = (1 - self.shrinkage) * S + self.shrinkage * torch.diag(diag)
        # a floor for dimensions that never vary (and for s = 0 with n - K < H, where S is singular)
        floor = 1e-6 * float(diag.mean()) if float(diag.mean()) > 0 else 1e-12
        sigma += floor * torch.eye(sigma.shape[0], dtype=sigma.dtype)
        L = torch.linalg.cholesky(sigma)  # Sigma = L L^T
        self._whiten = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype), upper=False)  # L^-1
        self.centroids = mu
        self._whitened_centroids = mu @ self._whiten.T  # (K, H)
        radii = []
        for k, t in enumerate(self.tasks):
            d = self.distances(self.cal_features[t])[:, k]  # (m_k,)
            if self.fallback_quantile == 0 or len(d) == 0:
                radii.append(math.inf)  # no fallback (or nothing held out to set the radius from)
            else:
                radii.append(float(torch.quantile(d, self.fallback_quantile)))
        self.radii = torch.tensor(radii, dtype=torch.float64)

    # --- routing
    def distances(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, K) Mahalanobis distance of each row of `feats` (N, H) to each task's centroid (float64)."""
        if not self.tasks:
            return torch.zeros(feats.shape[0], 0, dtype=torch.float64)
        z = feats.detach().double().cpu() @ self._whiten.T  # (N, H) whitened
        return torch.cdist(z, self._whitened_centroids)  # (N, K)

    def weights(self, feats: torch.Tensor, soft: bool = False) -> torch.Tensor:
        """(N, K) float32 fast-branch weights over self.tasks: one-hot on the nearest task (soft: softmax over the
        top-k), all zero for a row past its nearest task's radius (slow branch only)."""
        N, K = feats.shape[0], len(self.tasks)
        w = torch.zeros(N, K, dtype=torch.float64)
        if K == 0:
            return w.float()  # nothing learned yet: every row falls back
        d = self.distances(feats)  # (N, K)
        nearest = d.argmin(1)  # (N,)
        far = d.gather(1, nearest[:, None]).squeeze(1) > self.radii[nearest]  # (N,)
        if soft:
            logits, idx = (-d.pow(2) / (2 * self.temperature)).topk(min(self.topk, K), dim=1)  # (N, k)
            w.scatter_(1, idx, torch.softmax(logits, dim=1))
        else:
            w[torch.arange(N), nearest] = 1.0
        w[far] = 0.0
        return w.float()

    def decide(self, feats: torch.Tensor) -> list[str | None]:
        """The task each row is routed to (its nearest), or None where it falls back to the slow branch."""
        w = self.weights(feats)
        return [self.tasks[int(r.argmax())] if r.any() else None for r in w]

    # --- saving
    def save(self, path) -> None:
        """Write the features of every task (atomically); the fit is recomputed from them on load."""
        tensors = {f"{kind}.{t}": feats[t] for t in self.tasks
                   for kind, feats in (("fit", self.fit_features), ("cal", self.cal_features))}
        metadata = {"format": "pt", "layer": str(self.layer), "tasks": json.dumps(self.tasks)}
        atomic_save_safetensors(tensors, str(path), metadata)

    @classmethod
    def load(cls, path, layer: int, shrinkage: float, fallback_quantile: float, temperature: float,
             topk: int) -> "TaskRouter":
        """A router from `save`'s file, fitted with the given settings; `layer` must be the one it was built at."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; write it with TaskRouter.save (train_slsd_seq.py saves one "
                                    f"in every stage checkpoint)")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "layer" not in meta or "tasks" not in meta:
            raise ValueError(f"{path} has no 'layer'/'tasks' metadata; it was not written by TaskRouter.save")
        if int(meta["layer"]) != layer:
            raise ValueError(f"{path} holds features from decoder layer {meta['layer']}, the config asks for layer "
                             f"{layer}; pass --router_layer {meta['layer']} (or retrain with --restart)")
        tensors = load_file(str(path))
        router = cls(layer, shrinkage, fallback_quantile, temperature, topk)
        for t in json.loads(meta["tasks"]):
            if f"fit.{t}" not in tensors or f"cal.{t}" not in tensors:
                raise ValueError(f"{path}: task {t!r} is listed but its features are missing")
            router.add_task(t, tensors[f"fit.{t}"], tensors[f"cal.{t}"])
        return router

    @classmethod
    def load_for(cls, path, cfg) -> "TaskRouter":
        return cls.load(path, cfg.router_layer, cfg.router_shrinkage, cfg.router_fallback_quantile,
                        cfg.router_temperature, cfg.router_topk)


# ----------------------------------------------------------------------------- applying it to a model
def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple of (key, value) per layer


class Routing:
    """The decoder forward pre-hook that applies a TaskRouter in the routed fast modes (made by attach_router)."""

    def __init__(self, model: nn.Module, router: TaskRouter, batch_size: int):
        check_layer(model, router.layer)
        self.model, self.router, self.batch_size = model, router, batch_size
        self.layers = [m for _, m in ds_lora_layers(model)]
        self.features: dict[tuple, torch.Tensor] = {}  # prompt ids -> (H,): the base is frozen, computed once
        self.registry: dict[int, set] | None = None  # {length: prompts} inside routing_prompts
        self.handle = model.get_decoder().register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def mode(self) -> str:
        return self.layers[0].fast_mode

    def features_of(self, prompts: list[tuple]) -> torch.Tensor:
        """(N, H) features of `prompts`, computing (in one batched pass) only the ones not seen before."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self.features))
        if todo:
            feats = prompt_features(self.model, [list(p) for p in todo], self.router.layer, self.batch_size)
            self.features.update(zip(todo, feats))
        H = self.model.get_input_embeddings().weight.shape[1]
        return torch.stack([self.features[p] for p in prompts]) if prompts else torch.zeros(0, H)

    def decide(self, prompts: list[list[int]]) -> list[str | None]:
        """Where `routed` sends each prompt (a task, or None for the slow branch alone)."""
        if not self.router.tasks:
            return [None] * len(prompts)
        return self.router.decide(self.features_of([tuple(p) for p in prompts]))

    def _match(self, row: tuple) -> tuple:
        for n in sorted(self.registry, reverse=True):  # the longest registered prompt the row starts with
            if n <= len(row) and row[:n] in self.registry[n]:
                return row[:n]
        raise ValueError(f"routed fast mode: an input row (first tokens {list(row[:8])}) starts with none of the "
                         f"{sum(map(len, self.registry.values()))} prompts given to routing_prompts; pass every "
                         f"row's prompt, e.g. routing_prompts(model, batch_prompts(batch))")

    def row_prompts(self, input_ids: torch.Tensor, attention_mask) -> list[tuple]:
        """Each row's prompt: its tokens (without padding when the mask is 2D), or inside routing_prompts the
        registered prompt it starts with."""
        ids = input_ids.tolist()
        if attention_mask is not None and attention_mask.dim() == 2:
            keep = attention_mask.bool().tolist()
            ids = [[t for t, k in zip(row, m) if k] for row, m in zip(ids, keep)]
        rows = [tuple(r) for r in ids]
        return rows if self.registry is None else [self._match(r) for r in rows]

    def set_weights(self, weights: torch.Tensor) -> None:
        """Give every DS-LoRA layer the per-row selection (B, K) over router.tasks (all-zero row = slow only)."""
        device = self.layers[0].lora_A_slow.device
        entries = []
        for k, task in enumerate(self.router.tasks):
            rows = weights[:, k].nonzero().squeeze(1)  # (n,) rows using this task's branch
            if len(rows):
                entries.append((task, rows.to(device), weights[rows, k].to(device)))
        for layer in self.layers:
            layer.fast_route = (weights.shape[0], entries)

    def _before_forward(self, module, args, kwargs):
        mode = self.mode()
        if mode not in ROUTED_MODES:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError(f"fast mode {mode!r} routes on input_ids; a forward from inputs_embeds has no prompt")
        if _cache_length(kv_cache(kwargs)) > 0:
            return None  # a decoding step: its prompt's routing stays (the layers check the batch size)
        prompts = self.row_prompts(input_ids, kwargs.get("attention_mask"))
        if self.router.tasks:
            weights = self.router.weights(self.features_of(prompts), soft=mode == "routed_soft")
        else:
            weights = torch.zeros(len(prompts), 0)  # nothing learned yet: every row falls back
        self.set_weights(weights)
        return None


def attach_router(model: nn.Module, router: TaskRouter, batch_size: int = 16) -> Routing:
    """Use `router` in the model's routed fast modes (the first call installs the decoder hook; a later call
    swaps the router in and keeps the feature memo when the layer is the same)."""
    routing = getattr(model, ROUTING_ATTR, None)
    if routing is None:
        routing = Routing(model, router, batch_size)
        setattr(model, ROUTING_ATTR, routing)
        return routing
    check_layer(model, router.layer)
    if routing.router.layer != router.layer:
        routing.features.clear()
    routing.router, routing.batch_size = router, batch_size
    return routing


def get_routing(model: nn.Module) -> Routing | None:
    return getattr(model, ROUTING_ATTR, None)


@contextlib.contextmanager
def routing_prompts(model: nn.Module, prompts):
    """Inside the block, a routed forward takes each row's prompt to be the one of `prompts` that its input starts
    with (so a teacher-forced response never influences the routing). A no-op outside the routed modes."""
    routing = get_routing(model)
    if routing is None or routing.mode() not in ROUTED_MODES:
        yield
        return
    registry: dict[int, set] = {}
    for p in prompts:
        p = tuple(int(t) for t in p)
        if not p:
            raise ValueError("routing_prompts: an empty prompt cannot be routed")
        registry.setdefault(len(p), set()).add(p)
    previous, routing.registry = routing.registry, registry
    try:
        yield
    finally:
        routing.registry = previous
