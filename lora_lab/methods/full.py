"""Full fine-tuning: every parameter trains."""
from __future__ import annotations

from torch import nn

from lora_lab.architectures import resolve_targets
from lora_lab.methods.base import DeltaW, Method, WeightSnapshot, register


@register("full")
class FullFineTuning(Method):
    order, family, plot_style = 0, "Full FT", ("black", "s")

    def apply(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        matched = resolve_targets(model, self.cfg.delta_targets, key="method.delta_targets")
        self.snapshot = WeightSnapshot(model, sorted({n for names in matched.values() for n in names}))

    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        return self.snapshot.deltas(model)
