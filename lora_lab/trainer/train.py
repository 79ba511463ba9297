"""Training one configuration, read top to bottom:

    set up (seed, device, tokenizer, data, model, method, loaders, optimiser, scheduler: trainer.setup)
    -> start fresh or resume from the run's checkpoint (trainer.checkpointing)
    -> train with AdamW + linear warm-up/decay, checkpointing every N steps (trainer.loop); every epoch
       ends with evaluation on validation and test, keeping the best epoch's state (trainer.epoch_end)
    -> save it, its ΔW and the run record, with the measurements (trainer.finish).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from lora_lab.config.validate import check_config
from lora_lab.runtime import checkpoint, sharding
from lora_lab.runtime.distributed import Distributed
from lora_lab.runtime.distributed import setup as setup_distributed
from lora_lab.runtime.preemption import StopRequests
from lora_lab.runtime.tracking import Tracker
from lora_lab.trainer.checkpointing import start_or_resume
from lora_lab.trainer.finish import finish
from lora_lab.trainer.loop import train_until_done
from lora_lab.trainer.setup import describe_run, set_up


def run_training(cfg, run_dir: Path, tracker: Tracker | None = None, stop: StopRequests | None = None,
                 dist: Distributed | None = None) -> dict:
    """Check the configuration (ConfigError on a bad one), train it and write its run record into
    ``run_dir``. Returns the record.

    With ``trainer.checkpoint_every`` > 0 a checkpoint is written every that many steps and at the end
    of every epoch, and a checkpoint found in ``run_dir`` is resumed from (``trainer.resume``).
    Under ``torchrun`` every rank runs this; rank 0 alone writes files and logs (lora_lab.runtime.distributed)."""
    check_config(cfg)
    return run_checked_training(cfg, run_dir, tracker, stop, dist)


def run_checked_training(cfg, run_dir: Path, tracker: Tracker | None = None, stop: StopRequests | None = None,
                         dist: Distributed | None = None) -> dict:
    """``run_training`` for a configuration already checked with ``check_config`` (the ``lora-lab``
    command checks it before it starts W&B)."""
    tracker = tracker or Tracker(None)
    stop = stop or StopRequests()
    dist = dist or setup_distributed(cfg.trainer.device)
    run = set_up(cfg, Path(run_dir), dist)
    state, resumed_from = start_or_resume(run, tracker)
    info = describe_run(run, state.progress, tracker)
    state.segment_start = time.perf_counter()
    if resumed_from is not None:  # last: setting up drew random numbers (model init, method init)
        checkpoint.restore_rng(resumed_from, dist.rank)
    train_until_done(run, state, tracker, stop)
    throughput_ranks = dist.gather(state.throughput.state())
    if run.dist.sharded:  # the end of the run (rank 0) works on an unsharded copy of the trained model
        run.optimizer.zero_grad(set_to_none=True)  # room for that copy: gradients and moments are done with
        run.optimizer.state.clear()
        if state.best_state is not None:
            state.best_state = sharding.gathered(state.best_state, torch.device("cpu"), keep=dist.is_main)
        whole = sharding.materialise(run.model, run.shell, run.device, keep=dist.is_main)
        run = replace(run, model=whole, train_model=whole, trainable=[]) if dist.is_main else run
    record = finish(run, state, info, tracker, throughput_ranks) if dist.is_main else None
    return dist.broadcast(record)  # every rank returns rank 0's record (e.g. to a Hydra sweeper)
