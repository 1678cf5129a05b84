"""Lightning callbacks: sparsity monitoring, drop-mask images and the authors' evaluation protocol."""

from maxdrop.callbacks.drop_masks import DropMaskImages
from maxdrop.callbacks.eval_protocol import MaxDropoutActiveInEval, set_active_in_eval
from maxdrop.callbacks.sparsity import SUMMARY_FORMAT, SparsityMonitor, find_dropout_slots, load_sparsity_summary

__all__ = [
    "SUMMARY_FORMAT",
    "DropMaskImages",
    "MaxDropoutActiveInEval",
    "SparsityMonitor",
    "find_dropout_slots",
    "load_sparsity_summary",
    "set_active_in_eval",
]
