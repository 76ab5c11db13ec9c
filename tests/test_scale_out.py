"""Scale-out on the real engines (issue 31): one search study shared by four worker processes
on SQLite and on a PostgreSQL server, a worker killed with SIGKILL mid-trial and started
again; and ``neuralign train`` under two torchrun agents (``--nnodes=2``, c10d rendezvous on
127.0.0.1), once straight through and once with a worker killed mid-epoch and the job
restarted by torchrun (``--max-restarts=1``).

PostgreSQL: the tests use the server at ``NEURALIGN_TEST_POSTGRES`` (a SQLAlchemy URL;
``eval "$(.ci/postgres start)"`` starts a throwaway one and sets it). Without a reachable
server they skip, saying why; with ``NEURALIGN_REQUIRE_POSTGRES=1`` (set by ``.ci/run``) they
fail instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml

import runs
from neuralign.train import Callback, Trainer, load_checkpoint, load_config
from neuralign.train.callbacks import read_csv
from runs import kill_mid_trial

SRC = Path(__file__).parent.parent / "src"
SPACE = {"rule.terms.amp": {"type": "log_float", "low": 0.01, "high": 10.0},
         "rule.noise_std": {"type": "float", "low": 0.2, "high": 2.0}}
#: A trial of about a second with four workers on two cores: 4 epochs of 40 steps (the kill
#: comes after a trial's first epoch, while it trains its next ones).
BASE = {"data": {"num_samples": 1000, "batch_size": 20, "val_split": 0.2},
        "model": {"name": "mlp", "widths": [32]}, "rule": {"name": "wm"},
        "train": {"epochs": 4, "angle_every": 0}}


def _env() -> dict[str, str]:
    """The subprocesses' environment: this checkout's package, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """``NEURALIGN_TEST_POSTGRES`` when a server answers there; otherwise a skip (a failure
    under ``NEURALIGN_REQUIRE_POSTGRES=1``) that says why."""
    import sqlalchemy

    url = os.environ.get("NEURALIGN_TEST_POSTGRES")
    reason = None
    if not url:
        reason = ("no PostgreSQL server: NEURALIGN_TEST_POSTGRES is not set (start a throwaway "
                  "one with: eval \"$(.ci/postgres start)\")")
    else:
        try:
            engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5})
            with engine.connect():
                pass
            engine.dispose()
        except ImportError as e:
            reason = f"no driver for {url} ({e}): pip install -e '.[postgres]'"
        except sqlalchemy.exc.OperationalError as e:
            reason = f"no PostgreSQL server answers at {url}: {str(e.orig).strip()}"
    if reason is not None:
        if os.environ.get("NEURALIGN_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"NEURALIGN_REQUIRE_POSTGRES=1, but {reason}")
        pytest.skip(reason)
    return url


# -- one study, many workers ---------------------------------------------------------------------


def _search(root: Path, storage: str, study: str, trials: int) -> subprocess.Popen:
    """A worker: ``neuralign search`` on the shared study, in the background (one process:
    the command trains its trials itself)."""
    cmd = [sys.executable, "-m", "neuralign", "search", "-c", str(root / "base.yaml"), "-s",
           str(root / "space.yaml"), "--trials", str(trials), "--study", study,
           "--storage", storage, "--out", str(root / "out"), "--pruner", "none",
           "--threads", "1", "-q"]
    return subprocess.Popen(cmd, env=_env(), cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, timeout: float = 300, status: int = 0) -> None:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == status, err[-3000:]


def _snapshot(root: Path, storage: str, study: str) -> SimpleNamespace:
    """The study's trials and the search's outputs as they are now."""
    out = root / "out"
    return SimpleNamespace(
        trials=optuna.load_study(study_name=study, storage=storage).get_trials(),
        rows=read_csv(out / "trials.csv"),
        best=yaml.safe_load((out / "best.yaml").read_text()),
        best_trial=yaml.safe_load((out / "best_trial.yaml").read_text())["search"])


def _kill_a_worker_mid_trial(root: Path, storage: str, study: str) -> tuple[int, int]:
    """SIGKILL the worker process of a running trial after its first epoch (frozen first, so
    that the trial cannot end in between: :func:`runs.kill_mid_trial`). Returns (trial number,
    pid)."""
    # one storage for every look: loading the study afresh builds an engine and checks the
    # schema each time (tenths of a second on PostgreSQL), long enough for the two workers'
    # four trials to end between looks on an idle machine; the study reads running trials
    # from the database at each call
    shared = optuna.load_study(study_name=study, storage=storage)
    t = kill_mid_trial(shared.get_trials, root / "out")
    return t.number, int(t.user_attrs["pid"])


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shared_study(request, tmp_path_factory) -> SimpleNamespace:
    """Four workers (four ``search`` commands started together) fill a study of 8 trials;
    then two take it to 12, and one of them is killed mid-trial; started again, it finishes
    the study. Snapshots after each stage."""
    engine = request.param
    root = tmp_path_factory.mktemp(f"study-{engine}")
    study = f"shared-{uuid.uuid4().hex[:8]}"  # (a developer's server keeps its studies)
    storage = (request.getfixturevalue("postgres_url") if engine == "postgresql"
               else f"sqlite:///{root / 'out' / 'study.db'}")
    (root / "base.yaml").write_text(yaml.safe_dump(
        BASE | {"train": BASE["train"] | {"runs_dir": str(root / "runs")}}))
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    t0 = time.monotonic()
    (root / "out").mkdir()
    # the study's tables first (two programs making them at the same moment is another
    # matter), then the workers at once, as on four machines
    optuna.create_study(study_name=study, storage=storage, direction="maximize")
    for p in [_search(root, storage, study, 8) for _ in range(4)]:
        _finish(p)
    four_workers = _snapshot(root, storage, study)
    t1 = time.monotonic()
    workers = [_search(root, storage, study, 12) for _ in range(2)]
    killed, pid = _kill_a_worker_mid_trial(root, storage, study)
    victim = next(p for p in workers if p.pid == pid)
    _finish(victim, status=-signal.SIGKILL)
    _finish(next(p for p in workers if p is not victim))  # it goes on to the end
    after_kill = _snapshot(root, storage, study)
    t2 = time.monotonic()
    _finish(_search(root, storage, study, 12))  # started again: the killed trial is retried
    final = _snapshot(root, storage, study)
    return SimpleNamespace(engine=engine, root=root, four_workers=four_workers,
                           after_kill=after_kill, final=final, killed=killed, pid=pid,
                           seconds=(t1 - t0, t2 - t1, time.monotonic() - t2))


def _counting(trials) -> list:
    """The trials that count towards the target: the search's own rule (search._counts)."""
    from neuralign.experiments.search import _counts

    return [t for t in trials if _counts(t)]


def _check_outputs(snap: SimpleNamespace) -> None:
    """trials.csv has one row per trial of the study, with its state and values; best.yaml
    holds the best complete trial's values."""
    assert [(int(r["number"]), r["state"]) for r in snap.rows] == [
        (t.number, t.state.name) for t in snap.trials]
    for r, t in zip(snap.rows, snap.trials, strict=True):
        for k, v in t.params.items():
            assert float(r[k]) == pytest.approx(v, rel=1e-5)  # (CSV: 6 digits)
    complete = [t for t in snap.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert snap.best_trial["trial"] == best.number and snap.best_trial["val_top1"] == best.value
    assert snap.best_trial["params"] == best.params
    assert snap.best["rule"]["terms"]["amp"] == best.params["rule.terms.amp"]
    assert snap.best["rule"]["noise_std"] == best.params["rule.noise_std"]


def test_a_trial_started_past_the_budget_does_not_count():
    """The check at the start of each trial: the trials numbered before it that count, and
    the queued ones (retries), against the target; a surplus or interrupted trial counts
    not."""
    from neuralign.experiments.search import _counts, _over_budget

    st = optuna.create_study(direction="maximize")
    for _ in range(2):
        st.tell(st.ask(), 1.0)
    st.enqueue_trial({"x": 0.5})  # trial 2 waits for a worker
    assert _over_budget(st, 3, target=3) and not _over_budget(st, 3, target=4)
    assert not _over_budget(st, 2, target=3)  # the queued one itself may run
    killed = st.ask()  # (pops trial 2)
    st.tell(killed, state=optuna.trial.TrialState.FAIL)  # no status: interrupted
    surplus = st.ask()
    surplus.set_user_attr("status", "surplus")
    st.tell(surplus, state=optuna.trial.TrialState.FAIL)
    assert [_counts(t) for t in st.trials] == [True, True, False, False]
    assert not _over_budget(st, 4, target=3)


@pytest.mark.slow
def test_four_workers_fill_the_budget_exactly(shared_study):
    """8 trials that count, all complete, shared by the workers; nothing left running or
    queued; a trial started after the others took the last ones (if any) stopped at once,
    without values."""
    snap = shared_study.four_workers
    counting = _counting(snap.trials)
    assert len(counting) == 8
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in counting)
    others = [t for t in snap.trials if t not in counting]
    assert all(t.user_attrs.get("status") == "surplus" and not t.params for t in others)
    assert len({t.user_attrs["pid"] for t in counting}) >= 2  # the work was shared
    _check_outputs(snap)
    a, b, c = shared_study.seconds
    print(f"\n{shared_study.engine}: four workers {a:.1f} s, the kill {b:.1f} s, the restart "
          f"{c:.1f} s")


@pytest.mark.slow
def test_workers_draw_distinct_values(shared_study):
    """No two trials of the study (retries excepted) try the same point."""
    points = [tuple(sorted(t.params.items())) for t in shared_study.final.trials
              if t.params and "retry_of" not in t.user_attrs]
    assert len(set(points)) == len(points)


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_retried(shared_study):
    """kill -9 of a worker mid-trial, then its command again: the killed trial is marked
    interrupted, its values run once more (once), and the study ends with exactly 12 trials
    that count: none lost, none counted twice."""
    killed = shared_study.killed
    snap = shared_study.after_kill  # the other worker has finished the study
    trial = snap.trials[killed]
    assert trial.state == optuna.trial.TrialState.RUNNING  # what a dead worker leaves behind
    assert trial.user_attrs["pid"] == shared_study.pid
    assert len(_counting(snap.trials)) == 12  # it counts while it looks alive

    final = shared_study.final
    trial = final.trials[killed]
    assert trial.state == optuna.trial.TrialState.FAIL
    assert final.rows[killed]["status"] == "interrupted"
    retries = [t for t in final.trials if t.user_attrs.get("retry_of") == killed]
    assert len(retries) == 1 and retries[0].params == trial.params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    counting = _counting(final.trials)
    assert len(counting) == 12
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in counting)
    # the same trials as before the restart, the retry in the killed one's place
    before = {t.number for t in _counting(snap.trials)}
    assert {t.number for t in counting} == before - {killed} | {retries[0].number}
    _check_outputs(final)


# -- restarts: the trainer's side ----------------------------------------------------------------


class _Die(Callback):
    """Ends the process's training in the middle of epoch ``epoch`` (as a killed process)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_step_end(self, trainer, step, loss):
        if trainer.epoch == self.epoch - 1 and step == trainer.epoch * 6 + 3:  # (6 steps/epoch)
            raise KeyboardInterrupt


@pytest.mark.parametrize("killed_in", [1, 2])
def test_a_restarted_job_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, one_thread,
                                                          killed_in):
    """What torchrun's restart looks like to the trainer: the same command in new processes,
    ``TORCHELASTIC_RESTART_COUNT`` > 0. It continues from the run folder's last checkpoint
    (the one written before the first epoch when the kill came in epoch 1) and ends with
    the uninterrupted run's weights, exactly (ia: mirror noise, so the random state too)."""
    args = runs.tiny(tmp_path, "train.epochs=3", "rule.name=ia", "train.angle_every=0")
    full = Trainer(load_config(None, [*args, "train.name=full"]))
    full.fit()
    cfg = load_config(None, [*args, "train.name=job"])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, callbacks=[_Die(killed_in)]).fit()
    checkpoint = tmp_path / "runs" / "job" / "checkpoints" / "last.pt"
    assert load_checkpoint(checkpoint)["epoch"] == killed_in - 1
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = Trainer(cfg)
    history = again.fit()
    assert [h["epoch"] for h in history] == [1, 2, 3]
    want = full.model.state_dict()
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_a_restart_does_not_resume_another_job_s_run(tmp_path, monkeypatch, one_thread):
    """A checkpoint written by another torchrun job (another --rdzv-id) is not this job's to
    continue: the run folder is taken, as without restarts."""
    cfg = load_config(None, runs.tiny(tmp_path, "train.epochs=1", "train.name=taken"))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "old-job")
    Trainer(cfg).fit()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "new-job")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(FileExistsError, match="already exists"):
        Trainer(cfg).fit()


# -- two torchrun agents on one machine ----------------------------------------------------------

#: The run of both launches: MNIST-1D, 1600 training examples in global batches of 40 (40 steps
#: an epoch, about half a second with two CPU processes), 4 epochs, rule aa (W and F learned;
#: no random draws in the step, so the single process's result is reachable).
TRAIN = ["data.num_samples=2000", "data.batch_size=40", "train.epochs=4", "rule.name=aa",
         "train.progress=false", "train.tensorboard=false", "train.plots=false",
         "train.angle_every=0", "train.name=mn"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agents(root: Path, job: str, runs_dirs: tuple[Path, Path], max_restarts: int = 0
            ) -> list[subprocess.Popen]:
    """Two torchrun agents as on two machines (``--nnodes=2 --nproc_per_node=1``, c10d
    rendezvous on 127.0.0.1, job id ``job``), each training with its own ``train.runs_dir``;
    their output goes to ``root/JOB-agentN.log``."""
    port = _free_port()
    # (torch's shared rendezvous store keeps the previous processes' addresses across a
    # restart, docs/distributed.md: the setting a restartable job needs)
    env = _env() | {"NEURALIGN_DIST_TIMEOUT": "60", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    procs = []
    for node, runs_dir in enumerate(runs_dirs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc_per_node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={job}",
               f"--max-restarts={max_restarts}", "-m", "neuralign", "train", *TRAIN,
               f"train.runs_dir={runs_dir}"]
        with open(root / f"{job}-agent{node}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, env=env, cwd=root, stdout=log,
                                          stderr=subprocess.STDOUT))
    return procs


def _wait(root: Path, job: str, procs: list[subprocess.Popen], timeout: float = 300) -> str:
    """Both agents' exit (status 0 asserted); returns their output."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join((root / f"{job}-agent{n}.log").read_text() for n in range(len(procs)))
    assert all(p.returncode == 0 for p in procs), logs[-5000:]
    return logs


def _worker_of(agent: subprocess.Popen) -> int:
    """The pid of the training process that torchrun agent ``agent`` started (its child)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):  # (a process that ended meanwhile)
            continue
        if ppid == agent.pid and b"neuralign" in cmdline:
            return int(stat.parent.name)
    raise AssertionError(f"torchrun agent {agent.pid} has no training process")


def _epoch_of(checkpoint: Path) -> int:
    """The epoch of the checkpoint at ``checkpoint`` (-1 while there is none)."""
    return load_checkpoint(checkpoint)["epoch"] if checkpoint.is_file() else -1


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> SimpleNamespace:
    """Job ``straight``: two agents, each with a run folder root of its own, as two machines
    without a shared disk. Job ``restart``: the same with ``--max-restarts=1`` and one shared
    runs folder; the training process of the first agent is killed (SIGKILL) in the middle
    of an epoch after the checkpoint of epoch 1, and torchrun restarts both."""
    if sys.platform != "linux":
        pytest.skip("finds the agents' training processes in /proc")
    root = tmp_path_factory.mktemp("two-nodes")
    t0 = time.monotonic()
    straight = _wait(root, "straight", _agents(root, "straight",
                                               (root / "node0", root / "node1")))
    t1 = time.monotonic()
    shared = root / "shared"
    procs = _agents(root, "restart", (shared, shared), max_restarts=1)
    checkpoint = shared / "mn" / "checkpoints" / "last.pt"
    t_end = time.monotonic() + 240
    while _epoch_of(checkpoint) < 1:
        assert time.monotonic() < t_end and all(p.poll() is None for p in procs), \
            "no checkpoint of epoch 1"
        time.sleep(0.02)
    time.sleep(0.15)  # (into the next epoch: about a third of it)
    victim = _worker_of(procs[0])
    os.kill(victim, signal.SIGKILL)
    restarted = _wait(root, "restart", procs)
    return SimpleNamespace(root=root, straight=straight, restarted=restarted, victim=victim,
                           seconds=(t1 - t0, time.monotonic() - t1))


@pytest.mark.slow
def test_two_agents_train_as_one_process_on_the_global_batch(two_nodes, tmp_path, one_thread):
    """``torchrun --nnodes=2`` twice on one machine: rank 0 alone writes a run folder (under
    its own agent's runs folder), and the final W and F equal a single process's on the same
    global batches, to float rounding."""
    root = two_nodes.root
    folders = [p for p in (root / "node0" / "mn", root / "node1" / "mn") if p.exists()]
    assert len(folders) == 1  # rank 0's node (c10d gives the ranks in the order of arrival)
    assert sorted(p.name for p in folders[0].iterdir()) == [".lock", "checkpoints",
                                                             "config.yaml", "metrics.csv"]
    ckpt = load_checkpoint(folders[0] / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 4 and len(ckpt["rng_ranks"]) == 2
    single = Trainer(load_config(None, [*TRAIN, f"train.runs_dir={tmp_path}"]))
    single.fit()
    ref = single.model.state_dict()
    assert ckpt["model"].keys() == ref.keys()
    assert any(k.endswith("feedback") for k in ref)  # F is compared too
    for k in ref:
        torch.testing.assert_close(ckpt["model"][k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    print(f"\ntwo agents: {two_nodes.seconds[0]:.1f} s straight, {two_nodes.seconds[1]:.1f} s "
          f"with the restart")


@pytest.mark.slow
def test_an_elastic_restart_resumes_from_the_last_checkpoint(two_nodes):
    """``--max-restarts=1``, a training process killed mid-epoch: torchrun restarts both
    processes, they resume from the last checkpoint (epoch 1 or later), and the run ends with
    exactly the weights of the uninterrupted job."""
    import re

    logs = two_nodes.restarted
    resumed = [int(e) for e in re.findall(r"torchrun restarted the job: resuming \S+ after epoch (\d+)",
                                          logs)]
    assert resumed and 1 <= resumed[0] < 4, logs[-5000:]
    run = two_nodes.root / "shared" / "mn"
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 4 and len(ckpt["history"]) == 4
    assert [int(r["epoch"]) for r in read_csv(run / "metrics.csv")] == [1, 2, 3, 4]
    straight = next(p for p in (two_nodes.root / "node0", two_nodes.root / "node1")
                    if (p / "mn").exists())
    want = load_checkpoint(straight / "mn" / "checkpoints" / "last.pt")["model"]
    assert ckpt["model"].keys() == want.keys()
    for k in want:
        assert torch.equal(ckpt["model"][k], want[k]), k
