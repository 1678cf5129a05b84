"""One progress line for grids and tunes: runs finished / running / left, elapsed, estimated time left."""

from __future__ import annotations

import sys
import threading
import time

_SAY = threading.Lock()


def say(line: str, stream=None) -> None:
    """Write one whole line and flush. ``print`` writes the text and its newline in two calls, so two
    job threads printing at once can splice their lines; one write under a lock cannot (and a pipe
    keeps a write of under 4 KB whole against the run subprocesses writing to it too)."""
    stream = stream or sys.stdout
    with _SAY:
        stream.write(line + "\n")
        stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts of one process's work list; the estimate is (mean seconds of the runs this process finished)
    x (runs left and running) / jobs, so it appears after the first run finished here."""

    def __init__(self, total: int, jobs: int = 1, prefix: str = "[grid]", stream=None):
        self.total, self.jobs, self.prefix = total, max(1, jobs), prefix
        self.stream = stream or sys.stdout
        self.start = time.time()
        self.durations: list[float] = []

    def line(self, finished: int, running: int) -> str:
        left = self.total - finished - running
        elapsed = time.time() - self.start
        eta = "?"
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            eta = _clock(mean * (left + running) / self.jobs)
        return (
            f"{self.prefix} {finished}/{self.total} finished, {running} running, {left} left; "
            f"elapsed {_clock(elapsed)}, left ~{eta}"
        )

    def show(self, finished: int, running: int) -> None:
        say(self.line(finished, running), self.stream)
