"""Two gloo processes with their own ragged shards see the Hessian of the global mean loss."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hessian import HessianOperator


def make_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(11, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=g)
    # rank 0: batches of 3 and 4 samples; rank 1: batches of 1 and 3 samples
    shards = [[(X[:3], y[:3]), (X[3:7], y[3:7])], [(X[7:8], y[7:8]), (X[8:], y[8:])]]
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=g, dtype=torch.float64)
    return model, X, y, shards, V


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, _, _, shards, V = make_problem()
        for reduction in ("mean", "sum"):
            H = HessianOperator(model, loss_fn, shards[rank], reduction=reduction, mode="reverse")
            torch.save(
                {
                    "matmat": H.matmat(V),
                    "matvec": H @ V[:, 0],
                    "dense": H.to_dense(),
                    "num_samples": H.num_samples,
                },
                os.path.join(out_dir, f"{reduction}_{rank}.pt"),
            )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_ranks_equal_one_process_on_all_data(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    model, X, y, _, V = make_problem()
    for reduction in ("mean", "sum"):
        H = HessianOperator(model, loss_fn, (X, y), reduction=reduction)
        ref = H.to_dense()
        for rank in range(2):
            got = torch.load(tmp_path / f"{reduction}_{rank}.pt")
            assert got["num_samples"] == 11
            assert (got["dense"] - ref).abs().max() < 1e-12
            assert (got["matmat"] - ref @ V).abs().max() < 1e-12
            assert (got["matvec"] - ref @ V[:, 0]).abs().max() < 1e-12
