"""Evaluate with MaxDropout left on, as the authors' published test errors were measured."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from maxdrop.layers import MaxDropout, MaxDropoutV2, TopDropBlock, TopKDropout

#: The layers that drop the most active units and need nothing but their input: the ones the
#: authors' protocol keeps on. ProbGuidedMaxout is not among them: it reads the true label.
ACTIVE_IN_EVAL_LAYERS = (MaxDropout, MaxDropoutV2, TopKDropout, TopDropBlock)


def set_active_in_eval(module: nn.Module, active: bool = True) -> int:
    """Set ``active_in_eval`` on every layer of :data:`ACTIVE_IN_EVAL_LAYERS` in ``module``; returns how many."""
    layers = [m for m in module.modules() if isinstance(m, ACTIVE_IN_EVAL_LAYERS)]
    for layer in layers:
        layer.active_in_eval = active
    return len(layers)


class MaxDropoutActiveInEval(pl.Callback):
    """Keeps every MaxDropout-family layer (MaxDropout, MaxDropoutV2, TopKDropout, TopDropBlock) dropping
    during validation, test and predict.

    The authors' code builds a fresh MaxDropout inside ``forward()``, so ``model.eval()`` never
    switched it off and the paper's test errors were measured with MaxDropout active. Add this
    callback to a ``maxdrop test`` run to measure under that protocol::

        maxdrop test --config run.yaml --ckpt_path best \\
            --trainer.callbacks+=maxdrop.callbacks.MaxDropoutActiveInEval
    """

    def _on(self, pl_module: pl.LightningModule) -> None:
        if set_active_in_eval(pl_module, True) == 0:
            # A baseline under the authors' protocol is evaluated as usual; say so, so nobody is misled.
            rank_zero_warn(
                "MaxDropoutActiveInEval: the model has no MaxDropout, MaxDropoutV2, TopKDropout or TopDropBlock layer, "
                "so this evaluation "
                "is the ordinary one"
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on(pl_module)
