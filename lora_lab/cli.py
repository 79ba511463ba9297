"""The ``lora-lab`` command. When a warm server (``lora-lab-server start``) from this checkout and
environment is running, the job runs in a process forked from it, with torch, transformers, datasets
and Hydra already imported, writing to this terminal; otherwise it runs here, as
``python -m lora_lab.main`` would. Either way the arguments, exit code and outputs are the same.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from lora_lab import warm

REPLY_TIMEOUT_S = 60.0
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


class _Refused(warm.ServerUnavailable):
    """A server answered but cannot take this job (stale code, different environment)."""


def _standard_fds() -> list[int]:
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            pass
    return fds


def run_on_server(argv: list[str]) -> int:
    """Hand the job to the warm server; its exit code. ServerUnavailable if there is none to take it."""
    launched_at = warm.process_start_time() or time.time()
    sock = warm.connect()
    with sock:
        fds = _standard_fds()
        request = {"op": "run", "argv": argv, "argv0": sys.argv[0], "path0": sys.path[0] if sys.path else None,
                   "cwd": os.getcwd(), "env": dict(os.environ), "fingerprint": warm.code_fingerprint(),
                   "launched_at": launched_at, "fds": fds}
        warm.send_message(sock, request, fds)
        sock.settimeout(REPLY_TIMEOUT_S)
        try:
            reply, _ = warm.receive_message(sock)
        except TimeoutError:  # it may have started the job: running it here too could run it twice
            raise SystemExit(f"lora-lab: the warm server at {warm.socket_path()} did not answer within "
                             f"{REPLY_TIMEOUT_S:g} s; `lora-lab-server stop`, or set "
                             f"{warm.DISABLE_ENV}=off") from None
        if reply is None:
            raise _Refused("the server closed the connection")
        if not reply.get("ok"):
            raise _Refused(reply.get("reason", "refused"))
        pid = int(reply["pid"])

        def forward(signum, _frame):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        for name in FORWARDED_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), forward)
        sock.settimeout(None)
        try:
            while True:
                message, _ = warm.receive_message(sock)
                if message is None:
                    break
                if "exit" in message:
                    return int(message["exit"])
        except OSError:  # the job has started: never run it a second time here
            pass
        print(f"lora-lab: lost the warm server while job {pid} ran; its run record says how it ended",
              file=sys.stderr)
        return 1


def main() -> None:
    if os.environ.get(warm.DISABLE_ENV, "").lower() not in ("off", "0", "false", "no"):
        try:
            sys.exit(run_on_server(sys.argv[1:]))
        except (_Refused, warm.UnsafeSocket) as why:
            print(f"lora-lab: the warm server cannot take this job ({why}); running it in this process",
                  file=sys.stderr)
        except (warm.ServerUnavailable, ConnectionError, TimeoutError):
            pass
    from lora_lab.main import main as run_here

    run_here()


if __name__ == "__main__":
    main()
