"""The order in which training examples are seen, recomputable for any epoch and any rank.

Each epoch's permutation comes from a generator seeded with (seed, epoch) alone, not from a generator
whose state runs on from epoch to epoch. A run resumed in the middle of epoch e recomputes epoch e's
permutation and skips the batches it has already trained on, so it sees exactly the batches an
uninterrupted run would have seen.

Over several processes (``torchrun``) every rank computes the same permutation and cuts it into
global batches of ``batch_size x world_size`` examples; rank r takes the r-th share of each. The
examples of a global batch are those of a one-process run with ``batch_size x world_size``, and every
example is seen once per epoch. When an epoch's last global batch has fewer examples than ranks, a
rank left with none gets a stand-in example that the trainer weights by zero (DDP needs every rank to
take part in every step).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 1
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order): asked for at every step

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            if not self.shuffle:
                order = list(range(self.size))
            else:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(self.size, generator=generator).tolist()
            self._order = (epoch, order)
        return self._order[1]

    def __iter__(self):
        return iter(self.order(self.epoch))

    def __len__(self) -> int:
        return self.size


def share_bounds(batch_examples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Start and end of rank ``rank``'s part of a global batch: as even as the count allows."""
    base, extra = divmod(batch_examples, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class EpochBatches(Sampler[list[int]]):
    """This rank's micro-batches of an epoch, from global batch ``start`` on (``set_epoch``)."""

    def __init__(self, sampler: EpochSampler, batch_size: int, rank: int = 0, world_size: int = 1):
        self.sampler, self.batch_size, self.rank, self.world_size = sampler, batch_size, rank, world_size
        self.start = 0

    @property
    def seed(self) -> int:
        return self.sampler.seed

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch numbers start at 1; ``start``: how many batches of this epoch were already trained on."""
        self.sampler.set_epoch(epoch)
        self.start = start

    def share(self, order: list[int], index: int) -> tuple[list[int], int]:
        """Rank's examples of global batch ``index`` and how many of them count (0: a stand-in)."""
        batch = order[index * self.global_batch:(index + 1) * self.global_batch]
        start, end = share_bounds(len(batch), self.rank, self.world_size)
        return (batch[start:end], end - start) if end > start else (batch[:1], 0)

    def counted(self, index: int) -> int:
        """How many examples of this rank's micro-batch ``index`` count (0 for a stand-in)."""
        return self.share(self.sampler.order(self.sampler.epoch), index)[1]

    def __iter__(self):
        order = self.sampler.order(self.sampler.epoch)
        for index in range(self.start, self.batches_per_epoch()):
            yield self.share(order, index)[0]

    def batches_per_epoch(self) -> int:
        return -(-self.sampler.size // self.global_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start


def _loader(dataset, batches: EpochBatches, collator) -> DataLoader:
    # A DataLoader draws a seed for its workers each time it is iterated, from its own generator if
    # it has one, else from torch's global one, which would shift the dropout masks of a resumed run.
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collator,
                      generator=torch.Generator().manual_seed(batches.seed))


def training_loader(dataset, batch_size: int, collator, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Shuffled batches; ``loader.batch_sampler.set_epoch(epoch, start)`` before iterating each epoch."""
    return _loader(dataset, EpochBatches(EpochSampler(len(dataset), seed), batch_size, rank, world_size), collator)


def evaluation_loader(dataset, batch_size: int, collator) -> DataLoader:
    """Every example in order, in batches; over several ranks the trainer gives each rank every
    ``world_size``-th batch and gathers the predictions (the same batches as one process)."""
    return _loader(dataset, EpochBatches(EpochSampler(len(dataset), 0, shuffle=False), batch_size), collator)
