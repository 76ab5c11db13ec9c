"""Fixtures shared by every test module (``tests/`` is on pytest's ``pythonpath``)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

try:  # the cli extra: `neuralign search` sets Optuna's verbosity
    import optuna
except ImportError:
    optuna = None


@pytest.fixture(autouse=True, scope="session")
def _neuralign_cache(tmp_path_factory):
    """One MNIST-1D cache for the whole run, never the user's (``NEURALIGN_CACHE``)."""
    old = os.environ.get("NEURALIGN_CACHE")
    os.environ["NEURALIGN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("NEURALIGN_CACHE", None)
    else:
        os.environ["NEURALIGN_CACHE"] = old


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Torch's thread count, the package logger and Optuna's verbosity as they were: the CLI's
    ``main()`` sets them (it owns the process), and a test calling it must not leak them into
    the next."""
    threads = torch.get_num_threads()
    logger = logging.getLogger("neuralign")
    saved = logger.handlers[:], logger.level, logger.propagate
    verbosity = optuna.logging.get_verbosity() if optuna else None
    yield
    torch.set_num_threads(threads)
    logger.handlers[:], logger.level, logger.propagate = saved
    if optuna:
        optuna.logging.set_verbosity(verbosity)


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is fastest on a shared machine."""
    torch.set_num_threads(1)
