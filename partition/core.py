"""The :class:`Partition`: the blocks of every parameter tensor of a model, in model order."""

from __future__ import annotations

import copy
import json
import math
import operator
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from partition.blocks import TensorBlocks
from partition.errors import PartitionError

NamedShapes = Iterable[tuple[str, Any]]
ModelLike = nn.Module | NamedShapes | Mapping[str, Any]  # what the partition builders take


def named_shapes(
    model_or_named_parameters: nn.Module | NamedShapes | Mapping[str, Any],
) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape)]`` of a module's parameters, an iterable of ``(name, tensor)`` pairs,
    or a mapping ``name -> tensor`` (a tensor may be replaced by its shape)."""
    obj = model_or_named_parameters
    if isinstance(obj, nn.Module):
        items: Iterable[tuple[str, Any]] = obj.named_parameters()
    elif isinstance(obj, Mapping):
        items = obj.items()
    else:
        items = obj
    out = []
    try:
        for name, value in items:
            shape = value.shape if hasattr(value, "shape") else value
            sizes = tuple(shape)
            if not all(_is_size(s) for s in sizes):
                raise PartitionError(
                    f"tensor {name!r} has shape {shape!r}: sizes must be integers; pass the "
                    "tensor itself or its torch.Size"
                )
            out.append((str(name), tuple(int(s) for s in sizes)))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, PartitionError):
            raise
        raise PartitionError(
            "expected an nn.Module, an iterable of (name, tensor) pairs or a mapping name -> tensor; "
            f"got {type(obj).__name__} ({exc})"
        ) from exc
    return out


def _is_size(s: Any) -> bool:
    """An integer size (int, NumPy or torch integer, SymInt), not a float or a bool."""
    return not isinstance(s, bool) and hasattr(type(s), "__index__")


def _wrapped(names: list[str], unwrapped: list[str]) -> bool:
    """Whether ``names`` are ``unwrapped`` each behind DDP/DataParallel's ``module.`` prefix."""
    return (
        bool(names)
        and all(n.startswith("module.") for n in names)
        and {n.removeprefix("module.") for n in names} == set(unwrapped)
    )


class Partition:
    r"""The blocks of every parameter tensor; immutable.

    Blocks are numbered globally in ``names`` order: the blocks of ``names[0]`` come first,
    then those of ``names[1]``, and so on, so ``num_blocks`` is the number of entries of
    Adam-mini's second moment :math:`v` and :math:`\text{share of } v \text{ kept} =
    \text{num\_blocks} / \text{num\_params}`.

    Example:
        >>> import partition
        >>> part = partition.Partition([partition.TensorBlocks("w", (4, 3), "rows", {})])
        >>> part.num_blocks, part.block_index("w")[:, 0].tolist()
        (4, [0, 1, 2, 3])
    """

    __slots__ = ("_tensors", "_offsets", "_provenance")

    def __init__(
        self, tensors: Iterable[TensorBlocks], provenance: Mapping[str, Any] | None = None
    ) -> None:
        if not isinstance(tensors, Iterable) or isinstance(tensors, str):
            raise PartitionError(
                f"Partition takes an iterable of TensorBlocks, got {type(tensors).__name__}; "
                "build one with partition.adam_mini(model), by_tensor(model), ..."
            )
        if provenance is not None and not isinstance(provenance, Mapping):
            raise PartitionError(
                f"provenance must be a mapping (a dict such as {{'method': ...}}), got "
                f"{type(provenance).__name__}"
            )
        tensors = tuple(tensors)
        entries: dict[str, TensorBlocks] = {}
        offsets: dict[str, int] = {}
        total = 0
        for tb in tensors:
            if not isinstance(tb, TensorBlocks):
                raise PartitionError(f"expected TensorBlocks, got {type(tb).__name__}")
            if tb.name in entries:
                raise PartitionError(f"tensor {tb.name!r} appears twice in the partition")
            entries[tb.name] = tb
            offsets[tb.name] = total
            total += tb.num_blocks
        try:  # a private copy in JSON's own terms, so a file round trip compares equal
            prov = json.loads(json.dumps(dict(provenance or {}), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise PartitionError(
                f"provenance must be JSON-able (str, int, finite float, list, dict): {exc}"
            ) from exc
        object.__setattr__(self, "_tensors", entries)
        object.__setattr__(self, "_offsets", offsets)
        object.__setattr__(self, "_provenance", prov)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Partition is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Partition, (self.tensors(), self._provenance))

    # ------------------------------------------------------------------ container
    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names in model order."""
        return tuple(self._tensors)

    def __getitem__(self, name: str) -> TensorBlocks:
        try:
            return self._tensors[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name such as a list
            raise PartitionError(
                f"tensor {name!r} is not in the partition ({len(self)} tensors); "
                "build the partition from the same model"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return (
            list(self._tensors.values()) == list(other._tensors.values())
            and self._provenance == other._provenance
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Partition({len(self)} tensors, {self.num_blocks} blocks, {self.num_params} params)"

    def tensors(self) -> tuple[TensorBlocks, ...]:
        """The :class:`TensorBlocks` in ``names`` order."""
        return tuple(self._tensors.values())

    def with_provenance(self, provenance: Mapping[str, Any]) -> Partition:
        """A copy with ``provenance`` merged over the current one."""
        if not isinstance(provenance, Mapping):
            raise PartitionError(
                f"with_provenance takes a mapping (a dict such as {{'model': 'gpt2'}}), got "
                f"{type(provenance).__name__}"
            )
        return Partition(self.tensors(), {**self._provenance, **provenance})

    # ------------------------------------------------------------------ sizes and ids
    @property
    def num_blocks(self) -> int:
        """Total number of blocks (= number of entries of ``v``)."""
        return sum(tb.num_blocks for tb in self._tensors.values())

    @property
    def num_params(self) -> int:
        """Total number of parameter entries."""
        return sum(tb.numel for tb in self._tensors.values())

    @property
    def provenance(self) -> dict[str, Any]:
        """How the partition was made (``method``, ``threshold``, ``r_diag_before`` ...); a copy."""
        return copy.deepcopy(self._provenance)

    def offset(self, name: str) -> int:
        """Global id of the first block of tensor ``name``."""
        self[name]
        return self._offsets[name]

    def block_index(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor in the tensor's shape with the GLOBAL block id of every entry."""
        return self[name].local_index(device) + self._offsets[name]

    def block_sizes(self) -> torch.Tensor:
        """LongTensor ``[num_blocks]``: entries per block, in global block order."""
        sizes = [tb.block_sizes() for tb in self._tensors.values()]
        return torch.cat(sizes) if sizes else torch.zeros(0, dtype=torch.long)

    def block_labels(self) -> list[str]:
        """One label per global block, e.g. ``"blocks.0.attn.q_proj.weight[head 3]"``."""
        return [tb.block_label(i) for tb in self._tensors.values() for i in range(tb.num_blocks)]

    def locate(self, block_id: int) -> tuple[str, int]:
        """``(tensor name, local id)`` of global block ``block_id``."""
        if isinstance(block_id, (bool, np.bool_)) or (
            isinstance(block_id, torch.Tensor) and block_id.dtype == torch.bool
        ):  # Python's, NumPy's and torch's bools pass for 0 and 1
            raise TypeError(
                f"block id must be an int, got the bool {block_id!r}; pass the block's number, "
                f"an int in [0, {self.num_blocks})"
            )
        try:
            block_id = operator.index(block_id)  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            raise PartitionError(f"block id must be an int, got {block_id!r}") from None
        if not 0 <= block_id < self.num_blocks:
            raise PartitionError(f"block id {block_id} out of range [0, {self.num_blocks})")
        for name, tb in self._tensors.items():
            start = self._offsets[name]
            if block_id < start + tb.num_blocks:
                return name, block_id - start
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ reports
    def summary(self) -> str:
        """A table: tensor, shape, rule, blocks, share of ``v`` kept (blocks / entries), and a total."""
        header = ("tensor", "shape", "rule", "blocks", "v kept")
        rows = []
        for tb in self._tensors.values():
            rule = tb.rule
            if rule == "heads":
                rule = f"heads({tb.params['head_dim']})"
            elif rule == "fused_heads":
                rule = f"fused_heads({tb.params['head_dim']},{tb.params['orientation']})"
            rows.append(
                (
                    tb.name,
                    "x".join(map(str, tb.shape)) or "()",
                    rule,
                    f"{tb.num_blocks:,}",
                    _share(tb.num_blocks, tb.numel),
                )
            )
        total = (
            f"total ({len(self)} tensors)",
            f"{self.num_params:,} params",
            "",
            f"{self.num_blocks:,}",
            _share(self.num_blocks, self.num_params),
        )
        widths = [max(len(r[i]) for r in [header, *rows, total]) for i in range(5)]

        def fmt(r: tuple[str, ...]) -> str:
            cells = [r[i].ljust(widths[i]) if i < 3 else r[i].rjust(widths[i]) for i in range(5)]
            return "  ".join(cells).rstrip()

        rule_line = "-" * len(fmt(header))
        lines = [fmt(header), rule_line, *map(fmt, rows), rule_line, fmt(total)]
        if self._provenance:
            prov = ", ".join(f"{k}={_short(v)}" for k, v in self._provenance.items())
            lines.insert(0, f"provenance: {prov}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ validation
    def check(self, model_or_named_parameters: nn.Module | NamedShapes | Mapping[str, Any]) -> None:
        """Raise :class:`PartitionError` unless the partition fits the model exactly.

        Checks: every model tensor is in the partition and vice versa, shapes agree, and the rule
        is valid for the model's shape (e.g. rows divisible by ``head_dim``).
        """
        model = dict(named_shapes(model_or_named_parameters))
        self._check_wrapper_prefix(list(model))
        missing = [n for n in model if n not in self._tensors]
        if missing:
            raise PartitionError(
                f"tensor {missing[0]!r} of the model is missing from the partition "
                f"({len(missing)} missing); rebuild the partition for this model"
            )
        extra = [n for n in self._tensors if n not in model]
        if extra:
            raise PartitionError(
                f"tensor {extra[0]!r} of the partition is not a parameter of the model "
                f"({len(extra)} extra); rebuild the partition for this model"
            )
        for name, tb in self._tensors.items():
            shape = model[name]
            if shape == tb.shape:
                continue
            try:
                TensorBlocks(name, shape, tb.rule, tb.params)
            except PartitionError as exc:
                raise PartitionError(
                    f"{exc} (the partition was built for shape {tb.shape}, the model has {shape})"
                ) from None
            raise PartitionError(
                f"tensor {name!r} has shape {shape} in the model but {tb.shape} in the partition; "
                "rebuild the partition for this model"
            )

    def _check_wrapper_prefix(self, model_names: list[str]) -> None:
        """A PartitionError naming DDP/DataParallel's ``module.`` prefix when it is the only
        difference between the model's names and the partition's."""
        ours = list(self._tensors)
        if _wrapped(model_names, ours):
            raise PartitionError(
                f"the model's tensor names start with 'module.' ({model_names[0]!r}), the "
                "partition's do not: the model is wrapped in DistributedDataParallel or "
                "DataParallel; check the unwrapped model, part.check(model.module), the "
                "one to build partitions from too (partition.adam_mini(model.module))"
            )
        if _wrapped(ours, model_names):
            raise PartitionError(
                f"the partition's tensor names start with 'module.' ({ours[0]!r}), the "
                "model's do not: it was built from a DistributedDataParallel or DataParallel "
                "wrapper; build it from the unwrapped model, e.g. "
                "partition.adam_mini(model.module)"
            )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON-able form (see :mod:`partition.io`)."""
        from partition.io import partition_to_dict

        return partition_to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Partition:
        """Inverse of :meth:`to_dict`; any malformation raises :class:`PartitionError`."""
        from partition.io import parse_partition_dict

        tensors, provenance = parse_partition_dict(data)
        return cls(tensors, provenance)

    def to_json(self, path: str | Path) -> None:
        """Write the JSON file atomically (temporary file in the same directory, then rename)."""
        from partition.io import write_json

        write_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, path: str | Path) -> Partition:
        """Read a file written by :meth:`to_json`; malformed files raise :class:`PartitionError`."""
        from partition.io import read_json

        data = read_json(path)
        try:
            return cls.from_dict(data)
        except PartitionError as exc:
            raise PartitionError(
                f"{str(path)!r}: {exc}. Regenerate it for this model "
                "(adam-mini-lab partition --model ... --out FILE, or Partition.to_json)"
            ) from exc


def _share(blocks: int, numel: int) -> str:
    if numel == 0:
        return "-"
    share = 100.0 * blocks / numel
    return f"{share:.2f}%" if share == 0 or share >= 1 else f"{share:.3g}%"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."
