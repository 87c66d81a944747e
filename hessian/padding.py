r"""Forward-mode products with the padding rows of ``nn.Embedding(padding_idx=p)`` held constant.

The backward of such a lookup gives row :math:`p` nothing from the positions that read it, so
``grad`` is :math:`g = \nabla_\theta \tilde L(\theta, \theta')|_{\theta'=\theta}`, where those
positions read a constant copy :math:`\theta'`. Double backward returns the symmetric
:math:`\nabla^2_{\theta\theta} \tilde L`; ``jvp(grad)`` would also push the tangent through the
lookup and add :math:`\nabla^2_{\theta\theta'} \tilde L\, v` (asymmetric; O(1) on BERT).
Detaching the padding positions of the output removes that term and changes no gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


@contextlib.contextmanager
def constant_padding_rows(model: nn.Module) -> Iterator[None]:
    """Products with the padding lookups of ``model``'s embeddings held constant, as autograd
    holds them (see the module docstring).

    The lookups are caught at ``F.embedding``, where the ids are known: a subclass's ``forward``
    may take other arguments and compute the ids itself (ProphetNet's positions from a mask).
    """
    padded = any(isinstance(m, nn.Embedding) and m.padding_idx is not None for m in model.modules())
    with _DetachPadding() if padded else contextlib.nullcontext():
        yield


class _DetachPadding(TorchFunctionMode):
    """``F.embedding(ids, weight, padding_idx=p)`` with the positions where ``ids == p`` detached."""

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is not F.embedding:
            return out
        ids, weight, pad = _embedding_args(*args, **kwargs)
        if pad is None:
            return out
        pad = pad if pad >= 0 else weight.shape[0] + pad  # F.embedding's reading of p < 0
        return torch.where((ids == pad).unsqueeze(-1), out.detach(), out)


def _embedding_args(
    input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None, *_: Any, **__: Any
) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """The ids, table and ``padding_idx`` of an ``F.embedding`` call, however they were passed."""
    return input, weight, padding_idx
