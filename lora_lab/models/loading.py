"""Load a sequence or token classifier, or a causal language model, and its tokenizer: the embedded
MiniLM, any Hub model (encoders and decoders), or a tiny random BERT or decoder built from a config
(lora_lab.models.random_models; for tests and smoke runs, no download). ``model.load_in_4bit`` loads the
frozen base in 4-bit NF4 (lora_lab.models.quantization)."""
from __future__ import annotations

import tempfile

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)
from transformers.utils import logging as hf_logging

from lora_lab.errors import ConfigError, first_line
from lora_lab.models import quantization
from lora_lab.models.files import embedded_model_path, local_config, tokenizer_source
from lora_lab.models.pooling import POOLINGS, PooledClassifier, resolve_pooling
from lora_lab.models.random_models import (
    DECODERS,
    arch_of,
    build_random_model,
    head_class_name,
)


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
    return getattr(torch, WEIGHT_DTYPES[cfg.get("dtype") or "fp32"])


def cast_trainable_to_fp32(model) -> None:
    """After a method is applied to a bf16 base: the trainable parameters (method, head) in fp32, so
    that updates and AdamW state keep full precision while the frozen weights stay bf16. Normalisation
    layers stay fp32 whole, as in the usual mixed precision: they are small, and one with a trainable
    bias and a frozen weight (BitFit) would otherwise mix dtypes, which CPU layer norms refuse."""
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
    """The model's tokenizer, with a pad token: one without (GPT-2, Llama) pads with its eos token, the
    usual convention for decoders (padding is masked out, and a decoder classifier reads the last
    token that is not padding)."""
    source = tokenizer_source(cfg)
    key = "model.tokenizer" if cfg.source == "random" else "model.name"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=bool(cfg.trust_remote_code))
    except (OSError, ValueError) as error:  # not found locally, on the Hub, no network, unusable files
        raise ConfigError(key, source, f"tokenizer could not be loaded: {first_line(error)}") from None
    if len(tokenizer) <= len(tokenizer.all_special_tokens):  # built without a vocabulary file
        raise ConfigError(key, source, f"the tokenizer has no vocabulary ({len(tokenizer)} tokens, all special)")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(key, source, "the tokenizer has no pad token and no eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TASKS = ("sequence", "token", "lm")


def is_causal_decoder(model_type: str, encoder_decoder: bool = False) -> bool:
    """Whether a transformers ``model_type`` is a decoder-only language model (GPT-2, Llama, ...): it has
    a causal LM and no masked LM (BERT-like encoders have both)."""
    return (not encoder_decoder and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def is_decoder(cfg) -> bool | None:
    """Whether ``cfg`` is a decoder-only model: known for a random model and for a config on this machine
    (a local folder, a Hub model in the cache); None when only loading it can tell."""
    if cfg.source == "random":
        return arch_of(cfg) in DECODERS
    config = local_config(cfg, cached=True)
    if config is None:
        return None
    return is_causal_decoder(str(config.get("model_type") or ""), bool(config.get("is_encoder_decoder")))


def pooling_of(cfg, task: str = "sequence", decoder: bool | None = None) -> str | None:
    """The pooling a sequence classifier built from ``cfg`` uses ("cls", "mean", "pooler" or, for a
    decoder's own head, "last"); None for token classification and causal LMs, which predict at every
    token. Also refuses a task the model cannot take (a causal LM of an encoder). ``decoder``: whether
    the model is a decoder, when the caller knows (else found from ``cfg`` where it can be)."""
    if task not in TASKS:
        raise ConfigError("task", task, f"must be one of {list(TASKS)}")
    if decoder is None:
        decoder = is_decoder(cfg)
    if task == "sequence":
        return resolve_pooling(cfg, decoder)
    value = cfg.get("pooling", "auto")
    if value not in POOLINGS:
        raise ConfigError("model.pooling", value, f"must be one of {list(POOLINGS)}")
    if value != "auto":
        what = "token classification labels every token" if task == "token" else "a causal LM predicts every token"
        raise ConfigError("model.pooling", value, f"applies to sequence classification only; {what}")
    if cfg.source == "random":
        head_class_name(arch_of(cfg), task)  # e.g. OPT has no token classifier
    if task == "lm" and decoder is False:
        key, value = ("model.arch", "bert") if cfg.source == "random" else ("model.name", str(cfg.name))
        raise ConfigError(key, value, "is an encoder; a causal LM needs a decoder-only model (GPT-2, Llama, ...: "
                          "e.g. model=gpt2, or model=tiny_gpt2 for a smoke run)")
    return None


def load_model(cfg, num_labels: int, label_names: list[str] | None = None, task: str = "sequence",
               pad_token_id: int | None = None):
    """A classifier with ``num_labels`` outputs: one per sequence (``task="sequence"``, pooled as
    ``model.pooling`` says) or one per token (``task="token"``); or a causal language model
    (``task="lm"``, a decoder; no labels).

    A decoder's config gets the tokenizer's ``pad_token_id`` (given, or read from the tokenizer), since
    its classifier reads the last token that is not padding. With ``model.load_in_4bit`` the base is
    loaded in 4-bit NF4 onto the current CUDA device (a random model is built, saved to a temporary
    folder and loaded back quantised)."""
    if task not in TASKS:
        raise ConfigError("task", task, f"must be one of {list(TASKS)}")
    quantized = quantization.wants_4bit(cfg)
    if quantized:
        quantization.check_4bit_environment()  # before anything is loaded
    if cfg.source == "random":
        decoder = arch_of(cfg) in DECODERS
    else:
        config = _pretrained_config(cfg)
        decoder = is_causal_decoder(config.model_type, bool(getattr(config, "is_encoder_decoder", False)))
    pooling = pooling_of(cfg, task, decoder)
    pooled = pooling in ("cls", "mean")  # our head on the bare backbone, not the model's own
    head = "pooled" if pooled else task
    kwargs = {}
    if task != "lm":
        kwargs["num_labels"] = num_labels
        if label_names:
            labels = dict(enumerate(label_names))
            kwargs.update(id2label=labels, label2id={v: k for k, v in labels.items()})
    if decoder:
        kwargs["pad_token_id"] = pad_token_id if pad_token_id is not None else load_tokenizer(cfg).pad_token_id
    if cfg.source == "random":
        model = _random_model(cfg, head, kwargs)
        if quantized:
            model = _reloaded_4bit(model, _AUTO_CLASSES[head], cfg)
    else:
        model = _from_pretrained(_AUTO_CLASSES[head], cfg, kwargs, quantized)
    if not pooled:
        return model
    wrapped = PooledClassifier(model, pooling)
    if not quantized:
        return wrapped.to(weights_dtype(cfg))
    wrapped.classifier.to(device=model.device, dtype=weights_dtype(cfg))  # the backbone is in place already
    wrapped.is_loaded_in_4bit = True
    return wrapped


# the transformers auto class that loads each head of a pre-trained model
_AUTO_CLASSES = {"sequence": "AutoModelForSequenceClassification", "token": "AutoModelForTokenClassification",
                 "lm": "AutoModelForCausalLM", "pooled": "AutoModel"}


def _random_model(cfg, head: str, kwargs: dict):
    return build_random_model(cfg, head, **kwargs).to(weights_dtype(cfg))


def _reloaded_4bit(model, auto_class: str, cfg):
    """A random model quantised as a pre-trained one is: saved, then loaded back in 4 bits."""
    with tempfile.TemporaryDirectory(prefix="lora_lab_4bit_") as folder:
        hf_logging.disable_progress_bar()  # "writing model shards" of a temporary copy
        try:
            model.save_pretrained(folder)
        finally:
            hf_logging.enable_progress_bar()
        return _load_pretrained(auto_class, folder, cfg, {}, True, key="model.load_in_4bit", shown=True)


def _dtype_kwargs(cfg) -> dict:
    """Loaded straight into bf16 (no fp32 copy first) when ``model.dtype=bf16``."""
    return {"dtype": weights_dtype(cfg)} if (cfg.get("dtype") or "fp32") != "fp32" else {}


def _model_path(cfg) -> str:
    return embedded_model_path(cfg.name) if cfg.source == "embedded" else tokenizer_source(cfg)


def _pretrained_config(cfg):
    """The transformers config of a pre-trained model (config.json only: it tells an encoder from a decoder)."""
    path = _model_path(cfg)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=bool(cfg.trust_remote_code))
    except (OSError, ValueError) as error:  # missing, corrupt or unusable files, no network
        raise ConfigError("model.name", path, f"could not be loaded: {first_line(error)}") from None


def _from_pretrained(auto_class: str, cfg, kwargs: dict, quantized: bool = False):
    return _load_pretrained(auto_class, _model_path(cfg), cfg, kwargs, quantized)


def _load_pretrained(auto_class: str, path: str, cfg, kwargs: dict, quantized: bool, key: str = "model.name",
                     shown=None):
    load = dict(_dtype_kwargs(cfg))
    if quantized:  # the unquantised modules (embeddings, norms, head) in model.dtype, fp32 unless bf16
        load.update(dtype=weights_dtype(cfg), **quantization.load_kwargs())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised: classifier.*" report is expected
    hf_logging.disable_progress_bar()  # a bar for loading 100 tensors is noise in every run's log
    try:
        return getattr(transformers, auto_class).from_pretrained(
            path, trust_remote_code=bool(cfg.trust_remote_code), use_safetensors=cfg.use_safetensors,
            **load, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:  # missing, corrupt or unusable files, no such head
        shown = path if shown is None else shown
        raise ConfigError(key, shown, f"could not be loaded: {first_line(error)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
