"""The variants the benchmark times: our methods, the frozen-backbone limit, PEFT's LoRA."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lora_lab.architectures import head_parameter_names, resolve_targets
from lora_lab.errors import ConfigError
from lora_lab.methods import build_method


CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
REFERENCE = "frozen"
CONTROL = "frozen_copy"
_LORA_SPEC = re.compile(r"^lora_r(\d+)$")
_PEFT_SPEC = re.compile(r"^peft_lora_r(\d+)$")


def method_config(spec: str, cfg) -> DictConfig:
    """The method config of a benchmark name: full | head | houlsby | pfeiffer | lora_r<N>."""
    def load(name: str) -> DictConfig:
        return OmegaConf.load(CONFIG_DIR / "method" / f"{name}.yaml")

    lora = _LORA_SPEC.match(spec)
    if spec in ("full", "head"):
        m = load(spec)
        if spec == "head":
            m.top_layers = 0
    elif spec in ("houlsby", "pfeiffer"):
        m = load("adapter")
        m.variant = spec
    elif lora:
        m = load("lora")
        m.r, m.dropout, m.targets = int(lora.group(1)), 0.0, list(cfg.lora_targets)
    else:
        raise ConfigError("methods", spec, "unknown; use full, head, houlsby, pfeiffer or lora_r<N>")
    return m


def label(name: str, lora_targets) -> str:
    lora, peft = _LORA_SPEC.match(name), _PEFT_SPEC.match(name)
    targets = ",".join(str(t) for t in lora_targets)
    if lora:
        return f"LoRA r={lora.group(1)} ({targets})"
    if peft:
        return f"PEFT LoRA r={peft.group(1)} ({targets})"
    return {REFERENCE: "frozen-backbone limit", CONTROL: "frozen-backbone limit, 2nd copy (A/A)",
            "full": "full fine-tuning", "head": "head only", "houlsby": "Houlsby adapters",
            "pfeiffer": "Pfeiffer adapters"}.get(name, name)


PRECISIONS = ("fp32", "bf16")


def precision_of(cfg) -> str:
    precision = str(cfg.get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise ConfigError("precision", precision, f"must be one of {', '.join(PRECISIONS)}")
    return precision


def autocast(precision: str, device: torch.device):
    """bf16: forward passes autocast to bfloat16 (weights, gradients and AdamW state stay fp32), on
    CUDA as the trainer does, and on CPU too, so that the benchmark can be checked without a GPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    method: object | None = None
    precision: str = "fp32"

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def autocast(self):
        return autocast(self.precision, next(self.model.parameters()).device)

    def step(self, batch: dict) -> None:
        with self.autocast():
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    from lora_lab.train import make_optimizer

    return make_optimizer(model, float(cfg.lr), 0.01)


def build_ours(spec: str, base: nn.Module, cfg, device: torch.device) -> Variant:
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(base)
    method = build_method(method_config(spec, cfg))
    method.apply(model)
    model.to(device).train()
    return Variant(spec, model, _optimizer(model, cfg), method, precision_of(cfg))


def _outputs_require_grad(module, inputs, output):
    return output if output.requires_grad else output.detach().requires_grad_(True)


def build_frozen(name: str, base: nn.Module, cfg, device: torch.device) -> Variant:
    """Head-only training with gradients forced down to the embedding output: the frozen-backbone limit."""
    variant = build_ours("head", base, cfg, device)
    variant.name = name
    variant.model.get_input_embeddings().register_forward_hook(_outputs_require_grad)
    return variant


def peft_missing() -> str | None:
    """None when peft imports, else the note that explains the skipped row."""
    try:
        import peft  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means: no comparison
        return f"peft is not importable ({type(error).__name__}: {error}); `pip install peft` to compare"
    return None


def build_peft(r: int, base: nn.Module, cfg, device: torch.device) -> Variant:
    """PEFT's LoRA with our LoRA's settings: the same target modules (by full name), rank, alpha,
    dropout 0, and the same head parameters training."""
    import peft

    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(base)
    ours = method_config(f"lora_r{r}", cfg)
    targets = sorted({n for names in resolve_targets(model, ours.targets).values() for n in names})
    head = head_parameter_names(model)
    config = peft.LoraConfig(r=r, lora_alpha=float(ours.alpha), lora_dropout=0.0, target_modules=targets,
                             bias="none", use_rslora=bool(ours.rslora))
    wrapped = peft.get_peft_model(model, config)
    for name, p in model.named_parameters():  # ``model`` is the wrapped one's inner model, names unchanged
        if name in head:
            p.requires_grad_(True)
    wrapped.to(device).train()
    return Variant(f"peft_lora_r{r}", wrapped, _optimizer(wrapped, cfg), precision=precision_of(cfg))


def synthetic_batch(model: nn.Module, num_labels: int, batch_size: int, seq_len: int, seed: int,
                    device: torch.device) -> dict:
    """Random token ids (clear of the low ids where vocabularies keep special tokens), no padding."""
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    low = min(1000, vocab // 2)
    ids = torch.randint(low, vocab, (batch_size, seq_len), generator=g)
    labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}
