"""What changes while a run trains: ``Progress`` (where the run stands, saved in every checkpoint)
and ``TrainingState`` (the progress with what else a resumed run needs)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import torch

from lora_lab.runtime import measure

WITHIN_EPOCH = "within_epoch"  # marks the row of an evaluation inside an epoch (trainer.eval_every)


def evaluation_key(row: dict) -> str:
    """What an evaluation's reports and generations are kept under: its epoch for an epoch's end,
    ``step<N>`` for an evaluation inside an epoch (``trainer.eval_every``)."""
    return f"step{row['step']}" if row.get(WITHIN_EPOCH) else str(row["epoch"])


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint, so a resumed run goes on from here. A
    checkpoint holds ``to_dict()``: its keys are these names."""
    step: int = 0  # optimiser steps taken
    epoch: int = 1  # the epoch being trained
    batch: int = 0  # micro-batches of that epoch trained
    epochs: list[dict] = field(default_factory=list)  # one row per evaluation (epoch end, eval_every): its step, metrics
    best: dict | None = None  # the row of the best evaluation so far
    best_epoch: int | None = None  # the epoch it fell in
    stale_epochs: int = 0  # evaluations since the best one (trainer.patience)
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
    reports: dict = field(default_factory=dict)  # evaluation_key -> per-class reports of validation and test
    baseline: dict | None = None  # the record's baseline (a causal LM's pre-trained model: evaluated once)
    generations: dict = field(default_factory=dict)  # evaluation_key -> kept generations (best and latest)
    throughput_ranks: list[dict] | None = None  # every rank's throughput state (under torchrun only)
    grad_scaler: dict | None = None  # the fp16 loss scaler's state (trainer.precision=fp16 on CUDA only)

    def to_dict(self) -> dict:
        """The checkpoint's ``progress`` entry (``throughput_ranks`` only under torchrun, ``grad_scaler``
        only with a loss scaler)."""
        saved = {f.name: getattr(self, f.name) for f in fields(self)}
        for optional in ("throughput_ranks", "grad_scaler"):
            if saved[optional] is None:
                del saved[optional]
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
