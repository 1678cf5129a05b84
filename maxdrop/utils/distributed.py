"""Process-group hygiene that Lightning leaves to the user for the gloo (CPU) backend."""

from __future__ import annotations

import atexit

import torch.distributed as dist

_registered = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, whatever its backend.

    Lightning registers this clean-up for NCCL only. A gloo group left alive until interpreter finalization
    can abort the process (``terminate called without an active exception``, SIGABRT) after a run that
    finished well, so a CPU DDP job would report a crash. Idempotent; a no-op outside a distributed run.
    """
    global _registered
    if _registered or not (dist.is_available() and dist.is_initialized()):
        return
    atexit.register(_destroy)
    _registered = True


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
