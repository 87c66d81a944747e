"""Fused q|k|v weights: their row order from a model's config, and their blocks."""

from __future__ import annotations

from partition.blocks import TensorBlocks
from partition.core import ModelLike
from partition.errors import PartitionError
from partition.heads import config_int, config_of
from partition.roles import module_of


def fused_layout(model: ModelLike, n_heads: int | None) -> tuple[str | None, int | None]:
    """Row order of fused q|k|v weights from ``model.config.model_type``, and the key/value head
    count it implies (None: from the config as usual).

    ``sections`` is q | k | v (GPT-2, Phi-3); ``interleaved`` is q, k, v per head (GPT-NeoX,
    GPT-NeoX-Japanese, Persimmon, Bloom, Falcon without multi-query); ``grouped`` is the q heads
    of each kv group, then its k and v (Falcon's new decoder); ``codegen`` is 4 shards of q, v,
    k. Without a config the order of a ``query_key_value`` weight is unknown: None.
    """
    config = config_of(model)
    kind = getattr(config, "model_type", None)
    if kind in ("gpt_neox", "bloom", "persimmon", "gpt_neox_japanese"):
        return "interleaved", None
    if kind == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            return "grouped", config_int(config, "num_kv_heads")
        if getattr(config, "multi_query", False):
            return "sections", 1
        return "interleaved", n_heads
    if kind == "codegen":
        return "codegen", None
    return None, None


def fused_row_groups(
    name: str,
    shape: tuple[int, ...],
    layout: str,
    n_heads: int | None,
    n_kv_heads: int | None,
    head_dim: int,
) -> TensorBlocks:
    """``row_groups`` for an interleaved fused q|k|v weight ``(out, in)``: one group per q or k
    head and one per v row, numbered in row order."""
    kv = n_kv_heads or n_heads
    shards = {"interleaved": n_heads, "grouped": kv, "codegen": 4}[layout]
    run: list[tuple[str, int]] = []  # (role, heads) in the row order of one shard
    if n_heads and shards and n_heads % shards == 0:
        per = n_heads // shards  # query heads per shard
        order = {"interleaved": "qkv", "grouped": "qkv", "codegen": "qvk"}[layout]
        run = [(role, per if role == "q" or layout == "codegen" else 1) for role in order]
    if not run or shards * sum(heads for _, heads in run) * head_dim != shape[0]:
        raise PartitionError(
            f"tensor {name!r} has {shape[0]} fused q|k|v rows, which the model's {layout} layout "
            f"cannot split with n_heads={n_heads}, n_kv_heads={kv}, head_dim={head_dim}; pass "
            "the right n_heads=/n_kv_heads=/head_dim="
        )
    groups: list[int] = []
    next_id = 0
    for _ in range(shards):
        for role, heads in run:
            for _ in range(heads):
                if role == "v":  # one block per output neuron
                    groups.extend(range(next_id, next_id + head_dim))
                    next_id += head_dim
                else:  # one block per head
                    groups.extend([next_id] * head_dim)
                    next_id += 1
    return TensorBlocks(name, shape, "row_groups", {"groups": groups})


def fused_heads(
    name: str,
    shape: tuple[int, ...],
    transposed: bool,
    n_heads: int | None,
    n_kv_heads: int | None,
    head_dim: int,
    kv_only: bool = False,
) -> TensorBlocks:
    """A fused q|k|v weight: sections from the head counts, else equal thirds; ``kv_only``: a
    fused k|v weight (GPT-2 cross-attention's ``c_attn``), whose q section is empty."""
    orientation = "columns" if transposed else "rows"
    out = shape[1] if transposed else shape[0]
    if kv_only:
        k = (n_kv_heads or n_heads) * head_dim if n_heads is not None else out // 2
        sections = [0, k, out - k]
    elif n_heads is not None:
        q = n_heads * head_dim
        k = (n_kv_heads or n_heads) * head_dim
        sections = [q, k, out - q - k]
    elif out % 3 == 0:
        sections = [out // 3] * 3
    else:
        raise PartitionError(
            f"tensor {name!r}: cannot split {out} fused q|k|v outputs; pass n_heads=... and "
            "n_kv_heads=..."
        )
    if sections[2] < 0 or sections[2] != sections[1]:
        what = "k|v" if kv_only else "q|k|v"
        raise PartitionError(
            f"tensor {name!r} has {out} fused {what} outputs, but n_heads, n_kv_heads and "
            f"head_dim={head_dim} give q={sections[0]}, k={sections[1]}, v={sections[2]}; "
            "pass the right n_heads=/n_kv_heads=/head_dim="
        )
    params = {"head_dim": head_dim, "sections": sections, "orientation": orientation}
    return TensorBlocks(name, shape, "fused_heads", params)


def cross_kv_names(shapes: list[tuple[str, tuple[int, ...]]], kinds: dict[str, str]) -> list[str]:
    """Fused weights that hold only k|v: GPT-2's cross-attention ``c_attn`` next to a
    ``q_attn`` (``crossattention.q_attn`` computes the queries from the decoder states,
    ``crossattention.c_attn`` keys and values from the encoder states)."""
    names = {n for n, _ in shapes}
    out = []
    for name, _ in shapes:
        parts = name.split(".")
        if kinds[name] == "fused" and module_of(name) == "c_attn":
            sibling = ".".join([*parts[:-2], "q_attn", parts[-1]])
            if sibling in names:
                out.append(name)
    return out
