"""The machine's state next to a benchmark's figures: 1-minute load average and torch's threads.

Timings on a busy machine are not comparable with quiet ones (the two-thread ops slow down more
than one-thread ones, so ratios drift too); every benchmark prints this line with its figures.
"""

from __future__ import annotations

import os

import torch

QUIET_LOAD = 0.5  # above this 1-minute load average, figures are flagged as taken under load


def load_line(when: str = "") -> str:
    """``load 0.12 (1 min) WHEN, torch threads 2, cpus 2`` plus a warning line when the load is above ``QUIET_LOAD``."""
    load = os.getloadavg()[0]
    when = f" {when}" if when else ""
    line = f"load {load:.2f} (1 min){when}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}"
    if load > QUIET_LOAD:
        line += f"\nWARNING: load {load:.2f} > {QUIET_LOAD}: other work is running; these timings are not quiet figures"
    return line
