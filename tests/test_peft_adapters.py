"""PEFT's LoRA adapter format, both ways: ``lora-lab-export`` writes a run as an adapter folder that
``peft.PeftModel.from_pretrained`` loads with the run's logits, and ``method.init_from=<adapter>``
starts our LoRA or DoRA from a PEFT-saved adapter with PEFT's logits; mismatches are one-line errors."""
from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from conftest import batch, compose_config, method_cfg, tiny_bert
from omegaconf import OmegaConf
from safetensors import safe_open

from lora_lab.config.run_identity import result_config, run_key
from lora_lab.errors import ConfigError
from lora_lab.methods import build_method
from lora_lab.models.loading import load_model
from lora_lab.peft.adapter_config import LoraAdapterConfig
from lora_lab.peft.export import export_run, main
from lora_lab.runtime import records
from lora_lab.runtime.checkpoint import trainable_state
from lora_lab.runtime.seeding import set_seed

peft = pytest.importorskip("peft")

LABELS = ["neg", "pos"]
SMOKE = ["experiment=smoke", "logger=disabled"]


@functools.cache
def _composed(overrides: tuple[str, ...]):
    return compose_config(*SMOKE, *overrides)


def smoke_cfg(*overrides):
    return copy.deepcopy(_composed(overrides))  # composing takes a third of a second


def fake_run(run_dir, *overrides):
    """A completed run directory as the trainer leaves it (record + trainable state), with every
    trainable parameter moved away from its start; returns our trained model (eval mode)."""
    cfg = smoke_cfg(*overrides)
    set_seed(cfg.seed)
    model = load_model(cfg.model, len(LABELS), LABELS)
    method = build_method(cfg.method)
    method.apply(model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in trainable_state(model).values():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    records.save_tensors(run_dir / records.STATE_FILE, trainable_state(model))
    epoch = {"epoch": 1, "validation/accuracy": 0.5}
    records.write_json(run_dir / records.RECORD_FILE, {
        "schema_version": 2, "status": "completed", "method": method.name, "method_resolved": method.resolved,
        "config": _plain(cfg), "best": epoch, "last": epoch, "parameters": {"trainable": 1, "total": 1},
        "measurements": {}, "files": {records.STATE_FILE: {"epoch": 1, "holds": "best"}},
        "task": {"label_names": LABELS}})
    return model.eval()


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def fresh_base(*overrides):
    """The run's base model as a PEFT user builds it: lora_lab's loader under the run's seed."""
    cfg = smoke_cfg(*overrides)
    set_seed(cfg.seed)
    return load_model(cfg.model, len(LABELS), LABELS).eval()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def one_line(error) -> str:
    message = str(error.value if hasattr(error, "value") else error)
    assert "\n" not in message.strip()
    return message


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("overrides", [
    [],
    ["lora_scaling=rslora", "method.r=4", "method.targets=[q,k,v,o]"],
    ["method=dora"],
    ["method.init=svd", "method.r=2"],
    ["method.train_head=false"],
], ids=["lora", "rslora-qkvo", "dora", "svd", "frozen-head"])
def test_export_loads_into_peft_with_our_logits(tmp_path, overrides):
    ours = fake_run(tmp_path, *overrides)
    exported = export_run(tmp_path, tmp_path / "adapter")
    assert exported.max_logit_difference <= 1e-5 < exported.max_logit_change and exported.tolerance == 1e-5
    inputs = batch(size=4, length=12)
    base = fresh_base(*overrides)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    assert (logits(ours, inputs) - logits(base, inputs)).abs().max() > 1e-4  # the adapter matters
    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), atol=1e-5, rtol=0)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] is None  # a random model
    assert config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    assert config["use_dora"] == ("method=dora" in overrides)
    assert config["use_rslora"] == ("lora_scaling=rslora" in overrides)
    assert len(config["target_modules"]) == (8 if "method.targets=[q,k,v,o]" in overrides else 4)
    if "method.init=svd" in overrides:  # ΔW = s (B A - B0 A0) as a rank-2r LoRA of scale 1
        assert config["r"] == config["lora_alpha"] == 4
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(".default." in k for k in keys) and "base_model.model.classifier.weight" in keys

    if "method.init=svd" not in overrides:  # and back: our init_from gives the same model again
        cfg = smoke_cfg(*overrides).method
        cfg.init_from = str(tmp_path / "adapter")
        again = copy.deepcopy(base)
        build_method(cfg).apply(again)
        torch.testing.assert_close(logits(again.eval(), inputs), logits(ours, inputs), atol=1e-5, rtol=0)


def test_export_command_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    def refused(*args) -> str:
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lora-lab-export: error: ") and err.count("\n") == 1, err
        return err

    assert "has no record.json; not a lora_lab run directory" in refused(tmp_path, tmp_path / "out")
    (tmp_path / "head").mkdir()
    fake_run(tmp_path / "head", "method=head")
    assert "is a 'head' run; only lora and dora runs export" in refused(tmp_path / "head", tmp_path / "out")
    (tmp_path / "failed").mkdir()
    records.write_json(tmp_path / "failed" / records.RECORD_FILE, {
        "schema_version": 2, "status": "failed", "error": "x", "error_kind": "exception", "config": {}})
    assert "did not complete (status 'failed')" in refused(tmp_path / "failed", tmp_path / "out")
    (tmp_path / "run").mkdir()
    fake_run(tmp_path / "run")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert "exists and is not empty (--force writes into it)" in refused(tmp_path / "run", tmp_path / "out")
    (tmp_path / "run" / records.STATE_FILE).unlink()
    assert "has no trainable.safetensors; the run is incomplete" in refused(tmp_path / "run", tmp_path / "o2")


def test_export_command_writes_with_force_and_reports_the_difference(tmp_path, capsys):
    fake_run(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main([str(tmp_path), str(tmp_path / "out"), "--force"]) == 0
    out = capsys.readouterr().out
    assert "PEFT's logits differ from the run's by at most" in out
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # --force replaces only what it writes
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_export_runs_as_a_module_and_is_a_console_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lora_lab.peft.export", str(tmp_path / "nothing"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "is not a directory" in proc.stderr
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["lora-lab-export"] == "lora_lab.peft.export:main"


# ---------------------------------------------------------------- import: method.init_from=<adapter>


def peft_adapter(folder, r=4, alpha=8, targets=("query", "value"), rslora=False, dora=False, hidden=32):
    """A PEFT-trained adapter on the tiny BERT (B and the head moved away from their start), saved with
    save_pretrained; returns PEFT's model (eval mode) and the base it wraps."""
    base = tiny_bert(hidden=hidden)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                             use_dora=dora, modules_to_save=["classifier"])
    model = peft.get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(str(folder))
    return model.eval(), base


@pytest.mark.parametrize("name,settings", [
    ("lora", {}), ("lora", {"rslora": True, "alpha": 16}), ("dora", {"dora": True})], ids=["lora", "rslora", "dora"])
def test_init_from_a_peft_adapter_gives_peft_logits(tmp_path, name, settings):
    theirs, base = peft_adapter(tmp_path, **settings)
    cfg = method_cfg(name, r=4, alpha=settings.get("alpha", 8), rslora=settings.get("rslora", False),
                     init_from=str(tmp_path))
    ours = copy.deepcopy(base)
    build_method(cfg).apply(ours)
    inputs = batch()
    assert (logits(theirs, inputs) - logits(base, inputs)).abs().max() > 1e-2
    torch.testing.assert_close(logits(ours.eval(), inputs), logits(theirs, inputs), atol=1e-5, rtol=0)
    assert ours.classifier.weight.requires_grad and ours.bert.encoder.layer[0].attention.self.query.lora_B.requires_grad


def test_a_head_that_does_not_fit_starts_fresh(tmp_path, capsys):
    peft_adapter(tmp_path)
    ours = tiny_bert(num_labels=3)
    head = ours.classifier.weight.detach().clone()
    build_method(method_cfg("lora", r=4, init_from=str(tmp_path))).apply(ours)
    assert "does not fit this model's head" in capsys.readouterr().out
    assert torch.equal(ours.classifier.weight, head)
    assert ours.bert.encoder.layer[0].attention.self.query.lora_B.abs().sum() > 0  # the factors did load


def test_init_from_adapter_mismatches_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    folder = tmp_path / "adapter"
    peft_adapter(folder)

    def refused(model=None, name="lora", **settings) -> str:
        cfg = method_cfg(name, **{"r": 4, "init_from": str(folder), **settings})
        with pytest.raises(ConfigError) as error:
            build_method(cfg).apply(model if model is not None else tiny_bert())
        return one_line(error)

    assert "has rank r=4, this run method.r=8" in refused(r=8)
    assert "scales its update by 2 (lora_alpha=8, r=4, use_rslora=False), this run by 4" in refused(alpha=16)
    assert "lacks 4 module(s) this run adapts" in refused(targets=["q", "k", "v", "o"])
    assert "adapts 2 module(s) this run does not" in refused(targets=["q"])
    assert "(an adapter of another base model)" in refused(model=tiny_bert(hidden=48))
    assert "is a plain LoRA adapter (use_dora=False); use method=lora" in refused(name="dora")
    assert "does not combine with method.init=svd" in refused(init="svd")

    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    assert "is a PEFT 'IA3' adapter; only LoRA adapters" in refused()
    for init in ("pissa", "pissa_niter_4", "olora", "corda", "lora_ga", "loftq"):  # every one the analysis knows
        (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
        assert "changes the base weights" in refused()
        assert LoraAdapterConfig.read(folder / "adapter_config.json").residual_init() == init.split("_niter")[0]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    assert "holds adapter_model.bin, a pickle, which lora_lab never loads" in refused()
    (folder / "adapter_model.bin").unlink()
    assert "has adapter_config.json but no adapter_model.safetensors" in refused()


def test_a_dora_adapter_needs_method_dora_and_is_checked_before_loading(tmp_path):
    peft_adapter(tmp_path, dora=True)
    cfg = compose_config(*SMOKE, f"method.init_from={tmp_path}", "method.r=4")
    from lora_lab.config.validate import check_config

    with pytest.raises(ConfigError, match=r"is a DoRA adapter \(use_dora=True\); use method=dora") as error:
        check_config(cfg)  # before any model is loaded
    one_line(error)


def test_init_from_is_part_of_the_run_identity(tmp_path):
    plain = compose_config(*SMOKE)
    started = compose_config(*SMOKE, f"method.init_from={tmp_path}")
    assert result_config(_plain(started))["method"]["init_from"] == str(tmp_path)
    assert run_key(_root_=plain) != run_key(_root_=started)


# ---------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_real_model_round_trip_through_peft(tmp_path, capsys):
    """LoRA on the embedded MiniLM (mean-pooled, our head), 32 training rows: exported, loaded by PEFT onto
    the base lora_lab builds, and started from again with init_from; all three give its logits."""
    from lora_lab.models.files import embedded_model_path
    from lora_lab.peft.export import rebuild_run
    from lora_lab.trainer.train import run_training

    rows = "".join(f"review {i} {'good' if i % 2 else 'bad'} film,{'pos' if i % 2 else 'neg'}\n" for i in range(40))
    (tmp_path / "train.csv").write_text("text,label\n" + rows)
    cfg = compose_config("logger=disabled", "data=files", f"data.files.train={tmp_path / 'train.csv'}",
                         "data.text_column=text", "data.label_column=label", "data.max_length=16",
                         "trainer.epochs=1", "trainer.progress_bar=false", "trainer.latency_repeats=1",
                         "trainer.lr=5e-3", "lora_scaling=rslora", f"data.cache_dir={tmp_path / 'cache'}")
    run_training(cfg, tmp_path / "run")
    assert main([str(tmp_path / "run"), str(tmp_path / "adapter")]) == 0
    assert "PEFT's logits differ from the run's by at most" in capsys.readouterr().out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == embedded_model_path("all-MiniLM-L6-v2")
    assert config["modules_to_save"] == ["classifier"] and config["use_rslora"] is True
    assert len(config["target_modules"]) == 12

    run = rebuild_run(tmp_path / "run")
    inputs = batch(size=4, length=16)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(run.base), str(tmp_path / "adapter")).eval()
    assert (logits(run.model, inputs) - logits(run.base, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(logits(theirs, inputs), logits(run.model, inputs), atol=1e-5, rtol=0)
    method = copy.deepcopy(cfg.method)
    method.init_from = str(tmp_path / "adapter")
    again = copy.deepcopy(run.base)
    build_method(method).apply(again)
    torch.testing.assert_close(logits(again.eval(), inputs), logits(run.model, inputs), atol=1e-5, rtol=0)
