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

from lora_lab.errors import ConfigError


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
    """Base class. Subclasses set ``name`` and implement ``apply`` and ``delta_weights``."""

    name: str = ""
    supports_merge: bool = False  # True when prepare_inference folds the method into the base weights

    def __init__(self, cfg):
        self.cfg = cfg
        self.resolved: dict = {}  # settings decided when applied (e.g. LoRA's r for a parameter budget)

    def check(self) -> None:
        """Validate the method's own settings before any model is loaded (raise ConfigError)."""

    def apply(self, model: nn.Module) -> None:
        """Modify ``model`` in place and set ``requires_grad`` on exactly the trained parameters."""
        raise NotImplementedError

    def method_parameter_names(self, model: nn.Module) -> set[str]:
        """Names of parameters the method itself added (LoRA factors, adapters). Empty by default."""
        return set()

    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        """ΔW per adapted matrix, keyed by the module name of the matrix in the original model."""
        raise NotImplementedError

    def prepare_inference(self, model: nn.Module) -> None:
        """Make inference as cheap as the method allows (e.g. merge LoRA). Default: nothing."""

    def undo_inference(self, model: nn.Module) -> None:
        """Reverse ``prepare_inference`` so training can continue."""


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


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


class WeightSnapshot:
    """Copies of some Linear weights taken before training, to report ΔW = W - W0 afterwards."""

    def __init__(self, model: nn.Module, module_names: list[str]):
        self.initial = {
            name: model.get_submodule(name).weight.detach().to("cpu", copy=True) for name in module_names
        }

    def deltas(self, model: nn.Module) -> dict[str, DeltaW]:
        out = {}
        for name, w0 in self.initial.items():
            w = model.get_submodule(name).weight.detach().float().cpu()
            out[name] = DeltaW(dense=w - w0.float(), base=w0.float())
        return out
