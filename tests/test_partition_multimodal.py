"""partition.adam_mini on models whose config is composite (``text_config``, ``vision_config``):
each tower (the submodule built from one sub-config) is split by its own head counts, checked
against the heads each tower's attention itself receives (``head_supports`` of
tests/test_partition_architectures.py); the tensors between towers (projectors) get the rules
without heads."""

from __future__ import annotations

import warnings

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


def _clip():
    config = transformers.CLIPConfig(
        text_config=dict(TEXT, num_attention_heads=4, max_position_embeddings=16),
        vision_config=VISION,
        projection_dim=16,
    )
    return transformers.CLIPModel(config)


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
    "clip": (
        _clip,
        {"text_model": (4, 4), "vision_model": (3, 3)},
        ["text_projection.weight", "visual_projection.weight"],
    ),
}  # fmt: skip


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[arch][0]()
    model.config._attn_implementation_internal = "eager"
    return model


def batch(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 3, 8, 8, generator=g)
    ids = torch.randint(3, IMAGE_TOKEN, (1, 6), generator=g)
    if arch == "clip":
        return {"input_ids": ids, "pixel_values": pixels}
    ids = torch.cat([torch.full((1, PATCHES), IMAGE_TOKEN), ids], dim=1)
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
