"""Error-message helpers: what a batch holds, which module failed, and the fix to name."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hessian.errors import ForwardModeError, HessianError

_INTERNAL = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def user_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first caller outside ``hessian`` and ``torch``, so
    that a warning points at the user's line however deep the call (``H @ v``, ``lanczos``)."""
    frame, level = sys._getframe(1), 1  # the function that warns is stacklevel 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _INTERNAL
    ):
        frame, level = frame.f_back, level + 1
    return level


def first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def describe_batch(batch: Any) -> str:
    """A batch's structure, e.g. ``tuple(Tensor(4, 5), Tensor(4,))``."""
    if isinstance(batch, torch.Tensor):
        return f"Tensor{tuple(batch.shape)}"
    if isinstance(batch, (list, tuple)):
        items = [describe_batch(b) for b in batch[:4]] + (["..."] if len(batch) > 4 else [])
        return f"{type(batch).__name__}({', '.join(items)})"
    if isinstance(batch, Mapping):
        items = [f"{k!r}: {describe_batch(v)}" for k, v in list(batch.items())[:4]]
        return "{" + ", ".join(items) + "}"
    return type(batch).__name__


def mixed_tuple_error(data: Any, index: int, batch: Any) -> ValueError:
    """Batch ``index`` of ``data``, a tuple/list of tensors and other items read as batches,
    cannot be counted: most likely ``data`` was meant as one batch."""
    kind = type(data).__name__
    odd = next(describe_batch(x) for x in data if not isinstance(x, torch.Tensor))
    return ValueError(
        f"data is a {describe_batch(data)}, read as {len(data)} batches since not all its items "
        f"are tensors ({odd} is not), and batch {index}, {describe_batch(batch)}, has no tensor "
        f"whose leading size counts its samples. Likely cause: one batch given as a {kind} "
        f"holding a non-tensor item; only a {kind} whose items are all tensors is one batch. "
        "Pass one batch as a tuple of tensors (drop the non-tensor item) or a dict of tensors, "
        f"or wrap batches in a list ([data] for this {kind} as one batch)"
    )


def tensor_kinds(batch: Any) -> str:
    """The distinct ``dtype on device`` of the tensors in a batch."""
    kinds: dict[str, None] = {}

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            kinds[f"{x.dtype} on {x.device}"] = None
        elif isinstance(x, Mapping):
            for y in x.values():
                visit(y)
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)

    visit(batch)
    return ", ".join(kinds) or "no tensors"


def forward_mode_error(model: nn.Module, err: BaseException) -> ForwardModeError:
    """``err`` (an operation without a jvp rule) with the module it ran in and the fix."""
    where = _module_from_traceback(model, err)
    place = f"in module {where!r}" if where else "in the backward pass"
    return ForwardModeError(
        f"an operation {place} has no forward-mode (jvp) rule: {first_line(err)} Fix: "
        + _fix(err, "mode='reverse' (double backward)")
    )


def double_backward_error(err: BaseException) -> HessianError:
    """``err`` (an operation without a double backward) with the fix."""
    return HessianError(
        "an operation of the model has no double backward (the derivative of its backward): "
        f"{first_line(err)} Fix: " + _fix(err, "mode='forward' (jvp of grad)")
    )


def _fix(err: BaseException, other_mode: str) -> str:
    """The fix for an operation that one differentiation mode lacks."""
    eager = "build transformers models with attn_implementation='eager'"
    if "scaled_dot_product" in str(err):
        return f"{eager} (fused SDPA kernels have neither a forward-mode rule nor a double backward on CPU)"
    return f"use {other_mode}, or {eager} (fused attention kernels lack both)"


def _module_from_traceback(model: nn.Module, err: BaseException) -> str | None:
    """Name of the innermost submodule of ``model`` whose ``forward`` is on ``err``'s traceback."""
    names = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
    found = None
    tb = err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found
