"""``torch.compile`` of a whole training step with AdamMini (slow: run with ADAM_MINI_LAB_SLOW=1).

The optimizer step runs eagerly inside the compiled function (``torch.compiler.disable``
on its body: a graph break), the model's forward and backward are compiled.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import optimizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("ADAM_MINI_LAB_SLOW") != "1", reason="slow: set ADAM_MINI_LAB_SLOW=1"
    ),
]


def make() -> tuple[nn.Module, optimizer.AdamMini]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    return model, optimizer.AdamMini(model.named_parameters(), lr=1e-2, weight_decay=0.1, n_heads=1)


@pytest.mark.filterwarnings("ignore::partition.PartitionWarning")
def test_compiled_training_step_matches_eager():
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def step(model, opt):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    eager, opt_e = make()
    compiled, opt_c = make()
    compiled_step = torch.compile(step)
    for _ in range(3):
        step(eager, opt_e)
        compiled_step(compiled, opt_c)
    for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert opt_c.state[compiled[0].weight]["step"].item() == 3
