"""The verification loop's pieces: measure Hessian block structure, derive, train the variants.

``measure_structure`` (the Hessian of a TinyGPT's loss on a few training batches):

* coupling  ``M_ab = ||H_ab||_F^2`` over a fine candidate partition (one block per output row,
  :func:`partition.by_rows`), by Hutchinson probes (:func:`hessian.block_coupling`);
* ``r_diag = sum_a M_aa / sum_ab M_ab`` against ``r_diag_null``, the same score for a random
  partition with the same block sizes;
* blockwise SLQ spectra of one representative block of each type (query head, key head, value
  neuron, ...), :func:`hessian.blockwise_spectra`;
* :func:`partition.derive` merges strongly coupled rows of a tensor into blocks.

``optimizer_factory`` builds AdamW or Adam-mini (on a given partition) with the same
hyper-parameters; ``train_variants`` trains each variant from the same seed.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import hessian
import optimizer
import partition
from hessian.linop import check_positive_ints
from lab.models import TinyGPT, TinyGPTConfig, lm_loss
from lab.train import Batch, BatchSource, TrainResult, WarmupCosine, train

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]

BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1


@dataclass(frozen=True)
class StructureResult:
    """What the Hessian measurement found (see the module docstring)."""

    candidate: partition.Partition
    coupling: partition.BlockCoupling
    derived: partition.Partition
    spectra: Mapping[str, Any]  # label -> hessian SpectralDensity
    threshold: float
    num_tokens: int
    num_matvecs: int
    seconds_coupling: float
    seconds_spectra: float

    @property
    def r_diag(self) -> float:
        """Block-diagonal mass share of the candidate partition."""
        return self.coupling.r_diag

    @property
    def r_diag_stderr(self) -> float:
        """Standard error of the estimated ``r_diag`` (over the Hutchinson rounds)."""
        return float(self.coupling.r_diag_stderr)

    @property
    def r_diag_null(self) -> float:
        """The same share for a random partition with the same block sizes."""
        return float(self.coupling.r_diag_null)


def block_types(config: TinyGPTConfig, token: int, layers: Sequence[int] = (0,)) -> dict[str, Any]:
    """One representative block of each type, as ``{label: HessianOperator selector}``.

    The blocks are those of the Adam-mini principle: a head of the query and key, an output
    neuron (row) of value, attention output and the MLP matrices, the row of ``token`` in the
    token embedding and the output layer, position 0 of the position embedding, and a whole
    LayerNorm weight (no output-layer row when it is tied to the embedding).
    """
    hd = config.hd
    groups: dict[str, Any] = {}
    for i in layers:
        p = f"blocks.{i}"
        groups |= {
            f"L{i} query head 0": {f"{p}.attn.q_proj.weight": slice(0, hd)},
            f"L{i} key head 0": {f"{p}.attn.k_proj.weight": slice(0, hd)},
            f"L{i} value neuron 0": {f"{p}.attn.v_proj.weight": 0},
            f"L{i} attn output neuron 0": {f"{p}.attn.o_proj.weight": 0},
            f"L{i} MLP fc_in neuron 0": {f"{p}.mlp.fc_in.weight": 0},
            f"L{i} MLP fc_out neuron 0": {f"{p}.mlp.fc_out.weight": 0},
            f"L{i} LayerNorm ln_1 weight": f"{p}.ln_1.weight",
        }
    shown = repr(chr(token)) if 32 <= token < 127 else f"byte {token}"
    groups |= {
        f"token embedding row {shown}": {"tok_emb.weight": token},
        "position embedding row 0": {"pos_emb.weight": 0},
    }
    if not config.tie_weights:
        groups[f"output layer row {shown}"] = {"lm_head.weight": token}
    return groups


def measure_structure(
    model: TinyGPT,
    batches: Sequence[Batch],
    *,
    num_samples: int = 2,
    threshold: float = 0.05,
    spectra_probes: int = 2,
    spectra_steps: int = 24,
    seed: int = 0,
    progress: bool = True,
) -> StructureResult:
    """Coupling over ``by_rows``, its null, blockwise spectra and the derived partition.

    The model is copied to float64; ``batches`` are (inputs, targets) pairs of the training
    split (or one such pair). Costs ``num_samples * by_rows(model).num_blocks`` Hessian-vector
    products for the coupling and ``spectra_steps * spectra_probes * len(block_types)`` for the
    spectra.
    """
    if (
        isinstance(batches, tuple | list)
        and len(batches) == 2
        and all(map(torch.is_tensor, batches))
    ):
        batches = [tuple(batches)]  # one (inputs, targets) pair
    # what is checked only after the coupling measurement (minutes), checked before it
    check_positive_ints(spectra_probes=spectra_probes, spectra_steps=spectra_steps)
    if isinstance(threshold, bool) or not (
        isinstance(threshold, numbers.Real) and 0 <= threshold <= 1
    ):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    batches = list(batches)
    if not batches or any(len(b) != 2 for b in batches):
        raise ValueError(
            "batches must be a non-empty list of (inputs, targets) pairs, e.g. "
            "[corpus.batch('train', 8, 32, generator)]"
        )
    model64 = _float64_copy(model)
    # double-backward HVPs: the faster mode at this size, and a fixed choice keeps runs bitwise
    # reproducible ("auto" picks by timing)
    H = hessian.HessianOperator(model64, lm_loss, batches, mode="reverse")
    candidate = partition.by_rows(model64)
    t0 = time.perf_counter()
    coupling = hessian.block_coupling(
        H, candidate, num_samples=num_samples, seed=seed, progress=progress
    )
    t1 = time.perf_counter()
    tokens = torch.cat([x.reshape(-1) for x, _ in batches])
    common = int(torch.bincount(tokens, minlength=model.config.vocab_size).argmax())
    layers = sorted({0, model.config.n_layer - 1})
    spectra = hessian.blockwise_spectra(
        H,
        block_types(model.config, common, layers),
        num_probes=spectra_probes,
        num_steps=spectra_steps,
        seed=seed,
        progress=progress,
    )
    t2 = time.perf_counter()
    derived = partition.derive(coupling, threshold=threshold)
    matvecs = num_samples * candidate.num_blocks + sum(s.num_matvecs for s in spectra.values())
    return StructureResult(
        candidate=candidate,
        coupling=coupling,
        derived=derived,
        spectra=spectra,
        threshold=threshold,
        num_tokens=int(tokens.numel()),
        num_matvecs=int(matvecs),
        seconds_coupling=t1 - t0,
        seconds_spectra=t2 - t1,
    )


def _float64_copy(model: TinyGPT) -> TinyGPT:
    copy = TinyGPT(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.double().eval()


def optimizer_factory(
    part: partition.Partition | None,
    lr: float,
    *,
    betas: tuple[float, float] = BETAS,
    weight_decay: float = WEIGHT_DECAY,
) -> OptimizerFactory:
    """AdamW (``part=None``) or Adam-mini on ``part``, same hyper-parameters.

    Both decay only tensors with ``ndim >= 2`` (AdamMini's default ``decay_1d=False``; AdamW
    gets the same two parameter groups).
    """
    if part is None:

        def make_adamw(model: nn.Module) -> torch.optim.Optimizer:
            params = [p for p in model.parameters() if p.requires_grad]
            groups = [
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ]
            return torch.optim.AdamW(groups, lr=lr, betas=betas)

        return make_adamw

    def make_adam_mini(model: nn.Module) -> torch.optim.Optimizer:
        part.check(model)
        return optimizer.AdamMini(
            model.named_parameters(), partition=part, lr=lr, betas=betas, weight_decay=weight_decay
        )

    return make_adam_mini


@dataclass(frozen=True)
class VariantResult:
    """One optimizer variant: its partition (None for AdamW), state bytes and training run."""

    name: str
    partition: partition.Partition | None
    state: optimizer.StateBytes
    run: TrainResult

    @property
    def v_entries(self) -> int:
        """Second-moment entries (= number of blocks; = parameters for AdamW)."""
        return self.state.num_blocks if self.partition is not None else self.state.num_params

    @property
    def v_removed(self) -> float:
        """Share of AdamW's v entries this variant removes."""
        return 1.0 - self.v_entries / self.state.num_params

    @property
    def state_bytes(self) -> int:
        """Predicted optimizer-state bytes (``optimizer.state_bytes``)."""
        return self.state.total if self.partition is not None else self.state.adamw_total


def train_variants(
    variants: Mapping[str, partition.Partition | None],
    config: TinyGPTConfig,
    corpus: BatchSource,
    *,
    steps: int,
    lr: float | Mapping[str, float],
    batch_size: int,
    seed: int,
    eval_every: int,
    eval_batches: int = 8,
    warmup: int | None = None,
    progress: bool = True,
) -> list[VariantResult]:
    """Train every variant (AdamW for ``None``, else Adam-mini on the partition) from ``seed``."""
    out = []
    with torch.device("meta"):
        meta = TinyGPT(config)
    for name, part in variants.items():
        base_lr = lr[name] if isinstance(lr, Mapping) else lr
        run = train(
            lambda: TinyGPT(config),
            optimizer_factory(part, base_lr),
            corpus,
            steps=steps,
            batch_size=batch_size,
            context=config.context,
            schedule=WarmupCosine(steps, warmup_steps=steps // 20 if warmup is None else warmup),
            eval_every=eval_every,
            eval_batches=eval_batches,
            seed=seed,
            name=name,
            progress=progress,
        )
        state = optimizer.state_bytes(meta, part or partition.elements(meta))
        out.append(VariantResult(name, part, state, run))
    return out


@dataclass(frozen=True)
class BlockShare:
    """How block-diagonal the Hessian is over one partition (a coarsening of the candidate).

    ``r_diag = sum_a ||H_aa||_F^2 / ||H||_F^2``; ``area = sum_a s_a^2 / n^2`` is the share of
    matrix entries inside the diagonal blocks, the ``r_diag`` of a Hessian without structure.
    """

    num_blocks: int
    r_diag: float
    area: float

    @property
    def enrichment(self) -> float:
        """``r_diag / area``: how much denser the diagonal blocks are than the average."""
        return self.r_diag / self.area


def block_share(coupling: partition.BlockCoupling, coarse: partition.Partition) -> BlockShare:
    """``r_diag`` of ``coarse`` from the masses measured over the candidate partition.

    Every candidate block must lie inside one block of ``coarse`` (true for ``adam_mini``,
    ``by_tensor`` and ``derive`` over ``by_rows`` on a TinyGPT); then
    ``M_coarse = S^T M S`` with ``S`` the candidate-to-coarse one-hot matrix.
    """
    cand = coupling.partition
    parent = torch.empty(cand.num_blocks, dtype=torch.long)
    for name in cand.names:
        fine = cand.block_index(name).reshape(-1)
        big = coarse.block_index(name).reshape(-1)
        lo = torch.full((cand.num_blocks,), 2**62).scatter_reduce(0, fine, big, "amin")
        hi = torch.full((cand.num_blocks,), -1).scatter_reduce(0, fine, big, "amax")
        used = torch.unique(fine)
        if not torch.equal(lo[used], hi[used]):
            raise ValueError(
                f"tensor {name!r}: a candidate block ({cand[name].rule}) straddles two blocks of "
                f"the coarse partition ({coarse[name].rule}); block_share needs a coarsening"
            )
        parent[used] = lo[used]
    B = coarse.num_blocks
    mass = torch.as_tensor(coupling.mass, dtype=torch.float64)
    S = torch.zeros(cand.num_blocks, B, dtype=torch.float64)
    S[torch.arange(cand.num_blocks), parent] = 1.0
    coarse_mass = S.T @ mass @ S
    sizes = coarse.block_sizes().double()
    n = float(sizes.sum())
    return BlockShare(
        num_blocks=B,
        r_diag=float(coarse_mass.diagonal().sum() / coarse_mass.sum()),
        area=float((sizes**2).sum() / n**2),
    )
