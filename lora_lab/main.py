"""The ``lora-lab`` command: one Hydra app that trains one configuration (or a multirun of them).

    lora-lab                                   # LoRA r=8 on the embedded default
    lora-lab method=full trainer.epochs=3      # any key is an override
    lora-lab -m method=lora method.r=1,8,64 seed=0,1,2
    lora-lab experiment=compare                # the default method comparison (a multirun)
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
from lora_lab.errors import ConfigError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")


def run_name(cfg) -> str:
    m = cfg.method
    size = {"lora": lambda: f"r{m.r}", "adapter": lambda: f"{m.variant}",
            "head": lambda: f"top{m.top_layers}" if m.top_layers else ""}.get(m.name, lambda: "")()
    return "-".join(x for x in (m.name, size, f"s{cfg.seed}") if x)


def train_and_record(cfg: DictConfig, run_dir: Path, multirun: bool, sweep_name: str | None = None) -> float:
    """Run one job. Any failure is written to the run record; in a multirun the sweep carries on."""
    from lora_lab.tracking import Tracker
    from lora_lab.train import run_training

    tracker = None
    try:
        tracker = Tracker.start(
            OmegaConf.to_container(cfg, resolve=True), mode=cfg.logger.mode, project=cfg.logger.project,
            entity=cfg.logger.get("entity"), name=run_name(cfg), group=cfg.logger.get("group") or sweep_name,
            tags=cfg.logger.get("tags"), directory=run_dir)
        record = run_training(cfg, run_dir, tracker)
        tracker.finish(exit_code=0)
        return float(record["best"][f"validation/{cfg.trainer.monitor}"])
    except BaseException as error:  # noqa: BLE001 - recorded, then re-raised or reported
        failed = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc(), "config": OmegaConf.to_container(cfg, resolve=False)}
        records.write_json(run_dir / records.RECORD_FILE, failed)
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


CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def app(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep_name = Path(hydra_cfg.sweep.dir).name if multirun else None  # W&B groups a sweep's runs
    return train_and_record(cfg, Path(hydra_cfg.runtime.output_dir), multirun, sweep_name)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
