"""MaxDropout scopes under real DDP: 2 gloo processes on the CPU (one launch runs every scope's case)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maxdrop import MaxDropout, max_dropout_mask
from tests.helpers.net import free_port

# One worker for the module: the 2-process launch (a module fixture) then happens once.
pytestmark = pytest.mark.xdist_group("max_dropout_ddp")


def _two_ranges() -> torch.Tensor:
    torch.manual_seed(0)
    batch = torch.randn(8, 4, 6, 6)
    batch[4:] *= 3  # the two shards have different ranges: local and global scopes disagree
    return batch


def _small() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(6, 3, 5, 5)


CASES = {"global": _two_ranges, "tensor": _two_ranges, "sample": _small, "channel": _small}


def _worker(rank: int, world: int, port: int, batches: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for scope, batch in batches.items():
            shard = batch.chunk(world)[rank].clone().requires_grad_()
            layer = MaxDropout(0.3, scope=scope).train()
            y = layer(shard)
            y.sum().backward()
            out[scope] = {"y": y.detach(), "grad": shard.grad, "dropped": layer.last_dropped}
        torch.save(out, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """Each scope's outputs, gradients and counts on the two ranks, keyed by scope."""
    out = tmp_path_factory.mktemp("max_dropout_ddp")
    batches = {scope: make() for scope, make in CASES.items()}
    mp.start_processes(_worker, args=(2, free_port(), batches, str(out)), nprocs=2, start_method="spawn")
    results = [torch.load(out / f"{r}.pt") for r in range(2)]
    return {scope: [r[scope] for r in results] for scope in CASES}


def test_global_scope_on_two_ranks_equals_one_process_on_the_concatenated_batch(ranks):
    batch, results = _two_ranges(), ranks["global"]
    single = MaxDropout(0.3, scope="tensor").train()(batch)
    assert torch.equal(torch.cat([r["y"] for r in results]), single)
    # gradient: zero where dropped, one elsewhere
    expected_grad = (~max_dropout_mask(batch, 0.3, "tensor")).float()
    assert torch.equal(torch.cat([r["grad"] for r in results]), expected_grad)
    assert sum(int(r["dropped"]) for r in results) == int(max_dropout_mask(batch, 0.3).sum())


def test_tensor_scope_normalizes_each_rank_locally(ranks):
    """Documented behaviour: with scope="tensor", N ranks do not train the one-process model."""
    batch, results = _two_ranges(), ranks["tensor"]
    local = torch.cat([MaxDropout(0.3).train()(s) for s in batch.chunk(2)])
    assert torch.equal(torch.cat([r["y"] for r in results]), local)
    assert not torch.equal(local, MaxDropout(0.3).train()(batch))


@pytest.mark.parametrize("scope", ["sample", "channel"])
def test_per_sample_scopes_do_not_depend_on_the_split(ranks, scope):
    batch = _small()
    assert torch.equal(torch.cat([r["y"] for r in ranks[scope]]), MaxDropout(0.3, scope=scope).train()(batch))
