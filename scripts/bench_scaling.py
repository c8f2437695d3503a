"""Scaling curves: time, throughput and peak memory against the number of prompts.

Usage (from the repository root)::

    python -m scripts.bench_scaling                      # -> results/benchmarks/scaling_cpu.{md,png}
    python -m scripts.bench_scaling --sizes 100 1000 --out -   # a quick look, writes nothing
    python -m scripts.bench_scaling --kinds distributions --sizes 100 1000 10000 100000

The study: `scripts.bench_distributions`' synthetic persona x agree/disagree study with the
short persona prefix and `next_token` label scoring, 5 options, scaled to N prompts
(N <= 10,000: N/10 personas x 10 questions; above: 1,000 personas x N/1,000 questions), on the
tiny random-weight Llama (`--d-model` x `--layers`, tokenizer trained on the study's text).

Each point runs in its own process (so the peak resident memory is its own): the model loads,
the study renders, then one timed call writes a run folder in a temporary directory:

- `distributions`: `compute_distributions` (float32 full-vocabulary softmax, the tables);
- `sampling`: `compute_samples` with `--samples` completions per prompt, at most 4 new tokens;
- `activations`: `capture_activations` of `blocks.*.hook_resid_post` at the answer position.

Reported per point: wall time of the call, prompts/s, peak RSS of the process (MiB, model and
libraries included) and the growth of the peak during the call. `torch.set_num_threads(1)`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workbench.runs import short_git_hash

REPO = Path(__file__).resolve().parents[1]
KINDS = ("distributions", "sampling", "activations")


def study_raw(n_prompts: int, seed: int) -> dict[str, Any]:
    from scripts.bench_distributions import study_dict

    questions = 10 if n_prompts <= 10_000 else n_prompts // 1_000
    personas = max(1, n_prompts // questions)
    return study_dict(personas, questions, 5, seed, persona="short", scoring="next_token")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def point(kind: str, n_prompts: int, model_dir: Path, seed: int, samples: int) -> dict[str, Any]:
    """One measurement, in this process (the parent runs each in a fresh one)."""
    import torch

    from workbench.engine.models import load_model
    from workbench.study.load import parse_study

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    lm = load_model(model_dir, dtype="float32", device="cpu")
    study = parse_study(study_raw(n_prompts, seed), "<scaling>")
    before = _rss_mib()
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        t0 = time.perf_counter()
        if kind == "distributions":
            from workbench.measure.distributions import DistributionConfig, compute_distributions

            res = compute_distributions(study, lm, tmp, DistributionConfig(progress=False))
            n = len(res.prompts)
        elif kind == "sampling":
            from workbench.measure.sampling import SamplingConfig, compute_samples

            cfg = SamplingConfig(n=samples, max_new_tokens=4, progress=False)
            sres = compute_samples(study, lm, tmp, cfg)
            n = int(sres.manifest["counts"]["prompts"]) if sres.manifest else n_prompts
        else:
            from workbench.interp.activations import ActivationConfig, capture_activations

            acfg = ActivationConfig(
                sites=("blocks.*.hook_resid_post",), positions=("answer",), progress=False
            )
            capture_activations(study, lm, tmp, acfg, log=lambda _: None)
            n = n_prompts
        elapsed = time.perf_counter() - t0
    return {
        "kind": kind,
        "prompts": n,
        "seconds": elapsed,
        "prompts_per_s": n / elapsed,
        "peak_rss_mib": _rss_mib(),
        "peak_growth_mib": _rss_mib() - before,
    }


def build(model_dir: Path, d_model: int, layers: int, seed: int) -> None:
    from scripts.bench_distributions import corpus
    from workbench.tiny import build_tiny_model

    texts = corpus(study_raw(100_000, seed))
    build_tiny_model(
        model_dir,
        "llama",
        seed=seed,
        texts=texts,
        vocab_size=1024,
        d_model=d_model,
        n_layers=layers,
    )


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind in KINDS:
        pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["prompts"])
        if not pts:
            continue
        xs = [r["prompts"] for r in pts]
        axes[0].plot(xs, [r["prompts_per_s"] for r in pts], marker="o", label=kind)
        axes[1].plot(xs, [r["peak_rss_mib"] for r in pts], marker="o", label=kind)
    for ax, label in zip(axes, ("prompts / s", "peak RSS (MiB)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("prompts")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle("workbench on the tiny model, 1 CPU thread")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict[str, Any]], command: str, note: str, png: str) -> str:
    head = ["kind", "prompts", "seconds", "prompts/s", "peak RSS MiB", "peak growth MiB"]
    body = [
        [
            r["kind"],
            f"{r['prompts']:,}",
            f"{r['seconds']:.2f}",
            f"{r['prompts_per_s']:,.0f}",
            f"{r['peak_rss_mib']:,.0f}",
            f"{r['peak_growth_mib']:,.0f}",
        ]
        for r in rows
    ]
    return "\n".join(
        [
            "# Scaling: time and peak memory against the number of prompts",
            "",
            f"- Command: `{command}`",
            f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- {note}",
            f"- Figure: [{png}]({png})",
            "",
            "| " + " | ".join(head) + " |",
            "|---|" + "---:|" * (len(head) - 1),
            *("| " + " | ".join(r) + " |" for r in body),
            "",
            "Each point is one process: load the model, render the study, one timed call that "
            "writes a run folder to a temporary directory. Peak RSS includes the model, torch and "
            "the libraries (the floor at 100 prompts); peak growth is the rise of the peak during "
            "the call.",
            "",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.bench_scaling", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[100, 1_000, 10_000, 100_000])
    ap.add_argument(
        "--max-sampling",
        type=int,
        default=10_000,
        help="largest study sampled (sampling is the slow stage; default 10,000)",
    )
    ap.add_argument("--samples", type=int, default=10, help="completions per prompt (sampling)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "scaling_cpu.md"))
    ap.add_argument("--point", nargs=3, metavar=("KIND", "N", "MODEL_DIR"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.point:
        kind, n, model_dir = args.point
        print(json.dumps(point(kind, int(n), Path(model_dir), args.seed, args.samples)))
        return []
    command = " ".join(
        ["python -m scripts.bench_scaling", shlex.join(argv if argv is not None else sys.argv[1:])]
    ).strip()
    code = short_git_hash()  # at the start: the points run the code as it is now
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-model-") as tmp:
        model_dir = Path(tmp) / "tiny"
        build(model_dir, args.d_model, args.layers, args.seed)
        for kind in args.kinds:
            for n in args.sizes:
                if kind == "sampling" and n > args.max_sampling:
                    continue
                cmd = [sys.executable, "-m", "scripts.bench_scaling", "--point", kind, str(n)]
                cmd += [str(model_dir), "--seed", str(args.seed), "--samples", str(args.samples)]
                env = {**os.environ, "TQDM_DISABLE": "1"}
                done = subprocess.run(
                    cmd, cwd=REPO, capture_output=True, text=True, env=env, check=False
                )
                if done.returncode != 0:
                    raise SystemExit(f"{kind} at {n} prompts failed:\n{done.stderr[-3000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{kind:<14} {row['prompts']:>7,} prompts {row['seconds']:8.2f} s "
                    f"{row['prompts_per_s']:9,.0f} prompts/s  peak {row['peak_rss_mib']:7,.0f} MiB"
                )
    if args.out != "-":
        out = Path(args.out)
        png = out.with_suffix(".png")
        figure(rows, png)
        note = (
            f"Model: tiny random Llama, {args.d_model} hidden x {args.layers} layers, float32 on CPU, "
            f"1 torch thread; {os.cpu_count()} CPU cores; study: short persona, next_token, 5 options "
            "(up to 10,000 prompts: N/10 personas x 10 questions; 100,000: 1,000 x 100); "
            f"sampling: {args.samples} completions per prompt, at most 4 new tokens; git {code}"
        )
        out.write_text(markdown(rows, command, note, png.name), encoding="utf-8")
        print(f"wrote {out} and {png}")
    return rows


if __name__ == "__main__":
    main()
