"""Runs ``lora-lab`` and SIGKILLs its own process at a chosen point, to test resuming.

    python tests/crash_driver.py POINT N [hydra overrides ...]

POINT: ``step`` (inside the N-th training step, after backward, before the update), ``checkpoint_write``
(half-way through writing the N-th checkpoint file), ``eval`` (inside the N-th evaluation), ``best``
(right after the N-th best-epoch state is written, before the checkpoint naming it), ``finish``
(after the final trainable state is written, before W0's fingerprints and the record); ``slow`` does not crash,
it adds 0.2 s to every step so that a signal sent from outside lands mid-run; ``faults`` does not
kill either: in a multirun the job with ``seed=1`` gets a NaN loss and the job with ``seed=2`` raises,
both at its N-th training step.
"""
from __future__ import annotations

import os
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, n: int) -> None:
    import torch

    from lora_lab.runtime import checkpoint, records
    from lora_lab.trainer import evaluation

    calls = {"count": 0}

    def nth() -> bool:
        calls["count"] += 1
        return calls["count"] == n

    if point == "step":
        original = torch.nn.utils.clip_grad_norm_

        def clip(*args, **kwargs):
            if nth():
                die()
            return original(*args, **kwargs)

        torch.nn.utils.clip_grad_norm_ = clip
    elif point == "slow":  # not a crash: 0.2 s more per step, so that a signal from outside lands mid-run
        import time

        original_clip = torch.nn.utils.clip_grad_norm_

        def slow_clip(*args, **kwargs):
            time.sleep(0.2)
            return original_clip(*args, **kwargs)

        torch.nn.utils.clip_grad_norm_ = slow_clip
    elif point == "faults":  # not a kill: the job with seed=1 gets a NaN loss at step n, seed=2 raises there
        from hydra.core.hydra_config import HydraConfig

        original_forward = torch.nn.CrossEntropyLoss.forward
        counts: dict[str, int] = {}

        def forward(self, *args, **kwargs):
            loss = original_forward(self, *args, **kwargs)
            job = "seed=1" if "seed=1" in HydraConfig.get().overrides.task else \
                "seed=2" if "seed=2" in HydraConfig.get().overrides.task else None
            if job and torch.is_grad_enabled():
                counts[job] = counts.get(job, 0) + 1
                if counts[job] == n and job == "seed=1":
                    return loss * float("nan")
                if counts[job] == n and job == "seed=2":
                    raise RuntimeError("injected failure")
            return loss

        torch.nn.CrossEntropyLoss.forward = forward
    elif point == "checkpoint_write":
        original_save = records.save_file

        def save_file(tensors, path, metadata=None):
            if ".last.safetensors." in str(path) and nth():
                original_save(tensors, path, metadata=metadata)
                size = os.path.getsize(path)
                with open(path, "r+b") as f:
                    f.truncate(size // 2)
                die()
            return original_save(tensors, path, metadata=metadata)

        records.save_file = save_file
    elif point == "eval":
        original_eval = evaluation.evaluate

        def evaluate(*args, **kwargs):
            if nth():
                die()
            return original_eval(*args, **kwargs)

        evaluation.evaluate = evaluate
    elif point == "best":
        original_best = checkpoint.save_best

        def save_best(*args, **kwargs):
            original_best(*args, **kwargs)
            if nth():
                die()

        checkpoint.save_best = save_best
    elif point == "finish":  # the best state written, the record not yet
        def base_fingerprints(*args, **kwargs):
            die()

        records.base_fingerprints = base_fingerprints
    else:
        raise SystemExit(f"unknown point {point!r}")


if __name__ == "__main__":
    point, n, *overrides = sys.argv[1:]
    arm(point, int(n))
    from lora_lab.cli.main import main

    sys.argv = ["lora-lab", *overrides]
    main()
