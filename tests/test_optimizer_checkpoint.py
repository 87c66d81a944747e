"""optimizer.load_checkpoint in one process (the FSDP2 case is in test_optimizer_distributed)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import optimizer
import partition
from partition import Partition, TensorBlocks

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


def test_a_checkpoint_in_torch_optims_older_format_loads_by_position(tmp_path):
    """Saved without the groups' param_names (torch < 2.6) nor AdamMini's block records: the
    tensors are matched by position, as torch.optim matches them."""
    model, opt = stepped_optimizer()
    state_dict = opt.state_dict()
    del state_dict["blocks"]
    for group in state_dict["param_groups"]:
        del group["param_names"]
    dcp.save({"optim": state_dict}, checkpoint_id=tmp_path)
    fresh = optimizer.AdamMini(model.named_parameters(), partition.by_rows(model), lr=0.1)
    optimizer.load_checkpoint(fresh, tmp_path)
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
    with pytest.raises(TypeError, match="checkpoint_id must be the directory given to dcp.save"):
        optimizer.load_checkpoint(opt, None)


def state_copy(opt: optimizer.AdamMini) -> dict:
    return {i: {k: t.clone() for k, t in s.items()} for i, s in opt.state_dict()["state"].items()}


def assert_state_equal(opt: optimizer.AdamMini, before: dict) -> None:
    after = opt.state_dict()["state"]
    assert after.keys() == before.keys()
    for i, s in before.items():
        assert after[i].keys() == s.keys() and all(
            torch.equal(after[i][k], t) for k, t in s.items()
        )


def test_corrupt_checkpoint_is_refused_and_leaves_the_optimizer_unchanged(tmp_path):
    model, opt = stepped_optimizer()
    dcp.save({"optim": opt.state_dict()}, checkpoint_id=tmp_path)
    (data,) = tmp_path.glob("*.distcp")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # a save cut short
    fresh = optimizer.AdamMini(model.named_parameters(), partition.by_rows(model), lr=0.1)
    with pytest.raises(RuntimeError, match="could not be read.*optimizer is unchanged"):
        optimizer.load_checkpoint(fresh, tmp_path)
    assert not fresh.state
    other, stepped = stepped_optimizer()  # the same training with other data: other state
    for p in other.parameters():
        p.grad = torch.ones_like(p)
    stepped.step()
    before = state_copy(stepped)
    with pytest.raises(RuntimeError, match="could not be read"):
        optimizer.load_checkpoint(stepped, tmp_path)
    assert_state_equal(stepped, before)
    (tmp_path / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"'\.metadata' file cannot be read"):
        optimizer.load_checkpoint(fresh, tmp_path)


def test_incomplete_or_foreign_state_dict_is_refused_before_loading():
    model, opt = stepped_optimizer()
    saved = opt.state_dict()
    del saved["state"][1]["exp_avg_sq"]
    other, target = stepped_optimizer()
    before = state_copy(target)
    with pytest.raises(ValueError, match=r"'0\.bias' lacks \['exp_avg_sq'\]"):
        target.load_state_dict(saved)
    assert_state_equal(target, before)
    wider = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    fresh = optimizer.AdamMini(wider.named_parameters(), partition.by_rows(wider))
    with pytest.raises(
        partition.PartitionError, match=r"'0\.weight' has exp_avg \(5, 6\).*\(7, 6\).*another model"
    ):
        fresh.load_state_dict(stepped_optimizer()[1].state_dict())
    assert not fresh.state


def test_another_rule_with_the_same_block_count_is_refused(tmp_path):
    """``rows`` and ``columns`` of a square matrix both keep 4 v entries: only the saved
    partition record tells them apart."""
    w = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))

    def opt(rule: str) -> optimizer.AdamMini:
        return optimizer.AdamMini([("w", w)], Partition([TensorBlocks("w", (4, 4), rule, {})]))

    rows = opt("rows")
    w.grad = torch.randn_like(w)
    rows.step()
    torch.save(rows.state_dict(), tmp_path / "optim.pt")
    saved = torch.load(tmp_path / "optim.pt", weights_only=True)
    dcp.save({"optim": rows.state_dict()}, checkpoint_id=tmp_path / "dcp")
    columns = opt("columns")
    with pytest.raises(partition.PartitionError, match=r"'w' has blocks 'rows \{\}'.*'columns"):
        columns.load_state_dict(saved)
    with pytest.raises(partition.PartitionError, match=r"'w' has blocks 'rows \{\}'.*'columns"):
        optimizer.load_checkpoint(columns, tmp_path / "dcp")
    assert not columns.state
    again = opt("rows")
    again.load_state_dict(saved)
    assert torch.equal(again.state[w]["exp_avg_sq"], rows.state[w]["exp_avg_sq"])


def test_checkpoint_saved_under_a_wrapper_prefix_loads(tmp_path):
    """DDP names the tensors ``module.*``: its partition record is under other names, which
    ``load_checkpoint`` skips as ``load_state_dict`` does instead of calling the files corrupt."""
    model, opt = stepped_optimizer()
    wrapped = [("module." + n, p) for n, p in model.named_parameters()]
    prefixed = optimizer.AdamMini(wrapped, partition.by_rows(wrapped), lr=0.1)
    prefixed.load_state_dict(opt.state_dict())
    dcp.save({"optim": prefixed.state_dict()}, checkpoint_id=tmp_path)
    fresh = optimizer.AdamMini(model.named_parameters(), partition.by_rows(model), lr=0.1)
    optimizer.load_checkpoint(fresh, tmp_path)
    assert_state_equal(fresh, state_copy(opt))


def test_state_dict_loads_by_name_into_another_parameter_order():
    """torch's loader matches tensors by position; the saved ``param_names`` tell AdamMini
    whose state is whose, so an optimizer over the same tensors in another order (two
    weights of one shape swapped) resumes bit for bit, and one whose groups hold other
    tensors than the saved groups is refused (each group's lr/weight_decay would go astray)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    named = list(model.named_parameters())  # 0.weight, 0.bias, 2.weight, 2.bias
    part = partition.by_rows(model)

    def train(opt: optimizer.AdamMini, steps: range) -> None:
        for k in steps:
            opt.zero_grad()
            x = torch.randn(3, 4, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
            model(x).square().sum().backward()
            opt.step()

    opt = optimizer.AdamMini(named, part, lr=0.1)
    train(opt, range(3))
    saved = copy.deepcopy(opt.state_dict())  # torch's state_dict shares the state tensors
    swapped = optimizer.AdamMini([named[2], named[1], named[0], named[3]], part, lr=0.1)
    swapped.load_state_dict(saved)
    for _, p in named:
        for k, t in opt.state[p].items():
            assert torch.equal(swapped.state[p][k], t), k
    assert swapped.param_groups[0]["param_names"] == ["2.weight", "0.bias", "0.weight", "2.bias"]
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    train(opt, range(3, 5))
    stepped = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(reference)
    train(swapped, range(3, 5))
    assert all(torch.equal(v, stepped[k]) for k, v in model.state_dict().items())

    two = optimizer.AdamMini([{"params": named[:2]}, {"params": named[2:]}], part, lr=0.1)
    saved_two = two.state_dict()
    moved = optimizer.AdamMini([{"params": named[2:3] + named[1:2]}, {"params": named[::3]}], part)
    with pytest.raises(
        ValueError, match=r"'2\.weight' is in param group 1 of the saved state but in group 0 here"
    ):
        moved.load_state_dict(saved_two)


def test_checkpoint_loads_by_name_into_another_parameter_order(tmp_path):
    """``load_checkpoint`` matches tensors by the saved ``param_names`` as ``load_state_dict``
    does. By position, a float32 weight's momentum was read into the buffer of the bfloat16
    weight of the same shape that sat at its index (rounded, silently), and a weight and a bias
    in another order were refused as "another model". A tensor in another group than when saved
    is refused by name, before anything is loaded."""
    torch.manual_seed(0)
    w32 = nn.Parameter(torch.randn(4, 4, dtype=torch.float32))
    w16 = nn.Parameter(torch.randn(4, 4).to(torch.bfloat16))
    bias = nn.Parameter(torch.randn(4))
    named = [("w32", w32), ("w16", w16), ("bias", bias)]
    part = partition.by_rows(named)
    opt = optimizer.AdamMini(named, part, lr=0.1)

    def train(opt: optimizer.AdamMini) -> None:
        for _ in range(3):
            opt.zero_grad()
            (w32.square().sum() + w16.float().pow(3).sum() + bias.exp().sum()).backward()
            opt.step()

    train(opt)
    dcp.save({"optim": opt.state_dict()}, checkpoint_id=tmp_path / "one")
    for order in ([1, 0, 2], [2, 1, 0]):
        fresh = optimizer.AdamMini([named[i] for i in order], part, lr=0.1)
        optimizer.load_checkpoint(fresh, tmp_path / "one")
        for n, p in named:
            for k, t in opt.state[p].items():
                assert torch.equal(fresh.state[p][k], t), (order, n, k)

    two = optimizer.AdamMini([{"params": named[:2]}, {"params": named[2:]}], part, lr=0.1)
    train(two)
    dcp.save({"optim": two.state_dict()}, checkpoint_id=tmp_path / "two")
    moved = optimizer.AdamMini([{"params": named[1:2]}, {"params": named[::2]}], part)
    with pytest.raises(
        ValueError, match=r"'w32' is in param group 0 of the saved state but in group 1"
    ):
        optimizer.load_checkpoint(moved, tmp_path / "two")
    assert not moved.state
