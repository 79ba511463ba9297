"""Hydra callbacks: print and save the comparison table when a multirun ends."""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback


class ComparisonTable(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        from analysis.compare import write_comparison
        from lora_lab.records import find_run_dirs

        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.exists() and find_run_dirs(sweep_dir):  # a dry run leaves no records
            print(write_comparison(sweep_dir))
