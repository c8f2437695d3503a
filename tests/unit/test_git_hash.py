"""`runs.git_hash`, which run manifests and benchmark headers record: a checkout with changed
code is marked dirty; changed reports under `results/` are not code and do not mark it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from workbench.runs import git_hash

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_reports_under_results_do_not_make_the_checkout_dirty(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert git_hash(tmp_path) == head
    (tmp_path / "results" / "table.md").write_text("new\n")  # a regenerated report
    assert git_hash(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_hash(tmp_path) == head + "-dirty"
    assert git_hash(tmp_path / "results") is not None  # any folder of the checkout
    assert git_hash(tmp_path.parent / "not-a-checkout") is None
