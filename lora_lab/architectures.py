"""Where things live inside an encoder: named target matrices, the layer stack and the task head.

Targets are given by short aliases (``q k v o ffn_in ffn_out``) that resolve per architecture to
regular expressions over module names, or by any regular expression / module-name suffix.
"""
from __future__ import annotations

import re

from torch import nn

from lora_lab.errors import ConfigError

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
TARGET_ALIASES: dict[str, dict[str, str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": _DISTILBERT,
}
# Long names people write for the same matrices.
_SYNONYMS = {
    "query": "q", "key": "k", "value": "v", "attn_out": "o", "attention_output": "o",
    "intermediate": "ffn_in", "ffn1": "ffn_in", "output": "ffn_out", "ffn2": "ffn_out",
}


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def canonical_alias(target: str) -> str:
    return _SYNONYMS.get(target, target)


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight; not supported yet.
    return isinstance(module, nn.Linear)


def linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if _is_linear(m)]


def resolve_targets(model: nn.Module, targets, key: str = "method.targets") -> dict[str, list[str]]:
    """Map each requested target to the names of the linear modules it matches.

    Raises a one-line ConfigError that lists the model's linear layers when a target matches none.
    """
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ConfigError(key, targets, "needs at least one target")
    aliases = TARGET_ALIASES.get(model_type(model), {})
    encoder_linears = [n for n in linear_layer_names(model) if n.split(".")[0] in _backbone_prefixes(model)]
    resolved: dict[str, list[str]] = {}
    for target in targets:
        alias = canonical_alias(str(target))
        pattern = aliases.get(alias)
        if pattern is not None:
            hits = [n for n in encoder_linears if re.search(pattern, n)]
        else:
            hits = [n for n in encoder_linears if n == target or n.endswith("." + target)]
            if not hits:
                try:
                    hits = [n for n in encoder_linears if re.search(str(target), n)]
                except re.error:
                    hits = []
        if not hits:
            shown = sorted({_generic(n) for n in encoder_linears})
            known = f" aliases for {model_type(model)}: {sorted(aliases)};" if aliases else ""
            raise ConfigError(key, str(target), f"matches no linear layer;{known} linear layers: {shown}")
        resolved[str(target)] = hits
    return resolved


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


def head_parameter_names(model: nn.Module) -> set[str]:
    """The task head: everything outside the pretrained backbone, plus a pooler if the backbone has one."""
    prefix = getattr(model, "base_model_prefix", "")
    names = set()
    for name, _ in model.named_parameters():
        outside_backbone = not name.startswith(prefix + ".") if prefix else False
        if outside_backbone or ".pooler." in name:
            names.add(name)
    return names


def layer_norm_parameter_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            names.update(f"{mod_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return names


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
