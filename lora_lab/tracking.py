"""Weights & Biases tracking behind a small interface, so the trainer never touches wandb directly.

mode "auto" means online when an API key is configured (WANDB_API_KEY or a netrc entry), else
offline (runs land in ./wandb/offline-run-* under the run directory; `wandb sync` uploads them).
"disabled" logs nothing. A tracker always finishes, also when training raises.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


class Tracker:
    def __init__(self, run=None):
        self.run = run

    @classmethod
    def start(cls, config: dict, mode: str = "auto", project: str = "lora_lab", name: str | None = None,
              group: str | None = None, tags=None, directory: str | Path | None = None,
              entity: str | None = None, job_type: str | None = None) -> "Tracker":
        mode = resolve_mode(mode)
        if mode == "disabled":
            return cls(None)
        import wandb

        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=project, entity=entity, name=name, group=group, tags=list(tags or []),
                         config=config, mode=mode, job_type=job_type, dir=str(directory) if directory else None,
                         reinit="finish_previous")
        return cls(run)

    @classmethod
    def attach(cls, run, config: dict, name: str | None = None) -> "Tracker":
        """Log into a run that already exists, e.g. the one a W&B sweep agent started for a trial
        (the sweep groups its runs): the trial's parameters stay, the resolved config is added."""
        run.config.update({k: v for k, v in config.items() if k not in run.config}, allow_val_change=True)
        if name:
            run.name = f"{name}-{run.id}"
        return cls(run)

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_image(self, key: str, path: str | Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
