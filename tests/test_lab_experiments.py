"""lab.report's formats, lab.experiments' optimizer and training wiring, lab.experiments_plots'
saving and drawing, and lab.cli's exit codes (fast: nothing is trained)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import partition
from lab import experiments
from lab import report as md
from lab.experiments_plots import (
    log_heatmap,
    plot_curves,
    plot_spectra,
    save_figure,
    short_name,
)
from lab.models import TinyGPT, TinyGPTConfig


def test_human_bytes_uses_binary_units() -> None:
    assert md.human_bytes(1023) == "1023 B"
    assert md.human_bytes(1536) == "1.50 KiB"
    assert md.human_bytes(3 * 1024**2) == "3.00 MiB"
    assert md.human_bytes(5 * 1024**4) == "5.00 TiB"


def test_percent_scales_by_one_hundred() -> None:
    assert md.percent(0.4567) == "45.7%"
    assert md.percent(0.5, digits=0) == "50%"


def test_markdown_table_cells_alignment_and_row_check() -> None:
    table = md.markdown_table(["name", "x"], [["a|b", 1.234567], ["c", float("nan")]])
    lines = table.splitlines()
    assert lines[0] == "| name | x |"
    assert lines[1] == "| --- | ---: |"  # text left, numbers right
    assert lines[2] == "| a\\|b | 1.235 |"  # a pipe in a cell does not end it; 4 digits
    assert lines[3] == "| c | nan |"
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        md.markdown_table(["name", "x"], [["a"]])


def _tiny() -> TinyGPTConfig:
    return TinyGPTConfig(vocab_size=16, context=8, n_layer=1, d_model=8, n_heads=2)


def test_adamw_decays_only_matrices_and_both_optimizers_get_the_betas() -> None:
    model = TinyGPT(_tiny(), seed=0)
    adamw = experiments.optimizer_factory(None, 1e-3, betas=(0.8, 0.9), weight_decay=0.3)(model)
    decay = {id(p): g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    for p in model.parameters():
        assert decay[id(p)] == (0.3 if p.ndim >= 2 else 0.0)
    assert all(g["betas"] == (0.8, 0.9) and g["lr"] == 1e-3 for g in adamw.param_groups)
    mini = experiments.optimizer_factory(partition.adam_mini(model), 2e-3, betas=(0.8, 0.9))(model)
    assert all(tuple(g["betas"]) == (0.8, 0.9) and g["lr"] == 2e-3 for g in mini.param_groups)


def test_train_variants_passes_each_variant_its_lr_the_seed_and_the_warmup(monkeypatch) -> None:
    config = _tiny()
    with torch.device("meta"):
        meta = TinyGPT(config)
    calls = {}

    def fake_train(model_factory, make_optimizer, corpus, **kw):
        opt = make_optimizer(model_factory())
        calls[kw["name"]] = (opt.param_groups[0]["lr"], kw)
        return "run"

    monkeypatch.setattr(experiments, "train", fake_train)
    variants = {"AdamW": None, "Adam-mini": partition.adam_mini(meta)}
    lrs = {"AdamW": 1e-3, "Adam-mini": 5e-3}
    out = experiments.train_variants(
        variants, config, None, steps=40, lr=lrs, batch_size=2, seed=11, eval_every=5
    )
    for name, (lr, kw) in calls.items():
        assert lr == lrs[name] and kw["seed"] == 11 and kw["steps"] == 40
        assert kw["schedule"].warmup_steps == 2 and kw["schedule"].total_steps == 40  # 5%
    adamw, mini = out
    n = sum(p.numel() for p in meta.parameters())
    assert adamw.v_entries == n and adamw.v_removed == 0.0
    assert adamw.state_bytes == adamw.state.adamw_total
    blocks = variants["Adam-mini"].num_blocks
    assert mini.v_entries == blocks and mini.v_removed == pytest.approx(1 - blocks / n)
    assert mini.state_bytes == mini.state.total < adamw.state_bytes


def test_block_types_picks_head_zero_of_query_and_key() -> None:
    config = _tiny()
    groups = experiments.block_types(config, ord("a"), layers=(0,))
    hd = config.hd
    assert groups["L0 query head 0"] == {"blocks.0.attn.q_proj.weight": slice(0, hd)}
    assert groups["L0 key head 0"] == {"blocks.0.attn.k_proj.weight": slice(0, hd)}
    assert groups["token embedding row 'a'"] == {"tok_emb.weight": ord("a")}


def test_save_figure_keeps_the_old_file_when_saving_fails_and_closes_the_figure(
    tmp_path: Path, monkeypatch
) -> None:
    old = tmp_path / "x.png"
    old.write_bytes(b"old figure")
    fig, ax = plt.subplots()
    ax.plot([1.0, 2.0])

    def half_written(target, **kw):
        Path(target).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, "x", tmp_path, formats=("png",))
    assert old.read_bytes() == b"old figure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    plt.close(fig)

    fig, ax = plt.subplots()
    ax.plot([1.0, 2.0])
    save_figure(fig, "y", tmp_path, formats=("png",))
    assert fig.number not in plt.get_fignums()


def test_save_figure_dpi_overrides_the_style(tmp_path: Path) -> None:
    sizes = {}
    for dpi in (50, 100):
        fig = plt.figure(figsize=(2, 2))
        path = save_figure(fig, f"d{dpi}", tmp_path, formats=("png",), dpi=dpi)[0]
        sizes[dpi] = plt.imread(path).shape[:2]
    assert sizes[100][0] > 1.5 * sizes[50][0]


def test_short_name_marks_biases() -> None:
    assert short_name("blocks.0.attn.q_proj.weight") == "0.q_proj"
    assert short_name("blocks.1.mlp.fc_in.bias") == "1.fc_in.b"
    assert short_name("tok_emb.weight") == "tok_emb"


def test_plot_curves_draws_loss_against_the_evaluated_steps() -> None:
    class Run:
        name = "AdamW"
        eval_steps = [0, 50, 100]
        val_loss = [5.0, 3.0, 2.5]

    fig, ax = plt.subplots()
    plot_curves(ax, [Run()])
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [0, 50, 100] and list(line.get_ydata()) == [5.0, 3.0, 2.5]
    assert ax.get_xlabel() == "training step"
    assert ax.get_ylabel() == "validation loss (nats / byte)"  # the unit of the y axis
    assert ax.get_ylim() == pytest.approx((2.45, 3.5))
    plt.close(fig)


def test_plot_spectra_uses_a_log_density_axis_and_hides_unused_panels() -> None:
    class Density:
        nodes = np.array([-1.0, 0.5, 2.0])
        dimension = 3

        def smooth(self, grid, sigma):
            return np.exp(-(grid**2))

    fig, axes = plt.subplots(1, 3)
    plot_spectra(axes, {"a": Density(), "b": Density()})
    assert [ax.get_yscale() for ax in axes[:2]] == ["log", "log"]
    assert axes[0].get_title() == "a\n(3 params)"
    assert [ax.get_visible() for ax in axes] == [True, True, False]
    plt.close(fig)


def test_cli_a_closed_pipe_is_success_and_an_unwritable_out_is_a_one_line_error(
    monkeypatch, tmp_path, capsys
) -> None:
    from lab import cli

    def closed(args):
        raise BrokenPipeError

    parser = cli.build_parser()
    args = parser.parse_args(["reproduce", "--quick", "--out", str(tmp_path)])
    monkeypatch.setattr(args, "func", closed)
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(args))
    dup2 = []
    with monkeypatch.context() as m:  # stdout goes to /dev/null: no flush error at exit
        m.setattr(cli.sys, "stdout", SimpleNamespace(fileno=lambda: 99))
        m.setattr(cli.os, "dup2", lambda fd, to: (dup2.append(to), os.close(fd)))
        assert cli.main([]) == 0
    assert dup2 == [99]

    def unwritable(args):
        raise PermissionError(13, "cannot write 'x': Permission denied")

    args.func = unwritable
    assert cli.main([]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("adam-mini-lab reproduce: error: ")
    assert "Permission denied" in captured.err and "Traceback" not in captured.err


class _Fixed:
    def __init__(self, args):
        self.args = args

    def parse_args(self, argv):
        return self.args


def test_cli_usage_names_the_console_script(capsys) -> None:
    from lab import cli

    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
    err = capsys.readouterr().err
    assert err.startswith("usage: adam-mini-lab ") and "invalid choice: 'no-such-command'" in err


def test_log_heatmap_puts_block_edges_between_the_pooled_pixels() -> None:
    """An 8x8 matrix pooled 2x2 into 4x4 pixels: the edge after row 4 lies between pixels 1
    and 2 (at 1.5), in both directions; four decades below the largest |H|."""
    fig, ax = plt.subplots()
    H = np.diag(np.arange(1.0, 9.0))
    im = log_heatmap(ax, H, boundaries=[4], decades=4.0, max_pixels=4)
    assert im.get_array().shape == (4, 4)
    hline, vline = ax.get_lines()
    assert list(hline.get_ydata()) == [1.5, 1.5] and list(vline.get_xdata()) == [1.5, 1.5]
    # the largest tile is the last one: (7 + 8) / 4
    assert im.get_clim() == pytest.approx((np.log10(15 / 4) - 4, np.log10(15 / 4)))
    plt.close(fig)


def test_the_optimizers_compared_in_one_figure_have_distinct_colours() -> None:
    from lab.experiments_plots import COLORS

    for together in (
        ["AdamW", "Adam-mini (paper rules)", "Adam-mini (derived)", "Adam-mini (by tensor)"],
        ["GD (one lr)", "Adam", "blockwise GD", "Adam-mini"],
    ):
        assert len({COLORS[name] for name in together}) == len(together)


def test_measure_structure_refuses_what_it_would_use_only_after_the_coupling():
    """A bad threshold failed in partition.derive, after every coupling product."""
    from lab.experiments import measure_structure

    model = TinyGPT(TinyGPTConfig(vocab_size=8, context=4, n_layer=1, d_model=8, n_heads=2))
    x = torch.zeros(2, 4, dtype=torch.long)
    for kw, match in (
        ({"threshold": 1.5}, r"threshold must be a number in \[0, 1\], got 1.5"),
        ({"spectra_steps": 0}, "spectra_steps must be an int >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            measure_structure(model, (x, x), progress=False, **kw)
