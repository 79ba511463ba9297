"""The training loop: epochs of micro-batches, ``trainer.grad_accum`` of them to an optimiser step
(AdamW with warm-up and ``trainer.schedule``), a checkpoint every ``trainer.checkpoint_every`` steps,
an evaluation every ``trainer.eval_every`` steps, and every epoch ending with ``end_epoch``
(evaluation, best epoch, patience)."""
from __future__ import annotations

import math
import signal
import statistics
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from lora_lab.data.token_data import IGNORED
from lora_lab.runtime.distributed import Distributed
from lora_lab.runtime.preemption import Preempted, StopRequests
from lora_lab.runtime.tracking import Tracker
from lora_lab.tasks.losses import training_loss
from lora_lab.tasks.task_types import TaskType
from lora_lab.trainer.checkpointing import write_checkpoint
from lora_lab.trainer.epoch_end import end_epoch, evaluate_within_epoch
from lora_lab.trainer.evaluation import to_device
from lora_lab.trainer.progress import TrainingState
from lora_lab.trainer.setup import Run


class Diverged(FloatingPointError):
    """The training loss is NaN or infinite: the run stops before the optimiser applies that step."""

    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        super().__init__(f"training loss is {loss} at step {step}; stopped before the update")


def train_until_done(run: Run, state: TrainingState, tracker: Tracker, stop: StopRequests) -> None:
    """Train epoch after epoch until the progress says training is done. A stop request (a signal)
    raises Preempted at the next optimiser step's boundary, after writing a checkpoint."""
    state.peak.reset()
    while not state.progress.training_done:
        train_epoch(run, state, tracker, stop)
        if not state.progress.training_done:  # else stopped early by an evaluation inside the epoch
            end_epoch(run, state, tracker)


def train_epoch(run: Run, state: TrainingState, tracker: Tracker, stop: StopRequests) -> None:
    """The rest of the current epoch's micro-batches (all of them, unless resumed inside it)."""
    progress, schedule, tcfg = state.progress, run.schedule, run.cfg.trainer
    batches = run.train_loader.batch_sampler
    batches.set_epoch(progress.epoch, start=progress.batch)
    run.train_model.train()
    bar = tqdm(run.train_loader, desc=f"epoch {progress.epoch}/{tcfg.epochs}", leave=False, initial=progress.batch,
               total=schedule.batches_per_epoch, disable=_progress_disabled(tcfg.progress_bar) if run.is_main else True,
               dynamic_ncols=True)
    for batch in bar:
        micro = progress.batch % schedule.accum  # position in the optimiser step's group of micro-batches
        if micro == 0:  # checkpoints and stops fall between optimiser steps, never inside a group
            if progress.step >= schedule.total_steps or progress.training_done:
                break
            if run.dist.sum([stop.signum is not None])[0]:  # every rank stops at the same step
                raise Preempted(stop.signum or signal.SIGTERM, progress.step,
                                write_checkpoint(run, state) if run.checkpoint_every else None)
        # the micro-batches of this optimiser step: an epoch's last step may have fewer
        group = min(schedule.accum, schedule.batches_per_epoch - (progress.batch - micro))
        stepping = micro + 1 == group
        loss_value = _train_micro_batch(run, state, batch, group, stepping)
        progress.batch += 1
        state.epoch_losses.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if stepping:
            _after_optimizer_step(run, state, tracker, group)


def _train_micro_batch(run: Run, state: TrainingState, batch: dict, group: int, stepping: bool) -> float:
    """Forward and backward on one micro-batch; the optimiser steps after its group's last. Returns the
    loss of the whole global micro-batch (over every rank)."""
    examples = run.train_loader.batch_sampler.counted(state.progress.batch)  # 0: a stand-in that keeps DDP in step
    batch = to_device(batch, run.device)
    label_smoothing = run.cfg.trainer.get("label_smoothing") or 0.0
    # DDP synchronises gradients on the step's last micro-batch only; FSDP reduce-scatters after every one
    accumulating = not stepping and run.dist.enabled and not run.dist.sharded
    with state.throughput.step(batch, examples), (run.train_model.no_sync() if accumulating else nullcontext()):
        with run.amp():
            loss = training_loss(run.train_model(**batch), batch, run.task.head, label_smoothing)
        loss_value, weight = global_loss(loss, batch, examples, run.task, run.dist)
        if not math.isfinite(loss_value):
            raise Diverged(state.progress.step + 1, loss_value)
        scaled = loss * weight / group  # the group's mean loss, as one batch of group x batch_size
        extra = run.method.extra_loss(run.model)  # a method's own term (AdaLoRA's regulariser), once per step
        if extra is not None:
            scaled = scaled + extra / group
        (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        if stepping:
            max_grad_norm = run.cfg.trainer.max_grad_norm
            if run.scaler and max_grad_norm:
                run.scaler.unscale_(run.optimizer)  # clip the true gradients
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(run.trainable, max_grad_norm)
            if run.scaler:  # fp16 on CUDA: skips a step whose gradients overflowed, adapts the scale
                run.scaler.step(run.optimizer)
                run.scaler.update()
            else:
                run.optimizer.step()
            run.scheduler.step()
            run.method.after_optimizer_step(run.model, state.progress.step + 1)  # e.g. AdaLoRA's rank allocation
            run.optimizer.zero_grad(set_to_none=True)
    return loss_value


def _after_optimizer_step(run: Run, state: TrainingState, tracker: Tracker, group: int) -> None:
    """Count the step, log the training loss every ``trainer.log_every`` steps, evaluate every
    ``trainer.eval_every``, checkpoint every ``trainer.checkpoint_every`` (an epoch's last step is
    evaluated and checkpointed by ``end_epoch``)."""
    progress, every = state.progress, run.checkpoint_every
    progress.step += 1
    step = progress.step
    if step % run.cfg.trainer.log_every == 0:
        tracker.log({"train/loss": statistics.fmean(state.epoch_losses[-group:]),
                     "train/lr": run.scheduler.get_last_lr()[0], "train/epoch": progress.epoch}, step=step)
    inside_epoch = progress.batch < run.schedule.batches_per_epoch and step < run.schedule.total_steps
    eval_every = run.cfg.trainer.get("eval_every")
    if eval_every and step % eval_every == 0 and inside_epoch:
        evaluate_within_epoch(run, state, tracker)
        run.train_model.train()
        if progress.training_done:  # out of patience: the run ends at this step
            if every:
                write_checkpoint(run, state)
            else:
                state.count_training_time()
            return
    if every and step % every == 0 and inside_epoch:
        write_checkpoint(run, state)


def _progress_disabled(setting) -> bool | None:
    """tqdm's convention: None hides the bar when output is not a terminal (logs, CI)."""
    return None if setting == "auto" else not setting


def loss_terms(batch: dict, examples: int, task: TaskType) -> int:
    """How many terms a batch's mean loss averages: its examples, its labelled tokens for tagging, its
    predicted tokens (labelled positions after the first, as the causal shift leaves them) for a
    causal LM; none for a stand-in batch (no examples)."""
    if not examples or task.head not in ("token", "lm"):
        return examples
    labels = batch["labels"][:, 1:] if task.head == "lm" else batch["labels"]
    return int((labels != IGNORED).sum())


def global_loss(loss: torch.Tensor, batch: dict, examples: int, task: TaskType,
                dist: Distributed) -> tuple[float, float]:
    """The loss of the whole global micro-batch (as one process with ``world_size`` times the batch
    would compute it) and this rank's weight for its own loss. Each rank's loss is a mean over its
    loss terms (``loss_terms``: examples, labelled tokens or predicted tokens); weighting it by its
    share of the global count, times world_size (DDP averages gradients over ranks), makes the
    gradient that of the global mean."""
    value = loss.item()
    if not dist.enabled:
        return value, 1.0
    terms = loss_terms(batch, examples, task)
    total, loss_sum, bad = dist.sum([terms, value * terms, 0.0 if math.isfinite(value) else 1.0])
    if bad:
        return float("nan"), 0.0
    return loss_sum / total, terms * dist.world_size / total
