"""Nothing lost: a run killed mid-way resumes without recomputing or duplicating rows."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

import workbench.measure.distributions as D
from workbench.engine.models import load_model
from workbench.engine.scoring import Scored
from workbench.errors import WorkbenchError
from workbench.measure.distributions import DistributionConfig, compute_distributions
from workbench.study.load import parse_study

TABLES = ("prompts", "distributions", "variants", "prompt_stats", "adjusted", "position_bias")


def _study_dict() -> dict[str, Any]:
    from conftest import example_study_dict

    raw = example_study_dict()
    raw["factors"][1]["values"] = [str(a) for a in range(20, 80, 5)]
    raw["orders"] = {"kind": "cyclic"}
    return raw


def _assert_same_tables(a: Path, b: Path) -> None:
    for name in TABLES:
        left, right = pd.read_parquet(a / f"{name}.parquet"), pd.read_parquet(b / f"{name}.parquet")
        key = [c for c in ("prompt_id", "option_id", "variant") if c in left.columns]
        if "prompt_id" in key:
            assert not left.duplicated(key).any(), name
        pd.testing.assert_frame_equal(left, right, check_exact=False, atol=1e-5, rtol=0)


def test_interrupted_run_resumes_without_recomputing(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    study = parse_study(_study_dict(), "s.yaml")
    config = DistributionConfig(chunk_prompts=10, progress=False)
    compute_distributions(study, lm, tmp_path / "clean", config)

    real = D.score_requests
    calls = {"chunks": 0, "scored": 0}

    def crashing(*args: Any, **kwargs: Any) -> Iterator[Scored]:
        calls["chunks"] += 1
        if calls["chunks"] == 4:
            raise KeyboardInterrupt
        yield from real(*args, **kwargs)

    monkeypatch.setattr(D, "score_requests", crashing)
    with pytest.raises(KeyboardInterrupt):
        compute_distributions(study, lm, tmp_path / "run", config)
    assert not (tmp_path / "run" / "manifest.json").exists()
    finished = len(list((tmp_path / "run" / "chunks").iterdir()))
    assert finished == 3

    def counting(*args: Any, **kwargs: Any) -> Iterator[Scored]:
        for s in real(*args, **kwargs):
            calls["scored"] += 1
            yield s

    monkeypatch.setattr(D, "score_requests", counting)
    result = compute_distributions(study, lm, tmp_path / "run", config)
    assert result.manifest["counts"]["resumed_prompts"] > 0
    assert calls["scored"] == len(result.prompts) - result.manifest["counts"]["resumed_prompts"]
    _assert_same_tables(tmp_path / "clean", tmp_path / "run")


def test_killed_cli_run_finishes_on_rerun(tiny_llama_dir: Path, tmp_path: Path) -> None:
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(_study_dict()))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "workbench",
        "distributions",
        str(study_file),
        "--model",
        str(tiny_llama_dir),
        "--quiet",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    settings = ["--chunk-prompts", "4", "--batch-size", "4"]
    proc = subprocess.Popen([*cmd, "--out", str(out), *settings], env=env)
    deadline = time.time() + 120
    chunks = out / "chunks"
    while time.time() < deadline and proc.poll() is None:
        if (
            chunks.exists()
            and len([p for p in chunks.iterdir() if not p.name.endswith(".tmp")]) >= 2
        ):
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("the run finished before it could be killed; make the study larger")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(
        [*cmd, "--out", str(out), *settings], env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    # the reference: an uninterrupted run with the same settings, in this process
    compute_distributions(
        parse_study(_study_dict(), str(study_file)),
        load_model(tiny_llama_dir, dtype="auto", device="auto"),
        tmp_path / "clean",
        DistributionConfig(batch_size=4, chunk_prompts=4, progress=False),
    )
    _assert_same_tables(tmp_path / "clean", out)


def test_refuses_to_mix_two_different_runs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    lm = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    raw = _study_dict()
    compute_distributions(
        parse_study(raw, "s.yaml"), lm, tmp_path / "run", DistributionConfig(progress=False)
    )
    changed = copy.deepcopy(raw)
    changed["questions"][1]["options"] = ["Good", "Bad"]
    with pytest.raises(WorkbenchError, match="holds a different run"):
        compute_distributions(
            parse_study(changed, "s.yaml"), lm, tmp_path / "run", DistributionConfig(progress=False)
        )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(WorkbenchError, match="not empty"):
        compute_distributions(
            parse_study(raw, "s.yaml"), lm, tmp_path / "other", DistributionConfig(progress=False)
        )
