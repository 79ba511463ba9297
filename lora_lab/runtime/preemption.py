"""Stopping cleanly when the scheduler says the node is going away.

SLURM sends SIGTERM (and, with ``--signal``, SIGUSR1 or another signal some time before the end);
submitit uses SIGUSR2 (its ``SUBMITIT_PREEMPT_SIGNAL``) for its checkpoint-and-requeue protocol. While
training runs, these signals only raise a flag: the loop finishes the step it is in, writes a
checkpoint and raises ``Preempted``. The command then exits
with 128 + the signal number (143 for SIGTERM), the status a shell or launcher reports for a job
ended by that signal; a handler installed before ours (submitit's) is called after the checkpoint is
written, so a launcher's requeue still happens.

Ctrl-C (SIGINT) is handled the same way: checkpoint at the next step boundary, one line, exit 130
(recorded as ``interrupted``, not preempted). A second Ctrl-C before that raises KeyboardInterrupt at
once, for a run that hangs before its next step.
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class Preempted(Exception):
    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; "
                         f"checkpoint {checkpoint}; the same command resumes from it")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (SIGINT) rather than by a scheduler: recorded as ``interrupted``."""
        return self.signum == signal.SIGINT


class StopRequests:
    """Context manager: while inside, SIGTERM, SIGUSR1, SIGUSR2 and SIGINT set ``signum`` instead of ending the process."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:  # Ctrl-C twice: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():  # kept for pass_on
            signal.signal(sig, handler)

    def pass_on(self, signum: int) -> None:
        """Call the handler that was installed before ours (e.g. a launcher's requeue), if any."""
        handler = self.previous.get(signum)
        if callable(handler) and handler is not signal.default_int_handler:  # Python's own raises KeyboardInterrupt
            handler(signum, None)
