"""ProbGuidedMaxout in the backbones: only the `head` slot takes a layer that needs the targets, and other
head layers ignore them."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from maxdrop import MaxDropout, ProbGuidedMaxout
from maxdrop.models import FastCNN
from tests.helpers.models import BACKBONES


@pytest.mark.parametrize("name", list(BACKBONES))
def test_only_the_head_slot_takes_it(name):
    for slot in ("stage1", "block"):
        with pytest.raises(
            ValueError, match=f"slot '{slot}' .* ProbGuidedMaxout needs the targets .* put it in `head`"
        ):
            BACKBONES[name](slots={slot: ProbGuidedMaxout})
    assert BACKBONES[name](slots={"head": ProbGuidedMaxout}).needs_targets
    assert not BACKBONES[name](slots={"head": nn.Dropout}).needs_targets


def test_other_head_layers_ignore_the_targets():
    torch.manual_seed(0)
    net = FastCNN(widths=(4, 8, 16), slots={"head": partial(MaxDropout, 0.3, "sample")})
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch.testing.assert_close(net(x, y), net(x), rtol=0, atol=0)
