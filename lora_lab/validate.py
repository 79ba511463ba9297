"""Bad input caught before anything is loaded or trained: one line naming the key and the problem."""
from __future__ import annotations


def check_config(cfg) -> None:
    """Types and ranges of the keys a run reads; raises ConfigError."""


def check_data(cfg, data) -> None:
    """What can only be checked once the data is loaded (sizes, classes); raises ConfigError."""
