"""The ``lora-lab`` command: one Hydra app that trains one configuration (or a multirun of them).

    lora-lab                                   # LoRA r=8 on the embedded default
    lora-lab method=full trainer.epochs=3      # any key is an override
    lora-lab -m method=lora method.r=1,8,64 seed=0,1,2
    lora-lab experiment=compare                # the default method comparison (a multirun)
    lora-lab hydra.searchpath=[file:///abs/my_conf] method=my_method   # your own config folders
"""
from __future__ import annotations

import math
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lora_lab import records
from lora_lab.configs import CONFIG_PATH
from lora_lab.errors import ConfigError
from lora_lab.methods import build_method, describe_method

ENVIRONMENT_DEFAULTS = {"TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}


def apply_environment_defaults() -> None:
    for key, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)


apply_environment_defaults()
# ${join:${method.targets}} -> "q+v", used in sweep presets' job directory names
OmegaConf.register_new_resolver("join", lambda items: "+".join(map(str, items)), replace=True)


def run_name(cfg) -> str:
    return f"{describe_method(cfg.method).run_tag()}-s{cfg.seed}"


def resolved_or_raw(cfg: DictConfig) -> dict:
    """The config as completed runs record it (resolved), unless resolving is what failed."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - e.g. a bad interpolation: keep it as written
        return OmegaConf.to_container(cfg, resolve=False)


def release_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_and_record(cfg: DictConfig, run_dir: Path, multirun: bool, sweep_name: str | None = None,
                     wandb_run=None) -> float:
    """Run one job. Any failure is written to the run record; in a multirun the sweep carries on.
    ``wandb_run``: a W&B run that already exists (a W&B sweep's trial) to log into."""
    from lora_lab.tracking import Tracker
    from lora_lab.train import run_training

    tracker = None
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
        if wandb_run is not None:  # the sweep groups its trials
            tracker = Tracker.attach(wandb_run, config, name=run_name(cfg))
        else:
            tracker = Tracker.start(
                config, mode=cfg.logger.mode, project=cfg.logger.project, entity=cfg.logger.get("entity"),
                name=run_name(cfg), group=cfg.logger.get("group") or sweep_name, tags=cfg.logger.get("tags"),
                directory=run_dir)
        record = run_training(cfg, run_dir, tracker)
        tracker.finish(exit_code=0)
        return float(record["best"][f"validation/{cfg.trainer.monitor}"])
    except BaseException as error:  # noqa: BLE001 - recorded, then re-raised or reported
        failed = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc(), "config": resolved_or_raw(cfg)}
        records.write_json(run_dir / records.RECORD_FILE, failed)
        release_memory()  # e.g. after CUDA out of memory, so the sweep's next job starts clean
        if tracker is not None:
            tracker.finish(exit_code=1)
        if isinstance(error, KeyboardInterrupt):
            raise
        message = str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"
        print(f"lora-lab: error: {message}", file=sys.stderr)
        if multirun:
            print(f"lora-lab: job failed, recorded in {run_dir / records.RECORD_FILE}; the sweep goes on",
                  file=sys.stderr)
            return math.nan
        if isinstance(error, ConfigError):
            sys.exit(2)
        raise


def plan_job(cfg: DictConfig, run_dir: Path) -> float:
    """``dry_run=true``: resolve and validate the job's config without loading a model or data, and
    print one line saying what would run. Returns NaN (no metric)."""
    from lora_lab.data import check_files, is_regression
    from lora_lab.metrics import check_monitor

    resolved = OmegaConf.to_container(cfg, resolve=True)  # fails on a bad interpolation
    method = build_method(cfg.method)
    check_monitor(cfg.trainer.monitor, is_regression(cfg.data))
    if cfg.data.source == "files":
        check_files(cfg.data)
    data, t = resolved["data"], resolved["trainer"]
    task = "/".join(str(x) for x in (data.get("path") or data["name"], data.get("subset")) if x)
    print(f"[dry run] {method.label()} | {cfg.model.name} | {task} | lr {t['lr']:g}, batch "
          f"{t['batch_size']}, {t['epochs']} epochs, max length {data['max_length']}, monitor {t['monitor']} | "
          f"seed {cfg.seed} -> {run_dir}")
    return math.nan


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def app(cfg: DictConfig) -> float:
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
    # W&B groups a sweep's runs: a Hydra multirun by its directory's name, a W&B sweep by its id
    sweep_name = Path(hydra_cfg.sweep.dir).name if multirun else os.environ.get("WANDB_SWEEP_ID")
    return train_and_record(cfg, run_dir, multirun, sweep_name)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
