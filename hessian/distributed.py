"""The torch.distributed glue of the Hessian operator: sample counts and summed products.

Under an initialized process group every rank holds its own data shard. The operator is the
Hessian of the global loss :math:`L = \\frac{1}{N}\\sum_r \\sum_{b \\in r} n_b L_b` with
:math:`N = \\sum_r N_r`, so each rank weights its local batch products by ``n_b / N`` and one
``all_reduce(SUM)`` per product gives every rank the same ``H v``. A rank may hold no sample.

Every function takes ``enabled``: whether this operator all-reduces at all (an operator built
with ``distributed=False`` is one rank's own Hessian, e.g. a diagnostic on rank 0 only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialized with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place, returned); the identity when not ``enabled``."""
    if enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _summed(values: list[float], enabled: bool) -> list[float]:
    if not enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    return all_reduce_sum(t, enabled).tolist()


def global_count(local: int, enabled: bool) -> int:
    """The total sample count over all ranks."""
    return int(round(_summed([float(local)], enabled)[0]))


def count_failures(failed: bool, enabled: bool) -> int:
    """How many ranks report a failure (every rank must call it at the same point)."""
    return int(round(_summed([float(failed)], enabled)[0]))
