r"""``AdamMini``: Adam with one second-moment entry per block of a :class:`partition.Partition`.

For every parameter tensor with blocks :math:`b` and step :math:`t`:

.. math::

    m &\leftarrow \beta_1 m + (1-\beta_1)\, g \\
    v_b &\leftarrow \beta_2 v_b + (1-\beta_2)\, \operatorname{mean}_{i \in b} g_i^2 \\
    p &\leftarrow p\,(1-\eta\lambda) - \eta\, \frac{m / (1-\beta_1^t)}{\sqrt{v_b / (1-\beta_2^t)} + \epsilon}

Example::

    >>> import partition, optimizer
    >>> part = partition.adam_mini(model)                    # or a Partition JSON path, or None
    >>> opt = optimizer.AdamMini(model.named_parameters(), partition=part, lr=3e-4,
    ...                          weight_decay=0.1)
    >>> loss.backward(); opt.step(); opt.zero_grad()

State per parameter (``opt.state[p]``):

* ``exp_avg`` — momentum, the parameter's shape and dtype (bfloat16 with ``momentum_dtype="bf16"``).
* ``exp_avg_sq`` — one entry per block: the parameter's shape for ``elements``
  tensors (it *is* AdamW's state), ``(rows,)`` for ``rows`` and ``(num_blocks,)``
  for every other rule, in the block order of ``TensorBlocks.local_index()``;
  float32 for low-precision parameters, else the parameter's dtype.
* ``step`` — float32 scalar tensor, like ``torch.optim.AdamW``.

Bad input (each tested): parameters without names, complex parameters and a
partition that does not match the parameters fail at construction (``TypeError``
/ ``partition.PartitionError`` naming the tensor); lr/betas/eps/weight_decay out
of range raise ``ValueError`` (``TypeError`` when not numbers, as for flags that
are not bools); sparse gradients raise ``RuntimeError`` at ``step``. NaN/Inf
gradients never reach the state unless asked (``nonfinite=``):

* ``"skip_blocks"`` (default): every block whose gradient is finite steps; each
  block with a NaN/Inf gradient (entry, for ``elements`` tensors) keeps its ``p``,
  ``m`` and ``v``; they are counted in ``skipped_blocks`` and a ``RuntimeWarning``
  names the tensors. One pass over memory (the fused kernel checks each block's
  sum of squares before writing it).
* ``"raise"``: all block sums are checked before anything is written; ``step``
  raises ``FloatingPointError`` naming the tensors, and parameters and state are
  unchanged. ``"skip"``: the same check, the whole step is skipped and counted in
  ``skipped_steps``. These two read the gradient twice (about 15% slower on CPU).
* ``"ignore"``: no check; NaN/Inf flow into the state as in ``torch.optim.AdamW``.

Under ``torch.distributed`` blocks cut by a shard boundary decide on the all-reduced
sum, so every rank takes the same decision.

``skipped_steps`` and ``skipped_blocks`` are per-session diagnostics: counts since this
optimizer object was built, not optimizer state. ``state_dict`` does not save them and
``load_state_dict`` / ``load_checkpoint`` leave them as they are, so a resumed run counts from
0 (keep a running total across restarts yourself, e.g. next to the checkpoint). Under
``torch.distributed`` ``skipped_steps`` is the same on every rank, while ``skipped_blocks``
counts the blocks of this rank's shards (a block cut by a shard boundary on each of its ranks).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

import partition as partition_lib
from optimizer import cpu_fused, distributed
from optimizer.groups import (
    check_flags,
    check_hyper,
    check_in_partition,
    momentum_dtype_of,
    normalize_groups,
)
from optimizer.kernels import (
    Hyper,
    adamw_update_,
    apply_update_,
    block_scale,
    block_sumsq,
    decay_and_update_moments_,
    lowp_momentum_,
    mean_square,
)
from optimizer.layout import BlockLayout, layout_of
from optimizer.saved import check_saved_form, check_saved_tensor_state
from partition.heads import head_counts, sub_configs

NONFINITE = ("raise", "skip", "skip_blocks", "ignore")


@dataclass(frozen=True)
class _Task:
    """One parameter with a gradient, ready for this step (local shards)."""

    param: torch.Tensor
    name: str
    p: torch.Tensor
    g: torch.Tensor
    layout: BlockLayout
    group: dict
    state: dict


@dataclass(frozen=True)
class _FusedPlan:
    """Chunk table ``(C, 6)`` of the fused kernel, its float64 block-sum buffer, and the
    ``[a, b)`` slice of the buffer that belongs to each fused tensor (in task order)."""

    chunks: torch.Tensor
    sums: torch.Tensor
    ranges: tuple[tuple[int, int], ...]


class AdamMini(torch.optim.Optimizer):
    """Adam-mini (Zhang et al. 2024, arXiv 2406.16793) on an explicit block partition.

    Args:
        params: ``model.named_parameters()`` or param groups whose ``"params"`` are
            ``(name, tensor)`` pairs (or that carry ``"param_names"``), PyTorch's
            named-parameter convention.
        partition: a :class:`partition.Partition`, a path to its JSON, or None for
            ``partition.adam_mini``: of ``model`` when given (its module types and config tell
            GPT-2 ``Conv1D`` from ``nn.Linear`` and the fused q|k|v layout), else of these named
            parameters, with head counts from ``n_heads``/``n_kv_heads``/``head_dim``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled decay).
        decay_1d: apply weight decay to 1-D tensors (norm weights, biases) too.
            Default False: they are never decayed. A group can override it.
        maximize: ascend the objective.
        momentum_dtype: None / "fp32" (momentum in the parameter's dtype) or "bf16":
            momentum stored in bfloat16 with stochastic rounding (seeded by ``seed``).
        nonfinite: "raise" | "skip" | "skip_blocks" | "ignore", what a NaN/Inf gradient
            does (module docstring).
        fused: None (the fused CPU kernel where it applies and builds), True (require
            it), False (eager PyTorch only).
        model, n_heads, n_kv_heads, head_dim: only for ``partition=None``.
        seed: seed of the stochastic rounding of bf16 momentum.
    """

    def __init__(
        self,
        params: Iterable[Any],
        partition: partition_lib.Partition | str | os.PathLike | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decay_1d: bool = False,
        maximize: bool = False,
        momentum_dtype: str | torch.dtype | None = None,
        nonfinite: str = "skip_blocks",
        fused: bool | None = None,
        model: nn.Module | None = None,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        check_hyper(lr, betas, eps, weight_decay)
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite={nonfinite!r}; use one of {NONFINITE}")
        if fused not in (None, True, False):
            raise ValueError(f"fused={fused!r}; use None (when it can), True or False")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed={seed!r} must be an int (it seeds the bf16 momentum rounding)")
        self.momentum_dtype = momentum_dtype_of(momentum_dtype)
        self.nonfinite = nonfinite
        self.seed = seed
        self.skipped_steps = 0
        self.skipped_blocks = 0
        self._lib = None if fused is False else cpu_fused.load()
        if fused and self._lib is None:
            raise RuntimeError(
                "fused=True but the CPU kernel could not be built (needs a C compiler with "
                "OpenMP on PATH, and ADAM_MINI_LAB_NO_FUSED unset); use fused=None or False"
            )
        keys = ("n_heads", "n_kv_heads", "head_dim")
        given = dict(zip(keys, (n_heads, n_kv_heads, head_dim), strict=True))
        given = {k: v for k, v in given.items() if v is not None}
        # given, else model.config (or its nn.MultiheadAttention modules) when building the blocks
        counts = head_counts(model if partition is None else None, n_heads, n_kv_heads, head_dim)
        self._heads = {k: v for k, v in zip(keys, counts, strict=True) if v is not None}
        self._source = None  # the JSON file the partition came from, for error messages
        if isinstance(partition, (str, os.PathLike)):
            self._source = os.fspath(partition)
            partition = partition_lib.Partition.from_json(partition)
        if partition is not None and not isinstance(partition, partition_lib.Partition):
            raise TypeError(
                f"partition must be a partition.Partition, a JSON path or None (built from the "
                f"model), got {type(partition).__name__}"
            )
        self._auto = partition is None
        self._model_partition = self._whole_model_partition(model, given) if self._auto else None
        # the model's name of each tensor: a wrapper (DDP's .module, torch.compile's ._orig_mod)
        # names them with a prefix that the inner model's named_parameters() lacks
        self._model_names = (
            {id(p): n for n, p in model.named_parameters()}
            if self._model_partition is not None
            else {}
        )
        self.partition = partition
        self._layouts: dict[torch.Tensor, BlockLayout] = {}
        self._names: dict[torch.Tensor, str] = {}
        self._fusable_layout: dict[torch.Tensor, bool] = {}  # static part of _fusable
        self._fused_plan: dict[tuple, _FusedPlan] = {}
        groups = normalize_groups(params)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            decay_1d=decay_1d,
            maximize=maximize,
        )
        super().__init__(groups, defaults)

    # ----------------------------------------------------------------- groups
    @staticmethod
    def _whole_model_partition(
        model: nn.Module | None, heads: dict[str, int]
    ) -> partition_lib.Partition | None:
        """``partition.adam_mini(model, **heads)`` (the head sizes given to AdamMini), or None
        without a model or when the model as a whole does not split (then each group is
        partitioned from its names, which raise if needed). Head counts given for a composite
        model (towers with their own counts) are refused, not applied to every tower."""
        if model is None:
            return None
        try:  # the model's config gives the rest, also per stack (encoder vs decoder heads)
            return partition_lib.adam_mini(model, **heads)
        except partition_lib.PartitionError:
            if any(v is not None for v in heads.values()) and sub_configs(model):
                raise
            return None

    def _auto_partition(self, named: list[tuple[str, torch.Tensor]]) -> partition_lib.Partition:
        """The paper's blocks of a group's tensors: from the whole model's partition when every
        tensor is in it (found by identity, else by name), else from the group's names."""
        whole = self._model_partition
        found = [self._model_names.get(id(p), n) for n, p in named]
        if whole is not None and all(
            m in whole and whole[m].shape == tuple(p.shape)
            for m, (_, p) in zip(found, named, strict=True)
        ):
            blocks = [replace(whole[m], name=n) for m, (n, _) in zip(found, named, strict=True)]
            return partition_lib.Partition(blocks, whole.provenance)
        try:
            return partition_lib.adam_mini(list(named), **self._heads)
        except partition_lib.PartitionError as err:
            if "number of heads is unknown" not in str(err):
                raise
            raise partition_lib.PartitionError(
                f"{err}. Here: AdamMini(..., partition=None, model=model) reads them from the "
                "model's .config, or pass n_heads=... to AdamMini"
            ) from err

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of ``(name, tensor)`` params; each name must be in the partition."""
        group = normalize_groups([param_group])[0]
        check_hyper(
            group.get("lr", self.defaults["lr"]),
            group.get("betas", self.defaults["betas"]),
            group.get("eps", self.defaults["eps"]),
            group.get("weight_decay", self.defaults["weight_decay"]),
        )
        check_flags({k: group.get(k, self.defaults[k]) for k in ("decay_1d", "maximize")})
        named = group["params"]
        taken = set(self._names.values())
        first_name: dict[int, str] = {}
        for name, p in named:
            if first_name.setdefault(id(p), name) != name:
                raise ValueError(
                    f"{first_name[id(p)]!r} and {name!r} are the same tensor (tied weights); "
                    "pass each tensor once: model.named_parameters() drops such duplicates"
                )
            if name in taken and p not in self._names:
                raise ValueError(
                    f"two parameters are both named {name!r}; names must be unique across "
                    "groups because they key the partition: prefix them, e.g. "
                    "[('enc.' + n, p) for n, p in enc.named_parameters()], or take the names "
                    "from the parent model's named_parameters()"
                )
            taken.add(name)
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
            if p in self._names:
                raise ValueError(
                    f"parameter {name!r} is already in an earlier param group (as "
                    f"{self._names[p]!r}); put each tensor in one group only, e.g. split decay "
                    "and no-decay groups by one test and its negation"
                )
            if p.is_complex():
                raise TypeError(
                    f"parameter {name!r} is complex ({p.dtype}); AdamMini's block means are defined "
                    "for real tensors: optimize torch.view_as_real(p) as a real parameter instead"
                )
            if not p.is_floating_point():
                raise TypeError(
                    f"parameter {name!r} is {p.dtype}; only floating-point tensors can be "
                    "optimized: leave integer buffers out of the parameter list"
                )
        part = self.partition
        if self._auto:
            new = self._auto_partition(named)
            part = (
                new if part is None else partition_lib.Partition([*part.tensors(), *new.tensors()])
            )
            self.partition = part
        for name, p in named:
            check_in_partition(part, name, p, self._source)
        layouts = {}
        for name, p in named:
            lo, hi = distributed.row_range(p, name)
            layouts[p] = layout_of(part[name], lo, hi, distributed.is_sharded(p))
        # split the pairs as torch>=2.6 does; torch 2.4/2.5 would refuse (name, tensor) params
        group["params"] = [p for _, p in named]
        group["param_names"] = [n for n, _ in named]
        super().add_param_group(group)
        self._layouts.update(layouts)
        self._fusable_layout.update(
            {
                p: self._lib is not None
                and not distributed.is_dtensor(p)
                and layout.rule != "elements"
                and layout.row_ids is None
                and all(r.kind == "flat" for r in layout.runs)
                for p, layout in layouts.items()
            }
        )
        self._names.update({p: n for n, p in named})
        self._fused_plan.clear()

    # ------------------------------------------------------------------ state
    def _init_state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state.update(self.new_state(param))
        return state

    def new_state(self, param: torch.Tensor) -> dict:
        """Zero state of ``param`` (step 0, ``m = 0``, ``v_b = 0``), not stored in ``self.state``:
        tensors of the right shapes for a checkpoint loader to fill."""
        layout = self._layouts[param]
        m_dtype = self.momentum_dtype or param.dtype
        v_dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
        state = {"step": torch.tensor(0.0, dtype=torch.float32)}
        state["exp_avg"] = torch.zeros_like(
            param, dtype=m_dtype, memory_format=torch.preserve_format
        )
        if layout.rule == "elements":
            state["exp_avg_sq"] = torch.zeros_like(
                param, dtype=v_dtype, memory_format=torch.preserve_format
            )
        else:
            lo, hi = layout.v_range
            v = torch.zeros(hi - lo, dtype=v_dtype, device=distributed.local(param).device)
            state["exp_avg_sq"] = distributed.state_like(
                param,
                v,
                layout.num_blocks if not layout.local_v else param.shape[0],
                layout.local_v,
            )
        return state

    def init_state(self) -> None:
        """Allocate zero state for every parameter now (instead of at its first step).

        For checkpoint loaders that fill existing tensors in place, e.g.
        ``torch.distributed.checkpoint.load({"optim": opt.state_dict()}, ...)``.
        """
        for group in self.param_groups:
            for param in group["params"]:
                self._init_state(param)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()`` plus ``"blocks"``: ``{name: "rule params"}``
        of every tensor, so that a state saved under another partition is refused even where
        the block counts agree (``rows`` and ``columns`` of a square matrix)."""
        state_dict = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        state_dict["blocks"] = {self._names[p]: self._blocks_key(p) for p in params}
        return state_dict

    def _blocks_key(self, param: torch.Tensor) -> str:
        """``param``'s rule and rule parameters, e.g. ``'heads {"head_dim": 64}'``."""
        blocks = self.partition[self._names[param]]
        return f"{blocks.rule} {json.dumps(dict(blocks.params), sort_keys=True)}"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state saved by :meth:`state_dict`, bit for bit.

        Momentum keeps ``momentum_dtype`` and v keeps float32 for low-precision parameters
        (torch's loader would cast both to the parameter's dtype first, which rounds them).
        A state saved under another partition (other block counts, or another rule or rule
        parameters), for another model (other shapes) or without ``step``/``exp_avg``/
        ``exp_avg_sq`` is refused before anything is loaded, as is a corrupt one
        (:mod:`optimizer.saved`: not the layout of ``state_dict()``, negative ``exp_avg_sq``,
        a bad ``step`` or hyperparameter). Tensors are matched by the saved
        ``param_names`` when the saved groups name this optimizer's tensors in another order,
        else by position (torch's rule; names saved under a wrapper's prefix differ).
        """
        check_saved_form(state_dict)
        state_dict = self._in_our_order(state_dict)
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [
            len(g["params"]) for g in self.param_groups
        ]:
            super().load_state_dict(state_dict)  # raises torch's group-size error
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        saved = dict(zip(ids, params, strict=True))
        for i, s in state_dict.get("state", {}).items():
            if i in saved and s:
                name = self._names[saved[i]]
                missing = sorted({"step", "exp_avg", "exp_avg_sq"} - set(s))
                if missing:
                    raise ValueError(
                        f"saved optimizer state of {name!r} lacks {missing} (it has "
                        f"{sorted(s)}); load a state_dict saved by AdamMini.state_dict()"
                    )
                check_saved_tensor_state(name, s)
                shapes = {k: tuple(s[k].shape) for k in ("exp_avg", "exp_avg_sq")}
                self.check_saved_shapes(saved[i], shapes)
                blocks = state_dict.get("blocks", {}).get(name)  # absent in torch.optim's format
                if blocks is not None and blocks != (ours := self._blocks_key(saved[i])):
                    raise partition_lib.PartitionError(
                        f"saved optimizer state of {name!r} has blocks {blocks!r}, but this "
                        f"optimizer's partition gives {ours!r}; build the optimizer with the partition "
                        "the checkpoint was saved under (e.g. from its JSON file)"
                    )
        super().load_state_dict(state_dict)
        for i, param in saved.items():
            s = state_dict["state"].get(i)
            if not s:
                continue
            state = self.state[param]
            low = param.dtype not in (torch.float32, torch.float64)
            m_dtype = self.momentum_dtype or param.dtype
            state["exp_avg"] = s["exp_avg"].to(device=param.device, dtype=m_dtype)
            v_dtype = torch.float32 if low else param.dtype
            state["exp_avg_sq"] = s["exp_avg_sq"].to(device=param.device, dtype=v_dtype)
            state["step"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(()).cpu()

    def _in_our_order(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with each saved group's param ids put in this optimizer's order, when
        the saved groups name the same tensors in another order (torch's loader matches by
        position, which would give one tensor another's state).

        Raises:
            ValueError: the same tensors, but a tensor sits in another group than when saved.
        """
        saved_groups = state_dict.get("param_groups", ())
        saved = [g.get("param_names") for g in saved_groups]
        ours = [[self._names[p] for p in g["params"]] for g in self.param_groups]
        flat = sorted(n for names in ours for n in names)
        if None in saved or saved == ours or sorted(n for s in saved for n in s) != flat:
            return state_dict
        saved_at = {n: i for i, names in enumerate(saved) for n in names}
        for i, names in enumerate(ours):
            for name in names:
                if saved_at[name] != i:
                    raise ValueError(
                        f"tensor {name!r} is in param group {saved_at[name]} of the saved state "
                        f"but in group {i} here; build the param groups as they were saved (each "
                        "group's lr, weight_decay, ... are loaded into the group at its position)"
                    )
        groups = []
        for g, names in zip(saved_groups, ours, strict=True):
            ids = dict(zip(g["param_names"], g["params"], strict=True))
            groups.append({**g, "params": [ids[n] for n in names], "param_names": names})
        return {**state_dict, "param_groups": groups}

    def check_saved_shapes(self, param: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse saved ``exp_avg``/``exp_avg_sq`` shapes that this optimizer's partition
        does not give ``param`` (a state saved under another partition)."""
        layout = self._layouts[param]
        want = tuple(param.shape) if layout.rule == "elements" else (layout.num_blocks,)
        v, m = shapes.get("exp_avg_sq", want), shapes.get("exp_avg", tuple(param.shape))
        name = self._names[param]
        if m != tuple(param.shape):
            raise partition_lib.PartitionError(
                f"saved optimizer state of {name!r} has exp_avg {m}, but the parameter has shape "
                f"{tuple(param.shape)}: the checkpoint is of another model; load it into a model "
                "of the same architecture and sizes"
            )
        if v != want:
            raise partition_lib.PartitionError(
                f"saved optimizer state of {name!r} has exp_avg {shapes.get('exp_avg')} and "
                f"exp_avg_sq {shapes.get('exp_avg_sq')}, but this optimizer's partition gives "
                f"{tuple(param.shape)} and {want} (rule {layout.rule!r}); build the optimizer "
                "with the partition the checkpoint was saved under (e.g. from its JSON file)"
            )

    # ------------------------------------------------------------------- step
    def _tasks(self) -> list[_Task]:
        tasks = []
        for group in self.param_groups:
            for param in group["params"]:
                if param.is_meta:  # also without a gradient: the copies to_empty made get them
                    raise RuntimeError(
                        f"parameter {self._names.get(param, tuple(param.shape))!r} is on the meta "
                        "device (no storage); build AdamMini after model.to_empty(device=...), "
                        "which gives the model new tensors: one built before holds the meta ones"
                    )
                if param.grad is None:
                    continue
                if param.grad.is_sparse or param.grad.layout != torch.strided:
                    raise RuntimeError(
                        f"parameter {self._names[param]!r} has a sparse gradient; AdamMini needs "
                        "dense gradients (use nn.Embedding(sparse=False))"
                    )
                layout = self._layouts.get(param)
                if layout is None:
                    raise RuntimeError(
                        f"a parameter of shape {tuple(param.shape)} was put into param_groups "
                        "by hand, so AdamMini has no name or partition blocks for it; add it with "
                        "optimizer.add_param_group({'params': [(name, tensor)]})"
                    )
                if param.shape != layout.shape:
                    raise partition_lib.PartitionError(
                        f"parameter {self._names[param]!r} has shape {tuple(param.shape)}, not "
                        f"{layout.shape}, since AdamMini was built: after resizing a parameter, "
                        "rebuild the partition and the optimizer"
                    )
                state = self._init_state(param)
                g = distributed.local(param.grad)
                if group["maximize"]:
                    g = -g
                tasks.append(
                    _Task(
                        param, self._names[param], distributed.local(param), g, layout, group, state
                    )
                )
        return tasks

    def _fusable(self, t: _Task) -> bool:
        """Whether the fused CPU kernel can step ``t``: the layout part is cached per
        parameter, the tensor part (dtype, device, contiguity) is checked every step."""
        if not self._fusable_layout[t.param]:
            return False
        m = t.state["exp_avg"]
        dtypes_ok = t.g.dtype == t.p.dtype and (
            m.dtype == t.p.dtype or (m.dtype == torch.bfloat16 and t.p.dtype == torch.float32)
        )
        return (
            t.p.device.type == "cpu"
            and t.p.dtype in (torch.float32, torch.float64)
            and dtypes_ok
            and t.p.is_contiguous()
            and t.g.is_contiguous()
            and m.is_contiguous()
            # raw pointers go to C: every buffer must have the size the layout says
            and t.g.shape == t.p.shape == m.shape
            and t.state["exp_avg_sq"].numel() == t.layout.num_blocks
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Adam-mini step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            if not callable(closure):
                raise TypeError(
                    f"closure must be a function that recomputes the loss, got "
                    f"{type(closure).__name__}"
                )
            with torch.enable_grad():
                loss = closure()
        self._step()
        return loss

    @torch.compiler.disable
    def _step(self) -> None:
        for group in self.param_groups:  # a scheduler or user may have changed them
            check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        tasks = self._tasks()
        if not tasks:
            return
        fused, eager = [], []
        for t in tasks:
            (fused if self._fusable(t) else eager).append(t)
        mode = self.nonfinite
        check = mode in ("raise", "skip")  # two passes: nothing changes before all sums are known

        # Phase 1: block sums of g^2 of every tensor, before any state changes
        # (in the one-pass modes the fused kernel does sums and update together).
        plan = self._plan(fused) if fused else None
        if plan is not None:
            one_pass = cpu_fused.PHASE_BOTH
            if mode == "skip_blocks":
                one_pass |= cpu_fused.PHASE_SKIP_NONFINITE
            self._run_fused(plan, fused, cpu_fused.PHASE_SUMS if check else one_pass)
        sums = {id(t): block_sumsq(t.g, t.layout) for t in eager if t.layout.rule != "elements"}
        bad = self._count_nonfinite(eager, sums, plan) if check else 0.0
        meshes = [t.param.device_mesh for t in tasks if distributed.is_dtensor(t.param)]
        if meshes:  # replicated v adds up the ranks' partial sums; every rank learns the NaN count
            shared = [t for t in eager if t.layout.reduce_sums]
            bad = distributed.all_reduce_sums(
                [sums[id(t)] for t in shared], [t.param.device_mesh for t in shared], meshes, bad
            )
        if check and bad:
            names = self._nonfinite_names(tasks, fused, sums, plan)
            if mode == "skip":
                self.skipped_steps += 1
                return
            raise FloatingPointError(
                f"non-finite gradient (NaN/Inf) in {names or 'a tensor on another rank'}; the "
                "step was not taken and parameters and optimizer state are unchanged. Lower the "
                "learning rate, clip gradients, or pass nonfinite='skip' to skip such steps"
            )

        # Phase 2: the update.
        if plan is not None and check:
            self._run_fused(plan, fused, cpu_fused.PHASE_UPDATE)
        if mode != "skip_blocks":
            for t in eager:
                self._eager_update(t, sums.get(id(t)))
        else:
            skipped = sum(self._guarded_update(t, sums.get(id(t))) for t in eager)
            if plan is not None:
                skipped += self._count_nonfinite([], {}, plan)
            if skipped:
                self.skipped_blocks += int(skipped)
                names = self._nonfinite_names(tasks, fused, sums, plan)
                warnings.warn(
                    f"non-finite gradient (NaN/Inf) in {names}: {int(skipped)} blocks (entries of "
                    "'elements' tensors) were left unchanged, all others stepped",
                    RuntimeWarning,
                    stacklevel=4,
                )

    @staticmethod
    def _count_nonfinite(eager: list[_Task], sums: dict, plan: _FusedPlan | None) -> float:
        """Non-finite block sums (and entries of ``elements`` gradients) on this rank.

        A tensor is counted entry by entry only when its total is not finite (any NaN/Inf
        entry makes the total NaN/Inf), so the common all-finite case reads each tensor once
        with no temporary.
        """
        checked = [*sums.values(), *([plan.sums] if plan is not None else [])]
        checked += [t.g for t in eager if t.layout.rule == "elements"]
        return float(
            sum(
                int((~torch.isfinite(c)).sum())
                for c in checked
                if not bool(torch.isfinite(c.sum()))
            )
        )

    def _guarded_update(self, t: _Task, sums: torch.Tensor | None) -> int:
        """``_eager_update``, then the blocks with a non-finite sum get their old p, m, v back.

        The copies are made only for a tensor that has such a block (the rare path).
        Returns the number of such blocks (entries, for ``elements`` tensors).
        """
        bad = ~torch.isfinite(sums if sums is not None else t.g)
        n_bad = int(bad.sum())
        if not n_bad:
            self._eager_update(t, sums)
            return 0
        m = distributed.local(t.state["exp_avg"])
        v = distributed.local(t.state["exp_avg_sq"])
        old = (t.p.clone(), m.clone(), v.clone())
        self._eager_update(t, sums)
        if sums is None:  # elements: entry by entry
            entry_bad = bad
        else:
            marks = torch.zeros_like(t.p, dtype=torch.float32)
            apply_update_(marks, torch.ones_like(marks), bad.float(), t.layout)
            entry_bad = marks > 0
        t.p.copy_(torch.where(entry_bad, old[0], t.p))
        m.copy_(torch.where(entry_bad, old[1], m))
        v.copy_(torch.where(bad.view(-1) if sums is not None else bad, old[2].view_as(v), v))
        return n_bad

    def _nonfinite_names(
        self, tasks: list[_Task], fused: list[_Task], sums: dict, plan: _FusedPlan | None
    ) -> list[str]:
        """Names of the tensors whose local gradient has a NaN/Inf (for the error message)."""
        fused_sums = {}
        if plan is not None:
            fused_sums = {
                id(t): plan.sums[a:b] for t, (a, b) in zip(fused, plan.ranges, strict=True)
            }
        names = []
        for t in tasks:
            values = sums.get(id(t), fused_sums.get(id(t), t.g))
            if not bool(torch.isfinite(values).all()):
                names.append(t.name)
        return names

    def _hyper(self, t: _Task) -> Hyper:
        group = t.group
        decay = group["weight_decay"] if (t.param.ndim > 1 or group["decay_1d"]) else 0.0
        b1, b2 = group["betas"]
        return Hyper(group["lr"], b1, b2, group["eps"], decay, float(t.state["step"]))

    def _eager_update(self, t: _Task, sums: torch.Tensor | None) -> None:
        t.state["step"] += 1
        h = self._hyper(t)
        m = distributed.local(t.state["exp_avg"])
        v = distributed.local(t.state["exp_avg_sq"])
        lowp = m.dtype != t.p.dtype and self.momentum_dtype is not None
        if t.layout.rule == "elements" and not lowp:
            adamw_update_(t.p, t.g.to(t.p.dtype), m, v, h)
            return
        if lowp:  # the rounding bits hash the global index: the same whole or sharded
            key = self._rounding_key(t.name, h.step)
            offset = t.layout.row_lo * math.prod(t.layout.shape[1:])
        if t.layout.rule == "elements":
            if h.weight_decay != 0:
                t.p.mul_(1 - h.lr * h.weight_decay)
            m32 = lowp_momentum_(m, t.g, h.beta1, key, offset)
            v.mul_(h.beta2).addcmul_(t.g, t.g, value=1 - h.beta2)
            denom = (v.sqrt() / h.bias_correction2_sqrt).add_(h.eps)
            t.p.addcdiv_(m32.to(t.p.dtype), denom, value=-h.step_size)
            return
        mean = mean_square(sums, t.layout)
        if lowp:
            v.mul_(h.beta2).add_(mean.to(v.dtype), alpha=1 - h.beta2)
            if h.weight_decay != 0:
                t.p.mul_(1 - h.lr * h.weight_decay)
            m_used = lowp_momentum_(m, t.g, h.beta1, key, offset)
        else:
            decay_and_update_moments_(t.p, t.g, m, v, mean, h)
            m_used = m
        apply_update_(t.p, m_used, block_scale(v, h), t.layout)

    # ------------------------------------------------------------ fused path
    def _plan(self, fused: list[_Task]) -> _FusedPlan:
        """The chunk table of the fused kernel for this set of tensors (cached)."""
        key = tuple(id(t.param) for t in fused)
        plan = self._fused_plan.get(key)
        if plan is None:
            rows, ranges, pos = [], [], 0
            for i, t in enumerate(fused):
                lo, hi = t.layout.v_range
                rows += cpu_fused.chunks_of(i, t.layout.runs, lo, pos - lo)
                ranges.append((pos, pos + hi - lo))
                pos += hi - lo
            chunks = torch.tensor(rows, dtype=torch.int64).reshape(-1, 6)
            plan = _FusedPlan(chunks, torch.zeros(pos, dtype=torch.float64), tuple(ranges))
            if len(self._fused_plan) >= 4:  # the set of tensors with a gradient rarely varies
                self._fused_plan.pop(next(iter(self._fused_plan)))
            self._fused_plan[key] = plan
        return plan

    def _run_fused(self, plan: _FusedPlan, fused: list[_Task], phase: int) -> None:
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(fused):
            b1, b2 = t.group["betas"]
            key = (t.p.dtype, t.state["exp_avg"].dtype, b1, b2, t.group["eps"])
            groups.setdefault(key, []).append(i)
        # One small tensor each for the pointers and the per-tensor scalars (built from lists:
        # a torch.tensor per parameter per step costs more than the kernel's smaller tensors).
        ptr_rows, hyper_rows = [], []
        for t in fused:
            m = t.state["exp_avg"]
            key, hyper_row = 0, [0.0, 0.0, 0.0]
            if phase & cpu_fused.PHASE_UPDATE:
                t.state["step"] += 1
                h = self._hyper(t)
                if m.dtype != t.p.dtype:  # stochastic rounding of low-precision momentum
                    key = self._rounding_key(t.name, h.step)
                hyper_row = [1 - h.lr * h.weight_decay, -h.step_size, h.bias_correction2_sqrt]
            ptr_rows.append(
                [
                    t.p.data_ptr(),
                    t.g.data_ptr(),
                    m.data_ptr(),
                    t.state["exp_avg_sq"].data_ptr(),
                    key,
                ]
            )
            hyper_rows.append(hyper_row)
        ptrs = torch.tensor(ptr_rows, dtype=torch.int64)
        hyper = torch.tensor(hyper_rows, dtype=torch.float64)
        chunks = plan.chunks
        for (dtype, m_dtype, b1, b2, eps), idx in groups.items():
            sel = (
                chunks if len(groups) == 1 else chunks[torch.isin(chunks[:, 0], torch.tensor(idx))]
            )
            cpu_fused.run_kernel(
                self._lib,
                dtype,
                m_dtype,
                sel.contiguous(),
                ptrs,
                hyper,
                plan.sums,
                b1,
                b2,
                eps,
                phase,
            )

    def _rounding_key(self, name: str, step: float) -> int:
        """32-bit seed of the stochastic rounding of one tensor at one step (reproducible)."""
        return zlib.crc32(f"{self.seed}:{int(step)}:{name}".encode())
