"""Block layouts of local shards agree with ``TensorBlocks.local_index()`` (property test)."""

from __future__ import annotations

import pytest
import torch

from optimizer.kernels import apply_update_, block_sumsq
from optimizer.layout import layout_of
from partition import TensorBlocks


def fused(name: str, sections: list[int], orientation: str) -> TensorBlocks:
    """A fused q|k|v tensor of ``head_dim`` 2 and width 3: ``sections`` rows or columns."""
    n = sum(sections)
    shape = (n, 3) if orientation == "rows" else (3, n)
    params = {"head_dim": 2, "sections": sections, "orientation": orientation}
    return TensorBlocks(name, shape, "fused_heads", params)


ZOO = [
    TensorBlocks("norm", (7,), "tensor", {}),
    TensorBlocks("emb", (9, 6), "rows", {}),
    TensorBlocks("q", (12, 5), "heads", {"head_dim": 4}),
    TensorBlocks("qb", (12,), "heads", {"head_dim": 3}),
    TensorBlocks("conv", (6, 3, 2, 2), "rows", {}),
    TensorBlocks("cols", (5, 7), "columns", {}),
    fused("qkv_r", [4, 4, 6], "rows"),
    fused("qkv_c", [4, 4, 6], "columns"),
    TensorBlocks("groups", (6, 3), "row_groups", {"groups": [1, 0, 1, 2, 0, 2]}),
    # empty sections: GPT-2 cross-attention's q_attn (q only) and c_attn (k|v only), Conv1D
    fused("q_c", [6, 0, 0], "columns"),
    fused("kv_c", [0, 4, 6], "columns"),
    fused("kv_r", [0, 4, 6], "rows"),
]


@pytest.mark.parametrize("blocks", ZOO, ids=lambda b: b.name)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_layout_matches_local_index(blocks, world):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(blocks.shape, generator=gen, dtype=torch.float64)
    index = blocks.local_index()
    full = layout_of(blocks)
    sizes = torch.bincount(index.reshape(-1), minlength=blocks.num_blocks).double()
    torch.testing.assert_close(full.block_sizes, sizes)
    total = torch.zeros(blocks.num_blocks, dtype=torch.float64)
    for rows in torch.arange(blocks.shape[0]).chunk(world):
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        layout = layout_of(blocks, lo, hi)
        local_g, local_idx = g[lo:hi], index[lo:hi].reshape(-1)
        expect = torch.zeros(blocks.num_blocks, dtype=torch.float64).index_add_(
            0, local_idx, local_g.reshape(-1) ** 2
        )
        v_lo, v_hi = layout.v_range
        got = block_sumsq(local_g, layout)
        torch.testing.assert_close(got, expect[v_lo:v_hi], rtol=1e-13, atol=0)
        total[v_lo:v_hi] += got  # what the all-reduce adds up
        whole = torch.bincount(local_idx, minlength=blocks.num_blocks)
        if ((whole > 0) & (whole < sizes)).any():  # a block only partly on this rank
            assert layout.reduce_sums and not layout.local_v
        scale = torch.arange(v_lo, v_hi, dtype=torch.float64) + 1.0
        p = torch.zeros_like(local_g)
        apply_update_(p, torch.ones_like(local_g), scale, layout)
        torch.testing.assert_close(p, (local_idx.double() + 1.0).view_as(p))
    torch.testing.assert_close(
        total, torch.zeros_like(total).index_add_(0, index.reshape(-1), g.reshape(-1) ** 2)
    )
