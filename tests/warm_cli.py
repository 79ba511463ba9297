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
        self.unread = b""  # the server's answers read from its pipe, not yet taken
        self.current = None  # the server runs one command at a time

    def _server(self) -> subprocess.Popen:
        if self.server is None:
            self.server = subprocess.Popen([sys.executable, SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self.server

    def _ready(self, timeout: float) -> bool:
        """Whether a whole answer has arrived, waiting up to ``timeout`` seconds for one."""
        fd = self._server().stdout.fileno()
        while b"\n" not in self.unread:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return False
            chunk = os.read(fd, 65536)
            assert chunk, f"the warm server exited with status {self.server.wait()}"
            self.unread += chunk
        return True

    def _answer(self, timeout: float, pid: int | None = None) -> dict:
        if not self._ready(timeout):
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                self._ready(60)
                self._take()
            raise CommandTimeout(f"no answer within {timeout} s")
        return self._take()

    def _take(self) -> dict:
        line, self.unread = self.unread.split(b"\n", 1)
        return json.loads(line)

    def start(self, args, cwd, env=None, driver=None, copies: int = 1) -> dict:
        """``copies`` > 1: that many processes of the command start at once (``pids``); ``wait``
        returns the first one's result and sets ``job["copies"]`` to every one's."""
        if self.current is not None and "status" not in self.current:  # left running by a failed test
            for pid in self.current["pids"]:
                _kill(pid)
            self.current["status"] = self._answer(60)["status"]
        self.jobs += 1
        job = {"args": [str(a) for a in args], "cwd": str(cwd), "env": dict(os.environ if env is None else env),
               "driver": driver, "stdout": str(self.scratch / f"{self.jobs}.out"),
               "stderr": str(self.scratch / f"{self.jobs}.err"), "copies": copies}
        server = self._server()
        server.stdin.write((json.dumps(job) + "\n").encode())
        server.stdin.flush()
        answer = self._answer(60)
        job["pid"], job["pids"] = answer["pid"], answer.get("pids", [answer["pid"]])
        self.current = job
        return job

    def poll(self, job: dict) -> int | None:
        """The command's exit status if it has ended, else None (like ``Popen.poll``)."""
        if "status" not in job and self._ready(0):
            job["status"] = self._take()["status"]
        return job.get("status")

    def wait(self, job: dict, timeout: float = 300) -> subprocess.CompletedProcess:
        if "status" not in job:
            answer = self._answer(timeout, pid=job["pid"])
            job["status"] = answer["status"]
            if job.get("copies", 1) > 1:
                job["copies"] = [subprocess.CompletedProcess(job["args"], status, Path(f"{job['stdout']}.{i}").read_text(),
                                                             Path(f"{job['stderr']}.{i}").read_text())
                                 for i, status in enumerate(answer["statuses"])]
        if isinstance(job.get("copies"), list):
            return job["copies"][0]
        status = job["status"]
        return subprocess.CompletedProcess(job["args"], status, Path(job["stdout"]).read_text(),
                                           Path(job["stderr"]).read_text())

    def run(self, args, cwd, env=None, driver=None, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.wait(self.start(args, cwd, env, driver), timeout)

    def close(self) -> None:
        if self.current is not None and "status" not in self.current:
            for pid in self.current["pids"]:
                _kill(pid)
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)
            self.server = None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def serve():
    """The server's loop; returns (in the child only) the job the child is to run. A job with
    ``copies`` > 1 forks that many children at once (the i-th writes to ``<stdout>.<i>``)."""
    for line in sys.stdin:
        job = json.loads(line)
        copies = job.get("copies", 1)
        pids = []
        for i in range(copies):
            pid = os.fork()
            if pid == 0:
                if copies > 1:
                    job["stdout"], job["stderr"] = f"{job['stdout']}.{i}", f"{job['stderr']}.{i}"
                return job
            pids.append(pid)
        print(json.dumps({"pid": pids[0], "pids": pids}), flush=True)
        statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        print(json.dumps({"status": statuses[0], "statuses": statuses}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    import crash_driver

    from lora_lab.cli import main as cli_main
    from lora_lab.runtime.environment import apply_environment_defaults

    gc.collect()
    gc.freeze()  # the children's gc.collect() calls need not scan the imported modules
    job = serve()
    # the child: the command's own process from here on
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    apply_environment_defaults()  # what importing the command does in a fresh interpreter
    for fd, name, mode in ((0, os.devnull, os.O_RDONLY), (1, job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                           (2, job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        os.dup2(os.open(name, mode, 0o644), fd)
    if job["driver"]:
        crash_driver.arm(job["driver"][0], int(job["driver"][1]))
    sys.argv = ["lora-lab", *job["args"]]
    cli_main.main()
