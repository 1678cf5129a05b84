"""ADL against a literal transcription of the official layer (clovaai/wsolevaluation wsol/method/adl.py)."""

import pytest
import torch
from torch import nn

from maxdrop import ADL, adl
from maxdrop.layers import adl_drop_mask, adl_importance_map, adl_uses_drop_mask, max_dropout_v2_mask
from tests.helpers.layers import DTYPES, assert_module_and_function_reject


class OfficialADL(nn.Module):
    """The official rule, op for op (training mode): mean, sigmoid, max-relative `<`, one torch.rand([])."""

    def __init__(self, drop_rate: float, drop_threshold: float) -> None:
        super().__init__()
        self.drop_rate, self.drop_threshold = drop_rate, drop_threshold

    def forward(self, x):
        attention = torch.mean(x, dim=1, keepdim=True)
        importance_map = torch.sigmoid(attention)
        b = attention.size(0)
        max_val, _ = torch.max(attention.view(b, -1), dim=1, keepdim=True)
        drop_mask = (attention < (max_val * self.drop_threshold).view(b, 1, 1, 1)).float()
        binary = (torch.rand([], dtype=torch.float32) + self.drop_rate).floor()
        return x.mul((1.0 - binary) * importance_map + binary * drop_mask)


def inputs(seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 6, 7, 9, generator=g)
    x[1] = x[1].relu()  # post-ReLU sample
    x[2] = -x[2].abs() - 0.1  # negative maximum: nothing dropped
    x[3] = 0.0  # maximum 0: every position (== 0 threshold) dropped
    x[4, :, 2, 3] = x[4].mean(0).max() + 1  # one clear maximum
    return x.to(dtype)


@pytest.mark.parametrize("drop_rate", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_same_draws_give_the_official_output_and_gradient(drop_rate, seed):
    x = inputs(seed).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    layer, ref = ADL(drop_rate, 0.8).train(), OfficialADL(drop_rate, 0.8)
    branches = set()
    for step in range(12):  # the same CPU stream feeds both: one number per forward
        torch.manual_seed(100 * seed + step)
        y = layer(x)
        torch.manual_seed(100 * seed + step)
        y_ref = ref(x_ref)
        assert torch.equal(y, y_ref)
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        (gx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
        # the drop branch bitwise; the importance branch up to the order of the additions (a leaner backward)
        if layer.last_used_drop_mask:
            assert torch.equal(gx, gx_ref)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
        branches.add(layer.last_used_drop_mask)
    expected = {0.0: {False}, 1.0: {True}}.get(drop_rate, {True, False})
    assert branches == expected


def test_one_draw_per_training_forward_and_none_in_eval():
    x = inputs(0)
    torch.manual_seed(3)
    ADL().train()(x)
    after_one = torch.rand(1)
    torch.manual_seed(3)
    torch.rand([], dtype=torch.float32)
    assert torch.equal(after_one, torch.rand(1))
    torch.manual_seed(3)
    ADL().eval()(x)
    adl(x, training=False)
    first = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(first, torch.rand(1))


def test_branch_draw_uses_the_drop_mask_with_probability_drop_rate():
    checked = 0
    for seed in range(200):
        u = float(torch.rand([], dtype=torch.float32, generator=torch.Generator().manual_seed(seed)))
        if abs(u - 0.6) > 1e-6:  # away from float32 rounding at the boundary: drop mask iff u + 0.4 >= 1
            assert adl_uses_drop_mask(0.4, torch.Generator().manual_seed(seed)) == (u >= 0.6)
            checked += 1
    assert checked > 190
    hits = sum(adl_uses_drop_mask(0.75, torch.Generator().manual_seed(s)) for s in range(2000))
    assert 1400 < hits < 1600


def test_drop_mask_rules_on_hand_made_maps():
    x = torch.zeros(3, 2, 1, 4)
    x[0, :, 0] = torch.tensor([1.0, 8.0, 10.0, 7.9])  # mean map = the same; threshold 8.0
    x[1, :, 0] = torch.tensor([-1.0, -2.0, -3.0, -1.5])  # max -1, threshold -0.8: nothing
    mask = adl_drop_mask(x, 0.8)
    assert mask.shape == (3, 1, 1, 4) and mask.dtype == torch.bool
    assert mask[0, 0, 0].tolist() == [False, True, True, False]  # 8.0 == threshold is dropped (strict <)
    assert not mask[1].any()
    assert mask[2].all()  # all-zero sample: 0 >= 0 everywhere
    assert adl_drop_mask(x, 0.0)[0].all()  # threshold 0 on a positive map drops everything
    torch.testing.assert_close(adl_importance_map(x), torch.sigmoid(x.mean(1, keepdim=True)))


def test_drop_mask_equals_max_dropout_v2_when_the_map_reaches_zero():
    """docs/models.md: with a zero position, `mean >= t * max` is `(sum - 0) / (max - 0) > 1 - (1 - t)`."""
    x = torch.randn(16, 8, 10, 10, generator=torch.Generator().manual_seed(0)).relu()
    x[:, :, 0, 0] = 0
    for t in (0.8, 0.5, 0.3):
        assert torch.equal(adl_drop_mask(x, t), max_dropout_v2_mask(x, 1 - t))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_shapes_and_gradients(dtype):
    x = inputs(1, dtype).requires_grad_()
    for seed, rate in [(0, 1.0), (0, 0.0)]:
        g = torch.Generator().manual_seed(seed)
        y = adl(x, rate, 0.8, generator=g)
        assert y.shape == x.shape and y.dtype == dtype
        (gx,) = torch.autograd.grad(y.float().sum(), x)
        assert gx.dtype == dtype
        if rate == 1.0:
            dropped = adl_drop_mask(x.detach(), 0.8).expand_as(x)
            assert (y[dropped] == 0).all() and torch.equal(y[~dropped], x.detach()[~dropped])
            assert (gx[dropped] == 0).all() and (gx[~dropped] == 1).all()
        else:
            ref = x.detach().float() * torch.sigmoid(x.detach().float().mean(1, keepdim=True))
            torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_counters_count_zeroed_elements_and_zero_in_the_importance_branch():
    x = inputs(2)
    layer = ADL(0.5).train()
    seen_branches = set()
    total = 0
    for step in range(10):
        torch.manual_seed(step)
        layer(x)
        expected = int(adl_drop_mask(x, 0.8).sum()) * x.shape[1] if layer.last_used_drop_mask else 0
        assert int(layer.last_dropped) == expected and layer.last_seen == x.numel()
        assert layer.last_dropped.dtype == torch.int64
        total += expected
        seen_branches.add(layer.last_used_drop_mask)
    assert seen_branches == {True, False}
    assert int(layer.dropped_total) == total and int(layer.seen_total) == 10 * x.numel()
    untracked = ADL(track_stats=False).train()
    untracked(x)
    assert untracked.last_dropped is None


def test_eval_is_the_identity_unless_active_in_eval():
    x = inputs(0)
    assert ADL().eval()(x) is x and adl(x, training=False) is x
    active = ADL(1.0, active_in_eval=True).eval()
    y = active(x)
    assert torch.equal(y, x.masked_fill(adl_drop_mask(x, 0.8), 0))
    assert active.last_dropped is None  # counters are for training steps only


def test_extra_repr():
    assert repr(ADL()) == "ADL(drop_rate=0.75, drop_threshold=0.8)"
    assert "active_in_eval=True" in repr(ADL(active_in_eval=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"drop_rate": 1.5}, r"drop_rate must be in \[0, 1\], got 1.5"),
        ({"drop_rate": "0.5"}, r"drop_rate must be a real number in \[0, 1\], got '0.5' \(str\)"),
        ({"drop_threshold": -0.1}, r"drop_threshold must be in \[0, 1\], got -0.1"),
        ({"drop_threshold": True}, r"drop_threshold must be a real number"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    assert_module_and_function_reject(ADL, adl, kwargs, message)


def test_bad_rank():
    with pytest.raises(ValueError, match=r"ADL expects an \(N, C, H, W\) input, got shape \(2, 3, 4\)"):
        ADL().train()(torch.ones(2, 3, 4))


def test_importance_branch_gradient_passes_gradcheck_in_float64():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: adl(t, 0.0, 0.8, generator=torch.Generator()), (x,))
