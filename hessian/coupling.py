r"""How block-diagonal is the Hessian? Block coupling masses and the spectra of diagonal blocks.

:func:`block_coupling` measures :math:`M_{ab} = \|H_{ab}\|_F^2` over the blocks of a partition:

* exact: from the dense Hessian, :math:`M = S^\top (H \circ H) S` with :math:`S` the one-hot
  entry-to-block matrix;
* matrix-free (Hutchinson): for a Rademacher :math:`z_b` supported on block :math:`b`,
  :math:`\mathbb{E}\|(H z_b)_a\|^2 = \sum_{i\in a, j\in b} H_{ij}^2 = M_{ab}` because
  :math:`\mathbb{E}[z_b z_b^\top] = I_b`. One probe column per block, all blocks in one ``matmat``
  (in chunks); ``num_samples`` rounds; the estimate is symmetrized,
  :math:`\tfrac12(\hat M + \hat M^\top)`, which stays unbiased.

:math:`r_\text{diag} = \sum_a M_{aa} / \sum_{ab} M_{ab}`; the null ``r_diag_null`` is the same
score for a random partition with the same block sizes (the entries' block labels permuted):
exact mode permutes the labels (``seed``) and recomputes from the dense Hessian; estimated mode
uses its expectation over permutations,
:math:`\big(D + (F - D)\,q\big)/F` with :math:`F = \|H\|_F^2 = \sum_{ab} M_{ab}`,
:math:`D = \sum_i H_{ii}^2` and :math:`q = \sum_a s_a(s_a-1) / (n(n-1))` the chance that two
distinct entries share a block. :math:`D` is estimated without bias from products of
independent Bekas diagonal estimates :math:`z_i (H z_b)_i` of different rounds (and kept in
:math:`[0, F]`, so that the null stays a share). The standard error of the estimated
:math:`r_\text{diag}` is the ratio estimator's, from the diagonal and total masses
:math:`T_s, F_s` of the rounds: :math:`\sqrt{\sum_s (T_s - r F_s)^2 / (S(S-1))} / \bar F`.

:func:`blockwise_spectra` runs SLQ on every diagonal block :math:`H_{aa}` at once: a probe on
block :math:`a` is zero elsewhere, so :math:`H_{aa} v = (H v)_a`, and one ``matmat`` per Lanczos
step serves all blocks and probes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hessian.linop import (
    Operator,
    as_operator,
    check_flags,
    check_positive_ints,
    check_symmetric,
    rademacher,
    seeded_generator,
)
from hessian.slq import SpectralDensity, multi_lanczos, quadrature
from partition import BlockCoupling, Partition

EXACT_MAX = 20_000  # parameters: the dense float64 Hessian is then at most 3.2 GB


def block_coupling(
    op: Any,
    partition: Partition,
    num_samples: int = 16,
    seed: int | torch.Generator = 0,
    exact: bool = False,
    chunk: int = 256,
    progress: bool = True,
) -> BlockCoupling:
    """The coupling masses :math:`\\|H_{ab}\\|_F^2` over ``partition`` (see module docstring).

    Args:
        op: the Hessian (HessianOperator, dense matrix, ...). A plain operator's flat order must
            be ``partition.names`` order.
        partition: the candidate partition; its tensors must be exactly the operator's params.
        num_samples: Hutchinson rounds (``num_samples * num_blocks`` products in all).
        seed: an int, or a CPU ``torch.Generator`` to draw from, for the probes and the null
            permutation.
        exact: from the dense Hessian (small models only).
        chunk: blocks per ``matmat``.
        progress: tqdm progress bar.
    """
    check_positive_ints(chunk=chunk)
    check_flags(exact=exact, progress=progress)
    A = as_operator(op)
    n = check_symmetric(A)
    labels = block_labels(A, partition)
    B = partition.num_blocks
    gen = seeded_generator(seed)
    if exact:
        if n > EXACT_MAX:
            raise ValueError(
                f"exact=True needs the dense {n} x {n} Hessian ({n * n * 8 / 1e9:.1f} GB in "
                f"float64, {n} products); it is meant for at most {EXACT_MAX} parameters. Use "
                "exact=False (the matrix-free Hutchinson estimate) or a smaller model"
            )
        H = A.to_dense().double().cpu()
        mass = _mass_from_dense(H, labels, B)
        perm = labels[torch.randperm(n, generator=gen)]
        null = _mass_from_dense(H, perm, B)
        null_r = float(np.trace(null) / null.sum()) if null.sum() > 0 else 1.0
        return BlockCoupling(partition, 0.5 * (mass + mass.T), None, True, 0, null_r)
    check_positive_ints(num_samples=num_samples)
    if num_samples < 2:
        raise ValueError("the Hutchinson estimate needs num_samples >= 2 for standard errors")

    lab = labels.to(A.device)
    total = torch.zeros(B, B, dtype=torch.float64)
    total_sq = torch.zeros(B, B, dtype=torch.float64)
    diag_sum = torch.zeros(n, dtype=torch.float64)
    diag_sq = torch.zeros(n, dtype=torch.float64)
    rounds = []  # (diagonal mass, total mass) of every round
    chunks = []  # (lo, hi, entries of blocks lo..hi-1, their column in the probe matrix)
    for lo in range(0, B, chunk):
        hi = min(B, lo + chunk)
        rows = ((lab >= lo) & (lab < hi)).nonzero().reshape(-1)
        chunks.append((lo, hi, rows, lab[rows] - lo))
    bar = tqdm(total=num_samples * len(chunks), desc="coupling", disable=not progress, leave=False)
    for _ in range(num_samples):
        signs = rademacher((n,), gen, A.dtype, A.device)
        est = torch.zeros(B, B, dtype=torch.float64)
        d = torch.zeros(n, dtype=torch.float64)
        for lo, hi, rows, cols in chunks:
            Z = torch.zeros(n, hi - lo, dtype=A.dtype, device=A.device)
            Z[rows, cols] = signs[rows]
            Y = A.matmat(Z).double()
            est[:, lo:hi] = torch.zeros(B, hi - lo, dtype=torch.float64).index_add_(
                0, labels, (Y * Y).cpu()
            )
            d[rows.cpu()] = (signs[rows] * Y[rows, cols]).double().cpu()
            bar.update(1)
        total += est
        total_sq += est * est
        rounds.append((float(est.trace()), float(est.sum())))
        diag_sum += d
        diag_sq += d * d
    bar.close()
    S = num_samples
    mean = (total / S).numpy()
    var = ((total_sq - total * total / S) / (S - 1)).clamp_min(0).numpy() / S
    mass = 0.5 * (mean + mean.T)
    # off the diagonal the two estimates (probes on b and on a) are independent; on it, one
    stderr = 0.5 * np.sqrt(var + var.T)
    np.fill_diagonal(stderr, np.sqrt(np.diag(var)))
    F = float(mass.sum())
    # unbiased for sum_i H_ii^2 but noisy for few rounds: kept in [0, F] so the null is a share
    d2 = min(max(float(((diag_sum**2 - diag_sq) / (S * (S - 1))).sum()), 0.0), F)
    sizes = partition.block_sizes().double()
    q = float((sizes * (sizes - 1)).sum()) / (n * (n - 1)) if n > 1 else 1.0
    null_r = (d2 + (F - d2) * q) / F if F > 0 else 1.0
    T_s, F_s = np.array(rounds).T
    r = T_s.sum() / F_s.sum() if F > 0 else 1.0
    r_se = (
        float(np.sqrt(((T_s - r * F_s) ** 2).sum() / (S * (S - 1))) / F_s.mean()) if F > 0 else 0.0
    )
    return BlockCoupling(partition, mass, stderr, False, S, float(null_r), r_se)


def blockwise_spectra(
    op: Any,
    blocks: Partition | Mapping[str, Any] | Sequence[str],
    num_probes: int = 4,
    num_steps: int = 50,
    seed: int | torch.Generator = 0,
    reorth: bool = True,
    progress: bool = True,
) -> dict[str, SpectralDensity]:
    """SLQ spectral density of every diagonal block :math:`H_{aa}`, keyed by block label.

    ``blocks`` is a Partition (labels from ``partition.block_labels()``), a mapping
    ``{label: selector}`` (selectors as in ``HessianOperator.select``, or flat index tensors), or
    a list of parameter names (each a block). All blocks and probes advance together.
    """
    check_positive_ints(num_probes=num_probes, num_steps=num_steps)
    check_flags(reorth=reorth, progress=progress)
    A = as_operator(op)
    check_symmetric(A)
    groups = _groups(A, blocks)
    if not groups:
        raise ValueError(
            "blocks names no block: pass a Partition, a {label: selector} mapping or a list of "
            "parameter names with at least one entry"
        )
    gen = seeded_generator(seed)
    starts, supports, owner = [], [], []
    for label, idx in groups.items():
        for _ in range(num_probes):
            starts.append(rademacher((idx.numel(),), gen, A.dtype, A.device))
            supports.append(idx.to(A.device))
            owner.append(label)
    runs, _ = multi_lanczos(A, starts, supports, num_steps, reorth, progress, "blockwise")
    out = {}
    for label, idx in groups.items():
        width = min(num_steps, idx.numel())
        mine = [(a, b) for (a, b), o in zip(runs, owner, strict=True) if o == label]
        nodes, weights = zip(*(quadrature(a, b, width) for a, b in mine), strict=True)
        steps = sum(len(a) for a, _ in mine)  # one product column per Lanczos step
        out[label] = SpectralDensity(np.stack(nodes), np.stack(weights), int(idx.numel()), steps)
    return out


def block_labels(A: Operator, partition: Partition) -> torch.Tensor:
    """Global block id of every flat entry of ``A`` (LongTensor ``(n,)``)."""
    if not isinstance(partition, Partition):
        raise TypeError(f"expected a partition.Partition, got {type(partition).__name__}")
    names = getattr(A, "params", None)
    if names is None:
        names = partition.names
        if partition.num_params != A.shape[0]:
            raise ValueError(
                f"the partition covers {partition.num_params} entries but the operator has "
                f"{A.shape[0]}; its flat order must be partition.names order"
            )
    elif set(names) != set(partition.names):
        missing = sorted(set(names) - set(partition.names))
        extra = sorted(set(partition.names) - set(names))
        raise ValueError(
            f"the partition must cover exactly H.params: missing {missing[:4]}, extra {extra[:4]}. "
            "Build the partition from the same parameters, or build H with params=partition.names"
        )
    else:
        for name in names:
            if tuple(partition[name].shape) != tuple(A.param_shapes[name]):
                raise ValueError(
                    f"partition tensor {name!r} has shape {tuple(partition[name].shape)}, "
                    f"the parameter has {tuple(A.param_shapes[name])}"
                )
    return torch.cat([partition.block_index(n).reshape(-1) for n in names]).cpu()


def _mass_from_dense(H: torch.Tensor, labels: torch.Tensor, B: int) -> np.ndarray:
    rows = torch.zeros(B, H.shape[1], dtype=torch.float64).index_add_(0, labels, H * H)
    return torch.zeros(B, B, dtype=torch.float64).index_add_(1, labels, rows).numpy()


def _groups(A: Operator, blocks: Any) -> dict[str, torch.Tensor]:
    if isinstance(blocks, Partition):
        labels = block_labels(A, blocks)
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=blocks.num_blocks).tolist()
        pieces = torch.split(order, counts)
        return dict(zip(blocks.block_labels(), pieces, strict=True))
    if isinstance(blocks, Mapping):
        items = blocks.items()
    elif isinstance(blocks, Sequence) and not isinstance(blocks, str):
        items = [(name, name) for name in blocks]
    else:
        raise TypeError(
            "blocks must be a Partition, a {label: selector} mapping or a list of names"
        )
    out = {}
    for label, spec in items:
        if str(label) in out:
            raise ValueError(f"two blocks share the label {str(label)!r}: give each a distinct one")
        if isinstance(spec, torch.Tensor) and not hasattr(A, "select"):
            if spec.is_floating_point() or spec.is_complex() or spec.dtype == torch.bool:
                raise TypeError(
                    f"block {label!r}: flat indices must be an integer tensor, got {spec.dtype} "
                    "(for a mask m, pass m.nonzero().reshape(-1))"
                )
            out[str(label)] = torch.unique(spec.long().reshape(-1))
        elif hasattr(A, "select"):
            out[str(label)] = A.select(spec)
        else:
            raise TypeError(
                f"block {label!r}: a plain operator needs flat index tensors as selectors"
            )
        idx = out[str(label)]
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= A.shape[0]:
            raise ValueError(
                f"block {label!r} must name at least one entry, with flat indices in "
                f"[0, {A.shape[0]}); got {idx.numel()} indices"
                + (f" from {int(idx.min())} to {int(idx.max())}" if idx.numel() else "")
            )
    return out
