"""Section 4: memory per method split into weights, gradients, optimiser state and saved activations."""
from __future__ import annotations

import gc

import torch

from lora_lab.bench.variants import Variant, bench_task

MiB = 1024 * 1024


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class SavedTensorBytes:
    """Bytes of the distinct storages autograd saves for backward, parameters and buffers excluded."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.storages = exclude, {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            key, size = id(t), nbytes(t)
        if key not in self.exclude:
            self.storages[key] = max(size, self.storages.get(key, 0))
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def memory_breakdown(v: Variant, batch: dict, device: torch.device) -> dict:
    """One more training step of a variant, taken apart: weights (every parameter), gradients (what
    backward leaves in .grad), AdamW state (read from the optimiser after the step), activations
    (the tensors one forward saves for backward) and, on CUDA, the peak allocated and reserved memory of
    the step. Those peaks cover everything on the device, the other variants kept there too; the
    ``cuda_own_*`` figures are this variant's alone: what the step added to the memory resident when it
    began, plus the variant's own weights, buffers and AdamW state."""
    model = v.model
    params = list(model.parameters())
    buffers = list(model.buffers())
    exclude = {t.untyped_storage().data_ptr() for t in params + buffers}
    v.optimizer.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the reserved peak is then this step's, not blocks earlier variants left cached
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        reserved_before = torch.cuda.memory_reserved(device)
    saved = SavedTensorBytes(exclude)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), v.autocast():
        loss = model(**batch).loss
    loss.backward()
    grads = sum(nbytes(p.grad) for p in params if p.grad is not None)
    v.optimizer.step()
    optim = sum(nbytes(t) for state in v.optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    out = {
        "weights_mb": sum(nbytes(p) for p in params) / MiB,
        "buffers_mb": sum(nbytes(b) for b in buffers) / MiB,
        "gradients_mb": grads / MiB,
        "trainable_params_mb": sum(nbytes(p) for p in params if p.requires_grad) / MiB,
        "optimizer_state_mb": optim / MiB,
        "activations_saved_mb": saved.total / MiB,
    }
    out["total_mb"] = (out["weights_mb"] + out["buffers_mb"] + out["gradients_mb"] + out["optimizer_state_mb"]
                       + out["activations_saved_mb"])
    if cuda:
        torch.cuda.synchronize(device)
        peak, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        own = out["weights_mb"] + out["buffers_mb"] + out["optimizer_state_mb"]
        out["cuda_peak_allocated_mb"] = peak / MiB
        out["cuda_peak_reserved_mb"] = reserved / MiB
        out["cuda_activations_mb"] = (peak - before - grads) / MiB  # peak minus weights, state and grads
        out["cuda_own_peak_allocated_mb"] = (peak - before) / MiB + own
        out["cuda_own_peak_reserved_mb"] = (reserved - reserved_before) / MiB + own
    v.optimizer.zero_grad(set_to_none=True)
    out["kind"] = "analytic from tensors" + (" + cuda peak allocated" if cuda else "")
    return out


# The ways of fitting a bigger model on one device, each a row of section 3b: (label, base dtype,
# gradient checkpointing). "nf4": the base reloaded in 4-bit NF4 (model.load_in_4bit=true, the
# unquantised modules bf16), on a CUDA GPU with bitsandbytes only; skipped elsewhere.
MEMORY_OPTIONS = {
    "fp32": ("fp32 weights", "fp32", False),
    "checkpointing": ("fp32 + gradient checkpointing", "fp32", True),
    "bf16_base": ("bf16 frozen base (model.dtype=bf16)", "bf16", False),
    "bf16_base_checkpointing": ("bf16 frozen base + gradient checkpointing", "bf16", True),
    "nf4_base": ("4-bit NF4 frozen base (model.load_in_4bit=true, model.dtype=bf16)", "nf4", False),
}


def nf4_unavailable(device: torch.device) -> str | None:
    """Why the 4-bit row cannot run here (no CUDA device, no bitsandbytes), or None when it can."""
    from lora_lab.errors import ConfigError
    from lora_lab.models.quantization import check_4bit_environment

    if device.type != "cuda":
        return f"needs a CUDA GPU; the benchmark runs on {device}"
    try:
        check_4bit_environment()
    except ConfigError as error:
        return error.problem
    return None


def _nf4_base(cfg):
    """The benchmark's model loaded as ``model.load_in_4bit=true`` loads it (the same seed: a random
    model gets the same weights as the base), onto the current CUDA device."""
    from omegaconf import open_dict

    from lora_lab.models.loading import load_model

    model_cfg = cfg.model.copy()
    with open_dict(model_cfg):
        model_cfg.load_in_4bit, model_cfg.dtype = True, "bf16"
    torch.manual_seed(int(cfg.seed))
    return load_model(model_cfg, int(cfg.num_labels), None, task=bench_task(cfg))


def memory_options(cfg, base, batch: dict, device: torch.device) -> tuple[dict, dict]:
    """``memory_options.arm`` under each of ``MEMORY_OPTIONS``: the trainer's own ``model.dtype=bf16``
    (frozen weights bf16, trainable fp32, bf16 autocast), ``trainer.gradient_checkpointing`` and
    ``model.load_in_4bit``. With checkpointing, the saved activations are the layers' inputs and what
    lies outside the layers; backward recomputes one layer at a time on top of them. Returns the
    measured rows and the skipped ones (name -> label and reason). A 4-bit row's weights are the packed
    4-bit tensors, without the quantisation constants bitsandbytes keeps beside them. On CUDA a row's
    ``cuda_own_*`` figures are its peaks minus what the other variants held before the row was built,
    quantisation constants included."""
    import copy

    from lora_lab.bench.variants import build_ours
    from lora_lab.models.loading import cast_trainable_to_fp32, enable_gradient_checkpointing

    rows, skipped = {}, {}
    for name in cfg.memory_options.rows:
        if name not in MEMORY_OPTIONS:
            from lora_lab.errors import ConfigError

            raise ConfigError("memory_options.rows", name, f"must be among {list(MEMORY_OPTIONS)}")
        label, dtype, checkpointing = MEMORY_OPTIONS[name]
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            others = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        if dtype == "nf4":
            reason = nf4_unavailable(device)
            if reason:
                skipped[name] = {"label": label, "reason": reason}
                continue
            model = _nf4_base(cfg)
        else:
            model = copy.deepcopy(base).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
        variant = build_ours(str(cfg.memory_options.arm), model, cfg, device)
        del model
        if dtype in ("bf16", "nf4"):
            cast_trainable_to_fp32(variant.model)
            variant.precision = "bf16"
        if checkpointing:
            enable_gradient_checkpointing(variant.model)
        variant.step(batch)
        rows[name] = row = {"label": f"{variant.label}, {label}", **memory_breakdown(variant, batch, device)}
        if device.type == "cuda":
            row["cuda_own_peak_allocated_mb"] = row["cuda_peak_allocated_mb"] - others[0] / MiB
            row["cuda_own_peak_reserved_mb"] = row["cuda_peak_reserved_mb"] - others[1] / MiB
        del variant
        gc.collect()
    return rows, skipped
