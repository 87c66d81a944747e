"""SLQ quadrature and the trace/diagonal estimators on cheap dense operators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessian import diagonal, estimators, spectral_density, trace
from hessian.linop import as_operator, rademacher
from hessian.slq import SpectralDensity, multi_lanczos, quadrature


def planted(eigs: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    A = (Q * eigs) @ Q.T
    return (A + A.T) / 2


EIGS = np.r_[np.linspace(-1.0, 2.0, 30), [5.0, 8.0]]
A = planted(EIGS)


def test_smooth_is_the_gaussian_mixture_with_sigma_a_standard_deviation():
    from scipy.stats import norm

    sd = SpectralDensity(
        nodes=np.array([[0.0, 1.0], [2.0, 2.0]]),
        weights=np.array([[0.3, 0.7], [1.0, 0.0]]),
        dimension=2,
        num_matvecs=0,
    )
    grid = np.linspace(-2, 4, 61)
    want = (
        0.3 * norm.pdf(grid, 0, 0.2) + 0.7 * norm.pdf(grid, 1, 0.2) + norm.pdf(grid, 2, 0.2)
    ) / 2
    np.testing.assert_allclose(sd.smooth(grid, 0.2), want, rtol=1e-12, atol=1e-15)


def test_weights_sum_to_one_and_smooth_integrates_to_one():
    sd = spectral_density(A, num_probes=4, num_steps=10, seed=0, progress=False)
    assert sd.nodes.shape == sd.weights.shape == (4, 10)
    # a Krylov space holds at most n = 32 vectors: the rows are that wide, however many steps
    wide = spectral_density(A, num_probes=2, num_steps=50, seed=0, progress=False)
    assert wide.nodes.shape == wide.weights.shape == (2, 32)
    assert np.abs(sd.weights.sum(axis=1) - 1.0).max() < 1e-12
    assert sd.dimension == 32
    grid = np.linspace(-5, 12, 4001)
    dens = sd.smooth(grid, sigma=0.2)
    assert abs(np.trapezoid(dens, grid) - 1.0) < 1e-6
    mean = np.trapezoid(dens * grid, grid)
    assert abs(mean - sd.trace_estimate() / 32) < 1e-6
    with pytest.raises(ValueError, match="standard deviation"):
        sd.smooth(grid, 0.0)
    with pytest.raises(ValueError, match="num_probes must be an int >= 1, got 0"):
        spectral_density(A, num_probes=0, progress=False)


def test_full_steps_give_exact_eigenvalues():
    sd = spectral_density(A, num_probes=2, num_steps=32, seed=1, progress=False)
    for p in range(2):
        live = sd.weights[p] > 0
        assert live.sum() == 32
        assert np.abs(np.sort(sd.nodes[p]) - np.sort(EIGS)).max() < 1e-8


def test_probes_batched_equal_one_at_a_time():
    both = spectral_density(A, num_probes=3, num_steps=8, seed=4, progress=False)
    assert both.num_matvecs == 24
    op = as_operator(torch.as_tensor(A))
    gen = torch.Generator().manual_seed(4)
    for p in range(3):  # probe p is the p-th draw of the seed; run it alone
        z = rademacher((32,), gen, op.dtype, op.device)
        [(a, b)], used = multi_lanczos(op, [z], [None], 8, True, False, "one")
        nodes, weights = quadrature(a, b, 8)
        assert used == 8
        assert np.abs(both.nodes[p] - nodes).max() < 1e-12
        assert np.abs(both.weights[p] - weights).max() < 1e-12


@pytest.mark.parametrize("reorth", [True, False])
def test_quadrature_reproduces_each_probes_moments(reorth):
    """Gauss quadrature of m Lanczos steps: sum_j w_j theta_j^k = q^T A^k q for k < 2m, q the
    probe z / ||z||. Without reorthogonalization this rests on the three-term recurrence alone."""
    m = 5
    sd = spectral_density(A, num_probes=3, num_steps=m, seed=2, reorth=reorth, progress=False)
    gen = torch.Generator().manual_seed(2)
    for p in range(3):  # probe p is the p-th draw of the seed
        z = rademacher((32,), gen, torch.float64, torch.device("cpu")).numpy()
        q = z / np.linalg.norm(z)
        for k in range(2 * m):
            want = q @ np.linalg.matrix_power(A, k) @ q
            got = (sd.weights[p] * sd.nodes[p] ** k).sum()
            assert abs(got - want) <= 1e-10 * max(1.0, abs(want)), (p, k)


def test_slq_trace_is_unbiased():
    ests = [
        spectral_density(A, num_probes=2, num_steps=6, seed=s, progress=False).trace_estimate()
        for s in range(150)
    ]
    ests = np.array(ests)
    se = ests.std(ddof=1) / np.sqrt(len(ests))
    assert abs(ests.mean() - np.trace(A)) < 3 * se


def test_invariant_krylov_space_pads_with_zero_weight():
    D = np.diag(np.r_[np.ones(10), 2 * np.ones(10)])
    sd = spectral_density(D, num_probes=1, num_steps=8, seed=0, progress=False)
    assert np.isclose(sd.weights.sum(), 1.0)
    live = sd.weights[0] > 1e-14
    assert np.allclose(np.sort(sd.nodes[0][live]), [1.0, 2.0])
    # two steps, then six copies of the last node with weight 0
    assert (sd.weights[0][2:] == 0).all() and (sd.nodes[0][2:] == sd.nodes[0][1]).all()


def three_eigenvalue_matrix() -> np.ndarray:
    """100 x 100, eigenvalues -1 (30 times), 2 (50 times), 5 (20 times): Krylov spaces of size 3."""
    return planted(np.repeat([-1.0, 2.0, 5.0], [30, 50, 20]))


def weight_per_eigenvalue(sd: SpectralDensity) -> np.ndarray:
    """``(num_probes, 3)``: each probe's total weight at -1, 2 and 5 (every node is one of them)."""
    near = np.abs(sd.nodes[..., None] - np.array([-1.0, 2.0, 5.0])) < 1e-3
    assert near.any(axis=-1)[sd.weights > 0].all()
    return (sd.weights[..., None] * near).sum(axis=1)


def test_float32_krylov_breakdown_stops_at_its_rounding_like_float64():
    # float32 rounding leaves beta ~ 1e-7 of its scale after an invariant Krylov space, never the
    # 1e-12 that float64 reaches: the probes ran all 40 steps with duplicated nodes
    H = three_eigenvalue_matrix()
    kw = dict(num_probes=4, num_steps=40, seed=0, progress=False)
    sd64 = spectral_density(torch.tensor(H), **kw)
    sd32 = spectral_density(torch.tensor(H, dtype=torch.float32), **kw)
    assert sd64.num_matvecs == sd32.num_matvecs == 4 * 3
    assert ((sd32.weights > 0).sum(axis=1) == 3).all()
    np.testing.assert_allclose(weight_per_eigenvalue(sd32), weight_per_eigenvalue(sd64), atol=1e-6)


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_trace_estimators_are_unbiased(method):
    exact = np.trace(A)
    runs = [trace(A, method=method, num_matvecs=9, seed=s, progress=False) for s in range(200)]
    est = np.array([r.estimate for r in runs])
    se = est.std(ddof=1) / np.sqrt(len(est))
    assert abs(est.mean() - exact) < 3 * se
    # the reported standard error describes the spread of single estimates
    reported = np.mean([r.stderr for r in runs])
    assert 0.5 < reported / est.std(ddof=1) < 2.0
    assert runs[0].num_matvecs == 9


def test_standard_errors_are_the_sample_ones():
    """On A = [[0, 1], [1, 0]] every Hutchinson sample z^T A z = 2 z_1 z_2 is +-2 and every
    diagonal sample z_i (A z)_i is +-1, so the standard error follows from the mean alone:
    sqrt((c^2 - mean^2) / (m - 1)) with c = 2 and c = 1 (the sample variance with ddof=1)."""
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    for m in (2, 5, 12):
        for seed in range(3):
            tr = trace(swap, num_matvecs=m, seed=seed, progress=False)
            assert np.isclose(tr.stderr, np.sqrt((4 - tr.estimate**2) / (m - 1)), atol=1e-12)
            dg = diagonal(swap, num_matvecs=m, seed=seed, progress=False)
            want = np.sqrt((1 - dg.estimate**2) / (m - 1))
            np.testing.assert_allclose(dg.stderr, want, atol=1e-12)


def test_hutchpp_beats_hutchinson_on_a_low_rank_dominated_matrix():
    B = planted(np.r_[np.full(4, 100.0), np.linspace(0, 1, 60)], seed=3)
    errs = {
        m: np.std(
            [trace(B, method=m, num_matvecs=24, seed=s, progress=False).estimate for s in range(60)]
        )
        for m in ("hutchinson", "hutchpp")
    }
    assert errs["hutchpp"] < 0.2 * errs["hutchinson"]


def test_diagonal_is_unbiased():
    exact = np.diag(A)
    runs = [diagonal(A, num_matvecs=5, seed=s, progress=False) for s in range(300)]
    est = np.stack([r.estimate for r in runs])
    se = est.std(axis=0, ddof=1) / np.sqrt(len(runs))
    z = (est.mean(axis=0) - exact) / se
    assert np.mean(np.abs(z) > 3) < 0.05 and np.abs(z).max() < 5
    assert runs[0].stderr.shape == (32,)


def test_estimator_arguments():
    with pytest.raises(ValueError, match="method"):
        trace(A, method="nope")
    with pytest.raises(ValueError, match="hutchpp needs"):
        trace(A, method="hutchpp", num_matvecs=3)
    with pytest.raises(ValueError, match="hutchinson needs num_matvecs >= 2"):
        trace(A, num_matvecs=1)
    with pytest.raises(ValueError, match="diagonal needs num_matvecs >= 2"):
        diagonal(A, num_matvecs=1)
    for chunk in (0, -1):
        with pytest.raises(ValueError, match=f"chunk must be an int >= 1, got {chunk}"):
            trace(A, chunk=chunk)
        with pytest.raises(ValueError, match=f"chunk must be an int >= 1, got {chunk}"):
            diagonal(A, chunk=chunk)
    sd = spectral_density(A, num_probes=1, num_steps=3, progress=False)
    for sigma in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and > 0"):
            sd.smooth([0.0], sigma)


def test_trace_and_diagonal_progress_bars_count_every_product(monkeypatch, capsys):
    """The bars advance by the products made (hutchpp: its three thirds) and switch off."""
    bars = []

    class Recorded(estimators.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(estimators, "tqdm", Recorded)
    trace(A, method="hutchpp", num_matvecs=14, chunk=5, progress=True)
    diagonal(A, num_matvecs=7, chunk=3, progress=True)
    assert [(b.desc, b.n, b.total) for b in bars] == [
        ("trace (hutchpp)", 14, 14),
        ("diagonal", 7, 7),
    ]
    assert "trace (hutchpp)" in capsys.readouterr().err
    # n = 32 < 99 / 3: the sketch has 32 columns, so 33 + 32 + 33 products, all counted
    tr = trace(A, method="hutchpp", num_matvecs=99, progress=True)
    assert tr.num_matvecs == 98 and (bars[-1].n, bars[-1].total) == (98, 98)
    capsys.readouterr()
    trace(A, num_matvecs=4, progress=False)
    diagonal(A, num_matvecs=4, progress=False)
    assert capsys.readouterr().err == ""


def test_smooth_takes_any_grid_tensor_and_names_a_bad_sigma():
    """A grid tensor that requires grad is read as numbers; a sigma that is not one is named."""
    sd = spectral_density(planted(np.linspace(-1, 1, 6)), num_probes=2, num_steps=3, progress=False)
    grid = torch.linspace(-1, 1, 5, requires_grad=True)
    np.testing.assert_array_equal(sd.smooth(grid, 0.2), sd.smooth(grid.tolist(), 0.2))
    assert sd.smooth(grid.reshape(5, 1), torch.tensor(0.2)).shape == (5, 1)
    for sigma in (None, torch.tensor([0.1, 0.2])):
        with pytest.raises(ValueError, match="sigma is a standard deviation"):
            sd.smooth(grid, sigma)


def test_smooth_names_a_grid_that_is_not_real_finite_numbers():
    """None and a complex grid were read as NaN and as their real parts."""
    sd = spectral_density(A, num_probes=1, num_steps=3, progress=False)
    for grid in (None, "0.5", np.array([1j])):
        with pytest.raises(TypeError, match="grid must hold real numbers"):
            sd.smooth(grid, 0.1)
    with pytest.raises(ValueError, match="grid holds NaN/Inf"):
        sd.smooth([0.0, float("nan")], 0.1)
    with pytest.raises(ValueError, match="sigma is a standard deviation"):
        sd.smooth([0.0], True)
    with pytest.raises(ValueError, match="reorth must be True or False"):
        spectral_density(A, reorth="no", progress=False)
