"""Argument handling of ``AdamMini``: named param groups and hyperparameter ranges."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from partition import Partition, PartitionError


def normalize_groups(params: Any) -> list[dict]:
    """``named_parameters()`` or groups -> list of group dicts with ``(name, tensor)`` params."""
    params = list(params)
    if not params:
        raise ValueError("AdamMini got an empty parameter list")
    if isinstance(params[0], Mapping):
        groups = [dict(g) for g in params]
    else:
        groups = [{"params": params}]
    for g in groups:
        items = g["params"]
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
    if key not in _MOMENTUM_DTYPES:
        raise ValueError(f"momentum_dtype={value!r}; use None, 'fp32' or 'bf16'")
    return _MOMENTUM_DTYPES[key]


def check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """A ValueError naming the first hyperparameter out of its range."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("lr as a tensor must have one element")
    if not 0.0 <= float(lr) < math.inf:
        raise ValueError(f"lr={lr} is invalid: the learning rate must be finite and >= 0")
    if len(tuple(betas)) != 2:
        raise ValueError(f"betas={betas} must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        if not 0.0 <= float(b) < 1.0:
            raise ValueError(f"betas[{i}]={b} is invalid: each beta must be in [0, 1)")
    if not 0.0 < float(eps) < math.inf:
        raise ValueError(
            f"eps={eps} is invalid: eps must be finite and > 0 (a block with a zero gradient "
            "would divide 0 by 0); the default is 1e-8"
        )
    if not 0.0 <= float(weight_decay) < math.inf:
        raise ValueError(f"weight_decay={weight_decay} is invalid: it must be finite and >= 0")
