"""A small symmetric-operator base class and the adapter every algorithm uses.

Every algorithm in :mod:`hessian` (Lanczos, SLQ, trace, coupling) talks to an operator through
one method, ``matmat(V) -> H @ V`` on torch tensors of shape ``(n, k)``. :func:`as_operator`
wraps what a user may hand in: a :class:`Operator` (``HessianOperator`` and its views), a dense
torch tensor or NumPy array, a ``scipy.sparse.linalg.LinearOperator``, or any callable ``v -> H v``
that has a ``shape`` attribute.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from tqdm.auto import tqdm


class Operator:
    """An ``(m, n)`` linear operator on flat torch vectors.

    Subclasses implement :meth:`_matmat` on a 2-D tensor ``V`` of shape ``(n, k)`` in the
    operator's dtype and device, returning ``(m, k)``. ``op @ v`` works for ``v`` of shape
    ``(n,)`` or ``(n, k)``.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V`` for ``V`` of shape ``(n, k)``."""
        V = as_real_tensor(V, self.dtype, self.device)
        if V.ndim != 2 or V.shape[0] != self.shape[1]:
            raise ValueError(
                f"matmat expects a matrix of shape ({self.shape[1]}, k), got {tuple(V.shape)}"
            )
        if V.shape[1] == 0:
            return V.new_zeros(self.shape[0], 0)
        return check_finite(self._matmat(V), V)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for a flat ``v`` of shape ``(n,)``."""
        v = as_real_tensor(v, self.dtype, self.device)
        if v.shape != (self.shape[1],):
            raise ValueError(
                f"matvec expects a vector of shape ({self.shape[1]},), got {tuple(v.shape)}"
            )
        return check_finite(self._matmat(v[:, None])[:, 0], v)

    def __matmul__(self, v: Any) -> Any:
        v = as_real_tensor(v, self.dtype, self.device)
        return self.matvec(v) if v.ndim == 1 else self.matmat(v)

    def to_dense(self, chunk: int | None = None) -> torch.Tensor:
        """The dense ``(m, n)`` matrix, built from ``H @ I`` in column chunks of ``chunk``."""
        return self._dense(self.shape[1] if chunk is None else chunk)

    def _dense(self, chunk: int, progress: bool = False) -> torch.Tensor:
        """The columns ``H @ I[:, start:stop]`` written into a matrix allocated first, so that a
        matrix too large for memory fails at once, not after the products."""
        check_positive_ints(chunk=chunk)
        m, n = self.shape
        try:
            out = torch.empty(m, n, dtype=self.dtype, device=self.device)
        except RuntimeError:  # torch.OutOfMemoryError too
            gb = m * n * self.dtype.itemsize / 1e9
            raise MemoryError(
                f"to_dense needs the dense {m} x {n} matrix ({gb:.3g} GB in {self.dtype}), more "
                "than this machine can allocate: use the matrix-free methods (H @ v, lanczos, "
                "block_coupling(exact=False)) or H.restrict(...) to a smaller block"
            ) from None
        for start in tqdm(range(0, n, chunk), desc="to_dense", disable=not progress):
            stop = min(n, start + chunk)
            E = torch.zeros(n, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            out[:, start:stop] = self._matmat(E)
        return out

    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` view (NumPy in, NumPy out), with ``.H``."""

        def numpy_product(product: Any, n_in: int) -> Any:
            def apply(X: np.ndarray) -> np.ndarray:
                X = np.asarray(X)
                V = torch.as_tensor(X.reshape(n_in, -1), dtype=self.dtype, device=self.device)
                return product(V).detach().cpu().numpy()  # scipy reshapes a vector's (m, 1)

            return apply

        mm = numpy_product(self._matmat, self.shape[1])
        rmm = numpy_product(self._rmatmat, self.shape[0])
        npdtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return LinearOperator(
            self.shape, matvec=mm, matmat=mm, rmatvec=rmm, rmatmat=rmm, dtype=npdtype
        )

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A^T @ V``; operators without a transpose product raise."""
        raise NotImplementedError(f"{type(self).__name__} has no transpose product")

    def asymmetry(self) -> str | None:
        """Why this operator is known not to be symmetric, or None (a Hessian is)."""
        return None


class DenseOperator(Operator):
    """A dense matrix as an :class:`Operator`; its values only (a matrix that requires grad, such
    as ``jacfwd(grad(f))`` at a model's parameters, is detached)."""

    def __init__(self, A: torch.Tensor | np.ndarray):
        A = torch.as_tensor(A).detach()
        if A.ndim != 2:
            raise ValueError(f"a dense operator needs a 2-D matrix, got shape {tuple(A.shape)}")
        if A.is_complex():
            raise TypeError(f"a dense operator must be real, got {A.dtype}; pass A.real")
        if not A.is_floating_point():
            A = A.double()
        self.A = A
        self.shape = (A.shape[0], A.shape[1])
        self.dtype = A.dtype
        self.device = A.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.A @ V

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.A.T @ V

    def to_dense(self, chunk: int | None = None) -> torch.Tensor:
        """A dense (strided) copy of the matrix, also of a sparse one (no products; ``chunk`` is
        only checked)."""
        if chunk is not None:
            check_positive_ints(chunk=chunk)
        return self.A.clone() if self.A.layout == torch.strided else self.A.to_dense()

    def asymmetry(self) -> str | None:
        r"""Set when :math:`\max|A - A^T| > 10^{-2} \max|A|`: a gross asymmetry (the rounding
        of a float32 Hessian can reach :math:`10^{-3}`); sparse layouts are not checked."""
        if self.shape[0] != self.shape[1] or self.A.numel() == 0 or self.A.layout != torch.strided:
            return None
        n, step = self.shape[0], 1024  # row blocks: no second n x n matrix in memory
        gap = max(
            float((self.A[i : i + step] - self.A[:, i : i + step].T).abs().max())
            for i in range(0, n, step)
        )
        scale = float(self.A.abs().max())
        if gap > 1e-2 * scale:
            return f"max |A - A^T| = {gap:.3g} against max |A| = {scale:.3g}; pass (A + A.T) / 2"
        return None


class _ScipyOperator(Operator):
    def __init__(self, op: LinearOperator):
        self.op = op
        self.shape = (int(op.shape[0]), int(op.shape[1]))
        self.dtype = torch.float32 if np.dtype(op.dtype) == np.float32 else torch.float64
        self.device = torch.device("cpu")

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.op.matmat(V.detach().cpu().numpy())
        return _as_output(out, (self.shape[0], V.shape[1]), self.dtype, "the LinearOperator")


class _CallableOperator(Operator):
    def __init__(self, fn: Callable[[torch.Tensor], Any], shape: tuple[int, int]):
        try:
            sizes = () if isinstance(shape, str) else tuple(shape)
        except TypeError:  # not a sequence
            sizes = ()
        if len(sizes) != 2 or any(as_int(s, 0) is None for s in sizes):
            raise ValueError(
                f"a callable operator's shape must be a pair of sizes (m, n), ints >= 0, got "
                f"{shape!r}: set fn.shape = (n, n) for an n x n Hessian"
            )
        self.fn = fn
        self.shape = (int(sizes[0]), int(sizes[1]))
        self.dtype = getattr(fn, "dtype", torch.float64)
        if not isinstance(self.dtype, torch.dtype):
            self.dtype = torch.float64
        self.device = torch.device("cpu")

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        m = self.shape[0]
        cols = [
            _as_output(self.fn(V[:, i]), (m,), self.dtype, "the callable")
            for i in range(V.shape[1])
        ]
        return torch.stack(cols, dim=1)


def _as_output(out: Any, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
    """A user operator's product as a tensor of ``shape`` (a column ``(m, 1)`` for ``(m,)`` is
    fine), or a ValueError naming the shape it should have. A tensor gives its values (detached,
    on the CPU)."""
    out = out.detach().cpu() if isinstance(out, torch.Tensor) else np.asarray(out)
    out = torch.as_tensor(out, dtype=dtype)
    if out.numel() != math.prod(shape):
        raise ValueError(
            f"{what} returned a product of shape {tuple(out.shape)}, expected {shape}: one entry "
            "per row of the operator and column of the input"
        )
    return out.reshape(shape)


def as_operator(op: Any) -> Operator:
    """Wrap ``op`` (Operator, tensor, ndarray, scipy LinearOperator, callable with shape)."""
    if isinstance(op, Operator):
        return op
    if isinstance(op, (torch.Tensor, np.ndarray)):
        return DenseOperator(op)
    if isinstance(op, LinearOperator):
        return _ScipyOperator(op)
    if hasattr(op, "toarray") and hasattr(op, "shape"):
        return _ScipyOperator(
            LinearOperator(op.shape, matvec=op.dot, matmat=op.dot, dtype=op.dtype)
        )
    if callable(op) and hasattr(op, "shape"):
        return _CallableOperator(op, op.shape)
    raise TypeError(
        f"cannot use {type(op).__name__} as a linear operator: pass a HessianOperator, a dense "
        "tensor or ndarray, a scipy LinearOperator, or a callable v -> H v with a `shape` attribute"
    )


def as_int(value: Any, minimum: int | None = None) -> int | None:
    """``value`` as a Python int when it is an integer (any integer type, not a bool) of at least
    ``minimum``; otherwise None, for the caller's own error message."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return None
    return None if number is None or (minimum is not None and number < minimum) else number


def check_flags(**flags: Any) -> None:
    """A ValueError naming the first flag that is not True or False (a string such as "no" would
    pass for True)."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def check_positive_ints(**counts: Any) -> None:
    """A ValueError naming the first count that is not an int >= 1 (any integer type)."""
    for name, value in counts.items():
        if as_int(value, 1) is None:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def seeded_generator(seed: int | torch.Generator) -> torch.Generator:
    """The CPU ``torch.Generator`` the estimators draw from: a fresh one seeded with an integer
    ``seed``, or ``seed`` itself when it is a CPU generator (its state advances with each draw).
    Anything else is a ValueError that names the two accepted forms."""
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(
                f"seed must be a CPU torch.Generator, got one on {seed.device}: probes are drawn "
                "on the CPU so that every device sees the same numbers; pass torch.Generator()"
            )
        return seed
    value = as_int(seed)
    if value is None:
        raise ValueError(
            f"seed must be an int or a torch.Generator, got {seed!r}: pass an integer such as seed=0"
        )
    if not -(2**63) <= value < 2**64:
        raise ValueError(
            f"seed must lie in [-2**63, 2**64) (what torch.manual_seed takes), got {value}: pass a "
            "smaller integer"
        )
    return torch.Generator().manual_seed(value)


def rounding_floor(dtype: torch.dtype) -> float:
    """``100 * eps`` of ``dtype``: the relative size below which a quantity computed in that dtype
    (a residual, a Lanczos coefficient) is rounding noise, so no test can ask for less."""
    return 100 * torch.finfo(dtype).eps


def check_square(op: Operator) -> int:
    """The size ``n`` of a square operator, or a ValueError."""
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"this algorithm needs a square operator, got shape {op.shape}")
    return op.shape[0]


def check_symmetric(op: Operator) -> int:
    """The size ``n`` of a square operator not known to be asymmetric, or a ValueError."""
    n = check_square(op)
    reason = op.asymmetry()
    if reason is not None:
        raise ValueError(f"this algorithm needs a symmetric operator: {reason}")
    return n


def rademacher(
    shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Independent random signs of ``shape``, drawn on the CPU from ``gen`` (device-independent)."""
    return (torch.randint(0, 2, shape, generator=gen).to(dtype) * 2 - 1).to(device)


def check_finite(out: Any, v: Any) -> Any:
    """``out = H v`` itself (tensors, or dicts of them), or a ValueError when it holds NaN/Inf,
    saying whether ``v`` did."""

    def finite(x: Any) -> bool:  # one device sync, however many tensors
        ts = list(x.values()) if isinstance(x, Mapping) else [x]
        # A NaN or Inf entry makes the sum non-finite: one pass, where isfinite().all() takes
        # four (30x slower on a 1M x 16 block). Only a sum that overflows needs the entrywise check.
        if bool(torch.isfinite(torch.as_tensor(sum(t.sum() for t in ts)))):
            return True
        return bool(torch.stack([torch.isfinite(t).all() for t in ts]).all())

    if finite(out):
        return out
    if not finite(v):
        raise ValueError(
            "the vector holds NaN/Inf entries, and so does its product: pass finite vectors"
        )
    raise ValueError(
        "the operator returned NaN/Inf for a finite vector: the matrix (a Hessian: the model's "
        "weights, the batch or an op such as sqrt at 0) is not finite here, and no eigenvalue, "
        "trace or coupling of it is defined"
    )


def as_real_tensor(v: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``v`` (tensor, array or list; a sparse tensor is made dense) as a real tensor of
    ``dtype`` on ``device``, or a TypeError/ValueError naming what is wrong with it."""
    if isinstance(v, Mapping):
        raise TypeError(
            "this operator takes flat vectors (n,) and matrices (n, k); a {name: tensor} dict "
            "goes to a HessianOperator itself: flatten it, torch.cat([t.reshape(-1) for t in "
            "v.values()]) in H.params order"
        )
    if not isinstance(v, torch.Tensor):
        try:
            array = np.asarray(v)
        except ValueError as exc:  # a ragged list
            raise ValueError(f"the vector is not an array of numbers: {exc}") from None
        if array.dtype.kind not in "biufc":
            raise TypeError(
                f"the vector must hold numbers, got {type(v).__name__} (as an array: dtype "
                f"{array.dtype}); pass a float tensor or array"
            )
        v = torch.as_tensor(array)
    if v.is_meta:
        raise ValueError(
            "the vector is on the meta device and holds no values: pass a tensor with data, "
            "e.g. torch.randn(n)"
        )
    if v.layout != torch.strided:
        v = v.to_dense()
    if v.is_complex():
        raise TypeError(
            "the operator is real and so are its products: apply it to the real and imaginary "
            "parts separately"
        )
    return v.to(dtype=dtype, device=device)
