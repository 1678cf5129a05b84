"""The layers on a CUDA device (marked ``gpu``: skipped without one): the same masks as on the CPU."""

import pytest
import torch

from maxdrop import MaxDropout, MaxDropoutV2, TopDropBlock, TopKDropout

pytestmark = pytest.mark.gpu


def _authors_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The authors' MaxDropout rule, op for op, on x's device (scope: the whole tensor)."""
    z = (x - x.min()) / (x.max() - x.min())
    return z > 1 - p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_max_dropout_on_cuda_drops_what_the_authors_ops_drop_there(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, 12, 12, generator=g).to("cuda", dtype)
    layer = MaxDropout(0.3).train()
    y = layer(x)
    mask = _authors_mask(x, 0.3)
    assert torch.equal(y == 0, mask | (x == 0))
    assert int(layer.last_dropped) == int(mask.sum())


@pytest.mark.parametrize(
    "layer",
    [MaxDropout(0.3, scope="sample"), MaxDropout(0.3, scope="channel"), MaxDropoutV2(0.3), TopKDropout(0.3),
     TopKDropout(0.3, scope="tensor"), TopDropBlock(0.33)],
    ids=repr,
)  # fmt: skip
def test_cuda_output_and_counts_equal_the_cpu_ones(layer):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 10, 10, generator=g)
    layer.train()
    y_cpu, dropped_cpu = layer(x), int(layer.last_dropped)
    y_cuda = layer.to("cuda")(x.cuda())
    assert y_cuda.device.type == "cuda" and layer.last_dropped.device.type == "cuda"
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=0, atol=0)
    assert int(layer.last_dropped) == dropped_cpu
