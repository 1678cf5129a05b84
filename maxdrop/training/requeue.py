"""Requeue a SLURM job before its time limit so that the requeued job resumes exactly where it stopped.

SLURM warns a job before its time limit with a signal (``sbatch --signal=SIGUSR1@180``; ``scancel
--signal=USR1 JOB`` sends the same to every task). Lightning's own handler (``SLURMEnvironment(
auto_requeue=True)``) saves its ``hpc_ckpt_<n>.ckpt`` inside the signal handler, i.e. wherever each rank
happens to be in its step (before, during or after the optimizer update, the data loader one batch further
or not), and then keeps training until SLURM kills the job. A resume from such a checkpoint is not the
run that would have continued. :class:`SlurmRequeue` replaces that handler:

1. the handler only sets a flag;
2. at the end of each training step the ranks agree on it (one all-reduce of one number), so every rank
   stops at the same step, after its optimizer update;
3. at the first such step that is neither the last of its epoch nor followed by a validation (those stop
   one step later, so that no epoch-end work is split between the two jobs), every rank saves
   ``hpc_ckpt_<n>.ckpt`` into ``trainer.default_root_dir`` with the loop state, the data loader's position
   (:class:`~maxdrop.data.TensorLoader` is stateful) and the RNG states;
4. when the step's logging is done and flushed, rank 0 runs ``scontrol requeue <job>`` and every rank exits
   with status 0 (:class:`JobRequeued`), unless SLURM's SIGTERM of the requeue ends it first (``srun:
   error: ... Terminated`` in the job's output: harmless, everything is on disk by then); with status 1 if
   the requeue failed (the checkpoint is kept).

The requeued job keeps its job id, finds the checkpoint in the same ``default_root_dir`` (Lightning resumes
from the newest ``hpc_ckpt_*`` there on its own when no ``--ckpt_path`` is given) and continues with the
next batch: on the CPU its weights equal bitwise those of the job run without interruption.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = ["HPC_PREFIX", "JobRequeued", "SlurmRequeue", "hpc_checkpoints", "slurm_job_id"]

#: Lightning's name for the checkpoints it resumes a SLURM job from (``hpc_ckpt_<n>.ckpt``).
HPC_PREFIX = "hpc_ckpt_"


class JobRequeued(SystemExit):
    """Raised on every rank after the checkpoint is saved and the job requeued: the process exits with 0."""

    def __init__(self) -> None:
        super().__init__(0)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this job (``<array job>_<task>`` in an array); None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def hpc_checkpoints(folder: str | Path) -> list[Path]:
    """The ``hpc_ckpt_<n>.ckpt`` files of ``folder``, oldest (smallest n) first."""
    found = []
    for path in Path(folder).glob(f"{HPC_PREFIX}*.ckpt"):
        number = re.fullmatch(rf"{HPC_PREFIX}(\d+)\.ckpt", path.name)
        if number:
            found.append((int(number.group(1)), path))
    return [path for _, path in sorted(found)]


def resumes_from_hpc_checkpoint(trainer: pl.Trainer, ckpt_path: str | None) -> bool:
    """Whether Lightning will resume this fit from an hpc checkpoint (a SLURM job, no ``ckpt_path`` given,
    an ``hpc_ckpt_*`` in ``default_root_dir``), as a requeued job does."""
    if ckpt_path == "hpc":
        return True
    return not ckpt_path and SLURMEnvironment.detect() and bool(hpc_checkpoints(trainer.default_root_dir))


class SlurmRequeue(pl.Callback):
    """Save on SLURM's warning signal at a step boundary, requeue the job and exit; see the module docstring.

    Active in ``fit`` inside a SLURM job (``SLURMEnvironment.detect()``); elsewhere it does nothing. The
    ``maxdrop`` CLI adds it to every run (``--requeue.signal`` names the signal, ``SIGUSR1`` by default,
    which must match the job's ``--signal``).

    Args:
        signal: name of the warning signal, e.g. ``"SIGUSR1"`` or ``"SIGUSR2"``.
    """

    def __init__(self, signal: str = "SIGUSR1") -> None:
        try:
            self.signum = _signals()[signal]
        except KeyError:
            raise ValueError(f"unknown signal {signal!r}; use a name such as 'SIGUSR1' or 'SIGUSR2'") from None
        self._active = False
        self._signalled = False
        self._exit_before_next_step = False
        self._previous_handler: Any = None

    # ------------------------------------------------------------------ the signal

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._active:
            self._signalled = True  # nothing else here: the step in progress finishes undisturbed
            return
        # Reinstalled after the fit (Lightning restores the handlers it found when a fit ends by an
        # exception): give the signal to the handler that was there before this one.
        signal.signal(signum, self._previous_handler or signal.SIG_DFL)
        signal.raise_signal(signum)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not SLURMEnvironment.detect() or threading.current_thread() is not threading.main_thread():
            return
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment):
            environment.auto_requeue = False  # Lightning's handler would save mid-step
        # Installed before Lightning registers its handlers, which then keeps this one for the signal.
        self._previous_handler = signal.signal(self.signum, self._on_signal)
        self._active = True
        self._signalled = self._exit_before_next_step = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handler()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()  # Lightning skips the teardown hooks when the fit ends by an exception

    def _restore_handler(self) -> None:
        if self._active:
            self._active = False
            signal.signal(self.signum, self._previous_handler or signal.SIG_DFL)

    # ------------------------------------------------------------------ the step boundary

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or self._exit_before_next_step:
            return
        # Every rank takes part in every step's decision, so all of them stop at the same step.
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        if not self._can_stop_after(trainer, batch_idx):
            return  # decided again at the next step
        path = Path(trainer.default_root_dir) / f"{HPC_PREFIX}{_next_number(trainer.default_root_dir)}.ckpt"
        rank_zero_info(
            f"SLURM job {slurm_job_id()}: {signal.Signals(self.signum).name} received; saving {path} after "
            f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx + 1} of "
            f"{trainer.num_training_batches})"
        )
        trainer.save_checkpoint(path)
        self._exit_before_next_step = True  # after this step's logging, which the resumed job does not redo

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if not self._exit_before_next_step:
            return
        trainer.strategy.barrier("maxdrop-requeue")  # every rank has finished the saved step
        for logger in trainer.loggers:
            logger.finalize("finished")  # the event files are complete before SLURM ends the tasks
        # The requeue ends the tasks with SIGTERM, maybe before they exit: by then all is on disk, so the default
        # action is right (Lightning's SIGTERM handler would start a collective inside the handler).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        requeued = trainer.strategy.broadcast(_requeue(slurm_job_id()) if trainer.is_global_zero else False)
        if not requeued:
            raise SystemExit(1)  # saved but not requeued: the job must not look finished
        raise JobRequeued()

    @staticmethod
    def _can_stop_after(trainer: pl.Trainer, batch_idx: int) -> bool:
        done = batch_idx + 1
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            return False  # the fit ends here anyway
        if done % trainer.accumulate_grad_batches:
            return False  # mid-accumulation: the gradients are not in the checkpoint
        if done >= trainer.num_training_batches:
            return False  # the epoch ends here: stop after the first step of the next one
        every = trainer.val_check_batch
        return not (isinstance(every, int) and every > 0 and done % every == 0)  # a validation follows


def _next_number(folder: str | Path) -> int:
    existing = hpc_checkpoints(folder)
    return int(existing[-1].stem[len(HPC_PREFIX) :]) + 1 if existing else 1


def _requeue(job_id: str | None) -> bool:
    if job_id is None or not re.fullmatch(r"[0-9_]+", job_id):
        rank_zero_warn(f"cannot requeue: no valid SLURM job id in the environment (got {job_id!r})")
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode == 0:
        rank_zero_info(f"SLURM job {job_id}: requeued; this run stops here and the requeued job resumes it")
        return True
    rank_zero_warn(
        f"`scontrol requeue {job_id}` failed ({result.returncode}: {(result.stderr or result.stdout).strip()}); "
        "was the job submitted with --requeue? The checkpoint is saved: resume from it with --ckpt_path"
    )
    return False


def _signals() -> dict[str, int]:
    return {s.name: int(s) for s in signal.Signals if s.name.startswith("SIG") and not s.name.startswith("SIG_")}
