"""The variants the benchmark times: arms (conf/arm) of our methods, the frozen-backbone limit, and
the PEFT twin of every arm whose method has a PEFT counterpart."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lora_lab.config.compose import arm_method
from lora_lab.errors import ConfigError
from lora_lab.methods import Method, build_method
from lora_lab.models.precision import autocast, check_precision

REFERENCE = "frozen"
CONTROL = "frozen_copy"
TWIN_PREFIX = "peft_"
_FROZEN_LABELS = {REFERENCE: "frozen-backbone limit", CONTROL: "frozen-backbone limit, 2nd copy (A/A)"}


BENCH_TASKS = ("sequence", "lm")


def bench_task(cfg) -> str:
    """What the benchmark's model is: a sequence classifier (``head=sequence``) or, for a decoder, its causal
    language model (``head=lm``: methods whose PEFT twin exists only there, prefix and prompt tuning)."""
    head = str(cfg.get("head", "sequence"))
    if head not in BENCH_TASKS:
        raise ConfigError("head", head, f"must be one of {list(BENCH_TASKS)}")
    return head


def precision_of(cfg) -> str:
    """fp32 or bf16: the benchmark's steps run without the loss scaler fp16 would need on a GPU."""
    precision = check_precision(str(cfg.get("precision", "fp32")), key="precision")
    if precision == "fp16":
        raise ConfigError("precision", precision, "the benchmark measures fp32 and bf16 (fp16 training needs a "
                          "loss scaler its steps do not have); use precision=bf16")
    return precision


# the run length methods that plan by it (AdaLoRA's rank budget) are told: longer than any benchmark, so
# a benchmark's steps are those of the start of a run
BENCH_SCHEDULE_STEPS = 10_000


def method_config(arm: str, cfg):
    """The method config of an arm, with the benchmark's ``arm_overrides`` applied."""
    from hydra.errors import MissingConfigException

    try:
        return arm_method(arm, list(cfg.get("arm_overrides") or []))
    except MissingConfigException:
        raise ConfigError("arms", arm, "is not an arm of conf/arm (full, head, houlsby, lora_r8, ...)") from None


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    method: Method | None = None
    precision: str = "fp32"
    label: str = ""
    steps: int = 0

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def autocast(self):
        return autocast(next(self.model.parameters()).device, self.precision, on_cpu=True, key="precision")

    def step(self, batch: dict) -> None:
        """One training step as the trainer takes it, with the method's own loss term and per-step call."""
        with self.autocast():
            loss = self.model(**batch).loss
            extra = self.method.extra_loss(self.model) if self.method is not None else None
        (loss if extra is None else loss + extra).backward()
        self.optimizer.step()
        if self.method is not None:
            self.steps += 1
            self.method.after_optimizer_step(self.model, self.steps)
        self.optimizer.zero_grad(set_to_none=True)


def _optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    from lora_lab.trainer.optim import make_optimizer

    return make_optimizer(model, float(cfg.lr), 0.01)


def build_ours(arm: str, base: nn.Module, cfg, device: torch.device) -> Variant:
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(base)
    method = build_method(method_config(arm, cfg))
    method.total_steps = BENCH_SCHEDULE_STEPS  # a schedule for methods that plan by it (AdaLoRA's budget)
    method.apply(model)
    model.to(device).train()
    return Variant(arm, model, _optimizer(model, cfg), method, precision_of(cfg), method.label())


def _outputs_require_grad(module, inputs, output):
    return output if output.requires_grad else output.detach().requires_grad_(True)


def build_frozen(name: str, base: nn.Module, cfg, device: torch.device) -> Variant:
    """Head-only training with gradients forced down to the embedding output: the frozen-backbone limit. A
    causal LM's head is its tied embedding matrix, so there one scalar on the embedding output trains instead."""
    if bench_task(cfg) == "lm":
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(base)
        model.requires_grad_(False)
        model.bench_scale = nn.Parameter(torch.ones(()))
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out * model.bench_scale)
        model.to(device).train()
        return Variant(name, model, _optimizer(model, cfg), None, precision_of(cfg), _FROZEN_LABELS[name])
    variant = build_ours("head", base, cfg, device)
    variant.name, variant.label = name, _FROZEN_LABELS[name]
    variant.model.get_input_embeddings().register_forward_hook(_outputs_require_grad)
    return variant


def build_peft(ours: Variant, base: nn.Module, cfg, device: torch.device) -> Variant:
    """PEFT's version of an arm, holding the same weights as ours (see lora_lab.bench.peft_twin)."""
    from lora_lab.bench.peft_twin import build_peft_twin

    twin = build_peft_twin(ours.method, ours.model, base).to(device).train()
    return Variant(TWIN_PREFIX + ours.name, twin, _optimizer(twin, cfg), precision=precision_of(cfg),
                   label=f"PEFT {ours.label}")


def synthetic_batch(model: nn.Module, num_labels: int, batch_size: int, seq_len: int, seed: int,
                    device: torch.device) -> dict:
    """Random token ids (clear of the low ids where vocabularies keep special tokens), no padding; labels
    are classes for a classifier, the ids themselves (next-token prediction) for a causal LM."""
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    low = min(1000, vocab // 2)
    ids = torch.randint(low, vocab, (batch_size, seq_len), generator=g)
    labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    if getattr(model, "get_output_embeddings", lambda: None)() is not None:  # a language model's own head
        labels = ids.clone()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}
