"""The training loop: seeded, evaluated on the validation split, curves saved; quadratic methods."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch

from lab import experiments_quadratic as eq
from lab.data import Corpus
from lab.models import TinyGPT, TinyGPTConfig
from lab.train import TrainResult, WarmupCosine, check_out_file, evaluate, train

CFG = TinyGPTConfig(context=8, d_model=8, n_layer=1, n_heads=2)


class RecordingCorpus:
    """A corpus with distinct train/val text that records which split every batch came from."""

    def __init__(self) -> None:
        text = bytes(range(32, 127)) * 40
        tokens = torch.tensor(list(text), dtype=torch.uint8)
        self.inner = Corpus(tokens, split_index=3000, source="test")
        self.calls: list[str] = []

    def batch(self, split, batch_size, context, generator):
        self.calls.append(split)
        return self.inner.batch(split, batch_size, context, generator)


def _run(corpus, seed: int = 0, steps: int = 6, **kw) -> TrainResult:
    return train(
        lambda: TinyGPT(CFG),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
        corpus,
        steps=steps,
        batch_size=4,
        context=8,
        eval_every=3,
        eval_batches=2,
        seed=seed,
        progress=False,
        **kw,
    )


def test_same_seed_same_losses_other_seed_other_losses() -> None:
    corpus = RecordingCorpus()
    a, b, c = _run(corpus, seed=3), _run(corpus, seed=3), _run(corpus, seed=4)
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    assert a.train_loss != c.train_loss


def test_evaluates_on_the_validation_split_at_0_every_and_end() -> None:
    corpus = RecordingCorpus()
    res = _run(corpus, steps=7)
    assert corpus.calls.count("val") == 2  # the fixed validation set is drawn once
    assert corpus.calls.count("train") == 7
    assert res.eval_steps == (0, 3, 6, 7)
    assert len(res.val_loss) == 4 and len(res.train_loss) == 7 and len(res.lr) == 7
    assert res.val_loss[-1] < res.val_loss[0]  # it learns


def test_validation_loss_is_the_mean_over_val_batches() -> None:
    corpus = RecordingCorpus()
    torch.manual_seed(0)
    model = TinyGPT(CFG)
    gen = torch.Generator().manual_seed(0)
    val = [corpus.inner.batch("val", 4, 8, gen) for _ in range(3)]
    from lab.models import lm_loss

    with torch.no_grad():
        ref = sum(float(lm_loss(model, b)) for b in val) / 3
    assert evaluate(model, val) == pytest.approx(ref, rel=1e-12)
    # a loss that sees val text only: the val bytes are disjoint from the train bytes
    assert set(corpus.inner.val.tolist()) <= set(range(32, 127))


def test_records_costs_and_roundtrips(tmp_path) -> None:
    res = _run(RecordingCorpus())
    assert res.step_time_s > 0 and res.total_time_s >= res.step_time_s * res.steps
    n = sum(p.numel() for p in TinyGPT(CFG).parameters())
    assert res.num_params == n
    assert res.optimizer_state_bytes == 2 * 4 * n + 4 * len(list(TinyGPT(CFG).parameters()))
    assert res.peak_memory_bytes >= 0 and "RSS" in res.memory_source
    assert TrainResult.from_dict(json.loads(res.save_json(tmp_path / "r.json").read_text())) == res
    rows = list(csv.DictReader(res.save_csv(tmp_path / "r.csv").open()))
    assert len(rows) == res.steps + 1
    assert float(rows[3]["val_loss"]) == res.val_loss[1]
    assert float(rows[0]["train_loss"]) == res.train_loss[0]


def test_warmup_cosine_schedule() -> None:
    s = WarmupCosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(110) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(total_steps=5, warmup_steps=6)


def test_schedule_sets_the_lr() -> None:
    res = _run(RecordingCorpus(), schedule=lambda t: 0.5**t)
    assert res.lr == tuple(1e-2 * 0.5**t for t in range(6))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"steps": 0}, "steps=0"),
        ({"eval_every": 0}, "eval_every=0"),
        ({"eval_batches": 0}, "eval_batches=0"),
        ({"grad_clip": 0.0}, "grad_clip=0.0"),
        ({"grad_clip": -1.0}, "grad_clip=-1.0"),
        ({"grad_clip": float("nan")}, "grad_clip=nan"),
    ],
)
def test_bad_budgets_are_refused_before_training(kw, message) -> None:
    args = {"steps": 3, "batch_size": 2, "context": 8, "progress": False} | kw
    with pytest.raises(ValueError, match=message):
        train(lambda: TinyGPT(CFG), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
              RecordingCorpus(), **args)  # fmt: skip


def test_diverging_run_names_the_fix() -> None:
    with pytest.raises(FloatingPointError, match="lower the lr"):
        train(
            lambda: TinyGPT(CFG),
            lambda m: torch.optim.SGD(m.parameters(), lr=1e30),
            RecordingCorpus(),
            steps=5,
            batch_size=2,
            context=8,
            grad_clip=None,
            progress=False,
        )


def test_a_schedule_that_returns_a_negative_multiplier_is_refused() -> None:
    with pytest.raises(ValueError, match=r"schedule\(0\) = -1.0; an lr multiplier must be"):
        train(lambda: TinyGPT(CFG), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
              RecordingCorpus(), steps=2, batch_size=2, context=8, schedule=lambda t: -1.0,
              progress=False)  # fmt: skip


def test_evaluate_refuses_no_batches_and_restores_train_mode_on_error() -> None:
    model = TinyGPT(CFG).train()
    with pytest.raises(ValueError, match="at least one batch"):
        evaluate(model, [])

    def failing(model, batch):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        evaluate(model, [None], failing)
    assert model.training


# ---- the quadratic case study (lab/experiments_quadratic.py), against closed forms ----


def _quadratic(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    H = torch.block_diag(A[:3, :3] @ A[:3, :3].T + torch.eye(3), 10 * torch.eye(3))
    xs = torch.randn(6, generator=g, dtype=torch.float64)

    def loss(x):
        return float(0.5 * (x - xs) @ H @ (x - xs))

    return H, xs, loss, lambda x: H @ (x - xs)


def test_gd_matches_the_closed_form() -> None:
    H, xs, loss, grad = _quadratic()
    x0 = torch.zeros(6, dtype=torch.float64)
    run = eq.gd(loss, grad, x0, lr=0.01, iters=5)
    M = torch.linalg.matrix_power(torch.eye(6, dtype=torch.float64) - 0.01 * H, 5)
    assert run.final == pytest.approx(loss(xs + M @ (x0 - xs)), rel=1e-10)
    same = eq.blockwise_gd(loss, grad, x0, [3, 3], [0.01, 0.01], iters=5)
    assert same.loss == pytest.approx(run.loss, rel=1e-12)


@pytest.mark.parametrize(
    ("sizes", "lrs", "message"),
    [([4, 3], [0.1, 0.1], "add up to 7"), ([6, 0], [0.1, 0.1], "positive ints"),
     ([3, 3], [0.1], "1 block_lrs for 2 blocks")],
)  # fmt: skip
def test_quadratic_methods_refuse_blocks_that_do_not_cover_x(sizes, lrs, message) -> None:
    _, _, loss, grad = _quadratic()
    x0 = torch.zeros(6, dtype=torch.float64)
    assert eq.blockwise_gd(loss, grad, x0, torch.tensor([3, 3]), [0.1, 0.1], iters=1).loss
    with pytest.raises(ValueError, match=message):
        eq.blockwise_gd(loss, grad, x0, sizes, lrs, iters=1)
    if len(sizes) == len(lrs):
        with pytest.raises(ValueError, match=message):
            eq.adam_mini(loss, grad, x0, lr=0.1, iters=1, block_sizes=sizes)


def test_adam_mini_with_singleton_blocks_is_adam() -> None:
    _, _, loss, grad = _quadratic(1)
    x0 = torch.zeros(6, dtype=torch.float64)
    a = eq.adam(loss, grad, x0, lr=0.05, iters=20)
    b = eq.adam_mini(loss, grad, x0, lr=0.05, iters=20, block_sizes=[1] * 6)
    assert a.loss == pytest.approx(b.loss, rel=1e-12)
    c = eq.adam_mini(loss, grad, x0, lr=0.05, iters=20, block_sizes=[3, 3])
    assert c.loss != pytest.approx(a.loss, rel=1e-6)


def test_first_adam_step_is_lr_times_sign_and_tune_picks_best() -> None:
    _, _, loss, grad = _quadratic(2)
    x0 = torch.zeros(6, dtype=torch.float64)
    g = grad(x0)
    one = eq.adam(loss, grad, x0, lr=0.1, iters=1)
    assert one.loss[1] == pytest.approx(loss(x0 - 0.1 * g.sign()), rel=1e-6)
    best = eq.tune(lambda lr: eq.gd(loss, grad, x0, lr, 30), [1e-4, 1e-2, 1e3])
    assert best.lr == 1e-2
    assert math.isinf(eq.gd(loss, grad, x0, 1e3, 30).final)


def test_check_out_file_refuses_what_cannot_be_written_without_writing(tmp_path, monkeypatch):
    """A folder, a path under a file and an unwritable nearest folder are one-line OSErrors
    naming the flag and the fix; a good path is returned and nothing is created."""
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(IsADirectoryError, match=r"^--out '.*': it is a folder; give a file"):
        check_out_file(tmp_path)
    with pytest.raises(NotADirectoryError, match=r"is a file, not a folder"):
        check_out_file(blocker / "p.json", "--save")
    target = tmp_path / "new" / "p.json"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    with pytest.raises(PermissionError, match=r"is not writable; choose a writable folder"):
        check_out_file(target)  # the nearest existing folder, where "new" would be created
    monkeypatch.undo()
    assert check_out_file(target) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
