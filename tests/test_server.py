"""The warm server (lora-lab-server) and the lora-lab command that hands jobs to it."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_lab import records, warm
from lora_lab.cli import run_on_server
from lora_lab.server import Server, _exit_code

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the warm server needs fork")

SMOKE = ["experiment=smoke", "logger=disabled"]


# ---------------------------------------------------------------- pieces, no server

def test_messages_carry_file_descriptors_and_long_payloads():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    read_end, write_end = os.pipe()
    message = {"op": "run", "env": {"X": "y" * 200_000}}  # longer than one recv
    with left, right:
        warm.send_message(left, message, [write_end])
        got, fds = warm.receive_message(right, max_fds=3)
        assert got == message and len(fds) == 1
        os.write(fds[0], b"through the passed descriptor")
        os.close(fds[0])
        os.close(write_end)
        assert os.read(read_end, 100) == b"through the passed descriptor"
        left.close()
        assert warm.receive_message(right) == (None, [])
    os.close(read_end)


def test_only_variables_read_at_import_must_match():
    base = {"HOME": "/home/a", "PATH": "/bin", "WANDB_RUN_ID": "1"}
    assert warm.environment_difference(base, dict(base)) is None
    # W&B agents set a run id per trial, shells change PATH: neither is read when libraries import
    assert warm.environment_difference({**base, "WANDB_RUN_ID": "2", "PATH": "/usr/bin"}, base) is None
    assert warm.environment_difference({**base, "HF_HOME": "/x"}, base) == "HF_HOME differs from the server's"
    assert warm.environment_difference(base, {**base, "OMP_NUM_THREADS": "1"}) == \
        "OMP_NUM_THREADS differs from the server's"


def test_fingerprint_follows_the_sources(tmp_path, monkeypatch):
    source = tmp_path / "pkg" / "mod.py"
    source.parent.mkdir()
    source.write_text("x = 1\n")
    monkeypatch.setattr(warm, "PACKAGE_DIRS", (source.parent,))
    before = warm.code_fingerprint()
    assert warm.code_fingerprint() == before
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 1_000_000))
    assert warm.code_fingerprint() != before


def test_exit_status_of_a_signalled_job_is_the_shells_128_plus_signal():
    assert _exit_code(3 << 8) == 3
    assert _exit_code(signal.SIGINT) == 130
    assert _exit_code(signal.SIGKILL) == 137


def test_without_a_server_the_command_runs_the_job_itself(tmp_path, monkeypatch):
    monkeypatch.setenv(warm.SOCKET_ENV, str(tmp_path / "none.sock"))
    with pytest.raises(warm.ServerUnavailable):
        run_on_server(["model=tiny"])
    proc = subprocess.run([sys.executable, "-m", "lora_lab.server", "status"], capture_output=True, text=True,
                          env={**os.environ, warm.SOCKET_ENV: str(tmp_path / "none.sock")}, timeout=60)
    assert proc.returncode == 1 and "not running" in proc.stdout


def test_a_socket_others_can_write_to_is_not_trusted(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(shared / "s.sock"))
    listener.listen(1)
    monkeypatch.setenv(warm.SOCKET_ENV, str(shared / "s.sock"))
    with listener, pytest.raises(warm.UnsafeSocket, match="writable by others"):
        run_on_server(["model=tiny"])  # the environment, API keys included, is never sent
    (shared / "s.sock").unlink()
    proc = subprocess.run([sys.executable, "-m", "lora_lab.server", "start"], capture_output=True, text=True,
                          env={**os.environ, warm.SOCKET_ENV: str(shared / "s.sock")}, timeout=60)
    assert proc.returncode == 2 and "is writable by others" in proc.stderr
    assert (shared.stat().st_mode & 0o777) == 0o777  # left as it was


def test_a_stopping_server_never_removes_the_socket_of_the_one_started_after_it(tmp_path, monkeypatch):
    monkeypatch.setenv(warm.SOCKET_ENV, str(tmp_path / "s.sock"))
    old = Server(preload=(), idle_timeout=0)
    listener = old.listen()
    old.remove_socket()  # it stops: commands must no longer find it, while its jobs finish
    assert not old.path.exists()
    newer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    newer.bind(str(old.path))
    old.remove_socket()  # its last jobs ended: it exits
    assert old.path.exists()
    listener.close()
    newer.close()


# ---------------------------------------------------------------- one real server for the rest

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    env = {**os.environ, "WANDB_MODE": "disabled", warm.SOCKET_ENV: str(root / "s.sock")}
    env.pop(warm.DISABLE_ENV, None)
    started = subprocess.run([sys.executable, "-m", "lora_lab.server", "start", "--idle-timeout", "600"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert started.returncode == 0, started.stderr
    assert "ready" in started.stdout
    yield root, env
    subprocess.run([sys.executable, "-m", "lora_lab.server", "stop"], env=env, timeout=60)


def lora_lab(env, *args, cwd, extra_env=None):
    return subprocess.run([sys.executable, "-m", "lora_lab.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**env, **(extra_env or {})}, timeout=300)


def status(env) -> dict:
    path = Path(env[warm.SOCKET_ENV])
    return warm.request({"op": "ping"}, path)


def test_a_job_through_the_server_equals_the_same_job_in_a_fresh_process(server, tmp_path):
    root, env = server
    args = [*SMOKE, f"data.cache_dir={root / 'cache'}"]
    served = lora_lab(env, *args, f"hydra.run.dir={tmp_path / 'served'}", cwd=tmp_path)
    assert served.returncode == 0, served.stderr
    assert "[lora_lab] epoch 1" in served.stdout  # the job wrote to the command's own stdout
    # a variable that libraries read at import differs: the server declines, the command runs the job
    fresh = lora_lab(env, *args, f"hydra.run.dir={tmp_path / 'fresh'}", cwd=tmp_path,
                     extra_env={"HF_HUB_DISABLE_TELEMETRY": "1"})
    assert fresh.returncode == 0, fresh.stderr
    assert "HF_HUB_DISABLE_TELEMETRY differs from the server's" in fresh.stderr
    a, b = (records.load_record(tmp_path / name) for name in ("served", "fresh"))
    assert a["measurements"]["launched_via"] == "warm server"
    assert b["measurements"]["launched_via"] == "fresh process"
    assert a["epochs"] == b["epochs"] and a["best"] == b["best"]
    assert a["config"] == b["config"]
    # start-up counts from the command's start: it includes the Hydra job's own set-up
    m = a["measurements"]
    assert m["process_start_to_first_step_s"] > m["job_start_to_first_step_s"] > 0


def test_relative_paths_resolve_in_the_commands_directory(server, tmp_path):
    root, env = server
    out = lora_lab(env, *SMOKE, f"data.cache_dir={root / 'cache'}", "hydra.run.dir=relative/run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert records.load_record(tmp_path / "relative" / "run")["status"] == "completed"


def test_bad_input_through_the_server_is_one_line_and_exit_2(server, tmp_path):
    root, env = server
    out = lora_lab(env, *SMOKE, "method.budget=-5", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2
    assert [line for line in out.stderr.splitlines() if "error" in line] == \
        ["lora-lab: error: method.budget=-5: must be a positive number of LoRA parameters or null"]
    unknown = lora_lab(env, "no_such_key=1", f"hydra.run.dir={tmp_path / 'run2'}", cwd=tmp_path)
    assert unknown.returncode == 1 and "no_such_key" in unknown.stderr


def _long_job(env, root, run_dir, cwd):
    args = [sys.executable, "-m", "lora_lab.cli", *SMOKE, f"data.cache_dir={root / 'cache'}", "trainer.epochs=200",
            "data.max_train=256", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "main.log").exists() or status(env)["running"] == 0:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.2)
    time.sleep(3)  # into the training loop
    return proc


def test_ctrl_c_reaches_the_job_which_records_the_interruption(server, tmp_path):
    root, env = server
    proc = _long_job(env, root, tmp_path / "run", tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    record = json.loads((tmp_path / "run" / records.RECORD_FILE).read_text())
    assert record["status"] == "failed" and record["error"].startswith("KeyboardInterrupt")


def test_a_killed_command_takes_its_job_with_it(server, tmp_path):
    root, env = server
    proc = _long_job(env, root, tmp_path / "run", tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while status(env)["running"]:
        assert time.monotonic() < deadline, "the job outlived its command"
        time.sleep(0.2)


def test_a_server_from_other_code_turns_jobs_away_and_stops(server, tmp_path):
    root, env = server
    path = Path(env[warm.SOCKET_ENV])
    with warm.connect(path) as sock:
        warm.send_message(sock, {"op": "run", "argv": [], "cwd": str(tmp_path), "env": env,
                                 "fingerprint": "from other sources", "launched_at": time.time(), "fds": []})
        reply, _ = warm.receive_message(sock)
    assert reply["ok"] is False and "changed since it started" in reply["reason"]
    deadline = time.monotonic() + 30
    while path.exists():
        assert time.monotonic() < deadline, "a stale server kept listening"
        time.sleep(0.2)
    # with the server gone the command runs jobs itself, silently
    out = lora_lab(env, *SMOKE, f"data.cache_dir={root / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path)
    assert out.returncode == 0 and "warm server" not in out.stderr
    assert records.load_record(tmp_path / "run")["measurements"]["launched_via"] == "fresh process"
