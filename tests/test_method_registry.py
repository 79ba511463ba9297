"""What every method must do, tested alike for each registered method from what its class declares:
the trainable count its formula gives, gradients exactly on what it trains, merged outputs equal to
unmerged ones where it merges, ΔW of the adapted matrices' shapes, its trained state saved and loaded
back, settings' rules that name their key.

A method written outside lora_lab (a module in a folder of its own, its config in a config folder of
its own, no file of the project changed) is registered from its config alone, passes the same checks
and trains through the real trainer."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
from conftest import batch, compose_config, method_cfg, tiny_bert
from omegaconf import OmegaConf

from lora_lab.config.compose import arm_method
from lora_lab.config.validate import check_config
from lora_lab.errors import ConfigError
from lora_lab.methods import available_methods, build_method, describe_method, method_class, registered_methods
from lora_lab.methods import base as methods_base
from lora_lab.models.linear_layers import dense_weight
from lora_lab.runtime import checkpoint, records
from lora_lab.runtime.rebuild import load_run_deltas
from lora_lab.trainer.train import run_training

LABELS = torch.tensor([0, 1, 0, 1])
BAD = {"not": "a setting"}  # a value no rule accepts (not a number, flag, string or list)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def applied(cfg, model):
    method = build_method(cfg)
    method.apply(model)
    return method


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def move_trained(model, seed: int = 3) -> None:
    """Move every trained parameter off its start, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def logits(model, inputs=None) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**(inputs or batch())).logits


# ---------------------------------------------------------------- the checks, for any method config

def check_declarations(cfg) -> None:
    """The class answers what the project asks of it, and its shipped settings pass its own rules."""
    cls = method_class(cfg)
    assert cls.name == cfg.name and cls.name in available_methods() and registered_methods()[cls.name] is cls
    assert "lr" in cls.config_rules
    for key, rule in cls.config_rules.items():
        if key in cfg:
            assert rule(OmegaConf.to_container(cfg, resolve=True)[key]) is None, key
    assert not cls.exports_peft or cls.has_peft_counterpart
    colour, marker = cls.plot_style
    assert isinstance(colour, str) and isinstance(marker, str) and isinstance(cls.order, int)
    described = describe_method(cfg)
    assert type(described) is cls and described.label() and described.run_tag()
    assert described.sort_key()[0] == cls.order
    for arm in cls.bench_arms:
        assert arm_method(arm).name == cls.name, arm
    model = tiny_bert()
    method = applied(cfg, model)
    if cls.has_peft_counterpart:
        pytest.importorskip("peft")
        assert method.peft_config(model) is not None
    else:
        assert method.peft_config(model) is None


def check_rules_name_their_key(run_cfg) -> None:
    """A value of the wrong type for any of the method's settings is refused before anything loads,
    in one line naming it (or the setting the method's own check finds at odds with it)."""
    for key in method_class(run_cfg.method).config_rules:
        if key not in run_cfg.method:
            continue
        cfg = copy.deepcopy(run_cfg)
        cfg.method[key] = BAD
        with pytest.raises(ConfigError) as error:
            check_config(cfg)
        named = error.value.key
        assert named == f"method.{key}" or named in {f"method.{k}" for k in cfg.method}, (key, str(error.value))
        assert "\n" not in str(error.value)


def check_counts_and_gradients(cfg) -> None:
    """Unchanged outputs at the start (unless the class says its new parameters change them:
    ``preserves_outputs_at_init``), the formula's count, gradients exactly on the trained parameters."""
    reference, model = tiny_bert(), tiny_bert()
    method = applied(cfg, model)
    if method.preserves_outputs_at_init:
        torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=0)
    trained = trainable(model)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trained) == method.expected_trainable(reference)
    assert method.method_parameter_names(model) <= trained
    assert (trained == {n for n, _ in model.named_parameters()}) is method.trains_every_weight
    model.train()
    model(**batch(), labels=LABELS).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trained


def check_merge(cfg) -> None:
    """Where the method merges: merged outputs equal unmerged ones and unmerging restores the weights;
    where it does not, preparing for inference changes nothing. A plain-layer form gives the same outputs."""
    model = tiny_bert()
    method = applied(cfg, model)
    move_trained(model)
    unmerged = logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.prepare_inference(model)
    changed = any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert changed is method.supports_merge
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    method.undo_inference(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), weights[n], atol=1e-6, rtol=0, msg=n)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    plain = method.merge_and_unload(copy.deepcopy(model))
    if plain is not None:
        assert not method.method_parameter_names(plain)
        torch.testing.assert_close(logits(plain), unmerged, atol=1e-5, rtol=1e-5)


def check_delta_weights(cfg) -> None:
    """ΔW for each adapted matrix (none when the method adapts none), out x in as the matrix, its W0
    the matrix before training; dense W - W0 for a method that trains every weight."""
    reference, model = tiny_bert(), tiny_bert()
    method = applied(cfg, model)
    move_trained(model)
    deltas = method.delta_weights(model)
    assert bool(deltas) is method.adapts_matrices()
    for name, d in deltas.items():
        w0 = dense_weight(reference.get_submodule(name)).detach()
        assert d.shape == tuple(w0.shape) == tuple(d.to_dense().shape), name
        if d.base is not None:
            torch.testing.assert_close(d.base, w0, msg=name)
        if method.trains_every_weight:
            torch.testing.assert_close(d.dense, dense_weight(model.get_submodule(name)).detach() - w0, msg=name)


def check_state_round_trip(cfg, folder) -> None:
    """The trained parameters saved as a run saves them, loaded into a fresh model with the method
    applied, give the same model."""
    model = tiny_bert()
    applied(cfg, model)
    move_trained(model)
    path = folder / records.STATE_FILE
    records.save_tensors(path, checkpoint.trainable_state(model))
    fresh = tiny_bert()
    applied(cfg, fresh)
    assert not torch.equal(logits(fresh), logits(model))
    checkpoint.load_trainable_state(fresh, records.load_file(str(path)))
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- every registered method

METHODS = available_methods()


@pytest.mark.parametrize("name", METHODS)
def test_declarations(name):
    check_declarations(method_cfg(name))


@pytest.mark.parametrize("name", METHODS)
def test_rules_name_their_key(name):
    check_rules_name_their_key(compose_config("model=tiny", f"method={name}"))


@pytest.mark.parametrize("name", METHODS)
def test_counts_and_gradients(name):
    check_counts_and_gradients(method_cfg(name))


@pytest.mark.parametrize("name", METHODS)
def test_merge(name):
    check_merge(method_cfg(name))


@pytest.mark.parametrize("name", METHODS)
def test_delta_weights(name):
    check_delta_weights(method_cfg(name))


@pytest.mark.parametrize("name", METHODS)
def test_state_round_trip(name, tmp_path):
    check_state_round_trip(method_cfg(name), tmp_path)


def test_exporting_methods_are_lora_then_dora():
    from lora_lab.peft.export import EXPORTABLE

    assert EXPORTABLE == ("lora", "dora")  # the order of the one-line refusal of other runs


# ---------------------------------------------------------------- a method from outside lora_lab

OUTSIDE_MODULE = '''"""Norm-scale tuning: the scale (weight) of every normalisation layer trains, plus the head."""
from torch import nn

from lora_lab import rules
from lora_lab.methods import Method, register
from lora_lab.methods.base import ModelDims, freeze_all, head_count
from lora_lab.models.architectures import head_parameter_names, layer_norm_parameter_names


@register("norm_scales")
class NormScales(Method):
    config_rules = {**Method.config_rules, "train_head": rules.boolean()}
    order, family, plot_style = 6, "Norm scales", ("tab:olive", "*")

    def adapts_matrices(self) -> bool:
        return False

    def expected_trainable(self, model: nn.Module) -> int:
        dims = ModelDims.of(model.config)
        return (2 * dims.layers + 1) * dims.hidden + (head_count(model) if self.cfg.train_head else 0)

    def method_parameter_names(self, model: nn.Module) -> set[str]:
        return {n for n in layer_norm_parameter_names(model) if n.endswith(".weight")}

    def apply(self, model: nn.Module) -> None:
        freeze_all(model)
        trained = self.method_parameter_names(model)
        if self.cfg.train_head:
            trained |= head_parameter_names(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)

    def delta_weights(self, model: nn.Module) -> dict:
        return {}
'''

OUTSIDE_CONFIG = """# Norm-scale tuning, a method kept outside lora_lab.
name: norm_scales
module: lab_extra.norm_scales
lr: 1e-3
lr_grid: [1e-4, 1e-3, 1e-2]
train_head: true
"""


@pytest.fixture
def outside_method(tmp_path, monkeypatch):
    """A package ``lab_extra`` with the module in one folder, its config in a config folder of its own:
    the overrides that use it (Hydra's search path, method=norm_scales)."""
    code, conf = tmp_path / "code", tmp_path / "conf"
    (code / "lab_extra").mkdir(parents=True)
    (code / "lab_extra" / "__init__.py").write_text("")
    (code / "lab_extra" / "norm_scales.py").write_text(OUTSIDE_MODULE)
    (conf / "method").mkdir(parents=True)
    (conf / "method" / "norm_scales.yaml").write_text(OUTSIDE_CONFIG)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setattr(methods_base, "_REGISTRY", dict(methods_base._REGISTRY))  # registered for this test only
    yield [f"hydra.searchpath=[file://{conf}]", "method=norm_scales"]
    for module in [m for m in sys.modules if m == "lab_extra" or m.startswith("lab_extra.")]:
        del sys.modules[module]


def test_a_method_outside_lora_lab_registers_from_its_config_and_passes_the_checks(outside_method, tmp_path):
    assert "norm_scales" not in available_methods()
    cfg = compose_config("model=tiny", *outside_method)
    assert cfg.method.module == "lab_extra.norm_scales"
    check_config(cfg)  # imports lab_extra.norm_scales, whose @register adds the method
    assert "norm_scales" in available_methods() and "lab_extra.norm_scales" in sys.modules
    check_declarations(cfg.method)
    check_rules_name_their_key(cfg)
    check_counts_and_gradients(cfg.method)
    check_merge(cfg.method)
    check_delta_weights(cfg.method)
    check_state_round_trip(cfg.method, tmp_path)


def test_a_method_outside_lora_lab_trains_through_the_trainer(outside_method, tmp_path):
    cfg = compose_config("experiment=smoke", "logger=disabled", *outside_method, "trainer.threads=1",
                         f"data.cache_dir={tmp_path / 'cache'}")
    run_dir = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        record = run_training(cfg, run_dir)
    finally:
        torch.set_num_threads(threads)  # run_training sets it process-wide
    on_disk = records.load_record(run_dir)
    assert record["status"] == on_disk["status"] == "completed" and on_disk["method"] == "norm_scales"
    p = on_disk["parameters"]
    hidden, layers = 32, 2  # conf/model/tiny
    assert p["trainable_method"] == (2 * layers + 1) * hidden and p["trainable_other"] == 0
    assert p["trainable_head"] == hidden * hidden + hidden + 2 * hidden + 2  # pooler and classifier
    state = records.load_file(str(run_dir / records.STATE_FILE))
    assert sum(t.numel() for t in state.values()) == p["trainable"]
    assert load_run_deltas(run_dir) == {} and on_disk["delta_w"].startswith("none:")
    assert describe_method(on_disk["config"]["method"]).label() == "Norm scales"


def test_a_method_module_that_does_not_import_or_register_is_one_line(outside_method):
    with pytest.raises(ConfigError, match=r"method.module='lab_extra.missing': could not be imported"):
        build_method(OmegaConf.create({"name": "norm_scales", "module": "lab_extra.missing"}))
    with pytest.raises(ConfigError, match=r"method.module='lab_extra': registers no method 'norm_scales'"):
        build_method(OmegaConf.create({"name": "norm_scales", "module": "lab_extra"}))
    with pytest.raises(ConfigError, match=r"method.name='norm_scales': unknown method; choose one of"):
        build_method(OmegaConf.create({"name": "norm_scales"}))
    described = describe_method({"name": "norm_scales", "module": "lab_extra.missing"})  # a record elsewhere
    assert type(described) is methods_base.Method and described.label() == "norm_scales"
