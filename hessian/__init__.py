"""Hessian engine: exact and matrix-free Hessians, Lanczos, spectra, trace and block coupling.

``HessianOperator`` is the Hessian of a model's mean (or summed) loss over a data set, applied by
Hessian-vector products built on ``torch.func.grad`` (never on ``jacrev``; see DESIGN.md,
"Pitfalls"). The algorithms accept it, a dense tensor/ndarray, a scipy ``LinearOperator`` or any
callable with a ``shape``.
"""

from hessian.coupling import block_coupling, blockwise_spectra
from hessian.errors import ForwardModeError, HessianError, NonDeterministicError
from hessian.estimators import DiagonalEstimate, TraceEstimate, diagonal, trace
from hessian.lanczos import EigenResult, lanczos
from hessian.linop import DenseOperator, Operator, as_operator
from hessian.operator import HessianOperator, RestrictedOperator
from hessian.slq import SpectralDensity, spectral_density

__all__ = [
    "DenseOperator",
    "DiagonalEstimate",
    "EigenResult",
    "ForwardModeError",
    "HessianError",
    "HessianOperator",
    "NonDeterministicError",
    "Operator",
    "RestrictedOperator",
    "SpectralDensity",
    "TraceEstimate",
    "as_operator",
    "block_coupling",
    "blockwise_spectra",
    "diagonal",
    "lanczos",
    "spectral_density",
    "trace",
]
