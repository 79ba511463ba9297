"""A portable adapter (``lora-lab-export --portable``): one that plain PEFT + transformers load, without lora_lab.

``adapter_config.json`` names a base a user can load (a Hub id; the embedded model's Hub original), and
a ``README.md`` beside the adapter says which transformers class to load the base with and, where
lora_lab's head pools differently from that class (``model.pooling=mean|cls``), the lines that
rebuild the head from the class's own modules: the adapter keeps the head under ``modules_to_save``
with the parameter names that class uses, so only the pooling is left to write out.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from lora_lab.errors import ConfigError
from lora_lab.models.files import EMBEDDED_HUB_IDS
from lora_lab.models.loading import is_causal_decoder
from lora_lab.models.pooling import PooledClassifier

CARD_FILE = "README.md"
BASE_PLACEHOLDER = "<base model folder>"  # in the card where no name loads the base (a random model)


@dataclass
class PortableBase:
    name: str | None  # adapter_config.json's base_model_name_or_path
    note: str  # where that name comes from, for the card
    model_class: str  # the transformers class whose parameter names the adapter and head use
    load_kwargs: dict  # what that class's from_pretrained needs besides the name (num_labels, pad_token_id)
    pooling: str | None  # "mean" or "cls": the head is rebuilt as the card says; None: the class's own forward
    prefix: str  # the backbone's attribute in that class ("bert", "distilbert", ...)
    tokenizer: str | None  # where the run's tokenizer loads from
    on_hub: bool  # whether ``name`` is a Hub id (the card's metadata names it as the base then)


def is_local_folder(model_cfg) -> bool:
    """Whether a hub-source ``model.name`` is a folder on this machine rather than a Hub id."""
    name = str(model_cfg.name)
    return name.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(name))


def base_name(model_cfg) -> tuple[str | None, str]:
    """The base a user loads, and a sentence on where the name comes from."""
    if model_cfg.source == "embedded":
        hub_id = EMBEDDED_HUB_IDS.get(str(model_cfg.name))
        if hub_id is None:
            return None, f"the embedded model {model_cfg.name} has no known Hub original; load its files yourself"
        return hub_id, f"the Hub model lora_lab ships as its embedded {model_cfg.name}"
    if model_cfg.source == "hub":
        name = str(model_cfg.name)
        if is_local_folder(model_cfg):
            return name, "a local folder on the machine that trained the run: point this at your copy of it"
        return name, "the Hub model the run was trained on"
    return None, (f"a random {model_cfg.get('arch', 'bert')} built by lora_lab from a config (a test model): "
                  "no name loads it; save that base with save_pretrained and use its folder")


def tokenizer_name(model_cfg) -> str | None:
    if model_cfg.source == "random":
        return EMBEDDED_HUB_IDS.get(str(model_cfg.get("tokenizer")), model_cfg.get("tokenizer"))
    name, _ = base_name(model_cfg)
    return name


def transformers_class(base: nn.Module) -> tuple[str, str | None]:
    """The transformers class the adapter loads into, and lora_lab's pooling where it differs from it."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if isinstance(base, PooledClassifier):
        name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(base.config.model_type)
        if name is None:
            raise ConfigError("--portable", True, f"transformers has no sequence classifier for "
                              f"{base.config.model_type} models")
        return name, base.pooling
    name = type(base).__name__
    if not isinstance(base, transformers.PreTrainedModel) or getattr(transformers, name, None) is not type(base):
        raise ConfigError("--portable", True, f"the run's model is a {name}, not a transformers class")
    return name, None


def describe(run, model_cfg) -> PortableBase:
    """What a portable export of ``run`` (a RebuiltRun) writes, checked: every parameter of lora_lab's
    base has a parameter of the same name and shape in the transformers class (built on the meta device,
    so no memory is spent), else the adapter would not load there and this is a one-line ConfigError."""
    import transformers

    class_name, pooling = transformers_class(run.base)
    config = copy.deepcopy(run.base.config)
    with torch.device("meta"):
        theirs = getattr(transformers, class_name)(config)
    shapes = {n: tuple(p.shape) for n, p in theirs.named_parameters()}
    for name, p in run.base.named_parameters():
        if shapes.get(name) != tuple(p.shape):
            found = "has none" if name not in shapes else f"has shape {shapes[name]}"
            key, value = ("model.pooling", pooling) if pooling else ("--portable", True)
            raise ConfigError(key, value, f"--portable needs the run's parameters in {class_name}: lora_lab's "
                              f"{name} {tuple(p.shape)}, {class_name} {found}")
    kwargs = {}
    if "ForCausalLM" not in class_name:
        kwargs["num_labels"] = int(config.num_labels)
        if is_causal_decoder(config.model_type) and config.pad_token_id is not None:
            kwargs["pad_token_id"] = int(config.pad_token_id)  # a decoder's own head reads the last non-padding token
    name, note = base_name(model_cfg)
    on_hub = name is not None and not (model_cfg.source == "hub" and is_local_folder(model_cfg))
    return PortableBase(name, note, class_name, kwargs, pooling, run.base.base_model_prefix,
                        tokenizer_name(model_cfg), on_hub)


def load_lines(portable: PortableBase, adapter: str) -> list[str]:
    """The card's code that loads the base and the adapter into ``model``."""
    args = ", ".join([json.dumps(portable.name or BASE_PLACEHOLDER)]
                     + [f"{k}={v!r}" for k, v in portable.load_kwargs.items()])
    return ["import torch",
            "from peft import PeftModel",
            f"from transformers import {portable.model_class}",
            "",
            f"base = {portable.model_class}.from_pretrained({args})",
            f"model = PeftModel.from_pretrained(base, {json.dumps(adapter)}).eval()"]


def logits_lines(portable: PortableBase) -> list[str]:
    """The card's code that computes ``logits`` of ``model`` for a tokenized ``batch``."""
    if portable.pooling is None:
        return ["with torch.no_grad():", "    logits = model(**batch).logits"]
    pooled = ("hidden[:, 0]" if portable.pooling == "cls" else
              "(hidden * mask).sum(1) / mask.sum(1).clamp(min=1)")
    lines = ["with torch.no_grad():",
             f"    hidden = model.get_base_model().{portable.prefix}(**batch).last_hidden_state"]
    if portable.pooling == "mean":
        lines.append('    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)')
    return [*lines, f"    logits = model.get_base_model().classifier({pooled})"]


POOLING_WORDS = {
    None: "the class's own head: `model(**batch).logits`",
    "mean": "a linear classifier (`classifier`) on the mean of the last hidden states over the attention "
            "mask; the class's own pooler is not used",
    "cls": "a linear classifier (`classifier`) on the first token's last hidden state, without the "
           "class's pooler",
}


def model_card(portable: PortableBase, record: dict, adapter: str = "ADAPTER_FOLDER") -> str:
    """The README.md written beside a portable adapter."""
    method = record.get("method", "lora")
    labels = record.get("task", {}).get("label_names") or []
    base = f"`{portable.name}`" if portable.name else "none (`null`)"
    tokenizer = "" if not portable.tokenizer else (
        "The run's tokenizer makes a `batch`:\n\n```python\nfrom transformers import AutoTokenizer\n\n"
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(portable.tokenizer)})\n"
        'batch = tokenizer(["a fine film", "a dull one"], padding=True, return_tensors="pt")\n```\n\n')
    front = f"---\nlibrary_name: peft\nbase_model: {portable.name}\n---\n\n" if portable.on_hub else ""
    return (f"{front}# A {method} adapter exported by lora_lab\n\n"
            "It loads with PEFT and transformers alone (`pip install peft transformers`).\n\n"
            f"- Base model: {base}: {portable.note}.\n"
            f"- Load the base with `transformers.{portable.model_class}`"
            + (f" ({', '.join(f'{k}={v}' for k, v in portable.load_kwargs.items())})" if portable.load_kwargs else "")
            + ".\n"
            + (f"- Labels, by output index: {', '.join(f'{i} {n}' for i, n in enumerate(labels))}.\n" if labels else "")
            + f"- Head: {POOLING_WORDS[portable.pooling]}. Its weights are in the adapter (`modules_to_save`).\n\n"
            "```python\n" + "\n".join(load_lines(portable, adapter)) + "\n```\n\n" + tokenizer
            + "The logits for a tokenized `batch` (a dict of tensors with `input_ids` and `attention_mask`):\n\n"
            "```python\n" + "\n".join(logits_lines(portable)) + "\n```\n")


def card_logits(model, portable: PortableBase, batch: dict) -> torch.Tensor:
    """What the card's code computes, run here: the export checks the portable adapter with it."""
    scope = {"model": model, "batch": batch, "torch": torch}
    exec("\n".join(logits_lines(portable)), scope)  # noqa: S102 - our own generated lines
    return scope["logits"]


def load_portable(run, portable: PortableBase, adapter_dir):
    """The adapter loaded as the card says, onto the transformers class holding lora_lab's base weights
    (``from_pretrained`` on a saved copy of the base gives the same model)."""
    import peft
    import transformers
    from safetensors.torch import load_file

    theirs = getattr(transformers, portable.model_class)(copy.deepcopy(run.base.config))
    unexpected = theirs.load_state_dict(run.base.state_dict(), strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"{portable.model_class} has no {unexpected[0]}")
    config = peft.PeftConfig.from_pretrained(str(adapter_dir))
    theirs.name_or_path = config.base_model_name_or_path  # as from_pretrained(that name) sets it: PEFT warns otherwise
    loaded = peft.get_peft_model(theirs.eval(), config)
    peft.set_peft_model_state_dict(loaded, load_file(os.path.join(adapter_dir, "adapter_model.safetensors")))
    return loaded.eval()
