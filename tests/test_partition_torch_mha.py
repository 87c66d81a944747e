"""partition.adam_mini on PyTorch's own attention (``nn.MultiheadAttention``, and through it
``nn.TransformerEncoderLayer``/``DecoderLayer``/``nn.Transformer``) and on a hand-written timm-style
ViT attention (a fused ``qkv`` ``nn.Linear``): every q and k block must be exactly the rows of one
head as the module splits them, checked by perturbing one block and seeing which heads' attention
weights change."""

import warnings

import pytest
import torch
from torch import nn

import optimizer
import partition
from partition import PartitionError, PartitionWarning

E, NH, FF = 32, 4, 40


def quiet_adam_mini(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        return partition.adam_mini(model, **kw)


def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=E, nhead=NH, dim_feedforward=FF, batch_first=True)
    with warnings.catch_warnings():  # enable_nested_tensor's notice about norm_first
        warnings.simplefilter("ignore", UserWarning)
        return nn.TransformerEncoder(layer, num_layers=2)


def transformer():
    torch.manual_seed(0)
    return nn.Transformer(
        d_model=E,
        nhead=NH,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=FF,
        batch_first=True,
    )


def changed_heads(mha, weight, rows, inputs):
    """The heads whose attention weights on ``inputs`` (query, key, value) change when ``rows``
    of ``weight`` (a parameter of ``mha``) are perturbed."""
    mha.eval()

    def attention():
        with torch.no_grad():
            return mha(*inputs, need_weights=True, average_attn_weights=False)[1]

    before = attention()
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[rows] += torch.randn(weight[rows].shape, generator=torch.Generator().manual_seed(3))
    after = attention()
    with torch.no_grad():
        weight.copy_(saved)
    diff = (after - before).abs().amax(dim=(0, 2, 3))  # (batch, heads, L, S) -> per head
    return {h for h in range(diff.numel()) if diff[h] > 1e-6}


def check_heads(part, model, prefix, mha, weights, inputs):
    """Every q and k block of ``weights`` (names under ``prefix``) moves exactly one head, each of
    ``mha``'s heads once per q and once per k; v blocks move none."""
    moved = {"q": [], "k": []}
    for leaf in weights:
        name = f"{prefix}.{leaf}"
        param = dict(model.named_parameters())[name]
        ids = part[name].local_index()[:, 0]  # all rules here are constant along a row
        for block in range(part[name].num_blocks):
            rows = (ids == block).nonzero().flatten()
            heads = changed_heads(mha, param, rows, inputs)
            if leaf == "in_proj_weight":
                role = "qkv"[int(rows[0]) // mha.embed_dim]
            else:
                role = leaf[0]
            if role == "v":
                assert heads == set(), f"{name} block {block} (v) moved heads {heads}"
            else:
                assert len(heads) == 1, f"{name} block {block} moved heads {heads}"
                moved[role] += sorted(heads)
    assert sorted(moved["q"]) == sorted(moved["k"]) == list(range(mha.num_heads))


def test_transformer_encoder_blocks_follow_torchs_head_split():
    model = encoder()
    part = quiet_adam_mini(model)
    part.check(model)
    a = "layers.1.self_attn."
    assert part[a + "in_proj_weight"].rule == "fused_heads"
    assert part[a + "in_proj_weight"].params["sections"] == (E, E, E)
    assert part[a + "in_proj_weight"].num_blocks == NH + NH + E
    assert part[a + "out_proj.weight"].rule == "rows"
    assert part["layers.1.linear1.weight"].num_blocks == FF
    assert part["layers.1.linear2.weight"].num_blocks == E
    per_layer = (NH + NH + E) + E + FF + E + 8  # + 4 biases and 4 norm tensors of one block
    assert part.num_blocks == 2 * per_layer
    x = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(1))
    check_heads(
        part, model, "layers.1.self_attn", model.layers[1].self_attn, ["in_proj_weight"], (x, x, x)
    )


def test_transformer_cross_attention_and_decoder_mlp():
    model = transformer()
    part = quiet_adam_mini(model)
    part.check(model)
    d = "decoder.layers.0."
    for attn in ("self_attn", "multihead_attn"):
        assert part[d + attn + ".in_proj_weight"].num_blocks == NH + NH + E
    assert part[d + "linear1.weight"].rule == part[d + "linear2.weight"].rule == "rows"
    g = torch.Generator().manual_seed(1)
    tgt, memory = torch.randn(2, 3, E, generator=g), torch.randn(2, 6, E, generator=g)
    mha = model.decoder.layers[0].multihead_attn
    check_heads(part, model, d + "multihead_attn", mha, ["in_proj_weight"], (tgt, memory, memory))


def test_separate_projections_when_kdim_and_vdim_differ():
    torch.manual_seed(0)
    model = nn.Module()
    model.attn = nn.MultiheadAttention(E, NH, kdim=12, vdim=20, batch_first=True, add_bias_kv=True)
    part = quiet_adam_mini(model)
    part.check(model)
    assert part["attn.q_proj_weight"].params == {"head_dim": E // NH}
    assert part["attn.k_proj_weight"].num_blocks == NH
    assert part["attn.v_proj_weight"].rule == "rows"
    assert part["attn.bias_k"].rule == part["attn.bias_v"].rule == "tensor"
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, n, d, generator=g) for n, d in ((3, E), (6, 12), (6, 20))]
    leaves = ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    check_heads(part, model, "attn", model.attn, leaves, inputs)


def test_modules_that_differ_in_num_heads_are_split_by_their_own(tmp_path):
    torch.manual_seed(0)
    decoder = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(E, 8, dim_feedforward=FF, batch_first=True), num_layers=1
    )
    model = nn.Transformer(
        d_model=E,
        nhead=NH,
        num_encoder_layers=1,
        dim_feedforward=FF,
        batch_first=True,
        custom_decoder=decoder,
    )
    part = quiet_adam_mini(model)
    part.check(model)
    assert part.provenance["n_heads_by_module"] == {
        "encoder.layers.0.self_attn": NH,
        "decoder.layers.0.self_attn": 8,
        "decoder.layers.0.multihead_attn": 8,
    }
    part.to_json(tmp_path / "p.json")
    assert partition.Partition.from_json(tmp_path / "p.json") == part
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randn(2, 6, E, generator=g), torch.randn(2, 3, E, generator=g)
    enc = model.encoder.layers[0].self_attn
    check_heads(part, model, "encoder.layers.0.self_attn", enc, ["in_proj_weight"], (src,) * 3)
    d = "decoder.layers.0."
    for attn, inputs in (("self_attn", (tgt,) * 3), ("multihead_attn", (tgt, src, src))):
        mha = getattr(model.decoder.layers[0], attn)
        check_heads(part, model, d + attn, mha, ["in_proj_weight"], inputs)
    opt = optimizer.AdamMini(model.named_parameters(), partition=None, model=model)
    model(src, tgt).pow(2).mean().backward()
    opt.step()
    assert sum(s["exp_avg_sq"].numel() for s in opt.state.values()) == part.num_blocks


def test_explicit_head_counts_split_the_other_tensors_only():
    torch.manual_seed(0)
    model = nn.Module()
    model.pool = nn.MultiheadAttention(E, 1, kdim=12, vdim=12, batch_first=True)
    model.attn = nn.Module()
    model.attn.q_proj, model.attn.k_proj = nn.Linear(E, E), nn.Linear(E, E)
    part = quiet_adam_mini(model)  # no config: the one MHA module's count splits the rest too
    assert part["attn.q_proj.weight"].params == {"head_dim": E}
    part = quiet_adam_mini(model, n_heads=8)
    part.check(model)
    assert part["attn.q_proj.weight"].params == part["attn.k_proj.weight"].params
    assert part["attn.q_proj.weight"].params == {"head_dim": E // 8}
    assert part["pool.q_proj_weight"].params == {"head_dim": E}
    assert part["pool.k_proj_weight"].num_blocks == 1
    assert part.provenance["n_heads"] == 8
    assert part.provenance["n_heads_by_module"] == {"pool": 1}
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, n, d, generator=g) for n, d in ((1, E), (6, 12), (6, 12))]
    leaves = ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    check_heads(part, model, "pool", model.pool, leaves, inputs)
    named = partition.adam_mini(model.named_parameters(), n_heads=8)  # names: one count for all
    assert named["pool.q_proj_weight"].num_blocks == 8
    optimizer.AdamMini(model.named_parameters(), partition=partition.by_tensor(model), model=model)


@pytest.mark.parametrize("pool_heads", [None, 1])
def test_siglip_pooling_head_by_its_own_num_heads(pool_heads):
    transformers = pytest.importorskip("transformers")
    config = transformers.SiglipVisionConfig(
        hidden_size=E,
        intermediate_size=FF,
        num_hidden_layers=1,
        num_attention_heads=NH,
        image_size=16,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(config)
    if pool_heads is not None:  # a one-head attention-pooling head under a 4-head config
        model.head.attention = nn.MultiheadAttention(E, pool_heads, batch_first=True)
    mha = model.head.attention
    part = quiet_adam_mini(model)  # head.probe, the learned query token: one block, deliberately
    part.check(model)
    assert part["head.probe"].rule == "tensor"
    heads = pool_heads or NH
    assert part.provenance["n_heads"] == NH
    assert part.provenance["n_heads_by_module"] == {"head.attention": heads}
    assert part["head.attention.in_proj_weight"].num_blocks == heads + heads + E
    assert part["encoder.layers.0.self_attn.q_proj.weight"].num_blocks == NH
    g = torch.Generator().manual_seed(1)
    probe, states = model.head.probe.detach(), torch.randn(1, 4, E, generator=g)
    inputs = (probe, states, states)
    check_heads(part, model, "head.attention", mha, ["in_proj_weight"], inputs)


class Attention(nn.Module):
    """timm's ViT attention, written out: ``qkv`` is reshaped ``(B, N, 3, num_heads, head_dim)``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention weights ``(B, heads, N, N)``, head outputs ``(B, heads, N, head_dim)``."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        probs = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)
        return probs, probs @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.heads(x)[1].transpose(1, 2).flatten(2))


class Block(nn.Module):
    """timm's ViT block: pre-norm attention and MLP, each added to the residual stream."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, FF), nn.Linear(FF, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


def moved_by_block(attn: Attention, rows: torch.Tensor, x: torch.Tensor) -> tuple[set, set]:
    """The heads whose attention weights change, and the ``(head, dim)`` entries of the heads'
    outputs that change, when ``rows`` of ``attn.qkv.weight`` are perturbed."""
    weight = attn.qkv.weight
    with torch.no_grad():
        before = attn.heads(x)
        saved = weight.clone()
        g = torch.Generator().manual_seed(3)
        weight[rows] += torch.randn(weight[rows].shape, generator=g, dtype=weight.dtype)
        after = attn.heads(x)
        weight.copy_(saved)
    probs = (after[0] - before[0]).abs().amax(dim=(0, 2, 3))
    outs = (after[1] - before[1]).abs().amax(dim=(0, 2))  # (heads, head_dim)
    return set((probs > 1e-12).nonzero().flatten().tolist()), {
        tuple(e) for e in (outs > 1e-12).nonzero().tolist()
    }


def test_timm_style_vit_attention_fused_qkv_follows_its_own_head_split():
    """Each q or k block of a timm-style ``qkv`` moves the attention weights and the output of
    exactly one head, every head once per q and once per k; each v block (none moves the
    weights) one entry of one head's output: split by each module's own num_heads, 4 and 2."""
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList([Block(E, NH), Block(E, 2)])
    model.double()
    part = quiet_adam_mini(model)
    part.check(model)
    assert part.provenance["n_heads_by_module"] == {"blocks.0.attn": NH, "blocks.1.attn": 2}
    assert part["blocks.1.attn.proj.weight"].rule == part["blocks.1.mlp.fc1.weight"].rule == "rows"
    x = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for i, block in enumerate(model.blocks):
        name, heads = f"blocks.{i}.attn.qkv.weight", block.attn.num_heads
        ids = part[name].local_index()[:, 0]
        qk, v = [], []
        for b in range(part[name].num_blocks):
            moved_heads, moved_outputs = moved_by_block(block.attn, ids == b, x)
            if moved_heads:
                assert len(moved_heads) == 1, f"{name} block {b} moved heads {moved_heads}"
                assert {h for h, _ in moved_outputs} == moved_heads, f"{name} block {b}"
                qk += sorted(moved_heads)
            else:
                assert len(moved_outputs) == 1, f"{name} block {b} (v) moved {moved_outputs}"
                v += sorted(moved_outputs)
        assert sorted(qk) == sorted(2 * list(range(heads))), name
        assert sorted(v) == [(h, d) for h in range(heads) for d in range(E // heads)], name


def test_names_only():
    named = list(encoder().named_parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        part = partition.adam_mini(named, n_heads=NH)
    assert part["layers.0.self_attn.in_proj_weight"].num_blocks == NH + NH + E
    assert part["layers.0.linear1.weight"].rule == "tensor"  # bare names are too generic
    [warning] = [w for w in caught if issubclass(w.category, PartitionWarning)]
    assert "layers.0.linear1.weight" in str(warning.message)
    with pytest.raises(PartitionError, match="n_heads="):
        partition.adam_mini(named)


def test_adam_mini_optimizer_trains_a_transformer_encoder():
    model = encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        opt = optimizer.AdamMini(model.named_parameters(), partition=None, model=model, lr=1e-2)
    part = quiet_adam_mini(model)
    x = torch.randn(4, 5, E, generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    model(x).pow(2).mean().backward()
    opt.step()
    stepped = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    assert len(stepped) == len(before)
    assert sum(opt.state[p]["exp_avg_sq"].numel() for _, p in stepped) == part.num_blocks
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
