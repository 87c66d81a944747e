"""HessianOperator: products against an independent dense reference, views, data, errors.

The dense reference is ``torch.func.jacfwd(torch.func.grad(f))`` of the concatenated-data loss
on a flat parameter vector (not ``torch.func.hessian``, which is wrong through LayerNorm).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from problems import tiny_gpt_problem
from torch import nn
from torch.func import functional_call, grad, jacfwd

import hessian
import partition
from hessian import ForwardModeError, HessianError, HessianOperator, NonDeterministicError
from hessian.data import fingerprint
from lab.models import lm_loss

F64 = torch.float64


class LNMLP(nn.Module):
    def __init__(self, d_in: int = 5, width: int = 6, d_out: int = 3, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, width)
        self.ln = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.ln(self.fc1(x)))))


def ce_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def dense_reference(model, loss_fn, batch, names=None) -> torch.Tensor:
    """jacfwd(grad(f)) of the loss on one (concatenated) batch, flat in ``names`` order."""
    named = {n: p.detach() for n, p in model.named_parameters()}
    names = list(named) if names is None else names
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]

    def f(flat):
        pieces = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        params = {**named, **pieces}
        return loss_fn(lambda *a: functional_call(model, params, a), batch)

    flat0 = torch.cat([named[n].reshape(-1) for n in names])
    return jacfwd(grad(f))(flat0)


def double_backward_dense(model, loss_fn, batch) -> torch.Tensor:
    """The dense Hessian column by column: one double-backward product per gradient entry (the
    reference where jacfwd(grad) is wrong: padding rows)."""
    params = list(model.parameters())

    def flat(ts):
        return torch.cat([t.reshape(-1) for t in ts])

    g = flat(torch.autograd.grad(loss_fn(model, batch), params, create_graph=True))
    return torch.stack([flat(torch.autograd.grad(gi, params, retain_graph=True)) for gi in g], 1)


def mlp_problem(seed: int = 0, n: int = 8):
    torch.manual_seed(seed)
    model = LNMLP().double()
    X = torch.randn(n, 5, dtype=F64)
    y = torch.randint(0, 3, (n,))
    return model, X, y


@pytest.fixture(scope="module")
def gpt():
    model, (x, y) = tiny_gpt_problem(vocab_size=13, context=5, batch=4)
    D = dense_reference(model, lm_loss, (x, y))
    return model, x, y, D


@pytest.mark.parametrize("mode", ["forward", "reverse", "auto"])
def test_mlp_layernorm_products_match_dense(mode):
    model, X, y = mlp_problem()
    D = dense_reference(model, ce_loss, (X, y))
    assert (D - D.T).abs().max() < 1e-12, "reference must be symmetric"
    H = HessianOperator(model, ce_loss, (X, y), mode=mode)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    V = torch.randn(H.shape[0], 5, generator=g, dtype=F64)
    assert (H @ v - D @ v).abs().max() < 1e-10
    assert (H.matmat(V) - D @ V).abs().max() < 1e-10
    dense = H.to_dense(chunk=7)
    assert (dense - D).abs().max() < 1e-10
    assert (dense - dense.T).abs().max() < 1e-12


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_tinygpt_products_match_dense(gpt, mode):
    model, x, y, D = gpt
    assert (D - D.T).abs().max() < 1e-10
    H = HessianOperator(model, lm_loss, (x, y), mode=mode)
    g = torch.Generator().manual_seed(2)
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    V = torch.randn(H.shape[0], 4, generator=g, dtype=F64)
    Hv, HV = H @ v, H.matmat(V)
    assert (Hv - D @ v).abs().max() < 1e-10
    assert (HV - D @ V).abs().max() < 1e-10
    # products are plain numbers, detached from the model's autograd graph (numpy() works)
    assert not Hv.requires_grad and not HV.requires_grad
    assert not H.to_dense(chunk=16).requires_grad


def test_dict_vectors_and_scipy(gpt):
    model, x, y, D = gpt
    H = HessianOperator(model, lm_loss, (x, y), mode="forward")
    g = torch.Generator().manual_seed(3)
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    vd = H._to_dict(v)
    out = H @ vd
    assert all(out[n].shape == H.param_shapes[n] for n in H.params) and len(out) == len(H.params)
    assert (torch.cat([out[n].reshape(-1) for n in H.params]) - D @ v).abs().max() < 1e-10
    Vd = H._to_dict(torch.stack([v, 2 * v], 1))
    out2 = H.matmat(Vd)
    flat2 = torch.cat([out2[n].reshape(2, -1) for n in H.params], dim=1)
    assert (flat2 - torch.stack([D @ v, 2 * D @ v])).abs().max() < 1e-10
    S = H.to_scipy()
    assert abs(S.matvec(v.numpy()) - (D @ v).numpy()).max() < 1e-10


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_params_subset_is_the_submatrix(gpt, mode):
    """The other parameters stay fixed (and still require grad: results must not track them)."""
    model, x, y, D = gpt
    names = ["blocks.0.ln_1.weight", "blocks.0.attn.k_proj.weight"]
    H = HessianOperator(model, lm_loss, (x, y), params=names, mode=mode)
    assert H.params == tuple(names)
    full = HessianOperator(model, lm_loss, (x, y), mode="reverse")
    idx = full.select(names)
    dense = H.to_dense()
    assert not dense.requires_grad
    assert (dense - D[idx][:, idx]).abs().max() < 1e-10


class PaddedLM(nn.Module):
    """A token embedding with a padding row (BERT's, Llama's with a pad token), optionally tied."""

    def __init__(self, tie: bool):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.ln = nn.LayerNorm(4)
        self.out = nn.Linear(4, 7)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.ln(self.emb(x)))).flatten(0, 1)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_padding_embedding_matches_double_backward(tie, mode):
    """autograd gives the padding row nothing from the positions that read it; forward mode must
    hold those lookups constant too (jacfwd(grad) does not: it is asymmetric here)."""
    torch.manual_seed(0)
    model = PaddedLM(tie).double()
    x, y = torch.tensor([[0, 1, 2], [3, 0, 0]]), torch.tensor([1, 0, 5, 2, 6, 0])
    D = double_backward_dense(model, ce_loss, (x, y))
    assert (D - D.T).abs().max() < 1e-12
    H = HessianOperator(model, ce_loss, (x, y), mode=mode)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert (H @ V[:, 0] - D @ V[:, 0]).abs().max() < 1e-12
    assert (H.matmat(V) - D @ V).abs().max() < 1e-12


def test_padding_rows_are_held_constant_only_in_forward_mode(monkeypatch):
    """Double backward already gives the padding row nothing: reverse products (cached or not)
    run without the TorchFunctionMode that forward products need (it costs every torch call)."""
    from hessian import operator as operator_module

    entered = []

    def spy(model):
        entered.append(model)
        return contextlib.nullcontext()

    monkeypatch.setattr(operator_module, "constant_padding_rows", spy)
    model = PaddedLM(tie=False).double()
    batch = (torch.tensor([[0, 1, 2], [3, 0, 0]]), torch.tensor([1, 0, 5, 2, 6, 0]))
    for cache in (True, False):
        H = HessianOperator(model, ce_loss, batch, mode="reverse", cache=cache)
        H @ torch.ones(H.shape[0], dtype=F64)
        H.matmat(torch.ones(H.shape[0], 2, dtype=F64))
    assert entered == []
    H = HessianOperator(model, ce_loss, batch, mode="forward")
    H @ torch.ones(H.shape[0], dtype=F64)
    assert entered == [model]


class MaskPositions(nn.Embedding):
    """ProphetNet's learned positions: ``forward`` takes the attention mask and computes the ids
    (padding positions read row ``padding_idx``)."""

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.cumsum(mask, 1) * mask + self.padding_idx)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_padding_held_constant_where_a_subclass_computes_the_ids(mode):
    """The padding lookups are found by their ids, not by the module's first argument (a 0/1
    mask here, which matches ``padding_idx=1`` at the real tokens)."""
    torch.manual_seed(0)
    emb = MaskPositions(5, 4, padding_idx=1).double()
    head = nn.Linear(4, 7).double()
    model = nn.ModuleDict({"emb": emb, "head": head})

    def loss_fn(m, batch):
        mask, y = batch
        return nn.functional.cross_entropy(m["head"](torch.tanh(m["emb"](mask))).flatten(0, 1), y)

    batch = (torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([1, 0, 5, 2, 6, 0]))
    D = double_backward_dense(model, loss_fn, batch)
    H = HessianOperator(model, loss_fn, batch, mode=mode)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert (H.matmat(V) - D @ V).abs().max() < 1e-12


class NegativePadding(nn.Embedding):
    """Passes ``F.embedding`` its padding row counted from the end (``-1``), as it allows."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight, self.padding_idx - self.num_embeddings)


def test_padding_counted_from_the_end_is_held_constant():
    """``F.embedding(ids, w, padding_idx=-1)`` pads row ``n - 1``: forward products hold the
    lookups of that row constant, as double backward does."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": NegativePadding(5, 4, padding_idx=4), "head": nn.Linear(4, 7)})
    model.double()

    def loss_fn(m, batch):
        ids, y = batch
        return nn.functional.cross_entropy(m["head"](torch.tanh(m["emb"](ids))).flatten(0, 1), y)

    batch = (torch.tensor([[4, 1, 2], [3, 4, 4]]), torch.tensor([1, 0, 5, 2, 6, 0]))
    D = double_backward_dense(model, loss_fn, batch)
    H = HessianOperator(model, loss_fn, batch, mode="forward")
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert (H.matmat(V) - D @ V).abs().max() < 1e-12


def test_linear_regression_closed_form():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(11, 4, generator=g, dtype=F64)
    y = torch.randn(11, generator=g, dtype=F64)
    model = nn.Linear(4, 1, bias=False).double()
    H = HessianOperator(model, lambda m, b: ((m(b[0])[:, 0] - b[1]) ** 2).mean(), (X, y))
    assert (H.to_dense() - 2 / 11 * X.T @ X).abs().max() < 1e-12


def test_logistic_regression_closed_form():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(13, 3, generator=g, dtype=F64)
    y = torch.randint(0, 2, (13,), generator=g).double()
    model = nn.Linear(3, 1, bias=False).double()
    nn.init.normal_(model.weight, generator=g)

    def loss(m, b):
        return nn.functional.binary_cross_entropy_with_logits(m(b[0])[:, 0], b[1])

    p = torch.sigmoid(X @ model.weight.detach()[0])
    exact = X.T @ torch.diag(p * (1 - p)) @ X / 13
    for mode in ("forward", "reverse"):
        H = HessianOperator(model, loss, (X, y), mode=mode)
        assert (H.to_dense() - exact).abs().max() < 1e-12


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ragged_batches_equal_concatenated(reduction):
    model, X, y = mlp_problem(n=8)
    batches = [(X[:3], y[:3]), (X[3:7], y[3:7]), (X[7:], y[7:])]
    Hr = HessianOperator(model, ce_loss, batches, reduction=reduction).to_dense()
    Hc = HessianOperator(model, ce_loss, (X, y), reduction=reduction).to_dense()
    assert (Hr - Hc).abs().max() < 1e-12
    scale = 8.0 if reduction == "sum" else 1.0
    assert (Hc - scale * dense_reference(model, ce_loss, (X, y))).abs().max() < 1e-10
    # a one-shot generator and a batch_size_fn give the same
    Hg = HessianOperator(
        model, ce_loss, iter(batches), reduction=reduction, batch_size_fn=lambda b: len(b[1])
    )
    assert (Hg.to_dense() - Hc).abs().max() < 1e-12


@pytest.mark.parametrize("cache", [True, False])
def test_cache_on_and_off_match_dense_on_ragged_batches(cache):
    model, X, y = mlp_problem(n=8)
    batches = [(X[:3], y[:3]), (X[3:7], y[3:7]), (X[7:], y[7:])]
    H = HessianOperator(model, ce_loss, batches, mode="reverse", cache=cache)
    D = dense_reference(model, ce_loss, (X, y))
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(4), dtype=F64)
    for _ in range(2):  # the second pass reuses the kept graphs when cache=True
        assert (H @ v - D @ v).abs().max() < 1e-10
    assert (H.to_dense(chunk=5) - D).abs().max() < 1e-10


@pytest.mark.parametrize(
    ("mode", "cache"), [("reverse", True), ("reverse", False), ("forward", False)]
)
def test_an_empty_batch_is_never_evaluated(mode, cache):
    """Kept graphs exist for non-empty batches only; each keeps its own n_b / N. Nor does an
    uncached product run the model on a batch without samples (a model may not take one)."""
    model, X, y = mlp_problem(n=8)
    batches = [(X[:3], y[:3]), (X[3:3], y[3:3]), (X[3:], y[3:])]
    D = dense_reference(model, ce_loss, (X, y))
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    H = HessianOperator(model, ce_loss, batches, mode=mode, cache=cache)
    assert (H.to_dense(chunk=9) - D).abs().max() < 1e-10
    assert 0 not in sizes and sizes


def test_cached_products_skip_the_forward_and_follow_parameter_updates():
    model, (x, y) = tiny_gpt_problem()
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    H = HessianOperator(model, lm_loss, (x, y), mode="reverse")  # one batch: cached
    g = torch.Generator().manual_seed(5)
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    first = H @ v
    after_first = len(forwards)
    assert torch.equal(H @ v, first) and torch.equal(H.matmat(v[:, None])[:, 0], first)
    assert len(forwards) == after_first, "a cached product ran the model again"
    # an optimizer step changes the parameters in place: products must follow
    lm_loss(model, (x, y)).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    D = dense_reference(model, lm_loss, (x, y))
    assert (H @ v - D @ v).abs().max() < 1e-10
    assert (H @ v - first).abs().max() > 1e-3
    H.clear_cache()
    assert (H @ v - D @ v).abs().max() < 1e-10


def test_cache_sees_changes_that_skip_the_version_counter():
    model, X, y = mlp_problem(n=8)
    x_data = X.clone()
    H = HessianOperator(model, ce_loss, (x_data, y), mode="reverse")  # one batch: cached
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(6), dtype=F64)
    H @ v

    def follows_the_model():
        return (H @ v - dense_reference(model, ce_loss, (x_data, y)) @ v).abs().max() < 1e-10

    with torch.no_grad():  # through .data: no version bump (nor does a fused optimizer kernel)
        model.fc1.weight.data.mul_(1.5)
    assert follows_the_model()
    x_data.mul_(2.0)  # the batch changed in place
    assert follows_the_model()
    model.drop.p = 0.5
    model.train()  # now stochastic: refused on the next product, not silently served
    with pytest.raises(NonDeterministicError, match="train mode"):
        H @ v


class ScaledMLP(LNMLP):
    """Its output reads a buffer, and doubles in train mode (deterministically)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x) * self.scale
        return 2 * out if self.training else out


def test_cache_follows_buffers_and_the_train_flag():
    torch.manual_seed(0)
    model = ScaledMLP().double().eval()
    X, y = torch.randn(8, 5, dtype=F64), torch.randint(0, 3, (8,))
    H = HessianOperator(model, ce_loss, (X, y), mode="reverse")  # one batch: cached
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(6), dtype=F64)
    before = H @ v
    for change in (lambda: model.scale.fill_(1.7), lambda: model.train()):
        change()
        now = H @ v
        assert (now - dense_reference(model, ce_loss, (X, y)) @ v).abs().max() < 1e-10
        assert (now - before).abs().max() > 1e-3
        before = now


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_a_parameter_the_loss_is_linear_in_has_zero_hessian_rows(mode):
    """The mean output is linear in the last bias: its gradient is a constant, which double
    backward cannot differentiate again (it does not require grad); its rows are zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(6, 5, dtype=F64)

    def mean_output(m, batch):
        return m(batch).mean()

    H = HessianOperator(model, mean_output, X, mode=mode)
    dense = H.to_dense()
    D = dense_reference(model, lambda f, b: f(b).mean(), X)
    assert (dense - D).abs().max() < 1e-12
    bias = H.select("2.bias")
    assert (dense[bias] == 0).all() and (dense[:, bias] == 0).all()
    assert dense.abs().max() > 1e-2  # the other parameters are coupled


def test_cache_follows_a_fused_adam_mini_step():
    import optimizer

    model, X, y = mlp_problem(n=8)
    H = HessianOperator(model, ce_loss, (X, y), mode="reverse")
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(7), dtype=F64)
    before = H @ v
    opt = optimizer.AdamMini(model.named_parameters(), lr=0.1, n_heads=1)
    ce_loss(model, (X, y)).backward()
    opt.step()
    assert (H @ v - before).abs().max() > 1e-3
    assert (H @ v - dense_reference(model, ce_loss, (X, y)) @ v).abs().max() < 1e-10


def test_scipy_transpose_products_and_svds_of_a_restriction(gpt):
    from scipy.sparse.linalg import svds

    model, x, y, D = gpt
    H = HessianOperator(model, lm_loss, (x, y), mode="reverse")
    a, b = "blocks.0.mlp.fc_in.weight", "ln_f.weight"
    Hab = H.restrict(a, b)
    dense_ab = D[H.select(a)][:, H.select(b)]
    z = torch.randn(Hab.shape[0], generator=torch.Generator().manual_seed(8), dtype=F64)
    op = Hab.to_scipy()
    assert abs(op.rmatvec(z.numpy()) - (dense_ab.T @ z).numpy()).max() < 1e-10
    assert abs(op.H.matvec(z.numpy()) - (dense_ab.T @ z).numpy()).max() < 1e-10
    top = sorted(svds(op, k=2, random_state=0)[1])
    exact = torch.linalg.svdvals(dense_ab)[:2].flip(0).tolist()
    assert top == pytest.approx(exact, rel=1e-8)


def test_repeated_columns_of_a_restriction_add_up():
    from hessian.operator import RestrictedOperator

    model, X, y = mlp_problem()
    H = HessianOperator(model, ce_loss, (X, y))
    D = dense_reference(model, ce_loss, (X, y))
    rows, cols = torch.tensor([0, 3]), torch.tensor([5, 5, 2])
    V = torch.randn(3, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    got = RestrictedOperator(H, rows, cols).matmat(V)
    assert (got - D[rows][:, cols] @ V).abs().max() < 1e-10


def test_bad_loss_and_batch_name_the_fix():
    model, X, y = mlp_problem()
    n = HessianOperator(model, ce_loss, (X, y)).shape[0]
    cases = [
        (lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"), "scalar"),
        (lambda m, b: ce_loss(m, b).detach(), "does not depend"),
    ]
    for loss_fn, message in cases:
        with pytest.raises(HessianError, match=message):
            HessianOperator(model, loss_fn, (X, y)) @ torch.zeros(n)
    with pytest.raises(HessianError, match="float64 on cpu, the batch holds torch.float32"):
        HessianOperator(model, ce_loss, (X.float(), y)) @ torch.zeros(n)
    with pytest.raises(HessianError, match="class targets and other indices must stay integer"):
        HessianOperator(model, ce_loss, (X, y.double())) @ torch.zeros(n)  # all of it cast

    def mean_output(m, x):  # a loss of inputs only: each batch is one tensor
        return m(x).square().mean()

    with pytest.raises(
        HessianError,
        match=r"(?s)That batch is list\(Tensor\(4, 5\), Tensor\(4, 5\)\).*list of such",
    ):
        HessianOperator(model, mean_output, [X[:4], X[4:]]) @ torch.zeros(n)

    # the fix the message names: a list of one-tensor tuples is two batches
    def first(m, b):
        return mean_output(m, b[0])

    v = torch.randn(n, dtype=F64)
    two = HessianOperator(model, first, [(X[:4],), (X[4:],)]) @ v
    assert (two - HessianOperator(model, first, (X,)) @ v).abs().max() < 1e-12
    with pytest.raises(ValueError, match="0 samples.*batch_size_fn"):
        HessianOperator(model, ce_loss, (X, y), batch_size_fn=lambda b: 0) @ torch.zeros(n)
    with pytest.raises(TypeError, match="real"):
        HessianOperator(model, ce_loss, (X, y)) @ torch.zeros(n, dtype=torch.complex128)
    with pytest.raises(TypeError, match="integer tensor"):
        HessianOperator(model, ce_loss, (X, y)).restrict(torch.tensor([0.5, 1.5]))


def test_a_tuple_batch_with_a_non_tensor_item_is_named_as_the_likely_cause():
    """``(x, None)`` is read as two batches (not all items are tensors); the count of the None
    batch fails, and the error says why rather than asking for batch_size_fn."""
    model, X, y = mlp_problem(n=8)
    n = sum(p.numel() for p in model.parameters())

    def loss_fn(m, b):
        x, _ = b
        return m(x).square().mean()

    for data, kind in (((X, None), "tuple"), ([None, X], "list")):
        with pytest.raises(ValueError, match="Likely cause") as err:
            HessianOperator(model, loss_fn, data) @ torch.zeros(n, dtype=F64)
        msg = str(err.value)
        assert f"data is a {kind}(" in msg and "NoneType" in msg
        assert f"one batch given as a {kind} holding a non-tensor item" in msg
        assert "tuple of tensors" in msg and "dict" in msg and "wrap batches in a list" in msg
        assert "batch_size_fn" not in msg
    # the fix it names: wrapped in a list, (X, None) is one batch
    v = torch.randn(n, dtype=F64)
    # one mode for both: auto picks by timing, and two modes differ in the last bits
    one = HessianOperator(model, loss_fn, [(X, None)], mode="forward") @ v
    alone = HessianOperator(model, lambda m, b: loss_fn(m, (b, None)), X, mode="forward")
    assert (one - alone @ v).abs().max() == 0
    # a batch that cannot be counted for another reason keeps the batch_size_fn advice
    with pytest.raises(ValueError, match="batch_size_fn=lambda") as err:
        HessianOperator(model, loss_fn, [None]) @ torch.zeros(n, dtype=F64)
    assert "Likely cause" not in str(err.value)


def test_batches_with_scalar_tensors_from_an_iterable():
    model, X, y = mlp_problem(n=8)

    def loader():  # a re-iterable source that is not a list: batches are fingerprinted
        return ((X[i : i + 4], y[i : i + 4], torch.tensor(1.0, dtype=F64)) for i in (0, 4))

    class Loader:
        def __iter__(self):
            return loader()

    def loss_fn(m, b):
        return b[2] * ce_loss(m, b[:2])

    H = HessianOperator(model, loss_fn, Loader())
    D = dense_reference(model, ce_loss, (X, y))
    assert (H.to_dense() - D).abs().max() < 1e-10
    # a scalar first: its leading size is no sample count, so batch_size_fn must give it
    first = (torch.tensor(1.0, dtype=F64), X, y)
    H = HessianOperator(model, lambda m, b: b[0] * ce_loss(m, b[1:]), first)
    with pytest.raises(ValueError, match="how many samples a batch of type tuple.*batch_size_fn"):
        H @ torch.zeros(H.shape[0], dtype=F64)


def test_a_fingerprint_covers_shapes_dtypes_keys_and_other_items():
    """Batches with the same bytes differ when a tensor's shape or dtype, a key or a non-tensor
    item does: a changed batch is seen whatever changed. The same batch rebuilt matches."""
    x = torch.arange(12, dtype=F64)
    same = fingerprint({"x": x, "y": x + 1, "n": 3})
    assert fingerprint({"x": x.clone(), "y": x + 1, "n": 3}) == same
    for other in (
        {"x": x.reshape(3, 4), "y": x + 1, "n": 3},
        {"x": x.view(torch.int64), "y": x + 1, "n": 3},
        {"y": x, "x": x + 1, "n": 3},
        {"x": x, "y": x + 1, "n": 4},
    ):
        assert fingerprint(other) != same


def test_mapping_batches_that_are_not_dicts():
    """transformers' BatchEncoding is a UserDict: one batch, counted and fingerprinted."""
    from collections import UserDict

    model, X, y = mlp_problem(n=8)

    def loss_fn(m, b):
        return ce_loss(m, (b["x"], b["y"]))

    one = HessianOperator(model, loss_fn, UserDict(x=X, y=y))
    two = HessianOperator(model, loss_fn, [UserDict(x=X[:3], y=y[:3]), UserDict(x=X[3:], y=y[3:])])
    D = dense_reference(model, ce_loss, (X, y))
    assert (one.to_dense() - D).abs().max() < 1e-10
    assert (two.to_dense() - D).abs().max() < 1e-10
    assert fingerprint(UserDict(x=X)) != fingerprint(UserDict(x=X + 1))


def test_a_dataset_of_samples_is_refused_with_the_dataloader_fix():
    """A map-style Dataset holds samples, not batches: the error names DataLoader, not
    batch_size_fn (with which loss_fn would get the whole Dataset as one batch)."""
    from torch.utils.data import DataLoader, TensorDataset

    model, X, y = mlp_problem(n=8)
    with pytest.raises(ValueError, match=r"TensorDataset.*DataLoader\(dataset, batch_size="):
        HessianOperator(model, ce_loss, TensorDataset(X, y))
    H = HessianOperator(model, ce_loss, DataLoader(TensorDataset(X, y), batch_size=3))
    assert (H.to_dense() - dense_reference(model, ce_loss, (X, y))).abs().max() < 1e-10


def test_nan_loss_is_named_as_such():
    model, X, y = mlp_problem(n=8)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    for check in (True, False):
        H = HessianOperator(model, ce_loss, (X, y), check_determinism=check)
        with pytest.raises(HessianError, match="the loss is nan"):
            H @ torch.zeros(H.shape[0], dtype=F64)


def test_restrict_matches_dense_slices(gpt):
    model, x, y, D = gpt
    H = HessianOperator(model, lm_loss, (x, y), mode="forward")
    sizes = [H.param_shapes[n].numel() for n in H.params]
    off = dict(zip(H.params, [sum(sizes[:i]) for i in range(len(sizes))], strict=True))

    def flat(name, index):
        shape = H.param_shapes[name]
        return (torch.arange(shape.numel()).reshape(shape)[index].reshape(-1) + off[name]).sort()[0]

    q, fc_in, ln = "blocks.0.attn.q_proj.weight", "blocks.0.mlp.fc_in.weight", "ln_f.weight"
    cases = [
        ("tok_emb.weight", ln, flat("tok_emb.weight", ...), flat(ln, ...)),
        ({fc_in: 3}, {q: (slice(None), 2)}, flat(fc_in, 3), flat(q, (slice(None), 2))),
        ({q: slice(4, 8)}, {q: slice(0, 4)}, flat(q, slice(4, 8)), flat(q, slice(0, 4))),
    ]
    for a, b, ia, ib in cases:
        Hab = H.restrict(a, b)
        assert Hab.shape == (len(ia), len(ib))
        dense_ab = Hab.to_dense()
        assert (dense_ab - D[ia][:, ib]).abs().max() < 1e-10
        assert (H.restrict(b, a).to_dense() - dense_ab.T).abs().max() < 1e-10
        assert (Hab.T.to_dense() - dense_ab.T).abs().max() < 1e-10
    # partition blocks: heads of q_proj (global ids), rows of fc_in
    part = partition.Partition(
        [
            partition.TensorBlocks(n, tuple(H.param_shapes[n]), "tensor", {})
            for n in H.params
            if n not in (q, fc_in)
        ]
        + [
            partition.TensorBlocks(q, tuple(H.param_shapes[q]), "heads", {"head_dim": 4}),
            partition.TensorBlocks(fc_in, tuple(H.param_shapes[fc_in]), "rows", {}),
        ]
    )
    head1 = part.offset(q) + 1
    row5 = part.offset(fc_in) + 5
    Hab = H.restrict(head1, [row5, row5 + 1], partition=part)
    ia = flat(q, slice(4, 8))
    ib = torch.cat([flat(fc_in, 5), flat(fc_in, 6)])
    assert (Hab.to_dense() - D[ia][:, ib]).abs().max() < 1e-10


def test_wrong_shapes_name_the_expected_shape():
    model, X, y = mlp_problem()
    H = HessianOperator(model, ce_loss, (X, y))
    n = H.shape[0]
    with pytest.raises(ValueError, match=rf"\({n},\)"):
        H @ torch.zeros(n + 1)
    with pytest.raises(ValueError, match=rf"\({n}, k\)"):
        H.matmat(torch.zeros(n - 1, 2))
    assert H.matmat(torch.zeros(n, 0, dtype=F64)).shape == (n, 0)
    bad = {k: torch.zeros(2) for k in H.params}
    with pytest.raises(ValueError, match="fc1.weight.*must have shape \\(6, 5\\)"):
        H @ bad
    with pytest.raises(ValueError, match="missing"):
        H @ {"fc1.weight": torch.zeros(6, 5)}
    # a dict of vectors needs one count k for every tensor: 3 for fc1.weight, 2 for fc1.bias
    ragged = {k: torch.zeros(3 if k == "fc1.weight" else 2, *s) for k, s in H.param_shapes.items()}
    with pytest.raises(
        ValueError, match=r"v\['fc1.bias'\] must have shape \(k, \*\(6,\)\), got \(2, 6\)"
    ):
        H.matmat(ragged)
    for idx in ([n], [-1], [0, n + 3]):  # flat indices past either end, not an IndexError later
        with pytest.raises(ValueError, match=rf"flat indices must lie in \[0, {n}\)"):
            H.select(torch.tensor(idx))
    with pytest.raises(KeyError, match="unknown parameter"):
        HessianOperator(model, ce_loss, (X, y), params=["nope"])
    with pytest.raises(KeyError, match="did you mean 'fc1.weight'"):
        HessianOperator(model, ce_loss, (X, y), params=["fc1.weigth"])
    tied = PaddedLM(tie=True)  # named_parameters() lists the shared tensor once
    with pytest.raises(KeyError, match="'out.weight' is tied to 'emb.weight'"):
        HessianOperator(tied, ce_loss, (X, y), params=["out.weight", "ln.weight"])
    with pytest.raises(KeyError, match="names"):
        HessianOperator(model, ce_loss, (X, y), params=list(model.parameters()))
    with pytest.raises(ValueError, match="no batch.*non-empty"):
        HessianOperator(model, ce_loss, []) @ torch.zeros(n)


def _inductor_builds_cpu_kernels() -> bool:
    try:
        return bool(torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(3)).sum() == 9)
    except Exception:  # noqa: BLE001 - no C++ compiler, or inductor unavailable
        return False


def test_compiled_forward_products_match_dense(recwarn):
    """compile=True: torch.compile of vmap(jvp(grad)) through LayerNorm, in float64."""
    if not _inductor_builds_cpu_kernels():
        pytest.skip("torch.compile cannot build CPU kernels here (it needs a C++ compiler)")
    model, X, y = mlp_problem()
    D = dense_reference(model, ce_loss, (X, y))
    H = HessianOperator(model, ce_loss, (X, y), mode="forward", compile=True)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    V = torch.randn(H.shape[0], 3, generator=g, dtype=F64)
    assert (H @ v - D @ v).abs().max() < 1e-10
    assert (H.matmat(V) - D @ V).abs().max() < 1e-10
    assert not [w for w in recwarn if "eagerly" in str(w.message)], "compiled, not fallen back"


def test_compile_failure_warns_and_runs_eagerly(monkeypatch):
    model, X, y = mlp_problem()
    D = dense_reference(model, ce_loss, (X, y))

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("backend exploded\nsecond line")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    H = HessianOperator(model, ce_loss, (X, y), mode="forward", compile=True)
    v = torch.randn(H.shape[0], dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"\(backend exploded\); this operator's products run"):
        Hv = H @ v
    assert (Hv - D @ v).abs().max() < 1e-10


def test_bad_compile_argument_is_refused():
    model, X, y = mlp_problem()
    with pytest.raises(ValueError, match="compile must be True or False"):
        HessianOperator(model, ce_loss, (X, y), compile="yes")
    with pytest.raises(ValueError, match="mode='reverse' has none.*mode='forward'"):
        HessianOperator(model, ce_loss, (X, y), mode="reverse", compile=True)


def test_bad_cache_argument_is_refused():
    model, X, y = mlp_problem()
    with pytest.raises(ValueError, match="cache must be 'auto', True or False"):
        HessianOperator(model, ce_loss, (X, y), cache="yes")


def test_dropout_in_train_mode_is_refused():
    torch.manual_seed(0)
    model = LNMLP(dropout=0.3).double()
    X, y = torch.randn(6, 5, dtype=F64), torch.randint(0, 3, (6,))
    H = HessianOperator(model, ce_loss, (X, y))
    with pytest.raises(NonDeterministicError, match="drop.*eval"):
        H @ torch.zeros(H.shape[0])
    model.eval()
    H = HessianOperator(model, ce_loss, (X, y))
    H @ torch.zeros(H.shape[0])
    model.train()
    H = HessianOperator(model, ce_loss, (X, y), check_determinism=False)
    H @ torch.zeros(H.shape[0])
    # BatchNorm in train mode: each sample's output depends on the batch (and the running
    # statistics move), so its loss is no mean of per-sample losses
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    H = HessianOperator(bn, ce_loss, (X, y), mode="reverse")
    with pytest.raises(NonDeterministicError, match=r"1 \(BatchNorm1d\).*eval"):
        H @ torch.zeros(H.shape[0])


def test_functional_dropout_is_caught_by_the_repeat_check():
    model, X, y = mlp_problem()

    def noisy(m, b):
        return nn.functional.cross_entropy(nn.functional.dropout(m(b[0]), 0.5, True), b[1])

    with pytest.raises(NonDeterministicError, match="changed between two evaluations"):
        H = HessianOperator(model, noisy, (X, y))
        H @ torch.zeros(H.shape[0])

    calls = []

    def jitter(m, b):  # every other call 1e-4 larger: no rounding in float64, also refused
        calls.append(1)
        return ce_loss(m, b) * (1 + 1e-4 * (len(calls) % 2))

    with pytest.raises(NonDeterministicError, match="changed between two evaluations"):
        H = HessianOperator(model, jitter, (X, y))
        H @ torch.zeros(H.shape[0])


def test_shuffled_data_is_refused():
    model, X, y = mlp_problem(n=12)
    ds = torch.utils.data.TensorDataset(X, y)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    H = HessianOperator(model, ce_loss, loader)
    with pytest.raises(NonDeterministicError, match="shuffle"):
        H @ torch.zeros(H.shape[0])
    fixed = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False)
    Hf = HessianOperator(model, ce_loss, fixed)
    assert (Hf.to_dense() - HessianOperator(model, ce_loss, (X, y)).to_dense()).abs().max() < 1e-12


def test_forward_mode_error_names_module_and_fix():
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x.cos()

    class Odd(nn.Module):
        def forward(self, x):
            return NoJvp.apply(x)

    model = nn.Sequential(nn.Linear(3, 4), Odd(), nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))
    H = HessianOperator(model, ce_loss, (X, y), mode="forward")
    with pytest.raises(ForwardModeError, match=r"(?s)module '1'.*mode='reverse'.*eager"):
        H @ torch.zeros(H.shape[0])
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    Hr = HessianOperator(model, ce_loss, (X, y), mode="reverse")
    Hr @ torch.zeros(H.shape[0])
    reverse_forwards = len(forwards)
    Ha = HessianOperator(model, ce_loss, (X, y), mode="auto")
    with pytest.warns(RuntimeWarning, match="uses 'reverse'") as caught:
        Ha @ torch.zeros(H.shape[0])
    assert Ha.chosen_modes == {"matvec": "reverse"}
    assert caught[0].filename == __file__, "the warning points at the user's line"
    # auto keeps the graph it built while timing reverse: as many model runs as plain reverse
    assert len(forwards) == 2 * reverse_forwards
    v = torch.randn(H.shape[0], dtype=F64, generator=torch.Generator().manual_seed(6))
    Hv = Ha @ v
    assert len(forwards) == 2 * reverse_forwards, "a product of auto's kept graph ran the model"
    uncached = HessianOperator(model, ce_loss, (X, y), mode="reverse", cache=False)
    assert (Hv - uncached @ v).abs().max() < 1e-12
    with pytest.warns(RuntimeWarning, match="uses 'reverse'") as caught:
        hessian.lanczos(HessianOperator(model, ce_loss, (X, y)), k=1, max_iter=3, progress=False)
    assert caught[0].filename == __file__, "also from deep inside lanczos"


def test_transformers_sdpa_error_names_attention_and_eager_fix():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_embd=8,
        n_head=2,
        n_positions=4,
        vocab_size=11,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    x = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(0))

    def loss(m, b):
        logits = m(input_ids=b[0]).logits
        return nn.functional.cross_entropy(logits.reshape(-1, 11), b[1].reshape(-1))

    H = HessianOperator(model, loss, (x, x), mode="forward")
    with pytest.raises(ForwardModeError, match=r"(?s)h\.0\.attn.*attn_implementation='eager'") as e:
        H @ torch.zeros(H.shape[0])
    assert "mode='reverse'" not in str(e.value), "SDPA has no double backward either"
    # reverse mode (and auto, which falls back to it) fail in the second backward
    for mode in ("reverse", "auto"):
        H = HessianOperator(model, loss, (x, x), mode=mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # auto: "uses 'reverse'"
            with pytest.raises(
                HessianError, match=r"no double backward.*attn_implementation='eager' \(fused SDPA"
            ) as e:
                H @ torch.zeros(H.shape[0])
        assert "mode='forward'" not in str(e.value)


def test_forward_mode_names_in_place_buffer_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,))
    H = HessianOperator(model, ce_loss, (x, y), mode="forward", check_determinism=False)
    with pytest.raises(ForwardModeError, match="running statistics.*model.eval"):
        H @ torch.zeros(H.shape[0])


def test_compile_limit_warns_and_runs_eagerly(monkeypatch):
    """Past dynamo's recompile limit, compiled products would silently run eagerly: the
    operator warns instead (dynamo's eager backend keeps this test fast)."""
    from hessian import loss as loss_module

    eager_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: eager_compile(fn, backend="eager"))
    monkeypatch.setattr(
        loss_module,
        "compile_limits",
        lambda: {"recompile_limit": 1, "fail_on_recompile_limit_hit": True},
    )
    torch._dynamo.reset()
    model, X, y = mlp_problem()
    D = dense_reference(model, ce_loss, (X, y))
    H = HessianOperator(model, ce_loss, (X, y), mode="forward", compile=True)
    V = torch.randn(H.shape[0], 3, dtype=F64)
    assert (H.matmat(V[:, :2]) - D @ V[:, :2]).abs().max() < 1e-10  # the one graph allowed
    with pytest.warns(RuntimeWarning, match="products run eagerly from now on") as caught:
        HV = H.matmat(V)  # a second vector count: a second graph
    assert caught[0].filename == __file__, "the warning points at the user's line"
    assert (HV - D @ V).abs().max() < 1e-10
    torch._dynamo.reset()


def test_compiled_products_fail_at_dynamos_limit_rather_than_fall_back_silently():
    """The dynamo settings the compiled products run under name switches this torch has, and
    turn hitting the recompile limit into an error (which the operator turns into a warning)."""
    from hessian.loss import compile_limits

    limits = compile_limits()
    assert limits and all(hasattr(torch._dynamo.config, k) for k in limits)
    if len(limits) == 2:  # torch>=2.6: the limit and its failing switch
        fail = next(k for k in limits if k.startswith("fail_on"))
        assert limits[fail] is True


def test_non_finite_vectors_and_empty_dict_batches():
    """A NaN/Inf vector is named rather than returned as a NaN product; k = 0 dicts give k = 0."""
    model, X, y = mlp_problem()
    H = HessianOperator(model.eval(), ce_loss, (X, y))
    v = torch.zeros(H.shape[0], dtype=F64)
    v[3] = float("nan")
    with pytest.raises(ValueError, match="vector holds NaN/Inf"):
        H @ v
    with pytest.raises(ValueError, match="vector holds NaN/Inf"):
        H.matmat(torch.full((H.shape[0], 2), float("inf"), dtype=F64))
    nan_dict = {n: torch.full(s, float("nan"), dtype=F64) for n, s in H.param_shapes.items()}
    with pytest.raises(ValueError, match="vector holds NaN/Inf"):
        H @ nan_dict
    empty = H.matmat({n: torch.zeros(0, *s, dtype=F64) for n, s in H.param_shapes.items()})
    assert {n: tuple(t.shape) for n, t in empty.items()} == {
        n: (0, *s) for n, s in H.param_shapes.items()
    }


def test_bad_constructor_arguments_and_losses_are_named():
    """batch_size_fn must count whole samples; the loss must be a real 0-d tensor."""
    model, X, y = mlp_problem()
    model.eval()
    halves = [(X[:3], y[:3]), (X[3:], y[3:])]
    for count in (2.5, -1, None, "3"):
        H = HessianOperator(model, ce_loss, halves, batch_size_fn=lambda b, c=count: c)
        with pytest.raises(ValueError, match="batch_size_fn must return .* an int >= 0"):
            H @ torch.zeros(H.shape[0], dtype=F64)
    H = HessianOperator(model, ce_loss, halves, batch_size_fn=lambda b: torch.tensor(len(b[1])))
    assert (H.to_dense() - dense_reference(model, ce_loss, (X, y))).abs().max() < 1e-12
    for loss in (
        lambda m, b: ce_loss(m, b).reshape(1),
        lambda m, b: ce_loss(m, b).to(torch.complex128),
    ):
        H = HessianOperator(model, loss, (X, y))
        with pytest.raises(HessianError, match="real scalar \\(0-d\\) tensor"):
            H @ torch.zeros(H.shape[0], dtype=F64)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        HessianOperator(lambda x: x, ce_loss, (X, y))
    with pytest.raises(ValueError, match="check_determinism must be True or False"):
        HessianOperator(model, ce_loss, (X, y), check_determinism="no")
    mixed = LNMLP().double()
    mixed.fc2.float()
    with pytest.raises(ValueError, match="one dtype and device"):
        HessianOperator(mixed, ce_loss, (X, y))
    bn = nn.BatchNorm1d(5).double().eval()
    with pytest.raises(KeyError, match="'running_mean' is a buffer"):
        HessianOperator(bn, lambda m, b: m(b).pow(2).mean(), X, params=["running_mean"])


def test_block_ids_outside_the_partition_are_refused():
    """An out-of-range or foreign block id is an error, not silently dropped; [] selects nothing."""
    model, X, y = mlp_problem()
    H = HessianOperator(model.eval(), ce_loss, (X, y), params=["fc1.bias", "ln.bias"])
    part = partition.by_tensor(model)  # fc1.weight, fc1.bias, ln.weight, ln.bias, fc2.weight
    assert torch.equal(H.select([1, 3], partition=part), torch.arange(H.shape[0]))
    for ids, bad in (([1, 99], "[99]"), ([1, -1], "[-1]"), ([1, 0], "[0]")):
        with pytest.raises(ValueError, match=f"block id\\(s\\) \\{bad}"):
            H.restrict(ids, partition=part)
    with pytest.raises(TypeError, match="partition must be a partition.Partition"):
        H.select(1, partition={"fc1.bias": 1})
    assert H.select([]).numel() == 0 and H.select({}).numel() == 0
    with pytest.raises(ValueError, match="picks no entry"):
        H.restrict([], partition=part)


def test_numpy_block_ids_and_flat_indices_select_like_ints_and_tensors():
    """Block ids read off a BlockCoupling (np.argmax, np.unravel_index) are numpy integers."""
    model, X, y = mlp_problem()
    H = HessianOperator(model.eval(), ce_loss, (X, y))
    part = partition.by_rows(model)
    want = H.select([3, 5], partition=part)
    for ids in ([np.int64(3), np.int64(5)], np.array([3, 5])):
        assert torch.equal(H.select(ids, partition=part), want)
    a, b = np.unravel_index(np.int64(3 * part.num_blocks + 5), (part.num_blocks,) * 2)
    Hab = H.restrict(a, b, partition=part)
    assert torch.equal(Hab.rows, H.select(3, partition=part))
    assert torch.equal(Hab.cols, H.select(5, partition=part))
    assert torch.equal(H.select(np.array([7, 2, 7])), torch.tensor([2, 7]))
    # a list of selectors is their union, sorted, each entry once
    union = H.select(["ln.bias", "fc1.bias", {"fc1.bias": 0}])
    assert torch.equal(union, torch.cat([H.select("fc1.bias"), H.select("ln.bias")]))


def test_block_ids_of_a_partition_with_other_shapes_are_refused():
    """A partition of a wider model with the same names: its block ids would silently index
    other tensors' entries, or entries past the end of H."""
    model, X, y = mlp_problem()
    H = HessianOperator(model.eval(), ce_loss, (X, y))
    wide = partition.by_rows(
        [(n, torch.zeros(*p.shape[:-1], p.shape[-1] + 1)) for n, p in model.named_parameters()]
    )
    for block in (0, 6, wide.num_blocks - 1):
        with pytest.raises(
            ValueError,
            match=r"partition tensor 'fc1.weight' has shape \(6, 6\), the parameter has \(6, 5\)",
        ):
            H.restrict(block, partition=wide)


def test_the_errors_still_import_from_hessian_operator():
    """The split of operator.py moved the three errors to hessian/errors.py; the module that
    defined them still exports all three (ForwardModeError and HessianError were kept,
    NonDeterministicError was not). No import-order check: ``import hessian.guards`` (or any
    submodule) runs ``hessian/__init__.py`` first, so every order is the one this file ran."""
    from hessian import operator as operator_module

    assert operator_module.HessianError is HessianError
    assert operator_module.ForwardModeError is ForwardModeError
    assert operator_module.NonDeterministicError is NonDeterministicError


def test_auto_mode_loads_only_the_first_batch_to_time():
    """``mode="auto"`` times its products on the first batch with samples: it loads that one batch
    and stops, not every batch of a DataLoader-like iterable."""
    model, X, y = mlp_problem()

    class Counted:
        def __init__(self):
            self.loads = 0

        def __iter__(self):
            for i in range(0, len(X), 2):
                self.loads += 1
                yield X[i : i + 2], y[i : i + 2]

    loads = {}
    for mode in ("auto", "forward"):
        data = Counted()
        H = HessianOperator(model.eval(), ce_loss, data, mode=mode)
        H @ torch.zeros(H.shape[0], dtype=F64)
        loads[mode] = data.loads
    assert loads["auto"] == loads["forward"] + 1


def test_data_that_gives_fewer_batches_on_a_later_pass_is_refused():
    """The batches of every pass are checked against the first one's fingerprints; a pass that
    ends early (a loader that drops a batch) is caught by the count, with or without the check."""
    model, X, y = mlp_problem(n=9)

    class Loader:
        def __init__(self):
            self.batches = [(X[i : i + 3], y[i : i + 3]) for i in range(0, 9, 3)]

        def __iter__(self):
            return iter(self.batches)

    for check in (True, False):
        data = Loader()
        H = HessianOperator(model.eval(), ce_loss, data, mode="forward", check_determinism=check)
        v = torch.ones(H.shape[0], dtype=F64)
        H @ v
        data.batches.pop()
        with pytest.raises(NonDeterministicError, match="gave 2 batches on this pass but 3 before"):
            H @ v
    # batches that come in another order on a later pass: each is checked against its print
    data = Loader()
    H = HessianOperator(model.eval(), ce_loss, data, mode="forward")
    H @ v
    data.batches.reverse()
    with pytest.raises(NonDeterministicError, match="batch 0 differs from the previous pass"):
        H @ v


def test_arguments_of_the_wrong_kind_are_named_at_construction():
    model, X, y = mlp_problem()
    with pytest.raises(TypeError, match="loss_fn must be a function loss_fn"):
        HessianOperator(model, None, (X, y))
    with pytest.raises(TypeError, match="batch_size_fn must be None or a function"):
        HessianOperator(model, ce_loss, (X, y), batch_size_fn=8)
    with pytest.raises(TypeError, match="params takes parameter names, .* got int"):
        HessianOperator(model, ce_loss, (X, y), params=5)
    with pytest.raises(ValueError, match="progress must be True or False"):
        HessianOperator(model, ce_loss, (X, y), progress="no")


def test_a_batch_that_does_not_fit_the_model_is_named_not_a_bare_torch_error():
    model, X, y = mlp_problem()
    n = HessianOperator(model, ce_loss, (X, y)).shape[0]
    with pytest.raises(HessianError, match=r"Target 5 is out of bounds. That batch is .*class"):
        HessianOperator(model, ce_loss, (X, y + 5)) @ torch.zeros(n, dtype=F64)
    with pytest.raises(HessianError, match=r"tuple\(Tensor\(8, 4\), .* shapes do not fit"):
        HessianOperator(model, ce_loss, (X[:, :4], y)) @ torch.zeros(n, dtype=F64)


def test_vectors_that_are_not_numbers_are_named_and_sparse_ones_are_made_dense():
    model, X, y = mlp_problem()
    H = HessianOperator(model, ce_loss, (X, y))
    n = H.shape[0]
    v = torch.randn(n, dtype=F64)
    assert torch.equal(H @ v.to_sparse(), H @ v)
    with pytest.raises(TypeError, match="the vector must hold numbers, got NoneType"):
        H @ None
    with pytest.raises(TypeError, match="the vector must hold numbers, got list"):
        H @ (["a"] * n)
    with pytest.raises(ValueError, match="meta device and holds no values"):
        H @ torch.zeros(n, device="meta")
    d = {name: torch.zeros(s, dtype=F64) for name, s in H.param_shapes.items()}
    with pytest.raises(TypeError, match=r"a \{name: tensor\} dict goes to a HessianOperator"):
        H.restrict("fc1.bias") @ d


def test_to_dense_of_a_matrix_too_large_to_allocate_fails_before_any_product():
    """It computed every column and failed at the final torch.cat (hours on a real model)."""

    def product(v):
        raise AssertionError("a product was computed")

    product.shape = (10**7, 10**7)  # 800 TB in float64: beyond any address space
    with pytest.raises(MemoryError, match=r"dense 10000000 x 10000000 matrix \(8e\+05 GB"):
        hessian.as_operator(product).to_dense()


def test_a_parameter_changed_after_construction_is_named():
    """A resized or re-typed parameter failed inside torch (forward-gradient sizes, matmul
    dtypes), a removed one with a bare KeyError."""
    for change in (
        lambda m: setattr(m.fc2, "weight", nn.Parameter(torch.zeros(4, 6, dtype=F64))),
        lambda m: m.float(),
        lambda m: delattr(m.fc1, "bias"),
    ):
        model, X, y = mlp_problem()
        H = HessianOperator(model.eval(), ce_loss, (X, y))
        v = torch.zeros(H.shape[0], dtype=F64)
        H @ v
        change(model)
        with pytest.raises(HessianError, match="changed after the operator was built"):
            H @ v
