"""A PEFT model that is the twin of one of ours: the same method and settings through ``peft``, with
our weights copied in, so outputs and step times can be compared one to one."""
from __future__ import annotations

import copy

from torch import nn

from lora_lab.errors import ConfigError
from lora_lab.models.architectures import head_parameter_names


def peft_missing() -> str | None:
    """None when peft imports, else a one-line note saying why a comparison is skipped."""
    try:
        import peft  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means: no comparison
        return f"peft is not importable ({type(error).__name__}: {error}); `pip install peft` to compare"
    return None


def build_peft_twin(method, model: nn.Module, base: nn.Module) -> nn.Module:
    """``peft.get_peft_model`` on a copy of ``base`` (the model before ``method`` was applied to
    ``model``), configured by ``method.peft_config`` and loaded with ``method.peft_state_dict``; the
    task head trains as in ours. ConfigError if the method has no PEFT counterpart."""
    import peft

    config = method.peft_config(model)
    if config is None:
        raise ConfigError("method.name", method.name, "has no PEFT counterpart")
    twin = peft.get_peft_model(copy.deepcopy(base), config)
    state = {k: v.detach().clone() for k, v in method.peft_state_dict(model).items()}
    params = dict(twin.named_parameters())
    unknown = sorted(set(state) - set(params) - set(dict(twin.named_buffers())))
    if unknown:
        raise RuntimeError(f"PEFT's {type(config).__name__} model has no parameter {unknown[0]}")
    twin.load_state_dict(state, strict=False)
    head = head_parameter_names(model)
    ours = dict(model.named_parameters())
    for name, p in twin.get_base_model().named_parameters():
        # a classifier PEFT wraps itself (task_type SEQ_CLS: modules_to_save) runs its trainable copy
        name = name.replace(".modules_to_save.default.", ".")
        if name in head and ".original_module." not in name:  # the head trains in both, from our values
            p.requires_grad_(True)
            p.data.copy_(ours[name].detach())
    return twin.to(next(model.parameters()).device)
