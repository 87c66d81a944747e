"""The measuring figure scripts (quadratics, MLP and transformer Hessians, blockwise spectra):
every random choice comes from the user's seed, and each panel draws the numbers it names on
the axes it claims. Tiny sizes; the figures are kept, not saved."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from test_figures import _load, _restore_threads  # noqa: F401  (the fixture restores threads)

import hessian
import partition
from lab.data import gaussian_classification
from lab.experiments import block_types
from lab.experiments_quadratic import QuadraticRun
from lab.models import OneHiddenMLP, TinyGPT, TinyGPTConfig
from lab.quadratic import BlockDiagonalQuadratic

TINY_GPT = TinyGPTConfig(vocab_size=256, context=4, n_layer=1, d_model=4, n_heads=2)


@pytest.fixture
def keep_figure(monkeypatch):
    """``keep_figure(module)`` makes the module's ``save_figure`` keep the figure in the
    returned dict instead of writing it; the figures are closed after the test."""

    def patch(module) -> dict:
        drawn = {}

        def keep(fig, name, out, **kw):
            drawn["fig"] = fig
            return []

        monkeypatch.setattr(module, "save_figure", keep)
        return drawn

    yield patch
    plt.close("all")


def _spy(monkeypatch, owner, name: str, record: list, keep=lambda args, kw, out: out) -> None:
    """Wrap ``owner.name``: each call appends ``keep(args, kwargs, result)`` to ``record``."""
    real = getattr(owner, name)

    def wrapper(*args, **kw):
        out = real(*args, **kw)
        record.append(keep(args, kw, out))
        return out

    monkeypatch.setattr(owner, name, wrapper)


def _record_training(monkeypatch, module) -> list:
    """Spy on ``module.train``: (the model's initial state, the seed) of each run."""
    calls = []
    real = module.train

    def train(factory, *args, **kw):
        init = {k: v.clone() for k, v in factory().state_dict().items()}
        calls.append((init, kw["seed"]))
        return real(factory, *args, **kw)

    monkeypatch.setattr(module, "train", train)
    return calls


def _same_state(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _hlines(ax) -> list[float]:
    """y of the horizontal lines (block edges) drawn on ``ax``."""
    return sorted(
        ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_ydata()[0] == ln.get_ydata()[1]
    )


# fig_quadratic


def test_quadratic_problem_and_start_point_both_come_from_the_seed(monkeypatch) -> None:
    fq = _load("fig_quadratic")
    ranges = next(iter(fq.PROBLEMS.values()))

    def losses(seed: int) -> list[tuple[float, ...]]:
        return [r.loss for r in fq.run_problem(ranges, 4, 10, 3, seed)]

    assert losses(0) == losses(0)
    assert all(a != b for a, b in zip(losses(0), losses(1), strict=True))
    with monkeypatch.context() as m:  # the start point held fixed: the seed draws the problem
        real_point = BlockDiagonalQuadratic.random_point
        m.setattr(BlockDiagonalQuadratic, "random_point", lambda q, seed: real_point(q, 0))
        assert losses(0)[0][0] != losses(1)[0][0]
    # the problem held fixed: the seed draws the start point
    real = BlockDiagonalQuadratic.random
    fixed = staticmethod(lambda **kw: real(**{**kw, "seed": 0}))
    monkeypatch.setattr(BlockDiagonalQuadratic, "random", fixed)
    assert losses(0)[0][0] != losses(1)[0][0]


@pytest.mark.parametrize("problem", [0, 1])
def test_quadratic_methods_converge_and_blockwise_gd_at_its_optimal_rate(
    problem, monkeypatch
) -> None:
    """Every lr grid holds a stable lr, so every method ends far below its start; blockwise
    GD with 2 / (mu_b + L_b) shrinks each block's loss by rho_b^2 per step at least,
    rho_b = (kappa_b - 1) / (kappa_b + 1)."""
    fq = _load("fig_quadratic")
    ranges = list(fq.PROBLEMS.values())[problem]
    iters, grid = 20, 4
    grids = []
    _spy(monkeypatch, fq.eq, "tune", grids, lambda args, kw, out: args[1])
    runs = fq.run_problem(ranges, 4, iters, grid, seed=2)
    assert [r.method for r in runs] == ["GD (one lr)", "Adam", "blockwise GD", "Adam-mini"]
    for run in runs:
        assert len(run.loss) == iters + 1 and run.final < 0.5 * run.loss[0], run.method
    q = BlockDiagonalQuadratic.random(block_sizes=[4] * len(ranges), eig_ranges=ranges, seed=2)
    rho = max(float((e.max() - e.min()) / (e.max() + e.min())) for e in q.block_eigenvalues)
    assert runs[2].final <= rho ** (2 * iters) * runs[2].loss[0] * (1 + 1e-9)
    # the caption's lr grids: `grid` log-spaced points, GD's up to the stability limit 2 / L
    assert [len(g) for g in grids] == [grid] * 3
    assert all(np.allclose(np.diff(np.log(g)), np.log(g[1] / g[0])) for g in grids)
    assert grids[0][-1] == pytest.approx(2 / float(q.eigenvalues.max()))


def test_quadratic_adam_mini_keeps_one_v_per_block() -> None:
    """On blocks of different scales one v per block tracks what one lr for all cannot: Adam-
    mini ends four decades below GD (one v for the whole vector: under two)."""
    fq = _load("fig_quadratic")
    gd, _, _, adam_mini = fq.run_problem(next(iter(fq.PROBLEMS.values())), 4, 150, 6, seed=0)
    assert adam_mini.final < 1e-3 * gd.final


def test_quadratic_panels_draw_their_problem_on_a_log_axis_from_the_user_seed(
    monkeypatch, keep_figure, tmp_path
) -> None:
    fq = _load("fig_quadratic")
    seeds = []
    methods = [("GD (one lr)", 0.0123), ("Adam", 0.0456), ("blockwise GD", math.nan)]

    def fake_runs(ranges, block_size, iters, grid, seed):
        seeds.append(seed)
        start = ranges[1][0]  # differs between the problems
        return [
            QuadraticRun(m, lr, tuple(start * (i + 1) * 10.0 ** -np.arange(9)))
            for i, (m, lr) in enumerate(methods)
        ]

    monkeypatch.setattr(fq, "run_problem", fake_runs)
    drawn = keep_figure(fq)
    fq.main(["--quick", "--seed", "3", "--out", str(tmp_path)])
    assert seeds == [3] * len(fq.PROBLEMS)
    axes = drawn["fig"].axes
    assert len(axes) == len(fq.PROBLEMS)
    for ax, (title, ranges) in zip(axes, fq.PROBLEMS.items(), strict=True):
        assert ax.get_title().startswith(title)
        assert ax.get_yscale() == "log"  # the gaps span decades
        lines = ax.get_lines()
        for line, run in zip(lines, fake_runs(ranges, 0, 0, 0, 0), strict=True):
            np.testing.assert_array_equal(line.get_ydata(), run.loss)
            assert line.get_label().startswith(run.method)
            assert ("per block" if math.isnan(run.lr) else f"{run.lr:.2g}") in line.get_label()


# fig_hessian_mlp


def _reference_hidden_hessian(model: OneHiddenMLP, X: torch.Tensor, y: torch.Tensor):
    """d²L/dW1² by torch.func.hessian, rows neuron-major (no LayerNorm here, so it is exact)."""
    rest = {k: v.detach() for k, v in model.named_parameters() if k != "fc1.weight"}

    def loss(w):
        logits = torch.func.functional_call(model, {**rest, "fc1.weight": w}, (X,))
        return torch.nn.functional.cross_entropy(logits, y)

    w = model.fc1.weight.detach()
    return torch.func.hessian(loss)(w).reshape(w.numel(), w.numel()).numpy()


def test_mlp_snapshots_are_the_hessian_after_that_many_adam_steps() -> None:
    """Init, steps/2 and steps full-batch Adam steps on the user's seed; each label gives its
    step and the loss of the parameters whose Hessian it shows."""
    fm = _load("fig_hessian_mlp")
    s = fm.Sizes(d=3, m=2, C=3, n=16, steps=2, sweep=(3,))
    snaps = fm.training_snapshots(s, seed=3, progress=False, lr=0.1)
    assert len(snaps) == 3
    X, y = gaussian_classification(s.n, s.d, s.C, seed=3, dtype=torch.float64)
    model = OneHiddenMLP(d=s.d, m=s.m, num_classes=s.C, seed=3).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for step, (label, H) in enumerate(snaps):
        np.testing.assert_allclose(H, _reference_hidden_hessian(model, X, y), atol=1e-12)
        loss = torch.nn.functional.cross_entropy(model(X), y)
        if step:
            assert f"(step {step}, loss {loss.item():.2f})" in label
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_mlp_class_sweep_is_the_initial_hessian_for_each_number_of_classes() -> None:
    fm = _load("fig_hessian_mlp")
    s = fm.Sizes(d=3, m=2, C=3, n=16, steps=2, sweep=(2, 5))
    sweep = fm.class_sweep(s, seed=3, progress=False)
    assert len(sweep) == len(s.sweep)
    for C, (label, H) in zip(s.sweep, sweep, strict=True):
        assert f"C = {C} " in label
        X, y = gaussian_classification(s.n, s.d, C, seed=3, dtype=torch.float64)
        model = OneHiddenMLP(d=s.d, m=s.m, num_classes=C, seed=3).double()
        np.testing.assert_allclose(H, _reference_hidden_hessian(model, X, y), atol=1e-12)


def test_mlp_panels_show_their_hessian_and_score_it_on_the_neuron_blocks(
    monkeypatch, keep_figure, tmp_path
) -> None:
    """Top row block-diagonal by neuron (r_diag 1), bottom row all ones (r_diag 1/m); each
    panel its own scale, so the image tells which Hessian a panel shows."""
    fm = _load("fig_hessian_mlp")
    s = fm.QUICK
    by_neuron = np.kron(np.eye(s.m), np.ones((s.d, s.d)))
    seeds = []

    def fake(rows_H):
        def run(sizes, seed, progress):
            seeds.append(seed)
            return [(f"panel {k}", H * 10.0**k) for k, H in rows_H]

        return run

    monkeypatch.setattr(fm, "training_snapshots", fake([(k, by_neuron) for k in (0, 1, 2)]))
    monkeypatch.setattr(fm, "class_sweep", fake([(k, np.ones_like(by_neuron)) for k in (3, 4, 5)]))
    drawn = keep_figure(fm)
    fm.main(["--quick", "--seed", "3", "--out", str(tmp_path)])
    assert seeds == [3, 3]
    axes = drawn["fig"].axes[:6]
    for k, ax in enumerate(axes):
        share = 1.0 if k < 3 else 1 / s.m
        assert ax.get_title() == f"panel {k}\nr_diag = {share:.3f}"
        assert ax.images[0].get_array().max() == pytest.approx(k)  # log10 of its scale
        assert _hlines(ax) == [i * s.d - 0.5 for i in range(1, s.m)]


# fig_transformer_hessian


def test_transformer_blocks_are_the_adam_mini_principle() -> None:
    """The blocks drawn and scored on each matrix are partition.adam_mini's, the rule named."""
    ft = _load("fig_transformer_hessian")
    for c in (ft.FULL, ft.SMALL):
        part = partition.adam_mini(TinyGPT(c))
        for _, name, rule, size in ft.modules(c):
            ids = part.block_index(name).flatten().numpy()
            mine = np.arange(ids.size) // size
            assert np.array_equal(ids[:, None] == ids[None, :], mine[:, None] == mine[None, :])
            assert rule == {"heads": "head", "rows": "output neuron"}[part[name].rule]


def test_transformer_hessians_come_from_the_seed(monkeypatch) -> None:
    """The init, the training and the measured batch (batch_size × context) follow the seed; a
    seed repeats exactly; the Hessians are float64."""
    ft = _load("fig_transformer_hessian")
    runs = _record_training(monkeypatch, ft)
    batches = []
    _spy(monkeypatch, hessian, "HessianOperator", batches, lambda a, kw, out: a[2])
    first = ft.module_hessians(TINY_GPT, 1, 2, seed=3, progress=False)
    again = ft.module_hessians(TINY_GPT, 1, 2, seed=3, progress=False)
    other = ft.module_hessians(TINY_GPT, 1, 2, seed=4, progress=False)
    assert batches[0][0].shape == (2, TINY_GPT.context)
    assert [seed for _, seed in runs] == [3, 3, 4]
    assert _same_state(runs[0][0], runs[1][0]) and not _same_state(runs[0][0], runs[2][0])
    n = len(ft.modules(TINY_GPT))
    assert torch.equal(batches[0][0], batches[n][0])
    assert not torch.equal(batches[0][0], batches[2 * n][0])
    model = TinyGPT(TINY_GPT)
    for _, name, _, _ in ft.modules(TINY_GPT):
        np.testing.assert_array_equal(first[0][name], again[0][name])
        assert first[1][name] == tuple(model.get_parameter(name).shape)
        assert first[0][name].shape == (model.get_parameter(name).numel(),) * 2
        assert first[0][name].dtype == np.float64
        assert not np.array_equal(first[0][name], other[0][name])


def _principle_block_diagonal(config: TinyGPTConfig, modules) -> tuple[dict, dict]:
    """Per module: ones on its principle blocks (scaled 10**k for the k-th module), its shape."""
    model = TinyGPT(config)
    out, shapes = {}, {}
    for k, (_, name, _, size) in enumerate(modules(config)):
        shapes[name] = tuple(model.get_parameter(name).shape)
        n = math.prod(shapes[name])
        out[name] = np.kron(np.eye(n // size), np.ones((size, size))) * 10.0**k
    return out, shapes


def test_transformer_panels_show_their_module_and_score_a_seeded_random_partition(
    monkeypatch, keep_figure, tmp_path
) -> None:
    """Fake Hessians exactly block-diagonal in the principle's blocks: r_diag 1.00, a random
    partition of the same sizes less, drawn from the user's seed."""
    ft = _load("fig_transformer_hessian")
    hessians, shapes = _principle_block_diagonal(ft.SMALL, ft.modules)
    seeds = []

    def fake(config, steps, batch_size, seed, progress):
        seeds.append(seed)
        return hessians, shapes, 1.0

    monkeypatch.setattr(ft, "module_hessians", fake)
    titles = []
    for seed in (3, 3, 4):
        drawn = keep_figure(ft)
        ft.main(["--quick", "--seed", str(seed), "--out", str(tmp_path)])
        axes = drawn["fig"].axes[:6]
        titles.append([ax.get_title() for ax in axes])
        for k, (ax, (title, name, _, size)) in enumerate(
            zip(axes, ft.modules(ft.SMALL), strict=True)
        ):
            n = hessians[name].shape[0]
            assert ax.get_title().startswith(f"{title}\n{n // size} blocks")
            assert "r_diag = 1.00  (random blocks: 0." in ax.get_title()
            assert ax.images[0].get_array().max() == pytest.approx(k)  # log10 of its scale
            assert _hlines(ax) == [b - 0.5 for b in range(size, n, size)]
    assert seeds == [3, 3, 4]
    assert titles[0] == titles[1] and titles[0] != titles[2]


# fig_blockwise_spectra

TWO_LAYERS = TinyGPTConfig(context=8, n_layer=2, d_model=4, n_heads=2)


def test_blockwise_spectra_come_from_the_seed_for_every_block_type_of_both_end_layers(
    monkeypatch, keep_figure, tmp_path
) -> None:
    """The init, training, measured batch and SLQ probes follow the seed; the blocks are one of
    each type in the first and last layer, token rows at the batch's most frequent byte."""
    fb = _load("fig_blockwise_spectra")
    monkeypatch.setitem(fb.QUICK, "config", TWO_LAYERS)
    runs = _record_training(monkeypatch, fb)
    batches, slq = [], []
    _spy(monkeypatch, hessian, "HessianOperator", batches, lambda a, kw, out: (a[2], out.dtype))
    _spy(monkeypatch, hessian, "blockwise_spectra", slq, lambda a, kw, out: (a[1], kw["seed"], out))
    keep_figure(fb)
    for seed in (3, 3, 4):
        fb.main(["--quick", "--no-progress", "--seed", str(seed), "--out", str(tmp_path)])
    assert [seed for _, seed in runs] == [3, 3, 4] and [s for _, s, _ in slq] == [3, 3, 4]
    assert _same_state(runs[0][0], runs[1][0]) and not _same_state(runs[0][0], runs[2][0])
    assert [dtype for _, dtype in batches] == [torch.float64] * 3
    batches = [batch for batch, _ in batches]
    assert batches[0][0].shape == fb.QUICK["tokens"]
    assert torch.equal(batches[0][0], batches[1][0])
    assert not torch.equal(batches[0][0], batches[2][0])
    for (groups, _, spectra), batch in zip(slq, batches, strict=True):
        common = int(torch.bincount(batch[0].reshape(-1)).argmax())
        assert list(groups) == list(block_types(TWO_LAYERS, common, [0, 1]))
        assert list(spectra) == list(groups)
    for label, sd in slq[0][2].items():  # the caption's probes and Lanczos steps
        assert sd.nodes.shape == (fb.QUICK["probes"], min(fb.QUICK["lanczos"], sd.dimension))
        np.testing.assert_array_equal(sd.nodes, slq[1][2][label].nodes)
    assert any(not np.array_equal(slq[0][2][k].nodes, slq[2][2][k].nodes) for k in slq[0][2])


def test_blockwise_spectra_give_each_block_a_panel_and_its_largest_abs_eigenvalue_a_log_bar(
    monkeypatch, keep_figure, tmp_path
) -> None:
    fb = _load("fig_blockwise_spectra")
    monkeypatch.setitem(fb.QUICK, "config", TWO_LAYERS)
    fake = {}

    def fake_spectra(op, groups, **kw):
        for k, label in enumerate(groups):  # largest |eigenvalue| 10**k, negative for odd k
            nodes = np.array([[0.5, (-1) ** k * 10.0**k]])
            fake[label] = hessian.SpectralDensity(nodes, np.array([[0.5, 0.5]]), 3, 2)
        return dict(fake)

    monkeypatch.setattr(hessian, "blockwise_spectra", fake_spectra)
    drawn = keep_figure(fb)
    fb.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    *panels, bars = drawn["fig"].axes
    shown = [ax for ax in panels if ax.get_visible()]
    assert [ax.get_title().split("\n")[0] for ax in shown] == list(fake)
    assert bars.get_yscale() == "log"  # the blocks' scales span decades
    assert [t.get_text() for t in bars.get_xticklabels()] == list(fake)
    heights = [p.get_height() for p in bars.patches]
    assert heights == pytest.approx([10.0**k for k in range(len(fake))])
