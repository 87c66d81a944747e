"""The Adam-mini principle (partition.adam_mini) on real architectures, counted by hand."""

import warnings

import numpy as np
import pytest
import torch

import partition
from partition import PartitionError, PartitionWarning

transformers = pytest.importorskip("transformers")


def meta(model_cls, config):
    with torch.device("meta"):
        return model_cls(config)


def blocks_of(part, fragment):
    """Total blocks of the tensors whose name contains ``fragment``."""
    return sum(part[n].num_blocks for n in part.names if fragment in n)


def check_no_warning(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        return partition.adam_mini(model, **kw)


SMALL = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, vocab_size=97)


def decoder_expected(c, head_dim, n_bias=0, n_norm=2, tied=False):
    nh, nkv, h, f, v = (
        c.num_attention_heads,
        c.num_key_value_heads,
        c.hidden_size,
        c.intermediate_size,
        c.vocab_size,
    )
    per_layer = nh + nkv + nkv * head_dim + h + 2 * f + h + n_norm + n_bias
    return v + c.num_hidden_layers * per_layer + 1 + (0 if tied else v)


@pytest.mark.parametrize(
    ("config_cls", "model_cls", "extra"),
    [
        ("LlamaConfig", "LlamaForCausalLM", {}),
        ("MistralConfig", "MistralForCausalLM", {}),
    ],
)
def test_llama_and_mistral_gqa(config_cls, model_cls, extra):
    c = getattr(transformers, config_cls)(num_attention_heads=6, num_key_value_heads=2, **SMALL)
    model = meta(getattr(transformers, model_cls), c)
    part = check_no_warning(model)
    hd = 48 // 6
    assert part["model.layers.0.self_attn.q_proj.weight"].params == {"head_dim": hd}
    assert part["model.layers.0.self_attn.k_proj.weight"].num_blocks == 2
    assert part["model.layers.0.self_attn.v_proj.weight"].rule == "rows"
    assert part["model.embed_tokens.weight"].num_blocks == 97
    assert part["lm_head.weight"].rule == "rows"
    assert part["model.norm.weight"].rule == "tensor"
    assert part.num_blocks == decoder_expected(c, hd, tied=c.tie_word_embeddings)
    part.check(model)


def test_qwen2_biases_get_one_block():
    c = transformers.Qwen2Config(num_attention_heads=6, num_key_value_heads=2, **SMALL)
    model = meta(transformers.Qwen2ForCausalLM, c)
    part = check_no_warning(model)
    for x in "qkv":
        assert part[f"model.layers.1.self_attn.{x}_proj.bias"].rule == "tensor"
    assert part.num_blocks == decoder_expected(c, 8, n_bias=3, tied=c.tie_word_embeddings)


def test_qwen3_explicit_head_dim_and_qk_norms():
    c = transformers.Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=20, **SMALL)
    model = meta(transformers.Qwen3ForCausalLM, c)
    part = check_no_warning(model)
    q = part["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (80, 48) and q.params == {"head_dim": 20} and q.num_blocks == 4
    assert part["model.layers.0.self_attn.k_proj.weight"].num_blocks == 2
    assert part["model.layers.0.self_attn.q_norm.weight"].rule == "tensor"
    assert part["model.layers.0.self_attn.o_proj.weight"].num_blocks == 48
    expected = decoder_expected(c, 20, n_norm=4, tied=c.tie_word_embeddings)
    assert part.num_blocks == expected
    # from bare named parameters, head_dim follows from the query rows and n_heads
    named = list(model.named_parameters())
    assert partition.adam_mini(named, n_heads=4, n_kv_heads=2).tensors() == part.tensors()
    with pytest.raises(PartitionError, match="has 80 rows, not a multiple of head_dim=64"):
        partition.adam_mini(named, head_dim=64)
    with pytest.raises(PartitionError, match="n_heads=6"):
        partition.adam_mini(named, n_heads=6, head_dim=20)


def test_gpt2_conv1d_columns_and_fused_c_attn():
    c = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=97, n_positions=16)
    model = meta(transformers.GPT2LMHeadModel, c)
    part = check_no_warning(model)
    h, nh = 48, 4
    attn = part["transformer.h.0.attn.c_attn.weight"]
    assert attn.shape == (h, 3 * h) and attn.rule == "fused_heads"
    assert attn.params == {"head_dim": 12, "sections": (h, h, h), "orientation": "columns"}
    assert attn.num_blocks == nh + nh + h
    assert part["transformer.h.0.attn.c_proj.weight"].rule == "columns"
    assert part["transformer.h.0.mlp.c_fc.weight"].num_blocks == 4 * h
    assert part["transformer.h.0.mlp.c_proj.weight"].num_blocks == h
    assert part["transformer.wpe.weight"].rule == "tensor"
    assert part["transformer.wte.weight"].num_blocks == 97
    per_layer = 2 + (nh + nh + h) + 1 + h + 1 + 2 + 4 * h + 1 + h + 1
    assert part.num_blocks == 97 + 1 + 2 * per_layer + 2
    # names only: Conv1D inferred from the c_attn layout
    named = partition.adam_mini(model.named_parameters(), n_heads=nh)
    assert named.tensors() == part.tensors()
    # nanoGPT stores c_attn as nn.Linear (3d, d): rows orientation
    nano = {
        "h.0.attn.c_attn.weight": torch.empty(3 * h, h),
        "h.0.attn.c_proj.weight": torch.empty(h, h),
    }
    p = partition.adam_mini(nano, n_heads=nh)
    assert p["h.0.attn.c_attn.weight"].params["orientation"] == "rows"
    assert p["h.0.attn.c_proj.weight"].rule == "rows"


def test_bert_per_role_rules():
    c = transformers.BertConfig(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=97,
    )
    model = meta(transformers.BertForMaskedLM, c)
    part = check_no_warning(model)
    layer = "bert.encoder.layer.0."
    assert part[layer + "attention.self.query.weight"].params == {"head_dim": 12}
    assert part[layer + "attention.self.key.weight"].num_blocks == 4
    assert part[layer + "attention.self.value.weight"].rule == "rows"
    assert part[layer + "attention.output.dense.weight"].rule == "rows"
    assert part[layer + "attention.output.LayerNorm.weight"].rule == "tensor"
    assert part[layer + "intermediate.dense.weight"].num_blocks == 80
    assert part[layer + "output.dense.weight"].num_blocks == 48
    assert part["bert.embeddings.word_embeddings.weight"].num_blocks == 97
    assert part["bert.embeddings.position_embeddings.weight"].rule == "tensor"
    assert part["bert.embeddings.token_type_embeddings.weight"].rule == "tensor"
    per_layer = (4 + 1) * 2 + (48 + 1) + (48 + 1) + 2 + (80 + 1) + (48 + 1) + 2
    head = 1 + (48 + 1) + 2  # cls.predictions: bias, transform.dense, LayerNorm
    assert part.num_blocks == 97 + 1 + 1 + 2 + 2 * per_layer + head


def test_tinygpt_from_its_config():
    models = pytest.importorskip("lab.models")
    cfg = models.TinyGPTConfig(
        vocab_size=50,
        context=8,
        n_layer=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        head_dim=6,
        d_ff=40,
    )
    model = models.TinyGPT(cfg)
    part = check_no_warning(model)
    assert part["blocks.1.attn.q_proj.weight"].params == {"head_dim": 6}
    assert part["blocks.1.attn.k_proj.weight"].num_blocks == 2
    per_layer = 2 + 4 + 2 + 2 * 6 + 32 + 2 + 40 + 32
    assert part.num_blocks == 50 + 1 + 2 * per_layer + 2 + 50
    assert part["pos_emb.weight"].rule == "tensor"
    with pytest.raises(PartitionError, match="pass n_heads="):
        partition.adam_mini(model.named_parameters())


def test_llama2_7b_keeps_at_most_0_02_percent_of_v():
    c = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
    )  # fmt: skip
    model = meta(transformers.LlamaForCausalLM, c)
    part = check_no_warning(model)
    assert part.num_params == sum(p.numel() for p in model.parameters())
    assert 6.7e9 < part.num_params < 6.8e9
    share = part.num_blocks / part.num_params
    assert share <= 0.0002
    per_layer = 32 + 32 + 4096 + 4096 + 2 * 11008 + 4096 + 2
    assert part.num_blocks == 2 * 32000 + 32 * per_layer + 1


def test_unrecognized_tensors_get_one_block_and_one_warning():
    named = {
        "layers.0.weight": torch.empty(4, 3),
        "mystery.kernel": torch.empty(2, 2, 3),
        "ln.weight": torch.empty(4),
        "mlp.up.weight": torch.empty(5, 4),
    }
    with pytest.warns(PartitionWarning) as record:
        part = partition.adam_mini(named)
    assert len(record) == 1
    message = str(record[0].message)
    assert (
        "'layers.0.weight'" in message
        and "'mystery.kernel'" in message
        and "ln.weight" not in message
    )
    assert [part[n].rule for n in named] == ["tensor", "tensor", "tensor", "rows"]
    assert part.provenance["unrecognized"] == ["layers.0.weight", "mystery.kernel"]


def test_names_only_edge_layouts():
    """Fused q|k|v under GQA, GPTBigCode's multi-query c_attn (nn.Linear layout), stacked experts."""
    d, nh, kv, hd = 64, 8, 2, 8
    phi = {"layers.0.self_attn.qkv_proj.weight": torch.empty((nh + 2 * kv) * hd, d)}
    p = partition.adam_mini(phi, n_heads=nh, n_kv_heads=kv)
    assert p["layers.0.self_attn.qkv_proj.weight"].params["sections"] == (64, 16, 16)
    with pytest.raises(PartitionError, match="k=8, v=56"):
        partition.adam_mini(phi, n_heads=nh, n_kv_heads=kv, head_dim=4)

    big = {  # one shared key/value head: c_attn is (d + 2 hd, d), stored (out, in)
        "h.0.attn.c_attn.weight": torch.empty(32 + 2 * 8, 32),
        "h.0.mlp.c_fc.weight": torch.empty(128, 32),
    }
    p = partition.adam_mini(big, n_heads=4, n_kv_heads=1)
    assert p["h.0.mlp.c_fc.weight"].rule == "rows" and p["h.0.mlp.c_fc.weight"].num_blocks == 128
    assert p["h.0.attn.c_attn.weight"].params["orientation"] == "rows"

    moe = {"layers.0.mlp.experts.gate_up_proj": torch.empty(4, 192, 64)}
    with pytest.warns(PartitionWarning, match="one block per expert"):
        p = partition.adam_mini(moe, n_heads=1)
    assert p["layers.0.mlp.experts.gate_up_proj"].num_blocks == 4

    with pytest.raises(PartitionError, match="n_heads must be a positive integer, got 0"):
        partition.adam_mini(
            meta(
                transformers.LlamaForCausalLM,
                transformers.LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2),
            ),
            n_heads=0,
        )
    # 4 query heads cannot share 3 key/value heads; the shapes alone would fit (48 = 3 x 16 rows)
    gqa = {"attn.q_proj.weight": torch.empty(64, 64), "attn.k_proj.weight": torch.empty(48, 64)}
    with pytest.raises(PartitionError, match="n_heads=4 is not a multiple of n_kv_heads=3"):
        partition.adam_mini(gqa, n_heads=4, n_kv_heads=3)
    gqa["attn.k_proj.weight"] = torch.empty(32, 64)  # 2 key/value heads of 16 rows: fits
    assert partition.adam_mini(gqa, n_heads=4, n_kv_heads=2)["attn.k_proj.weight"].num_blocks == 2


def test_position_embeddings_get_one_block_under_every_name_and_token_embeddings_one_per_token():
    positional = [  # ViT/timm, torchvision ViT, Qwen3-VL vision, SEW-D, OWL-ViT, DeBERTa
        "pos_embed.weight", "visual.pos_embed.weight", "encoder.pos_embedding.weight",
        "pos_embeddings.weight", "embed_pos.weight", "rel_pos_emb.weight", "class_pos_emb",
        "decoder_pos_embed", "embeddings.position_embedding.weight",
        "embeddings.position_embeddings.weight", "encoder.rel_embeddings.weight",
    ]  # fmt: skip
    tokens = [
        "transformer.wte.weight", "model.embed_tokens.weight", "embeddings.word_embeddings.weight",
        "tok_embeddings.weight", "shared.weight", "gpt_neox.embed_in.weight", "tok_emb.weight",
    ]  # fmt: skip
    shapes = {n: torch.empty(12, 16, device="meta") for n in positional + tokens}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        p = partition.adam_mini(shapes, n_heads=1)
    assert {n: p[n].num_blocks for n in positional} == dict.fromkeys(positional, 1)
    assert {n: p[n].num_blocks for n in tokens} == dict.fromkeys(tokens, 12)
    # DeBERTa's relative-position table is an nn.Embedding, but not the input embedding
    c = transformers.DebertaV2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=40,
        vocab_size=61, relative_attention=True, max_relative_positions=8,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartitionWarning)  # its query_proj/key_proj, by name
        part = partition.adam_mini(meta(transformers.DebertaV2ForMaskedLM, c))
    assert part["deberta.encoder.rel_embeddings.weight"].shape == (16, 32)
    assert part["deberta.encoder.rel_embeddings.weight"].rule == "tensor"
    assert part["deberta.embeddings.word_embeddings.weight"].num_blocks == 61


def test_row_group_ids_beyond_the_row_count_are_refused_at_once():
    with pytest.raises(PartitionError, match="group ids"):
        partition.TensorBlocks("w", (4, 3), "row_groups", {"groups": [0, 0, 0, 10**20]})


def _row_roles(layout, out, nh, nkv, hd):
    """(role, head[, neuron]) of every row of a fused q|k|v weight, read off the reshapes that
    transformers' attention modules apply to the fused output (their ``_split_heads``)."""
    r = torch.arange(out)
    if layout == "interleaved":  # GPT-NeoX, Bloom, Falcon: view(heads, 3, head_dim)
        v = r.view(nh, 3, hd)
        q, k, val = v[:, 0], v[:, 1], v[:, 2]
    elif layout == "multi_query":  # Falcon multi_query: view(heads + 2, head_dim)
        v = r.view(nh + 2, hd)
        q, k, val = v[:-2], v[-2:-1], v[-1:]
    elif layout == "grouped":  # Falcon new decoder: view(kv, heads / kv + 2, head_dim)
        v = r.view(nkv, nh // nkv + 2, hd)
        q, k, val = v[:, :-2].reshape(nh, hd), v[:, -2], v[:, -1]
    else:  # CodeGen: 4 shards, each split into q, v, k of heads / 4 heads
        shards = r.view(4, -1)
        local = out // 12
        q, val, k = (shards[:, i * local : (i + 1) * local].reshape(nh, hd) for i in range(3))
    roles = [None] * out
    for role, rows in (("q", q), ("k", k)):
        for head, hrows in enumerate(rows):
            for row in hrows.tolist():
                roles[row] = (role, head)
    for head, hrows in enumerate(val):
        for j, row in enumerate(hrows.tolist()):
            roles[row] = ("v", head, j)
    return roles


@pytest.mark.parametrize(
    "arch, layout",
    [
        ("gpt_neox", "interleaved"),
        ("bloom", "interleaved"),
        ("falcon_mha", "interleaved"),
        ("falcon_multi_query", "multi_query"),
        ("falcon_new", "grouped"),
        ("codegen", "codegen"),
    ],
)
def test_fused_query_key_value_row_orders(arch, layout):
    """One block per q head, per k head and per v row, whatever the fused row order."""
    t, h, nh = transformers, 64, 8
    nkv = {"falcon_multi_query": 1, "falcon_new": 2}.get(arch, nh)
    falcon = dict(hidden_size=h, num_hidden_layers=1, num_attention_heads=nh, vocab_size=50)
    model_and_config = {
        "gpt_neox": (
            t.GPTNeoXForCausalLM,
            t.GPTNeoXConfig(
                hidden_size=h,
                num_hidden_layers=1,
                num_attention_heads=nh,
                intermediate_size=4 * h,
                vocab_size=50,
            ),
        ),
        "bloom": (
            t.BloomForCausalLM,
            t.BloomConfig(hidden_size=h, n_layer=1, n_head=nh, vocab_size=50),
        ),
        "falcon_mha": (t.FalconForCausalLM, t.FalconConfig(**falcon, multi_query=False)),
        "falcon_multi_query": (t.FalconForCausalLM, t.FalconConfig(**falcon, multi_query=True)),
        "falcon_new": (
            t.FalconForCausalLM,
            t.FalconConfig(**falcon, new_decoder_architecture=True, num_kv_heads=nkv),
        ),
        "codegen": (
            t.CodeGenForCausalLM,
            t.CodeGenConfig(n_embd=h, n_layer=1, n_head=nh, rotary_dim=4, vocab_size=50),
        ),
    }[arch]
    model = meta(*model_and_config)
    part = check_no_warning(model)
    [name] = [n for n in part.names if "query_key_value.weight" in n or "qkv_proj.weight" in n]
    tb = part[name]
    hd = h // nh
    roles = _row_roles(layout, tb.shape[0], nh, nkv, hd)
    ids = tb.axis_ids().tolist()
    assert len(set(zip(roles, ids, strict=True))) == len(set(roles)) == len(set(ids))
    assert tb.num_blocks == nh + nkv + nkv * hd


def test_query_key_value_without_a_config_warns_instead_of_guessing():
    named = {"layers.0.attention.query_key_value.weight": torch.empty(3 * 64, 64)}
    with pytest.warns(PartitionWarning, match="interleave q, k, v per head.*pass the model") as rec:
        part = partition.adam_mini(named, n_heads=8)
    assert len(rec) == 1, "one warning, not a second generic one"
    assert part["layers.0.attention.query_key_value.weight"].rule == "tensor"


def test_fused_gqa_weight_without_kv_heads_is_refused_not_guessed():
    """96 outputs of 64 inputs with 8 query heads: (8 + 2 x 2) x 8 (GQA) or 3 x 32 (MHA, 4-wide
    heads); without n_kv_heads the split is ambiguous."""
    phi = {"layers.0.self_attn.qkv_proj.weight": torch.empty(96, 64)}
    with pytest.raises(PartitionError, match="96 outputs from 64 inputs.*pass n_kv_heads"):
        partition.adam_mini(phi, n_heads=8)
    assert partition.adam_mini(phi, n_heads=8, n_kv_heads=2)[
        "layers.0.self_attn.qkv_proj.weight"
    ].params["sections"] == (64, 16, 16)


def test_param_groups_take_conv1d_or_linear_from_the_model():
    """GPTBigCode stores c_fc as nn.Linear (out, in): one block per row, also in a param group
    without c_attn; names alone must say that the GPT-2 Conv1D layout is a guess."""
    optimizer = pytest.importorskip("optimizer")
    c = transformers.GPTBigCodeConfig(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=8)
    model = transformers.GPTBigCodeForCausalLM(c)
    named = list(model.named_parameters())
    groups = [
        {"params": [(n, p) for n, p in named if ".mlp." in n]},
        {"params": [(n, p) for n, p in named if ".mlp." not in n], "lr": 1e-4},
    ]
    opt = optimizer.AdamMini(groups, partition=None, model=model)
    c_fc = opt.partition["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc.shape == (128, 32) and c_fc.rule == "rows" and c_fc.num_blocks == 128
    assert set(opt.partition.tensors()) == set(partition.adam_mini(model).tensors())
    mlp_only = [(n, p) for n, p in named if ".mlp." in n]
    with pytest.warns(PartitionWarning, match="c_fc.weight' is taken to be a GPT-2 Conv1D"):
        partition.adam_mini(mlp_only)


def test_adam_mini_optimizer_reads_a_wrapped_models_fused_layout():
    """AdamMini(inner.named_parameters(), model=wrapper): the wrapper's names carry a prefix
    ('module.'); tensors are matched by identity, so CodeGen's q, v, k shards stay per head."""
    optimizer = pytest.importorskip("optimizer")
    c = transformers.CodeGenConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, vocab_size=50)
    inner = transformers.CodeGenForCausalLM(c)

    class Wrapper(torch.nn.Module):  # what DDP looks like to named_parameters()
        def __init__(self, module):
            super().__init__()
            self.module = module

    opt = optimizer.AdamMini(inner.named_parameters(), partition=None, model=Wrapper(inner))
    name = "transformer.h.0.attn.qkv_proj.weight"
    assert opt.partition[name] == partition.adam_mini(inner)[name]
    assert opt.partition[name].rule == "row_groups"


def test_a_compiled_model_inside_a_data_parallel_wrapper():
    """DataParallel / DDP around torch.compile: unwrapping tested the compiled module's truth
    value, whose len() raises for a model without one (a TypeError from torch._dynamo)."""
    c = transformers.GPTNeoXConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=61,
    )  # fmt: skip
    model = meta(transformers.GPTNeoXForCausalLM, c)
    wrapped = torch.nn.DataParallel(torch.compile(model))
    part = check_no_warning(wrapped)
    name = "module._orig_mod.gpt_neox.layers.0.attention.query_key_value.weight"
    inner = partition.adam_mini(model)[name.removeprefix("module._orig_mod.")]
    assert (part[name].rule, part[name].params) == (inner.rule, inner.params)
    assert part[name].rule == "row_groups"


def test_empty_query_weight_and_numpy_head_counts():
    """An empty query weight gave head_dim 0 and a ZeroDivisionError; numpy ints were refused."""
    for shape in [(0, 8), (0, 0)]:
        with pytest.raises(PartitionError, match="'attn.q_proj.weight' has no query outputs"):
            partition.adam_mini({"attn.q_proj.weight": torch.empty(shape)}, n_heads=2)
    named = {"attn.q_proj.weight": torch.empty(8, 8), "attn.k_proj.weight": torch.empty(4, 8)}
    part = partition.adam_mini(named, n_heads=np.int64(2), n_kv_heads=np.int32(1))
    assert part == partition.adam_mini(named, n_heads=2, n_kv_heads=1)
    assert type(part.provenance["n_heads"]) is int


def test_a_conv_input_embedding_keeps_the_rule_of_its_name():
    """An audio or vision model's get_input_embeddings() is a conv (Whisper encoder's conv1),
    not a token table: it keeps the rule its name gives, like its sibling conv2, and the module
    and its names agree (4934b39 gave it one block per channel, so an AdamMini checkpoint saved
    before no longer loaded)."""
    c = transformers.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, vocab_size=61,
        num_mel_bins=8, max_source_positions=16, max_target_positions=16, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    model = meta(transformers.WhisperForAudioClassification, c)
    assert isinstance(model.get_input_embeddings(), torch.nn.Conv1d)
    with pytest.warns(PartitionWarning, match="'encoder.conv1.weight', 'encoder.conv2.weight'"):
        part = partition.adam_mini(model)
    assert part["encoder.conv1.weight"].rule == "tensor"
    with pytest.warns(PartitionWarning):
        named = partition.adam_mini(list(model.named_parameters()), n_heads=4)
    assert part.tensors() == named.tensors()


def test_only_a_norm_module_is_a_norm():
    """A 2-D norm (Cohere's (heads, head_dim) q_norm) gets one block without a warning, but a
    weight matrix whose name merely contains 'norm' keeps its rule (4934b39 gave an MLP's
    'normalizer' one block instead of one per output neuron)."""
    shapes = {
        "layers.0.self_attn.q_norm.weight": (4, 8),
        "layers.0.k_layernorm.weight": (2, 8),
        "layers.0.norm1.weight": (2, 8),
        "layers.0.mlp.normalizer.weight": (16, 8),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        part = partition.adam_mini(shapes)
    assert [part[n].rule for n in shapes] == ["tensor", "tensor", "tensor", "rows"]
    assert part["layers.0.mlp.normalizer.weight"].num_blocks == 16


def _stacks_model(decoder_rows: int) -> torch.nn.Module:
    """An encoder-decoder whose config gives its stacks 4 and 3 heads (BART-family names)."""
    model = torch.nn.Module()
    model.config = transformers.PretrainedConfig(
        num_attention_heads=4, encoder_attention_heads=4, decoder_attention_heads=3, d_model=32
    )
    for side, rows in (("encoder", 32), ("decoder", decoder_rows)):
        stack = torch.nn.Module()
        stack.q_proj = torch.nn.Linear(32, rows, bias=False, device="meta")
        model.add_module(side, stack)
    return model


def test_each_stack_splits_by_its_own_heads_and_says_when_it_cannot():
    part = check_no_warning(_stacks_model(decoder_rows=30))
    assert part["encoder.q_proj.weight"].params == {"head_dim": 8}
    assert part["decoder.q_proj.weight"].params == {"head_dim": 10}
    assert part.provenance["n_heads_by_stack"] == {"encoder": 4, "decoder": 3}
    with pytest.raises(
        PartitionError,
        match=r"'decoder.q_proj.weight' has 32 outputs, not a multiple of the decoder's 3 heads "
        r"\(decoder_attention_heads\); pass n_heads=",
    ):
        partition.adam_mini(_stacks_model(decoder_rows=32))


def test_a_fused_kv_weight_without_a_query_weight_asks_for_head_dim():
    """GPT-2 cross-attention's k|v ``c_attn`` next to a 1-D ``q_attn``: no query gives head_dim
    (this was a bare StopIteration)."""
    named = {
        "h.0.crossattention.q_attn.weight": torch.empty(8),
        "h.0.crossattention.c_attn.weight": torch.empty(8, 16),
    }
    with pytest.raises(
        PartitionError,
        match=r"'h.0.crossattention.c_attn.weight' is a fused k\|v but no query tensor gives "
        r"head_dim; pass head_dim=",
    ):
        partition.adam_mini(named, n_heads=2)
    kv = partition.adam_mini(named, n_heads=2, head_dim=4)["h.0.crossattention.c_attn.weight"]
    assert kv.num_blocks == 2 + 8  # k: 2 heads of 4 columns; v: 8 columns


def test_xlnet_bare_attention_tensors_are_not_split_along_their_input_axis():
    """XLNet's q, k, v are bare (d_model, n_head, d_head) parameters (q_head = einsum('ibh,hnd->
    ibnd', h, q)): dim 0 is the input, so 'heads' on dim 0 cut every head across input features
    and 'rows' gave v one block per input. No rule splits dim 1: one block each, and a warning."""
    c = transformers.XLNetConfig(d_model=32, n_layer=1, n_head=4, d_inner=40, vocab_size=61)
    model = meta(transformers.XLNetLMHeadModel, c)
    with pytest.warns(PartitionWarning, match="rel_attn.q'"):
        part = partition.adam_mini(model)
    for leaf in "qkv":
        tb = part[f"transformer.layer.0.rel_attn.{leaf}"]
        ids = tb.local_index()
        # every head n (ids[:, n, :]) lies in one block, whatever the numbering
        assert all(ids[:, n, :].unique().numel() == 1 for n in range(4)), (leaf, tb.rule)


@pytest.mark.parametrize(
    "shapes",
    [
        {"_fsdp_wrapped_module._flat_param": (1136,)},  # use_orig_params=False
        {  # use_orig_params=True on 2 ranks: rank 0's 1-D views of its shard (some empty)
            "_fsdp_wrapped_module.tok_emb.weight": (128,),
            "_fsdp_wrapped_module.blocks.0.ln_1.weight": (8,),
            "_fsdp_wrapped_module.blocks.0.attn.q_proj.weight": (64,),
            "_fsdp_wrapped_module.lm_head.weight": (0,),
        },
    ],
)
def test_fsdp1_flattened_parameters_are_refused_not_given_one_block(shapes):
    """FSDP1 (FullyShardedDataParallel) flattens a TinyGPT into 1-D shards (the names and
    shapes it gives): every tensor got one block, silently, so Adam-mini ran with one learning
    rate per shard; and each rank saw its own shapes."""
    with pytest.raises(PartitionError, match="FSDP1.*fully_shard.*use_orig_params"):
        partition.adam_mini(shapes, n_heads=2)
    unsharded = {  # world size 1 (NO_SHARD) with use_orig_params=True keeps the shapes
        "_fsdp_wrapped_module.blocks.0.attn.q_proj.weight": (8, 8),
        "_fsdp_wrapped_module.blocks.0.ln_1.weight": (8,),
    }
    assert partition.adam_mini(unsharded, n_heads=2).num_blocks == 2 + 1
