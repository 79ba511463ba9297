"""What changes while a run trains: ``Progress`` (where the run stands, saved in every checkpoint)
and ``TrainingState`` (the progress with what else a resumed run needs)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import torch

from lora_lab.runtime import measure


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint, so a resumed run goes on from here. A
    checkpoint holds ``to_dict()``: its keys are these names."""
    step: int = 0  # optimiser steps taken
    epoch: int = 1  # the epoch being trained
    batch: int = 0  # micro-batches of that epoch trained
    epochs: list[dict] = field(default_factory=list)  # one row per epoch ended: train loss, metrics
    best: dict | None = None  # the row of the best epoch so far
    best_epoch: int | None = None
    stale_epochs: int = 0  # epochs ended since the best one (trainer.patience)
    stopped_early: bool = False
    training_done: bool = False
    train_seconds: float = 0.0  # training and evaluation time, without setup or writing checkpoints
    checkpoint_seconds: float = 0.0
    checkpoints_written: int = 0
    peaks: dict = field(default_factory=lambda: {"train": None, "eval": None})  # peak memory while each ran
    throughput: dict | None = None  # this process's measure.Throughput.state() at the last checkpoint
    eval_batch_ms_median: float | None = None  # the latest validation's median forward latency
    resumes: list[dict] = field(default_factory=list)  # the step and epoch of every resume
    wandb_run_id: str | None = None  # the W&B run a resumed run logs into again
    reports: dict = field(default_factory=dict)  # str(epoch) -> per-class reports of validation and test
    baseline: dict | None = None  # the record's baseline (a causal LM's pre-trained model: evaluated once)
    generations: dict = field(default_factory=dict)  # str(epoch) -> kept generations (best and latest epoch)
    throughput_ranks: list[dict] | None = None  # every rank's throughput state (under torchrun only)

    def to_dict(self) -> dict:
        """The checkpoint's ``progress`` entry (``throughput_ranks`` only under torchrun)."""
        saved = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.throughput_ranks is None:
            del saved["throughput_ranks"]
        return saved

    @classmethod
    def from_dict(cls, saved: dict) -> Progress:
        """A checkpoint's progress; keys that an older checkpoint lacks keep their defaults."""
        return cls(**saved)


@dataclass
class TrainingState:
    """The progress, and what else a checkpoint saves beside it or a resumed run rebuilds."""
    progress: Progress
    throughput: measure.Throughput
    peak: measure.PeakMemory  # reset at the start of every span measured (training, evaluation)
    epoch_losses: list[float] = field(default_factory=list)  # the current epoch's micro-batch losses
    best_state: dict[str, torch.Tensor] | None = None  # the trainable state of the best epoch so far
    segment_start: float = field(default_factory=time.perf_counter)  # since when train_seconds is owed

    def count_training_time(self) -> float:
        """Add the time since the last count to ``train_seconds``; returns when the count was taken."""
        now = time.perf_counter()
        self.progress.train_seconds += now - self.segment_start
        self.segment_start = now
        return now
