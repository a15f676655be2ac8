"""Forward-pass helpers that training and evaluation both use (so neither imports the other)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from utils_data import IGNORE_INDEX


def kv_cache(kwargs: dict):
    """The KV cache a decoder forward was called with, or None: transformers 5.x generation passes it as `cache`
    (renamed from `past_key_values`, which older 5.x releases and direct callers still use)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


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


# ----------------------------------------------------------------------------- frozen-trunk cache for evaluation
class TrunkCache:
    """Memoized hidden states entering the first adapted decoder layer, per input batch, for no-grad evaluation.

    Adapters sit on the upper layers only (num_frozen_layers = 15 of SmolLM2's 30 by default), so the layers
    below the first adapted one compute the same thing at every stage, in every fast-weight view, for every method:
    evaluation runs the same batches (eval loss, the packed knowledge rows, the drift probes) after each stage.
    A full decoder pass over a batch records the input of that layer under a key (a hash of input_ids, attention
    mask and position ids); the next pass over the same batch starts there (the decoder runs from `inputs_embeds` =
    the stored states with only the upper layers in place), which halves the trunk's cost at the default placement.
    Passes that carry a KV cache (generation), run in training mode, or run inside `bypass()` are left alone.
    The first hit is checked against the full pass it replaces; a mismatch (a decoder that transforms its
    inputs_embeds, as Gemma scales them) turns the cache off with a message. At most `max_mb` are stored."""

    def __init__(self, model, max_mb: float = 2048.0):
        from models.lora_simple import LORA_PREFIX
        self.model, self.decoder = model, model.get_decoder()
        self.layers = self.decoder.layers
        adapted = [i for i, layer in enumerate(self.layers)
                   if any(LORA_PREFIX in n for n, _ in layer.named_parameters())]
        self.first = adapted[0] if adapted else len(self.layers)
        frozen_below = not any(p.requires_grad for n, p in self.decoder.named_parameters()
                               if not _layer_at_or_above(n, self.first))
        self.enabled = 0 < self.first < len(self.layers) and frozen_below
        self.max_bytes, self.bytes = int(max_mb * 2 ** 20), 0
        self.store: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0
        self.verified, self.active, self._bypass = False, False, 0
        self._pending: str | None = None
        self._check: dict | None = None
        self._swapped = None
        self._handles = []

    # -- public
    def __enter__(self):
        if self.enabled and not self._handles:
            self._handles = [
                self.decoder.register_forward_pre_hook(self._before, with_kwargs=True),
                self.decoder.register_forward_hook(self._after, with_kwargs=True),
                self.layers[self.first].register_forward_pre_hook(self._capture, with_kwargs=True)]
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False
        self._restore()
        self._pending = None
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    @contextlib.contextmanager
    def bypass(self):
        """Passes inside run the whole decoder and store nothing (e.g. a partial pass that stops early)."""
        self._bypass += 1
        try:
            yield
        finally:
            self._bypass -= 1

    def stats(self) -> dict:
        return {"enabled": self.enabled, "first_layer": self.first, "entries": len(self.store),
                "mb": round(self.bytes / 2 ** 20, 1), "hits": self.hits, "misses": self.misses}

    # -- hooks
    def _key(self, kwargs) -> str | None:
        import hashlib
        ids = kwargs.get("input_ids")
        if ids is None or kwargs.get("inputs_embeds") is not None or kv_cache(kwargs) is not None:
            return None
        h = hashlib.blake2b(digest_size=20)
        for name in ("input_ids", "attention_mask", "position_ids"):
            t = kwargs.get(name)
            if t is None:
                h.update(name.encode() + b":none")
            else:
                t = t.detach().contiguous().cpu()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bool else t.numpy().tobytes())
        return h.hexdigest()

    def _before(self, module, args, kwargs):
        self._restore()
        self._pending = None
        if not (self.active and self.enabled) or self._bypass or module.training or args or torch.is_grad_enabled():
            return None
        key = self._key(kwargs)
        if key is None:
            return None
        if key not in self.store:
            self.misses += 1
            self._pending = key
            return None
        self.hits += 1
        self._check = None if self.verified else kwargs  # the first hit is checked against the full pass
        return (), self._hit_kwargs(kwargs, self.store[key])

    def _hit_kwargs(self, kwargs, hidden):
        self._swapped = self.decoder.layers
        self.decoder.layers = torch.nn.ModuleList(list(self._swapped)[self.first:])
        return {**kwargs, "input_ids": None, "inputs_embeds": hidden, "use_cache": False}

    def _capture(self, module, args, kwargs):
        if self._pending is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            size = hidden.numel() * hidden.element_size()
            if self.bytes + size <= self.max_bytes:
                self.store[self._pending] = hidden.detach()
                self.bytes += size
            self._pending = None
        return None

    def _after(self, module, args, kwargs, output):
        was_hit = self._swapped is not None
        self._restore()
        if was_hit and self._check is not None:
            original, self._check = self._check, None
            self.verified = True  # set first: the check's own full pass comes back through these hooks
            with self.bypass():
                full = module(**original)
            a, b = full.last_hidden_state.float(), output.last_hidden_state.float()
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                self.enabled = False
                self.store.clear()
                self.bytes = 0
                print(f"[trunk-cache] off: starting at layer {self.first} differs from the full pass by "
                      f"{float((a - b).abs().max()):.3g} for {type(self.decoder).__name__}; evaluation runs every layer")
                return full
        return None

    def _restore(self):
        if self._swapped is not None:
            self.decoder.layers = self._swapped
            self._swapped = None


def _layer_at_or_above(name: str, first: int) -> bool:
    """True for parameter names under decoder layers[i] with i >= first."""
    parts = name.split(".")
    return len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) >= first


def trunk_cache(model, cfg=None):
    """The model's TrunkCache (created on first use; it lives as long as the model), as a context manager that
    turns it on for the passes inside. `cfg.trunk_cache_mb` = 0 gives a no-op context."""
    mb = getattr(cfg, "trunk_cache_mb", 2048.0) if cfg is not None else 2048.0
    if not mb:
        return contextlib.nullcontext()
    cache = getattr(model, "_cit_trunk_cache", None)
    if cache is None:
        cache = TrunkCache(model, mb)
        model._cit_trunk_cache = cache
    return cache


def trunk_bypass(model):
    """Inside, the model's trunk cache (if any) neither serves nor stores: for passes that stop part-way."""
    cache = getattr(model, "_cit_trunk_cache", None)
    return cache.bypass() if cache is not None else contextlib.nullcontext()
