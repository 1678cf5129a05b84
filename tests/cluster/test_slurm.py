"""The job scripts of scripts/slurm/ on a real one-node SLURM cluster (munged + slurmctld + slurmd, 127.0.0.1).

The tests submit the project's own job files with sbatch, from the project root, as docs/cluster.md says:
a 2-task DDP fit on the CPU (gloo), the same job signalled mid-run (requeued, resumed in the same folder,
bitwise the uninterrupted result) and a 2-task array of the grid script read by ``maxdrop report``.
They need Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them); elsewhere they skip.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from maxdrop.callbacks import load_sparsity_summary
from maxdrop.training.requeue import JobRequeued, SlurmRequeue, hpc_checkpoints
from tests.helpers.data import CIFAR10_CLASSES, tiny_run_config, tree_files, write_image_tree
from tests.helpers.slurm_cluster import SlurmCluster, missing_binaries

ROOT = Path(__file__).resolve().parents[2]
# Under pytest-xdist these tests share one worker, so one test cluster serves them all.
pytestmark = pytest.mark.xdist_group("slurm")

# The 2-task jobs: global batch 4 (2 images per rank and step), ~100 steps per epoch, 3 epochs.
JOB_ARGS = ["--gres=none", "--ntasks-per-node=2", "--cpus-per-task=1"]
FIT_ARGS = ["--data.global_batch_size", "4"]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> SlurmCluster:
    missing = missing_binaries()
    if missing:
        why = f"SLURM/munge programs not installed ({', '.join(missing)}); apt-get install slurm-wlm munge"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: CI must run the scheduler tests (.ci/run installs them)")
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def job_data(tmp_path_factory) -> Path:
    """A CIFAR-10 image-folder tree with 40 train images per class: 390 to train on after validation's 10."""
    root = tmp_path_factory.mktemp("slurm_data") / "cifar10"
    return write_image_tree(root, tree_files(CIFAR10_CLASSES, {"train": 40, "test": 2}))


@pytest.fixture(scope="session")
def job_config(tmp_path_factory, job_data) -> Path:
    path = tmp_path_factory.mktemp("slurm_config") / "run.yaml"
    slots = {
        "stage1": {"class_path": "maxdrop.MaxDropout", "init_args": {"p": 0.3, "scope": "sample"}},
        "block": {"class_path": "torch.nn.Dropout", "init_args": {"p": 0.1}},
    }
    config = tiny_run_config(
        str(job_data),
        slots=slots,
        data={"augment": {"cutout_holes": 1, "cutout_length": 8}},
        trainer={"max_epochs": 3, "log_every_n_steps": 1},
    )
    path.write_text(config + "num_threads: 1\n")
    return path


def _submit_fit(slurm: SlurmCluster, out: Path, config: Path, data: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    env = {"CONFIG": str(config), "DATA": str(data), "ROOT": str(out / "runs"), "MASTER_ADDR": "127.0.0.1"}
    args = [*JOB_ARGS, f"--output={out}/slurm-%j.out", "scripts/slurm/fit_single_node.sbatch", *FIT_ARGS]
    return slurm.sbatch(*args, cwd=ROOT, env=env)


def _job_output(out: Path, job: str) -> str:
    return (out / f"slurm-{job}.out").read_text(errors="replace")


def _finished(slurm: SlurmCluster, out: Path, job: str, timeout: float = 240) -> None:
    states = slurm.wait_done(job, timeout)
    assert states == ["COMPLETED"], f"job {job}: {states}\n{_job_output(out, job)[-4000:]}"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run folder's event files (all of them, in order) as [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="session")
def straight_job(slurm, job_config, job_data, tmp_path_factory) -> Path:
    """The 2-task DDP job run without interruption; its run folder."""
    out = tmp_path_factory.mktemp("straight")
    job = _submit_fit(slurm, out, job_config, job_data)
    _finished(slurm, out, job)
    return out / "runs" / "maxdrop" / f"version_{job}"


@pytest.mark.slow
def test_two_task_job_trains_ddp_and_counts_what_one_process_counts(straight_job, job_config, tmp_path):
    """2 srun tasks = 2 gloo ranks; the monitor's totals cover both ranks: the units seen per slot and epoch
    equal those of one process on the same global batch. A fresh fit into the job's folder is refused."""
    one = subprocess.run(
        [sys.executable, "-m", "maxdrop", "fit", "--config", str(job_config), "--data.batch_size", "4",
         "--trainer.default_root_dir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = load_sparsity_summary(straight_job / "sparsity.json")
    single = load_sparsity_summary(next(tmp_path.rglob("sparsity.json")))
    assert two["world_size"] == 2 and single["world_size"] == 1
    seen = lambda s: {(r["epoch"], r["slot"]): r["seen"] for r in s["records"] if r.get("seen")}  # noqa: E731
    assert {epoch for epoch, _ in seen(two)} == {0, 1, 2} and seen(two) == seen(single)

    logger = {"save_dir": str(straight_job.parents[1]), "name": "maxdrop", "version": straight_job.name}
    logger = json.dumps({"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": logger})
    refused = subprocess.run(
        [sys.executable, "-m", "maxdrop", "fit", "--config", str(job_config),
         "--trainer.default_root_dir", str(straight_job), "--trainer.logger", logger],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2
    assert f"the run folder {straight_job} already holds a run" in " ".join(refused.stderr.split())
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_signalled_job_requeues_and_resumes_bitwise(slurm, straight_job, job_config, job_data, tmp_path):
    """USR1 mid-run (what --signal=SIGUSR1@N sends): save at a step boundary, requeue, resume in the same
    folder, finish with the uninterrupted job's weights bitwise; the TensorBoard curves have no gap and no
    step twice."""
    job = _submit_fit(slurm, tmp_path, job_config, job_data)
    run = tmp_path / "runs" / "maxdrop" / f"version_{job}"
    # The first epoch's checkpoint: training is under way (and the handler installed) on both ranks.
    slurm.wait_for(lambda: (run / "checkpoints" / "last.ckpt").exists(), 180, f"job {job}'s first epoch")
    slurm.run("scancel", "--signal=USR1", job)
    _finished(slurm, tmp_path, job)
    output = _job_output(tmp_path, job)
    assert slurm.job(job)["Restarts"] == "1", output[-4000:]
    assert "SIGUSR1 received; saving" in output and f"SLURM job {job}: requeued" in output
    assert f"Restored all states from the checkpoint at {run / 'hpc_ckpt_1.ckpt'}" in output

    # One folder holds everything; the resumed fit's config is kept beside the first one's.
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name]
    for name in ("hpc_ckpt_1.ckpt", "config.yaml", "config.fit.1.yaml", "sparsity.json", "checkpoints"):
        assert (run / name).exists(), name
    assert len(list(run.glob("events.out.tfevents.*"))) == 2

    straight, resumed = _weights(straight_job), _weights(run)
    assert straight.keys() == resumed.keys()
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []

    ref, got = _scalars(straight_job), _scalars(run)
    assert ref.keys() == got.keys()
    for tag in ref:
        assert [s for s, _ in got[tag]] == [s for s, _ in ref[tag]], tag  # no gap, no duplicate
    # Step values and every epoch's validation are the uninterrupted ones. (The training-epoch means of the
    # interrupted epoch cover the batches after the resume only; see docs/cluster.md.)
    per_step = [t for t in ref if t.endswith("_step") or t.startswith(("val/", "maxdrop_step/")) or "/val_" in t]
    assert "train/loss_step" in per_step and "val/error" in per_step
    assert {t: got[t] for t in per_step} == {t: ref[t] for t in per_step}


@pytest.mark.slow
def test_grid_array_runs_its_pairs_and_the_report_reads_them(slurm, job_data, tmp_path):
    """A 2-task array of grid_array.sbatch: one (config, seed) pair per task, both finished, then reported."""
    configs = tmp_path / "configs"
    configs.mkdir()
    for name, slots in (("baseline", None), ("maxdropout", {"stage1": {"class_path": "maxdrop.MaxDropout"}})):
        text = tiny_run_config(str(job_data), slots=slots, lr_scheduler=None, data={"batch_size": 32})
        (configs / f"{name}.yaml").write_text(text + "num_threads: 1\n")
    root = tmp_path / "grid"
    env = {"CONFIGS": f"{configs}/*.yaml", "SEEDS": "0", "DATA": str(job_data), "ROOT": str(root)}
    job = slurm.sbatch(
        "--gres=none", "--cpus-per-task=1", "--array=0-1", f"--output={tmp_path}/slurm-%A_%a.out",
        "scripts/slurm/grid_array.sbatch", cwd=ROOT, env=env,
    )  # fmt: skip
    states = slurm.wait_done(job, 240)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("slurm-*.out"))
    assert states == ["COMPLETED", "COMPLETED"], logs
    assert sorted(str(p.parent.relative_to(root)) for p in root.rglob("finished.json")) == [
        "baseline/seed_0",
        "maxdropout/seed_0",
    ]

    report = subprocess.run(
        [sys.executable, "-m", "maxdrop", "report", str(root), "--baseline", "baseline", "--out", str(tmp_path / "r")],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    with open(tmp_path / "r" / "report.csv") as f:
        rows = {r["config"]: r for r in csv.DictReader(f)}
    assert rows.keys() == {"baseline", "maxdropout"} and rows["maxdropout"]["seeds"] == "1"


def _loop(batches: int = 10, val_every: int | None = 10, accumulate: int = 1, max_steps: int = -1, step: int = 0):
    return SimpleNamespace(
        num_training_batches=batches, val_check_batch=val_every, accumulate_grad_batches=accumulate,
        max_steps=max_steps, global_step=step,
    )  # fmt: skip


def test_requeue_stops_only_where_no_epoch_end_work_is_split():
    can = SlurmRequeue._can_stop_after
    assert can(_loop(), 0) and can(_loop(), 8)
    assert not can(_loop(), 9)  # the epoch's last batch: validation and the epoch-end hooks follow
    assert not can(_loop(val_every=5), 4) and can(_loop(val_every=5), 5)  # a mid-epoch validation follows
    assert not can(_loop(accumulate=2), 0) and can(_loop(accumulate=2), 1)  # gradients still accumulating
    assert not can(_loop(max_steps=5, step=5), 3)  # the fit ends here anyway


def test_hpc_checkpoints_in_numeric_order_and_bad_signal(tmp_path):
    for n in (10, 2, 1):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").touch()
    (tmp_path / "hpc_ckpt_x.ckpt").touch()
    assert [p.name for p in hpc_checkpoints(tmp_path)] == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt", "hpc_ckpt_10.ckpt"]
    with pytest.raises(ValueError, match="unknown signal 'SIGFOO'"):
        SlurmRequeue("SIGFOO")


def test_requeue_in_process_saves_after_the_signalled_step_and_requeues(tmp_path, monkeypatch):
    """A SLURM job's environment and a stand-in scontrol: SIGUSR1 during step 3 -> hpc_ckpt_1 after step 3
    (the step's update done, the loop at that batch's end), `scontrol requeue <job>`, exit status 0."""
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "maxdrop", "SLURM_JOB_ID": "77", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)

    class SignalAtStep3(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # mid-step, before the update
            if trainer.global_step == 2:
                signal.raise_signal(signal.SIGUSR1)

    requeue = SlurmRequeue()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=8, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[SignalAtStep3(), requeue],
    )  # fmt: skip
    with pytest.raises(JobRequeued) as exit_:
        trainer.fit(BoringModel())
    assert exit_.value.code == 0
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "77"]
    ckpt = torch.load(tmp_path / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["processed"] == 3 and progress["completed"] == 2  # saved at the end of batch 3
    # After the fit the signal reaches the handler that was there before (Lightning may reinstall ours).
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: seen.append(1))
    try:
        requeue._previous_handler = signal.getsignal(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, requeue._on_signal)
        requeue._signalled = False
        signal.raise_signal(signal.SIGUSR1)
        assert seen == [1] and not requeue._signalled
    finally:
        signal.signal(signal.SIGUSR1, previous)
