"""Benchmark the model organism: build time, truth recovery, zero-effect factors, determinism.

Builds the organism from scratch (never from the cache) into a temporary folder, extracts its
logit distributions with the real pipeline (`workbench.distributions.compute_distributions`,
float32, full-vocabulary softmax) and scores them against `truth.parquet`.

Usage:
    python -m scripts.bench_organism                       # default scale, seed 0
    python -m scripts.bench_organism --scale small --seed 1
    python -m scripts.bench_organism --determinism         # builds twice, compares weights
    python -m scripts.bench_organism --write results/benchmarks/organism_build.md

Build time is machine- and load-dependent: run it on an otherwise idle machine (the issue's
budget is 120 s for the default scale on two CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from workbench.distributions import DistributionConfig, compute_distributions
from workbench.models import load_model
from workbench.organism import MODEL_DIR, SPEC_FILE, STUDY_FILE, build_organism, organism_quality
from workbench.study import load_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["small", "default"], default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--determinism", action="store_true", help="build twice, compare hashes")
    parser.add_argument("--write", type=Path, help="also write the table as markdown here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        folder = build_organism(Path(tmp) / "a", seed=args.seed, scale=args.scale, force=True)
        build_s = time.time() - t0
        spec = json.loads((folder / SPEC_FILE).read_text())
        second = None
        if args.determinism:
            other = build_organism(
                Path(tmp) / "b", seed=args.seed, scale=args.scale, progress=False
            )
            second = json.loads((other / SPEC_FILE).read_text())["weights_sha256"]

        t1 = time.time()
        study = load_study(folder / STUDY_FILE)
        lm = load_model(folder / MODEL_DIR, dtype="float32", device="cpu")
        res = compute_distributions(
            study, lm, None, DistributionConfig(batch_size=64, progress=False)
        )
        extract_s = time.time() - t1
        q = organism_quality(folder, res.prompts, res.distributions, res.prompt_stats)

    rows = [
        ("scale / seed", f"{args.scale} / {args.seed}"),
        ("build time (s, wall)", f"{build_s:.1f}"),
        ("  of which optimisation (s)", f"{spec['timings_s']['train_optimise']:.1f}"),
        ("extraction time (s, pipeline)", f"{extract_s:.1f}"),
        ("parameters", f"{spec['training']['n_parameters']:,}"),
        ("prompts scored", f"{q.n_prompts}"),
        ("JS distance, rating, held-out titles (bound 0.05)", f"{q.js_held_out:.4f}"),
        ("JS distance, rating, seen titles", f"{q.js_seen:.4f}"),
        ("JS distance, rating, held-out, coarse personas", f"{q.js_coarse:.4f}"),
        ("JS distance, attitude (substantive options)", f"{q.js_attitude:.4f}"),
        ("refusal share error, attitude", f"{q.refusal_error:.4f}"),
        ("TV to truth, rating, held-out (noise level)", f"{q.tv_error:.4f}"),
    ]
    for f in q.factor_tv:
        rows.append(
            (
                f"TV between prompts differing only in {f} (truth)",
                f"{q.factor_tv[f]:.4f} ({q.truth_factor_tv[f]:.4f})",
            )
        )
    rows.append(
        (
            "first-token mass on ' Sure' (planted)",
            f"{q.first_token_mass:.4f} ({spec['preamble']['share']})",
        )
    )
    rows.append(("weights sha256", spec["weights_sha256"][:16]))
    if second is not None:
        rows.append(("second build identical", str(second == spec["weights_sha256"])))

    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.write:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        lines = [
            "# Model organism build benchmark",
            "",
            f"`python -m scripts.bench_organism --scale {args.scale} --seed {args.seed}"
            + (" --determinism" if args.determinism else "")
            + f"` on {machine}.",
            "",
            "| measure | value |",
            "|---|---|",
            *[f"| {name} | {value} |" for name, value in rows],
            "",
        ]
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
