"""Native CPU kernels for the draws and the feedback recipe's step: C compiled on first use
by the machine's C compiler, loaded with ctypes.

A draw made of torch ops passes over memory once per op: brsf's fresh feedback took the
hash's dozen integer passes, a conversion and a ``copysign``, where the kernel here makes
each entry in one pass, from the same SplitMix64 words, at about the cost of the
``copysign`` alone. Likewise the feedback recipe's step for a rule with decay and an
activity term (wm, ia), ``F ← a·F + b·F.grad``, is one pass over F here and two in torch ops.
The kernels run on torch's own OpenMP threads (the library links ``libgomp.so.1``, which
torch has already loaded) with ``torch.get_num_threads()`` of them.

The shared object is cached in :func:`neuralign.io.cache_dir` (``$NEURALIGN_CACHE``, else
``~/.cache/neuralign``), keyed by the source, the compiler and its flags; building it takes a
fraction of a second. ``NEURALIGN_NATIVE=0`` turns the kernels off, and without a working
compiler they are off with one warning: the draws and the step then keep their torch ops
(:mod:`neuralign.draws`, :mod:`neuralign.dynamics`), the draws with the same distribution.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .io import cache_dir

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef VECTOR_MATH  /* glibc's libmvec: logf, sinf, cosf on 4 or 8 lanes */
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
float sinf(float);
#pragma omp declare simd notinbranch
float cosf(float);
#endif

/* SplitMix64 (Steele, Lea & Flood 2014): word j of a draw is mix(seed + j * gamma) */
#define GAMMA 0x9E3779B97F4A7C15ULL
static inline uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)  /* (ifunc) */
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) \
    && __GNUC__ >= 11 && !defined(__FMA__)  /* x86-64-v3: AVX2 and FMA */
#define FMA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define FMA_CLONED
#else
#define FMA_CLONES
#endif

/* f[i] = copysign((s_i + 128.5) step, w[i]) (w NULL: +), s_i the int8 byte i of the words
   (byte k of word j is bits 8k..8k+7: the little-endian bytes of torch's int64 tensor); 64
   entries a block */
CLONES void signed_uniform_bytes(const float *w, float *f, int64_t n, const uint64_t *seed_at,
                                 float step, int threads) {
    int64_t blocks = (n + 63) / 64;
    uint64_t seed = *seed_at;
    #pragma omp parallel for num_threads(threads) schedule(static) if (n > 32768)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        int8_t s[64];
        for (int j = 0; j < 8; ++j) {
            uint64_t z = mix(seed + (uint64_t)(blk * 8 + j) * GAMMA);
            for (int k = 0; k < 8; ++k) s[8 * j + k] = (int8_t)(z >> (8 * k));
        }
        int64_t base = blk * 64, m = n - base < 64 ? n - base : 64;
        uint32_t *fi = (uint32_t *)(f + base);
        for (int64_t i = 0; i < m; ++i) {
            float v = ((float)s[i] + 128.5f) * step;
            uint32_t bits;
            memcpy(&bits, &v, 4);
            fi[i] = w ? bits | (((const uint32_t *)w)[base + i] & 0x80000000u) : bits;
        }
    }
}

/* out[i] = the int32 half k0 + i of the words (the low half first), shifted right by 8: a
   24-bit integer in [-2^23, 2^23); m <= 64, each word hashed once */
static inline void bits24(uint64_t seed, int64_t k0, int m, int32_t *out) {
    uint64_t w[33];
    int64_t j0 = k0 >> 1;
    int words = (int)(((k0 + m - 1) >> 1) - j0 + 1);
    for (int j = 0; j < words; ++j) w[j] = mix(seed + (uint64_t)(j0 + j) * GAMMA);
    for (int i = 0; i < m; ++i) {
        int64_t k = k0 + i;
        out[i] = (int32_t)(uint32_t)(w[(k >> 1) - j0] >> (32 * (k & 1))) >> 8;
    }
}

/* N(0, std^2) by Box-Muller, for h = ceil(n / 2) pairs: pair i takes its radius from 24-bit
   integer a = bits i, u = (a + 2^23 + 1/2) / 2^24, and its angle from bits h + i,
   2 pi (t + 1/2) / 2^24; out[i] = r sin, out[h + i] = r cos (dropped for i = h - 1 where n
   is odd) */
CLONES void normal_pairs(float *out, int64_t n, const uint64_t *seed_at, float std,
                         int threads) {
    uint64_t seed = *seed_at;
    int64_t h = (n + 1) / 2;
    float c = -2.0f * std * std;
    #pragma omp parallel for num_threads(threads) schedule(static) if (n > 8192)
    for (int64_t i0 = 0; i0 < h; i0 += 64) {
        int32_t a[64], t[64];
        float r[64], theta[64];
        int m = h - i0 < 64 ? (int)(h - i0) : 64;
        bits24(seed, i0, m, a);
        bits24(seed, h + i0, m, t);
        #pragma omp simd
        for (int i = 0; i < m; ++i) {
            float u = ((float)(a[i] + 8388608) + 0.5f) * 0x1p-24f;
            r[i] = sqrtf(c * logf(u));
            theta[i] = ((float)t[i] + 0.5f) * (float)(6.283185307179586 * 0x1p-24);
        }
        #pragma omp simd
        for (int i = 0; i < m; ++i) out[i0 + i] = r[i] * sinf(theta[i]);
        int mc = h + i0 + m <= n ? m : m - 1;
        #pragma omp simd
        for (int i = 0; i < mc; ++i) out[h + i0 + i] = r[i] * cosf(theta[i]);
    }
}

/* x[i] = fma(b, g[i], a x[i]): the feedback recipe's decay and step in one pass, where
   torch's x.mul_(a).add_(g, alpha=b) passes over x twice, rounding as it does (its add_ is a
   fused multiply-add; -ffp-contract=off keeps a x rounded first; the if applies to the
   threads alone, since an unqualified one would turn the simd off below the bar too) */
FMA_CLONES void scale_add(float *x, const float *g, int64_t n, float a, float b, int threads) {
    #pragma omp parallel for simd num_threads(threads) schedule(static) if (parallel: n > 32768)
    for (int64_t i = 0; i < n; ++i) x[i] = fmaf(b, g[i], a * x[i]);
}

/* whether scale_add's fmaf is the hardware's instruction (else a library call an entry,
   slower than torch's two passes) */
int scale_add_fast(void) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
    return 1;
#elif defined(FMA_CLONED)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* out[i] = (bits i + 1/2) step: uniform on 2^24 levels */
CLONES void uniform_levels(float *out, int64_t n, const uint64_t *seed_at, float step,
                           int threads) {
    uint64_t seed = *seed_at;
    #pragma omp parallel for num_threads(threads) schedule(static) if (n > 32768)
    for (int64_t i0 = 0; i0 < n; i0 += 64) {
        int32_t a[64];
        int m = n - i0 < 64 ? (int)(n - i0) : 64;
        bits24(seed, i0, m, a);
        for (int i = 0; i < m; ++i) out[i0 + i] = ((float)a[i] + 0.5f) * step;
    }
}
"""

# (flags, libraries): the first set that builds; without libmvec the noise's logf, sinf and
# cosf run a lane at a time, and without OpenMP every kernel on one thread
_FLAG_SETS = ((["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-DVECTOR_MATH"],
               ["-lmvec", "-lm"]),
              (["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"], ["-lm"]),
              (["-O3", "-fno-math-errno", "-ffp-contract=off"], ["-lm"]))


def _build(compiler: str) -> Path:
    """The kernels' shared object, compiled unless cached; written under a temporary name
    and renamed, so processes building it at once (a distributed run) never load half a file."""
    paths = [cache_dir() / "native" / f"kernels-{_key(compiler, flags)}.so"
             for flags, _ in _FLAG_SETS]
    for path in paths:  # (a set that failed to build is not tried again where a later one is)
        if path.exists():
            return path
    errors = []
    for (flags, libraries), path in zip(_FLAG_SETS, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            source, built = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
            source.write_text(_SOURCE)
            run = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", str(built),
                                  str(source), *libraries], capture_output=True, text=True,
                                 timeout=120)
            if run.returncode == 0:
                os.replace(built, path)
                return path
            errors.append(run.stderr.strip()[-500:])
    raise OSError(f"{compiler} could not build them: " + " | ".join(errors))


def _key(compiler: str, flags: list[str]) -> str:
    return hashlib.sha256("\0".join([_SOURCE, compiler, *flags, platform.machine()])
                          .encode()).hexdigest()[:16]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they are off (``NEURALIGN_NATIVE=0``) or cannot be
    built (a warning says why, once)."""
    if os.environ.get("NEURALIGN_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build(os.environ.get("CC") or "cc")))
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"neuralign's native kernels are off ({err}); the draws use torch ops, "
                      "with the same distribution (set NEURALIGN_NATIVE=0 to silence this)",
                      RuntimeWarning, stacklevel=2)
        return None
    lib.signed_uniform_bytes.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_void_p, ctypes.c_float, ctypes.c_int]
    for kernel in (lib.normal_pairs, lib.uniform_levels):
        kernel.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float,
                           ctypes.c_int]
    lib.scale_add.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                              ctypes.c_float, ctypes.c_int]
    for kernel in (lib.signed_uniform_bytes, lib.normal_pairs, lib.uniform_levels,
                   lib.scale_add):
        kernel.restype = None
    lib.scale_add_fast.argtypes, lib.scale_add_fast.restype = [], ctypes.c_int
    return lib


def fits(out: Tensor, other: Tensor | None = None) -> bool:
    """Whether the kernels can take these tensors: float32 on CPU, dense (contiguous, or
    channels_last), and ``other`` laid out as ``out`` is, so entry ``i`` of one's memory is
    entry ``i`` of the other's."""
    # (is_cpu rather than device.type, and the cheap tests first: brsf's every layer asks,
    # every backward; 0.6 µs against 1.2)
    if not (out.is_cpu and out.dtype is torch.float32):
        return False
    if other is not None and not (other.is_cpu and other.dtype is torch.float32
                                  and other.stride() == out.stride()
                                  and other.shape == out.shape):
        return False
    return _dense(out)


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(
        memory_format=torch.channels_last)) or (t.dim() == 5 and t.is_contiguous(
            memory_format=torch.channels_last_3d))


def flat(t: Tensor) -> Tensor:
    """A tensor as :func:`fits` takes it, as the 1-D run of its memory."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,))


def signed_uniform_bytes(lib: ctypes.CDLL, out: Tensor, sign: Tensor | None, seed: Tensor,
                         step: float) -> Tensor:
    """``out[i] = copysign((s_i + 128.5) step, sign[i])`` (no ``sign``: positive) for the
    int8 bytes ``s_i`` of the SplitMix64 words from ``seed`` (a CPU int64 scalar; the words
    of :func:`neuralign.draws.random_words` for that seed), in one pass; ``out`` and ``sign``
    as :func:`fits` takes them. The level is rounded once to float32:
    ``(s + 128.5) · float32(step)``."""
    lib.signed_uniform_bytes(None if sign is None else sign.data_ptr(), out.data_ptr(),
                             out.numel(), seed.data_ptr(), step, torch.get_num_threads())
    return out


def noise(lib: ctypes.CDLL, out: Tensor, dist: str, std: float, seed: Tensor) -> Tensor:
    """Mirror noise into ``out`` (as :func:`fits` takes it) from the SplitMix64 words of
    ``seed`` (a CPU int64 scalar), in one pass, with the values of
    :func:`neuralign.draws.box_muller` (``dist='normal'``) or the uniform levels of
    :func:`neuralign.draws.noise_like` for those words, up to float32 rounding."""
    if dist == "normal":
        lib.normal_pairs(out.data_ptr(), out.numel(), seed.data_ptr(), std,
                         torch.get_num_threads())
    else:  # uniform on (-w, w), w = sqrt(3) std: (k + 1/2) 2w / 2^24 for k in [-2^23, 2^23)
        lib.uniform_levels(out.data_ptr(), out.numel(), seed.data_ptr(),
                           2 * std * math.sqrt(3.0) * 2**-24, torch.get_num_threads())
    return out


def scale_add(lib: ctypes.CDLL, x: Tensor, g: Tensor, a: float, b: float) -> bool:
    """``x ← a·x + b·g`` in one pass (``x`` and ``g`` as :func:`fits` takes them), rounded
    as torch's ``x.mul_(a).add_(g, alpha=b)`` rounds (``a·x``, then a fused multiply-add),
    for ``a`` and ``b`` rounded to float32. False, with ``x`` untouched, where the kernel
    would be slower than those two ops (no hardware fused multiply-add)."""
    if not _has_fma(lib):
        return False
    lib.scale_add(x.data_ptr(), g.data_ptr(), x.numel(), a, b, torch.get_num_threads())
    return True


@functools.cache
def _has_fma(lib: ctypes.CDLL) -> bool:
    return bool(lib.scale_add_fast())  # (asked once: a ctypes call costs a µs)
