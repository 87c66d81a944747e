"""Data for the testbeds: Gaussian classification and a byte-level text corpus.

The default corpus is the Python standard library's own ``.py`` source, which ships with
every CPython install (license: PSF License Agreement), read byte by byte (vocabulary 256).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from optimizer.cache import cache_dir as _shared_cache_dir
from partition.io import atomic_path

__all__ = [
    "gaussian_classification",
    "Corpus",
    "CorpusChangedError",
    "default_cache_dir",
    "DEFAULT_MAX_BYTES",
]

DEFAULT_MAX_BYTES = 4 * 2**20
"""Default cap of the stdlib corpus: the first 4 MiB of the sorted source files."""

ALWAYS_EXCLUDED = frozenset({"site-packages", "dist-packages", "__pycache__"})
DEFAULT_EXCLUDE = ("test", "tests", "idle_test", "encodings", "pydoc_data")
"""Directories skipped by default: test suites, and generated code (codec tables, the pydoc
topic dump) that is data rather than Python as people write it. The build-specific
``_sysconfigdata*.py`` files are always skipped."""


def gaussian_classification(
    n: int,
    d: int,
    num_classes: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    labels: Literal["uniform", "teacher"] = "uniform",
) -> tuple[Tensor, Tensor]:
    """Random classification data ``X ~ N(0, I_d)`` (n rows) with labels ``y`` in [0, C).

    ``labels="uniform"`` (default) draws ``y`` uniformly and independently of ``X``, the
    "random data" of the paper's MLP Hessian experiments: the Hessian structure there comes
    from the architecture, not from a learnable signal. ``labels="teacher"`` uses a random
    linear teacher, ``y_i = argmax_c (W x_i)_c`` with ``W ~ N(0, 1/d)``, so that the task is
    learnable (useful when training curves should go down).

    Returns ``(X (n, d) in dtype, y (n,) int64)``; the same seed gives the same data.
    """
    for name, value in (("n", n), ("d", d), ("num_classes", num_classes)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if labels not in ("uniform", "teacher"):
        raise ValueError(f"labels must be 'uniform' or 'teacher', got {labels!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype for Gaussian features, got {dtype}")
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if labels == "uniform":
        y = torch.randint(0, num_classes, (n,), generator=gen)
    else:
        W = torch.randn(num_classes, d, generator=gen, dtype=torch.float64) / d**0.5
        y = (X @ W.T).argmax(dim=1)
    return X.to(dtype), y


class CorpusChangedError(RuntimeError):
    """The stdlib's files changed size while :meth:`Corpus.stdlib` read them: retry later."""


def default_cache_dir() -> Path:
    """``$ADAM_MINI_LAB_CACHE`` if set, else ``$XDG_CACHE_HOME/adam-mini-lab``, else
    ``~/.cache/adam-mini-lab``: the folder of the compiled CPU kernel too
    (:func:`optimizer.cache.cache_dir`)."""
    return _shared_cache_dir()


def _stdlib_files(exclude: Sequence[str]) -> tuple[Path, list[tuple[str, int]]]:
    """The stdlib root and its ``.py`` files as sorted ``(posix relative path, size)``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ALWAYS_EXCLUDED | set(exclude)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        files += [
            ((rel / f).as_posix(), (Path(dirpath) / f).stat().st_size)
            for f in filenames
            if f.endswith(".py") and not f.startswith("_sysconfigdata")
        ]
    return root, sorted(files)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as .npy to a temp file next to ``path``, then ``os.replace`` it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


class Corpus:
    """A byte-level token stream (vocabulary 256) with a fixed train/validation split.

    ``tokens[:split_index]`` is the training split and ``tokens[split_index:]`` the
    validation split. Batches are windows drawn inside one split only, so no window
    straddles the boundary.

    Build one with :meth:`stdlib` (the Python standard library's source, cached) or
    :meth:`from_file` (any text file).
    """

    vocab_size = 256

    def __init__(
        self,
        tokens: Tensor,
        split_index: int,
        *,
        source: str,
        files: Sequence[str] = (),
        file_starts: Sequence[int] = (),
        cache_path: Path | None = None,
        from_cache: bool = False,
    ) -> None:
        if tokens.dtype != torch.uint8 or tokens.dim() != 1:
            raise ValueError(
                f"tokens must be a 1-D uint8 tensor, got {tokens.dtype} {tuple(tokens.shape)}"
            )
        if len(files) != len(file_starts):
            raise ValueError(
                f"got {len(files)} files but {len(file_starts)} file_starts: pass one each"
            )
        if not 0 < split_index < tokens.numel():
            raise ValueError(
                f"split_index={split_index} leaves an empty split of a {tokens.numel()}-byte "
                f"corpus: use more text or a val_fraction in (0, 1)"
            )
        self.tokens = tokens
        self.split_index = split_index
        self.source = source
        self.files = tuple(files)
        self.file_starts = tuple(file_starts)
        self.cache_path = cache_path
        self.from_cache = from_cache

    @property
    def train(self) -> Tensor:
        """Training bytes (uint8 view of ``tokens``)."""
        return self.tokens[: self.split_index]

    @property
    def val(self) -> Tensor:
        """Validation bytes (uint8 view of ``tokens``)."""
        return self.tokens[self.split_index :]

    @property
    def train_files(self) -> tuple[str, ...]:
        """Files with bytes in the training split."""
        return tuple(
            f for f, s in zip(self.files, self.file_starts, strict=True) if s < self.split_index
        )

    @property
    def val_files(self) -> tuple[str, ...]:
        """Files with bytes in the validation split (disjoint from ``train_files`` unless the
        split falls inside a file, as for :meth:`from_file`)."""
        ends = (*self.file_starts[1:], self.tokens.numel())
        return tuple(f for f, e in zip(self.files, ends, strict=True) if e > self.split_index)

    @classmethod
    def stdlib(
        cls,
        cache_dir: str | os.PathLike | None = None,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        val_fraction: float = 0.1,
        exclude: Sequence[str] = DEFAULT_EXCLUDE,
    ) -> Corpus:
        """The Python standard library's ``.py`` source as one byte stream.

        Files are the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (never
        site-packages; directories named in ``exclude`` skipped), sorted by relative path and
        concatenated; the stream is cut to its first ``max_bytes`` bytes (``None``: all).
        The validation split starts at the file boundary nearest to
        ``t = int((1 - val_fraction) * len)``, so train and validation hold disjoint files
        and the validation share is ``val_fraction`` only approximately; if no boundary lies
        within ``val_fraction * len / 2`` bytes of ``t`` (a huge last file), the split is
        the byte offset ``t`` and that one file appears in both ``train_files`` and
        ``val_files`` (the byte ranges stay disjoint). Tokens are cached as a uint8 ``.npy`` in
        ``cache_dir`` (default :func:`default_cache_dir`), keyed by the Python version, the
        stdlib path, ``max_bytes`` and the file list with sizes; a cache that cannot be
        written is a ``RuntimeWarning``, not an error (``cache_path`` is then ``None``).
        """
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 1):
            raise ValueError(
                f"max_bytes must be an int > 1 or None (whole stdlib), got {max_bytes!r}"
            )
        _check_fraction(val_fraction)
        if isinstance(exclude, str) or not all(isinstance(d, str) for d in exclude):
            raise TypeError(
                f"exclude must be a list of folder names, got {exclude!r}: a str would be read "
                "as its letters; pass e.g. ('test', 'tests')"
            )
        root, listing = _stdlib_files(exclude)
        if not listing:
            raise FileNotFoundError(
                f"no .py files under the stdlib path {root}: this Python ships without its "
                f"source; use Corpus.from_file(path) with any text file instead"
            )
        starts, total, files = [], 0, []
        for name, size in listing:
            if max_bytes is not None and total >= max_bytes:
                break
            starts.append(total)
            files.append(name)
            total += size
        if max_bytes is not None:
            total = min(total, max_bytes)

        version = ".".join(map(str, sys.version_info[:3]))
        key = json.dumps([version, str(root), max_bytes, listing[: len(files)]])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = cache / f"stdlib-py{version}-{max_bytes or 'all'}-{digest}.npy"

        try:
            array = np.load(path) if path.exists() else None
        except (OSError, ValueError, EOFError):  # an unreadable cache file is rebuilt
            array = None
        from_cache = array is not None and array.dtype == np.uint8 and array.shape == (total,)
        if not from_cache:
            data = b"".join((root / name).read_bytes() for name in files)[:total]
            if len(data) != total:
                raise CorpusChangedError(
                    f"stdlib files changed while reading ({len(data)} != {total} bytes), as "
                    "when Python or a package is being installed or upgraded: retry when it "
                    "has finished"
                )
            array = np.frombuffer(data, dtype=np.uint8).copy()
            try:
                _save_atomic(path, array)
            except OSError as exc:  # the cache only saves time: go on without it
                fix = (
                    "pass a writable cache_dir"
                    if cache_dir is not None
                    else "set ADAM_MINI_LAB_CACHE to a writable folder"
                )
                warnings.warn(
                    f"cannot cache the corpus tokens ({exc}); {fix} to keep them between runs",
                    RuntimeWarning,
                    stacklevel=2,
                )
                path = None

        target = int((1 - val_fraction) * total)
        near = [s for s in starts if 0 < s < total and abs(s - target) <= val_fraction * total / 2]
        split = min(near, key=lambda s: abs(s - target)) if near else target
        return cls(
            torch.from_numpy(array),
            split,
            source=f"Python {version} stdlib ({root})",
            files=files,
            file_starts=starts,
            cache_path=path,
            from_cache=from_cache,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike, val_fraction: float = 0.1) -> Corpus:
        """Any text file's bytes (any encoding; a file with NUL bytes is refused as binary); the
        last ``val_fraction`` of them is the validation split."""
        _check_fraction(val_fraction)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"corpus file path must be a str or os.PathLike, got {path!r}")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"corpus file {str(p)!r} does not exist or is not a file: check the path"
            )
        data = p.read_bytes()
        if b"\0" in data:  # what git and grep call binary; text in any 8-bit encoding passes
            raise ValueError(
                f"corpus file {str(p)!r} holds NUL bytes, so it is binary, not text: give a text "
                "file (UTF-16 text: save it as UTF-8)"
            )
        split = int((1 - val_fraction) * len(data))
        if split <= 0 or split >= len(data):
            raise ValueError(
                f"corpus file {str(p)!r} has {len(data)} bytes, too few to split into train and "
                f"validation with val_fraction={val_fraction}: use a longer text file"
            )
        tokens = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        return cls(tokens, split, source=str(p), files=(p.name,), file_starts=(0,))

    def batch(
        self,
        split: Literal["train", "val"],
        batch_size: int,
        context: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``batch_size`` random windows of ``split``: ``x = s[i:i+T]``, ``y = s[i+1:i+T+1]``.

        Start offsets ``i`` are uniform on ``[0, len(split) - T - 1]`` drawn from
        ``generator``. Returns two int64 tensors of shape (batch_size, context).
        """
        data = self._split(split)
        if not (_is_positive_int(batch_size) and _is_positive_int(context)):
            raise ValueError(
                f"batch_size and context must be positive, got {batch_size!r}, {context!r}: "
                "pass ints such as 8 and 64"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
                "e.g. torch.Generator().manual_seed(0)"
            )
        if data.numel() < context + 1:
            raise ValueError(
                f"the {split} split has {data.numel()} bytes, fewer than context + 1 = "
                f"{context + 1}: use a smaller context or a longer corpus"
            )
        starts = torch.randint(0, data.numel() - context, (batch_size,), generator=generator)
        windows = data[starts[:, None] + torch.arange(context + 1)].long()
        return windows[:, :-1], windows[:, 1:]

    def batches(
        self, split: Literal["train", "val"], batch_size: int, context: int, seed: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless :meth:`batch` draws from ``torch.Generator().manual_seed(seed)``."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield self.batch(split, batch_size, context, gen)

    @staticmethod
    def decode(tokens: Tensor) -> str:
        """Bytes back to text (invalid UTF-8 replaced)."""
        return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")

    def _split(self, split: str) -> Tensor:
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def describe(self) -> str:
        """One line: source, sizes of both splits (bytes, files)."""
        files = (
            f", files {len(self.train_files)} + {len(self.val_files)}"
            if len(self.files) > 1
            else ""
        )
        return (
            f"Corpus({self.source}: {self.tokens.numel():,} bytes, train {self.train.numel():,}"
            f" + val {self.val.numel():,}{files}, vocab {self.vocab_size})"
        )

    __repr__ = describe


def _is_positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _check_fraction(val_fraction: float) -> None:
    number = isinstance(val_fraction, numbers.Real) and not isinstance(val_fraction, bool)
    if not (number and 0 < val_fraction < 1):
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
