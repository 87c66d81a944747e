"""Errors and warnings raised by :mod:`partition`."""

from __future__ import annotations


class PartitionError(ValueError):
    """A partition is invalid, does not fit a model, or a partition file is malformed.

    The message always names the tensor (or file) and says how to fix it.
    """


class PartitionWarning(UserWarning):
    """A rule fell back to a default (for instance an unrecognized tensor got one block)."""
