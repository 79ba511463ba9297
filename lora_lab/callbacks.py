"""Hydra callbacks: print and save the comparison table when a multirun ends."""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback


class ComparisonTable(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        from lora_lab.analysis.compare import write_comparison
        from lora_lab.errors import ConfigError

        try:
            print(write_comparison(Path(config.hydra.sweep.dir)))
        except ConfigError:  # no run records, e.g. after a dry run
            pass
