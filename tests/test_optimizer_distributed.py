"""AdamMini under torch.distributed on the CPU (gloo, 2 processes): FSDP2, DCP and DDP.

One spawn runs every case to keep the suite fast. Rule zoo sharded on dim 0 over
2 ranks: ``q`` (12 rows, head_dim 4) has its head 1 cut by the shard boundary,
``q_aligned`` (8 rows, head_dim 4) has each head whole on one rank, ``one`` (1 row)
is all on rank 0, ``emb`` (9 rows) is sharded 5/4, norms, columns, fused heads and
row groups span both ranks. Every rank's copy of a replicated v must equal the
single-process v.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import optimizer
from partition import Partition, PartitionError, TensorBlocks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

SHAPES = {
    "norm": ((7,), "tensor", {}),
    "emb": ((9, 6), "rows", {}),
    "q": ((12, 5), "heads", {"head_dim": 4}),
    "q_aligned": ((8, 5), "heads", {"head_dim": 4}),
    "one": ((1,), "tensor", {}),
    "cols": ((5, 7), "columns", {}),
    "qkv": ((14, 3), "fused_heads", {"head_dim": 2, "sections": [4, 4, 6], "orientation": "rows"}),
    "groups": ((6, 3), "row_groups", {"groups": [1, 0, 1, 2, 0, 2]}),
    "groups_one": ((1, 3), "row_groups", {"groups": [0]}),  # rank 1's shard is empty
    "bias": ((5,), "elements", {}),
}
STEPS, SAVE_AT = 5, 3
HYPER = dict(lr=0.05, betas=(0.9, 0.95), weight_decay=0.1)


class Zoo(nn.Module):
    """One parameter per rule; a smooth nonconvex loss of all of them."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name, (shape, _, _) in SHAPES.items():
            self.register_parameter(
                name, nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
            )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return sum(
            (torch.sin(p * (i + 1) * t) + 0.3 * p.square()).sum()
            for i, p in enumerate(self.parameters())
        )


def zoo_partition() -> Partition:
    return Partition(TensorBlocks(n, s, r, p) for n, (s, r, p) in SHAPES.items())


def step_input(k: int) -> torch.Tensor:
    return torch.tensor(0.5 + 0.1 * k, dtype=torch.float64)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, batch=None) -> None:
    for k in steps:
        opt.zero_grad()
        model(step_input(k)).backward() if batch is None else batch(model, k).backward()
        opt.step()


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc_in = nn.Linear(6, 8, dtype=torch.float64)
        self.fc_out = nn.Linear(8, 3, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(torch.tanh(self.fc_in(x)))


def ddp_batch(model: nn.Module, k: int, rank: int | None = None, world: int = 2) -> torch.Tensor:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    if rank is not None:
        x = x.chunk(world)[rank]
    return model(x).square().mean()


def zoo_grad(name: str, k: int) -> torch.Tensor:
    """A fixed gradient of the zoo tensor ``name`` at step ``k``."""
    seed = 100 * k + list(SHAPES).index(name)
    shape = SHAPES[name][0]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    mesh = init_device_mesh("cpu", (world,))
    part = zoo_partition()
    result = {}

    model = Zoo()
    fully_shard(model, mesh=mesh)
    opt = optimizer.AdamMini(model.named_parameters(), part, **HYPER)
    train(model, opt, range(SAVE_AT))
    ckpt = os.path.join(out, "ckpt")
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=ckpt)
    train(model, opt, range(SAVE_AT, STEPS))
    result["fsdp"] = {n: p.full_tensor() for n, p in model.named_parameters()}
    result["q_v"] = opt.state[model.q]["exp_avg_sq"].full_tensor()
    result["emb_v_local"] = opt.state[model.emb]["exp_avg_sq"].to_local().clone()
    replicated = {  # this rank's own copy of every replicated v
        n: opt.state[p]["exp_avg_sq"].to_local().clone()
        for n, p in model.named_parameters()
        if SHAPES[n][1] not in ("rows", "elements")
    }
    torch.save(replicated, os.path.join(out, f"v_rank{rank}.pt"))

    resumed = Zoo()
    fully_shard(resumed, mesh=mesh)
    opt2 = optimizer.AdamMini(resumed.named_parameters(), part, **HYPER)
    opt2.init_state()
    state = {"model": resumed.state_dict(), "optim": opt2.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    opt2.load_state_dict(state["optim"])
    train(resumed, opt2, range(SAVE_AT, STEPS))
    result["resumed"] = {n: p.full_tensor() for n, p in resumed.named_parameters()}

    helper = Zoo()  # the same resume through optimizer.load_checkpoint
    fully_shard(helper, mesh=mesh)
    dcp.load({"model": helper.state_dict()}, checkpoint_id=ckpt)
    opt4 = optimizer.AdamMini(helper.named_parameters(), part, **HYPER)
    optimizer.load_checkpoint(opt4, ckpt)
    train(helper, opt4, range(SAVE_AT, STEPS))
    result["resumed_helper"] = {n: p.full_tensor() for n, p in helper.named_parameters()}
    other = Partition(  # emb saved with one v per row, loaded as one block
        TensorBlocks(n, s, "tensor" if n == "emb" else r, p) for n, (s, r, p) in SHAPES.items()
    )
    try:
        optimizer.load_checkpoint(optimizer.AdamMini(helper.named_parameters(), other), ckpt)
    except PartitionError as e:
        result["mismatch"] = str(e)

    resharded = Zoo()  # a single-process checkpoint resumed under FSDP2 (DCP reshards)
    fully_shard(resharded, mesh=mesh)
    single = os.path.join(out, "single")
    dcp.load({"model": resharded.state_dict()}, checkpoint_id=single)
    opt5 = optimizer.AdamMini(resharded.named_parameters(), part, **HYPER)
    optimizer.load_checkpoint(opt5, single)
    train(resharded, opt5, range(SAVE_AT, STEPS))
    result["from_single"] = {n: p.full_tensor() for n, p in resharded.named_parameters()}

    # bf16 momentum: every rank rounds its rows as a single process rounds them
    low = Zoo().float()
    fully_shard(low, mesh=mesh)
    opt_low = optimizer.AdamMini(low.named_parameters(), part, momentum_dtype="bf16", **HYPER)
    train(low, opt_low, range(1))
    result["bf16_m"] = {
        n: opt_low.state[p]["exp_avg"].full_tensor() for n, p in low.named_parameters()
    }

    # replicated DTensors (every rank holds the whole tensor and gradient): no block sum may be
    # added up over the ranks
    from torch.distributed.tensor import Replicate, distribute_tensor

    rep = {
        n: nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()]))
        for n, p in Zoo().named_parameters()
    }
    opt_rep = optimizer.AdamMini(list(rep.items()), part, **HYPER)
    for k in range(2):
        for n, p in rep.items():
            p.grad = distribute_tensor(zoo_grad(n, k), mesh, [Replicate()])
        opt_rep.step()
    result["replicated"] = {n: p.full_tensor() for n, p in rep.items()}

    # a 2-D mesh (its second dim of size 1): named, not stepped as if 1-D
    from torch.distributed.tensor import Shard

    mesh2 = init_device_mesh("cpu", (world, 1))
    w = nn.Parameter(distribute_tensor(torch.zeros(4, 2), mesh2, [Shard(0), Replicate()]))
    try:
        optimizer.AdamMini([("w", w)], Partition([TensorBlocks("w", (4, 2), "rows", {})]))
    except NotImplementedError as e:
        result["mesh_2d"] = str(e)

    # a NaN in rank 0's shard only: both ranks skip the step
    skip = Zoo()
    fully_shard(skip, mesh=mesh)
    opt_skip = optimizer.AdamMini(skip.named_parameters(), part, nonfinite="skip", **HYPER)
    skip(step_input(0)).backward()
    if rank == 0:
        skip.emb.grad.to_local()[0, 0] = float("nan")
    opt_skip.step()
    torch.save(opt_skip.skipped_steps, os.path.join(out, f"skipped_rank{rank}.pt"))

    ddp = DDP(Tiny())
    opt3 = optimizer.AdamMini(ddp.named_parameters(), **HYPER, n_heads=1)
    train(ddp, opt3, range(STEPS), batch=lambda m, k: ddp_batch(m, k, rank, world))
    result["ddp"] = {
        n.removeprefix("module."): p.detach().clone() for n, p in ddp.named_parameters()
    }
    if rank == 0:
        torch.save(result, os.path.join(out, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore::partition.PartitionWarning")
def test_fsdp2_dcp_and_ddp_match_single_process(tmp_path):
    model = Zoo()
    opt = optimizer.AdamMini(model.named_parameters(), zoo_partition(), **HYPER)
    train(model, opt, range(SAVE_AT))
    dcp.save(
        {"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=tmp_path / "single"
    )
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)

    model = Zoo()
    opt = optimizer.AdamMini(model.named_parameters(), zoo_partition(), **HYPER)
    train(model, opt, range(STEPS))
    resharded = Zoo()  # the FSDP2 checkpoint of 2 ranks resumed in one process
    state = {"model": resharded.state_dict()}
    dcp.load(state, checkpoint_id=tmp_path / "ckpt")
    resharded.load_state_dict(state["model"])
    opt2 = optimizer.AdamMini(resharded.named_parameters(), zoo_partition(), **HYPER)
    optimizer.load_checkpoint(opt2, tmp_path / "ckpt")
    train(resharded, opt2, range(SAVE_AT, STEPS))
    resumed = dict(resharded.named_parameters())
    for name, p in model.named_parameters():
        for got in (result["fsdp"][name], result["from_single"][name], resumed[name].detach()):
            torch.testing.assert_close(got, p.detach(), rtol=1e-12, atol=1e-14, msg=name)
        assert torch.equal(result["resumed"][name], result["fsdp"][name]), name
        assert torch.equal(result["resumed_helper"][name], result["fsdp"][name]), name
    assert "'emb'" in result["mismatch"] and "(9,)" in result["mismatch"]
    torch.testing.assert_close(result["q_v"], opt.state[model.q]["exp_avg_sq"], rtol=1e-12, atol=0)
    for rank in range(2):
        copies = torch.load(tmp_path / f"v_rank{rank}.pt", weights_only=True)
        assert set(copies) == {
            "norm", "q", "q_aligned", "one", "cols", "qkv", "groups", "groups_one"
        }  # fmt: skip
        for name, v in copies.items():
            expect = opt.state[getattr(model, name)]["exp_avg_sq"]
            torch.testing.assert_close(v, expect, rtol=1e-12, atol=0, msg=f"{name} rank {rank}")
    assert result["q_v"].shape == (3,)  # replicated: one entry per head, head 1 cut by the shard
    torch.testing.assert_close(
        result["emb_v_local"], opt.state[model.emb]["exp_avg_sq"][:5], rtol=1e-12, atol=0
    )

    low = Zoo().float()
    opt = optimizer.AdamMini(
        low.named_parameters(), zoo_partition(), momentum_dtype="bf16", **HYPER
    )
    train(low, opt, range(1))
    for name, p in low.named_parameters():
        assert torch.equal(result["bf16_m"][name], opt.state[p]["exp_avg"]), name

    plain = dict(Zoo().named_parameters())
    opt = optimizer.AdamMini(list(plain.items()), zoo_partition(), **HYPER)
    for k in range(2):
        for n, p in plain.items():
            p.grad = zoo_grad(n, k)
        opt.step()
    for name, p in plain.items():
        torch.testing.assert_close(result["replicated"][name], p.detach(), rtol=1e-12, atol=0)
    for rank in range(2):
        assert torch.load(tmp_path / f"skipped_rank{rank}.pt") == 1, rank
    assert "'w'" in result["mesh_2d"] and "1-D mesh" in result["mesh_2d"]

    tiny = Tiny()
    opt = optimizer.AdamMini(tiny.named_parameters(), **HYPER, n_heads=1)
    train(tiny, opt, range(STEPS), batch=ddp_batch)
    for name, p in tiny.named_parameters():
        torch.testing.assert_close(
            result["ddp"][name], p.detach(), rtol=1e-12, atol=1e-14, msg=name
        )


class Normed(nn.Module):
    """Names the official Adam_mini sorts as MLP (``mlp``), output (``lm_head``), Adam
    (``bias``) and, for ``norm.weight``, its whole-tensor case with a 0-dim ``vmean``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mlp = nn.Linear(6, 8, dtype=torch.float64)
        self.norm = nn.LayerNorm(8, dtype=torch.float64)
        self.lm_head = nn.Linear(8, 3, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(torch.tanh(self.mlp(x))))


def _full_state_dict_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from adam_mini import Adam_mini
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    full = StateDictOptions(full_state_dict=True)
    makers = {
        "ours": lambda m: optimizer.AdamMini(m.named_parameters(), **HYPER, n_heads=1),
        "official": lambda m: Adam_mini(
            m.named_parameters(), **HYPER, dim=8, n_heads=1, verbose=False
        ),
    }
    result = {}
    for name, make in makers.items():
        model = Normed()
        fully_shard(model, mesh=mesh)
        opt = make(model)
        train(model, opt, range(SAVE_AT), batch=ddp_batch)
        ckpt = os.path.join(out, name)
        osd = get_optimizer_state_dict(model, opt, options=full)
        dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=ckpt)
        train(model, opt, range(SAVE_AT, STEPS), batch=ddp_batch)

        resumed = Normed()
        fully_shard(resumed, mesh=mesh)
        opt2 = make(resumed)
        state = {
            "model": get_model_state_dict(resumed),
            "optim": get_optimizer_state_dict(resumed, opt2, options=full),
        }
        dcp.load(state, checkpoint_id=ckpt)
        set_model_state_dict(resumed, state["model"])
        set_optimizer_state_dict(resumed, opt2, state["optim"], options=full)
        v = opt2.state[resumed.norm.weight]["exp_avg_sq" if name == "ours" else "vmean"]
        result[f"{name}_v_type"] = type(v).__name__
        try:
            train(resumed, opt2, range(SAVE_AT, STEPS), batch=ddp_batch)
        except Exception as e:  # the official step: a DTensor in-place op on a plain tensor
            frames = traceback.extract_tb(e.__traceback__)
            result[name] = [f.line for f in frames if f.filename.endswith("adam_mini.py")]
        else:
            result[name] = max(
                (a.full_tensor() - b.full_tensor()).abs().max().item()
                for a, b in zip(resumed.parameters(), model.parameters(), strict=True)
            )
    if rank == 0:
        torch.save(result, os.path.join(out, "full.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_official_adam_mini_fails_a_full_state_dict_resume_under_fsdp2(tmp_path):
    """FSDP2 + DCP with ``StateDictOptions(full_state_dict=True)``: the loader turns every 0-dim
    tensor into a plain CPU tensor (``_distribute_state_dict``, meant for ``step``). The official
    Adam_mini 1.1.1 keeps a whole tensor's v as a 0-dim DTensor (``vmean`` of ``norm.weight``,
    from ``torch.sum(p * p)``), so its first step after the resume fails at
    ``state["vmean"].mul_(beta2).add_(tmp_lr, ...)`` (plain tensor += DTensor). AdamMini keeps
    v with one entry per block, shape ``(1,)``: it comes back a DTensor and the resumed run is
    the uninterrupted one bit for bit."""
    pytest.importorskip("adam_mini")
    mp.spawn(_full_state_dict_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "full.pt", weights_only=True)
    assert result["ours_v_type"] == "DTensor" and result["ours"] == 0.0
    assert result["official_v_type"] == "Tensor"
    assert isinstance(result["official"], list), result["official"]  # it raised
    assert result["official"][-1:] == ['state["vmean"].mul_(beta2).add_(tmp_lr, alpha=1 - beta2)']
