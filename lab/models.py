"""Small testbed models: a one-screen TinyGPT and the paper's MLPs, with their losses.

Every loss here computes its own cross-entropy from the logits,

    CE = -mean_i log softmax(z_i)[y_i],

so a float64 model gives a float64 loss (no hidden upcast to float32), and attention is
written out in plain tensor math, so ``torch.func.jvp``, ``torch.func.grad`` and
autograd double backward all run through TinyGPT.

Note (see DESIGN.md, "Pitfalls"): the LayerNorms are the native ``nn.LayerNorm``;
``torch.func.hessian`` (``jacfwd(jacrev(f))``) is wrong through it, so take dense
reference Hessians of TinyGPT with ``jacfwd(grad(f))`` or double-backward HVPs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._functorch import is_functorch_wrapped_tensor
from torch._subclasses.fake_tensor import is_fake

__all__ = [
    "TinyGPTConfig",
    "TinyGPT",
    "lm_loss",
    "OneHiddenMLP",
    "DeepMLP",
    "classification_loss",
    "cross_entropy",
]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy ``-mean log softmax(logits)[target]`` in the dtype of ``logits``.

    ``logits`` has shape (..., C) and ``targets`` the leading shape (...) with class ids.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} need targets of shape "
            f"{tuple(logits.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be integer class ids, got {targets.dtype}; pass y.long()")
    _check_ids(targets, logits.shape[-1], "target class ids", "num_classes / vocab_size")
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).mean()


def _init_weights(model: nn.Module, std: float, residual_std: float, seed: int | None) -> None:
    """Normal(0, std) for Linear/Embedding weights, zeros for biases, LayerNorm = (1, 0).

    The residual output projections (``o_proj``, ``fc_out``) get ``residual_std`` (GPT-2:
    ``std / sqrt(2 n_layer)``).

    With ``seed`` the draw comes from a private ``torch.Generator`` (the global RNG is
    untouched); without it, from the global RNG (``torch.manual_seed`` conventions).
    """
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            s = residual_std if name.endswith(("o_proj", "fc_out")) else std
            nn.init.normal_(module.weight, mean=0.0, std=s, generator=gen)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


@dataclass(frozen=True)
class TinyGPTConfig:
    """Shape of a TinyGPT.

    ``n_kv_heads``, ``head_dim`` and ``d_ff`` keep the value given (``None`` = derived, so
    ``dataclasses.replace(config, d_model=...)`` re-derives them); read the resolved sizes
    from the properties ``kv_heads``, ``hd`` and ``ff``. ``init_std`` is the std of the
    normal initialisation (GPT-2's 0.02; residual projections get ``init_std / sqrt(2 n_layer)``).
    """

    vocab_size: int = 256
    context: int = 64
    n_layer: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int | None = None  # -> n_heads (plain multi-head attention)
    head_dim: int | None = None  # -> d_model // n_heads
    d_ff: int | None = None  # -> 4 * d_model
    tie_weights: bool = False
    bias: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "n_layer", "d_model", "n_heads"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"TinyGPTConfig.{name} must be a positive int, got {value!r}")
        for name in ("tie_weights", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"TinyGPTConfig.{name} must be true or false, got {getattr(self, name)!r}"
                )
        for name in ("n_kv_heads", "head_dim", "d_ff"):
            value = getattr(self, name)
            if value is not None and not _is_positive_int(value):
                raise ValueError(
                    f"TinyGPTConfig.{name} must be a positive int or None (derived), got {value!r}"
                )
        if self.head_dim is None and self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                f"pass head_dim explicitly or pick n_heads dividing d_model"
            )
        if self.n_heads % self.kv_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}: "
                f"pick n_kv_heads dividing n_heads (GQA shares each k/v head among "
                f"n_heads // n_kv_heads query heads)"
            )
        if not 0 < self.init_std < math.inf:
            raise ValueError(
                f"TinyGPTConfig.init_std must be finite and > 0, got {self.init_std!r}"
            )

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_heads`` or ``n_heads``)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hd(self) -> int:
        """Per-head width (``head_dim`` or ``d_model // n_heads``)."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def ff(self) -> int:
        """MLP hidden width (``d_ff`` or ``4 * d_model``)."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff


class CausalSelfAttention(nn.Module):
    r"""Causal (grouped-query) self-attention in plain tensor math.

    For each query head h with key/value head g = h // (n_heads / n_kv_heads):
    ``A_h = softmax(Q_h K_g^T / sqrt(head_dim) + M) V_g`` with M = -inf above the
    diagonal; the heads are concatenated and mapped back by ``o_proj``.
    """

    def __init__(self, c: TinyGPTConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.kv_heads, c.hd
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.hd, bias=c.bias)
        self.k_proj = nn.Linear(c.d_model, c.kv_heads * c.hd, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, c.kv_heads * c.hd, bias=c.bias)
        self.o_proj = nn.Linear(c.n_heads * c.hd, c.d_model, bias=c.bias)
        mask = torch.ones(c.context, c.context, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``o_proj(concat_h A_h)`` for ``x`` of shape (B, T, d_model); same shape out."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # GQA: query heads [g*rep, (g+1)*rep) share k/v head g
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~self.causal_mask[:T, :T], float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v  # (B, n_heads, T, head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """``fc_out(gelu_tanh(fc_in(x)))``."""

    def __init__(self, c: TinyGPTConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(c.d_model, c.ff, bias=c.bias)
        self.fc_out = nn.Linear(c.ff, c.d_model, bias=c.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``fc_out(gelu_tanh(fc_in(x)))`` on the last dim (d_model -> d_ff -> d_model)."""
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, c: TinyGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.d_model)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.d_model)
        self.mlp = MLP(c)

    def forward(self, x: Tensor) -> Tensor:
        """``x + attn(ln_1(x))``, then ``+ mlp(ln_2(.))``; shape (B, T, d_model) kept."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Pre-LN decoder-only transformer: ``lm_head(ln_f(blocks(tok_emb[idx] + pos_emb[t])))``.

    Args:
        config: the shape (see :class:`TinyGPTConfig`).
        seed: if given, the initialisation is drawn from ``torch.Generator().manual_seed(seed)``
            (same seed, same weights; global RNG untouched); else from the global RNG.

    Example:
        >>> model = TinyGPT(TinyGPTConfig(n_heads=4, n_kv_heads=2), seed=0).double()
        >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 256])
    """

    def __init__(self, config: TinyGPTConfig, seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(config, TinyGPTConfig):
            raise TypeError(f"TinyGPT needs a TinyGPTConfig, got {type(config).__name__}")
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.context, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        _init_weights(self, c.init_std, c.init_std / math.sqrt(2 * c.n_layer), seed)
        if c.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        """Map token ids ``idx`` (B, T), T <= context, to logits (B, T, vocab_size)."""
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"TinyGPT expects integer token ids of shape (B, T), got "
                f"{idx.dtype} of shape {tuple(idx.shape)}; pass x.long()"
            )
        T = idx.shape[1]
        if T > self.config.context:
            raise ValueError(
                f"sequence length {T} exceeds context={self.config.context}: "
                f"crop the input or build the model with a larger context"
            )
        _check_ids(idx, self.config.vocab_size, "token ids", "vocab_size")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """Mean next-token cross-entropy of ``model(inputs)`` against ``targets``.

    ``batch = (inputs (B, T), targets (B, T))``; the loss is in the model's dtype.
    """
    inputs, targets = batch
    return cross_entropy(model(inputs), targets)


class OneHiddenMLP(nn.Module):
    """The paper's 1-hidden-layer testbed ``z = W2 act(W1 x)``, no biases.

    ``fc1.weight`` is (m, d) and ``fc2.weight`` is (C, m); defaults d=500, m=8, C=500
    (Adam-mini, Section 2; the Hessian structure goes back to Collobert, 2004).

    Activation: ReLU by default, the usual choice and the one of the classical
    near-block-diagonal Hessian experiments. Its second derivative is zero almost
    everywhere, so the fc1-fc1 Hessian block is the Gauss-Newton part alone; pass
    ``activation="tanh"`` for a smooth network whose Hessian also has the
    curvature term ``sum_k dL/dz_k d^2 z_k / dW1^2`` (more informative at init).
    """

    def __init__(
        self,
        d: int = 500,
        m: int = 8,
        num_classes: int = 500,
        activation: Literal["relu", "tanh"] = "relu",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        _check_positive(d=d, m=m, num_classes=num_classes)
        if activation not in ("relu", "tanh"):
            raise ValueError(f"activation must be 'relu' or 'tanh', got {activation!r}")
        self.activation = activation
        self.fc1 = nn.Linear(d, m, bias=False)
        self.fc2 = nn.Linear(m, num_classes, bias=False)
        _init_default(self, seed)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``z = W2 act(W1 x)``: (N, d) -> (N, C)."""
        h = self.fc1(x)
        return self.fc2(torch.relu(h) if self.activation == "relu" else torch.tanh(h))


class DeepMLP(nn.Module):
    """``depth`` bias-free Linear layers with ReLU between: d -> width -> ... -> num_classes.

    ``layers.{i}.weight``; defaults d = width = C = 500, depth = 4 (the paper's 4-layer MLP).
    """

    def __init__(
        self,
        d: int = 500,
        width: int = 500,
        num_classes: int = 500,
        depth: int = 4,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        _check_positive(d=d, width=width, num_classes=num_classes, depth=depth)
        sizes = [d] + [width] * (depth - 1) + [num_classes]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        _init_default(self, seed)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``W_L relu(... relu(W_1 x))``: (N, d) -> (N, C)."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.relu(x))
        return x


def classification_loss(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """Mean cross-entropy of ``model(X)`` against labels; ``batch = (X (N, d), y (N,))``."""
    inputs, labels = batch
    first = {OneHiddenMLP: "fc1", DeepMLP: "layers.0"}.get(type(model))
    if first is not None:  # the paper's MLPs: name a wrong width or dtype before torch does
        layer = model.get_submodule(first)
        if inputs.shape[-1:] != (layer.in_features,):
            raise ValueError(
                f"X must have {layer.in_features} features (shape (N, {layer.in_features})) for "
                f"this model, got {tuple(inputs.shape)}; build the data with d={layer.in_features}"
            )
        if inputs.dtype != layer.weight.dtype and not torch.is_autocast_enabled():
            raise ValueError(
                f"X is {inputs.dtype} but the model is {layer.weight.dtype}; pass X.to(dtype) "
                "or convert the model (e.g. model.double())"
            )
    return cross_entropy(model(inputs), labels)


def _has_values(t: Tensor) -> bool:
    """Whether ``t`` holds concrete values to check (not under compile, vmap, meta or fake)."""
    return not (
        torch.compiler.is_compiling() or t.is_meta or is_fake(t) or is_functorch_wrapped_tensor(t)
    )


def _check_ids(ids: Tensor, size: int, what: str, knob: str) -> None:
    """Raise when an id lies outside ``[0, size)`` (torch would fail deep inside a gather)."""
    if not _has_values(ids):
        return
    if ids.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(ids))  # one pass
    if lo < 0 or hi >= size:
        raise ValueError(
            f"{what} must lie in [0, {size}), got ids from {lo} to {hi}; build the model with a "
            f"larger {knob} (the byte corpus needs 256)"
        )


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not _is_positive_int(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _init_default(model: nn.Module, seed: int | None) -> None:
    """PyTorch's default Linear init (Kaiming-uniform, bound 1/sqrt(fan_in)), seedable."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.in_features)
            nn.init.uniform_(module.weight, -bound, bound, generator=gen)
