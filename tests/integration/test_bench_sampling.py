"""The sampling benchmark runs end to end (--quick) and both engines sample the same
distribution. Asserts agreement, not speed (speed is in results/benchmarks/sampling_cpu.md)."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO))
        return importlib.import_module("scripts.bench_sampling")


def test_quick_benchmark(bench: ModuleType, small_organism: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    report = bench.main(["--quick", "--threads", "1", "--out", str(out)])
    assert report.n == 100 and report.n_prompts >= 4
    assert set(report.times) == {"hf-generate", "hf-generate-batched", "workbench"}
    for counts in report.counts.values():
        assert (counts.sum(-1) == 100).all()  # every sample counted, parsed or not
    # Two samples of the same distributions: far below a real difference, near the floor.
    assert report.mean_tv < 1.5 * report.floor_mean, (report.mean_tv, report.floor_mean)
    text = out.read_text(encoding="utf-8")
    assert "| workbench |" in text and "python -m scripts.bench_sampling" in text
