"""Gradient accumulation keeps the global batch with smaller micro-batches; gradient checkpointing
trades compute for activation memory. Neither changes what is learned."""
import pytest
import torch
from conftest import compose_config, method_cfg

from lora_lab.errors import ConfigError
from lora_lab.methods import available_methods, build_method
from lora_lab.models.loading import enable_gradient_checkpointing, load_model
from lora_lab.trainer.train import run_training

EXACT = ["experiment=smoke", "logger=disabled", "model.dropout=0", "data.padding=max_length", "trainer.epochs=2",
         "trainer.max_grad_norm=null"]


def trained_state(run_dir):
    from lora_lab.runtime import records

    return records.load_file(str(run_dir / records.STATE_FILE))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_micro_batches_of_4_train_like_one_batch_of_8(tmp_path, method):
    common = [*EXACT, f"data.cache_dir={tmp_path / 'cache'}", f"method={method}"]
    whole = run_training(compose_config(*common, "trainer.batch_size=8"), tmp_path / "whole")
    accumulated = run_training(compose_config(*common, "trainer.batch_size=4", "trainer.grad_accum=2"),
                               tmp_path / "accumulated")
    assert [e["step"] for e in accumulated["epochs"]] == [e["step"] for e in whole["epochs"]] == [8, 16]
    a, b = trained_state(tmp_path / "whole"), trained_state(tmp_path / "accumulated")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    for key in ("validation/accuracy", "test/accuracy", "test/macro_f1"):
        assert accumulated["best"][key] == pytest.approx(whole["best"][key], abs=1e-6)
    assert accumulated["epochs"][0]["train_loss"] == pytest.approx(whole["epochs"][0]["train_loss"], rel=1e-5)


def test_a_short_last_group_still_steps(tmp_path):
    """64 examples in micro-batches of 8 with grad_accum=3: groups of 3, 3 and 2 per epoch."""
    record = run_training(compose_config(*EXACT, f"data.cache_dir={tmp_path / 'c'}", "trainer.grad_accum=3",
                                         "method=lora"), tmp_path / "run")
    assert [e["step"] for e in record["epochs"]] == [3, 6]


@pytest.mark.parametrize("name", available_methods())
def test_gradient_checkpointing_gives_the_same_gradients(name):
    cfg = compose_config("model=tiny", "model.dropout=0")

    def gradients(checkpointing: bool) -> dict:
        torch.manual_seed(0)
        model = load_model(cfg.model, 2)
        method = build_method(method_cfg(name))
        method.apply(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        ids = torch.randint(5, 1000, (4, 12), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys() and plain
    for key in plain:
        assert torch.allclose(plain[key], recomputed[key], atol=1e-6), key


def test_gradient_checkpointing_run_and_encoder_flag(tmp_path):
    from lora_lab.models.loading import load_model as load

    cfg = compose_config("model=tiny", "model.pooling=mean")
    model = load(cfg.model, 2)
    enable_gradient_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    record = run_training(compose_config("experiment=smoke", "logger=disabled", f"data.cache_dir={tmp_path / 'c'}",
                                         "trainer.gradient_checkpointing=true"), tmp_path / "run")
    assert record["status"] == "completed"


def test_a_model_without_checkpointing_support_is_one_line():
    with pytest.raises(ConfigError, match="trainer.gradient_checkpointing=True: Linear does not support it"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_grad_accum_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="trainer.grad_accum=0"):
        run_training(compose_config("experiment=smoke", "trainer.grad_accum=0"), tmp_path / "run")
