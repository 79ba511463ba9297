"""Where the configs live and how code outside a Hydra app composes them.

The configs ship inside the package as ``lora_lab.conf`` (the repository's ``conf/`` folder), so an
installed lora_lab finds them from any directory. Users add folders of their own with Hydra's search
path: ``lora-lab hydra.searchpath=[file:///abs/path/my_conf] method=my_method``.
"""
from __future__ import annotations

from contextlib import nullcontext

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from lora_lab.config.run_identity import register_resolvers
from lora_lab.errors import ConfigError

register_resolvers()  # ${run_key:} and ${sweep_key:} name the output directories


def pick(grid, step):
    """``${pick:${method.lr_grid},${lr_step}}``: one value of a method's own grid, so a sweep over
    steps gives every method its own range (a linear head wants far higher learning rates than
    full fine-tuning)."""
    values = list(grid)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < len(values):
        raise ConfigError("lr_step", step, f"must be an index into the grid {values} (0..{len(values) - 1})")
    return values[step]


OmegaConf.register_new_resolver("pick", pick, replace=True)
# ${join:${method.targets}} -> "q+v", used in sweep presets' job directory names
OmegaConf.register_new_resolver("join", lambda items: "+".join(map(str, items)), replace=True)

CONFIG_MODULE = "lora_lab.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"


def compose(config_name: str = "train", overrides=(), return_hydra_config: bool = False) -> DictConfig:
    """Compose a config as the command line would. Inside a running Hydra app this uses the app's
    search path (so users' config folders count); elsewhere the packaged configs."""
    context = (nullcontext() if GlobalHydra.instance().is_initialized()
               else initialize_config_module(CONFIG_MODULE, version_base="1.3"))
    with context:
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def arm_method(arm: str, overrides=()) -> DictConfig:
    """The method config of an arm (``conf/arm/<arm>.yaml``: a method with its size)."""
    return compose("train", [f"arm={arm}", *overrides]).method
