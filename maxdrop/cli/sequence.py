"""Several ``maxdrop`` commands of one run in one process, stopping at the first that fails:

    python -m maxdrop.cli.sequence '[["fit", "--config", "a.yaml"], ["test", "--config", "a.yaml", ...]]'

`maxdrop grid` runs each (config, seed) pair through it (fit, then its test passes), and `maxdrop tune`
each trial: Python, torch and Lightning start once per run instead of once per command (several seconds
each, more than a small run's test pass).

The commands run one after another through the same entry point as the console script, so each one's
errors, exit status and outputs are those of ``maxdrop <command>``. A DDP fit whose launcher started
more ranks re-runs this command line in each of them, so the ranks go through the same commands in
step; the later commands' trainers find the process group already set up and join it, as in a script
that calls ``fit`` and then ``test``.

A command may be skipped by a file the previous ones wrote: ``{"argv": [...], "unless": "<path>"}`` runs
unless ``<path>`` exists (`maxdrop tune`: no test pass for a pruned trial).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from maxdrop.cli.app import main as maxdrop_main


def run_command(argv: list[str]) -> int:
    """One command as ``maxdrop <argv>`` would run it; returns its exit status."""
    try:
        maxdrop_main(argv)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    return 0


def run_sequence(commands: list) -> int:
    for command in commands:
        if isinstance(command, dict):
            if command.get("unless") and Path(command["unless"]).exists():
                continue
            command = command["argv"]
        code = run_command(list(command))
        if code != 0:
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m maxdrop.cli.sequence '<JSON list of maxdrop command lines>'", file=sys.stderr)
        return 2
    return run_sequence(json.loads(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
