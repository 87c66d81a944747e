r"""Derive a partition from a measured :class:`~partition.BlockCoupling`.

The candidate partition (usually :func:`partition.by_rows`) splits every tensor into fine blocks
along dim 0. ``derive`` merges candidate blocks **of the same tensor** that the Hessian couples
strongly. Blocks never span tensors because the optimizer keeps ``v`` per tensor, so the Hessian
mass between different tensors stays off-diagonal whatever we do. The criterion is therefore
measured inside each tensor :math:`t`, relative to that tensor's own diagonal block
:math:`H_{tt}` (so a tensor with tiny curvature, e.g. q/k at a small init, is judged by its own
structure, not drowned by the others):

.. math::
    \text{off}_t = \frac{\sum_{A \ne B} M_{AB}}{\sum_{a, b \in t} \text{mass}[a,b]},
    \qquad M_{AB} = \sum_{a \in A, b \in B} \text{mass}[a, b],

where :math:`A, B` run over the current groups of candidate blocks of :math:`t`.

``greedy``
    Agglomerative: repeatedly merge the pair of groups (of one tensor) with the largest
    normalized coupling :math:`c_{AB} = M_{AB} / \sqrt{M_{AA} M_{BB}}` (a cosine-like score,
    invariant to the scale of each block) until :math:`\text{off}_t \le` ``threshold`` or no
    coupled pair is left. Ties break towards the lowest ids, so the result is deterministic.
``spectral``
    For tiny dense Hessians: per tensor, spectral clustering of the graph with edge weights
    :math:`c_{ab}`, where couplings ``<= threshold`` are dropped (noise) and blocks left without
    edges stay alone. The number of clusters is the largest eigengap of the normalized Laplacian
    :math:`L = I - D^{-1/2} W D^{-1/2}` (eigenvalues :math:`\lambda_1 \le \dots`,
    :math:`c = \arg\max_c \lambda_{c+1} - \lambda_c`); the rows of the first :math:`c`
    eigenvectors are assigned by column-pivoted QR (deterministic, no seed). Note that here
    ``threshold`` bounds a normalized coupling, not a mass share.

Per tensor, the merged groups become the simplest rule that states them: ``rows`` (every row
alone; ``elements`` for 1-D), ``tensor`` (one group), ``heads`` (contiguous equal groups), else
``row_groups`` with group ids numbered in order of first appearance. Candidate rules must lay
blocks along dim 0: ``rows``, ``heads``, ``row_groups``, ``tensor``, or ``elements`` on 1-D tensors.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from partition.blocks import TensorBlocks
from partition.core import Partition
from partition.coupling import BlockCoupling
from partition.errors import PartitionError

METHODS = ("greedy", "spectral")
_MERGEABLE = ("rows", "heads", "row_groups", "tensor")


@dataclass
class _TensorGroups:
    """Mutable working state of one tensor during greedy merging."""

    candidate: TensorBlocks
    labels: np.ndarray  # candidate block -> current group id (ids 0..len(mass)-1, compacted)
    mass: np.ndarray  # (G, G) group mass
    best: tuple[float, int, int] = (0.0, -1, -1)

    def refresh(self) -> None:
        g = self.mass
        if len(g) < 2:
            self.best = (0.0, -1, -1)
            return
        d = np.sqrt(np.maximum(np.outer(np.diag(g), np.diag(g)), 1e-300))
        score = np.triu(g / d, k=1)  # masses are >= 0: a pair with no mass scores 0
        flat = int(np.argmax(score))
        a, b = divmod(flat, len(g))
        self.best = (float(score[a, b]), a, b)

    def merge(self, a: int, b: int) -> float:
        """Merge group ``b`` into ``a`` (a < b); return the off-diagonal mass removed."""
        g = self.mass
        removed = 2.0 * g[a, b]
        g[a, :] += g[b, :]
        g[:, a] += g[:, b]
        keep = np.arange(len(g)) != b
        self.mass = g[np.ix_(keep, keep)]
        self.labels[self.labels == b] = a
        self.labels[self.labels > b] -= 1
        self.refresh()
        return removed


def _row_blocks(tb: TensorBlocks) -> np.ndarray:
    """Candidate block id of every dim-0 row."""
    if tb.rule == "elements" and len(tb.shape) == 1:
        return np.arange(tb.shape[0])
    return tb.axis_ids().numpy()


def _along_rows(tb: TensorBlocks) -> bool:
    """Whether the candidate's blocks are laid along dim 0, so that derive can merge them."""
    return tb.rule in _MERGEABLE or (tb.rule == "elements" and len(tb.shape) == 1)


def _check_candidate(tb: TensorBlocks) -> None:
    if not _along_rows(tb) and tb.num_blocks > 1:
        raise PartitionError(
            f"derive: tensor {tb.name!r} has candidate rule {tb.rule!r}; derive merges blocks laid "
            "along dim 0 only (rules rows, heads, row_groups, tensor, and elements on 1-D "
            "tensors). Measure the coupling on partition.by_rows of a model with (out, in) weights."
        )


def _canonical(groups: np.ndarray) -> np.ndarray:
    """Relabel group ids in order of first appearance."""
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse.reshape(-1)]


def _rule_for(tb: TensorBlocks, row_groups: np.ndarray) -> TensorBlocks:
    """The simplest rule whose blocks are exactly ``row_groups`` (one group id per dim-0 row)."""
    groups = _canonical(row_groups)
    n = len(groups)
    count = int(groups.max()) + 1 if n else 0
    if count == n:
        rule = "rows" if len(tb.shape) >= 2 else "elements"
        return TensorBlocks(tb.name, tb.shape, rule, {})
    if count == 1:
        return TensorBlocks(tb.name, tb.shape, "tensor", {})
    if n % count == 0 and np.array_equal(groups, np.arange(n) // (n // count)):
        return TensorBlocks(tb.name, tb.shape, "heads", {"head_dim": n // count})
    return TensorBlocks(tb.name, tb.shape, "row_groups", {"groups": [int(g) for g in groups]})


def _greedy(state: _TensorGroups, threshold: float) -> None:
    """Merge the most strongly coupled pair of groups until the tensor's off share <= threshold."""
    g = state.mass
    total = float(g.sum())
    off = total - float(np.trace(g))
    state.refresh()
    while off > threshold * total + 1e-12 * total and state.best[0] > 0.0:
        _, a, b = state.best
        off -= state.merge(a, b)


def _spectral_labels(mass: np.ndarray, threshold: float) -> np.ndarray:
    """Cluster ids of the candidate blocks of one tensor (see the module docstring)."""
    k = len(mass)
    diag = np.diag(mass)
    outer = np.outer(diag, diag)
    w = np.where(outer > 0, mass / np.sqrt(np.where(outer > 0, outer, 1.0)), 0.0)
    np.fill_diagonal(w, 0.0)
    w[w <= threshold] = 0.0
    labels = np.arange(k)
    linked = np.flatnonzero(w.sum(axis=1) > 0)
    if len(linked) < 2:
        return labels
    w = w[np.ix_(linked, linked)]
    scale = 1.0 / np.sqrt(w.sum(axis=1))
    lap = np.eye(len(linked)) - scale[:, None] * w * scale[None, :]
    lam, vec = np.linalg.eigh(0.5 * (lap + lap.T))
    c = int(np.argmax(np.diff(lam))) + 1
    u = vec[:, :c]
    if c == 1:
        sub = np.zeros(len(linked), dtype=np.int64)
    else:
        _, _, piv = scipy.linalg.qr(u.T, pivoting=True)
        left, _, right = np.linalg.svd(u[piv[:c]].T)
        sub = np.argmax(np.abs(u @ (left @ right)), axis=1)
    labels[linked] = k + sub
    return labels


def derive(coupling: BlockCoupling, threshold: float = 0.05, method: str = "greedy") -> Partition:
    """Merge strongly coupled candidate blocks of the same tensor (see the module docstring).

    Args:
        coupling: block masses over a candidate partition (e.g. ``hessian.block_coupling`` on
            ``partition.by_rows(model)``).
        threshold: greedy stops once every tensor's off-diagonal share ``off_t <= threshold``;
            spectral drops edges whose normalized coupling is ``<= threshold``.
        method: ``"greedy"`` or ``"spectral"``.

    Returns:
        The derived :class:`Partition`; its provenance records ``method``, ``threshold``,
        ``r_diag_before``/``r_diag_after`` (whole Hessian), ``offdiag_within_before``/``_after``
        (within-tensor off-diagonal mass over all within-tensor mass), the candidate's method and
        rules, and the candidate's block count.
    """
    if not isinstance(coupling, BlockCoupling):
        raise PartitionError(f"derive needs a BlockCoupling, got {type(coupling).__name__}")
    if method not in METHODS:
        raise PartitionError(f"derive: unknown method {method!r}; use one of {METHODS}")
    if isinstance(threshold, bool) or not (
        isinstance(threshold, numbers.Real) and 0.0 <= threshold <= 1.0
    ):
        raise PartitionError(f"derive: threshold must be in [0, 1], got {threshold!r}")
    cand = coupling.partition
    for name in cand.names:
        _check_candidate(cand[name])
    mass = coupling.mass
    total = float(mass.sum())
    states = []
    for name, sl in coupling.tensor_slices.items():
        g = mass[sl, sl].copy()
        states.append(_TensorGroups(cand[name], np.arange(len(g)), g))
    within_total = sum(float(s.mass.sum()) for s in states)
    within_before = within_total - sum(float(np.trace(s.mass)) for s in states)
    for s in states:
        if method == "greedy":
            _greedy(s, float(threshold))
        else:
            s.labels = _canonical(_spectral_labels(s.mass, float(threshold)))
    tensors = []
    kept = within_after = worst = 0.0
    for s, sl in zip(states, coupling.tensor_slices.values(), strict=True):
        onehot = np.zeros((len(s.labels), int(s.labels.max(initial=-1)) + 1))
        onehot[np.arange(len(s.labels)), s.labels] = 1.0
        block = mass[sl, sl]
        diag = float(np.trace(onehot.T @ block @ onehot))
        kept += diag
        within_after += float(block.sum()) - diag
        if block.sum() > 0:
            worst = max(worst, 1.0 - diag / float(block.sum()))
        tb = s.candidate
        # a 'tensor' candidate, a scalar, or one block off dim 0 (_check_candidate): nothing to merge
        merged = bool(tb.shape) and _along_rows(tb) and tb.rule != "tensor"
        tensors.append(_rule_for(tb, s.labels[_row_blocks(tb)]) if merged else tb)
    provenance = {
        "method": method,
        "threshold": float(threshold),
        "candidate": cand.provenance.get("method", "unknown"),
        "candidate_rules": sorted({cand[n].rule for n in cand.names}),
        "r_diag_before": coupling.r_diag,
        "r_diag_after": kept / total if total > 0 else 1.0,
        "offdiag_within_before": within_before / within_total if within_total > 0 else 0.0,
        "offdiag_within_after": within_after / within_total if within_total > 0 else 0.0,
        "offdiag_max_tensor_after": worst,
        "num_blocks_before": cand.num_blocks,
        "exact": bool(coupling.exact),
        "num_samples": int(coupling.num_samples),
    }
    if coupling.r_diag_null is not None:
        provenance["r_diag_null"] = float(coupling.r_diag_null)
    return Partition(tensors, provenance)
