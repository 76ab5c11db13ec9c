"""The random draws (``neuralign.random_draws``): mirror noise and brsf's fresh magnitudes come
from torch's own generator, so ``torch.manual_seed`` repeats them on any machine, whatever is
installed; they have the distributions the rules specify, eager or compiled."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import neuralign as na
from neuralign.random_draws import UniformMagnitudes, noise_like

_DRAW = """
import sys
import torch
from torch import nn
import neuralign as na
from neuralign.random_draws import noise_like

torch.manual_seed(0)
x = torch.empty(20000)
out = [noise_like(x, "normal", 0.7), noise_like(x, "uniform", 0.7)]
layer = na.convert(nn.Linear(150, 200), "brsf")
out.append(layer.feedback.clone())  # (drawn at conversion)
layer(torch.randn(3, 150, requires_grad=True)).sum().backward()
out.append(layer.feedback.clone())  # (drawn fresh in the backward)
torch.save(out, sys.argv[1])
"""


def test_the_same_seed_draws_the_same_with_or_without_a_c_compiler(tmp_path):
    """Two processes, one with this machine's PATH and one whose PATH finds no program at all
    (no C compiler), draw the same mirror noise and brsf feedback from the same seed, and
    neither writes anything into its (empty) cache folder."""
    src = str(Path(na.__file__).parents[1])  # (the package under test, in the children too)
    runs = {"path": os.environ["PATH"], "no-compiler": str(tmp_path / "empty-bin")}
    (tmp_path / "empty-bin").mkdir()
    draws = {}
    for name, path in runs.items():
        cache = tmp_path / f"cache-{name}"
        cache.mkdir()
        env = dict(os.environ, PATH=path, NEURALIGN_CACHE=str(cache), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
        out = tmp_path / f"{name}.pt"
        r = subprocess.run([sys.executable, "-c", _DRAW, str(out)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert list(cache.iterdir()) == [], name
        draws[name] = torch.load(out)
    for a, b in zip(draws["path"], draws["no-compiler"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("init,shape", [("default", (400, 300)), ("kaiming_uniform", (400, 300)),
                                        ("xavier_uniform", (400, 300)), ("default", (40, 50)),
                                        ("uniform", (400, 300))])
def test_brsf_magnitudes_are_fresh_uniform_draws(init, shape):
    """brsf's draw (one random byte an entry, eight per 64-bit word) has the distribution the
    rule specifies, |U(-b, b)| = U(0, b) with the init's own b, on 256 levels (the bins'
    midpoints), independently per entry and per batch: every value on the grid, a chi-square
    test of the 256 levels, the moments, and the correlation between neighbouring entries
    (same word, next word) and between batches, against their sampling error."""
    from neuralign.layers import UNIFORM_BOUNDS

    torch.manual_seed(0)
    layer = na.convert(nn.Linear(shape[1], shape[0]), na.get_rule("brsf", init=init))
    W = layer.weight.detach()
    b = UNIFORM_BOUNDS[init](W)
    # b is the init's own: its draw has std b / sqrt(3)
    ref = na.layers.init_feedback(torch.empty(2000, shape[1]) if init != "xavier_uniform"
                                  else torch.empty(shape), None, init)
    assert abs(ref.std().item() * math.sqrt(3) / b - 1) < 0.01
    draws = []
    for _ in range(2):
        layer(torch.randn(2, shape[1], requires_grad=True)).sum().backward()
        F = layer.feedback
        assert torch.equal(torch.sign(F), torch.sign(W))
        draws.append((F.abs() / b).flatten().double())
    u, v = draws
    n = u.numel()
    level = u * 256 - 0.5  # the level k of (k + 1/2) / 256
    k = level.round()
    assert (level - k).abs().max() < 1e-3 and k.min() >= 0 and k.max() <= 255
    counts = torch.bincount(k.long(), minlength=256).double()
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum().item()
    dof = 255  # its 0.1% critical value, by Wilson & Hilferty's cube-root normal approximation
    assert chi2 < dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    tol = 4 / math.sqrt(n)  # four standard errors (of a correlation)
    assert abs(u.mean() - 0.5) < tol * math.sqrt(1 / 12)
    assert abs(u.var() - (1 - 2**-16) / 12) < tol * math.sqrt(1 / 180)
    z, w = u - 0.5, v - 0.5
    for lag in (1, 2, 3, 7, 8, 9):  # entries from the same 64-bit word, and from the next
        assert abs((z[lag:] * z[:-lag]).mean() / z.var()) < tol, lag
    assert abs((z * w).mean() / z.var()) < tol  # batch to batch
    assert (u != v).float().mean() > 0.99


@pytest.mark.parametrize("shape", [(50, 40), (13, 7), (1000, 999)])
def test_uniform_magnitudes_are_the_bytes_of_torch_s_words(shape):
    """Each byte s of torch's full-range int64 draw gives (s + 128.5) b / 256, in the tensor's
    logical order, so ``torch.manual_seed`` repeats the draw; the sign's sign bit is copied
    (-0.0 and infinities too). The draw keeps no memory between calls: the object holds the
    distribution's constants only."""
    draw = UniformMagnitudes(0.3)
    out = torch.empty(shape)
    n = out.numel()
    sign = torch.randn(shape)
    sign.view(-1)[:4] = torch.tensor([0.0, -0.0, float("inf"), -float("inf")])
    for seed in (5, 6):
        torch.manual_seed(seed)
        got = draw(out).clone()
        torch.manual_seed(seed)
        w = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-2**63, None)
        s = w.view(torch.int8)[:n].view(shape).double()
        level = (s + 128.5) * torch.tensor(0.3).item() / 256  # (float32(b), exact in float64)
        torch.testing.assert_close(got.double(), level, rtol=0, atol=1e-6)
        torch.manual_seed(seed)
        assert torch.equal(draw(out), got)
        torch.manual_seed(seed)
        assert torch.equal(draw(out, sign), torch.copysign(got, sign))
    assert all(not isinstance(v, torch.Tensor) or v.numel() == 1 for v in vars(draw).values())


@pytest.mark.parametrize("dist", ["normal", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_mirror_noise_is_torch_s_draw_with_the_distribution_s_moments(dist, dtype):
    """``noise_like`` is torch's ``normal_`` / ``uniform_`` (U(-√3 σ, √3 σ)) into a fresh
    tensor like ``x``: the same seed gives the same noise, with the distribution's moments."""
    x, std = torch.empty(3, 20001, dtype=dtype), 0.7
    torch.manual_seed(1)
    got = noise_like(x, dist, std)
    assert got.shape == x.shape and got.dtype == dtype
    torch.manual_seed(1)
    h = std * math.sqrt(3)
    want = torch.empty_like(x).normal_(0, std) if dist == "normal" else (
        torch.empty_like(x).uniform_(-h, h))
    assert torch.equal(got, want)
    z = got.flatten().double() / std
    tol = 4 / math.sqrt(z.numel())  # four standard errors
    assert abs(z.mean()) < tol and abs(z.var() - 1) < tol * (math.sqrt(2) if dist == "normal"
                                                             else math.sqrt(0.8))
    if dist == "normal":
        assert abs(z.pow(4).mean() - 3) < tol * math.sqrt(96)  # kurtosis: Var(z^4) = 96
    else:
        assert z.abs().max() <= math.sqrt(3) * (1 + 1e-2)  # (bfloat16's rounding of √3 σ)


def test_draws_take_channels_last_tensors():
    """A channels_last convolution's F keeps W's layout, with W's sign at each entry and the
    256 levels; mirror noise for a channels_last activation is channels_last too."""
    conv = na.convert(nn.Conv2d(16, 32, 3), na.get_rule("brsf")).to(
        memory_format=torch.channels_last)
    x = torch.randn(4, 16, 12, 12).to(memory_format=torch.channels_last).requires_grad_()
    conv(x).sum().backward()
    W, F = conv.weight.detach(), conv.feedback
    assert not W.is_contiguous() and F.stride() == W.stride()
    assert torch.equal(torch.sign(F), torch.sign(W))
    level = F.abs() / (1 / math.sqrt(16 * 9)) * 256 - 0.5  # (k + 1/2) b / 256, b = 1/sqrt(fan_in)
    assert (level - level.round()).abs().max() < 1e-3 and len(level.round().unique()) > 200
    noise = noise_like(torch.empty(8, 16, 32, 32).to(memory_format=torch.channels_last),
                       "normal", 1.0)
    assert noise.is_contiguous(memory_format=torch.channels_last)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02


@pytest.mark.parametrize("rule", ["brsf", "wm"])
def test_compiled_draws_are_the_eager_ones(rule):
    """Compiled, brsf's magnitudes and wm's mirror noise are opaque ops running the eager
    draws: no graph break, and the same seed gives eager's F (brsf, fresh every batch) and
    F's rule gradient (wm, from the noise)."""
    def run(compiled: bool):
        torch.manual_seed(0)
        model = na.convert(nn.Sequential(nn.Linear(600, 500), nn.ReLU(), nn.Linear(500, 10)),
                           rule)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        out = []
        for _ in range(2):
            forward(torch.randn(4, 600, requires_grad=True)).sum().backward()
            out.append([(m.feedback if rule == "brsf" else m.feedback.grad).clone()
                        for m in (model[0], model[2])])
            model.zero_grad()
        return model, out

    torch._dynamo.reset()
    model, got = run(True)
    _, want = run(False)
    for a, b in zip(got, want, strict=True):
        for fa, fb in zip(a, b, strict=True):
            assert torch.equal(fa, fb)
    assert (got[0][0] != got[1][0]).float().mean() > 0.99  # fresh draws
    assert torch._dynamo.explain(model)(torch.randn(4, 600)).graph_break_count == 0
