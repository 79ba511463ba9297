"""Bottleneck adapters: Houlsby et al. 2019 (two per layer), Pfeiffer et al. 2020 (one per layer),
Lin et al. 2020 (Adapter^L) and AdapterDrop (Rücklé et al. 2020, Adapter^D).

An adapter maps h -> h + up(act(down(h))) and sits right after a projection, before the residual add
and LayerNorm. Houlsby: after the attention output projection and after the FFN output; Pfeiffer:
after the FFN output only. The up-projection starts at zero so every adapter starts as the identity.

``lin``: one adapter per layer after the whole feed-forward block (BERT's includes the residual add
and its LayerNorm; a decoder's MLP returns before its residual add), with a LayerNorm of its own at
its input: h -> h + up(act(down(LN(h)))), 2 d m + m + d + 2 d parameters. It changes no weight matrix,
so it reports no ΔW. ``drop``: Pfeiffer's places without adapters in the lowest ``drop_layers``
layers, in training and inference; ``drop_layers`` removes them from any variant's lowest layers.

On decoders the same places: GPT-2's attn.c_proj and mlp.c_proj (Conv1D), Llama's o_proj and
down_proj; Houlsby's LayerNorms are whatever normalisation layers the model has (RMSNorm in Llama).
Adapters follow whole layers: a part of a fused layer (GPT-2's q in c_attn) is refused.
"""
from __future__ import annotations

import torch
from torch import nn

from lora_lab import rules
from lora_lab.errors import ConfigError
from lora_lab.methods.base import DeltaW, Method, ModelDims, freeze_all, head_count, register
from lora_lab.models.architectures import (
    all_matrices,
    get_submodule_parent,
    head_parameter_names,
    layer_norm_parameter_names,
    layer_stack,
    resolve_matrices,
)
from lora_lab.models.linear_layers import dense_weight, features, float_dtype

INSERT_AFTER = {"houlsby": ["o", "ffn_out"], "pfeiffer": ["ffn_out"], "lin": ["ffn_out"], "drop": ["ffn_out"]}
AFTER_BLOCK = ("lin",)  # the adapter follows the module that holds the matrix, not the matrix
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "identity": nn.Identity}


class Bottleneck(nn.Module):
    def __init__(self, dim: int, size: int, activation: str, norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.down = nn.Linear(dim, size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, dim)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(self.norm(h))))


class WithAdapter(nn.Module):
    """A linear layer (or a block: ``lin``) followed by a bottleneck adapter on its output."""

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):  # a block that returns more than its hidden states
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


def bottleneck_size(cfg, dim: int) -> int:
    if cfg.get("bottleneck"):
        size = int(cfg.bottleneck)
        key, value = "method.bottleneck", cfg.bottleneck
    elif cfg.get("reduction_factor"):
        size = dim // int(cfg.reduction_factor)
        key, value = "method.reduction_factor", cfg.reduction_factor
    else:
        raise ConfigError("method.bottleneck", None, "set a bottleneck size or a reduction_factor")
    if size <= 0:
        raise ConfigError(key, value, f"gives a bottleneck of {size} for hidden size {dim}")
    return size


@register("adapter")
class Adapter(Method):
    config_rules = {**Method.config_rules, "variant": rules.text(), "bottleneck": rules.integer(1, null=True),
                    "reduction_factor": rules.integer(1, null=True), "activation": rules.text(),
                    "train_layer_norm": rules.boolean(null=True), "insert_after": rules.names(null=True),
                    "drop_layers": rules.integer(0)}
    bench_arms = ("houlsby", "pfeiffer", "adapter_lin", "adapter_drop")
    order, family, plot_style = 2, "Adapters", ("tab:orange", "D")

    def label(self) -> str:
        size = self.cfg.get("bottleneck") or f"d/{self.cfg.get('reduction_factor')}"
        dropped = f" (lowest {self.dropped()} dropped)" if self.dropped() else ""
        return f"Adapter {str(self.cfg.get('variant')).capitalize()} m={size}{dropped}"

    def dropped(self) -> int:
        return int(self.cfg.get("drop_layers") or 0)

    def adapts_matrices(self) -> bool:
        return self.cfg.get("variant") not in AFTER_BLOCK

    def size(self) -> float:
        return self.cfg.get("bottleneck") or 0

    def sort_key(self) -> tuple:
        return (self.order, str(self.cfg.get("variant")), self.size())

    def run_tag(self) -> str:
        return f"adapter-{self.cfg.get('variant')}"

    def check(self) -> None:
        cfg = self.cfg
        if cfg.variant not in INSERT_AFTER:
            raise ConfigError("method.variant", cfg.variant, f"must be one of {sorted(INSERT_AFTER)}")
        if cfg.activation not in ACTIVATIONS:
            raise ConfigError("method.activation", cfg.activation, f"must be one of {sorted(ACTIVATIONS)}")
        for key in ("bottleneck", "reduction_factor"):
            if cfg.get(key) is not None and int(cfg.get(key)) <= 0:
                raise ConfigError(f"method.{key}", cfg.get(key), "must be a positive integer")
        if cfg.variant == "drop" and not self.dropped():
            raise ConfigError("method.drop_layers", cfg.get("drop_layers"), "variant=drop (AdapterDrop) removes the "
                              "adapters of the lowest k layers: set k >= 1")
        if cfg.variant in AFTER_BLOCK and cfg.get("insert_after"):
            raise ConfigError("method.insert_after", list(cfg.insert_after), f"variant={cfg.variant} places one "
                              "adapter after each feed-forward block; choose another variant to name places")

    def train_layer_norm(self) -> bool:
        cfg = self.cfg
        return cfg.train_layer_norm if cfg.get("train_layer_norm") is not None else cfg.variant == "houlsby"

    def places(self) -> list:
        return list(self.cfg.insert_after) if self.cfg.get("insert_after") else INSERT_AFTER[self.cfg.variant]

    def expected_trainable(self, model: nn.Module) -> int | None:
        """Per adapter after a d_out-wide layer: 2 d_out m + m + d_out (plus 2 d_out for its own
        LayerNorm: ``lin``), in the layers not dropped; the normalisation layers when they train; the
        head. The LoRA paper's count: L_adpt x (2 d r + r + d) + 2 x L_LN x d."""
        dims = ModelDims.of(model.config)
        shapes = dims.matrices(self.places())
        if shapes is None:
            return None
        count, layers = 0, dims.layers - self.dropped()
        for d_out, _ in shapes:
            m = bottleneck_size(self.cfg, d_out)
            own_norm = 2 * d_out if self.cfg.variant in AFTER_BLOCK else 0
            count += layers * (2 * d_out * m + m + d_out + own_norm)
        return count + (dims.norm_parameters if self.train_layer_norm() else 0) + head_count(model)

    def apply(self, model: nn.Module) -> None:
        cfg = self.cfg
        where = self.places()
        matrices = all_matrices(resolve_matrices(model, where, key="method.insert_after"))
        part = next((m for m in matrices if m.part is not None), None)
        if part is not None:
            raise ConfigError("method.insert_after", list(where), f"names {part.name}, a part of the fused layer "
                              f"{part.module}; an adapter follows a whole layer")
        freeze_all(model)
        kept = self._kept_layers(model)
        after_block = cfg.variant in AFTER_BLOCK
        self.wrapped = [m.name.rsplit(".", 1)[0] if after_block else m.name for m in matrices
                        if _layer_of(m.name, kept) is not None]
        for name, matrix in zip(self.wrapped, (m for m in matrices if _layer_of(m.name, kept) is not None)):
            parent, child = get_submodule_parent(model, name)
            base = getattr(parent, child)
            layer = model.get_submodule(matrix.name)
            dim = features(layer)[0]
            adapter = Bottleneck(dim, bottleneck_size(cfg, dim), cfg.activation, norm=after_block)
            adapter.to(device=layer.weight.device, dtype=float_dtype(layer))
            setattr(parent, child, WithAdapter(base, adapter))
        trained = self.method_parameter_names(model) | head_parameter_names(model)
        if self.train_layer_norm():
            trained |= layer_norm_parameter_names(model)
        for name, p in model.named_parameters():
            if name in trained:
                p.requires_grad_(True)

    def _kept_layers(self, model: nn.Module) -> tuple[str, range]:
        """The layer stack's name and the indices of the layers that get adapters."""
        stack, layers = layer_stack(model)
        if self.dropped() >= len(layers):
            raise ConfigError("method.drop_layers", self.dropped(), f"would drop every adapter: the model has "
                              f"{len(layers)} layers")
        return stack, range(self.dropped(), len(layers))

    def method_parameter_names(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters() if ".adapter." in n}

    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        """The adapter's update of the matrix it follows, exact when the activation is the identity:
        W x -> (I + U D) W x, so ΔW = U (D W), stored as factors of rank <= bottleneck size."""
        out = {}
        if not self.adapts_matrices():
            return out
        for name, m in model.named_modules():
            if isinstance(m, WithAdapter):
                W = dense_weight(m.base).detach().float().cpu()  # out x in, also for a Conv1D
                U = m.adapter.up.weight.detach().float().cpu()
                D = m.adapter.down.weight.detach().float().cpu()
                out[name] = DeltaW(B=U, A=D @ W, base=W, kind="adapter_linearised")
        return out


def _layer_of(name: str, kept: tuple[str, range]) -> int | None:
    """The index of the layer a module belongs to, if that layer gets adapters."""
    stack, layers = kept
    rest = name[len(stack) + 1:] if name.startswith(stack + ".") else None
    index = rest.split(".", 1)[0] if rest else None
    return int(index) if index is not None and index.isdigit() and int(index) in layers else None
