"""Argument handling of ``AdamMini``: named param groups and hyperparameter ranges."""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from partition import Partition, PartitionError


def normalize_groups(params: Any) -> list[dict]:
    """``named_parameters()`` or groups -> list of group dicts with ``(name, tensor)`` params."""
    if isinstance(params, (torch.Tensor, Mapping, nn.Module)) or not isinstance(params, Iterable):
        raise TypeError(
            f"AdamMini takes model.named_parameters() or a list of param groups, got "
            f"{type(params).__name__}"
        )
    params = list(params)
    if not params:
        raise ValueError("AdamMini got an empty parameter list")
    if isinstance(params[0], Mapping):
        groups = [dict(g) for g in params]
    else:
        groups = [{"params": params}]
    for i, g in enumerate(groups):
        items = g.get("params")
        if not isinstance(items, (torch.Tensor, Iterable)):
            raise TypeError(
                f"param group {i} has no 'params' list (got {type(items).__name__}); give each "
                "group {'params': [(name, tensor), ...], ...}"
            )
        single = isinstance(items, torch.Tensor) or _is_named_pair(items)
        items = [items] if single else list(items)
        names = g.pop("param_names", None)
        if names is not None:
            if len(names) != len(items):
                raise ValueError("param_names and params of a group differ in length")
            items = list(zip(names, items, strict=True))
        for item in items:
            if not _is_named_pair(item):
                raise TypeError(
                    "AdamMini needs parameter names to find each tensor's blocks: pass "
                    "model.named_parameters() or groups whose 'params' are (name, tensor) pairs "
                    "(or carry a 'param_names' list)"
                )
        g["params"] = items
    return groups


def check_in_partition(
    part: Partition, name: str, param: torch.Tensor, source: str | None = None
) -> None:
    """A PartitionError unless ``part`` (read from file ``source``, if any) has tensor ``name``
    with ``param``'s shape."""
    where = f"the partition in {source!r}" if source else "the partition"
    if name not in part:
        wrapped = name.startswith("module.") and name.removeprefix("module.") in part
        fix = (
            "the name carries DDP's 'module.' prefix: pass ddp.module.named_parameters() (the "
            "same tensors)"
            if wrapped
            else "build the partition from the same model (e.g. partition.adam_mini(model)) or "
            "pass partition=None"
        )
        raise PartitionError(f"tensor {name!r} is not in {where}; {fix}")
    if tuple(part[name].shape) != tuple(param.shape):
        raise PartitionError(
            f"tensor {name!r} has shape {tuple(param.shape)} but {where} says "
            f"{tuple(part[name].shape)}; rebuild the partition for this model"
        )


def _is_named_pair(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)


_MOMENTUM_DTYPES = {
    None: None,
    "fp32": None,
    "float32": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def momentum_dtype_of(value: str | torch.dtype | None) -> torch.dtype | None:
    """``momentum_dtype`` argument -> bfloat16, or None for momentum in the parameter's dtype."""
    key = value if not isinstance(value, torch.dtype) else str(value).split(".")[-1]
    if not isinstance(key, Hashable) or key not in _MOMENTUM_DTYPES:
        raise ValueError(f"momentum_dtype={value!r}; use None, 'fp32' or 'bf16'")
    return _MOMENTUM_DTYPES[key]


def _number(name: str, value: Any) -> float:
    """``value`` (a real number, or a one-element tensor) as a float, or a TypeError naming
    ``name``: a string or None would only fail inside the step."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} as a tensor must have one element")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name}={value!r} must be a number, got {type(value).__name__}: e.g. lr=1e-3, "
            "betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1"
        )
    return float(value)


def check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """A ValueError naming the first hyperparameter out of its range (a TypeError for one that
    is not a number)."""
    if not 0.0 <= _number("lr", lr) < math.inf:
        raise ValueError(f"lr={lr} is invalid: the learning rate must be finite and >= 0")
    if isinstance(betas, (str, torch.Tensor)) or not isinstance(betas, Iterable):
        raise TypeError(f"betas={betas!r} must be a pair (beta1, beta2), e.g. (0.9, 0.999)")
    if len(tuple(betas)) != 2:
        raise ValueError(f"betas={betas} must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        if not 0.0 <= _number(f"betas[{i}]", b) < 1.0:
            raise ValueError(f"betas[{i}]={b} is invalid: each beta must be in [0, 1)")
    if not 0.0 < _number("eps", eps) < math.inf:
        raise ValueError(
            f"eps={eps} is invalid: eps must be finite and > 0 (a block with a zero gradient "
            "would divide 0 by 0); the default is 1e-8"
        )
    if not 0.0 <= _number("weight_decay", weight_decay) < math.inf:
        raise ValueError(f"weight_decay={weight_decay} is invalid: it must be finite and >= 0")


def check_flags(group: Mapping[str, Any]) -> None:
    """A TypeError unless the group's ``decay_1d`` and ``maximize`` are True or False (a string
    such as "no" would pass for True)."""
    for flag in ("decay_1d", "maximize"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be True or False, got {group[flag]!r}")
