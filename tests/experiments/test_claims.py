"""Claims on run folders (maxdrop/experiments/claims.py) and two grid processes sharing one root."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from maxdrop.experiments.claims import claim_path, holder, is_stale, try_claim
from maxdrop.experiments.grid import main as grid_main
from maxdrop.experiments.progress import Progress, say
from tests.helpers.data import tiny_run_config


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_one_claim_at_a_time_released_and_retaken(tmp_path):
    run = tmp_path / "a" / "seed_0"
    first = try_claim(run)
    assert first is not None and not first.took_over
    assert holder(run)["pid"] == os.getpid() and holder(run)["host"] == socket.gethostname()
    assert try_claim(run) is None  # held by a live process (this one)
    first.release()
    assert not claim_path(run).exists()
    with try_claim(run) as again:
        assert again is not None
    assert not claim_path(run).exists()


def test_stale_claims_are_taken_over(tmp_path):
    run = tmp_path / "a" / "seed_0"
    claim_path(run).parent.mkdir(parents=True)
    # Same host, process gone: stale at once.
    claim_path(run).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": 0}))
    assert is_stale(claim_path(run))
    taken = try_claim(run)
    assert taken is not None and taken.took_over and holder(run)["pid"] == os.getpid()
    taken.release()
    # Another host: judged by the heartbeat's age only.
    claim_path(run).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    assert try_claim(run, stale_after=60) is None
    old = time.time() - 120
    os.utime(claim_path(run), (old, old))
    assert is_stale(claim_path(run), stale_after=60)
    assert try_claim(run, stale_after=60).took_over


def test_heartbeat_refreshes_the_claim(tmp_path):
    run = tmp_path / "seed_0"
    claim = try_claim(run, heartbeat=0.05)
    old = time.time() - 1000
    os.utime(claim_path(run), (old, old))
    time.sleep(0.3)
    assert time.time() - claim_path(run).stat().st_mtime < 100
    claim.release()


def test_progress_line():
    p = Progress(10, jobs=2)
    assert "3/10 finished, 2 running, 5 left" in p.line(3, 2) and "left ~?" in p.line(3, 2)
    p.durations = [60.0, 60.0]
    assert p.line(3, 2).endswith("left ~0:03:30")  # 60 s x 7 runs / 2 jobs


CONFIG = tiny_run_config("DATA", slots=None, lr_scheduler=None, data={"batch_size": 16})


def _grid(root: Path, configs: list[Path], *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "maxdrop", "grid", *map(str, configs), "--seeds", "0", "1", "--root", str(root)]
    return subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def two_configs(tmp_path, tiny_tree) -> list[Path]:
    out = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(CONFIG.replace("DATA", str(tiny_tree)))
        out.append(path)
    return out


class _SlowStream:
    """A stream whose writes take a while, so that threads writing at once get between each other's calls."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        time.sleep(0.0005)
        self.parts.append(text)

    def flush(self) -> None:
        pass


def test_job_threads_never_splice_their_lines():
    # --jobs N prints from N threads; print() writes a line and its newline in two calls (the splice
    # seen under load: "[grid] fit ... seed 0 -> A[grid] fit ... seed 1 -> B").
    stream = _SlowStream()

    def job(i: int) -> None:
        for k in range(25):
            say(f"[grid] job {i} line {k}", stream)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = "".join(stream.parts).splitlines()
    assert sorted(lines) == sorted(f"[grid] job {i} line {k}" for i in range(4) for k in range(25))


@pytest.mark.slow
def test_two_grid_processes_share_a_root(tmp_path, two_configs):
    """One process with --jobs 2 and one with --jobs 1, same root, same pairs: each pair is fitted once,
    every pair finishes, nothing is deleted; the --jobs 2 process has two runs going at once."""
    root = tmp_path / "root"
    procs = [_grid(root, two_configs, "--jobs", "2"), _grid(root, two_configs)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    fits = [line for out in outs for line in out.splitlines() if line.startswith("[grid] fit")]
    assert sorted(fits) == sorted(set(fits)) and len(fits) == 4, fits  # each pair fitted exactly once
    for name in ("a", "b"):
        for seed in (0, 1):
            run = root / name / f"seed_{seed}"
            assert (run / "finished.json").exists() and (run / "checkpoints" / "last.ckpt").exists()
            assert len(list(run.glob("events.out.tfevents.*"))) == 1  # never restarted from scratch
            assert not claim_path(run).exists()
    assert ", 2 running," in outs[0]  # --jobs 2: two at once
    assert "4/4 finished, 0 running, 0 left" in outs[0] + outs[1]


@pytest.mark.slow
def test_grid_takes_over_a_dead_process_claim(tmp_path, two_configs, capsys):
    root = tmp_path / "root"
    run = root / "a" / "seed_0"
    claim_path(run).parent.mkdir(parents=True)
    claim_path(run).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": 0}))
    assert grid_main([str(two_configs[0]), "--seeds", "0", "--root", str(root)]) == 0  # its pair: a subprocess
    assert "took over the stale claim" in capsys.readouterr().out
    assert (run / "finished.json").exists() and not claim_path(run).exists()
