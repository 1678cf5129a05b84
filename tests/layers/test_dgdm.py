"""DualAttentionDropBlock (DGDM): CAGD and SAGD rules on hand-made inputs, the layer against a transcription."""

import pytest
import torch
import torch.nn.functional as F

from maxdrop import ADL, DualAttentionDropBlock, dual_attention_drop_block
from maxdrop.layers import adl_drop_mask, cagd_channel_mask, sagd_block_mask
from tests.helpers.layers import DTYPES, assert_module_and_function_reject
from tests.helpers.references import dgdm_reference


def channel_map(means: list[float]) -> torch.Tensor:
    """(1, C, 2, 2) input whose channel c is constant means[c]."""
    return torch.tensor(means).reshape(1, -1, 1, 1).expand(1, len(means), 2, 2).clone()


def test_cagd_drops_only_top_k_channels_whose_number_is_below_the_rate():
    x = channel_map([1.0, 4.0, 3.0, 2.0])  # ranking: 1, 2, 3, 0
    u = torch.tensor([[0.0, 0.1, 0.9, 0.0]])
    mask = cagd_channel_mask(x, top_k_ratio=0.5, channel_drop_rate=0.5, uniforms=u)
    assert mask.shape == (1, 4, 1, 1) and mask.dtype == torch.bool
    assert mask.flatten().tolist() == [False, True, False, False]  # 0 and 3 are low-valued: always kept
    assert cagd_channel_mask(x, 1.0, 0.5, u).flatten().tolist() == [True, True, False, True]
    assert not cagd_channel_mask(x, 0.5, 0.0, u).any()
    assert cagd_channel_mask(x, 0.5, 1.0, u).flatten().tolist() == [False, True, True, False]


def test_cagd_ties_rank_the_lower_index_first_and_k_rounds_half_to_even():
    x = channel_map([2.0, 2.0, 1.0, 1.0])
    u = torch.zeros(1, 4)
    assert cagd_channel_mask(x, 0.25, 1.0, u).flatten().tolist() == [True, False, False, False]
    assert not cagd_channel_mask(x, 0.125, 1.0, u).any()  # k = round(0.5) = 0
    assert cagd_channel_mask(x, 0.375, 1.0, u).flatten().tolist() == [True, True, False, False]  # round(1.5) = 2


def test_cagd_ranks_each_sample_on_its_own():
    x = torch.cat([channel_map([1.0, 5.0, 2.0]), channel_map([9.0, 0.0, 2.0])])
    mask = cagd_channel_mask(x, 1 / 3, 1.0, torch.zeros(2, 3))
    assert mask[:, :, 0, 0].tolist() == [[False, True, False], [True, False, False]]


def test_sagd_erases_a_centred_square_around_each_seed_clipped_at_the_border():
    x = torch.zeros(1, 2, 5, 5)
    x[0, :, 0, 0] = 10.0  # seed (threshold 8)
    x[0, :, 3, 3] = 9.0  # seed
    x[0, :, 4, 0] = 7.0  # below the threshold
    mask = sagd_block_mask(x, drop_threshold=0.8, block_size=3)[0, 0]
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[0:2, 0:2] = True
    expected[2:5, 2:5] = True
    assert torch.equal(mask, expected)
    assert torch.equal(sagd_block_mask(x, 0.8, 1), adl_drop_mask(x, 0.8))  # block 1 = ADL's drop mask
    # block 5: rows/cols 0-2 around (0, 0), 1-4 around (3, 3); (0, 3), (0, 4), (3, 0), (4, 0) stay
    assert sagd_block_mask(x, 0.8, 5)[0, 0].sum() == 25 - 4


@pytest.mark.parametrize("drop_rate", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("block_size", [1, 3])
def test_layer_equals_the_written_out_rules_with_the_same_draws(drop_rate, block_size):
    x = torch.randn(4, 6, 7, 7, generator=torch.Generator().manual_seed(1)).relu()
    branches = set()
    for seed in range(6):
        y = dual_attention_drop_block(
            x, 0.5, 0.5, drop_rate, 0.7, block_size, generator=torch.Generator().manual_seed(seed)
        )
        ref, use_drop, zeroed = dgdm_reference(
            x, 0.5, 0.5, drop_rate, 0.7, block_size, torch.Generator().manual_seed(seed)
        )
        assert torch.equal(y, ref)
        branches.add(use_drop)
        torch.manual_seed(seed)  # the module draws the same numbers from the default generator
        layer = DualAttentionDropBlock(0.5, 0.5, drop_rate, 0.7, block_size).train()
        assert torch.equal(layer(x), ref) and layer.last_used_drop_mask == use_drop
        assert int(layer.last_dropped) == int(zeroed.sum())
    assert branches == {0.0: {False}, 1.0: {True}}.get(drop_rate, {True, False})


def test_counters_count_each_element_of_the_union_once():
    x = torch.randn(3, 8, 6, 6, generator=torch.Generator().manual_seed(2)) + 5  # no zeros: every drop is visible
    layer = DualAttentionDropBlock(0.5, 0.5, 0.5, 0.8, 3).train()
    seen = set()
    for seed in range(10):
        torch.manual_seed(seed)
        y = layer(x)
        assert int(layer.last_dropped) == int((y == 0).sum()) and layer.last_seen == x.numel()
        seen.add(layer.last_used_drop_mask)
    assert seen == {True, False}


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_shapes_and_gradients(dtype):
    x = (torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0)) + 3).to(dtype).requires_grad_()
    y = dual_attention_drop_block(x, 0.5, 1.0, 1.0, 0.8, 3, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == dtype
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    zeroed = y.detach() == 0
    assert gx.dtype == dtype and (gx[zeroed] == 0).all() and (gx[~zeroed] == 1).all()
    assert zeroed.any() and not zeroed.all()


def test_eval_is_the_identity_unless_active_in_eval_and_draws_nothing():
    x = torch.randn(2, 4, 5, 5)
    torch.manual_seed(0)
    assert DualAttentionDropBlock().eval()(x) is x and dual_attention_drop_block(x, training=False) is x
    first = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(first, torch.rand(1))
    active = DualAttentionDropBlock(drop_rate=1.0, active_in_eval=True).eval()
    assert (active(x) == 0).any() and active.last_dropped is None


def test_extra_repr():
    assert repr(DualAttentionDropBlock()) == (
        "DualAttentionDropBlock(top_k_ratio=0.5, channel_drop_rate=0.25, drop_rate=0.75, drop_threshold=0.8, "
        "block_size=3)"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k_ratio": 2}, r"top_k_ratio must be in \[0, 1\], got 2.0"),
        ({"channel_drop_rate": -1}, r"channel_drop_rate must be in \[0, 1\]"),
        ({"drop_rate": None}, r"drop_rate must be a real number in \[0, 1\], got None"),
        ({"drop_threshold": 1.01}, r"drop_threshold must be in \[0, 1\]"),
        ({"block_size": 4}, r"block_size must be an odd int >= 1 \(a square with a centre\), got 4"),
        ({"block_size": 0}, r"block_size must be an odd int >= 1"),
        ({"block_size": 3.0}, r"block_size must be an odd int >= 1"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    assert_module_and_function_reject(DualAttentionDropBlock, dual_attention_drop_block, kwargs, message)


def test_bad_rank_and_uniforms_shape():
    with pytest.raises(ValueError, match=r"DualAttentionDropBlock expects an \(N, C, H, W\) input, got shape \(2, 3\)"):
        DualAttentionDropBlock().train()(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"uniforms must have shape \(N, C\) = \(1, 4\), got \(4,\)"):
        cagd_channel_mask(torch.ones(1, 4, 2, 2), uniforms=torch.zeros(4))


def test_block_mask_dilation_matches_max_pool_reference_on_random_maps():
    x = torch.randn(3, 5, 9, 11, generator=torch.Generator().manual_seed(5))
    seeds = adl_drop_mask(x, 0.5).float()
    for block in (3, 5):
        ref = F.max_pool2d(F.pad(seeds, [block // 2] * 4, value=0.0), block, stride=1) > 0
        assert torch.equal(sagd_block_mask(x, 0.5, block), ref)


@pytest.mark.parametrize("layer", [ADL(0.5), DualAttentionDropBlock(drop_rate=0.5)], ids=repr)
def test_compiled_layers_equal_eager_with_the_same_draws(layer):
    """ADL and DGDM inside torch.compile: the branch draw breaks the graph, the result stays the eager one."""
    x = torch.randn(4, 6, 8, 8, generator=torch.Generator().manual_seed(0)).relu().requires_grad_()
    eager_x = x.detach().clone().requires_grad_()
    compiled = torch.compile(layer, backend="aot_eager")
    for seed in range(3):
        torch.manual_seed(seed)
        y = compiled(x)
        y.sum().backward()
        torch.manual_seed(seed)
        y_eager = layer(eager_x)
        y_eager.sum().backward()
        assert torch.equal(y, y_eager)
        torch.testing.assert_close(x.grad, eager_x.grad)
