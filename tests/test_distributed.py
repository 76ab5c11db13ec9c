"""Distributed training (DDP, gloo, 2 CPU processes): identical W and F on every rank, the
single-process result for the rules without mirror noise, resume under torchrun, and a failing
rank that ends the job instead of hanging.

The worker processes are started with torchrun's environment on a free local port
(``tests/_dist_worker.py``); the resume test goes through ``neuralign train --nproc 2``, i.e.
``torch.distributed.run``. One 2-process job trains every rule (module fixture)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neuralign.train import Trainer, load_checkpoint, load_config
from neuralign.train.distributed import strip_option
from runs import ACCUMULATE, DIST, accumulate, rule_args, tiny

RULES = ("fa", "kp", "sa", "aa", "ia", "aa+joint")
NO_MIRROR_NOISE = ("fa", "kp", "sa", "aa", "aa+joint")
WORKER = Path(__file__).parent / "_dist_worker.py"
pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available"),
              pytest.mark.slow]


@pytest.fixture(autouse=True)
def _one_thread():
    """The single-process references: one torch thread is fastest on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ, NEURALIGN_CACHE=str(root / "cache"), OMP_NUM_THREADS="1",
               NEURALIGN_DIST_TIMEOUT="60")
    src = str(Path(__file__).parent.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def spawn(mode: str, root: Path, *rules: str, n: int = 2, timeout: float = 120
          ) -> list[subprocess.CompletedProcess]:
    """``n`` worker processes with torchrun's environment; waits for all of them."""
    port = _free_port()
    procs = []
    for r in range(n):
        env = _env(root) | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
                            "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), mode, str(root), *rules],
                                      env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    out = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.fixture(scope="module")
def dist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    for _ in range(3):  # a free port can be taken before the workers bind it: take another
        res = spawn("train", root, *RULES)
        if not any(r.returncode and "DistNetworkError" in r.stdout for r in res):
            break
    for r in res:
        assert r.returncode == 0, r.stdout[-3000:]
    return root


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("rule", RULES)
def test_ranks_hold_identical_weights_and_feedback(dist_root, rule):
    s0, s1 = (_state(dist_root / f"{rule}-rank{r}.pt") for r in (0, 1))
    assert s0.keys() == s1.keys()
    assert any(k.endswith("feedback") for k in s0)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k


@pytest.mark.parametrize("rule", NO_MIRROR_NOISE)
def test_two_processes_equal_one_with_the_same_global_batch(dist_root, tmp_path, rule,
                                                            monkeypatch):
    monkeypatch.setenv("NEURALIGN_CACHE", str(dist_root / "cache"))
    single = Trainer(load_config(None, tiny(tmp_path, *DIST, *rule_args(rule),
                                            "train.name=one")))
    hist = single.fit()
    dist = _state(dist_root / f"{rule}-rank0.pt")
    ref = single.model.state_dict()
    assert dist.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(dist[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    # metrics are over the whole data (reduced across ranks), as in the single process
    ckpt = load_checkpoint(dist_root / "runs" / rule / "checkpoints" / "last.pt")
    for a, b in zip(ckpt["history"], hist, strict=True):
        for key in ("train_loss", "train_top1", "test_loss", "test_top1", "weight_angle"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key


def _spawn_ok(mode: str, root: Path, *rules: str) -> None:
    for _ in range(3):  # (a free port can be taken before the workers bind it)
        res = spawn(mode, root, *rules, timeout=300)
        if not any(r.returncode and "DistNetworkError" in r.stdout for r in res):
            break
    for r in res:
        assert r.returncode == 0, r.stdout[-3000:]


@pytest.mark.parametrize("rule", ["aa", "ia", "brsf"])
def test_compiled_training_under_ddp_equals_eager(dist_root, tmp_path, rule):
    """train.compile under DDP: compiled with aot_eager (eager's arithmetic, traced), each
    rank ends where the eager job's ranks did, exactly. aa's and ia's curvature estimates
    all-reduce inside the compiled backward; ia and brsf draw by the same ops, in the
    backward (ia's noise drawn in the forward, as the partitioner once placed it, gave
    other weights)."""
    root = dist_root
    if rule not in RULES:  # (brsf's F differs across ranks: not in the module's job)
        root = tmp_path
        _spawn_ok("train", root, rule)
    _spawn_ok("compiled", root, rule)
    for rank in (0, 1):
        got = _state(root / f"{rule}-compiled-rank{rank}.pt")
        want = _state(root / f"{rule}-rank{rank}.pt")
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_mirror_noise_is_independent_per_rank(dist_root, tmp_path, monkeypatch):
    """ia's mirror noise differs between ranks, so its result is not the single process's
    (while W and F still agree across ranks, see above)."""
    monkeypatch.setenv("NEURALIGN_CACHE", str(dist_root / "cache"))
    single = Trainer(load_config(None, tiny(tmp_path, *DIST, "rule.name=ia", "train.name=one",
                                            "train.epochs=1")))
    single.fit()
    dist = _state(dist_root / "ia-rank0.pt")
    assert any(not torch.allclose(dist[k], v) for k, v in single.model.state_dict().items()
               if k.endswith("feedback"))


def test_only_rank_0_writes_and_the_checkpoint_holds_every_rank(dist_root):
    run = dist_root / "runs" / "ia"
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "config.yaml",
                                                     "metrics.csv"]
    # rank 0 alone held the run folder's lock
    assert [(dist_root / f"ia-lock-rank{r}.txt").read_text() for r in (0, 1)] == ["1", "0"]
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    ranks = ckpt["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


def test_resume_under_torchrun_continues_where_it_stopped(dist_root):
    """The ia run cut after epoch 1, resumed by ``neuralign train --nproc 2 --resume``, ends
    with exactly the weights of the uninterrupted 2-process run (every rank's RNG restored)."""
    cmd = [sys.executable, "-m", "neuralign", "train", "--nproc", "2", "--resume", "ia-cut",
           "--runs-dir", str(dist_root / "runs"), "train.epochs=2"]
    res = subprocess.run(cmd, env=_env(dist_root), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stderr and "epoch 2/2" in res.stderr
    resumed = load_checkpoint(dist_root / "runs" / "ia-cut" / "checkpoints" / "last.pt")
    assert resumed["epoch"] == 2 and len(resumed["history"]) == 2
    full = _state(dist_root / "ia-rank0.pt")
    for k, v in full.items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=0, msg=k)


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    t0 = time.monotonic()
    res = spawn("fail", tmp_path, timeout=100)
    assert time.monotonic() - t0 < 90
    assert res[1].returncode != 0 and "boom on rank 1" in res[1].stdout
    assert res[0].returncode != 0  # rank 0 did not wait forever for rank 1


def test_nproc_is_stripped_before_relaunch():
    argv = ["train", "--nproc", "2", "optim.lr=0.1", "--nproc=4", "--name", "x"]
    assert strip_option(argv, "--nproc") == ["train", "optim.lr=0.1", "--name", "x"]


def test_search_runs_each_trial_on_every_rank(tmp_path):
    """``search --nproc 2``: rank 0 drives the study, both ranks train every trial."""
    base = tmp_path / "base.yaml"
    base.write_text("data: {num_samples: 200, batch_size: 40, val_split: 0.2}\n"
                    "model: {name: mlp, widths: [8]}\nrule: {name: aa}\n"
                    "train: {epochs: 1, angle_every: 0}\n")
    space = tmp_path / "space.yaml"
    space.write_text("rule.terms.amp: {type: log_float, low: 0.1, high: 10.0}\n")
    cmd = [sys.executable, "-m", "neuralign", "search", "--nproc", "2", "-c", str(base), "-s",
           str(space), "--trials", "2", "--out", str(tmp_path / "out")]
    res = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=180,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("study space: 2 trials (2 ok)") == 1  # printed by rank 0 only
    assert (tmp_path / "out" / "best.yaml").is_file()


def test_accumulated_micro_batches_under_ddp_step_as_the_single_process_batch(tmp_path):
    """Two processes, each accumulating two micro-batches of its share (``no_sync`` on the
    first), take the step of one process on the global batch: F's activity sums are averaged
    by DDP, the curvature products in the backward, and DDP's buffer broadcast at each
    forward finds the same sums on every rank."""
    _spawn_ok("accumulate", tmp_path, *ACCUMULATE)
    for rule in ACCUMULATE:
        want = accumulate(rule)
        for rank in (0, 1):
            got = _state(tmp_path / f"{rule}-accumulate-rank{rank}.pt")
            assert got.keys() == want.keys()
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12,
                                           msg=f"{rule} {k}")


@pytest.mark.parametrize("kind", ["tensor", "dataloader"])
def test_sharded_batches_make_up_the_single_process_batch(kind):
    """Rank r's k-th batch (of B/R examples) and the other ranks' are together the single
    process's k-th batch (of B) — for in-memory tensors and for DataLoader datasets."""
    from torch.utils.data import TensorDataset

    from neuralign.data import EpochLoader, TensorLoader

    x, y = torch.arange(96.0)[:, None], torch.arange(96)

    def make():
        if kind == "tensor":
            return TensorLoader(x, y, 16, shuffle=True, seed=3)
        return EpochLoader(TensorDataset(x, y), 16, shuffle=True, workers=0, seed=3)

    single, shards = make(), [make().shard(r, 2) for r in range(2)]
    for epoch in (1, 2):
        for loader in (single, *shards):
            loader.set_epoch(epoch)
        assert len(single) == len(shards[0]) == len(shards[1]) == 6
        for full, a, b in zip(single, *shards, strict=True):
            assert len(a[1]) == len(b[1]) == 8
            assert sorted(torch.cat([a[1], b[1]]).tolist()) == sorted(full[1].tolist())
    test = TensorLoader(x[:9], y[:9], 4, shuffle=False).shard(1, 2)  # evaluation: unpadded
    assert torch.cat([b[1] for b in test]).tolist() == [1, 3, 5, 7]
