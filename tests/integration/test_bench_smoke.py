"""The distributions benchmark runs end to end (--quick) and its methods agree exactly.

Asserts exactness (max |delta log-prob| < 1e-4 in float32 between the naive loop,
lm-evaluation-harness and the workbench), not speed.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO))
        return importlib.import_module("scripts.bench_distributions")


def test_quick_benchmark_methods_agree(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    report = bench.main(["--quick", "--threads", "1", "--out", str(out)])
    assert report is not None
    assert {"naive", "lm-eval", "workbench"} <= set(report.results)
    for name, result in report.results.items():
        assert result.logprobs is not None, name
        assert result.logprobs.shape == (report.n_requests,), name
        assert np.isfinite(result.logprobs).all(), name
        assert result.count.forwards > 0, name
    assert {"naive vs lm-eval", "workbench vs lm-eval", "workbench vs naive"} <= set(
        report.max_delta
    )
    assert max(report.max_delta.values()) < 1e-4, report.max_delta
    assert report.exact
    # every persona prefix of the study is 100+ tokens, as the workload asks
    assert report.study_stats["min_persona_prefix_tokens"] >= 100
    text = out.read_text(encoding="utf-8")
    assert "| workbench |" in text and "| lm-eval |" in text and "python -m scripts" in text


def test_llama3_8b_shape_builds_on_meta(bench: ModuleType) -> None:
    """The --shape llama3-8b path constructs (on the meta device: no memory, no forward)."""
    raw = bench.study_dict(1, 1, 5, 0)
    lm = bench.build_shape_model(
        "llama3-8b", bench.corpus(raw), "meta", torch.bfloat16, vocab=1024, seed=0
    )
    cfg = lm.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (4096, 32, 8)
    assert sum(p.numel() for p in lm.model.parameters()) == 8_030_261_248
    assert lm.model.get_output_embeddings().weight.shape[0] == 128256 > len(lm.tokenizer)
    assert bench.main(["--shape", "llama3-8b", "--dry-run", "--quick"]) is None
