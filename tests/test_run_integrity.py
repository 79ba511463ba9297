"""What a run folder can be trusted with: strict JSON records (no NaN), a clean Ctrl-C, one owner per
folder (``.lock``), the run's lines in ``main.log``, and SHA-256 digests of its tensor files checked
by resume, export and the analysis tools."""
import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_lab.analysis.runs import run_from_record
from lora_lab.errors import ConfigError
from lora_lab.peft.export import rebuild_run
from lora_lab.runtime import checkpoint, records
from lora_lab.runtime.run_lock import LOCK_FILE, RunLock

# a tiny random BERT, 2 epochs of 8 steps; a checkpoint every 3 steps, kept for the digest tests
RUN = ["experiment=smoke", "logger=disabled", "trainer.checkpoint_every=3", "trainer.latency_repeats=1"]


def refuse_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def command(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [*RUN, f"data.cache_dir={tmp_path.parent / 'cache'}", f"hydra.run.dir={tmp_path / name}", *extra]


def run_cli(warm_cli, args, cwd, driver=None):
    return warm_cli.run(args, cwd=cwd, env={**os.environ, "WANDB_MODE": "disabled"}, driver=driver)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, warm_cli):
    """Two steps, fewer than trainer.throughput_warmup_steps (5): throughput cannot be measured. The
    first process is killed (SIGKILL) while writing the final files, after its last epoch; the same
    command resumes it. The checkpoint folder is kept."""
    root = tmp_path_factory.mktemp("short")
    args = command(root, "run", "trainer.max_steps=2", "trainer.keep_checkpoint=true")
    killed = run_cli(warm_cli, args, root, driver=["finish", "1"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    out = run_cli(warm_cli, args, root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "run", out


def flip_last_bit(path: Path) -> None:
    """Flip the lowest bit of the file's last byte: inside the last tensor's data (safetensors puts the
    header first), and for a little-endian float a change of its lowest mantissa bit: still finite."""
    data = bytearray(path.read_bytes())
    data[-4] ^= 1
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- 1. strict JSON

def test_unmeasured_throughput_is_null_with_its_reason(short_run):
    run_dir, _ = short_run
    record = json.loads((run_dir / records.RECORD_FILE).read_text(), parse_constant=refuse_constant)
    m = record["measurements"]
    for key in ("train_samples_per_s", "train_tokens_per_s", "train_step_ms_median"):
        assert m[key] is None and "no steps after the warm-up" in m[f"{key}_reason"]
    assert m["measured_steps"] == 0 and "non_finite" not in record
    records.load_record(run_dir)  # the readers accept it


def test_writing_nan_fails_loudly_and_old_records_with_nan_are_read(tmp_path):
    with pytest.raises(ValueError):
        records.write_json(tmp_path / "x.json", {"a": math.nan})
    assert not (tmp_path / "x.json").exists()
    clean, found = records.non_finite_to_null({"best": {"validation/pearson": math.nan}, "x": [1.0, math.inf]})
    assert clean == {"best": {"validation/pearson": None}, "x": [1.0, None]}
    assert found == {"best.validation/pearson": "nan", "x[1]": "inf"}
    old = {"status": "completed", "config": {}, "best": {"epoch": 1, "validation/accuracy": 0.5, "test/accuracy": 0.5},
           "last": {"epoch": 1}, "parameters": {"trainable": 1, "total": 2},
           "measurements": {"train_samples_per_s": math.nan}}
    (tmp_path / records.RECORD_FILE).write_text(json.dumps(old))  # NaN, as records were written before
    assert math.isnan(records.load_record(tmp_path)["measurements"]["train_samples_per_s"])
    # a metric written as null because it was NaN reads as NaN again (the table counts the run as not completed)
    new = {**old, "best": {**old["best"], "validation/accuracy": None}, "non_finite": {"best.validation/accuracy": "nan"}}
    assert math.isnan(run_from_record(new, None, "best").val)


# ---------------------------------------------------------------- 2. Ctrl-C, 4. main.log

def test_ctrl_c_checkpoints_exits_130_in_one_line_then_resumes_and_prints_the_result(tmp_path, warm_cli):
    args = command(tmp_path, "run", "trainer.max_steps=5")  # a checkpoint at step 3
    env = {**os.environ, "WANDB_MODE": "disabled"}
    job = warm_cli.start(args, cwd=tmp_path, env=env, driver=["slow", "1"])  # 0.2 s per step
    last = tmp_path / "run" / "checkpoint" / checkpoint.LAST
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and warm_cli.poll(job) is None:
        time.sleep(0.05)
    os.kill(job["pid"], signal.SIGINT)
    out = warm_cli.wait(job)
    assert out.returncode == 130, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lora-lab: stopped by SIGINT at step"), out.stderr
    record = json.loads((tmp_path / "run" / records.RECORD_FILE).read_text(), parse_constant=refuse_constant)
    assert record["status"] == "interrupted" and record["error_kind"] == "interrupted"
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released at exit

    resumed = run_cli(warm_cli, args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "[lora_lab] result: best epoch" in resumed.stdout
    log = (tmp_path / "run" / "main.log").read_text()
    assert "stopped by SIGINT" in log and "[lora_lab] epoch 1:" in log and "[lora_lab] result:" in log
    assert "resuming from" in log


def test_a_run_resumed_after_its_last_epoch_prints_its_result(short_run):
    run_dir, resumed = short_run  # killed after its last epoch, then resumed
    assert "[lora_lab] epoch" not in resumed.stdout and "[lora_lab] result: best epoch 1 of 1" in resumed.stdout
    assert "took over the lock" in resumed.stdout and "is not running" in resumed.stdout  # the killed one's
    assert "took over the lock" in (run_dir / "main.log").read_text()


# ---------------------------------------------------------------- 3. one owner per run folder

def fake_lock(run_dir: Path, **owner) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "started": now,
                                                 "heartbeat": now, "slurm_job_id": None, "token": "x", **owner}))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_is_taken_refused_and_released(tmp_path):
    lines = []
    lock = RunLock.acquire(tmp_path / "run", say=lines.append)
    owner = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and lines == []
    assert {"started", "heartbeat", "slurm_job_id", "token"} <= set(owner)
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()

    fake_lock(tmp_path / "busy")  # a live process (pytest's parent) with a fresh heartbeat
    assert RunLock.acquire(tmp_path / "busy", say=lines.append) is None and lines == []
    fake_lock(tmp_path / "elsewhere", host="another-host")  # another host, fresh heartbeat
    assert RunLock.acquire(tmp_path / "elsewhere", say=lines.append) is None and lines == []


@pytest.mark.parametrize("owner,reason", [
    ({"pid": "dead"}, "is not running"),
    ({"host": "another-host", "heartbeat": "1000 s ago"}, "heartbeat is 1"),
    ({"host": "another-host", "slurm_job_id": "4242"}, "SLURM job 4242 was requeued"),
])
def test_lock_of_a_dead_or_silent_owner_is_taken_over(tmp_path, monkeypatch, owner, reason):
    monkeypatch.setenv("SLURM_JOB_ID", "4242" if owner.get("slurm_job_id") else "1")
    # values known when the test runs, not when it is collected (a long suite collects its tests long before)
    now = {"dead": lambda: dead_pid(), "1000 s ago": lambda: time.time() - 1000}
    fake_lock(tmp_path, **{k: now[v]() if v in now else v for k, v in owner.items()})
    lines = []
    lock = RunLock.acquire(tmp_path, stale_after=600, say=lines.append)
    assert lock is not None and len(lines) == 1 and "took over the lock" in lines[0] and reason in lines[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]  # the stale one is gone
    lock.release()


def test_heartbeat_is_refreshed_and_a_taken_over_lock_is_left_alone(tmp_path):
    lock = RunLock.acquire(tmp_path, stale_after=0.2)  # a heartbeat every 0.05 s
    first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] > first
    fake_lock(tmp_path, token="someone else")
    time.sleep(0.15)
    lock.release()
    assert lock.lost and json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "someone else"


def test_two_processes_on_one_folder_one_trains_one_skips(tmp_path, warm_cli):
    """Two copies of a one-job sweep started at once: one trains; the other says who has the job's
    folder and exits 0 without training. The job's main.log holds its lines."""
    sweep = tmp_path / "sweep"
    args = ["-m", *RUN, f"data.cache_dir={tmp_path.parent / 'cache'}", f"hydra.sweep.dir={sweep}",
            "trainer.max_steps=3", "seed=0"]
    job = warm_cli.start(args, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"}, driver=["slow", "1"],
                         copies=2)
    warm_cli.wait(job)
    outs = sorted(job["copies"], key=lambda out: "skipped:" in out.stdout)
    assert [out.returncode for out in outs] == [0, 0], [out.stderr[-2000:] for out in outs]
    trained, skipped = outs
    assert "[lora_lab] epoch 1:" in trained.stdout and "[lora_lab] epoch" not in skipped.stdout
    line = [x for x in skipped.stdout.splitlines() if "skipped:" in x]
    assert len(line) == 1 and any(f"is in use by pid {pid} on {socket.gethostname()}" in line[0] for pid in job["pids"])
    run_dir = records.find_run_dirs(sweep)[0]
    assert records.load_record(run_dir)["status"] == "completed" and not (run_dir / LOCK_FILE).exists()
    log = (run_dir / "main.log").read_text()
    assert "[lora_lab] epoch 1:" in log and "[lora_lab] result:" in log and "skipped" not in log


# ---------------------------------------------------------------- 5. digests

def test_record_lists_the_sha256_of_each_tensor_file(short_run):
    run_dir, _ = short_run
    files = records.load_record(run_dir)["files"]
    assert {records.STATE_FILE, records.PREDICTIONS_FILE} <= set(files) and records.DELTA_FILE not in files
    for name, entry in files.items():
        assert entry["sha256"] == records.file_sha256(run_dir / name)


@pytest.mark.parametrize("name", [records.STATE_FILE, records.PREDICTIONS_FILE])
def test_a_flipped_byte_is_refused_in_one_line_naming_the_file(short_run, tmp_path, name):
    run_dir = tmp_path / "run"
    shutil.copytree(short_run[0], run_dir)
    path = run_dir / name
    flip_last_bit(path)
    assert all(torch.isfinite(t).all() for t in load_file(str(path)).values() if t.is_floating_point())
    record = records.load_record(run_dir)
    with pytest.raises(ConfigError) as refused:
        if name == records.STATE_FILE:
            rebuild_run(run_dir)  # lora-lab-export; lora-lab-subspace derives ΔW from the same rebuilt model
        else:
            run_from_record(record, None, "best", str(run_dir)).examples  # lora-lab-table
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "SHA-256" in message


def test_resume_refuses_a_flipped_byte_in_a_checkpoint_file(short_run, tmp_path):
    directory = tmp_path / "checkpoint"
    shutil.copytree(short_run[0] / checkpoint.CHECKPOINT_DIR, directory)
    saved = checkpoint.load(directory)  # intact: loads
    best = checkpoint.best_file(directory, saved.progress["best"]["step"])
    assert checkpoint.load_best(directory, saved)
    flip_last_bit(best)
    with pytest.raises(ConfigError, match="SHA-256") as refused:
        checkpoint.load_best(directory, saved)
    assert str(best) in str(refused.value)
    flip_last_bit(directory / checkpoint.LAST)
    with pytest.raises(ConfigError, match="SHA-256") as refused:
        checkpoint.load(directory)
    assert str(directory / checkpoint.LAST) in str(refused.value) and "\n" not in str(refused.value)


def test_a_newer_best_in_the_same_epoch_leaves_the_checkpointed_one_intact(tmp_path):
    """trainer.eval_every evaluates several times per epoch: a kill after a newer best is written and before
    the checkpoint naming it resumes with the best that the last checkpoint names."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    first, second = {"weight": torch.zeros(2, 2)}, {"weight": torch.ones(2, 2)}
    progress = {"step": 5, "best": {"epoch": 1, "step": 5}, "best_epoch": 1}
    checkpoint.save_best(tmp_path, first, progress["best"])
    checkpoint.save(tmp_path, model, optimizer, scheduler, {}, progress, {})
    checkpoint.save_best(tmp_path, second, {"epoch": 1, "step": 10})  # killed before its checkpoint
    assert checkpoint.load_best(tmp_path, checkpoint.load(tmp_path))["weight"].equal(first["weight"])
    # written by an older lora_lab, whose best files were named by epoch: still found, and kept
    checkpoint.best_file(tmp_path, 5).rename(tmp_path / "best-epoch1.safetensors")
    checkpoint.save(tmp_path, model, optimizer, scheduler, {}, progress, {})
    checkpoint.drop_stale_best(tmp_path, progress)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-epoch1.safetensors", checkpoint.LAST]
    assert checkpoint.load_best(tmp_path, checkpoint.load(tmp_path))["weight"].equal(first["weight"])


# ---------------------------------------------------------------- 5. a full disk

def disk_full_at(monkeypatch, fragment: str, n: int) -> None:
    """The n-th safetensors write whose path holds ``fragment`` writes half its bytes, then fails
    as a full disk does."""
    original, calls = records.save_file, {"n": 0}

    def save_file(tensors, path, metadata=None):
        if fragment in str(path):
            calls["n"] += 1
            if calls["n"] == n:
                original(tensors, path, metadata=metadata)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(tensors, path, metadata=metadata)

    monkeypatch.setattr(records, "save_file", save_file)


@pytest.mark.parametrize("fragment,n", [(".last.safetensors.", 2), (".trainable.safetensors.", 1)],
                         ids=["second checkpoint", "final files"])
def test_a_full_disk_fails_in_one_line_keeps_the_last_checkpoint_and_resumes_bit_exact(
        tmp_path, monkeypatch, capsys, fragment, n):
    from conftest import compose_config

    from lora_lab.cli.main import train_and_record

    cfg = compose_config(*command(tmp_path, "unused")[:-1])
    train_and_record(cfg, tmp_path / "straight", multirun=False)
    capsys.readouterr()

    run_dir = tmp_path / "full"
    with monkeypatch.context() as patch:
        disk_full_at(patch, fragment, n)
        with pytest.raises(SystemExit) as exited:
            train_and_record(cfg, run_dir, multirun=False)
    assert exited.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("lora-lab: error: OSError: [Errno 28] No space left on device")
    assert "the same command resumes" in errors[0]
    record = json.loads((run_dir / records.RECORD_FILE).read_text())
    assert record["status"] == "failed" and record["error_kind"] == "disk"
    saved = checkpoint.load(run_dir / checkpoint.CHECKPOINT_DIR)  # the one before the failed write, whole
    last_step = records.load_record(tmp_path / "straight")["epochs"][-1]["step"]
    assert saved.progress["step"] == (3 if n == 2 else last_step)
    assert not list(run_dir.rglob(".*.tmp"))  # the half-written file is gone

    train_and_record(cfg, run_dir, multirun=False)  # space is back: the same command resumes
    assert "resuming from" in capsys.readouterr().out
    straight, resumed = (records.load_record(d) for d in (tmp_path / "straight", run_dir))
    assert resumed["status"] == "completed" and resumed["best"] == straight["best"]
    for name in (records.STATE_FILE, records.PREDICTIONS_FILE):
        ours, theirs = load_file(run_dir / name), load_file(tmp_path / "straight" / name)
        assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours), name
