"""TopKDropout's per-row bracket select (long sample / channel rows on the CPU) against a literal
kthvalue transcription: ties, all-equal rows, signed zeros, subnormals, NaN / inf, every dtype,
k = 0 and k = n, and the fallbacks taken when the pivots miss."""

import importlib
import math

import numpy as np
import pytest
import torch

from maxdrop import top_k_dropout, top_k_dropout_mask

topk_impl = importlib.import_module("maxdrop.layers.top_k_dropout")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
RATES = [0.0, 0.01, 0.3, 0.5, 0.7, 0.99, 1.0]


def reference_mask(x: torch.Tensor, rate: float, start_dim: int) -> torch.Tensor:
    """Per row (dims start_dim..): k = round(rate * n); drop the values > the (n - k)-th smallest
    (Python's sort, NaN after every number); k = 0 drops nothing, k = n everything."""
    rows = x.reshape(math.prod(x.shape[:start_dim]), -1).double().tolist()
    mask = []
    for row in rows:
        n = len(row)
        k = round(rate * n)
        if k in (0, n):
            mask.append([k == n] * n)
            continue
        t = sorted(row, key=lambda v: (math.isnan(v), v))[n - k - 1]
        mask.append([v > t for v in row])
    return torch.tensor(mask, dtype=torch.bool).reshape(x.shape)


def rows(seed: int) -> list[tuple[str, torch.Tensor]]:
    """(N, C, H, W) inputs whose sample rows (C*H*W = 3 * 40 * 50 = 6000) take the bracket path."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 40, 50, generator=g)
    signed_zeros = torch.zeros_like(x)
    signed_zeros[..., ::2] = -0.0
    signed_zeros[..., ::3] = torch.rand(x[..., ::3].shape, generator=g)
    subnormal = x.relu() * 1e-39  # float32 subnormals (zero in float16 / bfloat16: ties at 0)
    subnormal[..., ::5] = -1e-42
    nan, inf = x.clone(), x.clone()
    nan[x > 0.8] = math.nan
    inf[x > 0.5], inf[x < -0.5] = math.inf, -math.inf
    mostly_nan, mostly_neg_inf = x.clone(), x.clone()
    mostly_nan[x > -1.0] = math.nan
    mostly_neg_inf[x < 1.0] = -math.inf
    return [
        ("distinct", x),
        ("post-relu", x.relu()),
        ("mostly zeros", (x - 1.0).relu()),
        ("few values", torch.randint(-2, 3, x.shape, generator=g).float()),
        ("all equal", torch.full(x.shape, 1.5)),
        ("signed zeros", signed_zeros),
        ("subnormal", subnormal),
        ("nan", nan),
        ("inf", inf),
        ("mostly nan", mostly_nan),
        ("mostly -inf", mostly_neg_inf),
        ("non-contiguous", torch.randn(3, 6, 40, 100, generator=g)[:, ::2, :, ::2]),
        ("channels_last", x.relu().contiguous(memory_format=torch.channels_last)),
    ]


CASES = rows(0)


@pytest.fixture
def bracket_rows(monkeypatch):
    """Rows of 2048+ elements take the bracket path, with a 256-element subsample."""
    monkeypatch.setattr(topk_impl, "_BRACKET_ROW", 2048)
    monkeypatch.setattr(topk_impl, "_SUB_ROW", 256)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,x", CASES, ids=[c[0] for c in CASES])
def test_bracket_select_equals_the_transcription(bracket_rows, name, x, dtype):
    x = x.to(dtype)
    for rate in RATES:
        assert torch.equal(top_k_dropout_mask(x, rate, "sample"), reference_mask(x, rate, 1)), rate


@pytest.mark.parametrize("z", [0.0, 0.5], ids=["pivots equal", "narrow bracket"])
def test_pivots_that_miss_fall_back_to_an_exact_select(bracket_rows, monkeypatch, z):
    """z = 0: one pivot, so every row misses on one side (threshold below or above it)."""
    monkeypatch.setattr(topk_impl, "_Z_ROW", z)
    for name, x in CASES:
        for rate in (0.01, 0.3, 0.7, 0.99):
            assert torch.equal(top_k_dropout_mask(x, rate, "sample"), reference_mask(x, rate, 1)), (name, rate)


def test_channel_rows_take_the_bracket_path_too(bracket_rows):
    x = torch.randn(2, 3, 50, 60).relu()  # channel rows of 3000 elements
    for rate in (0.3, 0.7):
        assert torch.equal(top_k_dropout_mask(x, rate, "channel"), reference_mask(x, rate, 2)), rate


def test_bracket_select_is_used_and_matches_a_full_sort():
    """At the default sizes a benchmark-like row (64*32*32) is bracketed; the result equals a sort's."""
    row = torch.randn(65536).relu().numpy()
    le, inside = np.empty(row.size, dtype=bool), np.empty(row.size, dtype=bool)
    for r in (1, 100, 32768, 45875, 65535, 65536):
        assert topk_impl._bracket_select(row, r, le, inside) == np.sort(row)[r - 1], r
    x = torch.randn(3, 64, 32, 32).relu()
    assert x[0].numel() >= topk_impl._BRACKET_ROW
    assert torch.equal(top_k_dropout_mask(x, 0.3, "sample"), reference_mask(x, 0.3, 1))


def test_bracket_path_gradient_and_compiled_equal_eager(bracket_rows):
    x = torch.randn(2, 4, 30, 30).relu().requires_grad_()
    y = top_k_dropout(x, 0.3, "sample")
    y.backward(torch.ones_like(y))
    mask = reference_mask(x.detach(), 0.3, 1)
    assert torch.equal(x.grad, (~mask).float())
    compiled = torch.compile(lambda t: top_k_dropout(t, 0.3, "sample"), backend="eager")
    assert torch.equal(compiled(x.detach()), y.detach())
