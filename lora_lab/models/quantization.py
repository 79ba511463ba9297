"""``model.load_in_4bit=true``: the frozen pre-trained weights in 4-bit NF4, as QLoRA (Dettmers et al.
2023) trains: bitsandbytes' NormalFloat4 with double quantisation (the block scales quantised too),
bf16 matmuls, and everything that trains (the method's parameters, the task head) unquantised in fp32
(``modeling.cast_trainable_to_fp32``). transformers quantises the linear layers of the backbone while
loading and keeps the last layer (the task head or LM head) unquantised.

bitsandbytes is imported only when a 4-bit model is asked for (``pip install "lora_lab[quantization]"``)
and needs a CUDA GPU; the model is placed on the current CUDA device as it loads (under torchrun,
each rank's own), since a quantised model is not moved afterwards.
"""
from __future__ import annotations

import importlib.util

import torch
from transformers import BitsAndBytesConfig

from lora_lab.errors import ConfigError

KEY = "model.load_in_4bit"
INSTALL = 'pip install "lora_lab[quantization]"'
COMPUTE_DTYPES = ("fp32", "bf16")  # model.dtype: what the unquantised modules (embeddings, norms, head) hold


def wants_4bit(model_cfg) -> bool:
    return bool(model_cfg.get("load_in_4bit"))


def check_4bit_settings(cfg) -> None:
    """What a 4-bit base refuses in the config itself, on any machine: a device other than the GPU it is
    loaded on, a dtype it cannot compute in. A method that trains every weight refuses it itself
    (``Method.check_model``)."""
    model = cfg.model
    if not wants_4bit(model):
        return
    dtype = model.get("dtype") or "fp32"
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError("model.dtype", dtype, f"must be one of {list(COMPUTE_DTYPES)} with {KEY}=true")
    device = (cfg.get("trainer") or {}).get("device", "auto")
    if device not in ("auto", "cuda"):
        raise ConfigError("trainer.device", device, f"must be auto or cuda with {KEY}=true (the 4-bit base is "
                          "placed on the current CUDA device as it loads)")


def check_4bit_environment() -> None:
    """A CUDA GPU and bitsandbytes are here; checked before anything is loaded (not in dry runs, which
    plan GPU experiments on any machine)."""
    if not torch.cuda.is_available():
        raise ConfigError(KEY, True, "needs a CUDA GPU (bitsandbytes NF4); none is available")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(KEY, True, f"needs bitsandbytes, which is not installed: {INSTALL}")


def nf4_config():
    """The QLoRA quantisation: NF4, double quantisation, bf16 compute. Built without bitsandbytes."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_kwargs() -> dict:
    """What ``from_pretrained`` needs to load a 4-bit base onto the current CUDA device."""
    check_4bit_environment()
    return {"quantization_config": nf4_config(), "device_map": {"": torch.cuda.current_device()}}


def is_4bit(model) -> bool:
    """Whether ``model`` holds bitsandbytes 4-bit weights (it stays on the device it was loaded on)."""
    return bool(getattr(model, "is_loaded_in_4bit", False))


def to_device(model, device) -> None:
    """``model.to(device)``, except for a 4-bit model: it stays on the GPU it was loaded on (transformers
    refuses to move one)."""
    if not is_4bit(model):
        model.to(device)
