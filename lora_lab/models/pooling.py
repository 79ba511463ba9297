"""How a sequence classifier turns token states into one vector: ``model.pooling``.

- ``pooler``: the model's own Hugging Face classification head (BERT: tanh(dense(h_CLS))).
- ``cls``: a linear classifier on the last hidden state of the first token (no pooler dense).
- ``mean``: a linear classifier on the mean of the last hidden states over the attention mask.
- ``auto``: what the checkpoint was trained with, as its sentence-transformers pooling config
  declares (``1_Pooling/config.json``), else ``pooler``.

A decoder-only model (GPT-2, Llama, ...) attends causally: its own head (``auto``, ``pooler``) reads the
last token that is not padding, reported as ``last``; ``mean`` averages over the mask as for encoders;
``cls`` is refused, since the first token has seen only itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from lora_lab.errors import ConfigError, first_line
from lora_lab.models.files import local_model_folder

POOLINGS = ("auto", "cls", "mean", "pooler")
# sentence-transformers' Pooling config: flag -> the name we report
_DECLARED_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
SUPPORTED_DECLARED = ("cls", "mean")


def _read_json(path: Path, folder: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError("model.name", str(folder), f"{path} is not valid JSON: {first_line(error)}") from None


def _pooling_config_file(folder: Path) -> Path | None:
    modules = folder / "modules.json"
    if modules.is_file():
        entries = _read_json(modules, folder)
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and str(entry.get("type", "")).rsplit(".", 1)[-1] == "Pooling":
                candidate = folder / str(entry.get("path", "")) / "config.json"
                if candidate.is_file():
                    return candidate
    default = folder / "1_Pooling" / "config.json"
    return default if default.is_file() else None


def declared_pooling(folder) -> str | None:
    """The pooling a sentence-transformers checkpoint in ``folder`` was trained with ("mean" or "cls"),
    or None when the folder declares none. Reads only JSON files."""
    folder = Path(folder)
    path = _pooling_config_file(folder)
    if path is None:
        return None
    config = _read_json(path, folder)
    if not isinstance(config, dict):
        raise ConfigError("model.name", str(folder), f"{path} is not a pooling config (not a JSON object)")
    modes = [name for flag, name in _DECLARED_MODES.items() if config.get(flag) is True]
    if not modes and isinstance(config.get("pooling_mode"), str):
        modes = [config["pooling_mode"]]
    if len(modes) == 1 and modes[0] in SUPPORTED_DECLARED:
        return modes[0]
    declared = " + ".join(modes) if modes else "no"
    raise ConfigError("model.pooling", "auto", f"{path} declares {declared} pooling; supported: one of "
                      f"{' or '.join(SUPPORTED_DECLARED)}; set model.pooling=cls|mean|pooler")


def resolve_pooling(model_cfg, decoder: bool | None = None) -> str:
    """``model.pooling`` made concrete: "cls", "mean" or "pooler"; for a decoder-only model
    (``decoder``; None: not known before loading) "mean" or "last" (its own head).

    A config without the key (written before it existed) keeps the model's own head, as it was run.
    """
    given = model_cfg.get("pooling", "pooler")
    if given not in POOLINGS:
        raise ConfigError("model.pooling", given, f"must be one of {list(POOLINGS)}")
    value = given
    if given == "auto":
        folder = local_model_folder(model_cfg)
        value = (declared_pooling(folder) if folder is not None else None) or "pooler"
    if decoder and value == "cls":
        raise ConfigError("model.pooling", given, "pools the first token, which in a causal decoder has seen only "
                          "itself; set model.pooling=mean, or pooler for the model's own head (the last token)")
    return "last" if decoder and value == "pooler" else value


class PooledClassifier(nn.Module):
    """A linear classifier on cls- or mean-pooled last hidden states of a pretrained backbone.

    The backbone sits under its own ``base_model_prefix`` (``bert``, ``roberta``, ``distilbert``...), so
    parameter names match those of Hugging Face's classifiers; its pooler is removed (unused).
    """

    def __init__(self, backbone: nn.Module, pooling: str):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ConfigError("model.pooling", pooling, "a pooled classifier pools with 'cls' or 'mean'")
        self.pooling = pooling
        self.base_model_prefix = backbone.base_model_prefix
        self.config = backbone.config
        self.num_labels = self.config.num_labels
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None
        setattr(self, self.base_model_prefix, backbone)
        self.dropout = nn.Dropout(_dropout_probability(self.config))
        self.classifier = nn.Linear(self.config.hidden_size, self.num_labels)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=float(getattr(self.config, "initializer_range", 0.02)))
        nn.init.zeros_(self.classifier.bias)

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).float()
        mean = (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return mean.to(hidden.dtype)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        if token_type_ids is not None:  # DistilBERT's forward takes none
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                               **kwargs).last_hidden_state
        logits = self.classifier(self.dropout(self.pool(hidden, attention_mask)))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.view(-1), labels.view(-1).to(logits.dtype))
            else:
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _dropout_probability(config) -> float:
    # BERT's, DistilBERT's, OPT's; GPT-2's residual dropout; the Llama family has attention dropout only
    for name in ("classifier_dropout", "hidden_dropout_prob", "seq_classif_dropout", "dropout", "resid_pdrop",
                 "attention_dropout"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.1
