"""The soak test, short: SIGKILL each of distributions, sample and activations once at a random
point; each resumed run equals an uninterrupted one bit for bit (`scripts/soak.py`, 20 kills,
is the long version)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_killed_runs_resume_to_identical_tables(tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO))
        soak = importlib.import_module("scripts.soak")
    kills = soak.soak(3, seed=1, work=tmp_path, log=lambda _: None)
    assert [k.command for k in kills] == ["distributions", "sample", "activations"]
    assert all(k.identical for k in kills), soak.table(kills, 0)
