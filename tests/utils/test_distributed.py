"""The gloo process group is torn down before interpreter finalization, so CPU DDP ranks exit cleanly."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# A rank that sets up the maxdrop model, data or monitor: an atexit handler registered *before* setup runs *after*
# maxdrop's (LIFO), so it sees whether the group was destroyed in time.
RANK = textwrap.dedent(
    """
    import atexit, socket, sys
    import torch.distributed as dist

    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    atexit.register(lambda: print("group alive at exit:", dist.is_initialized(), flush=True))
    if sys.argv[1] == "model":
        from maxdrop.module import ClassificationModule
        from maxdrop.models import FastCNN
        ClassificationModule(backbone=FastCNN).setup("fit")
    elif sys.argv[1] == "monitor":
        from maxdrop.callbacks import SparsityMonitor
        from maxdrop.models import FastCNN
        SparsityMonitor(summary_file=None).setup(None, FastCNN(), "fit")
    elif sys.argv[1] == "data":
        from maxdrop.data import CIFARDataModule
        dm = CIFARDataModule(data_dir="unused")
        try:
            dm.setup("fit")  # no data there: the clean-up must be registered before loading
        except Exception:
            pass
    """
)


@pytest.mark.parametrize("who", ["model", "data", "monitor"])
def test_setup_destroys_the_gloo_group_at_exit(who):
    out = subprocess.run([sys.executable, "-c", RANK, who], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "group alive at exit: False" in out.stdout


def test_without_setup_the_group_outlives_exit_handlers():
    """The control: nothing else destroys a gloo group (Lightning does so for NCCL only)."""
    out = subprocess.run([sys.executable, "-c", RANK, "none"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "group alive at exit: True" in out.stdout


def test_outside_a_distributed_run_nothing_is_registered(monkeypatch):
    import maxdrop.utils.distributed as md

    calls = []
    monkeypatch.setattr(md.atexit, "register", calls.append)
    monkeypatch.setattr(md, "_registered", False)
    md.destroy_process_group_at_exit()
    assert calls == []
