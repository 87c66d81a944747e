"""Every figure script runs in --quick mode and writes a PNG and a PDF (to a tmp folder)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIGURES = Path(__file__).resolve().parents[1] / "figures"
SCRIPTS = sorted(p.stem for p in FIGURES.glob("fig_*.py"))


def _load(name: str):
    if str(FIGURES) not in sys.path:
        sys.path.insert(0, str(FIGURES))
    spec = importlib.util.spec_from_file_location(f"figures_{name}", FIGURES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts set torch's thread count (--threads, default 1): restore it for other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_all_expected_scripts_exist() -> None:
    assert set(SCRIPTS) >= {
        "fig_hessian_mlp",
        "fig_transformer_hessian",
        "fig_blockwise_spectra",
        "fig_quadratic",
        "fig_training_curves",
        "fig_memory_table",
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_mode_writes_png_and_pdf(name: str, tmp_path: Path) -> None:
    paths = _load(name).main(["--quick", "--out", str(tmp_path), "--no-progress"])
    png, pdf = tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"
    assert png in paths and pdf in paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert not list(tmp_path.glob(".*.tmp")), "temp files of the atomic writes were left behind"


def test_runs_as_a_script_and_defaults_next_to_itself(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(FIGURES / "fig_quadratic.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fig_quadratic.png").exists()
    common = _load("_common")
    assert common.parse_args("x", []).out == FIGURES


def test_threads_and_seed_are_checked(capsys) -> None:
    common = _load("_common")
    torch.set_num_threads(2)
    assert common.parse_args("x", []).threads == 1 and torch.get_num_threads() == 1
    common.parse_args("x", ["--threads", "2"])
    assert torch.get_num_threads() == 2
    with pytest.raises(SystemExit):
        common.parse_args("x", ["--threads", "0"])
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    assert common.parse_args("x", ["--seed", "-1"]).seed == -1
    with pytest.raises(SystemExit):
        common.parse_args("x", ["--seed", str(2**63)])
    assert f"--seed must be an integer in [-2**63, 2**63), got {2**63}" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_an_out_path_that_cannot_be_a_folder_is_refused_at_once(where, tmp_path, capsys) -> None:
    """Refused when the arguments are read, on one line naming --out and the fix, not as a
    traceback from savefig after minutes of work."""
    common = _load("_common")
    blocker = tmp_path / "fig.png"
    blocker.write_text("not a folder")
    out = blocker if where == "file" else blocker / "sub"
    with pytest.raises(SystemExit):
        common.parse_args("x", ["--out", str(out)])
    err = capsys.readouterr().err
    assert f"--out {str(out)!r}" in err and "is a file, not a folder" in err
    assert "Traceback" not in err and blocker.read_text() == "not a folder"
    assert common.parse_args("x", ["--out", str(tmp_path / "new" / "dir")]).out.is_dir()


def test_block_mass_share_against_a_hand_computed_matrix() -> None:
    import numpy as np

    from lab.experiments_plots import block_mass_share, pooled_abs

    H = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
    # blocks {0, 1} and {2}: diagonal mass 4 + 1 + 1 + 9 + 16 = 31 of 33
    assert block_mass_share(H, np.array([0, 0, 1])) == pytest.approx(31 / 33)
    A, s = pooled_abs(np.arange(16.0).reshape(4, 4), max_pixels=2)
    assert s == 2 and A[0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)
    # n = 5 is prime: tiles of 2, the last row and column of tiles partial
    A, s = pooled_abs(-np.arange(25.0).reshape(5, 5), max_pixels=3)
    assert s == 2 and A.shape == (3, 3)
    assert A[0, 0] == pytest.approx((0 + 1 + 5 + 6) / 4)
    assert A[2, 1] == pytest.approx((22 + 23) / 2) and A[2, 2] == 24


def test_a_saved_pdf_is_the_same_bytes_on_a_rerun(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    from lab.experiments_plots import save_figure

    saved = []
    for day in range(2):
        # the clock matplotlib dates a PDF by: a creation date would differ between the saves
        monkeypatch.setenv("SOURCE_DATE_EPOCH", str(86400 * day))
        fig, ax = plt.subplots()
        ax.plot([1.0, 2.0, 3.0])
        saved.append(save_figure(fig, "x", tmp_path, formats=("pdf",))[0].read_bytes())
    assert saved[0] == saved[1]


def test_training_curves_legend_gives_the_sample_std_over_seeds(monkeypatch) -> None:
    """Mean ± the sample standard deviation (n - 1 in the denominator) of the final losses."""
    import statistics

    module = _load("fig_training_curves")
    s = dict(steps=4, seeds=(0, 1, 2), grid=(1e-2,), equal_lr=1e-2)
    finals = {"AdamW": [2.0, 2.1, 2.5], "Adam-mini (paper rules)": [2.2, 2.2, 2.6]}
    finals |= {"Adam-mini (derived)": [3.0, 3.3, 3.1], "Adam-mini (by tensor)": [2.4, 2.9, 2.5]}
    records = [
        {
            "optimizer": name,
            "lr": 1e-2,
            "seed": seed,
            "eval_steps": [2, 4],
            "val_loss": [5.0, end],
            "v_entries": None if name == "AdamW" else 7,
        }
        for name, ends in finals.items()
        for seed, end in enumerate(ends)
    ]
    drawn = {}

    def keep(fig, name, out):
        drawn["legends"] = [ax.get_legend() for ax in fig.axes]
        return []

    monkeypatch.setattr(module, "save_figure", keep)
    module.draw(records, s, module.QUICK, Path("unused"))
    for legend in drawn["legends"]:
        assert "sample std" in legend.get_title().get_text()
        labels = [t.get_text() for t in legend.get_texts()]
        for name, ends in finals.items():
            want = f"{name}, lr 0.01: {statistics.mean(ends):.3f} ± {statistics.stdev(ends):.3f}"
            assert want in labels
    with pytest.raises(ValueError, match="rerun without --replot"):
        module.draw(records, dict(s, steps=5), module.QUICK, Path("unused"))


@pytest.mark.slow
def test_training_curves_replot_from_the_json_draws_the_same_figure(tmp_path: Path) -> None:
    module = _load("fig_training_curves")
    module.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    png = (tmp_path / "fig_training_curves.png").read_bytes()
    records = (tmp_path / "fig_training_curves.json").read_text()
    module.main(["--quick", "--out", str(tmp_path), "--no-progress", "--replot"])
    assert (tmp_path / "fig_training_curves.png").read_bytes() == png
    assert (tmp_path / "fig_training_curves.json").read_text() == records


def _curve_records(finals: dict[tuple[str, float], list[float]]) -> list[dict]:
    return [
        {
            "optimizer": name,
            "lr": lr,
            "seed": seed,
            "eval_steps": [0, 2, 4],
            "val_loss": [20.0, end + 1.0, end],
            "v_entries": None if name == "AdamW" else 7,
        }
        for (name, lr), ends in finals.items()
        for seed, end in enumerate(ends)
    ]


def test_training_curves_draw_the_seed_mean_with_a_min_max_band_at_the_best_lr(
    monkeypatch,
) -> None:
    """Left: every optimizer at equal_lr; right: each at the lr of its lowest mean final loss.
    A line is the mean over seeds, its band spans the seeds' min..max."""
    import matplotlib.collections

    module = _load("fig_training_curves")
    names = ["AdamW", "Adam-mini (paper rules)", "Adam-mini (derived)", "Adam-mini (by tensor)"]
    s = dict(steps=4, seeds=(0, 1, 2), grid=(1e-2, 3e-2), equal_lr=3e-2)
    finals = {}
    for i, name in enumerate(names):
        finals[(name, 1e-2)] = [2.0 + i, 2.9 + i, 2.1 + i]  # mean 2.333 + i, median 2.1 + i
        # AdamW is better at 3e-2; the others at 1e-2
        finals[(name, 3e-2)] = [1.5, 1.6, 1.7] if name == "AdamW" else [9.0, 9.0, 9.0]
    drawn = {}

    def keep(fig, name, out):
        drawn["axes"] = fig.axes
        return []

    monkeypatch.setattr(module, "save_figure", keep)
    records = _curve_records(finals)
    module.draw(records, s, module.QUICK, Path("unused"))
    best = {name: (3e-2 if name == "AdamW" else 1e-2) for name in names}
    for ax, lrs in zip(drawn["axes"], [dict.fromkeys(names, 3e-2), best], strict=True):
        lines = {line.get_label().split(",")[0]: line for line in ax.get_lines()}
        bands = [c for c in ax.collections if isinstance(c, matplotlib.collections.PolyCollection)]
        for name, band in zip(names, bands, strict=True):
            ends = finals[(name, lrs[name])]
            assert f"lr {lrs[name]:g}:" in lines[name].get_label()
            assert list(lines[name].get_xdata()) == [0, 2, 4]
            assert lines[name].get_ydata()[-1] == pytest.approx(sum(ends) / 3)
            ys = band.get_paths()[0].vertices[:, 1]
            assert ys.min() == pytest.approx(min(ends)) and ys.max() == pytest.approx(20.0)
            assert any(abs(y - max(ends)) < 1e-9 for y in ys)  # the top edge, at the last step
    with pytest.raises(ValueError, match="lacks the runs"):  # one seed of one lr missing
        module.draw(records[1:], s, module.QUICK, Path("unused"))


def test_training_curves_train_every_lr_and_seed_of_the_grid(tmp_path: Path, monkeypatch) -> None:
    """Each (lr, seed) job trains with its own seed and lr, and the json records them."""
    import json
    from types import SimpleNamespace

    module = _load("fig_training_curves")
    calls = []

    def fake_train_variants(variants, config, corpus, *, lr, seed, steps, **kw):
        calls.append((lr, seed))
        run = SimpleNamespace(
            eval_steps=[0, steps], val_loss=[5.0, 2.0 + seed + lr], step_time_s=0.1
        )
        return [SimpleNamespace(name=name, run=run) for name in variants]

    monkeypatch.setattr(module, "train_variants", fake_train_variants)
    monkeypatch.setattr(
        module, "derived_partition", lambda c, corpus, seed, progress: partition_by_tensor(c)
    )
    monkeypatch.setattr(module, "save_figure", lambda fig, name, out: [])
    module.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    want = [(lr, seed) for lr in module.SMALL["grid"] for seed in module.SMALL["seeds"]]
    assert calls == want
    records = json.loads((tmp_path / "fig_training_curves.json").read_text())
    assert {(r["lr"], r["seed"]) for r in records} == set(want)
    assert all(r["val_loss"][-1] == 2.0 + r["seed"] + r["lr"] for r in records)


def partition_by_tensor(c):
    import partition
    from lab.models import TinyGPT

    with torch.device("meta"):
        return partition.by_tensor(TinyGPT(c.model))


def test_memory_table_bars_are_in_gb_and_the_markdown_is_written(tmp_path, monkeypatch) -> None:
    """Full mode draws every model of lab.memory.MODELS, bars in 1e9 bytes, the markdown table
    beside the figure."""
    from lab import memory

    module = _load("fig_memory_table")
    drawn = {}

    def keep(fig, name, out):
        drawn["ax"] = fig.axes[0]
        return []

    monkeypatch.setattr(module, "save_figure", keep)
    paths = module.main(["--out", str(tmp_path)])
    rows = memory.memory_rows(list(memory.MODELS))
    assert paths == [tmp_path / "fig_memory_table.md"]
    assert paths[0].read_text().strip() == memory.markdown(rows).strip()
    ax = drawn["ax"]
    assert ax.get_yscale() == "log"
    heights = [bar.get_height() for bar in ax.patches]
    want = [getattr(r, k) / 1e9 for k in ("adamw", "adam_mini", "adam_mini_bf16") for r in rows]
    assert heights == pytest.approx(want)
    ticks = [t.get_text().split("\n")[0] for t in ax.get_xticklabels()]
    assert ticks == [r.model for r in rows]
    # the paper's diamonds sit on the AdamW and Adam-mini bars of their model
    diamonds = [c.get_offsets().ravel().tolist() for c in ax.collections]
    want = [
        [j - 0.27, memory.PAPER[r.model][0], j, memory.PAPER[r.model][1]]
        for j, r in enumerate(rows)
        if r.model in memory.PAPER
    ]
    assert want and len(diamonds) == len(want)
    for got, expected in zip(diamonds, want, strict=True):
        assert got == pytest.approx(expected)
