"""Drift: how far fine-tuning moved a model's representations of text it was not trained on.

For a completed run, the base model and the trained model read the same held-out texts (by default
from another embedded data set than the runs were trained on); the last hidden states, mean-pooled
over each text's tokens, are compared with linear CKA (Kornblith et al. 2019):

    CKA(X, Y) = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F),   X_c, Y_c: column-centred,

1 when one representation is a rotation and uniform scaling of the other, lower the more fine-tuning
changed the geometry. For a causal-LM run the held-out next-token loss of both models is reported too:
the "forgetting" of Biderman et al. 2024 ("LoRA Learns Less and Forgets Less"), which PEFT's method
comparison reports.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lora_lab.errors import ConfigError

DRIFT_DATA = ("sms_spam", "trec6", "rotten_tomatoes")  # the default held-out text: the first no run trained on
DEFAULT_TEXTS = 512
MAX_LENGTH = 128
BATCH = 32


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n inputs (n x d1 and n x d2)."""
    if X.shape[0] != Y.shape[0]:
        raise ConfigError("representations", (tuple(X.shape), tuple(Y.shape)), "must describe the same inputs")
    X = X.to(torch.float64) - X.to(torch.float64).mean(dim=0)
    Y = Y.to(torch.float64) - Y.to(torch.float64).mean(dim=0)
    cross = torch.linalg.matrix_norm(Y.T @ X) ** 2
    norms = torch.linalg.matrix_norm(X.T @ X) * torch.linalg.matrix_norm(Y.T @ Y)
    return float(cross / norms) if norms > 0 else float("nan")


def held_out_texts(name: str, n: int = DEFAULT_TEXTS, seed: int = 0) -> list[str]:
    """``n`` texts of an embedded data set, drawn with a fixed seed from all of its splits."""
    from lora_lab.data.embedded import EMBEDDED_DATASETS

    if name not in EMBEDDED_DATASETS:
        raise ConfigError("drift data", name, f"is not an embedded data set; embedded: {sorted(EMBEDDED_DATASETS)}")
    if n < 2:
        raise ConfigError("drift texts", n, "must be >= 2 (CKA compares inputs)")
    texts = []
    for split in EMBEDDED_DATASETS[name].load().values():
        column = "text" if "text" in split.column_names else "tokens"
        texts += [t if isinstance(t, str) else " ".join(t) for t in split[column]]
    texts = sorted(set(t for t in texts if t.strip()))
    random.Random(seed).shuffle(texts)
    return texts[:n]


def default_drift_data(trained_on: Sequence[str]) -> str:
    """The first of DRIFT_DATA that no run was trained on."""
    for name in DRIFT_DATA:
        if name not in trained_on:
            return name
    raise ConfigError("drift data", ",".join(trained_on), "covers every default; pass --drift-data NAME")


@dataclass
class Drift:
    texts: int
    cka: float
    lm_loss_before: float | None = None
    lm_loss_after: float | None = None


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


@torch.no_grad()
def pooled_states(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """Mean over each text's tokens of the backbone's last hidden states, through the model's own forward
    (so a method's hooks apply), n x d."""
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = _backbone(model).register_forward_hook(keep)
    pooled = []
    try:
        for batch in batches:
            captured.clear()
            model(**batch)
            hidden, mask = captured[-1].float(), batch["attention_mask"]
            if hidden.shape[1] != mask.shape[1]:  # the method added positions (virtual tokens): real ones last
                hidden = hidden[:, -mask.shape[1]:]
            weights = mask.unsqueeze(-1).float()
            pooled.append((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0))
    finally:
        handle.remove()
    return torch.cat(pooled)


@torch.no_grad()
def lm_loss(model: nn.Module, batches: list[dict]) -> float:
    """Mean next-token cross-entropy over the real tokens of the texts."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(**batch).logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        total += float(nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                                   reduction="sum"))
        count += int((targets != -100).sum())
    return total / max(count, 1)


def tokenised(tokenizer, texts: list[str], max_length: int = MAX_LENGTH, token_types: bool = True) -> list[dict]:
    batches = []
    for start in range(0, len(texts), BATCH):
        encoded = tokenizer(texts[start:start + BATCH], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if token_types and "token_type_ids" in encoded:
            batch["token_type_ids"] = encoded["token_type_ids"]
        batches.append(batch)
    return batches


def run_drift(run_dir, texts: list[str]) -> Drift:
    """CKA of the base and trained models' pooled representations of ``texts`` (and, for a causal-LM
    run, both models' next-token loss on them)."""
    from lora_lab.models.architectures import model_type
    from lora_lab.models.loading import is_causal_decoder, load_tokenizer
    from lora_lab.runtime.rebuild import rebuild_trained

    rebuilt = rebuild_trained(run_dir, keep_base=True)
    cfg = rebuilt.record["config"]
    from omegaconf import OmegaConf

    tokenizer = load_tokenizer(OmegaConf.create(cfg["model"]))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = tokenised(tokenizer, texts, token_types=not is_causal_decoder(model_type(rebuilt.base)))
    base, trained = rebuilt.base.eval(), rebuilt.model.eval()
    drift = Drift(len(texts), linear_cka(pooled_states(base, batches), pooled_states(trained, batches)))
    if (rebuilt.record.get("task") or {}).get("type") == "causal_lm":
        drift.lm_loss_before, drift.lm_loss_after = lm_loss(base, batches), lm_loss(trained, batches)
    return drift
