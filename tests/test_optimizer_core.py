"""AdamMini: exactness against AdamW and the reference adam-mini, fast paths vs the reference loop."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import optimizer
import partition
from optimizer import cpu_fused
from optimizer.kernels import Hyper, adamw_update_, reference_update_
from partition import Partition, TensorBlocks

pytestmark = pytest.mark.filterwarnings("ignore::partition.PartitionWarning")  # Sequential names

FUSED_MODES = [False] + ([None] if cpu_fused.load() is not None else [])


def tiny_llama(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=64,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).to(dtype)


def lm_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x, labels=x).loss.backward()
    opt.step()


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


def test_elements_partition_is_adamw_bitwise():
    model = tiny_llama(torch.float32)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = optimizer.AdamMini(
        ours.named_parameters(), partition.elements(ours), lr=1e-2, weight_decay=0.1, decay_1d=True
    )
    opt_b = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(5):
        lm_step(ours, opt_a, tokens(step))
        lm_step(theirs, opt_b, tokens(step))
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert torch.equal(opt_a.state[a]["exp_avg_sq"], opt_b.state[b]["exp_avg_sq"]), name


@pytest.mark.parametrize("fused", FUSED_MODES)
def test_matches_reference_adam_mini_1_1_1(fused):
    """Same partition as adam-mini 1.1.1 on a GQA Llama with weight decay: <= 1e-6 after 10 steps."""
    from adam_mini import Adam_mini

    model = tiny_llama(torch.float64)
    part = partition.adam_mini(model)
    assert part["model.layers.0.self_attn.k_proj.weight"].rule == "heads"
    assert part["model.layers.0.self_attn.k_proj.weight"].num_blocks == 2  # GQA: n_kv_heads
    assert part["model.embed_tokens.weight"].rule == "rows"
    assert part["model.norm.weight"].rule == "tensor"
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = optimizer.AdamMini(
        ours.named_parameters(), part, lr=1e-2, weight_decay=0.1, fused=fused
    )
    opt_b = Adam_mini(
        theirs.named_parameters(),
        lr=1e-2,
        weight_decay=0.1,
        dim=32,
        n_heads=4,
        n_kv_heads=2,
        verbose=False,
    )
    for step in range(10):
        lm_step(ours, opt_a, tokens(step))
        lm_step(theirs, opt_b, tokens(step))
    worst = max(
        ((a - b).abs() / b.abs()).max().item()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True)
    )
    assert worst <= 1e-6
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(ours.parameters(), model.parameters(), strict=True)
    )
    assert moved > 1e-3  # the comparison is not vacuous


def rule_zoo() -> tuple[dict[str, torch.Tensor], Partition]:
    """One tensor per rule (and shape variants), float64."""
    shapes = {
        "norm": ((7,), "tensor", {}),
        "emb": ((9, 6), "rows", {}),
        "q": ((12, 5), "heads", {"head_dim": 4}),
        "qb": ((12,), "heads", {"head_dim": 3}),
        "conv": ((6, 3, 2, 2), "rows", {}),
        "mat": ((6, 4), "tensor", {}),
        "cols": ((5, 7), "columns", {}),
        "qkv_r": (
            (14, 3),
            "fused_heads",
            {"head_dim": 2, "sections": [4, 4, 6], "orientation": "rows"},
        ),
        "qkv_c": (
            (3, 14),
            "fused_heads",
            {"head_dim": 2, "sections": [4, 4, 6], "orientation": "columns"},
        ),
        "groups": ((6, 3), "row_groups", {"groups": [1, 0, 1, 2, 0, 2]}),
        "bias": ((5,), "elements", {}),
    }
    gen = torch.Generator().manual_seed(0)
    params = {
        n: torch.randn(s, generator=gen, dtype=torch.float64) for n, (s, _, _) in shapes.items()
    }
    part = Partition(TensorBlocks(n, s, r, p) for n, (s, r, p) in shapes.items())
    return params, part


def reference_run(params, part, grads, lr=0.05, betas=(0.9, 0.95), eps=1e-8, wd=0.1):
    """The readable loop of optimizer.kernels, one tensor at a time."""
    params = {n: p.clone() for n, p in params.items()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {
        n: torch.zeros_like(p)
        if part[n].rule == "elements"
        else torch.zeros(part[n].num_blocks, dtype=p.dtype)
        for n, p in params.items()
    }
    for t, g in enumerate(grads, start=1):
        for n, p in params.items():
            h = Hyper(lr, betas[0], betas[1], eps, wd if p.ndim > 1 else 0.0, float(t))
            if part[n].rule == "elements":
                adamw_update_(p, g[n], m[n], v[n], h)
            else:
                reference_update_(p, g[n], m[n], v[n], part[n].local_index(), h)
    return params, v


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a non-contiguous tensor: reversed dims permuted back, or every 2nd entry."""
    if t.ndim == 1:
        out = torch.empty(2 * t.numel(), dtype=t.dtype)[::2]
    else:
        out = torch.empty(t.shape[::-1], dtype=t.dtype).permute(*reversed(range(t.ndim)))
    assert not out.is_contiguous()
    return out.copy_(t)


def step_through(params, part, grads, grad_layout=torch.clone, **kwargs) -> optimizer.AdamMini:
    """``AdamMini`` over ``params`` (lr 0.05, betas (0.9, 0.95), decay 0.1 unless ``kwargs``
    say otherwise), stepped once per entry of ``grads``."""
    opt = optimizer.AdamMini(
        list(params.items()),
        part,
        **{"lr": 0.05, "betas": (0.9, 0.95), "weight_decay": 0.1, **kwargs},
    )
    for g in grads:
        for n, p in params.items():
            p.grad = grad_layout(g[n])
        opt.step()
    return opt


@pytest.mark.parametrize("fused", FUSED_MODES)
@pytest.mark.parametrize("nonfinite", ["raise", "skip_blocks", "ignore"])
@pytest.mark.parametrize("strided", ["contiguous", "strided", "strided_params"])
def test_fast_paths_match_reference_loop(fused, nonfinite, strided):
    """Also for strided parameters whose gradients (set by hand) are contiguous: the fused
    kernel walks raw pointers, so only a parameter with all its buffers contiguous may go there."""
    init, part = rule_zoo()
    gen = torch.Generator().manual_seed(1)
    grads = [
        {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in init.items()}
        for _ in range(4)
    ]
    expect, expect_v = reference_run(init, part, grads)
    layout = torch.clone if strided == "contiguous" else strided_copy
    grad_layout = strided_copy if strided == "strided" else torch.clone
    params = {n: nn.Parameter(layout(p)) for n, p in init.items()}
    opt = step_through(params, part, grads, grad_layout, fused=fused, nonfinite=nonfinite)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), expect[n], rtol=1e-12, atol=1e-14, msg=n)
        torch.testing.assert_close(
            opt.state[p]["exp_avg_sq"], expect_v[n], rtol=1e-12, atol=0, msg=n
        )


def test_state_layout():
    init, part = rule_zoo()
    params = {n: nn.Parameter(p.clone()) for n, p in init.items()}
    opt = optimizer.AdamMini(list(params.items()), part)
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    for n, p in params.items():
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg"].dtype == p.dtype
        expect = p.shape if part[n].rule == "elements" else (part[n].num_blocks,)
        assert st["exp_avg_sq"].shape == expect, n
        assert st["step"].item() == 1.0 and st["step"].dtype == torch.float32


def test_state_memory_is_half_of_adamw():
    model = tiny_llama(torch.float32)
    part = partition.adam_mini(model)
    sb = optimizer.state_bytes(model, part)
    opt = optimizer.AdamMini(model.named_parameters(), part)
    lm_step(model, opt, tokens())
    real = sum(t.nbytes for st in opt.state.values() for t in st.values())
    assert sb.total == int(sb) == real
    adamw = torch.optim.AdamW(model.parameters())
    adamw.step()
    assert sb.adamw_total == sum(t.nbytes for st in adamw.state.values() for t in st.values())
    with torch.device("meta"):
        from transformers import LlamaConfig, LlamaForCausalLM

        big = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=512,
                num_hidden_layers=8,
                num_attention_heads=8,
                num_key_value_heads=4,
                intermediate_size=1376,
                vocab_size=8192,
            )
        )
    meta = optimizer.state_bytes(big)
    assert meta.ratio <= 0.501
    low = optimizer.state_bytes(big, momentum_dtype="bf16")
    assert meta.total - low.total == 2 * meta.num_params  # bf16 m: 2 bytes saved per entry


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum_dtype", [None, "fp32", "bf16", torch.bfloat16])
def test_state_bytes_counts_the_state_adam_mini_holds(dtype, momentum_dtype):
    model = tiny_llama(dtype)
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen: no gradient, no state
    part = partition.adam_mini(model)
    sb = optimizer.state_bytes(model, part, momentum_dtype=momentum_dtype)
    opt = optimizer.AdamMini(model.named_parameters(), part, momentum_dtype=momentum_dtype)
    lm_step(model, opt, tokens())
    ours = sum(t.nbytes for st in opt.state.values() for t in st.values())
    assert sb.total == ours
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    lm_step(model, adamw, tokens())
    theirs = sum(t.nbytes for st in adamw.state.values() for t in st.values())
    assert sb.adamw_total == theirs and sb.ratio == ours / theirs


def test_state_bytes_takes_a_json_path_and_refuses_a_partition_of_other_shapes(tmp_path):
    model = nn.Linear(4, 3)
    part = partition.adam_mini(model, n_heads=1)
    part.to_json(tmp_path / "p.json")
    assert optimizer.state_bytes(model, tmp_path / "p.json") == optimizer.state_bytes(model, part)
    wrong = partition.adam_mini(nn.Linear(50, 3), n_heads=1)
    with pytest.raises(partition.PartitionError, match=r"shape \(3, 4\) but the partition says"):
        optimizer.state_bytes(model, wrong)
    wrong.to_json(tmp_path / "wrong.json")
    for build in (optimizer.state_bytes, optimizer.AdamMini):
        with pytest.raises(partition.PartitionError, match=r"the partition in '.*wrong.json' says"):
            build(model.named_parameters(), str(tmp_path / "wrong.json"))
    with pytest.raises(TypeError, match="partition must be"):
        optimizer.state_bytes(model, {"weight": 1})
    # named tensors alone: the head counts go to partition.adam_mini, as from a model's config
    llama = tiny_llama(torch.float32)
    named = list(llama.named_parameters())
    heads = dict(n_heads=4, n_kv_heads=2, head_dim=8)
    assert optimizer.state_bytes(named, **heads) == optimizer.state_bytes(llama)


def test_wrapped_models_read_the_inner_config_and_prefixed_names_name_the_fix():
    """DDP and DataParallel keep the model in ``.module`` and prefix every name with it."""

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    inner = tiny_llama()
    wrapped = Wrapper(inner)
    part = partition.adam_mini(wrapped)  # heads from inner.config
    assert part["module.model.layers.0.self_attn.k_proj.weight"].num_blocks == 2
    opt = optimizer.AdamMini(wrapped.named_parameters(), model=wrapped)
    assert opt.partition == part
    with pytest.raises(partition.PartitionError, match=r"pass ddp.module.named_parameters\(\)"):
        optimizer.AdamMini(wrapped.named_parameters(), partition.adam_mini(inner))


def test_auto_partition_reads_model_config_and_json_path(tmp_path):
    model = tiny_llama()
    part = partition.adam_mini(model)
    auto = optimizer.AdamMini(model.named_parameters(), model=model)
    assert auto.partition == part
    with pytest.raises(
        partition.PartitionError, match=r"heads is unknown.*partition=None, model=model"
    ):
        optimizer.AdamMini(model.named_parameters())
    part.to_json(tmp_path / "p.json")
    from_file = optimizer.AdamMini(model.named_parameters(), tmp_path / "p.json")
    assert from_file.partition == part


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        lm_step(model, opt, tokens(step))


@pytest.mark.parametrize(
    ("dtype", "momentum_dtype"),
    [(torch.float32, None), (torch.float32, "bf16"), (torch.bfloat16, None)],
)
def test_resume_from_state_dict_is_bitwise(dtype, momentum_dtype):
    model = tiny_llama(dtype)
    straight = copy.deepcopy(model)
    opt = optimizer.AdamMini(
        straight.named_parameters(), lr=1e-2, model=model, momentum_dtype=momentum_dtype
    )
    train(straight, opt, 6)

    first = copy.deepcopy(model)
    opt1 = optimizer.AdamMini(
        first.named_parameters(), lr=1e-2, model=model, momentum_dtype=momentum_dtype
    )
    train(first, opt1, 3)
    saved_opt, saved_model = copy.deepcopy(opt1.state_dict()), copy.deepcopy(first.state_dict())
    resumed = tiny_llama(dtype, seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = optimizer.AdamMini(
        resumed.named_parameters(), lr=1e-2, model=model, momentum_dtype=momentum_dtype
    )
    opt2.load_state_dict(saved_opt)
    for p, p1 in zip(resumed.parameters(), first.parameters(), strict=True):
        expect = torch.bfloat16 if momentum_dtype else dtype
        assert opt2.state[p]["exp_avg"].dtype == expect
        assert torch.equal(opt2.state[p]["exp_avg_sq"], opt1.state[p1]["exp_avg_sq"])
    train(resumed, opt2, 3, start=3)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_saved_under_another_partition_is_refused():
    param = nn.Parameter(torch.randn(4, 8))
    opt = optimizer.AdamMini([("w", param)], Partition([TensorBlocks("w", (4, 8), "tensor", {})]))
    param.grad = torch.ones_like(param)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    other = optimizer.AdamMini([("w", param)], Partition([TensorBlocks("w", (4, 8), "rows", {})]))
    with pytest.raises(partition.PartitionError, match=r"'w'.*\(1,\).*\(4,\).*partition"):
        other.load_state_dict(saved)
    assert not other.state  # nothing loaded


def quad_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def quad_loss(model: nn.Module) -> torch.Tensor:
    x = torch.linspace(-1, 1, 20, dtype=next(model.parameters()).dtype).reshape(5, 4)
    return model(x).square().mean()


def test_groups_scheduler_closure_zero_grad_add_param_group():
    model = quad_model()
    named = list(model.named_parameters())
    opt = optimizer.AdamMini([{"params": named[:2], "lr": 0.02}], lr=0.5, n_heads=1)
    opt.add_param_group({"params": named[2:], "lr": 0.04})
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.04]
    assert opt.param_groups[1]["param_names"] == ["2.weight", "2.bias"]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    losses = []

    def closure():
        opt.zero_grad()
        loss = quad_loss(model)
        loss.backward()
        return loss

    for _ in range(3):
        losses.append(opt.step(closure).item())
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0025, 0.005]
    assert losses[-1] < losses[0]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())

    # the same run by hand: two single-group optimizers whose lr we set ourselves
    ref = quad_model()
    rnamed = list(ref.named_parameters())
    part = opt.partition
    a = optimizer.AdamMini(rnamed[:2], part)
    b = optimizer.AdamMini(rnamed[2:], part)
    for k in range(3):
        for o in (a, b):
            o.zero_grad()
        quad_loss(ref).backward()
        for o, lr in ((a, 0.02), (b, 0.04)):
            o.param_groups[0]["lr"] = lr * 0.5**k
            o.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)


def test_maximize_equals_minimizing_the_negative():
    up, down = quad_model(), quad_model()
    opt_up = optimizer.AdamMini(
        up.named_parameters(), lr=0.05, maximize=True, weight_decay=0.1, n_heads=1
    )
    opt_down = optimizer.AdamMini(down.named_parameters(), lr=0.05, weight_decay=0.1, n_heads=1)
    for _ in range(3):
        for model, opt, sign in ((up, opt_up, -1.0), (down, opt_down, 1.0)):
            opt.zero_grad()
            (sign * quad_loss(model)).backward()
            opt.step()
    for p, q in zip(up.parameters(), down.parameters(), strict=True):
        assert torch.equal(p, q)


def test_maximize_and_decay_1d_hold_per_group():
    """A group's own maximize and decay_1d, not the defaults: group 0 ascends and decays its
    bias, group 1 takes the defaults (descend, no decay of 1-D tensors). The reference is one
    optimizer per part with those settings as its defaults, on negated gradients to ascend."""
    gen = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in quad_model().parameters()
    ]
    hyper = dict(lr=0.1, weight_decay=0.5, n_heads=1)
    model = quad_model()
    named = list(model.named_parameters())
    groups = [{"params": named[:2], "maximize": True, "decay_1d": True}, {"params": named[2:]}]
    opt = optimizer.AdamMini(groups, **hyper)
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    opt.step()
    ref = quad_model()
    named = list(ref.named_parameters())
    opts = [
        optimizer.AdamMini(named[:1], **hyper),
        optimizer.AdamMini(named[1:2], decay_1d=True, **hyper),
        optimizer.AdamMini(named[2:], **hyper),
    ]
    for p, g, sign in zip(ref.parameters(), grads, (-1, -1, 1, 1), strict=True):
        p.grad = sign * g
    for o in opts:
        o.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_weight_decay_skips_1d_tensors_unless_asked():
    for decay_1d, moved in ((False, False), (True, True)):
        model = quad_model()
        bias = model[0].bias.detach().clone()
        opt = optimizer.AdamMini(
            model.named_parameters(), lr=0.1, weight_decay=0.5, decay_1d=decay_1d, n_heads=1
        )
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # only the decay moves p
        opt.step()
        assert (not torch.equal(model[0].bias, bias)) == moved
        torch.testing.assert_close(model[0].bias, bias * (0.95 if moved else 1.0))


def test_bad_input_fails_early_with_names():
    model = quad_model()
    with pytest.raises(TypeError, match="named_parameters"):
        optimizer.AdamMini(model.parameters())
    with pytest.raises(TypeError, match="complex"):
        optimizer.AdamMini([("z", nn.Parameter(torch.zeros(3, dtype=torch.complex64)))], n_heads=1)
    part = partition.adam_mini(quad_model(), n_heads=1)
    wrong = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3))
    with pytest.raises(partition.PartitionError, match="0.weight"):
        optimizer.AdamMini(wrong.named_parameters(), part)
    with pytest.raises(partition.PartitionError, match="extra.weight"):
        optimizer.AdamMini(
            [*model.named_parameters(), ("extra.weight", nn.Parameter(torch.zeros(2, 2)))], part
        )
    for kwargs, what in (
        ({"lr": -1.0}, "lr"),
        ({"betas": (1.0, 0.9)}, "betas"),
        ({"betas": (0.9, -0.1)}, "betas"),
        ({"eps": -1e-8}, "eps"),
        ({"eps": 0.0}, "eps=0.0 is invalid: eps must be finite and > 0"),
        ({"lr": float("inf")}, "lr=inf"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"weight_decay": float("inf")}, "weight_decay=inf"),
        ({"nonfinite": "maybe"}, "nonfinite"),
        ({"lr": torch.tensor([1e-3, 1e-3])}, "lr as a tensor must have one element"),
        ({"betas": (0.9,)}, r"betas=\(0.9,\) must be a pair"),
        ({"momentum_dtype": "fp8"}, "momentum_dtype"),
    ):
        with pytest.raises(ValueError, match=what):
            optimizer.AdamMini(model.named_parameters(), part, **kwargs)
    with pytest.raises(ValueError, match="AdamMini got an empty parameter list"):
        optimizer.AdamMini(iter([]), part)
    emb = nn.Embedding(5, 3, sparse=True)
    opt = optimizer.AdamMini(emb.named_parameters(), n_heads=1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(TypeError, match="partition must be a partition.Partition"):
        optimizer.AdamMini(model.named_parameters(), partition=3)
    with pytest.raises(TypeError, match="'i' is torch.int64; only floating-point"):
        optimizer.AdamMini([("i", torch.zeros(3, dtype=torch.long))], n_heads=1)
    w = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="'a' and 'b' are the same tensor"):
        optimizer.AdamMini([("a", w), ("b", w)], n_heads=1)


@pytest.mark.parametrize("fused", FUSED_MODES)
@pytest.mark.parametrize("rows", [2, 16])
def test_a_parameter_resized_after_construction_is_refused(fused, rows):
    """The fused kernel used to walk the old block table over the new buffers (a crash)."""
    emb = nn.Embedding(8, 4)
    opt = optimizer.AdamMini(emb.named_parameters(), lr=0.1, fused=fused, n_heads=1)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    emb.weight.data = torch.zeros(rows, 4)
    emb.weight.grad = torch.ones(rows, 4)
    with pytest.raises(partition.PartitionError, match=rf"shape \({rows}, 4\), not \(8, 4\)"):
        opt.step()


def test_a_learning_rate_set_out_of_range_after_construction_is_refused():
    model = quad_model()
    opt = optimizer.AdamMini(model.named_parameters(), n_heads=1)
    quad_loss(model).backward()
    opt.param_groups[0]["lr"] = -0.1
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="lr=-0.1"):
        opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("fused", FUSED_MODES)
def test_nonfinite_gradients_leave_state_untouched(fused):
    model = quad_model()
    opt = optimizer.AdamMini(
        model.named_parameters(), lr=0.1, fused=fused, n_heads=1, nonfinite="raise"
    )
    quad_loss(model).backward()
    opt.step()
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[2].weight.grad[1, 0] = float("nan")
    model[0].bias.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"in \['0\.bias', '2\.weight'\];"):
        opt.step()
    after = (model.state_dict(), opt.state_dict())
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key])
    for idx, st in before[1]["state"].items():
        for key, value in st.items():
            assert torch.equal(value, after[1]["state"][idx][key])
    opt.nonfinite = "skip"
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before[0].items())
    opt.nonfinite = "ignore"
    opt.step()
    assert torch.isnan(model[2].weight).any()


@pytest.mark.parametrize("fused", FUSED_MODES)
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_nan_in_an_elements_tensor_alone_is_caught(fused, nonfinite):
    """``elements`` tensors have no block sums: their gradient entries are checked themselves."""
    init, part = rule_zoo()
    params = {n: nn.Parameter(p.clone()) for n, p in init.items()}
    opt = optimizer.AdamMini(list(params.items()), part, lr=0.05, fused=fused, nonfinite=nonfinite)
    for p in params.values():
        p.grad = torch.ones_like(p)
    params["bias"].grad[2] = float("nan")
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match=r"in \['bias'\];"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    for n, p in params.items():
        assert torch.equal(p, init[n]) and not opt.state[p].get("step", 0), n


def test_bf16_momentum_stochastic_rounding_is_unbiased_and_trains():
    from optimizer.kernels import stochastic_round_to_bf16

    x = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # between two bf16 values
    r = stochastic_round_to_bf16(x, key=7).float()
    assert set(r.unique().tolist()) == {1.0, 1.0078125}
    assert abs(r.mean().item() - x[0].item()) < 2e-5
    # inf stays inf and NaN stays NaN, also a NaN whose payload lies in the 16 bits cut off
    special = torch.tensor([0x7F800000, -0x800000, 0x7FC00000, 0x7F800001], dtype=torch.int32)
    out = stochastic_round_to_bf16(special.view(torch.float32), key=7).float()
    assert out[:2].tolist() == [float("inf"), float("-inf")] and out[2:].isnan().all()
    # a shard (rows 3.. of a 2-D tensor) rounds as those rows of the whole tensor
    x2 = torch.randn(5, 8)
    whole = stochastic_round_to_bf16(x2, key=7)
    assert torch.equal(stochastic_round_to_bf16(x2[3:], key=7, offset=3 * 8), whole[3:])
    assert not torch.equal(stochastic_round_to_bf16(x2[3:], key=7), whole[3:])
    losses = {}
    for dtype in (None, "bf16"):
        model = quad_model().float()
        opt = optimizer.AdamMini(model.named_parameters(), lr=0.02, momentum_dtype=dtype, n_heads=1)
        for _ in range(60):
            opt.zero_grad()
            loss = quad_loss(model)
            loss.backward()
            opt.step()
        losses[dtype] = loss.item()
        if dtype:
            assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for p in model.parameters())
    assert losses["bf16"] < 0.2 * quad_loss(quad_model()).item()
    assert abs(losses["bf16"] - losses[None]) < 0.1 * losses[None] + 1e-4


def test_no_warning_on_plain_use():
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = optimizer.AdamMini(model.named_parameters(), model=model)
        lm_step(model, opt, tokens())


def bf16_rows_at_beta1_zero(shape, **kwargs) -> tuple[nn.Parameter, optimizer.AdamMini]:
    """A zero matrix ``w`` and an ``AdamMini`` with bf16 momentum and beta1 = 0 (so m = g), one
    block per row."""
    w = nn.Parameter(torch.zeros(shape))
    part = Partition([TensorBlocks("w", shape, "rows", {})])
    return w, optimizer.AdamMini(
        [("w", w)], part, betas=(0.0, 0.999), momentum_dtype="bf16", **kwargs
    )


@pytest.mark.parametrize("fused", FUSED_MODES)
def test_bf16_momentum_rounding_is_unbiased_in_every_path(fused):
    """beta1 = 0 makes m = g exactly; g sits 1/8 of the way between two bf16 values."""
    shape = (64, 2048)
    w, opt = bf16_rows_at_beta1_zero(shape, fused=fused)
    w.grad = torch.full(shape, 1.0 + 2**-10)
    opt.step()
    m = opt.state[w]["exp_avg"].float()
    assert set(m.unique().tolist()) == {1.0, 1.0078125}
    assert abs(m.mean().item() - (1.0 + 2**-10)) < 2e-5
    w.grad = torch.full(shape, float("inf"))
    opt.nonfinite = "ignore"
    opt.step()
    assert not torch.isfinite(opt.state[w]["exp_avg"]).any()  # lerp(m, inf, 1) is nan, as in torch


@pytest.mark.parametrize("fused", FUSED_MODES)
def test_bf16_momentum_with_beta1_zero_steps_as_float32_momentum(fused):
    """beta1 = 0 makes the momentum the gradient, exactly, however it is rounded for storage:
    every other part of the step (weight decay, both bias corrections, v) must then be the same
    as with float32 momentum, bit for bit, in every rule including ``elements``."""
    init, part = rule_zoo()
    gen = torch.Generator().manual_seed(2)
    grads = [{n: torch.randn(p.shape, generator=gen) for n, p in init.items()} for _ in range(3)]
    runs = {}
    for momentum_dtype in (None, "bf16"):
        params = {n: nn.Parameter(p.float()) for n, p in init.items()}
        step_through(
            params,
            part,
            grads,
            betas=(0.0, 0.95),
            decay_1d=True,
            momentum_dtype=momentum_dtype,
            fused=fused,
        )
        runs[momentum_dtype] = params
    for n, p in runs[None].items():
        assert torch.equal(runs["bf16"][n], p), n
        assert not torch.equal(p, init[n].float()), n


@pytest.mark.parametrize("fused", FUSED_MODES)
def test_bf16_rounding_bits_change_with_the_step_and_the_seed(fused):
    """A constant gradient halfway between two bf16 values (beta1 = 0, m = g): each entry must
    round up at some steps and down at others, or its momentum is biased for good; another seed
    draws other bits."""
    shape = (16, 64)
    momenta = {}
    for seed in (0, 1):
        w, opt = bf16_rows_at_beta1_zero(shape, fused=fused, seed=seed)
        steps = []
        for _ in range(24):
            w.grad = torch.full(shape, 1.0 + 2**-8)
            opt.step()
            steps.append(opt.state[w]["exp_avg"].float().clone())
        momenta[seed] = torch.stack(steps)
    m = momenta[0]
    assert set(m.unique().tolist()) == {1.0, 1.0078125}
    assert ((m == 1.0).any(0) & (m == 1.0078125).any(0)).all()  # every entry went both ways
    assert abs(m.mean().item() - (1.0 + 2**-8)) < 1e-3
    assert not torch.equal(momenta[1][0], m[0])


def test_bf16_momentum_of_float64_parameters_steps_on_the_eager_path():
    """The fused kernel has no float64 parameter with bf16 momentum: such tensors step eagerly,
    as float64 momentum does up to the float32 rounding of the gradient."""
    runs = {}
    for momentum_dtype in (None, "bf16"):
        model = quad_model()
        opt = optimizer.AdamMini(
            model.named_parameters(),
            lr=0.05,
            betas=(0.0, 0.99),
            momentum_dtype=momentum_dtype,
            partition=partition.by_rows(model),
        )
        quad_loss(model).backward()
        opt.step()
        runs[momentum_dtype] = list(model.parameters())
    for a, b in zip(runs["bf16"], runs[None], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_bf16_fused_and_eager_paths_round_alike():
    """Both paths draw the rounding bits from one hash of (step, tensor, index): the bf16
    momenta agree bit for bit and the parameters to float32 rounding."""
    if len(FUSED_MODES) < 2:
        pytest.skip("the fused CPU kernel could not be built here: one path only")
    runs = []
    for fused in FUSED_MODES:
        model = tiny_llama(torch.float32)
        opt = optimizer.AdamMini(
            model.named_parameters(), lr=1e-2, model=model, momentum_dtype="bf16", fused=fused
        )
        train(model, opt, 1)  # same gradients: the momenta must round identically
        momenta = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
        train(model, opt, 3, start=1)
        runs.append((momenta, list(model.parameters())))
    for ma, mb in zip(runs[0][0], runs[-1][0], strict=True):
        assert torch.equal(ma, mb)
    # later gradients differ by float32 rounding, so a momentum entry may round the other way:
    # one bf16 ulp (2^-8 relative) of a step of size <= lr, for each of the 4 steps
    for a, b in zip(runs[0][1], runs[-1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=4 * 1e-2 * 2**-8)


@pytest.mark.parametrize("fused", FUSED_MODES)
def test_skip_blocks_steps_finite_blocks_and_keeps_the_rest(fused):
    init, part = rule_zoo()

    def run(mode):
        params = {n: nn.Parameter(p.clone()) for n, p in init.items()}
        opt = optimizer.AdamMini(
            list(params.items()), part, lr=0.05, weight_decay=0.1, fused=fused, nonfinite=mode
        )
        gen = torch.Generator().manual_seed(3)
        for k in range(2):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if k == 1:
                params["emb"].grad[2, 1] = float("nan")  # row block 2 of emb
                params["q"].grad[5, 0] = float("inf")  # head 1 of q (rows 4-7)
                params["bias"].grad[3] = float("nan")  # one entry of an elements tensor
                before = {
                    n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
                    for n, p in params.items()
                }
            opt.step()
        return params, opt, before

    with pytest.warns(RuntimeWarning, match="emb.*q|q.*emb"):
        params, opt, before = run("skip_blocks")
    assert opt.skipped_blocks == 3
    ref, ref_opt, _ = run("ignore")
    bad_entries = {
        "emb": (slice(2, 3), slice(None)),
        "q": (slice(4, 8), slice(None)),
        "bias": (slice(3, 4),),
    }
    bad_v = {"emb": [2], "q": [1], "bias": [3]}
    for n, p in params.items():
        keep = torch.zeros(p.shape, dtype=torch.bool)
        if n in bad_entries:
            keep[bad_entries[n]] = True
        old_p, old_state = before[n]
        assert torch.equal(p.detach()[keep], old_p[keep]), n
        assert torch.equal(opt.state[p]["exp_avg"][keep], old_state["exp_avg"][keep]), n
        torch.testing.assert_close(p.detach()[~keep], ref[n].detach()[~keep], rtol=0, atol=0, msg=n)
        v, v_ref, v_old = (
            opt.state[p]["exp_avg_sq"],
            ref_opt.state[ref[n]]["exp_avg_sq"],
            old_state["exp_avg_sq"],
        )
        vmask = torch.zeros(v.shape, dtype=torch.bool).view(-1)
        vmask[bad_v.get(n, [])] = True
        vmask = vmask.view(v.shape)
        assert torch.equal(v[vmask], v_old[vmask]) and torch.equal(v[~vmask], v_ref[~vmask]), n
        assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["exp_avg"]).all(), n


def test_the_fused_kernel_can_be_switched_off(monkeypatch):
    """``ADAM_MINI_LAB_NO_FUSED=1``: no kernel is loaded, so fused=None steps eagerly and
    fused=True is refused."""
    before = cpu_fused.load()
    try:
        monkeypatch.setenv("ADAM_MINI_LAB_NO_FUSED", "1")
        cpu_fused.load.cache_clear()
        assert cpu_fused.load() is None
        with pytest.raises(RuntimeError, match="fused=True"):
            optimizer.AdamMini(quad_model().named_parameters(), fused=True, n_heads=1)
    finally:
        monkeypatch.delenv("ADAM_MINI_LAB_NO_FUSED")
        cpu_fused.load.cache_clear()
    assert (cpu_fused.load() is None) == (before is None)


def test_param_appended_to_a_group_by_hand_names_the_fix():
    model = quad_model()
    named = list(model.named_parameters())
    opt = optimizer.AdamMini(named[:2], lr=0.1, n_heads=1)
    opt.param_groups[0]["params"].append(named[2][1])
    quad_loss(model).backward()
    with pytest.raises(RuntimeError, match=r"by hand.*add_param_group"):
        opt.step()


def test_param_names_groups_and_fused_true_without_kernel(monkeypatch):
    model = quad_model()
    names, tensors = zip(*model.named_parameters(), strict=True)
    part = partition.by_rows(model)
    opt = optimizer.AdamMini([{"params": list(tensors), "param_names": list(names)}], part, lr=0.1)
    assert opt.param_groups[0]["param_names"] == list(names)
    with pytest.raises(ValueError, match="param_names and params of a group differ in length"):
        optimizer.AdamMini([{"params": list(tensors), "param_names": list(names)[:-1]}], part)
    opt.init_state()
    assert all(opt.state[p]["step"].item() == 0 for p in tensors)
    monkeypatch.setattr(optimizer.adam_mini.cpu_fused, "load", lambda: None)
    with pytest.raises(RuntimeError, match="fused=True"):
        optimizer.AdamMini(model.named_parameters(), part, fused=True)


def test_group_forms_and_names_shared_by_two_groups():
    enc, dec = quad_model(), quad_model()
    as_tuple = optimizer.AdamMini([{"params": tuple(enc.named_parameters())}], n_heads=1)
    assert as_tuple.partition.names == tuple(n for n, _ in enc.named_parameters())
    names, tensors = zip(*enc.named_parameters(), strict=True)
    by_names = optimizer.AdamMini([{"params": tensors, "param_names": names}], n_heads=1)
    assert by_names.partition.names == names
    one_pair = optimizer.AdamMini([{"params": ("w", tensors[0])}], n_heads=1)  # a bare pair
    assert one_pair.param_groups[0]["param_names"] == ["w"]
    groups = [{"params": enc.named_parameters()}, {"params": dec.named_parameters(), "lr": 1e-4}]
    with pytest.raises(ValueError, match=r"both named '0.weight'.*prefix"):
        optimizer.AdamMini(groups, n_heads=1)


@pytest.mark.parametrize("fused", FUSED_MODES)
@pytest.mark.parametrize("shape", [(0,), (4, 0)])
def test_empty_tensor_keeps_a_finite_second_moment(fused, shape):
    empty, other = nn.Parameter(torch.zeros(shape)), nn.Parameter(torch.ones(2, 2))
    part = Partition(
        [TensorBlocks("e", shape, "tensor", {}), TensorBlocks("o", (2, 2), "tensor", {})]
    )
    opt = optimizer.AdamMini([("e", empty), ("o", other)], part, lr=0.1, fused=fused)
    empty.grad, other.grad = torch.zeros_like(empty), torch.ones_like(other)
    opt.step()
    assert opt.state[empty]["exp_avg_sq"].tolist() == [0.0]
    assert (other != 1).all()


@pytest.mark.parametrize("rule", ["rows", "row_groups"])
def test_float16_block_with_no_gradient_stays_finite(rule):
    """v is float32 for float16 parameters, and so must be the per-block scale
    ``lr / (1 - beta1^t) / (sqrt(v_b / (1 - beta2^t)) + eps)``: for an embedding row that has
    had no gradient yet it is ``lr / eps = 1e5`` at eps=1e-8, past float16's 65504, and
    ``m * inf = 0 * inf`` turned the row into NaN. Rows with a gradient follow the float64 math."""
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    params = {"rows": {}, "row_groups": {"groups": [0, 1, 2, 3]}}[rule]
    part = Partition([TensorBlocks("emb", (4, 3), rule, params)])
    emb = nn.Parameter(init.half())
    opt = optimizer.AdamMini([("emb", emb)], part, lr=0.05)
    p, m, v = emb.detach().double(), torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 1)
    for t in range(1, 4):
        g = torch.randn(4, 3, generator=gen, dtype=torch.float64).half()
        g[1] = 0  # a token not seen yet
        emb.grad = g
        opt.step()
        g = g.double()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g.square().mean(1, keepdim=True).to(v.dtype)
        p = p - 0.05 * (m / (1 - 0.9**t)) / ((v.double() / (1 - 0.999**t)).sqrt() + 1e-8)
    assert torch.isfinite(emb).all()
    assert torch.equal(emb[1], init[1].half())
    torch.testing.assert_close(emb.double(), p, rtol=2e-3, atol=0)  # 2 float16 ulps
    assert (emb.double() - init).abs().max() > 0.1  # the comparison is not vacuous


def test_a_tensor_in_two_groups_is_named():
    """Overlapping decay/no-decay filters put a tensor in two groups: the error names it, also
    with ``partition=None``, which called it a partition with a tensor twice."""
    named = list(quad_model().named_parameters())
    for part in (None, partition.by_tensor(named)):
        match = r"'0\.bias' is already in an earlier param group \(as '0\.bias'\)"
        with pytest.raises(ValueError, match=match):
            optimizer.AdamMini([{"params": named[:2]}, {"params": named[1:]}], part, n_heads=1)
        opt = optimizer.AdamMini(named[:2], part, n_heads=1)
        with pytest.raises(ValueError, match=r"'bias' is already in an earlier param group \(as"):
            opt.add_param_group({"params": [("bias", named[1][1])]})
        opt.add_param_group({"params": named[2:]})  # the failed calls left nothing behind
        assert opt.param_groups[1]["param_names"] == ["2.weight", "2.bias"]


def test_optimizer_built_before_materializing_a_meta_model_refuses_to_step():
    """``to_empty`` gives a meta model new tensors: an AdamMini built before it holds the
    meta ones, none of which ever gets a gradient, and stepped silently doing nothing."""
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    opt = optimizer.AdamMini(model.named_parameters(), partition.by_tensor(model))
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.weight.normal_(generator=torch.Generator().manual_seed(0))
        model.bias.zero_()
    model(torch.ones(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match=r"'weight' is on the meta device.*after model.to_empty"):
        opt.step()


def test_arguments_of_the_wrong_type_are_named_at_construction():
    """Strings and None for numbers, a truthy "no" for a flag and a model for its parameters
    would fail inside the first step, or (maximize="no") ascend silently."""
    model = quad_model()
    for kwargs, match in (
        ({"lr": "1e-3"}, "lr='1e-3' must be a number, got str"),
        ({"lr": None}, "lr=None must be a number"),
        ({"betas": 0.9}, r"betas=0.9 must be a pair \(beta1, beta2\)"),
        ({"betas": (0.9, "0.99")}, "betas.1.='0.99' must be a number"),
        ({"eps": None}, "eps=None must be a number"),
        ({"maximize": "no"}, "maximize must be True or False, got 'no'"),
        ({"decay_1d": 1}, "decay_1d must be True or False"),
        ({"seed": None}, "seed=None must be an int"),
    ):
        with pytest.raises(TypeError, match=match):
            optimizer.AdamMini(model.named_parameters(), n_heads=1, **kwargs)
    for kwargs, match in (({"fused": "yes"}, "fused='yes'"), ({"momentum_dtype": []}, "momentum")):
        with pytest.raises(ValueError, match=match):
            optimizer.AdamMini(model.named_parameters(), n_heads=1, **kwargs)
    with pytest.raises(TypeError, match="takes model.named_parameters.* got Sequential"):
        optimizer.AdamMini(model, n_heads=1)
    with pytest.raises(TypeError, match="param group 0 has no 'params' list"):
        optimizer.AdamMini([{"lr": 0.1}], n_heads=1)
    opt = optimizer.AdamMini(model.named_parameters(), n_heads=1)
    with pytest.raises(TypeError, match="closure must be a function"):
        opt.step(closure=0.5)


def test_a_corrupt_or_foreign_state_dict_is_named_before_anything_loads():
    model = quad_model()
    opt = optimizer.AdamMini(model.named_parameters(), n_heads=1)
    quad_loss(model).backward()
    opt.step()
    saved = opt.state_dict()

    def corrupt(edit):
        sd = copy.deepcopy(saved)
        edit(sd)
        return sd

    target = optimizer.AdamMini(model.named_parameters(), n_heads=1)
    bad = [
        ("runs/opt.pt", TypeError, "takes the dict that opt.state_dict.. returned"),
        (model.state_dict(), ValueError, r"lacks \['state', 'param_groups'\]"),
        (corrupt(lambda sd: sd["param_groups"][0].pop("lr")), ValueError, r"lacks \['lr'\]"),
        (corrupt(lambda sd: sd["param_groups"][0].update(eps=-1.0)), ValueError, "group 0: eps"),
        (corrupt(lambda sd: sd.update(blocks=[])), TypeError, "'blocks'. must be a dict"),
        (
            corrupt(lambda sd: sd["state"][0].update(exp_avg=[0.0])),
            TypeError,
            "'0.weight': exp_avg must be a floating-point tensor, got list",
        ),
        (
            corrupt(lambda sd: sd["state"][0]["exp_avg_sq"].fill_(-1.0)),
            ValueError,
            "'0.weight': exp_avg_sq has negative entries",
        ),
        (
            corrupt(lambda sd: sd["state"][0].update(step=torch.tensor([1.0, 2.0]))),
            ValueError,
            "'0.weight': step must be one finite number >= 0",
        ),
    ]
    for sd, error, match in bad:
        with pytest.raises(error, match=match):
            target.load_state_dict(sd)
        assert not target.state
    target.load_state_dict(corrupt(lambda sd: sd["state"][0].update(step=1)))  # a plain number
    assert target.state[model[0].weight]["step"].shape == ()
