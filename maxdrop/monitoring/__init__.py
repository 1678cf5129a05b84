"""What a run shows in TensorBoard: per-slot sparsity (scalars, histograms, a summary file), drop-mask
images, the custom-scalars layout of the sparsity charts and the HParams session of a run.

Configs name these callbacks by their ``maxdrop.callbacks.X`` paths (:mod:`maxdrop.callbacks`
re-exports them); both paths name the same classes.
"""

from maxdrop.monitoring.drop_masks import DropMaskImages
from maxdrop.monitoring.hparams import HParamsSession
from maxdrop.monitoring.sparsity import SUMMARY_FORMAT, SparsityMonitor, load_sparsity_summary
from maxdrop.monitoring.tensorboard_layout import CustomScalarsLayout

__all__ = [
    "SUMMARY_FORMAT",
    "CustomScalarsLayout",
    "DropMaskImages",
    "HParamsSession",
    "SparsityMonitor",
    "load_sparsity_summary",
]
