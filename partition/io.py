"""The partition file format (``adam-mini-lab.partition``, version 1) and atomic JSON I/O.

Layout::

    {
      "format": "adam-mini-lab.partition",
      "version": 1,
      "provenance": {"method": "adam_mini", ...},
      "tensors": [
        {"name": "blocks.0.attn.q_proj.weight", "shape": [64, 64], "rule": "heads",
         "params": {"head_dim": 16}, "num_blocks": 4},
        ...
      ],
      "num_blocks": 1234
    }

``tensors`` is in model order; the global block ids follow it. ``num_blocks`` (per tensor and
total) is redundant and checked on load, so a hand-edited file cannot silently disagree with its
rules. Unknown extra keys are ignored.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from partition.blocks import TensorBlocks
from partition.errors import PartitionError

if TYPE_CHECKING:
    from partition.core import Partition

FORMAT = "adam-mini-lab.partition"
VERSION = 1


def partition_to_dict(part: Partition) -> dict[str, Any]:
    """The JSON-able dict of ``part`` in the version-1 layout."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "provenance": part.provenance,
        "tensors": [tb.to_dict() for tb in part.tensors()],
        "num_blocks": part.num_blocks,
    }


def _require(data: dict, key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise PartitionError(f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise PartitionError(
            f"{where}: {key!r} must be {_type_names(types)}, got {type(value).__name__}"
        )
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


def parse_partition_dict(data: Any) -> tuple[list[TensorBlocks], dict[str, Any]]:
    """Validate a decoded partition file; return its tensors and provenance."""
    if not isinstance(data, dict):
        raise PartitionError(f"a partition file must hold a JSON object, got {type(data).__name__}")
    fmt = _require(data, "format", str, "partition file")
    if fmt != FORMAT:
        raise PartitionError(f"unknown format {fmt!r}; expected {FORMAT!r}")
    version = _require(data, "version", int, "partition file")
    if version != VERSION:
        raise PartitionError(
            f"unsupported partition format version {version}; this adam-mini-lab reads "
            f"version {VERSION} (upgrade adam-mini-lab or rewrite the file)"
        )
    provenance = _require(data, "provenance", dict, "partition file")
    entries = _require(data, "tensors", list, "partition file")
    tensors = []
    for i, entry in enumerate(entries):
        where = f"tensors[{i}]"
        if not isinstance(entry, dict):
            raise PartitionError(f"{where} must be an object, got {type(entry).__name__}")
        name = _require(entry, "name", str, where)
        where = f"tensor {name!r}"
        shape = _require(entry, "shape", list, where)
        rule = _require(entry, "rule", str, where)
        params = _require(entry, "params", dict, where)
        stated = _require(entry, "num_blocks", int, where)
        tb = TensorBlocks(name, shape, rule, params)
        if tb.num_blocks != stated:
            raise PartitionError(
                f"{where}: the file says {stated} blocks but rule {rule!r} gives {tb.num_blocks}"
            )
        tensors.append(tb)
    total = _require(data, "num_blocks", int, "partition file")
    computed = sum(tb.num_blocks for tb in tensors)
    if total != computed:
        raise PartitionError(
            f"partition file: total num_blocks is {total} but its tensors have {computed} blocks"
        )
    return tensors, provenance


def read_json(path: str | Path) -> Any:
    """Decode a JSON file; every failure becomes a :class:`PartitionError` naming the file."""
    path = _as_path(path, "a partition file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PartitionError(f"cannot read partition file {str(path)!r}: {exc.strerror}") from exc
    if not raw.strip():
        raise PartitionError(f"partition file {str(path)!r} is empty")
    try:
        return json.loads(raw.decode("utf-8-sig"))  # -sig: a leading BOM (Windows editors)
    except UnicodeDecodeError as exc:
        raise PartitionError(f"partition file {str(path)!r} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise PartitionError(
            f"partition file {str(path)!r} is not valid JSON (truncated?): {exc}"
        ) from exc
    except (RecursionError, ValueError) as exc:
        raise PartitionError(f"partition file {str(path)!r} cannot be decoded: {exc}") from exc


def dumps(data: Any) -> str:
    """JSON text with one line per tensor entry (readable diffs, compact ``groups`` lists)."""
    if not (isinstance(data, dict) and isinstance(data.get("tensors"), list)):
        return json.dumps(data, indent=1, allow_nan=False) + "\n"
    lines = []
    for key, value in data.items():
        if key == "tensors":
            entries = [f"  {json.dumps(t, allow_nan=False)}" for t in value]
            body = "\n" + ",\n".join(entries) + "\n " if entries else ""
            lines.append(f' "tensors": [{body}]')
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, allow_nan=False)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _as_path(path: Any, what: str) -> Path:
    """``path`` as a ``Path``, or a TypeError naming ``what`` it should be the path of."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"the path of {what} must be a str or os.PathLike, got {type(path).__name__}: pass "
            "a file name such as 'out/partition.json'"
        )
    return Path(path)


def check_file_path(path: str | os.PathLike[str], label: str) -> Path:
    """``path`` as a ``Path`` when it can name a file: not a folder, no file among its parents.
    Else an OSError on one line: ``label`` (what is being done, or a CLI flag), the path, the fix.
    """
    path = _as_path(path, "the file to write")
    if path.is_dir():
        raise IsADirectoryError(
            f"{label} {str(path)!r}: it is a folder; give a file path, e.g. "
            f"{str(path / 'out.json')!r}"
        )
    blocker = next((a for a in path.parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(
            f"{label} {str(path)!r}: {str(blocker)!r} is a file, not a folder; choose another path"
        )
    return path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``.

    Nothing is written half-way: a reader sees the old file or the whole new one. The file gets
    the permissions a plain ``open`` would give (0666 less the umask), not ``mkstemp``'s 0600.
    The parent folder is created when missing.
    """
    path = check_file_path(path, "cannot write")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file asked for, not the temporary one
        raise type(exc)(
            exc.errno, f"cannot write {str(path)!r}: {exc.strerror}; choose a writable folder"
        ) from exc
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as partition-format JSON atomically (:func:`atomic_path`)."""
    write_text(path, dumps(data))
