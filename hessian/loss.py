r"""One batch's loss as a function of the parameters, and its compiled forward-mode product.

.. math::

    f_b(p) = \texttt{loss\_fn}(\text{model with parameters } p, \text{batch } b),

through ``torch.func.functional_call``, so ``torch.func`` can differentiate it in ``p``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from hessian.hvp import forward_product
from hessian.messages import first_line, user_stacklevel


class LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        """:math:`f_b`: ``loss_fn(model, batch)``, the batch's scalar mean loss."""
        return self.loss_fn(self.model, batch)


def bound_loss(module: LossModule, batch: Any) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``p -> loss_fn(model with parameters p, batch)``."""

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(module, {"model." + n: t for n, t in p.items()}, (batch,))

    return f


def compile_product(compile: bool) -> Callable[..., dict] | None:
    """``torch.compile`` of :func:`_bound_product`, run under :func:`compile_limits`; None (eager
    products) without ``compile`` or, with a warning, where this torch cannot compile on this
    Python (torch 2.5 on 3.13)."""
    if not compile:
        return None
    try:
        compiled = torch.compile(_bound_product, dynamic=False)
    except RuntimeError as err:
        warnings.warn(
            f"compile=True: torch.compile is unavailable ({first_line(err)}); the products run "
            "eagerly",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        return None

    def product(module: LossModule, p: dict, v: dict, batch: Any, batched: bool) -> dict:
        with torch._dynamo.config.patch(compile_limits()):
            return compiled(module, p, v, batch, batched)

    return product


def compile_limits() -> dict[str, Any]:
    """dynamo settings for compiled products. One graph per batch shape and vector count, shared
    by all operators in the process (the cache belongs to ``_bound_product``); past the limit
    dynamo would run eagerly without a word, so hitting it raises into the operator's
    warn-and-run-eagerly path instead. torch<2.7 names them ``cache_size_limit`` and
    ``fail_on_cache_limit_hit``; torch<2.6 has no such switch (dynamo only logs the hit)."""
    config = torch._dynamo.config
    names = ("recompile_limit", "fail_on_recompile_limit_hit")
    if not hasattr(config, names[0]):
        names = ("cache_size_limit", "fail_on_cache_limit_hit")
    wanted = dict(zip(names, (64, True), strict=True))
    return {k: v for k, v in wanted.items() if hasattr(config, k)}


def _bound_product(module: LossModule, p: dict, v: dict, batch: Any, batched: bool) -> dict:
    """The forward-mode product of ``batch``'s loss: a top-level function of everything it reads,
    so one compiled graph serves every operator and batch of the same shapes."""
    return forward_product(bound_loss(module, batch), p, v, batched)
