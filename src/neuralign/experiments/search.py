"""Metaparameter search with Optuna: seeded TPE, median pruning on validation top-1 per epoch.

``search`` trains the base config once per trial with the trial's values set (a space over any
config key, see :mod:`.space`), on a validation split of the training set: the objective is the
validation top-1 at the last epoch, the pruner sees it after every epoch, and the test set is
never looked at. The study lives in a database (SQLite file by default; any SQLAlchemy URL,
e.g. PostgreSQL, for many machines), so

- a restart with the same command resumes the study: ``trials`` is the number of finished
  trials the study should hold, and only the remainder runs;
- a trial whose process died (killed, or Ctrl-C) is marked failed (status ``interrupted`` in
  ``trials.csv``), does not count, and its values are tried again;
- several workers (``jobs`` processes here, or more commands on other machines) share a study,
  and sample differently by themselves: each trial's sampler is seeded by ``seed`` and the
  trial's number, which the study gives out once (:func:`trial_seed`); and the study ends
  with exactly ``trials`` that count: a trial that a worker starts when the others have taken
  the last ones stops at once (failed, status ``surplus``; it does not count).

A trial that diverges or fails is stored as Optuna's FAIL state with user attributes ``status``
(``diverged`` / ``error``) and ``reason``; the study goes on.

Outputs in ``out``: ``best.yaml`` (the base config with the best trial's values: the input of
``neuralign transfer``), ``trials.csv``, ``history.png``, ``importances.png``, ``curves.png``
(validation top-1 per epoch of every trial), ``space.yaml`` and ``base.yaml``; all written
atomically. ``out`` belongs to one study (``study.yaml`` names it): a search of another study
there is refused before it starts, so that it cannot overwrite the first one's outputs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import socket
import warnings
from pathlib import Path

import yaml

from ..io import write_text, write_yaml
from ..train import distributed
from ..train.config import Config, ConfigError, config_from_dict, config_to_dict
from ..train.trainer import Callback, DivergenceError, Trainer
from .search_outputs import SearchResult, interrupted, study_summary, write_outputs
from .space import SearchSpace, apply_params, parse_space

log = logging.getLogger(__name__)

__all__ = ["search", "SearchResult", "default_storage", "study_summary", "trial_seed"]

#: The validation split a search uses when the base config has none.
DEFAULT_VAL_SPLIT = 0.1
#: Consecutive non-divergence errors after which a worker gives up (a broken setup, not a
#: bad point of the space).
MAX_CONSECUTIVE_ERRORS = 3


class _Pruning(Callback):
    """Report validation top-1 after every epoch; stop the run when the pruner says so."""

    def __init__(self, trial):
        self.trial = trial
        self.pruned_at: int | None = None

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        value = metrics.get("val_top1", math.nan)
        self.trial.set_user_attr("epochs", epoch)
        if not math.isfinite(value):
            return
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            trainer.should_stop = True


def default_storage(out: str | Path) -> str:
    """``sqlite:///OUT/study.db``."""
    return f"sqlite:///{Path(out).resolve() / 'study.db'}"


def _storage(url: str):
    import time
    import warnings

    import optuna
    import sqlalchemy

    if url.startswith(("sqlite", "postgresql", "mysql", "oracle", "mssql")):
        from optuna.storages import RDBStorage

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeats are "experimental" in Optuna 5
            from optuna.storages import RetryHeartbeatStaleTrialCallback

            for attempt in range(10):
                try:
                    # heartbeats let any worker fail (and retry once) a trial whose machine
                    # went away
                    return RDBStorage(url, heartbeat_interval=60, grace_period=180,
                                      heartbeat_stale_trial_callback=(
                                          RetryHeartbeatStaleTrialCallback(max_retry=1)),
                                      engine_kwargs={"connect_args": {"timeout": 60}}
                                      if url.startswith("sqlite") else {})
                except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
                    # workers started together on a new database: one of them makes its
                    # tables, and the others, having looked a moment before, clash with it
                    if attempt == 9:
                        raise
                    time.sleep(0.2 * (attempt + 1))
    return optuna.storages.get_storage(url)


def _make_study(study: str, storage: str, seed: int, pruner):
    import optuna

    st = _storage(storage)
    probe = optuna.create_study(study_name=study, storage=st, direction="maximize",
                                load_if_exists=True)
    return optuna.load_study(study_name=study, storage=st, sampler=_sampler(seed, _startup(probe)),
                             pruner=pruner)


def trial_seed(seed: int, number: int) -> int:
    """The TPE sampler's seed for trial ``number`` of a search seeded ``seed``."""
    digest = hashlib.sha256(f"{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _sampler(seed: int, n_startup_trials: int):
    """Optuna's TPE sampler (``constant_liar`` for concurrent workers), with a random state of
    its own for each trial, seeded by :func:`trial_seed` of the trial's number.

    The study gives each trial number out once, whichever worker asks, so workers on one or
    many machines sample differently without choosing seeds, a restarted worker does not
    repeat its first proposals, and a search with one worker proposes the same values for the
    same seed and history."""
    import optuna

    def tpe(number: int) -> optuna.samplers.TPESampler:
        return optuna.samplers.TPESampler(seed=trial_seed(seed, number), constant_liar=True,
                                          n_startup_trials=n_startup_trials)

    class PerTrialSeed(optuna.samplers.BaseSampler):
        def __init__(self):
            self.tpe = tpe(0)

        def before_trial(self, study, trial):
            self.tpe = tpe(trial.number)
            self.tpe.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.tpe.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.tpe.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.tpe.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.tpe.after_trial(study, trial, state, values)

    return PerTrialSeed()


def _startup(study) -> int:
    return int(study.user_attrs.get("n_startup_trials", 5))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_stale(study) -> None:
    """Fail RUNNING trials of dead processes on this host at once (other hosts' are failed by
    the heartbeat, after its grace period), and queue the values of every interrupted trial
    again, once. Optuna's public API only."""
    from optuna.storages import RetryFailedTrialCallback
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or _alive(int(pid)):
            continue
        study.tell(t.number, state=TrialState.FAIL)
        log.warning("trial %d: its process %s is gone; marked failed (interrupted)", t.number,
                    pid)
    trials = study.get_trials(deepcopy=False)
    with warnings.catch_warnings():  # ("experimental" in Optuna 4-5)
        warnings.simplefilter("ignore")
        retried = {t.user_attrs.get("retry_of") for t in trials} | {
            RetryFailedTrialCallback.retried_trial_number(t) for t in trials}
    for t in trials:
        if interrupted(t) and t.number not in retried and t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number},
                                skip_if_exists=False)
            log.info("trial %d was interrupted: its values are queued again", t.number)


def _counts(t) -> bool:
    """Whether a trial counts towards the target: finished (interrupted and surplus ones
    excepted) or running."""
    from optuna.trial import TrialState

    if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return (t.state == TrialState.FAIL and not interrupted(t)
            and t.user_attrs.get("status") != "surplus")


def _counted(study) -> int:
    """Trials that count towards the target."""
    return sum(_counts(t) for t in study.get_trials(deepcopy=False))


def _over_budget(study, number: int, target: int) -> bool:
    """Whether ``target`` trials numbered before trial ``number`` count or wait to run (a
    queued retry). Workers that see one trial missing may all start one; the study gives
    each trial number out once, so this check at the start of each trial lets exactly the
    missing ones run, whichever worker asks."""
    from optuna.trial import TrialState

    before = (t for t in study.get_trials(deepcopy=False) if t.number < number)
    return sum(t.state == TrialState.WAITING or _counts(t) for t in before) >= target


class _Surplus(Exception):
    """A trial started after the study held its target (recorded as failed, status
    ``surplus``; it does not count and is not retried)."""


def _objective(base: Config, space: SearchSpace, root: Path, data, target: int):
    import optuna

    def objective(trial: optuna.Trial) -> float:
        if _over_budget(trial.study, trial.number, target):
            trial.set_user_attr("status", "surplus")
            trial.set_user_attr("reason", f"not run: the study held its {target} trials when "
                                          f"it started (other workers took the last ones)")
            raise _Surplus(trial.user_attrs["reason"])
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = space.suggest(trial)
        cfg = apply_params(base, params)
        tc = cfg.train
        tc.name = f"trial-{trial.number:04d}"
        tc.runs_dir = str(root / "trials")
        tc.overwrite = True
        shared = data if cfg.data == base.data else None
        pruning = _Pruning(trial)
        log.info("trial %d: %s", trial.number,
                 ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in params.items()))
        # under torchrun the other ranks train the same trial (see _follow)
        distributed.broadcast_object(config_to_dict(cfg))
        try:
            trainer = Trainer(cfg, callbacks=[pruning], data=shared, quiet=True)
            history = trainer.fit()
        except DivergenceError as e:
            trial.set_user_attr("status", "diverged")
            trial.set_user_attr("reason", str(e))
            raise
        except Exception as e:
            trial.set_user_attr("status", "error")
            trial.set_user_attr("reason", f"{type(e).__name__}: {e}")
            raise
        except BaseException:  # Ctrl-C: not a property of the point; retried on resume
            trial.set_user_attr("status", "interrupted")
            raise
        value = history[-1]["val_top1"] if history else math.nan
        if pruning.pruned_at is not None:
            trial.set_user_attr("status", "pruned")
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at}: validation "
                                     f"top-1 {value:.2f}%")
        if not math.isfinite(value):
            trial.set_user_attr("status", "diverged")
            trial.set_user_attr("reason", "validation top-1 is not finite")
            raise DivergenceError(len(history), trainer.step, "validation top-1 is not finite",
                                  None, None)
        trial.set_user_attr("status", "ok")
        return float(value)

    return objective


def _prepare_base(base: Config) -> Config:
    base = copy.deepcopy(base)
    if base.data.val_split <= 0:
        log.info("search: data.val_split=%g -> %g (the search never looks at the test set)",
                 base.data.val_split, DEFAULT_VAL_SPLIT)
        base.data.val_split = DEFAULT_VAL_SPLIT
    base.train.progress = False
    base.train.tensorboard = False
    base.train.plots = False
    base.train.checkpoint_every = 0
    return base


def _run_worker(study_name: str, storage: str, base_dict: dict, space_dict: dict, root: str,
                target: int, seed: int, pruner, worker: int, timeout: float | None,
                log_level: int = logging.INFO, threads: int | None = None) -> None:
    """One worker: take trials from the study until it holds ``target`` (or ``timeout``)."""
    import time

    import optuna
    import torch

    if worker > 0 or threads:  # a spawned process: its own logging and thread share
        root_log = logging.getLogger("neuralign")
        if not root_log.handlers:
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter(f"[worker {worker}] %(message)s"))
            root_log.addHandler(h)
            root_log.setLevel(log_level)
            root_log.propagate = False
        if threads:
            torch.set_num_threads(threads)
        # (a process of its own: failed trials are logged here, in one line, without
        # Optuna's traceback; the CLI does the same for the main process)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
    base = config_from_dict(base_dict)
    space = parse_space(space_dict, base)
    study = _make_study(study_name, storage, seed, pruner)
    from ..data import build_data

    data = build_data(base.data)
    objective = _objective(base, space, Path(root), data, target)
    t_end = time.monotonic() + timeout if timeout else None
    errors = 0
    while _counted(study) < target:
        if t_end is not None and time.monotonic() > t_end:
            log.info("search: timeout reached")
            break
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
        last = max(study.get_trials(deepcopy=False), key=lambda t: t.number)
        status = last.user_attrs.get("status")
        errors = errors + 1 if status == "error" else 0
        if status in ("error", "diverged"):
            log.warning("trial %d failed (%s): %s", last.number, status,
                        last.user_attrs.get("reason", ""))
        elif last.value is not None:
            log.info("trial %d: %s, validation top-1 %.2f%%", last.number, last.state.name,
                     last.value)
        elif status == "pruned":
            log.info("trial %d: pruned after epoch %s", last.number,
                     last.user_attrs.get("epochs"))
        elif status == "surplus":
            log.info("trial %d: %s", last.number, last.user_attrs.get("reason"))
        if errors >= MAX_CONSECUTIVE_ERRORS:
            raise RuntimeError(f"{errors} trials in a row failed with errors (not divergence); "
                               f"last: {last.user_attrs.get('reason')}")


@contextlib.contextmanager
def _optuna_quiet():
    """Optuna's own log lines (a study created, each trial finished, a failed trial's
    traceback) off while a search runs, then back as they were: the search logs each trial in
    one line of its own, and a library call leaves the process's logging as it found it (the
    command line sets Optuna's verbosity for good)."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(level, optuna.logging.ERROR))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def search(base: Config, space: SearchSpace | dict, trials: int, study: str,
           out: str | Path | None = None, storage: str | None = None, seed: int = 0,
           jobs: int = 1, pruner=None, prune_startup: int = 3, prune_warmup: int = 1,
           startup_trials: int = 5, timeout: float | None = None) -> SearchResult:
    """Run (or resume) a study until it holds ``trials`` finished trials; write the outputs.

    Args:
        base: the base config; the space's values are set on top of it per trial.
        space: a checked :class:`SearchSpace`, or plain data checked here (before training).
        trials: the number of finished trials the study should hold in the end.
        study: the study's name in the storage.
        out: the output folder (default ``runs/search/<study>``), one study's alone.
        storage: an SQLAlchemy URL (default ``sqlite:///OUT/study.db``).
        seed: seed of the TPE sampler; each trial's sampler is seeded by it and the trial's
            number (:func:`trial_seed`), so workers sharing the study sample differently.
        jobs: worker processes on this machine.
        pruner: an Optuna pruner (default: median, ``prune_startup`` complete trials first, no
            pruning before epoch ``prune_warmup + 1``).
        startup_trials: random trials before TPE takes over (stored with the study).
        timeout: seconds after which no new trial starts.

    Under ``torchrun`` (or ``--nproc``) rank 0 drives the study and every rank trains each
    trial together (DistributedDataParallel); ranks > 0 return an empty result.

    The search logs one line per trial (logger ``neuralign.experiments.search``); Optuna's own
    lines are off during the call (errors excepted), and its verbosity is restored after.
    """
    with _optuna_quiet():
        return _search_or_follow(base, space, trials, study, out, storage, seed, jobs, pruner,
                                 prune_startup, prune_warmup, startup_trials, timeout)


def _search_or_follow(base, space, trials, study, out, storage, seed, jobs, pruner,
                      prune_startup, prune_warmup, startup_trials, timeout) -> SearchResult:
    base = _prepare_base(base)
    if not isinstance(space, SearchSpace):
        space = parse_space(space, base)  # raises SpaceError before anything runs
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if distributed.init():
        if jobs > 1:
            raise ConfigError("--jobs > 1 cannot be combined with a distributed search "
                              "(torchrun / --nproc): start one command per worker instead")
        if not distributed.is_main():
            _follow(base)
            return SearchResult(best=None, trials=[], out=None, study=None)
        try:
            return _search(base, space, trials, study, out, storage, seed, pruner,
                           prune_startup, prune_warmup, startup_trials, timeout, jobs)
        finally:
            distributed.broadcast_object(None)  # the other ranks' _follow ends
    return _search(base, space, trials, study, out, storage, seed, pruner, prune_startup,
                   prune_warmup, startup_trials, timeout, jobs)


def _follow(base: Config) -> None:
    """Ranks > 0 of a distributed search: train each trial rank 0 sends, until it sends None.

    Rank 0 alone talks to the study; a pruned trial stops on every rank (the trainer shares
    ``should_stop``), a diverged one raises on every rank."""
    from ..data import build_data

    data = build_data(base.data)
    while (msg := distributed.broadcast_object(None)) is not None:
        cfg = config_from_dict(msg)
        try:
            Trainer(cfg, data=data if cfg.data == base.data else None, quiet=True).fit()
        except (DivergenceError, ConfigError):  # raised on every rank: rank 0 records it
            pass


#: The file of a search's output folder that names the study whose outputs it holds.
STUDY_FILE = "study.yaml"


def _claim(out: Path, study: str) -> None:
    """Make ``out`` the output folder of ``study``, or a :class:`ConfigError` (before anything
    is written) when it holds another study's trial folders, ``trials.csv`` and ``best.yaml``:
    ``out/study.yaml`` names its study, written by the first search there."""
    marker = out / STUDY_FILE
    if not marker.exists():
        out.mkdir(parents=True, exist_ok=True)
        mine = out / f".{STUDY_FILE}.{os.getpid()}"
        write_text(mine, yaml.safe_dump({"study": study}))
        try:
            os.link(mine, marker)  # whole, and only if absent: of two searches, one claims it
        except FileExistsError:
            pass
        finally:
            mine.unlink()
    owner = (yaml.safe_load(marker.read_text()) or {}).get("study")
    if owner != study:
        raise ConfigError(f"{out} holds the outputs of study {owner!r} (its trial folders, "
                          f"trials.csv, best.yaml; {marker.name} names it), which study "
                          f"{study!r} would overwrite: give this study an output folder of "
                          f"its own (--out; by default runs/search/<study>), or --study "
                          f"{owner} to continue that one")


def _search(base, space, trials, study, out, storage, seed, pruner, prune_startup,
            prune_warmup, startup_trials, timeout, jobs) -> SearchResult:
    import optuna

    out = Path(out) if out is not None else Path(base.train.runs_dir) / "search" / study
    _claim(out, study)
    storage = storage or default_storage(out)
    if pruner is None:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=prune_startup,
                                             n_warmup_steps=prune_warmup)
    st = optuna.create_study(study_name=study, storage=_storage(storage), direction="maximize",
                             load_if_exists=True)
    saved = st.user_attrs.get("space")
    if saved is not None and saved != space.to_dict():
        raise ConfigError(f"study {study!r} in {storage} was created with another space "
                          f"({sorted(saved)}); use a new --study name")
    if saved is None:
        st.set_user_attr("space", space.to_dict())
        st.set_user_attr("base", config_to_dict(base))
        st.set_user_attr("n_startup_trials", int(startup_trials))
    write_yaml(space.to_dict(), out / "space.yaml")
    write_yaml(config_to_dict(base), out / "base.yaml")
    _recover_stale(st)
    done = _counted(st)
    log.info("search %s: %d of %d trials done, storage %s, %d worker(s)", study, done, trials,
             storage, jobs)
    args = (study, storage, config_to_dict(base), space.to_dict(), str(out), trials, seed,
            pruner)
    jobs = min(jobs, trials - done)  # (no worker without a trial to run)
    if done < trials:
        if jobs == 1:
            _run_worker(*args, 0, timeout)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            import torch

            threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // jobs))
            procs = [ctx.Process(target=_run_worker,
                                 args=(*args, w, timeout, log.getEffectiveLevel(), threads))
                     for w in range(jobs)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            bad = [p.exitcode for p in procs if p.exitcode]
            if bad:
                log.warning("search: %d worker(s) exited with status %s", len(bad), bad)
    st = optuna.load_study(study_name=study, storage=_storage(storage))
    return write_outputs(st, base, out)
