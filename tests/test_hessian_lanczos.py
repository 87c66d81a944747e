"""Lanczos against numpy.linalg.eigvalsh on known, clustered and degenerate spectra and TinyGPT."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from problems import tiny_gpt_problem

from hessian import (
    HessianOperator,
    as_operator,
    block_coupling,
    diagonal,
    lanczos,
    spectral_density,
    trace,
)
from lab.models import lm_loss
from partition import Partition, TensorBlocks

N = 120


def planted(eigs: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    A = (Q * eigs) @ Q.T
    return (A + A.T) / 2


SPECTRA = {
    "known": np.linspace(-3.0, 10.0, N),
    "clustered": np.r_[
        10 + 1e-5 * np.arange(4), 5 + 1e-3 * np.arange(40), np.linspace(-1, 1, N - 44)
    ],
    "degenerate": np.r_[[9.0, 9.0, 9.0, 4.0, 4.0], np.linspace(-2.0, 3.0, N - 5)],
}


def expected(ref: np.ndarray, which: str, k: int) -> np.ndarray:
    return {
        "LA": ref[::-1][:k],
        "SA": ref[:k],
        "LM": ref[np.argsort(-np.abs(ref), kind="stable")][:k],
        "BE": np.sort(np.r_[ref[: k // 2], ref[len(ref) - (k - k // 2) :]]),
    }[which]


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
@pytest.mark.parametrize("max_basis", [None, 20])
def test_matches_eigvalsh(name, which, max_basis):
    """With ``max_basis=20`` (of n = 120) the run restarts several times and still converges."""
    A = planted(SPECTRA[name])
    ref = np.linalg.eigvalsh(A)
    block = 3 if name == "degenerate" else 1
    res = lanczos(
        A,
        k=5,
        which=which,
        tol=1e-11,
        seed=1,
        block_size=block,
        max_basis=max_basis,
        progress=False,
    )
    if max_basis is not None:
        assert res.num_steps * block > 3 * max_basis, "the run should have restarted"
    assert np.abs(res.values - expected(ref, which, 5)).max() < 1e-8
    V = res.vectors.numpy()
    assert np.abs(V.T @ V - np.eye(5)).max() < 1e-10
    true = np.linalg.norm(A @ V - V * res.values, axis=0)
    assert np.allclose(res.residuals, true, rtol=1e-6, atol=1e-14)
    assert res.converged.all()
    assert res.num_matvecs <= res.num_steps * block + 5


def test_restart_right_before_the_step_limit_returns_true_ritz_pairs():
    A = planted(SPECTRA["known"])
    # max_basis=8, k=3: restarts at steps 8, 12, 16 (keep 4, refill to 8), so step 12 ends on one
    for steps in range(10, 16):
        res = lanczos(A, k=3, max_iter=steps, max_basis=8, tol=1e-14, progress=False)
        V = res.vectors.numpy()
        assert np.abs(V.T @ V - np.eye(3)).max() < 1e-10
        assert np.allclose(res.values, np.diag(V.T @ A @ V), rtol=1e-10)
        true = np.linalg.norm(A @ V - V * res.values, axis=0)
        assert np.allclose(res.residuals, true, rtol=1e-10)


def test_residuals_are_true_even_when_not_converged():
    A = planted(SPECTRA["known"])
    res = lanczos(A, k=3, max_iter=8, tol=1e-12, progress=False)
    V = res.vectors.numpy()
    true = np.linalg.norm(A @ V - V * res.values, axis=0)
    assert np.allclose(res.residuals, true, rtol=1e-10)
    assert not res.converged.all()
    assert res.num_matvecs == 8 + 3


def test_accepts_every_operator_kind():
    A = planted(SPECTRA["known"])
    top = np.linalg.eigvalsh(A)[-2:][::-1]

    class Fn:
        shape = A.shape

        def __call__(self, v):
            return A @ np.asarray(v)

    kinds = [A, torch.as_tensor(A), scipy.sparse.linalg.aslinearoperator(A), Fn()]
    for op in kinds:
        res = lanczos(op, k=2, tol=1e-11, progress=False)
        assert np.abs(res.values - top).max() < 1e-8


def test_a_dense_operators_scipy_view_has_the_transpose():
    """``to_scipy()`` of a rectangular matrix: products with A, and with A^T through rmatvec and
    ``.H`` (what svds needs), each 1-D for a vector and 2-D for a matrix."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 5))
    op = as_operator(A).to_scipy()
    x, y = rng.standard_normal(5), rng.standard_normal(3)
    np.testing.assert_allclose(op.matvec(x), A @ x, rtol=1e-14)
    np.testing.assert_allclose(op.rmatvec(y), A.T @ y, rtol=1e-14)
    np.testing.assert_allclose(op.H @ y, A.T @ y, rtol=1e-14)
    np.testing.assert_allclose(op.matmat(np.c_[x, 2 * x]), np.c_[A @ x, 2 * A @ x], rtol=1e-14)
    np.testing.assert_allclose(op.H.matmat(np.c_[y, y]), np.c_[A.T @ y, A.T @ y], rtol=1e-14)
    dense, want = as_operator(A), A @ x
    copy = dense.to_dense()  # a copy: writing to it leaves the operator (and A) alone
    copy[0] = 0.0
    np.testing.assert_allclose(dense.matvec(torch.as_tensor(x)).numpy(), want, rtol=1e-14)


def test_integer_matrices_are_taken_as_float64():
    for A in (np.array([[2, 1], [1, 2]]), torch.tensor([[2, 1], [1, 2]])):
        assert as_operator(A).dtype == torch.float64
        res = lanczos(A, k=2, progress=False)
        np.testing.assert_allclose(res.values, [3.0, 1.0], atol=1e-12)


def test_asymmetry_is_refused_above_one_percent_of_the_largest_entry():
    A = planted(SPECTRA["known"])
    scale = np.abs(A).max()
    for gap, refused in ((0.005, False), (0.03, True)):
        B = A.copy()
        B[0, 1] += gap * scale
        if refused:
            with pytest.raises(ValueError, match="needs a symmetric operator"):
                lanczos(B, k=1, progress=False)
        else:
            lanczos(B, k=1, progress=False)


def test_tinygpt_dense_hessian():
    model, (x, y) = tiny_gpt_problem(seed=0)
    H = HessianOperator(model, lm_loss, (x, y), mode="forward")
    D = H.to_dense().numpy()
    ref = np.linalg.eigvalsh((D + D.T) / 2)
    for which in ("LA", "SA"):
        res = lanczos(D, k=4, which=which, tol=1e-10, seed=0, progress=False)
        assert np.abs(res.values - expected(ref, which, 4)).max() < 1e-8
        V = res.vectors.numpy()
        assert np.abs(V.T @ V - np.eye(4)).max() < 1e-10
        assert np.allclose(
            res.residuals, np.linalg.norm(D @ V - V * res.values, axis=0), rtol=1e-6, atol=1e-13
        )
    # the matrix-free operator takes the same steps as its dense matrix
    a = lanczos(H, k=2, max_iter=12, seed=3, progress=False)
    b = lanczos(D, k=2, max_iter=12, seed=3, progress=False)
    assert np.abs(a.values - b.values).max() < 1e-10
    assert np.abs(a.residuals - b.residuals).max() < 1e-10


def test_bad_arguments():
    A = planted(SPECTRA["known"])
    with pytest.raises(ValueError, match="which"):
        lanczos(A, k=2, which="XX", progress=False)
    with pytest.raises(ValueError, match="k must be"):
        lanczos(A, k=0, progress=False)
    with pytest.raises(ValueError, match=rf"k must be in \[1, n={N}\], got {N + 1}"):
        lanczos(A, k=N + 1, progress=False)
    with pytest.raises(ValueError, match="square"):
        lanczos(np.zeros((3, 4)), k=1, progress=False)
    with pytest.raises(TypeError, match="linear operator"):
        lanczos("nope", k=1, progress=False)
    with pytest.raises(ValueError, match="max_basis=6 leaves no room.*at least k"):
        lanczos(A, k=5, max_basis=6, progress=False)
    with pytest.raises(ValueError, match="max_iter=2 steps.*k=5"):
        lanczos(A, k=5, max_iter=2, max_basis=20, progress=False)
    with pytest.raises(ValueError, match="max_iter must be an int >= 1, got 0"):
        lanczos(A, k=1, max_iter=0, progress=False)
    with pytest.raises(ValueError, match="k must be an int >= 1, got 2.5"):
        lanczos(A, k=2.5, progress=False)
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got -3"):
        lanczos(A, k=1, block_size=-3, progress=False)
    with pytest.raises(ValueError, match=r"symmetric operator: max \|A - A\^T\|.*\(A \+ A.T\) / 2"):
        lanczos(np.triu(np.ones((4, 4))), k=1, progress=False)
    with pytest.raises(TypeError, match="must be real"):
        lanczos(np.eye(3) * 1j, k=1, progress=False)


def test_seeds_and_chunks_that_are_not_integers_are_refused_everywhere():
    A = torch.as_tensor(planted(SPECTRA["known"]))
    part = Partition([TensorBlocks("x", (A.shape[0],), "elements", {})])
    calls = {
        "lanczos": lambda seed: lanczos(A, k=1, seed=seed, progress=False),
        "spectral_density": lambda seed: spectral_density(A, 2, 3, seed=seed, progress=False),
        "trace": lambda seed: trace(A, num_matvecs=3, seed=seed, progress=False),
        "diagonal": lambda seed: diagonal(A, num_matvecs=3, seed=seed, progress=False),
        "block_coupling": lambda seed: block_coupling(
            A, part, num_samples=2, seed=seed, progress=False
        ),
    }
    for call in calls.values():
        for seed in (1.5, True, "0"):
            with pytest.raises(
                ValueError, match=f"seed must be an int or a torch.Generator, got {seed!r}"
            ):
                call(seed)
        call(np.int64(3))  # integer types are seeds
        for seed in (2**64, -(2**63) - 1):  # beyond what torch.manual_seed takes
            with pytest.raises(ValueError, match=r"seed must lie in \[-2\*\*63, 2\*\*64\)"):
                call(seed)
        call(2**64 - 1)
        call(-(2**63))

    class CudaGenerator(torch.Generator):  # a CUDA generator's device, without CUDA
        device = torch.device("cuda")

    with pytest.raises(ValueError, match="CPU torch.Generator, got one on cuda"):
        trace(A, num_matvecs=3, seed=CudaGenerator(), progress=False)
    with pytest.raises(ValueError, match="chunk must be an int >= 1, got 0"):
        as_operator(A).to_dense(chunk=0)


def test_a_generator_is_a_seed_that_advances():
    A = torch.as_tensor(planted(SPECTRA["known"]))

    def estimate(seed):
        return trace(A, num_matvecs=6, seed=seed, progress=False).estimate

    gen = torch.Generator().manual_seed(5)
    first, second = estimate(gen), estimate(gen)
    assert first == estimate(5)  # a fresh generator seeded 5 draws what seed=5 draws
    assert second != first  # the same generator goes on where it stopped


def test_integer_like_counts_sparse_and_slightly_asymmetric_matrices_are_accepted():
    A = planted(SPECTRA["known"])
    ref = lanczos(A, k=2, progress=False).values
    for k in (np.int64(2), torch.tensor(2)):
        assert np.allclose(lanczos(A, k=k, progress=False).values, ref, atol=1e-10)
    sparse = torch.as_tensor(A).to_sparse()
    assert np.allclose(lanczos(sparse, k=2, progress=False).values, ref, atol=1e-10)
    # float32 rounding of a computed Hessian: a 1e-4 relative asymmetry is not refused
    noisy = torch.as_tensor(A) * (
        1
        + 1e-4
        * torch.rand(A.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    lanczos(noisy, k=1, progress=False)


@pytest.mark.parametrize(
    ("n", "k", "block_size", "max_basis"),
    [(10, 3, 3, None), (10, 3, 4, None), (5, 5, 2, 5), (28, 18, 4, 26), (28, 14, 4, 26)],
)
def test_blocks_that_do_not_fit_the_space_narrow(n, k, block_size, max_basis):
    """The last block narrows to the directions left: no zero vectors, no fake eigenvalues."""
    A = planted(np.arange(1.0, n + 1), seed=n)
    res = lanczos(A, k=k, which="SA", block_size=block_size, max_basis=max_basis, progress=False)
    assert np.abs(res.values - np.arange(1.0, k + 1)).max() < 1e-8
    V = res.vectors.numpy()
    assert np.abs(V.T @ V - np.eye(k)).max() < 1e-10
    assert res.converged.all()


def test_blocks_stay_orthonormal_over_a_spectrum_ten_decades_wide():
    """A block's later columns lose their parts along its earlier ones with coefficients as large
    as the top eigenvalue, which brought the earlier columns' rounding along the basis back into
    them: orthogonality went to 1e-7 in one step and to O(1) in six, with Ritz values of 2e8 for
    eigenvalues of 1. Each column is now projected against the basis again."""
    top = 1e10
    A = planted(np.r_[top, top / 2, np.linspace(0.0, 1.0, 58)], seed=1)
    ref = np.linalg.eigvalsh(A)[::-1][:4]
    res = lanczos(A, k=4, block_size=4, progress=False)
    V = res.vectors.numpy()
    assert np.abs(V.T @ V - np.eye(4)).max() < 1e-12
    assert res.converged.all() and (res.residuals <= 1e-8 * top).all()
    assert np.abs(res.values - ref).max() <= 1e-8 * top  # the residual bounds the error


def test_largest_magnitude_takes_the_negative_end():
    """``LM`` orders by |theta|: here two of the three largest magnitudes are negative."""
    A = planted(np.r_[-10.0, -9.0, np.linspace(-1.0, 3.0, 58)])
    for max_basis in (None, 20):
        res = lanczos(A, k=3, which="LM", max_basis=max_basis, progress=False)
        assert np.abs(res.values - [-10.0, -9.0, 3.0]).max() < 1e-8


def test_callback_sees_the_wanted_pairs_of_every_step():
    A = planted(SPECTRA["known"])
    seen = []
    res = lanczos(A, k=3, which="SA", progress=False, callback=lambda *args: seen.append(args))
    assert len(seen) == res.num_steps - 2  # from the step with k = 3 Ritz values on
    assert all(len(values) == len(residuals) == 3 for _, values, residuals in seen)
    matvecs = [n for n, _, _ in seen]
    assert matvecs == list(range(3, res.num_steps + 1))  # one product per step
    assert np.array_equal(seen[-1][1], res.values)  # the last step's wanted values are the result


def test_a_run_that_ends_right_after_an_invariant_subspace_is_not_converged():
    """Three distinct eigenvalues: the Krylov space is invariant after three steps, with every
    Ritz pair exact, but the second copy of 3 is not seen yet; a run cut off then says so."""
    A = planted(np.repeat([1.0, 2.0, 3.0], 10))
    short = lanczos(A, k=2, max_iter=4, progress=False)
    assert (short.residuals < 1e-12).all() and not short.converged.any()
    full = lanczos(A, k=2, progress=False)
    assert np.abs(full.values - [3.0, 3.0]).max() < 1e-8 and full.converged.all()


def test_residuals_from_the_lanczos_relation_save_the_last_products():
    """true_residuals=False: each wanted pair's residual is |B_{m+1} s_i^last|, which equals the
    recomputed ||A y - theta y|| to rounding, without the k products that recompute it."""
    A = planted(SPECTRA["known"])
    true = lanczos(A, k=3, which="SA", progress=False)
    cheap = lanczos(A, k=3, which="SA", true_residuals=False, progress=False)
    assert cheap.num_matvecs == true.num_matvecs - 3
    np.testing.assert_array_equal(cheap.values, true.values)
    V = cheap.vectors.numpy()
    recomputed = np.linalg.norm(A @ V - V * cheap.values, axis=0)
    np.testing.assert_allclose(cheap.residuals, recomputed, rtol=0, atol=1e-12)


def test_invariant_subspaces_do_not_stop_the_search():
    """A null space of dimension 20: the first Krylov space holds one copy of 0 and is invariant
    (every Ritz pair exact at once); the search must go on to the other copies. With restarts
    and single vectors the Krylov space never holds a second copy (the documented multiplicity
    limit), so that run uses blocks of 3."""
    A = planted(np.r_[np.zeros(20), np.arange(1.0, 11.0)], seed=3)
    for block_size, max_basis in ((1, None), (3, 12)):
        res = lanczos(
            A, k=3, which="SA", block_size=block_size, max_basis=max_basis, progress=False
        )
        assert np.abs(res.values).max() < 1e-8 and res.converged.all()
    # rank one: after the first two steps every step is invariant; the run must still end
    for max_basis in (None, 8):
        top = lanczos(planted(np.r_[5.0, np.zeros(29)]), k=2, max_basis=max_basis, progress=False)
        assert np.abs(top.values - [5.0, 0.0]).max() < 1e-8 and top.converged.all()
        assert top.num_steps < 10


def test_low_rank_hessian_smallest_eigenvalues():
    """Softmax regression: the Hessian is singular (softmax ignores a shift of the logits)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    H = HessianOperator(model, loss_fn, (x, y))
    ref = np.linalg.eigvalsh(H.to_dense().numpy())
    res = lanczos(H, k=3, which="SA", progress=False)
    assert np.abs(res.values - ref[:3]).max() < 1e-8


def test_non_finite_operators_and_bad_arguments_are_named():
    """A NaN/Inf operator, a callable of the wrong output shape, a bad tol or max_basis: named
    errors, not scipy's "array must not contain infs or NaNs" or a torch shape error."""
    A = planted(np.linspace(-1.0, 1.0, 12))
    for bad in (np.nan, np.inf):
        B = A.copy()
        B[2, 2] = bad
        with pytest.raises(ValueError, match="operator returned NaN/Inf for a finite vector"):
            lanczos(B, k=2, progress=False)
        with pytest.raises(ValueError, match="operator returned NaN/Inf"):
            spectral_density(B, num_probes=2, num_steps=4, progress=False)
        with pytest.raises(ValueError, match="operator returned NaN/Inf"):
            trace(B, num_matvecs=4, progress=False)

    big = np.diag(np.full(4, 3e38, dtype=np.float32))  # finite entries whose sum overflows
    np.testing.assert_array_equal(as_operator(big).matvec(torch.ones(4)), np.diag(big))

    class Column:  # a callable returning (n, 1) is fine, (n - 1,) is not
        shape = A.shape

        def __init__(self, cut: int = 0):
            self.cut = cut

        def __call__(self, v):
            return (A @ np.asarray(v))[: len(A) - self.cut, None]

    got = lanczos(Column(), k=2, progress=False).values
    np.testing.assert_allclose(got, np.linalg.eigvalsh(A)[::-1][:2], atol=1e-10)
    with pytest.raises(
        ValueError, match=r"returned a product of shape \(11, 1\), expected \(12,\)"
    ):
        lanczos(Column(1), k=2, progress=False)
    for tol in (-1.0, float("nan"), float("inf"), "1e-8"):
        with pytest.raises(ValueError, match="tol is a relative residual"):
            lanczos(A, k=2, tol=tol, progress=False)
    with pytest.raises(ValueError, match="max_basis must be an int >= 1, got 10.5"):
        lanczos(A, k=2, max_basis=10.5, progress=False)


def test_float32_pairs_at_rounding_level_are_converged():
    """A float32 operator's true residuals cannot go below its own rounding (~1e-7 relative):
    pairs that the iteration accepted, accurate to float32, count as converged at the default tol,
    and a far-off pair still does not."""
    A = planted(SPECTRA["known"]).astype(np.float32)
    res = lanczos(A, k=3, progress=False)
    assert res.vectors.dtype == torch.float32
    assert np.abs(res.values - np.linalg.eigvalsh(A.astype(np.float64))[::-1][:3]).max() < 1e-4
    assert res.residuals.max() < 1e-4 * np.abs(res.values).max()
    assert res.converged.all()
    early = lanczos(A, k=3, max_iter=5, progress=False)
    assert not early.converged.any()


def test_a_dense_hessian_that_requires_grad_is_taken_as_numbers():
    """jacfwd(grad(f)) at a vector that requires grad (a model's parameters) returns a matrix
    that requires grad; every algorithm takes its values, as for the detached matrix."""
    w = torch.nn.Parameter(torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=torch.float64))

    def f(x):
        return torch.log1p(x.square()).sum() + x.prod() + torch.tanh(x).sum() ** 2

    D = torch.func.jacfwd(torch.func.grad(f))(w)
    assert D.requires_grad
    plain = D.detach()
    part = Partition([TensorBlocks("a", (1,), "tensor", {}), TensorBlocks("b", (3,), "tensor", {})])
    runs = [
        lambda A: lanczos(A, k=2, seed=0, progress=False).values,
        lambda A: trace(A, num_matvecs=6, seed=0, progress=False).estimate,
        lambda A: diagonal(A, num_matvecs=4, seed=0, progress=False).estimate,
        lambda A: block_coupling(A, part, num_samples=2, seed=0, progress=False).mass,
        lambda A: block_coupling(A, part, exact=True, progress=False).mass,
        lambda A: spectral_density(A, num_probes=2, num_steps=3, progress=False).nodes,
    ]
    for run in runs:
        np.testing.assert_array_equal(run(D), run(plain))
    assert not as_operator(D).matvec(torch.ones(4)).requires_grad


def test_a_callable_whose_products_require_grad_is_taken_as_numbers():
    """A hand-written HVP, jvp(grad(f)) at a model's parameters, returns tensors that require
    grad; the callable operator takes their values."""
    w = torch.nn.Parameter(torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=torch.float64))

    def f(x):
        return torch.log1p(x.square()).sum() + x.prod()

    class HVP:
        shape = (4, 4)

        def __call__(self, v):
            return torch.func.jvp(torch.func.grad(f), (w,), (v,))[1]

    ref = np.linalg.eigvalsh(torch.func.jacfwd(torch.func.grad(f))(w).detach().numpy())
    got = lanczos(HVP(), k=4, which="SA", progress=False).values
    np.testing.assert_allclose(got, ref, atol=1e-12)


def test_flags_callbacks_and_callable_shapes_of_the_wrong_kind_are_named():
    """A string flag would pass for True, a callback is called only after the first step, and a
    callable's shape is read as (m, n): each is checked before any product."""
    A = planted(np.linspace(-1.0, 1.0, 6))
    with pytest.raises(ValueError, match="true_residuals must be True or False, got 'no'"):
        lanczos(A, k=2, true_residuals="no", progress=False)
    with pytest.raises(TypeError, match="callback must be None or a function"):
        lanczos(A, k=2, callback="print", progress=False)

    class Shaped:
        def __init__(self, shape):
            self.shape = shape

        def __call__(self, v):
            return A @ np.asarray(v)

    for shape in ((6,), ("6", 6), (-6, -6)):
        with pytest.raises(ValueError, match="shape must be a pair of sizes"):
            lanczos(Shaped(shape), k=1, progress=False)
