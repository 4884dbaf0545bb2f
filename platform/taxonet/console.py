"""The terminal of a ``taxonet`` command: taxonet's own lines on it, Ray's internal lines in a log file.

Ray forwards every line its workers, actors and controllers write (metric dicts, data-plan summaries, Serve access
logs, core-worker warnings) to the driver's stdout/stderr. While :func:`route_output` is active:

* file descriptors 1 and 2 point at a log file, so Ray's processes started here, its C++ core and every logging
  handler bound to the old streams write there;
* ``sys.stdout``/``sys.stderr`` are replaced by a :class:`_Router`: what taxonet itself prints (the main thread)
  goes to the terminal, what Ray's log-forwarding threads print goes to the log file, except the per-epoch progress
  line of training (worker 0's ``taxonet train: epoch E/N ...``), shown without Ray's prefix and with an ETA;
* on leaving (also by an exception) everything is restored first, so an error and its traceback reach the
  terminal in full. Ray Train's decisions on a worker failure (``[FailurePolicy] RETRY ...``) stay on the terminal.

``verbosity``: −1 quiet (no progress lines), 0 normal, 1 verbose (nothing routed: every line on the terminal).
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TextIO

#: worker 0's per-epoch line (taxonet.train.worker.ReportToRayTrain), possibly behind Ray's "(Actor pid=..) " prefix
PROGRESS = re.compile(r"(taxonet train: epoch (\d+)/(\d+).*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: Ray lines kept on the terminal as they are: Ray Train's decisions on a worker failure (retry or give up)
KEEP = re.compile(r"\[FailurePolicy\]")


class EpochClock:
    """Estimated time left from the epoch lines seen so far (the first epoch includes start-up, so it is not used
    once a second one has been seen)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first: tuple[int, float] | None = None

    def eta(self, epoch: int, total: int) -> str:
        now = time.monotonic()
        if self.first is None or epoch <= self.first[0]:
            self.first = (epoch, now)
            per_epoch = (now - self.started) / max(epoch, 1)
        else:
            per_epoch = (now - self.first[1]) / (epoch - self.first[0])
        left = max(total - epoch, 0) * per_epoch
        return f"{now - self.started:4.0f} s, ETA {int(left // 60)}:{int(left % 60):02d}"


class _Router(io.TextIOBase):
    """A text stream that sends main-thread writes to ``terminal`` and other threads' lines to ``log``."""

    def __init__(self, terminal: TextIO, log: TextIO, progress: bool, clock: EpochClock) -> None:
        super().__init__()
        self.terminal, self.log, self.progress, self.clock = terminal, log, progress, clock
        self.pending = ""
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return not self.terminal.closed and self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.terminal.encoding or "utf-8"

    def write(self, text: str) -> int:
        if self.terminal.closed or self.log.closed:  # after route_output ended (Ray's exit handlers): pass through
            (sys.__stderr__ or sys.stderr).write(text)
            return len(text)
        if threading.current_thread() is threading.main_thread() and not _from_ray(sys._getframe(1)):
            self.terminal.write(text)
            return len(text)
        with self.lock:
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        self.log.write(line + "\n")
        plain = _ANSI.sub("", line)
        match = PROGRESS.search(plain)
        if match and self.progress:
            epoch, total = int(match.group(2)), int(match.group(3))
            self.terminal.write(f"  {match.group(1)}  [{self.clock.eta(epoch, total)}]\n")
            self.terminal.flush()
        elif KEEP.search(plain):
            self.terminal.write(plain + "\n")
            self.terminal.flush()

    def flush(self) -> None:
        for stream in (self.terminal, self.log):
            if not stream.closed:
                stream.flush()


def _from_ray(frame: FrameType | None, depth: int = 16) -> bool:
    """Is this write a log record of a ``ray.*`` logger, or a warning raised in Ray's code? (Ray's driver-side
    logging writes to whatever ``sys.stderr`` is when it emits, from the main thread.)"""
    while frame is not None and depth > 0:
        local = frame.f_locals
        record = local.get("record")
        if isinstance(record, logging.LogRecord):
            return record.name == "ray" or record.name.startswith(("ray.", "ray_"))
        message = local.get("msg")
        if isinstance(message, warnings.WarningMessage):
            return f"{os.sep}ray{os.sep}" in str(message.filename)
        frame, depth = frame.f_back, depth - 1
    return False


def default_log_path(command: str) -> Path:
    """Where a command's Ray lines go unless told: ``$TMPDIR/taxonet-logs/<command>-<time>-<pid>.log``."""
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "taxonet-logs"
    return folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextmanager
def route_output(log_path: Path, verbosity: int = 0) -> Iterator[Path]:
    """Send Ray's lines to ``log_path`` while the block runs (see the module docstring); ``verbosity`` ≥ 1: no-op."""
    if verbosity >= 1:
        yield log_path
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal_out = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    terminal_err = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    old_stdout, old_stderr = sys.stdout, sys.stderr
    clock = EpochClock()
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = _Router(terminal_out, log, verbosity >= 0, clock)
        sys.stderr = _Router(terminal_err, log, verbosity >= 0, clock)
        yield log_path
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = old_stdout, old_stderr
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err):
            os.close(fd)
        terminal_out.close()
        terminal_err.close()
        log.close()


__all__ = ["EpochClock", "PROGRESS", "default_log_path", "route_output"]
