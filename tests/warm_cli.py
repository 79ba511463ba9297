"""``lora-lab`` commands as real processes without an interpreter start each: a server process imports
lora_lab once, then forks one child per command. The child takes the command's environment, working
directory and files for stdout and stderr, optionally arms a kill point of crash_driver.py, and runs
the command as ``python -m lora_lab.cli.main`` would; its exit status (or the signal that killed it)
is the command's. Tests use it through :class:`WarmCli`; commands where starting the interpreter is
part of what is tested still start one.

    python tests/warm_cli.py     # reads one JSON job per line, answers {"pid": ...} then {"status": ...}
"""
from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

SERVER = str(Path(__file__).resolve())


class CommandTimeout(AssertionError):
    pass


class WarmCli:
    """The test side: starts the server on first use; :meth:`run` behaves like ``subprocess.run``
    with ``capture_output=True, text=True``; :meth:`start` and :meth:`wait` let a test signal a
    command while it runs."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.server = None
        self.jobs = 0

    def _server(self) -> subprocess.Popen:
        if self.server is None:
            self.server = subprocess.Popen([sys.executable, SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           text=True, bufsize=1)
        return self.server

    def _answer(self, timeout: float, pid: int | None = None) -> dict:
        server = self._server()
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        if not ready:
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                server.stdout.readline()
            raise CommandTimeout(f"no answer within {timeout} s")
        line = server.stdout.readline()
        assert line, f"the warm server exited with status {server.wait()}"
        return json.loads(line)

    def start(self, args, cwd, env=None, driver=None) -> dict:
        self.jobs += 1
        job = {"args": [str(a) for a in args], "cwd": str(cwd), "env": dict(os.environ if env is None else env),
               "driver": driver, "stdout": str(self.scratch / f"{self.jobs}.out"),
               "stderr": str(self.scratch / f"{self.jobs}.err")}
        server = self._server()
        server.stdin.write(json.dumps(job) + "\n")
        server.stdin.flush()
        job["pid"] = self._answer(60)["pid"]
        return job

    def wait(self, job: dict, timeout: float = 300) -> subprocess.CompletedProcess:
        status = self._answer(timeout, pid=job["pid"])["status"]
        return subprocess.CompletedProcess(job["args"], status, Path(job["stdout"]).read_text(),
                                           Path(job["stderr"]).read_text())

    def run(self, args, cwd, env=None, driver=None, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.wait(self.start(args, cwd, env, driver), timeout)

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)
            self.server = None


def serve():
    """The server's loop; returns (in the child only) the job the child is to run."""
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return job
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    import crash_driver

    from lora_lab.cli import main as cli_main

    gc.collect()
    gc.freeze()  # the children's gc.collect() calls need not scan the imported modules
    job = serve()
    # the child: the command's own process from here on
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    cli_main.apply_environment_defaults()  # what importing the command does in a fresh interpreter
    for fd, name, mode in ((0, os.devnull, os.O_RDONLY), (1, job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                           (2, job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        os.dup2(os.open(name, mode, 0o644), fd)
    if job["driver"]:
        crash_driver.arm(job["driver"][0], int(job["driver"][1]))
    sys.argv = ["lora-lab", *job["args"]]
    cli_main.main()
