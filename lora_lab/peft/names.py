"""PEFT's tensor names mapped onto the analysis's module names, and module names matched across checkpoints.

A PEFT LoRA adapter names each tensor ``base_model.model.<module>.<part>[.<adapter>][.weight|.bias]``:

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight        (Llama)
    base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight   (BERT)
    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight            (GPT-2, Conv1D)
    base_model.model.model.layers.3.self_attn.q_proj.lora_magnitude_vector     (DoRA)

``<module>`` is the adapted module's name in the model PEFT wrapped, the same name a lora_lab run uses
for it (``bert.encoder.layer.0.attention.self.query``), so the analysis's layer index and matrix type
(``split_module_name``) and per-type sections apply unchanged.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"  # a pickle: never loaded
PEFT_PREFIX = "base_model.model."  # where peft.get_peft_model puts the wrapped model (and its saved keys start)
# init_lora_weights values that subtract the adapter's start from the base weights (PiSSA, OLoRA, CorDA,
# LoRA-GA, LoftQ): the saved factors then update a residual base PEFT saved with the adapter, and only
# reproduce the model on that changed base (PEFT converts them to a plain LoRA when asked to)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def base_changing_init(init) -> str | None:
    """The base-changing initialisation an ``init_lora_weights`` value names ("pissa_niter_4" -> "pissa")."""
    value = str(init).lower() if isinstance(init, str) else ""
    return next((name for name in BASE_CHANGING_INITS if value.startswith(name)), None)
FACTORS = {"lora_A": "A", "lora_B": "B"}
MAGNITUDE = "lora_magnitude_vector"  # DoRA
EMBEDDING_FACTORS = ("lora_embedding_A", "lora_embedding_B")
LORA_PARTS = (*FACTORS, MAGNITUDE, *EMBEDDING_FACTORS)
_PARAMS = ("weight", "bias")


@dataclass(frozen=True)
class PeftKey:
    """One LoRA tensor of a PEFT adapter: the module it adapts and which of its tensors it is."""

    module: str
    part: str  # one of LORA_PARTS
    param: str | None  # "weight", "bias", or None (e.g. lora_magnitude_vector, lora_embedding_A)
    adapter: str | None  # an adapter name left in the key ("default"), None when PEFT removed it


def parse_peft_key(key: str) -> PeftKey | None:
    """The LoRA tensor a PEFT key names, or None for any other tensor (modules_to_save, base_layer, ...)."""
    parts = key.split(".")
    at = max((i for i, p in enumerate(parts) if p in LORA_PARTS), default=None)
    if not at:  # None, or a key that starts with the part: no module name
        return None
    tail = parts[at + 1:]
    param = tail.pop() if tail and tail[-1] in _PARAMS else None
    if len(tail) > 1:
        return None
    module = ".".join(parts[:at])
    if module.startswith(PEFT_PREFIX):
        module = module[len(PEFT_PREFIX):]
    return PeftKey(module, parts[at], param, tail[0] if tail else None)


def _related(a: str, b: str) -> bool:
    """The same module seen from two models: equal names, or one is a dotted suffix of the other
    (``encoder.layer.0.attention.self.query`` inside ``bert.encoder.layer.0.attention.self.query``)."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def suffix_matches(name: str, candidates: Iterable[str]) -> list[str]:
    """The candidates that name the same module as ``name``; an exact match wins over suffix matches."""
    candidates = list(candidates)
    if name in candidates:
        return [name]
    return [c for c in candidates if _related(name, c)]


def align_names(reference: Iterable[str], names: Iterable[str]) -> dict[str, str]:
    """``name -> reference name`` for each name absent from ``reference`` that matches exactly one
    reference name by dotted suffix, that reference name being claimed by no other name. Used when two
    checkpoints wrap the same model differently (a task model's ``bert.`` prefix, a bare ``BertModel``)."""
    reference = set(reference)
    names = list(names)
    taken = reference & set(names)
    proposals: dict[str, str] = {}
    for name in names:
        if name in reference:
            continue
        found = [r for r in suffix_matches(name, reference) if r not in taken]
        if len(found) == 1:
            proposals[name] = found[0]
    targets = list(proposals.values())
    return {n: r for n, r in proposals.items() if targets.count(r) == 1}
