"""``trainer.strategy=fsdp``: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) over the ranks of a
``torchrun`` launch, instead of DistributedDataParallel.

Every transformer block (``architectures.layer_stack``) is sharded on its own, then the root module (the
embeddings, the head and anything outside the blocks): each rank keeps 1/world_size of every parameter, its
gradient and its optimiser state, as DTensors; a block's full parameters exist only while it runs forward or
backward. Gradients are reduce-scattered (averaged) after every micro-batch.

What reads or writes parameters outside the training step sees full tensors: ``full_state`` gathers them
(every rank takes part; a collective), ``shard_like`` cuts a full tensor down to a parameter's shard, and
``materialise`` fills an unsharded copy of the model on rank 0 at the end of training, so that the end of
the run (best state, ΔW, merged-latency measurement) runs on an ordinary module as under DDP.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

STRATEGIES = ("ddp", "fsdp")


def _fsdp():
    from torch.distributed import fsdp

    return fsdp


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, _fsdp().FSDPModule)


def is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def mixed_precision(device: torch.device, precision: str):
    """bf16 parameters in forward and backward, fp32 gradient reduction, for ``trainer.precision=bf16`` on
    CUDA (where the run autocasts to bf16 anyway); fp32 everywhere else."""
    fsdp = _fsdp()
    if device.type == "cuda" and precision == "bf16":
        return fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return fsdp.MixedPrecisionPolicy()


def shard_model(model: nn.Module, blocks: nn.ModuleList, world_size: int, device: torch.device,
                precision: str) -> None:
    """``fully_shard`` every block of ``blocks`` and then ``model`` itself, over all ranks (in place)."""
    from torch.distributed.device_mesh import init_device_mesh

    fsdp = _fsdp()
    mesh = init_device_mesh(device.type, (world_size,))
    policy = mixed_precision(device, precision)
    for block in blocks:
        fsdp.fully_shard(block, mesh=mesh, mp_policy=policy)
    fsdp.fully_shard(model, mesh=mesh, mp_policy=policy)


def reshard(model: nn.Module) -> None:
    """Back to the sharded parameters: after a forward pass without gradients FSDP2 may leave a module's
    full parameters (in the compute dtype) in place of its shards; reading or writing those would miss the
    real ones."""
    for module in model.modules():
        if isinstance(module, _fsdp().FSDPModule):
            module.reshard()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a DTensor (every rank must call this, in the same order); any other tensor as it is."""
    if not is_dtensor(tensor):
        return tensor
    with torch.no_grad():
        return tensor.full_tensor()


def full_state(model: nn.Module, trainable_only: bool = True, device: str | torch.device = "cpu") -> dict:
    """Every (trainable) parameter of a sharded model, whole, on ``device``: a collective, on every rank."""
    reshard(model)
    return {name: full(p.detach()).to(device) for name, p in model.named_parameters()
            if p.requires_grad or not trainable_only}


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor cut down to ``param``'s shard (a DTensor like it); ``value`` itself for a plain parameter.
    Every rank holds the full value, so nothing is communicated."""
    if not is_dtensor(param) or is_dtensor(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.detach().to(param.device_mesh.device_type), param.device_mesh, param.placements,
                             src_data_rank=None)


def gathered(tensors: dict[str, torch.Tensor], device: torch.device, keep: bool) -> dict[str, torch.Tensor]:
    """Whole copies of sharded tensors on the rank that keeps them ({} on the others), gathered one at a
    time so that no rank holds more than one whole tensor it does not keep. Every rank must call this."""
    out = {}
    for name, tensor in tensors.items():
        value = full(tensor.detach())
        if keep:
            out[name] = value.to(device)
    return out


def _indexed_params(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def shard_optimizer_state(state: dict, optimizer) -> dict:
    """A state dict of whole tensors (``full_optimizer_state``, or one process's) for an optimiser over
    sharded parameters: each state tensor shaped like its parameter becomes that parameter's shard."""
    params = _indexed_params(optimizer)
    out = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        out[index] = {key: shard_like(value, param) if torch.is_tensor(value) and value.dim() > 0
                      and tuple(value.shape) == tuple(param.shape) else value for key, value in entry.items()}
    return {"state": out, "param_groups": state["param_groups"]}


def meta_copy(model: nn.Module) -> nn.Module:
    """The model's structure with its parameters on the meta device (no memory) and copies of its buffers:
    taken before sharding, filled by ``materialise``."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def materialise(model: nn.Module, shell: nn.Module, device: torch.device, keep: bool) -> nn.Module | None:
    """The sharded ``model``'s full parameters and buffers put into ``shell`` (its ``meta_copy``), on the rank
    that keeps it (rank 0; the others return None). Every rank must call this. Parameters tied in the model
    stay tied in the copy."""
    reshard(model)
    whole = gathered(dict(model.named_parameters()), device, keep)
    if not keep:
        return None
    made = {id(meta): nn.Parameter(whole[name], requires_grad=meta.requires_grad)
            for name, meta in shell.named_parameters()}
    for module in shell.modules():
        for leaf, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[leaf] = made[id(param)]
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        shell.get_submodule(owner)._buffers[leaf] = buffer.detach().clone()
    return shell
