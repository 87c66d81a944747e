r"""Hessian-vector products of a scalar function of a dict of tensors, in two modes.

For :math:`f(\theta)` and a tangent :math:`v`, both modes return :math:`H v = \nabla^2 f(\theta) v`:

* ``"forward"`` (forward-over-reverse): :math:`Hv = \frac{d}{dt} \nabla f(\theta + t v)|_{t=0}`,
  ``torch.func.jvp`` of ``torch.func.grad``. Many vectors at once: ``torch.func.vmap`` over the
  tangent, so the primal forward and backward are shared.
* ``"reverse"`` (reverse-over-reverse, double backward): :math:`Hv = \nabla_\theta
  \langle \nabla f(\theta), v\rangle`, ``torch.autograd.grad`` with ``create_graph=True`` and a
  second ``torch.autograd.grad``. Many vectors at once: one forward and one first backward, then
  one second backward per vector on the retained graph. ``is_grads_batched=True``, which vmaps the
  second backward, measured 2.5x slower per vector on GPT-2 (width 128, vocab 2048; still 1.3x
  with glibc's mmap threshold raised, which removes its page faults) and only 14% faster on the
  smaller TinyGPT, so the loop stays.

Both are built on ``grad``, never on ``torch.func.jacrev``: differentiating ``jacrev`` again gives
a wrong Hessian through the native LayerNorm (see DESIGN.md, "Pitfalls").

:func:`prepare_reverse` splits a reverse product into its primal part (forward and first backward),
which depends only on :math:`\theta` and the batch, and its second-order part, which is linear in
:math:`v`: it keeps the first backward's graph and returns :math:`v \mapsto Hv`, one second
backward each (about 2 gradients of matmul work instead of 3). There is no forward counterpart:
``torch.func.linearize`` of ``grad(f)`` would be one, but in torch 2.13 its constant folding
returns wrong, call-dependent products when the traced graph holds in-place operations (measured:
``binary_cross_entropy_with_logits`` gives a different Hessian column on every call). Nor does
the kept graph compile: compiled autograd (``torch._dynamo.compiled_autograd``) of the second
backward fails in torch 2.13 on GPT-2 (a None gradient reaches an ``add`` in its traced graph).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.func import grad, jvp, vmap

from hessian.messages import first_line, user_stacklevel

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params], torch.Tensor]
Product = Callable[[Params, bool], Params]


def forward_product(f: LossFn, params: Params, tangents: Params, batched: bool) -> Params:
    """``H @ v`` by ``jvp(grad(f))`` (``vmap`` over a leading vector axis with ``batched``), with
    no fallback: the traceable core that ``torch.compile`` takes."""

    def one(t: Params) -> Params:
        return jvp(grad(f), (params,), (t,))[1]

    return vmap(one)(tangents) if batched else one(tangents)


def hvp_forward(f: LossFn, params: Params, tangents: Params, batched: bool) -> Params:
    """``H @ v`` by ``jvp(grad(f))``; with ``batched`` the tangents carry a leading vector axis,
    and a model that ``vmap`` cannot batch falls back to a loop over the vectors."""

    def one(t: Params) -> Params:
        return forward_product(f, params, t, False)

    if not batched:
        return one(tangents)
    try:
        return forward_product(f, params, tangents, True)
    except (RuntimeError, NotImplementedError) as err:
        if is_forward_ad_error(err):
            raise
        _warn_loop("forward", err)
        return _loop(one, tangents)


def hvp_reverse(f: LossFn, params: Params, tangents: Params, batched: bool) -> Params:
    """``H @ v`` by double backward; with ``batched`` the tangents carry a leading vector axis."""
    return prepare_reverse(f, params)(tangents, batched)


def prepare_reverse(f: LossFn, params: Params) -> Product:
    """Double backward on a kept first-backward graph: each product is one second backward."""
    names = list(params)
    leaves = [params[n].detach().requires_grad_(True) for n in names]
    with torch.enable_grad():
        loss = f(dict(zip(names, leaves, strict=True)))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    # Entries whose gradient does not depend on the parameters have a zero Hessian row.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    live_grads = [grads[i] for i in live]

    def one(tangents: Params) -> Params:
        hv: list[torch.Tensor | None] = [None] * len(names)
        if live:
            with torch.enable_grad():
                hv = list(
                    torch.autograd.grad(
                        live_grads,
                        leaves,
                        grad_outputs=[tangents[names[i]] for i in live],
                        allow_unused=True,
                        retain_graph=True,
                    )
                )
        return {
            n: torch.zeros_like(tangents[n]) if h is None else h
            for n, h in zip(names, hv, strict=True)
        }

    def product(tangents: Params, batched: bool) -> Params:
        return _loop(one, tangents) if batched else one(tangents)

    return product


def is_forward_ad_error(err: BaseException) -> bool:
    """True when ``err`` says that an operation has no forward-mode (jvp) rule."""
    msg = str(err).lower()
    if "(vjp, jvp, grad, etc)" in msg:  # torch.func's generic transform error (e.g. in-place)
        return False
    return "forward ad" in msg or "forward-mode" in msg or ("jvp" in msg and "not" in msg)


def is_double_backward_error(err: BaseException) -> bool:
    """True when ``err`` says that a backward operation has no derivative (no double backward)."""
    msg = str(err).lower()
    return "derivative for" in msg and "not implemented" in msg


def _loop(one: Callable[[Params], Params], tangents: Params) -> Params:
    """``one`` applied to each vector of a batched dict, stacked back along the leading axis."""
    k = next(iter(tangents.values())).shape[0]
    outs = [one({n: t[i] for n, t in tangents.items()}) for i in range(k)]
    return {n: torch.stack([o[n] for o in outs]) for n in tangents}


_warned: set[str] = set()


def _warn_loop(mode: str, err: BaseException) -> None:
    if mode in _warned:
        return
    _warned.add(mode)
    warnings.warn(
        f"matmat in {mode!r} mode could not batch the vectors ({first_line(err)}); falling back to a loop "
        "over vectors, which is correct but slower per vector",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )
