r"""The Adam-mini update, written twice: a readable reference and the eager fast path.

For a tensor with blocks :math:`b` (entries :math:`i \in b`), at step :math:`t`:

.. math::

    m &\leftarrow \beta_1 m + (1-\beta_1) g                       \\
    v_b &\leftarrow \beta_2 v_b + (1-\beta_2)\,\tfrac{1}{|b|}\textstyle\sum_{i\in b} g_i^2 \\
    p_i &\leftarrow p_i (1 - \eta\lambda)
          - \eta\, \frac{m_i / (1-\beta_1^t)}{\sqrt{v_{b(i)} / (1-\beta_2^t)} + \epsilon}

computed in the order of ``torch.optim.AdamW`` (``m.lerp_``, ``sqrt(v) / sqrt(bc2) + eps``,
decay ``p *= 1 - lr * wd`` before the update). ``elements`` tensors (one block per
entry) run :func:`adamw_update_`, the op sequence of PyTorch's single-tensor AdamW,
so ``partition.elements(model)`` reproduces ``torch.optim.AdamW`` bit for bit.

* :func:`reference_update_` — one tensor, block sums by ``index_add_`` over
  ``TensorBlocks.local_index()``; independent of :mod:`optimizer.layout`. Tests
  hold the fast paths against it.
* :func:`block_sumsq` / :func:`apply_update_` — the eager fast path on strided views
  (:class:`optimizer.layout.BlockLayout`): no index tensors, one scalar per block
  broadcast with ``expand``-style views, no temporary larger than the parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from optimizer.layout import BlockLayout, run_scale_view, run_sumsq, run_view


@dataclass(frozen=True)
class Hyper:
    """The scalars of one step of one tensor (bias corrections already folded in)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: float  # the step number t after increment

    @property
    def bias_correction1(self) -> float:
        """``1 - beta1^t``."""
        return 1 - self.beta1**self.step

    @property
    def bias_correction2_sqrt(self) -> float:
        """``sqrt(1 - beta2^t)``."""
        return (1 - self.beta2**self.step) ** 0.5

    @property
    def step_size(self) -> float:
        """``lr / (1 - beta1^t)``."""
        return self.lr / self.bias_correction1


def adamw_update_(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, h: Hyper
) -> None:
    """AdamW on one tensor, in the exact op order of ``torch.optim.adamw`` (single tensor)."""
    if h.weight_decay != 0:
        p.mul_(1 - h.lr * h.weight_decay)
    m.lerp_(g, 1 - h.beta1)
    v.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
    denom = (v.sqrt() / h.bias_correction2_sqrt).add_(h.eps)
    p.addcdiv_(m, denom, value=-h.step_size)


def block_scale(v: torch.Tensor, h: Hyper) -> torch.Tensor:
    r"""Per-block multiplier of ``m``: :math:`-\eta/(1-\beta_1^t) / (\sqrt{v_b}/\sqrt{1-\beta_2^t} + \epsilon)`."""
    denom = (v.sqrt() / h.bias_correction2_sqrt).add_(h.eps)
    return torch.reciprocal(denom).mul_(-h.step_size)


def decay_and_update_moments_(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    mean_sq: torch.Tensor,
    h: Hyper,
) -> None:
    """``v <- b2 v + (1-b2) mean_sq``, weight decay of ``p`` and ``m <- lerp(m, g, 1-b1)``."""
    v.mul_(h.beta2).add_(mean_sq.to(v.dtype), alpha=1 - h.beta2)
    if h.weight_decay != 0:
        p.mul_(1 - h.lr * h.weight_decay)
    m.lerp_(g.to(m.dtype), 1 - h.beta1)


def reference_update_(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    h: Hyper,
) -> None:
    """Readable Adam-mini step of one unsharded tensor.

    Args:
        p, g, m: parameter, gradient and momentum (same shape).
        v: ``(num_blocks,)`` second moment per block.
        index: LongTensor in ``p``'s shape, the block of every entry
            (``TensorBlocks.local_index()``).
        h: the step's scalars.
    """
    flat = index.reshape(-1)
    acc = v.dtype
    sums = torch.zeros(v.numel(), dtype=acc).index_add_(0, flat, g.reshape(-1).to(acc) ** 2)
    sizes = torch.bincount(flat, minlength=v.numel()).to(acc)
    decay_and_update_moments_(p, g, m, v, sums / sizes, h)
    scale = block_scale(v, h)
    p.addcmul_(m, scale[flat].view_as(p))


def block_sumsq(g: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Sum of squares of ``g`` over every block this rank touches.

    Returns a float32 (float64 for float64 ``g``) vector over the blocks in
    ``layout.v_range`` (zeros for blocks with no local entry).
    """
    lo, hi = layout.v_range
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    out = torch.zeros(hi - lo, dtype=acc, device=g.device)
    if layout.row_ids is not None:
        rows = g.reshape(g.shape[0], math.prod(g.shape[1:]))  # -1 is ambiguous for 0 rows
        row_sums = torch.linalg.vector_norm(rows, dim=1, dtype=acc).square_()
        out.index_add_(0, layout.row_ids.to(g.device), row_sums)
        return out
    for run in layout.runs:
        a = run.block_start - lo
        out[a : a + run.n] += run_sumsq(g, run)
    return out


def apply_update_(
    p: torch.Tensor, m: torch.Tensor, scale: torch.Tensor, layout: BlockLayout
) -> None:
    """``p += m * scale[block]`` for every local entry, through broadcast views.

    ``scale`` is cast to ``p``'s dtype (a same-dtype ``addcmul_`` is 4-7x faster on the CPU
    than a mixed one), except for float16 ``p``: there it keeps v's float32, since ``lr / eps``
    (1e5 for a block with no gradient yet) would overflow float16 (max 65504) and ``0 * inf``
    make the block NaN. bfloat16 has float32's range.

    A non-contiguous ``p`` (a transposed or channels-last parameter) has no flat view: the
    update runs on a contiguous copy, written back.
    """
    if not p.is_contiguous():
        work = p.contiguous()
        apply_update_(work, m, scale, layout)
        p.copy_(work)
        return
    if p.dtype != torch.float16:
        scale = scale.to(p.dtype)
    lo, _ = layout.v_range
    if layout.row_ids is not None:
        s = scale[layout.row_ids.to(p.device) - lo]
        rows = (p.shape[0], math.prod(p.shape[1:]))
        p.view(rows).addcmul_(m.view(rows).to(p.dtype), s.view(-1, 1))
        return
    shifted = scale if lo == 0 else torch.nn.functional.pad(scale, (lo, 0))
    for run in layout.runs:
        run_view(p, run).addcmul_(run_view(m, run).to(p.dtype), run_scale_view(shifted, run))


def mean_square(sums: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``sums / |b|`` with the FULL block sizes (also right for blocks cut by a shard)."""
    lo, hi = layout.v_range
    sizes = layout.block_sizes[lo:hi].clamp_min(1)  # an empty tensor's block: mean 0, not 0/0
    return sums / sizes.to(device=sums.device, dtype=sums.dtype)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The fused kernel's 32-bit integer hash, on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF  # int64 products wrap; the low 32 bits are exact
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def stochastic_round_to_bf16(x: torch.Tensor, key: int, offset: int = 0) -> torch.Tensor:
    """Round float32 ``x`` to bfloat16, up or down with probability by distance (unbiased).

    Adds 16 random bits below the bf16 mantissa to the float32 bit pattern and truncates:
    ``E[round(x)] = x``. The bits are the fused kernel's counter-based hash of ``(key, i)``
    with ``i = offset +`` the flat index, so a tensor rounds the same whole or sharded
    (``offset``: the global flat index of this shard's first entry).
    """
    bits = x.contiguous().view(torch.int32)
    idx = (torch.arange(x.numel(), device=x.device) + offset) & 0xFFFFFFFF
    salt = _mix32(torch.tensor(key & 0xFFFFFFFF, device=x.device))
    noise = (_mix32(idx ^ salt) & 0xFFFF).to(torch.int32).view(x.shape)
    rounded = (bits + noise) & -65536  # clear the 16 low bits
    out = rounded.view(torch.float32)
    out = torch.where(torch.isfinite(x), out, x)  # keep inf/nan, never round past them
    return out.to(torch.bfloat16)


def lowp_momentum_(
    m: torch.Tensor, g: torch.Tensor, beta1: float, key: int, offset: int = 0
) -> torch.Tensor:
    """bf16 momentum step with stochastic rounding; returns the fp32 momentum used this step."""
    m32 = m.float().lerp_(g.float(), 1 - beta1)
    m.copy_(stochastic_round_to_bf16(m32, key, offset))
    return m32
