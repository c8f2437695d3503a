"""Data-parallel runs: `torchrun --nproc-per-node 2` (gloo, CPU) writes the same tables as one
process, and a run whose rank was killed resumes under another world size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

import workbench.interp.activations as A
import workbench.measure.distributions as D
from workbench.distributed import Ranks, gpu_group, shard_groups, split
from workbench.engine.models import load_model
from workbench.interp.activations import ActivationConfig, ActivationStore, capture_activations
from workbench.measure.distributions import DistributionConfig, compute_distributions
from workbench.measure.sampling import SamplingConfig, compute_samples
from workbench.study.load import parse_study

DIST_TABLES = ("prompts", "distributions", "variants", "prompt_stats", "adjusted", "position_bias")


def _study_dict() -> dict[str, Any]:
    from conftest import example_study_dict

    raw = example_study_dict()
    raw["factors"][1]["values"] = [str(a) for a in range(20, 80, 5)]
    raw["orders"] = {"kind": "cyclic"}
    return raw


def _env() -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    return env


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    # `--` ends torchrun's own options: it would read `--n` as an abbreviation of `--nnodes`
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "workbench",
        "--",
        *args,
    ]


def _assert_same(a: Path, b: Path, tables: tuple[str, ...], atol: float = 0.0) -> None:
    """Same rows; numbers equal (atol 0: bit for bit)."""
    for name in tables:
        left = pd.read_parquet(a / f"{name}.parquet")
        right = pd.read_parquet(b / f"{name}.parquet")
        pd.testing.assert_frame_equal(left, right, check_exact=not atol, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def study_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("study") / "study.yaml"
    path.write_text(yaml.safe_dump(_study_dict()))
    return path


def test_shards_keep_groups_whole_and_balance() -> None:
    assert split([1] * 10, 2) == [range(0, 5), range(5, 10)]
    assert split([8, 1, 1], 2) == [range(0, 1), range(1, 3)]
    assert [len(r) for r in split([1, 1], 3)] == [1, 0, 1]
    items = [(g, i) for g in "aabbbcdd" for i in [0]]
    parts = [shard_groups(items, lambda x: x[0], Ranks(r, 3)) for r in range(3)]
    assert [x for p in parts for x in p] == items
    groups = [{g for g, _ in p} for p in parts]
    assert all(not (groups[i] & groups[j]) for i in range(3) for j in range(i + 1, 3))
    assert gpu_group(1, 4, 8) == [2, 3] and gpu_group(3, 4, 2) == [1] and gpu_group(0, 2, 0) == []


def test_torchrun_distributions_match_one_process(
    tiny_llama_dir: Path, study_file: Path, tmp_path: Path
) -> None:
    settings = ["--chunk-prompts", "8", "--batch-size", "4", "--quiet"]
    args = ["distributions", str(study_file), "--model", str(tiny_llama_dir), *settings]
    proc = subprocess.run(
        _torchrun(2, [*args, "--out", str(tmp_path / "two")]),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lm = load_model(tiny_llama_dir, dtype="auto", device="auto")
    compute_distributions(
        parse_study(_study_dict(), str(study_file)),
        lm,
        tmp_path / "one",
        DistributionConfig(batch_size=4, chunk_prompts=8, progress=False),
    )
    _assert_same(tmp_path / "one", tmp_path / "two", DIST_TABLES)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["world_size"] == 1


def _ranks_of(pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (Linux /proc)."""
    out = {}
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in children:
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = int(child)
    return out


def test_killed_rank_resumes_with_another_world_size(
    tiny_llama_dir: Path, study_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    settings = ["--chunk-prompts", "4", "--batch-size", "4", "--quiet", "--out", str(out)]
    args = ["distributions", str(study_file), "--model", str(tiny_llama_dir), *settings]
    proc = subprocess.Popen(
        _torchrun(2, args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    chunks = out / "chunks"
    deadline = time.time() + 180
    killed = False
    while time.time() < deadline and proc.poll() is None:
        finished = (
            [p for p in chunks.iterdir() if not p.name.endswith(".tmp")] if chunks.exists() else []
        )
        if len(finished) >= 3:
            ranks = _ranks_of(proc.pid)
            if 1 in ranks:
                os.kill(ranks[1], signal.SIGKILL)
                killed = True
                break
        time.sleep(0.02)
    assert killed, "the run finished before a rank could be killed; make the study larger"
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert not (out / "manifest.json").exists()

    study = parse_study(_study_dict(), str(study_file))
    lm = load_model(tiny_llama_dir, dtype="auto", device="auto")
    config = DistributionConfig(batch_size=4, chunk_prompts=4, progress=False)
    resumed = compute_distributions(study, lm, out, config)
    assert 0 < resumed.manifest["counts"]["resumed_prompts"] < len(resumed.prompts)
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 1
    compute_distributions(study, lm, tmp_path / "clean", config)
    _assert_same(tmp_path / "clean", out, DIST_TABLES)


def test_torchrun_sample_and_activations_match_one_process(
    tiny_llama_dir: Path, study_file: Path, tmp_path: Path
) -> None:
    model = ["--model", str(tiny_llama_dir), "--quiet"]
    sample = ["--n", "4", "--batch-rows", "16", "--chunk-prompts", "8", "--max-new-tokens", "6"]
    acts = ["--sites", "blocks.*.hook_resid_post", "--positions", "answer"]
    acts += ["--chunk-prompts", "16", "--batch-size", "4"]
    commands = [
        *("sample", str(study_file), *model, *sample, "--out", str(tmp_path / "s2")),
        ";;",
        *("activations", str(study_file), *model, *acts, "--out", str(tmp_path / "a2")),
    ]
    # both commands in one launch: the startup (torch, transformers) dominates here
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    driver = str(Path(__file__).with_name("dp_commands.py"))
    proc = subprocess.run(
        [*launch, "--nproc-per-node=2", driver, "--", *commands],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    study = parse_study(_study_dict(), str(study_file))
    lm = load_model(tiny_llama_dir, dtype="auto", device="auto")
    compute_samples(
        study,
        lm,
        tmp_path / "s1",
        SamplingConfig(n=4, batch_rows=16, chunk_prompts=8, max_new_tokens=6, progress=False),
    )
    _assert_same(tmp_path / "s1", tmp_path / "s2", ("prompts", "samples", "sampled_distributions"))
    one = capture_activations(
        study,
        lm,
        tmp_path / "a1",
        ActivationConfig(
            sites=("blocks.*.hook_resid_post",),
            positions=("answer",),
            chunk_prompts=16,
            batch_size=4,
            progress=False,
        ),
        log=lambda _: None,
    )
    two = ActivationStore.open(tmp_path / "a2")
    assert two.manifest["world_size"] == 2
    cols = [c for c in one.index.columns if c not in ("shard", "row")]
    pd.testing.assert_frame_equal(one.index[cols], two.index[cols], check_exact=True)
    assert torch.equal(one.vectors(one.index), two.vectors(two.index))


def test_out_of_memory_halves_the_batch(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A (simulated) CUDA out-of-memory error halves the batch; the run goes on, says so in
    its manifest, and measures what an unhindered run measures."""
    lm = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    study = parse_study(_study_dict(), "s.yaml")
    config = DistributionConfig(batch_size=8, chunk_prompts=16, progress=False)
    compute_distributions(study, lm, tmp_path / "clean", config)
    acfg = ActivationConfig(positions=("answer",), batch_size=8, progress=False)
    clean = capture_activations(study, lm, tmp_path / "a_clean", acfg, log=lambda _: None)

    real_score, real_capture = D.score_requests, A.Capturer.run

    def scoring(model: Any, requests: Any, engine: Any, **kwargs: Any) -> Any:
        if engine.batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_score(model, requests, engine, **kwargs)

    def capturing(self: Any, ids: torch.Tensor, *args: Any) -> Any:
        if ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_capture(self, ids, *args)

    monkeypatch.setattr(D, "score_requests", scoring)
    monkeypatch.setattr(A.Capturer, "run", capturing)
    result = compute_distributions(study, lm, tmp_path / "oom", config)
    assert [o["retried_with"] for o in result.manifest["out_of_memory"]] == [4, 2]
    # other batch shapes: float32 log-probs move in their last bits (|logprob| ~ 8: ~1e-6)
    _assert_same(tmp_path / "clean", tmp_path / "oom", DIST_TABLES, atol=1e-5)
    store = capture_activations(study, lm, tmp_path / "a_oom", acfg, log=lambda _: None)
    assert [o["retried_with"] for o in store.manifest["out_of_memory"]] == [4, 2]
    diff = (store.vectors(store.index) - clean.vectors(clean.index)).abs().max()
    assert float(diff) <= 1e-3  # float16 storage: at most one rounding step apart
