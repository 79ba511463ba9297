"""What makes two runs the same run: the settings that change its results.

Output directories are named by a hash of those settings, so the same command lands in the same
directory: a run that was killed resumes there, and a sweep run again skips its completed jobs.
Settings that only change how a run is watched (logging, progress bars, checkpoint interval,
caches, launcher) are left out of the hash and out of the comparison with a checkpoint.

    hydra.run.dir:   outputs/runs/${run_key:}                  -> outputs/runs/lora-r8-s0-3fa2c1d9
    hydra.sweep.dir: outputs/multirun/${once:${sweep_key:}}    -> outputs/multirun/7c01e2aa
    hydra.sweep.subdir: ${hydra.job.num}_${job_key:}           -> 0_lora_r8_s0

``once`` keeps the value the launcher resolved on the sweep's own config for every job of the sweep
(Hydra copies resolver caches into the jobs' configs, as it does for ``${now:}``); without it each
job would hash its own overrides.
"""
from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

from lora_lab.methods import describe_method

NEUTRAL_KEYS = ("logger", "launcher", "dry_run", "data.cache_dir", "trainer.progress_bar", "trainer.log_every",
                "trainer.checkpoint_every", "trainer.keep_checkpoint", "trainer.keep_last", "trainer.skip_done",
                "trainer.resume", "trainer.threads", "trainer.latency_repeats", "trainer.lock_stale_after")


def _is_neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in NEUTRAL_KEYS)


def _drop(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if _is_neutral(path):
            continue
        out[key] = _drop(value, path + ".") if isinstance(value, dict) else value
    return out


# keys added after runs were recorded, per config section, with the value that gives what runs gave
# before the key existed
ADDED_DEFAULTS = {
    "model": {"arch": "bert", "num_kv_heads": None, "load_in_4bit": False},
    "data": {"revision": None, "prompt_column": None, "response_column": None, "prompt_template": "{prompt}\n",
             "packing": False},
    "trainer": {"warmup_steps": None, "label_smoothing": 0.0, "schedule": "linear", "eval_every": None},
    "method": {"lr_ratio": None},
}


def result_config(config: dict) -> dict:
    """The resolved config without the settings that do not change results (nor Hydra's own).
    ``trainer.world_size`` counts only above 1, the keys of ``ADDED_DEFAULTS`` only away from their
    defaults and ``trainer.generation`` only when enabled, so runs keep the identity they had before
    those keys existed."""
    out = _drop({k: v for k, v in config.items() if k != "hydra"})
    trainer = out.get("trainer")
    if isinstance(trainer, dict):
        if trainer.get("world_size") == 1:
            trainer = {k: v for k, v in trainer.items() if k != "world_size"}
        if not (trainer.get("generation") or {}).get("enabled", True):
            trainer = {k: v for k, v in trainer.items() if k != "generation"}
        out["trainer"] = trainer
    for section, defaults in ADDED_DEFAULTS.items():
        values = out.get(section)
        if isinstance(values, dict):
            out[section] = {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}
    return out


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for each setting that differs between two result configs."""
    a, b = _flatten(result_config(saved)), _flatten(result_config(current))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _task_config(root: DictConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.masked_copy(root, [k for k in root if k != "hydra"]), resolve=True)


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def run_hash(config: dict) -> str:
    """The hash of a run's result config (a resolved config): the end of its folder's name, and of its
    W&B run's name."""
    return digest(result_config(config))


def run_key(*, _root_: DictConfig) -> str:
    """``<method tag>-s<seed>-<hash of the result config>`` for a single run's directory."""
    config = _task_config(_root_)
    return f"{describe_method(config.get('method')).run_tag()}-s{config.get('seed')}-{run_hash(config)}"


def job_key(*, _root_: DictConfig) -> str:
    """``<method tag>[_lr<lr>]_s<seed>`` (``lora_r8_s0``, ``lora_r8_lr0.003_s0``) for a sweep job's folder,
    after its number: the values a sweep over methods, ranks, learning rates and seeds varies, readable
    in a listing of the sweep's folder. The learning rate shows when it is not the method's default."""
    method = OmegaConf.to_container(_root_.method, resolve=True)
    tag = describe_method(method).run_tag().replace("-", "_")
    lr, default = _root_.trainer.get("lr"), method.get("lr")
    if lr is not None and default is not None and float(lr) != float(default):
        tag += f"_lr{float(lr):g}"
    return f"{tag}_s{_root_.seed}"


def sweep_key(*, _root_: DictConfig) -> str:
    """A hash of the sweep: its base config, its command-line overrides (sweep syntax included) and
    its sweeper's grid, as the launcher sees them before the jobs are made."""
    overrides = [o for o in _root_.hydra.overrides.task if not _is_neutral(_override_key(o))]
    params = _root_.hydra.sweeper.get("params")
    grid = OmegaConf.to_container(params, resolve=False) if params is not None else None
    return digest([result_config(_task_config(_root_)), sorted(overrides, key=_override_key), grid])


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("run_key", run_key, replace=True)
    OmegaConf.register_new_resolver("sweep_key", sweep_key, replace=True)
    OmegaConf.register_new_resolver("job_key", job_key, replace=True)
    # cached by the argument's text, not its value: the first value resolved is kept
    OmegaConf.register_new_resolver("once", lambda value: value, replace=True, use_cache=True)
