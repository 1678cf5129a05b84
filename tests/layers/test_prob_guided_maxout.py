"""ProbGuidedMaxout: its mask and output equal a literal transcription of the rule; gradients, eval,
counters, bad input. In the backbones: tests/models/test_head_targets.py; trained (module, `maxdrop fit`,
DDP): tests/training/test_prob_guided_maxout_training.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maxdrop import ProbGuidedMaxout
from maxdrop.layers import prob_guided_keep_fraction, prob_guided_maxout, prob_guided_maxout_mask
from tests.helpers.references import prob_guided_maxout_reference


def varied_logits(n: int, classes: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets whose true-class probability runs from near 1 down to near 0 over the batch."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g)
    targets = torch.randint(0, classes, (n,), generator=g)
    logits[torch.arange(n), targets] += torch.linspace(9, -6, n)
    return logits, targets


INPUTS = {
    "distinct": lambda g: torch.randn(9, 37, generator=g),
    "ties": lambda g: torch.randint(0, 4, (9, 20), generator=g).float(),
    "negative": lambda g: -torch.rand(6, 16, generator=g) - 1,
    "post-ReLU, most zero": lambda g: (torch.randn(9, 64, generator=g) - 1).relu(),
    "one sample": lambda g: torch.randn(1, 10, generator=g),
    "one unit": lambda g: torch.randn(9, 1, generator=g),
    "non-contiguous": lambda g: torch.randn(24, 9, generator=g).t(),
}
TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("name", list(INPUTS))
def test_mask_and_output_equal_the_transcription(name, dtype):
    x = INPUTS[name](torch.Generator().manual_seed(1)).to(dtype)
    logits, targets = varied_logits(x.shape[0])
    logits = logits.to(dtype)
    dropped, expected = prob_guided_maxout_reference(x, logits, targets, scale=1.25)
    assert torch.equal(prob_guided_maxout_mask(x, logits, targets), dropped)
    out = prob_guided_maxout(x, logits, targets, scale=1.25)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), expected, rtol=TOLERANCE[dtype], atol=0)
    if x.shape[1] > 4:  # the cases cover nearly half of the units dropped (confident) and none (unsure)
        per_sample = dropped.sum(1)
        assert per_sample.max() >= x.shape[1] // 2 - 1 and (x.shape[0] == 1 or per_sample.min() == 0)


def test_the_layer_scores_with_the_classifier_it_is_given():
    g = torch.Generator().manual_seed(2)
    x, fc = torch.randn(12, 30, generator=g), nn.Linear(30, 5)
    _, targets = varied_logits(12, 5)
    layer = ProbGuidedMaxout()
    layer.scale.data.fill_(0.8)
    dropped, expected = prob_guided_maxout_reference(x, fc(x), targets, scale=0.8)
    out = layer(x, targets, fc)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)
    assert torch.equal(out == 0, dropped | (x == 0))


def test_ties_are_ranked_by_index_and_half_counts_round_to_even():
    # Two equal logits: q = 0.5 exactly, keep = 0.75.
    logits, targets = torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64)
    for d, n_kept in [(2, 2), (6, 4), (10, 8)]:  # 1.5 -> 2, 4.5 -> 4, 7.5 -> 8
        x = torch.arange(d, dtype=torch.float32)[None]
        assert prob_guided_maxout_mask(x, logits, targets).sum() == d - n_kept
    x = torch.tensor([[3.0, 1.0, 3.0, 3.0, 0.0, 3.0]])  # keep 4 of 6: 0, 1 and the first two 3s
    mask = prob_guided_maxout_mask(x, logits, targets)
    assert mask.tolist() == [[False, False, False, True, False, True]]
    # One unit, a certain prediction: keep = 0.5, round(0.5) = 0, the unit is dropped.
    certain = torch.tensor([[0.0, 100.0]])
    assert prob_guided_maxout_mask(torch.ones(1, 1), certain, torch.tensor([1])).item()


def test_non_finite_scores_drop_nothing():
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    logits = nn.Linear(8, 4)(x)  # row 1 is NaN
    mask = prob_guided_maxout_mask(x, logits, torch.tensor([0, 1, 2]))
    assert not mask[1].any()
    assert prob_guided_keep_fraction(logits, torch.tensor([0, 1, 2]))[1] == 1.0


def test_gradients_pass_kept_units_and_scale_and_never_reach_the_classifier():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 24, generator=g).requires_grad_()
    fc = nn.Linear(24, 6)
    _, targets = varied_logits(10, 6)
    layer = ProbGuidedMaxout()
    layer.scale.data.fill_(1.5)
    out = layer(x, targets, fc)
    upstream = torch.randn(out.shape, generator=g)
    out.backward(upstream)
    assert fc.weight.grad is None and fc.bias.grad is None  # q came from a detached copy
    with torch.no_grad():
        logits = fc(x)
        dropped = prob_guided_maxout_mask(x, logits, targets)
        keep = prob_guided_keep_fraction(logits, targets)[:, None]
    assert dropped.any() and (~dropped).any()
    assert torch.all(x.grad[dropped] == 0)
    torch.testing.assert_close(x.grad, torch.where(dropped, 0.0, upstream * 1.5 / keep))
    torch.testing.assert_close(layer.scale.grad, (upstream * x.detach() * ~dropped / keep).sum())


def test_functional_scale_tensor_gets_its_gradient_and_bf16_passes_gradients():
    x = torch.randn(5, 12, dtype=torch.bfloat16, requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    logits, targets = varied_logits(5, 4)
    out = prob_guided_maxout(x, logits, targets, scale)
    out.float().sum().backward()
    dropped = prob_guided_maxout_mask(x, logits, targets)
    assert scale.grad is not None and torch.isfinite(scale.grad)
    assert torch.all(x.grad[dropped] == 0) and torch.all(x.grad[~dropped] > 0)


def test_eval_is_the_identity_unless_active_in_eval():
    x, fc = torch.randn(4, 8), nn.Linear(8, 3)
    targets = torch.tensor([0, 1, 2, 0])
    layer = ProbGuidedMaxout().eval()
    assert layer(x) is x and layer(x, targets, fc) is x
    assert prob_guided_maxout(x, fc(x), targets, training=False) is x
    active = ProbGuidedMaxout(active_in_eval=True).eval()
    torch.testing.assert_close(active(x, targets, fc), ProbGuidedMaxout()(x, targets, fc))
    with pytest.raises(ValueError, match="eval with active_in_eval=True.*targets=None"):
        active(x)
    with pytest.raises(ValueError, match=r"active \(training\) but got targets=None.*backbone\(x, targets\)"):
        ProbGuidedMaxout()(x)
    assert repr(layer) == "ProbGuidedMaxout()" and "active_in_eval=True" in repr(active)


def test_drop_counters_are_device_tensors_that_add_up():
    layer, fc = ProbGuidedMaxout(), nn.Linear(16, 4)
    assert layer.last_dropped is None and layer.dropped_total is None
    expected = 0
    for seed in (0, 1):
        x = torch.randn(7, 16, generator=torch.Generator().manual_seed(seed))
        _, targets = varied_logits(7, 4, seed)
        fc.weight.data[targets] += 0.5 * x  # make some samples confident enough to drop units
        layer(x, targets, fc)
        dropped = int(prob_guided_maxout_reference(x, fc(x), targets)[0].sum())
        expected += dropped
        assert isinstance(layer.last_dropped, torch.Tensor) and layer.last_dropped.dtype == torch.int64
        assert (int(layer.last_dropped), layer.last_seen) == (dropped, 7 * 16)
    assert expected > 0
    assert (int(layer.dropped_total), int(layer.seen_total)) == (expected, 2 * 7 * 16)
    layer.eval()(x)  # eval forwards are not counted
    assert int(layer.seen_total) == 2 * 7 * 16
    untracked = ProbGuidedMaxout(track_stats=False)
    untracked(x, targets, fc)
    assert untracked.last_dropped is None


@pytest.mark.parametrize(
    ("x", "logits", "targets", "match"),
    [
        (torch.randn(2, 3, 4, 4), torch.randn(2, 5), torch.tensor([0, 1]), r"shape \(N, D\), got shape \(2, 3, 4, 4\)"),
        (torch.randn(6), torch.randn(6, 5), torch.zeros(6, dtype=torch.int64), r"\(N, D\), got shape \(6,\)"),
        (torch.randn(2, 8), torch.randn(3, 5), torch.tensor([0, 1]), r"N = 2, got shape \(3, 5\)"),
        (torch.randn(2, 8), torch.randn(2, 5), torch.tensor([0.0, 1.0]), "integer dtype, got .* torch.float32"),
        (torch.randn(2, 8), torch.randn(2, 5), torch.tensor([0, 1, 2]), r"shape \(N,\) = \(2,\) .* got shape \(3,\)"),
    ],
)
def test_bad_inputs_are_named(x, logits, targets, match):
    with pytest.raises(ValueError, match=match):
        prob_guided_maxout(x, logits, targets)
    with pytest.raises(ValueError, match=match):
        ProbGuidedMaxout()(x, targets, lambda f: logits)
    if logits.shape[0] == x.shape[0]:  # checked before the real classifier would fail on x
        with pytest.raises(ValueError, match=match):
            ProbGuidedMaxout()(x, targets, nn.Linear(8, logits.shape[1]))
