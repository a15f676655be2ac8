"""Export a stage checkpoint to PEFT's LoRA format (for PEFT, vLLM, sharing), or to a merged Hugging Face model.

    python export_adapter.py --checkpoint checkpoints/seq_lora/seq_5_T5_safety --out exports/seq_lora_T5
    python export_adapter.py --checkpoint checkpoints/ds_lora_slsd/seq_5_T5_safety --view slow --out exports/slow
    python export_adapter.py --checkpoint checkpoints/ds_lora_slsd/seq_5_T5_safety --view task:T2_math --out exports/t2
    python export_adapter.py --checkpoint checkpoints/ds_lora_slsd/seq_5_T5_safety --view task:T2_math --merge \\
        --out exports/t2_merged

A stage checkpoint is a folder checkpoints/{method}/seq_{stage}_{task}/ with config.json (base model, targets,
ranks) and done.json (written last: without it the stage did not finish), and either adapter.safetensors (one LoRA:
train_seq_baselines.py's seq_lora, replay, ewc, inscl; I-LoRA's also holds the EMA copy lora_A_ema/lora_B_ema,
O-LoRA's the earlier tasks' stacked lora_A_old/lora_B_old) or adapter_slow.safetensors + adapter_fast.safetensors
(DS-LoRA: train_slsd_seq.py, train_single_task.py), the fast file holding the active task's branch and the bank of
earlier tasks' branches.

Views (--view), each equal to the project's model in one DS-LoRA fast mode (tests/test_export.py):
  (none)       a LoRA checkpoint's one adapter (the default; DS-LoRA checkpoints must name a view); for O-LoRA the
               sum of every task's LoRA (its forward), one LoRA of stacked rank r x tasks; for I-LoRA `slow`
  slow, fast   I-LoRA: the slow (EMA) LoRA, which its evaluation uses, or the fast one the optimizer trained
  slow         DS-LoRA: the slow branch alone                      = fast mode `none`
  task:T       DS-LoRA: slow + task T's fast branch (active or banked) = fast mode `own_task` with task T
  current      DS-LoRA: slow + the active fast branch              = fast mode `current` (= task:<the stage's task>)
  routed, routed_soft: refused. They pick a fast branch (or a weighted mix) for each input row at run time, from a
               task router on the prompt's base-model features; a PEFT LoRA adapter is one fixed low-rank update
               applied to every input, so it cannot hold that choice. Export one adapter per task instead.

PEFT's layout (what `PeftModel.from_pretrained(base_model, OUT)` and `vllm serve --lora-modules` read):
  adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r, in) and .lora_B.weight (out, r) for every
                              adapted Linear <module> (its name in the HF model: models.lora_simple.peft_key)
  adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha (PEFT's scaling = lora_alpha / r),
                              target_modules (+ layers_to_transform and layers_pattern "layers" when num_frozen_layers
                              kept the bottom layers plain), lora_dropout, bias none, base_model_name_or_path
  export_info.json            where it came from: checkpoint, method, stage, view, the branches stacked
A LoRA checkpoint maps one to one (lora_A -> lora_A.weight, lora_B -> lora_B.weight, same r and alpha). A DS-LoRA
view with a fast branch is one LoRA of stacked rank r = r_slow + r_fast (models.lora_simple.stack_loras):
  A = [A_slow; A_fast]  (rows),   B = [B_slow | B_fast * s_fast / s_slow]  (columns),   scaling s = s_slow,
  lora_alpha = alpha_slow * r / r_slow, so lora_alpha / r = alpha_slow / r_slow = s_slow,
with s_slow = alpha / r_slow and s_fast = alpha / r_fast as the project's layers use them. Then
s B A x = s_slow B_slow A_slow x + s_fast B_fast A_fast x exactly (up to float rounding); with equal scalings (the
default, lora_r_fast = 0) no weight is rescaled at all. vLLM needs --max-lora-rank >= r.

--merge writes a full Hugging Face model folder instead (weights W + s B A of the same exported tensors, in the base
model's dtype, plus its tokenizer), loadable with AutoModelForCausalLM.from_pretrained(OUT) and servable without LoRA.
The output folder is written under a temporary name and renamed into place, so it appears whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from configs.base_config import ROUTED_MODES
from models.ds_lora import fast_weight_names
from models.lora_simple import PEFT_KEY_PREFIX, find_target_linears, layer_index, matches_target, peft_key, stack_loras

LORA_FILE = "adapter.safetensors"
DS_FILES = ("adapter_slow.safetensors", "adapter_fast.safetensors")
DONE, CONFIG = "done.json", "config.json"
PEFT_CONFIG, PEFT_WEIGHTS, INFO = "adapter_config.json", "adapter_model.safetensors", "export_info.json"


class ExportError(ValueError):
    """A checkpoint, view or output folder that cannot be exported; the message names it and the fix."""


# adapter.safetensors kinds by the tensors each module has besides lora_A and lora_B (models/lora_variants.py)
LORA_KINDS = {"lora": (), "ilora": ("lora_A_ema", "lora_B_ema"), "olora": ("lora_A_old", "lora_B_old")}


@dataclass
class Checkpoint:
    path: Path
    kind: str  # "lora", "ilora", "olora" (adapter.safetensors; LORA_KINDS) or "ds_lora" (adapter_slow + adapter_fast)
    config: dict  # config.json: model_name, lora_target_modules, num_frozen_layers, lora_alpha, ...
    done: dict  # done.json: method, stage, task, step, ...
    tensors: dict[str, torch.Tensor]  # the project's adapter tensors by full name ({module}.lora_A, ...)
    modules: list[str]  # adapted Linear modules, in file order
    rank: dict = field(default_factory=dict)  # lora: r, alpha; ds_lora: r_slow, alpha_slow, r_fast, alpha_fast
    bank_tasks: list[str] = field(default_factory=list)  # DS-LoRA: finished tasks with banked fast branches
    active_task: str | None = None  # DS-LoRA: the task of the active fast branch

    @property
    def tasks(self) -> list[str]:
        """Every task with a fast branch, in training order."""
        return self.bank_tasks + ([self.active_task] if self.active_task is not None else [])

    def tensor(self, module: str, leaf: str) -> torch.Tensor:
        key = f"{module}.{leaf}"
        if key not in self.tensors:
            raise ExportError(f"{self.path}: the adapter files have no {key}; the checkpoint is incomplete or was not "
                              f"written by the training scripts")
        return self.tensors[key]


# ----------------------------------------------------------------------------- reading a stage checkpoint
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: cannot be read as JSON ({e})") from None


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _modules(tensors: dict, leaf: str) -> list[str]:
    return [k[:-len(leaf) - 1] for k in tensors if k.endswith("." + leaf)]


def read_checkpoint(path) -> Checkpoint:
    """A finished stage checkpoint's adapter tensors, settings and (DS-LoRA) tasks; clear errors otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: no such checkpoint folder; give a stage folder such as "
                          f"checkpoints/ds_lora_slsd/seq_2_T2_math")
    if not (path / DONE).exists():
        raise ExportError(f"{path}: no {DONE}, so this stage did not finish (the training scripts write it last); "
                          f"export a finished stage, or resume the run to finish this one")
    if not (path / CONFIG).exists():
        raise ExportError(f"{path}: no {CONFIG} (base model and adapter settings); not a stage checkpoint of the "
                          f"training scripts")
    config, done = _read_json(path / CONFIG), _read_json(path / DONE)
    for key in ("model_name", "lora_target_modules", "num_frozen_layers", "lora_alpha"):
        if key not in config:
            raise ExportError(f"{path / CONFIG} has no {key!r}; not a config written by the training scripts")
    has_lora, has_ds = (path / LORA_FILE).exists(), [(path / f).exists() for f in DS_FILES]
    if has_lora and not any(has_ds):
        tensors = load_file(str(path / LORA_FILE))
        modules = _modules(tensors, "lora_A")
        kind = next((k for k, extra in LORA_KINDS.items()
                     if modules and set(tensors) == {f"{m}.{leaf}" for m in modules
                                                     for leaf in ("lora_A", "lora_B") + extra}), None)
        if kind is None:
            raise ExportError(f"{path / LORA_FILE}: expected <module>.lora_A and <module>.lora_B tensors (plus "
                              f"lora_A_ema/lora_B_ema for I-LoRA, lora_A_old/lora_B_old for O-LoRA), got "
                              f"{sorted(tensors)[:6]}")
        r = int(tensors[f"{modules[0]}.lora_A"].shape[0])
        return Checkpoint(path, kind, config, done, tensors, modules,
                          rank={"r": r, "alpha": float(config["lora_alpha"])})
    if all(has_ds) and not has_lora:
        slow_meta, fast_meta = _metadata(path / DS_FILES[0]), _metadata(path / DS_FILES[1])
        need = {"r_slow", "alpha_slow", "r_fast", "alpha_fast", "tasks", "active_task"}
        if not need <= fast_meta.keys() or not {"r_slow", "alpha_slow"} <= slow_meta.keys():
            raise ExportError(f"{path}: the adapter files lack the metadata save_ds_lora writes ({sorted(need)})")
        tensors = load_file(str(path / DS_FILES[0])) | load_file(str(path / DS_FILES[1]))
        modules = _modules(tensors, "lora_A_slow")
        if not modules:
            raise ExportError(f"{path / DS_FILES[0]}: no <module>.lora_A_slow tensor")
        rank = {"r_slow": int(slow_meta["r_slow"]), "alpha_slow": float(slow_meta["alpha_slow"]),
                "r_fast": int(fast_meta["r_fast"]), "alpha_fast": float(fast_meta["alpha_fast"])}
        return Checkpoint(path, "ds_lora", config, done, tensors, modules, rank=rank,
                          bank_tasks=list(json.loads(fast_meta["tasks"])),
                          active_task=json.loads(fast_meta["active_task"]))
    found = sorted(p.name for p in path.iterdir())
    raise ExportError(f"{path}: expected {LORA_FILE} (LoRA) or {DS_FILES[0]} + {DS_FILES[1]} (DS-LoRA), found {found}")


# ----------------------------------------------------------------------------- views
def resolve_view(ckpt: Checkpoint, view: str | None) -> tuple[str, str | None]:
    """('adapter', None) for a LoRA or O-LoRA checkpoint; ('slow' | 'fast', None) for I-LoRA; ('slow', None) or
    ('task', T) for a DS-LoRA one."""
    what = f"{ckpt.path} (method {ckpt.done.get('method', '?')}, stage {ckpt.done.get('stage', '?')})"
    if ckpt.kind == "ilora":  # evaluation uses the slow (EMA) LoRA; the fast one is what the optimizer trained
        if view not in (None, "slow", "fast"):
            raise ExportError(f"{what} is an I-LoRA checkpoint: export --view slow (the EMA LoRA its evaluation "
                              f"uses; the default) or --view fast, not --view {view}")
        return (view or "slow"), None
    if ckpt.kind in ("lora", "olora"):  # O-LoRA: every task's LoRA summed, as its forward and evaluation use them
        if view not in (None, "adapter"):
            raise ExportError(f"{what} is a single-adapter LoRA checkpoint: it has no views, so drop --view {view} "
                              f"(slow, task:T and current are views of DS-LoRA checkpoints)")
        return "adapter", None
    choices = ", ".join(["slow"] + [f"task:{t}" for t in ckpt.tasks] + (["current"] if ckpt.active_task else []))
    if view is None:
        raise ExportError(f"{what} is a DS-LoRA checkpoint: choose what to export with --view ({choices})")
    if view in ROUTED_MODES:
        picks = "a weighted mix of fast branches" if view == "routed_soft" else "the fast branch"
        raise ExportError(
            f"--view {view} cannot be exported as a PEFT LoRA adapter: it picks {picks} "
            f"for each input row at run time (a task router compares the prompt's base-model features with each "
            f"task's), while a PEFT/vLLM LoRA adapter is one fixed low-rank update applied to every input. Export one "
            f"adapter per task (--view task:T for T in {ckpt.tasks}) and pick one per request (vLLM serves several "
            f"with --lora-modules), or --view slow for the task-agnostic part")
    if view in ("slow", "none"):
        return "slow", None
    if view == "current":
        if ckpt.active_task is None:
            raise ExportError(f"{what} has no active fast branch (no task was started); use --view slow")
        return "task", ckpt.active_task
    if view.startswith("task:"):
        task = view[len("task:"):]
        if task not in ckpt.tasks:
            raise ExportError(f"{what} has no fast branch for task {task!r}; it holds {ckpt.tasks}: use --view "
                              f"task:NAME with one of them, or --view slow")
        return "task", task
    if view == "own_task":
        raise ExportError(f"--view own_task needs its task: --view task:NAME ({choices})")
    raise ExportError(f"unknown --view {view!r} for {what}; use one of: {choices}")


def view_branches(ckpt: Checkpoint, kind: str, task: str | None) -> tuple[dict, list[dict]]:
    """{module: [(A, B, scaling), ...]} of the branches the view adds, and a description of each branch."""
    rk = ckpt.rank
    if ckpt.kind in LORA_KINDS:
        s = rk["alpha"] / rk["r"]  # as LoRALinear computes it (O-LoRA's earlier tasks share it)
        desc = [{"branch": "lora", "r": rk["r"], "alpha": rk["alpha"], "scaling": s}]
        if ckpt.kind == "ilora":
            leaves = ("lora_A_ema", "lora_B_ema") if kind == "slow" else ("lora_A", "lora_B")
            desc[0]["branch"] = f"ilora_{kind}"
            return {m: [(ckpt.tensor(m, leaves[0]), ckpt.tensor(m, leaves[1]), s)] for m in ckpt.modules}, desc
        out = {m: [(ckpt.tensor(m, "lora_A"), ckpt.tensor(m, "lora_B"), s)] for m in ckpt.modules}
        n_old = int(ckpt.tensors[f"{ckpt.modules[0]}.lora_A_old"].shape[0]) if ckpt.kind == "olora" else 0
        if n_old:  # O-LoRA: the earlier tasks' stacked LoRAs (k r rows) join the current one: their sum, one LoRA
            desc.append({"branch": f"olora_earlier_tasks:{n_old // rk['r']}", "r": n_old,
                         "alpha": rk["alpha"] * n_old / rk["r"], "scaling": s})
            for m in ckpt.modules:
                out[m].append((ckpt.tensor(m, "lora_A_old"), ckpt.tensor(m, "lora_B_old"), s))
        return out, desc
    s_slow, s_fast = rk["alpha_slow"] / rk["r_slow"], rk["alpha_fast"] / rk["r_fast"]  # as DSLoRALinear computes them
    desc = [{"branch": "slow", "r": rk["r_slow"], "alpha": rk["alpha_slow"], "scaling": s_slow}]
    if kind == "task":
        desc.append({"branch": f"fast:{task}", "r": rk["r_fast"], "alpha": rk["alpha_fast"], "scaling": s_fast,
                     "source": "active" if task == ckpt.active_task else "bank"})
    out = {}
    for m in ckpt.modules:
        branches = [(ckpt.tensor(m, "lora_A_slow"), ckpt.tensor(m, "lora_B_slow"), s_slow)]
        if kind == "task":
            a_name, b_name = fast_weight_names(task, ckpt.active_task)
            branches.append((ckpt.tensor(m, a_name), ckpt.tensor(m, b_name), s_fast))
        out[m] = branches
    return out, desc


def to_peft_tensors(branches: dict) -> tuple[dict[str, torch.Tensor], int]:
    """PEFT's adapter_model.safetensors content (one stacked LoRA per module) and its rank r."""
    tensors, ranks = {}, set()
    for m, br in branches.items():
        a, b, _ = stack_loras(br)
        tensors[peft_key(m, "A")], tensors[peft_key(m, "B")] = a.contiguous(), b.contiguous()
        ranks.add(int(a.shape[0]))
    if len(ranks) != 1:
        raise ExportError(f"the adapted modules have different ranks {sorted(ranks)}; PEFT's config holds one r")
    return tensors, ranks.pop()


# ----------------------------------------------------------------------------- the base model
def base_skeleton(model_dir: Path) -> nn.Module:
    """The base model's module tree on the meta device: names and shapes, no weights read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_against_base(ckpt: Checkpoint, tensors: dict, r: int, skeleton: nn.Module, model_dir: Path) -> None:
    """The checkpoint's modules are what its targets select in this base model, with the Linear shapes."""
    targets, k = list(ckpt.config["lora_target_modules"]), ckpt.config["num_frozen_layers"]
    try:
        expected = find_target_linears(skeleton, targets, k)
    except ValueError as e:
        raise ExportError(f"{ckpt.path}: its targets do not fit the base model {model_dir}: {e}; pass the base "
                          f"model it was trained on with --base_model") from None
    if set(expected) != set(ckpt.modules):
        raise ExportError(f"{ckpt.path} adapts {len(ckpt.modules)} modules (e.g. {ckpt.modules[0]}), but its targets "
                          f"{targets} with num_frozen_layers={k} select {len(expected)} in the base model {model_dir} "
                          f"(e.g. {expected[0]}); pass the base model it was trained on with --base_model")
    for m in ckpt.modules:
        lin = skeleton.get_submodule(m)
        a, b = tensors[peft_key(m, "A")], tensors[peft_key(m, "B")]
        if tuple(a.shape) != (r, lin.in_features) or tuple(b.shape) != (lin.out_features, r):
            raise ExportError(f"{ckpt.path}: {m} has A {tuple(a.shape)} and B {tuple(b.shape)}, the base model "
                              f"{model_dir} has a Linear ({lin.out_features}, {lin.in_features}) there; pass the base "
                              f"model it was trained on with --base_model")


def peft_targets(skeleton: nn.Module, modules: list[str], targets: list[str]) -> dict:
    """adapter_config.json's target fields under which PEFT wraps exactly `modules` in this model.

    PEFT matches a list of targets as the project does (a module name equal to a target or ending in '.' + target),
    on every module, and keeps only layers_to_transform's layers (index after 'layers.') when that is set. So: the
    targets alone when they select exactly `modules`; the targets + the adapted layers when num_frozen_layers left the
    bottom layers out; else the adapted modules' full names (exact matches)."""
    adapted = set(modules)
    picked = {n for n, _ in skeleton.named_modules() if n and matches_target(n, targets)}
    if picked == adapted:
        return {"target_modules": sorted(targets), "layers_to_transform": None, "layers_pattern": None}
    layers = {layer_index(n) for n in adapted}
    if None not in layers and {n for n in picked if layer_index(n) in layers} == adapted:
        return {"target_modules": sorted(targets), "layers_to_transform": sorted(layers), "layers_pattern": "layers"}
    return {"target_modules": sorted(adapted), "layers_to_transform": None, "layers_pattern": None}


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def adapter_config(ckpt: Checkpoint, base: Path, r: int, lora_alpha: float, targets: dict) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "revision": None,
            "r": r, "lora_alpha": _number(lora_alpha), "lora_dropout": float(ckpt.config.get("lora_dropout", 0.0)),
            "bias": "none", "fan_in_fan_out": False, **targets, "modules_to_save": None, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}


@torch.no_grad()
def merge_peft_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], scaling: float) -> None:
    """W <- W + scaling * B A for every module of `tensors` (PEFT keys), computed in float32, stored in W's dtype."""
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    modules = sorted({k[len(PEFT_KEY_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    for m in modules:
        lin = model.get_submodule(m)
        if not isinstance(lin, nn.Linear):
            raise ExportError(f"{m} is a {type(lin).__name__}, not an nn.Linear; cannot merge into it")
        tied = [n for n in owners[id(lin.weight)] if n != f"{m}.weight"]
        if tied:
            raise ExportError(f"{m}.weight is tied to {tied} (shared weights); merging would change those too: "
                              f"export the adapter without --merge instead")
        w = lin.weight
        new = w.float() + (tensors[peft_key(m, "B")].float() @ tensors[peft_key(m, "A")].float()) * scaling
        if not torch.isfinite(new).all():
            raise ExportError(f"merging into {m} gives NaN/Inf weights; the adapter weights are not finite")
        w.copy_(new.to(w.dtype))


# ----------------------------------------------------------------------------- writing
def write_folder(out, fill, overwrite: bool = False) -> Path:
    """Build the folder with fill(tmp_dir) under a temporary name beside `out`, then rename it to `out`: readers see
    the whole folder or none. An existing non-empty `out` is replaced only with overwrite=True."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} already exists and is not empty; pass --overwrite to replace it, or choose "
                          f"another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp_"))
    try:
        fill(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp and the safetensors writer make them private; exports are shared
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
        if out.exists():
            old = out.parent / f".{out.name}.old_{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_base(ckpt: Checkpoint, base_model) -> Path:
    from utils_model import resolve_model_dir
    name = str(base_model) if base_model is not None else ckpt.config["model_name"]
    try:
        return resolve_model_dir(name).resolve()
    except FileNotFoundError as e:
        raise ExportError(f"{ckpt.path}: base model {name!r} not found ({e}); pass its folder with --base_model") \
            from None


def export(checkpoint, out, view: str | None = None, merge: bool = False, base_model=None,
           overwrite: bool = False) -> dict:
    """Export `checkpoint` in `view` to `out` (PEFT adapter, or with merge=True a merged HF model); returns the
    provenance written to export_info.json."""
    ckpt = read_checkpoint(checkpoint)
    kind, task = resolve_view(ckpt, view)
    branches, desc = view_branches(ckpt, kind, task)
    tensors, r = to_peft_tensors(branches)
    first = desc[0]
    lora_alpha = first["alpha"] * r / first["r"]  # lora_alpha / r = the first branch's scaling (see the docstring)
    base = resolve_base(ckpt, base_model)
    skeleton = base_skeleton(base)
    check_against_base(ckpt, tensors, r, skeleton, base)
    targets = peft_targets(skeleton, ckpt.modules, list(ckpt.config["lora_target_modules"]))
    del skeleton
    view_name = kind if kind in ("adapter", "slow", "fast") else f"task:{task}"
    info = {"format": "merged_hf_model" if merge else "peft_lora", "checkpoint": str(Path(checkpoint).resolve()),
            "method": ckpt.done.get("method"), "stage": ckpt.done.get("stage"), "stage_task": ckpt.done.get("task"),
            "view": view_name, "base_model": str(base), "r": r, "lora_alpha": _number(lora_alpha),
            "modules": len(ckpt.modules), "branches": desc, **targets}

    def fill_adapter(d: Path):
        save_file(tensors, str(d / PEFT_WEIGHTS), metadata={"format": "pt"})
        (d / PEFT_CONFIG).write_text(json.dumps(adapter_config(ckpt, base, r, lora_alpha, targets), indent=2) + "\n")
        (d / INFO).write_text(json.dumps(info, indent=2) + "\n")

    def fill_merged(d: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        merge_peft_tensors(model, tensors, lora_alpha / r)  # PEFT's scaling: what merge_and_unload would compute
        model.save_pretrained(d)
        AutoTokenizer.from_pretrained(base).save_pretrained(d)
        (d / INFO).write_text(json.dumps(info, indent=2) + "\n")

    write_folder(out, fill_merged if merge else fill_adapter, overwrite)
    return info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a finished stage folder, e.g. "
                        "checkpoints/ds_lora_slsd/seq_5_T5_safety")
    parser.add_argument("--out", required=True, help="the folder to write (created; see --overwrite)")
    parser.add_argument("--view", default=None, help="DS-LoRA: slow | task:NAME | current (LoRA checkpoints: none)")
    parser.add_argument("--merge", action="store_true", help="write a merged Hugging Face model instead of an adapter")
    parser.add_argument("--base_model", default=None, help="the base model folder (default: the checkpoint's "
                        "model_name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    args = parser.parse_args(argv)
    try:
        info = export(args.checkpoint, args.out, args.view, args.merge, args.base_model, args.overwrite)
    except ExportError as e:
        sys.exit(f"export_adapter: {e}")
    what = "merged model" if args.merge else "PEFT LoRA adapter"
    print(f"[export] {args.checkpoint} ({info['method']}, stage {info['stage']}), view {info['view']}: {what} with "
          f"r={info['r']}, lora_alpha={info['lora_alpha']} on {info['modules']} modules -> {args.out}")
    return info


if __name__ == "__main__":
    main()
