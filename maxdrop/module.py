"""Kept so that ``maxdrop.module.ClassificationModule`` (in configs, checkpoints and scripts) keeps working;
the module lives in :mod:`maxdrop.training.module`."""

from maxdrop.training.module import PAPER_LR_SCHEDULER, PAPER_OPTIMIZER, ClassificationModule, ErrorRate

__all__ = ["PAPER_LR_SCHEDULER", "PAPER_OPTIMIZER", "ClassificationModule", "ErrorRate"]
