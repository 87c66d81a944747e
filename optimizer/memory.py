r"""Optimizer-state memory of Adam-mini against AdamW, without allocating it.

For parameters :math:`N` entries in :math:`T` tensors and a partition with
:math:`B` blocks (``elements`` tensors count one block per entry):

.. math::

    \text{AdamW}     &= N\,s_m + N\,s_v + 4T \\
    \text{Adam-mini} &= N\,s_m + B\,s_v + 4T

with :math:`s_m, s_v` the bytes per momentum / second-moment entry (4 for
float32 state) and 4 bytes for each float32 ``step``. Only shapes are read, so
models on the meta device work.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import partition as partition_lib
from optimizer.groups import check_in_partition, momentum_dtype_of


@dataclass(frozen=True)
class StateBytes:
    """Optimizer-state bytes of Adam-mini and of AdamW on the same parameters.

    ``int(sb)`` is ``sb.total``. ``ratio`` = ``total / adamw_total``.
    """

    exp_avg: int  # momentum m
    exp_avg_sq: int  # second moment v, one entry per block
    step: int  # float32 step counters
    adamw_exp_avg: int
    adamw_exp_avg_sq: int
    num_params: int
    num_blocks: int

    @property
    def total(self) -> int:
        """Adam-mini state bytes."""
        return self.exp_avg + self.exp_avg_sq + self.step

    @property
    def adamw_total(self) -> int:
        """AdamW (fp32 state for fp32 params) bytes on the same parameters."""
        return self.adamw_exp_avg + self.adamw_exp_avg_sq + self.step

    @property
    def ratio(self) -> float:
        """Adam-mini / AdamW."""
        return self.total / self.adamw_total

    def __int__(self) -> int:
        return self.total


def _named(model: nn.Module | Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The trainable ``(name, tensor)`` pairs of ``model``, or an error naming what it got."""
    items = model.named_parameters() if isinstance(model, nn.Module) else model
    if isinstance(items, (str, Mapping, torch.Tensor)) or not isinstance(items, Iterable):
        raise TypeError(
            f"state_bytes takes a module or its named_parameters(), got {type(model).__name__}"
        )
    items = list(items)
    for item in items:
        pair = isinstance(item, tuple) and len(item) == 2
        if not (pair and isinstance(item[0], str) and isinstance(item[1], torch.Tensor)):
            raise TypeError(
                f"state_bytes takes (name, tensor) pairs such as model.named_parameters(), got "
                f"an item {item!r:.60}"
            )
    named = [(n, p) for n, p in items if p.requires_grad]
    if not named:
        raise ValueError(
            "the model has no trainable parameter (requires_grad=True), so no optimizer state: "
            "unfreeze the parameters to count"
        )
    return named


def state_bytes(
    model: nn.Module | Iterable[tuple[str, torch.Tensor]],
    partition: partition_lib.Partition | str | os.PathLike | None = None,
    *,
    momentum_dtype: str | torch.dtype | None = None,
    **adam_mini_kwargs: Any,
) -> StateBytes:
    """Bytes of ``AdamMini`` state on ``model`` (trainable parameters), next to AdamW's.

    Args:
        model: a module (meta device fine) or its named parameters.
        partition: the partition or its JSON file; None builds
            ``partition.adam_mini(model, **adam_mini_kwargs)``.
        momentum_dtype: as ``AdamMini``: None / "fp32" (momentum in the parameter dtype)
            or "bf16".

    Example::

        >>> with torch.device("meta"):
        ...     model = LlamaForCausalLM(LlamaConfig())
        >>> sb = optimizer.state_bytes(model)
        >>> sb.total, sb.adamw_total, sb.ratio
    """
    m_dtype = momentum_dtype_of(momentum_dtype)
    named = _named(model)
    source = os.fspath(partition) if isinstance(partition, str | os.PathLike) else None
    if source is not None:
        partition = partition_lib.Partition.from_json(source)
    if partition is not None and not isinstance(partition, partition_lib.Partition):
        raise TypeError(
            f"partition must be a partition.Partition, a JSON path or None, got "
            f"{type(partition).__name__}"
        )
    if partition is None:
        partition = partition_lib.adam_mini(
            model if isinstance(model, nn.Module) else named, **adam_mini_kwargs
        )
    exp_avg = exp_avg_sq = adamw_m = adamw_v = num_params = num_blocks = 0
    for name, p in named:
        check_in_partition(partition, name, p, source)
        size = p.element_size()
        v_size = size if p.dtype in (torch.float32, torch.float64) else 4
        blocks = partition[name].num_blocks
        exp_avg += p.numel() * (m_dtype.itemsize if m_dtype is not None else size)
        exp_avg_sq += blocks * v_size
        adamw_m += p.numel() * size
        adamw_v += p.numel() * size
        num_params += p.numel()
        num_blocks += blocks
    return StateBytes(exp_avg, exp_avg_sq, 4 * len(named), adamw_m, adamw_v, num_params, num_blocks)
