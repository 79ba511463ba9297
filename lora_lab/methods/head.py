"""Head-only tuning, and FT-TopK: the task head plus the top K transformer layers train.

On a language model (``*ForCausalLM``, GPT-2's LMHeadModel) the "head" is the pre-trained output
layer, not a fresh task head (``architectures.head_parameter_names`` is empty for it): this method
trains it when it has its own weight (Llama, Qwen2, Mistral) and counts it as the method's. When it is
tied to the input embeddings (GPT-2, OPT, Gemma) training it would train the embeddings too: head-only
(top_layers=0) is then refused, and FT-top-K trains the top K layers with the output layer frozen.
"""
from __future__ import annotations

from torch import nn

from lora_lab import rules
from lora_lab.errors import ConfigError
from lora_lab.methods.base import DeltaW, Method, WeightSnapshot, freeze_all, head_count, register
from lora_lab.models.architectures import (
    all_matrices,
    head_parameter_names,
    layer_stack,
    output_layer,
    output_layer_is_tied,
    resolve_matrices,
)


@register("head")
class HeadOnly(Method):
    config_rules = {**Method.config_rules, "top_layers": rules.integer(0), "delta_targets": rules.names(empty=True)}
    bench_arms = ("head", "top2")
    order, family, plot_style = 1, "Head / FT-top-K", ("tab:gray", "v")

    def label(self) -> str:
        k = int(self.cfg.get("top_layers") or 0)
        return f"FT top-{k} + head" if k else "Head only"

    def size(self) -> float:
        return int(self.cfg.get("top_layers") or 0)

    def run_tag(self) -> str:
        k = int(self.cfg.get("top_layers") or 0)
        return f"head-top{k}" if k else "head"

    def adapts_matrices(self) -> bool:
        return bool(self.cfg.get("top_layers"))  # the matrices of the top layers

    def expected_trainable(self, model: nn.Module) -> int:
        """The head, or a language model's untied output layer (vocabulary x d), plus every parameter
        of the top K layers."""
        k = int(self.cfg.get("top_layers") or 0)
        head = head_count(model)
        if not head and output_layer(model) is not None and not output_layer_is_tied(model):
            head = sum(p.numel() for p in output_layer(model).parameters())
        layers = layer_stack(model)[1]
        top = list(layers)[len(layers) - k:] if k else []
        return head + sum(p.numel() for layer in top for p in layer.parameters())

    def apply(self, model: nn.Module) -> None:
        k = int(self.cfg.top_layers)
        stack_name, layers = layer_stack(model)
        if not 0 <= k <= len(layers):
            raise ConfigError("method.top_layers", k, f"must be between 0 and {len(layers)} (the model's layers)")
        if output_layer(model) is not None and output_layer_is_tied(model) and k == 0:
            raise ConfigError("method.top_layers", k, f"{type(model).__name__} is a language model whose output layer "
                              "is tied to its input embeddings: head-only tuning would train the embeddings; "
                              "set top_layers >= 1 (the output layer then stays frozen)")
        freeze_all(model)
        trained = head_parameter_names(model) | self.method_parameter_names(model)
        top = [f"{stack_name}.{i}" for i in range(len(layers) - k, len(layers))]
        params = dict(model.named_parameters())
        for name in params:
            if name in trained or any(name.startswith(prefix + ".") for prefix in top):
                params[name].requires_grad_(True)
        snapshot = []
        if k:
            matched = resolve_matrices(model, self.cfg.delta_targets, key="method.delta_targets",
                                       skip_absent_aliases=True)
            snapshot = [m for m in all_matrices(matched) if any(m.module.startswith(p + ".") for p in top)]
        self.snapshot = WeightSnapshot(model, snapshot)

    def method_parameter_names(self, model: nn.Module) -> set[str]:
        """A language model's untied output layer (it has no task head); empty otherwise."""
        out = output_layer(model)
        if out is None or output_layer_is_tied(model):
            return set()
        ids = {id(p) for p in out.parameters()}
        return {name for name, p in model.named_parameters() if id(p) in ids}

    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        return self.snapshot.deltas(model)
