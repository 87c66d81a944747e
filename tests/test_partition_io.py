"""The partition JSON format: round trips, validation, corrupted files (hypothesis)."""

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import partition
from partition import Partition, PartitionError, TensorBlocks

SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def tensor_blocks(draw, name):
    rule = draw(st.sampled_from(partition.RULES))
    if rule in ("elements", "tensor"):
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        return TensorBlocks(name, shape, rule, {})
    if rule == "rows":
        return TensorBlocks(name, (draw(st.integers(1, 6)), draw(st.integers(0, 3))), rule, {})
    if rule == "columns":
        return TensorBlocks(name, (draw(st.integers(0, 3)), draw(st.integers(1, 6))), rule, {})
    if rule == "heads":
        h = draw(st.integers(1, 3))
        rest = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
        return TensorBlocks(name, (h * draw(st.integers(1, 4)), *rest), rule, {"head_dim": h})
    if rule == "fused_heads":
        h = draw(st.integers(1, 3))
        q, k, v = h * draw(st.integers(1, 3)), h * draw(st.integers(0, 2)), draw(st.integers(0, 4))
        orientation = draw(st.sampled_from(["rows", "columns"]))
        other = draw(st.integers(1, 3))
        shape = (q + k + v, other) if orientation == "rows" else (other, q + k + v)
        params = {"head_dim": h, "sections": [q, k, v], "orientation": orientation}
        return TensorBlocks(name, shape, rule, params)
    n = draw(st.integers(1, 8))
    g = draw(st.integers(1, n))
    groups = draw(
        st.permutations(
            list(range(g)) + draw(st.lists(st.integers(0, g - 1), min_size=n - g, max_size=n - g))
        )
    )
    return TensorBlocks(name, (n, draw(st.integers(1, 3))), rule, {"groups": groups})


@st.composite
def partitions(draw):
    names = draw(
        st.lists(
            st.text("abcdefgh._0123456789", min_size=1, max_size=12),
            min_size=0,
            max_size=6,
            unique=True,
        )
    )
    tensors = [draw(tensor_blocks(n)) for n in names]
    provenance = draw(
        st.dictionaries(
            st.text(max_size=5),
            st.one_of(
                st.integers(),
                st.floats(allow_nan=False, allow_infinity=False),
                st.text(max_size=5),
                st.none(),
            ),
            max_size=3,
        )
    )
    return Partition(tensors, provenance)


@SETTINGS
@given(part=partitions())
def test_random_partitions_round_trip(part, tmp_path):
    path = tmp_path / "p.json"
    part.to_json(path)
    back = Partition.from_json(path)
    assert back == part
    assert back.to_dict() == part.to_dict()
    assert json.loads(path.read_text()) == part.to_dict()
    for name in part.names:
        assert torch.equal(back.block_index(name), part.block_index(name))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def example_dict():
    part = Partition(
        [
            TensorBlocks("emb.weight", (5, 4), "rows", {}),
            TensorBlocks("q.weight", (8, 4), "heads", {"head_dim": 2}),
            TensorBlocks(
                "qkv.weight",
                (4, 10),
                "fused_heads",
                {"head_dim": 2, "sections": [4, 2, 4], "orientation": "columns"},
            ),
            TensorBlocks("g.weight", (3, 2), "row_groups", {"groups": [1, 0, 1]}),
            TensorBlocks("ln.weight", (4,), "tensor", {}),
        ],
        {"method": "test", "threshold": 0.05},
    )
    return part.to_dict()


WRONG_TYPES = [None, True, 1.5, "x", [], {}, [1, "a"], -3]


def _paths(obj, prefix=()):
    """Every (path) to a value in the JSON tree."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _set(obj, path, value):
    _get(obj, path[:-1])[path[-1]] = value


def _json_type(x):
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, int):
        return "int"
    return type(x).__name__


@st.composite
def corruptions(draw):
    d = example_dict()
    text = json.dumps(d)
    kind = draw(st.sampled_from(["truncate", "drop_key", "wrong_type", "bad_value", "garbage"]))
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))].encode()
    if kind == "garbage":
        return draw(st.binary(max_size=40).filter(lambda b: _not_a_partition(b)))
    if kind == "drop_key":
        dicts = [
            p
            for p in _paths(d)
            if isinstance(_get(d, p), dict) and _get(d, p) and p[:1] != ("provenance",)
        ]
        path = draw(st.sampled_from(dicts))
        key = draw(st.sampled_from(sorted(_get(d, path))))
        del _get(d, path)[key]
        return json.dumps(d).encode()
    paths = [p for p in _paths(d) if p and p[0] != "provenance"]
    if kind == "wrong_type":
        path = draw(st.sampled_from(paths))
        old = _get(d, path)
        new = draw(
            st.sampled_from(
                [
                    w
                    for w in WRONG_TYPES
                    if _json_type(w) != _json_type(old) and not (isinstance(old, list) and w == [])
                ]
            )
        )
        _set(d, path, new)
        return json.dumps(d).encode()
    mutations = [
        (("version",), 2),
        (("format",), "other.format"),
        (("num_blocks",), 999),
        (("tensors", 0, "shape", 0), -5),
        (("tensors", 0, "num_blocks"), 6),
        (("tensors", 1, "params", "head_dim"), 3),
        (("tensors", 1, "rule"), "blocks"),
        (("tensors", 2, "params", "orientation"), "diagonal"),
        (("tensors", 2, "params", "sections"), [4, 4, 4]),
        (("tensors", 3, "params", "groups"), [1, 0, 1, 0]),
        (("tensors", 3, "params", "groups"), [2, 0, 2]),
        (("tensors", 4, "params"), {"head_dim": 2}),
        (("tensors", 4, "name"), "emb.weight"),
    ]
    path, value = draw(st.sampled_from(mutations))
    _set(d, path, value)
    return json.dumps(d).encode()


def _not_a_partition(raw):
    try:
        Partition.from_dict(json.loads(raw))
    except Exception:
        return True
    return False


@SETTINGS
@given(raw=corruptions())
def test_every_corrupted_file_raises_partition_error(raw, tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(raw)
    with pytest.raises(PartitionError):
        Partition.from_json(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b"   \n", "is empty"),
        (b'{"format": "adam-mini-lab.partition", "vers', "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"[1, 2, 3]", "must hold a JSON object"),
        (b"[" * 100000, "cannot be decoded|not valid JSON"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, content, match):
    path = tmp_path / "p.json"
    path.write_bytes(content)
    with pytest.raises(PartitionError, match=match):
        Partition.from_json(path)


def test_missing_file_and_unknown_version_and_rule(tmp_path):
    with pytest.raises(PartitionError, match="cannot read partition file"):
        Partition.from_json(tmp_path / "nope.json")
    d = example_dict()
    d["version"] = 7
    with pytest.raises(PartitionError, match="unsupported partition format version 7"):
        Partition.from_dict(d)
    d = example_dict()
    d["tensors"][1]["rule"] = "diagonal"
    with pytest.raises(PartitionError, match="tensor 'q.weight': unknown rule 'diagonal'"):
        Partition.from_dict(d)


def test_documented_layout_and_atomic_overwrite(tmp_path):
    d = example_dict()
    assert list(d) == ["format", "version", "provenance", "tensors", "num_blocks"]
    assert d["tensors"][2] == {
        "name": "qkv.weight", "shape": [4, 10], "rule": "fused_heads",
        "params": {"head_dim": 2, "sections": [4, 2, 4], "orientation": "columns"}, "num_blocks": 7,
    }  # fmt: skip
    assert d["num_blocks"] == 5 + 4 + 7 + 2 + 1
    path = tmp_path / "p.json"
    path.write_text("old")
    part = Partition.from_dict(d)
    part.to_json(path)
    assert Partition.from_json(path) == part
    assert sorted(os.listdir(tmp_path)) == ["p.json"]


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    part = Partition.from_dict(example_dict())
    part.to_json(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        partition.by_tensor({"w": torch.empty(2)}).to_json(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["p.json"]


def test_written_file_has_ordinary_permissions(tmp_path):
    """The atomic write must not leave mkstemp's 0600 mode or a temporary file behind."""
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "part.json"
    partition.by_tensor({"w": torch.empty(2, 3)}).to_json(path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["part.json"]


def test_provenance_is_a_private_json_copy(tmp_path):
    merged = [[0, 1], [2]]
    part = Partition([TensorBlocks("w", (3, 2), "rows", {})], {"groups": merged, "pair": (1, 2)})
    merged[0].append(99)  # the caller's list changes; the partition must not
    assert part.provenance == {"groups": [[0, 1], [2]], "pair": [1, 2]}
    part.to_json(tmp_path / "p.json")
    assert Partition.from_json(tmp_path / "p.json") == part


def test_sizes_torch_cannot_hold_are_refused_on_load():
    """A shape or head_dim beyond int64 used to load and then crash in block_index."""
    d = example_dict()
    d["tensors"][0].update(shape=[2**64, 4], num_blocks=2**64)
    d["num_blocks"] += 2**64 - 5
    with pytest.raises(
        PartitionError, match=r"'emb.weight': shape .* beyond torch's limit of 2\*\*63 - 1"
    ):
        Partition.from_dict(d)
    d = example_dict()
    d["tensors"][1].update(shape=[0, 4], num_blocks=0)
    d["tensors"][1]["params"]["head_dim"] = 2**70
    d["num_blocks"] -= 4
    with pytest.raises(PartitionError, match="'q.weight': head_dim must be a positive integer"):
        Partition.from_dict(d)


def test_unwritable_folder_names_the_file_not_the_temporary_one(tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".p.json.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match=r"cannot write '.*p\.json': Permission denied") as e:
        partition.by_tensor({"w": torch.empty(2)}).to_json(tmp_path / "p.json")
    assert ".tmp" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_file_saved_with_a_utf8_byte_order_mark_loads(tmp_path):
    """Editors on Windows (Notepad, PowerShell 5's Out-File) save UTF-8 with a BOM; the file was
    refused as 'not valid JSON (truncated?)'."""
    part = Partition.from_dict(example_dict())
    path = tmp_path / "p.json"
    part.to_json(path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert Partition.from_json(path) == part


@pytest.mark.parametrize("path", [("version",), ("tensors", 4, "num_blocks"), ("num_blocks",)])
def test_a_boolean_where_the_format_wants_an_integer_is_refused(path):
    """JSON's true equals 1 in Python: version true, or a count of true for a one-block tensor,
    would load as if the file said 1."""
    d = example_dict()
    if path == ("num_blocks",):  # a file whose total is one block
        d["tensors"] = d["tensors"][4:]
        d["num_blocks"] = 1
    _set(d, path, True)
    with pytest.raises(PartitionError, match=f"{path[-1]!r} must be int, got bool"):
        Partition.from_dict(d)


@pytest.mark.parametrize("version", [0, -1])
def test_versions_before_1_are_unsupported(version):
    d = example_dict()
    d["version"] = version
    with pytest.raises(PartitionError, match=f"unsupported partition format version {version}"):
        Partition.from_dict(d)


def test_a_tensor_entry_that_is_not_an_object_is_named():
    d = example_dict()
    d["tensors"][0] = "emb.weight"
    with pytest.raises(PartitionError, match=r"tensors\[0\] must be an object, got str"):
        Partition.from_dict(d)


def test_to_json_creates_missing_folders(tmp_path):
    part = Partition.from_dict(example_dict())
    path = tmp_path / "runs" / "a" / "p.json"
    part.to_json(path)
    assert Partition.from_json(path) == part
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]


@pytest.mark.parametrize("tensors", [True, False])
def test_write_json_refuses_non_finite_numbers_and_writes_nothing(tmp_path, tensors):
    """NaN/Infinity are not JSON: a file holding them is refused by strict readers."""
    from partition.io import write_json

    data = {"x": float("nan")}
    if tensors:  # the one-line-per-tensor layout of partition files
        data = {**example_dict(), "provenance": {"r_diag": float("inf")}}
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json(data, tmp_path / "p.json")
    assert list(tmp_path.iterdir()) == []


def test_a_path_that_is_not_a_path_is_named():
    part = Partition.from_dict(example_dict())
    with pytest.raises(TypeError, match="path of a partition file must be a str or os.PathLike"):
        Partition.from_json(None)
    with pytest.raises(TypeError, match="path of the file to write must be a str .* got int"):
        part.to_json(3)
