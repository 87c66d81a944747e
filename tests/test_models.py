"""TinyGPT and the paper's MLPs: shapes, GQA, causality, forward-mode AD, losses."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

from lab.models import (
    DeepMLP,
    OneHiddenMLP,
    TinyGPT,
    TinyGPTConfig,
    classification_loss,
    cross_entropy,
    lm_loss,
)

SMALL = dict(vocab_size=17, context=8, n_layer=2, d_model=16, n_heads=4)


def tokens(b: int, t: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_default_shapes_and_parameter_names():
    model = TinyGPT(TinyGPTConfig(), seed=0)
    c = model.config
    assert (c.kv_heads, c.hd, c.ff) == (4, 16, 256)
    assert model(tokens(2, 10, 256)).shape == (2, 10, 256)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected = {"tok_emb.weight": (256, 64), "pos_emb.weight": (64, 64)}
    for i in range(2):
        b = f"blocks.{i}."
        expected |= {
            b + "ln_1.weight": (64,),
            b + "ln_1.bias": (64,),
            b + "attn.q_proj.weight": (64, 64),
            b + "attn.k_proj.weight": (64, 64),
            b + "attn.v_proj.weight": (64, 64),
            b + "attn.o_proj.weight": (64, 64),
            b + "ln_2.weight": (64,),
            b + "ln_2.bias": (64,),
            b + "mlp.fc_in.weight": (256, 64),
            b + "mlp.fc_out.weight": (64, 256),
        }
    expected |= {"ln_f.weight": (64,), "ln_f.bias": (64,), "lm_head.weight": (256, 64)}
    assert shapes == expected
    assert list(shapes) == list(expected)  # model order


def test_bias_flag_adds_linear_biases():
    model = TinyGPT(TinyGPTConfig(**SMALL, bias=True), seed=0)
    names = dict(model.named_parameters())
    assert names["blocks.0.attn.q_proj.bias"].shape == (16,)
    assert names["blocks.1.mlp.fc_in.bias"].shape == (64,)
    assert "lm_head.bias" not in names


def test_gqa_kv_shapes_and_equivalence_to_repeated_heads(float64):
    """GQA with 2 kv heads of 4 equals MHA whose k/v head h copies kv head h // 2."""
    gqa = TinyGPT(TinyGPTConfig(**SMALL, n_kv_heads=2), seed=0).double()
    attn = gqa.blocks[0].attn
    assert attn.k_proj.weight.shape == (2 * 4, 16) and attn.v_proj.weight.shape == (8, 16)
    assert attn.q_proj.weight.shape == (16, 16)

    mha = TinyGPT(TinyGPTConfig(**SMALL), seed=1).double()
    state = gqa.state_dict()
    for i in range(2):
        for proj in ("k_proj", "v_proj"):
            w = state[f"blocks.{i}.attn.{proj}.weight"].view(2, 4, 16)  # (kv head, hd, d)
            state[f"blocks.{i}.attn.{proj}.weight"] = w.repeat_interleave(2, dim=0).reshape(16, 16)
    mha.load_state_dict(state)
    x = tokens(3, 8, 17)
    out = gqa(x)
    assert out.shape == (3, 8, 17)
    torch.testing.assert_close(out, mha(x), rtol=0, atol=1e-12)


def test_explicit_head_dim_shapes():
    cfg = TinyGPTConfig(vocab_size=11, context=6, d_model=32, n_heads=4, head_dim=12, n_kv_heads=2)
    model = TinyGPT(cfg, seed=0)
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (48, 32)
    assert attn.k_proj.weight.shape == (24, 32)
    assert attn.v_proj.weight.shape == (24, 32)
    assert attn.o_proj.weight.shape == (32, 48)
    assert model(tokens(2, 6, 11)).shape == (2, 6, 11)


def test_causal_future_token_does_not_change_past(float64):
    model = TinyGPT(TinyGPTConfig(**SMALL), seed=0).double()
    x = tokens(2, 8, 17)
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 17
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-6


def _flat_fn(model, x):
    params = {n: p.detach() for n, p in model.named_parameters()}
    return params, lambda p: functional_call(model, p, (x,))


def test_jvp_matches_central_difference(float64):
    """Forward-mode AD through attention, GELU, LayerNorm, tied head (float64).

    The tangent has the scale of the weights (0.02): at init the LayerNorms see tiny
    pre-norm activations, so an O(1) tangent meets third derivatives ~1e5 and the central
    difference's truncation error O(eps^2 |f'''|) dominates (measured: 7e-6 at eps=1e-5,
    shrinking 100x per 10x smaller eps, i.e. truncation, not a wrong jvp). With the scaled
    tangent and eps = 1e-5 truncation is ~1e-10 and roundoff O(u |f| / eps) ~ 1e-10
    (u ~ 1e-16); measured 6e-11. atol = 1e-8 is safe, while a wrong derivative (an O(1)
    relative error on |jvp| ~ 0.4) fails by orders of magnitude.
    """
    model = TinyGPT(TinyGPTConfig(**SMALL, n_kv_heads=2, head_dim=6, tie_weights=True), seed=0)
    model = model.double()
    x = tokens(2, 8, 17)
    params, f = _flat_fn(model, x)
    gen = torch.Generator().manual_seed(1)
    tangent = {
        n: 0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()
    }
    out, jv = jvp(f, (params,), (tangent,))
    eps = 1e-5
    plus = f({n: p + eps * tangent[n] for n, p in params.items()})
    minus = f({n: p - eps * tangent[n] for n, p in params.items()})
    fd = (plus - minus) / (2 * eps)
    assert jv.abs().max() > 0.1  # a non-trivial direction
    torch.testing.assert_close(jv, fd, rtol=0, atol=1e-8)
    torch.testing.assert_close(out, model(x), rtol=0, atol=1e-12)


def test_hvp_forward_over_reverse_equals_double_backward(float64):
    model = TinyGPT(TinyGPTConfig(**SMALL, n_kv_heads=2), seed=0).double()
    batch = (tokens(2, 8, 17, seed=2), tokens(2, 8, 17, seed=3))
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(4)
    v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}

    def loss(p):
        return lm_loss(lambda idx: functional_call(model, p, (idx,)), batch)

    _, hv_fwd = jvp(grad(loss), (params,), (v,))
    g = torch.autograd.grad(lm_loss(model, batch), list(model.parameters()), create_graph=True)
    dot = sum((gi * v[n]).sum() for gi, (n, _) in zip(g, model.named_parameters(), strict=True))
    hv_bwd = torch.autograd.grad(dot, list(model.parameters()))
    for (n, _), hb in zip(model.named_parameters(), hv_bwd, strict=True):
        torch.testing.assert_close(hv_fwd[n], hb, rtol=1e-9, atol=1e-12)


def test_tied_weights_share_storage():
    model = TinyGPT(TinyGPTConfig(**SMALL, tie_weights=True), seed=0)
    assert model.lm_head.weight is model.tok_emb.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "tok_emb.weight" in names
    untied = TinyGPT(TinyGPTConfig(**SMALL), seed=0)
    assert "lm_head.weight" in dict(untied.named_parameters())
    assert sum(p.numel() for p in untied.parameters()) - sum(
        p.numel() for p in model.parameters()
    ) == (17 * 16)


def test_seed_determinism():
    a = TinyGPT(TinyGPTConfig(**SMALL), seed=3).state_dict()
    b = TinyGPT(TinyGPTConfig(**SMALL), seed=3).state_dict()
    c = TinyGPT(TinyGPTConfig(**SMALL), seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tok_emb.weight"], c["tok_emb.weight"])
    torch.manual_seed(0)
    d = TinyGPT(TinyGPTConfig(**SMALL)).state_dict()
    torch.manual_seed(0)
    e = TinyGPT(TinyGPTConfig(**SMALL)).state_dict()
    assert all(torch.equal(d[k], e[k]) for k in d)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads dividing n_heads"),
        (dict(d_model=30, n_heads=4), "pass head_dim"),
        (dict(d_model=0), "d_model must be a positive int"),
        (dict(n_layer=-1), "n_layer must be a positive int"),
        (dict(head_dim=0), "head_dim must be a positive int"),
        (dict(vocab_size=2.5), "vocab_size"),
        (dict(n_heads=True), "n_heads must be a positive int"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TinyGPTConfig(**kwargs)


def test_bad_inputs_raise():
    model = TinyGPT(TinyGPTConfig(**SMALL), seed=0)
    with pytest.raises(ValueError, match="exceeds context=8"):
        model(tokens(1, 9, 17))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match="TinyGPTConfig"):
        TinyGPT(dict(SMALL))
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {vocab}\).*vocab_size"):
        model(torch.full((1, 4), vocab))
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.full((1, 4), -1))
    with pytest.raises(ValueError, match=r"target class ids must lie in \[0, 3\)"):
        cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer class ids, got torch.float32"):
        cross_entropy(torch.zeros(2, 3), torch.tensor([1.7, 2.2]))
    with pytest.raises(ValueError, match="init_std must be finite"):
        TinyGPTConfig(init_std=float("inf"))


def test_id_checks_stay_out_of_transforms_meta_and_compile_tracing():
    """The range check reads values only when there are values: not under vmap over data, on
    meta tensors, or while torch.compile / export trace the model."""
    model = TinyGPT(TinyGPTConfig(**SMALL), seed=0)
    x = tokens(3, 4, 17)
    per_row = torch.func.vmap(lambda row: model(row[None])[0])(x)
    torch.testing.assert_close(per_row, model(x))
    with torch.device("meta"):
        meta = TinyGPT(TinyGPTConfig(**SMALL))
        assert meta(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 17)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor(x)
        assert cross_entropy(model(fake), fake).shape == ()


def test_classification_loss_checks_width_and_dtype():
    model = OneHiddenMLP(d=5, m=2, num_classes=3, seed=0)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"shape \(N, 5\).*d=5"):
        classification_loss(model, (torch.zeros(4, 6), y))
    with pytest.raises(ValueError, match="model.double"):
        classification_loss(model, (torch.zeros(4, 5, dtype=torch.float64), y))


def test_lm_loss_matches_torch_cross_entropy(float64):
    model = TinyGPT(TinyGPTConfig(**SMALL), seed=0).double()
    x, y = tokens(2, 8, 17, seed=5), tokens(2, 8, 17, seed=6)
    loss = lm_loss(model, (x, y))
    assert loss.dtype == torch.float64
    ref = F.cross_entropy(model(x).reshape(-1, 17), y.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


def test_one_hidden_mlp(float64):
    model = OneHiddenMLP(seed=0).double()
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == {
        "fc1.weight": (8, 500),
        "fc2.weight": (500, 8),
    }
    X = torch.randn(5, 500, generator=torch.Generator().manual_seed(0))
    y = torch.arange(5)
    w1, w2 = model.fc1.weight, model.fc2.weight
    torch.testing.assert_close(model(X), torch.relu(X @ w1.T) @ w2.T)
    ref = F.cross_entropy(torch.relu(X @ w1.T) @ w2.T, y)
    torch.testing.assert_close(classification_loss(model, (X, y)), ref, rtol=1e-12, atol=0)
    smooth = OneHiddenMLP(d=6, m=3, num_classes=4, activation="tanh", seed=0).double()
    Xs = X[:, :6]
    torch.testing.assert_close(
        smooth(Xs), torch.tanh(Xs @ smooth.fc1.weight.T) @ smooth.fc2.weight.T
    )
    with pytest.raises(ValueError, match="activation"):
        OneHiddenMLP(activation="sigmoid")
    with pytest.raises(ValueError, match="m must be a positive int"):
        OneHiddenMLP(m=0)


def test_deep_mlp():
    model = DeepMLP(seed=0)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == [
        (f"layers.{i}.weight", (500, 500)) for i in range(4)
    ]
    small = DeepMLP(d=3, width=5, num_classes=2, depth=3, seed=0)
    assert [tuple(p.shape) for p in small.parameters()] == [(5, 3), (5, 5), (2, 5)]
    assert small(torch.zeros(4, 3)).shape == (4, 2)
    assert torch.equal(DeepMLP(seed=1).layers[0].weight, DeepMLP(seed=1).layers[0].weight)


def _reference_tiny_gpt(model, idx):
    """TinyGPT's forward from its weights with torch's own causal SDPA (GQA) and layer norm."""
    c = model.config
    p = dict(model.named_parameters())
    B, T = idx.shape

    def linear(x, name):
        return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))

    def norm(x, name):
        return F.layer_norm(x, (c.d_model,), p[f"{name}.weight"], p[f"{name}.bias"])

    x = p["tok_emb.weight"][idx] + p["pos_emb.weight"][:T]
    for i in range(c.n_layer):
        b = f"blocks.{i}."
        h = norm(x, b + "ln_1")
        q, k, v = (
            linear(h, b + f"attn.{n}_proj").view(B, T, -1, c.hd).transpose(1, 2) for n in "qkv"
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + linear(y.transpose(1, 2).reshape(B, T, -1), b + "attn.o_proj")
        h = F.gelu(linear(norm(x, b + "ln_2"), b + "mlp.fc_in"), approximate="tanh")
        x = x + linear(h, b + "mlp.fc_out")
    head = p["tok_emb.weight"] if c.tie_weights else p["lm_head.weight"]
    return norm(x, "ln_f") @ head.T


@pytest.mark.parametrize("extra", [{}, {"n_kv_heads": 2, "bias": True, "tie_weights": True}])
def test_forward_matches_a_reference_built_on_torch_sdpa(float64, extra):
    """Pre-LN blocks, scaled causal attention (grouped query heads), tanh GELU, final norm."""
    model = TinyGPT(TinyGPTConfig(**SMALL, head_dim=6, **extra), seed=0).double()
    with torch.no_grad():  # non-trivial norms and biases: the defaults hide a skipped one
        for name, q in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                q.add_(0.1 * torch.randn(q.shape, generator=torch.Generator().manual_seed(1)))
    x = tokens(3, 7, 17)
    torch.testing.assert_close(model(x), _reference_tiny_gpt(model, x), rtol=1e-12, atol=1e-12)


def test_deep_mlp_forward_has_relu_between_layers_only(float64):
    model = DeepMLP(d=3, width=5, num_classes=2, depth=3, seed=0).double()
    X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    w = [layer.weight for layer in model.layers]
    ref = torch.relu(torch.relu(X @ w[0].T) @ w[1].T) @ w[2].T
    torch.testing.assert_close(model(X), ref, rtol=1e-12, atol=0)
    assert (model(X) < 0).any()  # no ReLU after the last layer


def test_tiny_gpt_init_scales_and_zero_biases():
    """Normal(0, init_std) weights, init_std / sqrt(2 n_layer) on the residual projections
    (o_proj, fc_out), zero biases, LayerNorm (1, 0). 16k draws per weight: the sample std is
    within 2% of the target at ~3 standard errors."""
    cfg = TinyGPTConfig(vocab_size=256, context=128, n_layer=2, d_model=128, n_heads=4,
                        bias=True, init_std=0.05)  # fmt: skip
    model = TinyGPT(cfg, seed=0)
    for name, p in model.named_parameters():
        p = p.detach()
        if ".ln_" in name or name.startswith("ln_f"):
            target = 1.0 if name.endswith("weight") else 0.0
            assert torch.equal(p, torch.full_like(p, target)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            residual = name.endswith(("o_proj.weight", "fc_out.weight"))
            std = 0.05 / math.sqrt(2 * 2) if residual else 0.05
            assert float(p.std()) == pytest.approx(std, rel=0.02), name
            assert abs(float(p.mean())) < 3 * std / math.sqrt(p.numel()), name


@pytest.mark.parametrize("model", [OneHiddenMLP(d=300, m=40, num_classes=7, seed=0),
                                   DeepMLP(d=300, width=40, num_classes=7, depth=3, seed=0)])  # fmt: skip
def test_mlp_init_is_uniform_with_bound_one_over_sqrt_fan_in(model):
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            bound = 1 / math.sqrt(layer.in_features)
            w = layer.weight.detach().abs()
            assert float(w.max()) <= bound and float(w.max()) > 0.95 * bound, layer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(init_std=0.0), "init_std must be finite and > 0, got 0.0"),
        (dict(tie_weights=1), "tie_weights must be true or false, got 1"),
        (dict(bias="yes"), "bias must be true or false"),
    ],
)
def test_more_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TinyGPTConfig(**kwargs)


def test_token_ids_must_be_a_batch_of_sequences():
    model = TinyGPT(TinyGPTConfig(**SMALL), seed=0)
    with pytest.raises(
        ValueError, match=r"integer token ids of shape \(B, T\), got torch.int64 of shape \(4,\)"
    ):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits of shape \(2, 3\) need targets of shape \(2,\)"):
        cross_entropy(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.long))
