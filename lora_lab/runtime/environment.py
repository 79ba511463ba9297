"""Environment variables every lora_lab command sets, unless the user set them, before libraries read them."""
from __future__ import annotations

import os

ENVIRONMENT_DEFAULTS = {"TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}


def apply_environment_defaults() -> None:
    for key, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
