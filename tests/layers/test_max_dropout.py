"""MaxDropout / MaxDropoutV2: the paper's algorithm, edge cases, gradients, compile."""

import pytest
import torch
from torch import nn

from maxdrop import SCOPES, MaxDropout, MaxDropoutV2, max_dropout, max_dropout_v2


def authors_max_dropout(x: torch.Tensor, drop: float = 0.3) -> torch.Tensor:
    """Direct transcription of the authors' MaxDropout.forward in training mode."""
    up = x - x.min()
    divisor = x.max() - x.min()
    x_copy = torch.div(up, divisor)
    mask = x_copy > (1 - drop)
    return x.masked_fill(mask > 0.5, 0)


def per_slice_reference(x, p, start_dim):
    """The authors' formula applied to each slice of dims ``start_dim..`` separately."""
    flat = x.reshape(-1, *x.shape[start_dim:]) if start_dim else x[None]
    out = torch.stack([authors_max_dropout(s, p) for s in flat])
    return out.reshape(x.shape)


def random_cases(seed, count):
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        n = int(torch.randint(1, 4000, (1,), generator=g))
        kind = i % 5
        scale = float(torch.rand(1, generator=g)) * 10 + 1e-3
        shift = float(torch.randn(1, generator=g)) * 5
        x = torch.randn(n, generator=g) * scale + shift  # negative values
        if kind == 1:
            x = x.relu()  # post-ReLU map: many exact zeros
        elif kind == 2:
            x = torch.randint(-5, 6, (n,), generator=g).float()  # heavy ties
        elif kind == 3:
            x = torch.randint(0, 11, (n,), generator=g).float() * 0.1  # ties on decimal grid
        elif kind == 4:
            x = torch.randn(n, generator=g)  # symmetric: threshold near 0 for p=0.5
        yield x, [0.3, 0.5, 0.1, 0.7, 0.9, 0.01, 1.0, 0.49][i % 8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_tensor_scope_equals_authors_code_elementwise(dtype):
    for x, p in random_cases(seed=hash(str(dtype)) % 1000, count=400):
        x = x.to(dtype)
        torch.testing.assert_close(max_dropout(x, p), authors_max_dropout(x, p), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 10), (128, 512), (3, 4, 5, 6), (256, 16, 8, 8)])
def test_multidim_batches_equal_authors_code(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for _ in range(5):
        x = torch.randn(shape, generator=g)
        for y in (x, x.relu()):
            assert torch.equal(MaxDropout(0.3).train()(y), authors_max_dropout(y, 0.3))


def test_extreme_magnitudes_equal_authors_code():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(5000, generator=g)
    for x in (1000 + base * 1e-3, base * 1e-30, base * 1e30, base - 1e4):
        for p in (0.3, 0.5, 0.51):
            assert torch.equal(max_dropout(x, p), authors_max_dropout(x, p))


@pytest.mark.parametrize("scope,start_dim", [("sample", 1), ("channel", 2)])
def test_sample_and_channel_scopes_normalize_each_slice(scope, start_dim):
    x = torch.randn(6, 4, 5, 5)
    assert torch.equal(max_dropout(x, 0.3, scope), per_slice_reference(x, 0.3, start_dim))


def test_sample_scope_is_independent_of_the_rest_of_the_batch():
    x = torch.randn(8, 3, 7, 7)
    other = torch.randn(8, 3, 7, 7) * 100
    alone = max_dropout(x[:1], 0.3, "sample")
    for batch in (x, torch.cat([x[:1], other]), torch.cat([x[:1], x[:1] * 0])):
        assert torch.equal(max_dropout(batch, 0.3, "sample")[:1], alone)
    # ...while the tensor scope (the authors' choice) does depend on it
    assert not torch.equal(max_dropout(torch.cat([x[:1], other]), 0.3)[:1], max_dropout(x[:1], 0.3))


def test_channels_last_input_gives_the_same_result():
    x = torch.randn(4, 8, 6, 6)
    xc = x.to(memory_format=torch.channels_last)
    for scope in ("tensor", "sample", "channel"):
        assert torch.equal(max_dropout(xc, 0.3, scope), max_dropout(x, 0.3, scope))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,scope",
    [((16, 32), "tensor"), ((16, 32), "sample"), ((4, 3, 8, 8), "tensor"), ((4, 3, 8, 8), "sample")]
    + [((4, 3, 8, 8), "channel"), ((4, 3, 10), "channel")],
)
def test_shapes_and_dtypes_are_preserved(dtype, shape, scope):
    x = torch.randn(shape).to(dtype)
    y = MaxDropout(0.3, scope=scope)(x)
    assert y.shape == x.shape and y.dtype == dtype
    dropped = y != x
    assert dropped.any() and (y[dropped] == 0).all()
    # kept values are not rescaled
    assert torch.equal(y[~dropped], x[~dropped])


def test_drops_the_largest_values_only():
    x = torch.arange(100, dtype=torch.float32).reshape(1, 100)
    y = max_dropout(x, 0.3)
    # normalized value i/99 > 0.7  <=>  i >= 70
    assert torch.equal(y[0, :70], x[0, :70]) and (y[0, 70:] == 0).all()


def test_eval_is_identity_and_active_in_eval_keeps_dropping():
    x = torch.randn(4, 3, 5, 5)
    layer = MaxDropout(0.3).eval()
    assert layer(x) is x
    authors_protocol = MaxDropout(0.3, active_in_eval=True).eval()
    assert torch.equal(authors_protocol(x), authors_max_dropout(x, 0.3))
    assert max_dropout(x, 0.3, training=False) is x


def test_p_zero_is_exact_identity():
    x = torch.randn(4, 10)
    assert MaxDropout(0.0).train()(x) is x
    assert max_dropout(x, 0.0) is x and max_dropout_v2(torch.randn(2, 3, 4, 4), 0.0).abs().sum() > 0


def test_p_one_keeps_only_the_minimum():
    x = torch.tensor([[3.0, 1.0, 2.0, 1.0]])
    assert torch.equal(max_dropout(x, 1.0), torch.tensor([[0.0, 1.0, 0.0, 1.0]]))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.3", None, True])
def test_bad_p_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match=r"p must"):
        MaxDropout(bad)
    with pytest.raises(ValueError, match=r"p must"):
        max_dropout(torch.randn(2, 3), bad)


def test_unknown_scope_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown scope 'batch'.*'tensor'.*'sample'.*'channel'"):
        MaxDropout(0.3, scope="batch")


def test_scope_that_does_not_fit_the_rank():
    with pytest.raises(ValueError, match=r"scope 'channel' needs an input with at least 3 dims.*2-dim"):
        MaxDropout(0.3, scope="channel")(torch.randn(4, 10))
    with pytest.raises(ValueError, match=r"scope 'sample'.*1-dim"):
        max_dropout(torch.randn(10), 0.3, "sample")
    with pytest.raises(ValueError, match=r"MaxDropoutV2 expects an \(N, C, H, W\) input, got shape \(4, 10\)"):
        MaxDropoutV2()(torch.randn(4, 10))


@pytest.mark.parametrize("scope", ["tensor", "sample", "channel"])
def test_constant_input_drops_nothing_and_makes_no_nan(scope):
    x = torch.full((2, 3, 4, 4), 2.5)
    y = max_dropout(x, 0.3, scope)
    assert torch.equal(y, x)
    assert torch.equal(max_dropout_v2(x, 0.3), x)


def test_non_finite_scope_drops_nothing_and_creates_no_nan():
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    x[0, 1, 0, 0] = float("inf")
    x[1, 2, 1, 1] = -float("inf")
    for scope in ("tensor", "sample", "channel"):
        y = max_dropout(x, 0.3, scope)
        assert torch.equal(torch.isnan(y), torch.isnan(x))
    # per-sample: the poisoned samples pass through, a clean sample is still regularized
    clean = torch.randn(1, 3, 4, 4)
    y = max_dropout(torch.cat([x, clean]), 0.3, "sample")
    assert torch.equal(y[:2].nan_to_num(), x.nan_to_num())
    assert torch.equal(y[2:], max_dropout(clean, 0.3, "sample"))
    # the authors' code does the same: nothing dropped when the tensor has a NaN/inf
    assert torch.equal(authors_max_dropout(x).nan_to_num(), x.nan_to_num())


def test_empty_tensors():
    for shape in ((0, 10), (0, 3, 4, 4), (2, 0, 4, 4)):
        x = torch.randn(shape)
        for scope in ("tensor", "sample", "channel")[: x.ndim]:
            assert MaxDropout(0.3, scope=scope).train()(x).shape == x.shape
        if x.ndim == 4:
            assert MaxDropoutV2(0.3).train()(x).shape == x.shape


@pytest.mark.parametrize("layer", [MaxDropout(0.3), MaxDropout(0.3, scope="sample"), MaxDropoutV2(0.3)])
def test_gradient_is_zero_on_dropped_and_unchanged_elsewhere(layer):
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    y = layer.train()(x)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    dropped = (y == 0) & (x != 0)
    assert dropped.any()
    assert (x.grad[dropped] == 0).all()
    assert torch.equal(x.grad[~dropped], upstream[~dropped])


def test_gradient_is_finite_where_input_is_inf():
    x = torch.tensor([[1.0, float("inf"), 3.0]], requires_grad=True)
    max_dropout(x, 0.3).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_drop_statistics_count_without_sync():
    layer = MaxDropout(0.3).train()
    x = torch.randn(8, 4, 5, 5)
    y = layer(x)
    expected = int(((y == 0) & (x != 0)).sum())
    assert isinstance(layer.last_dropped, torch.Tensor) and layer.last_dropped.device == x.device
    assert int(layer.last_dropped) == expected and layer.last_seen == x.numel()
    layer(x)
    assert int(layer.dropped_total) == 2 * expected and layer.seen_total == 2 * x.numel()
    layer.eval()(x)  # eval forward does not count
    assert layer.seen_total == 2 * x.numel()
    layer.reset_drop_stats()
    assert layer.dropped_total is None and layer.seen_total is None


def test_v2_drops_whole_spatial_positions_from_the_channel_sum():
    x = torch.rand(3, 5, 6, 6)
    layer = MaxDropoutV2(0.3).train()
    y = layer(x)
    summed = x.sum(1)
    for n in range(3):
        s = summed[n]
        z = (s - s.min()) / (s.max() - s.min())
        expected_mask = z > (1 - 0.3)
        assert expected_mask.any()
        assert (y[n][:, expected_mask] == 0).all()
        assert torch.equal(y[n][:, ~expected_mask], x[n][:, ~expected_mask])
    assert int(layer.last_dropped) == int((y == 0).sum()) and layer.last_seen == x.numel()


def test_every_scope_is_documented_and_accepted():
    assert set(SCOPES) == {"tensor", "sample", "channel", "global"}
    # without a process group, "global" is the tensor scope
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(max_dropout(x, 0.3, "global"), max_dropout(x, 0.3, "tensor"))


def test_extra_repr():
    assert repr(MaxDropout(0.3)) == "MaxDropout(p=0.3, scope='tensor')"
    assert "active_in_eval=True" in repr(MaxDropout(0.2, scope="sample", active_in_eval=True))
    assert repr(MaxDropoutV2(0.5)) == "MaxDropoutV2(p=0.5)"


def test_each_instance_is_an_independent_module():
    net = nn.Sequential(MaxDropout(0.3), nn.Linear(4, 4), MaxDropout(0.3))
    net.train()(torch.randn(2, 4))
    assert net[0].last_dropped is not net[2].last_dropped


@pytest.mark.parametrize("layer_cls,kwargs", [(MaxDropout, {}), (MaxDropout, {"scope": "sample"}), (MaxDropoutV2, {})])
def test_torch_compile_parity_forward_backward_and_stats(layer_cls, kwargs):
    eager = layer_cls(0.3, **kwargs).train()
    compiled = torch.compile(layer_cls(0.3, **kwargs).train(), backend="aot_eager", fullgraph=True)
    x1 = torch.randn(8, 4, 6, 6, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = eager(x1), compiled(x2)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert int(compiled.last_dropped) == int(eager.last_dropped)


def test_compiled_layer_is_not_recompiled_as_its_counters_grow():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    layer = MaxDropout(0.3).train()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    counts = []
    for _ in range(6):
        x = torch.randn(8, 4, 6, 6)
        compiled(x)
        counts.append(int(layer.last_dropped))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames <= 2, f"{frames} graphs compiled for 6 calls of one shape"  # first call, then totals exist
    assert int(layer.seen_total) == 6 * 8 * 4 * 6 * 6 and int(layer.dropped_total) == sum(counts)


@pytest.mark.slow
def test_torch_compile_inductor_parity():
    x = torch.randn(8, 4, 6, 6)
    compiled = torch.compile(MaxDropout(0.3).train(), fullgraph=True)
    assert torch.equal(compiled(x), authors_max_dropout(x, 0.3))
