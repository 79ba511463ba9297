"""The sharded part of a checkpoint under ``trainer.strategy=fsdp``: each rank writes its own shards of the
trainable parameters and the optimiser state with ``torch.distributed.checkpoint`` (DCP), in safetensors
files (DCP's Hugging Face storage: tensors and their offsets in the whole tensor, no pickle), and each rank
reads back the rows it holds, from whichever files hold them.

    <checkpoint>/shards-<id>/shard-0000<k>-model-00001-of-00001.safetensors    rank k-1's part
        model/<name>           a trainable parameter's rows on that rank
        optimizer/<i>/<key>    the optimiser's state for parameter i (a scalar such as ``step``: once)

A folder is written whole before anything names it: the checkpoint's header (``last.safetensors``, written
by rank 0 after every rank has finished) lists the folder and the SHA-256 of each of its files, so a kill
during a write leaves the previous checkpoint intact and an unnamed folder that the next start deletes.
The ranks share the hashing (and its check on resume): rank k hashes every world_size-th file.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import torch

from lora_lab.errors import ConfigError
from lora_lab.runtime import records
from lora_lab.runtime.distributed import Distributed

PREFIX = "shards-"


def new_folder_name(dist: Distributed) -> str:
    """A name no earlier write of this run used, the same on every rank (drawn without touching the seeded
    random number generators)."""
    return dist.broadcast(PREFIX + uuid.uuid4().hex[:12])


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


def digests(folder: Path, names: list[str], dist: Distributed) -> dict[str, str]:
    """The SHA-256 of every file in ``names``; each rank hashes its share, every rank gets them all."""
    own = {name: records.file_sha256(folder / name) for name in sorted(names)[dist.rank::dist.world_size]}
    return {name: digest for part in dist.gather(own) for name, digest in part.items()}


def write(folder: Path, tensors: dict[str, torch.Tensor], dist: Distributed) -> dict[str, str]:
    """Every rank writes its shards of ``tensors`` (DTensors, and plain tensors held whole by every rank)
    into ``folder``; returns each file's SHA-256 (on every rank). A collective."""
    dcp = _dcp()
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True))
    dist.barrier()  # every rank's files are complete before anyone lists them
    return digests(folder, [p.name for p in folder.iterdir() if p.is_file()], dist)


def digest_of(files: dict[str, str]) -> str:
    """One SHA-256 for a folder's files (a best epoch's folder is named by one digest, like a file)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def check(folder: Path, files: dict[str, str], dist: Distributed, listed_in: str) -> None:
    """Refuse, on every rank, a folder whose files are not exactly the ones ``listed_in`` lists with these
    digests (ConfigError naming the first file that differs)."""
    present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if present != set(files):
        missing, extra = sorted(set(files) - present), sorted(present - set(files))
        raise ConfigError("checkpoint", str(folder / (missing or extra)[0]),
                          f"{'is missing' if missing else 'is not one of the files'} {listed_in} lists")
    got = digests(folder, list(files), dist)  # the same on every rank, so every rank refuses alike
    wrong = [name for name in sorted(files) if got[name] != files[name]]
    if wrong:
        raise ConfigError("checkpoint", str(folder / wrong[0]), f"does not have the SHA-256 {listed_in} lists; the "
                          "file is corrupt or was changed after it was written")


def stored_shapes(folder: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Each stored tensor's whole shape and dtype, from the files' headers."""
    metadata = _dcp().HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    return {name: (entry.size, entry.properties.dtype) for name, entry in metadata.items()}


def read(folder: Path, targets: dict[str, torch.Tensor]) -> None:
    """Every rank reads its shards into ``targets`` (in place; a plain tensor is read whole). A collective."""
    dcp = _dcp()
    dcp.load(targets, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))


def templates(names_and_params: dict[str, torch.Tensor], stored: dict) -> dict[str, torch.Tensor]:
    """Tensors to read stored optimiser state into: shaped and sharded like the parameter where the stored
    tensor has the parameter's shape, whole otherwise (a scalar ``step``)."""
    out = {}
    for name, param in names_and_params.items():
        size, dtype = stored[name]
        out[name] = (torch.zeros_like(param, dtype=dtype) if tuple(size) == tuple(param.shape)
                     else torch.zeros(size, dtype=dtype))
    return out


def remove_others(directory: Path, keep: set[str]) -> None:
    """Delete every shards folder in ``directory`` but those named in ``keep``."""
    for folder in Path(directory).glob(PREFIX + "*"):
        if folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)

