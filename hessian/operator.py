r"""The Hessian of a model's loss over a data set, as a matrix-free linear operator.

.. math::

    H = \nabla^2_\theta L(\theta), \qquad
    L(\theta) = \frac{1}{N} \sum_b n_b \, \ell_b(\theta) \;\; (\text{reduction="mean"}), \qquad
    L(\theta) = \sum_b n_b \, \ell_b(\theta) \;\; (\text{reduction="sum"}),

where ``loss_fn(model, batch)`` returns :math:`\ell_b`, the **mean** loss of batch ``b`` with
:math:`n_b` samples, and :math:`N = \sum_b n_b`. So ragged batches (3 + 4 + 1) give exactly the
Hessian of the concatenated batch. :math:`\theta` are the selected parameters (all trainable ones
by default); the others and all buffers stay fixed. Flat vectors follow ``H.params`` (model order),
each tensor flattened row-major, as ``torch.cat([p.reshape(-1) for p in params])``.

Example::

    H = HessianOperator(model, lm_loss, batches)       # batches: one batch or an iterable
    Hv = H @ v                                          # v flat (n,) or a {name: tensor} dict
    HV = H.matmat(V)                                    # V (n, k): vmap over jvp(grad)
    H_ab = H.restrict({"fc.weight": 3}, "ln.weight")   # row 3 of fc.weight x all of ln.weight
"""

from __future__ import annotations

import contextlib
import difflib
import numbers
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from hessian import distributed as dist_glue
from hessian.data import Batches, fingerprint, sample_count
from hessian.errors import ForwardModeError, HessianError
from hessian.errors import NonDeterministicError as NonDeterministicError  # its home before
from hessian.guards import (
    batch_changed_error,
    batch_count_error,
    check_loss,
    check_modules,
)
from hessian.hvp import (
    Product,
    hvp_forward,
    hvp_reverse,
    is_double_backward_error,
    is_forward_ad_error,
    prepare_reverse,
)
from hessian.linop import Operator, as_real_tensor, check_finite, check_flags
from hessian.loss import LossModule, bound_loss, compile_product
from hessian.messages import (
    double_backward_error,
    first_line,
    forward_mode_error,
    mixed_tuple_error,
    user_stacklevel,
)
from hessian.padding import constant_padding_rows
from hessian.snapshot import Snapshot
from partition import Partition


class HessianOperator(Operator):
    """The Hessian of ``loss_fn`` over ``data`` with respect to ``params`` (see module docstring).

    Args:
        model: the network; it is called through ``torch.func.functional_call``.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of the batch.
        data: one batch, or an iterable of batches (list, DataLoader, generator).
        params: names of the parameters to differentiate (default: all with ``requires_grad``).
        reduction: ``"mean"`` (over all samples) or ``"sum"``.
        mode: ``"forward"`` (jvp of grad), ``"reverse"`` (double backward) or ``"auto"`` (times
            both on the first batch at first use, separately for single and batched products).
        batch_size_fn: samples in a batch; default the leading size of its first tensor.
        check_determinism: refuse active dropout/BatchNorm, a loss that changes between two
            evaluations, and data whose batches change between passes. ``False`` turns it off.
        progress: show a progress bar in :meth:`to_dense`.
        cache: in reverse mode, keep each batch's first-backward graph between products, so a
            product is one second backward (about 2 gradients of work instead of 3).
            ``"auto"`` (default) caches when the data is one batch, ``True`` always, ``False``
            never. Memory: one ``create_graph`` gradient's saved tensors per batch, and a copy of
            the parameters and buffers. ``auto`` mode times cached reverse against forward. The
            cache is rebuilt when a parameter, buffer, train/eval flag or kept batch changes
            value, by any route (:mod:`hessian.snapshot`); :meth:`clear_cache` frees it.

        compile: run forward-mode products (``mode="forward"``, or ``"auto"`` when it picks
            forward) through ``torch.compile(dynamic=False)``. The first product for each batch
            shape and vector count compiles (tens of seconds on a CPU); later ones run fused
            kernels, e.g. a 16-vector ``matmat`` per vector at 0.79–1.05x (TinyGPT) / 1.69–1.81x
            (GPT-2) an eager gradient over the last two runs, instead of 1.60x / 2.42x
            (``benchmarks/README.md``). Double backward
            does not compile, so ``mode="reverse"`` refuses it. If compiling fails, or (torch>=2.6)
            the process has compiled 64 shapes already, a warning says why and the products run
            eagerly.
        distributed: ``None`` (default): all-reduce every product when a process group with more
            than one rank is initialized; ``False``: this rank's own Hessian (e.g. a diagnostic
            run on rank 0 alone; the default would wait for the other ranks); ``True``: require a
            process group.

    Under ``torch.distributed`` each rank passes its own shard (possibly with no sample); every
    product is all-reduced with weights ``n_b / N_global``, so all ranks see the Hessian of the
    global mean loss. Every rank must then call the same products in the same order; an error on
    one rank (bad data, a NaN loss) is raised on every rank instead of leaving the others waiting.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        data: Any,
        params: Iterable[str] | None = None,
        reduction: str = "mean",
        mode: str = "auto",
        batch_size_fn: Callable[[Any], int] | None = None,
        check_determinism: bool = True,
        progress: bool = False,
        cache: bool | str = "auto",
        distributed: bool | None = None,
        compile: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}: the operator swaps "
                "its named parameters (wrap a function of tensors in an nn.Module)"
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if mode not in ("auto", "forward", "reverse"):
            raise ValueError(f"mode must be 'auto', 'forward' or 'reverse', got {mode!r}")
        if cache not in ("auto", True, False):
            raise ValueError(f"cache must be 'auto', True or False, got {cache!r}")
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be a function loss_fn(model, batch) -> scalar mean loss, got "
                f"{type(loss_fn).__name__}; e.g. lambda m, b: F.cross_entropy(m(b[0]), b[1])"
            )
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError(
                f"batch_size_fn must be None or a function batch -> number of samples, got "
                f"{type(batch_size_fn).__name__}; e.g. lambda batch: len(batch[0])"
            )
        check_flags(compile=compile, check_determinism=check_determinism, progress=progress)
        if compile and mode == "reverse":
            raise ValueError(
                "compile=True compiles forward-mode products, and mode='reverse' has none (double "
                "backward does not compile): use mode='forward' or mode='auto', or compile=False"
            )
        if distributed not in (None, True, False):
            raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
        if distributed and not dist_glue.is_distributed():
            raise ValueError(
                "distributed=True needs an initialized torch.distributed process group with more "
                "than one rank; call torch.distributed.init_process_group first, or leave it None"
            )
        self.distributed = dist_glue.is_distributed() if distributed is None else distributed
        self.model = model
        self.loss_fn = loss_fn
        self.reduction = reduction
        self.mode = mode
        self.batch_size_fn = batch_size_fn
        self.check_determinism = check_determinism
        self.progress = progress
        self.cache = cache
        self._module = LossModule(model, loss_fn)
        self._compiled = compile_product(compile)
        self._batches = Batches(data)

        named = dict(model.named_parameters())
        if params is None:
            chosen = [n for n, p in named.items() if p.requires_grad]
        else:
            if not isinstance(params, (str, Iterable)):
                raise TypeError(
                    f"params takes parameter names, a str or an iterable of str, got "
                    f"{type(params).__name__}: e.g. params=['fc.weight', 'fc.bias']"
                )
            wanted = {params} if isinstance(params, str) else set(params)
            if not all(isinstance(n, str) for n in wanted):
                raise KeyError(
                    "params takes parameter names (str), not tensors: e.g. "
                    "params=[n for n, p in model.named_parameters() if ...]"
                )
            unknown = sorted(wanted - set(named))
            if unknown:
                owner = {id(p): n for n, p in named.items()}  # a tied tensor goes by one name
                tied = {a: owner[id(p)] for a, p in model.named_parameters(remove_duplicate=False)}
                buffers = dict(model.named_buffers())
                hints = []
                for n in unknown:
                    if n in tied:
                        hints.append(f"{n!r} is tied to {tied[n]!r}: the shared tensor's name")
                    elif n in buffers:
                        hints.append(f"{n!r} is a buffer, not a parameter: buffers stay fixed")
                    elif m := difflib.get_close_matches(n, named, 1):
                        hints.append(f"{n!r} -> did you mean {m[0]!r}?")
                hint = "; ".join(hints)
                raise KeyError(
                    f"unknown parameter name(s) {unknown}; the model has {list(named)[:8]}"
                    + (" ..." if len(named) > 8 else "")
                    + (f" ({hint})" if hint else "")
                )
            chosen = [n for n in named if n in wanted]
        if not chosen:
            raise ValueError("no parameters to differentiate: pass params=[names] or unfreeze some")
        tensors = [named[n] for n in chosen]
        dtypes = {p.dtype for p in tensors}
        devices = {p.device for p in tensors}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"all differentiated parameters need one dtype and device, got {dtypes} / {devices}"
            )
        self.params: tuple[str, ...] = tuple(chosen)
        self.param_shapes: dict[str, torch.Size] = {n: named[n].shape for n in chosen}
        numels = [named[n].numel() for n in chosen]
        self._offsets = dict(zip(chosen, _cumsum0(numels), strict=True))
        n = sum(numels)
        self.shape = (n, n)
        self.dtype = tensors[0].dtype
        self.device = tensors[0].device

        self._weights: list[float] | None = None
        self._prints: list[str] | None = None
        self._chosen: dict[bool, str] = {}
        self._products: list[Product] | None = None
        self._kept: list[Any] = []  # the batches of the kept graphs
        self._snapshot: Snapshot | None = None  # what the kept graphs were built from
        self.num_samples: int | None = None

    # ----------------------------------------------------------------------------- products
    def matvec(self, v: Any) -> Any:
        """``H @ v`` for a flat vector ``(n,)`` or a dict ``{name: tensor of the param's shape}``."""
        if isinstance(v, Mapping):
            d = self._check_dict(v, batched=False)
            return check_finite(self._apply(d, batched=False), d)
        return super().matvec(v)

    def matmat(self, V: Any) -> Any:
        """``H @ V`` for ``V`` of shape ``(n, k)`` or a dict of ``(k, *shape)`` tensors."""
        if isinstance(V, Mapping):
            d = self._check_dict(V, batched=True)
            if next(iter(d.values())).shape[0] == 0:  # no vectors: as the flat (n, 0) product
                return {n: t.clone() for n, t in d.items()}
            return check_finite(self._apply(d, batched=True), d)
        return super().matmat(V)

    def __matmul__(self, v: Any) -> Any:
        if isinstance(v, Mapping):
            return self.matvec(v)
        return super().__matmul__(v)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if V.shape[1] == 1:
            return self._apply(self._to_dict(V[:, 0]), batched=False, flat=True)[:, None]
        return self._apply(self._to_dict(V), batched=True, flat=True).T

    def to_dense(self, chunk: int | None = None) -> torch.Tensor:
        """The dense ``(n, n)`` Hessian from ``H @ I`` in column chunks (exact, in ``H.dtype``).

        For float64 build the model in float64 (``model.double()``).
        """
        return self._dense(min(self.shape[0], 256) if chunk is None else chunk, self.progress)

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._matmat(V)  # H is symmetric

    # ----------------------------------------------------------------------------- views
    def select(self, spec: Any, partition: Any = None) -> torch.Tensor:
        """Flat indices (sorted, unique) of the entries that ``spec`` names.

        ``spec`` is one of, or a list of (union):

        * ``"name"``: the whole tensor;
        * ``{"name": index}``: ``param[index]`` with any torch index, e.g. ``3`` (row 3),
          ``(slice(None), 2)`` (column 2), ``slice(8, 16)`` (rows 8..15: a head of size 8),
          a bool mask of the tensor's shape;
        * with ``partition`` (a :class:`partition.Partition` over these parameters): an int or a
          sequence of ints, the partition's global block ids;
        * without ``partition``: a LongTensor of flat indices.

        NumPy integers and integer arrays count as ints and integer tensors.
        """
        if isinstance(spec, np.ndarray) and spec.dtype.kind in "iu":
            spec = torch.from_numpy(spec.astype(np.int64))
        if partition is not None and _is_int_like(spec):
            if not isinstance(partition, Partition):
                raise TypeError(
                    f"partition must be a partition.Partition, got {type(partition).__name__}"
                )
            ids = torch.as_tensor(spec, dtype=torch.long).reshape(-1)
            parts, seen = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
            for name in self.params:
                if name not in partition:
                    continue
                if tuple(partition[name].shape) != tuple(self.param_shapes[name]):
                    raise ValueError(
                        f"partition tensor {name!r} has shape {tuple(partition[name].shape)}, the "
                        f"parameter has {tuple(self.param_shapes[name])}: build the partition "
                        "from this model"
                    )
                bi = partition.block_index(name).reshape(-1).to(ids.device)
                hit = torch.isin(bi, ids)
                parts.append(hit.nonzero().reshape(-1) + self._offsets[name])
                seen.append(bi[hit])
            missing = ids[~torch.isin(ids, torch.cat(seen))]
            if missing.numel():  # out of range, or a block of a tensor outside H.params
                raise ValueError(
                    f"partition block id(s) {sorted(set(missing.tolist()))} hold no entry of "
                    f"H.params: global ids lie in [0, {partition.num_blocks}) and must belong to "
                    f"tensors in H.params"
                )
            return torch.unique(torch.cat(parts))
        if isinstance(spec, str):
            self._check_name(spec)
            o = self._offsets[spec]
            return torch.arange(o, o + self.param_shapes[spec].numel())
        if isinstance(spec, Mapping):
            parts = [torch.zeros(0, dtype=torch.long)]
            for name, index in spec.items():
                self._check_name(name)
                shape = self.param_shapes[name]
                ids = torch.arange(shape.numel()).reshape(shape)
                try:
                    picked = ids[index]
                except (IndexError, TypeError) as err:
                    raise ValueError(
                        f"index {index!r} does not fit parameter {name!r} of shape {tuple(shape)}: {err}"
                    ) from err
                parts.append(picked.reshape(-1) + self._offsets[name])
            return torch.unique(torch.cat(parts))
        if isinstance(spec, torch.Tensor):
            if spec.is_floating_point() or spec.is_complex() or spec.dtype == torch.bool:
                raise TypeError(
                    f"flat indices must be an integer tensor, got {spec.dtype}: pass a "
                    "LongTensor, or a {name: mask} dict for a boolean mask of one tensor"
                )
            idx = spec.long().reshape(-1)
            if idx.numel() and (idx.min() < 0 or idx.max() >= self.shape[0]):
                raise ValueError(f"flat indices must lie in [0, {self.shape[0]})")
            return torch.unique(idx)
        if isinstance(spec, Sequence):
            picked = [self.select(s, partition) for s in spec]
            return torch.unique(torch.cat([torch.zeros(0, dtype=torch.long), *picked]))
        raise TypeError(
            f"cannot select entries with {type(spec).__name__}: use a parameter name, a "
            "{name: index} dict, block ids with partition=, or flat indices"
        )

    def restrict(
        self, blocks_a: Any, blocks_b: Any = None, partition: Any = None
    ) -> RestrictedOperator:
        """The sub-operator :math:`H_{ab}` (rows ``a``, columns ``b``; ``b`` defaults to ``a``).

        ``blocks_a`` and ``blocks_b`` are selectors as in :meth:`select`, e.g.
        ``H.restrict(3, 7, partition=part)`` for global blocks 3 and 7 of ``part``, or
        ``H.restrict({"fc.weight": (slice(None), 0)}, "ln.bias")``. Indices are in flat order.
        """
        rows = self.select(blocks_a, partition)
        cols = rows if blocks_b is None else self.select(blocks_b, partition)
        if rows.numel() == 0 or cols.numel() == 0:
            raise ValueError("the selection picks no entry of H: name at least one row and column")
        return RestrictedOperator(self, rows, cols)

    # ----------------------------------------------------------------------------- internals
    def _check_name(self, name: str) -> None:
        if name not in self._offsets:
            raise KeyError(f"{name!r} is not among H.params; H.params = {list(self.params)}")

    def _check_dict(self, v: Mapping[str, Any], batched: bool) -> dict[str, torch.Tensor]:
        missing = [n for n in self.params if n not in v]
        extra = [n for n in v if n not in self._offsets]
        if missing or extra:
            raise ValueError(
                f"vector dict keys must be exactly H.params; missing {missing}, unexpected {extra}"
            )
        out = {}
        k = None
        for n in self.params:
            t = as_real_tensor(v[n], self.dtype, self.device)
            shape = tuple(self.param_shapes[n])
            got = tuple(t.shape)
            if batched:
                k = got[0] if k is None and len(got) > 0 else k
                if got[1:] != shape or got[:1] != (k,):
                    raise ValueError(f"v[{n!r}] must have shape (k, *{shape}), got {got}")
            elif got != shape:
                raise ValueError(f"v[{n!r}] must have shape {shape}, got {got}")
            out[n] = t
        return out

    def _to_dict(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        if v.ndim == 1:  # one split: views of v
            pieces = v.split([self.param_shapes[n].numel() for n in self.params])
            return {
                n: t.view(self.param_shapes[n]) for n, t in zip(self.params, pieces, strict=True)
            }
        out = {}
        for n in self.params:
            o, shape = self._offsets[n], self.param_shapes[n]
            piece = v[o : o + shape.numel()]
            out[n] = piece.T.reshape(v.shape[1], *shape)
        return out

    def _loss(self, batch: Any) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        return bound_loss(self._module, batch)

    def _primal(self) -> dict[str, torch.Tensor]:
        """The differentiated parameters' current values, or a HessianError when one was
        removed or changed shape, dtype or device since the operator was built."""
        named = dict(self.model.named_parameters())
        out = {}
        for n in self.params:
            p = named.get(n)
            if p is None or (p.shape, p.dtype, p.device) != (
                self.param_shapes[n],
                self.dtype,
                self.device,
            ):
                now = "gone" if p is None else f"{tuple(p.shape)} {p.dtype} on {p.device}"
                raise HessianError(
                    f"parameter {n!r} is now {now}, but this HessianOperator was built for "
                    f"{tuple(self.param_shapes[n])} {self.dtype} on {self.device}: the model "
                    "changed after the operator was built; build a new HessianOperator"
                )
            out[n] = p.detach()
        return out

    def _iter_batches(self) -> Iterable[tuple[int, Any]]:
        count = 0
        for i, batch in enumerate(self._batches):
            if self.check_determinism and not self._batches.is_fixed and self._prints is not None:
                if i >= len(self._prints) or fingerprint(batch) != self._prints[i]:
                    raise batch_changed_error(i)
            count += 1
            yield i, batch
        if self._weights is not None and count != len(self._weights):
            raise batch_count_error(count, len(self._weights))

    def _prepare(self) -> None:
        """Sample counts and batch weights, once (a collective step when distributed)."""
        if self._weights is not None:
            return
        with self._together("the operator's setup"):
            if self.check_determinism:
                check_modules(self.model)
            counts = self._count_samples()
        total = dist_glue.global_count(sum(counts), self.distributed)
        if total <= 0:
            raise ValueError(
                f"the data holds {total} samples (batch sizes {counts[:8]}): the Hessian of a "
                "mean over no samples is undefined; check batch_size_fn"
            )
        self.num_samples = total
        self._weights = [c / total if self.reduction == "mean" else float(c) for c in counts]

    def _count_samples(self) -> list[int]:
        """Samples per local batch, after the data and first-loss checks."""
        counts, prints = [], []
        for i, batch in enumerate(self._batches):
            try:
                counts.append(sample_count(batch, self.batch_size_fn))
            except ValueError as err:
                if self._batches.mixed is None or self.batch_size_fn is not None:
                    raise
                raise mixed_tuple_error(self._batches.mixed, i, batch) from err
            if self.check_determinism and not self._batches.is_fixed:
                prints.append(fingerprint(batch))
        if not counts and not self.distributed:
            raise ValueError(
                "data holds no batch: pass one batch or a non-empty iterable of batches (an "
                "exhausted iterator or an empty DataLoader gives none)"
            )
        if self.check_determinism and not self._batches.is_fixed:
            again = [fingerprint(b) for b in self._batches]
            if again != prints:
                first = next(
                    (i for i, (a, b) in enumerate(zip(prints, again, strict=False)) if a != b),
                    len(prints),
                )
                raise batch_changed_error(first)
            self._prints = prints
        first = next((b for b, c in zip(self._batches, counts, strict=False) if c > 0), None)
        if first is not None:  # a rank of a distributed run may hold no sample
            check_loss(self._loss(first), self._primal(), first, self.check_determinism)
        return counts

    @contextlib.contextmanager
    def _together(self, what: str) -> Iterator[None]:
        """This rank's local part of a collective step: when distributed, the ranks agree on
        whether every rank succeeded before the next collective, so one rank's error is raised
        on all of them instead of leaving the others waiting for the process-group timeout."""
        if not self.distributed:
            yield
            return
        try:
            yield
        except BaseException:
            dist_glue.count_failures(True, True)
            raise
        failed = dist_glue.count_failures(False, True)
        if failed:
            raise HessianError(
                f"{what} failed on {failed} other rank(s) (their error says why); every rank "
                "stops here"
            )

    def _apply(
        self, v: dict[str, torch.Tensor], batched: bool, flat: bool = False
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """``H v`` as a dict, or with ``flat`` as the flat ``(n,)`` / ``(k, n)`` buffer it views."""
        self._prepare()
        k = next(iter(v.values())).shape[0] if batched else None
        # accumulate into one flat buffer (the dict holds views of it): no cat, one all_reduce
        buf = torch.zeros(
            (self.shape[0],) if k is None else (k, self.shape[0]),
            dtype=self.dtype,
            device=self.device,
        )
        out = {}
        for n in self.params:
            o, shape = self._offsets[n], self.param_shapes[n]
            piece = buf[..., o : o + shape.numel()]
            out[n] = piece.view(shape) if k is None else piece.view(k, *shape)
        # no_grad: products are numbers; parameters outside ``params`` may still require grad,
        # and the HVPs differentiate internally (torch.func and enable_grad ignore this context)
        with torch.no_grad(), self._together("a Hessian product"):
            if self.check_determinism:  # every product: the model may have been put in train mode
                check_modules(self.model)
            try:
                self._products_into(out, v, batched)
            except RuntimeError as err:
                if not is_double_backward_error(err):
                    raise
                raise double_backward_error(err) from err
        dist_glue.all_reduce_sum(buf, self.distributed)
        return buf if flat else out

    def _products_into(self, out: dict, v: dict, batched: bool) -> None:
        """Add every batch's weighted ``H_b v`` into ``out``, in the mode for this product."""
        mode = self._mode_for(v, batched)
        if self._cached(mode):
            for product, w in zip(self._cached_products(), self._live_weights(), strict=True):
                self._accumulate(out, product(v, batched), w)
            return
        p = self._primal()
        for i, batch in self._iter_batches():
            if self._weights[i]:  # a batch without samples adds nothing
                self._accumulate(out, self._hvp(mode, batch, p, v, batched), self._weights[i])

    def _accumulate(self, out: dict, hv: dict, weight: float) -> None:
        for n in self.params:
            out[n].add_(hv[n], alpha=weight)

    def _hvp(self, mode: str, batch: Any, p: dict, v: dict, batched: bool) -> dict:
        if mode == "reverse":  # autograd already holds the padding lookups constant
            return hvp_reverse(self._loss(batch), p, v, batched)
        with constant_padding_rows(self.model):
            return self._forward_hvp(batch, p, v, batched)

    def _forward_hvp(self, batch: Any, p: dict, v: dict, batched: bool) -> dict:
        """``jvp(grad(f))``, compiled when it can be, with the fixes its failures need."""
        if self._compiled is not None:
            try:
                return self._compiled(self._module, p, v, batch, batched)
            except Exception as err:  # noqa: BLE001 - the eager product below raises the real error
                self._compiled = None
                warnings.warn(
                    f"compile=True: torch.compile could not run the product ({first_line(err)}); "
                    "this operator's products run eagerly from now on",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
        try:
            return hvp_forward(self._loss(batch), p, v, batched)
        except (RuntimeError, NotImplementedError) as err:
            if is_forward_ad_error(err):
                raise forward_mode_error(self.model, err) from err
            if "mutate a captured tensor" in str(err).lower():
                raise ForwardModeError(
                    "the model writes in place into a tensor outside the differentiated "
                    "parameters during its forward pass (BatchNorm in train mode updating its "
                    "running statistics, a cache, a counter), which torch.func cannot trace. "
                    "Call model.eval(), or use mode='reverse'"
                ) from err
            raise

    def _cached(self, mode: str) -> bool:
        """Whether products in ``mode`` use kept first-backward graphs (see ``cache``)."""
        if self.cache is False or mode == "forward":
            return False
        return self.cache is True or len(self._live_weights()) <= 1

    def _live_weights(self) -> list[float]:
        """The weights of the batches that hold samples (the kept graphs' order)."""
        return [w for w in self._weights if w]

    def _cached_products(self) -> list[Product]:
        """One prepared reverse product per batch, rebuilt when the model or the batches changed."""
        fresh = self._snapshot is not None and self._snapshot.matches(self.model, self._kept)
        if self._products is None or not fresh:
            self.clear_cache()  # free the old graphs before building new ones
            p = self._primal()
            batches = [b for i, b in self._iter_batches() if self._weights[i]]
            self._products = [prepare_reverse(self._loss(b), p) for b in batches]
            self._kept = batches
            self._snapshot = Snapshot.take(self.model, batches)
        return self._products

    def clear_cache(self) -> None:
        """Free the kept primal passes; the next product rebuilds them from the model."""
        self._products = None
        self._kept = []
        self._snapshot = None

    def _mode_for(self, v: dict, batched: bool) -> str:
        """``auto``: time one product in each mode on the first batch, as it will be run."""
        if self.mode != "auto":
            return self.mode
        if batched in self._chosen:
            return self._chosen[batched]
        # the first batch with samples: stop there, not load every batch of a DataLoader
        batch = next((b for b, w in zip(self._batches, self._weights, strict=False) if w), None)
        if batch is None:  # a rank without samples computes nothing: any mode will do
            return "reverse"
        p = self._primal()
        times = {}
        for mode in ("forward", "reverse"):
            try:
                if self._cached(mode):  # the kept graph is built once, here
                    product = self._cached_products()[0]
                else:
                    product = partial(self._hvp, mode, batch, p)
                product(v, batched)  # warm-up
                t0 = time.perf_counter()
                product(v, batched)
                times[mode] = time.perf_counter() - t0
            except ForwardModeError as err:
                warnings.warn(
                    f"mode='auto' uses 'reverse': {err}",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
        self._chosen[batched] = min(times, key=times.get)
        if "reverse" not in self._chosen.values():
            self.clear_cache()  # only reverse products use the kept graphs
        return self._chosen[batched]

    @property
    def chosen_modes(self) -> dict[str, str]:
        """The modes ``auto`` picked: ``{"matvec": ..., "matmat": ...}`` once used."""
        return {("matmat" if b else "matvec"): m for b, m in self._chosen.items()}


class RestrictedOperator(Operator):
    """:math:`H_{ab} = H[a][:, b]`: ``H_ab @ x = (H @ embed_b(x))[a]``, shape ``(|a|, |b|)``."""

    def __init__(self, parent: Operator, rows: torch.Tensor, cols: torch.Tensor):
        self.parent = parent
        self.rows = rows.to(parent.device)
        self.cols = cols.to(parent.device)
        self.shape = (int(rows.numel()), int(cols.numel()))
        self.dtype = parent.dtype
        self.device = parent.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.parent.shape[1], V.shape[1], dtype=self.dtype, device=self.device)
        full.index_add_(0, self.cols, V)  # a repeated column index adds, as a matrix product does
        return self.parent._matmat(full)[self.rows]

    @property
    def T(self) -> RestrictedOperator:
        """:math:`H_{ba}`, the transpose (H is symmetric)."""
        return RestrictedOperator(self.parent, self.cols, self.rows)

    def _rmatmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.T._matmat(V)

    def asymmetry(self) -> str | None:
        """None for a diagonal block :math:`H_{aa}` (rows = columns), else why it is asymmetric."""
        if torch.equal(self.rows, self.cols):
            return None
        return (
            "H_ab with rows a != columns b is not symmetric; restrict to a diagonal block "
            "H.restrict(a) (eigenvalues), or use its singular values (to_scipy() and svds)"
        )


def _cumsum0(xs: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for x in xs:
        out.append(acc)
        acc += x
    return out


def _is_int_like(spec: Any) -> bool:
    def integer(x: Any) -> bool:  # int or numpy integer, not bool
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if isinstance(spec, torch.Tensor):
        return not spec.is_floating_point() and spec.dtype != torch.bool
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return len(spec) > 0 and all(integer(s) for s in spec)
    return integer(spec)
