"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

A fine-tuned matrix W = W0 + ΔW has an *intruder dimension* when one of its top-k left singular
vectors is far from every left singular vector of W0: max_i |cos(u_j(W), u_i(W0))| < threshold.
The paper (Algorithm 1) reports that LoRA introduces such directions among the top ones and full
fine-tuning mostly does not; it examines the top k = 10 vectors over a range of thresholds. Here the
defaults are k = 10 and threshold 0.5; the vectors' signs are arbitrary, hence the absolute cosine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_lab.errors import ConfigError

DEFAULT_K = 10
DEFAULT_THRESHOLD = 0.5


@dataclass
class Intruders:
    """The top-k left singular vectors of W0 + ΔW, each with its best |cosine| against W0's."""

    similarity: torch.Tensor  # k: max_i |cos(u_j(W), u_i(W0))|
    threshold: float

    @property
    def count(self) -> int:
        return int((self.similarity < self.threshold).sum())

    @property
    def positions(self) -> list[int]:
        """1-based ranks (by singular value of W) of the intruder dimensions."""
        return [j + 1 for j in torch.nonzero(self.similarity < self.threshold).flatten().tolist()]


def left_singular_vectors(W: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """The left singular vectors of W (out x min(out, in), in float64), the top ``k`` when given."""
    U, _, _ = torch.linalg.svd(W.detach().to(torch.float64), full_matrices=False)
    return U if k is None else U[:, :k]


def intruder_dimensions(W0: torch.Tensor, delta: torch.Tensor, k: int = DEFAULT_K,
                        threshold: float = DEFAULT_THRESHOLD, base_vectors: torch.Tensor | None = None) -> Intruders:
    """Intruder dimensions of W0 + ``delta`` among its top ``k`` singular vectors.

    ``base_vectors`` (the left singular vectors of W0) may be passed in when several runs share W0.
    """
    if k < 1:
        raise ConfigError("intruder_k", k, "must be >= 1")
    if not 0.0 < threshold <= 1.0:
        raise ConfigError("intruder_threshold", threshold, "must be in (0, 1]")
    if W0.shape != delta.shape:
        raise ConfigError("delta_w", tuple(delta.shape), f"does not match W0 of shape {tuple(W0.shape)}")
    U0 = left_singular_vectors(W0) if base_vectors is None else base_vectors
    tuned = left_singular_vectors(W0.to(torch.float64) + delta.to(torch.float64), min(k, min(W0.shape)))
    similarity = (U0.T @ tuned).abs().amax(dim=0)
    return Intruders(similarity.float(), threshold)
