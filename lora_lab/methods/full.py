"""Full fine-tuning: every parameter trains. ΔW = W - W0 is reported for the ``delta_targets``
matrices, out x in (a Conv1D's stored in x out weight transposed)."""
from __future__ import annotations

from torch import nn

from lora_lab import rules
from lora_lab.methods.base import DeltaW, Method, WeightSnapshot, register
from lora_lab.models.architectures import all_matrices, resolve_matrices


@register("full")
class FullFineTuning(Method):
    config_rules = {**Method.config_rules, "delta_targets": rules.names(empty=True)}
    trains_every_weight, long_name = True, "full fine-tuning"
    bench_arms = ("full",)
    order, family, plot_style = 0, "Full FT", ("black", "s")

    def expected_trainable(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    def apply(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        matched = resolve_matrices(model, self.cfg.delta_targets, key="method.delta_targets",
                                   skip_absent_aliases=True)
        self.snapshot = WeightSnapshot(model, all_matrices(matched))

    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        return self.snapshot.deltas(model)
