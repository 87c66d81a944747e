"""Shared, generic test fixtures."""

import pytest
import torch


@pytest.fixture
def float64():
    """Run the test with float64 as torch's default dtype, restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(previous)
