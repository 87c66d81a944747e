"""Two gloo processes with their own ragged shards see the Hessian of the global mean loss."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hessian import HessianError, HessianOperator


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


def _edge_worker(rank: int, port: int, out_dir: str) -> None:
    """A rank without samples; an error on one rank; an operator local to rank 0."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        model, X, y, _, _ = make_problem()
        out = {}
        for name, shard in (("empty_batch", (X[11:], y[11:])), ("no_batch", [])):
            data = (X, y) if rank == 0 else shard
            out[name] = HessianOperator(model, loss_fn, data, mode="reverse").to_dense()
        bad = (X.clone(), y)
        if rank == 1:
            bad[0][0, 0] = float("nan")
        try:
            HessianOperator(model, loss_fn, bad) @ torch.zeros(
                sum(p.numel() for p in model.parameters()), dtype=torch.float64
            )
        except HessianError as err:
            out["error"] = str(err)
        if rank == 0:  # the other rank does not take part: no collective may run
            out["local"] = HessianOperator(
                model, loss_fn, (X[:5], y[:5]), distributed=False
            ).to_dense()
        dist.barrier()
        torch.save(out, os.path.join(out_dir, f"edge_{rank}.pt"))
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


@pytest.mark.distributed
def test_empty_shards_errors_on_one_rank_and_local_operators(tmp_path):
    mp.spawn(_edge_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    model, X, y, _, _ = make_problem()
    ref = HessianOperator(model, loss_fn, (X, y)).to_dense()
    local = HessianOperator(model, loss_fn, (X[:5], y[:5])).to_dense()
    for rank in range(2):
        got = torch.load(tmp_path / f"edge_{rank}.pt")
        for name in ("empty_batch", "no_batch"):  # rank 1 holds no sample: rank 0's data alone
            assert (got[name] - ref).abs().max() < 1e-12, (name, rank)
        # rank 1 names its NaN loss; rank 0 learns that rank 1 failed, instead of waiting
        assert (
            "the loss is nan" in got["error"] if rank == 1 else "failed on 1 other" in got["error"]
        )
    assert (torch.load(tmp_path / "edge_0.pt")["local"] - local).abs().max() < 1e-12


def test_a_one_rank_process_group_is_not_distributed(tmp_path):
    """``torchrun --nproc_per_node=1``: the operator is this process's own Hessian, with no
    collective, and ``distributed=True`` asks for a group of more than one rank."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1
    )
    try:
        model, X, y, _, _ = make_problem()
        assert HessianOperator(model, loss_fn, (X, y)).distributed is False
        with pytest.raises(ValueError, match="process group with more than one rank"):
            HessianOperator(model, loss_fn, (X, y), distributed=True)
    finally:
        dist.destroy_process_group()
