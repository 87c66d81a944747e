"""Attention head counts: from the arguments, a model's config (through wrappers), each stack's
own (encoder vs decoder), each tower's own (a composite config's sub-configs), or the query
weights' shapes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from partition.blocks import _is_int
from partition.core import ModelLike
from partition.errors import PartitionError

# resampler_n_heads / resampler_head_dim: Idefics2's perceiver_config, whose resampler splits its
# q_proj into resampler_n_heads heads and its k_proj into num_key_value_heads heads, each of
# resampler_head_dim rows (Idefics2PerceiverAttention), whatever its hidden_size
_N_HEADS = ("n_heads", "num_attention_heads", "n_head", "resampler_n_heads")
_HEAD_DIM = ("head_dim", "d_kv", "resampler_head_dim")  # d_kv: T5 family


def config_int(config: Any, *keys: str) -> int | None:
    """The first of ``keys`` that ``config`` sets to a positive int (not a bool), else None."""
    for key in keys:
        value = getattr(config, key, None)
        if _is_int(value) and value > 0:
            return int(value)
    return None


def unwrap(model: Any, found: Callable[[nn.Module], bool]) -> nn.Module | None:
    """The first of ``model`` and the modules it wraps (DDP / DataParallel's ``.module``,
    ``torch.compile``'s ``._orig_mod``) for which ``found`` holds; None when there is none or
    ``model`` is no module (``named_parameters()``, a mapping)."""
    while isinstance(model, nn.Module) and not found(model):
        # no `or`: a module's truth value calls its len(), which a compiled model may refuse
        inner = getattr(model, "module", None)
        model = getattr(model, "_orig_mod", None) if inner is None else inner
    return model if isinstance(model, nn.Module) else None


def config_of(model: ModelLike) -> Any:
    """``model.config``, looking through wrappers (see :func:`unwrap`); None when there is none."""
    inner = unwrap(model, lambda m: getattr(m, "config", None) is not None)
    return None if inner is None else inner.config


def sub_configs(model: ModelLike) -> dict[str, Any]:
    """The sub-configs of a composite ``model.config`` (transformers' ``sub_configs`` keys:
    ``text_config``, ``vision_config``, ...) of towers with attention (a head count of their own,
    or of their own sub-configs), by key; empty for a single config (MPT's ``attn_config``, which
    gives no head count, is no tower)."""
    return _tower_configs(config_of(model))


def _tower_configs(config: Any) -> dict[str, Any]:
    keys = getattr(config, "sub_configs", None)
    if not isinstance(keys, Mapping):
        return {}
    subs = {key: getattr(config, key, None) for key in keys}
    return {
        key: sub
        for key, sub in subs.items()
        if sub is not None and (config_int(sub, *_N_HEADS) or _tower_configs(sub))
    }


def towers(model: nn.Module, subs: dict[str, Any]) -> list[tuple[str, str, nn.Module]]:
    """``(key, module name, module)`` in model order: the outermost submodules whose own
    ``config`` is the sub-config ``subs[key]`` itself (transformers builds each tower from it)."""
    keys = {id(sub): key for key, sub in subs.items()}
    found: list[tuple[str, str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{prefix}.") for _, prefix, _ in found):
            continue
        config = getattr(module, "config", None)
        if config is not None and id(config) in keys:
            found.append((keys[id(config)], name, module))
    return found


def head_counts(
    model: ModelLike, n_heads: int | None, n_kv_heads: int | None, head_dim: int | None
) -> tuple[int | None, int | None, int | None]:
    """Head counts from the arguments, else ``model.config`` (TinyGPTConfig or transformers), else
    the ``num_heads`` that all of the model's ``nn.MultiheadAttention`` modules share; a
    PartitionError when one is not a positive int or ``n_kv_heads`` does not divide ``n_heads``."""
    config = config_of(model)
    if config is None and n_heads is None:
        n_heads = _multihead_attention_heads(model)
    if config is not None:
        if n_heads is None:
            n_heads = config_int(config, *_N_HEADS)
        if n_kv_heads is None:
            n_kv_heads = config_int(config, "n_kv_heads", "num_key_value_heads")
        if head_dim is None:
            head_dim = config_int(config, *_HEAD_DIM)
        if head_dim is None and n_heads:
            hidden = config_int(config, "d_model", "hidden_size", "n_embd", "dim")
            if hidden and hidden % n_heads == 0:
                head_dim = hidden // n_heads
    for label, value in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        if value is not None and not (_is_int(value) and value > 0):
            raise PartitionError(f"adam_mini: {label} must be a positive integer, got {value!r}")
    if n_heads and n_kv_heads and n_heads % n_kv_heads:
        raise PartitionError(
            f"adam_mini: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}: under "
            "grouped-query attention each key/value head serves n_heads / n_kv_heads query heads; "
            "pass the counts the model's attention uses"
        )
    return tuple(None if v is None else int(v) for v in (n_heads, n_kv_heads, head_dim))


def multihead_attention_heads(model: ModelLike) -> dict[str, tuple[str, int, int]]:
    """``{tensor name: (module name, num_heads, head_dim)}`` for the query and key weights
    (``in_proj_weight``, ``q_proj_weight``, ``k_proj_weight``) of each ``nn.MultiheadAttention``
    module of ``model``: the split its forward uses (``head_dim = embed_dim // num_heads``, also
    with kdim/vdim, whose q/k weights have embed_dim rows). Empty without a module."""
    if not isinstance(model, nn.Module):
        return {}
    owned = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for leaf in ("in_proj_weight", "q_proj_weight", "k_proj_weight"):
                if getattr(module, leaf) is not None:
                    owned[id(getattr(module, leaf))] = (mod_name, module.num_heads, module.head_dim)
    return {name: owned[id(p)] for name, p in model.named_parameters() if id(p) in owned}


def qkv_linear_heads(model: ModelLike) -> dict[str, tuple[str, int, int]]:
    """``{tensor name: (module name, num_heads, head_dim)}`` for the ``qkv`` ``nn.Linear`` weight of
    each attention module (class name with "Attention") that has ``num_heads`` or
    ``num_attention_heads``: rows q | k | v, each ``num_heads`` heads of ``head_dim`` rows, as
    transformers' vision attentions (Qwen2-VL, BLIP-2, SAM, Hiera, ...) and timm's ViT reshape it
    to ``(..., 3, num_heads, head_dim)``. Empty without a module."""
    if not isinstance(model, nn.Module):
        return {}
    owned = {}
    for mod_name, module in model.named_modules():
        qkv = getattr(module, "qkv", None)
        heads = getattr(module, "num_heads", getattr(module, "num_attention_heads", None))
        if "attention" not in type(module).__name__.lower() or not isinstance(qkv, nn.Linear):
            continue
        if not (_is_int(heads) and heads > 0 and qkv.out_features % (3 * heads) == 0):
            continue
        head_dim = qkv.out_features // (3 * heads)
        if getattr(module, "head_dim", head_dim) == head_dim:  # q | k | v of equal widths
            owned[id(qkv.weight)] = (mod_name, int(heads), head_dim)
    return {name: owned[id(p)] for name, p in model.named_parameters() if id(p) in owned}


# transformers attention modules whose forward splits these weights by the module's own head
# count and width: class name -> (heads attribute, head_dim attribute, {weight: (role, sections
# of heads * head_dim rows)}). DeBERTa (v1)'s DisentangledSelfAttention views its fused in_proj
# as (num_heads, 3 * head_dim) and chunks each head's rows into q, k, v ("interleaved"); its
# relative-position pos_q_proj (p2c scores k_h . pos_q_h) and pos_proj (c2p scores q_h . pos_k_h)
# enter only head h's scores. Perceiver's cross- and self-attentions (PerceiverSelfAttention) have
# num_heads from num_cross_attention_heads, num_self_attention_heads or a decoder's own argument,
# and qk_channels / num_heads per q and k head (qk_channels need not be d_model, d_latents or
# v_channels). Idefics (v1)'s perceiver resampler (IdeficsPerceiverAttention) is built from
# perceiver_config's resampler_n_heads and resampler_head_dim but carries no config of its own:
# its forward reshapes q_proj(latents) and k_proj([context; latents]) to (..., n_heads, head_dim)
# by its own attributes, whatever the text model's heads. DeBERTa-v2's query_proj / key_proj go
# by their names.
_OWN_SPLIT = {
    "DisentangledSelfAttention": (
        "num_attention_heads",
        "attention_head_size",
        {"in_proj": ("interleaved", 3), "pos_q_proj": ("q", 1), "pos_proj": ("k", 1)},
    ),
    "PerceiverSelfAttention": (
        "num_heads",
        "qk_channels_per_head",
        {"query": ("q", 1), "key": ("k", 1)},
    ),
    "IdeficsPerceiverAttention": ("n_heads", "head_dim", {"q_proj": ("q", 1), "k_proj": ("k", 1)}),
}


def own_split_heads(model: ModelLike) -> dict[str, tuple[str, str, int, int]]:
    """``{tensor name: (role, module name, num_heads, head_dim)}`` for the weights that a
    transformers attention module of :data:`_OWN_SPLIT` (DeBERTa v1, Perceiver, Idefics's
    resampler) splits by its own heads: ``sections * num_heads * head_dim`` rows, head ``h`` of a
    q or k weight its rows ``h * head_dim .. (h + 1) * head_dim``. Empty without a module."""
    if not isinstance(model, nn.Module):
        return {}
    owned = {}
    for mod_name, module in model.named_modules():
        cls = type(module)
        if cls.__name__ not in _OWN_SPLIT or "transformers" not in cls.__module__:
            continue
        heads_attr, dim_attr, weights = _OWN_SPLIT[cls.__name__]
        heads, head_dim = getattr(module, heads_attr), getattr(module, dim_attr)
        for leaf, (role, sections) in weights.items():
            linear = getattr(module, leaf, None)
            if isinstance(linear, nn.Linear) and linear.out_features == sections * heads * head_dim:
                owned[id(linear.weight)] = (role, mod_name, heads, head_dim)
    return {name: owned[id(p)] for name, p in model.named_parameters() if id(p) in owned}


def _multihead_attention_heads(model: ModelLike) -> int | None:
    """The ``num_heads`` that all ``nn.MultiheadAttention`` modules of ``model`` share; None
    without any or when they differ."""
    found = {heads for _, heads, _ in multihead_attention_heads(model).values()}
    return found.pop() if len(found) == 1 else None


def sided_heads(model: ModelLike) -> dict[str, int]:
    """``{"encoder": h_e, "decoder": h_d}`` for an encoder-decoder config whose two stacks have
    different head counts (``encoder_attention_heads`` != ``decoder_attention_heads``: BART,
    mBART, Marian, Pegasus, Whisper); else empty. The decoder's cross-attention has the
    decoder's heads."""
    config = config_of(model)
    if config is None:
        return {}
    enc = config_int(config, "encoder_attention_heads")
    dec = config_int(config, "decoder_attention_heads")
    return {"encoder": enc, "decoder": dec} if enc and dec and enc != dec else {}


def side_of(name: str, sided: dict[str, int]) -> str | None:
    """``"decoder"`` or ``"encoder"``: the stack a tensor name lies in (a name component), if
    the stacks have their own head counts."""
    if not sided:
        return None
    parts = name.lower().split(".")
    return next((side for side in ("decoder", "encoder") if side in parts), None)


def head_dim_from_query(
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
    name, kind = next((n, k) for n, k in kinds.items() if k in ("k", "fused_kv"))
    what = "a key" if kind == "k" else "a fused k|v"
    raise PartitionError(
        f"adam_mini: tensor {name!r} is {what} but no query tensor gives head_dim; "
        "pass head_dim=..."
    )
