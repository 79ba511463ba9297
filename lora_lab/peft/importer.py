"""Reading a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), so
that ``method.init_from=<folder>`` starts our LoRA or DoRA from it.

The folder is checked before any model is loaded (``read_adapter``, ``check_settings``): a LoRA
adapter, saved with safetensors (``adapter_model.bin`` is pickled and never read), with features our
LoRA has. Once the method is applied, ``load_adapter`` checks it against the model (the same adapted
modules, rank and shapes) and copies A, B (DoRA: the magnitudes) and, when it fits, the task head.
The run's config is authoritative: the adapter must agree with it, nothing is adopted from the adapter.

GPT-2's Conv1D layers: PEFT stores A (r x in) and B (out x r) as for nn.Linear, ``fan_in_fan_out`` only
says how it merges, so such an adapter loads as any other. PEFT adapts whole layers: a run that adapts
parts of a fused layer (GPT-2's q and v in c_attn) cannot start from a PEFT adapter.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lora_lab.errors import ConfigError, first_line
from lora_lab.peft.names import CONFIG_FILE, PEFT_PREFIX, PICKLED_WEIGHTS_FILE, WEIGHTS_FILE, base_changing_init
from lora_lab.tensor_files import UnreadableTensors, read_header, read_tensors

KEY = "method.init_from"
# PEFT settings our LoRA has no counterpart for: key -> (is it set?, what it means)
UNSUPPORTED = {
    "bias": (lambda v: v not in (None, "none"), "trains biases"),
    "lora_bias": (bool, "has a bias on lora_B"),
    "rank_pattern": (bool, "gives some modules another rank (rank_pattern)"),
    "alpha_pattern": (bool, "gives some modules another alpha (alpha_pattern)"),
    "layer_replication": (bool, "replicates layers"),
    "target_parameters": (bool, "targets parameters rather than modules"),
    "trainable_token_indices": (bool, "trains token embeddings"),
    "use_qalora": (bool, "is a QA-LoRA adapter"),
}
FACTOR_SUFFIXES = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude",
                   "lora_magnitude_vector.weight": "magnitude"}  # saved without .weight; the in-memory name also read


def is_adapter_folder(source) -> bool:
    return (Path(str(source)).expanduser() / CONFIG_FILE).is_file()


@dataclass
class PeftAdapter:
    source: str  # as the user gave it, for messages
    folder: Path
    config: dict
    factors: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> part -> key in the file
    head: dict[str, str] = field(default_factory=dict)  # our parameter name -> key in the file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # key in the file -> shape

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def scaling(self) -> float:
        return lora_scaling(float(self.config["lora_alpha"]), self.r, bool(self.config.get("use_rslora")))

    @property
    def dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    def refuse(self, problem: str) -> ConfigError:
        return ConfigError(KEY, self.source, problem)

    def tensors(self) -> dict[str, torch.Tensor]:
        try:
            return read_tensors(self.folder / WEIGHTS_FILE)
        except UnreadableTensors as error:
            raise self.refuse(f"{WEIGHTS_FILE} could not be read: {error}") from None


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    """LoRA's update scale s (PEFT's rule too): alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if rslora else r)


def read_adapter(source) -> PeftAdapter:
    """The adapter folder ``source``, checked without loading a model (ConfigError naming
    ``method.init_from`` otherwise)."""
    folder = Path(str(source)).expanduser()

    def refuse(problem: str) -> ConfigError:
        return ConfigError(KEY, str(source), problem)

    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise refuse(f"{CONFIG_FILE} is not readable JSON: {first_line(error)}") from None
    if not isinstance(config, dict):
        raise refuse(f"{CONFIG_FILE} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise refuse(f"is a PEFT {config.get('peft_type')!r} adapter; only LoRA adapters (peft_type LORA) load")
    for name, (is_set, meaning) in UNSUPPORTED.items():
        if is_set(config.get(name)):
            raise refuse(f"{meaning} ({name}={config[name]!r}), which lora_lab's LoRA does not")
    init = config.get("init_lora_weights")
    if base_changing_init(init):
        raise refuse(f"was saved with init_lora_weights={init!r}, which changes the base weights; save it "
                     "converted to a plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(r, int) and r > 0) or not (isinstance(alpha, (int, float)) and alpha > 0):
        raise refuse(f"{CONFIG_FILE} needs a positive integer r and a positive lora_alpha (has {r!r}, {alpha!r})")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / PICKLED_WEIGHTS_FILE).is_file():
            raise refuse(f"holds {PICKLED_WEIGHTS_FILE}, a pickle, which lora_lab never loads; re-save the "
                         "adapter with safetensors (save_pretrained(..., safe_serialization=True))")
        raise refuse(f"has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    adapter = PeftAdapter(str(source), folder, config)
    _read_header(adapter)
    return adapter


def _read_header(adapter: PeftAdapter) -> None:
    """Sort the weight file's tensors into factors per module and head parameters, by name only."""
    try:
        header, _ = read_header(adapter.folder / WEIGHTS_FILE)
    except UnreadableTensors as error:
        raise adapter.refuse(f"{WEIGHTS_FILE} is not a readable safetensors file: {error}") from None
    adapter.shapes = {key: shape for key, (shape, _) in header.items()}
    saved_modules = [str(m) for m in adapter.config.get("modules_to_save") or []]
    for key in adapter.shapes:
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in FACTOR_SUFFIXES if name.endswith("." + s)), None)
        if suffix is not None:
            module = name[: -len(suffix) - 1]
            adapter.factors.setdefault(module, {})[FACTOR_SUFFIXES[suffix]] = key
        elif any(_in_module(name, m) for m in saved_modules):
            adapter.head[name] = key
        else:
            raise adapter.refuse(f"{WEIGHTS_FILE} holds {key}, neither a LoRA factor of a linear layer nor a "
                                 "parameter of modules_to_save")
    if not adapter.factors:
        raise adapter.refuse(f"{WEIGHTS_FILE} holds no LoRA factors")
    parts = {"lora_A", "lora_B", "magnitude"} if adapter.dora else {"lora_A", "lora_B"}
    for module, found in sorted(adapter.factors.items()):
        if set(found) != parts:
            raise adapter.refuse(f"{WEIGHTS_FILE} holds {sorted(found)} for {module}, expected {sorted(parts)}"
                                 f"{' (use_dora is set)' if adapter.dora else ''}")


def _in_module(name: str, module: str) -> bool:
    """Whether parameter ``name`` belongs to a module PEFT matched by the modules_to_save entry
    ``module`` (the module's full name or a suffix of it)."""
    owner = name.rpartition(".")[0]
    return owner == module or owner.endswith("." + module)


def check_settings(adapter: PeftAdapter, method_cfg, dora: bool) -> None:
    """What the run's settings must share with the adapter, known before a model is loaded: LoRA or
    DoRA, the rank (unless method.budget chooses it), the update's scale and a pretrained W0."""
    refuse = adapter.refuse
    if adapter.dora != dora:
        wanted = "method=dora" if adapter.dora else "method=lora"
        raise refuse(f"is a {'DoRA' if adapter.dora else 'plain LoRA'} adapter (use_dora={adapter.dora}); use {wanted}")
    if method_cfg.get("init", "kaiming") == "svd":
        raise refuse("does not combine with method.init=svd, which changes W0; the adapter applies to the "
                     "pretrained weights (use init=kaiming)")
    r = method_cfg.get("r")
    if method_cfg.get("budget") is not None or not isinstance(r, int):
        return  # r is chosen when the method is applied; load_adapter checks it then
    if r != adapter.r:
        raise refuse(f"has rank r={adapter.r}, this run method.r={r}")
    ours = lora_scaling(float(method_cfg.alpha), r, bool(method_cfg.rslora))
    if not math.isclose(ours, adapter.scaling, rel_tol=1e-6):
        c = adapter.config
        raise refuse(f"scales its update by {adapter.scaling:g} (lora_alpha={c['lora_alpha']}, r={adapter.r}, "
                     f"use_rslora={bool(c.get('use_rslora'))}), this run by {ours:g} (method.alpha="
                     f"{method_cfg.alpha}, method.rslora={bool(method_cfg.rslora)}); set them to match")


def load_adapter(adapter: PeftAdapter, model: nn.Module, lora_modules: dict[str, nn.Module],
                 head_names: set[str], method_cfg) -> None:
    """Copy the adapter into ``model``, whose LoRA layers ``lora_modules`` (module name -> layer) the
    method has just created: every adapted module's factors (and magnitudes), then the head when every
    saved head tensor fits a head parameter of ``model`` (else a note says the head starts fresh)."""
    refuse = adapter.refuse
    part = next((name for name, layer in lora_modules.items() if getattr(layer, "rows", None) is not None), None)
    if part is not None:
        raise refuse(f"is a PEFT adapter of whole layers, but this run adapts parts of fused layers (e.g. {part}); "
                     "target the whole layer (e.g. c_attn, or q, k and v together)")
    ours, theirs = set(lora_modules), set(adapter.factors)
    if ours != theirs:
        extra, missing = sorted(theirs - ours), sorted(ours - theirs)
        which = (f"adapts {len(extra)} module(s) this run does not, e.g. {extra[0]}" if extra else
                 f"lacks {len(missing)} module(s) this run adapts, e.g. {missing[0]}")
        raise refuse(f"{which} (method.targets={list(method_cfg.targets)} adapts {len(ours)}; another "
                     "target set or base model?)")
    first = next(iter(lora_modules.values()))
    if adapter.r != first.r:
        raise refuse(f"has rank r={adapter.r}, this run r={first.r} (chosen by method.budget)")
    if not math.isclose(adapter.scaling, first.scaling, rel_tol=1e-6):
        raise refuse(f"scales its update by {adapter.scaling:g}, this run by {first.scaling:g}; set "
                     "method.alpha and method.rslora to match")
    wanted = {}
    for name, layer in lora_modules.items():
        parts = {"lora_A": layer.lora_A, "lora_B": layer.lora_B}
        if adapter.dora:
            parts["magnitude"] = layer.lora_magnitude
        for part, param in parts.items():
            key = adapter.factors[name][part]
            if adapter.shapes[key] != tuple(param.shape):
                raise refuse(f"{key} has shape {adapter.shapes[key]}, this model needs {tuple(param.shape)} "
                             "(an adapter of another base model)")
            wanted[key] = param
    params = dict(model.named_parameters())
    head = {name: key for name, key in adapter.head.items()
            if name in head_names and adapter.shapes[key] == tuple(params[name].shape)}
    if adapter.head and len(head) < len(adapter.head):
        misfit = next(name for name in adapter.head if name not in head)
        if not head_names:
            print(f"[lora_lab] {KEY}: the adapter's saved {misfit} is not loaded: this model has no task head "
                  "(a language model's output layer is pre-trained and stays as it is)")
        else:
            print(f"[lora_lab] {KEY}: the adapter's saved {misfit} does not fit this model's head "
                  "(another task or pooling?); the head starts fresh")
        head = {}
    wanted.update({key: params[name] for name, key in head.items()})
    tensors = adapter.tensors()
    with torch.no_grad():  # ΔW stays measured from the pretrained W0
        for key, param in wanted.items():
            param.copy_(tensors[key].to(param.dtype))
