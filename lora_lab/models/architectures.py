"""Where things live inside a model: named target matrices, the layer stack and the task head.

Targets are given by short aliases that resolve per architecture to regular expressions over module
names, or by any regular expression / module-name suffix. Aliases: ``q k v o`` (attention), ``ffn_in``
and ``ffn_out`` (the feed-forward up and down projections) and, for gated feed-forward blocks (Llama,
Mistral, Qwen2, Gemma), ``gate``. Encoders: BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT. Decoders:
GPT-2, OPT, Llama, Mistral, Qwen2/3, Gemma/Gemma 2. Linear layers are nn.Linear (also bitsandbytes'
4-bit Linear4bit) and transformers' Conv1D (GPT-2; see ``lora_lab.models.linear_layers``).

Fused layers: GPT-2 keeps q, k and v in one Conv1D, ``attn.c_attn`` (output rows q | k | v). The
aliases q, k and v name its parts: a target resolves to a ``Matrix``, a module plus, for a part, its
output rows, reported as ``<module>.<part>`` (``transformer.h.0.attn.c_attn.q``). When one target list
names every part of a fused layer (``[q, k, v]``) the layer is adapted whole, as one matrix under its
module name; so is a layer named by its module name or a regex (``c_attn``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from lora_lab.errors import ConfigError
from lora_lab.models.linear_layers import Rows, features, is_linear


class Part(NamedTuple):
    """An alias for one part of a fused layer: the layer's pattern, the part and the parts it holds
    in its output rows, in order and of equal size."""

    pattern: str
    part: str
    layout: tuple[str, ...]


_BERT_LIKE = {
    "q": r"attention\.self\.query$",
    "k": r"attention\.self\.key$",
    "v": r"attention\.self\.value$",
    "o": r"attention\.output\.dense$",
    "ffn_in": r"intermediate\.dense$",
    "ffn_out": r"layer\.\d+\.output\.dense$",
}
_DISTILBERT = {
    "q": r"attention\.q_lin$",
    "k": r"attention\.k_lin$",
    "v": r"attention\.v_lin$",
    "o": r"attention\.out_lin$",
    "ffn_in": r"ffn\.lin1$",
    "ffn_out": r"ffn\.lin2$",
}
_GPT2_QKV = r"\.attn\.c_attn$"
_GPT2 = {
    **{name: Part(_GPT2_QKV, name, ("q", "k", "v")) for name in ("q", "k", "v")},
    "o": r"\.attn\.c_proj$",
    "ffn_in": r"\.mlp\.c_fc$",
    "ffn_out": r"\.mlp\.c_proj$",
}
_OPT = {
    "q": r"self_attn\.q_proj$",
    "k": r"self_attn\.k_proj$",
    "v": r"self_attn\.v_proj$",
    "o": r"self_attn\.out_proj$",
    "ffn_in": r"layers\.\d+\.fc1$",
    "ffn_out": r"layers\.\d+\.fc2$",
}
_LLAMA_LIKE = {  # gated MLP: down(act(gate(x)) * up(x))
    "q": r"self_attn\.q_proj$",
    "k": r"self_attn\.k_proj$",
    "v": r"self_attn\.v_proj$",
    "o": r"self_attn\.o_proj$",
    "gate": r"mlp\.gate_proj$",
    "ffn_in": r"mlp\.up_proj$",
    "ffn_out": r"mlp\.down_proj$",
}
TARGET_ALIASES: dict[str, dict[str, str | Part]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": _DISTILBERT,
    "gpt2": _GPT2,
    "opt": _OPT,
    **{name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
}
# Long names people write for the same matrices.
_SYNONYMS = {
    "query": "q", "key": "k", "value": "v", "attn_out": "o", "attention_output": "o",
    "intermediate": "ffn_in", "ffn1": "ffn_in", "output": "ffn_out", "ffn2": "ffn_out", "ffn_gate": "gate",
}


@dataclass(frozen=True)
class Matrix:
    """One weight matrix a target names: a linear layer, or the output rows ``rows`` of a fused one
    (``part``)."""

    module: str
    part: str | None = None
    rows: Rows | None = None

    @property
    def name(self) -> str:
        """The key of its ΔW: the module name, or ``<module>.<part>``."""
        return f"{self.module}.{self.part}" if self.part else self.module


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def canonical_alias(target: str) -> str:
    return _SYNONYMS.get(target, target)


def linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_linear(m)]


def resolve_matrices(model: nn.Module, targets, key: str = "method.targets",
                     skip_absent_aliases: bool = False) -> dict[str, list[Matrix]]:
    """Map each requested target to the matrices it names (see the module docstring for fused layers).

    Raises a one-line ConfigError that lists the model's linear layers when a target matches none.
    ``skip_absent_aliases``: an alias this architecture lacks (``gate`` on BERT) is left out instead,
    for lists meant for every architecture (the ΔW that full fine-tuning saves).
    """
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ConfigError(key, targets, "needs at least one target")
    aliases = TARGET_ALIASES.get(model_type(model), {})
    backbone_linears = [n for n in linear_layer_names(model) if n.split(".")[0] in _backbone_prefixes(model)]
    hits: dict[str, list[tuple[str, Part | None]]] = {}
    if skip_absent_aliases:
        targets = [t for t in targets if not (_is_alias(t) and canonical_alias(str(t)) not in aliases)] or targets
    for target in targets:
        spec = aliases.get(canonical_alias(str(target)))
        if isinstance(spec, Part):
            found = [(n, spec) for n in backbone_linears if re.search(spec.pattern, n)]
        elif spec is not None:
            found = [(n, None) for n in backbone_linears if re.search(spec, n)]
        else:
            found = [(n, None) for n in backbone_linears if n == target or n.endswith("." + target)]
            if not found:
                try:
                    found = [(n, None) for n in backbone_linears if re.search(str(target), n)]
                except re.error:
                    found = []
        if not found:
            shown = sorted({_generic(n) for n in backbone_linears})
            known = f" aliases for {model_type(model)}: {sorted(aliases)};" if aliases else ""
            raise ConfigError(key, str(target), f"matches no linear layer;{known} linear layers: {shown}")
        hits[str(target)] = found
    whole = {n for found in hits.values() for n, part in found if part is None}
    named: dict[str, set[str]] = {}
    for found in hits.values():
        for n, part in found:
            if part is not None:
                named.setdefault(n, set()).add(part.part)

    def matrix(module: str, part: Part | None) -> Matrix:
        if part is None or module in whole or named[module] == set(part.layout):
            return Matrix(module)
        size = features(model.get_submodule(module))[0] // len(part.layout)
        start = part.layout.index(part.part) * size
        return Matrix(module, part.part, (start, start + size))

    return {target: list(dict.fromkeys(matrix(n, part) for n, part in found)) for target, found in hits.items()}


def _is_alias(target) -> bool:
    """Whether ``target`` is an alias of some architecture (not a module name or a pattern)."""
    alias = canonical_alias(str(target))
    return any(alias in table for table in TARGET_ALIASES.values())


def resolve_targets(model: nn.Module, targets, key: str = "method.targets") -> dict[str, list[str]]:
    """Map each requested target to the names of the matrices it matches: module names, and
    ``<module>.<part>`` for a part of a fused layer (``resolve_matrices`` has their rows)."""
    return {t: [m.name for m in found] for t, found in resolve_matrices(model, targets, key).items()}


def all_matrices(matched: dict[str, list[Matrix]]) -> list[Matrix]:
    """The distinct matrices of a ``resolve_matrices`` result, ordered by name."""
    return sorted({m for found in matched.values() for m in found}, key=lambda m: m.name)


def _generic(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


def _backbone_prefixes(model: nn.Module) -> set[str]:
    prefix = getattr(model, "base_model_prefix", "")
    names = {n for n, _ in model.named_children()}
    return {prefix} if prefix in names else names


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (the longest list of identical blocks)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ConfigError("model", type(model).__name__, "has no stack of transformer layers")
    return best


def output_layer(model: nn.Module) -> nn.Module | None:
    """The output layer of a language model (causal or masked LM: the pre-trained layer that maps
    hidden states to the vocabulary); None for a task model (classifier)."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def output_layer_is_tied(model: nn.Module) -> bool:
    """Whether a language model's output layer shares its weight with the input embeddings (GPT-2)."""
    out, embeddings = output_layer(model), getattr(model, "get_input_embeddings", lambda: None)()
    return out is not None and embeddings is not None and out.weight is embeddings.weight


def is_causal_lm(model: nn.Module) -> bool:
    can_generate = getattr(model, "can_generate", None)
    return output_layer(model) is not None and callable(can_generate) and bool(can_generate())


def head_parameter_names(model: nn.Module) -> set[str]:
    """The task head: everything outside the pretrained backbone, plus a pooler if the backbone has one.

    A language model (``*ForCausalLM``, GPT-2's LMHeadModel, a masked LM) has no task head: its output
    layer is pre-trained (and often tied to the input embeddings), so this is empty and
    ``train_head=true`` trains nothing more. ``method=head`` trains the output layer of such a model
    itself when it is not tied (see ``lora_lab.methods.head``). The classifier of a decoder's
    ``*ForSequenceClassification`` is ``score``, outside the backbone: a head like any other.
    """
    if output_layer(model) is not None:
        return set()
    prefix = getattr(model, "base_model_prefix", "")
    names = set()
    for name, _ in model.named_parameters():
        outside_backbone = not name.startswith(prefix + ".") if prefix else False
        if outside_backbone or ".pooler." in name:
            names.add(name)
    return names


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model``: CAUSAL_LM for a causal LM, SEQ_CLS / TOKEN_CLS for Hugging
    Face's sequence / token classifiers, None otherwise (a masked LM, or lora_lab's own pooled
    classifier, whose forward PEFT's task wrappers would call with arguments it does not take)."""
    if is_causal_lm(model):
        return "CAUSAL_LM"
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def _is_norm(module: nn.Module) -> bool:
    # nn.LayerNorm, and the RMSNorm / LayerNorm classes decoders define for themselves (LlamaRMSNorm)
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def layer_norm_parameter_names(model: nn.Module) -> set[str]:
    """The parameters of every normalisation layer (LayerNorm, RMSNorm)."""
    names = set()
    for mod_name, module in model.named_modules():
        if _is_norm(module):
            names.update(f"{mod_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return names


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
