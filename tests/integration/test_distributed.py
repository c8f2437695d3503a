"""Data-parallel runs: `torchrun --nproc-per-node 2` (gloo, CPU) writes the same tables as one
process, and a run whose rank was killed resumes under another world size.

Every command runs in one launch (`Launch`: torch's startup dominates here), which the tests
wait for only after computing their one-process references; a second launch kills a rank of
`distributions`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from conftest import LOGPROB_ATOL

import workbench.interp.activations as A
import workbench.measure.distributions as D
from workbench.distributed import (
    Ranks,
    alone,
    gpu_group,
    launched,
    shard_groups,
    split,
    sum_over_ranks,
)
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


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    # the driver runs as a file: the checkout must be importable whatever is installed
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _torchrun(nproc: int, commands: list[list[str]]) -> list[str]:
    """One launch running `commands` in sequence in every rank (one startup for all).
    `--` ends torchrun's own options: it would read `--n` as an abbreviation of `--nnodes`."""
    driver = str(Path(__file__).with_name("dp_commands.py"))
    joined = [arg for i, c in enumerate(commands) for arg in ([";;"] if i else []) + c]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launch, f"--nproc-per-node={nproc}", driver, "--", *joined]


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
    assert sum_over_ranks([1, 2.5]) == [1.0, 2.5]
    os.environ.update({"RANK": "1", "WORLD_SIZE": "2"})
    try:
        with alone():
            assert launched() == Ranks()
        assert launched().rank == 1
    finally:
        for name in ("RANK", "WORLD_SIZE"):
            del os.environ[name]


DIST_SETTINGS = ["--chunk-prompts", "8", "--batch-size", "4"]
SAMPLE_SETTINGS = ["--n", "4", "--batch-rows", "16", "--chunk-prompts", "8"]
SAMPLE_SETTINGS += ["--max-new-tokens", "6"]
ACTS_SETTINGS = ["--sites", "blocks.*.hook_resid_post", "--positions", "answer,span_mean"]
ACTS_SETTINGS += ["--factors", "party", "--chunk-prompts", "16", "--batch-size", "4"]
SITES = ["--sites", "blocks.0.hook_resid_pre,blocks.1.hook_resid_post"]
SITES += ["--positions", "span_last,answer"]
PROBE = "blocks.0.hook_resid_post"
N_BOOT = ["--n-boot", "100"]


def _interp_commands(study: Path, model: list[str], out: Path) -> list[list[str]]:
    """probe, patch, attribute (atp, ig), steer and mediate on the tiny model, with chunks
    small enough that every rank of 2 gets some (an activations run first, for the probe)."""
    s = str(study)
    probes = ["--directions", str(out / "probes"), "--site", PROBE, "--positions", "span"]
    return [
        ["activations", s, *model, *ACTS_SETTINGS, "--out", str(out / "acts")],
        ["probe", str(out / "acts"), "--target", "party", "--positions", "span_mean:party",
         "--sites", PROBE, "--out", str(out / "probes")],
        ["patch", s, *model, "--factor", "party", "--pairs", "8", "--chunk-pairs", "2",
         "--batch-size", "8", *SITES, "--out", str(out / "patch")],
        ["attribute", s, *model, "--method", "atp", "--factor", "party", "--metric",
         "log_odds", "--pairs", "8", "--chunk-units", "2", "--top-k", "1", *SITES,
         "--out", str(out / "atp")],
        ["attribute", s, *model, "--method", "ig", "--factor", "party,movie", "--metric",
         "log_odds", "--prompts", "4", "--steps", "4", "--baseline", "zero",
         "--chunk-units", "1", "--out", str(out / "ig")],
        ["steer", s, *model, *probes, "--probe", "party:Republican", "--alphas", "0,1",
         "--random", "1", "--placebos", "random,shuffled", "--prompts", "8", *N_BOOT,
         "--out", str(out / "steer")],
        ["mediate", s, *model, *probes, "--factor", "party", "--random", "1", "--pairs", "8",
         *N_BOOT, "--out", str(out / "mediate")],
    ]  # fmt: skip


INTERP_TABLES = {
    "probes": ("probes",),
    "patch": ("prompts", "patching", "patched", "pairs"),
    "atp": ("prompts", "attribution", "attributed", "repatched", "agreement"),
    "ig": ("prompts", "attribution", "attributed"),
    "steer": ("prompts", "steering", "steered", "neutral"),
    "mediate": ("prompts", "mediation", "ablated"),
}


class Launch:
    """One `torchrun --nproc-per-node 2` of every data-parallel command in sequence, started
    when the module's first test asks for it; each test computes its one-process reference
    while it runs and waits for it only then. A second `distributions` run stops on every
    rank after its first chunk (as a killed rank leaves it), and the last command, `patch`,
    loses rank 1 to SIGKILL after that rank's first chunk: the launch exits non-zero."""

    def __init__(self, tiny: Path, study: Path, out: Path) -> None:
        self.out, self.two = out, out / "two"
        model = ["--model", str(tiny), "--quiet", "--threads", "1"]
        s = str(study)
        patch = next(c for c in _interp_commands(study, model, self.two) if c[0] == "patch")
        dist = ["distributions", s, *model, *DIST_SETTINGS, "--out"]
        self.killed = [*patch[:-1], str(self.two / "patch_killed")]
        """The stopped commands, to resume in one process."""
        self.killed_dist = [*dist, str(self.two / "dist_killed")]
        commands = [
            [*dist, str(self.two / "dist")],
            ["@abort-after", "1", *self.killed_dist],
            ["sample", s, *model, *SAMPLE_SETTINGS, "--out", str(self.two / "sample")],
            *_interp_commands(study, model, self.two),
            ["@kill-rank1-after", "1", *self.killed],
        ]
        self.log = out / "stderr.txt"
        self.chunks = out / "chunks.txt"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                _torchrun(2, commands),
                env=_env(DP_CHUNK_LOG=str(self.chunks)),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def wait(self) -> Path:
        """The launch's output folder, once it has ended."""
        self.proc.wait(timeout=600)
        assert self.proc.returncode != 0, "rank 1 of the last command was not killed"
        return self.two

    def finished(self, run: str) -> Path:
        path = self.wait() / run
        assert (path / "manifest.json").exists(), self.log.read_text()[-3000:]
        return path


@pytest.fixture(scope="module")
def launch(
    tiny_llama_dir: Path, study_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Launch]:
    started = Launch(tiny_llama_dir, study_file, tmp_path_factory.mktemp("launch"))
    yield started
    if started.proc.poll() is None:
        started.proc.kill()
        started.proc.wait()


def test_torchrun_distributions_match_one_process(
    launch: Launch, tiny_llama_dir: Path, study_file: Path, tmp_path: Path
) -> None:
    lm = load_model(tiny_llama_dir, dtype="auto", device="auto")
    compute_distributions(
        parse_study(_study_dict(), str(study_file)),
        lm,
        tmp_path / "one",
        DistributionConfig(batch_size=4, chunk_prompts=8, progress=False),
    )
    two = launch.finished("dist")
    _assert_same(tmp_path / "one", two, DIST_TABLES)
    assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["world_size"] == 1


def test_torchrun_sample_and_activations_match_one_process(
    launch: Launch, tiny_llama_dir: Path, study_file: Path, tmp_path: Path
) -> None:
    study = parse_study(_study_dict(), str(study_file))
    lm = load_model(tiny_llama_dir, dtype="auto", device="auto")
    compute_samples(
        study,
        lm,
        tmp_path / "s1",
        SamplingConfig(n=4, batch_rows=16, chunk_prompts=8, max_new_tokens=6, progress=False),
    )
    _assert_same(
        tmp_path / "s1", launch.finished("sample"), ("prompts", "samples", "sampled_distributions")
    )
    one = capture_activations(
        study,
        lm,
        tmp_path / "a1",
        ActivationConfig(
            sites=("blocks.*.hook_resid_post",),
            positions=("answer", "span_mean"),
            factors=("party",),
            chunk_prompts=16,
            batch_size=4,
            progress=False,
        ),
        log=lambda _: None,
    )
    two = ActivationStore.open(launch.finished("acts"))
    assert two.manifest["world_size"] == 2
    cols = [c for c in one.index.columns if c not in ("shard", "row")]
    pd.testing.assert_frame_equal(one.index[cols], two.index[cols], check_exact=True)
    assert torch.equal(one.vectors(one.index), two.vectors(two.index))


def test_torchrun_interpretability_matches_one_process(
    launch: Launch, tiny_llama_dir: Path, study_file: Path, tmp_path: Path
) -> None:
    """probe (rank 0 alone), patch, attribute (atp with real re-patching, ig), steer and
    mediate: every rank did some of the work, and the tables are a one-process run's, bit
    for bit."""
    from workbench.cli.main import main

    model = ["--model", str(tiny_llama_dir), "--quiet", "--threads", "1"]
    for command in _interp_commands(study_file, model, tmp_path):
        assert main(command) == 0, command
    two = launch.wait()
    for run, tables in INTERP_TABLES.items():
        _assert_same(tmp_path / run, launch.finished(run), tables)
        world = json.loads((two / run / "manifest.json").read_text())["world_size"]
        assert world == (1 if run == "probes" else 2), run
    written = launch.chunks.read_text().split()
    for run in ("patch", "atp", "atp/repatch", "ig", "steer", "mediate"):
        mine = [c for c in written if c.startswith(f"{two / run}/")]
        assert any(c.endswith("-r1") for c in mine), (run, mine)
        # the re-patching runs have one chunk each: rank 1's
        assert run == "atp/repatch" or any(not c.endswith("-r1") for c in mine), (run, mine)


def test_killed_rank_resumes_with_another_world_size(launch: Launch) -> None:
    """`patch` lost rank 1 after its first chunk under 2 ranks; the same command in one
    process finishes it with the tables of the uninterrupted 2-rank run."""
    from workbench.cli.main import main

    two = launch.wait()
    killed = two / "patch_killed"
    assert not (killed / "manifest.json").exists()
    names = [p.name for p in (killed / "chunks").iterdir() if not p.name.endswith(".tmp")]
    assert any(n.endswith("-r1") for n in names), names
    assert main(launch.killed) == 0
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["world_size"] == 1
    assert 0 < manifest["counts"]["resumed_pairs"] < manifest["counts"]["pairs"]
    _assert_same(two / "patch", killed, INTERP_TABLES["patch"])


def test_stopped_distributions_resume_with_another_world_size(launch: Launch) -> None:
    """`distributions` stopped on both ranks after their first chunk; one process finishes it
    with the tables of the uninterrupted 2-rank run (itself a one-process run's)."""
    from workbench.cli.main import main

    two = launch.wait()
    out = two / "dist_killed"
    assert not (out / "manifest.json").exists()
    assert any(p.name.endswith("-r1") for p in (out / "chunks").iterdir())
    assert main(launch.killed_dist) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 1
    prompts = pd.read_parquet(out / "prompts.parquet")
    assert 0 < manifest["counts"]["resumed_prompts"] < len(prompts)
    _assert_same(two / "dist", out, DIST_TABLES)


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
    # other batch shapes: float32 log-probs move in their last bits
    _assert_same(tmp_path / "clean", tmp_path / "oom", DIST_TABLES, atol=LOGPROB_ATOL)
    store = capture_activations(study, lm, tmp_path / "a_oom", acfg, log=lambda _: None)
    assert [o["retried_with"] for o in store.manifest["out_of_memory"]] == [4, 2]
    a, b = store.vectors(store.index).float(), clean.vectors(clean.index).float()
    # float16 storage: at most one rounding step apart (a step is 2^-10 of the magnitude;
    # 2^-24 below the normal range, where the steps stop shrinking), plus the float32 noise of
    # the other batch shape, which is absolute: a value near 0 left by cancellation in a
    # vector of magnitude ~30 moves by ~1e-5, many of its own float16 steps (2^-17 of the
    # vector's largest value allows 20x that; a wrong row or position moves values by ~1)
    step = (torch.finfo(torch.float16).eps * torch.maximum(a.abs(), b.abs())).clamp_min(2**-24)
    noise = 2**-17 * torch.maximum(a.abs(), b.abs()).amax(-1, keepdim=True)
    assert bool(((a - b).abs() <= step + noise).all())
