"""A run's checkpoints (lora_lab.runtime.checkpoint): the state a run starts from, fresh or resumed
(``trainer.resume``), and writing it every ``trainer.checkpoint_every`` steps and at every epoch's end."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from lora_lab.runtime import checkpoint, measure
from lora_lab.runtime.tracking import Tracker
from lora_lab.trainer.evaluation import baseline
from lora_lab.trainer.progress import Progress, TrainingState
from lora_lab.trainer.setup import Run


def start_or_resume(run: Run, tracker: Tracker) -> tuple[TrainingState, checkpoint.Checkpoint | None]:
    """The state training starts from, and the checkpoint it was resumed from (None: a fresh start),
    whose random number generator states are restored last (``checkpoint.restore_rng``). With
    ``trainer.resume=false`` a checkpoint in the run directory is deleted instead."""
    if run.is_main:
        checkpoint.discard_partial_writes(run.run_dir, run.checkpoint_dir)
    state = TrainingState(Progress(), measure.Throughput(run.cfg.trainer.throughput_warmup_steps, run.device),
                          measure.PeakMemory(run.device))
    saved = checkpoint.load(run.checkpoint_dir) if run.cfg.trainer.get("resume", True) else None
    if saved is not None:
        _resume(run, state, saved)
    elif run.checkpoint_dir.exists() and run.is_main:
        shutil.rmtree(run.checkpoint_dir)  # trainer.resume=false: start over
    run.dist.barrier()  # nobody goes on while rank 0 may still be clearing the run directory
    progress = state.progress
    progress.wandb_run_id = progress.wandb_run_id or tracker.run_id
    if run.task.head == "lm":
        progress.baseline = progress.baseline or run.pretrained_baseline
    else:
        progress.baseline = baseline(run.task, run.evaluation.gold["test"], run.data.label_names)
    return state, saved


def _resume(run: Run, state: TrainingState, saved: checkpoint.Checkpoint) -> None:
    checkpoint.check_config(saved, run.result_config)
    checkpoint.restore(saved, run.model, run.optimizer, run.scheduler, run.dist)
    progress = state.progress = Progress.from_dict(saved.progress)
    state.epoch_losses = saved.tensors["progress/epoch_losses"].tolist()
    if run.scaler and progress.grad_scaler:
        run.scaler.load_state_dict(progress.grad_scaler)
    if progress.throughput:
        own = (progress.throughput_ranks or [progress.throughput])[run.dist.rank]
        state.throughput.restore(own, saved.tensors["progress/step_seconds"].tolist())
    if progress.best_epoch is not None:
        best = checkpoint.load_best(run.checkpoint_dir, saved, run.model, run.dist)
        state.best_state = {name: tensor.to(run.device) for name, tensor in best.items()}
    progress.resumes.append({"step": progress.step, "epoch": progress.epoch})
    run.say(f"[lora_lab] resuming from {saved.path}: step {progress.step} of {run.schedule.total_steps} "
            f"(epoch {progress.epoch}, batch {progress.batch})")


def write_checkpoint(run: Run, state: TrainingState) -> Path | None:
    """Every rank takes part (each one's RNG state is saved; under fsdp each writes its shards); rank 0
    writes the checkpoint's file. The time it takes counts
    as checkpoint time, not training time. Returns the file written (None on other ranks)."""
    progress = state.progress
    started = state.count_training_time()
    progress.throughput = state.throughput.state()
    progress.grad_scaler = run.scaler.state_dict() if run.scaler else None
    rng_states = run.dist.gather(checkpoint.rng_state())
    shards = checkpoint.write_shards(run.checkpoint_dir, run.model, run.optimizer, run.dist)  # fsdp: every rank
    if run.dist.enabled:
        progress.throughput_ranks = run.dist.gather(state.throughput.state())
    path = None
    if run.is_main:
        series = {"epoch_losses": torch.tensor(state.epoch_losses, dtype=torch.float64),
                  "step_seconds": torch.tensor(state.throughput.step_times, dtype=torch.float64)}
        saved = progress.to_dict()
        path = checkpoint.save(run.checkpoint_dir, run.model, run.optimizer, run.scheduler, run.result_config,
                               saved, series, rng_states, shards)
        checkpoint.drop_stale_best(run.checkpoint_dir, saved)
        checkpoint.drop_stale_shards(run.checkpoint_dir, shards)
    run.dist.barrier()  # a rank that stops next must not end the launch while rank 0 writes
    state.segment_start = time.perf_counter()
    progress.checkpoint_seconds += state.segment_start - started
    progress.checkpoints_written += 1
    return path
