"""W0 for Table 7 from a base model's safetensors (a model folder, sharded or not, or one file).

Only the headers are read up front (names, shapes, dtypes); a matrix is read, memory-mapped, when the
analysis reaches its module, and the last one read is kept so that adapters sharing the base share the
tensor (the analysis then passes over W0 once for all of them). Pickled checkpoints are never read.

Names: an adapted module ``M`` has W0 under ``M.weight``; when the base was saved from another wrapper
of the same model (``BertModel``: ``encoder.layer.0...`` against ``bert.encoder.layer.0...``) the one
weight whose module name is a dotted suffix of M, or has M as one, is taken.

Orientation: ΔW is out x in, as nn.Linear stores its weight. With ``fan_in_fan_out`` (GPT-2's Conv1D)
the base stores W0 as in x out; it is transposed when read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_lab.errors import ConfigError, first_line
from lora_lab.peft.names import suffix_matches
from lora_lab.tensor_files import UnreadableTensors, read_header, read_tensors

SHARD_INDEX = "model.safetensors.index.json"
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_NOT_BASE = ("adapter_model.safetensors",)  # an adapter folder's weights are no base


@dataclass(frozen=True)
class BaseMatrix:
    """Where one module's W0 lies and whether it is stored transposed (in x out)."""

    key: str
    transpose: bool


class BaseWeights:
    """The weight matrices of a base model, by safetensors key, read lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.index: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        for file in self._files():
            try:
                header, _ = read_header(file)
            except UnreadableTensors as error:
                raise self._refuse(f"holds {file.name}, which cannot be read as safetensors ({error})") from None
            for key, (shape, dtype) in header.items():
                self.index.setdefault(key, (file, shape, dtype))
        self._stems = {key[:-len(".weight")]: key for key in self.index if key.endswith(".weight")}
        self._cached: tuple[BaseMatrix, torch.Tensor] | None = None

    def _refuse(self, problem: str) -> ConfigError:
        return ConfigError("base", str(self.path), problem)

    def _files(self) -> list[Path]:
        if self.path.is_file():
            if self.path.suffix != ".safetensors":
                raise self._refuse("is not a .safetensors file; pickled checkpoints are not read "
                                   "(loading a pickle can run code)")
            return [self.path]
        if not self.path.is_dir():
            raise self._refuse("is neither a model folder nor a .safetensors file")
        index = self.path / SHARD_INDEX
        if index.exists():  # only the shards it lists (some repositories ship a second, differently named copy)
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise self._refuse(f"has a {SHARD_INDEX} without a readable weight_map ({first_line(error)})") from None
            files = [self.path / n for n in names]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise self._refuse(f"lacks {missing[0]}, listed in its {SHARD_INDEX}")
            return files
        files = sorted(f for f in self.path.glob("*.safetensors") if f.name not in _NOT_BASE)
        if files:
            return files
        pickled = sorted(f.name for pattern in _PICKLED for f in self.path.glob(pattern))
        if pickled:
            raise self._refuse(f"holds {pickled[0]} but no .safetensors; pickled weights are not read "
                               "(loading a pickle can run code): save the model with safetensors")
        raise self._refuse("holds no .safetensors weights")

    def locate(self, module: str, shape: tuple[int, int], fan_in_fan_out: bool = False) -> BaseMatrix:
        """Where ``module``'s W0 (out x in = ``shape``) lies; ConfigError when absent or of another shape."""
        found = suffix_matches(module, self._stems)
        if len(found) != 1:
            what = "no weight" if not found else f"{len(found)} candidate weights ({', '.join(found[:3])})"
            raise self._refuse(f"has {what} for the adapted module {module} (looked for {module}.weight); "
                               "is it the adapter's base model?")
        key = self._stems[found[0]]
        _, stored, dtype = self.index[key]
        if dtype not in _FLOAT_DTYPES:
            raise self._refuse(f"holds {key} as {dtype}; Table 7 needs floating-point (not quantized) weights")
        out_dim, in_dim = shape
        if fan_in_fan_out and stored == (in_dim, out_dim):
            return BaseMatrix(key, transpose=True)
        if stored == (out_dim, in_dim):
            return BaseMatrix(key, transpose=False)
        hint = " (stored in x out: the adapter should say fan_in_fan_out)" if stored == (in_dim, out_dim) else ""
        raise self._refuse(f"holds {key} of shape {stored}, but the adapter's ΔW of {module} is "
                           f"{out_dim}x{in_dim}{hint}; is it the adapter's base model?")

    def load(self, where: BaseMatrix) -> torch.Tensor:
        """W0 as out x in (a transposed view where the file stores in x out)."""
        if self._cached is not None and self._cached[0] == where:
            return self._cached[1]
        file = self.index[where.key][0]
        try:
            W = read_tensors(file, [where.key])[where.key]
        except UnreadableTensors as error:  # e.g. the file changed since it was opened
            raise self._refuse(f"cannot be read ({error}); the file is truncated or corrupt") from None
        W = W.T if where.transpose else W
        self._cached = (where, W)
        return W
