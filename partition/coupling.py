"""Block coupling: the Frobenius mass of every block pair of a Hessian over a candidate partition."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from partition.core import Partition
from partition.errors import PartitionError


@dataclass(frozen=True, eq=False)
class BlockCoupling:
    r"""How strongly the blocks of a candidate partition are coupled by the Hessian.

    .. math::
        \text{mass}[a, b] = \lVert H_{ab} \rVert_F^2 = \sum_{i \in a,\, j \in b} H_{ij}^2,
        \qquad r_\text{diag} = \frac{\sum_a \text{mass}[a, a]}{\sum_{a, b} \text{mass}[a, b]}.

    ``r_diag = 1`` for an exactly block-diagonal Hessian. Measured by ``hessian.block_coupling``
    (or :meth:`from_dense` for a small dense Hessian); consumed by :func:`partition.derive`.

    Attributes:
        partition: the candidate partition the masses are over (global block order).
        mass: ``(B, B)`` symmetric non-negative array, ``B = partition.num_blocks``.
        stderr: ``(B, B)`` standard errors of ``mass``, or ``None`` when exact.
        exact: whether ``mass`` is exact (dense Hessian) rather than estimated.
        num_samples: number of random probes behind the estimate (0 when exact).
        r_diag_null: ``r_diag`` of a random partition with the same block sizes (filled by hessian).
        r_diag_stderr: standard error of an estimated ``r_diag`` (the ratio estimator's,
            from the rounds' diagonal and total masses), or ``None`` when exact.
    """

    partition: Partition
    mass: np.ndarray
    stderr: np.ndarray | None = None
    exact: bool = True
    num_samples: int = 0
    r_diag_null: float | None = None
    r_diag_stderr: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.partition, Partition):
            raise PartitionError(
                f"BlockCoupling.partition must be a Partition, got {type(self.partition).__name__}"
            )
        b = self.partition.num_blocks
        mass = _real_array(self.mass, "mass")
        if mass.shape != (b, b):
            raise PartitionError(
                f"BlockCoupling.mass has shape {mass.shape}; the partition has {b} blocks, "
                f"so it must be ({b}, {b})"
            )
        if not np.all(np.isfinite(mass)):
            raise PartitionError("BlockCoupling.mass has non-finite entries")
        if (mass < 0).any():
            raise PartitionError(
                f"BlockCoupling.mass has a negative entry ({mass.min():.3g}); masses are squared "
                "Frobenius norms ||H_ab||_F^2 >= 0"
            )
        scale = float(np.abs(mass).max(initial=0.0))
        if not np.allclose(mass, mass.T, rtol=1e-6, atol=1e-12 * scale):
            raise PartitionError("BlockCoupling.mass must be symmetric (mass[a, b] = mass[b, a])")
        object.__setattr__(self, "mass", mass)
        if self.stderr is not None:
            stderr = _real_array(self.stderr, "stderr")
            if stderr.shape != (b, b):
                raise PartitionError(
                    f"BlockCoupling.stderr has shape {stderr.shape}; expected ({b}, {b}) or None"
                )
            if not np.all(np.isfinite(stderr)) or (stderr < 0).any():
                raise PartitionError(
                    "BlockCoupling.stderr must hold finite standard errors >= 0; pass None when "
                    "the masses are exact"
                )
            object.__setattr__(self, "stderr", stderr)
        self._check_scalars()

    def _check_scalars(self) -> None:
        """A PartitionError naming the first of ``exact``, ``num_samples``, ``r_diag_null`` and
        ``r_diag_stderr`` that is out of its range."""
        if not isinstance(self.exact, (bool, np.bool_)):
            raise PartitionError(f"BlockCoupling.exact must be True or False, got {self.exact!r}")
        n = self.num_samples
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
            raise PartitionError(
                f"BlockCoupling.num_samples must be an int >= 0 (0 when exact), got {n!r}"
            )
        for field, value, top in (
            ("r_diag_null", self.r_diag_null, 1.0),
            ("r_diag_stderr", self.r_diag_stderr, math.inf),
        ):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if value is not None and not (ok and math.isfinite(value) and 0 <= value <= top + 1e-9):
                bound = "in [0, 1]" if top == 1.0 else ">= 0 and finite"
                raise PartitionError(
                    f"BlockCoupling.{field} must be None or a number {bound}, got {value!r}"
                )

    @property
    def r_diag(self) -> float:
        """Share of the Frobenius mass on diagonal blocks: ``trace(mass) / sum(mass)``."""
        total = float(self.mass.sum())
        return float(np.trace(self.mass)) / total if total > 0 else 1.0

    @property
    def tensor_slices(self) -> dict[str, slice]:
        """Global block range of every tensor of the candidate partition."""
        part = self.partition
        return {n: slice(part.offset(n), part.offset(n) + part[n].num_blocks) for n in part.names}

    @classmethod
    def from_dense(cls, partition: Partition, hessian: np.ndarray | torch.Tensor) -> BlockCoupling:
        """Exact coupling of a dense ``(n, n)`` Hessian whose coordinates are the parameters in
        ``partition.names`` order, each flattened row-major (``torch.cat`` of ``p.reshape(-1)``)."""
        t = torch.as_tensor(hessian)
        if t.is_complex():
            raise PartitionError(
                f"dense Hessian is complex ({t.dtype}); a Hessian of a real loss is real: pass its "
                "real part"
            )
        h = np.asarray(t.detach().cpu().to(torch.float64))
        n = partition.num_params
        if h.shape != (n, n):
            raise PartitionError(
                f"dense Hessian has shape {h.shape}; the partition has {n} parameters"
            )
        ids = (
            np.concatenate(
                [partition.block_index(name).reshape(-1).numpy() for name in partition.names]
            )
            if len(partition)
            else np.zeros(0, dtype=np.int64)
        )
        b = partition.num_blocks
        onehot = np.zeros((n, b))
        onehot[np.arange(n), ids] = 1.0
        mass = onehot.T @ (h * h) @ onehot
        return cls(partition, 0.5 * (mass + mass.T), None, True, 0)


def _real_array(value: object, field: str) -> np.ndarray:
    """``value`` as a float64 array, or a PartitionError naming ``BlockCoupling.<field>``."""
    if np.iscomplexobj(value):
        raise PartitionError(f"BlockCoupling.{field} must be real, got a complex array")
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PartitionError(
            f"BlockCoupling.{field} must be an array of numbers, got {type(value).__name__} ({exc})"
        ) from None
