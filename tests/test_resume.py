"""Killed runs resume to the same result, bit for bit on CPU; sweeps survive failing jobs and skip
completed ones. Every run here is a ``lora-lab`` process of its own: forked from a warm interpreter
(tests/warm_cli.py), or started as a fresh interpreter where the start itself belongs to the test."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lora_lab.runtime import records

DRIVER = str(Path(__file__).with_name("crash_driver.py"))
# 2 epochs of 8 steps, a checkpoint every 3 steps; the tiny BERT has dropout, so RNG state matters
RUN = ["experiment=smoke", "logger=disabled", "trainer.epochs=2", "trainer.checkpoint_every=3"]


def lora_lab(*args, cwd, driver=None, check=True, warm=None):
    """The command (under crash_driver.py's kill point ``driver``, if given), forked by ``warm`` if
    given, else in a fresh interpreter."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if warm is not None:
        out = warm.run(args, cwd=cwd, env=env, driver=driver)
    else:
        command = [sys.executable, DRIVER, *driver] if driver else [sys.executable, "-m", "lora_lab.cli.main"]
        out = subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def result(run_dir: Path) -> dict:
    """Everything a run reports and saves, except timings."""
    record = records.load_record(run_dir)
    tensors = {}
    for name in (records.STATE_FILE, records.DELTA_FILE, records.LAST_STATE_FILE):
        if (run_dir / name).exists():
            tensors.update({f"{name}:{k}": v for k, v in load_file(str(run_dir / name)).items()})
    # the files' SHA-256 are left out: safetensors writes a header's metadata in an order of its own per process
    files = {name: {k: v for k, v in entry.items() if k != "sha256"} for name, entry in record["files"].items()}
    return {"epochs": record["epochs"], "best": record["best"], "last": record["last"], "files": files,
            "tensors": tensors}


def assert_same(a: dict, b: dict) -> None:
    assert a["epochs"] == b["epochs"] and a["best"] == b["best"] and a["files"] == b["files"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for key, tensor in a["tensors"].items():
        assert tensor.dtype == b["tensors"][key].dtype and tensor.equal(b["tensors"][key]), key


def run_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [*RUN, f"data.cache_dir={tmp_path.parent / 'cache'}", f"hydra.run.dir={tmp_path / name}", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, warm_cli):
    root = tmp_path_factory.mktemp("reference")
    lora_lab(*run_args(root, "run"), cwd=root, warm=warm_cli)
    return result(root / "run")


def test_same_config_same_result_in_two_processes(reference, tmp_path):
    lora_lab(*run_args(tmp_path, "run"), cwd=tmp_path)  # a fresh interpreter; the reference is a forked one
    record = records.load_record(tmp_path / "run")
    assert_same(result(tmp_path / "run"), reference)
    assert record["resumes"] == [] and record["measurements"]["checkpoints_written"] == 7  # 5 by step, 2 epoch ends
    assert not (tmp_path / "run" / "checkpoint").exists()  # removed once the run completed


@pytest.mark.parametrize("point,n", [
    ("step", 2),              # before the first checkpoint: starts over
    ("step", 5),              # mid-epoch, between checkpoints
    ("step", 11),             # epoch 2, after the epoch-1 checkpoint
    ("checkpoint_write", 2),  # half-way through writing a checkpoint
    ("eval", 1),              # during the first evaluation
    ("best", 1),              # best-epoch state written, its checkpoint not yet
    ("finish", 1),            # training done, final files half written
])
def test_killed_run_resumes_to_the_same_result(reference, tmp_path, point, n, warm_cli):
    args = run_args(tmp_path, "run")
    killed = lora_lab(*args, cwd=tmp_path, driver=[point, str(n)], check=False, warm=warm_cli)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    record_path = tmp_path / "run" / records.RECORD_FILE
    assert not record_path.exists() or json.loads(record_path.read_text())["status"] != "completed"
    for path in (tmp_path / "run").rglob("*.safetensors"):  # whatever exists is complete
        load_file(str(path))

    resumed = lora_lab(*args, cwd=tmp_path, warm=warm_cli)
    assert_same(result(tmp_path / "run"), reference)
    record = records.load_record(tmp_path / "run")
    if (point, n) == ("step", 2):
        assert record["resumes"] == [] and "resuming" not in resumed.stdout
    else:
        assert len(record["resumes"]) == 1 and "resuming from" in resumed.stdout
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_killed_run_with_gradient_accumulation_resumes_to_the_same_result(tmp_path, warm_cli):
    """Micro-batches of 4, two per optimiser step: checkpoints fall between optimiser steps, and a
    run killed inside a group resumes from the last one to the uninterrupted result."""
    extra = ["trainer.batch_size=4", "trainer.grad_accum=2"]
    lora_lab(*run_args(tmp_path, "reference", *extra), cwd=tmp_path, warm=warm_cli)
    killed = lora_lab(*run_args(tmp_path, "run", *extra), cwd=tmp_path, driver=["step", "5"], check=False,
                      warm=warm_cli)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    lora_lab(*run_args(tmp_path, "run", *extra), cwd=tmp_path, warm=warm_cli)
    assert_same(result(tmp_path / "run"), result(tmp_path / "reference"))
    record = records.load_record(tmp_path / "run")
    assert record["resumes"] == [{"step": 3, "epoch": 1}] and record["last"]["step"] == 16


def test_sigterm_checkpoints_and_exits_143_then_resumes(reference, tmp_path, warm_cli):
    args = run_args(tmp_path, "run")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    # a fresh interpreter: the exit status on a signal is the process's
    # the driver's "slow" point sleeps in every step so that the signal lands mid-training
    process = subprocess.Popen([sys.executable, DRIVER, "slow", "1", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "run" / "checkpoint" / "last.safetensors"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr
    record = json.loads((tmp_path / "run" / records.RECORD_FILE).read_text())
    assert record["status"] == "preempted" and record["error_kind"] == "preempted"

    lora_lab(*args, cwd=tmp_path, warm=warm_cli)
    assert_same(result(tmp_path / "run"), reference)


def test_checkpoint_of_another_config_is_refused_in_one_line(tmp_path, warm_cli):
    args = run_args(tmp_path, "run")
    lora_lab(*args, cwd=tmp_path, driver=["step", "11"], check=False, warm=warm_cli)
    out = lora_lab(*args, "trainer.lr=0.002", "seed=1", cwd=tmp_path, check=False, warm=warm_cli)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, out.stderr
    assert errors[0].startswith("lora-lab: error: checkpoint=") and "trainer.lr: 0.001 -> 0.002" in errors[0]
    assert "seed: 0 -> 1" in errors[0]


def test_sweep_records_raise_and_nan_then_rerun_skips_completed_jobs(tmp_path, warm_cli):
    sweep = tmp_path / "sweep"
    args = ["-m", *RUN, f"data.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}", "seed=0,1,2"]
    # seed=1: NaN loss at its 5th step; seed=2: raises at its 5th step (after the checkpoint at step 3)
    first = lora_lab(*args, cwd=tmp_path, driver=["faults", "5"], warm=warm_cli)
    status = {}
    for run_dir in records.find_run_dirs(sweep):
        record = json.loads((run_dir / records.RECORD_FILE).read_text())
        status[record["config"]["seed"]] = (record["status"], record.get("error_kind"), record.get("error"))
    assert status == {0: ("completed", None, None),
                      1: ("diverged", "diverged", "Diverged: training loss is nan at step 5; stopped before the update"),
                      2: ("failed", "exception", "RuntimeError: injected failure")}
    assert first.stderr.count("the sweep goes on") == 2
    completed = sweep / "0_lora_r8_s0"
    mtime = (completed / records.RECORD_FILE).stat().st_mtime_ns

    second = lora_lab(*args, cwd=tmp_path, driver=["faults", "5"], warm=warm_cli)
    assert second.stdout.count("already completed, skipped") == 1
    assert (completed / records.RECORD_FILE).stat().st_mtime_ns == mtime
    assert second.stderr.count("the sweep goes on") == 2  # the other two ran again
    assert second.stdout.count("resuming from") == 2  # both from their step-3 checkpoints


@pytest.mark.parametrize("method", [["method=prompt"], ["method=prefix", "method.reparameterize=true"]])
def test_killed_prompt_and_prefix_runs_resume_to_the_same_result(tmp_path, warm_cli, method):
    """Virtual tokens and layer prefixes (through the MLP, folded into plain prefixes when training ends)
    resume from a mid-epoch checkpoint to the uninterrupted result."""
    lora_lab(*run_args(tmp_path, "reference", *method), cwd=tmp_path, warm=warm_cli)
    killed = lora_lab(*run_args(tmp_path, "run", *method), cwd=tmp_path, driver=["step", "5"], check=False,
                      warm=warm_cli)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    lora_lab(*run_args(tmp_path, "run", *method), cwd=tmp_path, warm=warm_cli)
    assert_same(result(tmp_path / "run"), result(tmp_path / "reference"))
    assert len(records.load_record(tmp_path / "run")["resumes"]) == 1
