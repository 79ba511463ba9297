"""Bad input caught before anything is loaded or trained: one line naming the key and the problem.

``check_config`` runs first in every job (also ``dry_run=true``): the types and ranges of the keys a
run reads, local files that must exist (data files, a local model folder and its weights, the
``method.init_from`` state), and the method's own settings. It reads no data and loads no model.
``check_data`` runs once the data is loaded: what only the data can tell (split sizes, classes,
token ids the model knows). Both raise ``ConfigError``; the command prints it as
``lora-lab: error: <key>=<value>: <problem>`` and exits with status 2.

A check only runs for a key the config has, so configs of older versions still validate.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from lora_lab.config.launch import launched_world_size
from lora_lab.data.columns import column_values, source_key
from lora_lab.data.embedded import EMBEDDED_DATASETS
from lora_lab.data.lm_data import check_template, predicted_tokens
from lora_lab.data.loading import check_files
from lora_lab.errors import ConfigError, first_line
from lora_lab.methods import build_method, describe_method, method_class
from lora_lab.models import quantization
from lora_lab.models.files import EMBEDDED_PACKAGES, check_model_files, embedded_model_path, max_positions
from lora_lab.models.loading import pooling_of
from lora_lab.models.precision import check_precision
from lora_lab.models.random_models import check_sizes
from lora_lab.rules import Rule, boolean, choice, integer, is_integer, names, number, text
from lora_lab.tasks.generation_eval import require_libraries
from lora_lab.tasks.task_types import main_metric, task_type

_ABSENT = object()


# key -> rule; the method's own keys are its class's (``Method.config_rules``)
CONFIG_RULES: dict[str, Rule] = {
    "seed": integer(0, 2**32 - 1),
    "dry_run": boolean(),
    "record.save_delta_w": boolean(),
    # the trainer
    "trainer.epochs": integer(1),
    "trainer.max_steps": integer(1, null=True),
    "trainer.batch_size": integer(1),
    "trainer.grad_accum": integer(1),
    "trainer.gradient_checkpointing": boolean(),
    "trainer.eval_batch_size": integer(1),
    "trainer.lr": number(0, 1, low_open=True),
    "trainer.weight_decay": number(0, 1),
    "trainer.warmup_ratio": number(0, 1),
    "trainer.warmup_steps": integer(0, null=True),
    "trainer.label_smoothing": number(0, 1, high_open=True),
    "trainer.max_grad_norm": number(0, null=True),
    "trainer.schedule": choice("linear", "cosine", "constant"),
    "trainer.device": text(),
    "trainer.precision": text(),
    "trainer.threads": integer(1, null=True),
    "trainer.throughput_warmup_steps": integer(0),
    "trainer.latency_repeats": integer(1),
    "trainer.log_every": integer(1),
    "trainer.progress_bar": choice("auto", True, False),
    "trainer.patience": integer(1, null=True),
    "trainer.eval_every": integer(1, null=True),
    "trainer.checkpoint_every": integer(0),
    "trainer.resume": boolean(),
    "trainer.keep_checkpoint": boolean(),
    "trainer.keep_last": boolean(),
    "trainer.skip_done": boolean(),
    "trainer.lock_stale_after": number(0, low_open=True),
    "trainer.world_size": integer(1),
    "trainer.strategy": choice("ddp", "fsdp"),
    "trainer.generation.enabled": boolean(),
    "trainer.generation.max_new_tokens": integer(1),
    "trainer.generation.max_examples": integer(1, null=True),
    "trainer.generation.splits": names(),
    "trainer.generation.batch_size": integer(1, null=True),
    "trainer.generation.keep_examples": integer(0),
    "trainer.generation.num_beams": integer(1),
    "trainer.generation.length_penalty": number(-10, 10),
    "trainer.generation.no_repeat_ngram_size": integer(0),
    # the data
    "data.source": choice("embedded", "hub", "files"),
    "data.name": text(),
    "data.path": text(null=True),
    "data.subset": text(null=True),
    "data.revision": text(null=True),
    "data.text_column": text(),
    "data.text_pair_column": text(null=True),
    "data.label_column": text(),
    "data.prompt_column": text(null=True),
    "data.response_column": text(null=True),
    "data.prompt_template": text(),
    "data.packing": boolean(),
    "data.task_type": choice("classification", "regression", "token_classification", "causal_lm", null=True),
    "data.main_metric": text(null=True),
    "data.label_names": names(null=True),
    "data.splits.train": text(),
    "data.splits.validation": text(null=True),
    "data.splits.test": text(null=True),
    "data.val_fraction": number(0, 1, low_open=True, high_open=True),
    "data.test_fraction": number(0, 1, low_open=True, high_open=True),
    "data.split_seed": integer(0, 2**32 - 1),
    "data.dedupe": boolean(),
    "data.max_train": integer(1, null=True),
    "data.max_eval": integer(1, null=True),
    "data.max_length": integer(1),
    "data.padding": choice("batch", "max_length"),
    "data.cache_dir": text(null=True),
    # the model
    "model.source": choice("embedded", "hub", "random"),
    "model.arch": choice("bert", "gpt2", "llama", "qwen2", "mistral", "opt", "gemma"),
    "model.name": text(),
    "model.trust_remote_code": boolean(),
    "model.use_safetensors": boolean(),
    "model.pooling": choice("auto", "cls", "mean", "pooler"),
    "model.tokenizer": text(),
    "model.vocab_size": integer(1),
    "model.hidden_size": integer(1),
    "model.num_layers": integer(1),
    "model.num_heads": integer(1),
    "model.num_kv_heads": integer(1, null=True),
    "model.intermediate_size": integer(1),
    "model.max_positions": integer(1),
    "model.dropout": number(0, 1),
    "model.dtype": choice("fp32", "bf16"),
    "model.load_in_4bit": boolean(),
    # the logger
    "logger.backend": choice("wandb", "csv", "tensorboard"),
    "logger.mode": choice("auto", "online", "offline", "disabled"),
    "logger.project": text(),
    "logger.entity": text(null=True),
    "logger.group": text(null=True),
    "logger.tags": names(empty=True),
    "logger.log_model": boolean(),
}

DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _value(cfg, key: str):
    """The (resolved) value of a dotted key, or _ABSENT when the config has no such key."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _apply_rules(cfg, rules: dict[str, Rule], prefix: str = "") -> None:
    for name, rule in rules.items():
        key = prefix + name
        value = _value(cfg, key)
        if value is _ABSENT:
            continue
        problem = rule(value)
        if problem:
            raise ConfigError(key, _plain(value), problem)


def check_config(cfg) -> None:
    """Types and ranges of the keys a run reads, and the local files it needs; raises ConfigError."""
    if "method" in cfg:  # first: trainer.lr defaults to ${method.lr}
        _check_method(cfg)
    _apply_rules(cfg, CONFIG_RULES)
    if "trainer" in cfg:
        _check_trainer(cfg)
    if "data" in cfg:
        _check_data_config(cfg.data)
    if "data" in cfg and "trainer" in cfg:
        _check_generation(cfg)
    if "model" in cfg:
        _check_model(cfg)
    if "logger" in cfg and cfg.logger.get("backend") == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logger", "tensorboard", "needs the tensorboard package: pip install tensorboard "
                          "(or lora_lab[tensorboard])")


def _check_trainer(cfg) -> None:
    t = cfg.trainer
    if "device" in t and not DEVICE.match(t.device):
        raise ConfigError("trainer.device", t.device, "must be auto, cpu, mps, cuda or cuda:<index>")
    if "precision" in t:
        check_precision(t.precision)
        if t.precision == "fp16" and "model" in cfg and cfg.model.get("dtype") == "bf16":
            raise ConfigError("trainer.precision", "fp16", "cannot autocast a bf16 base (model.dtype=bf16) to fp16; "
                              "use trainer.precision=bf16")
    if "world_size" in t:
        if t.world_size != launched_world_size():
            raise ConfigError("trainer.world_size", t.world_size, f"is the number of processes torchrun started "
                              f"({launched_world_size()} here), read from WORLD_SIZE; do not set it")
    if t.get("strategy") == "fsdp":
        _check_fsdp(cfg)
    if t.get("label_smoothing") and "data" in cfg and (cfg.data.get("task_type") or "") == "regression":
        raise ConfigError("trainer.label_smoothing", t.label_smoothing, "applies to cross-entropy losses; "
                          "data.task_type=regression has none (set it to 0)")


def _check_fsdp(cfg) -> None:
    """``trainer.strategy=fsdp`` shards the model over the processes of a torchrun launch."""
    if launched_world_size() <= 1:
        raise ConfigError("trainer.strategy", "fsdp", "needs several processes: start it with "
                          "torchrun --nproc_per_node=N")
    if "model" in cfg and cfg.model.get("load_in_4bit"):
        raise ConfigError("trainer.strategy", "fsdp", "cannot shard a 4-bit base (model.load_in_4bit=true); "
                          "use trainer.strategy=ddp")
    if (cfg.trainer.get("generation") or {}).get("enabled"):
        raise ConfigError("trainer.strategy", "fsdp", "does not generate yet (trainer.generation.enabled=true); "
                          "use trainer.strategy=ddp")


def _check_data_config(data) -> None:
    main_metric(data)  # the task type is known and the main metric is one of its metrics
    _check_causal_lm(data)

    if data.get("source") == "embedded" and data.get("name") not in EMBEDDED_DATASETS:
        raise ConfigError("data.name", data.get("name"), f"is not embedded; embedded: {sorted(EMBEDDED_DATASETS)}")
    if data.get("source") == "hub" and not data.get("path"):
        raise ConfigError("data.path", data.get("path"), "is required for data.source=hub")
    if data.get("source") == "files":
        check_files(data)
    columns = [("data.text_column", data.get("text_column")), ("data.text_pair_column", data.get("text_pair_column")),
               ("data.label_column", data.get("label_column"))]
    if task_type(data).head == "lm":  # reads no label; prompt and response were compared above
        columns = []
    seen = {}
    for key, column in columns:
        if column is not None and column in seen:
            raise ConfigError(key, column, f"is also {seen[column]}")
        seen[column] = key
    fractions = [data.get("val_fraction"), data.get("test_fraction")]
    if all(f is not None for f in fractions) and sum(fractions) >= 1:
        raise ConfigError("data.test_fraction", data.test_fraction, f"plus data.val_fraction={data.val_fraction} "
                          "must be < 1 (the rest is the training split)")
    label_names = data.get("label_names")
    if label_names is not None:
        if len(label_names) < 2:
            raise ConfigError("data.label_names", _plain(label_names), "must name at least two classes")
        if len(set(label_names)) != len(label_names):
            raise ConfigError("data.label_names", _plain(label_names), "has a name twice")
    cache_dir = data.get("cache_dir")
    if cache_dir and Path(cache_dir).expanduser().exists() and not Path(cache_dir).expanduser().is_dir():
        raise ConfigError("data.cache_dir", cache_dir, "exists and is not a directory")


def _check_causal_lm(data) -> None:
    """The causal-LM keys: a prompt column comes with a response column, the template holds {prompt};
    they and packing apply to data.task_type=causal_lm only."""
    kind = task_type(data)
    prompt, response = data.get("prompt_column"), data.get("response_column")
    if kind.head != "lm":
        for key, value in (("data.prompt_column", prompt), ("data.response_column", response),
                           ("data.packing", data.get("packing") or None)):
            if value is not None:
                raise ConfigError(key, _plain(value), f"applies to data.task_type=causal_lm only (it is {kind.name})")
        return
    if prompt and not response:
        raise ConfigError("data.prompt_column", prompt, "needs data.response_column, the text the loss covers after "
                          "the prompt (for plain text set neither: data.text_column is read)")
    if response and not prompt:
        raise ConfigError("data.response_column", response, "needs data.prompt_column, the text the response follows "
                          "(for plain text set neither: data.text_column is read)")
    if prompt and prompt == response:
        raise ConfigError("data.response_column", response, "is also data.prompt_column")
    if "prompt_template" in data:
        check_template(data.prompt_template)


def _check_generation(cfg) -> None:
    """``trainer.generation`` needs prompt/response causal-LM data and its libraries; the generation
    metrics can be the main metric only when it is on."""
    generation = cfg.trainer.get("generation") or {}
    enabled = bool(generation.get("enabled"))
    kind, metric = task_type(cfg.data), main_metric(cfg.data)
    if metric in kind.optional_metrics and not enabled:
        raise ConfigError("data.main_metric", metric, "is scored on generated text: it needs "
                          "trainer.generation.enabled=true")
    if not enabled:
        return
    if kind.head != "lm" or not cfg.data.get("prompt_column"):
        raise ConfigError("trainer.generation.enabled", True, "applies to data.task_type=causal_lm with "
                          "data.prompt_column and data.response_column (prompts to generate from, references to "
                          f"score against); this run has data.task_type={kind.name}"
                          + ("" if kind.head != "lm" else " on plain text"))
    for split in generation.get("splits") or []:
        if split not in ("validation", "test"):
            raise ConfigError("trainer.generation.splits", _plain(generation.splits), f"names {split!r}: "
                              "generation runs on validation and test")
    require_libraries()


def _check_model(cfg) -> None:
    model = cfg.model
    if model.get("source") == "random":
        check_sizes(model)  # heads divide the hidden size, key/value heads the heads
        if model.tokenizer in EMBEDDED_PACKAGES:
            embedded_model_path(model.tokenizer)
    check_model_files(model)
    if "method" in cfg:
        describe_method(cfg.method).check_model(model)  # e.g. full fine-tuning on a bf16 or 4-bit base
    quantization.check_4bit_settings(cfg)
    if quantization.wants_4bit(model) and not cfg.get("dry_run"):  # a dry run plans a GPU run on any machine
        quantization.check_4bit_environment()
    if "data" in cfg:
        pooling_of(model, task_type(cfg.data).head)  # a token task with model.pooling set, an encoder's causal LM
    limit = max_positions(model)
    length = cfg.data.get("max_length") if "data" in cfg else None
    if limit is not None and is_integer(length) and length > limit:
        raise ConfigError("data.max_length", length, f"exceeds the {limit} positions of the model {model.name}")


def _check_method(cfg) -> None:
    """The method's own rules speak first (their messages name what the method needs); the generic
    rules name the key when a value is not even of the right type, and cover what a method leaves
    unchecked; then the local files the settings name."""
    rules = method_class(cfg.method).config_rules  # an unknown method.name is refused here
    try:
        method = build_method(cfg.method)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:  # e.g. float("abc") inside a method's check
        _apply_rules(cfg, rules, "method.")
        raise ConfigError("method", cfg.method.get("name"), f"has a setting of the wrong type: "
                          f"{first_line(error)}") from None
    _apply_rules(cfg, rules, "method.")
    method.check_files()


def check_data(cfg, data) -> None:
    """What can only be checked once the data is loaded (sizes, classes); raises ConfigError."""
    trainer = cfg.get("trainer") or {}
    if data.task.head == "lm":
        for split, ds in data.splits.items():
            if not any(predicted_tokens(labels) for labels in column_values(ds, "labels")):
                raise ConfigError("data.max_length", cfg.data.get("max_length"), f"leaves the {split} split no token "
                                  f"to predict ({len(ds)} rows): every response is cut off or empty")
    train_rows = len(data.splits["train"])
    batch_size = trainer.get("batch_size")
    if is_integer(batch_size) and batch_size > train_rows:
        raise ConfigError("trainer.batch_size", batch_size, f"is larger than the training split ({train_rows} rows)")
    if data.task.head == "token":
        tags = {t for sentence in column_values(data.splits["train"], "word_labels") for t in sentence}
        if all(data.label_names[t] == "O" for t in tags):
            raise ConfigError(*source_key(cfg.data, "train"), "the train split has no entity: every tag is O")
    elif not data.regression and data.task.head != "lm":
        for split, ds in data.splits.items():
            classes = sorted(set(column_values(ds, "labels")))
            if len(classes) < 2:
                only = data.label_names[classes[0]] if classes and classes[0] < len(data.label_names) else classes
                raise ConfigError(*source_key(cfg.data, split), f"the {split} split has a single class ({only!r}, "
                                  f"{len(ds)} rows); classification needs at least two")
    model = cfg.get("model") or {}
    if model.get("source") == "random" and is_integer(model.get("vocab_size")):
        for split, ds in data.splits.items():
            top = max((max(ids) for ids in column_values(ds, "input_ids") if ids), default=-1)
            if top >= model.vocab_size:
                raise ConfigError("model.vocab_size", model.vocab_size, f"is too small for the tokenizer "
                                  f"{model.get('tokenizer')}: the {split} split has token id {top}")
