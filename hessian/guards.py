"""Checks that the Hessian is well-defined: no active dropout/BatchNorm, a finite real scalar loss
that is a fixed function of the parameters, and the same batches on every pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hessian.errors import HessianError, NonDeterministicError
from hessian.messages import describe_batch, first_line, tensor_kinds

_SAME_BATCHES_FIX = (
    "the Hessian needs the same batches on every pass: use a fixed list of batches or a "
    "DataLoader with shuffle=False (or pass check_determinism=False)"
)


# words of torch's errors for shapes that do not fit (matmul, broadcasting, views, convolutions)
_SHAPE_WORDS = (
    "shapes cannot be multiplied",
    "must match the size",
    "size mismatch",
    "shape '[",
    "expected input",
)


def check_modules(model: nn.Module) -> None:
    """A NonDeterministicError naming the dropout (p > 0) and BatchNorm modules in train mode."""
    bad = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            bad.append(f"{name or type(m).__name__} ({type(m).__name__}, p={m.p})")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            bad.append(f"{name or type(m).__name__} ({type(m).__name__})")
    if bad:
        raise NonDeterministicError(
            f"the model is in train mode with active dropout/BatchNorm: {', '.join(bad[:5])}"
            + (" ..." if len(bad) > 5 else "")
            + ". Call model.eval() first, or pass check_determinism=False if this is intended"
        )


def batch_changed_error(i: int) -> NonDeterministicError:
    """Batch ``i`` differs from the previous pass over the data."""
    return NonDeterministicError(
        f"batch {i} differs from the previous pass over the data (shuffled?); " + _SAME_BATCHES_FIX
    )


def batch_count_error(count: int, before: int) -> NonDeterministicError:
    """This pass over the data gave ``count`` batches, the previous one ``before``."""
    return NonDeterministicError(
        f"the data gave {count} batches on this pass but {before} before; " + _SAME_BATCHES_FIX
    )


def check_loss(
    f: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: dict[str, torch.Tensor],
    batch: Any,
    deterministic: bool,
) -> None:
    """``f(params)``, the loss of ``batch``, is a finite real scalar that depends on ``params``
    (of one dtype and device); with ``deterministic`` it is also the same on a second evaluation
    (no stochastic layers outside ``nn.Dropout``)."""
    leaves = {n: t.requires_grad_(True) for n, t in params.items()}
    try:
        with torch.enable_grad():
            a = f(leaves)
    except TypeError as err:
        raise HessianError(
            f"loss_fn failed on the first batch: {first_line(err)}. That batch is "
            f"{describe_batch(batch)}. A tuple or list of tensors is read as one batch (e.g. "
            "(x, y)); pass several batches as a list of such tuples, or a DataLoader"
        ) from err
    except IndexError as err:
        raise HessianError(
            f"loss_fn failed on the first batch: {first_line(err).rstrip('.')}. That batch is "
            f"{describe_batch(batch)}: an index in it is out of range for the model; class "
            "targets must lie in [0, num_classes) and token ids in [0, vocab_size)"
        ) from err
    except RuntimeError as err:
        msg = str(err).lower()
        if any(w in msg for w in _SHAPE_WORDS):
            raise HessianError(
                f"loss_fn failed on the first batch: {first_line(err)}. That batch is "
                f"{describe_batch(batch)}: its shapes do not fit the model (input width, "
                "sequence length); check that loss_fn(model, batch) runs outside the operator"
            ) from err
        if "dtype" not in msg and "device" not in msg and "scalar type" not in msg:
            raise
        index = any(w in msg for w in ("index", "indices", "target")) and (
            "long" in msg or "int64" in msg
        )
        raise HessianError(
            f"loss_fn failed on the first batch: {first_line(err)}. The "
            f"differentiated parameters are {tensor_kinds(params)}, the batch holds "
            f"{tensor_kinds(batch)}: "
            + (
                "token ids, class targets and other indices must stay integer (torch.long); "
                "give only the floating-point tensors the model's dtype"
                if index
                else "give the batch the model's dtype and device (e.g. model.double() with a "
                "float64 batch, or batch.to(device))"
            )
        ) from err
    if not isinstance(a, torch.Tensor) or a.ndim != 0 or not a.is_floating_point():
        got = (
            f"{a.dtype} of shape {tuple(a.shape)}"
            if isinstance(a, torch.Tensor)
            else type(a).__name__
        )
        raise HessianError(
            f"loss_fn must return the batch's mean loss as a real scalar (0-d) tensor, got {got}: "
            "reduce it (e.g. .mean(), not reduction='none'; .squeeze() a shape (1,))"
        )
    if not a.requires_grad:
        raise HessianError(
            "loss_fn returned a loss that does not depend on the differentiated parameters "
            "(detached, .item(), or computed under torch.no_grad()?): return the loss tensor "
            "itself, and check params= names the parameters the loss uses"
        )
    if not bool(torch.isfinite(a)):
        raise HessianError(
            f"the loss is {a.item()} at these parameters: the Hessian is undefined there. "
            "Check the model's weights and the batch for NaN/Inf (e.g. after a diverged run)"
        )
    if not deterministic:
        return
    with torch.no_grad():
        b = f(leaves)
    if not torch.allclose(a.detach(), b, rtol=1e-6, atol=0.0):
        raise NonDeterministicError(
            f"the loss changed between two evaluations on the same batch ({a.item():.6g} vs "
            f"{b.item():.6g}): the model is stochastic (functional dropout in train mode?). "
            "Call model.eval(), or pass check_determinism=False if this is intended"
        )
