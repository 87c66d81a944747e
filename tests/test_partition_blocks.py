"""TensorBlocks rules and Partition bookkeeping, against brute-force references."""

import itertools

import numpy as np
import pytest
import torch

import partition
from partition import Partition, PartitionError, TensorBlocks


def brute_ids(shape, rule, params):
    """Block id of every entry computed entry by entry from the rule's definition."""
    out = torch.empty(shape, dtype=torch.long)
    flat = 0
    for idx in itertools.product(*map(range, shape)):
        i = idx[0] if idx else 0
        if rule == "elements":
            b = flat
        elif rule == "tensor":
            b = 0
        elif rule == "rows":
            b = i
        elif rule == "columns":
            b = idx[1]
        elif rule == "heads":
            b = i // params["head_dim"]
        elif rule == "row_groups":
            b = params["groups"][i]
        else:  # fused_heads
            h = params["head_dim"]
            q, k, _ = params["sections"]
            o = i if params["orientation"] == "rows" else idx[1]
            b = (
                o // h
                if o < q
                else q // h + (o - q) // h
                if o < q + k
                else q // h + k // h + o - q - k
            )
        out[idx] = b
        flat += 1
    return out


CASES = [
    ((3, 4), "elements", {}),
    ((5,), "elements", {}),
    ((3, 4), "tensor", {}),
    ((7,), "tensor", {}),
    ((6, 2), "rows", {}),
    ((2, 3, 2), "rows", {}),
    ((3, 5), "columns", {}),
    ((8, 3), "heads", {"head_dim": 2}),
    ((8,), "heads", {"head_dim": 4}),
    ((10, 2), "fused_heads", {"head_dim": 2, "sections": [4, 2, 4], "orientation": "rows"}),
    ((3, 9), "fused_heads", {"head_dim": 3, "sections": [3, 3, 3], "orientation": "columns"}),
    ((5, 2), "row_groups", {"groups": [2, 0, 2, 1, 0]}),
]


@pytest.mark.parametrize(("shape", "rule", "params"), CASES)
def test_local_index_num_blocks_and_sizes_match_brute_force(shape, rule, params):
    tb = TensorBlocks("w", shape, rule, params)
    ref = brute_ids(shape, rule, params)
    assert torch.equal(tb.local_index(), ref)
    assert tb.num_blocks == int(ref.max()) + 1 == len(ref.unique())
    assert tb.numel == ref.numel()
    assert torch.equal(tb.block_sizes(), torch.bincount(ref.reshape(-1)))
    assert len({tb.block_label(i) for i in range(tb.num_blocks)}) == tb.num_blocks


def test_fused_heads_numbering_q_heads_then_k_heads_then_v_neurons():
    tb = TensorBlocks(
        "c",
        (2, 12),
        "fused_heads",
        {"head_dim": 2, "sections": [4, 4, 4], "orientation": "columns"},
    )
    assert tb.local_index()[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7]
    labels = [tb.block_label(i) for i in range(tb.num_blocks)]
    assert labels[:5] == [
        "c[q head 0]",
        "c[q head 1]",
        "c[k head 0]",
        "c[k head 1]",
        "c[v neuron 0]",
    ]


@pytest.mark.parametrize(
    ("shape", "rule", "params", "match"),
    [
        ((96, 64), "heads", {"head_dim": 64}, "has 96 rows, not a multiple of head_dim=64"),
        ((8,), "rows", {}, "rule 'rows' needs a matrix"),
        ((2, 3, 4), "columns", {}, "needs a 2-D"),
        ((4, 4), "bogus", {}, "unknown rule 'bogus'"),
        ((4, 4), "heads", {}, "takes params"),
        ((4, 4), "rows", {"head_dim": 2}, "takes params"),
        ((4, 4), "heads", {"head_dim": 0}, "positive integer"),
        ((4, 4), "heads", {"head_dim": 2.0}, "positive integer"),
        ((4, 4), "heads", {"head_dim": True}, "positive integer"),
        ((3, 2), "row_groups", {"groups": [0, 1]}, "3 rows but 2 group ids"),
        ((3, 2), "row_groups", {"groups": [0, 2, 2]}, "every id 0..G-1"),
        ((3, 2), "row_groups", {"groups": [0, -1, 1]}, "every id 0..G-1"),
        ((3, 2), "row_groups", {"groups": "abc"}, "list of integers"),
        (
            (9, 2),
            "fused_heads",
            {"head_dim": 2, "sections": [3, 3, 3], "orientation": "rows"},
            "not a multiple of head_dim=2",
        ),
        (
            (9, 2),
            "fused_heads",
            {"head_dim": 3, "sections": [3, 3], "orientation": "rows"},
            "three",
        ),
        (
            (9, 2),
            "fused_heads",
            {"head_dim": 3, "sections": [3, 3, 6], "orientation": "rows"},
            "sum to 12",
        ),
        (
            (9, 2),
            "fused_heads",
            {"head_dim": 3, "sections": [3, 3, 3], "orientation": "diag"},
            "orientation",
        ),
        (
            (9,),
            "fused_heads",
            {"head_dim": 3, "sections": [3, 3, 3], "orientation": "columns"},
            "2-D",
        ),
        ((-1, 2), "tensor", {}, "non-negative"),
    ],
)
def test_invalid_rules_raise_partition_error_naming_the_tensor(shape, rule, params, match):
    name = "h.0.attn.q_proj.weight"
    with pytest.raises(PartitionError, match=match) as info:
        TensorBlocks(name, shape, rule, params)
    assert name in str(info.value)


def test_tensor_blocks_is_immutable_and_params_are_copied():
    groups = [0, 1, 0]
    tb = TensorBlocks("w", (3, 2), "row_groups", {"groups": groups})
    groups[0] = 5
    assert tb.params["groups"] == (0, 1, 0)
    with pytest.raises(AttributeError):
        tb.rule = "rows"


def make_partition():
    return Partition(
        [
            TensorBlocks("a", (4, 3), "rows", {}),
            TensorBlocks("b", (5,), "tensor", {}),
            TensorBlocks("c", (6, 2), "heads", {"head_dim": 3}),
            TensorBlocks("d", (2, 2), "elements", {}),
        ],
        {"method": "test"},
    )


def test_partition_global_numbering_follows_names_order():
    part = make_partition()
    assert part.names == ("a", "b", "c", "d")
    assert list(part) == list(part.names) and len(part) == 4 and "c" in part and "z" not in part
    assert [part.offset(n) for n in part.names] == [0, 4, 5, 7]
    assert part.num_blocks == 4 + 1 + 2 + 4 == len(part.block_labels())
    assert part.num_params == 12 + 5 + 12 + 4
    flat = torch.cat([part.block_index(n).reshape(-1) for n in part.names])
    assert torch.equal(flat.unique(), torch.arange(part.num_blocks))
    assert torch.equal(part.block_sizes(), torch.bincount(flat))
    assert part.block_labels()[5] == "c[head 0]" and part.block_labels()[4] == "b"
    assert part.locate(6) == ("c", 1)
    for flag in (True, np.True_, torch.tensor(True)):  # not block 1
        with pytest.raises(TypeError, match="block id must be an int, got the bool"):
            part.locate(flag)
    with pytest.raises(PartitionError, match="'zzz' is not in the partition"):
        part["zzz"]
    with pytest.raises(PartitionError, match="appears twice"):
        Partition([TensorBlocks("a", (2,), "tensor", {})] * 2)


def test_partition_is_immutable_and_provenance_is_a_copy():
    part = make_partition()
    with pytest.raises(AttributeError):
        part.foo = 1
    part.provenance["method"] = "changed"
    assert part.provenance["method"] == "test"
    with pytest.raises(PartitionError, match="JSON-able"):
        Partition([], {"x": object()})


def test_summary_lists_every_tensor_and_the_total_share():
    part = make_partition()
    text = part.summary()
    for name in part.names:
        assert name in text
    total = text.splitlines()[-1]
    assert "33 params" in total and "11" in total and f"{100 * 11 / 33:.2f}%" in total
    assert "heads(3)" in text and "provenance: method=test" in text


def test_check_accepts_the_model_and_names_the_offending_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    part = partition.by_rows(model)
    part.check(model)
    part.check(list(model.named_parameters()))
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5))
    with pytest.raises(PartitionError, match=r"'0.weight' has shape \(5, 3\) in the model"):
        part.check(other)
    with pytest.raises(PartitionError, match="'2.weight' of the model is missing"):
        part.check(
            torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
        )
    with pytest.raises(PartitionError, match="'1.bias' of the partition is not a parameter"):
        part.check([(n, p) for n, p in model.named_parameters() if n != "1.bias"])
    heads = Partition([TensorBlocks("q.weight", (128, 8), "heads", {"head_dim": 64})])
    with pytest.raises(
        PartitionError, match="'q.weight' has 96 rows, not a multiple of head_dim=64"
    ):
        heads.check({"q.weight": torch.empty(96, 8)})


def test_check_of_a_data_parallel_wrapper_names_the_module_prefix():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    wrapped = torch.nn.DataParallel(model)  # DDP prefixes the same "module."
    part = partition.by_rows(model)
    with pytest.raises(PartitionError, match=r"start with 'module\.' \('module\.0\.weight'\)"):
        part.check(wrapped)
    with pytest.raises(PartitionError, match=r"part\.check\(model\.module\)"):
        part.check(dict(wrapped.named_parameters()))
    part.check(wrapped.module)
    with pytest.raises(PartitionError, match=r"build it from the unwrapped model.*model\.module"):
        partition.by_rows(wrapped).check(model)
    # a mismatch beyond the prefix keeps the plain message
    grown = torch.nn.DataParallel(torch.nn.Sequential(*model, torch.nn.Linear(4, 1)))
    with pytest.raises(PartitionError, match="'module.0.weight' of the model is missing") as err:
        part.check(grown)
    assert "DataParallel" not in str(err.value)


def test_simple_builders():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Conv2d(4, 2, 3))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert partition.by_tensor(model).num_blocks == 4
    assert partition.elements(model).num_blocks == sum(p.numel() for p in model.parameters())
    rows = partition.by_rows(model)
    assert [rows[n].rule for n in shapes] == ["rows", "tensor", "rows", "tensor"]
    assert rows.num_blocks == 4 + 1 + 2 + 1


def test_pickle_copy_hash_and_numpy_integers():
    import copy
    import pickle

    import numpy as np

    part = make_partition()
    assert pickle.loads(pickle.dumps(part)) == part
    assert copy.deepcopy(part) == part
    assert len({part[n] for n in part.names} | {part["a"]}) == 4
    tb = TensorBlocks("w", (np.int64(4), 3), "heads", {"head_dim": np.int64(2)})
    assert tb.shape == (4, 3) and type(tb.params["head_dim"]) is int


def test_unhashable_tensor_name_is_a_partition_error():
    part = make_partition()
    with pytest.raises(PartitionError, match=r"tensor \['a'\] is not in the partition"):
        part.block_index(["a"])


@pytest.mark.parametrize(
    ("shape", "params", "match"),
    [
        ((8, 2), {"head_dim": 4, "sections": [-4, 8, 4]}, "three non-negative sizes"),
        ((8, 2), {"head_dim": 4, "sections": [4, 2, 2]}, "the k section has 2 outputs"),
        ((9, 2), {"head_dim": 3, "sections": [3, 3, 2]}, "sum to 8, but the output axis"),
    ],
)
def test_fused_heads_sections_must_be_sizes_that_tile_the_output_axis(shape, params, match):
    """A negative section, a k section that is not whole heads, or sections that leave outputs
    over would give blocks that are not heads (or a negative block count)."""
    with pytest.raises(PartitionError, match=match):
        TensorBlocks("qkv.weight", shape, "fused_heads", {**params, "orientation": "rows"})


def test_row_groups_need_exactly_one_group_id_per_row():
    with pytest.raises(PartitionError, match="has 2 rows but 3 group ids"):
        TensorBlocks("w", (2, 4), "row_groups", {"groups": [0, 1, 0]})


def test_a_size_beyond_int64_is_refused_even_when_another_size_is_zero():
    """(0, 2**63) has no entries, but torch cannot make a tensor with a size of 2**63."""
    with pytest.raises(PartitionError, match=r"beyond torch's limit of 2\*\*63 - 1"):
        TensorBlocks("w", (0, 2**63), "tensor", {})


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("", {}, "tensor name must be a non-empty string, got ''"),
        ("w", None, "tensor 'w': params must be a mapping, got None"),
        ("w", ["head_dim"], r"tensor 'w': params must be a mapping, got \['head_dim'\]"),
    ],
)
def test_empty_name_and_params_that_are_not_a_mapping_are_named(name, params, match):
    with pytest.raises(PartitionError, match=match):
        TensorBlocks(name, (4, 2), "heads" if params == ["head_dim"] else "tensor", params)


def test_block_labels_of_elements_and_out_of_range_local_ids():
    assert TensorBlocks("b", (3,), "elements", {}).block_label(2) == "b[entry 2]"
    assert TensorBlocks("w", (2, 3), "elements", {}).block_label(4) == "w[entry (1, 1)]"
    tb = TensorBlocks("w", (4, 3), "rows", {})
    for bad in (-1, 4):
        with pytest.raises(PartitionError, match=f"tensor 'w' has 4 blocks; no block {bad}"):
            tb.block_label(bad)


def test_locate_inverts_block_index_and_refuses_ids_out_of_range():
    part = make_partition()
    for name in part.names:
        pairs = zip(
            part.block_index(name).reshape(-1).tolist(),
            part[name].local_index().reshape(-1).tolist(),
            strict=True,
        )
        for global_id, local_id in pairs:
            assert part.locate(global_id) == (name, local_id)
    for bad in (-1, part.num_blocks):
        with pytest.raises(PartitionError, match=rf"block id {bad} out of range \[0, 11\)"):
            part.locate(bad)


def test_equality_counts_the_provenance_and_with_provenance_overrides_it():
    part = make_partition()
    assert part == Partition(part.tensors(), {"method": "test"})
    assert part != Partition(part.tensors(), {"method": "other"})
    merged = part.with_provenance({"method": "new", "model": "m"})
    assert merged.provenance == {"method": "new", "model": "m"}
    assert merged.tensors() == part.tensors() and part.provenance == {"method": "test"}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_provenance_with_a_non_finite_float_is_refused(value):
    """NaN and infinities are not JSON: to_json would write a file no JSON reader takes."""
    with pytest.raises(PartitionError, match="provenance must be JSON-able"):
        Partition([], {"r_diag": value})


def test_summary_rows_give_each_tensors_share_of_v_kept():
    part = Partition(
        [
            TensorBlocks("a", (4, 3), "rows", {}),  # 4 of 12 entries
            TensorBlocks("big", (1000, 1000), "tensor", {}),  # 1 of 10**6: not "0.00%"
            TensorBlocks("empty", (0, 3), "rows", {}),  # no entries: no share
        ]
    )
    lines = part.summary().splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:-2]}
    assert rows["a"] == ["a", "4x3", "rows", "4", "33.33%"]
    assert rows["big"] == ["big", "1000x1000", "tensor", "1", "0.0001%"]
    assert rows["empty"] == ["empty", "0x3", "rows", "0", "-"]


def test_empty_partition_sizes():
    part = Partition([])
    assert part.num_blocks == part.num_params == 0
    assert torch.equal(part.block_sizes(), torch.zeros(0, dtype=torch.long))
    assert part.block_labels() == []


def test_a_module_prefix_on_some_names_only_is_not_called_a_wrapper():
    """Only a 'module.' before every name means DDP/DataParallel; a submodule that happens to
    be called 'module' is a plain mismatch."""
    part = Partition(
        [TensorBlocks("weight", (2, 2), "rows", {}), TensorBlocks("bias", (2,), "tensor", {})]
    )
    with pytest.raises(PartitionError, match="'module.weight' of the model is missing") as err:
        part.check({"module.weight": torch.empty(2, 2), "bias": torch.empty(2)})
    assert "DataParallel" not in str(err.value)


def test_named_pairs_of_the_wrong_length_are_a_partition_error():
    part = make_partition()
    with pytest.raises(PartitionError, match="expected an nn.Module, an iterable of"):
        part.check([("a", torch.empty(4, 3), "extra")])


@pytest.mark.parametrize("shape", [(3.5,), (2.0, 3), ("4",)])
def test_a_shape_with_non_integer_sizes_is_refused_not_truncated(shape):
    with pytest.raises(PartitionError, match=r"tensor 'w' has shape .*: sizes must be integers"):
        partition.by_tensor([("w", shape)])


def test_partition_and_with_provenance_name_arguments_of_the_wrong_type():
    with pytest.raises(PartitionError, match="iterable of TensorBlocks, got NoneType"):
        Partition(None)
    with pytest.raises(PartitionError, match="provenance must be a mapping .* got list"):
        Partition([], provenance=[("method", "x")])
    with pytest.raises(PartitionError, match="with_provenance takes a mapping .* got NoneType"):
        Partition([]).with_provenance(None)


def test_block_label_and_block_index_name_a_bad_id_or_device():
    tb = TensorBlocks("w", (4, 3), "rows", {})
    with pytest.raises(PartitionError, match=r"tensor 'w': a local block id is an int in \[0, 4\)"):
        tb.block_label("1")
    with pytest.raises(PartitionError, match="device='gpu0' is not a torch device"):
        Partition([tb]).block_index("w", device="gpu0")
