"""One owner per run folder: ``<run_dir>/.lock``, taken before the run writes anything into the folder.

    {"host": "node12", "pid": 4242, "started": 1796000000.0, "heartbeat": 1796000060.0,
     "slurm_job_id": "812345" | null, "token": "<random hex>"}

The file is created with O_CREAT | O_EXCL, so of two processes that start on one folder at once
exactly one creates it; the other is told who owns the folder. While the run lasts, a daemon thread
rewrites ``heartbeat`` every ``heartbeat_seconds`` (at most a minute); the owner deletes the file when
it is done. A lock is taken over, with one line saying so, when its owner is gone:

- on this host: its pid is not running (or is this process itself, which did not release it), or its
  heartbeat is older than ``stale_after`` seconds (the pid was reused by another program);
- on another host: its heartbeat is older than ``stale_after`` seconds (``trainer.lock_stale_after``),
  or it belongs to this same SLURM job (``SLURM_JOB_ID``): a requeued job takes over its own lock.

A takeover renames the stale file away before creating a new one, so two processes taking over one
lock at once cannot both succeed. Times are wall-clock seconds since the epoch; hosts whose clocks
differ by more than ``stale_after`` would see each other's locks as stale.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = ".lock"
DEFAULT_STALE_AFTER = 600.0  # seconds without a heartbeat after which another host's lock is stale
MAX_HEARTBEAT_SECONDS = 30.0
_READ_TRIES = 20  # a lock just created may still be empty for a moment: read again (50 ms apart)


def pid_running(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_owner(owner: dict, now: float | None = None) -> str:
    """The owner of a lock in words: pid, host, when it started, how old its heartbeat is."""
    now = time.time() if now is None else now
    try:
        started, age = _when(float(owner["started"])), f"{now - float(owner['heartbeat']):.0f} s ago"
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        started, age = "?", "?"
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job} (started {started}, heartbeat {age})"


class RunLock:
    """A run folder's lock, held by this process: ``acquire`` takes it (or says who has it),
    ``release`` gives it back. The heartbeat thread runs while it is held."""

    def __init__(self, path: Path, owner: dict, heartbeat_seconds: float):
        self.path, self.owner = Path(path), owner
        self.heartbeat_seconds = heartbeat_seconds
        self.lost = False  # another process took the lock over (our heartbeat had stopped for too long)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lora_lab-run-lock", daemon=True)

    @classmethod
    def acquire(cls, run_dir: Path, stale_after: float = DEFAULT_STALE_AFTER, say=print) -> RunLock | None:
        """Take the lock of ``run_dir`` (created if need be); None when a live owner holds it. ``say``
        gets the one line of a takeover."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        heartbeat = max(0.05, min(MAX_HEARTBEAT_SECONDS, stale_after / 4))
        for _ in range(10):  # each round: create, or judge the owner (a takeover may race another one)
            lock = cls._create(path, heartbeat)
            if lock is not None:
                return lock
            text, holder = _read(path)
            if text is None:  # released meanwhile
                continue
            reason = _stale_reason(holder, stale_after)
            if reason is None:
                return None
            if _set_aside(path, text):
                say(f"[lora_lab] took over the lock of {run_dir} from {describe_owner(holder or {})}: {reason}")
        return None

    @classmethod
    def owner_of(cls, run_dir: Path) -> dict | None:
        """What ``<run_dir>/.lock`` says of its owner (None: no lock, or unreadable)."""
        return _read(Path(run_dir) / LOCK_FILE)[1]

    @classmethod
    def _create(cls, path: Path, heartbeat: float) -> RunLock | None:
        now = time.time()
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
                 "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "token": secrets.token_hex(8)}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(owner))
        lock = cls(path, owner, heartbeat)
        lock._thread.start()
        return lock

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.refresh()
            except OSError:  # e.g. a full disk: the next beat tries again
                pass
            if self.lost:
                return

    def refresh(self) -> None:
        """Write a new heartbeat, unless another process has taken the lock over (``lost``)."""
        if (_read(self.path)[1] or {}).get("token") != self.owner["token"]:
            self.lost = True
            return
        self.owner["heartbeat"] = time.time()
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.owner['token']}.tmp")
        tmp.write_text(json.dumps(self.owner))
        os.replace(tmp, self.path)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock, if it is still this process's."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if (_read(self.path)[1] or {}).get("token") == self.owner["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(path: Path) -> tuple[str | None, dict | None]:
    """The lock file's text (None: no file) and its owner (None: not a JSON object, after waiting a
    moment for a lock being created to get its content)."""
    for attempt in range(_READ_TRIES):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None, None
        except (OSError, UnicodeDecodeError):
            text = ""
        try:
            owner = json.loads(text)
            if isinstance(owner, dict):
                return text, owner
        except json.JSONDecodeError:
            pass
        if attempt + 1 < _READ_TRIES:
            time.sleep(0.05)
    return text, None


def _stale_reason(holder: dict | None, stale_after: float) -> str | None:
    """Why the lock's owner is gone, or None when it is alive."""
    if holder is None:
        return "the lock file is unreadable"
    try:
        age = time.time() - float(holder.get("heartbeat"))
    except (TypeError, ValueError):
        age = float("inf")
    stale = age > stale_after
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid == os.getpid():
            return "it was left by this process" if pid == os.getpid() else "it names no pid"
        if not pid_running(pid):
            return f"pid {pid} is not running"
        return f"its heartbeat is {age:.0f} s old (trainer.lock_stale_after={stale_after:g})" if stale else None
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        return f"SLURM job {job} was requeued"
    return f"its heartbeat is {age:.0f} s old (trainer.lock_stale_after={stale_after:g})" if stale else None


def _set_aside(path: Path, text: str) -> bool:
    """Move a stale lock out of the way; False when another process replaced or took it first (its new
    lock is put back)."""
    aside = path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        if aside.read_text() == text:
            return True
        try:  # a fresh lock of another process: give it back (unless a third one has the name already)
            os.link(aside, path)
        except FileExistsError:
            pass
        return False
    finally:
        aside.unlink(missing_ok=True)
