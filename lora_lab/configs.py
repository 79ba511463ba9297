"""Where the configs live and how code outside a Hydra app composes them.

The configs ship inside the package as ``lora_lab.conf`` (the repository's ``conf/`` folder), so an
installed lora_lab finds them from any directory. Users add folders of their own with Hydra's search
path: ``lora-lab hydra.searchpath=[file:///abs/path/my_conf] method=my_method``.
"""
from __future__ import annotations

from contextlib import nullcontext

from omegaconf import DictConfig

from lora_lab.run_identity import register_resolvers

register_resolvers()  # ${run_key:} and ${sweep_key:} name the output directories

CONFIG_MODULE = "lora_lab.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"


def compose(config_name: str = "train", overrides=(), return_hydra_config: bool = False) -> DictConfig:
    """Compose a config as the command line would. Inside a running Hydra app this uses the app's
    search path (so users' config folders count); elsewhere the packaged configs."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    context = (nullcontext() if GlobalHydra.instance().is_initialized()
               else initialize_config_module(CONFIG_MODULE, version_base="1.3"))
    with context:
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def arm_method(arm: str, overrides=()) -> DictConfig:
    """The method config of an arm (``conf/arm/<arm>.yaml``: a method with its size)."""
    return compose("train", [f"arm={arm}", *overrides]).method
