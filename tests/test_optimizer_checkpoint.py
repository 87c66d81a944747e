"""optimizer.load_checkpoint in one process (the FSDP2 case is in test_optimizer_distributed)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import optimizer
import partition

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def stepped_optimizer(part_fn=partition.by_rows) -> tuple[nn.Module, optimizer.AdamMini]:
    """Three steps on a 2-layer MLP whose last bias never gets a gradient (so has no state)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = optimizer.AdamMini(model.named_parameters(), part_fn(model), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
        model[2].bias.grad = None
        opt.step()
    return model, opt


def test_round_trip_is_bitwise_and_keeps_unstepped_tensors_stateless(tmp_path):
    model, opt = stepped_optimizer()
    dcp.save({"optim": opt.state_dict()}, checkpoint_id=tmp_path)
    fresh = optimizer.AdamMini(model.named_parameters(), partition.by_rows(model), lr=0.1)
    optimizer.load_checkpoint(fresh, tmp_path)
    assert model[2].bias not in fresh.state or not fresh.state[model[2].bias]
    saved, loaded = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert saved.keys() == loaded.keys() and len(saved) == 3
    for i, s in saved.items():
        for k, t in s.items():
            assert torch.equal(loaded[i][k], t), (i, k)


def test_another_partition_names_the_tensor(tmp_path):
    model, opt = stepped_optimizer()
    dcp.save({"optim": opt.state_dict()}, checkpoint_id=tmp_path)
    other = optimizer.AdamMini(model.named_parameters(), partition.by_tensor(model))
    with pytest.raises(partition.PartitionError, match=r"'0\.weight' has exp_avg .* \(5,\)"):
        optimizer.load_checkpoint(other, tmp_path)
    assert not other.state  # nothing loaded half-way


def test_bad_paths_keys_and_parameter_lists(tmp_path):
    model, opt = stepped_optimizer()
    with pytest.raises(FileNotFoundError, match="no torch.distributed.checkpoint"):
        optimizer.load_checkpoint(opt, tmp_path / "missing")
    dcp.save({"optim": opt.state_dict()}, checkpoint_id=tmp_path)
    with pytest.raises(ValueError, match=r"nothing saved under 'opt'.*\['optim'\]"):
        optimizer.load_checkpoint(opt, tmp_path, key="opt")
    first = list(model.named_parameters())[:2]
    fewer = optimizer.AdamMini(first, partition.by_rows(first))
    with pytest.raises(ValueError, match="has 1 group.* and 2 tensors"):
        optimizer.load_checkpoint(fewer, tmp_path)
    with pytest.raises(TypeError, match="takes an AdamMini"):
        optimizer.load_checkpoint(torch.optim.AdamW(model.parameters()), tmp_path)
