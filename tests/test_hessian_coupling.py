"""Block coupling (exact and Hutchinson) and blockwise spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from problems import tiny_gpt_problem

import partition
from hessian import (
    HessianOperator,
    as_operator,
    block_coupling,
    blockwise_spectra,
    spectral_density,
)
from lab.models import lm_loss


def flat_partition(sizes: list[int]) -> partition.Partition:
    """One 1-D tensor per block, so a dense matrix's flat order is the block order."""
    return partition.Partition(
        partition.TensorBlocks(f"t{i}", (s,), "tensor", {}) for i, s in enumerate(sizes)
    )


def block_diag(sizes: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    H = np.zeros((n, n))
    o = 0
    for s in sizes:
        B = rng.standard_normal((s, s))
        H[o : o + s, o : o + s] = B + B.T
        o += s
    return H


def test_exact_planted_block_diagonal_has_r_diag_one():
    sizes = [3, 5, 4, 6]
    H = block_diag(sizes)
    part = flat_partition(sizes)
    cp = block_coupling(H, part, exact=True, seed=0, progress=False)
    assert cp.exact and cp.stderr is None
    assert cp.r_diag == pytest.approx(1.0, abs=1e-15)
    ref = partition.BlockCoupling.from_dense(part, H)
    assert np.abs(cp.mass - ref.mass).max() < 1e-12
    # a random relabelling of the same entries destroys the structure
    assert cp.r_diag_null < 0.6
    # the estimate also finds r_diag = 1: off-diagonal probes see exact zeros
    est = block_coupling(H, part, num_samples=4, seed=0, progress=False)
    assert est.r_diag == pytest.approx(1.0, abs=1e-12)
    assert np.trace(est.mass) / est.mass.sum() == pytest.approx(1.0, abs=1e-12)


def test_estimated_null_is_unbiased_for_its_closed_form():
    """E[r_diag_null] = (D + (F - D) q) / F: the diagonal entries stay in their block, and an
    off-diagonal entry lands in a diagonal block with probability q = sum s(s-1) / (n(n-1))."""
    sizes = [2, 3, 4]
    rng = np.random.default_rng(1)
    B = rng.standard_normal((9, 9))
    H = B + B.T
    D, F = float(np.sum(np.diag(H) ** 2)), float(np.sum(H**2))
    q = sum(s * (s - 1) for s in sizes) / (9 * 8)
    want = (D + (F - D) * q) / F
    part = flat_partition(sizes)
    nulls = [
        block_coupling(H, part, num_samples=4, seed=s, progress=False).r_diag_null
        for s in range(300)
    ]
    assert abs(np.mean(nulls) - want) < 4 * np.std(nulls, ddof=1) / np.sqrt(len(nulls))


def test_hutchinson_is_unbiased_on_a_dense_matrix():
    sizes = [2, 3, 4]
    rng = np.random.default_rng(1)
    B = rng.standard_normal((9, 9))
    H = B + B.T
    part = flat_partition(sizes)
    exact = block_coupling(H, part, exact=True, progress=False).mass
    runs = np.stack(
        [block_coupling(H, part, num_samples=2, seed=s, progress=False).mass for s in range(400)]
    )
    se = runs.std(axis=0, ddof=1) / np.sqrt(len(runs))
    z = (runs.mean(axis=0) - exact) / se
    assert np.abs(z).max() < 4 and np.mean(np.abs(z) > 3) < 0.1


def test_hutchinson_standard_errors_match_the_closed_form():
    """est[a,b] = z_b^T M z_b with M = H_ab^T H_ab and Rademacher z_b has variance
    2 (||M||_F^2 - sum_i M_ii^2); mass[a,b] averages the independent est[a,b] and est[b,a]."""
    sizes = [2, 3, 4]
    rng = np.random.default_rng(2)
    B = rng.standard_normal((9, 9))
    H = B + B.T
    S = 4000
    cp = block_coupling(H, flat_partition(sizes), num_samples=S, seed=0, progress=False)
    edges = np.cumsum([0, *sizes])
    var = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            Hab = H[edges[a] : edges[a + 1], edges[b] : edges[b + 1]]
            M = Hab.T @ Hab
            var[a, b] = 2 * ((M * M).sum() - (np.diag(M) ** 2).sum()) / S
    want = 0.5 * np.sqrt(var + var.T)
    np.fill_diagonal(want, np.sqrt(np.diag(var)))
    # the reported errors are themselves estimated from S samples: a few percent of spread
    np.testing.assert_allclose(cp.stderr, want, rtol=0.1)


def test_r_diag_standard_error_matches_the_spread_over_seeds():
    rng = np.random.default_rng(3)
    B = rng.standard_normal((9, 9))
    H = B + B.T
    part = flat_partition([2, 3, 4])
    exact = block_coupling(H, part, exact=True, progress=False)
    assert exact.r_diag_stderr is None
    runs = [block_coupling(H, part, num_samples=32, seed=s, progress=False) for s in range(200)]
    r = np.array([cp.r_diag for cp in runs])
    reported = np.sqrt(np.mean([cp.r_diag_stderr**2 for cp in runs]))
    # the spread of 200 draws is known to about 1/sqrt(2 * 199) = 5%
    assert reported == pytest.approx(r.std(ddof=1), rel=0.15)
    assert abs(r.mean() - exact.r_diag) < 3 * r.std(ddof=1) / np.sqrt(len(r))
    assert all(0.0 <= cp.r_diag_null <= 1.0 for cp in runs)


def test_standard_errors_of_a_two_valued_estimate():
    """Block a = entry 0 (H_aa = c), block b = entries 1, 2 (H_bb = 0), H_ab = [1, 1]: a probe on b
    gives est[a, b] = (z_1 + z_2)^2, 0 or 4, and every other est is fixed (est[b, a] = 2,
    est[a, a] = c^2). With x the mean of est[a, b] over S rounds (mass[a, b] = (x + 2) / 2), its
    standard error is sqrt(x (4 - x) / (S - 1)) (sample variance, ddof=1, over S), halved in
    mass; r_diag = c^2 / F with F = c^2 + 2 + x, so its error is r_diag * se(x) / F."""
    c = 1.5
    H = np.array([[c, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    part = flat_partition([1, 2])
    for S in (2, 3, 8):
        for seed in range(4):
            cp = block_coupling(H, part, num_samples=S, seed=seed, progress=False)
            x = 2 * cp.mass[0, 1] - 2
            se_x = np.sqrt(x * (4 - x) / (S - 1))
            np.testing.assert_allclose(cp.stderr, [[0, se_x / 2], [se_x / 2, 0]], atol=1e-12)
            F = c**2 + 2 + x
            assert cp.r_diag == pytest.approx(c**2 / F, abs=1e-12)
            assert cp.r_diag_stderr == pytest.approx(cp.r_diag * se_x / F, abs=1e-12)


def test_estimated_null_stays_between_the_block_share_and_one():
    """With a zero diagonal the estimate of D = sum_i H_ii^2 is a product of noise of either
    sign; it is kept in [0, F], so the null is at least q = sum s(s-1) / (n(n-1)), never less."""
    sizes = [2, 3, 4]
    rng = np.random.default_rng(4)
    B = rng.standard_normal((9, 9))
    H = B + B.T
    np.fill_diagonal(H, 0.0)
    q = sum(s * (s - 1) for s in sizes) / (9 * 8)
    for seed in range(20):
        cp = block_coupling(H, flat_partition(sizes), num_samples=2, seed=seed, progress=False)
        assert q - 1e-12 <= cp.r_diag_null <= 1.0


def test_exact_coupling_of_a_slightly_asymmetric_matrix_is_symmetric():
    """A float32 Hessian's rounding (accepted up to 1e-2 relative) leaves H_ab and H_ba^T a
    little apart: the exact masses are symmetrized, as BlockCoupling requires."""
    sizes = [2, 3, 4]
    H = block_diag(sizes, seed=5) + np.random.default_rng(5).standard_normal((9, 9))
    H = H + H.T
    noisy = H * (1 + 1e-4 * np.random.default_rng(6).standard_normal((9, 9)))
    part = flat_partition(sizes)
    cp = block_coupling(noisy, part, exact=True, progress=False)
    assert np.array_equal(cp.mass, cp.mass.T)
    np.testing.assert_allclose(cp.mass, partition.BlockCoupling.from_dense(part, noisy).mass)


def test_a_zero_hessian_has_r_diag_and_null_one():
    """No mass anywhere: every share is 1 (nothing off the diagonal), not 0 / 0."""
    part = flat_partition([2, 3])
    for exact in (True, False):
        cp = block_coupling(np.zeros((5, 5)), part, exact=exact, seed=0, progress=False)
        assert cp.r_diag == 1.0 and cp.r_diag_null == 1.0


@pytest.fixture(scope="module")
def gpt_hessian():
    model, (x, y) = tiny_gpt_problem(seed=1)
    return model, HessianOperator(model, lm_loss, (x, y), mode="forward")


def test_tinygpt_hutchinson_within_three_sigma_of_exact(gpt_hessian):
    model, H = gpt_hessian
    part = partition.by_tensor(model)
    exact = block_coupling(H, part, exact=True, seed=0, progress=False)
    D = H.to_dense().numpy()
    ref = partition.BlockCoupling.from_dense(part, D).mass
    assert np.allclose(exact.mass, ref, rtol=1e-10, atol=1e-14)
    est = block_coupling(H, part, num_samples=24, seed=3, progress=False)
    assert not est.exact and est.num_samples == 24
    live = est.stderr > 0
    z = np.abs(est.mass - exact.mass)[live] / est.stderr[live]
    # squared-norm estimates of small blocks are heavy-tailed: allow a few 3-sigma misses
    assert np.mean(z > 3) < 0.05 and z.max() < 6
    assert np.allclose(est.mass[~live], exact.mass[~live], atol=1e-12)
    # the null (expected r_diag of a random equal-size partition) matches the exact permutation
    assert est.r_diag_null == pytest.approx(exact.r_diag_null, rel=0.3)
    assert exact.r_diag > exact.r_diag_null


def test_blockwise_spectra_match_dense_diagonal_blocks(gpt_hessian):
    model, H = gpt_hessian
    D = H.to_dense().numpy()
    names = ["blocks.0.attn.k_proj.weight", "ln_f.weight"]
    out = blockwise_spectra(H, names, num_probes=2, num_steps=32, seed=0, progress=False)
    assert list(out) == names
    for name in names:
        idx = H.select(name).numpy()
        ref = np.linalg.eigvalsh(D[np.ix_(idx, idx)])
        sd = out[name]
        assert sd.dimension == len(idx)
        assert np.abs(sd.weights.sum(axis=1) - 1.0).max() < 1e-12
        if len(idx) <= 32:  # the Krylov space becomes invariant: every node is an eigenvalue
            live = sd.weights[0] > 1e-12
            gaps = np.abs(sd.nodes[0][live][:, None] - ref[None, :]).min(axis=1)
            assert gaps.max() < 1e-8
        else:  # the extreme Ritz values converge to the extreme eigenvalues
            assert abs(sd.nodes[0].max() - ref.max()) < 1e-6


def test_blockwise_spectra_agree_with_slq_on_the_restricted_operator(gpt_hessian):
    model, H = gpt_hessian
    part = partition.by_tensor(model)
    out = blockwise_spectra(H, part, num_probes=1, num_steps=5, seed=0, progress=False)
    assert list(out) == part.block_labels()
    # the first block's probe is the first draw of the seed, as is SLQ's first probe
    name, label = part.names[0], part.block_labels()[0]
    sub = spectral_density(H.restrict(name), num_probes=1, num_steps=5, seed=0, progress=False)
    assert out[label].dimension == sub.dimension
    assert np.abs(out[label].nodes - sub.nodes).max() < 1e-10
    assert np.abs(out[label].weights - sub.weights).max() < 1e-10
    for sd in out.values():
        assert np.abs(sd.weights.sum() - 1.0) < 1e-12 and np.all(np.isfinite(sd.nodes))


def test_blockwise_spectra_count_each_blocks_own_products():
    H = block_diag([1, 20, 2])
    blocks = {
        name: torch.arange(lo, hi) for name, lo, hi in [("a", 0, 1), ("b", 1, 21), ("c", 21, 23)]
    }
    out = blockwise_spectra(H, blocks, num_probes=2, num_steps=10, seed=0, progress=False)
    # a block of size s stops after min(s, num_steps) steps, one product column each
    assert [out[k].num_matvecs for k in "abc"] == [2 * 1, 2 * 10, 2 * 2]
    # and its quadrature has min(s, num_steps) nodes per probe
    assert [out[k].nodes.shape for k in "abc"] == [(2, 1), (2, 10), (2, 2)]


def test_blockwise_spectra_of_a_float32_operator_stop_at_an_invariant_krylov_space():
    # each diagonal block has two distinct eigenvalues: two steps, in float32 as in float64
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    H = (Q * np.repeat([1.0, 3.0], 20)) @ Q.T
    H = np.kron(np.eye(2), (H + H.T) / 2)
    blocks = {"a": torch.arange(40), "b": torch.arange(40, 80)}
    kw = dict(num_probes=2, num_steps=30, seed=0, progress=False)
    out64 = blockwise_spectra(torch.tensor(H), blocks, **kw)
    out32 = blockwise_spectra(torch.tensor(H, dtype=torch.float32), blocks, **kw)
    for k in "ab":
        assert out64[k].num_matvecs == out32[k].num_matvecs == 2 * 2
        np.testing.assert_allclose(out32[k].weights, out64[k].weights, atol=1e-6)
        np.testing.assert_allclose(out32[k].nodes, out64[k].nodes, atol=1e-5)


def test_bad_blocks_and_asymmetric_restrictions_are_refused(gpt_hessian):
    H = block_diag([2, 3])
    for idx in (torch.zeros(0, dtype=torch.long), torch.tensor([0, 5]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match=r"must name at least one entry.*\[0, 5\)"):
            blockwise_spectra(H, {"a": idx}, num_probes=1, num_steps=2, progress=False)
    with pytest.raises(ValueError, match="chunk must be an int >= 1, got -1"):
        block_coupling(H, flat_partition([2, 3]), chunk=-1, progress=False)
    _, G = gpt_hessian
    H_ab = G.restrict("ln_f.weight", "ln_f.bias")
    assert H_ab.shape[0] == H_ab.shape[1]
    with pytest.raises(ValueError, match="not symmetric; restrict to a diagonal block"):
        spectral_density(H_ab, num_probes=1, num_steps=2, progress=False)
    spectral_density(G.restrict("ln_f.bias"), num_probes=1, num_steps=2, progress=False)


def test_partition_must_cover_the_operator(gpt_hessian):
    model, H = gpt_hessian
    part = partition.Partition([partition.by_tensor(model)["ln_f.weight"]])
    with pytest.raises(ValueError, match="cover exactly H.params"):
        block_coupling(H, part, progress=False)
    # the same names with other shapes: its block ids would index other entries
    wide = partition.by_tensor(
        [(n, torch.zeros(p.shape[0] + 1, *p.shape[1:])) for n, p in model.named_parameters()]
    )
    with pytest.raises(ValueError, match=r"partition tensor '.*' has shape \(\d+"):
        block_coupling(H, wide, progress=False)
    # a plain operator's flat order is the partition's: its sizes must agree
    with pytest.raises(ValueError, match="covers 6 entries but the operator has 5"):
        block_coupling(np.eye(5), flat_partition([2, 4]), progress=False)


def test_exact_coupling_refuses_a_hessian_too_large_to_form():
    n = 20_001

    def never(v):
        raise AssertionError("no product may run before the size check")

    never.shape = (n, n)
    part = partition.Partition([partition.TensorBlocks("w", (n,), "tensor", {})])
    with pytest.raises(ValueError, match=r"dense 20001 x 20001 Hessian .*exact=False"):
        block_coupling(never, part, exact=True, progress=False)


def test_odd_block_selectors_and_counts_are_named():
    """A float or bool index tensor is not truncated to ids, labels do not collide, and a
    fractional num_samples is refused rather than failing inside range()."""
    H = block_diag([3, 4])
    for spec in (torch.tensor([0.5, 3.0]), torch.ones(7, dtype=torch.bool)):
        with pytest.raises(TypeError, match="flat indices must be an integer tensor"):
            blockwise_spectra(H, {"a": spec}, progress=False)
    with pytest.raises(ValueError, match="two blocks share the label '1'"):
        blockwise_spectra(H, {1: torch.tensor([0]), "1": torch.tensor([1])}, progress=False)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1, got 2.5"):
        block_coupling(H, flat_partition([3, 4]), num_samples=2.5, progress=False)
    with pytest.raises(ValueError, match="needs num_samples >= 2 for standard errors"):
        block_coupling(H, flat_partition([3, 4]), num_samples=1, progress=False)


def test_exact_coupling_of_a_sparse_matrix_equals_the_dense_one():
    """A sparse torch Hessian (accepted everywhere) densifies in to_dense, so exact coupling
    works on it instead of failing inside index_add_ on the sparse backend."""
    sizes = [2, 3, 4]
    rng = np.random.default_rng(2)
    B = rng.standard_normal((9, 9))
    H = torch.as_tensor(B + B.T)
    part = flat_partition(sizes)
    want = block_coupling(H, part, exact=True, seed=0, progress=False)
    sparse = H.to_sparse()
    dense = as_operator(sparse).to_dense()
    assert dense.layout == torch.strided and torch.equal(dense, H)
    got = block_coupling(sparse, part, exact=True, seed=0, progress=False)
    assert np.array_equal(got.mass, want.mass) and got.r_diag_null == want.r_diag_null


def test_a_string_for_exact_and_an_empty_list_of_blocks_are_refused():
    """exact="no" would have passed for True; no blocks would have returned an empty dict."""
    H = block_diag([3, 4])
    with pytest.raises(ValueError, match="exact must be True or False, got 'no'"):
        block_coupling(H, flat_partition([3, 4]), exact="no", progress=False)
    with pytest.raises(ValueError, match="blocks names no block"):
        blockwise_spectra(H, {}, progress=False)
