"""MaxDropoutActiveInEval: the authors' evaluation protocol, MaxDropout left on at test time."""

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from maxdrop import MaxDropout, ProbGuidedMaxout, TopDropBlock, TopKDropout
from maxdrop.callbacks import MaxDropoutActiveInEval, set_active_in_eval
from maxdrop.models import FastCNN
from maxdrop.module import ClassificationModule


def _test(module, callbacks):
    g = torch.Generator().manual_seed(0)  # the same batch for every call
    images, labels = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    data = DataLoader(TensorDataset(images, labels), batch_size=32)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks
    )
    return trainer.test(module, data, verbose=False)[0]["test/loss"]


def test_test_pass_runs_with_maxdropout_active():
    torch.manual_seed(0)
    module = ClassificationModule(
        backbone=partial(FastCNN, widths=(4, 8, 8), slots={"stage1": partial(MaxDropout, 0.5)})
    )
    ordinary = _test(module, [])
    authors = _test(module, [MaxDropoutActiveInEval()])
    assert authors != pytest.approx(ordinary)  # the layer dropped units in eval mode
    layer = module.backbone.dropout_slots()["stage1"]
    assert layer.active_in_eval
    x = torch.randn(4, 8, 16, 16)
    assert torch.equal(layer.eval()(x), MaxDropout(0.5).train()(x))
    assert set_active_in_eval(module, False) == 1 and layer.eval()(x) is x


def test_a_model_without_maxdropout_is_evaluated_as_usual_with_a_warning():
    torch.manual_seed(0)
    module = ClassificationModule(backbone=partial(FastCNN, widths=(4, 8, 8)))
    ordinary = _test(module, [])
    with pytest.warns(UserWarning, match="no MaxDropout, MaxDropoutV2, TopKDropout or TopDropBlock layer"):
        authors = _test(module, [MaxDropoutActiveInEval()])
    assert authors == pytest.approx(ordinary)


def test_the_rate_layers_stay_on_but_the_label_reading_head_does_not():
    torch.manual_seed(0)
    slots = {"stage1": partial(TopKDropout, 0.3), "stage2": partial(TopDropBlock, 0.5), "head": ProbGuidedMaxout}
    module = ClassificationModule(backbone=partial(FastCNN, widths=(4, 8, 8), slots=slots))
    ordinary = _test(module, [])
    authors = _test(module, [MaxDropoutActiveInEval()])
    assert authors != pytest.approx(ordinary)
    layers = module.backbone.dropout_slots()
    assert layers["stage1"].active_in_eval and layers["stage2"].active_in_eval
    assert not layers["head"].active_in_eval  # it would need the test labels: evaluated as usual
