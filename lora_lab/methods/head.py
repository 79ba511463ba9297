"""Head-only tuning, and FT-TopK: the task head plus the top K transformer layers train."""
from __future__ import annotations

from torch import nn

from lora_lab.architectures import head_parameter_names, layer_stack, resolve_targets
from lora_lab.errors import ConfigError
from lora_lab.methods.base import DeltaW, Method, WeightSnapshot, freeze_all, register


@register("head")
class HeadOnly(Method):
    order, family, plot_style = 1, "Head / FT-top-K", ("tab:gray", "v")

    def label(self) -> str:
        k = int(self.cfg.get("top_layers") or 0)
        return f"FT top-{k} + head" if k else "Head only"

    def size(self) -> float:
        return int(self.cfg.get("top_layers") or 0)

    def run_tag(self) -> str:
        k = int(self.cfg.get("top_layers") or 0)
        return f"head-top{k}" if k else "head"

    def apply(self, model: nn.Module) -> None:
        k = int(self.cfg.top_layers)
        stack_name, layers = layer_stack(model)
        if not 0 <= k <= len(layers):
            raise ConfigError("method.top_layers", k, f"must be between 0 and {len(layers)} (the model's layers)")
        freeze_all(model)
        trained = head_parameter_names(model)
        top = [f"{stack_name}.{i}" for i in range(len(layers) - k, len(layers))]
        params = dict(model.named_parameters())
        for name in params:
            if name in trained or any(name.startswith(prefix + ".") for prefix in top):
                params[name].requires_grad_(True)
        snapshot_names = []
        if k:
            matched = resolve_targets(model, self.cfg.delta_targets, key="method.delta_targets")
            snapshot_names = sorted(
                n for names in matched.values() for n in names if any(n.startswith(p + ".") for p in top)
            )
        self.snapshot = WeightSnapshot(model, snapshot_names)

    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        return self.snapshot.deltas(model)
