"""Lightning callbacks: sparsity monitoring, drop-mask images, the authors' evaluation protocol, the
TensorBoard layout and HParams session of a run, the stop at a diverged loss, and SLURM's exact requeue.

They live in :mod:`maxdrop.monitoring` (research monitors) and :mod:`maxdrop.training` (run plumbing);
this package re-exports them so that every ``maxdrop.callbacks.X`` class path of a config keeps working.
"""

from maxdrop.models.slots import find_dropout_slots
from maxdrop.monitoring import (
    SUMMARY_FORMAT,
    CustomScalarsLayout,
    DropMaskImages,
    HParamsSession,
    SparsityMonitor,
    load_sparsity_summary,
)
from maxdrop.training.divergence import DivergenceGuard, TrainingDiverged
from maxdrop.training.eval_protocol import MaxDropoutActiveInEval, set_active_in_eval
from maxdrop.training.requeue import SlurmRequeue

__all__ = [
    "SUMMARY_FORMAT",
    "CustomScalarsLayout",
    "DivergenceGuard",
    "DropMaskImages",
    "HParamsSession",
    "MaxDropoutActiveInEval",
    "SlurmRequeue",
    "SparsityMonitor",
    "TrainingDiverged",
    "find_dropout_slots",
    "load_sparsity_summary",
    "set_active_in_eval",
]
