"""MaxDropout scopes under real DDP: 2 gloo processes on the CPU."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maxdrop import MaxDropout, max_dropout_mask
from tests.helpers.net import free_port


def _worker(rank: int, world: int, port: int, batch: torch.Tensor, scope: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = batch.chunk(world)[rank].clone().requires_grad_()
        layer = MaxDropout(0.3, scope=scope).train()
        y = layer(shard)
        y.sum().backward()
        torch.save({"y": y.detach(), "grad": shard.grad, "dropped": layer.last_dropped}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(batch, scope, tmp_path, world=2):
    mp.start_processes(
        _worker, args=(world, free_port(), batch, scope, str(tmp_path)), nprocs=world, start_method="spawn"
    )
    return [torch.load(tmp_path / f"{r}.pt") for r in range(world)]


def test_global_scope_on_two_ranks_equals_one_process_on_the_concatenated_batch(tmp_path):
    torch.manual_seed(0)
    batch = torch.randn(8, 4, 6, 6)
    batch[4:] *= 3  # the two shards have different ranges: local and global scopes disagree
    results = _run(batch, "global", tmp_path)
    single = MaxDropout(0.3, scope="tensor").train()(batch)
    assert torch.equal(torch.cat([r["y"] for r in results]), single)
    # gradient: zero where dropped, one elsewhere
    expected_grad = (~max_dropout_mask(batch, 0.3, "tensor")).float()
    assert torch.equal(torch.cat([r["grad"] for r in results]), expected_grad)
    assert sum(int(r["dropped"]) for r in results) == int(max_dropout_mask(batch, 0.3).sum())


def test_tensor_scope_normalizes_each_rank_locally(tmp_path):
    """Documented behaviour: with scope="tensor", N ranks do not train the one-process model."""
    torch.manual_seed(0)
    batch = torch.randn(8, 4, 6, 6)
    batch[4:] *= 3
    results = _run(batch, "tensor", tmp_path)
    local = torch.cat([MaxDropout(0.3).train()(s) for s in batch.chunk(2)])
    assert torch.equal(torch.cat([r["y"] for r in results]), local)
    assert not torch.equal(local, MaxDropout(0.3).train()(batch))


@pytest.mark.parametrize("scope", ["sample", "channel"])
def test_per_sample_scopes_do_not_depend_on_the_split(tmp_path, scope):
    torch.manual_seed(1)
    batch = torch.randn(6, 3, 5, 5)
    results = _run(batch, scope, tmp_path)
    assert torch.equal(torch.cat([r["y"] for r in results]), MaxDropout(0.3, scope=scope).train()(batch))
