"""Atomic claims on run folders, so that any number of grid or tune processes share one root safely.

A claim is a file ``<run folder>.claim`` beside the run folder (outside it, so that cleaning an
interrupted run never deletes the claim), created with ``O_CREAT | O_EXCL``: of several processes on
one machine or on a shared filesystem exactly one creates it. It records host, pid and start time; its
mtime is a heartbeat that a thread refreshes while the run goes on. A claim is stale, and may be taken
over, when its process is dead: same host and that pid gone, or (another host, whose pids we cannot
see) a heartbeat older than ``stale_after`` seconds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0


def claim_path(run_dir: Path) -> Path:
    return run_dir.parent / (run_dir.name + ".claim")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def is_stale(path: Path, stale_after: float = STALE_AFTER_SECONDS) -> bool:
    """Whether the claim at ``path`` belongs to a dead process (False when there is no claim)."""
    try:
        info = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    except (json.JSONDecodeError, OSError):
        # Half-written by a process killed between create and write: stale once its heartbeat is old.
        try:
            return time.time() - path.stat().st_mtime > min(stale_after, 60.0)
        except FileNotFoundError:
            return False
    if info.get("host") == socket.gethostname():
        return not _pid_alive(int(info.get("pid", -1)))
    return age > stale_after


class Claim:
    """A held claim: ``release()`` (or leaving the ``with`` block) removes it and stops the heartbeat."""

    def __init__(self, path: Path, heartbeat: float = HEARTBEAT_SECONDS, took_over: bool = False):
        self.path, self.took_over = path, took_over
        self._token = path.read_text()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True)
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if self.path.read_text() == self._token:  # never remove a claim someone took over from us
                self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info))
        f.flush()
        os.fsync(f.fileno())
    return True


def try_claim(
    run_dir: Path, stale_after: float = STALE_AFTER_SECONDS, heartbeat: float = HEARTBEAT_SECONDS
) -> Claim | None:
    """Claim ``run_dir`` for this process; None when a live process holds it. Takes over a stale claim."""
    path = claim_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _create(path):
        return Claim(path, heartbeat)
    if not is_stale(path, stale_after):
        return None
    # Take over: move the stale claim aside (atomic; of two takers only one succeeds), check that what we
    # moved is still the stale claim we judged, then create ours.
    try:
        seen = path.read_text()
        aside = path.with_name(f"{path.name}.stale.{socket.gethostname()}.{os.getpid()}")
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    moved = aside.read_text()
    if moved != seen:  # a fresh claim appeared in between: put it back and leave the run to it
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink()
        return None
    aside.unlink()
    return Claim(path, heartbeat, took_over=True) if _create(path) else None


def holder(run_dir: Path) -> dict | None:
    """The recorded host/pid/start of the claim on ``run_dir``, or None."""
    try:
        return json.loads(claim_path(run_dir).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
