"""Block-diagonal quadratics against autograd, torch.func.hessian and numpy eigvalsh."""

import numpy as np
import pytest
import torch
from torch.func import grad, hessian

from lab.quadratic import BlockDiagonalQuadratic, quadratic_loss

SIZES = (3, 5, 1, 4)
RANGES = [(1.0, 2.0), (10.0, 1000.0), (0.5, 0.5), (1e-3, 1e3)]


@pytest.fixture
def problem():
    return BlockDiagonalQuadratic.random(SIZES, RANGES, seed=0)


def test_grad_equals_autograd(problem):
    x = problem.random_point(seed=1)
    torch.testing.assert_close(problem.grad(x), grad(problem.loss)(x), rtol=1e-13, atol=1e-12)
    y = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(problem.loss(y), y)
    torch.testing.assert_close(problem.grad(x), g, rtol=1e-13, atol=1e-12)


def test_hessian_equals_torch_func_hessian(problem):
    x = problem.random_point(seed=2)
    H = hessian(problem.loss)(x)
    torch.testing.assert_close(problem.hessian, H, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(problem.hessian, problem.hessian.T, rtol=0, atol=0)


def test_loss_closed_form_and_minimizer(problem):
    x = problem.random_point(seed=3)
    H = problem.hessian.numpy()
    xn = x.numpy()
    assert float(problem.loss(x)) == pytest.approx(0.5 * xn @ H @ xn, rel=1e-13)
    x_star = problem.minimizer
    assert x_star.shape == (problem.dim,) and float(problem.loss(x_star)) == 0.0
    assert torch.equal(problem.grad(x_star), torch.zeros(problem.dim, dtype=torch.float64))
    # Unique minimizer: H is positive definite.
    assert np.linalg.eigvalsh(H).min() > 0


def test_eigenvalues_land_in_ranges(problem):
    for block, eigs, (lo, hi) in zip(
        problem.blocks, problem.block_eigenvalues, RANGES, strict=True
    ):
        ref = np.linalg.eigvalsh(block.numpy())
        np.testing.assert_allclose(ref, eigs.numpy(), rtol=1e-10, atol=1e-12 * hi)
        # eigvalsh is backward stable: absolute error ~ u * ||H_b|| = u * hi.
        assert lo - 1e-12 * hi <= ref.min() and ref.max() <= hi * (1 + 1e-12)
    np.testing.assert_allclose(
        np.linalg.eigvalsh(problem.hessian.numpy()), problem.eigenvalues.numpy(), rtol=1e-9
    )
    # Endpoints are pinned, so each block's condition number is hi / lo (1 for size 1).
    expected = [2.0, 100.0, 1.0, 1e6]
    np.testing.assert_allclose(problem.condition_numbers.numpy(), expected, rtol=1e-12)
    assert problem.condition_number == pytest.approx(1e3 / 1e-3, rel=1e-12)


@pytest.mark.parametrize("spacing", ["uniform", "log"])
def test_spacing_without_endpoints_stays_in_range(spacing):
    p = BlockDiagonalQuadratic.random(
        [50], [(2.0, 8.0)], seed=0, spacing=spacing, include_endpoints=False
    )
    eigs = p.block_eigenvalues[0]
    assert 2.0 <= float(eigs.min()) and float(eigs.max()) <= 8.0
    # Uniform spacing puts the median near 5, log spacing near sqrt(2 * 8) = 4.
    median = float(eigs.median())
    assert abs(median - (5.0 if spacing == "uniform" else 4.0)) < 0.6


def test_block_structure(problem):
    H = problem.hessian
    assert H.shape == (13, 13) and H.dtype == torch.float64
    mask = torch.zeros_like(H, dtype=torch.bool)
    for sl, block in zip(problem.block_slices, problem.blocks, strict=True):
        mask[sl, sl] = True
        assert torch.equal(H[sl, sl], block)
    assert torch.count_nonzero(H[~mask]) == 0
    # Rotations are non-trivial: a block of size >= 2 is not diagonal.
    big = problem.blocks[1]
    assert (big - torch.diag(torch.diagonal(big))).abs().max() > 1.0


def test_seeded():
    a = BlockDiagonalQuadratic.random([4, 2], (1.0, 10.0), seed=5)
    b = BlockDiagonalQuadratic.random([4, 2], (1.0, 10.0), seed=5)
    c = BlockDiagonalQuadratic.random([4, 2], (1.0, 10.0), seed=6)
    assert torch.equal(a.hessian, b.hessian) and not torch.equal(a.hessian, c.hessian)
    assert torch.equal(a.random_point(0), b.random_point(0))


def test_module_parameters_are_the_blocks(problem):
    x0 = problem.random_point(seed=4)
    module = problem.module(x0)
    names = [n for n, _ in module.named_parameters()]
    assert names == ["x.0", "x.1", "x.2", "x.3"]
    assert [p.numel() for p in module.parameters()] == list(SIZES)
    loss = quadratic_loss(module)
    assert loss.item() == pytest.approx(problem.loss(x0).item(), rel=1e-14)
    grads = torch.autograd.grad(loss, list(module.parameters()))
    torch.testing.assert_close(torch.cat(grads), problem.grad(x0), rtol=1e-13, atol=1e-12)
    assert torch.equal(
        torch.cat([p.detach() for p in problem.module().parameters()]), problem.minimizer
    )


@pytest.mark.parametrize(
    "sizes, ranges, match",
    [
        ([], (1.0, 2.0), "block_sizes"),
        ([2, 0], (1.0, 2.0), "block_sizes"),
        ([2, 3], [(1.0, 2.0)], "2 blocks"),
        ([2], [(0.0, 2.0)], "0 < lo <= hi"),
        ([2], [(3.0, 2.0)], "0 < lo <= hi"),
        ([2], [(1.0, float("inf"))], "finite condition number"),
        ([2], [(1e-300, 1e300)], "finite condition number"),
    ],
)
def test_bad_arguments_raise(sizes, ranges, match):
    with pytest.raises(ValueError, match=match):
        BlockDiagonalQuadratic.random(sizes, ranges, seed=0)


def test_one_range_pair_may_be_numpy_numbers():
    import numpy as np

    a = BlockDiagonalQuadratic.random([2, 3], np.array([1, 10]), seed=0)
    b = BlockDiagonalQuadratic.random([2, 3], (1.0, 10.0), seed=0)
    assert torch.equal(a.hessian, b.hessian)


def test_wrong_x_shape_raises(problem):
    with pytest.raises(ValueError, match=r"x must have shape \(13,\)"):
        problem.loss(torch.zeros(12, dtype=torch.float64))


def test_random_point_scale_and_size_one_blocks_not_pinned():
    p = BlockDiagonalQuadratic.random([1, 3], [(1.0, 100.0), (1.0, 100.0)], seed=0)
    torch.testing.assert_close(
        p.random_point(7, scale=3.0), 3.0 * p.random_point(7), rtol=0, atol=0
    )
    # endpoints are pinned for blocks of size >= 2 only: a 1x1 block draws its eigenvalue
    (lam,) = p.block_eigenvalues[0].tolist()
    assert 1.0 < lam < 100.0
    assert p.block_eigenvalues[1].tolist()[::2] == [1.0, 100.0]


def test_loss_and_grad_keep_the_dtype_of_x(problem):
    x = problem.random_point(seed=5).float()
    assert problem.loss(x).dtype == problem.grad(x).dtype == torch.float32
    torch.testing.assert_close(problem.grad(x), (problem.hessian @ x.double()).float())


@pytest.mark.parametrize("sizes", [[2.0, 3], [2, True], ["2"]])
def test_block_sizes_must_be_ints(sizes):
    """True was taken for a size of 1 and failed in torch.rand with a bare TypeError."""
    with pytest.raises(ValueError, match="block_sizes must be a non-empty list of positive ints"):
        BlockDiagonalQuadratic.random(sizes, (1.0, 2.0), seed=0)


def test_numpy_int_block_sizes_are_sizes():
    a = BlockDiagonalQuadratic.random(np.array([2, 3]), (1.0, 2.0), seed=0)
    assert a.block_sizes == (2, 3) and all(type(s) is int for s in a.block_sizes)
    assert torch.equal(a.hessian, BlockDiagonalQuadratic.random([2, 3], (1.0, 2.0), seed=0).hessian)
