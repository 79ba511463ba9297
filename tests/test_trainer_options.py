"""Trainer options on the tiny model: the learning-rate schedule (trainer.schedule), evaluations inside
an epoch (trainer.eval_every), fp16 (trainer.precision), the CSV and TensorBoard loggers, the run
folder lines and what bad input leaves behind."""
import math

import pytest
import torch
from conftest import compose_config

from lora_lab.config.validate import check_config
from lora_lab.errors import ConfigError
from lora_lab.runtime import records
from lora_lab.trainer.optim import lr_factor, make_scheduler
from lora_lab.trainer.train import run_training

SMOKE = ["experiment=smoke", "logger=disabled"]


def smoke_cfg(tmp_path, *overrides):
    return compose_config(*SMOKE, f"data.cache_dir={tmp_path / 'cache'}", "trainer.latency_repeats=1", *overrides)


# trainer.schedule


def lrs(kind: str, warmup: int = 2, total: int = 10) -> list[float]:
    """The learning rate of each optimiser step, read from the scheduler as the trainer logs it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, kind, warmup, total)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_linear_schedule_is_unchanged():
    assert lrs("linear") == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    assert lr_factor("linear", 10, 2, 10) == 0.0 and lr_factor("linear", 12, 2, 10) == 0.0


def test_cosine_schedule_warms_up_then_decays_to_zero():
    got = lrs("cosine")
    assert got[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert got[6] == pytest.approx(0.5)  # half-way through the decay
    assert got[4] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor("cosine", 10, 2, 10) == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(got[2:], got[3:]))


def test_constant_schedule_is_flat_after_warm_up():
    assert lrs("constant", warmup=4) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1, 1, 1, 1, 1, 1])
    assert lrs("constant", warmup=0) == [1.0] * 10


def test_schedule_is_validated_and_used_by_the_trainer(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer.schedule='step': must be one of \['linear', 'cosine', 'constant'\]$"):
        check_config(smoke_cfg(tmp_path, "trainer.schedule=step"))
    from lora_lab.runtime.distributed import Distributed
    from lora_lab.trainer.setup import set_up

    run = set_up(smoke_cfg(tmp_path, "trainer.schedule=cosine", "trainer.warmup_steps=2"), tmp_path / "run",
                 Distributed())
    factors = [run.scheduler.lr_lambdas[0](step) for step in range(run.schedule.total_steps + 1)]
    assert run.schedule.total_steps == 8
    assert factors == pytest.approx([lr_factor("cosine", s, 2, 8) for s in range(9)]) and factors[-1] == 0.0


# trainer.eval_every


def scripted_evaluation(monkeypatch, accuracies):
    """Evaluation returns the given validation accuracies, one per evaluation, and remembers the
    trainable state each evaluation saw."""
    from lora_lab.trainer import evaluation

    seen, calls = [], {"n": 0}

    def evaluate(model, loader, gold, device, amp, task, label_names, dist=None):
        calls["n"] += 1
        index = (calls["n"] - 1) // 2
        if calls["n"] % 2 == 1:  # validation comes first
            seen.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        accuracy = accuracies[index]
        return {"accuracy": accuracy, "macro_f1": accuracy, "mcc": 0.0}, {}, [1.0], [0] * len(gold)

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    return seen


def test_eval_every_picks_a_best_evaluation_inside_an_epoch(tmp_path, monkeypatch):
    seen = scripted_evaluation(monkeypatch, [0.5, 0.9, 0.6, 0.7, 0.6, 0.8, 0.6])  # steps 3, 6, 8 (end), 9, 12, 15, 16
    run_dir = tmp_path / "run"
    record = run_training(smoke_cfg(tmp_path, "trainer.eval_every=3", "trainer.epochs=2", "method=lora",
                                    "trainer.keep_last=true"), run_dir)
    rows = record["epochs"]
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 3), (1, 6), (1, 8), (2, 9), (2, 12), (2, 15), (2, 16)]
    assert [r.get("within_epoch", False) for r in rows] == [True, True, False, True, True, True, False]
    assert record["best"]["step"] == 6 and record["best"]["epoch"] == 1 and record["last"]["step"] == 16
    saved = records.load_file(str(run_dir / records.STATE_FILE))
    assert saved.keys() == seen[1].keys() and all(saved[k].equal(seen[1][k]) for k in saved)
    assert not all(saved[k].equal(seen[2][k]) for k in saved)  # the epoch end's state differs
    last = records.load_file(str(run_dir / records.LAST_STATE_FILE))
    assert all(last[k].equal(seen[-1][k]) for k in last)
    assert record["files"][records.STATE_FILE].items() >= {"epoch": 1, "holds": "best"}.items()
    records.load_record(run_dir)  # the record's checks pass


def test_eval_every_best_within_the_last_epoch_keeps_the_last_state_too(tmp_path, monkeypatch):
    seen = scripted_evaluation(monkeypatch, [0.5, 0.9, 0.6])  # steps 3, 6, 8 (end of the only epoch)
    run_dir = tmp_path / "run"
    record = run_training(smoke_cfg(tmp_path, "trainer.eval_every=3", "trainer.keep_last=true"), run_dir)
    assert record["best"]["step"] == 6 and record["last"]["step"] == 8 and len(seen) == 3
    assert record["files"][records.LAST_STATE_FILE].items() >= {"epoch": 1, "holds": "last"}.items()
    saved = records.load_file(str(run_dir / records.STATE_FILE))
    assert all(saved[k].equal(seen[1][k]) for k in saved)


def test_patience_counts_evaluations_and_can_stop_inside_an_epoch(tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, [0.7, 0.6, 0.65, 0.9])  # steps 2, 4, 6: two without improving
    record = run_training(smoke_cfg(tmp_path, "trainer.eval_every=2", "trainer.patience=2", "trainer.epochs=3"),
                          tmp_path / "run")
    assert [r["step"] for r in record["epochs"]] == [2, 4, 6] and record["stopped_early"] is True
    assert record["best"]["step"] == 2 and record["last"]["step"] == 6
    assert record["measurements"]["checkpoints_written"] >= 1


def test_keep_last_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer.keep_last='maybe': must be true or false$") as error:
        check_config(smoke_cfg(tmp_path, "trainer.keep_last=maybe"))
    assert "\n" not in str(error.value)


def test_eval_every_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer.eval_every=0: must be null or a positive integer$"):
        check_config(smoke_cfg(tmp_path, "trainer.eval_every=0"))


def test_eval_every_run_stopped_mid_epoch_resumes_exactly(tmp_path, monkeypatch):
    """A checkpoint written right after an evaluation inside an epoch remembers the evaluations, the
    best one and its state: a run that dies after it resumes to the uninterrupted result (in one
    process here; tests/test_resume.py kills real processes)."""
    cfg = smoke_cfg(tmp_path, "trainer.checkpoint_every=3", "trainer.eval_every=3", "trainer.keep_checkpoint=true")
    reference = run_training(cfg, tmp_path / "reference")
    assert [row["step"] for row in reference["epochs"]] == [3, 6, 8]
    clip, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def dies_at_step_7(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("died")
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", dies_at_step_7)
    with pytest.raises(RuntimeError, match="died"):
        run_training(cfg, tmp_path / "run")
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    resumed = run_training(cfg, tmp_path / "run")
    assert resumed["resumes"] == [{"step": 6, "epoch": 1}]
    assert resumed["epochs"] == reference["epochs"] and resumed["best"] == reference["best"]
    for name in (records.STATE_FILE, records.DELTA_FILE, records.LAST_STATE_FILE):
        assert (tmp_path / "run" / name).exists() is (tmp_path / "reference" / name).exists()
        if (tmp_path / "run" / name).exists():
            a, b = (records.load_file(str(tmp_path / d / name)) for d in ("run", "reference"))
            assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name


# trainer.precision=fp16


def test_fp16_autocasts_on_cpu_and_trains(tmp_path):
    from lora_lab.models.precision import autocast, grad_scaler

    with autocast(torch.device("cpu"), "fp16"):
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.float16
    assert grad_scaler(torch.device("cpu"), "fp16") is None and grad_scaler(torch.device("cpu"), "bf16") is None
    record = run_training(smoke_cfg(tmp_path, "trainer.precision=fp16", "trainer.device=cpu"), tmp_path / "run")
    assert record["status"] == "completed" and math.isfinite(record["epochs"][0]["train_loss"])
    assert 0 <= record["best"]["test/accuracy"] <= 1
    with pytest.raises(ConfigError, match=r"^trainer.precision='fp8': must be one of fp32, bf16, fp16$"):
        check_config(smoke_cfg(tmp_path, "trainer.precision=fp8"))
    with pytest.raises(ConfigError, match=r"^trainer.precision='fp16': cannot autocast a bf16 base"):
        check_config(smoke_cfg(tmp_path, "trainer.precision=fp16", "model.dtype=bf16"))


# logger=csv, logger=tensorboard


def test_csv_logger_writes_a_row_per_logged_step_with_the_epoch_metrics(tmp_path):
    import csv
    import json

    from lora_lab.runtime.tracking import CsvTracker, file_tracker

    cfg = smoke_cfg(tmp_path, "logger=csv", "trainer.log_every=2", "trainer.epochs=2")
    assert cfg.logger.backend == "csv"
    run_dir = tmp_path / "run"
    tracker = file_tracker(cfg.logger.backend, run_dir)
    assert isinstance(tracker, CsvTracker)
    record = run_training(cfg, run_dir, tracker)
    tracker.finish()
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(2, 17, 2))  # one row per logged step
    by_step = {int(r["step"]): r for r in rows}
    for row in record["epochs"]:
        logged = by_step[row["step"]]
        assert float(logged["validation/accuracy"]) == row["validation/accuracy"]
        assert float(logged["train_loss"]) == row["train_loss"] and int(float(logged["epoch"])) == row["epoch"]
    assert float(by_step[2]["train/lr"]) > 0 and by_step[4]["validation/accuracy"] == ""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best/validation/accuracy"] == record["best"]["validation/accuracy"] and "objective" in summary
    again = CsvTracker(run_dir)  # a resumed run reads what was logged and goes on
    again.log({"train/loss": 0.5}, step=18)
    assert again.rows[16]["validation/accuracy"] == record["last"]["validation/accuracy"] and 18 in again.rows


def test_tensorboard_logger_writes_event_files_with_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora_lab.runtime.tracking import file_tracker

    cfg = smoke_cfg(tmp_path, "logger=tensorboard", "trainer.log_every=4")
    run_dir = tmp_path / "run"
    tracker = file_tracker(cfg.logger.backend, run_dir)
    record = run_training(cfg, run_dir, tracker)
    tracker.finish()
    assert list(run_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "validation/accuracy", "test/accuracy", "objective"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [4, 8]
    (accuracy,) = events.Scalars("validation/accuracy")
    assert accuracy.step == 8 and accuracy.value == pytest.approx(record["last"]["validation/accuracy"])


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"^logger='tensorboard': needs the tensorboard package: pip install tensorboard"):
        check_config(smoke_cfg(tmp_path, "logger=tensorboard"))
    with pytest.raises(ConfigError, match=r"^logger.backend='mlflow': must be one of"):
        check_config(smoke_cfg(tmp_path, "logger.backend=mlflow"))


# the run folder: printed at start and end; none for bad input or a dry run


def test_run_folder_is_printed_and_the_wandb_name_carries_its_hash(tmp_path, warm_cli):
    from lora_lab.cli.main import run_name
    from lora_lab.runtime.tracking import Tracker

    overrides = [*SMOKE, f"data.cache_dir={tmp_path / 'cache'}", "trainer.eval_batch_size=32", "trainer.latency_repeats=1"]
    out = warm_cli.run(overrides, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("[lora_lab] run folder: ")]
    (run_dir,) = list((tmp_path / "outputs" / "runs").iterdir())  # Hydra named it: <tag>-s<seed>-<hash>
    assert lines == [f"[lora_lab] run folder: {run_dir}"] * 2
    assert out.stdout.splitlines()[-1] == lines[-1] and records.load_record(run_dir)["status"] == "completed"
    assert run_name(compose_config(*overrides)) == run_dir.name

    started = {}

    def start(cls, config, **kwargs):  # what the command gives W&B
        started.update(kwargs)
        return Tracker(None)

    from unittest import mock

    with mock.patch.object(Tracker, "start", classmethod(start)), mock.patch(
            "lora_lab.cli.main.run_checked_training", side_effect=RuntimeError("stop here")):
        from lora_lab.cli.main import train_and_record

        with pytest.raises(RuntimeError):
            train_and_record(compose_config(*overrides, "logger=wandb", "logger.mode=disabled"), tmp_path / "w", False)
    assert started["name"] == run_dir.name


@pytest.mark.parametrize("extra", [["method.r=0"], ["trainer.schedule=step"], ["dry_run=true"]])
def test_bad_input_or_a_dry_run_writes_no_run_folder(tmp_path, warm_cli, extra):
    out = warm_cli.run([*SMOKE, f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", *extra],
                       cwd=tmp_path)
    assert out.returncode == (0 if extra == ["dry_run=true"] else 2), out.stderr[-2000:]
    assert not (tmp_path / "run").exists() and "run folder" not in out.stdout
    assert ("[dry run]" in out.stdout) is (extra == ["dry_run=true"])


def test_fp16_loss_scaler_steps_and_is_checkpointed(tmp_path, monkeypatch):
    """The CUDA path's GradScaler (here torch's CPU GradScaler in its place): the run trains through it,
    and its state is saved with every checkpoint and restored on resume."""
    from lora_lab.runtime.checkpoint import CHECKPOINT_DIR, peek_progress
    from lora_lab.trainer import setup

    scalers = []

    def scaler(device, precision):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3))
        return scalers[-1]

    monkeypatch.setattr(setup, "grad_scaler", scaler)
    cfg = smoke_cfg(tmp_path, "trainer.precision=fp16", "trainer.checkpoint_every=3", "trainer.keep_checkpoint=true")
    record = run_training(cfg, tmp_path / "run")
    assert math.isfinite(record["epochs"][0]["train_loss"]) and scalers[0].get_scale() == 2.0**12  # grew twice in 8 steps
    saved = peek_progress(tmp_path / "run" / CHECKPOINT_DIR)
    assert saved["grad_scaler"]["scale"] == 2.0**12 and saved["grad_scaler"]["_growth_tracker"] == 2
    clip, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def dies_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("died")
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", dies_at_step_5)
    with pytest.raises(RuntimeError, match="died"):
        run_training(cfg, tmp_path / "resumed")
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    resumed = run_training(cfg, tmp_path / "resumed")  # from step 3, the scale 2**11 and one step towards growing
    assert resumed["resumes"] == [{"step": 3, "epoch": 1}] and resumed["epochs"] == record["epochs"]
    assert scalers[-1].get_scale() == 2.0**12
