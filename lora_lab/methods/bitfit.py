"""BitFit (Ben Zaken et al. 2021): only the bias terms of the backbone train, plus the task head.

Trained: every parameter of the backbone (``model.base_model_prefix``) whose name ends in ".bias":
the q/k/v/o and FFN biases and every LayerNorm's beta, the embedding LayerNorm's included. No weight
matrix changes, so ΔW is zero everywhere and there is nothing to merge. PEFT has no counterpart.

Decoders: GPT-2 per layer 3d (c_attn) + d (attn.c_proj) + d_ff (c_fc) + d (mlp.c_proj) + 2d (ln_1, ln_2
betas), plus ln_f's d; OPT likewise with its q/k/v/out_proj, fc1, fc2 and LayerNorm biases; Qwen2 has
only its q, k and v biases; Llama, Mistral and Gemma have none (RMSNorm has no beta), so BitFit is
refused there. A language model has no task head, so train_head adds nothing on it.
"""
from __future__ import annotations

from torch import nn

from lora_lab import rules
from lora_lab.errors import ConfigError
from lora_lab.methods.base import DeltaW, Method, ModelDims, freeze_all, head_count, register
from lora_lab.models.architectures import head_parameter_names


@register("bitfit")
class BitFit(Method):
    config_rules = {**Method.config_rules, "train_head": rules.boolean()}
    bench_arms = ("bitfit",)
    order, family, plot_style = 4, "BitFit", ("tab:green", "^")

    def adapts_matrices(self) -> bool:
        return False

    def expected_trainable(self, model: nn.Module) -> int:
        """Every bias of the backbone (``ModelDims.bias_parameters``), and the head."""
        head = head_count(model) if self.cfg.get("train_head", True) else 0
        return ModelDims.of(model.config).bias_parameters + head

    def check(self) -> None:
        train_head = self.cfg.get("train_head", True)
        if not isinstance(train_head, bool):
            raise ConfigError("method.train_head", train_head, "must be true or false")

    def apply(self, model: nn.Module) -> None:
        biases = self.method_parameter_names(model)
        if not biases:
            raise ConfigError("model", type(model).__name__, "has no bias terms in its backbone for BitFit to train")
        freeze_all(model)
        trained = set(biases)
        if self.cfg.get("train_head", True):
            trained |= head_parameter_names(model)
        for name, p in model.named_parameters():
            if name in trained:
                p.requires_grad_(True)
        self.resolved = {"bias_parameters": sum(p.numel() for n, p in model.named_parameters() if n in biases)}

    def method_parameter_names(self, model: nn.Module) -> set[str]:
        """The backbone's biases; the pooler's bias belongs to the head (see ``head_parameter_names``)."""
        prefix = getattr(model, "base_model_prefix", "")
        head = head_parameter_names(model)
        return {
            name for name, _ in model.named_parameters()
            if name.endswith(".bias") and (not prefix or name.startswith(prefix + ".")) and name not in head
        }

    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        return {}  # no weight matrix changes: ΔW = 0 everywhere
