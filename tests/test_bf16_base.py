"""model.dtype=bf16: the frozen pre-trained weights in bf16, every trainable parameter in fp32."""
from __future__ import annotations

import pytest
import torch
from conftest import compose_config, method_cfg
from safetensors.torch import load_file

from lora_lab.errors import ConfigError
from lora_lab.methods import build_method
from lora_lab.models.loading import cast_trainable_to_fp32, load_model
from lora_lab.runtime import records

SMOKE = ["experiment=smoke", "model.dtype=bf16"]


def bf16_model(method: str, **overrides):
    cfg = compose_config(*SMOKE)
    model = load_model(cfg.model, 2)
    build_method(method_cfg(method, **overrides)).apply(model)
    cast_trainable_to_fp32(model)
    return model


@pytest.mark.parametrize("method", ["lora", "bitfit", "adapter", "head"])
def test_frozen_weights_are_bf16_and_trainable_ones_fp32(method):
    model = bf16_model(method)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(dtypes[name] == torch.float32 for name in trainable)
    frozen_linear = [n for n in dtypes if n not in trainable and "LayerNorm" not in n]
    assert frozen_linear and all(dtypes[n] == torch.bfloat16 for n in frozen_linear)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "LayerNorm" in n)  # norms whole in fp32


def test_a_run_on_a_bf16_base_trains_and_saves_fp32_state(tmp_path):
    from lora_lab.trainer.train import run_training

    record = run_training(compose_config(*SMOKE, f"data.cache_dir={tmp_path / 'cache'}"), tmp_path / "run")
    assert record["config"]["model"]["dtype"] == "bf16"
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in record["epochs"])
    state = load_file(str(tmp_path / "run" / records.STATE_FILE))
    assert state and all(t.dtype == torch.float32 for t in state.values())
    assert any(t.abs().sum() > 0 for k, t in state.items() if k.endswith("lora_B"))  # it did train


def test_full_fine_tuning_on_a_bf16_base_is_refused_in_one_line():
    from lora_lab.config.validate import check_config

    with pytest.raises(ConfigError, match="model.dtype='bf16': .*full fine-tuning freezes none"):
        check_config(compose_config(*SMOKE, "method=full"))
