"""Checkpoints: everything a killed run needs to go on exactly where it stopped.

    <run_dir>/checkpoint/last.safetensors             one file, written atomically (write, fsync, rename)
        tensors   model/<name>            the trainable parameters (never the frozen base)
                  optimizer/<i>/<key>     the optimiser's state per parameter
                  rng/torch, rng/cuda/<i>, rng/numpy
                  rank<k>/rng/...         the same for rank k > 0 of a torchrun launch
                  progress/<name>         per-step series so far (losses of the current epoch, step times)
        metadata  config                  the settings that change results (run_identity.result_config)
                  data_sha256             the SHA-256 of the file's tensor data (records.save_tensors, seal)
                  files                   the SHA-256 of the best-epoch file it names
                  progress                step, epoch, position in the epoch, per-epoch metrics, best so
                                          far, measurements so far
                  optimizer, scheduler, rng_python, rng_numpy (rank<k>/rng_python, ... for rank k > 0)
    <run_dir>/checkpoint/best-epoch<N>.safetensors    the trainable state of the best epoch so far

A best-epoch file is written before the checkpoint that names it, and older ones are deleted only
after, so a kill at any moment leaves a checkpoint whose files all exist. Under torchrun rank 0 writes
the one checkpoint (the trainable and optimiser state are the same on every rank) with every rank's
random number generator states; each rank restores its own. Under ``trainer.strategy=fsdp`` the
parameters and optimiser state are sharded: every rank takes part in gathering them whole
(``gathered_state``), rank 0 writes the same file, and every rank restores its own shards from it.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lora_lab.config.run_identity import differences
from lora_lab.errors import ConfigError
from lora_lab.runtime import records, sharding

CHECKPOINT_DIR = "checkpoint"
LAST = "last.safetensors"
FORMAT = "lora_lab.runtime.checkpoint/1"


def best_file(directory: Path, epoch: int) -> Path:
    return Path(directory) / f"best-epoch{epoch}.safetensors"


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict

    @property
    def progress(self) -> dict:
        return self.meta["progress"]

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) + 1:]: v for k, v in self.tensors.items() if k.startswith(prefix + "/")}


def _trainable_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters; of a sharded model (``trainer.strategy=fsdp``) whole copies on the CPU,
    gathered from every rank (so every rank must call it)."""
    if sharding.is_sharded(model):
        return sharding.full_state(model)
    return _trainable_parameters(model)


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Whole tensors into the trainable parameters (into each rank's shards of a sharded model)."""
    if sharding.is_sharded(model):
        sharding.reshard(model)
    with torch.no_grad():
        for name, param in _trainable_parameters(model).items():
            param.copy_(sharding.shard_like(state[name], param))


# ---------------------------------------------------------------- writing

def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng/torch": torch.get_rng_state(), "rng/numpy": torch.from_numpy(
        np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    return tensors


def _rng_meta() -> dict[str, str]:
    version, state, gauss = random.getstate()
    _, _, pos, has_gauss, cached = np.random.get_state()
    return {"rng_python": json.dumps([version, list(state), gauss]),
            "rng_numpy": json.dumps([int(pos), int(has_gauss), float(cached)])}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's random number generator states: tensors and header entries."""
    return _rng_tensors(), _rng_meta()


def _rank_prefix(rank: int) -> str:
    return f"rank{rank}/" if rank else ""


def gathered_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict] | None:
    """A sharded model's trainable state and its optimiser's state dict, whole (on every rank, which must
    all call this); None for a model that is not sharded (``save`` reads them itself)."""
    if not sharding.is_sharded(model):
        return None
    return trainable_state(model), sharding.full_optimizer_state(optimizer)


def _optimizer_parts(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    tensors = {f"optimizer/{index}/{key}": value for index, entry in state["state"].items()
               for key, value in entry.items() if torch.is_tensor(value)}
    return tensors, json.dumps(state["param_groups"])


def save(directory: Path, model, optimizer, scheduler, config: dict, progress: dict,
         series: dict[str, torch.Tensor], rng_states: list | None = None,
         gathered: tuple[dict[str, torch.Tensor], dict] | None = None) -> Path:
    """Write ``last.safetensors`` atomically; ``series``: per-step values kept as tensors;
    ``rng_states``: every rank's ``rng_state()`` in rank order (default: this process's); ``gathered``:
    the trainable and optimiser state of a sharded model (``gathered_state``), instead of reading them."""
    trainable, optimizer_state = gathered or (trainable_state(model), optimizer.state_dict())
    optimizer_tensors, groups = _optimizer_parts(optimizer_state)
    tensors = {**{f"model/{k}": v for k, v in trainable.items()}, **optimizer_tensors,
               **{f"progress/{k}": v for k, v in series.items()}}
    meta = {"format": FORMAT, "config": json.dumps(config, default=str), "progress": json.dumps(progress),
            "optimizer": groups, "scheduler": json.dumps(scheduler.state_dict())}
    for rank, (rng_tensors, rng_meta) in enumerate(rng_states or [rng_state()]):
        tensors.update({_rank_prefix(rank) + k: v for k, v in rng_tensors.items()})
        meta.update({_rank_prefix(rank) + k: v for k, v in rng_meta.items()})
    best_epoch = progress.get("best_epoch")
    if best_epoch is not None and best_file(directory, best_epoch).exists():
        meta["files"] = json.dumps({best_file(directory, best_epoch).name: _digest(best_file(directory, best_epoch))})
    path = Path(directory) / LAST
    records.save_tensors(path, tensors, metadata=meta, seal=True)
    return path


_DIGESTS: dict[str, tuple[int, int, str]] = {}  # path -> (mtime_ns, size, SHA-256) of best-epoch files written


def _digest(path: Path) -> str:
    """The SHA-256 of a best-epoch file: remembered from when it was written or read, else computed."""
    stat = path.stat()
    known = _DIGESTS.get(str(path))
    if known is not None and known[:2] == (stat.st_mtime_ns, stat.st_size):
        return known[2]
    return _remember(path, records.file_sha256(path))


def _remember(path: Path, digest: str) -> str:
    stat = path.stat()
    _DIGESTS[str(path)] = (stat.st_mtime_ns, stat.st_size, digest)
    return digest


def save_best(directory: Path, state: dict[str, torch.Tensor], epoch: int) -> None:
    path = best_file(directory, epoch)
    _remember(path, records.save_tensors(path, state, metadata={"epoch": str(epoch)}))


def drop_stale_best(directory: Path, keep_epoch: int | None) -> None:
    for path in Path(directory).glob("best-epoch*.safetensors"):
        if keep_epoch is None or path != best_file(directory, keep_epoch):
            path.unlink(missing_ok=True)


def discard_partial_writes(*directories: Path) -> None:
    """Temporary files of writes that a kill interrupted (the file they were for is intact)."""
    for directory in directories:
        for path in Path(directory).glob(".*.tmp"):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading

def load(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None when there is none. A file that is not a complete
    lora_lab checkpoint is refused with one line naming it."""
    path = Path(directory) / LAST
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError("checkpoint", str(path), f"is not a readable safetensors file ({error})") from None
    if raw.get("format") != FORMAT:
        raise ConfigError("checkpoint", str(path), f"is not a {FORMAT} checkpoint (format {raw.get('format')!r})")
    records.check_sealed(path, raw, "checkpoint")
    meta = {key: json.loads(value) for key, value in raw.items() if key not in ("format", records.DATA_SHA256_KEY)}
    return Checkpoint(path, tensors, meta)


def peek_progress(directory: Path) -> dict | None:
    """The progress a checkpoint records, read from its header only (no tensors loaded)."""
    path = Path(directory) / LAST
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("progress", "null"))
    except (SafetensorError, OSError, ValueError):
        return None


def check_config(checkpoint: Checkpoint, config: dict) -> None:
    changed = differences(checkpoint.meta["config"], config)
    if changed:
        raise ConfigError("checkpoint", str(checkpoint.path), "was written by another config; differing keys: "
                          + "; ".join(changed) + " (use another hydra.run.dir, or trainer.resume=false)")


def restore(checkpoint: Checkpoint, model, optimizer, scheduler) -> None:
    """Trainable parameters, optimiser and scheduler; the random number generators come last, with
    ``restore_rng``, once everything that draws random numbers while setting up has run."""
    saved = checkpoint.group("model")
    params = _trainable_parameters(model)
    if set(saved) != set(params):
        missing = sorted(set(params) ^ set(saved))[:3]
        raise ConfigError("checkpoint", str(checkpoint.path), f"does not match the model's trainable parameters "
                          f"(e.g. {missing})")
    load_trainable_state(model, saved)
    state: dict = {"state": {}, "param_groups": checkpoint.meta["optimizer"]}
    for key, tensor in checkpoint.group("optimizer").items():
        index, name = key.split("/", 1)
        state["state"].setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict(sharding.shard_optimizer_state(state, optimizer) if sharding.is_sharded(model)
                              else state)
    scheduler.load_state_dict(checkpoint.meta["scheduler"])


def restore_rng(checkpoint: Checkpoint, rank: int = 0) -> None:
    prefix = _rank_prefix(rank)
    version, state, gauss = checkpoint.meta[prefix + "rng_python"]
    random.setstate((version, tuple(state), gauss))
    pos, has_gauss, cached = checkpoint.meta[prefix + "rng_numpy"]
    np.random.set_state(("MT19937", checkpoint.tensors[prefix + "rng/numpy"].numpy().astype(np.uint32), pos,
                         has_gauss, cached))
    torch.set_rng_state(checkpoint.tensors[prefix + "rng/torch"])
    cuda = [checkpoint.tensors[f"{prefix}rng/cuda/{i}"] for i in range(len(checkpoint.group(prefix + "rng/cuda")))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def load_best(directory: Path, epoch: int, checkpoint: Checkpoint | None = None) -> dict[str, torch.Tensor]:
    """The best epoch's state; checked against the SHA-256 that ``checkpoint`` (the one naming it) keeps."""
    path = best_file(directory, epoch)
    want = (checkpoint.meta.get("files") or {}).get(path.name) if checkpoint is not None else None
    if want is not None and path.exists():
        records.check_digest(path, want, f"the checkpoint {checkpoint.path}")
        _remember(path, want)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError("checkpoint", str(path), f"the best epoch's state cannot be read ({error})") from None
