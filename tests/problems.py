"""Small float64 problems shared by several test modules."""

import torch

from lab.models import TinyGPT, TinyGPTConfig


def tiny_gpt_problem(seed: int = 0, vocab_size: int = 11, context: int = 4, batch: int = 3):
    """A one-layer float64 TinyGPT with GQA (2 heads, 1 kv head) and one random batch.

    ``init_std=0.3`` makes the curvature of every tensor large enough to compare at 1e-10.
    Returns ``(model, (x, y))``.
    """
    cfg = TinyGPTConfig(
        vocab_size=vocab_size,
        context=context,
        n_layer=1,
        d_model=8,
        n_heads=2,
        n_kv_heads=1,
        d_ff=16,
        init_std=0.3,
    )
    model = TinyGPT(cfg, seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (batch, context), generator=g)
    y = torch.randint(0, vocab_size, (batch, context), generator=g)
    return model, (x, y)
