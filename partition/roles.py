"""Roles of parameters from their names (and, given a module, its types): query, key, fused
q|k|v, neuron, token, positional, norm, experts; GPT-2 ``Conv1D`` weights; token embeddings."""

from __future__ import annotations

import re
import warnings

from torch import nn

from partition.core import ModelLike
from partition.errors import PartitionWarning
from partition.heads import unwrap

_POSITIONAL = {
    "pos_emb", "wpe", "position_embeddings", "token_type_embeddings", "embed_positions",
    "relative_attention_bias",  # T5: a learned bias per (distance bucket, head)
}  # fmt: skip
# an embedding (a leaf with "emb") with one of these words (split at "_" and digits) holds
# positions: pos_embed, pos_embedding, rel_pos_emb, class_pos_emb, DeBERTa's rel_embeddings
_POSITION_WORDS = {"pos", "positional", "rel", "relative"}
# "shared": the token embedding of T5, BART, mBART, Pegasus, Marian (tied to the output layer)
_TOKEN_EMB = {
    "tok_emb", "wte", "embed_tokens", "word_embeddings", "tok_embeddings", "embed_in", "shared",
}  # fmt: skip
# output layers: one block per token or class. cls_classifier / distillation_classifier: the two
# heads of DeiT's distillation model, plain nn.Linear maps to the classes that
# get_output_embeddings() (None for a classifier) does not name, so their names are the only
# signal; each class's row feeds only that class's logit. head / dist_head: SwiftFormer's two
# output layers, alike (timm's classifiers are named head as well); a head.weight elsewhere is a
# projection (SigLIP's text head), whose rows are its output neurons: the same blocks
_OUTPUT = {
    "lm_head", "output", "final_layer", "decoder", "embed_out", "classifier", "score",
    "cls_classifier", "distillation_classifier", "head", "dist_head",
}  # fmt: skip
# LeViT's two output layers, classifier and classifier_distill (LevitClassificationLayer), each a
# BatchNorm1d and then an nn.Linear to the classes named "linear": a name too generic alone (the
# same wrapper's linear is LeViT's every q|k|v, projection and MLP layer), but under these names
# it is the output layer, which no get_output_embeddings() names either
_OUTPUT_WRAPPERS = {"classifier", "classifier_distill"}
# q_attn: GPT-2 cross-attention; q_proj_weight, k_proj_weight, v_proj_weight: nn.MultiheadAttention
# with kdim/vdim != embed_dim; *_proj: DeBERTa(-v2), whose pos_query_proj/pos_key_proj project the
# relative-position embeddings into heads like query_proj/key_proj, each head's rows entering only
# that head's scores (p2c: k_h . pos_q_h, c2p: q_h . pos_k_h), so one block per head as well
_QUERY = {
    "q_proj", "wq", "query", "q_lin", "q_attn", "q_proj_weight", "query_proj", "pos_query_proj",
}  # fmt: skip
_KEY = {"k_proj", "wk", "key", "k_lin", "k_proj_weight", "key_proj", "pos_key_proj"}
_NEURON = {
    # values
    "v_proj", "wv", "value", "v_lin", "v_proj_weight", "value_proj",
    # attention output
    "o_proj", "wo", "out_proj", "out_lin", "c_proj", "dense",
    # MLP
    "fc_in", "fc_out", "fc1", "fc2", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
    "w1", "w2", "w3", "c_fc", "dense_h_to_4h", "dense_4h_to_h", "wi", "wi_0", "wi_1",
    # ALBERT's MLP; OPT-350m's projections between the embedding and hidden widths
    "ffn", "ffn_output", "project_in", "project_out",
    # heads' dense layers: DistilBERT's MLM transform, BigBird's pooler
    "vocab_transform", "pooler",
    # DeBERTa's talking heads (num_heads, num_heads): row h mixes all heads' scores (logits) or
    # probabilities (weights) into head h's alone, so a row is one output head, as a neuron
    "head_logits_proj", "head_weights_proj",
}  # fmt: skip
# learned tokens that every example feeds at fixed positions, as position embeddings (one block):
# BLIP-2's query_tokens (the Q-Former's queries), SigLIP's probe (its attention-pooling query),
# ViT's cls_token, DeiT's distillation_token, the latents of Perceiver and of Idefics2's perceiver
# resampler; unlike a token table, none is seen more rarely than the others. ViT's mask_token is
# fed only at masked positions, but it is one vector shared by all of them: one block as well
_LEARNED_TOKENS = {
    "query_tokens", "probe", "cls_token", "distillation_token", "latents", "mask_token",
}  # fmt: skip
_MLP_PARENTS = {"mlp", "feed_forward", "ffn", "intermediate", "block_sparse_moe"}
# bare weights stored (in, out), used as x @ w: Gemma 3's multimodal projector (also T5Gemma 2)
_IN_OUT = {"mm_input_projection_weight"}
# proj/projection: the output of an attention module under these names (Qwen2-VL's attn.proj,
# BLIP-2's self_attn.projection, timm's attn.proj); too generic a name elsewhere (ESMFold's
# seq_attention.proj is its fused input), except under a patch embedding (below)
_ATTENTION_PARENTS = {"attn", "self_attn", "attention"}
# a patch embedding's proj/projection (Qwen2-VL's Conv3d patch_embed.proj, ViT's Conv2d
# patch_embeddings.projection, timm's patch_embed.proj) has kernel = stride = patch: a linear map
# of each flattened patch, whose output channels (rows) are its output neurons, like CLIP's
# patch_embedding (a token-like name); Whisper's conv1/conv2 slide over overlapping frames
_PATCH_EMBEDDING = "patch_emb"
# in_proj_weight: nn.MultiheadAttention's q | k | v sections (F.multi_head_attention_forward)
_FUSED_QKV = {"c_attn", "qkv_proj", "wqkv", "query_key_value", "in_proj_weight"}


def module_of(name: str) -> str:
    """The component before the last, lowercase: the module of ``h.0.attn.c_attn.weight``."""
    parts = name.lower().split(".")
    return parts[-2] if len(parts) >= 2 else ""


def _is_attention(parts: list[str]) -> bool:
    return any("attn" in p or "attention" in p for p in parts)


def _is_position_embedding(leaf: str) -> bool:
    return "emb" in leaf and not _POSITION_WORDS.isdisjoint(re.split(r"[^a-z]+", leaf))


def role_of(name: str, ndim: int = 2) -> str:
    """Role of a >= 2-D parameter: q, k, fused, neuron, token, positional, learned (tokens),
    norm, experts, or ''.

    The module name is the component before ``.weight``/``.bias``; a parameter registered
    directly under another name (``mlp.experts.gate_up_proj``) is its own leaf.
    """
    parts = name.lower().split(".")
    named_leaf = parts[-1] in ("weight", "bias") and len(parts) >= 2
    leaf = parts[-2] if named_leaf else parts[-1]
    parents = parts[:-2] if named_leaf else parts[:-1]
    if ndim >= 3 and ("experts" in parts or "expert" in parts):
        return "experts"
    # a bare q/k/v/o tensor of 3+ axes has the model's own layout, with no known output axis:
    # XLNet's (d_model, n_head, d_head) q, k, v take their input on dim 0
    if ndim >= 3 and not named_leaf and leaf in {"q", "k", "v", "o"}:
        return ""
    # a norm weight of more than one axis (Cohere's (heads, head_dim) q/k norms): the module name
    # ends in "norm" (q_norm, layernorm, norm1); a matrix such as "normalizer" is no norm
    if leaf.rstrip("0123456789").endswith("norm"):
        return "norm"
    if "indexer" in parents:  # DeepSeek-V3.2's sparse-attention indexer: its wk is no model key
        return ""
    if not named_leaf and leaf in _LEARNED_TOKENS:
        return "learned"
    if leaf in _POSITIONAL or "position" in leaf or _is_position_embedding(leaf):
        return "positional"
    if leaf in _FUSED_QKV:
        return "fused_unordered" if leaf == "query_key_value" else "fused"
    if leaf in _QUERY or (leaf == "q" and _is_attention(parents)):
        return "q"
    if leaf in _KEY or (leaf == "k" and _is_attention(parents)):
        return "k"
    if leaf in _TOKEN_EMB or (("embed" in leaf or "embd" in leaf) and "type" not in leaf):
        return "token"
    if leaf in _OUTPUT or (leaf == "linear" and parents and parents[-1] in _OUTPUT_WRAPPERS):
        return "token"
    if (
        leaf in {"proj", "projection"}
        and parents
        and (parents[-1] in _ATTENTION_PARENTS or parents[-1].startswith(_PATCH_EMBEDDING))
    ):
        return "neuron"
    if leaf in _NEURON or (leaf in {"v", "o"} and _is_attention(parents)):
        return "neuron"
    if ndim == 2 and not named_leaf and leaf in _IN_OUT:  # one block per column (transposed)
        return "neuron"
    if any(p in _MLP_PARENTS for p in parents):
        return "neuron"
    return ""


def transposed_names(model: ModelLike, shapes: list[tuple[str, tuple[int, ...]]]) -> set[str]:
    """Names of 2-D weights stored ``(in, out)``: GPT-2 ``Conv1D`` weights (see
    :func:`_conv1d_names`) and bare parameters such as Gemma 3's ``mm_input_projection_weight``
    (``x @ w``), found by name with or without a module."""
    bare = {n for n, s in shapes if len(s) == 2 and n.lower().split(".")[-1] in _IN_OUT}
    return bare | _conv1d_names(model, shapes)


def _conv1d_names(model: ModelLike, shapes: list[tuple[str, tuple[int, ...]]]) -> set[str]:
    """Names of GPT-2 ``Conv1D`` weights, stored ``(in, out)``.

    With a module: the weights of modules whose class is ``transformers``' ``Conv1D``. With only
    names: the ``c_attn``/``c_proj``/``c_fc``/``q_attn`` weights of a GPT-2-style model, unless its
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
    linear_layout = any(module_of(n) == "c_attn" and len(s) == 2 and s[0] > s[1] for n, s in shapes)
    if linear_layout:
        return set()
    guessed = {
        n
        for n, s in shapes
        if len(s) == 2 and n.lower().endswith(".weight") and module_of(n) in gpt2_leaves
    }
    if guessed and not any(module_of(n) == "c_attn" for n in guessed):
        warnings.warn(
            f"adam_mini: {sorted(guessed)[0]!r} is taken to be a GPT-2 Conv1D weight stored "
            "(in, out), with one block per column, but without a c_attn weight among the names "
            "this is a guess (nanoGPT and GPTBigCode store (out, in)); pass the model itself, or "
            "AdamMini(..., model=model), so its module types decide",
            PartitionWarning,
            stacklevel=4,
        )
    return guessed


def torch_layer_kinds(model: ModelLike) -> dict[str, str]:
    """Roles of the tensors of PyTorch's own attention layers, by module type: in an
    ``nn.MultiheadAttention``, ``in_proj_weight`` fused q|k|v, ``q_proj_weight``/``k_proj_weight``
    q/k, ``v_proj_weight`` neuron, ``bias_k``/``bias_v`` (learned key/value tokens) one block;
    the ``nn.Linear`` MLP of an ``nn.TransformerEncoderLayer``/``DecoderLayer`` (``linear1``,
    ``linear2``) neuron. Empty without a module."""
    if not isinstance(model, nn.Module):
        return {}
    owned = {}
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            for leaf in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, leaf) is not None:
                    owned[id(getattr(module, leaf))] = role_of(leaf)
            for leaf in ("bias_k", "bias_v"):
                if getattr(module, leaf) is not None:
                    owned[id(getattr(module, leaf))] = "1d"
        elif isinstance(module, layers):
            for child in module.children():
                if isinstance(child, nn.Linear):
                    owned[id(child.weight)] = "neuron"
    return {name: owned[id(p)] for name, p in model.named_parameters() if id(p) in owned}


def pointwise_conv_names(model: ModelLike) -> set[str]:
    """Names of the weights of ``nn.Conv1d``/``Conv2d``/``Conv3d`` modules with kernel size 1 and
    one group: ``y[o, p] = sum_i W[o, i] x[i, p] + b[o]`` at every position ``p``, an
    ``nn.Linear`` applied per position (ViT's masked-image-modeling decoder, a 1x1 conv before a
    pixel shuffle), whose rows (output channels) are its output neurons. Found by module type:
    the name says nothing (``decoder.0``), and a shape ``(out, in, 1, 1)`` does not tell a
    transposed conv, stored ``(in, out / groups, ...)`` with input channels as rows, nor a
    grouped one. Empty without a module."""
    if not isinstance(model, nn.Module):
        return set()
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    wanted = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, convs) and m.groups == 1 and all(k == 1 for k in m.kernel_size)
    }
    return {name for name, p in model.named_parameters() if id(p) in wanted}


def token_embedding_names(model: ModelLike) -> set[str]:
    """Names of the weights of a transformers model's input and output embeddings
    (``get_input_embeddings()`` when it is an ``nn.Embedding``, ``get_output_embeddings()`` when
    2-D), looking through wrappers; empty without a module or for a model without those methods.
    A vision or audio model's "input embeddings" are a patch or feature projection (Whisper's
    ``conv1``, Pixtral's ``patch_conv``), not a token table: their rule comes from their names."""
    inner = unwrap(model, lambda m: hasattr(m, "get_input_embeddings"))
    if inner is None:
        return set()
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
