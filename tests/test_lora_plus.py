"""LoRA+ (``method.lr_ratio``): the B factors of LoRA and DoRA train at lr_ratio times the learning rate of
everything else, through the method's ``lr_scales`` and the trainer's optimiser; null leaves the optimiser
as it was."""
from __future__ import annotations

import pytest
import torch
from conftest import batch, compose_config, method_cfg, tiny_bert

from lora_lab.config.validate import check_config
from lora_lab.errors import ConfigError
from lora_lab.methods import build_method
from lora_lab.trainer.optim import make_optimizer, make_scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LABELS = torch.tensor([0, 1, 0, 1])


def applied(name: str, **overrides):
    model = tiny_bert()
    method = build_method(method_cfg(name, **overrides))
    method.apply(model)
    return method, model


def group_of(optimizer, param) -> dict:
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_b_factors_get_lr_ratio_times_the_learning_rate(name):
    method, model = applied(name, lr_ratio=16)
    optimizer = make_optimizer(model, 1e-3, 0.01, method.lr_scales(model))
    params = dict(model.named_parameters())
    b_names = {n for n in params if n.endswith(".lora_B")}
    assert b_names and set(method.lr_scales(model)) == b_names
    for n, p in params.items():
        if p.requires_grad:
            assert group_of(optimizer, p)["lr"] == pytest.approx(16e-3 if n in b_names else 1e-3), n
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in params.values())
    # the schedule scales both groups alike: the ratio holds at every step of the warm-up and decay
    scheduler = make_scheduler(optimizer, "linear", 2, 6)
    b_group, a_group = group_of(optimizer, params[sorted(b_names)[0]]), optimizer.param_groups[0]
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        assert b_group["lr"] == pytest.approx(16 * a_group["lr"]) and a_group["lr"] > 0


def test_one_step_moves_b_with_its_own_lr():
    """Adam's first step moves each weight by lr (sign of the gradient, no weight decay): B by 16 x A's."""
    method, model = applied("lora", lr_ratio=16)
    optimizer = make_optimizer(model, 1e-3, 0.0, method.lr_scales(model))
    params = dict(model.named_parameters())
    a, b = "bert.encoder.layer.0.attention.self.query.lora_A", "bert.encoder.layer.0.attention.self.query.lora_B"
    with torch.no_grad():  # B non-zero so that A gets a gradient too
        params[b].normal_(0, 0.1)
    before = {n: params[n].detach().clone() for n in (a, b)}
    model.train()
    model(**batch(), labels=LABELS).loss.backward()
    optimizer.step()
    for name, lr in ((a, 1e-3), (b, 16e-3)):
        moved = (params[name].detach() - before[name]).abs()
        has_grad = params[name].grad.abs() > 1e-6  # Adam's first step: lr * g / (|g| + eps) ~ lr
        assert torch.allclose(moved[has_grad], torch.full_like(moved[has_grad], lr), rtol=1e-2), name


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_lr_ratio_null_gives_todays_optimiser(name):
    method, model = applied(name)
    assert method.lr_scales(model) == {}
    optimizer = make_optimizer(model, 1e-3, 0.01, method.lr_scales(model))
    reference = make_optimizer(model, 1e-3, 0.01)
    assert len(optimizer.param_groups) == len(reference.param_groups) == 2
    for group, ref in zip(optimizer.param_groups, reference.param_groups):
        assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in ref.items() if k != "params"}
        assert [id(p) for p in group["params"]] == [id(p) for p in ref["params"]]
    assert optimizer.param_groups[0]["weight_decay"] == 0.01 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert "LoRA+" not in method.label()


@pytest.mark.parametrize("value", [0, -2, "abc", True])
def test_a_bad_lr_ratio_is_one_line(value):
    cfg = compose_config("model=tiny", "method=lora")
    cfg.method.lr_ratio = value
    with pytest.raises(ConfigError, match=r"^method\.lr_ratio=.*must be null or a number > 0") as error:
        check_config(cfg)
    assert "\n" not in str(error.value)


def test_lr_ratio_shows_in_the_label_and_keeps_old_run_identities():
    from lora_lab.config.run_identity import result_config

    method, _ = applied("lora", lr_ratio=16)
    assert "LoRA+ λ=16" in method.label()
    config = {"method": dict(method_cfg("lora"))}
    assert "lr_ratio" not in result_config(config)["method"]  # null: the identity runs had before the key
    assert result_config({"method": {**config["method"], "lr_ratio": 16}})["method"]["lr_ratio"] == 16


def test_the_trainer_builds_its_optimiser_from_the_methods_scales(tmp_path, monkeypatch):
    from lora_lab.trainer import setup
    from lora_lab.trainer.train import run_training

    built = []

    def recording(model, lr, weight_decay, lr_scales=None):
        built.append(make_optimizer(model, lr, weight_decay, lr_scales))
        return built[-1]

    monkeypatch.setattr(setup, "make_optimizer", recording)
    cfg = compose_config("experiment=smoke", "logger=disabled", "method=lora", "method.lr_ratio=4", "trainer.lr=1e-3",
                         "trainer.threads=1", "trainer.max_steps=2", f"data.cache_dir={tmp_path / 'cache'}")
    threads = torch.get_num_threads()
    try:
        record = run_training(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    assert record["status"] == "completed"
    (optimizer,) = built
    lrs = sorted({g["initial_lr"] for g in optimizer.param_groups if g["params"]})
    assert lrs == [pytest.approx(1e-3), pytest.approx(4e-3)]
