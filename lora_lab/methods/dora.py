"""DoRA (Liu et al. 2024), weight-decomposed LoRA: W' = m * (W0 + s B A) / ||W0 + s B A||_c.

Each adapted matrix (out x in) is split into a magnitude and a direction. The direction is W0 plus a
LoRA update (A, B and s exactly as in ``lora.py``); the norm is taken over each output row (the
"column" norm of the paper's in x out convention, PEFT's ``norm(dim=1)``), giving one value per output
feature; the magnitude ``m`` (out_features, trainable) starts at ||W0||_c, so with B = 0 the model is
unchanged at step 0. As in the paper (Sec. 4.3) and PEFT, the norm is a constant in backward
(detached): m and the factors get gradients, the norm does not pass any.

    y = (m / ||W0 + s B A||_c) * (W0 x + s B A dropout(x)) + b

Trained per adapted matrix: r (in + out) factor parameters plus out magnitudes. Dropout acts on the
low-rank branch only (PEFT, with dropout active in training, also feeds the dropped input through
W0 for the rescaling term; both agree in eval mode and without dropout). Merging folds W' into the
layer's weight; the pre-merge W0 is kept while merged, so unmerging restores it exactly.

Layers and parts as for LoRA (``lora.py``): on a Conv1D the matrix is its out x in transpose; on a
part of a fused layer (GPT-2's c_attn q and v) the norm and magnitude are those of the part's output
rows, which is well defined because both are per output row (the other rows pass through). A
quantised (4-bit) base is dequantised for W0 in every forward and never merged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_lab.errors import ConfigError
from lora_lab.methods.base import PEFT_PREFIX, DeltaW, register
from lora_lab.methods.lora import LoRA, LoRALinear
from lora_lab.models.linear_layers import Rows, bias_rows, copy_to_weight, dense_weight, features

INITS = ("kaiming", "gaussian")
MAGNITUDE = "lora_magnitude"


class DoRALinear(LoRALinear):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming", rows: Rows | None = None):
        if init not in INITS:
            raise ValueError(f"DoRA supports init {list(INITS)}, not {init!r}")
        super().__init__(base, r, alpha, dropout, rslora, init, rows)
        # ||W0 + s B A||_c with B = 0: the model starts unchanged.
        self.lora_magnitude = nn.Parameter(self.weight_norm().detach().clone())
        self.register_buffer("w0_while_merged", None, persistent=False)

    def low_rank(self) -> torch.Tensor:
        """s B A (out x in), LoRA's update of the direction."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def unmerged_weight(self) -> torch.Tensor:
        """W0 (out x in, rows x in for a part), whether merged or not."""
        return self.w0_while_merged if self.merged else self.base_weight()

    def weight_norm(self, w0: torch.Tensor | None = None) -> torch.Tensor:
        """||W0 + s B A|| over each output row: one value per output feature (not detached)."""
        w0 = self.unmerged_weight() if w0 is None else w0
        return torch.linalg.vector_norm(w0 + self.low_rank().to(w0.dtype), dim=1)

    def dora_weight(self) -> torch.Tensor:
        """W' = m * (W0 + s B A) / ||W0 + s B A||_c, the norm detached (as in training)."""
        w0 = self.unmerged_weight()
        direction = w0 + self.low_rank().to(w0.dtype)
        norm = torch.linalg.vector_norm(direction, dim=1).detach()
        return (self.lora_magnitude / norm).to(w0.dtype)[:, None] * direction

    def delta(self) -> torch.Tensor:
        """ΔW = W' - W0 (dense: the rescaling makes it full rank)."""
        return self.dora_weight() - self.unmerged_weight()

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            merged = self.dora_weight()
            w0 = self.base_weight().detach().clone()
            copy_to_weight(self.base, merged, self.rows)
            self.w0_while_merged = w0
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            copy_to_weight(self.base, self.w0_while_merged, self.rows)
            self.w0_while_merged = None
            self.merged = False

    def update(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """The layer's output (its rows, for a part), computed from W0 itself: the base layer's output
        ``out`` there is only used once merged."""
        if self.merged:
            return out
        w0 = self.base_weight()
        if self.quantized:  # dequantised in its stored dtype; computed in the input's, as the layer itself does
            w0 = w0.to(x.dtype)
        out = F.linear(x, w0) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B * self.scaling)
        scale = self.lora_magnitude / self.weight_norm(w0).detach()
        out = out * scale.to(out.dtype)
        bias = bias_rows(self.base, self.rows)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) if self.merged else self.update(x, None)


@register("dora")
class DoRA(LoRA):
    order, family, plot_style = 3, "DoRA", ("tab:cyan", "h")
    dora = True
    bench_arms = ("dora",)

    @staticmethod
    def matrix_parameters(r: int, d_out: int, d_in: int) -> int:
        """LoRA's A and B plus one magnitude per output feature."""
        return r * (d_in + d_out) + d_out

    def wrap(self, base: nn.Module, r: int, rows: Rows | None = None) -> DoRALinear:
        cfg = self.cfg
        return DoRALinear(base, r, float(cfg.alpha), float(cfg.dropout), bool(cfg.rslora), cfg.init, rows)

    def check(self) -> None:
        cfg = self.cfg
        if cfg.get("init", "kaiming") not in INITS:
            raise ConfigError("method.init", cfg.get("init"), f"must be one of {list(INITS)} for DoRA")
        if cfg.get("budget") is not None:
            raise ConfigError("method.budget", cfg.get("budget"), "is not supported by DoRA; set method.r")
        super().check()

    def method_parameter_names(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", MAGNITUDE)}

    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        out = {}
        with torch.no_grad():
            for name, m in self.lora_modules(model).items():
                w0 = m.unmerged_weight().detach()
                out[name] = DeltaW(dense=(m.dora_weight().detach() - w0).float().cpu(), base=w0.float().cpu(),
                                   kind="dora")
        return out

    def peft_extra_weights(self, model: nn.Module, module: str, names: list[str]) -> dict[str, torch.Tensor]:
        """The magnitudes of an exported module: a fused layer's rows outside its adapted parts get
        ||W0 row||, which makes PEFT's rescaling of those rows exactly 1."""
        layers = self.lora_modules(model)
        base = model.get_submodule(module).base
        with torch.no_grad():
            # the parts' rows of a merged layer hold W', but they are overwritten here
            magnitude = torch.linalg.vector_norm(dense_weight(base).detach().float().cpu(), dim=1)
            for n in names:
                start, stop = layers[n].rows or (0, features(base)[0])
                magnitude[start:stop] = layers[n].lora_magnitude.detach().float().cpu()
        return {f"{PEFT_PREFIX}{module}.lora_magnitude_vector.default.weight": magnitude}

    def peft_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """LoRA's entries (with W0 as the twin's base layer when merged), plus the magnitudes."""
        out = super().peft_state_dict(model)
        for name, m in self.lora_modules(model).items():
            out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector.default.weight"] = m.lora_magnitude.detach()
        return out
