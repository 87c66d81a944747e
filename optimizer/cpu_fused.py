"""Fused CPU kernel: the whole Adam-mini step of many tensors in one OpenMP loop.

Eager PyTorch needs four passes over memory per tensor (block sums, ``lerp_`` of
``m``, decay of ``p``, ``addcmul_``): 9 reads/writes per entry against 7 for
``torch.optim.AdamW(fused=True)``. This kernel walks the blocks in chunks and
does, per block, ``sum g^2`` then ``m <- lerp(m, g)`` and ``p <- p*decay + s_b*m``
in one sweep while ``g`` is still in cache: 5 accesses per entry in one-pass mode
(``nonfinite="skip_blocks"``, which leaves blocks with a non-finite sum untouched,
or ``"ignore"``), 6 in the two-pass mode that checks all block sums for NaN/Inf
before touching any state (``"raise"``/``"skip"``).

It handles unsharded, contiguous float32/float64 CPU tensors whose blocks are
contiguous runs (rules ``tensor``, ``rows``, ``heads``, ``fused_heads`` with rows
orientation). Everything else takes the eager path of :mod:`optimizer.kernels`.
Per-entry arithmetic follows the eager path (same ops, same order, no FMA
contraction), so the two differ only in the summation order of the block sums.

The C source below is compiled once per machine with the system C compiler
(``cc -O3 -fopenmp``, about a second) into :func:`optimizer.cache.cache_dir`
(``$ADAM_MINI_LAB_CACHE``, else ``$XDG_CACHE_HOME/adam-mini-lab``, else
``~/.cache/adam-mini-lab``, as the corpus tokens) and loaded with :mod:`ctypes`; without a compiler
:func:`load` returns None and the optimizer stays on the eager path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from optimizer.cache import cache_dir

if TYPE_CHECKING:
    from optimizer.layout import Run

SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* bfloat16 momentum: load = widen the 16 bits; store = stochastic rounding with a
   counter-based hash of (tensor key, element index), so a run is reproducible and resumable. */
static inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
  return x;
}
static inline float bf16_load(uint16_t h) {
  union { uint32_t u; float f; } v; v.u = (uint32_t)h << 16; return v.f;
}
static inline uint16_t bf16_store_sr(float x, uint32_t idx, uint32_t key) {
  union { uint32_t u; float f; } v; v.f = x;
  if ((v.u & 0x7f800000U) == 0x7f800000U)                   /* inf stays inf, nan stays nan */
    return (uint16_t)((v.u >> 16) | ((v.u & 0xffffU) ? 0x40U : 0U));
  return (uint16_t)((v.u + (mix32(idx ^ mix32(key)) & 0xffffU)) >> 16);
}
#define PLAIN_LOAD(x) (x)
#define PLAIN_STORE(x, idx, key) (x)

/* One chunk = n consecutive blocks of L entries of one tensor, starting at flat offset off. */
/* lerp as ATen's vectorized CPU kernel computes it: fma(weight, end - self, self). */
#define DEFINE_KERNEL(NAME, T, FMA, MT, MLOAD, MSTORE)                                                                \
void NAME(int64_t n_chunks, const int64_t *chunk, const int64_t *tensor_ptrs,                 \
          const double *tensor_hyper, double *sums, double beta1, double beta2, double eps,   \
          int phase) {                                                                        \
  const T w = (T)(1.0 - beta1);                                                               \
  const T b2 = (T)beta2, one_minus_b2 = (T)(1.0 - beta2);                                     \
  _Pragma("omp parallel for schedule(dynamic, 4)")                                            \
  for (int64_t c = 0; c < n_chunks; ++c) {                                                    \
    const int64_t *ch = chunk + 6 * c;                                                        \
    const int64_t t = ch[0], n = ch[1], L = ch[2], off = ch[3], vblk = ch[4], sblk = ch[5];  \
    T *p = (T *)tensor_ptrs[5 * t] + off;                                                     \
    const T *g = (const T *)tensor_ptrs[5 * t + 1] + off;                                     \
    MT *m = (MT *)tensor_ptrs[5 * t + 2] + off;                                               \
    const uint32_t key = (uint32_t)tensor_ptrs[5 * t + 4];                                    \
    T *v = (T *)tensor_ptrs[5 * t + 3] + vblk;                                                \
    const double *hy = tensor_hyper + 3 * t;                                                  \
    const T decay = (T)hy[0], neg_step = (T)hy[1], bc2_sqrt = (T)hy[2];                       \
    for (int64_t b = 0; b < n; ++b) {                                                         \
      const T *gb = g + b * L;                                                                \
      double ss;                                                                              \
      if (phase & 1) {                                                                        \
        /* 16 independent lanes of 16 terms in T (vectorizes), chunk totals in double */       \
        ss = 0.0;                                                                             \
        int64_t i = 0;                                                                        \
        for (; i + 256 <= L; i += 256) {                                                      \
          T acc[16] = {0};                                                                    \
          for (int j = 0; j < 256; j += 16)                                                   \
            for (int k = 0; k < 16; ++k) acc[k] += gb[i + j + k] * gb[i + j + k];             \
          for (int k = 8; k > 0; k >>= 1)                                                     \
            for (int q = 0; q < k; ++q) acc[q] += acc[q + k];                                 \
          ss += (double)acc[0];                                                               \
        }                                                                                     \
        for (; i < L; ++i) ss += (double)gb[i] * (double)gb[i];                               \
        sums[sblk + b] = ss;                                                                  \
      } else {                                                                                \
        ss = sums[sblk + b];                                                                  \
      }                                                                                       \
      if (!(phase & 2)) continue;                                                             \
      if ((phase & 4) && !isfinite(ss)) continue; /* skip_blocks: leave p, m, v of b */       \
      const T mean = (T)(ss / (double)L);                                                     \
      const T vb = (T)(v[b] * b2) + one_minus_b2 * mean;                                      \
      v[b] = vb;                                                                              \
      const T denom = (T)((T)sqrt(vb) / bc2_sqrt) + (T)eps;                                   \
      const T s = (T)((T)1 / denom) * neg_step;                                               \
      T *pb = p + b * L;                                                                      \
      MT *mb = m + b * L;                                                                     \
      const uint32_t base = (uint32_t)(off + b * L);                                          \
      if (w < (T)0.5) {                                                                       \
        for (int64_t i = 0; i < L; ++i) {                                                     \
          const T gi = gb[i];                                                                 \
          const T mo = MLOAD(mb[i]);                                                          \
          const T mi = FMA(w, gi - mo, mo)   ;                                             \
          mb[i] = MSTORE(mi, base + (uint32_t)i, key);                                        \
          pb[i] = (T)(pb[i] * decay) + mi * s;                                                \
        }                                                                                     \
      } else {                                                                                \
        const T wc = w - (T)1;                                                                \
        for (int64_t i = 0; i < L; ++i) {                                                     \
          const T gi = gb[i];                                                                 \
          const T mo = MLOAD(mb[i]);                                                          \
          const T mi = FMA(wc, gi - mo, gi)   ;                                               \
          mb[i] = MSTORE(mi, base + (uint32_t)i, key);                                        \
          pb[i] = (T)(pb[i] * decay) + mi * s;                                                \
        }                                                                                     \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
}

DEFINE_KERNEL(adam_mini_f32, float, fmaf, float, PLAIN_LOAD, PLAIN_STORE)
DEFINE_KERNEL(adam_mini_f64, double, fma, double, PLAIN_LOAD, PLAIN_STORE)
DEFINE_KERNEL(adam_mini_f32_bf16m, float, fmaf, uint16_t, bf16_load, bf16_store_sr)
"""

_FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-shared",
    "-fPIC",
]


def _build(path: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = Path(tmp) / "adam_mini_cpu.c"
        src.write_text(SOURCE)
        out = Path(tmp) / path.name
        subprocess.run(
            [compiler, *_FLAGS, str(src), "-o", str(out)], check=True, capture_output=True
        )
        os.replace(out, path)


def _cpu_id() -> str:
    """The CPU's model and flags: ``-march=native`` binaries are cached per CPU type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; None when it cannot be built.

    Set ``ADAM_MINI_LAB_NO_FUSED=1`` to disable the kernel.
    """
    if os.environ.get("ADAM_MINI_LAB_NO_FUSED") == "1" or not sys.platform.startswith("linux"):
        return None
    digest = hashlib.sha256((SOURCE + " ".join(_FLAGS) + _cpu_id()).encode()).hexdigest()[:16]
    path = cache_dir() / f"adam_mini_cpu_{digest}.so"
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError):
        return None
    for fn in (lib.adam_mini_f32, lib.adam_mini_f64, lib.adam_mini_f32_bf16m):
        fn.restype = None
        fn.argtypes = [
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_double,
            ctypes.c_double,
            ctypes.c_double,
            ctypes.c_int,
        ]
    return lib


PHASE_SUMS, PHASE_UPDATE, PHASE_BOTH, PHASE_SKIP_NONFINITE = 1, 2, 3, 4
CHUNK_ELEMENTS = 1 << 15


def chunks_of(tensor_id: int, runs: Sequence[Run], v_lo: int, sums_offset: int) -> list[list[int]]:
    """Chunk rows ``[tensor, n, L, flat_offset, v_block, sums_block]`` of one tensor's flat runs."""
    rows = []
    for run in runs:
        width = run.width
        per = max(1, CHUNK_ELEMENTS // max(width, 1))
        for k in range(0, run.n, per):
            n = min(per, run.n - k)
            b0 = run.block_start + k
            rows.append([tensor_id, n, width, run.start + k * width, b0 - v_lo, sums_offset + b0])
    return rows


def run_kernel(
    lib: ctypes.CDLL,
    dtype: torch.dtype,
    momentum_dtype: torch.dtype,
    chunk_table: torch.Tensor,
    tensor_ptrs: torch.Tensor,
    tensor_hyper: torch.Tensor,
    sums: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    phase: int,
) -> None:
    """Call the kernel. ``chunk_table`` int64 ``(C, 6)``, ``tensor_ptrs`` int64 ``(T, 5)``
    (p, g, m, v data pointers and a 32-bit rounding key), ``tensor_hyper`` float64 ``(T, 3)``
    (decay, -lr/bc1, sqrt(bc2)), ``sums`` float64 ``(total blocks,)``."""
    fn = {
        (torch.float32, torch.float32): lib.adam_mini_f32,
        (torch.float64, torch.float64): lib.adam_mini_f64,
        (torch.float32, torch.bfloat16): lib.adam_mini_f32_bf16m,
    }[dtype, momentum_dtype]
    fn(
        chunk_table.shape[0],
        chunk_table.data_ptr(),
        tensor_ptrs.data_ptr(),
        tensor_hyper.data_ptr(),
        sums.data_ptr(),
        beta1,
        beta2,
        eps,
        phase,
    )
