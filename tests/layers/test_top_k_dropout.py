"""TopKDropout against a literal transcription of its rule; gradients, counters, errors (TopDropBlock:
test_top_drop_block.py; both layers in slots through the CLI: tests/cli/test_top_layers_in_slots.py)."""

import importlib
import math

import pytest
import torch

from maxdrop import TopDropBlock, TopKDropout, top_k_dropout, top_k_dropout_mask
from tests.helpers.layers import DTYPES
from tests.helpers.references import scope_rows, topk_reference

topk_impl = importlib.import_module("maxdrop.layers.top_k_dropout")  # the package exports a function of that name


def topk_inputs(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, 7, 9, generator=g)
    with_nan = x.relu()
    with_nan[with_nan > 1.2] = math.nan
    with_inf = x.clone()
    with_inf[x > 1.5], with_inf[x < -1.5] = math.inf, -math.inf
    return [
        ("distinct", x),
        ("negative", x - 3),
        ("post-relu zeros", x.relu()),
        ("mostly zeros", (x - 1.2).relu()),
        ("ties", torch.randint(-3, 4, x.shape, generator=g).float()),
        ("one sample", torch.randn(1, 4, 33, 17, generator=g)),
        ("non-contiguous", torch.randn(6, 9, 7, 10, generator=g)[:, ::2, :, 1::2]),
        ("channels_last", x.relu().contiguous(memory_format=torch.channels_last)),
        ("nan", with_nan),
        ("inf", with_inf),
        ("2-dim", torch.randn(7, 300, generator=g)),
    ]


CASES = topk_inputs(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,x", CASES, ids=[c[0] for c in CASES])
def test_top_k_mask_equals_the_transcription(name, x, dtype):
    x = x.to(dtype)
    for scope in ("tensor", "sample", "channel") if x.ndim > 2 else ("tensor", "sample"):
        for rate in (0.3, 0.05, 0.5, 0.71, 0.99, 1.0):
            expected = topk_reference(x, rate, scope)
            assert torch.equal(top_k_dropout_mask(x, rate, scope), expected), (scope, rate)
            y = top_k_dropout(x, rate, scope)
            torch.testing.assert_close(y, x.masked_fill(expected, 0), rtol=0, atol=0, equal_nan=True)


def test_exactly_k_dropped_with_distinct_values_at_most_k_with_ties():
    g = torch.Generator().manual_seed(1)
    distinct = torch.randperm(8 * 3 * 100, generator=g).float().reshape(8, 3, 10, 10)
    for scope, n in (("tensor", distinct.numel()), ("sample", 300), ("channel", 100)):
        mask = top_k_dropout_mask(distinct, 0.3, scope)
        assert int(mask.sum()) == round(0.3 * n) * (distinct.numel() // n)
    ties = torch.tensor([[0.0, 1, 1, 1, 2, 3, 3, 4, 5, 5]])  # k = 3: the (n - k)-th smallest is 3
    assert top_k_dropout_mask(ties, 0.3, "sample").tolist() == [[False] * 7 + [True] * 3]
    ties[0, 7] = 3  # now 4 values tie at the threshold (the 7th smallest is 3): only the 5s drop
    assert top_k_dropout_mask(ties, 0.3, "sample").tolist() == [[False] * 8 + [True] * 2]


def test_threshold_zero_in_a_post_relu_map_drops_only_positives():
    x = torch.zeros(2, 100)
    x[:, :20] = torch.rand(2, 20) + 0.1  # 20 % positive, rate 0.5: the threshold is 0
    assert torch.equal(top_k_dropout_mask(x, 0.5, "sample"), x > 0)


def test_when_the_pivots_miss_the_widened_bracket_is_exact(monkeypatch):
    """Pivots that never enclose the threshold (z = 0): the tensor scope takes the widening path."""
    monkeypatch.setattr(topk_impl, "_Z_FLAT", torch.zeros(2, dtype=torch.float64))
    for name, x in CASES:
        for rate in (0.3, 0.6, 0.97):
            assert torch.equal(top_k_dropout_mask(x, rate, "tensor"), topk_reference(x, rate, "tensor")), (name, rate)


def test_blocks_and_flat_rows_larger_than_one_block(monkeypatch):
    monkeypatch.setattr(topk_impl, "_BLOCK", 1000)
    monkeypatch.setattr(topk_impl, "_FLAT_ROW", 777)  # with a shorter tail part
    monkeypatch.setattr(topk_impl, "_SUB_FLAT", 256)  # a subsample of runs of consecutive elements
    x = torch.randn(16, 8, 13, 11).relu()
    for scope in ("tensor", "sample", "channel"):
        assert torch.equal(top_k_dropout_mask(x, 0.3, scope), topk_reference(x, 0.3, scope)), scope


def test_tensor_scope_on_a_benchmark_sized_map():
    """Large enough for the flat path's subsample of runs and several blocks, at the default sizes."""
    x = torch.randn(16, 16, 32, 32).relu()
    for rate in (0.3, 0.6):  # 0.6: the threshold is 0, tied by about half of the elements
        assert torch.equal(top_k_dropout_mask(x, rate, "tensor"), topk_reference(x, rate, "tensor")), rate


def test_devices_without_numpy_use_torch_kthvalue(monkeypatch):
    monkeypatch.setattr(topk_impl, "_numpy_sorts", lambda t: False)
    for name, x in CASES:
        for scope in ("tensor", "sample", "channel") if x.ndim > 2 else ("tensor", "sample"):
            assert torch.equal(top_k_dropout_mask(x, 0.3, scope), topk_reference(x, 0.3, scope)), (name, scope)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scope", ["tensor", "sample", "channel"])
def test_top_k_gradient_is_zero_where_dropped_and_passes_elsewhere(scope, dtype):
    x = torch.randn(4, 3, 8, 8).relu().to(dtype).requires_grad_()
    g = torch.randn_like(x)
    layer = TopKDropout(0.3, scope=scope).train()
    layer(x).backward(g)
    mask = topk_reference(x.detach(), 0.3, scope)
    assert torch.equal(x.grad, g.masked_fill(mask, 0))


@pytest.mark.parametrize("scope", ["tensor", "sample", "channel"])
def test_rescale_multiplies_kept_units_by_n_over_kept(scope):
    x = torch.randn(4, 3, 5, 6).requires_grad_()
    g = torch.randn_like(x)
    y = TopKDropout(0.3, scope=scope, rescale=True).train()(x)
    y.backward(g)
    mask = topk_reference(x.detach(), 0.3, scope)
    rows_mask = scope_rows(mask, scope)
    n = rows_mask.shape[1]
    scale = torch.tensor([n / (n - int(r.sum())) for r in rows_mask]).float()
    scale = scale.reshape(-1, 1).expand_as(rows_mask).reshape(x.shape)
    assert torch.equal(y, (x.detach() * scale).masked_fill(mask, 0))
    assert torch.equal(x.grad, (g * scale).masked_fill(mask, 0))
    assert torch.equal(top_k_dropout(x.detach(), 0.3, scope, rescale=True), y.detach())


def test_top_k_counters_and_eval_rules():
    x = torch.randn(4, 3, 5, 5)
    layer = TopKDropout(0.2, scope="channel")
    assert layer(x) is not x and layer.last_seen == x.numel()
    assert int(layer.last_dropped) == int(topk_reference(x, 0.2, "channel").sum()) == 4 * 3 * 5
    layer(x)
    assert (int(layer.dropped_total), int(layer.seen_total)) == (2 * 60, 2 * x.numel())
    layer.eval()
    assert layer(x) is x  # eval: identity, counters untouched
    assert int(layer.dropped_total) == 120
    active = TopKDropout(0.2, scope="channel", active_in_eval=True).eval()
    assert torch.equal(active(x), x.masked_fill(topk_reference(x, 0.2, "channel"), 0))
    assert active.last_dropped is None  # eval forwards are not training statistics
    assert TopKDropout(0.0).train()(x) is x and top_k_dropout(x, 0.3, training=False) is x
    quiet = TopKDropout(0.2, track_stats=False).train()
    quiet(x)
    assert quiet.last_dropped is None


def test_top_k_extra_repr():
    assert repr(TopKDropout(0.25)) == "TopKDropout(rate=0.25, scope='sample')"
    layer = TopKDropout(0.1, scope="global", rescale=True, active_in_eval=True)
    assert repr(layer) == "TopKDropout(rate=0.1, scope='global', rescale=True, active_in_eval=True)"


@pytest.mark.parametrize("rate", [-0.1, 1.5, math.nan, "0.3", True])
def test_bad_rate_names_the_value(rate):
    with pytest.raises(ValueError, match=r"rate must be .*\[0, 1\].*" + repr(rate).replace("'", ".")[:3]):
        TopKDropout(rate)
    with pytest.raises(ValueError, match="rate"):
        top_k_dropout(torch.ones(2, 3), rate)


def test_bad_scope_and_input_rank():
    with pytest.raises(ValueError, match="unknown scope 'row'.*allowed"):
        TopKDropout(0.3, scope="row")
    with pytest.raises(ValueError, match="scope 'channel' needs an input with at least 3 dims.*2-dim"):
        TopKDropout(0.3, scope="channel").train()(torch.ones(4, 5))
    with pytest.raises(ValueError, match="scope 'sample' needs .* 1-dim"):
        top_k_dropout_mask(torch.ones(5), 0.3, "sample")


@pytest.mark.parametrize("layer", [TopKDropout(0.3, "sample"), TopKDropout(0.3, "tensor"), TopDropBlock()], ids=repr)
def test_compiled_layers_equal_eager(layer):
    """The data-dependent selection runs eagerly inside a compiled model (torch.compiler.disable)."""
    x = torch.randn(4, 3, 8, 8).relu().requires_grad_()
    eager_x = x.detach().clone().requires_grad_()
    y = torch.compile(layer, backend="aot_eager")(x)
    y.sum().backward()
    layer(eager_x).sum().backward()
    assert torch.equal(y, layer(x)) and torch.equal(x.grad, eager_x.grad)
    assert 0 < int(layer.last_dropped) < x.numel()
