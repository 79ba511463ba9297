"""``lora-lab-server``: a warm process for many short ``lora-lab`` runs (a W&B agent's trials, a
shell loop, repeated single runs). It imports torch, transformers, datasets, Hydra, W&B and lora_lab
once; each ``lora-lab`` command then runs in a process forked from it, in the command's directory,
environment and terminal, so a job starts without paying the imports (about 8 s on 2 CPU cores).

    lora-lab-server start            # in the background; prints where it listens
    lora-lab-server status
    lora-lab-server stop             # waits for running jobs
    lora-lab-server serve            # in the foreground (what `start` runs)

The server runs no torch code itself (a fork after OpenMP has started is unsafe), listens on a Unix
socket in a directory only its user can open, and turns away a job when lora_lab's sources or a
preloaded library changed since it started (it then exits), or when the job's environment differs in
a variable that libraries read at import (HF_*, TORCH*, CUDA_*, OMP_*, ...): that job runs in a fresh
process instead. Linux and macOS.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import io
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback

from lora_lab import warm

PRELOAD = ("lora_lab.main", "lora_lab.train", "lora_lab.callbacks", "analysis.compare", "datasets", "wandb",
           "transformers.models.bert.modeling_bert", "transformers.models.bert.tokenization_bert")
POLL_SECONDS = 0.1


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class Server:
    def __init__(self, preload: tuple[str, ...], idle_timeout: float):
        self.preload, self.idle_timeout = preload, idle_timeout
        self.path = warm.socket_path()
        self.started = time.time()
        self.jobs = 0
        self.children: dict[int, socket.socket] = {}  # pid -> the connection of the command that waits
        self.stopping = False
        self.stop_reason = ""
        self.environment = dict(os.environ)  # before the imports, which may set variables of their own

    # ------------------------------------------------------------ set-up

    def warm_up(self) -> None:
        self.fingerprint = warm.code_fingerprint()  # before importing: a file edited meanwhile makes it stale
        for name in self.preload:
            importlib.import_module(name)

    def listen(self) -> socket.socket:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        problem = warm.private_directory_problem(self.path.parent)
        if problem:
            raise SystemExit(f"lora-lab-server: {problem}; set {warm.SOCKET_ENV} to a path in a directory "
                             f"only you can write to")
        if self.path.exists():
            try:
                warm.request({"op": "ping"}, self.path, timeout=2)
            except (warm.ServerUnavailable, OSError):
                self.path.unlink()  # left by a server that died
            else:
                raise SystemExit(f"lora-lab-server: a server already listens at {self.path}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.socket_inode = self.path.stat().st_ino
        listener.listen(16)
        return listener

    # ------------------------------------------------------------ loop

    def serve(self) -> None:
        self.warm_up()
        listener = self.listen()
        for name in ("SIGTERM", "SIGINT", "SIGHUP"):
            signal.signal(getattr(signal, name), lambda signum, _: self.stop(signal.Signals(signum).name))
        print(f"lora-lab-server: pid {os.getpid()} listening at {self.path}", flush=True)
        last_activity = time.monotonic()
        try:
            while not (self.stopping and not self.children):
                waiting = [] if self.stopping else [listener]
                readable, _, _ = select.select(waiting + list(self.children.values()), [], [], POLL_SECONDS)
                for sock in readable:
                    if sock is listener:
                        conn, _ = listener.accept()
                        self.handle(conn, listener)
                        last_activity = time.monotonic()
                    else:
                        self.client_went_away(sock)
                self.reap()
                if self.children:
                    last_activity = time.monotonic()
                elif self.idle_timeout and time.monotonic() - last_activity > self.idle_timeout:
                    self.stop(f"idle for {self.idle_timeout:g} s")
                if self.stopping:
                    self.remove_socket()  # new commands run elsewhere while running jobs finish
        finally:
            listener.close()
            self.remove_socket()
        print(f"lora-lab-server: stopped ({self.stop_reason}) after {self.jobs} jobs", flush=True)

    def remove_socket(self) -> None:
        """Remove our socket file, never one that a server started since has put at the same path."""
        if getattr(self, "socket_inode", None) is None:
            return
        try:
            if self.path.stat().st_ino == self.socket_inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self.socket_inode = None

    def stop(self, reason: str) -> None:
        if not self.stopping:
            self.stopping, self.stop_reason = True, reason

    def handle(self, conn: socket.socket, listener: socket.socket) -> None:
        conn.settimeout(5)
        fds: list[int] = []
        try:
            message, fds = warm.receive_message(conn, max_fds=3)
            op = (message or {}).get("op")
            if op == "ping":
                warm.send_message(conn, self.status())
            elif op == "stop":
                self.stop("asked to stop")
                warm.send_message(conn, {"ok": True, "running": len(self.children)})
            elif op == "run":
                refusal = self.refusal(message)
                if refusal:
                    warm.send_message(conn, {"ok": False, "reason": refusal})
                else:
                    pid = self.fork_job(conn, listener, message, fds)
                    conn.settimeout(None)
                    self.children[pid] = conn
                    warm.send_message(conn, {"ok": True, "pid": pid})
                    return
        except (OSError, ValueError) as error:
            print(f"lora-lab-server: a request failed: {error}", file=sys.stderr, flush=True)
        finally:
            for fd in fds:
                os.close(fd)
        conn.close()

    def refusal(self, message: dict) -> str | None:
        if self.stopping:
            return "it is stopping"
        if message.get("fingerprint") != self.fingerprint:
            self.stop("lora_lab or a library changed")
            return ("lora_lab or a library changed since it started, so it stops; "
                    "`lora-lab-server start` starts a fresh one")
        difference = warm.environment_difference(message.get("env", {}), self.environment)
        return f"{difference}, which libraries read at import" if difference else None

    def status(self) -> dict:
        return {"ok": True, "pid": os.getpid(), "socket": str(self.path), "fingerprint": self.fingerprint,
                "uptime_s": time.time() - self.started, "jobs": self.jobs, "running": len(self.children),
                "preloaded": list(self.preload), "stopping": self.stopping}

    def client_went_away(self, conn: socket.socket) -> None:
        """The command that waits for a job closed its end (killed): stop the job, as its own death
        would have."""
        try:
            still_there = conn.recv(1, socket.MSG_PEEK)
        except OSError:
            still_there = b""
        if still_there:
            conn.recv(65536)  # the command sends nothing after its request; ignore stray bytes
            return
        for pid, c in list(self.children.items()):
            if c is conn:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is not None:
                try:
                    warm.send_message(conn, {"exit": _exit_code(status)})
                except OSError:
                    pass
                conn.close()

    # ------------------------------------------------------------ one job

    def fork_job(self, conn: socket.socket, listener: socket.socket, message: dict, fds: list[int]) -> int:
        self.jobs += 1
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            listener.close()
            conn.close()
            for other in self.children.values():
                other.close()
            code = run_job(message, fds)
        finally:
            os._exit(code)


def _attach_stdio(targets: list[int], fds: list[int]) -> None:
    """Make the command's stdin, stdout and stderr this process's 0, 1 and 2, as a shell would."""
    for target, fd in zip(targets, fds):
        os.dup2(fd, target)
    for target in {0, 1, 2} - set(targets):
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, target)
        os.close(null)
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding=encoding)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=encoding,
                                  line_buffering=os.isatty(1))
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=encoding,
                                  errors="backslashreplace", line_buffering=True)


def run_job(message: dict, fds: list[int]) -> int:
    """In the forked process: become the command (stdio, directory, environment, arguments), run the
    ``lora-lab`` app, run exit handlers as a normal exit would; the exit code."""
    for name in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _attach_stdio(list(message["fds"]), fds)
    for fd in fds:
        os.close(fd)
    os.chdir(message["cwd"])
    os.environ.clear()
    os.environ.update(message["env"])
    sys.argv = [message.get("argv0") or "lora-lab", *message["argv"]]
    if message.get("path0") is not None and sys.path:
        sys.path[0] = message["path0"]  # the command's script or working directory, not the server's

    from lora_lab import measure
    from lora_lab.main import main

    measure.set_process_start(float(message["launched_at"]), via="warm server")
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if done.code is not None and not isinstance(done.code, int):
            print(done.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - printed as an uncaught exception would be
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    return code


# ---------------------------------------------------------------- the command

def _start(args) -> int:
    try:
        status = warm.request({"op": "ping"})
        print(f"lora-lab-server: already running (pid {status['pid']}) at {status['socket']}")
        return 0
    except (warm.ServerUnavailable, OSError):
        pass
    log = warm.log_path()
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    problem = warm.private_directory_problem(log.parent)
    if problem:
        print(f"lora-lab-server: {problem}; set {warm.SOCKET_ENV} to a path in a directory only you can "
              f"write to", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "lora_lab.server", "serve", "--idle-timeout", str(args.idle_timeout)]
    if args.preload:
        command += ["--preload", *args.preload]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            print(f"lora-lab-server: the server exited with {proc.returncode}: {tail[0]} (log: {log})",
                  file=sys.stderr)
            return 1
        try:
            status = warm.request({"op": "ping"}, timeout=2)
        except (warm.ServerUnavailable, OSError):
            time.sleep(0.2)
            continue
        print(f"lora-lab-server: ready (pid {status['pid']}) at {status['socket']}; `lora-lab ...` now "
              f"runs in it; log: {log}")
        return 0
    print(f"lora-lab-server: not ready after {args.timeout:g} s (log: {log})", file=sys.stderr)
    return 1


def _status(_args) -> int:
    try:
        status = warm.request({"op": "ping"})
    except (warm.ServerUnavailable, OSError) as why:
        print(f"lora-lab-server: not running ({why})")
        return 1
    current = "current" if status["fingerprint"] == warm.code_fingerprint() else "stale: code changed"
    print(f"lora-lab-server: pid {status['pid']} at {status['socket']}, up {status['uptime_s']:.0f} s, "
          f"{status['jobs']} jobs ({status['running']} running), {current}")
    return 0


def _stop(_args) -> int:
    try:
        reply = warm.request({"op": "stop"})
    except (warm.ServerUnavailable, OSError) as why:
        print(f"lora-lab-server: not running ({why})")
        return 0
    waiting = f"; it exits when its {reply['running']} running jobs end" if reply.get("running") else ""
    print(f"lora-lab-server: stopping{waiting}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lora-lab-server", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "serve"):
        sub = commands.add_parser(name, help="start in the background" if name == "start" else
                                  "run in the foreground")
        sub.add_argument("--preload", nargs="+", default=None, metavar="MODULE",
                         help=f"modules to import up front (default: {' '.join(PRELOAD)})")
        sub.add_argument("--idle-timeout", type=float, default=3600.0,
                         help="exit after this many seconds without a job (0: never; default 3600)")
        if name == "start":
            sub.add_argument("--timeout", type=float, default=120.0, help="seconds to wait until it is ready")
    commands.add_parser("status", help="is one running, and is it current")
    commands.add_parser("stop", help="stop after the running jobs end")
    args = parser.parse_args(argv)
    if not (hasattr(os, "fork") and hasattr(socket, "AF_UNIX")):
        parser.exit(2, "lora-lab-server: needs fork and Unix sockets (Linux, macOS)\n")
    if args.command == "serve":
        Server(tuple(args.preload or PRELOAD), args.idle_timeout).serve()
        return
    sys.exit({"start": _start, "status": _status, "stop": _stop}[args.command](args))


if __name__ == "__main__":
    main()
