"""A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) read as one analysis run.

Each adapted module's ΔW stays factored, ΔW = (s·B) A with s its scaling (``peft_config``), B out x r
and A r x in: PEFT stores lora_A as r x in and lora_B as out x r whatever the layer, so ΔW is out x in
as nn.Linear stores its weight, also with ``fan_in_fan_out`` (GPT-2's Conv1D, whose own weight is
in x out: only W0 is transposed, in ``base_weights``). Factors are read, memory-mapped, one module at a
time; nothing is unpickled (adapter_model.bin is refused).

DoRA adapters (``use_dora``): the analysis reads the low-rank direction update s·B·A; the learned
magnitude vector, which rescales W0 + s·B·A row by row, is left out (ΔW of DoRA is not low-rank), and
the report says so. LoRA on embeddings (lora_embedding_A/B) and convolutions (4-D factors) is skipped
and counted; other tensors (modules_to_save, lora_B.bias, ...) are ignored and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_lab.analysis.base_weights import BaseMatrix, BaseWeights
from lora_lab.analysis.subspace import RunDeltas
from lora_lab.errors import ConfigError
from lora_lab.methods.base import DeltaW
from lora_lab.peft.adapter_config import LoraAdapterConfig
from lora_lab.peft.names import (
    CONFIG_FILE,
    EMBEDDING_FACTORS,
    FACTORS,
    MAGNITUDE,
    PICKLED_WEIGHTS_FILE,
    WEIGHTS_FILE,
    parse_peft_key,
)
from lora_lab.tensor_files import UnreadableTensors, read_header, read_tensors

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass
class _Module:
    keys: dict[str, str] = field(default_factory=dict)  # "A" / "B" -> tensor key
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


class PeftAdapter:
    """The LoRA modules of one adapter: shapes and ranks checked against its config when opened."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.config = LoraAdapterConfig.read(self.folder / CONFIG_FILE)
        self.weights = self.folder / WEIGHTS_FILE
        if not self.weights.is_file():
            if (self.folder / PICKLED_WEIGHTS_FILE).exists():
                raise self._refuse(f"holds {PICKLED_WEIGHTS_FILE} only; it is a pickle, which can run code when "
                                   f"loaded, so it is not read: save the adapter as {WEIGHTS_FILE}")
            raise self._refuse(f"has {CONFIG_FILE} but no {WEIGHTS_FILE} (pickled weights, "
                               f"{PICKLED_WEIGHTS_FILE}, are never read)")
        try:
            header, _ = read_header(self.weights)
        except UnreadableTensors as error:
            raise self._refuse(f"holds an {WEIGHTS_FILE} that cannot be read as safetensors "
                               f"({error}); the file is truncated or corrupt") from None
        self.ignored: list[str] = []  # tensors that are not LoRA factors of a linear layer
        self.skipped: set[str] = set()  # LoRA modules left out (embeddings, convolutions)
        self.magnitudes: set[str] = set()  # DoRA
        modules: dict[str, _Module] = {}
        adapters = set()
        for key, (shape, dtype) in header.items():
            parsed = parse_peft_key(key)
            if parsed is None or parsed.param == "bias":
                self.ignored.append(key)
                continue
            adapters.add(parsed.adapter)
            if parsed.part in EMBEDDING_FACTORS:
                self.skipped.add(parsed.module)
            elif parsed.part == MAGNITUDE:
                self.magnitudes.add(parsed.module)
            elif len(shape) != 2:
                self.skipped.add(parsed.module)
            elif dtype not in _FLOAT_DTYPES:
                raise self._refuse(f"holds {key} as {dtype}; LoRA factors are floating-point matrices")
            else:
                part = FACTORS[parsed.part]
                m = modules.setdefault(parsed.module, _Module())
                m.keys[part], m.shapes[part] = key, shape
        if len(adapters) > 1:
            raise self._refuse(f"holds {len(adapters)} adapters ({', '.join(sorted(map(str, adapters)))}) in one "
                               "file; save each adapter on its own")
        self._modules = {name: m for name, m in modules.items() if name not in self.skipped}
        self.shapes = {name: self._check(name, m) for name, m in self._modules.items()}
        if not self.shapes:
            raise self._refuse(f"holds no LoRA factors of a linear layer (lora_A / lora_B) in {WEIGHTS_FILE}")
        self._base: BaseWeights | None = None
        self._base_of: dict[str, BaseMatrix] = {}

    def _refuse(self, problem: str) -> ConfigError:
        return ConfigError("adapter", str(self.folder), problem)

    def _check(self, name: str, m: _Module) -> tuple[int, int]:
        if set(m.keys) != {"A", "B"}:
            have, lack = ("lora_A", "lora_B") if "A" in m.keys else ("lora_B", "lora_A")
            raise self._refuse(f"holds {have} but no {lack} for {name}")
        (k_a, in_dim), (out_dim, k_b) = m.shapes["A"], m.shapes["B"]
        if k_a != k_b:
            raise self._refuse(f"holds factors of {name} that do not multiply: lora_B {m.shapes['B']}, "
                               f"lora_A {m.shapes['A']}")
        r = self.config.rank(name)
        if k_a != r:
            raise self._refuse(f"holds factors of rank {k_a} for {name}, but its {CONFIG_FILE} gives r={r} "
                               "(r, rank_pattern); the scaling α/r would be wrong")
        return out_dim, in_dim

    def attach_base(self, base: BaseWeights) -> None:
        """Read W0 from ``base`` for Table 7; every module's weight is located and checked now."""
        self._base_of = {name: base.locate(name, shape, self.config.fan_in_fan_out)
                         for name, shape in self.shapes.items()}
        self._base = base

    @property
    def has_base(self) -> bool:
        return self._base is not None

    def kind(self) -> str:
        return "dora (s·B·A only)" if self.config.use_dora else "lora"

    def load(self, name: str) -> DeltaW:
        """ΔW of one module as factors, B scaled: B is s·lora_B (float32), A is lora_A (float32)."""
        m = self._modules[name]
        try:
            factors = read_tensors(self.weights, [m.keys["B"], m.keys["A"]])
        except UnreadableTensors as error:  # e.g. the file changed since it was opened
            raise self._refuse(f"cannot be read ({error}); the file is truncated or corrupt") from None
        B, A = factors[m.keys["B"]], factors[m.keys["A"]]
        for part, t in (("lora_B", B), ("lora_A", A)):
            if not torch.isfinite(t).all():
                raise self._refuse(f"holds non-finite values in {part} of {name}; the file is corrupt")
        base = self._base.load(self._base_of[name]) if self._base is not None else None
        return DeltaW(B=self.config.scaling(name) * B.float(), A=A.float(), base=base, kind=self.kind())

    def run(self, label: str) -> RunDeltas:
        """The adapter as a run of the analysis; Table 7's r defaults to each module's factor width."""
        return RunDeltas(label, dict(self.shapes), self.load, {name: True for name in self.shapes}, rank=None)

    def notes(self, label: str) -> list[str]:
        """What the report should say about how this adapter was read."""
        cfg = self.config
        notes = []
        if cfg.use_dora:
            notes.append(f"{label} is a DoRA adapter: analysed is its low-rank direction update s·B·A; the learned "
                         f"magnitude vector ({len(self.magnitudes)} module(s)), which rescales W0 + s·B·A row by "
                         "row, is not part of it, so this is not DoRA's whole ΔW.")
        residual = cfg.residual_init()
        if residual:
            notes.append(f"{label} was initialised with {residual}: unless the adapter was converted, s·B·A updates "
                         "the modified base it was initialised against (a residual or quantized W0), not the "
                         "original model's W0.")
        if self.skipped:
            notes.append(f"{label}: {len(self.skipped)} LoRA module(s) on embeddings or convolutions left out "
                         f"(only linear layers are analysed), e.g. {sorted(self.skipped)[0]}.")
        if self.ignored:
            notes.append(f"{label}: {len(self.ignored)} tensor(s) that are not LoRA factors ignored "
                         f"(modules_to_save, biases, ...), e.g. {self.ignored[0]}.")
        return notes
