"""DTensor / FSDP2 support: local shards, sharded state and the block-sum all-reduce.

FSDP2 (``torch.distributed.fsdp.fully_shard``; ``torch.distributed._composable.fsdp`` before
torch 2.6) turns every parameter into a ``DTensor`` sharded on dim 0 over a 1-D device mesh:
rank ``r`` holds rows ``[lo_r, hi_r)`` (``torch.chunk`` sizes). The optimizer works on the
local shards (``to_local()``) in place:

* ``rows`` blocks are whole on one rank: their sums stay local, and their
  ``exp_avg_sq`` is a DTensor ``(rows,)`` sharded on dim 0 like the rows.
* every other block may span ranks (a head cut by the shard boundary, a norm
  weight under ``tensor``, a column block). Each rank sums the squares of its
  part (zeros for blocks it does not hold); one ``all_reduce(SUM)`` per mesh and
  step adds them up for every such tensor, cut or not, and the mean
  divides by the full block size from the partition (the element counts are
  static, so they need no communication). Their ``exp_avg_sq`` is a replicated
  DTensor ``(num_blocks,)``, updated identically on every rank.
* ``elements`` state is sharded exactly like the parameter (plain AdamW).

The world size always comes from the mesh's process group, never from the GPU count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch 2.4 (DTensor still private), or no distributed
    try:
        from torch.distributed._tensor import DTensor, Replicate, Shard
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
    except ImportError:
        DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (shares storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(p: torch.Tensor) -> bool:
    """True for a DTensor sharded over its mesh (the same answer on every rank)."""
    return is_dtensor(p) and any(isinstance(pl, Shard) for pl in p.placements)


def row_range(p: torch.Tensor, name: str) -> tuple[int, int]:
    """``(lo, hi)``: the rows of dim 0 this rank holds.

    Raises:
        NotImplementedError: for meshes with more than one dim or shards on dims other than 0.
    """
    if not is_dtensor(p):
        return 0, (p.shape[0] if p.ndim else 1)
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or not all(isinstance(pl, (Shard, Replicate)) for pl in placements):
        raise NotImplementedError(
            f"parameter {name!r}: AdamMini supports DTensors on a 1-D mesh sharded on dim 0 "
            f"(FSDP2) or replicated, not placements {placements} on a {mesh.ndim}-D mesh"
        )
    pl = placements[0]
    if isinstance(pl, Replicate):
        return 0, (p.shape[0] if p.ndim else 1)
    if pl.dim != 0:
        raise NotImplementedError(
            f"parameter {name!r} is sharded on dim {pl.dim}; AdamMini needs dim-0 sharding (FSDP2)"
        )
    shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    lo = offset[0] if shape[0] else 0
    return lo, lo + shape[0]


def state_like(
    p: torch.Tensor, local_tensor: torch.Tensor, global_len: int, sharded: bool
) -> torch.Tensor:
    """Wrap a 1-D state tensor as a DTensor on ``p``'s mesh (sharded on dim 0 or replicated)."""
    if not is_dtensor(p):
        return local_tensor
    placements = [Shard(0)] if sharded and isinstance(p.placements[0], Shard) else [Replicate()]
    return DTensor.from_local(
        local_tensor,
        p.device_mesh,
        placements,
        run_check=False,
        shape=torch.Size([global_len]),
        stride=(1,),
    )


def all_reduce_sums(
    sums: list[torch.Tensor], sum_meshes: list, meshes: list, nonfinite: float
) -> float:
    """In-place ``all_reduce(SUM)`` of every ``sums[i]`` over ``sum_meshes[i]``'s group.

    One collective per distinct mesh in ``meshes``: that mesh's vectors are
    concatenated with this rank's count of non-finite gradient entries, reduced,
    and copied back. Returns the non-finite count summed over the ranks, so that
    every rank takes the same decision about a step with NaN/Inf gradients.
    """
    total = 0.0
    distinct: dict[int, object] = {}
    for mesh in meshes:
        distinct.setdefault(id(mesh), mesh)
    for key, mesh in distinct.items():
        idx = [i for i, m in enumerate(sum_meshes) if id(m) == key]
        parts = [sums[i].reshape(-1).to(torch.float64) for i in idx]
        flat = torch.cat([*parts, torch.tensor([nonfinite], dtype=torch.float64)])
        flat = flat.to(mesh.device_type)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.get_group())
        pos = 0
        for i in idx:
            n = sums[i].numel()
            sums[i].copy_(flat[pos : pos + n])
            pos += n
        total += float(flat[-1])
    return total
