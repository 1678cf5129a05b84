"""The machine's state next to a benchmark's figures: load average, torch's threads, other work.

Timings on a busy machine are not comparable with quiet ones (the two-thread ops slow down more
than one-thread ones, so ratios drift too); every benchmark prints these lines with its figures.
The load average at the end includes the benchmark's own threads (two busy threads lift it toward
2 within a minute), so quietness is judged by the load at the start and by :class:`OtherWork`: the
CPU time that other processes took while the benchmark ran.
"""

from __future__ import annotations

import os
import time

import torch

QUIET_LOAD = 0.5  # above this 1-minute load average at the start, figures are flagged as taken under load
QUIET_OTHER_CORES = 0.1  # other processes' average CPU use during the run, in cores


def load_line(when: str = "", includes_self: bool = False) -> str:
    """``load 0.12 (1 min) WHEN, torch threads 2, cpus 2`` plus a warning line when the load is above
    ``QUIET_LOAD``; ``includes_self``: taken after the benchmark ran, so its own threads are in it
    (said, and no warning)."""
    load = os.getloadavg()[0]
    when = f" {when}" if when else ""
    own = " (this benchmark's own threads included)" if includes_self else ""
    line = f"load {load:.2f} (1 min){when}{own}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}"
    if load > QUIET_LOAD and not includes_self:
        line += f"\nWARNING: load {load:.2f} > {QUIET_LOAD}: other work is running; these timings are not quiet figures"
    return line


def _busy_seconds() -> float:
    """CPU seconds all processes have been busy since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherWork:
    """``with OtherWork() as other: ...`` then ``other.line()``: how many cores other processes kept
    busy on average while the block ran (machine-wide busy time minus this process's CPU time)."""

    def __enter__(self) -> OtherWork:
        self._busy, self._own, self._wall = _busy_seconds(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy, own = _busy_seconds() - self._busy, time.process_time() - self._own
        self.wall = time.perf_counter() - self._wall
        self.cores = max(0.0, busy - own) / self.wall if self.wall > 0 else 0.0

    def line(self) -> str:
        line = f"other processes: {self.cores:.2f} cores busy on average over the {self.wall:.0f} s of timing"
        if self.cores > QUIET_OTHER_CORES:
            line += (
                f"\nWARNING: other work took {self.cores:.2f} cores (> {QUIET_OTHER_CORES}) while timing; "
                "these timings are not quiet figures"
            )
        return line
