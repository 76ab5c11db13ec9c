"""Fast random draws on CPU: a counter-based generator in vectorised integer ops.

torch's CPU generator is one Mersenne Twister run serially: 2 ns a 32-bit word, as much per
entry as a small matrix product, every step. brsf's fresh magnitudes and the mirror noise of
wm and ia are drawn here instead, from SplitMix64 (Steele, Lea & Flood 2014) computed on
all threads, seeded by torch's default generator (so ``torch.manual_seed`` and the saved
RNG state govern them): each in one pass by a native kernel (:mod:`neuralign.native`)
where the kernels build, else in torch ops. Small noise draws and other devices keep torch's
own; compiled code runs these same draws as opaque ops."""

from __future__ import annotations

import functools
import math
import threading

import torch
from torch import Tensor

from . import native


def _int64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - 2**64 if c >= 2**63 else c


# SplitMix64 (Steele, Lea & Flood 2014): the state advances by the golden gamma, each output
# is the state through two xor-shift-multiply rounds and a final xor-shift
_GAMMA = _int64(0x9E3779B97F4A7C15)
_MIX = ((30, _int64(0xBF58476D1CE4E5B9)), (27, _int64(0x94D049BB133111EB)), (31, None))


class _Workspace(threading.local):
    """The hash's memory on CPU, kept per thread between calls: fresh megabytes that glibc
    has returned to the OS cost more in page faults than the hash itself (125 000 words:
    0.65-0.79 ms fresh, 0.15 ms kept)."""

    counter: Tensor | None = None  # i * gamma: its first n serve every smaller n
    scratch: Tensor | None = None  # z and its shifted copy

    def take(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        if self.counter is None or self.counter.numel() < n:
            self.counter = torch.arange(n, dtype=torch.int64).mul_(_GAMMA)
            self.scratch = torch.empty(2 * n, dtype=torch.int64)
        assert self.scratch is not None
        return self.counter[:n], self.scratch[:n], self.scratch[n:2 * n]


_WORKSPACE = _Workspace()


@torch.no_grad()
def random_words(n: int, device: torch.device | str = "cpu", *,
                 workspace: bool = False) -> Tensor:
    """``n`` random 64-bit words (int64): SplitMix64's outputs for a seed drawn from torch's
    default generator (so ``torch.manual_seed`` and its saved state govern them). A
    counter-based generator in vectorised integer ops: every word is computed independently,
    on all threads, where ``random_`` on CPU runs one Mersenne Twister serially.

    ``workspace=True`` (CPU only) computes in memory kept per thread, with the counter made
    once: the words are then a view of it, valid until the next such call."""
    seed = torch.randint(2**62, ())  # (a tensor: no host sync, and torch.compile traces it)
    if workspace:
        counter, z, t = _WORKSPACE.take(n)
        torch.add(counter, seed, out=z)
    else:
        z = torch.arange(n, dtype=torch.int64, device=device).mul_(_GAMMA).add_(seed.to(device))
        t = torch.empty_like(z)
    for shift, mult in _MIX:  # z ^= z >>> shift (logical: the arithmetic shift, masked)
        torch.bitwise_right_shift(z, shift, out=t).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(t)
        if mult is not None:
            z.mul_(mult)  # (int64 products wrap, as the unsigned ones)
    return z


#: The most words one hash call makes (larger draws go in chunks): the workspace stays at a
#: few megabytes (three buffers of 2 MB), however large an activation the noise covers
CHUNK_WORDS = 2**18


def _chunks(t: Tensor | None, size: int, n: int = 0) -> list:
    """``t``'s memory (as :func:`native.flat` runs it) in chunks of at most ``size`` entries;
    ``t`` itself when it fits in one (no view to make); for None, ``n`` entries' worth of
    None (the absent sign of a brsf draw)."""
    if t is None:
        return [None] * max(1, -(-n // size))
    if t.numel() <= size:
        return [t]
    flat = native.flat(t)
    return [flat[start:start + size] for start in range(0, t.numel(), size)]


@functools.lru_cache(maxsize=64)
def _offset(value: float) -> Tensor:
    """The offset of a conversion ``offset + alpha · bits``, a 0-d tensor made once per value
    (a CPU scalar, which any device's op takes)."""
    return torch.tensor(value)


#: From this many words up (2^18 bytes), on CPU, the hash's dozen vectorised ops cost less
#: than torch's serial draw (a 64-bit Mersenne Twister word: 2.5 ns, against the hash's 1.4-1.8)
HASH_FROM = 2**15


class UniformMagnitudes:
    """Draws ``|U(-b, b)|``, that is ``U(0, b)``, into a tensor, on 256 levels: the midpoints
    ``(k + ½) b / 256`` of 256 equal bins, from one random byte an entry, eight from each
    64-bit word; with ``sign``, ``copysign(draw, sign)`` (brsf's F). The grid is as fine as a
    bfloat16's mantissa; the mean is exact and the variance ``b²/12 (1 - 2^-16)``.

    On CPU, for dense float32 (contiguous or channels_last), the native kernel
    (:mod:`neuralign.native`) makes each entry, sign included, in one pass from
    :func:`random_words`' words. Without it the words
    are :func:`random_words` from ``HASH_FROM`` words up, else torch's own full-range
    ``random_`` (a parallel Philox draw on GPU) into memory kept for the next call. Either
    is much cheaper than ``uniform_``, a 32-bit Mersenne Twister draw per entry run serially,
    which set brsf's cost (``benchmarks/draws.py``). Under ``torch.compile`` the same draw
    runs as an opaque op."""

    def __init__(self, bound: float):
        self.bound = bound
        self.step = bound / 256
        # byte s in [-128, 128) -> (s + 128.5) step, in one pass: offset + step * s
        self.offset = _offset(128.5 * self.step)
        self._words: Tensor | None = None  # torch's draw: the words and their bytes as out
        self._bytes: Tensor | None = None
        self._seed = torch.empty((), dtype=torch.int64)  # the native draw's (random_words')

    def __call__(self, out: Tensor, sign: Tensor | None = None) -> Tensor:
        if torch.compiler.is_compiling():
            # an opaque op that runs this same draw, eagerly, inside the compiled graph
            # (inductor miscompiles the wrapping int64 products of random_words, torch 2.14:
            # heap corruption, index overflow; and its own rand, or torch's with
            # fallback_random, is the serial draw again)
            torch.ops.neuralign.uniform_magnitudes_(out, self.bound, sign)
            return out
        n, size = out.numel(), 8 * CHUNK_WORDS  # (a byte an entry; read here, as tests patch it)
        lib = native.library()
        if lib is not None and native.fits(out, sign):
            if n <= size:  # (every layer's call, in the backward: no lists)
                native.signed_uniform_bytes(lib, out, sign, self._seed.random_(2**62), self.step)
                return out
            for part, signs in zip(_chunks(out, size), _chunks(sign, size, n), strict=True):
                native.signed_uniform_bytes(lib, part, signs, self._seed.random_(2**62),
                                            self.step)
            return out
        return self._torch_ops(out, sign)

    @torch.no_grad()  # (the kernel's writes need no context: 1.1 µs a call saved)
    def _torch_ops(self, out: Tensor, sign: Tensor | None) -> Tensor:
        n, size = out.numel(), 8 * CHUNK_WORDS
        words = (n + 7) // 8
        if words >= HASH_FROM and out.device.type == "cpu" and out.is_contiguous():
            for part in _chunks(out, size):
                m = part.numel()
                s = random_words((m + 7) // 8, workspace=True).view(torch.int8)[:m]
                torch.add(self.offset, s.view(part.shape), alpha=self.step, out=part)
        else:
            s = self._bytes  # type: ignore[assignment]
            if s is None or s.shape != out.shape or s.device != out.device:
                self._words = torch.empty(words, dtype=torch.int64, device=out.device)
                s = self._bytes = self._words.view(torch.int8)[:n].view(out.shape)
            self._words.random_(-2**63, None)  # type: ignore[union-attr]
            torch.add(self.offset, s, alpha=self.step, out=out)
        return out if sign is None else torch.copysign(out, sign, out=out)


@functools.lru_cache(maxsize=64)
def _uniform_magnitudes(bound: float, shape: tuple[int, ...], device: str) -> UniformMagnitudes:
    return UniformMagnitudes(bound)  # (one per shape: each keeps its draw's memory)


@torch.library.custom_op("neuralign::uniform_magnitudes_", mutates_args=("out",))
def _uniform_magnitudes_op(out: Tensor, bound: float, sign: Tensor | None) -> None:
    """:class:`UniformMagnitudes` as an op that ``torch.compile`` keeps whole."""
    _uniform_magnitudes(bound, tuple(out.shape), str(out.device))(out, sign)


@_uniform_magnitudes_op.register_fake
def _(out: Tensor, bound: float, sign: Tensor | None) -> None:
    return None


#: From this many entries up, on CPU, mirror noise comes from :func:`random_words`
NOISE_HASH_FROM = 2**16


def _bits24(words: int) -> Tensor:
    """``2 words`` random int32 on [-2^23, 2^23): the top 24 bits of each half of a word."""
    return random_words(words, workspace=True).view(torch.int32).bitwise_right_shift_(8)


def box_muller(bits: Tensor, std: float, out: Tensor) -> Tensor:
    """``N(0, std²)`` into ``out`` (float32, ``2 h`` entries) from ``bits`` (int32 on
    [-2^23, 2^23), ``2 h`` of them, changed in place): the first ``h`` give the radii, from
    ``u = (k + 1/2) / 2^24`` (never 0 or rounded to 0, so every value is finite), the last
    ``h`` the angles, ``2 pi (k + 1/2) / 2^24``; ``out`` holds the sines, then the cosines."""
    h = bits.numel() // 2
    u, theta = out[:h], out[h:]
    torch.add(_offset(2**-25), bits[:h].add_(2**23), alpha=2**-24, out=u)  # k + 2^-25, exact below 1/2
    torch.add(_offset(math.pi * 2**-24), bits[h:], alpha=2 * math.pi * 2**-24, out=theta)
    r = u.log_().mul_(-2 * std * std).sqrt_()  # r = std sqrt(-2 ln u), in place of u
    sin = torch.sin(theta)
    theta.cos_().mul_(r)  # r cos(theta)
    r.mul_(sin)  # r sin(theta)
    return out


def noise_like(x: Tensor, dist: str, std: float, after: Tensor | None = None) -> Tensor:
    """Fresh noise of ``x``'s shape, dtype, device and memory format: ``N(0, std²)``, or
    (``dist='uniform'``) uniform with that standard deviation.

    On CPU, for a float32 ``x``, from :func:`random_words`' words: uniforms on 2^24 levels
    (the midpoints; torch's own float draw has 24 bits too), and normals from pairs of them
    by the Box-Muller transform, as torch's ``normal_`` makes them. The native kernel
    (:mod:`neuralign.native`) makes them in one pass from ``NATIVE_NOISE_FROM`` entries up
    (``x`` contiguous or channels_last); without it, torch ops make them from
    ``NOISE_HASH_FROM`` entries up (``x`` contiguous; see
    ``benchmarks/draws.py`` for both against ``normal_``). Elsewhere torch's ``normal_`` /
    ``uniform_``. Under ``torch.compile`` the same draws run as an opaque op (inductor's own
    draw is slower on CPU, and compiled and eager runs then draw the same noise from the
    same seed). ``after``, a tensor of the backward (the output's gradient), ties the op to
    it: AOTAutograd's partitioner would otherwise move a draw that needs nothing of the
    backward into the forward graph and save it, an activation-sized tensor (seen under
    DistributedDataParallel, where the forward then drew every step's noise, and probing
    steps drew it twice)."""
    # (no no_grad context, called in every wm and ia layer's backward: the draws write into
    # a fresh tensor that needs no gradient, and random_words takes its own)
    out = torch.empty_like(x)
    if torch.compiler.is_compiling():
        torch.ops.neuralign.noise_(out, dist, std, after)
        return out
    return _draw_noise(out, dist, std)


#: From this many entries up, on CPU, the native kernel draws mirror noise. Alone it beats
#: ``normal_`` from a few thousand entries (``benchmarks/draws.py --evict``), but in the step
#: it did not: from 2^11, the tiny MLP's wm and ia steps (3200-entry draws) took 7% longer
#: (``benchmarks/step_time.py --models tiny --rules wm,ia``)
NATIVE_NOISE_FROM = 2**13


def _draw_noise(out: Tensor, dist: str, std: float) -> Tensor:
    n = out.numel()
    size = 2 * CHUNK_WORDS  # (two entries a word; native or not, the same words)
    lib = native.library() if n >= NATIVE_NOISE_FROM else None
    if lib is not None and native.fits(out):
        for part in _chunks(out, size):
            native.noise(lib, part, dist, std, torch.randint(2**62, ()))
        return out
    if (n < NOISE_HASH_FROM or out.device.type != "cpu" or out.dtype != torch.float32
            or not out.is_contiguous()):
        if dist == "normal":
            return out.normal_(0.0, std)
        half_width = std * math.sqrt(3.0)
        return out.uniform_(-half_width, half_width)
    for part in _chunks(out, size):
        _noise_chunk(part.view(-1), dist, std)
    return out


def _noise_chunk(flat: Tensor, dist: str, std: float) -> None:
    n = flat.numel()
    if dist == "normal":
        h = (n + 1) // 2
        if n % 2 == 0:
            box_muller(_bits24(h), std, flat)
        else:  # (the last pair's cosine has no place)
            flat.copy_(box_muller(_bits24(h), std, torch.empty(2 * h))[:n])
        return
    # uniform on (-w, w), w = sqrt(3) std: (k + 1/2) 2w / 2^24 for k in [-2^23, 2^23)
    step = 2 * std * math.sqrt(3.0) * 2**-24
    torch.add(_offset(0.5 * step), _bits24((n + 1) // 2)[:n], alpha=step, out=flat)


@torch.library.custom_op("neuralign::noise_", mutates_args=("out",))
def _noise_op(out: Tensor, dist: str, std: float, after: Tensor | None) -> None:
    """:func:`noise_like`'s draw into ``out``, as an op that ``torch.compile`` keeps whole
    (a mutating op: two draws of one shape are never merged into one); ``after`` is only
    waited for."""
    _draw_noise(out, dist, std)


@_noise_op.register_fake
def _(out: Tensor, dist: str, std: float, after: Tensor | None) -> None:
    return None
