"""Soak test: SIGKILL `distributions`, `sample` and `activations` at random points; every rerun
must finish with exactly the rows and numbers of an uninterrupted run.

Usage (from the repository root)::

    python -m scripts.soak                       # 20 kills -> results/benchmarks/soak_cpu.md
    python -m scripts.soak --kills 3 --out -     # a short run, table on stdout

Model: a random-weight tiny Llama (`workbench.tiny.build_tiny_model`), the test suite's example
study with 12 ages and cyclic option orders (168 prompts). For each command an uninterrupted
reference run is timed (T). Each kill forks a worker that runs the same library call the
command runs (`compute_distributions`, `compute_samples`, `capture_activations`) into a fresh
folder, sends it SIGKILL at a uniformly random time in (0, T) (a worker that finished first
is recorded as such), then resumes the folder in this process and compares every table to
the reference: same rows, numbers equal bit for bit. Kills are spread round-robin over the
three commands. Forked workers skip interpreter start-up, so a kill lands while the run
works, not while torch imports; `tests/integration/test_resume.py` kills the CLI itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from workbench.runs import short_git_hash

TABLES = {
    "distributions": (
        "prompts",
        "distributions",
        "variants",
        "prompt_stats",
        "adjusted",
        "position_bias",
    ),
    "sample": ("prompts", "samples", "sampled_distributions"),
    "activations": ("prompts", "index"),
}


def study_dict() -> dict[str, Any]:
    """The suite's example study with 12 ages and cyclic orders: 168 prompts."""
    raw: dict[str, Any] = {
        "name": "soak",
        "factors": [
            {"name": "party", "role": "persona", "values": ["Democrat", "Republican"]},
            {"name": "age", "role": "persona", "values": [str(a) for a in range(20, 80, 5)]},
            {"name": "movie", "role": "stimulus", "values": ["Up", "Jaws"]},
        ],
        "template": {
            "format": "plain",
            "persona": ["I am {age} years old.", "Politically, I am a {party}."],
            "prompt": "{persona}\nQuestion: {question}\n{options}\nAnswer:",
        },
        "questions": [
            {
                "id": "like",
                "text": "Do you like {movie}?",
                "options": ["Yes", "No"],
                "refusal": ["Don't know"],
            },
            {"id": "economy", "text": "How is the economy?", "options": ["Good", "Fair", "Poor"]},
        ],
        "orders": {"kind": "cyclic"},
    }
    return raw


def runners(model_dir: Path) -> dict[str, Callable[[Path], object]]:
    """command -> a call that runs it into a folder (resuming it when it holds chunks)."""
    from workbench.engine.models import load_model
    from workbench.interp.activations import ActivationConfig, capture_activations
    from workbench.measure.distributions import DistributionConfig, compute_distributions
    from workbench.measure.sampling import SamplingConfig, compute_samples
    from workbench.study.load import parse_study

    lm = load_model(model_dir, dtype="float32", device="cpu")
    study = parse_study(study_dict(), "soak.yaml")
    dist = DistributionConfig(batch_size=4, chunk_prompts=8, progress=False)
    samp = SamplingConfig(
        n=8, batch_rows=32, chunk_prompts=8, max_new_tokens=8, seed=1, progress=False
    )
    acts = ActivationConfig(positions=("answer",), chunk_prompts=8, batch_size=4, progress=False)
    return {
        "distributions": lambda out: compute_distributions(study, lm, out, dist),
        "sample": lambda out: compute_samples(study, lm, out, samp),
        "activations": lambda out: capture_activations(study, lm, out, acts, log=lambda _: None),
    }


@dataclass
class Kill:
    command: str
    at_s: float
    """Seconds after the worker started."""
    chunks_at_kill: int
    """Finished chunks in the folder when the signal landed (-1: the worker had finished)."""
    resumed_prompts: int
    identical: bool


def _finished_chunks(out: Path) -> int:
    chunks = out / "chunks"
    if not chunks.exists():
        return 0
    return sum(1 for p in chunks.iterdir() if not p.name.endswith(".tmp"))


def same_tables(command: str, a: Path, b: Path) -> bool:
    for name in TABLES[command]:
        left, right = pd.read_parquet(a / f"{name}.parquet"), pd.read_parquet(b / f"{name}.parquet")
        if name == "index":  # shard names depend on how the chunks fell; the vectors may not
            left, right = left.drop(columns=["shard", "row"]), right.drop(columns=["shard", "row"])
        try:
            pd.testing.assert_frame_equal(left, right, check_exact=True)
        except AssertionError:
            return False
    if command == "activations":
        from workbench.interp.activations import ActivationStore

        x, y = ActivationStore.open(a), ActivationStore.open(b)
        return bool(torch.equal(x.vectors(x.index), y.vectors(y.index)))
    return True


def own_tqdm_lock() -> None:
    """In a forked worker: a lock of its own for tqdm. tqdm's write lock holds a
    multiprocessing semaphore shared with the parent across the fork (every bar takes it,
    even a disabled one); a worker killed while holding it would leave the parent's next
    bar waiting forever."""
    from tqdm import std

    lock = threading.RLock()
    classes = [std.tqdm]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if cls is std.tqdm or "_lock" in cls.__dict__:
            cls._lock = lock  # what `tqdm.set_lock` does, for every class holding its own


def kill_once(command: str, run: Callable[[Path], object], out: Path, at_s: float) -> Kill:
    """Fork a worker running `command` into `out`, SIGKILL it after `at_s`, resume here."""
    pid = os.fork()
    if pid == 0:  # the worker
        own_tqdm_lock()
        code = 0
        try:
            run(out)
        except BaseException:
            code = 1
        os._exit(code)
    time.sleep(at_s)
    finished, _ = os.waitpid(pid, os.WNOHANG)
    chunks = -1 if finished else _finished_chunks(out)
    if not finished:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    run(out)
    manifest = json.loads((out / "manifest.json").read_text())
    resumed = int(manifest.get("counts", {}).get("resumed_prompts", 0))
    return Kill(command, at_s, chunks, resumed, False)


def soak(kills: int, seed: int, work: Path, log: Callable[[str], None] = print) -> list[Kill]:
    from workbench.tiny import build_tiny_model

    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    model_dir = build_tiny_model(work / "model", "llama", seed=0)
    run = runners(model_dir)
    rng = random.Random(seed)
    durations = {}
    for command, call in run.items():
        t0 = time.perf_counter()
        call(work / f"{command}-reference")
        durations[command] = time.perf_counter() - t0
        log(f"{command}: uninterrupted run {durations[command]:.2f} s")
    out: list[Kill] = []
    commands = list(run)
    for i in range(kills):
        command = commands[i % len(commands)]
        folder = work / f"{command}-{i:02d}"
        kill = kill_once(command, run[command], folder, rng.uniform(0, durations[command]))
        kill.identical = same_tables(command, work / f"{command}-reference", folder)
        log(
            f"kill {i + 1}/{kills}: {command} at {kill.at_s:.2f} s, "
            f"{kill.chunks_at_kill} chunks done, resumed {kill.resumed_prompts} prompts, "
            f"identical: {kill.identical}"
        )
        out.append(kill)
    return out


def table(kills: list[Kill], seconds: float, code: str = "unknown") -> str:
    lines = [
        "# Soak: SIGKILL at random points, then resume",
        "",
        "`python -m scripts.soak` (CPU, tiny random Llama, 168 prompts per command; "
        f"{len(kills)} kills, {seconds:.0f} s in all; git {code}). Every rerun is compared with an "
        "uninterrupted run: same rows, numbers equal bit for bit "
        "(activations: the index and every stored vector).",
        "",
        "| # | command | killed at (s) | chunks done at kill | prompts resumed | identical |",
        "|---|---|---|---|---|---|",
    ]
    for i, k in enumerate(kills, 1):
        chunks = "finished first" if k.chunks_at_kill < 0 else str(k.chunks_at_kill)
        lines.append(
            f"| {i} | {k.command} | {k.at_s:.2f} | {chunks} | {k.resumed_prompts} | "
            f"{'yes' if k.identical else '**no**'} |"
        )
    n_ok = sum(k.identical for k in kills)
    lines += ["", f"{n_ok} of {len(kills)} reruns identical to the uninterrupted run."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs in all")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--out", default="results/benchmarks/soak_cpu.md", help="table file, or -")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    code = short_git_hash()  # at the start: the runs use the code as it is now
    with tempfile.TemporaryDirectory() as tmp:
        kills = soak(args.kills, args.seed, Path(tmp), log=lambda s: print(s, file=sys.stderr))
    text = table(kills, time.perf_counter() - t0, code)
    if args.out == "-":
        print(text, end="")
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(k.identical for k in kills) else 1


if __name__ == "__main__":
    sys.exit(main())
