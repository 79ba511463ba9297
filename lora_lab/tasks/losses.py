"""The training loss with label smoothing (``trainer.label_smoothing``; the LoRA paper's GPT-2 runs
use 0.1). Without smoothing the model's own loss is used as it is. With it, the cross-entropy is
computed here from the logits, over the same terms the model's loss averages: one per example
(classification), per labelled token (tagging), per predicted token (causal LM: logits at position t
predict the token at t + 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORED = -100  # the label of positions the loss skips (PyTorch's cross-entropy ignore_index)


def next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's logits and the labels they predict: position t predicts the token at t + 1."""
    return logits[..., :-1, :], labels[..., 1:]


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Each sequence's summed negative log-likelihood of its labelled tokens, each predicted from the
    positions before it. Row by row, so that only one sequence's logits are ever held in fp32."""
    sums = []
    for row_logits, row_labels in zip(logits, labels):
        row_logits, row_labels = next_token(row_logits, row_labels)
        sums.append(float(F.cross_entropy(row_logits.float(), row_labels, ignore_index=IGNORED, reduction="sum")))
    return sums


def training_loss(outputs, batch: dict, head: str, label_smoothing: float) -> torch.Tensor:
    if not label_smoothing:
        return outputs.loss
    logits, labels = outputs.logits, batch["labels"]
    if head == "lm":
        logits, labels = next_token(logits, labels)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORED, label_smoothing=float(label_smoothing))
