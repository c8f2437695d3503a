"""The soak test, short: SIGKILL each of distributions, sample and activations once at a random
point; each resumed run equals an uninterrupted one bit for bit (`scripts/soak.py`, 20 kills,
is the long version)."""

from __future__ import annotations

import importlib
import os
import signal
from pathlib import Path
from types import ModuleType

import pytest
from tqdm import std
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO))
        return importlib.import_module("scripts.soak")


def test_a_worker_killed_inside_a_progress_bar_leaves_the_lock_free(soak: ModuleType) -> None:
    """The hang this guards against: a worker SIGKILLed while it held tqdm's write lock (a
    semaphore shared across the fork) left the parent's next bar waiting forever."""
    tqdm(disable=True).close()  # the parent's lock exists before the fork, as in a soak
    pid = os.fork()
    if pid == 0:
        soak.own_tqdm_lock()
        with tqdm.get_lock():
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    shared = std.TqdmDefaultWriteLock.mp_lock
    assert shared.acquire(timeout=5)  # without the worker's own lock: False after 5 s
    shared.release()


def test_killed_runs_resume_to_identical_tables(soak: ModuleType, tmp_path: Path) -> None:
    kills = soak.soak(3, seed=1, work=tmp_path, log=lambda _: None)
    assert [k.command for k in kills] == ["distributions", "sample", "activations"]
    assert all(k.identical for k in kills), soak.table(kills, 0)
