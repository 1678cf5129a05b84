"""Cluster behaviour through the real CLI on the CPU: multi-node DDP over gloo, exact resume, dead ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.data import tiny_run_config
from tests.helpers.net import free_port

ROOT = Path(__file__).resolve().parents[2]  # CLI subprocesses load tests.helpers.cluster by class path

CONFIG = tiny_run_config(
    "DATA",
    slots={
        "stage1": {"class_path": "maxdrop.MaxDropout", "init_args": {"p": 0.3}},
        "block": {"class_path": "torch.nn.Dropout", "init_args": {"p": 0.2}},
    },
    lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}},
    data={"augment": "AUGMENT"},
    trainer={"devices": 1, "max_epochs": 3},
)


def _config(tmp_path: Path, tiny_tree: Path, augment: str = "{cutout_holes: 1, cutout_length: 8}") -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG.replace("DATA", str(tiny_tree)).replace("AUGMENT", augment))
    return path


def _logger(root: Path, version: str) -> str:
    return json.dumps(
        {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(root), "name": "runs", "version": version},
        }
    )


def _maxdrop(*args: str, env: dict | None = None, cwd: Path, **kw) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "maxdrop", *args],
        env=full_env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _ok(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_resume_is_bitwise_exact(tmp_path, tiny_tree):
    """2 epochs, stop, resume to 3 == 3 epochs straight: same seed, data order, augmentation, dropout."""
    cfg = _config(tmp_path, tiny_tree)
    _ok(_maxdrop("fit", "--config", str(cfg), "--trainer.logger", _logger(tmp_path, "straight"), cwd=tmp_path))
    stopped = ["fit", "--config", str(cfg), "--trainer.logger", _logger(tmp_path, "resumed")]
    _ok(_maxdrop(*stopped, "--trainer.max_epochs", "2", cwd=tmp_path))
    _ok(_maxdrop(*stopped, "--ckpt_path", "last", cwd=tmp_path))
    straight = _weights(tmp_path / "runs" / "straight" / "checkpoints" / "last.ckpt")
    resumed = _weights(tmp_path / "runs" / "resumed" / "checkpoints" / "last.ckpt")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    # the resumed run continued in the same folder: one summary with all three epochs
    summary = json.loads((tmp_path / "runs" / "resumed" / "sparsity.json").read_text())
    assert sorted({r["epoch"] for r in summary["records"]}) == [0, 1, 2]


@pytest.mark.slow
def test_two_nodes_train_on_disjoint_shards_and_monitoring_covers_both(tmp_path, tiny_tree):
    """Two processes with NODE_RANK 0 and 1, num_nodes=2, devices=1, on 127.0.0.1 over gloo."""
    cfg = _config(tmp_path, tiny_tree, "{crop_padding: 0, hflip: false, normalize: false}")
    port = str(free_port())
    common = [
        "fit", "--config", str(cfg), "--trainer.logger", _logger(tmp_path, "two_nodes"),
        "--trainer.strategy", "ddp", "--trainer.num_nodes", "2", "--trainer.devices", "1",
        "--trainer.max_epochs", "2", "--trainer.callbacks+=tests.helpers.cluster.ShardRecorder",
    ]  # fmt: skip
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "SHARD_DIR": str(tmp_path)}
    procs = [_maxdrop(*common, env={**env, "NODE_RANK": str(r)}, cwd=tmp_path) for r in (0, 1)]
    for p in procs:
        _ok(p)
    shards = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s["world_size"] == 2 for s in shards)
    for epoch in ("0", "1"):
        a, b = set(shards[0]["seen"][epoch]), set(shards[1]["seen"][epoch])
        assert a and b and not a & b  # disjoint
        assert len(a | b) == 30  # 40 train images - 10 held out for validation: all of them, once
        assert len(shards[0]["seen"][epoch]) + len(shards[1]["seen"][epoch]) == 30

    # One process on the same 30 images: the two-node totals must cover both ranks, i.e. be equal.
    _ok(
        _maxdrop(
            "fit", "--config", str(cfg), "--trainer.logger", _logger(tmp_path, "one"), "--trainer.max_epochs", "2",
            cwd=tmp_path,
        )
    )  # fmt: skip
    two = json.loads((tmp_path / "runs" / "two_nodes" / "sparsity.json").read_text())
    one = json.loads((tmp_path / "runs" / "one" / "sparsity.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    seen = lambda s: {(r["epoch"], r["slot"]): r["seen"] for r in s["records"] if r.get("seen")}  # noqa: E731
    assert seen(two) and seen(two) == seen(one)


@pytest.mark.slow
def test_a_dead_rank_ends_the_whole_job_non_zero(tmp_path, tiny_tree):
    """Kill one of the 2 processes that `maxdrop fit --trainer.devices 2` launches: the job must exit, non-zero."""
    cfg = _config(tmp_path, tiny_tree)
    proc = _maxdrop(
        "fit", "--config", str(cfg), "--trainer.logger", _logger(tmp_path, "dies"),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_epochs", "1000",
        "--trainer.callbacks+=tests.helpers.cluster.SlowTraining",
        env={"SHARD_DIR": str(tmp_path), "MASTER_PORT": str(free_port())}, cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        while not (tmp_path / "alive1").exists():
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.time() < deadline, "rank 1 never started training"
            time.sleep(0.5)
        victim = int((tmp_path / "alive1").read_text())
        assert victim != proc.pid
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        out, _ = proc.communicate(timeout=120)  # bounded: a hang fails the test here
        assert proc.returncode != 0, out[-4000:]
        assert time.time() - killed_at < 120
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
