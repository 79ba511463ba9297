"""Tiny randomly initialised models built from a config's size keys (``model.source=random``), for
tests and smoke runs without a download: a BERT encoder (``model.arch=bert``, the default) or a
decoder language model (``gpt2``, ``llama``, ``qwen2``, ``mistral``, ``opt``, ``gemma``).

The size keys mean the same for every architecture: ``vocab_size``, ``hidden_size``, ``num_layers``,
``num_heads``, ``intermediate_size`` (the feed-forward width), ``max_positions``, ``dropout`` and
``num_kv_heads`` (key/value heads of grouped-query attention; the Llama family only, null: one per
query head). Llama, Qwen2, Mistral and Gemma have no hidden-state dropout: ``dropout`` is their
attention dropout.
"""
from __future__ import annotations

import transformers

from lora_lab.errors import ConfigError

# model.arch -> the prefix of its transformers classes (``{prefix}Config``, ``{prefix}Model``, ...)
ARCHS = {"bert": "Bert", "gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral",
         "opt": "OPT", "gemma": "Gemma"}
DECODERS = ("gpt2", "llama", "qwen2", "mistral", "opt", "gemma")
GQA_ARCHS = ("llama", "qwen2", "mistral", "gemma")  # attention with fewer key/value heads than queries
# the head each task puts on the backbone; "pooled" is the bare backbone under our own pooled head
HEAD_SUFFIXES = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification",
                 "lm": "ForCausalLM", "pooled": "Model"}
# what transformers lacks
MISSING_HEADS = {("bert", "lm"): "is an encoder; a causal LM needs a decoder (model.arch="
                                 f"{'|'.join(DECODERS)})",
                 ("opt", "token"): "has no token classification head in transformers"}
SPECIAL_CLASSES = {("gpt2", "lm"): "GPT2LMHeadModel"}  # named before the convention


def arch_of(cfg) -> str:
    """``model.arch``; a config written before the key existed builds a BERT."""
    arch = cfg.get("arch") or "bert"
    if arch not in ARCHS:
        raise ConfigError("model.arch", arch, f"must be one of {list(ARCHS)}")
    return arch


def kv_heads(cfg) -> int:
    """The key/value heads: ``model.num_kv_heads``, or one per query head when null."""
    arch, heads, kv = arch_of(cfg), int(cfg.num_heads), cfg.get("num_kv_heads")
    if kv is None or kv == heads:
        return heads
    if arch not in GQA_ARCHS:
        raise ConfigError("model.num_kv_heads", kv, f"grouped-query attention is built for model.arch="
                          f"{'|'.join(GQA_ARCHS)} only; {arch} has one key/value head per query head (null)")
    if not isinstance(kv, int) or kv < 1 or heads % kv:
        raise ConfigError("model.num_kv_heads", kv, f"must divide model.num_heads={heads}")
    return kv


def check_sizes(cfg) -> None:
    """The size keys fit together (heads divide the hidden size, key/value heads the heads)."""
    arch_of(cfg)
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError("model.num_heads", cfg.num_heads, f"must divide model.hidden_size={cfg.hidden_size}")
    kv_heads(cfg)


def head_class_name(arch: str, head: str) -> str:
    """The transformers class of ``arch`` with ``head`` (a task, or "pooled"); a ConfigError for a head
    the architecture does not have."""
    problem = MISSING_HEADS.get((arch, head))
    if problem:
        raise ConfigError("model.arch", arch, problem)
    return SPECIAL_CLASSES.get((arch, head), ARCHS[arch] + HEAD_SUFFIXES[head])


def random_config(cfg, pad_token_id: int | None = None, **label_kwargs):
    """The transformers config of ``cfg``'s architecture and sizes. A decoder gets the tokenizer's
    ``pad_token_id`` (its classifier reads the last token that is not padding); its bos/eos ids stay
    unset (a random model has learnt none; generation takes them from the tokenizer)."""
    arch = arch_of(cfg)
    dropout = float(cfg.get("dropout", 0.1))
    if arch == "bert":
        return transformers.BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_positions, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout, **label_kwargs)
    specials = {"pad_token_id": pad_token_id, "bos_token_id": None, "eos_token_id": None}
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
            n_inner=cfg.intermediate_size, n_positions=cfg.max_positions, resid_pdrop=dropout,
            embd_pdrop=dropout, attn_pdrop=dropout, **specials, **label_kwargs)
    if arch == "opt":
        return transformers.OPTConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, word_embed_proj_dim=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, ffn_dim=cfg.intermediate_size,
            max_position_embeddings=cfg.max_positions, dropout=dropout, attention_dropout=dropout,
            **specials, **label_kwargs)
    config_class = getattr(transformers, f"{ARCHS[arch]}Config")
    sizes = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                 num_attention_heads=cfg.num_heads, num_key_value_heads=kv_heads(cfg),
                 intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_positions,
                 attention_dropout=dropout)
    if arch != "qwen2":  # Gemma's default head size is 256, whatever the hidden size; Qwen2 derives it
        sizes["head_dim"] = cfg.hidden_size // cfg.num_heads
    return config_class(**sizes, **specials, **label_kwargs)


def build_random_model(cfg, head: str, pad_token_id: int | None = None, **label_kwargs):
    """A freshly initialised model of ``cfg`` with ``head`` (see ``head_class_name``), in fp32."""
    model_class = getattr(transformers, head_class_name(arch_of(cfg), head))
    return model_class(random_config(cfg, pad_token_id, **label_kwargs))
