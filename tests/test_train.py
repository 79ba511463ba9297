import os
import subprocess
import sys

import pytest
import torch
from conftest import compose_config

from lora_lab.analysis.example_metrics import metric_values
from lora_lab.errors import ConfigError
from lora_lab.methods import available_methods, describe_method
from lora_lab.runtime import records
from lora_lab.runtime.predictions import read_predictions
from lora_lab.runtime.rebuild import load_run_deltas
from lora_lab.trainer.train import run_training

SMOKE = ["experiment=smoke", "logger=disabled"]


def smoke_cfg(tmp_path, *overrides):
    return compose_config(*SMOKE, f"data.cache_dir={tmp_path / 'cache'}", *overrides)


@pytest.mark.parametrize("method", [*available_methods(), "head method.top_layers=1",
                                    "adapter method.variant=pfeiffer", "lora method.init=svd"])
def test_smoke_every_method_writes_a_complete_record(tmp_path, method):
    name, *extra = method.split()
    cfg = smoke_cfg(tmp_path, f"method={name}", *extra)
    run_dir = tmp_path / "run"
    record = run_training(cfg, run_dir)
    on_disk = records.load_record(run_dir)
    assert on_disk["status"] == "completed" and on_disk["method"] == name
    assert on_disk["best"]["epoch"] == 1 and 0 <= on_disk["best"]["test/accuracy"] <= 1
    assert on_disk["task"]["main_metric"] == "accuracy" and on_disk["baseline"]["name"] == "majority class"
    assert on_disk["baseline"]["test"]["accuracy"] == on_disk["majority_class_test_accuracy"]
    m = on_disk["measurements"]
    assert m["peak_memory_mb"] > 0 and m["train_samples_per_s"] > 0 and m["train_tokens_per_s"] > 0
    assert m["trainable_state_bytes"] == (run_dir / records.STATE_FILE).stat().st_size
    p = on_disk["parameters"]
    assert p["trainable"] == p["trainable_method"] + p["trainable_head"] + p["trainable_other"]
    state = records.load_file(str(run_dir / records.STATE_FILE))
    assert sum(t.numel() for t in state.values()) == p["trainable"]
    deltas = load_run_deltas(run_dir)  # derived from the state and the base: no ΔW or W0 is stored
    method = describe_method(on_disk["config"]["method"])
    assert bool(deltas) is method.adapts_matrices()
    assert on_disk["delta_w"].startswith("derived:" if deltas else "none:")
    assert {n: list(d.shape) for n, d in deltas.items()} == on_disk["delta_w_shapes"]
    # the folder grows with the trainable state, not with the model
    assert sorted(p.name for p in run_dir.iterdir()) == [records.PREDICTIONS_FILE, records.RECORD_FILE,
                                                         records.STATE_FILE]
    assert run_folder_bytes(run_dir) <= 1.1 * m["trainable_state_bytes"] + 64_000
    assert ("merged_over_unmerged" in m) is method.supports_merge
    if name == "lora":
        assert len(deltas) == 4 and all(d.B is not None and d.base is not None for d in deltas.values())
        assert "merged_over_unmerged" in m
    if name == "full":
        assert len(deltas) == 12 and all(d.to_dense().abs().sum() > 0 for d in deltas.values())
    assert on_disk["environment"]["versions"]["torch"] == torch.__version__
    assert record["config"]["method"]["name"] == name


def run_folder_bytes(run_dir) -> int:
    """What a run keeps, but its checkpoint folder and the logs and config copies beside it."""
    return sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file() and p.name != "main.log"
               and p.relative_to(run_dir).parts[0] not in ("checkpoint", ".hydra"))


def test_same_seed_same_metrics(tmp_path):
    first = run_training(smoke_cfg(tmp_path, "method=lora", "seed=3"), tmp_path / "a")
    second = run_training(smoke_cfg(tmp_path, "method=lora", "seed=3"), tmp_path / "b")
    other = run_training(smoke_cfg(tmp_path, "method=lora", "seed=4"), tmp_path / "c")
    assert first["epochs"] == second["epochs"]
    assert first["epochs"][0]["train_loss"] != other["epochs"][0]["train_loss"]


def test_bad_main_metric(tmp_path):
    with pytest.raises(ConfigError, match="data.main_metric='f2'"):
        run_training(smoke_cfg(tmp_path, "data.main_metric=f2"), tmp_path / "run")


def cli(*args, cwd, warm=None):
    """``lora-lab`` as a process of its own: forked by ``warm`` (tests/warm_cli.py) if given, else a fresh
    interpreter."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if warm is not None:
        return warm.run(args, cwd=cwd, env=env)
    return subprocess.run([sys.executable, "-m", "lora_lab.cli.main", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.mark.parametrize("override,message", [
    ("method.r=0", "lora-lab: error: method.r=0: must be a positive integer"),
    ("method.alpha=-1", "lora-lab: error: method.alpha=-1: must be > 0"),
    ("method.targets=[q,gate_proj]", "lora-lab: error: method.targets='gate_proj': matches no linear layer"),
    ("data=files data.files.train=missing.csv", "lora-lab: error: data.files.train='missing.csv': does not exist"),
])
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, override, message, warm_cli):
    out = cli(*SMOKE, f"data.cache_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}", *override.split(),
              cwd=tmp_path, warm=warm_cli)
    assert out.returncode == 2
    assert message in out.stderr
    error_lines = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1, out.stderr
    assert not (tmp_path / "run").exists()  # bad input leaves no run folder (a sweep's job records it)


def test_cli_unknown_method_is_hydras_error(tmp_path, warm_cli):
    out = cli(*SMOKE, "method=no_such_method", cwd=tmp_path, warm=warm_cli)
    assert out.returncode != 0 and "method/no_such_method" in out.stderr


def test_multirun_records_failed_job_and_continues(tmp_path, warm_cli):
    sweep = tmp_path / "sweep"
    out = cli("-m", *SMOKE, f"data.cache_dir={tmp_path}", f"hydra.sweep.dir={sweep}", "method=lora",
              "method.r=0,2", cwd=tmp_path, warm=warm_cli)
    assert out.returncode == 0, out.stderr
    status = {}
    for run_dir in records.find_run_dirs(sweep):
        record = records.load_record(run_dir, require_completed=False)
        status[record["config"]["method"]["r"]] = record["status"]
    assert status == {0: "failed", 2: "completed"}
    assert "job failed" in out.stderr
    table = (sweep / "comparison.md").read_text()
    assert "LoRA r=2" in table and "method.r=0" in table


def test_interrupted_write_leaves_no_record(tmp_path, monkeypatch):
    target = tmp_path / records.RECORD_FILE

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", explode)  # after the temporary file is written, before it is renamed
    with pytest.raises(KeyboardInterrupt):
        records.write_json(target, {"status": "completed"})
    assert not target.exists() and not list(tmp_path.iterdir())


def test_tracker_offline_writes_a_wandb_run(tmp_path, monkeypatch):
    from lora_lab.runtime.tracking import Tracker, resolve_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    tracker = Tracker.start({"a": 1}, mode="offline", directory=tmp_path)
    tracker.log({"train/loss": 0.5}, step=1)
    tracker.summary({"best/accuracy": 0.9})
    tracker.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_regression_task_trains_with_float_targets_and_reports_correlations(tmp_path):
    """STS-B style data: one float target, MSE loss, Pearson/Spearman on validation and test."""
    import csv

    rows = [(f"{'good ' * (i % 6)}movie number {i}", f"{(i % 6) / 5 * 5:.2f}") for i in range(120)]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    cfg = smoke_cfg(tmp_path, "data=files", f"data.files.train={tmp_path / 'train.csv'}", "data.task_type=regression",
                    "method=lora", "trainer.epochs=2", "trainer.lr=0.01")
    record = run_training(cfg, tmp_path / "run")
    best = record["best"]
    assert set(best) >= {"validation/pearson", "validation/spearman", "test/pearson"}
    assert -1 <= best["test/pearson"] <= 1 and "majority_class_test_accuracy" not in record
    assert record["task"]["main_metric"] == "pearson" and record["baseline"]["name"] == "constant"
    assert record["baseline"]["test"]["pearson"] == 0.0
    assert record["parameters"]["trainable_head"] > 0
    found = read_predictions(tmp_path / "run" / records.PREDICTIONS_FILE)  # float targets and predictions per example
    assert found.task_type == "regression" and found.fields["prediction"].dtype.name == "float32"
    assert float(metric_values("regression", "pearson", found.fields)) == pytest.approx(best["test/pearson"], abs=1e-5)
    with pytest.raises(ConfigError, match="data.main_metric='accuracy': must be one of \\['pearson', 'spearman'\\]"):
        run_training(smoke_cfg(tmp_path, "data=files", f"data.files.train={tmp_path / 'train.csv'}",
                               "data.task_type=regression", "data.main_metric=accuracy"), tmp_path / "bad")


def scripted_evaluation(monkeypatch, accuracies, allocate_mb: int = 0):
    """Replace evaluation with one that returns the given validation accuracies epoch by epoch (test
    metrics follow), remembers the trainable state it saw, and optionally allocates memory."""
    from lora_lab.trainer import evaluation

    seen, calls = [], {"n": 0}

    def evaluate(model, loader, gold, device, amp, task, label_names, dist=None):
        calls["n"] += 1
        epoch = (calls["n"] + 1) // 2
        if calls["n"] % 2 == 1:  # validation comes first
            seen.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
            if allocate_mb:
                torch.ones(allocate_mb * 2**18).sum()  # float32: 4 bytes each, freed at once
        accuracy = accuracies[epoch - 1]
        return {"accuracy": accuracy, "macro_f1": accuracy, "mcc": 0.0}, {}, [1.0], list(gold)

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    return seen


def test_saved_state_is_the_best_epochs_and_the_last_is_kept_beside_it(tmp_path, monkeypatch):
    seen = scripted_evaluation(monkeypatch, [0.5, 0.8, 0.6])
    run_dir = tmp_path / "run"
    record = run_training(smoke_cfg(tmp_path, "trainer.epochs=3", "method=lora", "trainer.keep_last=true"), run_dir)
    assert record["best"]["epoch"] == 2 and record["last"]["epoch"] == 3 and len(seen) == 3
    held = {name: {k: v for k, v in entry.items() if k != "sha256"} for name, entry in record["files"].items()}
    assert held == {records.STATE_FILE: {"epoch": 2, "holds": "best"},
                    records.LAST_STATE_FILE: {"epoch": 3, "holds": "last"},
                    records.PREDICTIONS_FILE: {"epoch": 2, "holds": "best"}}
    assert all(entry["sha256"] == records.file_sha256(run_dir / name) for name, entry in record["files"].items())
    best, last = records.load_file(str(run_dir / records.STATE_FILE)), records.load_file(
        str(run_dir / records.LAST_STATE_FILE))
    assert all(best[k].equal(seen[1][k]) for k in seen[1]) and not all(best[k].equal(seen[2][k]) for k in seen[2])
    assert all(last[k].equal(seen[2][k]) for k in seen[2])
    deltas = load_run_deltas(run_dir)  # ΔW of the best epoch too
    for name, delta in deltas.items():
        assert delta.A.equal(best[f"{name}.lora_A"]) and not delta.A.equal(seen[2][f"{name}.lora_A"])


def test_the_last_state_is_kept_only_when_asked(tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, [0.5, 0.8, 0.6])
    record = run_training(smoke_cfg(tmp_path, "trainer.epochs=3"), tmp_path / "run")
    assert record["best"]["epoch"] == 2 and record["last"]["epoch"] == 3
    assert records.LAST_STATE_FILE not in record["files"] and not (tmp_path / "run" / records.LAST_STATE_FILE).exists()


def test_best_equals_last_writes_no_last_file(tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, [0.5, 0.9])
    record = run_training(smoke_cfg(tmp_path, "trainer.epochs=2", "trainer.keep_last=true"), tmp_path / "run")
    assert record["files"][records.STATE_FILE]["epoch"] == 2 and records.LAST_STATE_FILE not in record["files"]
    assert not (tmp_path / "run" / records.LAST_STATE_FILE).exists()


def test_patience_stops_after_epochs_without_improvement(tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, [0.7, 0.6, 0.65, 0.9, 0.9])
    record = run_training(smoke_cfg(tmp_path, "trainer.epochs=5", "trainer.patience=2"), tmp_path / "run")
    assert [row["epoch"] for row in record["epochs"]] == [1, 2, 3] and record["stopped_early"] is True
    assert record["best"]["epoch"] == 1
    scripted_evaluation(monkeypatch, [0.7, 0.6, 0.65, 0.6, 0.6])
    record = run_training(smoke_cfg(tmp_path, "trainer.epochs=5"), tmp_path / "run2")
    assert len(record["epochs"]) == 5 and record["stopped_early"] is False


def test_training_peak_memory_leaves_out_evaluation(tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, [0.5], allocate_mb=600)
    m = run_training(smoke_cfg(tmp_path), tmp_path / "run")["measurements"]
    assert m["eval_peak_memory_mb"] > m["peak_memory_mb"] + 400, m
