"""The W&B tracker: offline and disabled modes, continuing a run, preemption notices, and training
that goes on (offline) when the W&B server cannot be reached. These tests start real wandb runs; the
"server" is a closed local port or a local HTTP server that only answers 503."""
from __future__ import annotations

import http.server
import threading
import time
import types

import pytest
import wandb

from lora_lab.runtime import tracking
from lora_lab.runtime.tracking import Tracker

FAKE_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 characters, accepted locally, never valid
CLOSED_PORT_URL = "http://127.0.0.1:9"  # discard: nothing listens there


@pytest.fixture(autouse=True)
def fresh_wandb(monkeypatch, tmp_path):
    """wandb reads its environment once per process: start each test from a clean W&B session and an
    environment without credentials, proxies or a mode of its own."""
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_INIT_TIMEOUT", "WANDB_HTTP_PROXY",
                "WANDB_HTTPS_PROXY", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY",
                "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    wandb.teardown()
    yield
    wandb.teardown()


def offline_runs(directory):
    return sorted((directory / "wandb").glob("offline-run-*"))


def history_bytes(run_dir, expect: bytes = b"train/loss") -> bytes:
    """The run's transaction log. wandb writes it in its own process, which may still be flushing
    it for a moment after run.finish() returns."""
    (data,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + 10
    while expect not in data.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    return data.read_bytes()


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def log_a_little(tracker: Tracker) -> None:
    tracker.log({"train/loss": 0.625}, step=1)
    tracker.log({"validation/accuracy": 0.875}, step=2)
    tracker.summary({"best/validation/accuracy": 0.875})
    tracker.finish()


# ---------------------------------------------------------------- modes that never go online


def test_disabled_logs_nothing_and_has_no_run_id(tmp_path, capfd):
    tracker = Tracker.start({"a": 1}, mode="disabled", directory=tmp_path, run_id="abc123")
    assert not tracker.enabled and tracker.run_id is None
    tracker.log({"x": 1}, step=1)
    tracker.summary({"x": 1})
    tracker.mark_preempting()
    tracker.finish()
    assert not (tmp_path / "wandb").exists()
    assert capfd.readouterr().err == ""


def test_offline_writes_its_run_and_says_nothing(tmp_path, capfd):
    tracker = Tracker.start({"a": 1}, mode="offline", directory=tmp_path)
    assert tracker.enabled and tracker.run_id
    run_id = tracker.run_id
    log_a_little(tracker)
    (run_dir,) = offline_runs(tmp_path)
    assert run_dir.name.endswith(run_id) and b"train/loss" in history_bytes(run_dir)
    assert tracker.run_id == run_id  # still known after finish
    assert capfd.readouterr().err == ""


def test_auto_mode_goes_online_only_with_credentials(tmp_path, monkeypatch):
    assert tracking.resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert tracking.resolve_mode("auto") == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text(f"machine wandb.example.org\n  login user\n  password {FAKE_KEY}\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert tracking.resolve_mode("auto") == "offline"  # a key for another server
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert tracking.resolve_mode("auto") == "online"
    assert tracking.resolve_mode("disabled") == "disabled" and tracking.resolve_mode("offline") == "offline"


# ---------------------------------------------------------------- continuing a run, preemption


def test_a_run_id_continues_that_run(tmp_path):
    first = Tracker.start({"a": 1}, mode="offline", directory=tmp_path / "one", run_id="lora-r8-s0-x1")
    assert first.run_id == "lora-r8-s0-x1"
    first.mark_preempting()  # a real run takes the notice
    first.log({"train/loss": 1.0}, step=1)
    first.finish(exit_code=1)
    second = Tracker.start({"a": 1}, mode="offline", directory=tmp_path / "two", run_id="lora-r8-s0-x1")
    assert second.run_id == "lora-r8-s0-x1"
    second.finish()


def test_online_start_asks_wandb_to_resume_the_given_run(monkeypatch, tmp_path):
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(id=kwargs.get("id") or "new1", finish=lambda exit_code=0: None)

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setattr(tracking, "unreachable_reason", lambda url, timeout: None)
    tracker = Tracker.start({"a": 1}, mode="online", directory=tmp_path, run_id="abc123", init_timeout=12)
    assert tracker.run_id == "abc123"
    assert calls[0]["id"] == "abc123" and calls[0]["resume"] == "allow" and calls[0]["mode"] == "online"
    assert calls[0]["settings"] == {"init_timeout": 12.0} and calls[0]["reinit"] == "finish_previous"
    Tracker.start({"a": 1}, mode="online", directory=tmp_path)
    assert "id" not in calls[1] and "resume" not in calls[1]  # a new run, as before


def test_mark_preempting_never_raises():
    def refuse():
        raise RuntimeError("the service is gone")

    Tracker(types.SimpleNamespace(id="x", mark_preempting=refuse)).mark_preempting()
    Tracker(None).mark_preempting()


# ---------------------------------------------------------------- W&B unreachable


def test_unreachable_server_falls_back_to_an_offline_run_with_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", CLOSED_PORT_URL)
    started = time.monotonic()
    tracker = Tracker.start({"a": 1}, mode="auto", directory=tmp_path, name="lora-r8-s0")
    elapsed = time.monotonic() - started
    assert tracker.enabled and tracker.run_id
    log_a_little(tracker)
    (run_dir,) = offline_runs(tmp_path)
    assert b"train/loss" in history_bytes(run_dir) and b"validation/accuracy" in history_bytes(run_dir)
    (line,) = lines(capfd.readouterr().err)
    assert line.startswith("lora-lab: W&B unreachable (cannot connect to 127.0.0.1:9")
    assert line.endswith(f"; logging offline to {run_dir.resolve()}, upload later with: wandb sync {run_dir.resolve()}")
    assert elapsed < 10, elapsed


def test_unreachable_fallback_keeps_the_run_id(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", CLOSED_PORT_URL)
    tracker = Tracker.start({"a": 1}, mode="online", directory=tmp_path, run_id="keep-me-1")
    assert tracker.run_id == "keep-me-1"
    tracker.finish()
    (run_dir,) = offline_runs(tmp_path)
    assert run_dir.name.endswith("keep-me-1")
    assert len(lines(capfd.readouterr().err)) == 1


class Unavailable(http.server.BaseHTTPRequestHandler):
    def _refuse(self):
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = _refuse

    def log_message(self, *args):
        pass


@pytest.fixture
def server_down():
    """A host that accepts connections but whose W&B server only answers 503."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_server_that_does_not_answer_costs_init_timeout_then_offline(tmp_path, monkeypatch, capfd, server_down):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", server_down)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    started = time.monotonic()
    tracker = Tracker.start({"a": 1}, mode="online", directory=tmp_path)
    elapsed = time.monotonic() - started
    log_a_little(tracker)
    (run_dir,) = offline_runs(tmp_path)
    assert b"train/loss" in history_bytes(run_dir)
    (line,) = lines(capfd.readouterr().err)
    assert line.startswith("lora-lab: W&B unreachable (") and f"wandb sync {run_dir.resolve()}" in line
    assert 2.5 < elapsed < 15, elapsed


def test_when_offline_fails_too_training_goes_on_without_wandb(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", CLOSED_PORT_URL)

    def broken_init(**kwargs):
        raise OSError("No space left on device\nmore detail")

    monkeypatch.setattr(wandb, "init", broken_init)
    tracker = Tracker.start({"a": 1}, mode="online", directory=tmp_path)
    assert not tracker.enabled and tracker.run_id is None
    log_a_little(tracker)
    (line,) = lines(capfd.readouterr().err)
    assert line.startswith("lora-lab: W&B unreachable (cannot connect to 127.0.0.1:9")
    assert "offline logging failed too (No space left on device)" in line
    assert line.endswith("training goes on without W&B logging")


def test_any_online_init_failure_falls_back(tmp_path, monkeypatch, capfd):
    real_init = wandb.init

    def online_fails(**kwargs):
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("permission denied\n(entity not found)")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", online_fails)
    monkeypatch.setattr(tracking, "unreachable_reason", lambda url, timeout: None)
    tracker = Tracker.start({"a": 1}, mode="online", directory=tmp_path)
    tracker.finish()
    (run_dir,) = offline_runs(tmp_path)
    (line,) = lines(capfd.readouterr().err)
    assert line.startswith("lora-lab: W&B unreachable (permission denied); logging offline to ")


# ---------------------------------------------------------------- reachability and timeouts


def test_reachability_of_servers_and_proxies(monkeypatch, server_down):
    assert tracking.unreachable_reason(server_down, 2) is None
    assert tracking.unreachable_reason(CLOSED_PORT_URL, 2).startswith("cannot connect to 127.0.0.1:9: ")
    monkeypatch.setenv("HTTPS_PROXY", CLOSED_PORT_URL)
    assert tracking.unreachable_reason("https://api.wandb.ai", 2).startswith("cannot connect to proxy 127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "wandb-server.invalid")  # straight to the server, which does not exist
    assert "wandb-server.invalid:443" in tracking.unreachable_reason("https://wandb-server.invalid", 2)
    monkeypatch.setenv("HTTP_PROXY", CLOSED_PORT_URL)
    assert tracking.unreachable_reason(server_down, 2) is None  # this machine: never through the proxy
    monkeypatch.setenv("WANDB_HTTP_PROXY", CLOSED_PORT_URL)  # wandb's own proxy setting: always
    assert "proxy 127.0.0.1:9" in tracking.unreachable_reason(server_down, 2)


def test_a_name_that_does_not_resolve_is_unreachable_within_the_probe_timeout():
    started = time.monotonic()
    reason = tracking.unreachable_reason("https://wandb-server.invalid", 2)
    assert reason and "wandb-server.invalid:443" in reason
    assert time.monotonic() - started < 3


def test_a_connection_that_hangs_is_unreachable_within_the_probe_timeout(monkeypatch):
    """A firewall that drops packets: connecting would take minutes; the probe gives up in time."""
    released = threading.Event()

    def hang(address, timeout):
        released.wait(30)
        raise OSError("dropped")  # what the real call ends with; the probe has given up by then

    monkeypatch.setattr(tracking.socket, "create_connection", hang)
    started = time.monotonic()
    reason = tracking.unreachable_reason("https://api.wandb.ai", 0.5)
    assert reason == "no connection to api.wandb.ai:443 within 0.5 s"
    assert time.monotonic() - started < 2
    released.set()


def test_base_url_and_init_timeout_resolution(monkeypatch, tmp_path):
    assert tracking.base_url() == "https://api.wandb.ai"
    (tmp_path / "wandb-config").mkdir()
    (tmp_path / "wandb-config" / "settings").write_text("[default]\nbase_url = https://wandb.example.org/\n")
    assert tracking.base_url() == "https://wandb.example.org"
    monkeypatch.setenv("WANDB_BASE_URL", "http://localhost:8080")
    assert tracking.base_url() == "http://localhost:8080"
    assert tracking.resolve_init_timeout() == tracking.DEFAULT_INIT_TIMEOUT
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "120")
    assert tracking.resolve_init_timeout() == 120.0
    assert tracking.resolve_init_timeout(7) == 7.0
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "soon")
    assert tracking.resolve_init_timeout() == tracking.DEFAULT_INIT_TIMEOUT


def test_wandb_sync_exists_for_the_printed_command():
    from click.testing import CliRunner
    from wandb.cli import cli

    result = CliRunner().invoke(cli.cli, ["sync", "--help"])
    assert result.exit_code == 0 and "sync [OPTIONS] [PATH" in result.output


def test_an_offline_run_on_the_tiny_model_ends_with_where_it_is_and_how_to_sync_it(tmp_path, monkeypatch, capfd):
    import sys

    from lora_lab.cli import main as main_module

    run_dir = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["lora-lab", "experiment=smoke", "logger.mode=offline", f"hydra.run.dir={run_dir}",
                                      f"data.cache_dir={tmp_path / 'cache'}"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    main_module.main()
    (offline,) = offline_runs(run_dir)
    out = lines(capfd.readouterr().out)
    assert out[-2:] == [f"[lora_lab] W&B run offline in {offline.resolve()}; upload it with: wandb sync "
                        f"{offline.resolve()}", f"[lora_lab] run folder: {run_dir}"]
