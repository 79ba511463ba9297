"""The ``lora-lab-agent`` command: a W&B sweep agent that runs its trials in this one process.

    wandb sweep experiments/wandb_sweep/sweep.yaml              # prints the sweep id
    lora-lab-agent <entity>/<project>/<sweep id> --count 20     # trials run here, one after another
    lora-lab-agent <sweep id> -- data.max_train=2000 logger.mode=online   # fixed overrides for every trial

Each trial's parameters (``trainer.lr``, ``method.r``, ...) become Hydra overrides of the same app
``lora-lab`` runs, composed with the overrides given after ``--``; the trial trains through the same
code path, logs into the run the agent started and leaves the usual run record. The imports are paid
once per agent, not once per trial as with ``wandb agent`` launching a new process each time.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lora_lab.cli.main import train_and_record
from lora_lab.config.compose import compose
from lora_lab.runtime.environment import apply_environment_defaults


def override_value(value) -> str:
    """A W&B config value as Hydra override syntax."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return str(value)


def trial_overrides(params: dict) -> list[str]:
    """Hydra overrides from a trial's parameters; W&B's own keys (``_wandb``) are left out."""
    return [f"{key}={override_value(value)}" for key, value in params.items() if not key.startswith("_")]


def run_trial(params: dict, fixed: list[str], wandb_run=None, sweep_id: str | None = None) -> float:
    """Compose ``fixed`` + the trial's overrides, train, record. Returns the monitored validation
    metric of the best epoch (NaN when the trial failed; its record says why)."""
    overrides = [*fixed, *trial_overrides(params)]
    try:
        full = compose("train", overrides, return_hydra_config=True)
    except Exception as error:  # noqa: BLE001 - Hydra's own messages for unknown keys and groups
        print(f"lora-lab-agent: error: {overrides}: {error}", file=sys.stderr)
        return math.nan
    run_dir = Path(str(full.hydra.run.dir))
    cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    return train_and_record(cfg, run_dir, multirun=True, sweep_name=sweep_id, wandb_run=wandb_run)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fixed: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, fixed = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="lora-lab-agent", description=__doc__.split("\n\n")[0],
                                     epilog="Overrides after -- apply to every trial.")
    parser.add_argument("sweep_id", help="the sweep id, or entity/project/id as `wandb sweep` prints it")
    parser.add_argument("--count", type=int, default=None, help="trials to run (default: until the sweep ends)")
    parser.add_argument("--project", default=None)
    parser.add_argument("--entity", default=None)
    args = parser.parse_args(argv)
    if args.count is not None and args.count <= 0:
        parser.error(f"--count={args.count}: must be a positive number of trials")


    apply_environment_defaults()
    import wandb

    sweep_id = args.sweep_id.rsplit("/", 1)[-1]

    def trial() -> None:
        run = wandb.init()
        run_trial(dict(run.config), fixed, wandb_run=run, sweep_id=sweep_id)

    wandb.agent(args.sweep_id, function=trial, count=args.count, project=args.project, entity=args.entity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
