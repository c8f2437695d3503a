"""The patching benchmark runs end to end (--quick) and both methods agree within 1e-5.

Asserts exactness and that each side ran the path it names, not speed.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_quick_patching_benchmark_agrees(small_organism: Path, tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO))
        bench = importlib.import_module("scripts.bench_patching")
    out = tmp_path / "patching.md"
    result = bench.main(["--quick", "--out", str(out)])
    assert result["max_diff"] <= 1e-5, result
    assert result["rows"] == result["hook_calls"] == result["resumed"] > 0
    text = out.read_text(encoding="utf-8")
    assert "python -m scripts.bench_patching --quick" in text
    assert "| workbench patch_factor |" in text and "| TransformerLens run_with_hooks |" in text
