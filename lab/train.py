"""The training loop every experiment uses: seeded, evaluated on the validation split, timed.

One run is

    for t in 0..steps-1:   lr_t = lr_0 * s(t)          (warmup + cosine, :class:`WarmupCosine`)
                           (x, y) ~ corpus.train       (seeded stream)
                           loss.backward(); clip; opt.step()
                           every ``eval_every`` steps and at the end:
                               val_loss = mean over a FIXED set of validation batches

and returns a frozen :class:`TrainResult` with the curves, the mean step time, the optimizer
state that was really allocated (bytes of the tensors in ``optimizer.state``) and the peak
memory: ``torch.cuda.max_memory_allocated`` on a GPU, the growth of the process's peak resident
set size (``resource.getrusage(...).ru_maxrss``) on the CPU. Same seed, same losses.

Example
-------
>>> from lab.data import Corpus
>>> from lab.models import TinyGPT, TinyGPTConfig
>>> corpus = Corpus.stdlib()
>>> res = train(lambda: TinyGPT(TinyGPTConfig(context=32, d_model=32)),
...             lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3), corpus,
...             steps=100, batch_size=16, context=32, seed=0)       # doctest: +SKIP
>>> res.final_val_loss                                                 # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from partition.io import check_file_path, write_text

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchSource(Protocol):
    """What :func:`train` needs from a corpus (``lab.data.Corpus`` satisfies it)."""

    def batch(self, split: str, batch_size: int, context: int, generator: torch.Generator) -> Batch:
        """``batch_size`` windows of ``context`` tokens of ``split`` as ``(inputs, targets)``."""


@dataclass(frozen=True)
class WarmupCosine:
    r"""Learning-rate multiplier: linear warmup, then cosine decay to ``min_ratio``.

    .. math::
        s(t) = \frac{t+1}{w} \quad (t < w), \qquad
        s(t) = r + (1-r)\,\tfrac12\bigl(1+\cos(\pi\,\tfrac{t-w}{T-w})\bigr) \quad (t \ge w)

    with ``w = warmup_steps``, ``T = total_steps``, ``r = min_ratio``.
    """

    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.1

    def __post_init__(self) -> None:
        for name in ("total_steps", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name}={value!r} must be an int (a number of steps)")
        if isinstance(self.min_ratio, bool) or not isinstance(self.min_ratio, numbers.Real):
            raise ValueError(f"min_ratio={self.min_ratio!r} must be a number in [0, 1]")
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps} must be >= 1")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must lie in [0, total_steps={self.total_steps}]"
            )
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio={self.min_ratio} must lie in [0, 1]")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainResult:
    """Curves and costs of one training run (all numbers measured, none configured).

    ``train_loss[i]`` is the loss of the minibatch at step ``i`` (before that step's update);
    ``val_loss[j]`` is the mean loss over the fixed validation batches after ``eval_steps[j]``
    updates (``eval_steps[0] == 0`` is the initial model). On the CPU ``peak_memory_bytes`` is
    how far the run raised the process's peak RSS: 0 when an earlier run in the same process had
    already reached a higher peak, so compare optimizers by ``optimizer_state_bytes`` (exact) or
    in separate processes.
    """

    name: str
    seed: int
    steps: int
    batch_size: int
    context: int
    base_lr: float
    lr: tuple[float, ...]
    train_loss: tuple[float, ...]
    eval_steps: tuple[int, ...]
    val_loss: tuple[float, ...]
    step_time_s: float
    total_time_s: float
    peak_memory_bytes: int
    memory_source: str
    optimizer_state_bytes: int
    num_params: int
    device: str

    @property
    def final_val_loss(self) -> float:
        """Validation loss after the last update."""
        return self.val_loss[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field plus ``final_val_loss``."""
        d = asdict(self)
        d["final_val_loss"] = self.final_val_loss
        return d

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON (atomic)."""
        return write_text(path, json.dumps(self.to_dict(), indent=2))

    def save_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the curves as CSV: ``step,lr,train_loss,val_loss`` (val empty between evals)."""
        val = dict(zip(self.eval_steps, self.val_loss, strict=True))
        rows = [["step", "lr", "train_loss", "val_loss"]]
        for t in range(self.steps + 1):
            lr = self.lr[t] if t < self.steps else ""
            tl = self.train_loss[t] if t < self.steps else ""
            rows.append([t, lr, tl, val.get(t, "")])
        return atomic_write_rows(path, rows)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainResult:
        """Inverse of :meth:`to_dict`; a dict with missing or unknown fields is a ValueError."""
        if not isinstance(d, Mapping):
            raise TypeError(f"TrainResult.from_dict takes a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(d))
        unknown = sorted(set(d) - names - {"final_val_loss"})
        if missing or unknown:
            raise ValueError(
                f"TrainResult.from_dict: missing fields {missing}, unknown fields {unknown}; "
                "pass what TrainResult.to_dict() returned (a 'run' of results.json)"
            )
        kwargs = {k: v for k, v in d.items() if k != "final_val_loss"}
        for key in ("lr", "train_loss", "eval_steps", "val_loss"):
            kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def atomic_write_rows(path: str | os.PathLike[str], rows: Sequence[Sequence[Any]]) -> Path:
    """CSV version of :func:`write_text`."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return write_text(path, buf.getvalue())


def _default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    from lab.models import lm_loss

    return lm_loss(model, batch)


def _peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


VAL_SEED_OFFSET = 1_000_003  # the validation batches' seed is ``seed + VAL_SEED_OFFSET``


def check_seed(seed: int, flag: str = "--seed") -> None:
    """A ValueError naming ``flag`` unless ``seed`` is an integer in ``[-2**63, 2**63)``: what
    ``torch.manual_seed`` (and hessian's ``seed=``) take, ``[-2**63, 2**64)``, less room for
    the seeds derived from it (``seed + VAL_SEED_OFFSET``). Negative seeds are seeds."""
    integer = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
    if not (integer and -(2**63) <= seed < 2**63):
        raise ValueError(f"{flag} must be an integer in [-2**63, 2**63), got {seed!r}")


def set_threads(threads: int, flag: str = "--threads") -> None:
    """``torch.set_num_threads(threads)``, or a ValueError naming ``flag`` when ``threads < 1``."""
    if threads < 1:
        raise ValueError(f"{flag} must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def check_out_dir(out: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Create the output folder ``out`` (and its parents) before any work, or raise an OSError
    on one line naming ``flag`` and the fix: ``out`` or a parent is a file, or it cannot be
    created or written."""
    out = Path(out)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(
            f"{flag} {str(out)!r}: {str(blocker)!r} is a file, not a folder; give a folder path "
            "(it is created when missing)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise type(exc)(
            f"{flag} {str(out)!r}: cannot create the folder ({exc.strerror}); choose a writable "
            "folder"
        ) from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {str(out)!r} is not writable; choose a writable folder")
    return out


def check_out_file(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Check, before any work and without writing, that ``path`` can be written as a file: not
    a folder, no file among its parents, the nearest existing folder writable. An OSError on
    one line naming ``flag`` and the fix otherwise."""
    path = check_file_path(path, flag)
    folder = next(p for p in path.parents if p.exists())  # the one its folders are created in
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{flag} {str(path)!r}: {str(folder)!r} is not writable; choose a writable folder"
        )
    return path


def _check_callables(**fns: Any) -> None:
    """A TypeError naming the first argument of :func:`train` that is not a function."""
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"train: {name} must be a function, got {type(fn).__name__}")


def optimizer_state_nbytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in ``opt.state`` (what the optimizer really allocated)."""
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[Batch],
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = _default_loss,
) -> float:
    """Mean loss over ``batches`` in eval mode (restores the previous mode)."""
    if len(batches) == 0:
        raise ValueError("evaluate needs at least one batch; pass a non-empty list of batches")
    was_training = model.training
    model.eval()
    try:
        total = sum(float(loss_fn(model, b)) for b in batches)
    finally:
        model.train(was_training)
    return total / len(batches)


def train(
    model_factory: Callable[[], nn.Module],
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer],
    corpus: BatchSource,
    *,
    steps: int,
    batch_size: int = 16,
    context: int = 32,
    schedule: Callable[[int], float] | None = None,
    eval_every: int = 50,
    eval_batches: int = 8,
    seed: int = 0,
    grad_clip: float | None = 1.0,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = _default_loss,
    device: str | torch.device = "cpu",
    name: str = "run",
    progress: bool = True,
) -> TrainResult:
    """Train a fresh model and evaluate it on the validation split.

    Args:
        model_factory: builds the model; called after ``torch.manual_seed(seed)`` so the
            initialisation is seeded.
        optimizer_factory: ``model -> optimizer``; the lr it sets is the base lr ``lr_0``.
        corpus: has ``batch(split, batch_size, context, generator)`` (``lab.data.Corpus``).
        steps: number of updates.
        schedule: ``step -> multiplier`` of every group's base lr; default
            ``WarmupCosine(steps, warmup_steps=steps // 20)``.
        eval_every: evaluate every this many updates (and always at 0 and at ``steps``).
        eval_batches: number of fixed validation batches (drawn once with ``seed``).
        seed: seeds the init, the training batches and the validation batches.
        grad_clip: max global gradient norm, ``None`` for no clipping.
    """
    for arg, value in {
        "steps": steps,
        "batch_size": batch_size,
        "context": context,
        "eval_every": eval_every,
        "eval_batches": eval_batches,
    }.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{arg}={value!r} must be an int >= 1")
    number = isinstance(grad_clip, numbers.Real) and not isinstance(grad_clip, bool)
    if grad_clip is not None and not (number and grad_clip > 0):  # also refuses NaN
        raise ValueError(
            f"grad_clip={grad_clip!r} must be > 0 (the max gradient norm), or None for no clipping"
        )
    check_seed(seed, "seed")
    schedule = schedule or WarmupCosine(steps, warmup_steps=steps // 20)
    _check_callables(
        model_factory=model_factory,
        optimizer_factory=optimizer_factory,
        loss_fn=loss_fn,
        schedule=schedule,
        **{"corpus.batch": getattr(corpus, "batch", None)},
    )
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device ({exc}); e.g. 'cpu'") from None

    torch.manual_seed(seed)
    model = model_factory().to(device)
    model.train()
    opt = optimizer_factory(model)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer_factory(model) returned {type(opt).__name__}, not a torch.optim.Optimizer"
            "; e.g. lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)"
        )
    base_lrs = [group["lr"] for group in opt.param_groups]

    val_gen = torch.Generator().manual_seed(seed + VAL_SEED_OFFSET)
    val = [
        tuple(t.to(device) for t in corpus.batch("val", batch_size, context, val_gen))
        for _ in range(eval_batches)
    ]
    train_gen = torch.Generator().manual_seed(seed)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        memory_source = "torch.cuda.max_memory_allocated"
    else:
        rss_before = _peak_rss_bytes()
        memory_source = "growth of peak RSS (ru_maxrss)"

    lrs: list[float] = []
    train_losses: list[float] = []
    eval_steps = [0]
    val_losses = [evaluate(model, val, loss_fn)]
    step_seconds = 0.0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=name, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        factor = schedule(step)
        if not 0.0 <= factor < math.inf:
            raise ValueError(
                f"{name}: schedule({step}) = {factor}; an lr multiplier must be finite and >= 0"
            )
        for group, lr0 in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = lr0 * factor
        lrs.append(base_lrs[0] * factor)
        x, y = (t.to(device) for t in corpus.batch("train", batch_size, context, train_gen))

        t0 = time.perf_counter()
        loss = loss_fn(model, (x, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds += time.perf_counter() - t0

        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"{name}: training loss became {value} at step {step}; lower the lr "
                f"(base lr {base_lrs[0]:g}) or keep grad_clip on"
            )
        train_losses.append(value)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            eval_steps.append(step + 1)
            val_losses.append(evaluate(model, val, loss_fn))
            bar.set_postfix(train=f"{value:.3f}", val=f"{val_losses[-1]:.3f}")
    total = time.perf_counter() - start

    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
    else:
        peak = max(_peak_rss_bytes() - rss_before, 0)

    return TrainResult(
        name=name,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        context=context,
        base_lr=float(base_lrs[0]),
        lr=tuple(lrs),
        train_loss=tuple(train_losses),
        eval_steps=tuple(eval_steps),
        val_loss=tuple(val_losses),
        step_time_s=step_seconds / steps,
        total_time_s=total,
        peak_memory_bytes=peak,
        memory_source=memory_source,
        optimizer_state_bytes=optimizer_state_nbytes(opt),
        num_params=sum(p.numel() for p in model.parameters()),
        device=str(device),
    )
