"""The interface every fine-tuning method implements, and the registry that names them.

A method is applied to a Hugging Face model in place. Afterwards it can say which parameters
it trains (grouped as "method", "head" or "other") and report ΔW for every weight matrix it adapts,
dense or as low-rank factors, so that analysis treats all methods alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lora_lab.models.architectures import Matrix, get_submodule_parent
from lora_lab.errors import ConfigError
from lora_lab.models.linear_layers import FusedParts, dense_weight, features


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
    # True when prepare_inference folds the method into the base weights; ``apply`` may turn it off for
    # the instance (nothing merges into a quantised 4-bit base)
    supports_merge: bool = False
    # True when some trainable parameter may get no gradient in a step; DDP then searches the graph
    # for them every step (find_unused_parameters), which costs time, so only such methods ask for it
    needs_unused_parameter_search: bool = False
    order: int = 9  # position of the method's family in tables and plots (full 0, head 1, adapters 2, ...)
    family: str = ""  # legend entry in plots; default: the registered name
    plot_style: tuple[str, str] = ("tab:purple", "x")  # matplotlib colour and marker of the family

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

    # ------------------------------------------------------------ applying and reporting
    def check(self) -> None:
        """Validate the method's own settings before any model is loaded (raise ConfigError)."""

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

    def prepare_inference(self, model: nn.Module) -> None:
        """Make inference as cheap as the method allows (e.g. merge LoRA). Default: nothing."""

    def undo_inference(self, model: nn.Module) -> None:
        """Reverse ``prepare_inference`` so training can continue."""

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


def build_method(cfg) -> Method:
    name = cfg.name
    if name not in _REGISTRY:
        raise ConfigError("method.name", name, f"unknown method; choose one of {available_methods()}")
    method = _REGISTRY[name](cfg)
    method.check()
    return method


def describe_method(method_cfg, resolved: dict | None = None) -> Method:
    """A method object for describing a run (label, size, order) from its recorded config, without
    validating it. A method that is not installed is described by its name alone."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(dict(method_cfg or {}))
    cls = _REGISTRY.get(str(cfg.get("name", "")))
    if cls is None:
        method = Method(cfg, resolved)
        method.name = str(cfg.get("name", "?"))
        return method
    return cls(cfg, resolved)


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
