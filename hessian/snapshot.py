"""What a kept first-backward graph depends on, to tell when it has gone stale.

A kept graph (``HessianOperator(cache=...)``) holds the primal values of one pass: it is the
Hessian at the parameters, buffers, train/eval flags and batches of the moment it was built.
:class:`Snapshot` records those by value (copies of the tensors, a hash of each batch), so a
change by any route is seen: an optimizer step, ``load_state_dict``, a fused kernel that writes
through a raw pointer without bumping the version counter, ``p.data``, ``model.train()`` or a
batch tensor changed in place. Checking costs one read of the model's tensors, far less than a
Hessian-vector product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hessian.data import fingerprint


@dataclass(frozen=True)
class Snapshot:
    """Copies of a model's parameters and buffers, its modules' ``training`` flags and batch hashes."""

    tensors: tuple[torch.Tensor, ...]
    training: tuple[bool, ...]
    batches: tuple[str, ...]

    @classmethod
    def take(cls, model: nn.Module, batches: list[Any]) -> Snapshot:
        """Record ``model`` and ``batches`` now."""
        tensors, training = _state(model)
        return cls(
            tuple(t.detach().clone() for t in tensors),
            training,
            tuple(fingerprint(b) for b in batches),
        )

    def matches(self, model: nn.Module, batches: list[Any]) -> bool:
        """True when ``model`` and ``batches`` hold exactly the recorded values."""
        tensors, training = _state(model)
        return (
            training == self.training
            and len(tensors) == len(self.tensors)
            and all(
                a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                for a, b in zip(tensors, self.tensors, strict=True)
            )
            and tuple(fingerprint(b) for b in batches) == self.batches
        )


def _state(model: nn.Module) -> tuple[list[torch.Tensor], tuple[bool, ...]]:
    """Every module's own parameters and buffers (shared ones once), and its ``training`` flag,
    in one walk over the modules."""
    tensors: dict[int, torch.Tensor] = {}
    training = []
    for module in model.modules():
        training.append(module.training)
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None:
                tensors.setdefault(id(t), t)
    return list(tensors.values()), tuple(training)
