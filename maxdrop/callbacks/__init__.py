"""Lightning callbacks: sparsity monitoring, drop-mask images, the authors' evaluation protocol, the
TensorBoard layout and HParams session of a run, the stop at a diverged loss, and SLURM's exact requeue
(the evaluation protocol, the divergence stop and the requeue live in :mod:`maxdrop.training`; configs
name them all ``maxdrop.callbacks.<Name>``)."""

from maxdrop.callbacks.drop_masks import DropMaskImages
from maxdrop.callbacks.hparams import HParamsSession
from maxdrop.callbacks.sparsity import SUMMARY_FORMAT, SparsityMonitor, find_dropout_slots, load_sparsity_summary
from maxdrop.callbacks.tensorboard_layout import CustomScalarsLayout
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
