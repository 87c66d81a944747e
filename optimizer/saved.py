"""Checks of a saved ``AdamMini`` state before :meth:`AdamMini.load_state_dict` loads any of it:
the layout of ``state_dict()``, and values no run can produce (a corrupt or hand-edited file)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from optimizer.groups import check_flags, check_hyper

GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "decay_1d", "maximize")


def check_saved_form(state_dict: Any) -> None:
    """A TypeError/ValueError unless ``state_dict`` has the layout of ``state_dict()``: a
    mapping with a ``state`` mapping, a ``param_groups`` list of groups with ``params`` lists and
    every key of :data:`GROUP_KEYS` in range, and (if present) a ``blocks`` mapping."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"load_state_dict takes the dict that opt.state_dict() returned, got "
            f"{type(state_dict).__name__}; for a file, pass torch.load(path)"
        )
    missing = [k for k in ("state", "param_groups") if k not in state_dict]
    if missing:
        raise ValueError(
            f"the optimizer state_dict lacks {missing} (it has {sorted(map(str, state_dict))}); "
            "pass what opt.state_dict() returned, not the model's state_dict"
        )
    if not isinstance(state_dict["state"], Mapping):
        got = type(state_dict["state"]).__name__
        raise TypeError(f"state_dict['state'] must be a dict of tensor states, got {got}")
    if not isinstance(state_dict.get("blocks", {}), Mapping):
        got = type(state_dict["blocks"]).__name__
        raise TypeError(f"state_dict['blocks'] must be a dict name -> rule, got {got}")
    groups = state_dict["param_groups"]
    if not isinstance(groups, (list, tuple)) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups
    ):
        raise TypeError(
            "state_dict['param_groups'] must be a list of groups, each a dict with a 'params' "
            "list; pass what opt.state_dict() returned"
        )
    for i, g in enumerate(groups):  # torch's loader replaces each group by the saved one
        lacking = [k for k in GROUP_KEYS if k not in g]
        if lacking:
            raise ValueError(
                f"saved param group {i} lacks {lacking}, which every step reads; load a "
                "state_dict saved by AdamMini.state_dict()"
            )
        try:
            check_hyper(*(g[k] for k in GROUP_KEYS[:4]))
            check_flags(g)
        except (TypeError, ValueError) as err:
            raise type(err)(f"saved param group {i}: {err}; the checkpoint is corrupt") from None


def check_saved_tensor_state(name: str, state: Mapping[str, Any]) -> None:
    """A TypeError/ValueError naming tensor ``name`` unless its saved ``exp_avg`` and
    ``exp_avg_sq`` are real floating-point tensors, ``exp_avg_sq`` has no negative entry (a mean
    of squares) and ``step`` is one finite number >= 0."""
    for key in ("exp_avg", "exp_avg_sq"):
        t = state[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(
                f"saved optimizer state of {name!r}: {key} must be a floating-point tensor, got "
                f"{got}; the checkpoint is corrupt or was not saved by AdamMini.state_dict()"
            )
    if bool((state["exp_avg_sq"] < 0).any()):
        raise ValueError(
            f"saved optimizer state of {name!r}: exp_avg_sq has negative entries, which a mean "
            "of squared gradients cannot have; the checkpoint is corrupt: resume from another"
        )
    step = state["step"]
    value = math.nan
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_complex():
        value = float(step)
    elif isinstance(step, numbers.Real) and not isinstance(step, bool):
        value = float(step)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"saved optimizer state of {name!r}: step must be one finite number >= 0, got "
            f"{step!r}; the checkpoint is corrupt or was not saved by AdamMini.state_dict()"
        )
