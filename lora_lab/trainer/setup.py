"""Setting a run up: seed, device, tokenizer, data, model, method, loaders, optimiser and scheduler, in
an order that gives the same random numbers every time (``Run`` holds what comes out)."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lora_lab.config.run_identity import result_config
from lora_lab.config.validate import check_data
from lora_lab.data.loading import Collator, TaskData, load_task_data
from lora_lab.data.sampling import training_loader
from lora_lab.errors import ConfigError
from lora_lab.methods import build_method
from lora_lab.methods.base import Method
from lora_lab.models import quantization
from lora_lab.models.architectures import layer_stack, model_type
from lora_lab.models.loading import (
    cast_trainable_to_fp32,
    enable_gradient_checkpointing,
    is_causal_decoder,
    load_model,
    load_tokenizer,
    pooling_of,
    weights_dtype,
)
from lora_lab.models.precision import autocast, grad_scaler
from lora_lab.runtime import checkpoint, measure, sharding
from lora_lab.runtime.distributed import Distributed, device_for
from lora_lab.runtime.phases import QUIET, Phases
from lora_lab.runtime.seeding import set_seed
from lora_lab.runtime.tracking import Tracker
from lora_lab.tasks.task_types import TaskType, describe, main_metric
from lora_lab.trainer import evaluation
from lora_lab.trainer.evaluation import EvaluationSplits, evaluation_splits
from lora_lab.trainer.optim import Schedule, make_optimizer, make_scheduler, plan_schedule
from lora_lab.trainer.progress import Progress


@dataclass
class Run:
    """Everything a run sets up before training; none of it changes while it trains (see TrainingState)."""
    cfg: DictConfig
    run_dir: Path
    dist: Distributed
    device: torch.device
    amp: Callable[[], AbstractContextManager]  # the run's autocast context (lora_lab.models.precision)
    data: TaskData
    monitor: str  # the validation metric that picks the best epoch
    method: Method
    model: nn.Module  # with the method applied (sharded in place under trainer.strategy=fsdp)
    train_model: nn.Module  # the model, or its DistributedDataParallel wrapper under torchrun (ddp)
    train_loader: DataLoader
    evaluation: EvaluationSplits
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trainable: list[nn.Parameter]  # what the gradient norm is clipped over
    schedule: Schedule
    parameter_counts: dict
    pretrained_baseline: dict | None  # a causal LM's pre-trained model on test; None for other tasks
    result_config: dict  # the settings a checkpoint must have been written with (run_identity.result_config)
    scaler: torch.amp.GradScaler | None = None  # trainer.precision=fp16 on CUDA: the loss scaler
    phases: Phases = QUIET  # the status of each phase between training steps (trainer.progress_bar)
    shell: nn.Module | None = None  # trainer.strategy=fsdp: the unsharded model's structure (sharding.meta_copy)

    @property
    def task(self) -> TaskType:
        return self.data.task

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / checkpoint.CHECKPOINT_DIR

    @property
    def checkpoint_every(self) -> int:
        """Steps between checkpoints; 0: no checkpoints (and no resuming)."""
        return int(self.cfg.trainer.get("checkpoint_every") or 0)

    def say(self, line: str) -> None:
        """One line on stdout, from rank 0 only."""
        if self.is_main:
            print(line)


def set_up(cfg, run_dir: Path, dist: Distributed) -> Run:
    """Everything the run needs before training, ready on its device. The seed is set again just
    before the model loads, so a random model and a fresh head come out the same whatever was loaded
    before (lora_lab.peft.export rebuilds a run's model that way)."""
    tcfg = cfg.trainer
    dist = replace(dist, strategy=tcfg.get("strategy") or "ddp")
    monitor = main_metric(cfg.data)
    method = build_method(cfg.method)  # validates the method's settings before anything is loaded
    device = resolve_device(device_for(dist, tcfg.device))
    set_seed(cfg.seed)
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg.threads))
    phases = Phases(tcfg.progress_bar, active=dist.is_main)
    with phases.phase("loading the tokenizer and data"):
        tokenizer = load_tokenizer(cfg.model)
        data = load_task_data(cfg.data, tokenizer)
    check_data(cfg, data)
    amp = autocast_context(cfg, device)
    collator = Collator(data.pad_token_id, cfg.data.padding, cfg.data.max_length,
                        torch.float if data.regression else torch.long)
    splits = evaluation_splits(cfg, data, tokenizer, collator, monitor)
    set_seed(cfg.seed)
    with phases.phase("loading the model"):
        model = load_model(cfg.model, data.num_labels, data.label_names, task=data.task.head,
                           pad_token_id=tokenizer.pad_token_id)
    pretrained = _pretrained_baseline(cfg, run_dir, model, splits, device, amp, data.task, dist)
    train_loader = training_loader(data.splits["train"], tcfg.batch_size, collator, seed=cfg.seed,
                                   rank=dist.rank, world_size=dist.world_size)  # draws no random numbers
    schedule = plan_schedule(tcfg, train_loader.batch_sampler.batches_per_epoch())
    method.total_steps = schedule.total_steps  # before apply: a method may plan by it (AdaLoRA's budget)
    train_model, counts, shell = _apply_method(cfg, model, method, collator, dist, device)
    optimizer = make_optimizer(model, tcfg.lr, tcfg.weight_decay, method.lr_scales(model))
    scheduler = make_scheduler(optimizer, tcfg.get("schedule") or "linear", schedule.warmup_steps, schedule.total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Run(cfg, run_dir, dist, device, amp, data, monitor, method, model, train_model, train_loader, splits,
               optimizer, scheduler, trainable, schedule, counts, pretrained,
               result_config(OmegaConf.to_container(cfg, resolve=True)), grad_scaler(device, tcfg.precision), phases,
               shell)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device", name, "CUDA is not available on this machine")
    return torch.device(name)


def autocast_context(cfg, device: torch.device) -> Callable[[], AbstractContextManager]:
    # bf16 weights need bf16 matmuls on every device; an fp32 base autocasts on GPUs only (trainer.precision)
    bf16_weights = weights_dtype(cfg.model) == torch.bfloat16
    precision = "bf16" if bf16_weights else cfg.trainer.precision
    return partial(autocast, device, precision, on_cpu=bf16_weights)


def _pretrained_baseline(cfg, run_dir: Path, model, splits: EvaluationSplits, device, amp, task: TaskType,
                         dist: Distributed) -> dict | None:
    """A causal LM's baseline is the pre-trained model: evaluated once, before the method changes it (a
    resumed run reads it from its checkpoint). None for other tasks."""
    if task.head != "lm":
        return None
    resumable = cfg.trainer.get("resume", True) and dist.is_main
    known = checkpoint.peek_progress(run_dir / checkpoint.CHECKPOINT_DIR) if resumable else None
    pretrained = dist.broadcast((known or {}).get("baseline"))
    if pretrained is None:
        pretrained = evaluation.pretrained_baseline(model, splits.loaders["test"], splits.gold["test"], device, amp,
                                                    task, dist, splits.generators.get("test"))
    return pretrained


def _apply_method(cfg, model, method: Method, collator: Collator, dist: Distributed,
                  device: torch.device) -> tuple[nn.Module, dict, nn.Module | None]:
    """Apply the method and move the model to its device. Returns the module that trains (the model,
    its DDP wrapper, or the model sharded in place), the model's parameter counts (of the whole model)
    and, when sharded, its unsharded structure (``sharding.meta_copy``)."""
    if is_causal_decoder(model_type(model)):  # GPT-2 would add token-type embeddings an encoder's tokenizer asks for
        collator.token_types = False
    method.apply(model)
    cast_trainable_to_fp32(model)  # a bf16 base (model.dtype) trains fp32 parameters
    if cfg.trainer.get("gradient_checkpointing"):
        enable_gradient_checkpointing(model)
    quantization.to_device(model, device)
    counts = measure.parameter_counts(model, method)
    shell = None
    if dist.sharded:  # the optimiser is made afterwards, over the shards
        shell = sharding.meta_copy(model)
        sharding.shard_model(model, layer_stack(model)[1], dist.world_size, device, cfg.trainer.precision)
        train_model = model
    else:
        train_model = wrap_distributed(model, method, dist, device)
    if dist.enabled:  # the same initial weights on every rank, then dropout masks of each rank's own
        torch.manual_seed(cfg.seed * 1_000 + dist.rank)
    return train_model, counts, shell


def wrap_distributed(model, method, dist: Distributed, device: torch.device):
    """DistributedDataParallel over the ranks (the model itself in one process): gradients of the
    trainable parameters are averaged across ranks after every optimiser step's last micro-batch."""
    if not dist.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=method.needs_unused_parameter_search)


def describe_run(run: Run, progress: Progress, tracker: Tracker) -> dict:
    """What the record says about the run besides its results (task, baseline, parameter counts, split
    sizes, device), logged to W&B's summary too; and one line on what trains."""
    counts, schedule = run.parameter_counts, run.schedule
    info = {"task": describe(run.cfg.data, run.data.label_names, generation=bool(run.evaluation.generators)),
            "baseline": {k: v for k, v in progress.baseline.items() if k != "generations"},
            "parameters": counts, "data_sizes": {k: len(v) for k, v in run.data.splits.items()},
            "model_resolved": {"pooling": pooling_of(run.cfg.model, run.task.head)},
            "device": str(run.device), "distributed": run.dist.describe()}
    if run.task.name == "classification":  # kept for tools that read records written before "baseline"
        info["majority_class_test_accuracy"] = info["baseline"]["test"]["accuracy"]
    tracker.summary({**{f"parameters/{k}": v for k, v in counts.items()},
                     **{f"task/{k}": info["task"][k] for k in ("name", "type", "main_metric")},
                     **{f"baseline/{k}": v for k, v in info["baseline"]["test"].items()}})
    run.say(f"[lora_lab] {run.method.name}: {counts['trainable']:,} trainable of {counts['total']:,} "
            f"({counts['trainable_percent']:.3f} %), {schedule.steps_per_epoch} steps/epoch"
            f"{f' of {schedule.accum} micro-batches' if schedule.accum > 1 else ''} on {run.device}"
            f"{f' x {run.dist.world_size} processes' if run.dist.enabled else ''}"
            f"{' (sharded: fsdp)' if run.dist.sharded else ''}")
    return info
