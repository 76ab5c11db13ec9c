"""Training-step time and peak memory of every learning rule, as ratios to plain backprop.

A benchmark, not a test: it measures one training step (forward + loss + backward + SGD step
on ``param_groups(model)['forward']``, then the feedback step when the rule has learned
feedback weights: by default the rules' own recipe, ``na.feedback_optimizer``, whose step
includes update noise and normalisation; with ``--feedback sgd`` an SGD step on
``['feedback']`` and ``na.after_step``) for each rule of ``na.list_rules()`` on

* ``tiny``: an MLP 100-100-100-10 (ReLU), batch 32, where the per-call overhead of a converted
  layer, not its products, sets the step time (the size of MNIST-1D's models),
* ``mlp``: an MLP 784-1000-1000-10 (ReLU), batch 128,
* ``resnet18``: ``torchvision.models.resnet18(num_classes=10)`` on 32x32 inputs, batch 64,
* ``vit``: ``torchvision.models.vit_b_16(image_size=64, num_classes=10)`` (16 tokens of width
  768, 12 encoder layers; every attention projection converted), batch 8,

with synthetic data. The rules are interleaved round-robin (each round times every rule once,
starting at a rotating offset) so that machine noise hits them all alike; each round gives a
ratio ``t_rule / t_bp`` and the table reports the median of those ratios over the rounds (and
their interquartile range), after warm-up rounds that are not timed.

Beside each ratio stands the ratio the matrix-multiply FLOP count predicts (DESIGN.md, "Cost of
each rule"): every converted layer's products are counted in units of its forward FLOPs
(forward 1, input gradient 1 unless the layer's input needs no gradient -- the first layer --,
weight gradient 1, plus the rule's own products, derived from its terms: mirror noise +1 for
``y = apply(noise, W)``, null +2, sparse +1, amp/sparse +1 for their merged ``outer``), and the
prediction is ``sum(units_rule * flops) / sum(units_bp * flops)``: pure matmul FLOPs, with
non-matmul work (BN, ReLU, loss, optimizer, sign derivation, noise draws) outside the count.
A second, time-weighted prediction ``s * flop_ratio + (1 - s)`` uses backprop's measured
share ``s`` of operator time in matmul/convolution kernels (from one profiled bp step).

Peak memory: on CPU, ``torch.profiler`` with ``profile_memory=True`` records every allocation
through torch's CPU allocator during one step (gradients set to None before it), and the peak
of its running total is the step's peak; the table adds the model's own parameters and
buffers (weights, feedback weights, optimizer state) to give ``peak``. On CUDA it is
``torch.cuda.max_memory_allocated`` over one step. Memory the oneDNN/BLAS libraries take
outside torch's allocator is not seen.

Run ``python benchmarks/step_time.py --help``; the defaults take a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import neuralign as na
from neuralign.train.build import compile_network

# -- models and data -------------------------------------------------------------------------


def build_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000),
                         nn.ReLU(), nn.Linear(1000, 10))


def build_tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def build_resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def build_vit() -> nn.Module:
    import torchvision

    return torchvision.models.vit_b_16(image_size=64, num_classes=10)


@dataclass
class ModelSpec:
    build: callable
    input_shape: tuple  # one example
    batch: int
    repeats: int  # default timed rounds
    warmup: int  # default untimed rounds
    inner: int  # default steps per timed sample


MODELS = {
    "tiny": ModelSpec(build_tiny, (100,), 32, repeats=60, warmup=5, inner=20),
    "mlp": ModelSpec(build_mlp, (784,), 128, repeats=60, warmup=5, inner=5),
    "resnet18": ModelSpec(build_resnet18, (3, 32, 32), 64, repeats=15, warmup=2, inner=1),
    "vit": ModelSpec(build_vit, (3, 64, 64), 8, repeats=10, warmup=2, inner=1),
}

# Targets of the issue: ratio to bp at most ...
# (issue 13: fa, usf, frsf within 3% of bp, 15% on the tiny MLP; brsf 10%; sa and kp, issue 9's,
# within 5%; dfa at most 0.85 on resnet18; other rules within 5% of their FLOP ideal)
TARGET_NEAR_BP = {"fa": 1.03, "usf": 1.03, "frsf": 1.03, "brsf": 1.10, "sa": 1.05, "kp": 1.05}
TARGET_TINY = 1.15  # fa, usf, frsf on the tiny MLP (per-call overhead dominates)
TARGET_DFA_RESNET = 0.85
TARGET_FLOP_SLACK = 1.05  # aa, wm, ia (and any rule with extra products): FLOP ideal x 1.05
# glibc: blocks up to 32 MiB (its maximum mmap threshold) come from the heap, which is never
# trimmed, so freed memory is reused without page faults.
KEEP_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)}


# -- FLOP model ------------------------------------------------------------------------------


@dataclass
class LayerFlops:
    name: str
    macs: int  # forward multiply-accumulates for the batch
    needs_dx: bool  # the layer's input requires grad (else backprop skips the input gradient)
    in_channels: int = 0
    batch: int = 0
    outputs: int = 0  # the network's outputs per example (for dfa's projection D e)


def layer_flops(model: nn.Module, x: torch.Tensor) -> list[LayerFlops]:
    """Forward MACs of every Linear/Conv layer, and whether its input needs a gradient."""
    out: list[LayerFlops] = []
    hooks = []

    def hook(name):
        def f(m, inp, y):
            xin = inp[0]
            if isinstance(m, nn.Linear):
                macs = y.numel() * m.in_features
            else:
                k = 1
                for s in m.kernel_size:
                    k *= s
                macs = y.numel() * (m.in_channels // m.groups) * k
            cin = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            out.append(LayerFlops(name, int(macs), bool(xin.requires_grad), cin, xin.shape[0]))
        return f

    def attention_hook(name):
        def f(m, inp, y):  # four E x E projections per token, called functionally by torch
            q = inp[0]
            tokens = q.numel() // q.shape[-1]
            for p in "qkvo":
                out.append(LayerFlops(f"{name}.{p}", tokens * m.embed_dim * m.embed_dim, True,
                                      m.embed_dim, q.shape[0]))
        return f

    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and \
                not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
            hooks.append(m.register_forward_hook(hook(name)))
        elif isinstance(m, nn.MultiheadAttention):
            hooks.append(m.register_forward_hook(attention_hook(name)))
    try:
        with torch.enable_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    for lf in out:
        lf.outputs = y[0].numel()
    return out


def rule_units(rule: na.Rule, lf: LayerFlops) -> float:
    """Matrix-multiply units of one layer under ``rule`` (its forward = 1), as the backward
    does them (neuralign.autograd / terms.rule_grad)."""
    if rule.kind == "dfa":  # forward, weight gradient, and D e (outputs x in_channels)
        proj = lf.batch * lf.outputs * lf.in_channels / lf.macs if lf.needs_dx else 0.0
        return 2 + proj
    units = 1 + 1 + (1 if lf.needs_dx else 0)  # forward, weight gradient, input gradient
    if rule.kind != "learned":
        return units
    t = rule.terms
    amp, null, sparse = (t.get(k, 0.0) for k in ("amp", "null", "sparse"))
    if rule.noise is not None and (amp or null or sparse):
        units += 1  # y = apply(noise, W)
    if null:
        units += 2  # apply_T(y, F), outer(u, y)  (amp merged in)
    if sparse:
        units += 1  # apply(x, F)
    if sparse or (amp and not null):
        units += 1  # outer(x, v)
    return units


def flop_ratio(rule: na.Rule, layers: list[LayerFlops]) -> float:
    bp = sum(rule_units(na.get_rule("bp"), lf) * lf.macs for lf in layers)
    r = sum(rule_units(rule, lf) * lf.macs for lf in layers)
    return r / bp


def target_for(model: str, name: str, rule: na.Rule, ideal: float) -> tuple[float, str]:
    if rule.kind == "bp":
        return 1.0, "-"
    if model == "tiny" and name in ("fa", "usf", "frsf"):
        return TARGET_TINY, f"bp+{round((TARGET_TINY - 1) * 100)}%"
    if name in TARGET_NEAR_BP:
        return TARGET_NEAR_BP[name], f"bp+{round((TARGET_NEAR_BP[name] - 1) * 100)}%"
    if model == "resnet18" and rule.kind == "dfa":
        return TARGET_DFA_RESNET, "0.85"
    return ideal * TARGET_FLOP_SLACK, "ideal+5%"


# -- one training setup per rule ------------------------------------------------------------

#: A diagnostic, not a rule: fa whose F is W's own memory (the error then goes down through W,
#: as in backprop, by fa's code). Against fa, it shows what a second weight-sized tensor to
#: read costs, apart from the Function's own code.
FA_SHARED = "fa-shared"


def rule_of(name: str) -> na.Rule:
    return na.get_rule("fa" if name == FA_SHARED else name)


@dataclass
class Runner:
    name: str
    model: nn.Module
    opt_w: torch.optim.Optimizer
    opt_f: torch.optim.Optimizer | None
    lr_f: float
    times: list = field(default_factory=list)
    last_loss: float = float("nan")
    forward: nn.Module | None = None  # torch.compile(model) under --compile
    graph_breaks: int | None = None

    def step(self, x, t):
        out = (self.forward or self.model)(x)
        loss = F.cross_entropy(out, t)
        loss.backward()
        self.opt_w.step()
        if self.opt_f is not None:
            self.opt_f.step()
            if not isinstance(self.opt_f, na.FeedbackOptimizer):  # --feedback sgd
                na.after_step(self.model, self.lr_f)
        self.opt_w.zero_grad(set_to_none=True)
        if self.opt_f is not None:
            self.opt_f.zero_grad(set_to_none=True)
        return loss


def make_runner(name, base, device, lr, lr_f, momentum, feedback="recipe", compile_x=None
                ) -> Runner:
    model = na.convert(copy.deepcopy(base), rule_of(name)).to(device).train()
    if name == FA_SHARED:
        for _, layer in na.feedback_layers(model):
            layer._buffers["feedback"] = layer.weight.detach()
    groups = na.param_groups(model)
    opt_w = torch.optim.SGD(groups["forward"], lr=lr, momentum=momentum)
    opt_f = None
    if groups["feedback"]:
        opt_f = na.feedback_optimizer(model) if feedback == "recipe" else torch.optim.SGD(
            groups["feedback"], lr=lr_f, momentum=momentum)
    runner = Runner(name, model, opt_w, opt_f, lr_f)
    if compile_x is not None:  # --compile: inductor on the model (forward and backward)
        # after one eager pass (dfa's layers tap the output error once its shape is known),
        # through a function, whose frame holds the root's hooks as torch.compile's does
        model(compile_x).sum().backward()
        model.zero_grad(set_to_none=True)
        runner.graph_breaks = torch._dynamo.explain(lambda x: model(x))(compile_x
                                                                        ).graph_break_count
        # (through a code object of its own per rule, as the trainer compiles: otherwise the
        # guards of every rule's graphs would be checked at every call)
        runner.forward = compile_network(model, "inductor")
    return runner


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(runner: Runner, x, t, inner: int, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        loss = runner.step(x, t)
    sync(device)
    dt = (time.perf_counter() - t0) / inner
    runner.last_loss = float(loss.detach())
    return dt


# -- memory -----------------------------------------------------------------------------------


def static_bytes(runner: Runner) -> int:
    """Parameters, buffers and optimizer state held between steps."""
    seen, total = set(), 0
    tensors = list(runner.model.parameters()) + list(runner.model.buffers())
    for opt in (runner.opt_w, runner.opt_f):
        if opt is not None:
            for st in opt.state.values():
                tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def step_peak_bytes(runner: Runner, x, t, device) -> int:
    """Peak bytes allocated during one step above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner.step(x, t)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step(x, t)
    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    allocs.sort()
    cur = peak = 0
    for _, size in allocs:
        cur += size
        peak = max(peak, cur)
    return peak


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv")


def matmul_share(runner: Runner, x, t, steps: int = 3) -> float:
    """Share of backprop's operator time (self CPU time) spent in matmul/convolution ops."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            runner.step(x, t)
    mm = total = 0.0
    for e in prof.key_averages():
        us = e.self_device_time_total if x.is_cuda else e.self_cpu_time_total
        total += us
        if e.key in MATMUL_OPS or "conv" in e.key or "gemm" in e.key.lower():
            mm += us
    return mm / total if total else float("nan")


# -- the benchmark ------------------------------------------------------------------------------


def quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bench_model(mname: str, rules: list[str], args, device) -> str:
    spec = MODELS[mname]
    repeats = args.repeats or spec.repeats
    warmup = spec.warmup if args.warmup is None else args.warmup
    inner = args.inner or spec.inner
    torch.manual_seed(0)
    base = spec.build()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((spec.batch, *spec.input_shape), generator=gen).to(device)
    t = torch.randint(0, 10, (spec.batch,), generator=gen).to(device)
    layers = layer_flops(base.to(device), x)
    names = ["bp"] + [r for r in rules if r != "bp"]
    runners = [make_runner(n, base, device, args.lr, args.lr_f, args.momentum, args.feedback,
                           x if args.compile else None)
               for n in names]
    load0 = os.getloadavg()[0]
    t_start = time.perf_counter()
    n = len(runners)
    for rnd in range(warmup + repeats):
        order = [runners[(rnd + i) % n] for i in range(n)]
        round_times = {}
        for r in order:
            round_times[r.name] = timed(r, x, t, inner, device)
        if rnd >= warmup:
            for r in runners:
                r.times.append(round_times[r.name])
        if args.verbose:
            print(f"  {mname} round {rnd + 1}/{warmup + repeats}: "
                  + " ".join(f"{k}={v * 1e3:.1f}" for k, v in round_times.items()),
                  file=sys.stderr)
    elapsed = time.perf_counter() - t_start
    load1 = os.getloadavg()[0]

    share = matmul_share(runners[0], x, t) if not args.no_share else float("nan")
    mem = {}
    if not args.no_memory:
        for r in runners:
            r.opt_w.zero_grad(set_to_none=True)
            if r.opt_f is not None:
                r.opt_f.zero_grad(set_to_none=True)
            peak = step_peak_bytes(r, x, t, device)
            mem[r.name] = static_bytes(r) + peak

    profiles = []
    wanted = names if args.profile == "all" else [r for r in args.profile.split(",") if r]
    for r in runners:
        if r.name in wanted:
            profiles.append(profile_table(r, x, t, inner, args.profile_rows))

    bp = runners[0]
    lines = [
        f"### {mname} (batch {spec.batch}, {sum(lf.macs for lf in layers) / spec.batch / 1e6:.3g} "
        f"MMAC forward per example, {len(layers)} linear/conv layers)",
        "",
        f"{repeats} timed rounds x {inner} step(s) per rule after {warmup} warm-up rounds, "
        f"{elapsed:.0f} s; load average {load0:.2f} before, {load1:.2f} after; "
        f"bp step median {statistics.median(bp.times) * 1e3:.3g} ms; "
        f"bp matmul/conv share of operator time s = {share:.2f}.",
        "",
        "| rule | step ms (median) | ratio to bp (median) | IQR of ratio | FLOP ideal | "
        "time-weighted ideal | target | meets | peak MiB | peak / bp |"
        + (" graph breaks |" if args.compile else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.compile else ""),
    ]
    for r in runners:
        rule = rule_of(r.name)
        ratios = [a / b for a, b in zip(r.times, bp.times, strict=True)]
        med = statistics.median(ratios)
        ideal = flop_ratio(rule, layers)
        tw = share * ideal + (1 - share)
        target, why = target_for(mname, rule.name, rule, ideal)
        ok = "-" if r.name == "bp" else ("yes" if med <= target else "**no**")
        m = mem.get(r.name)
        mcol = f"{m / 2**20:.1f}" if m is not None else "-"
        mrat = f"{m / mem['bp']:.2f}" if m is not None else "-"
        lines.append(
            f"| {r.name} | {statistics.median(r.times) * 1e3:.3g} | {med:.3f} | "
            f"{quantile(ratios, 0.25):.3f}-{quantile(ratios, 0.75):.3f} | {ideal:.3f} | {tw:.3f} | "
            f"{target:.3f} ({why}) | {ok} | {mcol} | {mrat} |"
            + (f" {r.graph_breaks} |" if args.compile else ""))
    bad = [r.name for r in runners if not torch.isfinite(torch.tensor(r.last_loss))]
    if bad:
        lines += ["", f"Warning: non-finite loss at the end for {', '.join(bad)}."]
    lines += profiles
    return "\n".join(lines)


def profile_table(runner: Runner, x, t, steps: int, rows: int) -> str:
    """torch.profiler's table of ops by self time, for ``steps`` steps of one rule."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    sync(x.device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            runner.step(x, t)
        sync(x.device)
    dt = (time.perf_counter() - t0) / steps
    key = "self_device_time_total" if x.is_cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    return (f"\n<details><summary>profile of {runner.name}: {steps} step(s), "
            f"{dt * 1e3:.1f} ms per step under the profiler</summary>\n\n```\n{table}\n```\n"
            "</details>")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="tiny,mlp,resnet18", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--rules", default=",".join(na.list_rules()),
                   help="comma list of rules (bp, the baseline, is always added; "
                        f"{FA_SHARED}: fa with F in W's memory, a diagnostic)")
    p.add_argument("--repeats", type=int, default=0,
                   help="timed rounds (0: per model, tiny 60, mlp 60, resnet18 15, vit 10)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed rounds first (default: per model, tiny 5, mlp 5, resnet18 2, vit 2)")
    p.add_argument("--inner", type=int, default=0,
                   help="steps per timed sample (0: per model, tiny 20, mlp 5, resnet18 1, vit 1)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--lr", type=float, default=1e-3, help="forward SGD learning rate")
    p.add_argument("--feedback", choices=("recipe", "sgd"), default="recipe",
                   help="how learned feedback weights move: the rules' recipe "
                        "(na.feedback_optimizer), or SGD on their gradient (--lr-f)")
    p.add_argument("--lr-f", type=float, default=1e-5,
                   help="with --feedback sgd: the feedback SGD learning rate (small: aa's sparse "
                        "term diverges on resnet18 at 1e-3, and NaNs would make the timing "
                        "meaningless)")
    p.add_argument("--momentum", type=float, default=0.0,
                   help="SGD momentum (both optimizers; 0 is plain SGD)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every model (inductor; the optimizer steps stay eager) "
                        "and report each one's graph breaks (torch._dynamo.explain)")
    p.add_argument("--fallback-random", action="store_true",
                   help="with --compile: torch._inductor.config.fallback_random = True, so the "
                        "compiled graphs draw random numbers with torch's own ops (on CPU, "
                        "inductor's draw makes wm's and ia's mirror noise slower than eager)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--no-share", action="store_true",
                   help="skip profiling bp's matmul share (time-weighted ideal shows nan)")
    p.add_argument("--profile", default="",
                   help="comma list of rules to profile after timing (torch.profiler table of "
                        "self CPU time per op, 'all' for every rule)")
    p.add_argument("--profile-rows", type=int, default=15, help="rows of each profile table")
    p.add_argument("--keep-heap", action="store_true",
                   help="re-run under glibc malloc settings that never return freed memory to the "
                        "OS (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_), so fresh weight-sized "
                        "temporaries cost no page faults")
    p.add_argument("-v", "--verbose", action="store_true", help="print every round to stderr")
    args = p.parse_args(argv)
    if args.keep_heap and any(os.environ.get(k) != v for k, v in KEEP_HEAP.items()):
        env = dict(os.environ, **KEEP_HEAP)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:  # every rule's layers recompile the same frames: room for all of them
        torch._dynamo.config.recompile_limit = 256
    if args.fallback_random:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
    device = torch.device(args.device)
    models = [m for m in args.models.split(",") if m]
    rules = [r for r in args.rules.split(",") if r]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; valid: {', '.join(MODELS)}")
    for r in rules:
        rule_of(r)  # raises with the valid names

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu}, {os.cpu_count()} logical cores"
    print(f"## Step time per rule, ratio to backprop\n\n"
          f"torch {torch.__version__}, {dev}, {torch.get_num_threads()} torch threads, "
          f"device {device}; SGD lr {args.lr}, momentum {args.momentum}; feedback: "
          f"{'the recipe' if args.feedback == 'recipe' else f'SGD lr {args.lr_f}'}; "
          f"glibc heap {'kept (--keep-heap)' if args.keep_heap else 'default'}.\n"
          f"Command: `python {' '.join(sys.argv)}`\n", flush=True)
    for m in models:
        print(bench_model(m, rules, args, device), flush=True)
        print(flush=True)
    print("FLOP ideal: sum over layers of (matmul units x forward MACs), rule / bp, counting the "
          "first layer's skipped input gradient; non-matmul work is outside it. Time-weighted "
          "ideal: s x FLOP ideal + (1 - s). Targets (issue 13): fa, usf, frsf <= 1.03 (tiny MLP "
          "1.15); brsf <= 1.10; sa, kp <= 1.05 (issue 9); dfa <= 0.85 on resnet18; other rules "
          "(aa, wm, ia, dfa elsewhere) <= FLOP ideal x 1.05. Peak: parameters + buffers + "
          "optimizer state + the step's peak allocation (torch allocator).")


if __name__ == "__main__":
    main()
