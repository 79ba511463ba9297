"""The end of an epoch: evaluate on validation and test (and generate), keep the best epoch, decide
whether training goes on, checkpoint. With ``trainer.eval_every`` the same evaluation also runs every
that many optimiser steps inside an epoch (``evaluate_within_epoch``).

The best epoch is the one with the best validation main metric in that metric's direction (lower
perplexity is better: lora_lab.tasks.metrics.higher_is_better); with ``trainer.eval_every`` it is the
best evaluation, which may fall inside an epoch (its row says its step). Training ends after
``trainer.epochs`` epochs, ``trainer.max_steps`` steps, or ``trainer.patience`` evaluations in a row
that do not improve on the best.
"""
from __future__ import annotations

import statistics

from lora_lab.runtime import checkpoint, measure, predictions, records
from lora_lab.runtime.tracking import Tracker
from lora_lab.tasks.metrics import is_better
from lora_lab.trainer import evaluation
from lora_lab.trainer.checkpointing import write_checkpoint
from lora_lab.trainer.progress import WITHIN_EPOCH, Progress, TrainingState, evaluation_key
from lora_lab.trainer.setup import Run


def end_epoch(run: Run, state: TrainingState, tracker: Tracker) -> None:
    progress, epoch = state.progress, state.progress.epoch
    row = _evaluate_and_keep(run, state, tracker, within_epoch=False)
    run.say(f"[lora_lab] epoch {epoch}: loss {row['train_loss']:.4f}  val {run.monitor} "
            f"{row[f'validation/{run.monitor}']:.4f}  test {run.monitor} {row[f'test/{run.monitor}']:.4f}")
    progress.epoch, progress.batch = epoch + 1, 0
    state.epoch_losses = []
    _decide_whether_done(run, progress, epoch)
    if run.checkpoint_every:
        write_checkpoint(run, state)
    else:
        state.count_training_time()
    state.peak.reset()


def evaluate_within_epoch(run: Run, state: TrainingState, tracker: Tracker) -> None:
    """``trainer.eval_every``: the epoch end's evaluation after an optimiser step inside an epoch. It may
    become the best and counts towards ``trainer.patience`` (which may end training here); the caller
    checkpoints and puts the model back into training mode."""
    progress = state.progress
    row = _evaluate_and_keep(run, state, tracker, within_epoch=True)
    run.say(f"[lora_lab] step {progress.step} (epoch {progress.epoch}): loss {row['train_loss']:.4f}  val "
            f"{run.monitor} {row[f'validation/{run.monitor}']:.4f}  test {run.monitor} {row[f'test/{run.monitor}']:.4f}")
    _stop_if_out_of_patience(run, progress)
    state.peak.reset()


def _evaluate_and_keep(run: Run, state: TrainingState, tracker: Tracker, within_epoch: bool) -> dict:
    """Evaluate, add the row (logged to the tracker) and keep it and its state if it is the best so far."""
    progress, epoch = state.progress, state.progress.epoch
    _note_peak(run, state, "train")
    state.peak.reset()  # evaluation's peak is measured on its own
    key = f"step{progress.step}" if within_epoch else str(epoch)  # what evaluation_key(row) will say
    val, test, val_latency, generated, test_predictions = _evaluate_epoch(run, progress, key)
    _note_peak(run, state, "eval")
    progress.eval_batch_ms_median = statistics.median(val_latency) if val_latency else None
    train_loss = statistics.fmean(state.epoch_losses) if state.epoch_losses else float("nan")
    row = epoch_row(epoch, progress.step, train_loss, val, test)
    if within_epoch:
        row[WITHIN_EPOCH] = True
    progress.epochs.append(row)
    tracker.log({k: v for k, v in row.items() if k not in ("step", WITHIN_EPOCH)}, step=progress.step)
    _keep_if_best(run, state, row, val, test_predictions)
    if generated:  # kept for the best evaluation and the latest one only
        best_key = evaluation_key(progress.best)
        progress.generations = {k: v for k, v in progress.generations.items() if k == best_key}
        progress.generations[key] = generated
    return row


def _note_peak(run: Run, state: TrainingState, span: str) -> None:
    """The peak memory of the span just ended (``train`` or ``eval``) over every rank, kept if higher
    than the span's peak before."""
    reading = measure.combine_ranks(run.dist.gather(state.peak.read()))
    state.progress.peaks[span] = measure.higher_peak(state.progress.peaks[span], reading)


def _evaluate_epoch(run: Run, progress: Progress, key: str) -> tuple[dict, dict, list[float], dict, list]:
    """Validation and test metrics (with the generation metrics of the splits generated on), the
    validation batches' latencies, the generations kept and the test predictions; the per-class
    reports go to the progress."""
    splits, model, task = run.evaluation, run.model, run.task
    with run.phases.phase("evaluating on validation"):
        val, val_report, val_latency, _ = evaluation.evaluate(
            model, splits.loaders["validation"], splits.gold["validation"], run.device, run.amp, task,
            run.data.label_names, dist=run.dist)
    with run.phases.phase("evaluating on test"):
        test, test_report, _, test_predictions = evaluation.evaluate(
            model, splits.loaders["test"], splits.gold["test"], run.device, run.amp, task, run.data.label_names,
            dist=run.dist)
    if val_report or test_report:
        progress.reports[key] = {"validation": val_report, "test": test_report}
    generated = {}
    for split, metrics in (("validation", val), ("test", test)):
        if split in splits.generators:
            with run.phases.phase(f"generating on {split}"):
                scores, generated[split] = splits.generators[split].run(model, run.device, run.amp, run.dist)
            metrics.update(scores)
    return val, test, val_latency, generated, test_predictions


def epoch_row(epoch: int, step: int, train_loss: float, val: dict, test: dict) -> dict:
    row = {"epoch": epoch, "step": step, "train_loss": train_loss}
    row.update({f"validation/{k}": v for k, v in val.items()})
    row.update({f"test/{k}": v for k, v in test.items()})
    return row


def _keep_if_best(run: Run, state: TrainingState, row: dict, val: dict, test_predictions: list) -> None:
    """A better evaluation becomes the best: its row, a copy of its trainable state (written to the
    checkpoint folder too when checkpointing) and its per-example test results, written to the run
    folder at once (``predictions.safetensors``: a resumed run finds them there); otherwise one more
    stale evaluation."""
    progress = state.progress
    if progress.best is None or is_better(run.monitor, val[run.monitor], progress.best[f"validation/{run.monitor}"]):
        progress.best, progress.best_epoch, progress.stale_epochs = row, row["epoch"], 0
        state.best_state = checkpoint.snapshot(run.model)  # under fsdp: each rank's shards
        if run.checkpoint_every and (run.is_main or run.dist.sharded):
            checkpoint.save_best(run.checkpoint_dir, state.best_state, row, run.dist)
        if run.is_main:
            fields = predictions.example_fields(run.task.name, run.evaluation.gold["test"], test_predictions,
                                                run.data.label_names)
            predictions.save_predictions(run.run_dir / records.PREDICTIONS_FILE, run.task.name, fields, row["epoch"])
    else:
        progress.stale_epochs += 1


def _decide_whether_done(run: Run, progress: Progress, epoch: int) -> None:
    tcfg = run.cfg.trainer
    if progress.step >= run.schedule.total_steps or epoch >= tcfg.epochs:
        progress.training_done = True
    else:
        _stop_if_out_of_patience(run, progress)


def _stop_if_out_of_patience(run: Run, progress: Progress) -> None:
    patience = run.cfg.trainer.get("patience")
    if patience and progress.stale_epochs >= patience:
        progress.training_done = progress.stopped_early = True
        counted = "evaluations" if run.cfg.trainer.get("eval_every") else "epochs"
        run.say(f"[lora_lab] stopping early: validation {run.monitor} has not improved for {patience} {counted}")
