"""The ``lora-lab`` command: one Hydra app that trains one configuration (or a multirun of them).

    lora-lab                                   # LoRA r=8 on the embedded default
    lora-lab method=full trainer.epochs=3      # any key is an override
    lora-lab -m method=lora method.r=1,8,64 seed=0,1,2
    lora-lab experiment=compare                # the default method comparison (a multirun)
    lora-lab hydra.searchpath=[file:///abs/my_conf] method=my_method   # your own config folders
"""
from __future__ import annotations

import errno
import gc
import math
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_lab.config.compose import CONFIG_PATH
from lora_lab.config.run_identity import SWEPT_ENV, differences, run_hash, swept_keys
from lora_lab.config.validate import check_config
from lora_lab.data.loading import check_files
from lora_lab.errors import ConfigError, first_line
from lora_lab.methods import build_method, describe_method
from lora_lab.runtime import records
from lora_lab.runtime.checkpoint import CHECKPOINT_DIR, peek_progress
from lora_lab.runtime.distributed import Distributed, adopt_submitit_environment
from lora_lab.runtime.distributed import setup as setup_distributed
from lora_lab.runtime.environment import apply_environment_defaults
from lora_lab.runtime.preemption import Preempted, StopRequests
from lora_lab.runtime.run_lock import DEFAULT_STALE_AFTER, RunLock, describe_owner
from lora_lab.runtime.run_log import LOG_FILE, RunLog
from lora_lab.runtime.tracking import Tracker, file_tracker
from lora_lab.tasks.task_types import main_metric, objective
from lora_lab.trainer.loop import Diverged
from lora_lab.trainer.train import run_checked_training

apply_environment_defaults()


def run_name(cfg) -> str:
    """The W&B run's name: ``<method tag>-s<seed>-<hash>``, the hash of the run's result config
    (``run_identity.run_hash``), as in the name of a run folder Hydra names itself."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return f"{describe_method(cfg.method).run_tag()}-s{cfg.seed}-{run_hash(config)}"


def say_run_folder(run_dir: Path) -> None:
    print(f"[lora_lab] run folder: {run_dir}", flush=True)


def discard_unused_run_dir(run_dir: Path) -> None:
    """Bad input and dry runs leave no run folder. Hydra made it (with its ``.hydra`` files and job log)
    before the command ran; it is removed when it holds nothing else, so a folder with a run in it stays."""
    hydra_files = {".hydra", f"{HydraConfig.get().job.name}.log", LOG_FILE}
    if run_dir.is_dir() and all(path.name in hydra_files for path in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def resolved_or_raw(cfg: DictConfig) -> dict:
    """The config as completed runs record it (resolved), unless resolving is what failed."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - e.g. a bad interpolation: keep it as written
        return OmegaConf.to_container(cfg, resolve=False)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)  # a full disk or quota, a failing one


def error_kind(error: BaseException) -> str:
    if isinstance(error, (ConfigError, OmegaConfBaseException)):
        return "config"
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        return "disk"
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":  # torch.cuda's
        return "out_of_memory"
    return "exception"


def completed_record(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The completed record already in ``run_dir`` for this same config, if any. A completed run of
    another config there is refused: its results would otherwise be overwritten or mistaken."""
    path = run_dir / records.RECORD_FILE
    if not path.exists():
        return None
    record = records.load_record(run_dir, require_completed=False)  # refuses a damaged or unknown record
    if record.get("status") != "completed":
        return None
    changed = differences(record.get("config") or {}, OmegaConf.to_container(cfg, resolve=True))
    if changed:
        raise ConfigError("hydra.run.dir", str(run_dir), "holds a completed run of another config; differing "
                          "keys: " + "; ".join(changed) + " (choose another directory)")
    return record


def train_and_record(cfg: DictConfig, run_dir: Path, multirun: bool, sweep_name: str | None = None,
                     wandb_run=None) -> float:
    """Run one job. A completed run of the same config in ``run_dir`` is skipped; an interrupted one
    resumes from its checkpoint. Any failure is written to the run record; in a multirun the sweep
    carries on, except after a stop signal (the whole process is being stopped).
    ``wandb_run``: a W&B run that already exists (a W&B sweep's trial) to log into.
    Returns the objective a sweeper maximises: the best epoch's validation main metric, negated for a
    metric that is better lower (perplexity), as ``lora_lab.tasks.task_types.objective`` says."""
    tracker, stop, dist, lock, log = None, StopRequests(), Distributed(), None, RunLog(run_dir / LOG_FILE)
    started = bad_input = False
    try:
        check_config(cfg)  # the run's one check: before W&B starts or anything is loaded
        dist = setup_distributed(cfg.trainer.device)  # under torchrun: join the run's process group
        lock, notes = take_run_lock(cfg, run_dir, multirun) if dist.is_main else (None, [])  # rank 0 owns the folder
        if not dist.broadcast(lock is not None):
            return math.nan  # another process trains it (exit status 0)
        if dist.is_main:
            log.__enter__()  # what the run prints goes to <run_dir>/main.log too
            for note in notes:  # a takeover of a stale lock
                print(note)
            say_run_folder(run_dir)
            started = True
        monitor = f"validation/{main_metric(cfg.data)}"
        done = completed_record(cfg, run_dir) if cfg.trainer.get("skip_done", True) else None
        if done is not None:
            print(f"[lora_lab] already completed, skipped: {run_dir} (trainer.skip_done=false trains it again)")
            return objective(main_metric(cfg.data), float(done["best"][monitor] if done["best"][monitor] is not None
                                                          else math.nan))  # null: not finite when written
        tracker = start_tracker(cfg, run_dir, dist, sweep_name, wandb_run)
        with stop:
            record = run_checked_training(cfg, run_dir, tracker, stop, dist)
        tracker.finish(exit_code=0)
        return objective(main_metric(cfg.data), float(record["best"][monitor]))
    except BaseException as error:  # noqa: BLE001 - recorded, then re-raised or reported
        kind, status, message = classify_failure(error)
        bad_input = kind == "config" and not multirun  # a sweep records it: its comparison lists the job
        if dist.is_main and not bad_input:  # bad input leaves no run folder (discard_unused_run_dir)
            record_failure(cfg, run_dir, kind, status, message)
        release_memory()  # e.g. after CUDA out of memory, so the sweep's next job starts clean
        if tracker is not None:
            if kind == "preempted":
                tracker.mark_preempting()
            tracker.finish(exit_code=getattr(error, "exit_code", 130) if kind in ("preempted", "interrupted") else 1)
        return report_failure(error, kind, status, message, run_dir, multirun, stop)
    finally:
        if started and not bad_input:
            say_run_folder(run_dir)
        log.__exit__(None, None, None)
        if lock is not None:
            lock.release()
        if bad_input and dist.is_main:
            discard_unused_run_dir(run_dir)


def start_tracker(cfg: DictConfig, run_dir: Path, dist: Distributed, sweep_name: str | None, wandb_run) -> Tracker:
    """Where the run logs: nowhere on ranks but the first, the run folder (logger=csv, tensorboard), the
    W&B sweep's trial, or a W&B run of its own (resumed with the checkpoint's run id)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if not dist.is_main:
        return Tracker(None)
    if cfg.logger.get("backend", "wandb") != "wandb":
        return file_tracker(cfg.logger.backend, run_dir)
    if wandb_run is not None:  # the sweep groups its trials
        return Tracker.attach(wandb_run, config, name=run_name(cfg))
    previous = peek_progress(run_dir / CHECKPOINT_DIR) if cfg.trainer.get("resume", True) else None
    return Tracker.start(config, mode=cfg.logger.mode, project=cfg.logger.project, entity=cfg.logger.get("entity"),
                         name=run_name(cfg), group=cfg.logger.get("group") or sweep_name, tags=cfg.logger.get("tags"),
                         directory=run_dir, run_id=(previous or {}).get("wandb_run_id"))


def classify_failure(error: BaseException) -> tuple[str, str, str]:
    """The failure's ``error_kind``, the record's ``status`` and the message of its one line."""
    kind = {Preempted: "preempted", Diverged: "diverged", KeyboardInterrupt: "interrupted"}.get(
        type(error), None) or error_kind(error)
    if kind == "preempted" and error.interrupted:  # Ctrl-C: checkpointed like a preemption
        kind = "interrupted"
    status = kind if kind in ("preempted", "diverged", "interrupted") else "failed"
    message = str(error) if kind == "config" else f"{type(error).__name__}: {error}"
    if kind == "disk":  # every write is atomic: the last checkpoint and files are whole
        message += "; the last checkpoint is intact: free space, then the same command resumes from it"
    return kind, status, message


def record_failure(cfg: DictConfig, run_dir: Path, kind: str, status: str, message: str) -> None:
    """The record of a run that did not complete (strict JSON), with the traceback being handled."""
    failed, _ = records.non_finite_to_null({
        "schema_version": records.SCHEMA_VERSION, "status": status, "error": first_line(message),
        "error_kind": kind, "traceback": traceback.format_exc(), "config": resolved_or_raw(cfg)})
    try:
        records.write_json(run_dir / records.RECORD_FILE, failed)
    except OSError as write_error:  # the disk is still full: the previous record stays
        print(f"lora-lab: the failed run's record could not be written either ({first_line(write_error)})",
              file=sys.stderr)


def report_failure(error: BaseException, kind: str, status: str, message: str, run_dir: Path, multirun: bool,
                   stop: StopRequests) -> float:
    """One line on stderr, then the exit status that says what happened; in a multirun the sweep goes
    on (NaN for the sweeper) unless a stop signal came. An unexpected exception is raised again."""
    if kind == "interrupted":  # Ctrl-C: one line, no traceback, the shell's status for it
        print(f"lora-lab: {error}" if isinstance(error, Preempted) else
              "lora-lab: interrupted (Ctrl-C twice: no checkpoint written now; the same command resumes from "
              "the last one)", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    if kind == "preempted":
        print(f"lora-lab: {error}", file=sys.stderr)
        stop.pass_on(error.signum)  # e.g. a launcher's requeue
        sys.exit(error.exit_code)
    label = "diverged" if kind == "diverged" else "error"
    print(f"lora-lab: {label}: {first_line(message)}", file=sys.stderr)
    if multirun:
        print(f"lora-lab: job {status}, recorded in {run_dir / records.RECORD_FILE}; the sweep goes on",
              file=sys.stderr)
        return math.nan
    if kind == "config":
        sys.exit(2)
    if kind in ("diverged", "out_of_memory", "disk"):
        sys.exit(1)
    raise error


def take_run_lock(cfg: DictConfig, run_dir: Path, multirun: bool) -> tuple[RunLock | None, list[str]]:
    """The run folder's lock (lora_lab.runtime.run_lock) and the line of a takeover, if any; None,
    after one line naming its owner, when another live process holds it."""
    notes: list[str] = []
    lock = RunLock.acquire(run_dir, float(cfg.trainer.get("lock_stale_after", DEFAULT_STALE_AFTER)), say=notes.append)
    if lock is None:
        owner = RunLock.owner_of(run_dir)
        print(f"[lora_lab] {'skipped' if multirun else 'not started'}: {run_dir} is in use by "
              f"{describe_owner(owner) if owner else 'another process'}")
    return lock, notes


def plan_job(cfg: DictConfig, run_dir: Path) -> float:
    """``dry_run=true``: resolve and validate the job's config without loading a model or data, and
    print one line saying what would run. Returns NaN (no metric)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)  # fails on a bad interpolation
    check_config(cfg)
    method = build_method(cfg.method)
    metric = main_metric(cfg.data)
    if cfg.data.source == "files":
        check_files(cfg.data)
    data, t = resolved["data"], resolved["trainer"]
    task = "/".join(str(x) for x in (data.get("path") or data["name"], data.get("subset")) if x)
    print(f"[dry run] {method.label()} | {cfg.model.name} | {task} | lr {t['lr']:g}, batch "
          f"{t['batch_size']}, {t['epochs']} epochs, max length {data['max_length']}, main metric {metric} | "
          f"seed {cfg.seed} -> {run_dir}{_state_note(cfg, run_dir, peek_progress(run_dir / CHECKPOINT_DIR))}")
    return math.nan


def _state_note(cfg: DictConfig, run_dir: Path, progress: dict | None) -> str:
    """What a real run would do with what ``run_dir`` already holds."""
    if cfg.trainer.get("skip_done", True) and completed_record(cfg, run_dir) is not None:
        return " (completed: skipped)"
    if progress and cfg.trainer.get("resume", True):
        return f" (resumes at step {progress['step']})"
    return ""


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def app(cfg: DictConfig) -> float:
    adopt_submitit_environment()  # launcher=slurm_ddp: one job, several tasks, one DDP run
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.get("dry_run"):
        try:
            return plan_job(cfg, run_dir)
        except ConfigError as error:
            print(f"lora-lab: error: {error}", file=sys.stderr)
            if multirun:
                return math.nan
            sys.exit(2)
        finally:
            discard_unused_run_dir(run_dir)
    # W&B groups a sweep's runs: a Hydra multirun by its directory's name, a W&B sweep by its id
    sweep_name = Path(hydra_cfg.sweep.dir).name if multirun else os.environ.get("WANDB_SWEEP_ID")
    return train_and_record(cfg, run_dir, multirun, sweep_name)


def hydra_error_line(error: Exception) -> str:
    """Hydra's multi-line report of a bad override or config choice, as one line."""
    line = first_line(error).rstrip(".")
    # a resolver's own one-line ConfigError (e.g. ${pick:} with an lr_step outside the grid) says it all
    line = line.removeprefix("ConfigError raised while resolving interpolation: ")
    override = getattr(error, "override", None)  # an override that could not be parsed
    if override and override not in line:
        line = f"{override}: {line}"
    cause = error.__cause__
    if cause is not None and first_line(cause) not in line:
        line += f": {first_line(cause)}"
    options = getattr(error, "options", None)
    if options:
        line += f" (options: {', '.join(options)})"
    return line


RANK_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def main() -> None:
    """Hydra's own errors (unknown keys, unknown config choices, override syntax) are bad input: one
    line and exit 2, like every other bad input. HYDRA_FULL_ERROR=1 keeps Hydra's full report."""
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun's other ranks: rank 0 alone writes Hydra's files
        sys.argv.extend(RANK_OVERRIDES)

    swept = swept_keys(sys.argv[1:])  # a sweep job's folder names the values of these (run_identity.job_key)
    if swept:
        os.environ[SWEPT_ENV] = ",".join(swept)
    else:
        os.environ.pop(SWEPT_ENV, None)
    full_report = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing and exiting 1
    try:
        app()
    except (HydraException, OmegaConfBaseException) as error:
        if full_report:
            raise
        print(f"lora-lab: error: {hydra_error_line(error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
