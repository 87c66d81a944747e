r"""Extreme eigenpairs of a symmetric operator by (block) Lanczos with full reorthogonalization.

With a block of ``p`` orthonormal start vectors :math:`Q_0`, step :math:`j` computes
:math:`W = H Q_j`, :math:`A_j = Q_j^\top W`, removes from :math:`W` its projection on the whole
basis :math:`[Q_0, \dots, Q_j]` twice (classical Gram-Schmidt twice, "twice is enough"), and
factors :math:`W = Q_{j+1} B_{j+1}` column by column. The projected matrix :math:`T_m` (block
tridiagonal with :math:`A_j` and :math:`B_j`) is symmetric and solved with ``numpy.linalg.eigh``
(``scipy.linalg.eigh_tridiagonal`` when ``p = 1``). From the Lanczos relation
:math:`H Q_m = Q_m T_m + Q_{m+1} B_{m+1} E_m^\top`, the Ritz pair :math:`(\theta_i, Q_m s_i)` has
residual :math:`\|B_{m+1} s_i^{\text{last}}\|`; the iteration stops when the ``k`` wanted pairs
all have residual :math:`\le` ``tol`` :math:`\cdot \max_i |\theta_i|`. The reported residuals
are then recomputed as the true :math:`\|H y - \theta y\|` with one extra ``matmat`` of ``k``
vectors (counted in ``num_matvecs``).

Memory is the basis, ``n`` times its columns. Without ``max_basis`` it grows by ``p`` vectors per
step up to ``max_iter`` steps. With ``max_basis = m`` the iteration restarts thickly (Wu and Simon's
thick-restart Lanczos) whenever the next block would not fit: it keeps the ``l`` most wanted Ritz
vectors :math:`Y = Q S_l` (:math:`l \approx m/2`, at least ``k + p``) and the last block
:math:`Q_{+}`, so that :math:`H [Y, Q_{+}] = [Y, Q_{+}] \begin{pmatrix}\Theta_l & C^\top \\ C &
A_{+}\end{pmatrix} + \dots` with the arrow :math:`C = B S_l^{\text{last}}`; the projected matrix
is then no longer tridiagonal and is solved with ``numpy.linalg.eigh``.

When the Krylov space becomes invariant (or a column of the block deflates) a fresh random vector
orthogonal to the basis takes its place, so the method continues to ``n`` vectors if needed. The
Ritz pairs of an invariant subspace are exact, but the rest of the spectrum is not yet seen: when
the whole coupling :math:`\|B_{m+1}\|` falls below ``tol`` (every Ritz pair converged at once,
the sign of an invariant subspace rather than of convergence), the iteration runs at least ``k``
more steps before it may stop, and a run that ends sooner reports ``converged=False``. Near ``n``
the last block narrows to the directions that are left. Single-vector Lanczos (``block_size=1``)
sees one copy of an exactly repeated eigenvalue until the Krylov space becomes invariant (with
``max_basis`` it may never become so); with ``block_size = p`` it resolves multiplicities up to
``p``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch
from tqdm.auto import tqdm

from hessian.linop import (
    as_operator,
    check_flags,
    check_positive_ints,
    check_symmetric,
    rounding_floor,
    seeded_generator,
)

WHICH = ("LA", "SA", "LM", "BE")


@dataclass(frozen=True, eq=False)
class EigenResult:
    """Ritz pairs from :func:`lanczos`.

    Attributes:
        values: ``(k,)`` eigenvalue estimates: descending for ``LA``, ascending for ``SA``,
            by descending magnitude for ``LM``, ascending for ``BE``.
        vectors: ``(n, k)`` orthonormal Ritz vectors (torch, the operator's dtype), column ``i``
            belongs to ``values[i]``.
        residuals: ``(k,)`` true residual norms :math:`\\|H v_i - \\lambda_i v_i\\|`.
        num_matvecs: operator-vector products used, residual check included.
        converged: ``(k,)`` bools, ``residuals <= max(tol, 100 eps) * max |theta|`` with ``eps``
            the operator dtype's machine epsilon (float32 residuals stop near 1e-7 relative).
        num_steps: Lanczos steps taken.
    """

    values: np.ndarray
    vectors: torch.Tensor
    residuals: np.ndarray
    num_matvecs: int
    converged: np.ndarray
    num_steps: int


def lanczos(
    op: Any,
    k: int = 6,
    which: str = "LA",
    max_iter: int | None = None,
    tol: float = 1e-8,
    seed: int | torch.Generator = 0,
    block_size: int = 1,
    max_basis: int | None = None,
    true_residuals: bool = True,
    progress: bool = True,
    callback: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of the symmetric ``op`` (see the module docstring).

    Args:
        op: a HessianOperator, scipy LinearOperator, dense tensor/ndarray, or callable with shape.
        k: number of eigenpairs.
        which: ``"LA"`` largest, ``"SA"`` smallest, ``"LM"`` largest magnitude, ``"BE"`` both
            ends (``ceil(k/2)`` largest and ``floor(k/2)`` smallest).
        max_iter: most Lanczos steps (default ``max(300, 20 k)``, and at most ``ceil(n/p)``
            without restarts).
        tol: relative residual tolerance, ``||H y - theta y|| <= tol * max|theta|``.
        seed: an int, or a CPU ``torch.Generator`` to draw from, for the random start block.
        block_size: ``p``, vectors per step (one ``matmat`` each); ``p > 1`` finds multiplicities.
        max_basis: most basis vectors kept (memory ``n * max_basis``); thick restarts keep it
            there. At least ``k + 2 p``. Default: no restart.
        true_residuals: recompute the final residuals with ``k`` extra products (else from the
            Lanczos relation).
        progress: tqdm progress bar.
        callback: called after every step once ``k`` Ritz values exist, as
            ``callback(num_matvecs, values, residual_estimates)`` (wanted pairs, Lanczos-relation
            residuals), e.g. to record the convergence history.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    check_positive_ints(k=k, block_size=block_size)
    check_flags(true_residuals=true_residuals, progress=progress)
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback must be None or a function callback(num_matvecs, values, residuals), got "
            f"{type(callback).__name__}"
        )
    k, block_size = int(k), int(block_size)
    if max_iter is not None:
        check_positive_ints(max_iter=max_iter)
    if max_basis is not None:
        check_positive_ints(max_basis=max_basis)
    if not isinstance(tol, numbers.Real) or not 0 <= tol < float("inf"):
        raise ValueError(
            f"tol is a relative residual and must be a finite number >= 0, got {tol!r}"
        )
    A = as_operator(op)
    n = check_symmetric(A)
    if k > n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    p = min(block_size, n)
    steps = max(300, 20 * k) if max_iter is None else int(max_iter)
    if steps * p < k:
        raise ValueError(
            f"max_iter={steps} steps of block_size={p} cannot produce k={k} vectors: raise "
            "max_iter (or leave it None)"
        )
    if max_basis is None:  # no restart: the basis holds every step's block
        max_iter = min(steps, -(-n // p))
        cap = max_iter * p
        if cap < k:
            raise ValueError(
                f"max_iter={max_iter} with block_size={p} cannot produce k={k} vectors"
            )
    else:
        max_iter, cap = steps, min(int(max_basis), n)
        if cap < min(k + 2 * p, n):
            raise ValueError(
                f"max_basis={max_basis} leaves no room to restart: it needs at least k + 2 * "
                f"block_size = {k + 2 * p} vectors (or n={n}); raise max_basis or lower k"
            )

    gen = seeded_generator(seed)
    dtype, device = A.dtype, A.device
    basis = torch.zeros(n, cap + p, dtype=dtype, device=device)
    Q, _, _ = _orthonormalize(_randn(n, p, gen, dtype, device), basis[:, :0], gen)
    basis[:, :p] = Q
    T = np.zeros((cap + p, cap + p))
    num_matvecs = 0
    cur, pj = 0, p  # the current block: basis columns [cur, cur + pj); the basis is [0, cur + pj)
    m = num_steps = 0
    window_end: int | None = None  # after an invariant subspace: no stop before this step
    tridiagonal = p == 1  # until the first restart adds the arrow
    theta, S, res, want = np.zeros(0), np.zeros((0, 0)), np.zeros(0), np.zeros(0, dtype=int)
    bar = tqdm(total=max_iter, desc="lanczos", disable=not progress, leave=False)
    try:
        for _ in range(max_iter):
            num_steps += 1
            Qj = basis[:, cur : cur + pj]
            W = A.matmat(Qj).to(dtype)
            num_matvecs += pj
            Aj = (Qj.T @ W).double().cpu().numpy()
            T[cur : cur + pj, cur : cur + pj] = (Aj + Aj.T) / 2
            m = cur + pj
            Qn, B, deflated = (
                _orthonormalize(W, basis[:, :m], gen) if m < n else (None, None, False)
            )
            if Qn is None or Qn.shape[1] == 0:  # the basis spans the whole space: exact
                theta, S = _eig(T[:m, :m], tridiagonal)
                res = np.zeros(len(theta))
                want = _wanted(theta, k, which)
                window_end = None
                bar.update(1)
                break
            pn = Qn.shape[1]  # narrower than p only when fewer than p new directions exist
            if m >= k:
                theta, S = _eig(T[:m, :m], tridiagonal)
                res = np.linalg.norm(B @ S[-pj:, :], axis=0)
                want = _wanted(theta, k, which)
                scale = max(np.abs(theta).max(), np.finfo(float).tiny)
                # invariant to tolerance: every pair is accurate, the rest of the spectrum unseen
                deflated = deflated or bool(np.linalg.norm(B) <= tol * scale)
            if deflated and window_end is None:
                window_end = num_steps + k
            explored = window_end is None or num_steps >= window_end
            if m >= k:
                done = int((res[want] <= tol * scale).sum())
                if callback is not None:
                    callback(num_matvecs, theta[want], res[want])
                bar.set_postfix(converged=f"{done}/{k}")
                if done == k and explored:
                    bar.update(1)
                    break
            if explored:
                window_end = None  # a later invariant subspace opens a new window
            if m + pn > cap:  # no room for the next block: thick restart
                keep = np.sort(_wanted(theta, max(k + p, min((cap - p) // 2, m - p)), which))
                coupling = B @ S[-pj:, keep]
                basis[:, : len(keep)] = basis[:, :m] @ torch.as_tensor(
                    S[:, keep], dtype=dtype, device=device
                )
                cur = len(keep)
                T[:] = 0.0
                T[:cur, :cur] = np.diag(theta[keep])
                T[cur : cur + pn, :cur] = coupling
                T[:cur, cur : cur + pn] = coupling.T
                tridiagonal = False
                # the kept columns are Ritz vectors: the result if no step follows
                theta, S, res, m = theta[keep], np.eye(cur), np.linalg.norm(coupling, axis=0), cur
                want = _wanted(theta, k, which)
            else:
                T[m : m + pn, cur : cur + pj] = B
                T[cur : cur + pj, m : m + pn] = B.T
                cur = m
            basis[:, cur : cur + pn] = Qn
            pj = pn
            bar.update(1)
    finally:
        bar.close()

    Sw = torch.as_tensor(S[:, want], dtype=dtype, device=device)
    vectors = basis[:, :m] @ Sw
    values = theta[want]
    if true_residuals:
        HV = A.matmat(vectors).to(dtype)
        num_matvecs += k
        R = HV - vectors * torch.as_tensor(values, dtype=dtype, device=device)
        residuals = torch.linalg.vector_norm(R, dim=0).double().cpu().numpy()
    else:
        residuals = res[want]
    scale = max(np.abs(theta).max(), np.finfo(float).tiny)
    # right after an invariant subspace the rest of the spectrum is unexplored: not converged
    settled = window_end is None or num_steps >= window_end
    # no residual computed in the operator's dtype goes below its rounding, 100 eps * max|theta|
    floor = rounding_floor(dtype)
    return EigenResult(
        values=values,
        vectors=vectors,
        residuals=residuals,
        num_matvecs=num_matvecs,
        converged=(residuals <= max(tol, floor) * scale) & settled,
        num_steps=num_steps,
    )


def _eig(T: np.ndarray, tridiagonal: bool) -> tuple[np.ndarray, np.ndarray]:
    if tridiagonal:
        return scipy.linalg.eigh_tridiagonal(np.diag(T).copy(), np.diag(T, -1).copy())
    return np.linalg.eigh(T)


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices into ascending ``theta`` of the wanted values, in the documented order."""
    idx = np.arange(len(theta))
    if which == "LA":
        return idx[::-1][:k]
    if which == "SA":
        return idx[:k]
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")[:k]
    hi, lo = -(-k // 2), k // 2
    return np.sort(np.concatenate([idx[:lo], idx[len(idx) - hi :]]))


def _randn(n: int, p: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device):
    return torch.randn(n, p, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def _orthonormalize(
    W: torch.Tensor, basis: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, np.ndarray, bool]:
    """``W = Q B`` with ``Q`` orthonormal and orthogonal to ``basis`` (CGS2, column by column).

    A column that is (numerically) in the span of ``basis`` and the earlier columns is replaced
    by a random unit vector orthogonal to both, with a zero row in ``B`` (deflation/restart), and
    the third value is True. When no such vector is left (the space is full) the column is
    dropped: ``Q`` is ``(n, q)`` and ``B`` ``(q, p)`` with ``q <= p``.
    """
    n, p = W.shape
    W = W.clone()
    scale = float(torch.linalg.matrix_norm(W)) if W.numel() else 0.0
    for _ in range(2):
        if basis.shape[1]:
            W -= basis @ (basis.T @ W)
    Q = torch.zeros_like(W)
    B = np.zeros((p, p))
    eps = torch.finfo(W.dtype).eps
    kept: list[int] = []
    deflated = False
    for i in range(p):
        w = W[:, i]
        coef = torch.zeros(len(kept), dtype=W.dtype, device=W.device)
        for _ in range(2):
            c = Q[:, kept].T @ w
            w = w - Q[:, kept] @ c
            coef = coef + c
            # the earlier columns' rounding along the basis, times a coefficient as large as
            # the spectrum is wide, came back into w with them: project it out again
            if kept and basis.shape[1]:
                w = w - basis @ (basis.T @ w)
        nrm = float(torch.linalg.vector_norm(w))
        B[kept, i] = coef.double().cpu().numpy()
        if nrm > 100 * n**0.5 * eps * max(scale, 1e-300) and nrm > 0:
            Q[:, i] = w / nrm
            B[i, i] = nrm
            kept.append(i)
            continue
        deflated = True
        if basis.shape[1] + len(kept) >= n:
            continue  # no direction left: drop the column
        for _attempt in range(3):  # deflation: a fresh direction orthogonal to everything
            r = torch.randn(n, generator=gen, dtype=torch.float64).to(W)
            for _ in range(2):
                if basis.shape[1]:
                    r = r - basis @ (basis.T @ r)
                r = r - Q[:, kept] @ (Q[:, kept].T @ r)
            rn = float(torch.linalg.vector_norm(r))
            if rn > 1e-8:
                Q[:, i] = r / rn
                kept.append(i)
                break
    return Q[:, kept], B[kept], deflated
