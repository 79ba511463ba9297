"""The order in which training examples are seen, recomputable for any epoch.

Each epoch's permutation comes from a generator seeded with (seed, epoch) alone, not from a generator
whose state runs on from epoch to epoch. A run resumed in the middle of epoch e recomputes epoch e's
permutation and skips the examples it has already trained on, so it sees exactly the batches an
uninterrupted run would have seen.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch numbers start at 1; ``start``: how many examples of this epoch were already seen."""
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        return iter(self.order(self.epoch)[self.start:])

    def __len__(self) -> int:
        return self.size - self.start


def _loader(dataset, batch_size: int, sampler: EpochSampler, collator) -> DataLoader:
    # A DataLoader draws a seed for its workers each time it is iterated, from its own generator if
    # it has one, else from torch's global one, which would shift the dropout masks of a resumed run.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(sampler.seed))


def training_loader(dataset, batch_size: int, collator, seed: int) -> DataLoader:
    """Shuffled batches; ``loader.sampler.set_epoch(epoch, start)`` before iterating each epoch."""
    return _loader(dataset, batch_size, EpochSampler(len(dataset), seed), collator)


def evaluation_loader(dataset, batch_size: int, collator) -> DataLoader:
    return _loader(dataset, batch_size, EpochSampler(len(dataset), 0, shuffle=False), collator)
