"""Prompt tuning (PreEmbed, prefix-embedding tuning; Hu et al. 2021, Section 5.1): trained "virtual
token" embeddings are inserted among the input embeddings; the whole model stays frozen.

``prefix_length`` (l_p) virtual tokens go before the input, ``infix_length`` (l_i, default 0) after it:
immediately before the last real token of each sequence (the attention mask's last 1), which is the
final [SEP] of an encoder's input and, in a decoder, the last token its sequence head pools, so that
token reads the infix. Prompt tuning (Lester et al. 2021) is the prefix-only case, l_i = 0. Trained:
d_model x (l_p + l_i) parameters (d_model: the input embeddings' width), plus the head with ``train_head``.

Where: a forward pre-hook on the backbone (``model.base_model_prefix``: ``bert``, ``transformer``,
``model``, ...) embeds the input ids, inserts the virtual tokens and extends the attention mask with
ones (token type ids with 0); a forward hook gathers the real positions back out of the backbone's
hidden states. Every head therefore sees the real tokens only and in their places: CLS pooling
reads the real [CLS], mean pooling averages the real tokens under the caller's mask, a decoder's
head finds its last real token from the input ids, token-classification labels and a causal LM's
shifted labels stay aligned (no virtual position is predicted or predicts). BERT's pooler is run
again on the real [CLS]. Positions count over the extended sequence (virtual tokens first), as in
PEFT; explicit ``position_ids`` are dropped, as PEFT drops them. A causal LM generates with its cache:
the virtual tokens are inserted once, when the cache is empty, and later steps only extend the mask.
An infix needs the end of the prompt, which a causal LM's forward does not know: refused there.

Initialisation (``init``): ``vocab`` copies the embeddings of tokens drawn uniformly from the
vocabulary (PEFT's SAMPLE_VOCAB; Lester et al. found it better than random), ``random`` draws from a
normal distribution with the standard deviation of the model's own input embeddings (PEFT's RANDOM
uses N(0, 1), which is far off the scale of a pre-trained embedding matrix).

No weight matrix changes: ΔW = 0, nothing merges. PEFT's PROMPT_TUNING is the same method for
l_i = 0; it keeps the virtual positions in its outputs, so the two agree on the real tokens' logits of
a causal LM or a token classifier (``peft_config``), not on a pooled head that PEFT lets read a virtual
token (BERT's pooler and CLS pooling read PEFT's first virtual token; mean pooling averages them): no
benchmark twin (``has_peft_counterpart`` is False; the benchmark's model is a sequence classifier).
"""
from __future__ import annotations

import torch
from torch import nn

from lora_lab import rules
from lora_lab.errors import ConfigError
from lora_lab.methods.base import DeltaW, Method, freeze_all, head_count, register
from lora_lab.models.architectures import head_parameter_names, is_causal_lm, peft_task_type

MODULE = "prompt_tokens"  # the virtual tokens' module, in the backbone
INITS = ("vocab", "random")
CACHE_KEYS = ("cache", "past_key_values")  # transformers 5 renamed past_key_values to cache


def backbone_of(model: nn.Module) -> nn.Module:
    """The pre-trained transformer under the task head (``model.<base_model_prefix>``)."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(backbone, nn.Module):
        raise ConfigError("model", type(model).__name__, "has no backbone under its base_model_prefix")
    return backbone


def cache_in_use(kwargs: dict) -> bool:
    """Whether a forward call continues from a filled key/value cache (a generation step after the first)."""
    cache = next((kwargs[k] for k in CACHE_KEYS if kwargs.get(k) is not None), None)
    return cache is not None and cache.get_seq_length() > 0


class VirtualTokens(nn.Module):
    """The trained embeddings, ``prefix`` (l_p x d) and ``infix`` (l_i x d, absent when l_i = 0), and the
    two hooks that put them into the backbone's input and take them out of its output."""

    def __init__(self, prefix: torch.Tensor, infix: torch.Tensor | None):
        super().__init__()
        self.prefix = nn.Parameter(prefix)
        self.infix = nn.Parameter(infix) if infix is not None else None
        self._real: torch.Tensor | None = None  # batch x n: where the real tokens sit in the extended input

    @property
    def lengths(self) -> tuple[int, int]:
        return self.prefix.shape[0], 0 if self.infix is None else self.infix.shape[0]

    def positions(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices in the extended sequence of the real tokens (batch x n) and of the virtual ones
        (batch x (l_p + l_i)): prefix first, infix before each row's last real token."""
        size, n = mask.shape
        l_p, l_i = self.lengths
        index = torch.arange(n, device=mask.device).expand(size, n)
        last = (index * (mask != 0)).amax(dim=1, keepdim=True)  # the last real token (left or right padding)
        real = l_p + index + l_i * (index >= last)
        virtual = torch.cat([torch.arange(l_p, device=mask.device).expand(size, l_p),
                             l_p + last + torch.arange(l_i, device=mask.device)], dim=1)
        return real, virtual

    def insert(self, embeds: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None):
        """The input embeddings, attention mask and token types with the virtual tokens put in."""
        size, n, d = embeds.shape
        real, virtual = self.positions(mask)
        length = n + virtual.shape[1]
        tokens = self.prefix if self.infix is None else torch.cat([self.prefix, self.infix])
        tokens = tokens.to(embeds.dtype).expand(size, -1, -1)
        out = embeds.new_zeros(size, length, d).scatter(1, real[..., None].expand(-1, -1, d), embeds)
        out = out.scatter(1, virtual[..., None].expand(-1, -1, d), tokens)
        mask = torch.ones(size, length, dtype=mask.dtype, device=mask.device).scatter(1, real, mask)
        if types is not None:
            types = torch.zeros(size, length, dtype=types.dtype, device=types.device).scatter(1, real, types)
        self._real = real
        return out, mask, types

    def before_backbone(self, backbone: nn.Module, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        if args:  # a task model may pass input_ids positionally
            kwargs["input_ids"], args = args[0], args[1:]
        mask = kwargs.get("attention_mask")
        kwargs.pop("position_ids", None)  # positions count over the extended sequence
        if cache_in_use(kwargs):  # a generation step: the cache holds the virtual tokens already
            self._real = None
            if mask is not None:
                l_p, l_i = self.lengths
                kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], l_p + l_i), mask], dim=1)
            return args, kwargs
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = backbone.get_input_embeddings()(ids)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        kwargs["inputs_embeds"], kwargs["attention_mask"], types = self.insert(embeds, mask,
                                                                               kwargs.get("token_type_ids"))
        if types is not None:
            kwargs["token_type_ids"] = types
        return args, kwargs

    def after_backbone(self, backbone: nn.Module, args, kwargs, output):
        real, self._real = self._real, None
        if real is None:
            return output

        def strip(hidden: torch.Tensor) -> torch.Tensor:
            return hidden.gather(1, real.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1]))

        output.last_hidden_state = strip(output.last_hidden_state)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(strip(h) for h in output.hidden_states)
        if getattr(output, "pooler_output", None) is not None and getattr(backbone, "pooler", None) is not None:
            output.pooler_output = backbone.pooler(output.last_hidden_state)  # on the real [CLS]
        return output


@register("prompt")
class PromptTuning(Method):
    config_rules = {**Method.config_rules, "prefix_length": rules.integer(1), "infix_length": rules.integer(0),
                    "init": rules.choice(*INITS), "train_head": rules.boolean()}
    preserves_outputs_at_init = False  # the virtual tokens take part in attention from the start
    # PEFT's PROMPT_TUNING matches only where no head reads a virtual position (``peft_config``), not on a
    # sequence classifier such as the benchmark's, so there is no benchmark twin
    has_peft_counterpart = False
    bench_arms = ("prompt",)
    order, family, plot_style = 6, "Prompt tuning", ("mediumpurple", "d")

    def lengths(self) -> tuple[int, int]:
        return int(self.cfg.get("prefix_length")), int(self.cfg.get("infix_length") or 0)

    def label(self) -> str:
        """E.g. "Prompt tuning l_p=20", "Prompt tuning l_p=16 l_i=4"."""
        l_p, l_i = self.lengths()
        return f"{self.family} l_p={l_p}" + (f" l_i={l_i}" if l_i else "")

    def size(self) -> float:
        return float(sum(self.lengths()))

    def run_tag(self) -> str:
        l_p, l_i = self.lengths()
        return f"prompt-{l_p}" + (f"-{l_i}" if l_i else "")

    def adapts_matrices(self) -> bool:
        return False

    def expected_trainable(self, model: nn.Module) -> int:
        """d_model x (l_p + l_i), the LoRA paper's count for PreEmbed, plus the head."""
        d = model.get_input_embeddings().embedding_dim
        return d * sum(self.lengths()) + (head_count(model) if self.cfg.get("train_head", True) else 0)

    def check(self) -> None:
        for key, low in (("prefix_length", 1), ("infix_length", 0)):
            value = self.cfg.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"method.{key}", value, f"must be an integer >= {low}")
        if self.cfg.get("init", "vocab") not in INITS:
            raise ConfigError("method.init", self.cfg.get("init"), f"must be one of {list(INITS)}")
        if not isinstance(self.cfg.get("train_head", True), bool):
            raise ConfigError("method.train_head", self.cfg.get("train_head"), "must be true or false")

    def initial_tokens(self, embeddings: nn.Embedding, count: int) -> torch.Tensor:
        """``count`` starting embeddings (``init``), float32, on the embeddings' device."""
        weight = embeddings.weight.detach()
        if self.cfg.get("init", "vocab") == "vocab":
            ids = torch.randint(0, weight.shape[0], (count,), device=weight.device)
            return weight[ids].float().clone()
        std = float(weight.float().std())
        return torch.randn(count, weight.shape[1], device=weight.device) * std

    def apply(self, model: nn.Module) -> None:
        l_p, l_i = self.lengths()
        if l_i and is_causal_lm(model):
            raise ConfigError("method.infix_length", l_i, "needs the end of the prompt, which a causal language "
                              "model's forward does not know; use prefix_length alone")
        backbone = backbone_of(model)
        freeze_all(model)
        tokens = self.initial_tokens(model.get_input_embeddings(), l_p + l_i)
        virtual = VirtualTokens(tokens[:l_p], tokens[l_p:] if l_i else None)
        backbone.add_module(MODULE, virtual)
        backbone.register_forward_pre_hook(virtual.before_backbone, with_kwargs=True)
        backbone.register_forward_hook(virtual.after_backbone, with_kwargs=True)
        trained = self.method_parameter_names(model)
        if self.cfg.get("train_head", True):
            trained |= head_parameter_names(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)
        self.resolved = {"virtual_tokens": l_p + l_i, "delta_w": "none: prompt tuning changes no weight matrix"}

    def method_parameter_names(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters() if f".{MODULE}." in f".{n}"}

    def delta_weights(self, model: nn.Module) -> dict[str, DeltaW]:
        return {}  # no weight matrix changes: ΔW = 0 everywhere

    # ------------------------------------------------------------ PEFT's prompt tuning
    def peft_config(self, model: nn.Module):
        """PEFT's PromptTuningConfig with l_p virtual tokens where PEFT computes what we do: a causal LM or a
        token classifier, whose outputs at the real positions agree (PEFT's have l_p more positions before
        them). None with an infix (PEFT has none) and on a sequence classifier, whose pooled head reads
        PEFT's virtual tokens (its pooler and CLS read the first one, mean pooling averages them)."""
        import peft

        l_p, l_i = self.lengths()
        if l_i or peft_task_type(model) not in ("CAUSAL_LM", "TOKEN_CLS"):
            return None
        embeddings = model.get_input_embeddings()
        return peft.PromptTuningConfig(num_virtual_tokens=l_p, token_dim=embeddings.embedding_dim,
                                       num_transformer_submodules=1, num_layers=model.config.num_hidden_layers,
                                       prompt_tuning_init=peft.PromptTuningInit.RANDOM,
                                       task_type=peft_task_type(model))

    def peft_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The prefix as PEFT's prompt encoder's embedding (``prompt_encoder.default.embedding.weight``)."""
        virtual = getattr(backbone_of(model), MODULE)
        return {"prompt_encoder.default.embedding.weight": virtual.prefix.detach()}
