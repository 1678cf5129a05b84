"""TopKDropout's global scope under real DDP: 2 gloo processes on the CPU drop what one process drops."""

import importlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maxdrop import TopKDropout, top_k_dropout_mask
from tests.helpers.net import free_port


def batches() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(8, 4, 6, 6, generator=g)
    spread[4:] *= 3  # the two shards have different distributions: local and global top-k disagree
    return {
        "spread": spread,
        "relu": spread.relu(),
        "ties": torch.randint(-2, 3, (8, 3, 5, 5), generator=g).float(),
        "uneven": torch.randn(7, 3, 5, 5, generator=g),  # shards of 4 and 3 samples
        "half": spread.half(),
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    impl = importlib.import_module("maxdrop.layers.top_k_dropout")
    try:
        out = {}
        for name, batch in batches().items():
            for rate in (0.3, 0.8):
                for rescale in (False, True):
                    shard = batch.chunk(world)[rank].clone().requires_grad_()
                    layer = TopKDropout(rate, scope="global", rescale=rescale).train()
                    y = layer(shard)
                    y.float().sum().backward()
                    out[(name, rate, rescale)] = (y.detach(), shard.grad, layer.last_dropped)
        impl._Z_FLAT = torch.zeros(2, dtype=torch.float64)  # pivots that always miss: the widening path
        out["widened"] = TopKDropout(0.3, scope="global").train()(batches()["relu"].chunk(world)[rank])
        torch.save(out, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_scope_on_two_ranks_equals_one_process_on_the_concatenated_batch(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for name, batch in batches().items():
        for rate in (0.3, 0.8):
            for rescale in (False, True):
                x = batch.clone().requires_grad_()
                single = TopKDropout(rate, scope="tensor", rescale=rescale).train()
                expected = single(x)
                expected.float().sum().backward()
                key = (name, rate, rescale)
                assert torch.equal(torch.cat([r[key][0] for r in results]), expected.detach()), key
                assert torch.equal(torch.cat([r[key][1] for r in results]), x.grad), key
                assert sum(int(r[key][2]) for r in results) == int(single.last_dropped), key
    relu = batches()["relu"]
    expected = relu.masked_fill(top_k_dropout_mask(relu, 0.3, "tensor"), 0)
    assert torch.equal(torch.cat([r["widened"] for r in results]), expected)
    shard_mask = torch.cat([top_k_dropout_mask(s, 0.3, "tensor") for s in batches()["spread"].chunk(2)])
    assert not torch.equal(shard_mask, top_k_dropout_mask(batches()["spread"], 0.3, "tensor"))
