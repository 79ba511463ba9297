"""Hydra callbacks: print and save the comparison table when a multirun ends; a dry run's sweep
folder is removed again."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from lora_lab.analysis.compare import write_comparison
from lora_lab.errors import ConfigError
from lora_lab.runtime.records import find_run_dirs


class ComparisonTable(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        if int(os.environ.get("RANK", "0")) != 0:  # a multirun under torchrun: every rank ran it, rank 0 reports
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if config.get("dry_run"):
            # the jobs removed their folders; Hydra's multirun.yaml alone would leave an empty-looking sweep
            if sweep_dir.is_dir() and all(path.name == "multirun.yaml" for path in sweep_dir.iterdir()):
                shutil.rmtree(sweep_dir, ignore_errors=True)
            return
        if not find_run_dirs(sweep_dir):  # no run records, e.g. after a dry run
            return
        try:
            print(write_comparison(sweep_dir))
            print(f"[lora_lab] runs and comparison.md in {sweep_dir} (the same command finds them again)")
        except ConfigError as error:  # a record the comparison refuses: say which, the sweep itself is done
            print(f"lora-lab: comparison not written: {error}", file=sys.stderr)
