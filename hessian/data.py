"""Batches for the Hessian operator: what counts as one batch, sample counts, fingerprints.

``data`` is either one batch or an iterable of batches. A batch is a tensor, a mapping of
tensors (a dict, or transformers' ``BatchEncoding``), or a tuple/list whose items are all tensors
(``(inputs, targets)``). Anything else that is iterable (a list of batches, a ``DataLoader``, a
generator) is an iterable of batches, also a tuple that mixes tensors with other items
(``(x, None)``): when one of its items cannot be counted as a batch, the error names that likely
mistake. A one-shot iterator (a generator) is read once into a list, since the Hessian needs many
passes. A map-style ``Dataset`` holds samples, not batches: it is refused with the fix, a
``DataLoader``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from hessian.linop import as_int


def is_single_batch(data: Any) -> bool:
    """True when ``data`` is one batch rather than an iterable of batches."""
    if isinstance(data, (torch.Tensor, Mapping)):
        return True
    if isinstance(data, (tuple, list)):
        return len(data) > 0 and all(isinstance(x, torch.Tensor) for x in data)
    return not isinstance(data, Iterable)


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor found in ``batch`` (depth first), or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for x in batch:
            t = first_tensor(x)
            if t is not None:
                return t
    return None


def sample_count(batch: Any, batch_size_fn: Callable[[Any], int] | None) -> int:
    """Samples in ``batch``: ``batch_size_fn(batch)`` (an int >= 0) or the leading size of its
    first tensor."""
    if batch_size_fn is not None:
        count = batch_size_fn(batch)
        number = as_int(count, 0)
        if number is None:
            raise ValueError(
                f"batch_size_fn must return the number of samples in the batch, an int >= 0, "
                f"got {count!r}: the batch weights n_b / N need whole counts"
            )
        return number
    t = first_tensor(batch)
    if t is None or t.ndim == 0:
        raise ValueError(
            f"cannot tell how many samples a batch of type {type(batch).__name__} holds: "
            "pass batch_size_fn=lambda batch: <number of samples>"
        )
    return int(t.shape[0])


def fingerprint(batch: Any) -> str:
    """A hash of every tensor in ``batch`` (values, shapes, dtypes), to detect reordering."""
    h = hashlib.blake2b(digest_size=16)

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(repr((tuple(x.shape), str(x.dtype))).encode())
            h.update(
                x.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            )
        elif isinstance(x, Mapping):
            for k in x:
                h.update(repr(k).encode())
                visit(x[k])
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)
        else:
            h.update(repr(x).encode())

    visit(batch)
    return h.hexdigest()


class Batches:
    """A re-iterable view of ``data`` as a sequence of batches."""

    def __init__(self, data: Any):
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, Iterable):
            raise ValueError(
                f"data is a {type(data).__name__}, a Dataset of samples, not a batch or an "
                "iterable of batches: pass DataLoader(dataset, batch_size=..., shuffle=False)"
            )
        # a tuple/list mixing tensors with other items, e.g. (x, None): read as batches, but
        # most likely one batch with a non-tensor item (named if a batch cannot be counted)
        self.mixed = (
            data
            if isinstance(data, (tuple, list))
            and any(isinstance(x, torch.Tensor) for x in data)
            and not is_single_batch(data)
            else None
        )
        if is_single_batch(data):
            self._source: Any = [data]
        elif isinstance(data, Iterator):
            self._source = list(data)
        else:
            self._source = data
        self.is_fixed = isinstance(self._source, (list, tuple))

    def __iter__(self) -> Iterator[Any]:
        return iter(self._source)
