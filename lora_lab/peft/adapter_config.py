"""The settings of a PEFT LoRA adapter (adapter_config.json) that decide its ΔW: rank, alpha and scaling per module.

PEFT scales the update by s = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``, where a
module's r and alpha come from ``rank_pattern`` / ``alpha_pattern`` when a pattern key matches its
name (PEFT's rule: the key, a regular expression, matches the whole name or a dotted suffix of it; the
first matching key wins), else from ``r`` / ``lora_alpha``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_lab.errors import ConfigError, first_line
from lora_lab.peft.importer import lora_scaling
from lora_lab.peft.names import base_changing_init


def pattern_value(patterns: dict, module: str, default):
    """The value of the first pattern key matching ``module`` as PEFT matches it, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraAdapterConfig:
    """What the analysis needs from adapter_config.json; ``read`` refuses anything but a LoRA adapter."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_dora: bool = False
    target_modules: list[str] | str | None = None
    base_model: str | None = None
    init: object = True
    lora_bias: bool = False

    @classmethod
    def read(cls, path: Path) -> LoraAdapterConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError("adapter", str(path), f"cannot be read as JSON ({first_line(error)})") from None
        if not isinstance(raw, dict):
            raise ConfigError("adapter", str(path), "is not a JSON object")
        peft_type = raw.get("peft_type")
        if str(peft_type).upper() != "LORA":
            raise ConfigError("adapter", str(path), f"is a PEFT {peft_type} adapter; only LoRA adapters "
                              "(peft_type LORA) have the B A factors this analysis reads")
        if raw.get("target_parameters"):
            raise ConfigError("adapter", str(path), "adapts parameters (target_parameters), not modules; "
                              "only module LoRA is analysed")
        for key in ("r", "lora_alpha"):
            value = raw.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError("adapter", str(path), f"has {key}={value!r}; expected a positive number")
        patterns = {}
        for key in ("rank_pattern", "alpha_pattern"):
            value = raw.get(key) or {}
            if not isinstance(value, dict):
                raise ConfigError("adapter", str(path), f"has a {key} that is not a JSON object")
            for pattern in value:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ConfigError("adapter", str(path), f"has {key} key {pattern!r} that is not a regular "
                                      f"expression ({error})") from None
            patterns[key] = value
        return cls(path=path, r=int(raw["r"]), lora_alpha=float(raw["lora_alpha"]),
                   use_rslora=bool(raw.get("use_rslora")), rank_pattern=patterns["rank_pattern"],
                   alpha_pattern=patterns["alpha_pattern"], fan_in_fan_out=bool(raw.get("fan_in_fan_out")),
                   use_dora=bool(raw.get("use_dora")), target_modules=raw.get("target_modules"),
                   base_model=raw.get("base_model_name_or_path") or None,
                   init=raw.get("init_lora_weights", True), lora_bias=bool(raw.get("lora_bias")))

    def rank(self, module: str) -> int:
        return int(pattern_value(self.rank_pattern, module, self.r))

    def alpha(self, module: str) -> float:
        return float(pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scaling(self, module: str) -> float:
        return lora_scaling(self.alpha(module), self.rank(module), self.use_rslora)

    def scaling_rule(self) -> str:
        rule = "α/√r (rsLoRA)" if self.use_rslora else "α/r"
        if self.rank_pattern or self.alpha_pattern:
            rule += ", r and α per module from rank_pattern/alpha_pattern"
        return rule

    def residual_init(self) -> str | None:
        """The init_lora_weights after which B A updates a residual base (PiSSA, OLoRA, ...), if any."""
        return base_changing_init(self.init)

    def label(self) -> str:
        """A row name in the report, like a lora_lab run's: "PEFT LoRA r=8 α=16" ("r=8*": rank_pattern
        gives some modules another r). The adapted types are listed by the report itself."""
        name = "PEFT DoRA" if self.use_dora else "PEFT LoRA"
        text = f"{name} r={self.r}{'*' if self.rank_pattern else ''} α={self.lora_alpha:g}"
        return text + (" rsLoRA" if self.use_rslora else "")
