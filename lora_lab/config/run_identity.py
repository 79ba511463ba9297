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
                "trainer.resume", "trainer.threads", "trainer.latency_repeats", "trainer.lock_stale_after",
                "study")  # a study's bookkeeping (experiment=embedded_study: its rate grids and choices)


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
    "trainer": {"warmup_steps": None, "label_smoothing": 0.0, "schedule": "linear", "eval_every": None,
                "strategy": "ddp"},
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
    """``<method tag>[_lr<lr>][_<other swept values>]_s<seed>`` (``lora_r8_s0``, ``lora_r8_lr0.003_s0``,
    ``lora_r8_trec6_max_train500_s0``) for a sweep job's folder, after its number: the values the sweep
    varies, readable in a listing of the sweep's folder. The learning rate shows when it is not the
    method's default; any other swept setting (on the command line, or in the sweeper's grid) shows its
    value, a config group by its choice alone, unless the method's tag already says it."""
    method = OmegaConf.to_container(_root_.method, resolve=True)
    tag = describe_method(method).run_tag().replace("-", "_")
    lr, default = _root_.trainer.get("lr"), method.get("lr")
    if lr is not None and default is not None and float(lr) != float(default):
        tag += f"_lr{float(lr):g}"
    for label in _swept_labels(_root_):
        if label not in tag.split("_"):
            tag += f"_{label}"
    return f"{tag}_s{_root_.seed}"


SWEPT_ENV = "LORA_LAB_SWEPT"  # the keys a command line sweeps, set by the lora-lab command for its jobs
_IN_JOB_KEY = ("seed", "trainer.lr", "lr_step", "method", "arm")  # the tag and the lr already say these


def _parse(override: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override)
    except Exception:  # noqa: BLE001 - not an override (a flag, a flag's value): Hydra reports real errors
        return None


def swept_keys(arguments) -> list[str]:
    """The keys that command-line ``arguments`` sweep (``method.r=1,8``, ``data=trec6,sms_spam``)."""
    keys = []
    for argument in arguments:
        override = _parse(argument)
        if override is not None and override.is_sweep_override() and not override.is_hydra_override():
            keys.append(override.key_or_group)
    return keys


def _value_text(value) -> str:
    if isinstance(value, list | tuple):
        return "+".join(_value_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "".join(c if c.isalnum() or c in "._+-" else "-" for c in str(value))


def _swept_labels(root: DictConfig) -> list[str]:
    """``trec6``, ``max_train500``: the job's values of the swept keys the method tag leaves out."""
    import os

    keys = [k for k in os.environ.get(SWEPT_ENV, "").split(",") if k]
    grid = (root.get("hydra") or {}).get("sweeper", {}).get("params") or {}
    keys += [k for k, v in grid.items() if k not in keys and (o := _parse(f"{k}={v}")) is not None
             and o.is_sweep_override()]
    values = {}
    for text in (root.get("hydra") or {}).get("overrides", {}).get("task") or []:
        override = _parse(text)
        if override is not None:
            values[override.key_or_group] = override.value()
    labels = []
    for key in keys:
        if key in _IN_JOB_KEY or _is_neutral(key) or key not in values:
            continue
        value = _value_text(values[key])
        labels.append(value if "." not in key and "/" not in key else f"{key.rsplit('.', 1)[-1]}{value}")
    return labels


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
