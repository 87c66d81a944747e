"""Shared, generic test fixtures.

The suite's models are tiny, so one BLAS/OpenMP thread per process is fastest and keeps the
multi-process tests from oversubscribing the cores (measured: a 33 s test drops to 1 s on two
busy cores). Set before torch is imported; child processes and notebook kernels inherit it.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def float64():
    """Run the test with float64 as torch's default dtype, restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(previous)
