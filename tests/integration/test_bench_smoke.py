"""The distributions benchmark runs end to end (--quick), its methods agree exactly, and every
row ran the path it names.

Asserts exactness (max |delta log-prob| < 1e-4 in float32 between the naive loop,
lm-evaluation-harness and the workbench) and the path checks (positions fed and rows
unembedded, counted with hooks), not speed.
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
    (report,) = bench.main(["--quick", "--threads", "1", "--out", str(out)])
    assert set(report.results) == {"naive", "lm-eval", "workbench-rows", "workbench"}
    for name, result in report.results.items():
        assert result.logprobs is not None, name
        assert result.logprobs.shape == (report.n_requests,), name
        assert np.isfinite(result.logprobs).all(), name
        assert result.count.forwards > 0, name
        # the time inside the model's forwards is part of the method's time, never all of it
        assert 0 < result.best_model < result.best, name
    assert {"naive vs lm-eval", "workbench vs lm-eval", "workbench vs naive"} <= set(
        report.max_delta
    )
    assert max(report.max_delta.values()) < 1e-4, report.max_delta
    assert report.exact
    assert report.paths_ok, report.paths
    assert set(report.paths) == set(report.results)
    # packing the options of a prompt into one row feeds fewer positions than one row each
    rows, packed = report.results["workbench-rows"].count, report.results["workbench"].count
    assert packed.positions < rows.positions and packed.head_rows < rows.head_rows
    # FLOPs: the baselines run every module everywhere; the workbench's last block skips
    # its position-wise modules everywhere but at the rows it reads (one row in a pass that
    # reads nothing)
    flop = report.model_stats["flop_params"]
    for name in ("naive", "lm-eval"):
        c = report.results[name].count
        assert c.skipped == 0 and not c.reading, name
        assert report.flops(name) == 2 * (flop.body * c.positions + flop.head * c.head_rows)
    for name in ("workbench-rows", "workbench"):
        c = report.results[name].count
        assert c.positions - c.head_rows - c.forwards <= c.skipped <= c.positions - c.head_rows
        assert c.skipped > 0 and not c.reading, name
        assert report.flop_ratio(name) > 1
        assert report.per_flop(name) * report.flop_ratio(name) == pytest.approx(report.ratio(name))
    # the same counts priced at Llama-3-8B's parameters, counted here from its config by hand
    d, kv, ff, layers, vocab = 4096, 1024, 14336, 32, 128256
    big = report.model_stats["flop_params_8b"]
    assert big.read_only == 2 * d * d + 3 * d * ff  # q and o projections, MLP
    assert big.body == layers * (2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d) + d
    assert big.head == vocab * d
    by_hand = {
        name: 2 * (big.body * c.positions - big.read_only * c.skipped + big.head * c.head_rows)
        for name, c in ((n, report.results[n].count) for n in ("lm-eval", "workbench"))
    }
    assert report.flop_ratio_8b() == pytest.approx(by_hand["lm-eval"] / by_hand["workbench"])
    assert report.flop_ratio_8b() > 1
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
    assert bench.main(["--shape", "llama3-8b", "--dry-run", "--quick"]) == []


def test_a_row_that_runs_another_path_fails_its_check(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bug this check exists for: `workbench-rows` silently running the packed path."""
    packed_always = bench.run_workbench

    def wrong(lm: object, w: object, batch_size: int, *, pack_options: bool = True) -> object:
        return packed_always(lm, w, batch_size, pack_options=True)

    monkeypatch.setattr(bench, "run_workbench", wrong)
    (report,) = bench.main(
        ["--quick", "--threads", "1", "--methods", "lm-eval,workbench-rows,workbench"]
    )
    assert report.paths["workbench-rows"].startswith("FAIL"), report.paths
    assert report.paths["workbench"].startswith("ok") and not report.paths_ok


def test_quick_matrix_every_cell_exact_and_on_its_path(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "matrix.md"
    reports = bench.main(
        [
            "--quick",
            "--matrix",
            "--threads",
            "1",
            "--methods",
            "lm-eval,workbench-rows,workbench",
            "--out",
            str(out),
        ]
    )
    cells = {r.cell for r in reports}
    assert cells == {
        (p, s, n) for p in ("long", "short") for s in ("sequence", "next_token") for n in (2, 5, 11)
    }
    for r in reports:
        assert r.exact and r.paths_ok, (r.cell, r.max_delta, r.paths)
        # single-token options: packed and row scoring are one path, so no rows row
        assert ("workbench-rows" in r.results) == (r.cell[1] == "sequence"), r.cell
        assert r.ratio() > 0 and r.per_position() > 0 and r.bound() > r.ratio()
        assert r.flop_ratio() > 1 and r.per_flop() > 0 and r.flop_ratio_8b() > 1
    text = out.read_text(encoding="utf-8")
    assert "at Llama-3-8B shape" in text
    assert "python -m scripts.bench_distributions --quick --matrix" in text
    assert text.count("| ok |") == 12 and "FAIL" not in text


def test_quick_scaling_points(tmp_path: Path) -> None:
    """`scripts.bench_scaling` measures every kind in its own process and writes table + figure."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO))
        scaling = importlib.import_module("scripts.bench_scaling")
    out = tmp_path / "scaling.md"
    rows = scaling.main(["--sizes", "20", "--samples", "2", "--out", str(out)])
    assert [r["kind"] for r in rows] == ["distributions", "sampling", "activations"]
    for r in rows:
        assert r["prompts"] == 20 and r["seconds"] > 0 and r["peak_rss_mib"] > 0, r
    assert out.with_suffix(".png").exists()
    assert "python -m scripts.bench_scaling" in out.read_text(encoding="utf-8")
