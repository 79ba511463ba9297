"""Reading safetensors files, the only tensor format lora_lab reads (pickled checkpoints never are).

A truncated, foreign or vanished file makes safetensors raise errors of several types (its own,
OSError, ValueError, Rust panics surfacing as exceptions); every reader here turns them into one
``UnreadableTensors`` whose message is the first line of the cause, so each caller words its own
one-line refusal around it.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_lab.errors import first_line


class UnreadableTensors(ValueError):
    """A safetensors file that cannot be read; ``str()`` is the cause's first line."""


def read_header(path: str | Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """Each tensor's shape and dtype (e.g. "F32"), and the file's metadata, without reading a tensor."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {}
            for key in handle.keys():
                view = handle.get_slice(key)
                shapes[key] = (tuple(view.get_shape()), view.get_dtype())
            return shapes, dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001 - safetensors reports a bad file in several types
        raise UnreadableTensors(first_line(error)) from None


def read_tensors(path: str | Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of a file (all of them without ``names``)."""
    try:
        if names is None:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in names}
    except Exception as error:  # noqa: BLE001 - safetensors reports a bad file in several types
        raise UnreadableTensors(first_line(error)) from None
