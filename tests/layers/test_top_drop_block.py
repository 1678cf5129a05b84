"""TopDropBlock against a literal transcription of Top-DB-Net's rule; tie rule, gradients, counters, errors."""

import math

import pytest
import torch

from maxdrop import TopDropBlock, top_drop_block, top_drop_block_mask
from tests.helpers.layers import DTYPES
from tests.helpers.references import top_drop_block_reference


def tdb_inputs() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 9, 6, generator=g)
    tied = x.clone()
    tied[:, :, 4] = tied[:, :, 1]  # rows 1 and 4 tie, and so do rows 0, 7 and 8
    tied[:, :, 7] = tied[:, :, 0]
    tied[:, :, 8] = tied[:, :, 0]
    return [
        ("distinct", x),
        ("negative", x - 2),
        ("post-relu zeros", (x - 0.5).relu()),
        ("ties", tied),
        ("all zero", torch.zeros(2, 3, 5, 4)),
        ("one sample", torch.randn(1, 5, 12, 7, generator=g)),
        ("non-contiguous", torch.randn(3, 6, 10, 8, generator=g)[:, ::2, :, ::2]),
        ("channels_last", x.contiguous(memory_format=torch.channels_last)),
    ]


TDB_CASES = tdb_inputs()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,x", TDB_CASES, ids=[c[0] for c in TDB_CASES])
def test_top_drop_block_equals_the_transcription(name, x, dtype):
    x = x.to(dtype)
    for h_ratio in (0.33, 0.1, 0.5, 1.0):
        expected = top_drop_block_reference(x, h_ratio)
        assert torch.equal(top_drop_block_mask(x, h_ratio), expected), h_ratio
        assert torch.equal(top_drop_block(x, h_ratio), x.masked_fill(expected, 0)), h_ratio


def test_top_drop_block_tie_rule_drops_the_higher_row_index_first():
    x = torch.ones(1, 2, 6, 3)
    assert top_drop_block_mask(x, 0.33).flatten().tolist() == [False] * 4 + [True] * 2
    x[0, :, 1] = 2.0  # the most active row goes first, then the highest index among the tied rest
    assert top_drop_block_mask(x, 0.33).flatten().tolist() == [False, True, False, False, False, True]


def test_top_drop_block_drops_nothing_when_the_row_count_rounds_to_zero():
    """The authors' `ind[:, -rh:]` would select every row for rh == 0; here nothing is dropped."""
    x = torch.randn(2, 3, 4, 4)
    assert not top_drop_block_mask(x, 0.1).any()  # round(0.4) == 0
    assert torch.equal(TopDropBlock(0.1).train()(x), x)


def test_top_drop_block_gradient_counters_and_eval():
    x = torch.randn(3, 4, 6, 5).requires_grad_()
    g = torch.randn_like(x)
    layer = TopDropBlock(0.5).train()
    layer(x).backward(g)
    mask = top_drop_block_reference(x.detach(), 0.5)
    assert torch.equal(x.grad, g.masked_fill(mask, 0))
    assert int(layer.last_dropped) == 3 * 3 * 4 * 5 and layer.last_seen == x.numel()
    layer.eval()
    assert layer(x) is x
    active = TopDropBlock(0.5, active_in_eval=True).eval()
    assert torch.equal(active(x), x.masked_fill(mask, 0)) and active.last_dropped is None
    assert top_drop_block(x, training=False) is x and TopDropBlock(0.0).train()(x) is x
    assert repr(TopDropBlock()) == "TopDropBlock(h_ratio=0.33)"
    assert repr(active) == "TopDropBlock(h_ratio=0.5, active_in_eval=True)"


@pytest.mark.parametrize("h_ratio", [-0.5, 1.01, math.nan])
def test_top_drop_block_bad_ratio_and_rank(h_ratio):
    with pytest.raises(ValueError, match=r"h_ratio must be in \[0, 1\], got " + str(h_ratio)):
        TopDropBlock(h_ratio)
    with pytest.raises(ValueError, match=r"expects an \(N, C, H, W\) input, got shape \(2, 3, 4\)"):
        TopDropBlock().train()(torch.ones(2, 3, 4))
