"""Per-tensor block rules: :class:`TensorBlocks` and the seven rules.

A rule maps every entry of one parameter tensor to a local block id in
``[0, num_blocks)``. Dim 0 is the output axis of ``nn.Linear`` / ``nn.Embedding``
weights (``(out, in)``); weights stored ``(in, out)`` (GPT-2 ``Conv1D``) use the
``columns`` orientation.

============  =====================================================  ============================
rule          params                                                 block id of entry ``x[i, ...]``
============  =====================================================  ============================
elements      ``{}``                                                 flat (row-major) index
tensor        ``{}``                                                 0
rows          ``{}`` (ndim >= 2)                                     ``i``
columns       ``{}`` (ndim == 2)                                     ``j`` of ``x[i, j]``
heads         ``{"head_dim": h}`` (shape[0] % h == 0)                ``i // h``
fused_heads   ``{"head_dim": h, "sections": [q, k, v],               q heads, then k heads, then one
              "orientation": "rows" | "columns"}``                   block per v output neuron
row_groups    ``{"groups": [g_0, ..., g_{n-1}]}`` (ids 0..G-1 used)  ``groups[i]``
============  =====================================================  ============================
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from partition.errors import PartitionError

RULES: tuple[str, ...] = (
    "elements",
    "tensor",
    "rows",
    "columns",
    "heads",
    "fused_heads",
    "row_groups",
)

_PARAM_KEYS: dict[str, frozenset[str]] = {
    "elements": frozenset(),
    "tensor": frozenset(),
    "rows": frozenset(),
    "columns": frozenset(),
    "heads": frozenset({"head_dim"}),
    "fused_heads": frozenset({"head_dim", "sections", "orientation"}),
    "row_groups": frozenset({"groups"}),
}

_INT64_MAX = 2**63 - 1  # torch's limit on a size and on a tensor's entry count


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _int_tuple(name: str, key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
        raise PartitionError(f"tensor {name!r}: params[{key!r}] must be a list of integers")
    return tuple(int(v) for v in value)


def _device(device: Any) -> torch.device | None:
    """``device`` as a ``torch.device`` (None stays None), or a PartitionError naming it."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PartitionError(
            f"device={device!r} is not a torch device ({exc}); pass e.g. 'cpu', 'cuda:0' or "
            "param.device"
        ) from None


@dataclass(frozen=True)
class TensorBlocks:
    """The blocks of one parameter tensor: ``part[name]``.

    Attributes:
        name: parameter name, as in ``model.named_parameters()``.
        shape: the parameter's shape.
        rule: one of :data:`RULES`.
        params: JSON-able rule parameters (see the module docstring). Sequences are
            stored as tuples so the object stays immutable.

    Invalid combinations raise :class:`PartitionError` at construction, e.g.
    ``tensor 'h.0.attn.q_proj.weight' has 96 rows, not a multiple of head_dim=64``.
    """

    name: str
    shape: tuple[int, ...]
    rule: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PartitionError(f"tensor name must be a non-empty string, got {self.name!r}")
        shape = self.shape  # a torch.Size is a tuple
        if not isinstance(shape, (list, tuple)) or not all(_is_int(s) and s >= 0 for s in shape):
            raise PartitionError(
                f"tensor {self.name!r}: shape must be a list of non-negative integers, got {self.shape!r}"
            )
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        if math.prod(self.shape) > _INT64_MAX or any(s > _INT64_MAX for s in self.shape):
            raise PartitionError(
                f"tensor {self.name!r}: shape {self.shape} is beyond torch's limit of 2**63 - 1 "
                "(per size and in entries); give the parameter's real shape"
            )
        if self.rule not in RULES:
            raise PartitionError(
                f"tensor {self.name!r}: unknown rule {self.rule!r}; known rules: {', '.join(RULES)}"
            )
        if not isinstance(self.params, Mapping):
            raise PartitionError(
                f"tensor {self.name!r}: params must be a mapping, got {self.params!r}"
            )
        keys = set(self.params)
        expected = _PARAM_KEYS[self.rule]
        if keys != expected:
            raise PartitionError(
                f"tensor {self.name!r}: rule {self.rule!r} takes params {sorted(expected)}, "
                f"got {sorted(map(str, keys))}"
            )
        object.__setattr__(self, "params", self._validated_params())

    def __hash__(self) -> int:
        return hash((self.name, self.shape, self.rule, tuple(sorted(self.params.items()))))

    # ------------------------------------------------------------------ validation
    def _validated_params(self) -> dict[str, Any]:
        name, shape, rule, p = self.name, self.shape, self.rule, self.params
        ndim = len(shape)
        if rule == "rows" and ndim < 2:
            raise PartitionError(
                f"tensor {name!r} has shape {shape}: rule 'rows' needs a matrix (ndim >= 2); "
                "use 'tensor' for 1-D weights such as norms and biases"
            )
        if rule == "columns" and ndim != 2:
            raise PartitionError(
                f"tensor {name!r} has shape {shape}: rule 'columns' needs a 2-D (in, out) weight"
            )
        if rule == "heads":
            head_dim = self._head_dim(p["head_dim"])
            if ndim < 1:
                raise PartitionError(f"tensor {name!r} is a scalar: rule 'heads' needs ndim >= 1")
            if shape[0] % head_dim:
                raise PartitionError(
                    f"tensor {name!r} has {shape[0]} rows, not a multiple of head_dim={head_dim}"
                )
            return {"head_dim": head_dim}
        if rule == "fused_heads":
            return self._validated_fused(p)
        if rule == "row_groups":
            if ndim < 1:
                raise PartitionError(
                    f"tensor {name!r} is a scalar: rule 'row_groups' needs ndim >= 1"
                )
            groups = _int_tuple(name, "groups", p["groups"])
            if len(groups) != shape[0]:
                raise PartitionError(
                    f"tensor {name!r} has {shape[0]} rows but {len(groups)} group ids; "
                    "give one group id per row"
                )
            if groups:
                used = set(groups)
                if min(used) < 0 or len(used) != max(used) + 1:
                    raise PartitionError(
                        f"tensor {name!r}: group ids must use every id 0..G-1 exactly "
                        f"(got {len(used)} distinct ids, min {min(used)}, max {max(used)})"
                    )
            return {"groups": groups}
        return {}

    def _head_dim(self, value: Any) -> int:
        if not _is_int(value) or not 0 < value <= _INT64_MAX:
            raise PartitionError(
                f"tensor {self.name!r}: head_dim must be a positive integer below 2**63, "
                f"got {value!r}"
            )
        return int(value)

    def _validated_fused(self, p: Mapping[str, Any]) -> dict[str, Any]:
        name, shape = self.name, self.shape
        head_dim = self._head_dim(p["head_dim"])
        orientation = p["orientation"]
        if orientation not in ("rows", "columns"):
            raise PartitionError(
                f"tensor {name!r}: fused_heads orientation must be 'rows' or 'columns', "
                f"got {orientation!r}"
            )
        if orientation == "columns" and len(shape) != 2:
            raise PartitionError(
                f"tensor {name!r} has shape {shape}: fused_heads with orientation 'columns' "
                "needs a 2-D (in, out) weight"
            )
        if orientation == "rows" and len(shape) < 1:
            raise PartitionError(f"tensor {name!r} is a scalar: fused_heads needs ndim >= 1")
        sections = _int_tuple(name, "sections", p["sections"])
        if len(sections) != 3 or any(s < 0 for s in sections):
            raise PartitionError(
                f"tensor {name!r}: fused_heads sections must be three non-negative sizes "
                f"[q_out, k_out, v_out], got {list(sections)}"
            )
        axis = 0 if orientation == "rows" else 1
        if sum(sections) != shape[axis]:
            raise PartitionError(
                f"tensor {name!r}: fused_heads sections {list(sections)} sum to {sum(sections)}, "
                f"but the output axis (dim {axis}) has {shape[axis]} entries"
            )
        for label, size in zip("qk", sections[:2], strict=False):
            if size % head_dim:
                raise PartitionError(
                    f"tensor {name!r}: the {label} section has {size} outputs, "
                    f"not a multiple of head_dim={head_dim}"
                )
        return {"head_dim": head_dim, "sections": sections, "orientation": orientation}

    # ------------------------------------------------------------------ sizes
    @property
    def numel(self) -> int:
        """Number of entries of the tensor."""
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        """Number of blocks (= entries of Adam's ``v`` this tensor keeps)."""
        rule, shape, p = self.rule, self.shape, self.params
        if rule == "elements":
            return self.numel
        if rule == "tensor":
            return 1
        if rule == "rows":
            return shape[0]
        if rule == "columns":
            return shape[1]
        if rule == "heads":
            return shape[0] // p["head_dim"]
        if rule == "fused_heads":
            q, k, v = p["sections"]
            return q // p["head_dim"] + k // p["head_dim"] + v
        return max(p["groups"], default=-1) + 1  # row_groups

    def axis_ids(self) -> torch.Tensor:
        """Block id along the rule's axis (dim 0, or dim 1 for ``columns`` orientations).

        For ``elements`` and ``tensor`` this is the ids of the flattened tensor, resp. ``[0]``.
        """
        rule, shape, p = self.rule, self.shape, self.params
        if rule == "elements":
            return torch.arange(self.numel)
        if rule == "tensor":
            return torch.zeros(1, dtype=torch.long)
        if rule == "rows":
            return torch.arange(shape[0])
        if rule == "columns":
            return torch.arange(shape[1])
        if rule == "heads":
            return torch.arange(shape[0]) // p["head_dim"]
        if rule == "fused_heads":
            q, k, v = p["sections"]
            h = p["head_dim"]
            return torch.cat(
                [
                    torch.arange(q) // h,
                    q // h + torch.arange(k) // h,
                    q // h + k // h + torch.arange(v),
                ]
            )
        return torch.tensor(p["groups"], dtype=torch.long).reshape(shape[0])

    @property
    def axis(self) -> int | None:
        """The axis the blocks are laid along: 0, 1, or ``None`` (``elements``/``tensor``)."""
        if self.rule in ("rows", "heads", "row_groups"):
            return 0
        if self.rule == "columns":
            return 1
        if self.rule == "fused_heads":
            return 0 if self.params["orientation"] == "rows" else 1
        return None

    def local_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor of ``shape`` with the local block id (in ``[0, num_blocks)``) of every entry."""
        device = _device(device)
        ids = self.axis_ids().to(device)
        if self.rule == "elements":
            return ids.reshape(self.shape)
        if self.rule == "tensor":
            return torch.zeros(self.shape, dtype=torch.long, device=device)
        axis = self.axis
        view = [1] * len(self.shape)
        view[axis] = self.shape[axis]
        return ids.reshape(view).expand(self.shape).contiguous()

    def block_sizes(self) -> torch.Tensor:
        """LongTensor ``[num_blocks]``: entries per block."""
        if self.rule == "elements":
            return torch.ones(self.numel, dtype=torch.long)
        if self.rule == "tensor":
            return torch.tensor([self.numel], dtype=torch.long)
        axis = self.axis
        along = self.shape[axis]
        other = self.numel // along if along else 0
        return torch.bincount(self.axis_ids(), minlength=self.num_blocks) * other

    def block_label(self, local_id: int) -> str:
        """Human-readable label of one block, e.g. ``"blocks.0.attn.q_proj.weight[head 3]"``."""
        if not _is_int(local_id):
            raise PartitionError(
                f"tensor {self.name!r}: a local block id is an int in [0, {self.num_blocks}), "
                f"got {local_id!r}"
            )
        if not 0 <= local_id < self.num_blocks:
            raise PartitionError(
                f"tensor {self.name!r} has {self.num_blocks} blocks; no block {local_id}"
            )
        rule, p = self.rule, self.params
        if rule == "tensor":
            return self.name
        if rule == "elements":
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(local_id), self.shape))
            return f"{self.name}[entry {idx[0] if len(idx) == 1 else idx}]"
        if rule == "rows":
            return f"{self.name}[row {local_id}]"
        if rule == "columns":
            return f"{self.name}[column {local_id}]"
        if rule == "heads":
            return f"{self.name}[head {local_id}]"
        if rule == "row_groups":
            return f"{self.name}[group {local_id}]"
        q, k, _ = p["sections"]
        nq, nk = q // p["head_dim"], k // p["head_dim"]
        if local_id < nq:
            return f"{self.name}[q head {local_id}]"
        if local_id < nq + nk:
            return f"{self.name}[k head {local_id - nq}]"
        return f"{self.name}[v neuron {local_id - nq - nk}]"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: ``{"name", "shape", "rule", "params", "num_blocks"}``."""
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        return {
            "name": self.name,
            "shape": list(self.shape),
            "rule": self.rule,
            "params": params,
            "num_blocks": self.num_blocks,
        }
