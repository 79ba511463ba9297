"""Checkpoints: everything a killed run needs to go on exactly where it stopped.

    <run_dir>/checkpoint/last.safetensors             one file, written atomically (write, fsync, rename)
        tensors   model/<name>            the trainable parameters (never the frozen base)
                  optimizer/<i>/<key>     the optimiser's state per parameter
                  rng/torch, rng/cuda/<i>, rng/numpy
                  rank<k>/rng/...         the same for rank k > 0 of a torchrun launch
                  progress/<name>         per-step series so far (losses of the current epoch, step times)
        metadata  config                  the settings that change results (run_identity.result_config)
                  data_sha256             the SHA-256 of the file's tensor data (records.save_tensors, seal)
                  files                   the name and SHA-256 of the best evaluation's file
                  progress                step, epoch, position in the epoch, per-epoch metrics, best so
                                          far, measurements so far
                  optimizer, scheduler, rng_python, rng_numpy (rank<k>/rng_python, ... for rank k > 0)
    <run_dir>/checkpoint/best-step<S>.safetensors     the trainable state of the best evaluation so far
                                                      (the one after optimiser step S)

A best file is written before the checkpoint that names it, and older ones are deleted only after, so
a kill at any moment leaves a checkpoint whose files all exist; each evaluation's file has its own name
(``trainer.eval_every`` evaluates several times in one epoch), so a newer best never replaces the file
a checkpoint names. Under torchrun rank 0 writes
the one checkpoint (the trainable and optimiser state are the same on every rank) with every rank's
random number generator states; each rank restores its own.

Under ``trainer.strategy=fsdp`` the trainable parameters and the optimiser state are sharded, and no rank
gathers them: each rank writes its shards with torch.distributed.checkpoint (lora_lab.runtime.sharded_checkpoint)

    <run_dir>/checkpoint/shards-<id>/                  every rank's part of model/ and optimizer/ above
    <run_dir>/checkpoint/best-step<S>/                 every rank's part of the best evaluation's state

and rank 0 then writes ``last.safetensors`` without them, naming the folder and its files' SHA-256
(header ``shards``): the checkpoint is complete, as a whole, when that file is renamed into place.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lora_lab.config.run_identity import differences
from lora_lab.errors import ConfigError
from lora_lab.runtime import records, sharded_checkpoint, sharding
from lora_lab.runtime.distributed import Distributed

CHECKPOINT_DIR = "checkpoint"
LAST = "last.safetensors"
FORMAT = "lora_lab.runtime.checkpoint/1"


BEST = "best-"


def best_file(directory: Path, step: int) -> Path:
    """The state of the best evaluation, the one after optimiser step ``step``."""
    return Path(directory) / f"{BEST}step{step}.safetensors"


def best_folder(directory: Path, step: int) -> Path:
    """The same for a sharded model: one file per rank (``sharded_checkpoint``)."""
    return Path(directory) / f"{BEST}step{step}"


def _best_path(directory: Path, step: int) -> Path:
    folder = best_folder(directory, step)
    return folder if folder.is_dir() else best_file(directory, step)


def _best_step(progress: dict) -> int | None:
    return (progress.get("best") or {}).get("step")


def _best_named(directory: Path, progress: dict) -> Path | None:
    """The file or folder holding the state of ``progress``'s best evaluation, if it exists (one of a run
    checkpointed by an older lora_lab is named by its epoch)."""
    step = _best_step(progress)
    if step is None:
        return None
    for path in (_best_path(directory, step), Path(directory) / f"best-epoch{progress.get('best_epoch')}.safetensors"):
        if path.exists():
            return path
    return None


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


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of the trainable parameters as this process holds them: whole, or this rank's shards (DTensors)
    of a sharded model, so that keeping the best epoch's state costs each rank 1/world_size of it."""
    if sharding.is_sharded(model):
        sharding.reshard(model)
    with torch.no_grad():
        return {name: param.detach().clone() for name, param in _trainable_parameters(model).items()}


def _is_sharded_state(state: dict[str, torch.Tensor]) -> bool:
    return any(sharding.is_dtensor(t) for t in state.values())


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


def write_shards(directory: Path, model, optimizer, dist: Distributed) -> dict | None:
    """A sharded model's trainable and optimiser state, each rank writing its shards into a new folder of
    ``directory``; returns what ``save`` puts in the header (``shards``): the folder and its files'
    SHA-256. Every rank must call this; None (nothing written) for a model that is not sharded."""
    if not sharding.is_sharded(model):
        return None
    sharding.reshard(model)
    name = sharded_checkpoint.new_folder_name(dist)
    tensors = {f"model/{n}": p for n, p in _trainable_parameters(model).items()}
    tensors.update({f"optimizer/{index}/{key}": value for index, entry in optimizer.state_dict()["state"].items()
                    for key, value in entry.items() if torch.is_tensor(value)})
    return {"dir": name, "files": sharded_checkpoint.write(Path(directory) / name, tensors, dist)}


def _optimizer_parts(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    tensors = {f"optimizer/{index}/{key}": value for index, entry in state["state"].items()
               for key, value in entry.items() if torch.is_tensor(value)}
    return tensors, json.dumps(state["param_groups"])


def save(directory: Path, model, optimizer, scheduler, config: dict, progress: dict,
         series: dict[str, torch.Tensor], rng_states: list | None = None, shards: dict | None = None) -> Path:
    """Write ``last.safetensors`` atomically; ``series``: per-step values kept as tensors;
    ``rng_states``: every rank's ``rng_state()`` in rank order (default: this process's); ``shards``: the
    folder ``write_shards`` wrote a sharded model's state into, named instead of storing that state."""
    if shards is None:
        optimizer_tensors, groups = _optimizer_parts(optimizer.state_dict())
        tensors = {**{f"model/{k}": v for k, v in trainable_state(model).items()}, **optimizer_tensors}
    else:
        tensors, groups = {}, json.dumps(optimizer.state_dict()["param_groups"])
    tensors.update({f"progress/{k}": v for k, v in series.items()})
    meta = {"format": FORMAT, "config": json.dumps(config, default=str), "progress": json.dumps(progress),
            "optimizer": groups, "scheduler": json.dumps(scheduler.state_dict())}
    if shards is not None:
        meta["shards"] = json.dumps(shards)
    for rank, (rng_tensors, rng_meta) in enumerate(rng_states or [rng_state()]):
        tensors.update({_rank_prefix(rank) + k: v for k, v in rng_tensors.items()})
        meta.update({_rank_prefix(rank) + k: v for k, v in rng_meta.items()})
    best = _best_named(directory, progress)
    if best is not None:
        meta["files"] = json.dumps({best.name: _digest(best)})
    path = Path(directory) / LAST
    records.save_tensors(path, tensors, metadata=meta, seal=True)
    return path


_DIGESTS: dict[str, tuple[int, int, str]] = {}  # path -> (mtime_ns, size, SHA-256) of best files written


def _digest(path: Path) -> str:
    """The SHA-256 of a best file (of a folder: ``sharded_checkpoint.digest_of`` its files'):
    remembered from when it was written or read, else computed."""
    stat = path.stat()
    known = _DIGESTS.get(str(path))
    if known is not None and known[:2] == (stat.st_mtime_ns, stat.st_size):
        return known[2]
    if path.is_dir():
        return _remember(path, sharded_checkpoint.digest_of({p.name: records.file_sha256(p) for p in path.iterdir()}))
    return _remember(path, records.file_sha256(path))


def _remember(path: Path, digest: str) -> str:
    stat = path.stat()
    _DIGESTS[str(path)] = (stat.st_mtime_ns, stat.st_size, digest)
    return digest


def save_best(directory: Path, state: dict[str, torch.Tensor], row: dict, dist: Distributed | None = None) -> None:
    """The state of the best evaluation (``row``, its epoch row): one file, or (a sharded model's
    ``snapshot``, every rank calling this) one folder of every rank's shards."""
    if not _is_sharded_state(state):
        path = best_file(directory, row["step"])
        _remember(path, records.save_tensors(path, state, metadata={"epoch": str(row["epoch"]),
                                                                     "step": str(row["step"])}))
        return
    dist = dist or Distributed()
    folder = best_folder(directory, row["step"])
    if dist.is_main and folder.exists():  # left by a write that no checkpoint names (a kill before the next one)
        shutil.rmtree(folder)
    dist.barrier()
    _remember(folder, sharded_checkpoint.digest_of(sharded_checkpoint.write(folder, state, dist)))


def drop_stale_best(directory: Path, progress: dict) -> None:
    """Every best file or folder but the one of ``progress``'s best evaluation (``Progress.to_dict()``)."""
    keep = _best_named(directory, progress)
    for path in Path(directory).glob(BEST + "*"):
        if path != keep:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def drop_stale_shards(directory: Path, shards: dict | None) -> None:
    """Every shards folder but the one the checkpoint just written names (rank 0, after writing it)."""
    if shards is not None:
        sharded_checkpoint.remove_others(directory, {shards["dir"]})


def discard_partial_writes(*directories: Path) -> None:
    """Temporary files of writes that a kill interrupted (the file they were for is intact), and shards
    folders that no checkpoint names (a kill while the ranks wrote them)."""
    for directory in directories:
        for path in Path(directory).glob(".*.tmp"):
            path.unlink(missing_ok=True)
        if any(Path(directory).glob(sharded_checkpoint.PREFIX + "*")):
            named = _peek_meta(directory).get("shards")
            sharded_checkpoint.remove_others(directory, {json.loads(named)["dir"]} if named else set())


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


def _peek_meta(directory: Path) -> dict[str, str]:
    """A checkpoint's header entries, unparsed ({} when there is no readable checkpoint)."""
    path = Path(directory) / LAST
    if not path.exists():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return {}


def peek_progress(directory: Path) -> dict | None:
    """The progress a checkpoint records, read from its header only (no tensors loaded)."""
    try:
        return json.loads(_peek_meta(directory).get("progress", "null"))
    except ValueError:
        return None


def check_config(checkpoint: Checkpoint, config: dict) -> None:
    changed = differences(checkpoint.meta["config"], config)
    if changed:
        raise ConfigError("checkpoint", str(checkpoint.path), "was written by another config; differing keys: "
                          + "; ".join(changed) + " (use another hydra.run.dir, or trainer.resume=false)")


def _check_names(checkpoint: Checkpoint, saved: set[str], params: dict) -> None:
    if saved != set(params):
        missing = sorted(set(params) ^ saved)[:3]
        raise ConfigError("checkpoint", str(checkpoint.path), f"does not match the model's trainable parameters "
                          f"(e.g. {missing})")


def _optimizer_state(checkpoint: Checkpoint, tensors: dict[str, torch.Tensor]) -> dict:
    """An optimiser state dict from ``optimizer/<index>/<key>`` tensors and the header's parameter groups."""
    state: dict = {"state": {}, "param_groups": checkpoint.meta["optimizer"]}
    for key, tensor in tensors.items():
        index, name = key.split("/", 1)
        state["state"].setdefault(int(index), {})[name] = tensor
    return state


def restore(checkpoint: Checkpoint, model, optimizer, scheduler, dist: Distributed | None = None) -> None:
    """Trainable parameters, optimiser and scheduler (of a sharded checkpoint: every rank reads its shards,
    so every rank must call this); the random number generators come last, with ``restore_rng``, once
    everything that draws random numbers while setting up has run."""
    if "shards" in checkpoint.meta:
        _restore_shards(checkpoint, model, optimizer, dist or Distributed())
    else:
        saved = checkpoint.group("model")
        _check_names(checkpoint, set(saved), _trainable_parameters(model))
        load_trainable_state(model, saved)
        state = _optimizer_state(checkpoint, checkpoint.group("optimizer"))
        optimizer.load_state_dict(sharding.shard_optimizer_state(state, optimizer) if sharding.is_sharded(model)
                                  else state)
    scheduler.load_state_dict(checkpoint.meta["scheduler"])


def _restore_shards(checkpoint: Checkpoint, model, optimizer, dist: Distributed) -> None:
    shards = checkpoint.meta["shards"]
    folder = checkpoint.path.parent / shards["dir"]
    sharded_checkpoint.check(folder, shards["files"], dist, f"the checkpoint {checkpoint.path}")
    stored = sharded_checkpoint.stored_shapes(folder)
    sharding.reshard(model)
    params = _trainable_parameters(model)
    _check_names(checkpoint, {k[len("model/"):] for k in stored if k.startswith("model/")}, params)
    indexed = [p for group in optimizer.param_groups for p in group["params"]]
    moments = sharded_checkpoint.templates({k: indexed[int(k.split("/")[1])] for k in stored
                                            if k.startswith("optimizer/")}, stored)
    sharded_checkpoint.read(folder, {**{f"model/{n}": p for n, p in params.items()}, **moments})
    optimizer.load_state_dict(_optimizer_state(checkpoint, {k[len("optimizer/"):]: v for k, v in moments.items()}))


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


def load_best(directory: Path, checkpoint: Checkpoint, model=None, dist: Distributed | None = None
              ) -> dict[str, torch.Tensor]:
    """The best evaluation's state that ``checkpoint`` names, checked against the SHA-256 it keeps. A
    sharded model's (a folder): this rank's shards, shaped like ``model``'s; every rank must call this."""
    listed = checkpoint.meta.get("files") or {}
    name = next(iter(listed), None) or best_file(directory, _best_step(checkpoint.progress)).name
    path = Path(directory) / name
    if path.is_dir():
        return _load_best_shards(path, checkpoint, model, dist or Distributed())
    want = listed.get(name)
    if want is not None and path.exists():
        records.check_digest(path, want, f"the checkpoint {checkpoint.path}")
        _remember(path, want)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError("checkpoint", str(path), f"the best epoch's state cannot be read ({error})") from None


def _load_best_shards(folder: Path, checkpoint: Checkpoint, model, dist: Distributed) -> dict[str, torch.Tensor]:
    want = (checkpoint.meta.get("files") or {}).get(folder.name)
    got = sharded_checkpoint.digest_of(sharded_checkpoint.digests(folder, [p.name for p in folder.iterdir()], dist))
    if want is not None and got != want:
        raise ConfigError("checkpoint", str(folder), f"has SHA-256 {got[:16]}..., not the {want[:16]}... the "
                          f"checkpoint {checkpoint.path} lists; the folder is corrupt or was changed after it was written")
    _remember(folder, got)
    state = {name: torch.zeros_like(t) for name, t in snapshot(model).items()}
    sharded_checkpoint.read(folder, state)
    return state
