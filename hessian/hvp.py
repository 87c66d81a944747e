r"""Hessian-vector products of a scalar function of a dict of tensors, in two modes.

For :math:`f(\theta)` and a tangent :math:`v`, both modes return :math:`H v = \nabla^2 f(\theta) v`:

* ``"forward"`` (forward-over-reverse): :math:`Hv = \frac{d}{dt} \nabla f(\theta + t v)|_{t=0}`,
  ``torch.func.jvp`` of ``torch.func.grad``. Many vectors at once: ``torch.func.vmap`` over the
  tangent, so the primal forward and backward are shared.
* ``"reverse"`` (reverse-over-reverse, double backward): :math:`Hv = \nabla_\theta
  \langle \nabla f(\theta), v\rangle`, ``torch.autograd.grad`` with ``create_graph=True`` and a
  second ``torch.autograd.grad``. Many vectors at once: one forward and one first backward, then
  one second backward per vector on the retained graph (measured faster on CPU than
  ``is_grads_batched=True``, which vmaps the second backward).

Both are built on ``grad``, never on ``torch.func.jacrev``: differentiating ``jacrev`` again gives
a wrong Hessian through the native LayerNorm (see DESIGN.md, "Pitfalls").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.func import grad, jvp, vmap

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params], torch.Tensor]


def hvp_forward(f: LossFn, params: Params, tangents: Params, batched: bool) -> Params:
    """``H @ v`` by ``jvp(grad(f))``; with ``batched`` the tangents carry a leading vector axis."""

    def one(t: Params) -> Params:
        return jvp(grad(f), (params,), (t,))[1]

    if not batched:
        return one(tangents)
    try:
        return vmap(one)(tangents)
    except (RuntimeError, NotImplementedError) as err:
        if is_forward_ad_error(err):
            raise
        _warn_loop("forward", err)
        k = next(iter(tangents.values())).shape[0]
        outs = [one({n: t[i] for n, t in tangents.items()}) for i in range(k)]
        return {n: torch.stack([o[n] for o in outs]) for n in params}


def hvp_reverse(f: LossFn, params: Params, tangents: Params, batched: bool) -> Params:
    """``H @ v`` by double backward; with ``batched`` the tangents carry a leading vector axis."""
    names = list(params)
    leaves = [params[n].detach().requires_grad_(True) for n in names]
    with torch.enable_grad():
        loss = f(dict(zip(names, leaves, strict=True)))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        # Entries whose gradient does not depend on the parameters have a zero Hessian row.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        hv: list[torch.Tensor | None] = [None] * len(names)
        if live:
            gl = [grads[i] for i in live]
            tl = [tangents[names[i]] for i in live]
            if not batched:
                hv = list(torch.autograd.grad(gl, leaves, grad_outputs=tl, allow_unused=True))
            else:
                k = tl[0].shape[0]
                cols = [
                    torch.autograd.grad(
                        gl,
                        leaves,
                        grad_outputs=[t[i] for t in tl],
                        allow_unused=True,
                        retain_graph=i < k - 1,
                    )
                    for i in range(k)
                ]
                hv = [
                    None if cols[0][j] is None else torch.stack([c[j] for c in cols])
                    for j in range(len(leaves))
                ]
    return {
        n: torch.zeros_like(tangents[n]) if h is None else h for n, h in zip(names, hv, strict=True)
    }


def is_forward_ad_error(err: BaseException) -> bool:
    """True when ``err`` says that an operation has no forward-mode (jvp) rule."""
    msg = str(err).lower()
    return "forward ad" in msg or "forward-mode" in msg or ("jvp" in msg and "not" in msg)


_warned: set[str] = set()


def _warn_loop(mode: str, err: BaseException) -> None:
    if mode in _warned:
        return
    _warned.add(mode)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    warnings.warn(
        f"matmat in {mode!r} mode could not batch the vectors ({first}); falling back to a loop "
        "over vectors, which is correct but slower per vector",
        RuntimeWarning,
        stacklevel=3,
    )
