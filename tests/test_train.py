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


# ---- the loop's settings reach the run (found unchecked by a mutation audit) ----


def test_warmup_cosine_stays_at_min_ratio_after_total_steps_and_validates() -> None:
    s = WarmupCosine(total_steps=20, warmup_steps=4, min_ratio=0.25)
    assert [s(t) for t in (20, 25, 39)] == [0.25, 0.25, 0.25]  # cos would come back up
    assert [WarmupCosine(total_steps=4, warmup_steps=4)(t) for t in range(4)] == [
        0.25,
        0.5,
        0.75,
        1,
    ]
    for kw, message in [
        ({"total_steps": 0}, "total_steps=0 must be >= 1"),
        ({"total_steps": 5, "warmup_steps": -1}, r"warmup_steps=-1 must lie in \[0, total"),
        ({"total_steps": 5, "min_ratio": 1.5}, r"min_ratio=1.5 must lie in \[0, 1\]"),
        ({"total_steps": 5, "min_ratio": -0.1}, r"min_ratio=-0.1 must lie in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            WarmupCosine(**kw)


def test_default_schedule_warms_up_for_a_twentieth_of_the_steps() -> None:
    res = train(lambda: TinyGPT(CFG), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                RecordingCorpus(), steps=40, batch_size=2, context=8, eval_every=40,
                eval_batches=1, progress=False)  # fmt: skip
    s = WarmupCosine(40, warmup_steps=2)
    assert res.lr == tuple(0.1 * s(t) for t in range(40))
    assert res.lr[0] == pytest.approx(0.05) and res.lr[1] == pytest.approx(0.1)


def test_csv_rows_hold_each_steps_lr_and_loss(tmp_path) -> None:
    res = _run(RecordingCorpus(), schedule=lambda t: 0.5**t)
    rows = list(csv.DictReader(res.save_csv(tmp_path / "r.csv").open()))
    for t in range(res.steps):
        assert (
            float(rows[t]["lr"]) == res.lr[t] and float(rows[t]["train_loss"]) == res.train_loss[t]
        )
    assert (
        rows[-1]["lr"] == rows[-1]["train_loss"] == ""
        and float(rows[-1]["val_loss"]) == (res.val_loss[-1])
    )


class BatchLog(RecordingCorpus):
    """A RecordingCorpus that also keeps every batch it hands out."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def batch(self, split, batch_size, context, generator):
        out = super().batch(split, batch_size, context, generator)
        self.batches.append((split, out))
        return out


def test_the_seed_seeds_the_init_the_training_batches_and_the_validation_batches() -> None:
    from lab.train import VAL_SEED_OFFSET

    corpus, inits = BatchLog(), []

    def factory():
        model = TinyGPT(CFG)
        inits.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    train(factory, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2), corpus, steps=3,
          batch_size=4, context=8, eval_batches=2, seed=5, progress=False)  # fmt: skip
    torch.manual_seed(5)
    ref = TinyGPT(CFG).state_dict()
    assert all(torch.equal(inits[0][k], ref[k]) for k in ref)
    val_gen = torch.Generator().manual_seed(5 + VAL_SEED_OFFSET)
    train_gen = torch.Generator().manual_seed(5)
    for split, (x, y) in corpus.batches:
        gen = val_gen if split == "val" else train_gen
        ex, ey = corpus.inner.batch(split, 4, 8, gen)
        assert torch.equal(x, ex) and torch.equal(y, ey), split
    assert [s for s, _ in corpus.batches] == ["val"] * 2 + ["train"] * 3


def _sgd_capture(captured, groups=None, lr=1.0):
    def factory(model):
        captured["start"] = [p.detach().clone() for p in model.parameters()]
        captured["model"] = model
        captured["opt"] = torch.optim.SGD(groups(model) if groups else model.parameters(), lr=lr)
        return captured["opt"]

    return factory


def test_every_param_group_keeps_its_own_base_lr_under_the_schedule() -> None:
    captured = {}

    def groups(model):
        emb = [model.tok_emb.weight, model.pos_emb.weight]
        rest = [p for n, p in model.named_parameters() if not n.endswith("emb.weight")]
        return [{"params": emb, "lr": 1e-2}, {"params": rest, "lr": 1e-3}]

    res = train(lambda: TinyGPT(CFG), _sgd_capture(captured, groups, 1e-2), RecordingCorpus(),
                steps=2, batch_size=2, context=8, schedule=lambda t: 0.5, progress=False)  # fmt: skip
    assert [g["lr"] for g in captured["opt"].param_groups] == [5e-3, 5e-4]
    assert res.base_lr == 1e-2 and res.lr == (5e-3, 5e-3)  # the first group's


def test_grad_clip_bounds_the_global_gradient_norm_of_each_step() -> None:
    """One SGD step at lr 1 moves the parameters by the clipped gradient: norm = grad_clip."""
    captured = {}
    train(lambda: TinyGPT(CFG), _sgd_capture(captured), RecordingCorpus(), steps=1,
          batch_size=2, context=8, schedule=lambda t: 1.0, grad_clip=1e-3, progress=False)  # fmt: skip
    moved = [
        p.detach() - p0
        for p, p0 in zip(captured["model"].parameters(), captured["start"], strict=True)
    ]
    assert float(torch.linalg.vector_norm(torch.cat([d.reshape(-1) for d in moved]))) == (
        pytest.approx(1e-3, rel=1e-4)
    )


def test_an_infinite_lr_multiplier_is_refused() -> None:
    with pytest.raises(ValueError, match=r"schedule\(0\) = inf; an lr multiplier must be finite"):
        train(lambda: TinyGPT(CFG), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
              RecordingCorpus(), steps=2, batch_size=2, context=8, schedule=lambda t: math.inf,
              progress=False)  # fmt: skip


def test_evaluate_runs_the_model_in_eval_mode() -> None:
    model = TinyGPT(CFG).train()
    seen = []

    def loss(m, batch):
        seen.append(m.training)
        return torch.tensor(float(batch))

    assert evaluate(model, [1, 2, 6], loss) == 3.0
    assert seen == [False, False, False] and model.training


def test_optimizer_state_bytes_count_each_tensors_own_element_size() -> None:
    from lab.train import optimizer_state_nbytes

    model = torch.nn.Linear(3, 2).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())  # exp_avg, exp_avg_sq in float64, step float32
    assert optimizer_state_nbytes(opt) == 2 * 8 * n + 4 * 2


def test_peak_memory_on_the_cpu_is_the_growth_of_peak_rss_in_bytes(monkeypatch) -> None:
    """Linux reports ru_maxrss in KiB (macOS in bytes): the run's growth, in bytes."""
    import itertools
    import types

    import lab.train

    rss = itertools.chain([1000], itertools.repeat(3000))
    monkeypatch.setattr(lab.train.sys, "platform", "linux")
    monkeypatch.setattr(
        lab.train.resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=next(rss))
    )
    res = _run(RecordingCorpus(), steps=2)
    assert res.peak_memory_bytes == 2000 * 1024
    monkeypatch.setattr(lab.train.sys, "platform", "darwin")
    assert lab.train._peak_rss_bytes() == 3000


def _reference_losses(opt_factory, loss, grad, x0, sizes, iters):
    """Loss after each step of a torch optimizer on the blocks of ``x`` as parameters."""
    params = [p.clone().requires_grad_() for p in x0.split(sizes)]
    opt = opt_factory(params)
    out = [loss(x0)]
    for _ in range(iters):
        g = grad(torch.cat([p.detach() for p in params]))
        for p, gb in zip(params, g.split(sizes), strict=True):
            p.grad = gb.clone()
        opt.step()
        out.append(loss(torch.cat([p.detach() for p in params])))
    return out


@pytest.mark.parametrize("eps", [1e-8, 0.1])  # 0.1: where eps sits in the denominator shows
def test_quadratic_adam_and_adam_mini_match_the_torch_optimizers(eps) -> None:
    """eq.adam against torch.optim.Adam; eq.adam_mini against optimizer.AdamMini with one block
    per tensor: v_b is the mean of the block's squared gradients."""
    import optimizer
    import partition

    _, _, loss, grad = _quadratic(3)
    x0 = torch.zeros(6, dtype=torch.float64)
    kw = dict(lr=0.05, betas=(0.8, 0.99), eps=eps)
    ref = _reference_losses(lambda ps: torch.optim.Adam(ps, **kw), loss, grad, x0, [6], 15)
    assert eq.adam(loss, grad, x0, iters=15, **kw).loss == pytest.approx(ref, rel=1e-10)

    def mini(ps):
        named = [(f"x{i}", p) for i, p in enumerate(ps)]
        return optimizer.AdamMini(named, partition=partition.by_tensor(named), **kw)

    ref = _reference_losses(mini, loss, grad, x0, [2, 4], 15)
    run = eq.adam_mini(loss, grad, x0, iters=15, block_sizes=[2, 4], **kw)
    assert run.loss == pytest.approx(ref, rel=1e-10)


def test_blockwise_gd_gives_each_block_its_own_lr() -> None:
    """H is block-diagonal over [3, 3]: x_t - x* = blockdiag((I - eta_b H_b)^t) (x_0 - x*)."""
    H, xs, loss, grad = _quadratic()
    x0 = torch.zeros(6, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    M = torch.block_diag(
        torch.linalg.matrix_power(eye - 0.02 * H[:3, :3], 5),
        torch.linalg.matrix_power(eye - 0.05 * H[3:, 3:], 5),
    )
    run = eq.blockwise_gd(loss, grad, x0, [3, 3], [0.02, 0.05], iters=5)
    assert run.final == pytest.approx(loss(xs + M @ (x0 - xs)), rel=1e-10)


def test_a_diverged_run_keeps_one_loss_per_iteration_and_tune_breaks_ties_low() -> None:
    _, _, loss, grad = _quadratic(2)
    x0 = torch.zeros(6, dtype=torch.float64)
    run = eq.gd(loss, grad, x0, lr=1e3, iters=30)
    assert len(run.loss) == 31 and math.isinf(run.final)
    best = eq.tune(lambda lr: eq.gd(loss, grad, x0, lr, 30), [1e4, 1e3])  # both diverge
    assert best.lr == 1e3


def test_arguments_of_the_wrong_type_are_named_before_training() -> None:
    """A float count trained with a bare range() error or evaluated at odd steps, a float seed
    failed in torch, and a factory returning no optimizer failed on .param_groups."""
    corpus = RecordingCorpus()

    def run(corpus=corpus, make_opt=lambda m: torch.optim.SGD(m.parameters(), 0.1), **kw):
        args = {"steps": 1, "batch_size": 2, "context": 8, "progress": False} | kw
        return train(lambda: TinyGPT(CFG), make_opt, corpus, **args)

    for kw, message in (
        ({"eval_every": 1.5}, "eval_every=1.5 must be an int >= 1"),
        ({"batch_size": True}, "batch_size=True must be an int >= 1"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"device": "gpu0"}, "device='gpu0' is not a torch device"),
    ):
        with pytest.raises(ValueError, match=message):
            run(**kw)
    with pytest.raises(TypeError, match="corpus.batch must be a function"):
        run(corpus=None)
    with pytest.raises(TypeError, match="returned NoneType, not a torch.optim.Optimizer"):
        run(make_opt=lambda m: None)
    with pytest.raises(ValueError, match="total_steps=2.5 must be an int"):
        WarmupCosine(total_steps=2.5)


def test_train_result_from_dict_names_missing_and_unknown_fields() -> None:
    with pytest.raises(ValueError, match=r"missing fields \['base_lr'.*unknown fields \['loss'\]"):
        TrainResult.from_dict({"loss": 1.0})
    with pytest.raises(TypeError, match="takes a dict, got NoneType"):
        TrainResult.from_dict(None)
