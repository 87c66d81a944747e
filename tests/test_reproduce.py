"""`adam-mini-lab reproduce --quick` writes the report, partition.json and the figures."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import hessian
import partition
from lab import report as md
from lab.cli import main
from lab.experiments import block_share
from lab.models import TinyGPT, TinyGPTConfig, lm_loss
from lab.reproduce import QUICK
from lab.train import VAL_SEED_OFFSET


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reproduce")
    threads = torch.get_num_threads()  # reproduce sets --threads (default 1): restore it
    try:
        argv = ["reproduce", "--quick", "--out", str(path), "--no-progress", "--seed", "1"]
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.mark.slow
def test_writes_report_partition_and_figures(out: Path) -> None:
    for name in ("report.md", "partition.json", "results.json"):
        assert (out / name).stat().st_size > 0
    for fig in ("coupling", "blockwise_spectra", "training_curves"):
        assert (out / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (out / image).exists(), image
    assert len(list((out / "curves").glob("*.csv"))) == 3


@pytest.mark.slow
def test_report_counts_one_layer_in_the_singular(out: Path) -> None:
    assert QUICK.model.n_layer == 1 and QUICK.model.n_heads == 2
    report = (out / "report.md").read_text()
    assert "TinyGPT: 1 layer, d_model 8, 2 heads, context 8" in report
    assert not re.search(r"\b1 (layer|head|step)s\b", report)


def test_plural() -> None:
    assert [md.plural(n, "layer") for n in (0, 1, 2)] == ["0 layers", "1 layer", "2 layers"]


@pytest.mark.slow
def test_partition_fits_the_trained_model(out: Path) -> None:
    part = partition.Partition.from_json(out / "partition.json")
    part.check(TinyGPT(QUICK.model))
    assert part.provenance["method"] == "greedy"
    assert 0 < part.num_blocks <= partition.by_rows(TinyGPT(QUICK.model)).num_blocks


@pytest.mark.slow
def test_report_numbers_come_from_the_runs(out: Path) -> None:
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    names = [v["name"] for v in results["variants"]]
    assert names == ["AdamW", "Adam-mini (derived)", "Adam-mini (paper rules)"]
    for v in results["variants"]:
        run = v["run"]
        assert run["steps"] == QUICK.steps and run["seed"] == 1
        assert run["final_val_loss"] == run["val_loss"][-1]
        row = next(line for line in report.splitlines() if line.startswith(f"| {v['name']} |"))
        assert f"{run['final_val_loss']:.4f}" in row
        assert f"{v['v_entries']:,}" in row
    adamw = results["variants"][0]
    assert adamw["v_entries"] == results["hessian"]["num_params"]
    assert adamw["state_bytes"] == adamw["run"]["optimizer_state_bytes"]  # predicted == allocated
    derived = results["variants"][1]
    assert derived["v_entries"] == results["hessian"]["derived_blocks"]
    assert f"{results['hessian']['r_diag']:.3f}" in report


def test_steps_and_seed_options_reach_the_config(monkeypatch) -> None:
    seen = {}

    def fake_run(config, out, progress=True):
        seen.update(config=config, out=out)
        raise SystemExit(0)

    monkeypatch.setattr("lab.reproduce.run", fake_run)
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit):
        main(["reproduce", "--steps", "7", "--seed", "3", "--out", "x", "--threads", "2"])
    assert torch.get_num_threads() == 2
    torch.set_num_threads(threads)
    assert seen["config"].steps == 7 and seen["config"].seed == 3 and str(seen["out"]) == "x"


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1])
def test_every_seed_torch_takes_reaches_the_config(seed, monkeypatch) -> None:
    """Negative seeds are seeds (torch.manual_seed and the hessian estimators take them, and
    reproduce took them before its range check); only seeds beyond 64 bits are refused."""
    seen = {}

    def fake_run(config, out, progress=True):
        seen.update(config=config)
        raise SystemExit(0)

    monkeypatch.setattr("lab.reproduce.run", fake_run)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit):
            main(["reproduce", "--seed", str(seed), "--out", "x", "--threads", str(threads)])
    finally:
        torch.set_num_threads(threads)
    assert seen["config"].seed == seed
    torch.Generator().manual_seed(seed + VAL_SEED_OFFSET)  # the largest seed lab.train derives


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--seed", str(2**63)], f"--seed must be an integer in [-2**63, 2**63), got {2**63}"),
        (
            ["--seed", str(-(2**63) - 1)],
            f"--seed must be an integer in [-2**63, 2**63), got {-(2**63) - 1}",
        ),
    ],
)
def test_bad_numbers_are_one_line_errors(argv, message, capsys, tmp_path) -> None:
    """Refused before any work, on one line that names the flag, like the other subcommands."""
    assert reproduce_quick(*argv, "--out", str(tmp_path)) == 1
    assert capsys.readouterr().err == f"adam-mini-lab reproduce: error: {message}\n"


def test_block_share_matches_an_exact_coupling_of_the_coarse_partition() -> None:
    """r_diag summed from the row masses == r_diag measured directly on the coarser partition."""
    cfg = TinyGPTConfig(vocab_size=256, context=4, n_layer=1, d_model=4, n_heads=2)
    model = TinyGPT(cfg, seed=0).double()
    named = [(n, p) for n, p in model.named_parameters() if n.startswith("blocks.0.")]
    x = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(0))
    H = hessian.HessianOperator(model, lm_loss, (x, x.roll(-1, 1)), params=[n for n, _ in named])
    H = H.to_dense().detach()  # flat order = model order = the partitions' names order
    rows = hessian.block_coupling(H, partition.by_rows(named), exact=True, progress=False)
    for coarse in (partition.adam_mini(named, n_heads=2), partition.by_tensor(named)):
        direct = hessian.block_coupling(H, coarse, exact=True, progress=False)
        share = block_share(rows, coarse)
        assert share.r_diag == pytest.approx(direct.r_diag, rel=1e-10)
        assert share.num_blocks == coarse.num_blocks
    with pytest.raises(ValueError, match="coarsening"):
        block_share(direct, partition.by_rows(named))


def test_measure_structure_takes_one_pair_and_refuses_no_batches() -> None:
    from lab.experiments import measure_structure

    model = TinyGPT(TinyGPTConfig(vocab_size=8, context=4, n_layer=1, d_model=8, n_heads=2), seed=0)
    x = torch.randint(0, 8, (2, 4), generator=torch.Generator().manual_seed(0))
    pair = (x, x.roll(1, dims=1))
    kw = dict(num_samples=2, spectra_probes=1, spectra_steps=3, progress=False)
    one = measure_structure(model, pair, **kw)
    listed = measure_structure(model, [pair], **kw)
    assert one.coupling.r_diag == listed.coupling.r_diag
    with pytest.raises(ValueError, match="non-empty list of"):
        measure_structure(model, [], **kw)


def reproduce_quick(*argv: str) -> int:
    """``adam-mini-lab reproduce --quick --no-progress ARGV``; restores torch's thread count,
    which reproduce sets (``--threads``, default 1)."""
    threads = torch.get_num_threads()
    try:
        return main(["reproduce", "--quick", "--no-progress", *argv])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("file", "is a file, not a folder; give a folder path"),
        ("below a file", "is a file, not a folder; give a folder path"),
        ("not writable", "is not writable; choose a writable folder"),
    ],
)
def test_an_unusable_out_is_refused_before_any_work(
    where, message, tmp_path, capsys, monkeypatch
) -> None:
    """--out naming a file, a path under one or a folder that cannot be written ends in one
    line naming --out and the fix, before minutes of work, not in '[Errno 20] Not a directory:
    .../figures' or a traceback at the first write."""
    monkeypatch.setattr(
        "lab.reproduce.warm_up_and_measure", lambda *a, **k: pytest.fail("work began")
    )
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    out = {"file": blocker, "below a file": blocker / "sub", "not writable": tmp_path}[where]
    real_access = os.access
    monkeypatch.setattr(
        "os.access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode)
    )  # tmp_path itself reads as not writable (a chmod does not stop root)
    assert reproduce_quick("--out", str(out)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Errno" not in err
    assert f"--out {str(out)!r}" in err and message in err
    assert blocker.read_text() == "not a folder"


def test_the_coupling_heatmaps_draw_no_grid_lines_through_the_tensors(tmp_path, monkeypatch):
    """The style's grid sits at the tick labels, i.e. across the middle of every labelled
    tensor, where it reads as one more block boundary: both heatmaps turn it off."""
    import matplotlib.pyplot as plt

    from lab import reproduce
    from lab.data import Corpus
    from lab.experiments import measure_structure, train_variants

    cfg = TinyGPTConfig(vocab_size=256, context=4, n_layer=1, d_model=4, n_heads=2)
    corpus = Corpus.stdlib()
    batch = corpus.batch("train", 2, 4, torch.Generator().manual_seed(0))
    kw = dict(num_samples=2, spectra_probes=1, spectra_steps=2, progress=False)
    structure = measure_structure(TinyGPT(cfg, seed=0), batch, **kw)
    variants = train_variants(
        {"AdamW": None}, cfg, corpus, steps=2, lr=1e-3, batch_size=2, seed=0, eval_every=1,
        eval_batches=1, progress=False,
    )  # fmt: skip
    saved = {}

    def keep(fig, name, out, formats=("png",)):
        saved[name] = fig
        return []

    monkeypatch.setattr(reproduce.plots, "save_figure", keep)
    reproduce._figures(structure, variants, tmp_path)
    axes = [ax for ax in saved["coupling"].axes if ax.images]
    assert len(axes) == 2
    for ax in axes:
        lines = ax.get_xgridlines() + ax.get_ygridlines()
        assert not any(line.get_visible() for line in lines), ax.get_title()
    plt.close("all")


def reproduce_raising(error: BaseException | None, monkeypatch, tmp_path, capsys):
    """Run `adam-mini-lab reproduce --quick` with its work replaced by ``error``'s raise."""

    def fake_run(config, out, progress=True):
        if error is None:  # the real corpus read, with the files changing under it
            from lab.data import Corpus

            Corpus.stdlib(cache_dir=tmp_path / "cache", max_bytes=20_000)
        raise error or AssertionError("the corpus read should have failed")

    monkeypatch.setattr("lab.reproduce.run", fake_run)
    return reproduce_quick("--out", str(tmp_path / "o"))


def test_diverged_training_is_a_one_line_error_naming_the_fix(monkeypatch, tmp_path, capsys):
    error = FloatingPointError(
        "AdamW: training loss became nan at step 3; lower the lr (base lr 0.01) or keep grad_clip on"
    )
    assert reproduce_raising(error, monkeypatch, tmp_path, capsys) == 1
    err = capsys.readouterr().err
    assert err.startswith("adam-mini-lab reproduce: error: training diverged: AdamW: training ")
    assert "--seed" in err and "lr=" in err and err.count("\n") == 1


def test_stdlib_changing_under_the_corpus_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(Path, "read_bytes", lambda self: b"")  # emptied since it was listed
    assert reproduce_raising(None, monkeypatch, tmp_path, capsys) == 1
    err = capsys.readouterr().err
    assert err.startswith("adam-mini-lab reproduce: error: stdlib files changed while reading")
    assert "retry when" in err and err.count("\n") == 1


def test_other_runtime_errors_keep_their_traceback(monkeypatch, tmp_path, capsys):
    with pytest.raises(RuntimeError, match="a bug"):
        reproduce_raising(RuntimeError("a bug"), monkeypatch, tmp_path, capsys)


@pytest.mark.slow
def test_report_columns_and_shares_are_each_their_own_number(out: Path) -> None:
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    hess, variants = results["hessian"], results["variants"]
    adamw = variants[0]
    final = {v["name"]: v["run"]["final_val_loss"] for v in variants}
    for v in variants:
        assert v["adamw_state_bytes"] == adamw["state_bytes"]
        assert v["v_removed"] == pytest.approx(1 - v["v_entries"] / hess["num_params"], rel=1e-12)
        line = next(x for x in report.splitlines() if x.startswith(f"| {v['name']} |"))
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        assert row[2] == md.percent(v["v_removed"])
        assert row[3] == md.human_bytes(v["state_bytes"])
        assert row[4] == md.human_bytes(v["run"]["optimizer_state_bytes"])
        assert row[5] == md.percent(v["state_bytes"] / adamw["state_bytes"])
        assert row[7] == f"{final[v['name']] - final['AdamW']:+.4f}"
    best = min(final, key=final.get)
    assert f"Lowest final validation loss: **{best}** ({final[best]:.4f})" in report
    model = TinyGPT(QUICK.model)
    blocks = {k: s["num_blocks"] for k, s in hess["shares"].items()}
    assert blocks == {
        "one block per row (candidate)": hess["candidate_blocks"],
        "Adam-mini paper rules": partition.adam_mini(model).num_blocks,
        "derived from the Hessian": hess["derived_blocks"],
        "one block per tensor": len(list(model.parameters())),
    }
    prov = hess["derived_provenance"]
    assert (hess["r_diag"], hess["r_diag_null"]) == (prov["r_diag_before"], prov["r_diag_null"])
    assert hess["r_diag_null"] < hess["r_diag"]
    assert f"**{hess['r_diag_null']:.4f}** for a random partition" in report
    assert f"(val loss {results['warmup_val_loss']:.3f})" in report


def test_warm_up_and_measure_seeds_the_model_and_the_hessian_batches(monkeypatch) -> None:
    from dataclasses import replace

    from lab import reproduce
    from lab.data import Corpus

    seen = {"seeds": [], "batches": [], "kw": []}
    real_model = reproduce.TinyGPT

    def model(config, seed=None):
        seen["seeds"].append(seed)
        return real_model(config, seed=seed)

    def measure(model, batches, **kw):
        seen["batches"].append(batches)
        seen["kw"].append(kw)
        return "structure"

    monkeypatch.setattr(reproduce, "TinyGPT", model)
    monkeypatch.setattr(reproduce, "measure_structure", measure)
    config = replace(QUICK, hessian_warmup_steps=2, hessian_batches=2, eval_batches=1)
    corpus = Corpus(torch.arange(256, dtype=torch.uint8).repeat(4), 900, source="toy")
    for seed in (3, 4):
        reproduce.warm_up_and_measure(config, corpus, seed=seed, progress=False)
    assert seen["seeds"] == [3, 4]
    a, b = seen["batches"]
    assert len(a) == len(b) == 2
    assert all(x.shape == (QUICK.hessian_batch_size, QUICK.model.context) for x, _ in a + b)
    assert not torch.equal(a[0][0], a[1][0]) and not torch.equal(a[0][0], b[0][0])
    kw = seen["kw"][1]
    assert (kw["seed"], kw["num_samples"]) == (4, QUICK.coupling_samples)


def test_a_config_that_would_fail_after_the_warm_up_is_refused_when_built() -> None:
    from dataclasses import replace

    for fields, message in (
        ({"coupling_samples": 1}, "coupling_samples must be an int >= 2"),
        ({"threshold": 5.0}, r"threshold must be a number in \[0, 1\]"),
        ({"lr": -1e-3}, "lr must be a finite number > 0"),
        ({"steps": 2.0}, "steps must be an int >= 1, got 2.0"),
        ({"seed": 0.5}, "seed must be an integer"),
    ):
        with pytest.raises(ValueError, match=f"ReproduceConfig.{message}"):
            replace(QUICK, **fields)
    with pytest.raises(TypeError, match="model must be a TinyGPTConfig"):
        replace(QUICK, model={"d_model": 8})
