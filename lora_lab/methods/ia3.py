"""(IA)³ (Liu et al. 2022, T-Few): learned vectors rescale inner activations.

On an attention projection (key, value) the vector scales the layer's whole output, bias included:
h = l ⊙ (W x + b). On a feed-forward down projection it scales the layer's input, the intermediate
activation: h = W (l ⊙ x) + b. The vectors start at 1, so the model is unchanged at step 0.

Both forms fold into the weights: output scaling gives W' = diag(l) W and b' = l ⊙ b, input scaling
gives W' = W diag(l) with the bias unchanged. Merging keeps a copy of the weights it overwrites, so
unmerging restores them exactly (dividing by l would fail for entries near zero).

W is always the out x in matrix (``lora_lab.models.linear_layers``): on GPT-2's Conv1D, which stores W^T, the
FFN input scaling multiplies stored rows, not columns. On parts of a fused layer (GPT-2's k and v in
c_attn, the default targets) the vector scales those parts' output rows only (2 d per layer, as with
separate k and v); input scaling applies to whole layers. On a quantised (4-bit) base nothing merges.
"""
from __future__ import annotations

import torch
from torch import nn

from lora_lab import rules
from lora_lab.errors import ConfigError
from lora_lab.methods.base import (
    PEFT_PREFIX,
    DeltaW,
    Method,
    ModelDims,
    freeze_all,
    head_count,
    register,
    wrap_matrices,
)
from lora_lab.models.architectures import (
    all_matrices,
    canonical_alias,
    head_parameter_names,
    peft_task_type,
    resolve_matrices,
)
from lora_lab.models.linear_layers import (
    Rows,
    attach,
    bias_rows,
    copy_to_weight,
    dense_weight,
    features,
    float_dtype,
    is_quantized,
    transposed,
)

PARAMETER = "ia3_l"


class IA3Linear(nn.Module):
    """A linear layer whose output (``feedforward=False``) or input (``feedforward=True``) is
    multiplied elementwise by a learned vector ``ia3_l``; with ``rows``, the output rows of one part
    of a fused layer (inside a ``FusedParts``, which owns the base layer and calls ``update``)."""

    def __init__(self, base: nn.Module, feedforward: bool, rows: Rows | None = None):
        super().__init__()
        if rows is None:
            self.base = base
        else:
            attach(self, base)
        if feedforward and rows is not None:
            raise ValueError("input scaling applies to a whole layer, not to rows of a fused one")
        self.rows = rows
        self.feedforward = feedforward
        out_features, in_features = features(base)
        size = in_features if feedforward else (out_features if rows is None else rows[1] - rows[0])
        self.ia3_l = nn.Parameter(torch.ones(size, device=base.weight.device, dtype=float_dtype(base)))
        self.merged = False
        self._unmerged: tuple[torch.Tensor, torch.Tensor | None] | None = None  # weight, bias before merge

    def original_weight(self) -> torch.Tensor:
        """The out x in weight (rows x in for a part) without the vector folded in (the stored copy
        while merged)."""
        return self._unmerged[0] if self.merged else dense_weight(self.base, self.rows)

    def scaled(self, weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """``diag(vector) W`` on the output side, ``W diag(vector)`` on the input side."""
        return weight * (vector[None, :] if self.feedforward else vector[:, None])

    def delta(self) -> torch.Tensor:
        """ΔW = (diag(l) - I) W0 (output side) or W0 (diag(l) - I) (input side), in float32."""
        w0 = self.original_weight().detach().float()
        return self.scaled(w0, self.ia3_l.detach().float() - 1.0)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight, bias = dense_weight(self.base, self.rows), bias_rows(self.base, self.rows)
        unmerged = (weight.detach().clone(), None if bias is None else bias.detach().clone())
        vector = self.ia3_l.detach().float()
        copy_to_weight(self.base, self.scaled(weight.float(), vector), self.rows)
        if bias is not None and not self.feedforward:
            bias.copy_((bias.float() * vector).to(bias.dtype))
        self._unmerged = unmerged
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight, bias = self._unmerged
        copy_to_weight(self.base, weight, self.rows)
        if bias is not None:
            bias_rows(self.base, self.rows).copy_(bias)
        self._unmerged = None
        self.merged = False

    def update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The output (rows) given the base layer's output ``out`` there: output scaling."""
        return out if self.merged else (out * self.ia3_l).to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.feedforward:
            return self.base((x * self.ia3_l).to(x.dtype))
        return self.update(x, self.base(x))


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


@register("ia3")
class IA3(Method):
    config_rules = {**Method.config_rules, "targets": rules.names(), "train_head": rules.boolean(),
                    "feedforward": rules.names(empty=True)}
    supports_merge = True
    has_peft_counterpart = True
    bench_arms = ("ia3",)
    order, family, plot_style = 5, "(IA)³", ("tab:red", "P")

    def label(self) -> str:
        targets = "+".join(map(str, _as_list(self.cfg.get("targets"))))
        return f"{self.family} ({targets})"

    def run_tag(self) -> str:
        return "ia3"

    def check(self) -> None:
        cfg = self.cfg
        targets = _as_list(cfg.get("targets"))
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError("method.targets", cfg.get("targets"), "must be a non-empty list of target names")
        feedforward = _as_list(cfg.get("feedforward"))
        if not all(isinstance(t, str) and t for t in feedforward):
            raise ConfigError("method.feedforward", cfg.get("feedforward"), "must be a list of target names")
        known = {canonical_alias(t) for t in targets}
        for target in feedforward:
            if canonical_alias(target) not in known:
                raise ConfigError("method.feedforward", target, f"is not one of method.targets {targets}")
        if not isinstance(cfg.get("train_head"), bool):
            raise ConfigError("method.train_head", cfg.get("train_head"), "must be true or false")

    def expected_trainable(self, model: nn.Module) -> int | None:
        """One vector per adapted matrix and layer: out features, in features for input scaling."""
        targets = _as_list(self.cfg.get("targets"))
        dims = ModelDims.of(model.config)
        shapes = dims.matrices(targets)
        if shapes is None:
            return None
        feedforward = {canonical_alias(t) for t in _as_list(self.cfg.get("feedforward"))}
        vectors = sum(d_in if canonical_alias(t) in feedforward else d_out for t, (d_out, d_in) in zip(targets, shapes))
        return dims.layers * vectors + (head_count(model) if self.cfg.get("train_head") else 0)

    def apply(self, model: nn.Module) -> None:
        cfg = self.cfg
        matrices = all_matrices(resolve_matrices(model, _as_list(cfg.targets), key="method.targets"))
        feedforward = _as_list(cfg.get("feedforward"))
        ff_matrices = all_matrices(resolve_matrices(model, feedforward, key="method.feedforward")
                                   if feedforward else {})
        self.adapted: list[str] = [m.name for m in matrices]
        self.feedforward_modules: list[str] = [m.name for m in ff_matrices]
        part = next((m for m in ff_matrices if m.part is not None), None)
        if part is not None:
            raise ConfigError("method.feedforward", feedforward, f"names {part.name}, a part of the fused layer "
                              f"{part.module}; input scaling applies to whole layers")
        outside = sorted(set(self.feedforward_modules) - set(self.adapted))
        if outside:
            raise ConfigError("method.feedforward", feedforward, f"matches {outside[0]}, which method.targets does not")
        freeze_all(model)
        ff = set(self.feedforward_modules)
        wrap_matrices(model, matrices, lambda base, matrix: IA3Linear(base, matrix.name in ff, matrix.rows))
        self.supports_merge = not any(is_quantized(m.base) for m in self.ia3_modules(model).values())
        self.resolved = {"ia3_parameters": sum(m.ia3_l.numel() for m in self.ia3_modules(model).values())}
        trained = self.method_parameter_names(model)
        if cfg.train_head:
            trained |= head_parameter_names(model)
        for name, p in model.named_parameters():
            if name in trained:
                p.requires_grad_(True)

    def method_parameter_names(self, model: nn.Module) -> set[str]:
        return {f"{n}.{PARAMETER}" for n in self.ia3_modules(model)}

    def ia3_modules(self, model: nn.Module) -> dict[str, IA3Linear]:
        return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}

    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        out = {}
        for name, m in self.ia3_modules(model).items():
            base = m.original_weight().detach().float().cpu().clone()  # not a view of the live weight
            out[name] = DeltaW(dense=m.delta().cpu(), base=base, kind="ia3")
        return out

    def merge_layers(self, model: nn.Module) -> list[IA3Linear]:
        return list(self.ia3_modules(model).values())

    def peft_config(self, model: nn.Module):
        """PEFT's IA3Config for the same vectors; None when parts of a fused layer are scaled (PEFT's
        (IA)³ scales whole layers)."""
        import peft

        layers = self.ia3_modules(model).values()
        if any(m.rows is not None for m in layers):
            return None
        return peft.IA3Config(target_modules=list(self.adapted), feedforward_modules=list(self.feedforward_modules),
                              fan_in_fan_out=bool(layers) and all(transposed(m.base) for m in layers),
                              task_type=peft_task_type(model))

    def peft_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """PEFT keeps (out_features, 1) vectors for output scaling and (1, in_features) for input scaling."""
        out = {}
        for name, m in self.ia3_modules(model).items():
            vector = m.ia3_l.detach()
            shape = (1, -1) if m.feedforward else (-1, 1)
            out[f"{PEFT_PREFIX}{name}.{PARAMETER}.default"] = vector.reshape(shape)
        return out
