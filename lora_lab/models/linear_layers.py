"""Linear-like layers, read and changed in one orientation: ΔW and W are always out x in (what
``F.linear`` uses), whatever the layer stores.

- ``nn.Linear``: weight stored out x in.
- transformers' ``Conv1D`` (GPT-2, GPT): weight stored in x out, ``y = x W + b``. Reading it as if it
  were an nn.Linear weight gives the transpose (PEFT's ``fan_in_fan_out``), so every read and write of
  a weight matrix goes through this module.
- bitsandbytes' quantised layers (``Linear4bit``, an nn.Linear subclass whose weight is packed): the
  dense weight comes from dequantising; nothing can be added into it. bitsandbytes is only imported
  when a layer's class comes from it, so nothing here needs it installed.

A fused layer holds several matrices in its output rows (GPT-2's ``c_attn``: q, k and v). A method
that adapts some of them replaces the layer by ``FusedParts``, which hands each adapted row range to
the method's own layer for that part.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_lab.errors import ConfigError

Rows = tuple[int, int]  # [start, stop) of a layer's output rows


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def is_quantized(module: nn.Module) -> bool:
    """A layer from bitsandbytes (4-bit or 8-bit): its stored weight is not a dense matrix."""
    return type(module).__module__.split(".", 1)[0] == "bitsandbytes"


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features)."""
    if is_conv1d(module):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def transposed(module: nn.Module) -> bool:
    """Whether the layer stores its weight in x out (PEFT's ``fan_in_fan_out``)."""
    return is_conv1d(module)


def dequantize(module: nn.Module) -> torch.Tensor:
    """The dense out x in weight of a bitsandbytes 4-bit layer."""
    import bitsandbytes.functional as bnb_functional

    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ConfigError("model", type(module).__name__, "is a quantised layer without a 4-bit quant_state; "
                          "only bitsandbytes Linear4bit bases are supported")
    return bnb_functional.dequantize_4bit(weight.data, state)


def dense_weight(module: nn.Module, rows: Rows | None = None) -> torch.Tensor:
    """The weight as an out x in matrix (its rows ``rows`` only, if given). A view of the stored
    weight for nn.Linear and Conv1D (autograd flows into it), a fresh tensor for a quantised layer."""
    if is_quantized(module):
        w = dequantize(module)
    elif is_conv1d(module):
        w = module.weight.t()
    else:
        w = module.weight
    return w if rows is None else w[rows[0]:rows[1]]


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a method's own parameters next to this layer start in: the weight's, or float32
    when the stored weight is not a float (packed 4-bit)."""
    dtype = module.weight.dtype
    return dtype if dtype.is_floating_point and not is_quantized(module) else torch.float32


def _refuse_quantized(module: nn.Module) -> None:
    if is_quantized(module):
        raise ConfigError("model", type(module).__name__, "is quantised: no update can be merged into its "
                          "weight (keep the method unmerged)")


@torch.no_grad()
def add_to_weight(module: nn.Module, delta: torch.Tensor, rows: Rows | None = None) -> None:
    """W[rows] += delta, with delta out x in (or rows x in), in the weight's own dtype and layout."""
    _refuse_quantized(module)
    target = dense_weight(module, rows)
    target.add_(delta.to(target.dtype))


@torch.no_grad()
def copy_to_weight(module: nn.Module, value: torch.Tensor, rows: Rows | None = None) -> None:
    """W[rows] = value (out x in, or rows x in), in the weight's own dtype and layout."""
    _refuse_quantized(module)
    target = dense_weight(module, rows)
    target.copy_(value.to(target.dtype))


def bias_rows(module: nn.Module, rows: Rows | None = None) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    if bias is None or rows is None:
        return bias
    return bias[rows[0]:rows[1]]


def attach(owner: nn.Module, base: nn.Module) -> None:
    """Let ``owner`` (a method's layer for one part of a fused layer) reach the fused layer as
    ``owner.base`` without registering it: ``FusedParts`` holds it once, so its weight is not listed,
    saved or moved twice."""
    object.__setattr__(owner, "base", base)


class FusedParts(nn.Module):
    """A fused layer with a method's layer on some of its parts.

    Each part layer is registered under the part's name (``c_attn.q``), so its parameters and the
    ΔW it reports are named after it, and provides ``rows`` (its output rows in the fused layer),
    ``update(x, rows_out)`` (the rows' output given the base layer's output there) and ``merge`` /
    ``unmerge``. Rows of parts not adapted pass through unchanged.
    """

    def __init__(self, base: nn.Module, parts: dict[str, nn.Module]):
        super().__init__()
        self.base = base
        self.part_names = sorted(parts, key=lambda name: parts[name].rows)  # in row order, for forward
        for name in self.part_names:
            setattr(self, name, parts[name])

    def parts(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.part_names}

    @property
    def merged(self) -> bool:
        return all(p.merged for p in self.parts().values())

    def merge(self) -> None:
        for part in self.parts().values():
            part.merge()

    def unmerge(self) -> None:
        for part in self.parts().values():
            part.unmerge()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        pieces, at = [], 0
        for part in self.parts().values():
            start, stop = part.rows
            if start > at:
                pieces.append(out[..., at:start])
            pieces.append(part.update(x, out[..., start:stop]))
            at = stop
        if at < out.shape[-1]:
            pieces.append(out[..., at:])
        return torch.cat(pieces, dim=-1)
