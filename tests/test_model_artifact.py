"""``logger.log_model=true``: a completed run's record, trainable state and PEFT adapter logged as a W&B
model artifact (an offline run here), and nothing of it with the flag off or W&B disabled."""
from __future__ import annotations

import copy
import csv
import time
import types

import pytest
import torch
import wandb
from conftest import batch, compose_config

from lora_lab.peft.export import ADAPTER_DIR, rebuild_run
from lora_lab.runtime import records
from lora_lab.runtime.tracking import Tracker, model_artifact_name
from lora_lab.trainer.train import run_training

peft = pytest.importorskip("peft")


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """A clean W&B session that logs offline into tmp_path, with no credentials in reach."""
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb-dir",
                       "WANDB_DATA_DIR": tmp_path / "wandb-data", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "NETRC": tmp_path / "no-netrc"}.items():
        monkeypatch.setenv(key, str(value))
    wandb.teardown()
    yield
    wandb.teardown()


def tiny_run_cfg(tmp_path, *overrides):
    """The smoke config on 40 rows of a local CSV: a real run in about two seconds."""
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((f"review {i} {'good' if i % 2 else 'bad'} film", "pos" if i % 2 else "neg")
                         for i in range(40))
    return compose_config("experiment=smoke", "data=files", f"data.files.train={path}", "data.text_column=text",
                          "data.label_column=label", f"data.cache_dir={tmp_path / 'cache'}",
                          "trainer.latency_repeats=1", *overrides)


def test_a_run_logs_its_model_artifact_offline(tmp_path, offline_wandb):
    cfg = tiny_run_cfg(tmp_path, "logger.mode=offline", "logger.log_model=true", "trainer.lr=0.05")
    run_dir = tmp_path / "run"
    tracker = Tracker.start({}, mode="offline", directory=run_dir)
    logged = []
    log_artifact = tracker.run.log_artifact
    tracker.run.log_artifact = lambda artifact, **kw: logged.append((artifact, kw)) or log_artifact(artifact, **kw)
    record = run_training(cfg, run_dir, tracker)
    run_id = tracker.run_id
    tracker.finish()

    ((artifact, kwargs),) = logged
    assert artifact.name.split(":")[0] == model_artifact_name(run_id) == f"model-{run_id}"
    assert artifact.type == "model" and kwargs["aliases"] == ["best", "latest"]
    assert set(artifact.manifest.entries) == {"record.json", "trainable.safetensors",
                                              f"{ADAPTER_DIR}/adapter_config.json",
                                              f"{ADAPTER_DIR}/adapter_model.safetensors"}
    assert artifact.metadata["method"] == "lora" and artifact.metadata["peft_adapter"] is True
    assert artifact.metadata["best_epoch"] == 1 and "validation/accuracy" in artifact.metadata
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    log_file, name = next(offline_run.glob("*.wandb")), model_artifact_name(run_id).encode()
    deadline = time.time() + 60  # W&B's service process may still be flushing the offline log
    while name not in log_file.read_bytes() and time.time() < deadline:
        time.sleep(0.2)
    assert name in log_file.read_bytes()

    # the adapter written into the run directory is the trained model: PEFT gives its logits, and the
    # rebuilt base is the one trained (its W0 has the SHA-256 the run recorded)
    run = rebuild_run(run_dir)
    for name, sha256 in record["base_sha256"].items():
        assert records.weight_sha256(run.base.get_submodule(name).weight) == sha256
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(run.base), str(run_dir / ADAPTER_DIR)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch()).logits, run.model(**batch()).logits, atol=1e-5, rtol=0)
    assert record["best"]["epoch"] == 1


def test_no_artifact_unless_asked_and_none_without_wandb(tmp_path, capsys):
    calls = []
    fake = types.SimpleNamespace(id="abc", log_artifact=lambda *a, **k: calls.append(a))
    record = {"method": "lora", "config": {"logger": {"log_model": False}}}
    Tracker(fake).log_model(tmp_path, record)
    Tracker(None).log_model(tmp_path, {**record, "config": {"logger": {"log_model": True}}})
    assert calls == [] and not (tmp_path / ADAPTER_DIR).exists()
    # asked for, but the files are not there: one line on stderr, no exception (the run is complete)
    Tracker(fake).log_model(tmp_path, {**record, "config": {"logger": {"log_model": True}}})
    err = capsys.readouterr().err
    assert calls == [] and err.startswith("lora-lab: the model artifact was not logged to W&B") and err.count("\n") == 1


def test_log_model_is_off_by_default_and_checked():
    from lora_lab.config.validate import check_config
    from lora_lab.errors import ConfigError

    assert compose_config().logger.log_model is False
    assert compose_config("logger=disabled").logger.log_model is False
    with pytest.raises(ConfigError, match="logger.log_model='yes'"):
        check_config(compose_config("experiment=smoke", "logger.log_model=yes"))
