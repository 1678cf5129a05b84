"""Lightning callbacks: sparsity monitoring, drop-mask images, the authors' evaluation protocol, the
TensorBoard layout and HParams session of a run, the stop at a diverged loss, and SLURM's exact requeue."""

from maxdrop.callbacks.divergence import DivergenceGuard, TrainingDiverged
from maxdrop.callbacks.drop_masks import DropMaskImages
from maxdrop.callbacks.eval_protocol import MaxDropoutActiveInEval, set_active_in_eval
from maxdrop.callbacks.hparams import HParamsSession
from maxdrop.callbacks.requeue import SlurmRequeue
from maxdrop.callbacks.sparsity import SUMMARY_FORMAT, SparsityMonitor, find_dropout_slots, load_sparsity_summary
from maxdrop.callbacks.tensorboard_layout import CustomScalarsLayout

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
