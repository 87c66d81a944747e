"""partition.derive recovers planted block structure from a BlockCoupling."""

import numpy as np
import pytest
import torch

import partition
from partition import BlockCoupling, PartitionError, TensorBlocks, derive
from partition.derive import _canonical

WIDTH = 3


def planted_hessian(groups, seed, extra=4, noise=0.0, cross=0.3):
    """Dense symmetric Hessian over [("w", (n, WIDTH)), ("b", (extra,))] that is block-diagonal
    over the row groups of "w", plus cross-tensor coupling and optional symmetric noise."""
    rng = np.random.default_rng(seed)
    n = len(groups)
    size = n * WIDTH + extra
    H = np.zeros((size, size))
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        idx = (rows[:, None] * WIDTH + np.arange(WIDTH)).reshape(-1)
        A = rng.standard_normal((len(idx), len(idx)))
        H[np.ix_(idx, idx)] = A @ A.T + np.eye(len(idx))
    H[n * WIDTH :, n * WIDTH :] = np.eye(extra)
    H[: n * WIDTH, n * WIDTH :] = cross
    H[n * WIDTH :, : n * WIDTH] = cross
    E = noise * rng.standard_normal((size, size))
    return H + E + E.T


def candidate(n, extra=4):
    return partition.by_rows([("w", torch.empty(n, WIDTH)), ("b", torch.empty(extra))])


SIZES = [3, 5, 2, 4, 1, 3]


@pytest.mark.parametrize("method", ["greedy", "spectral"])
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_recovers_planted_groups_exactly(method, permute, noise):
    groups = np.repeat(np.arange(len(SIZES)), SIZES)
    if permute:
        groups = groups[np.random.default_rng(1).permutation(len(groups))]
    n = len(groups)
    cp = BlockCoupling.from_dense(candidate(n), planted_hessian(groups, seed=2, noise=noise))
    part = derive(cp, threshold=1e-3, method=method)
    w = part["w"]
    assert w.rule == "row_groups"
    assert list(w.params["groups"]) == _canonical(groups).tolist()
    assert part["b"].rule == "tensor"
    prov = part.provenance
    assert prov["method"] == method and prov["threshold"] == 1e-3 and prov["candidate"] == "by_rows"
    assert prov["r_diag_after"] > prov["r_diag_before"]
    assert prov["offdiag_within_after"] < 1e-3 < prov["offdiag_within_before"]
    assert prov["offdiag_max_tensor_after"] < 1e-3
    assert part.num_blocks == len(SIZES) + 1


def test_rule_simplification_rows_heads_tensor():
    n = 8
    for groups, rule, params in [
        (np.arange(n), "rows", {}),
        (np.zeros(n, dtype=int), "tensor", {}),
        (np.arange(n) // 4, "heads", {"head_dim": 4}),
    ]:
        cp = BlockCoupling.from_dense(candidate(n), planted_hessian(groups, seed=0))
        for method in ("greedy", "spectral"):
            w = derive(cp, threshold=0.0, method=method)["w"]
            assert (w.rule, dict(w.params)) == (rule, params), method


def test_threshold_stops_merging_and_one_d_elements_candidate():
    # two weakly coupled halves: a threshold just above their share keeps them apart
    n = 6
    groups = np.arange(n) // 3
    H = planted_hessian(groups, seed=3, cross=0.0)
    H[:9, 9:18] += 0.05
    H[9:18, :9] += 0.05
    cp = BlockCoupling.from_dense(candidate(n), H)
    between = 2 * cp.mass[:3, 3:6].sum() / cp.mass[:6, :6].sum()  # share inside tensor 'w'
    assert derive(cp, threshold=1.01 * between)["w"].params == {"head_dim": 3}
    assert derive(cp, threshold=0.99 * between)["w"].rule == "tensor"
    # a 1-D tensor with an "elements" candidate derives groups of entries
    cand = partition.elements([("v", torch.empty(4))])
    H = np.kron(np.eye(2), np.ones((2, 2)))
    out = derive(BlockCoupling.from_dense(cand, H), threshold=0.0)["v"]
    assert (out.rule, dict(out.params)) == ("heads", {"head_dim": 2})


def test_greedy_merges_by_normalized_coupling_not_raw_mass():
    """c_ab = M_ab / sqrt(M_aa M_bb): entries 0, 1 carry more mass but couple at c = 0.2;
    entries 2, 3 couple at c = 0.9, so they merge first, and then the cross share is below the
    threshold."""
    cand = partition.elements([("v", torch.empty(4))])
    H = np.diag([10.0, 10.0, 1.0, 1.0])
    H[0, 1] = H[1, 0] = np.sqrt(20.0)
    H[2, 3] = H[3, 2] = np.sqrt(0.9)
    cp = BlockCoupling.from_dense(cand, H)
    out = derive(cp, threshold=0.165, method="greedy")["v"]
    assert (out.rule, list(out.params["groups"])) == ("row_groups", [0, 1, 2, 2])


def test_derive_rejects_bad_input():
    cand = partition.Partition([TensorBlocks("c", (2, 3), "columns", {})], {"method": "x"})
    cp = BlockCoupling.from_dense(cand, np.eye(6))
    with pytest.raises(PartitionError, match="tensor 'c' has candidate rule 'columns'"):
        derive(cp)
    cp = BlockCoupling.from_dense(candidate(3), np.eye(13))
    with pytest.raises(PartitionError, match="unknown method"):
        derive(cp, method="kmeans")
    with pytest.raises(PartitionError, match="threshold"):
        derive(cp, threshold=2.0)
    with pytest.raises(PartitionError, match="must be symmetric"):
        BlockCoupling(cp.partition, np.triu(np.ones((4, 4))))
    with pytest.raises(PartitionError, match=r"must be \(4, 4\)"):
        BlockCoupling(cp.partition, np.ones((3, 3)))
    with pytest.raises(PartitionError, match="threshold"):
        derive(cp, threshold=True)
    with pytest.raises(PartitionError, match="negative entry"):
        BlockCoupling(cp.partition, np.eye(4) - 0.5)
    with pytest.raises(PartitionError, match="block id must be an int"):
        cp.partition.locate(1.5)
    assert cp.partition.locate(torch.tensor(1)) == cp.partition.locate(1)
    with pytest.raises(PartitionError, match="got NoneType"):
        partition.adam_mini(None)


def test_from_dense_matches_a_loop_over_entries():
    part = partition.adam_mini(
        {"q_proj.weight": torch.empty(4, 2), "ln.weight": torch.empty(3)}, head_dim=2
    )
    rng = np.random.default_rng(0)
    A = rng.standard_normal((11, 11))
    H = A + A.T
    ids = torch.cat([part.block_index(n).reshape(-1) for n in part.names]).numpy()
    ref = np.zeros((3, 3))
    for i in range(11):
        for j in range(11):
            ref[ids[i], ids[j]] += H[i, j] ** 2
    cp = BlockCoupling.from_dense(part, H)
    np.testing.assert_allclose(cp.mass, ref)
    assert cp.r_diag == pytest.approx(np.trace(ref) / ref.sum())


def test_one_hidden_layer_mlp_has_per_neuron_blocks(float64):
    import hessian
    from lab.data import gaussian_classification
    from lab.models import OneHiddenMLP, classification_loss

    model = OneHiddenMLP(d=20, m=4, num_classes=20, seed=0).double()
    X, y = gaussian_classification(200, 20, 20, seed=0, dtype=torch.float64)
    H = hessian.HessianOperator(model, classification_loss, (X, y))
    cp = hessian.block_coupling(H, partition.by_rows(model), exact=True, progress=False)
    # within each weight, under 10% of the Hessian mass couples different neurons (about 6% here),
    # so no two neurons merge: one block per hidden neuron (fc1 rows) and per class (fc2 rows)
    part = partition.derive(cp, threshold=0.1)
    assert part["fc1.weight"].rule == "rows"
    assert part["fc2.weight"].rule == "rows"
    assert part.provenance["offdiag_max_tensor_after"] < 0.1


def test_tiny_gpt_query_and_key_blocks_never_span_heads(float64):
    import hessian
    from lab.models import TinyGPT, TinyGPTConfig, lm_loss

    cfg = TinyGPTConfig(vocab_size=8, context=6, n_layer=1, d_model=8, n_heads=2, d_ff=8)
    model = TinyGPT(cfg, seed=0).double()
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 8, (4, 6), generator=gen), torch.randint(0, 8, (4, 6), generator=gen))
    H = hessian.HessianOperator(model, lm_loss, batch)
    cp = hessian.block_coupling(H, partition.by_rows(model), exact=True, progress=False)
    part = partition.derive(cp, threshold=0.05)
    for name in ("blocks.0.attn.q_proj.weight", "blocks.0.attn.k_proj.weight"):
        groups = part[name].local_index()[:, 0]
        head = torch.arange(8) // 4
        for g in groups.unique():
            assert head[groups == g].unique().numel() == 1, (name, groups)
        assert groups.unique().numel() < 8  # rows of a head do merge


def test_single_block_candidates_off_dim_0_are_kept_not_split():
    """A one-block 'columns' (or empty 'elements') candidate came back as 'rows', more blocks."""
    cand = partition.Partition(
        [
            TensorBlocks("c", (3, 1), "columns", {}),
            TensorBlocks("e", (3, 0), "elements", {}),
            TensorBlocks("b", (2,), "elements", {}),
        ]
    )
    for method in ("greedy", "spectral"):
        out = derive(BlockCoupling(cand, np.eye(cand.num_blocks)), threshold=0.0, method=method)
        assert out.tensors()[:2] == cand.tensors()[:2]
        assert out.num_blocks == cand.num_blocks == 3
    out = derive(BlockCoupling(cand, np.eye(3)), threshold=np.float32(0.5))
    assert out.provenance["threshold"] == 0.5


def test_a_coupling_exactly_at_the_threshold_is_within_it():
    """greedy stops once off_t <= threshold; spectral drops couplings <= threshold. Masses in
    binary fractions make the share (1/4) and the coupling (1/2) exact."""
    cand = partition.elements([("v", torch.empty(2))])
    greedy = BlockCoupling(cand, np.array([[1.5, 0.5], [0.5, 1.5]]))  # off share 1 / 4
    assert derive(greedy, threshold=0.25)["v"].rule == "elements"
    assert derive(greedy, threshold=0.2499)["v"].rule == "tensor"
    spectral = BlockCoupling(cand, np.array([[1.0, 0.5], [0.5, 1.0]]))  # c = 0.5 / sqrt(1 * 1)
    assert derive(spectral, threshold=0.5, method="spectral")["v"].rule == "elements"
    assert derive(spectral, threshold=0.4999, method="spectral")["v"].rule == "tensor"


def test_spectral_keeps_an_uncoupled_block_apart_from_the_clusters():
    """Block 0 has no edge; blocks 1 and 2 form one cluster, which must not take block 0's id."""
    cand = partition.elements([("v", torch.empty(3))])
    mass = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.9], [0.0, 0.9, 1.0]])
    out = derive(BlockCoupling(cand, mass), threshold=0.1, method="spectral")["v"]
    assert (out.rule, list(out.params["groups"])) == ("row_groups", [0, 1, 1])


def test_a_zero_hessian_is_block_diagonal_and_nothing_merges():
    cand = candidate(3)
    cp = BlockCoupling(cand, np.zeros((cand.num_blocks,) * 2))
    assert cp.r_diag == 1.0
    for method in ("greedy", "spectral"):
        part = derive(cp, threshold=0.0, method=method)
        assert part.tensors() == cand.tensors()
        prov = part.provenance
        assert prov["r_diag_before"] == prov["r_diag_after"] == 1.0
        assert prov["offdiag_within_before"] == prov["offdiag_within_after"] == 0.0
        assert prov["offdiag_max_tensor_after"] == 0.0


@pytest.mark.parametrize("method", ["greedy", "spectral"])
def test_provenance_numbers_match_sums_over_the_dense_hessian(method):
    """Every share in the provenance, recomputed entry by entry from H (not from block masses)."""
    groups = np.repeat(np.arange(3), [2, 3, 2])
    H = planted_hessian(groups, seed=4, noise=3e-3)
    cand = candidate(len(groups))
    part = derive(BlockCoupling.from_dense(cand, H), threshold=0.02, method=method)
    assert part["w"].rule == "row_groups"  # some merging happened

    def ids(p):
        return np.concatenate([p.block_index(n).reshape(-1).numpy() for n in p.names])

    owner = np.concatenate([np.full(cand[n].numel, i) for i, n in enumerate(cand.names)])
    sq = H**2
    same_tensor = owner[:, None] == owner[None, :]

    def r_diag(p):
        b = ids(p)
        return sq[b[:, None] == b[None, :]].sum() / sq.sum()

    def within_off(p, mask=same_tensor):
        b = ids(p)
        return sq[mask & (b[:, None] != b[None, :])].sum() / sq[mask].sum()

    prov = part.provenance
    assert prov["r_diag_before"] == pytest.approx(r_diag(cand), rel=1e-12)
    assert prov["r_diag_after"] == pytest.approx(r_diag(part), rel=1e-12)
    assert prov["offdiag_within_before"] == pytest.approx(within_off(cand), rel=1e-12)
    assert prov["offdiag_within_after"] == pytest.approx(within_off(part), rel=1e-12)
    assert 0 < prov["offdiag_within_after"] < prov["offdiag_within_before"]
    worst = max(within_off(part, same_tensor & (owner[:, None] == t)) for t in (0, 1))
    assert prov["offdiag_max_tensor_after"] == pytest.approx(worst, rel=1e-12)
    assert prov["num_blocks_before"] == cand.num_blocks == len(groups) + 1
    assert prov["candidate_rules"] == ["rows", "tensor"]
    assert prov["exact"] is True and prov["num_samples"] == 0 and "r_diag_null" not in prov


def test_an_estimated_couplings_sampling_reaches_the_provenance():
    cp = BlockCoupling.from_dense(candidate(3), np.eye(13))
    est = BlockCoupling(cp.partition, cp.mass, exact=False, num_samples=7, r_diag_null=0.25)
    prov = derive(est).provenance
    assert (prov["exact"], prov["num_samples"], prov["r_diag_null"]) == (False, 7, 0.25)


def test_block_coupling_refuses_malformed_input_naming_it():
    part = candidate(3)
    with pytest.raises(PartitionError, match="partition must be a Partition, got dict"):
        BlockCoupling({"w": 1}, np.eye(4))
    for bad in (np.nan, np.inf):
        mass = np.eye(4)
        mass[0, 0] = bad
        with pytest.raises(PartitionError, match="non-finite entries"):
            BlockCoupling(part, mass)
    with pytest.raises(PartitionError, match=r"stderr has shape \(3, 3\); expected \(4, 4\)"):
        BlockCoupling(part, np.eye(4), stderr=np.ones((3, 3)))
    with pytest.raises(PartitionError, match=r"dense Hessian has shape \(12, 12\); .* 13 param"):
        BlockCoupling.from_dense(part, np.eye(12))


def test_block_coupling_refuses_fields_out_of_range_naming_them():
    part = candidate(3)
    bad = [
        ({"mass": [["a"] * 4] * 4}, "mass must be an array of numbers"),
        ({"mass": np.eye(4) * (1 + 1j)}, "mass must be real"),
        ({"stderr": np.full((4, 4), np.nan)}, "stderr must hold finite standard errors >= 0"),
        ({"stderr": -np.ones((4, 4))}, "stderr must hold finite standard errors >= 0"),
        ({"exact": "no"}, "exact must be True or False"),
        ({"num_samples": -1}, "num_samples must be an int >= 0"),
        ({"r_diag_null": "0.3"}, r"r_diag_null must be None or a number in \[0, 1\]"),
        ({"r_diag_stderr": np.inf}, "r_diag_stderr must be None or a number >= 0"),
    ]
    for fields, match in bad:
        with pytest.raises(PartitionError, match=match):
            BlockCoupling(**{"partition": part, "mass": np.eye(4), **fields})
    with pytest.raises(PartitionError, match="dense Hessian is complex"):
        BlockCoupling.from_dense(part, np.eye(13) * 1j)
