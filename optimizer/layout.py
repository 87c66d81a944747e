"""Block layouts: how one tensor's blocks sit in memory, as strided views.

A :class:`partition.TensorBlocks` says which block every entry belongs to. The
optimizer needs the same information in a form it can reduce and broadcast over
without index tensors: a list of :class:`Run` s, each a run of ``n`` equal-size
blocks that is a plain view of the (local) tensor:

* ``flat`` run: entries ``[start, stop)`` of the row-major flattened tensor,
  viewed as ``(n, L)``; block ``block_start + k`` is row ``k`` of that view.
  Rules ``tensor``, ``rows``, ``heads`` and ``fused_heads`` (rows orientation)
  are made of flat runs.
* ``cols`` run: columns ``[start, stop)`` of the tensor viewed as ``(R, C)``,
  viewed as ``(R, n, w)``; block ``block_start + k`` is ``[:, k, :]``. Rules
  ``columns`` and ``fused_heads`` (columns orientation) are made of column runs.

``row_groups`` is kept as a per-row id vector (``row_ids``) and ``elements``
needs no layout (it is plain AdamW). Layouts are derived from the rule itself,
never from ``local_index()``, so building one costs nothing even for a 7B model.

Under FSDP2 a rank holds rows ``[row_lo, row_hi)`` of a tensor sharded on dim 0;
:func:`layout_of` then describes only the local rows. Unless the rule keeps v
with the rows (``rows``), v is replicated: every rank all-reduces its partial
block sums (zeros for blocks it does not hold) before the update, so all copies
of v stay equal (see :mod:`optimizer.distributed`). The decision depends only on
the sharding, never on where this rank's shard happens to cut a block, so all
ranks join the same collectives. The mean always divides by the full block size
(``block_sizes``), so a block cut by a shard gets exactly the value an unsharded
run would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from partition import PartitionError, TensorBlocks

LOCAL_RULES = frozenset({"rows"})  # rules whose v lives with the rows of a dim-0 shard


@dataclass(frozen=True)
class Run:
    """``n`` consecutive equal-size blocks that form one view of the local tensor."""

    kind: str  # "flat" | "cols"
    block_start: int  # tensor-local id of the first block of the run
    n: int  # number of blocks in the run
    start: int  # flat offset (flat) or first column (cols) in the LOCAL tensor
    stop: int

    @property
    def width(self) -> int:
        """Elements of one block along the run's axis (L for flat, w for cols)."""
        return (self.stop - self.start) // self.n


@dataclass(frozen=True)
class BlockLayout:
    """Where a tensor's blocks are in its local shard.

    Attributes:
        rule: the partition rule of the tensor.
        num_blocks: blocks of the whole (unsharded) tensor.
        runs: views covering the local entries (empty for ``elements`` / ``row_groups``).
        block_sizes: float64 tensor ``(num_blocks,)``, entries per block in the FULL tensor.
        row_ids: for ``row_groups``, LongTensor ``(local_rows,)`` with the group of each local row.
        row_lo, row_hi: the local rows of dim 0 (``0, shape[0]`` when not sharded).
        reduce_sums: True when the tensor is sharded and v replicated: the block sums
            are all-reduced across ranks (the same on every rank).
    """

    rule: str
    shape: tuple[int, ...]
    num_blocks: int
    runs: tuple[Run, ...]
    block_sizes: torch.Tensor
    row_ids: torch.Tensor | None
    row_lo: int
    row_hi: int
    reduce_sums: bool

    @property
    def local_v(self) -> bool:
        """True when this rank stores only the v entries of its own rows (rule ``rows``)."""
        return self.rule in LOCAL_RULES

    @property
    def v_range(self) -> tuple[int, int]:
        """The tensor-local block ids ``[lo, hi)`` this rank stores v for."""
        if self.local_v:
            return self.row_lo, self.row_hi
        return 0, self.num_blocks


def _full_runs(blocks: TensorBlocks) -> list[tuple[str, int, int]]:
    """Runs of the unsharded tensor as ``(kind, n, width)`` in block order.

    ``width`` is the length of one block along the run axis: flat entries for
    ``flat`` runs, columns for ``cols`` runs.
    """
    shape = tuple(blocks.shape)
    numel = math.prod(shape)
    rows = shape[0] if shape else 1
    per_row = numel // rows if rows else 0
    rule, params = blocks.rule, blocks.params
    if rule == "tensor":
        return [("flat", 1, numel)]
    if rule == "rows":
        return [("flat", rows, per_row)]
    if rule == "heads":
        hd = int(params["head_dim"])
        return [("flat", rows // hd, hd * per_row)]
    if rule == "columns":
        return [("cols", shape[1], 1)]
    if rule == "fused_heads":
        hd = int(params["head_dim"])
        q, k, v = (int(s) for s in params["sections"])
        if params["orientation"] == "rows":
            return [
                ("flat", q // hd, hd * per_row),
                ("flat", k // hd, hd * per_row),
                ("flat", v, per_row),
            ]
        return [("cols", q // hd, hd), ("cols", k // hd, hd), ("cols", v, 1)]
    raise PartitionError(
        f"tensor {blocks.name!r}: the optimizer has no layout for rule {rule!r}; "
        "use one of tensor, rows, heads, columns, fused_heads, row_groups, elements"
    )


def layout_of(
    blocks: TensorBlocks, row_lo: int = 0, row_hi: int | None = None, sharded: bool | None = None
) -> BlockLayout:
    """The :class:`BlockLayout` of ``blocks`` restricted to local rows ``[row_lo, row_hi)``.

    ``sharded`` says whether the tensor is split over ranks (the same answer on every rank);
    by default it is whether ``[row_lo, row_hi)`` misses some rows.
    """
    shape = tuple(blocks.shape)
    rows = shape[0] if shape else 1
    row_hi = rows if row_hi is None else row_hi
    if sharded is None:
        sharded = (row_lo, row_hi) != (0, rows)
    reduce_sums = sharded and blocks.rule not in LOCAL_RULES
    numel = math.prod(shape)
    per_row = numel // rows if rows else 0
    nb = blocks.num_blocks
    if blocks.rule == "elements":
        sizes = torch.ones(0, dtype=torch.float64)  # unused: elements is AdamW
        return BlockLayout("elements", shape, nb, (), sizes, None, row_lo, row_hi, False)
    if blocks.rule == "row_groups":
        groups = torch.as_tensor(list(blocks.params["groups"]), dtype=torch.long)
        sizes = torch.bincount(groups, minlength=nb).to(torch.float64) * per_row
        return BlockLayout(
            "row_groups", shape, nb, (), sizes, groups[row_lo:row_hi], row_lo, row_hi, reduce_sums
        )
    runs: list[Run] = []
    sizes_list: list[torch.Tensor] = []
    first = 0
    flat_pos = 0  # flat offset of the run in the full tensor
    col_pos = 0
    lo, hi = row_lo * per_row, row_hi * per_row  # local flat window
    for kind, n, width in _full_runs(blocks):
        if kind == "flat":
            sizes_list.append(torch.full((n,), float(width), dtype=torch.float64))
            a, b = flat_pos, flat_pos + n * width
            flat_pos = b
            s, e = max(a, lo), min(b, hi)
            if s < e:
                k0, k1 = (s - a) // width, -(-(e - a) // width)  # blocks touched locally
                f0, f1 = -(-(s - a) // width), (e - a) // width  # blocks held whole
                if k0 < f0:  # leading partial block
                    runs.append(Run("flat", first + k0, 1, s - lo, min(a + f0 * width, e) - lo))
                if f1 > f0:
                    runs.append(
                        Run("flat", first + f0, f1 - f0, a + f0 * width - lo, a + f1 * width - lo)
                    )
                if f1 < k1 and not (k1 - 1 == k0 and k0 < f0):  # trailing partial block
                    runs.append(Run("flat", first + f1, 1, a + f1 * width - lo, e - lo))
        else:
            sizes_list.append(torch.full((n,), float(width * rows), dtype=torch.float64))
            if row_hi > row_lo and n:  # an empty section (q of a fused k|v weight) has no run
                runs.append(Run("cols", first, n, col_pos, col_pos + n * width))
            col_pos += n * width
        first += n
    sizes = torch.cat(sizes_list) if sizes_list else torch.zeros(0, dtype=torch.float64)
    return BlockLayout(
        blocks.rule, shape, nb, tuple(runs), sizes, None, row_lo, row_hi, reduce_sums
    )


def run_view(t: torch.Tensor, run: Run) -> torch.Tensor:
    """The view of local tensor ``t`` that ``run`` describes: ``(n, L)`` or ``(R, n, w)``."""
    if run.kind == "flat":
        return t.reshape(-1)[run.start : run.stop].view(run.n, -1)
    rows = t.shape[0]
    return t.reshape(rows, -1)[:, run.start : run.stop].view(rows, run.n, -1)


def run_sumsq(g: torch.Tensor, run: Run) -> torch.Tensor:
    """Sum of squares of every block of ``run`` in ``g``: shape ``(run.n,)``, float32 or float64.

    ``vector_norm(...) ** 2`` reads ``g`` once with no temporary (``(g * g).sum`` and
    ``vecdot`` materialize ``g * g`` on the CPU); it costs one rounding of a sqrt.
    """
    view = run_view(g, run)
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    dims = 1 if run.kind == "flat" else (0, 2)
    return torch.linalg.vector_norm(view, dim=dims, dtype=acc).square_()


def run_scale_view(scale: torch.Tensor, run: Run) -> torch.Tensor:
    """``scale[block_start : block_start + n]`` shaped to broadcast against :func:`run_view`."""
    s = scale[run.block_start : run.block_start + run.n]
    return s.view(run.n, 1) if run.kind == "flat" else s.view(1, run.n, 1)
