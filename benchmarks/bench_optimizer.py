"""Optimizer benchmark: AdamMini step time and state bytes against AdamW and adam-mini 1.1.1.

Model: ``transformers`` Llama from config (hidden 512, 8 layers, 8 heads, 4 kv heads,
intermediate 1376, vocab 8192; 31.6M parameters), float32 on the CPU, fixed random
gradients. Every round steps each optimizer once, in a rotating order (interleaved,
so load from other processes hits all of them alike); the figure is the median over
rounds, and ratios are against ``torch.optim.AdamW(fused=True)`` from the same run.

A second part trains TinyGPT on the byte-level stdlib corpus (``lab.data.Corpus``)
with AdamW, AdamMini (fp32 momentum) and AdamMini (bf16 momentum, stochastic
rounding) from the same init and batches, and reports the final validation loss.

Usage::

    python benchmarks/bench_optimizer.py                 # print the markdown section
    python benchmarks/bench_optimizer.py --write         # also replace the optimizer
                                                         # section of benchmarks/README.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optimizer  # noqa: E402
import partition  # noqa: E402
from lab.train import optimizer_state_nbytes  # noqa: E402
from partition.io import write_text  # noqa: E402

BEGIN, END = "<!-- section: optimizer -->", "<!-- end: optimizer -->"
NOTES = [
    "Notes:",
    "",
    "- Why a fused kernel: in eager PyTorch an Adam-mini step is four passes per tensor (block sums, "
    "`m.lerp_`, `p.mul_` for decay, `p.addcmul_`): 9 memory accesses per entry against 7 for fused "
    "AdamW's single pass, which the `fused=False` row shows. `optimizer/cpu_fused.py` (C + OpenMP, "
    "built with the system compiler on first use, loaded with ctypes) does per block: sum of "
    "squares, then `m`, decay and update while the block of `g` is still in cache: 5 accesses per "
    "entry. `nonfinite='raise'`/`'skip'` must see every block sum before writing anything, so they "
    "read `g` twice (6 accesses) and cost one more pass. The kernel's per-entry arithmetic is the "
    "eager path's (same ops and order, no FMA contraction beyond ATen's `lerp`); tests hold both "
    "against the readable reference loop in float64.",
    "- Run-to-run spread: on this 2-core machine the ratios move by about +-10% between runs "
    "(AdamW fused took 14.6 to 22.3 ms with 2 threads in four runs on a quiet machine, on the "
    "CPUs these sessions were given); on a "
    "machine busy with other jobs, multi-threaded OpenMP figures suffer most (barriers wait for "
    "descheduled threads), and the 1-thread column is the steadier comparison.",
    "- bf16 momentum uses stochastic rounding (a counter-based hash of step, tensor and global index, "
    "the same in the fused kernel and the eager path, so a tensor rounds alike whole or sharded), "
    "so a run is reproducible and resumes "
    "bitwise. It halves the momentum: state 25% of AdamW's. Its step time depends on the CPU: "
    "the rounding hash is arithmetic per entry, so it saves time where memory bandwidth limits "
    "the step and costs time where arithmetic does (0.72x / 0.92x AdamW fused on 2026-11-22's "
    "CPU, 1.11-1.15x / 1.20-1.29x on 2026-12-03's, whose float32 steps were 1.2-2x slower).",
    "- Not measured: GPU (no GPU was lent to this task). On CUDA the eager path runs "
    "(`vector_norm` block sums, in-place `lerp_`/`mul_`/`addcmul_`).",
]


def llama() -> torch.nn.Module:
    """The timed model: transformers Llama from config, 31.6M float32 parameters (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1376,
        vocab_size=8192,
    )
    return LlamaForCausalLM(cfg)


def make_optimizers(model: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
    """Every contender on ``model``'s parameters (lr 1e-5, weight decay 0.1), by table row."""
    from adam_mini import Adam_mini

    part = partition.adam_mini(model)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    hp = dict(lr=1e-5, weight_decay=0.1)
    with contextlib.redirect_stdout(io.StringIO()):
        official = Adam_mini(named, **hp, dim=512, n_heads=8, n_kv_heads=4, verbose=False)
    return {
        "AdamW fused": torch.optim.AdamW(params, fused=True, **hp),
        "AdamW foreach": torch.optim.AdamW(params, foreach=True, **hp),
        "adam-mini 1.1.1 (official)": official,
        "AdamMini (default: fused kernel, nonfinite='skip_blocks')": optimizer.AdamMini(
            named, part, **hp
        ),
        "AdamMini nonfinite='raise' (two passes)": optimizer.AdamMini(
            named, part, nonfinite="raise", **hp
        ),
        "AdamMini nonfinite='ignore'": optimizer.AdamMini(named, part, nonfinite="ignore", **hp),
        "AdamMini fused=False (eager PyTorch)": optimizer.AdamMini(named, part, fused=False, **hp),
        "AdamMini bf16 momentum": optimizer.AdamMini(named, part, momentum_dtype="bf16", **hp),
    }


def time_steps(rounds: int, threads: int) -> tuple[dict[str, float], dict[str, int]]:
    """Median step seconds of each optimizer over ``rounds`` interleaved rounds, and state bytes."""
    torch.set_num_threads(threads)
    model = llama()
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opts = make_optimizers(model)
    for opt in opts.values():  # warm-up: state allocation, kernel build
        opt.step()
    times: dict[str, list[float]] = {k: [] for k in opts}
    names = list(opts)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            opts[k].step()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, {
        k: optimizer_state_nbytes(o) for k, o in opts.items()
    }


def quality(steps: int, seeds: list[int]) -> dict[str, list[float]]:
    """Final validation loss per seed of TinyGPT with AdamW, AdamMini and bf16-momentum AdamMini."""
    from lab.data import Corpus
    from lab.models import TinyGPT, TinyGPTConfig, lm_loss

    corpus = Corpus.stdlib()
    cfg = TinyGPTConfig(context=64, n_layer=2, d_model=64, n_heads=4, n_kv_heads=2)
    runs: dict[str, list[float]] = {"AdamW": [], "AdamMini fp32 m": [], "AdamMini bf16 m": []}
    for seed in seeds:
        for name in runs:
            model = TinyGPT(cfg, seed=seed)
            hp = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
            if name == "AdamW":
                opt = torch.optim.AdamW(model.parameters(), **hp)
            else:
                dtype = "bf16" if "bf16" in name else None
                opt = optimizer.AdamMini(
                    model.named_parameters(), model=model, momentum_dtype=dtype, seed=seed, **hp
                )
            batches = corpus.batches("train", 16, 64, seed=seed)
            for _ in range(steps):
                opt.zero_grad()
                lm_loss(model, next(batches)).backward()
                opt.step()
            with torch.no_grad():
                val = corpus.batches("val", 64, 64, seed=1000)
                runs[name].append(
                    statistics.fmean(lm_loss(model, next(val)).item() for _ in range(4))
                )
    return runs


def report(rounds: int, steps: int, seeds: list[int], threads: list[int], command: str) -> str:
    """Run both parts and return the README section, markers included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timed = {n: time_steps(rounds, n) for n in threads}
        losses = quality(steps, seeds)
    lines = [
        BEGIN,
        "## Optimizer",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Step time on the CPU, transformers Llama from config (hidden 512, 8 layers, 8 heads, 4 kv heads, "
        f"intermediate 1376, vocab 8192; 31.6M float32 parameters, weight decay 0.1), median over {rounds} "
        "interleaved rounds (each round steps every optimizer once, in rotating order). "
        "Ratios are against `torch.optim.AdamW(fused=True)` in the same run. "
        "State: bytes of every tensor in `optimizer.state` after one step.",
        "",
        "| optimizer | "
        + " | ".join(f"step ms ({n} thr) | × AdamW fused ({n} thr)" for n in threads)
        + " | state (MB) | × AdamW state |",
        "| --- | " + " | ".join("---: | ---:" for _ in threads) + " | ---: | ---: |",
    ]
    first = timed[threads[0]]
    base_b = first[1]["AdamW fused"]
    for k in first[0]:
        cells = []
        for n in threads:
            times = timed[n][0]
            cells.append(f"{times[k] * 1e3:.1f} | {times[k] / times['AdamW fused']:.2f}")
        nbytes = first[1][k]
        lines.append(f"| {k} | {' | '.join(cells)} | {nbytes / 1e6:.1f} | {nbytes / base_b:.3f} |")
    lines += [
        "",
        f"Quality of bf16 momentum: TinyGPT (2 layers, d 64, 4 heads, 2 kv heads) on the byte-level stdlib "
        f"corpus, {steps} steps, batch 16 × 64, lr 3e-3, betas (0.9, 0.95), wd 0.1 (AdamW decays every "
        f"tensor, torch's default; AdamMini leaves 1-D tensors undecayed, decay_1d=False, the paper's "
        f"setting), same init and batches; "
        f"validation loss (nats/byte, 4 batches of 64 × 64) per seed {seeds}:",
        "",
        "| optimizer | val loss per seed | mean |",
        "| --- | --- | ---: |",
    ]
    for k, v in losses.items():
        lines.append(f"| {k} | {', '.join(f'{x:.4f}' for x in v)} | {statistics.fmean(v):.4f} |")
    lines += ["", *NOTES, END]
    return "\n".join(lines) + "\n"


def write_section(section: str, path: Path) -> None:
    """Replace the text between the optimizer markers of ``path`` with ``section`` (atomic)."""
    text = path.read_text()
    a, b = text.index(BEGIN), text.index(END) + len(END)
    new = text[:a] + section.rstrip("\n") + text[b:]
    write_text(path, new)


def main() -> None:
    """Command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the quality run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads(), 1])
    parser.add_argument("--write", action="store_true", help="update benchmarks/README.md")
    args = parser.parse_args()
    command = "python benchmarks/bench_optimizer.py " + " ".join(sys.argv[1:])
    section = report(
        args.rounds,
        args.steps,
        args.seeds,
        sorted(set(args.threads), reverse=True),
        command.strip(),
    )
    print(section)
    if args.write:
        write_section(section, ROOT / "benchmarks" / "README.md")


if __name__ == "__main__":
    main()
