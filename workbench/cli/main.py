"""`workbench` command line. Every user error prints one message with its fix, no traceback.

workbench distributions STUDY.yaml --model MODEL --out DIR
workbench sample STUDY.yaml --model MODEL --n N --temperature T --seed S --out DIR
workbench compare RUN_DIR [RUN_DIR ...] [--human FILE] --out DIR
workbench validate STUDY.yaml
workbench effects RUN_DIR --out DIR [--baseline FACTOR=LEVEL ...] [--n-boot N] [--seed S]
workbench activations STUDY.yaml --model MODEL --sites SITES --positions POSITIONS --out DIR
workbench probe ACTIVATIONS_DIR (--study PROBES.yaml | --target T ...) [--distributions DIR]
workbench patch STUDY.yaml --model MODEL --factor F [--sites S] [--positions P] --out DIR
workbench attribute STUDY.yaml --model MODEL --method atp|ig [--factor F,...] --out DIR
workbench steer STUDY.yaml --model MODEL --directions PROBE_DIR --probe T[:CLASS] --site S --out DIR
workbench mediate STUDY.yaml --model MODEL --directions PROBE_DIR --factor F --site S --out DIR
workbench organism build [--out DIR] [--seed S] [--scale small|default]
workbench demo [--out DIR]

Exit codes: 0 done; 2 bad input (a study, option, file or output folder: the message names it
and the fix); 3 a model that cannot be loaded; 130 interrupted (finished chunks are kept: rerun
the same command to resume); 1 an unexpected error (a bug: the traceback is printed).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from workbench.cli import interp, measure, steering
from workbench.cli.common import DATA_PARALLEL, show_defaults
from workbench.errors import WorkbenchError


def _cmd_organism_build(args: argparse.Namespace) -> int:
    from workbench.organism.build import build_organism

    path = build_organism(args.out, seed=args.seed, scale=args.scale, force=args.force)
    print(f"organism ready in {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from workbench.demo.pipeline import run_demo

    report = run_demo(args.out, scale=args.scale)
    print(f"demo report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Silicon-sample workbench.")
    sub = parser.add_subparsers(dest="command", required=True)

    measure.register(sub)
    interp.register(sub)
    steering.register(sub)

    p = sub.add_parser("organism", help="the planted-trait model organism")
    osub = p.add_subparsers(dest="organism_command", required=True)
    b = osub.add_parser("build", help="build (or reuse from cache) the organism")
    b.add_argument(
        "--out", default=None, help="folder (default: a cache keyed by the configuration)"
    )
    b.add_argument("--seed", type=int, default=0, help="seed of the organism's world and training")
    b.add_argument(
        "--scale",
        choices=("small", "default"),
        default="default",
        help="small is for tests (a smaller study and model)",
    )
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.set_defaults(func=_cmd_organism_build)

    p = sub.add_parser("demo", help="build the organism and run every capability on it")
    p.add_argument("--out", default="runs/demo", help="output folder (report.html, report.md)")
    p.add_argument(
        "--scale",
        choices=("small", "default"),
        default="default",
        help="organism scale (small: quicker, for a first look)",
    )
    p.set_defaults(func=_cmd_demo)
    for command in sub.choices.values():
        show_defaults(command)
    return parser


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; under a torchrun / accelerate launch, a command that does not split
    its work (probe, effects, compare, report, demo, ...) runs on rank 0 alone while the
    other ranks wait for it and exit 0, so no two processes write the same files."""
    from workbench import distributed

    ranks = distributed.launched()
    if not ranks.active or args.command in DATA_PARALLEL:
        return func(args)
    distributed.current()
    try:
        if not ranks.is_main:
            return 0
        with distributed.alone():
            return func(args)
    finally:
        distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return _run(func, args)
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
