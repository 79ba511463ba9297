"""The run's own log, ``<run_dir>/main.log``: every line the run prints, on stdout or stderr, is also
appended there while ``RunLog`` is active (the ``[lora_lab] ...`` lines, warnings, the error line of a
failed run). Progress bars stay on the terminal: a line is logged as a terminal would show it in
the end, the text after its last carriage return, and bars that never end a line are not logged.

Hydra's own job logging writes to the same file (``<job name>.log``); both append. Writing the log
never stops a run: if the file cannot be written (a full disk), logging to it stops and the lines
still reach the terminal.
"""
from __future__ import annotations

import sys
from pathlib import Path

LOG_FILE = "main.log"


class RunLog:
    """Context manager: while inside, ``sys.stdout`` and ``sys.stderr`` also write their complete lines
    to ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = None
        self.saved: tuple | None = None

    def __enter__(self) -> RunLog:
        try:
            self.file = open(self.path, "a", encoding="utf-8", errors="replace")
        except OSError:
            return self  # no log, the run goes on
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            for tee in (sys.stdout, sys.stderr):
                if isinstance(tee, _Tee):
                    tee.flush()
            sys.stdout, sys.stderr = self.saved
            self.saved = None
        self._close()

    def line(self, text: str) -> None:
        if self.file is None:
            return
        try:
            self.file.write(text + "\n")
            self.file.flush()
        except OSError:  # e.g. no space left: keep training, stop logging to the file
            self._close()

    def _close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None


class _Tee:
    """A text stream that writes through to ``stream`` and hands each complete line to the log."""

    def __init__(self, stream, log: RunLog):
        self.stream, self.log = stream, log
        self.pending = ""

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            line = line.rsplit("\r", 1)[-1]  # a progress bar's redraws: what the terminal shows last
            if line.strip():
                self.log.line(line)
        if "\r" in self.pending:
            self.pending = self.pending[self.pending.rfind("\r"):]
        return written

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, buffer, ...: the stream's own
        return getattr(self.stream, name)
