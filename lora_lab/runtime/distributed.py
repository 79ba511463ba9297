"""One training run over several processes: PyTorch DistributedDataParallel, launched by ``torchrun``.

    torchrun --nproc_per_node=4 -m lora_lab.cli.main method=lora trainer.batch_size=8 trainer.grad_accum=2

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous) for every process; without it
a run is one process and nothing here communicates. Every process composes the same config and so
lands in the same run directory (its name is a hash of the config, which includes
``trainer.world_size``); only rank 0 writes there (run record, trainable state, ΔW, checkpoints) and
logs to W&B. The backend is NCCL on GPUs (one per process: ``cuda:LOCAL_RANK``), gloo on CPUs.
With ``trainer.strategy=fsdp`` the model is sharded over the ranks instead (lora_lab.runtime.sharding).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from lora_lab.config.launch import launched_world_size


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    strategy: str = "ddp"  # trainer.strategy: ddp (replicated model) | fsdp (sharded: lora_lab.runtime.sharding)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """The model is sharded over the ranks (FSDP): every rank must take part in every forward pass."""
        return self.enabled and self.strategy == "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend,
                **({"strategy": self.strategy} if self.sharded else {})}

    # ------------------------------------------------------------ collectives (no-ops in one process)

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable, produced by this same program), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


def adopt_submitit_environment() -> None:
    """A job that hydra-submitit-launcher started as several tasks (``launcher=slurm_ddp``): torch's
    variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) from submitit's, as torchrun would have set them.
    Called before the config is read: ``trainer.world_size`` comes from WORLD_SIZE."""
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def setup(device_name: str = "auto") -> Distributed:
    """The process group of a ``torchrun`` launch, joined once per process (a multirun's jobs share
    it); a single-process ``Distributed`` without torchrun."""
    world = launched_world_size()
    if world <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    backend = "nccl" if on_gpu else "gloo"
    if not torch_dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend=backend)
    return Distributed(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def device_for(dist: Distributed, device_name: str) -> str:
    """A process's device: on GPUs each rank takes ``cuda:LOCAL_RANK``; a device given with an index
    (``cuda:1``) makes sense for one process only."""
    if not dist.enabled or not (device_name.startswith("cuda") or dist.backend == "nccl"):
        return device_name
    return f"cuda:{dist.local_rank}"
