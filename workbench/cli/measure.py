"""Commands that run a study and compare what it measured: validate, distributions, sample,
compare, report."""

from __future__ import annotations

import argparse

from workbench.cli.common import add_model_args, add_run_args, check_out, load_model_from_args
from workbench.errors import WorkbenchError


def _cmd_distributions(args: argparse.Namespace) -> int:
    from workbench.measure.distributions import DistributionConfig, compute_distributions
    from workbench.study.load import load_study

    for flag in ("batch_size", "chunk_prompts"):
        if getattr(args, flag) < 1:
            raise WorkbenchError(
                f"--{flag.replace('_', '-')} must be at least 1", fix="pass a positive number"
            )
    study = load_study(args.study)
    check_out(args, "distributions", study.name)
    lm = load_model_from_args(args)
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


def _cmd_sample(args: argparse.Namespace) -> int:
    from workbench.measure.sampling import SamplingConfig, compute_samples
    from workbench.study.load import load_study

    config = SamplingConfig(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_rows=args.batch_rows,
        constrain=args.constrain,
        verbalized=True if args.verbalized else None,
        answer_position=not args.no_answer_position,
        chunk_prompts=args.chunk_prompts,
        progress=not args.quiet,
    )
    config.validate()
    study = load_study(args.study)
    check_out(args, "sampling", study.name)
    lm = load_model_from_args(args)
    result = compute_samples(study, lm, args.out, config, overwrite=args.overwrite)
    counts = result.samples["status"].value_counts().to_dict()
    print(
        f"wrote {len(result.samples)} samples of {len(result.prompts)} prompts to {args.out} "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}; manifest.json written last)"
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from workbench.compare.comparison import CompareConfig, compare
    from workbench.study.load import load_study

    if args.resamples < 1:
        raise WorkbenchError("--resamples must be at least 1", fix="pass a positive number")
    if args.names is not None and len(args.names) != len(args.runs):
        raise WorkbenchError(
            f"{len(args.names)} --names for {len(args.runs)} run folders",
            fix="give one name per RUN_DIR, in the same order",
        )
    config = CompareConfig(
        n_resamples=args.resamples,
        seed=args.seed,
        human_prob_column=args.human_prob_column,
        human_label=args.human_label,
    )
    if not args.runs and not (args.human and args.study):
        raise WorkbenchError(
            "nothing to compare",
            fix="pass RUN_DIR..., or --human FILE --study STUDY to describe human data alone",
        )
    study = load_study(args.study) if args.study else None
    result = compare(args.runs, args.human, args.out, config, names=args.names, study=study)
    if len(result.coverage):
        from workbench.compare.coverage import summary_lines

        print("human data coverage:\n  " + "\n  ".join(summary_lines(result.coverage)))
    print(
        f"compared {len(result.sources)} sources"
        + (" with human data" if args.human else "")
        + f": tables, figures and report.html in {args.out}"
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from workbench.compare.run_report import ReportConfig, run_report
    from workbench.study.load import load_study

    study = load_study(args.study) if args.study else None
    config = ReportConfig(human_prob_column=args.human_prob_column, human_label=args.human_label)
    out = run_report(args.runs, args.out, args.human, config, study=study)
    print(f"wrote {out / 'report.html'} (standalone) and report.md")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from workbench.study.load import load_study, nominal_notes

    study = load_study(args.study)
    counts = (
        (len(study.factors), "factor"),
        (len(study.cells), "cell"),
        (len(study.questions), "question"),
    )
    listed = ", ".join(f"{n:,} {word}{'' if n == 1 else 's'}" for n, word in counts)
    print(f"{args.study}: ok: {listed}, orders={study.orders.kind}, scoring={study.scoring.method}")
    for note in nominal_notes(study):
        print(f"  note: {note}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("distributions", help="exact logit-based answer distributions for a study")
    p.add_argument("study", help="study YAML file")
    add_model_args(p)
    p.add_argument("--out", required=True, help="run folder (re-running resumes it)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument(
        "--chunk-prompts", type=int, default=256, help="prompts per chunk written to disk"
    )
    p.add_argument(
        "--no-share-prefix", action="store_true", help="do not reuse persona-prefix KV caches"
    )
    add_run_args(p)
    p.set_defaults(func=_cmd_distributions)

    p = sub.add_parser("sample", help="N sampled (or verbalized) answers per prompt, parsed")
    p.add_argument("study", help="study YAML file")
    add_model_args(p)
    p.add_argument("--out", required=True, help="run folder (re-running resumes it)")
    p.add_argument("--n", type=int, default=100, help="completions per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="default 24 (answers), 160 (verbalized)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--constrain",
        action="store_true",
        help="draw the first token among the option labels only (guided choice)",
    )
    p.add_argument(
        "--verbalized",
        action="store_true",
        help="ask for a JSON object of percentages (also: `sampling.verbalized: true`)",
    )
    p.add_argument(
        "--no-answer-position",
        action="store_true",
        help="skip the answer-position (teacher-forced) distributions",
    )
    p.add_argument(
        "--batch-rows",
        type=int,
        default=2048,
        help="samples decoded together per wave (speed and memory only; changes no draw)",
    )
    p.add_argument(
        "--chunk-prompts", type=int, default=256, help="prompts per chunk written to disk"
    )
    add_run_args(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("compare", help="compare run folders with each other and human data")
    p.add_argument(
        "runs",
        nargs="*",
        metavar="RUN_DIR",
        help="finished run folders (none: --human and --study describe human data alone)",
    )
    p.add_argument("--human", default=None, help="human data (CSV, parquet, JSONL; see README)")
    p.add_argument("--out", required=True, help="output folder (tables, figures, report)")
    p.add_argument(
        "--names", nargs="+", default=None, help="a name per RUN_DIR (default: folder names)"
    )
    p.add_argument("--study", default=None, help="study file (default: the first run's manifest)")
    p.add_argument(
        "--human-prob-column", default="prob", help="proportions file: the probability column"
    )
    p.add_argument("--human-label", default="human", help="name of the human source in tables")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("report", help="a standalone report of run folders (and human data)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run folders")
    p.add_argument("--human", default=None, help="human data: adds the comparison's tables")
    p.add_argument("--out", required=True, help="output folder (report.html, report.md, PNGs)")
    p.add_argument("--study", default=None, help="study file (default: the first run's manifest)")
    p.add_argument(
        "--human-prob-column", default="prob", help="proportions file: the probability column"
    )
    p.add_argument("--human-label", default="human", help="name of the human source in tables")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("validate", help="check a study file without a model")
    p.add_argument("study", help="study YAML file")
    p.set_defaults(func=_cmd_validate)
