"""The interface every fine-tuning method implements, and the registry that names them.

A method is applied to a Hugging Face model in place. Afterwards it can say which parameters
it trains (grouped as "method", "head" or "other") and report ΔW for every weight matrix it adapts,
dense or as low-rank factors, so that analysis treats all methods alike.

Everything the rest of the project asks of a method comes from its class: the rules of its settings
(``config_rules``), what it refuses (``check``, ``check_model``, ``check_files``), whether it trains
every weight, merges, exports to PEFT or has a PEFT twin, its benchmark arms, its place and style in
tables and plots, and the trainable-parameter count its formula gives (``expected_trainable``).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn

from lora_lab.errors import ConfigError, first_line
from lora_lab.models.architectures import Matrix, canonical_alias, get_submodule_parent, head_parameter_names
from lora_lab.models.linear_layers import FusedParts, dense_weight, features
from lora_lab.models.quantization import KEY as LOAD_IN_4BIT
from lora_lab.models.quantization import wants_4bit
from lora_lab.rules import Rule, number


@dataclass
class DeltaW:
    """The update of one weight matrix (out x in): either ``dense`` or ``B @ A`` (scaling folded in)."""

    dense: torch.Tensor | None = None
    B: torch.Tensor | None = None  # out x k
    A: torch.Tensor | None = None  # k x in
    base: torch.Tensor | None = None  # W0, the matrix before training (optional)
    kind: str = "weight_difference"

    def to_dense(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        return self.B @ self.A

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (self.B.shape[0], self.A.shape[1])


class Method:
    """Base class. Subclasses set ``name`` (through ``register``) and implement ``apply`` and
    ``delta_weights``; the descriptive methods (``label``, ``size``, ``rank``, ``sort_key``) answer
    from the config alone, so analysis can ask them about a run record without building a model."""

    name: str = ""
    # the method's settings: key under ``method.`` -> rule (lora_lab.rules); check_config applies them
    # after ``check``, to name a value of the wrong type with its key. A subclass extends its parent's.
    config_rules: dict[str, Rule] = {"lr": number(0, 1, low_open=True)}
    # True when every weight of the model trains, none frozen (full fine-tuning): a bf16 or 4-bit
    # frozen base is refused, ΔW is the dense W - W0, and plots draw it as the reference line
    trains_every_weight: bool = False
    # False when the method's added parameters change the outputs from the start (virtual tokens of prompt
    # and prefix tuning take part in attention); True: the applied model computes what the base model does
    preserves_outputs_at_init: bool = True
    long_name: str = ""  # the method in error messages ("full fine-tuning"); default: family or name
    # True when prepare_inference folds the method into the base weights; ``apply`` may turn it off for
    # the instance (nothing merges into a quantised 4-bit base)
    supports_merge: bool = False
    # True when some trainable parameter may get no gradient in a step; DDP then searches the graph
    # for them every step (find_unused_parameters), which costs time, so only such methods ask for it
    needs_unused_parameter_search: bool = False
    has_peft_counterpart: bool = False  # ``peft_config`` gives PEFT's version (benchmark twins, parity tests)
    exports_peft: bool = False  # a trained run exports as a PEFT LoRA adapter (lora-lab-export)
    bench_arms: tuple[str, ...] = ()  # the arms of conf/arm that bench it; the first is its PEFT twin's
    order: int = 9  # position of the method's family in tables and plots (full 0, head 1, adapters 2, ...)
    family: str = ""  # legend entry in plots; default: the registered name
    plot_style: tuple[str, str] = ("tab:purple", "x")  # matplotlib colour and marker of the family

    # the optimiser steps the run will take, set by the trainer before ``apply`` (None outside a run)
    total_steps: int | None = None

    def __init__(self, cfg, resolved: dict | None = None):
        self.cfg = cfg
        self.resolved: dict = dict(resolved or {})  # settings decided when applied (e.g. LoRA's r for a budget)

    # ------------------------------------------------------------ what the method is
    def label(self) -> str:
        """The row name in tables: the method and its size, e.g. "LoRA r=8 α=8 (q+v)"."""
        return self.family or self.name

    def size(self) -> float | None:
        """The method's size setting (rank, bottleneck, number of layers), for sorting; None if it has none."""
        return None

    def rank(self) -> int | None:
        """The rank of a low-rank method (accuracy-vs-rank plots); None for other methods."""
        return None

    def rank_series(self) -> list[str]:
        """The lines this run belongs to in an accuracy-vs-rank plot (its label without r)."""
        return [self.label()]

    def run_tag(self) -> str:
        """A short name for run names, e.g. "lora-r8"."""
        return self.name

    def sort_key(self) -> tuple:
        return (self.order, self.name, self.size() or 0)

    def adapts_matrices(self) -> bool:
        """Whether the method changes weight matrices with these settings, so that ``delta_weights``
        reports some ΔW after ``apply`` (BitFit and head-only tuning change none)."""
        return True

    def expected_trainable(self, model: nn.Module) -> int | None:
        """The number of parameters ``apply`` trains on ``model`` (not yet applied) with these settings,
        by the method's formula over the model's sizes (``ModelDims``); None where it has no formula
        (targets named by regular expressions, an architecture the formula does not describe)."""
        return None

    # ------------------------------------------------------------ applying and reporting
    def check(self) -> None:
        """Validate the method's own settings before any model is loaded (raise ConfigError)."""

    def check_files(self) -> None:
        """Check the local files the settings name (they exist and read), before any model is loaded."""

    def check_model(self, model_cfg) -> None:
        """Refuse a model config the method cannot train (raise ConfigError): a method that trains every
        weight has nothing to keep frozen in bf16 or 4 bits."""
        if not self.trains_every_weight:
            return
        name = self.long_name or self.family or self.name
        if model_cfg.get("dtype") == "bf16":
            raise ConfigError("model.dtype", "bf16", f"stores the frozen weights in bf16, and {name} freezes none "
                              "(its trainable weights stay fp32)")
        if wants_4bit(model_cfg):
            raise ConfigError(LOAD_IN_4BIT, True, f"quantises the frozen base to 4 bits, and {name} freezes "
                              "nothing (a quantised weight cannot be trained); use a parameter-efficient method")

    def apply(self, model: nn.Module) -> None:
        """Modify ``model`` in place and set ``requires_grad`` on exactly the trained parameters."""
        raise NotImplementedError

    def method_parameter_names(self, model: nn.Module) -> set[str]:
        """Names of the parameters the method trains that are not the task head (LoRA factors,
        adapters, biases). Empty by default."""
        return set()

    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        """ΔW per adapted matrix, keyed by the module name of the matrix in the original model. An
        empty dict means the method changes no weight matrix (ΔW = 0 everywhere)."""
        raise NotImplementedError

    # ------------------------------------------------------------ training
    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        """Learning-rate multipliers of trainable parameters by name (LoRA+: B's ``lr_ratio``): the
        optimiser gives each such parameter ``lr`` times its multiplier, the others ``lr``; the schedule
        scales every group alike. Empty by default: one learning rate for everything."""
        return {}

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term the trainer adds to the task's loss at every training step (once per optimiser step when
        gradients accumulate), e.g. AdaLoRA's orthogonality regulariser; None (the default): nothing."""
        return None

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called by the trainer after each optimiser step (``step``: the steps done so far, from 1), before
        the gradients are cleared; a method that changes itself while training (AdaLoRA's rank
        allocation) does it here. Nothing by default."""

    def finish_training(self, model: nn.Module) -> None:
        """Called by the trainer once training is over, before it saves the run's trainable state, and by the
        rebuild of a trained run right after ``apply``, so that the rebuilt model has the saved parameters: a
        method that trains through a reparameterisation (prefix tuning's MLP) replaces it here by the plain
        parameters it computes (still trainable), so that the saved state holds those only. The checkpoints
        written while training, and ``trainer.keep_last``'s last-epoch state, keep the training form. Nothing
        by default."""

    def merge_layers(self, model: nn.Module) -> Iterable[nn.Module]:
        """The layers that fold the method into their base weight (``merge()``, ``unmerge()``)."""
        return ()

    def prepare_inference(self, model: nn.Module) -> None:
        """Make inference as cheap as the method allows: merge every layer of ``merge_layers``, unless
        merging is off for this instance (a quantised base: the unmerged model is the inference model)."""
        if not self.supports_merge:
            return
        for layer in self.merge_layers(model):
            layer.merge()

    def undo_inference(self, model: nn.Module) -> None:
        """Reverse ``prepare_inference`` so training can continue."""
        for layer in self.merge_layers(model):
            layer.unmerge()

    def merge_and_unload(self, model: nn.Module) -> nn.Module | None:
        """``model`` with the method merged in and its layers replaced by plain base layers (for
        deployment); None when the method has no such form."""
        return None

    # ------------------------------------------------------------ the PEFT counterpart, if any
    def peft_config(self, model: nn.Module):
        """A ``peft`` config for the same method and settings on ``model`` (after ``apply``), or None
        when PEFT has no counterpart. Used to compare outputs and speed with PEFT."""
        return None

    def peft_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """This method's parameters under the names they have in ``peft.get_peft_model(base, config)``
        (``base_model.model.<module>.<peft parameter>``), so a PEFT model can be given our weights."""
        raise NotImplementedError(f"method {self.name!r} has no PEFT counterpart")


PEFT_PREFIX = "base_model.model."  # where peft.get_peft_model puts the wrapped model's parameters

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def decorator(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def registered_methods() -> dict[str, type[Method]]:
    """Every registered method's class by name, in the order they were registered."""
    return dict(_REGISTRY)


def method_class(method_cfg) -> type[Method]:
    """The class of ``method.name``. A name not registered yet is registered by importing the module
    ``method.module`` names, when the config has one (a method kept outside lora_lab)."""
    name = method_cfg.get("name")
    module = method_cfg.get("module")
    if name not in _REGISTRY and module is not None:
        _import_method_module(module, name)
    if name not in _REGISTRY:
        raise ConfigError("method.name", name, f"unknown method; choose one of {available_methods()}")
    return _REGISTRY[name]


def _import_method_module(module, name) -> None:
    if not isinstance(module, str) or not module.strip():
        raise ConfigError("method.module", module, "must be the name of a Python module (e.g. my_pkg.my_method)")
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ConfigError("method.module", module, f"could not be imported: {first_line(error)}") from None
    if name not in _REGISTRY:
        raise ConfigError("method.module", module, f"registers no method {name!r} (@register({name!r}))")


def build_method(cfg) -> Method:
    method = method_class(cfg)(cfg)
    method.check()
    return method


def describe_method(method_cfg, resolved: dict | None = None) -> Method:
    """A method object for describing a run (label, size, order) from its recorded config, without
    validating it. A method that is not installed is described by its name alone."""
    cfg = OmegaConf.create(dict(method_cfg or {}))
    try:
        cls = method_class(cfg)
    except ConfigError:
        method = Method(cfg, resolved)
        method.name = str(cfg.get("name", "?"))
        return method
    return cls(cfg, resolved)


# ---------------------------------------------------------------- sizes for the parameter formulas

@dataclass(frozen=True)
class ModelDims:
    """The sizes a method's parameter formula reads from a transformers config: per layer, the
    matrices the target aliases name, the biases and the normalisation layers."""

    layers: int
    hidden: int  # d
    intermediate: int  # d_ff
    q: int  # output features of q (heads x head_dim)
    kv: int  # output features of k and of v (fewer than d with grouped-query attention)
    vocab: int
    layer_norm: bool  # LayerNorms with a beta and linear layers with biases (BERT, GPT-2, OPT); else RMSNorm
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    gated: bool  # a gated MLP: gate, up and down projections
    tied: bool  # a language model's output layer is its input embedding matrix

    @classmethod
    def of(cls, config) -> ModelDims:
        hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        intermediate = next((v for v in (getattr(config, k, None) for k in (
            "intermediate_size", "ffn_dim", "n_inner", "hidden_dim")) if v), 4 * hidden)
        layer_norm = not hasattr(config, "rms_norm_eps")
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(layers=int(config.num_hidden_layers), hidden=hidden, intermediate=int(intermediate),
                   q=heads * head_dim, kv=kv_heads * head_dim, vocab=int(config.vocab_size), layer_norm=layer_norm,
                   qkv_bias=layer_norm or attention_bias or config.model_type == "qwen2",
                   o_bias=layer_norm or attention_bias, mlp_bias=layer_norm or bool(getattr(config, "mlp_bias", False)),
                   gated=not layer_norm, tied=bool(getattr(config, "tie_word_embeddings", False)))

    def matrix(self, target: str) -> tuple[int, int] | None:
        """(out, in) of the matrix a target alias names in each layer; None for another name."""
        d, ff = self.hidden, self.intermediate
        shapes = {"q": (self.q, d), "k": (self.kv, d), "v": (self.kv, d), "o": (d, self.q), "ffn_in": (ff, d),
                  "ffn_out": (d, ff), "gate": (ff, d)}
        return shapes.get(canonical_alias(str(target)))

    def matrices(self, targets) -> list[tuple[int, int]] | None:
        """(out, in) of each matrix of ``targets`` in one layer; None if one is not an alias."""
        shapes = [self.matrix(t) for t in targets]
        return None if any(s is None for s in shapes) else shapes

    @property
    def norm_parameters(self) -> int:
        """The normalisation layers' parameters: two per layer and one more (the embeddings' or the final)."""
        return (2 * self.layers + 1) * self.hidden * (2 if self.layer_norm else 1)

    @property
    def bias_parameters(self) -> int:
        """The backbone's biases: those of the linear layers and the LayerNorms' betas."""
        d, ff = self.hidden, self.intermediate
        per_layer = (self.q + 2 * self.kv) * self.qkv_bias + d * self.o_bias
        per_layer += ((2 if self.gated else 1) * ff + d) * self.mlp_bias
        norms = (2 * self.layers + 1) * d if self.layer_norm else 0
        return self.layers * per_layer + norms


def head_count(model: nn.Module) -> int:
    """Parameters of the task head (``train_head``); 0 on a language model, which has none."""
    names = head_parameter_names(model)
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def matrix_shape(model: nn.Module, matrix: Matrix) -> tuple[int, int]:
    """(out, in) of a resolved matrix: a part of a fused layer has only its rows."""
    d_out, d_in = features(model.get_submodule(matrix.module))
    return (matrix.rows[1] - matrix.rows[0] if matrix.rows else d_out), d_in


def wrap_matrices(model: nn.Module, matrices: list[Matrix], make: Callable[[nn.Module, Matrix], nn.Module]) -> None:
    """Replace each layer adapted whole by ``make(layer, matrix)``, and each fused layer with adapted
    parts by a ``FusedParts`` holding ``make(layer, matrix)`` per part (``matrix.rows`` says which)."""
    by_module: dict[str, list[Matrix]] = {}
    for matrix in matrices:
        by_module.setdefault(matrix.module, []).append(matrix)
    for module, found in by_module.items():
        parent, child = get_submodule_parent(model, module)
        base = getattr(parent, child)
        if found[0].part is None:
            setattr(parent, child, make(base, found[0]))
        else:
            setattr(parent, child, FusedParts(base, {m.part: make(base, m) for m in found}))


class WeightSnapshot:
    """Copies of some weight matrices taken before training, to report ΔW = W - W0 afterwards (out x
    in, also for a Conv1D, whose stored weight is the transpose)."""

    def __init__(self, model: nn.Module, matrices: list[Matrix]):
        self.matrices = {m.name: m for m in matrices}
        self.initial = {m.name: self._weight(model, m).to("cpu", copy=True) for m in matrices}

    @staticmethod
    def _weight(model: nn.Module, matrix: Matrix) -> torch.Tensor:
        return dense_weight(model.get_submodule(matrix.module), matrix.rows).detach().contiguous()

    def deltas(self, model: nn.Module) -> dict[str, DeltaW]:
        out = {}
        for name, w0 in self.initial.items():
            w = self._weight(model, self.matrices[name]).float().cpu()
            out[name] = DeltaW(dense=w - w0.float(), base=w0.float())
        return out
