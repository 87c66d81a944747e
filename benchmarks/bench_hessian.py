"""Benchmark of the Hessian engine against peers measured in the same run, on the CPU.

For TinyGPT and a transformers GPT-2 (4 layers, width 128, eager attention, batch 8 x 128):

1. one HVP's time as a multiple of one gradient's (forward + backward, ``torch.autograd.grad``):
   ours in both modes, a PyHessian-style double-backward HVP and a plain ``torch.func``
   forward-over-reverse HVP (both written here);
2. the per-vector time of ``H.matmat`` with 16 vectors, as a multiple of one gradient;
3. operator products for the top-5 (largest-magnitude) eigenvalues to 1e-6 relative error:
   ``hessian.lanczos`` (its own stopping rule) vs PyHessian-style power iteration with deflation,
   counted until every estimate is within 1e-6 of the reference (an oracle stop, its best case),
   capped at ``--power-cap-*`` products per eigenvalue (then the count is a lower bound).

Timings are medians over interleaved repeats (every repeat runs every contender once).

    python benchmarks/bench_hessian.py                 # full run, prints the markdown table
    python benchmarks/bench_hessian.py --write-readme  # and updates benchmarks/README.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hessian import HessianOperator, lanczos  # noqa: E402
from lab.models import TinyGPT, TinyGPTConfig, cross_entropy, lm_loss  # noqa: E402
from partition.io import write_text  # noqa: E402

README = ROOT / "benchmarks" / "README.md"
KEPT = "ours reverse, kept first backward (default)"
BUILD = "ours reverse, first product (builds what it keeps)"
UNCACHED = "ours reverse, cache=False"
MATMAT = "ours matmat reverse (kept)"
COMPILED_HVP = "ours forward, compile=True"
COMPILED_MATMAT = "ours matmat forward, compile=True"
COMPILED_GRADIENT = "one gradient under torch.compile (for scale)"

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Problem = tuple[str, nn.Module, LossFn, tuple[torch.Tensor, torch.Tensor]]


def tinygpt_problem(seed: int = 0) -> Problem:
    """TinyGPT on a random batch of 8 x 32 tokens: ``(title, model, loss_fn, batch)``."""
    cfg = TinyGPTConfig(vocab_size=256, context=32, n_layer=2, d_model=64, n_heads=4, n_kv_heads=2)
    model = TinyGPT(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    batch = (
        torch.randint(0, 256, (8, 32), generator=g),
        torch.randint(0, 256, (8, 32), generator=g),
    )
    return "TinyGPT (2 layers, d=64, GQA 4/2, vocab 256, batch 8x32)", model, lm_loss, batch


def gpt2_problem(vocab: int, seed: int = 0) -> Problem:
    """transformers GPT-2 (eager attention, no dropout) on a random batch of 8 x 128 tokens, with
    its own cross-entropy: ``(title, model, loss_fn, batch)``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=4,
        n_embd=128,
        n_head=4,
        n_positions=128,
        vocab_size=vocab,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    batch = (
        torch.randint(0, vocab, (8, 128), generator=g),
        torch.randint(0, vocab, (8, 128), generator=g),
    )

    def loss_fn(m, b):  # own cross-entropy: transformers' loss upcasts and shifts
        return cross_entropy(m(input_ids=b[0]).logits, b[1])

    return (
        f"GPT-2 (transformers, 4 layers, width 128, eager, vocab {vocab}, batch 8x128)",
        model,
        loss_fn,
        batch,
    )


def contenders(
    model: nn.Module, loss_fn: LossFn, batch: Any, k: int, seed: int
) -> tuple[dict[str, Callable], dict[str, HessianOperator]]:
    """The timed calls by row label (one gradient, our products, the peers, ``k``-vector
    matmats; the compiled ones run once here), and our operators by mode."""
    params = dict(model.named_parameters())
    names = list(params)
    plist = [params[n] for n in names]
    g = torch.Generator().manual_seed(seed)
    H = {
        "forward": HessianOperator(model, loss_fn, batch, mode="forward"),
        "reverse": HessianOperator(model, loss_fn, batch, mode="reverse"),  # cache="auto": kept
        "uncached": HessianOperator(model, loss_fn, batch, mode="reverse", cache=False),
        "compiled": HessianOperator(model, loss_fn, batch, mode="forward", compile=True),
    }
    n = H["forward"].shape[0]
    v = torch.randn(n, generator=g)
    V = torch.randn(n, k, generator=g)
    vs = H["forward"]._to_dict(v)
    vlist = [vs[nm] for nm in names]
    detached = {nm: p.detach() for nm, p in params.items()}

    def gradient():
        return torch.autograd.grad(loss_fn(model, batch), plist)

    def pyhessian_hvp():  # PyHessian: loss.backward(create_graph) then autograd.grad(grads, v)
        gs = torch.autograd.grad(loss_fn(model, batch), plist, create_graph=True)
        return torch.autograd.grad(gs, plist, grad_outputs=vlist)

    def f(p):
        return loss_fn(lambda *a, **kw: functional_call(model, p, a, kw), batch)

    def func_fwd_rev():  # plain torch.func forward-over-reverse
        return jvp(grad(f), (detached,), (vs,))[1]

    compiled_gradient = torch.compile(grad(f), dynamic=False)

    def rebuild_and_product():
        H["reverse"].clear_cache()
        return H["reverse"] @ v

    fns = {
        "gradient": gradient,
        KEPT: lambda: H["reverse"] @ v,
        BUILD: rebuild_and_product,
        UNCACHED: lambda: H["uncached"] @ v,
        "ours forward (jvp of grad)": lambda: H["forward"] @ v,
        "peer PyHessian-style double backward": pyhessian_hvp,
        "peer torch.func forward-over-reverse": func_fwd_rev,
        MATMAT + f", {k} vectors": lambda: H["reverse"].matmat(V),
        f"ours matmat forward, {k} vectors": lambda: H["forward"].matmat(V),
        COMPILED_HVP: lambda: H["compiled"] @ v,
        COMPILED_MATMAT + f", {k} vectors": lambda: H["compiled"].matmat(V),
        COMPILED_GRADIENT: lambda: compiled_gradient(detached),
    }
    for name, fn in fns.items():  # compile outside the timings (tens of seconds each)
        if "compile" in name:
            fn()
    return fns, H


def matmul_flops(fns: dict[str, Callable], k: int) -> dict[str, float]:
    """Matmul FLOPs (``FlopCounterMode``) of one call of each contender, per vector."""
    flops = {}
    for name, fn in fns.items():
        if "compile" in name:  # compiled kernels run below the counter; same math as eager
            continue
        fn()  # so a kept graph exists before counting the steady-state product
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[name] = counter.get_total_flops() / (k if name.startswith("ours matmat") else 1)
    return flops


class _RecordMatmuls(TorchDispatchMode):
    """Records the ``(batch, m, k, n)`` shape of every matmul that runs below it."""

    OPS = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS:
            i, j = self.OPS[name]
            a, b = args[i].shape, args[j].shape
            self.shapes.append((a[0] if len(a) == 3 else 0, a[-2], a[-1], b[-1]))
        return func(*args, **(kwargs or {}))


def _best_matmul_seconds(batch: int, m: int, k: int, n: int, repeats: int = 5) -> float:
    """The fastest of ``repeats`` float32 matmuls of this shape (``batch`` 0: a plain ``mm``)."""
    lead = (batch,) if batch else ()
    a, b = torch.randn(*lead, m, k), torch.randn(*lead, k, n)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_floor(gradient: Callable, vectors: int) -> dict[str, float]:
    """Seconds of matmuls alone: the gradient's, and a lower bound for one vector of a matmat.

    A vector's product holds two matmuls of each shape (m, k, n) that the gradient runs (the
    second table's 2.00x FLOPs), each with one operand shared by all vectors: the ``vectors``
    copies fold into one matmul of ``vectors * m`` rows or ``vectors * n`` columns (or a batch
    ``vectors`` times larger). The floor times the fastest of those foldings alone, with no
    elementwise work and no data movement between them: no implementation on this core's
    matmul library pays less for a vector's matmuls.
    """
    gradient()
    with _RecordMatmuls() as rec:
        gradient()
    own = folded = 0.0
    for batch, m, k, n in rec.shapes:
        own += _best_matmul_seconds(batch, m, k, n)
        foldings = [(batch, vectors * m, k, n), (batch, m, k, vectors * n)]
        if batch:
            foldings.append((vectors * batch, m, k, n))
        folded += 2 * min(_best_matmul_seconds(*shape) for shape in foldings)
    return {"gradient_matmuls": own, "matmat_vector_matmuls": folded / vectors}


def compiled_split(matmat: Callable, rounds: int = 3) -> dict[str, float]:
    """Seconds a compiled matmat spends in matmuls and in its fused (inductor) kernels, each the
    median over ``rounds`` calls under ``torch.profiler`` (self CPU time)."""
    matmul_ops = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}
    parts: dict[str, list[float]] = {"matmuls": [], "fused_kernels": []}
    for _ in range(rounds):
        with torch.profiler.profile() as prof:
            matmat()
        events = prof.key_averages()
        parts["matmuls"].append(sum(e.self_cpu_time_total for e in events if e.key in matmul_ops))
        parts["fused_kernels"].append(
            sum(e.self_cpu_time_total for e in events if "CompiledFxGraph" in e.key)
        )
    return {name: statistics.median(us) / 1e6 for name, us in parts.items()}


def sgemm_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the fastest of ``repeats`` float32 ``n x n x n`` matmuls: the core's peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def interleaved_medians(
    fns: dict[str, Callable], repeats: int, min_seconds: float
) -> tuple[dict[str, float], dict[str, float], int]:
    """Median time and median page faults of each function over ``repeats`` rounds, more if a
    round is shorter than ``min_seconds / repeats`` (millisecond-scale calls need many rounds for a
    stable median). A page fault is a fresh 4 KiB page that the kernel maps and zeroes."""
    t0 = time.perf_counter()
    for fn in fns.values():  # warm-up
        fn()
    repeats = max(repeats, int(np.ceil(min_seconds / (time.perf_counter() - t0))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    faults: dict[str, list[int]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            f0, t0 = _page_faults(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            faults[name].append(_page_faults() - f0)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return medians, {name: statistics.median(fs) for name, fs in faults.items()}, repeats


def _page_faults() -> int:
    """Page faults of this process so far (minor and major)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def power_iteration_counts(
    H: HessianOperator, ref: np.ndarray, k: int, rtol: float, cap: int, seed: int
) -> tuple[list[int], list[float]]:
    """PyHessian-style power iteration with deflation; products until within ``rtol`` of ``ref``."""
    g = torch.Generator().manual_seed(seed)
    n = H.shape[0]
    found: list[torch.Tensor] = []
    counts, errors = [], []
    left = list(ref)
    for _ in range(k):
        v = torch.randn(n, generator=g, dtype=H.dtype)
        v /= v.norm()
        used, est = 0, float("nan")
        while used < cap:
            for e in found:
                v = v - (v @ e) * e
            Hv = H @ v
            used += 1
            est = float(v @ Hv)
            v = Hv / Hv.norm()
            if min(abs(est - r) / abs(r) for r in left) <= rtol:
                break
        # deflation may find them in another order: match the closest reference value left
        j = int(np.argmin([abs(est - r) / abs(r) for r in left]))
        errors.append(abs(est - left[j]) / abs(left[j]))
        left.pop(j)
        found.append(v)
        counts.append(used)
    return counts, errors


def projected_power(ref: list[float], rtol: float) -> int:
    """Power-iteration products for eigenvalues 1..k-1 from the known convergence rate.

    With deflation, the Rayleigh quotient for eigenvalue ``i`` converges like
    ``(|lambda_{i+1}| / |lambda_i|)^(2t)``, so reaching ``rtol`` from an O(1) start takes
    ``t_i = log(rtol) / (2 log(|lambda_{i+1}| / |lambda_i|))`` products. The k-th eigenvalue is left
    out (its rate needs lambda_{k+1}), so this is a lower estimate.
    """
    mags = sorted((abs(x) for x in ref), reverse=True)
    return int(
        sum(
            np.ceil(np.log(rtol) / (2 * np.log(b / a))) if b < a else 0
            for a, b in zip(mags, mags[1:], strict=False)
        )
    )


def eigen_benchmark(H: HessianOperator, k: int, rtol: float, cap: int, seed: int) -> dict:
    """One Lanczos run to tol 1e-9 gives the reference; its history tells when ``tol=rtol`` stops.

    ``lanczos(H, k, which="LM", tol=rtol, seed=seed)`` takes exactly the first steps of the same
    run (same seed) and stops at the first step whose residual estimates are all
    <= rtol * max|theta|; it then spends ``k`` more products on the true residuals.
    """
    history: list[tuple[int, np.ndarray, np.ndarray]] = []
    ref = lanczos(
        H,
        k=k,
        which="LM",
        tol=1e-9,
        seed=seed,
        progress=False,
        callback=lambda m, vals, res: history.append((m, vals.copy(), res.copy())),
    )
    stop = next((h for h in history if (h[2] <= rtol * np.abs(h[1]).max()).all()), history[-1])
    ours_err = np.abs(stop[1] - ref.values) / np.abs(ref.values)
    counts, errors = power_iteration_counts(H, ref.values, k, rtol, cap, seed)
    return {
        "reference": ref.values.tolist(),
        "reference_converged": bool(ref.converged.all()),
        "ours_matvecs": stop[0] + k,
        "ours_max_rel_error": float(ours_err.max()),
        "power_matvecs": int(sum(counts)),
        "power_counts": counts,
        "power_max_rel_error": float(max(errors)),
        "power_reached": bool(max(errors) <= rtol),
    }


def run(args: argparse.Namespace) -> dict:
    """Time every contender and (unless ``--hvp-only``) count eigenvalue products, per problem."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    peak = sgemm_peak_gflops()
    problems = [] if args.skip_tiny else [(tinygpt_problem(), args.power_cap_tiny)]
    if not args.skip_gpt2:
        problems.append((gpt2_problem(args.gpt2_vocab), args.power_cap_gpt2))
    results = {}
    for (title, model, loss_fn, batch), cap in problems:
        fns, H = contenders(model, loss_fn, batch, args.vectors, seed=0)
        t0 = time.perf_counter()
        med, faults, repeats = interleaved_medians(fns, args.repeats, args.min_seconds)
        flops = matmul_flops(fns, args.vectors)
        g = med["gradient"]
        ratios = {name: t / g for name, t in med.items() if name != "gradient"}
        for name in list(ratios):
            if name.startswith("ours matmat"):
                ratios[name] /= args.vectors
        auto = HessianOperator(model, loss_fn, batch, mode="auto")
        auto @ torch.zeros(auto.shape[0])
        auto.matmat(torch.zeros(auto.shape[0], args.vectors))
        entry = {
            "n": H["forward"].shape[0],
            "gradient_seconds": g,
            "repeats": repeats,
            "ratios": ratios,
            "page_faults": faults,
            "flop_ratios": {n: f / flops["gradient"] for n, f in flops.items() if n != "gradient"},
            "gradient_gflops_per_second": flops["gradient"] / g / 1e9,
            "auto_picks": auto.chosen_modes,
            "timing_seconds": time.perf_counter() - t0,
        }
        best = "forward" if med["ours forward (jvp of grad)"] < med[KEPT] else "reverse"
        entry["sgemm_peak_gflops_per_second"] = peak
        floor = matmul_floor(fns["gradient"], args.vectors)
        entry["matmul_floor"] = {name: seconds / g for name, seconds in floor.items()}
        split = compiled_split(fns[f"{COMPILED_MATMAT}, {args.vectors} vectors"])
        entry["compiled_matmat_split"] = {name: s / args.vectors / g for name, s in split.items()}
        results[title] = entry
        if args.hvp_only:
            continue
        t1 = time.perf_counter()
        H64 = HessianOperator(copy.deepcopy(model).double(), loss_fn, batch, mode=best)
        entry["eigen"] = eigen_benchmark(H64, 5, args.rtol, cap, seed=0)
        entry["eigen"]["power_cap"] = cap
        entry["eigen"]["mode"] = best
        entry["eigen_seconds"] = time.perf_counter() - t1
        print(json.dumps({title: entry}, indent=1), flush=True)
    return results


def table_row(label: str, cells: list[str]) -> str:
    """One markdown table row: the label, then one cell per model."""
    return f"| {label} | " + " | ".join(cells) + " |"


def eigen_table(results: dict, args: argparse.Namespace, titles: list[str]) -> list[str]:
    """The top-5 eigenvalue comparison: our Lanczos against deflated power iteration."""
    lines = [
        "",
        f"Operator products for the top-5 (largest-magnitude) eigenvalues to {args.rtol:g} relative "
        'error. Ours: `hessian.lanczos(H, k=5, which="LM", tol=1e-6)` with its own stopping rule '
        "(residual <= tol * |lambda_max|, the 5 residual products included). Peer: PyHessian-style "
        "power iteration with deflation, stopped by an oracle as soon as each estimate is within "
        f"{args.rtol:g} of the reference (its best case), at most {args.power_cap_tiny} (TinyGPT) / "
        f"{args.power_cap_gpt2} (GPT-2) products per eigenvalue; a capped count is a lower bound "
        "(>=); the projected count uses the textbook rate (|lambda_{i+1}|/|lambda_i|)^(2t) of "
        "deflated power iteration for eigenvalues 1-4 (eigenvalue 5 left out). "
        "Reference: the same Lanczos run continued to tol 1e-9. The eigenvalue runs use a float64 copy of the model. Target: >= 5x fewer.",
        "",
        table_row("", titles),
        "|---|" + "---|" * len(titles),
    ]
    e = {t: results[t]["eigen"] for t in titles}

    def capped(t: str) -> str:
        return "" if e[t]["power_reached"] else ">="

    def projected(t: str) -> int:
        return projected_power(e[t]["reference"], args.rtol)

    rows = {
        "ours: products": [str(e[t]["ours_matvecs"]) for t in titles],
        "ours: max relative error": [f"{e[t]['ours_max_rel_error']:.1e}" for t in titles],
        "power iteration: products (per eigenvalue)": [
            f"{capped(t)}{e[t]['power_matvecs']} ({', '.join(map(str, e[t]['power_counts']))})"
            for t in titles
        ],
        "power iteration: max relative error": [
            f"{e[t]['power_max_rel_error']:.1e}" for t in titles
        ],
        "ratio (power / ours)": [
            f"{capped(t)}{e[t]['power_matvecs'] / e[t]['ours_matvecs']:.1f}x" for t in titles
        ],
        "power iteration: projected products, eigenvalues 1-4": [
            f"~{projected(t)}" for t in titles
        ],
        "ratio (projected power / ours)": [
            f"~{projected(t) / e[t]['ours_matvecs']:.0f}x" for t in titles
        ],
        "top-5 eigenvalues (reference)": [
            ", ".join(f"{x:.4g}" for x in e[t]["reference"]) for t in titles
        ],
    }
    lines += [table_row(label, cells) for label, cells in rows.items()]
    return lines


def markdown(results: dict, args: argparse.Namespace, command: str, seconds: float) -> str:
    """The README section: HVP and FLOP tables, the eigenvalue table and notes, from ``results``."""
    lines = [
        "## Hessian engine" + ("" if args.section == "hessian" else f" ({args.section})"),
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {args.threads} torch thread(s), "
        f"torch {torch.__version__}, float32. Total time {seconds:.0f} s. Medians over "
        + " / ".join(f"{results[t]['repeats']}" for t in results)
        + " interleaved rounds"
        + (f" (at least {args.min_seconds:g} s of timing per model)" if args.min_seconds else "")
        + "; single ratios move by roughly +-20% between runs on this 2-core machine (compare "
        "the runs in the git history).",
        "",
        f"Time of one HVP, and per vector of a {args.vectors}-vector `matmat`, as a multiple of one gradient "
        "(forward + backward). Targets: HVP <= 2.5x, matmat per vector <= 1.0x.",
        "",
    ]
    titles = list(results)
    lines.append(table_row("contender", titles))
    lines.append("|---|" + "---|" * len(titles))
    names = list(next(iter(results.values()))["ratios"])
    for name in names:
        label = name.replace(f"{args.vectors} vectors", f"{args.vectors} vectors, per vector")
        lines.append(table_row(label, [f"{results[t]['ratios'][name]:.2f}x" for t in titles]))
    lines.append(
        table_row(
            "one gradient (seconds)", [f"{results[t]['gradient_seconds']:.4f}" for t in titles]
        )
    )
    picks = [", ".join(f"{k}: {v}" for k, v in results[t]["auto_picks"].items()) for t in titles]
    lines.append(table_row('`mode="auto"` picks', picks))
    lines += [
        "",
        "Matmul FLOPs of the same calls as a multiple of one gradient's, counted by "
        "`torch.utils.flop_counter.FlopCounterMode` (it counts matmuls and attention, not "
        "elementwise operations); matmat per vector:",
        "",
        table_row("contender", titles),
        "|---|" + "---|" * len(titles),
    ]
    for name in names:
        if "compile" in name:  # the same products as forward mode, in fused kernels
            continue
        label = name.replace(f"{args.vectors} vectors", f"{args.vectors} vectors, per vector")
        lines.append(table_row(label, [f"{results[t]['flop_ratios'][name]:.2f}x" for t in titles]))
    kept = {t: results[t]["ratios"][KEPT] for t in titles}
    kept_matmat = {t: results[t]["ratios"][f"{MATMAT}, {args.vectors} vectors"] for t in titles}
    build = {t: results[t]["ratios"][BUILD] for t in titles}

    matmat = f"{MATMAT}, {args.vectors} vectors"
    fused = {t: results[t]["ratios"][f"{COMPILED_MATMAT}, {args.vectors} vectors"] for t in titles}
    fused_scale = {t: fused[t] / results[t]["ratios"][COMPILED_GRADIENT] for t in titles}

    def flops(name: str) -> dict[str, float]:
        return {t: results[t]["flop_ratios"][name] for t in titles}

    def floor(name: str) -> dict[str, float]:
        return {t: results[t]["matmul_floor"][name] for t in titles}

    def split(name: str) -> dict[str, float]:
        return {t: results[t]["compiled_matmat_split"][name] for t in titles}

    def cells(values: dict[str, float], unit: str = "x") -> str:
        return ", ".join(f"{x:.2f}{unit}" for x in values.values())

    rate = {t: results[t].get("gradient_gflops_per_second", 0.0) for t in titles}
    peak = {t: results[t].get("sgemm_peak_gflops_per_second", 0.0) for t in titles}

    if all("eigen" in results[t] for t in titles):
        lines += eigen_table(results, args, titles)
    lines += [
        "",
        "Notes:",
        "",
        "- HVP target (<= 2.5x): "
        + ("met" if max(kept.values()) <= 2.5 else "not met")
        + " by the default (reverse mode, first backward kept): "
        + cells(kept)
        + ". Every product after the first is one second backward on the graph kept from the "
        f"first backward: {cells(flops(KEPT))} gradients of matmul FLOPs (second table), against "
        f"{cells(flops(UNCACHED))} for a product that redoes the forward and first backward (ours "
        "with `cache=False`, both peers, forward mode). The first product, which builds the kept "
        f"graph, costs {cells(build)}; in Lanczos, SLQ or Hutchinson every later product is the "
        "cheap one.",
        "- matmat target (<= 1.0x per vector): "
        + _verdict(fused, "with `compile=True`")
        + f" (`compile=True`: {cells(fused)}; the eager default: {cells(kept_matmat)}). The "
        "second-order part of a product is bilinear in the shared primal values and that "
        "vector's tangent (for a linear layer y = x W^T: 2 tangent-forward and 4 tangent-backward "
        "matmuls, against 3 matmuls in the gradient), so no work is shared between vectors: "
        f"{cells(flops(matmat))} gradients of FLOPs per vector (second table), and 1.0x needs the "
        "batched products to run at twice the gradient's FLOP rate."
        + (
            " The gradient runs its matmuls at "
            + cells(rate, "")
            + " GFLOP/s against a float32 sgemm peak of "
            + cells(peak, "")
            + " GFLOP/s on this core (2048^3): even at that peak a vector costs at least "
            + cells({t: flops(matmat)[t] * rate[t] / peak[t] for t in titles})
            + " a gradient."
            if all("sgemm_peak_gflops_per_second" in results[t] for t in titles)
            else ""
        )
        + (
            " Timed alone at their own shapes, the gradient's matmuls take "
            + cells(floor("gradient_matmuls"))
            + " of its time; the rest is elementwise work. A vector's matmuls, folded over the "
            f"{args.vectors} vectors into the fastest shape (one operand is shared by all vectors) "
            "and timed alone with nothing between them, take "
            + cells(floor("matmat_vector_matmuls"))
            + " a gradient (`matmul_floor`): no implementation's matmuls cost less on this core, "
            "which leaves "
            + cells({t: 1 - v for t, v in floor("matmat_vector_matmuls").items()})
            + " a gradient for all of a vector's elementwise tangent work, forward and backward, "
            "where the gradient alone spends "
            + cells({t: 1 - v for t, v in floor("gradient_matmuls").items()})
            + " on its own."
            if all("matmul_floor" in results[t] for t in titles)
            else ""
        )
        + " `compile=True` fuses the elementwise work of the batched forward-mode products "
        f"(LayerNorm, softmax, GELU): {cells(fused)} an eager gradient per vector, after a "
        "compile of tens of seconds per batch shape and vector count. Compiling the gradient too "
        f"(row `{COMPILED_GRADIENT}`) shows the same work at equal footing: {cells(fused_scale)} "
        "a compiled gradient per vector."
        + (
            " Profiled (`torch.profiler`, self time), the compiled matmat spends per vector "
            + cells(split("matmuls"))
            + " a gradient in matmuls and "
            + cells(split("fused_kernels"))
            + " in its fused elementwise kernels, against the "
            + cells({t: 1 - v for t, v in floor("matmat_vector_matmuls").items()})
            + " that the matmul floor leaves for them."
            if all(results[t].get("compiled_matmat_split", {}).get("fused_kernels") for t in titles)
            else ""
        ),
        *_fault_note(results, args.vectors, command),
        "- Forward mode (jvp of grad) redoes the primal pass on every call and pays more per "
        "operation; it has no kept-graph variant, because `torch.func.linearize` (its natural "
        "one) returns wrong, call-dependent products in torch 2.13 when the graph holds in-place "
        "ops (its constant folding; measured on `binary_cross_entropy_with_logits`).",
        (
            "- GPT-2 with its full vocabulary: the LM head and the cross-entropy over 50257 logits "
            "dominate the time; `matmat` takes 4 vectors, since forward mode holds a tangent of the "
            "1024 x 50257 logits per vector."
            if any("vocab 50257" in t for t in titles)
            else "- GPT-2 uses vocab 2048 (not 50257) so that the eigenvalue runs take minutes; "
            "the HVP timings with the full vocabulary are in section `gpt2-vocab-50257`."
        ),
        "- One torch thread: with the 2 cores shared by other jobs, 2-thread OpenMP/OpenBLAS runs "
        "were up to 20x slower from spin-waiting (measured), so all timings use 1 thread.",
    ]
    return "\n".join(lines)


def _fault_note(results: dict, vectors: int, command: str) -> list[str]:
    """The page-fault note: faults per call of the gradient and of each matmat, and the fix."""
    titles = [t for t in results if "page_faults" in results[t]]
    if not titles:
        return []
    matmats = [n for n in results[titles[0]]["page_faults"] if f"{vectors} vectors" in n]
    per_call = "; ".join(
        f"{name.split(f', {vectors} vectors')[0]}: "
        + ", ".join(f"{results[t]['page_faults'][name]:.0f}" for t in titles)
        for name in ["gradient", *matmats]
    )
    tuned = "MALLOC_MMAP_THRESHOLD_" in command
    return [
        f"- Page faults per call (medians over the rounds; {', '.join(titles)}), each a fresh "
        f"4 KiB page that the kernel maps and zeroes: {per_call}. glibc's malloc maps every "
        "block of 32 MiB or more afresh and unmaps it on free, and products with big tangents "
        "hold many such blocks, the batched forward-mode ones most (on GPT-2 the logits' tangent "
        f"alone is {vectors} x 1024 tokens x vocab floats). "
        + (
            "This run raised glibc's thresholds (the variables in the command), so those "
            "blocks stay in the heap between calls."
            if tuned
            else "Raising glibc's thresholds keeps those blocks in the heap between calls: "
            "`MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184` in the "
            "environment (section `hessian-malloc` below)."
        )
    ]


def _verdict(ratios: dict[str, float], how: str, target: float = 1.0) -> str:
    """'met ... on A; not met on B' for a per-model ratio target, models named by their first word."""
    met = [t.split()[0] for t, r in ratios.items() if r <= target]
    missed = [t.split()[0] for t, r in ratios.items() if r > target]
    if not missed:
        return f"met {how}"
    if not met:
        return "not met"
    return f"met {how} on {', '.join(met)}; not met on {', '.join(missed)}"


def write_section(text: str, section: str) -> None:
    """Replace the text between the section's markers in benchmarks/README.md, atomically."""
    BEGIN, END = f"<!-- section: {section} -->", f"<!-- end: {section} -->"
    content = README.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{README} lacks the markers {BEGIN} ... {END}")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + BEGIN + "\n" + text.strip() + "\n" + END + tail
    write_text(README, new)


def main(argv: list[str] | None = None) -> None:
    """Command line (module docstring): run, or re-render ``--from-json``; print, maybe write."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="fewest interleaved timing rounds")
    p.add_argument("--min-seconds", type=float, default=20.0, help="more rounds until this long")
    p.add_argument("--vectors", type=int, default=16)
    p.add_argument("--gpt2-vocab", type=int, default=2048)
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--power-cap-tiny", type=int, default=150, help="power products per eigenvalue")
    p.add_argument("--power-cap-gpt2", type=int, default=80, help="power products per eigenvalue")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the cores are shared)")
    p.add_argument("--skip-gpt2", action="store_true")
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--hvp-only", action="store_true", help="skip the eigenvalue comparison")
    p.add_argument("--section", default="hessian", help="README section markers to replace")
    p.add_argument("--write-readme", action="store_true")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--from-json", type=Path, help="re-render results saved with --json, no run")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    malloc_env = [f"{k}={v} " for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    command = (
        "".join(malloc_env)
        + "python benchmarks/bench_hessian.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
    )
    t0 = time.perf_counter()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results, seconds, command = saved["results"], saved["seconds"], saved["command"]
        kept = {"write_readme": args.write_readme, "from_json": args.from_json}
        args = argparse.Namespace(**{**vars(args), **saved.get("args", {}), **kept})
    else:
        results = run(args)
        seconds = time.perf_counter() - t0
    text = markdown(results, args, command.strip(), seconds)
    print(text)
    if args.json:
        write_text(
            args.json,
            json.dumps(
                {
                    "results": results,
                    "seconds": seconds,
                    "command": command,
                    "args": {k: v for k, v in vars(args).items() if k not in ("json", "from_json")},
                },
                indent=1,
            ),
        )
    if args.write_readme:
        write_section(text, args.section)


if __name__ == "__main__":
    main()
