"""Partition builders: the Adam-mini principle for real architectures and three simple rules.

All builders accept an ``nn.Module``, an iterable of ``(name, tensor)`` pairs (e.g.
``model.named_parameters()``) or a mapping ``name -> tensor``; tensors may live on the meta
device. Every parameter is included (``requires_grad`` is not consulted), in the given order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from partition.blocks import TensorBlocks
from partition.core import ModelLike, Partition, named_shapes
from partition.errors import PartitionError, PartitionWarning
from partition.fused import cross_kv_names, fused_heads, fused_layout, fused_row_groups
from partition.heads import (
    config_of,
    head_counts,
    head_dim_from_query,
    multihead_attention_heads,
    own_split_heads,
    qkv_linear_heads,
    side_of,
    sided_heads,
    sub_configs,
    towers,
)
from partition.roles import (
    pointwise_conv_names,
    role_of,
    token_embedding_names,
    torch_layer_kinds,
    transposed_names,
)

__all__ = ["ModelLike", "adam_mini", "by_rows", "by_tensor", "config_of", "elements"]


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
    kernels) and columns of weights stored ``(in, out)``, GPT-2 ``Conv1D`` and Gemma 3's
    ``mm_input_projection_weight`` (detected as in :func:`adam_mini`). This is the fine candidate
    partition for :func:`partition.derive`.
    """
    shapes = named_shapes(model)
    transposed = transposed_names(model, shapes)
    tensors = []
    for name, shape in shapes:
        if len(shape) < 2:
            tensors.append(TensorBlocks(name, shape, "tensor", {}))
        elif name in transposed and len(shape) == 2:
            tensors.append(TensorBlocks(name, shape, "columns", {}))
        else:
            tensors.append(TensorBlocks(name, shape, "rows", {}))
    return Partition(tensors, {"method": "by_rows"})


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
    token embeddings, output layer (lm_head;    ``rows``: one block per token (class)
    also found by a model's ``nn.Embedding``
    ``get_input_embeddings()`` and its
    ``get_output_embeddings()``; classifiers,
    DeiT's ``cls_classifier`` and
    ``distillation_classifier``, the
    ``linear`` of LeViT's ``classifier`` and
    ``classifier_distill``, SwiftFormer's
    ``head`` and ``dist_head``)
    query, key (``q_proj``, ``k_proj``, ...)    ``heads`` with ``head_dim`` (k: n_kv_heads
                                                heads under GQA)
    value, attention output, MLP, ``dense``     ``rows``: one block per output neuron
    DeBERTa's talking heads                     ``rows``: one block per output head
    (``head_logits_proj``,
    ``head_weights_proj``)
    patch embedding conv (``patch_embed.proj``, ``rows``: one block per output channel (a
    ``patch_embeddings.projection``)            linear map of each flattened patch)
    an unnamed 1x1 ``nn.Conv1d/2d/3d`` of one   ``rows``: one block per output channel (an
    group (ViT's masked-image-modeling          ``nn.Linear`` at each position), found by
    ``decoder.0``)                              module type
    GPT-2 ``Conv1D`` (``c_proj``, ``c_fc``),    ``columns`` (stored ``(in, out)``)
    Gemma 3's ``mm_input_projection_weight``
    GPT-2 fused ``c_attn``, ``qkv_proj``        ``fused_heads``: q, k by head, v by neuron
    GPT-2 cross-attention ``q_attn``, k|v       ``fused_heads`` (columns) with an empty k|v,
    ``c_attn``                                  resp. q section
    interleaved q|k|v (GPT-NeoX, Persimmon,     ``row_groups``: the same blocks in the row
    Bloom, Falcon, CodeGen; from ``config``)    order of ``config.model_type``
    DeBERTa (v1) ``in_proj`` (q, k, v per       ``row_groups``, and ``heads`` for its
    head), ``pos_q_proj``/``pos_proj``          relative-position projections (by module)
    torch ``nn.MultiheadAttention``'s           ``fused_heads`` (q | k | v); separate
    ``in_proj_weight`` (``q/k/v_proj_weight``)  q, k, v as above
    MLP ``linear1``/``linear2`` of              ``rows``, found by module type
    ``nn.Transformer{Encoder,Decoder}Layer``
    norms (also 2-D ones), biases, positional   ``tensor``: one block
    embeddings, T5's relative attention bias,
    learned tokens (BLIP-2's ``query_tokens``,
    SigLIP's ``probe``, ViT's ``cls_token``
    and ``mask_token``, DeiT's
    ``distillation_token``, the ``latents``
    of Perceiver and Idefics (1 and 2)),
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
    stack's heads (recorded as ``provenance["n_heads_by_stack"]``), unless head counts are passed;
    and in a model whose config is composite (sub-configs with their own heads: ``text_config``,
    ``vision_config``; Llava, PaliGemma, Gemma 3, CLIP, Idefics3, BLIP-2; Idefics2, whose
    ``perceiver_config`` is the connector's perceiver resampler's): each tower, the submodule
    whose ``.config`` is a sub-config, gets these rules with that sub-config's head counts
    (recorded as ``provenance["n_heads_by_tower"]``, by module name), and tensors outside
    every tower (projectors) get the rules without heads, ``rows`` for an ``nn.Linear`` weight
    (Gemma 3's bare ``mm_input_projection_weight``, used as ``x @ w``: ``columns``).
    Passing head counts for a composite model is refused: one count cannot fit towers that differ.
    An ``nn.MultiheadAttention`` module's q|k|v, q and k weights are always split by its own
    ``num_heads`` and ``head_dim`` (what its forward uses; recorded as
    ``provenance["n_heads_by_module"]``), whatever the config or the arguments say: the arguments
    split the other tensors (pass ``named_parameters()`` to split every tensor by them). So are
    a vision attention's fused ``qkv`` ``nn.Linear`` and a DeBERTa (v1) attention's ``in_proj``
    (its forward views the rows ``(num_heads, 3 * head_dim)`` and chunks each head's into q, k,
    v), ``pos_q_proj`` and ``pos_proj`` (head ``h``'s rows enter only head ``h``'s scores); with
    names alone these DeBERTa weights get one block and the warning (``in_proj`` is no q|k|v
    elsewhere: Mamba's holds x and z). Its ``q_bias``/``v_bias`` are biases: one block each. So
    are a Perceiver attention's ``query`` and ``key`` (``PerceiverSelfAttention``: ``num_heads``
    heads of ``qk_channels / num_heads`` rows; the encoder's cross-attention has
    ``num_cross_attention_heads``, its self-attentions ``num_self_attention_heads`` and a
    decoder's cross-attention a count of its own, so no one count fits the model), and those of
    Idefics (v1)'s perceiver resampler (``IdeficsPerceiverAttention``: ``q_proj`` and ``k_proj``
    of ``n_heads`` heads of ``head_dim`` rows, from ``perceiver_config``'s ``resampler_n_heads``
    and ``resampler_head_dim``; the resampler carries no config, so it is no tower).

    Learned tokens (bare parameters ``query_tokens``, ``probe``, ``cls_token``) get one block,
    deliberately and without a warning: every example feeds all of them at fixed positions, as
    it does position embeddings, so none is rarer than another (the reason a token table gets
    one block per token), and BLIP-2's queries mix through the Q-Former's self-attention.

    Unlike the reference implementation, biases get one block (not one per entry), 1-D weights
    never get a per-row rule, ``head_dim`` may differ from ``hidden / n_heads`` (Qwen3), and
    position embeddings get one block.

    Args:
        model_or_named_parameters: module, ``named_parameters()`` or mapping name -> tensor.
        n_heads: query heads; default ``model.config`` (``n_heads``/``num_attention_heads``/
            ``n_head``/``resampler_n_heads``), else the ``num_heads`` shared by its
            ``nn.MultiheadAttention`` modules (which each have their own anyway).
        n_kv_heads: key/value heads (GQA); default ``model.config``, else ``n_heads``.
        head_dim: default ``model.config.head_dim`` (T5: ``d_kv``, Idefics2's resampler:
            ``resampler_head_dim``), else ``hidden / n_heads``, else ``q rows / n_heads``.

    Raises:
        PartitionError: head counts are needed but unknown (also: a tower's tensor lies in no
            submodule carrying its sub-config), given for a composite model, or shapes do not
            split into heads.
    """
    model = model_or_named_parameters
    if not isinstance(model, (nn.Module, Mapping)) and isinstance(model, Iterable):
        model = list(model)  # read a generator once; named_shapes refuses what is not iterable
    shapes = named_shapes(model)
    _refuse_fsdp1_flat(shapes)
    built = _rules(model, shapes, n_heads, n_kv_heads, head_dim)
    _warn(built)
    return Partition(built.tensors, built.provenance)


_COUNTS = ("n_heads", "n_kv_heads", "head_dim", "n_heads_by_stack", "n_heads_by_module")


@dataclass
class _Built:
    """The blocks of some tensors, and what the warnings and the provenance need of them."""

    tensors: list[TensorBlocks]
    unrecognized: list[str]  # also those of `unordered`
    unordered: list[str]  # fused q|k|v of unknown row order
    experts: list[str]
    provenance: dict[str, Any]


def _rules(
    model: ModelLike,
    shapes: list[tuple[str, tuple[int, ...]]],
    n_heads: int | None,
    n_kv_heads: int | None,
    head_dim: int | None,
) -> _Built:
    """The rules for one model: per tower when its config is composite, else with one set of
    head counts (per stack when the encoder's and decoder's differ)."""
    heads_given = any(x is not None for x in (n_heads, n_kv_heads, head_dim))
    subs = sub_configs(model)
    if subs and heads_given:
        raise PartitionError(
            f"adam_mini: {type(model).__name__} has a composite config ({', '.join(subs)}) whose "
            "towers have their own head counts, but n_heads=/n_kv_heads=/head_dim= is one count "
            "for all of them; drop these arguments to split each tower by its own sub-config, "
            "pass one tower module with them (partition.adam_mini(model.<tower>, n_heads=...)), "
            "or pass model.named_parameters() with them to split every tensor by one count"
        )
    if subs:
        return _composite(model, shapes, subs)
    counts = head_counts(model, n_heads, n_kv_heads, head_dim)
    return _single(model, shapes, *counts, {} if heads_given else sided_heads(model))


def _composite(
    model: nn.Module, shapes: list[tuple[str, tuple[int, ...]]], subs: dict[str, Any]
) -> _Built:
    """Each tower (the submodule built from one sub-config) by its own rules and head counts;
    the tensors outside every tower (projectors) by the rules without heads, where an
    unrecognized ``nn.Linear`` weight gets one block per output neuron."""
    names = {id(p): n for n, p in model.named_parameters()}
    blocks: dict[str, TensorBlocks] = {}
    unrecognized, unordered, experts, by_tower = [], [], [], {}
    found = towers(model, subs)
    for key, prefix, tower in found:
        local = [
            (n, tuple(p.shape))
            for n, p in tower.named_parameters()
            if names[id(p)] == f"{prefix}.{n}"  # a tied tensor listed first elsewhere lives there
        ]
        try:
            built = _rules(tower, local, None, None, None)  # a tower may be composite itself
        except PartitionError as err:  # its messages name the tower's own tensor names
            raise PartitionError(f"adam_mini: in {prefix!r} (the {key} tower): {err}") from err
        for tb in built.tensors:
            blocks[f"{prefix}.{tb.name}"] = replace(tb, name=f"{prefix}.{tb.name}")
        unrecognized += [f"{prefix}.{n}" for n in built.unrecognized]
        unordered += [f"{prefix}.{n}" for n in built.unordered]
        experts += [f"{prefix}.{n}" for n in built.experts]
        drop = ("method", "unrecognized")
        by_tower[prefix] = {"config": key} | {
            k: v for k, v in built.provenance.items() if k not in drop
        }
    missing = [key for key in subs if key not in {key for key, _, _ in found}]
    where = (
        f"no submodule of {type(model).__name__} has config.{' / config.'.join(missing)} as its "
        ".config, so that tower's head counts cannot be matched to its tensors"
        if missing
        else f"it lies outside the towers of {type(model).__name__} ({', '.join(by_tower)})"
    )
    outside = [(n, s) for n, s in shapes if n not in blocks]
    rest = _single(  # a top-level head count (an inline text model) splits these
        model,
        outside,
        *head_counts(model, None, None, None),
        sided_heads(model),
        no_heads=lambda name: (
            f"adam_mini: tensor {name!r} is split by attention head, but {where}; set each "
            "tower's .config to its sub-config, or partition the tower modules one by one "
            "(partition.adam_mini(model.<tower>))"
        ),
    )
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    linear = {names[i] for i in linear if i in names}
    for tb in rest.tensors:
        if tb.name in rest.unrecognized and tb.name in linear and len(tb.shape) == 2:
            tb = TensorBlocks(tb.name, tb.shape, "rows", {})  # (out, in): one per output neuron
        blocks[tb.name] = tb
    unrecognized += [n for n in rest.unrecognized if blocks[n].rule == "tensor"]
    top = {k: v for k, v in rest.provenance.items() if k in _COUNTS and v is not None}
    provenance = {"method": "adam_mini", **top, "n_heads_by_tower": by_tower}
    provenance["unrecognized"] = unrecognized
    return _Built(
        [blocks[n] for n, _ in shapes],
        unrecognized,
        unordered + rest.unordered,
        experts + rest.experts,
        provenance,
    )


def _unknown_heads(name: str) -> str:
    """The error for ``name``, split by head, when no head count is known."""
    return (
        f"adam_mini: tensor {name!r} is split by attention head, but the number of heads is "
        "unknown; pass n_heads=... (and n_kv_heads=..., head_dim=... if they differ) or a model "
        "with a .config"
    )


def _single(
    model: ModelLike,
    shapes: list[tuple[str, tuple[int, ...]]],
    n_heads: int | None,
    n_kv_heads: int | None,
    head_dim: int | None,
    sided: dict[str, int],
    no_heads: Callable[[str], str] = _unknown_heads,
) -> _Built:
    """The rules with one set of head counts (``sided``: each stack's own); ``no_heads(name)``
    is the error for a tensor split by head when the counts are unknown."""
    transposed = transposed_names(model, shapes)
    kinds = {name: role_of(name, len(shape)) if len(shape) >= 2 else "1d" for name, shape in shapes}
    for name in token_embedding_names(model):  # whatever their names (CTRL's "w"); all 2-D
        if name in kinds:  # a composite model's part: only its own tensors
            kinds[name] = "token"
    for name, kind in torch_layer_kinds(model).items():  # nn.MultiheadAttention, linear1/linear2
        if name in kinds:
            kinds[name] = kind
    for name in pointwise_conv_names(model):  # a linear layer per position, unless named otherwise
        if kinds.get(name) == "":
            kinds[name] = "neuron"
    layout, layout_kv = fused_layout(model, n_heads)
    n_kv_heads = n_kv_heads or layout_kv
    unordered = [n for n, k in kinds.items() if k == "fused_unordered"]
    for name in unordered:  # a known layout makes them ordinary fused weights
        kinds[name] = "fused" if layout else ""
    for name in cross_kv_names(shapes, kinds):
        kinds[name] = "fused_kv"
    own = {n: v for n, v in multihead_attention_heads(model).items() if n in kinds}
    for name, heads in qkv_linear_heads(model).items():  # an attention's fused qkv nn.Linear
        if name in kinds:
            kinds[name], own[name] = "fused", heads
    for name, (role, *heads) in own_split_heads(model).items():
        if name in kinds:
            kinds[name], own[name] = role, tuple(heads)
    needs_heads = [
        n for n, k in kinds.items() if k in ("q", "k", "fused", "fused_kv") and n not in own
    ]
    if needs_heads and head_dim is None:
        if n_heads is None:
            raise PartitionError(no_heads(needs_heads[0]))
        head_dim = head_dim_from_query(shapes, kinds, transposed, n_heads, n_kv_heads)
    tensors, unrecognized, experts = [], [], []
    for name, shape in shapes:
        kind = kinds[name]
        if kind == "experts":  # (experts, out, in): one block per expert's matrix
            experts.append(name)
            tensors.append(TensorBlocks(name, shape, "rows", {}))
        elif kind in ("1d", "positional", "learned", "norm"):
            tensors.append(TensorBlocks(name, shape, "tensor", {}))
        elif name in own:  # an attention module's q|k|v, q or k, by its own num_heads
            _, heads, dim = own[name]
            if kind == "fused":
                tensors.append(fused_heads(name, shape, False, heads, heads, dim))
            elif kind == "interleaved":
                tensors.append(fused_row_groups(name, shape, kind, heads, heads, dim))
            else:
                tensors.append(_query_or_key(name, shape, kind, False, heads, dim))
        elif kind in ("q", "k"):
            heads = n_heads if kind == "q" else (n_kv_heads or n_heads)
            side = side_of(name, sided)
            if side is not None:  # this stack's own head count, all heads of one width
                heads = sided[side]
            tensors.append(
                _query_or_key(name, shape, kind, name in transposed, heads, head_dim, side)
            )
        elif kind == "fused" and layout not in (None, "sections") and name not in transposed:
            tensors.append(fused_row_groups(name, shape, layout, n_heads, n_kv_heads, head_dim))
        elif kind in ("fused", "fused_kv"):
            tensors.append(
                fused_heads(
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
    provenance = {
        "method": "adam_mini",
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads or n_heads,
        "head_dim": head_dim,
        "unrecognized": unrecognized,
    }
    if sided:
        provenance["n_heads_by_stack"] = sided
    if own:
        provenance["n_heads_by_module"] = {m: h for m, h, _ in own.values()}
    return _Built(tensors, unrecognized, unordered if not layout else [], experts, provenance)


def _warn(built: _Built) -> None:
    """The warnings for unordered fused q|k|v, unmatched tensors and stacked experts."""
    unordered, unrecognized, experts = built.unordered, built.unrecognized, built.experts
    if unordered:
        warnings.warn(
            f"adam_mini: {unordered[0]!r} fuses q|k|v in an order that differs between models "
            "(GPT-NeoX and Bloom interleave q, k, v per head; Falcon has three layouts), and names "
            "alone do not tell which; pass the model itself (its config names the layout) for "
            f"per-head blocks. The {len(unordered)} such tensor(s) get one block each",
            PartitionWarning,
            stacklevel=3,
        )
    unmatched = [n for n in unrecognized if n not in unordered]  # those were warned about
    if unmatched:
        shown = ", ".join(repr(n) for n in unmatched[:10])
        more = f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""
        warnings.warn(
            f"adam_mini: no Adam-mini rule matches {len(unmatched)} tensor(s): {shown}{more}; "
            "they get one block per tensor ('tensor'). Build a Partition by hand for other rules.",
            PartitionWarning,
            stacklevel=3,
        )
    if experts:
        warnings.warn(
            f"adam_mini: {len(experts)} stacked mixture-of-experts weight(s) such as "
            f"{experts[0]!r} get one block per expert ('rows' on the expert axis), not one per "
            "output neuron of each expert: the rules have no two-axis split. Build a Partition "
            "by hand (one tensor per expert) for per-neuron blocks.",
            PartitionWarning,
            stacklevel=3,
        )


def _refuse_fsdp1_flat(shapes: list[tuple[str, tuple[int, ...]]]) -> None:
    """Refuse FSDP1's flattened parameters: its ``_flat_param``, or (``use_orig_params=True``,
    sharded) 1-D views of every wrapped tensor, whose shapes no longer show rows or heads."""
    wrapped = [
        (n, s) for n, s in shapes if {"_flat_param", "_fsdp_wrapped_module"} & set(n.split("."))
    ]
    if wrapped and all(len(s) < 2 for _, s in wrapped):
        raise PartitionError(
            f"adam_mini: tensor {wrapped[0][0]!r} is a 1-D shard of FSDP1 "
            "(FullyShardedDataParallel), which flattens the model's tensors, so their rows and "
            "heads are lost (one block per shard would be one learning rate for many tensors); "
            "shard with FSDP2 (torch.distributed.fsdp.fully_shard), which AdamMini supports, "
            "instead of FSDP1 (use_orig_params=True shards flat views too)"
        )


def _query_or_key(
    name: str,
    shape: tuple[int, ...],
    kind: str,
    transposed: bool,
    heads: int | None,
    head_dim: int,
    side: str | None = None,
) -> TensorBlocks:
    """``heads`` for a query or key weight ``(out, in)``; a ``Conv1D`` one stored ``(in, out)``
    (GPT-2 cross-attention's ``q_attn``) gets the same blocks as one q (or k) section of
    ``fused_heads`` along its columns. ``side``: the stack (encoder or decoder) whose own
    ``heads`` split the weight into heads of one width, whatever ``head_dim``."""
    out = shape[1] if transposed else shape[0]
    if side is not None:
        if out == 0 or out % heads:
            raise PartitionError(
                f"tensor {name!r} has {out} outputs, not a multiple of the {side}'s {heads} "
                f"heads ({side}_attention_heads); pass n_heads=... (and head_dim=...) for every "
                "tensor"
            )
        head_dim = out // heads
    elif heads is not None and out % head_dim == 0 and out != heads * head_dim:
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
