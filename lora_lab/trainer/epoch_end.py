"""The end of an epoch: evaluate on validation and test (and generate), keep the best epoch, decide
whether training goes on, checkpoint.

The best epoch is the one with the best validation main metric in that metric's direction (lower
perplexity is better: lora_lab.tasks.metrics.higher_is_better). Training ends after
``trainer.epochs`` epochs, ``trainer.max_steps`` steps, or ``trainer.patience`` epochs in a row that do
not improve on the best.
"""
from __future__ import annotations

import statistics

from lora_lab.runtime import checkpoint, measure
from lora_lab.runtime.tracking import Tracker
from lora_lab.tasks.metrics import is_better
from lora_lab.trainer import evaluation
from lora_lab.trainer.checkpointing import write_checkpoint
from lora_lab.trainer.progress import Progress, TrainingState
from lora_lab.trainer.setup import Run


def end_epoch(run: Run, state: TrainingState, tracker: Tracker) -> None:
    progress, epoch = state.progress, state.progress.epoch
    _note_peak(run, state, "train")
    state.peak.reset()  # evaluation's peak is measured on its own
    val, test, val_latency, generated = _evaluate_epoch(run, progress)
    _note_peak(run, state, "eval")
    progress.eval_batch_ms_median = statistics.median(val_latency) if val_latency else None
    train_loss = statistics.fmean(state.epoch_losses) if state.epoch_losses else float("nan")
    row = epoch_row(epoch, progress.step, train_loss, val, test)
    progress.epochs.append(row)
    tracker.log({k: v for k, v in row.items() if k != "step"}, step=progress.step)
    _keep_if_best(run, state, row, val)
    if generated:  # kept for the best epoch and the latest one only
        progress.generations = {k: v for k, v in progress.generations.items() if k == str(progress.best_epoch)}
        progress.generations[str(epoch)] = generated
    run.say(f"[lora_lab] epoch {epoch}: loss {row['train_loss']:.4f}  "
            f"val {run.monitor} {val[run.monitor]:.4f}  test {run.monitor} {test[run.monitor]:.4f}")
    progress.epoch, progress.batch = epoch + 1, 0
    state.epoch_losses = []
    _decide_whether_done(run, progress, epoch)
    if run.checkpoint_every:
        write_checkpoint(run, state)
    else:
        state.count_training_time()
    state.peak.reset()


def _note_peak(run: Run, state: TrainingState, span: str) -> None:
    """The peak memory of the span just ended (``train`` or ``eval``) over every rank, kept if higher
    than the span's peak before."""
    reading = measure.combine_ranks(run.dist.gather(state.peak.read()))
    state.progress.peaks[span] = measure.higher_peak(state.progress.peaks[span], reading)


def _evaluate_epoch(run: Run, progress: Progress) -> tuple[dict, dict, list[float], dict]:
    """Validation and test metrics (with the generation metrics of the splits generated on), the
    validation batches' latencies and the generations kept; the per-class reports go to the progress."""
    splits, model, task = run.evaluation, run.model, run.task
    val, val_report, val_latency = evaluation.evaluate(model, splits.loaders["validation"], splits.gold["validation"],
                                                       run.device, run.amp, task, run.data.label_names, dist=run.dist)
    test, test_report, _ = evaluation.evaluate(model, splits.loaders["test"], splits.gold["test"], run.device, run.amp,
                                               task, run.data.label_names, dist=run.dist)
    if val_report or test_report:
        progress.reports[str(progress.epoch)] = {"validation": val_report, "test": test_report}
    generated = {}
    for split, metrics in (("validation", val), ("test", test)):
        if split in splits.generators:
            scores, generated[split] = splits.generators[split].run(model, run.device, run.amp, run.dist)
            metrics.update(scores)
    return val, test, val_latency, generated


def epoch_row(epoch: int, step: int, train_loss: float, val: dict, test: dict) -> dict:
    row = {"epoch": epoch, "step": step, "train_loss": train_loss}
    row.update({f"validation/{k}": v for k, v in val.items()})
    row.update({f"test/{k}": v for k, v in test.items()})
    return row


def _keep_if_best(run: Run, state: TrainingState, row: dict, val: dict) -> None:
    """A better epoch becomes the best: its row, and a copy of its trainable state (written to the
    checkpoint folder too when checkpointing); otherwise one more stale epoch."""
    progress = state.progress
    if progress.best is None or is_better(run.monitor, val[run.monitor], progress.best[f"validation/{run.monitor}"]):
        progress.best, progress.best_epoch, progress.stale_epochs = row, row["epoch"], 0
        state.best_state = {n: p.detach().clone() for n, p in checkpoint.trainable_state(run.model).items()}
        if run.checkpoint_every and run.is_main:
            checkpoint.save_best(run.checkpoint_dir, state.best_state, row["epoch"])
    else:
        progress.stale_epochs += 1


def _decide_whether_done(run: Run, progress: Progress, epoch: int) -> None:
    tcfg = run.cfg.trainer
    patience = tcfg.get("patience")
    if progress.step >= run.schedule.total_steps or epoch >= tcfg.epochs:
        progress.training_done = True
    elif patience and progress.stale_epochs >= patience:
        progress.training_done = progress.stopped_early = True
        run.say(f"[lora_lab] stopping early: validation {run.monitor} has not improved for {patience} epochs")
