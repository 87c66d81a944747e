"""Partition builders: the Adam-mini principle for real architectures and three simple rules.

All builders accept an ``nn.Module``, an iterable of ``(name, tensor)`` pairs (e.g.
``model.named_parameters()``) or a mapping ``name -> tensor``; tensors may live on the meta
device. Every parameter is included (``requires_grad`` is not consulted), in the given order.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from partition.blocks import TensorBlocks
from partition.core import Partition, named_shapes
from partition.errors import PartitionError, PartitionWarning

ModelLike = nn.Module | Iterable[tuple[str, Any]] | Mapping[str, Any]


def by_tensor(model: ModelLike) -> Partition:
    """One block per tensor (the paper's Algorithm 2 for non-transformers)."""
    shapes = named_shapes(model)
    return Partition([TensorBlocks(n, s, "tensor", {}) for n, s in shapes], {"method": "by_tensor"})


def elements(model: ModelLike) -> Partition:
    """One block per entry: Adam-mini on this partition is exactly Adam(W)."""
    shapes = named_shapes(model)
    return Partition(
        [TensorBlocks(n, s, "elements", {}) for n, s in shapes], {"method": "elements"}
    )


def by_rows(model: ModelLike) -> Partition:
    """One block per output neuron of every matrix; 1-D tensors get one block.

    Output neurons are rows of ``(out, in)`` weights (``nn.Linear``, ``nn.Embedding``, conv
    kernels) and columns of GPT-2 ``Conv1D`` weights stored ``(in, out)`` (detected as in
    :func:`adam_mini`). This is the fine candidate partition for :func:`partition.derive`.
    """
    shapes = named_shapes(model)
    transposed = _transposed_names(model, shapes)
    tensors = []
    for name, shape in shapes:
        if len(shape) < 2:
            tensors.append(TensorBlocks(name, shape, "tensor", {}))
        elif name in transposed and len(shape) == 2:
            tensors.append(TensorBlocks(name, shape, "columns", {}))
        else:
            tensors.append(TensorBlocks(name, shape, "rows", {}))
    return Partition(tensors, {"method": "by_rows"})


# ---------------------------------------------------------------------- Adam-mini principle
_POSITIONAL = {
    "pos_emb", "wpe", "position_embeddings", "token_type_embeddings", "embed_positions",
    "relative_attention_bias",  # T5: a learned bias per (distance bucket, head)
}  # fmt: skip
# "shared": the token embedding of T5, BART, mBART, Pegasus, Marian (tied to the output layer)
_TOKEN_EMB = {
    "tok_emb", "wte", "embed_tokens", "word_embeddings", "tok_embeddings", "embed_in", "shared",
}  # fmt: skip
_OUTPUT = {"lm_head", "output", "final_layer", "decoder", "embed_out", "classifier", "score"}
_QUERY = {"q_proj", "wq", "query", "q_lin", "q_attn"}  # q_attn: GPT-2 cross-attention
_KEY = {"k_proj", "wk", "key", "k_lin"}
_NEURON = {
    # values
    "v_proj", "wv", "value", "v_lin",
    # attention output
    "o_proj", "wo", "out_proj", "out_lin", "c_proj", "dense",
    # MLP
    "fc_in", "fc_out", "fc1", "fc2", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
    "w1", "w2", "w3", "c_fc", "dense_h_to_4h", "dense_4h_to_h", "wi", "wi_0", "wi_1",
    # ALBERT's MLP; OPT-350m's projections between the embedding and hidden widths
    "ffn", "ffn_output", "project_in", "project_out",
    # heads' dense layers: DistilBERT's MLM transform, BigBird's pooler
    "vocab_transform", "pooler",
}  # fmt: skip
_MLP_PARENTS = {"mlp", "feed_forward", "ffn", "intermediate", "block_sparse_moe"}
_FUSED_QKV = {"c_attn", "qkv_proj", "wqkv", "query_key_value"}


def _is_attention(parts: list[str]) -> bool:
    return any("attn" in p or "attention" in p for p in parts)


def _kind(name: str, ndim: int = 2) -> str:
    """Role of a >= 2-D parameter: q, k, fused, neuron, token, positional, norm, experts, or ''.

    The module name is the component before ``.weight``/``.bias``; a parameter registered
    directly under another name (``mlp.experts.gate_up_proj``) is its own leaf.
    """
    parts = name.lower().split(".")
    named_leaf = parts[-1] in ("weight", "bias") and len(parts) >= 2
    leaf = parts[-2] if named_leaf else parts[-1]
    parents = parts[:-2] if named_leaf else parts[:-1]
    if ndim >= 3 and ("experts" in parts or "expert" in parts):
        return "experts"
    # a norm weight of more than one axis (Cohere's (heads, head_dim) q/k norms): the module name
    # ends in "norm" (q_norm, layernorm, norm1); a matrix such as "normalizer" is no norm
    if leaf.rstrip("0123456789").endswith("norm"):
        return "norm"
    if "indexer" in parents:  # DeepSeek-V3.2's sparse-attention indexer: its wk is no model key
        return ""
    if leaf in _POSITIONAL or "position" in leaf:
        return "positional"
    if leaf in _FUSED_QKV:
        return "fused_unordered" if leaf == "query_key_value" else "fused"
    if leaf in _QUERY or (leaf == "q" and _is_attention(parents)):
        return "q"
    if leaf in _KEY or (leaf == "k" and _is_attention(parents)):
        return "k"
    if leaf in _TOKEN_EMB or (("embed" in leaf or "embd" in leaf) and "type" not in leaf):
        return "token"
    if leaf in _OUTPUT:
        return "token"
    if leaf in _NEURON or (leaf in {"v", "o"} and _is_attention(parents)):
        return "neuron"
    if any(p in _MLP_PARENTS for p in parents):
        return "neuron"
    return ""


def _transposed_names(model: ModelLike, shapes: list[tuple[str, tuple[int, ...]]]) -> set[str]:
    """Names of 2-D weights stored ``(in, out)`` (GPT-2 ``Conv1D``).

    With a module: the weights of modules whose class is ``transformers``' ``Conv1D``. With only
    names: the ``c_attn``/``c_proj``/``c_fc`` weights of a GPT-2-style model, unless its
    ``c_attn`` weight has more rows than columns (``nn.Linear``'s ``(out, in)`` layout, as in
    nanoGPT or GPTBigCode: fused q|k|v always has more outputs than inputs).
    """
    if isinstance(model, nn.Module):
        out = set()
        for mod_name, module in model.named_modules():
            cls = type(module)
            if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
                for pname, p in module.named_parameters(recurse=False):
                    if p.ndim == 2:
                        out.add(f"{mod_name}.{pname}" if mod_name else pname)
        return out
    gpt2_leaves = {"c_attn", "c_proj", "c_fc", "q_attn"}
    # fused q|k|v has more outputs than inputs: nn.Linear stores it (out, in), Conv1D (in, out)
    linear_layout = any(
        n.lower().split(".")[-2:-1] == ["c_attn"] and len(s) == 2 and s[0] > s[1] for n, s in shapes
    )
    if linear_layout:
        return set()
    guessed = {
        n
        for n, s in shapes
        if len(s) == 2 and n.lower().endswith(".weight") and n.lower().split(".")[-2] in gpt2_leaves
    }
    if guessed and not any(n.lower().split(".")[-2:-1] == ["c_attn"] for n in guessed):
        warnings.warn(
            f"adam_mini: {sorted(guessed)[0]!r} is taken to be a GPT-2 Conv1D weight stored "
            "(in, out), with one block per column, but without a c_attn weight among the names "
            "this is a guess (nanoGPT and GPTBigCode store (out, in)); pass the model itself, or "
            "AdamMini(..., model=model), so its module types decide",
            PartitionWarning,
            stacklevel=3,
        )
    return guessed


def _fused_layout(model: ModelLike, n_heads: int | None) -> tuple[str | None, int | None]:
    """Row order of fused q|k|v weights from ``model.config.model_type``, and the key/value head
    count it implies (None: from the config as usual).

    ``sections`` is q | k | v (GPT-2, Phi-3); ``interleaved`` is q, k, v per head (GPT-NeoX,
    GPT-NeoX-Japanese, Persimmon, Bloom, Falcon without multi-query); ``grouped`` is the q heads
    of each kv group, then its k and v (Falcon's new decoder); ``codegen`` is 4 shards of q, v,
    k. Without a config the order of a ``query_key_value`` weight is unknown: None.
    """
    config = config_of(model) if isinstance(model, nn.Module) else None
    kind = getattr(config, "model_type", None)
    if kind in ("gpt_neox", "bloom", "persimmon", "gpt_neox_japanese"):
        return "interleaved", None
    if kind == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            return "grouped", _config_int(config, "num_kv_heads")
        if getattr(config, "multi_query", False):
            return "sections", 1
        return "interleaved", n_heads
    if kind == "codegen":
        return "codegen", None
    return None, None


def _fused_row_groups(
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


def _token_embedding_names(model: ModelLike) -> set[str]:
    """Names of the weights of a transformers model's input and output embeddings
    (``get_input_embeddings()`` when it is an ``nn.Embedding``, ``get_output_embeddings()`` when
    2-D), looking through wrappers; empty without a module or for a model without those methods.
    A vision or audio model's "input embeddings" are a patch or feature projection (Whisper's
    ``conv1``, Pixtral's ``patch_conv``), not a token table: their rule comes from their names."""
    if not isinstance(model, nn.Module):
        return set()
    inner = model
    while not hasattr(inner, "get_input_embeddings"):
        nxt = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None)
        if not isinstance(nxt, nn.Module):
            return set()
        inner = nxt
    wanted = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(inner, getter)()
        except (NotImplementedError, AttributeError):  # transformers raises for models without
            continue
        if getter == "get_input_embeddings" and not isinstance(module, nn.Embedding):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.ndim == 2:
            wanted.add(id(weight))
    return {name for name, p in model.named_parameters() if id(p) in wanted}


def _config_int(config: Any, *keys: str) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None


def config_of(model: nn.Module) -> Any:
    """``model.config``, looking through wrappers: DDP / DataParallel (``.module``) and
    ``torch.compile`` (``._orig_mod``); None when there is none."""
    while getattr(model, "config", None) is None:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model.config


def _head_counts(
    model: ModelLike, n_heads: int | None, n_kv_heads: int | None, head_dim: int | None
) -> tuple[int | None, int | None, int | None]:
    """Head counts from the arguments, else ``model.config`` (TinyGPTConfig or transformers)."""
    config = config_of(model) if isinstance(model, nn.Module) else None
    if config is not None:
        if n_heads is None:
            n_heads = _config_int(config, "n_heads", "num_attention_heads", "n_head")
        if n_kv_heads is None:
            n_kv_heads = _config_int(config, "n_kv_heads", "num_key_value_heads")
        if head_dim is None:
            head_dim = _config_int(config, "head_dim", "d_kv")  # d_kv: T5 family
        if head_dim is None and n_heads:
            hidden = _config_int(config, "d_model", "hidden_size", "n_embd", "dim")
            if hidden and hidden % n_heads == 0:
                head_dim = hidden // n_heads
    for label, value in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        if value is not None and (
            not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0
        ):
            raise PartitionError(f"adam_mini: {label} must be a positive integer, got {value!r}")
    return tuple(None if v is None else int(v) for v in (n_heads, n_kv_heads, head_dim))


def adam_mini(
    model_or_named_parameters: ModelLike,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
) -> Partition:
    """The Adam-mini principle (Adam-mini v1.1): one block per dense Hessian sub-block.

    ==========================================  ============================================
    parameter                                   rule
    ==========================================  ============================================
    token embeddings, output layer (lm_head;    ``rows``: one block per token
    also found by a model's ``nn.Embedding``
    ``get_input_embeddings()`` and its
    ``get_output_embeddings()``)
    query, key (``q_proj``, ``k_proj``, ...)    ``heads`` with ``head_dim`` (k: n_kv_heads
                                                heads under GQA)
    value, attention output, MLP, ``dense``     ``rows``: one block per output neuron
    GPT-2 ``Conv1D`` (``c_proj``, ``c_fc``)     ``columns`` (stored ``(in, out)``)
    GPT-2 fused ``c_attn``, ``qkv_proj``        ``fused_heads``: q, k by head, v by neuron
    GPT-2 cross-attention ``q_attn``, k|v       ``fused_heads`` (columns) with an empty k|v,
    ``c_attn``                                  resp. q section
    interleaved q|k|v (GPT-NeoX, Persimmon,     ``row_groups``: the same blocks in the row
    Bloom, Falcon, CodeGen; from ``config``)    order of ``config.model_type``
    norms (also 2-D ones), biases, positional   ``tensor``: one block
    embeddings, T5's relative attention bias,
    every other 1-D tensor
    anything else                               ``tensor``, with one :class:`PartitionWarning`
                                                naming all such tensors
    ==========================================  ============================================

    Names are matched on the module name (the component before ``.weight``), e.g. Llama,
    Mistral, Qwen2/3 (``self_attn.q_proj``), GPT-2 (``attn.c_attn``), BERT
    (``attention.self.query``, ``intermediate.dense``) and TinyGPT (``attn.q_proj``,
    ``mlp.fc_in``). GPT-2 ``Conv1D`` is detected by module type when a module is given, and by the
    names ``c_attn``/``c_proj``/``c_fc`` (unless ``c_attn`` is stored ``(3 d, d)``) otherwise.

    Head counts are one for the whole model, except in an encoder-decoder model whose config
    gives its stacks their own (``encoder_attention_heads`` != ``decoder_attention_heads``, BART
    family): there each query and key weight under ``encoder``/``decoder`` is split by its own
    stack's heads (recorded as ``provenance["n_heads_by_stack"]``), unless head counts are passed.

    Unlike the reference implementation, biases get one block (not one per entry), 1-D weights
    never get a per-row rule, ``head_dim`` may differ from ``hidden / n_heads`` (Qwen3), and
    position embeddings get one block.

    Args:
        model_or_named_parameters: module, ``named_parameters()`` or mapping name -> tensor.
        n_heads: query heads; default ``model.config`` (``n_heads``/``num_attention_heads``/
            ``n_head``).
        n_kv_heads: key/value heads (GQA); default ``model.config``, else ``n_heads``.
        head_dim: default ``model.config.head_dim`` (T5: ``d_kv``), else ``hidden / n_heads``,
            else ``q rows / n_heads``.

    Raises:
        PartitionError: head counts are needed but unknown, or shapes do not split into heads.
    """
    model = model_or_named_parameters
    if not isinstance(model, (nn.Module, Mapping)) and isinstance(model, Iterable):
        model = list(model)  # read a generator once; named_shapes refuses what is not iterable
    shapes = named_shapes(model)
    heads_given = any(x is not None for x in (n_heads, n_kv_heads, head_dim))
    n_heads, n_kv_heads, head_dim = _head_counts(model, n_heads, n_kv_heads, head_dim)
    transposed = _transposed_names(model, shapes)
    kinds = {name: _kind(name, len(shape)) if len(shape) >= 2 else "1d" for name, shape in shapes}
    for name in _token_embedding_names(model):  # whatever their names (CTRL's "w")
        if name in kinds and kinds[name] != "1d":
            kinds[name] = "token"
    layout, layout_kv = _fused_layout(model, n_heads)
    n_kv_heads = n_kv_heads or layout_kv
    sided = {} if heads_given else _sided_heads(model)
    unordered = [n for n, k in kinds.items() if k == "fused_unordered"]
    for name in unordered:  # a known layout makes them ordinary fused weights
        kinds[name] = "fused" if layout else ""
    for name in _cross_kv_names(shapes, kinds):
        kinds[name] = "fused_kv"
    needs_heads = [n for n, k in kinds.items() if k in ("q", "k", "fused", "fused_kv")]
    if needs_heads and head_dim is None:
        if n_heads is None:
            raise PartitionError(
                f"adam_mini: tensor {needs_heads[0]!r} is split by attention head, but the number "
                "of heads is unknown; pass n_heads=... (and n_kv_heads=..., head_dim=... if they "
                "differ) or a model with a .config"
            )
        head_dim = _head_dim_from_query(shapes, kinds, transposed, n_heads, n_kv_heads)
    tensors, unrecognized, experts = [], [], []
    for name, shape in shapes:
        kind = kinds[name]
        if kind == "experts":  # (experts, out, in): one block per expert's matrix
            experts.append(name)
            tensors.append(TensorBlocks(name, shape, "rows", {}))
        elif kind in ("1d", "positional", "norm"):
            tensors.append(TensorBlocks(name, shape, "tensor", {}))
        elif kind in ("q", "k"):
            heads = n_heads if kind == "q" else (n_kv_heads or n_heads)
            dim = head_dim
            side = _side_of(name, sided)
            if side is not None:  # this stack's own head count: all heads of one width
                heads = sided[side]
                dim = _side_head_dim(name, shape, name in transposed, heads, side)
            tensors.append(_query_or_key(name, shape, kind, name in transposed, heads, dim))
        elif kind == "fused" and layout not in (None, "sections") and name not in transposed:
            tensors.append(_fused_row_groups(name, shape, layout, n_heads, n_kv_heads, head_dim))
        elif kind in ("fused", "fused_kv"):
            tensors.append(
                _fused(
                    name,
                    shape,
                    name in transposed,
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    kind == "fused_kv",
                )
            )
        elif kind in ("token", "neuron"):
            rule = "columns" if name in transposed else "rows"
            tensors.append(TensorBlocks(name, shape, rule, {}))
        else:
            unrecognized.append(name)
            tensors.append(TensorBlocks(name, shape, "tensor", {}))
    if unordered and not layout:
        warnings.warn(
            f"adam_mini: {unordered[0]!r} fuses q|k|v in an order that differs between models "
            "(GPT-NeoX and Bloom interleave q, k, v per head; Falcon has three layouts), and names "
            "alone do not tell which; pass the model itself (its config names the layout) for "
            f"per-head blocks. The {len(unordered)} such tensor(s) get one block each",
            PartitionWarning,
            stacklevel=2,
        )
    unmatched = [n for n in unrecognized if n not in unordered]  # those were warned about
    if unmatched:
        shown = ", ".join(repr(n) for n in unmatched[:10])
        more = f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""
        warnings.warn(
            f"adam_mini: no Adam-mini rule matches {len(unmatched)} tensor(s): {shown}{more}; "
            "they get one block per tensor ('tensor'). Build a Partition by hand for other rules.",
            PartitionWarning,
            stacklevel=2,
        )
    if experts:
        warnings.warn(
            f"adam_mini: {len(experts)} stacked mixture-of-experts weight(s) such as "
            f"{experts[0]!r} get one block per expert ('rows' on the expert axis), not one per "
            "output neuron of each expert: the rules have no two-axis split. Build a Partition "
            "by hand (one tensor per expert) for per-neuron blocks.",
            PartitionWarning,
            stacklevel=2,
        )
    provenance = {
        "method": "adam_mini",
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads or n_heads,
        "head_dim": head_dim,
        "unrecognized": unrecognized,
    }
    if sided:
        provenance["n_heads_by_stack"] = sided
    return Partition(tensors, provenance)


def _query_or_key(
    name: str,
    shape: tuple[int, ...],
    kind: str,
    transposed: bool,
    heads: int | None,
    head_dim: int,
) -> TensorBlocks:
    """``heads`` for a query or key weight ``(out, in)``; a ``Conv1D`` one stored ``(in, out)``
    (GPT-2 cross-attention's ``q_attn``) gets the same blocks as one q (or k) section of
    ``fused_heads`` along its columns."""
    out = shape[1] if transposed else shape[0]
    if heads is not None and out % head_dim == 0 and out != heads * head_dim:
        label = "n_heads" if kind == "q" else "n_kv_heads"
        raise PartitionError(
            f"tensor {name!r} has {out} {'columns' if transposed else 'rows'}, but {label}"
            f"={heads} x head_dim={head_dim} = {heads * head_dim}; pass the right "
            "n_heads=/n_kv_heads=/head_dim="
        )
    if not transposed:
        return TensorBlocks(name, shape, "heads", {"head_dim": head_dim})
    sections = [out, 0, 0] if kind == "q" else [0, out, 0]
    params = {"head_dim": head_dim, "sections": sections, "orientation": "columns"}
    return TensorBlocks(name, shape, "fused_heads", params)


def _cross_kv_names(shapes: list[tuple[str, tuple[int, ...]]], kinds: dict[str, str]) -> list[str]:
    """Fused weights that hold only k|v: GPT-2's cross-attention ``c_attn`` next to a
    ``q_attn`` (``crossattention.q_attn`` computes the queries from the decoder states,
    ``crossattention.c_attn`` keys and values from the encoder states)."""
    names = {n for n, _ in shapes}
    out = []
    for name, _ in shapes:
        parts = name.split(".")
        if kinds[name] == "fused" and len(parts) >= 2 and parts[-2].lower() == "c_attn":
            sibling = ".".join([*parts[:-2], "q_attn", parts[-1]])
            if sibling in names:
                out.append(name)
    return out


def _sided_heads(model: ModelLike) -> dict[str, int]:
    """``{"encoder": h_e, "decoder": h_d}`` for an encoder-decoder config whose two stacks have
    different head counts (``encoder_attention_heads`` != ``decoder_attention_heads``: BART,
    mBART, Marian, Pegasus, Whisper); else empty. The decoder's cross-attention has the
    decoder's heads."""
    config = config_of(model) if isinstance(model, nn.Module) else None
    if config is None:
        return {}
    enc = _config_int(config, "encoder_attention_heads")
    dec = _config_int(config, "decoder_attention_heads")
    return {"encoder": enc, "decoder": dec} if enc and dec and enc != dec else {}


def _side_of(name: str, sided: dict[str, int]) -> str | None:
    """``"decoder"`` or ``"encoder"``: the stack a tensor name lies in (a name component), if
    the stacks have their own head counts."""
    if not sided:
        return None
    parts = name.lower().split(".")
    return next((side for side in ("decoder", "encoder") if side in parts), None)


def _side_head_dim(
    name: str, shape: tuple[int, ...], transposed: bool, heads: int, side: str
) -> int:
    """Head width of a query or key weight of one stack: its outputs / that stack's heads."""
    out = shape[1] if transposed else shape[0]
    if out == 0 or out % heads:
        raise PartitionError(
            f"tensor {name!r} has {out} outputs, not a multiple of the {side}'s {heads} heads "
            f"({side}_attention_heads); pass n_heads=... (and head_dim=...) for every tensor"
        )
    return out // heads


def _head_dim_from_query(
    shapes: list[tuple[str, tuple[int, ...]]],
    kinds: dict[str, str],
    transposed: set[str],
    n_heads: int,
    n_kv_heads: int | None,
) -> int:
    """``head_dim`` = query outputs / ``n_heads``; a fused q|k|v has ``n_heads + 2 n_kv_heads``
    heads of outputs."""
    for name, shape in shapes:
        if kinds[name] not in ("q", "fused"):
            continue
        out, d_in = (shape[1], shape[0]) if name in transposed else (shape[0], shape[1])
        heads = n_heads
        if kinds[name] == "fused":
            if n_kv_heads is None and out != 3 * d_in:
                raise PartitionError(
                    f"tensor {name!r} fuses q|k|v into {out} outputs from {d_in} inputs, not "
                    f"3 x {d_in}: its key/value heads differ from its {n_heads} query heads "
                    "(GQA/MQA) or head_dim differs from hidden / n_heads, so the split is "
                    "ambiguous; pass n_kv_heads=... (and head_dim=... if it is not hidden / n_heads)"
                )
            heads = n_heads + 2 * (n_kv_heads or n_heads)
        what = "query" if kinds[name] == "q" else "fused q|k|v"
        if out == 0:
            raise PartitionError(
                f"tensor {name!r} has no {what} outputs (shape {shape}), so it gives no head_dim; "
                "pass head_dim=... or leave the empty tensor out"
            )
        if out % heads:
            raise PartitionError(
                f"tensor {name!r} has {out} {what} outputs, not a multiple of {heads} heads "
                f"(n_heads={n_heads}, n_kv_heads={n_kv_heads or n_heads}); pass the right "
                "n_heads=/n_kv_heads= or head_dim=..."
            )
        return out // heads
    name = next(n for n, k in kinds.items() if k == "k")
    raise PartitionError(
        f"adam_mini: tensor {name!r} is a key but no query tensor gives head_dim; pass head_dim=..."
    )


def _fused(
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
