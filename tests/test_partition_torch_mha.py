"""partition.adam_mini on PyTorch's own attention (``nn.MultiheadAttention``, and through it
``nn.TransformerEncoderLayer``/``DecoderLayer``/``nn.Transformer``): every q and k block must be
exactly the rows of one head as torch splits them, checked by perturbing one block and seeing
which heads' attention weights change."""

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
    """Every q and k block of ``weights`` (names under ``prefix``) moves exactly one head, each
    head once per q and once per k; v blocks move none."""
    moved = {"q": [], "k": []}
    for leaf in weights:
        name = f"{prefix}.{leaf}"
        param = dict(model.named_parameters())[name]
        ids = part[name].local_index()[:, 0]  # all rules here are constant along a row
        for block in range(part[name].num_blocks):
            rows = (ids == block).nonzero().flatten()
            heads = changed_heads(mha, param, rows, inputs)
            if leaf == "in_proj_weight":
                role = "qkv"[int(rows[0]) // E]
            else:
                role = leaf[0]
            if role == "v":
                assert heads == set(), f"{name} block {block} (v) moved heads {heads}"
            else:
                assert len(heads) == 1, f"{name} block {block} moved heads {heads}"
                moved[role] += sorted(heads)
    assert sorted(moved["q"]) == sorted(moved["k"]) == list(range(NH))


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


def test_head_counts_of_multihead_attention_modules():
    model = nn.ModuleDict({"a": nn.MultiheadAttention(E, NH), "b": nn.MultiheadAttention(E, 2)})
    with pytest.raises(PartitionError, match=r"'a'.*'b'.*n_heads="):
        partition.adam_mini(model)
    optimizer.AdamMini(model.named_parameters(), partition=partition.by_tensor(model), model=model)
    part = quiet_adam_mini(model, n_heads=2)  # an explicit count wins
    assert part["a.in_proj_weight"].params["head_dim"] == E // 2
    assert quiet_adam_mini(encoder(), n_heads=2)[
        "layers.0.self_attn.in_proj_weight"
    ].num_blocks == (2 + 2 + E)


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
