"""partition.adam_mini on models whose config is composite (``text_config``, ``vision_config``):
each tower (the submodule built from one sub-config) is split by its own head counts, checked
against the heads each tower's attention itself receives (``head_supports`` of
tests/test_partition_architectures.py); the tensors between towers (projectors) get the rules
without heads."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

import optimizer
import partition
from partition import PartitionError, PartitionWarning

transformers = pytest.importorskip("transformers")
from test_partition_architectures import block_sets, head_supports  # noqa: E402

TEXT = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, vocab_size=64)
GQA = dict(TEXT, num_attention_heads=4, num_key_value_heads=2, head_dim=12)  # 12 != 32 / 4
VISION = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=1, num_attention_heads=3,
              image_size=8, patch_size=4)  # fmt: skip
IMAGE_TOKEN, PATCHES = 63, 4  # (8 / 4)^2 patches, one image token each


def _llava():
    config = transformers.LlavaConfig(
        text_config=dict(GQA, model_type="llama"),
        vision_config=dict(VISION, model_type="clip_vision_model"),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
    )
    return transformers.LlavaForConditionalGeneration(config)


def _paligemma():
    config = transformers.PaliGemmaConfig(
        text_config=dict(GQA, model_type="gemma"),
        vision_config=dict(VISION, vision_use_head=False),
        projection_dim=32,
        image_token_index=IMAGE_TOKEN,
    )
    return transformers.PaliGemmaForConditionalGeneration(config)


def _gemma3():  # 2 x 2 patches, pooled to mm_tokens_per_image = 4 image tokens
    config = transformers.Gemma3Config(
        text_config=GQA,
        vision_config=dict(VISION, vision_use_head=False),
        mm_tokens_per_image=PATCHES,
        image_token_index=IMAGE_TOKEN,
        boi_token_index=61,
        eoi_token_index=62,
    )
    return transformers.Gemma3ForConditionalGeneration(config)


def _clip():
    config = transformers.CLIPConfig(
        text_config=dict(TEXT, num_attention_heads=4, max_position_embeddings=16),
        vision_config=VISION,
        projection_dim=16,
    )
    return transformers.CLIPModel(config)


def _idefics2():  # a perceiver resampler (2 q heads, 1 kv head of 8) in its connector, no tower
    config = transformers.Idefics2Config(
        text_config=dict(GQA, model_type="mistral"),
        vision_config=VISION,
        perceiver_config=dict(hidden_size=32, resampler_n_latents=PATCHES, resampler_depth=1,
                              resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=1),
        image_token_id=IMAGE_TOKEN,
    )  # fmt: skip
    return transformers.Idefics2ForConditionalGeneration(config)


# name: (builder, {tower module name: (q heads, kv heads)}, projector weights (nn.Linear))
MODELS = {
    "llava": (
        _llava,
        {"model.vision_tower": (3, 3), "model.language_model": (4, 2)},
        ["model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_2.weight"],
    ),
    "paligemma": (
        _paligemma,
        {"model.vision_tower": (3, 3), "model.language_model": (4, 2)},
        ["model.multi_modal_projector.linear.weight"],
    ),
    "gemma3": (  # its projector is a bare (in, out) parameter, not an nn.Linear
        _gemma3,
        {"model.vision_tower": (3, 3), "model.language_model": (4, 2)},
        [],
    ),
    "clip": (
        _clip,
        {"text_model": (4, 4), "vision_model": (3, 3)},
        ["text_projection.weight", "visual_projection.weight"],
    ),
    "idefics2": (  # the resampler's heads come from perceiver_config (resampler_n_heads)
        _idefics2,
        {"model.vision_model": (3, 3), "model.connector.perceiver_resampler": (2, 1),
         "model.text_model": (4, 2)},
        [f"model.connector.modality_projection.{x}_proj.weight" for x in ("gate", "up", "down")],
    ),
}  # fmt: skip


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[arch][0]()
    model.config._attn_implementation_internal = "eager"
    return model


def batch(arch: str, size: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(size, 3, 8, 8, generator=g)
    if arch == "idefics2":  # (batch, images, channels, height, width)
        pixels = pixels.unsqueeze(1)
    ids = torch.randint(3, IMAGE_TOKEN, (size, 6), generator=g)
    if arch == "clip":
        return {"input_ids": ids, "pixel_values": pixels}
    ids = torch.cat([torch.full((size, PATCHES), IMAGE_TOKEN), ids], dim=1)
    return {"input_ids": ids, "pixel_values": pixels}


def adam_mini_quiet(model: nn.Module) -> partition.Partition:
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)  # every tensor has a rule
        return partition.adam_mini(model)


@pytest.mark.parametrize("arch", list(MODELS))
def test_each_tower_splits_q_and_k_by_its_own_heads(arch):
    model = build(arch)
    part = adam_mini_quiet(model)
    part.check(model)
    heads = MODELS[arch][1]
    assert len(set(heads.values())) > 1  # the towers differ, so one count cannot fit both
    supports = head_supports(model, batch(arch))
    seen = set()
    for name, roles in supports.items():
        (tower,) = [t for t in heads if name.startswith(f"{t}.")]
        seen.add(tower)
        want = dict(zip("qk", heads[tower], strict=True))
        for role, sets in roles.items():  # v: one block per neuron, whatever the heads
            assert role == "v" or len(sets) == want[role], f"{name}: {len(sets)} {role} heads"
        found = {entries for sets in roles.values() for entries in sets}
        assert block_sets(part, name) == found, f"{name}: {part[name].rule} {part[name].params}"
    assert seen == set(heads)


@pytest.mark.parametrize("arch", list(MODELS))
def test_towers_keep_their_own_rules_and_projectors_get_rows(arch):
    model = build(arch)
    part = adam_mini_quiet(model)
    modules = dict(model.named_modules())
    for prefix, (nq, nkv) in MODELS[arch][1].items():
        alone = partition.adam_mini(modules[prefix])  # the tower as a model of its own
        for name in alone.names:
            assert part[f"{prefix}.{name}"].rule == alone[name].rule, name
            assert part[f"{prefix}.{name}"].params == alone[name].params, name
        recorded = part.provenance["n_heads_by_tower"][prefix]
        assert (recorded["n_heads"], recorded["n_kv_heads"]) == (nq, nkv)
    for name in MODELS[arch][2]:
        assert part[name].rule == "rows" and part[name].num_blocks == part[name].shape[0], name
    assert "n_heads" not in part.provenance  # no one count for the whole model
    auto = optimizer.AdamMini(model.named_parameters(), partition=None, model=model)
    assert auto.partition.tensors() == part.tensors()


def test_tower_head_counts_survive_the_json_file(tmp_path):
    part = adam_mini_quiet(build("llava"))
    part.to_json(tmp_path / "llava.json")
    again = partition.Partition.from_json(tmp_path / "llava.json")
    assert again == part
    assert again.provenance["n_heads_by_tower"]["model.vision_tower"]["head_dim"] == 16


def test_the_one_count_refusal_is_gone_but_explicit_counts_are_refused():
    model = build("llava")
    adam_mini_quiet(model)  # used to say "pass n_heads="
    with pytest.raises(PartitionError, match="number of heads is unknown; pass n_heads="):
        partition.adam_mini(dict(model.named_parameters()))  # names alone: no config
    with pytest.raises(PartitionError, match="composite config .*text_config.*one count"):
        partition.adam_mini(model, n_heads=4)
    with pytest.raises(PartitionError, match="composite config .*text_config.*one count"):
        optimizer.AdamMini(model.named_parameters(), partition=None, model=model, n_heads=4)
    tower = partition.adam_mini(model.model.vision_tower, n_heads=6)  # one tower, overridden
    assert tower["encoder.layers.0.self_attn.q_proj.weight"].num_blocks == 6


def test_idefics2_model_without_its_lm_head_is_split_alike():
    """Idefics2Model (no lm_head) gets the blocks it gets inside Idefics2ForConditionalGeneration,
    its resampler's q and k by perceiver_config's heads, in one call."""
    whole = adam_mini_quiet(build("idefics2"))
    with torch.device("meta"):
        model = transformers.Idefics2Model(_idefics2().config)
    part = adam_mini_quiet(model)
    assert all(part[n] == replace(whole[f"model.{n}"], name=n) for n in part.names)
    recorded = part.provenance["n_heads_by_tower"]["connector.perceiver_resampler"]
    assert (recorded["n_heads"], recorded["n_kv_heads"], recorded["head_dim"]) == (2, 1, 8)


def _idefics():  # Idefics (v1): its text model inline, its resampler (2 heads of 16) in no tower
    config = transformers.IdeficsConfig(
        **TEXT, num_attention_heads=4, additional_vocab_size=2, use_resampler=True,
        freeze_text_layers=False, freeze_vision_layers=False,  # to probe them by gradient
        vision_config=dict(embed_dim=48, intermediate_size=40, num_hidden_layers=1,
                           num_attention_heads=3, image_size=8, patch_size=4),
        perceiver_config=dict(resampler_n_latents=PATCHES, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=16),
    )  # fmt: skip
    return transformers.IdeficsForVisionText2Text(config)


# attentions under these module names: (q heads, kv heads) as each attention receives them
IDEFICS_HEADS = {
    "model.vision_model": (3, 3),
    "model.perceiver_resampler": (2, 2),  # perceiver_config's, not the text model's 4
    "model.layers": (4, 4),
    "model.gated_cross_attn_layers": (4, 4),
}


def test_idefics_resampler_is_split_by_its_own_heads():
    """Idefics (v1)'s perceiver resampler (``use_resampler=True``) is built from perceiver_config's
    ``resampler_n_heads`` heads of ``resampler_head_dim``, but carries no config, so it is no
    tower: its q_proj (of the latents) and k_proj (of the context and latents concatenated) are
    split by the attention's own heads, not the text model's (4 of 8 rows: the same 32 rows, so
    the text's split would silently cut each resampler head in two). In one call with no warning,
    every q and k block of the whole model must be the rows that feed one of the heads its
    attention receives."""
    torch.manual_seed(0)
    model = _idefics()
    model.config._attn_implementation_internal = "eager"
    part = adam_mini_quiet(model)
    part.check(model)
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(3, 64, (2, 6), generator=g),
        "pixel_values": torch.randn(2, 1, 3, 8, 8, generator=g),  # one image each
        "image_attention_mask": torch.ones(2, 6, 1, dtype=torch.long),
    }
    seen = set()
    for name, roles in head_supports(model, batch).items():
        (prefix,) = [p for p in IDEFICS_HEADS if name.startswith(f"{p}.")]
        seen.add(prefix)
        want = dict(zip("qk", IDEFICS_HEADS[prefix], strict=True))
        for role, sets in roles.items():  # v: one block per neuron, whatever the heads
            assert role == "v" or len(sets) == want[role], f"{name}: {len(sets)} {role} heads"
        found = {entries for sets in roles.values() for entries in sets}
        assert block_sets(part, name) == found, f"{name}: {part[name].rule} {part[name].params}"
    assert seen == set(IDEFICS_HEADS)
    resampler = "model.perceiver_resampler.blocks.0.0"
    assert part.provenance["n_heads_by_module"] == {resampler: 2}


def test_a_tower_whose_module_cannot_be_found_is_a_clear_error():
    """A composite config whose towers carry no ``.config``: their head counts fit no tensor."""

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = _clip().config
            self.vision = nn.ModuleDict({"q_proj": nn.Linear(48, 48), "k_proj": nn.Linear(48, 48)})
            self.projection = nn.Linear(48, 32)

    with pytest.raises(PartitionError, match="'vision.q_proj.weight'.*config.vision_config"):
        partition.adam_mini(Custom())


def _qwen2_vl():  # vision heads of 16 = embed_dim / num_heads, not hidden_size / num_heads
    text = dict(TEXT, num_attention_heads=4, num_key_value_heads=2)
    text["rope_parameters"] = dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=1e4)
    vision = dict(depth=1, embed_dim=48, hidden_size=32, num_heads=3, mlp_ratio=1, patch_size=2,
                  temporal_patch_size=2, spatial_merge_size=2)  # fmt: skip
    config = transformers.Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=61,
        vision_start_token_id=62,
    )  # fmt: skip
    return transformers.Qwen2VLForConditionalGeneration(config)


def _qwen2_vl_batch(g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.cat(
        [torch.tensor([[62, IMAGE_TOKEN]]), torch.randint(3, 60, (1, 5), generator=g)], 1
    )
    return {  # one 2 x 2 grid of patches of 3 x 2 x 2 x 2, merged into one image token
        "input_ids": ids,
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
        "pixel_values": torch.randn(4, 24, generator=g),
        "image_grid_thw": torch.tensor([[1, 2, 2]]),
    }


def _blip_2():
    config = transformers.Blip2Config(
        vision_config=VISION,
        qformer_config=dict(TEXT, num_attention_heads=4, encoder_hidden_size=48),
        text_config=dict(TEXT, model_type="opt", ffn_dim=40, num_attention_heads=4),
        num_query_tokens=2,
        image_token_index=IMAGE_TOKEN,
    )
    return transformers.Blip2ForConditionalGeneration(config)


def _blip_2_batch(g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.cat([torch.full((1, 2), IMAGE_TOKEN), torch.randint(3, 60, (1, 5), generator=g)], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 8, 8, generator=g)}


# name: (builder, batch, the vision attention's module name, its heads, its output projection)
FUSED_QKV = {
    "qwen2_vl": (_qwen2_vl, _qwen2_vl_batch, "model.visual.blocks.0.attn", 3, "proj"),
    "blip_2": (_blip_2, _blip_2_batch, "vision_model.encoder.layers.0.self_attn", 3, "projection"),
}


@pytest.mark.parametrize("arch", list(FUSED_QKV))
def test_a_vision_towers_fused_qkv_is_split_by_its_attentions_heads(arch):
    builder, make_batch, attn, heads, out = FUSED_QKV[arch]
    torch.manual_seed(0)
    model = builder()
    model.config._attn_implementation_internal = "eager"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PartitionWarning)
        part = partition.adam_mini(model)
    said = " ".join(str(w.message) for w in caught)
    qkv, proj = f"{attn}.qkv.weight", f"{attn}.{out}.weight"
    assert qkv not in said and proj not in said
    part.check(model)
    roles = head_supports(model, make_batch(torch.Generator().manual_seed(1)))[qkv]
    assert (len(roles["q"]), len(roles["k"])) == (heads, heads)  # as the model splits its heads
    assert block_sets(part, qkv) == {entries for sets in roles.values() for entries in sets}
    assert part[proj].rule == "rows" and part[proj].num_blocks == part[proj].shape[0]


def changed_outputs(forward, weight: nn.Parameter, entries: torch.Tensor) -> set[int]:
    """The output features (last axis) of ``forward()`` that change when the ``entries`` (a mask)
    of ``weight`` are perturbed."""
    before = forward()
    saved = weight.detach().clone()
    noise = torch.randn(
        weight.shape, generator=torch.Generator().manual_seed(3), dtype=weight.dtype
    )
    with torch.no_grad():
        weight.add_(noise * entries)
    after = forward()
    with torch.no_grad():
        weight.copy_(saved)
    diff = (after - before).abs().flatten(0, -2).amax(0)
    return set((diff > 1e-12).nonzero().flatten().tolist())


def check_neurons(part: partition.Partition, name: str, weight: nn.Parameter, forward) -> None:
    """Every block of ``name`` moves exactly one output feature of ``forward()``, each feature
    one block: one block per output neuron, as the model uses the weight."""
    ids = part[name].local_index().expand(weight.shape)
    moved = [changed_outputs(forward, weight, ids == b) for b in range(part[name].num_blocks)]
    assert all(len(m) == 1 for m in moved), f"{name}: {part[name].rule} blocks moved {moved}"
    assert sorted(f for m in moved for f in m) == list(range(forward().shape[-1])), name


def test_gemma3_projector_weight_is_split_by_output_neuron():
    """Gemma 3's projector multiplies the pooled vision features by its bare
    ``mm_input_projection_weight`` stored (in, out): one block per column, its output neuron."""
    model = build("gemma3").double()
    part = adam_mini_quiet(model)
    name = "model.multi_modal_projector.mm_input_projection_weight"
    assert part[name].rule == "columns" and part[name].shape == (48, 32)
    assert partition.by_rows(model)[name] == part[name]  # the fine candidate agrees
    projector = model.model.multi_modal_projector
    named = adam_mini_quiet({name: projector.mm_input_projection_weight})
    assert named[name] == part[name]  # the name alone says (in, out)
    features = torch.randn(2, PATCHES, 48, generator=torch.Generator().manual_seed(1)).double()
    check_neurons(part, name, projector.mm_input_projection_weight, lambda: projector(features))


def _vit():
    config = transformers.ViTConfig(**dict(VISION, num_attention_heads=3))
    return transformers.ViTModel(config)


# name: (builder, its patch embedding module, the conv's name in it, the shape of an input)
PATCH_EMBEDDINGS = {
    "qwen2_vl": (_qwen2_vl, "model.visual.patch_embed", "proj", (4, 24)),  # 3 x 2 x 2 x 2 each
    "vit": (_vit, "embeddings.patch_embeddings", "projection", (2, 3, 8, 8)),
}


@pytest.mark.parametrize("arch", list(PATCH_EMBEDDINGS))
def test_a_patch_embedding_conv_is_split_by_output_channel(arch):
    """A patch embedding's conv (Qwen2-VL's Conv3d patch_embed.proj, ViT's Conv2d
    patch_embeddings.projection) has kernel = stride = patch, a linear map of each flattened
    patch: each block must move exactly one output channel of the embedding."""
    builder, prefix, leaf, shape = PATCH_EMBEDDINGS[arch]
    torch.manual_seed(0)
    model = builder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PartitionWarning)
        part = partition.adam_mini(model)
    embedding, conv = model.get_submodule(prefix).double(), model.get_submodule(f"{prefix}.{leaf}")
    assert isinstance(conv, nn.Conv3d if arch == "qwen2_vl" else nn.Conv2d)
    name = f"{prefix}.{leaf}.weight"
    assert name not in " ".join(str(w.message) for w in caught)
    assert part[name].rule == "rows" and part[name].num_blocks == conv.out_channels
    assert adam_mini_quiet({name: conv.weight})[name] == part[name]  # the names alone agree
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    check_neurons(part, name, conv.weight, lambda: embedding(x))


def _siglip():
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION))


def _pixels(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}


def _blip_2_pair(g: torch.Generator) -> dict[str, torch.Tensor]:
    one, two = _blip_2_batch(g), _blip_2_batch(g)
    return {k: torch.cat([one[k], two[k]]) for k in one}


def _vit_masked():
    config = transformers.ViTConfig(**dict(VISION, num_attention_heads=3))
    return transformers.ViTModel(config, use_mask_token=True)


def _masked_pixels(g: torch.Generator) -> dict[str, torch.Tensor]:
    masked = torch.tensor([[True, False, True, False], [False, False, False, True]])  # per patch
    return dict(_pixels(g), bool_masked_pos=masked)


def _deit():
    return transformers.DeiTModel(transformers.DeiTConfig(**VISION))


def _perceiver():
    config = transformers.PerceiverConfig(
        num_latents=4, d_latents=16, d_model=8, num_blocks=1, num_self_attends_per_block=1,
        num_self_attention_heads=2, num_cross_attention_heads=2, qk_channels=8, v_channels=16,
    )  # fmt: skip
    return transformers.PerceiverModel(config)


# name: (builder, a batch of two examples, the learned tokens (..., tokens, hidden), head counts)
LEARNED_TOKENS = {
    "blip_2": (_blip_2, _blip_2_pair, "query_tokens", {}),  # num_query_tokens = 2
    "siglip": (_siglip, _pixels, "head.probe", {}),
    "vit": (_vit, _pixels, "embeddings.cls_token", {}),
    "vit_mask": (_vit_masked, _masked_pixels, "embeddings.mask_token", {}),
    "deit": (_deit, _pixels, "embeddings.distillation_token", {}),
    "perceiver": (  # each attention is split by its own heads
        _perceiver,
        lambda g: {"inputs": torch.randn(2, 3, 8, generator=g)},
        "embeddings.latents",
        {},
    ),
    "idefics2": (  # the whole model: the resampler's heads come from its perceiver_config
        _idefics2,
        lambda g: batch("idefics2", size=2),
        "model.connector.perceiver_resampler.latents",
        {},
    ),
}  # fmt: skip


def _output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "pooler_output", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise AssertionError(f"no output in {type(out).__name__}")


@pytest.mark.parametrize("arch", list(LEARNED_TOKENS))
def test_learned_tokens_get_one_block_without_a_warning(arch):
    """Learned tokens (BLIP-2's Q-Former queries, SigLIP's pooling probe, ViT's cls_token and
    mask_token, DeiT's distillation_token, Perceiver's and Idefics2's latents) get one block, as
    position embeddings: each example's output depends on every one of them (the mask token where
    an example is masked), so, unlike the rows of a token table, none is seen more rarely than the
    others."""
    builder, make_batch, name, counts = LEARNED_TOKENS[arch]
    torch.manual_seed(0)
    model = builder().double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)  # every tensor has a rule
        part = partition.adam_mini(model, **counts)
    tokens = model.get_parameter(name)
    assert part[name].rule == "tensor" and part[name].num_blocks == 1
    assert adam_mini_quiet({name: tokens})[name] == part[name]  # the names alone agree
    batch = make_batch(torch.Generator().manual_seed(1))
    out = _output(
        model(**{k: v.double() if v.is_floating_point() else v for k, v in batch.items()})
    )
    for example in out:  # every example reaches every learned token
        (grad,) = torch.autograd.grad(example.pow(2).sum(), tokens, retain_graph=True)
        per_token = grad.abs().flatten(0, -2).amax(-1)
        assert bool((per_token > 0).all()), f"{name}: {per_token}"


def _deit_teacher():  # two output layers: on the class token and on the distillation token
    return transformers.DeiTForImageClassificationWithTeacher(
        transformers.DeiTConfig(**VISION, num_labels=5)
    )


def _vit_classifier():
    return transformers.ViTForImageClassification(transformers.ViTConfig(**VISION, num_labels=5))


def _vit_mim():  # its decoder: a 1x1 conv to 4^2 x 3 channels, then a pixel shuffle by 4
    config = transformers.ViTConfig(**VISION, encoder_stride=4)
    return transformers.ViTForMaskedImageModeling(config)


# name: (builder, the whole model's head counts (q, kv), its batch)
VISION_MODELS = {
    "deit_teacher": (_deit_teacher, (3, 3), _pixels),
    "vit_mim": (_vit_mim, (3, 3), _masked_pixels),
}


@pytest.mark.parametrize("arch", list(VISION_MODELS))
def test_a_vision_models_q_and_k_are_split_by_its_heads_with_no_warning(arch):
    """The whole model: every tensor has a rule, and each q and k weight's blocks are the rows
    that feed one of the heads its attention receives."""
    builder, (nq, nkv), make_batch = VISION_MODELS[arch]
    torch.manual_seed(0)
    model = builder()
    model.config._attn_implementation_internal = "eager"
    part = adam_mini_quiet(model)
    part.check(model)
    supports = head_supports(model, make_batch(torch.Generator().manual_seed(1)))
    assert {role for roles in supports.values() for role in roles} == {"q", "k", "v"}
    for name, roles in supports.items():
        for role, sets in roles.items():  # v: one block per neuron, whatever the heads
            assert role == "v" or len(sets) == {"q": nq, "k": nkv}[role], f"{name}: {role}"
        found = {entries for sets in roles.values() for entries in sets}
        assert block_sets(part, name) == found, f"{name}: {part[name].rule} {part[name].params}"


def _levit_teacher():  # 2 x 2 tokens (32 / 16), subsampled to 1; two output layers on their mean
    config = transformers.LevitConfig(
        image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[2, 3, 4], depths=[1, 1, 1],
        key_dim=[4, 4, 4], attention_ratio=[2, 2, 2], mlp_ratio=[2, 2, 2], num_labels=5,
    )  # fmt: skip
    return transformers.LevitForImageClassificationWithTeacher(config)


def _swiftformer():  # two output layers, head and dist_head; its logits are their mean
    config = transformers.SwiftFormerConfig(
        image_size=16, depths=[1, 1], embed_dims=[8, 16], downsamples=[True, True], mlp_ratio=2,
        num_labels=5,
    )  # fmt: skip
    return transformers.SwiftFormerForImageClassification(config)


# name: (builder, an output layer's weight, the logits it alone produces)
CLASSIFIERS = {
    "vit": (_vit_classifier, "classifier.weight", "logits"),
    "deit_cls": (_deit_teacher, "cls_classifier.weight", "cls_logits"),
    "deit_distillation": (_deit_teacher, "distillation_classifier.weight", "distillation_logits"),
    "levit_cls": (_levit_teacher, "classifier.linear.weight", "cls_logits"),
    "levit_distillation": (_levit_teacher, "classifier_distill.linear.weight", "distillation_logits"),
    "swiftformer_head": (_swiftformer, "head.weight", "logits"),
    "swiftformer_dist_head": (_swiftformer, "dist_head.weight", "logits"),
}  # fmt: skip
# whole models with other tensors that no rule matches, which get the warning: LeViT's q|k|v
# (per head q, k and a wider v), projection and MLP nn.Linear are all named "linear" in a wrapper
# with a BatchNorm1d, its overlapping stride-2 patch convs and attention_biases; SwiftFormer's
# additive attention (to_query, to_key, w_g, final), 3x3 convs and (dim, 1, 1) layer scales
PARTLY_MATCHED = {"levit_cls", "levit_distillation", "swiftformer_head", "swiftformer_dist_head"}


@pytest.mark.parametrize("arch", list(CLASSIFIERS))
def test_an_image_classifiers_output_layers_get_one_block_per_class(arch):
    """An output layer gets one block per class, as an LM head one per token. DeiT's, LeViT's and
    SwiftFormer's distillation models have two (DeiT's cls_classifier on the class token and
    distillation_classifier on the distillation token; LeViT's classifier and classifier_distill,
    both on the mean token, each an nn.Linear "linear" after a BatchNorm1d; SwiftFormer's head and
    dist_head; the logits are their mean): each block of each must move exactly one class's logit
    of that layer's own logits (SwiftFormer returns only the mean, which each class's row of
    either moves in that class alone)."""
    builder, name, logits = CLASSIFIERS[arch]
    torch.manual_seed(0)
    model = builder().double().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PartitionWarning)
        part = partition.adam_mini(model)
    said = [str(w.message) for w in caught]
    assert repr(name) not in " ".join(said) and (not said or arch in PARTLY_MATCHED)
    weight = model.get_parameter(name)
    assert part[name].rule == "rows" and part[name].num_blocks == model.config.num_labels
    assert adam_mini_quiet({name: weight})[name] == part[name]  # the names alone agree
    side, g = model.config.image_size, torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, side, side, generator=g, dtype=torch.float64)
    check_neurons(part, name, weight, lambda: getattr(model(pixel_values=x), logits))


def test_a_1x1_conv_decoder_is_split_by_output_channel():
    """ViT's masked-image-modeling decoder is a 1x1 conv to r^2 x 3 channels and a pixel shuffle
    by r = encoder_stride: the same linear map of the hidden state at every patch, whose output
    channel (colour, dy, dx) is the pixel at (dy, dx) of each patch's r x r cell in one colour.
    Each block must move exactly that: one colour at one place in every cell, each (colour,
    place) moved by one block. With names alone ("decoder.0") the weight keeps one block and the
    warning."""
    torch.manual_seed(0)
    model = _vit_mim().double().eval()
    name, conv, r = "decoder.0.weight", model.decoder[0], model.config.encoder_stride
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    part = adam_mini_quiet(model)
    assert part[name].rule == "rows" and part[name].num_blocks == 3 * r * r
    with pytest.warns(PartitionWarning, match="'decoder.0.weight'"):
        assert partition.adam_mini({name: conv.weight})[name].rule == "tensor"
    batch = _masked_pixels(torch.Generator().manual_seed(1))
    batch["pixel_values"] = batch["pixel_values"].double()

    def pixels() -> torch.Tensor:  # (batch, colour x 8 x 8)
        return model(**batch).reconstruction.flatten(1)

    ids = part[name].local_index().expand(conv.weight.shape)
    places = set()
    for b in range(part[name].num_blocks):
        moved = [
            (i // 64, i // 8 % 8, i % 8) for i in changed_outputs(pixels, conv.weight, ids == b)
        ]
        (place,) = {(c, y % r, x % r) for c, y, x in moved}  # one colour, one place in the cells
        assert len(moved) == (8 // r) ** 2, f"block {b} moved {moved}"  # in every cell
        places.add(place)
    assert len(places) == 3 * r * r


@pytest.mark.parametrize(
    "conv",
    [nn.ConvTranspose2d(6, 4, 1), nn.Conv2d(6, 4, 3), nn.Conv2d(6, 4, 1, groups=2)],
    ids=["1x1 transposed", "3x3", "1x1 grouped"],
)
def test_only_a_1x1_conv_of_one_group_is_a_linear_layer(conv):
    """A transposed 1x1 conv (stored (in, out, 1, 1): its rows are inputs), a wider kernel and a
    grouped conv are no linear layer per position: one block and the warning."""
    with pytest.warns(PartitionWarning, match="'0.weight'"):
        assert partition.adam_mini(nn.Sequential(conv))["0.weight"].rule == "tensor"
