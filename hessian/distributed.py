"""The torch.distributed glue of the Hessian operator: sample counts and summed products.

Under an initialized process group every rank holds its own data shard. The operator is the
Hessian of the global loss :math:`L = \\frac{1}{N}\\sum_r \\sum_{b \\in r} n_b L_b` with
:math:`N = \\sum_r N_r`, so each rank weights its local batch products by ``n_b / N`` and one
``all_reduce(SUM)`` per product gives every rank the same ``H v``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialized with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place, returned); the identity without a process group."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def global_count(local: int) -> int:
    """The total sample count over all ranks."""
    if not is_distributed():
        return int(local)
    t = torch.tensor([float(local)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    all_reduce_sum(t)
    return int(round(t.item()))
