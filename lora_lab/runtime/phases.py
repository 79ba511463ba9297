"""What a run is doing between training steps: a status for each phase (loading the tokenizer and
data, loading the model, each evaluation, generation, the latency measurement; the analysis tools'
resampling).

Where bars are drawn (``trainer.progress_bar: true``, or ``auto`` on a terminal) the phase's name
stands on stderr while it runs and is wiped when it ends. Everywhere, a phase that took at least
``MIN_SECONDS`` ends with one line on stdout (stderr for the analysis tools), which the run's log keeps::

    [lora_lab] loading the model: 1.4 s

so a log or a CI job shows where the time went without a bar's redraws.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

MIN_SECONDS = 1.0


def bars_shown(setting) -> bool:
    """``trainer.progress_bar``: true and false say it; ``auto`` draws on a terminal only (tqdm's rule)."""
    if setting == "auto" or setting is None:
        return sys.stderr.isatty()
    return bool(setting)


class Phases:
    """``with phases.phase("evaluating validation"): ...``. Silent when ``active`` is false (every rank
    but the first of a distributed run)."""

    def __init__(self, progress_bar="auto", active: bool = True, prefix: str = "[lora_lab]", to_stderr: bool = False):
        self.live = active and bars_shown(progress_bar)
        self.active, self.prefix = active, prefix
        self.to_stderr = to_stderr  # the analysis tools: their stdout is the table

    @contextmanager
    def phase(self, name: str):
        if not self.active:
            yield
            return
        status = f"{self.prefix} {name} ..."
        if self.live:
            sys.stderr.write(status)
            sys.stderr.flush()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.live:  # wipe the status: the next line starts clean
                sys.stderr.write("\r" + " " * len(status) + "\r")
                sys.stderr.flush()
        seconds = time.perf_counter() - start  # a phase that raised says nothing more: its error will
        if seconds >= MIN_SECONDS:
            print(f"{self.prefix} {name}: {seconds:.1f} s", file=sys.stderr if self.to_stderr else sys.stdout, flush=True)


QUIET = Phases(active=False)
