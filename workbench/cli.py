"""`workbench` command line. Every user error prints one message with its fix, no traceback.

workbench distributions STUDY.yaml --model MODEL --out DIR
workbench validate STUDY.yaml
workbench organism build [--out DIR] [--seed S] [--scale small|default]
workbench demo [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from workbench.errors import WorkbenchError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local model folder or hub id")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--device-map", default=None, help="'auto' spreads a large model over devices (accelerate)"
    )
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model's own code (off by default)",
    )


def _cmd_distributions(args: argparse.Namespace) -> int:
    from workbench.distributions import DistributionConfig, compute_distributions
    from workbench.models import load_model
    from workbench.study import load_study

    for flag in ("batch_size", "chunk_prompts"):
        if getattr(args, flag) < 1:
            raise WorkbenchError(
                f"--{flag.replace('_', '-')} must be at least 1", fix="pass a positive number"
            )
    study = load_study(args.study)
    lm = load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )
    config = DistributionConfig(
        batch_size=args.batch_size,
        share_prefix=not args.no_share_prefix,
        chunk_prompts=args.chunk_prompts,
        progress=not args.quiet,
    )
    result = compute_distributions(study, lm, args.out, config, overwrite=args.overwrite)
    n = len(result.prompts)
    print(f"wrote {n} prompts x options to {args.out} (manifest.json written last)")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from workbench.study import load_study

    study = load_study(args.study)
    n_q = len(study.questions)
    print(
        f"{args.study}: ok: {len(study.factors)} factors, {len(study.cells)} cells, {n_q} questions, "
        f"orders={study.orders.kind}, scoring={study.scoring.method}"
    )
    return 0


def _cmd_organism_build(args: argparse.Namespace) -> int:
    from workbench.organism import build_organism

    path = build_organism(args.out, seed=args.seed, scale=args.scale, force=args.force)
    print(f"organism ready in {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from workbench.demo import run_demo

    report = run_demo(args.out, scale=args.scale)
    print(f"demo report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Silicon-sample workbench.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distributions", help="exact logit-based answer distributions for a study")
    p.add_argument("study", help="study YAML file")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="run folder (re-running resumes it)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--chunk-prompts", type=int, default=256, help="prompts per chunk written to disk"
    )
    p.add_argument(
        "--no-share-prefix", action="store_true", help="do not reuse persona-prefix KV caches"
    )
    p.add_argument("--overwrite", action="store_true", help="discard an existing run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_distributions)

    p = sub.add_parser("validate", help="check a study file without a model")
    p.add_argument("study")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("organism", help="the planted-trait model organism")
    osub = p.add_subparsers(dest="organism_command", required=True)
    b = osub.add_parser("build", help="build (or reuse from cache) the organism")
    b.add_argument(
        "--out", default=None, help="folder (default: a cache keyed by the configuration)"
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--scale", choices=("small", "default"), default="default")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.set_defaults(func=_cmd_organism_build)

    p = sub.add_parser("demo", help="build the organism and run every capability on it")
    p.add_argument("--out", default="runs/demo", help="output folder (report.html, report.md)")
    p.add_argument("--scale", choices=("small", "default"), default="default")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return func(args)
    except WorkbenchError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(
            "interrupted: finished chunks are saved; re-run the same command to resume",
            file=sys.stderr,
        )
        return 130
    except FileNotFoundError as err:
        print(f"error: {err.filename}: no such file\n  fix: check the path", file=sys.stderr)
        return 2


def entry() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entry()
