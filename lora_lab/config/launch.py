"""What the launcher tells a process about its run, read from the environment."""
from __future__ import annotations

import os


def launched_world_size() -> int:
    """The number of processes ``torchrun`` started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
