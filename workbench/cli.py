"""`workbench` command line. Every user error prints one message with its fix, no traceback.

workbench distributions STUDY.yaml --model MODEL --out DIR
workbench sample STUDY.yaml --model MODEL --n N --temperature T --seed S --out DIR
workbench compare RUN_DIR [RUN_DIR ...] [--human FILE] --out DIR
workbench validate STUDY.yaml
workbench activations STUDY.yaml --model MODEL --sites SITES --positions POSITIONS --out DIR
workbench probe ACTIVATIONS_DIR (--study PROBES.yaml | --target T ...) [--distributions DIR]
workbench patch STUDY.yaml --model MODEL --factor F [--sites S] [--positions P] --out DIR
workbench organism build [--out DIR] [--seed S] [--scale small|default]
workbench demo [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.engine.models import LoadedModel


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


def _load_model(args: argparse.Namespace) -> LoadedModel:
    """The model named by the options `_add_model_args` defines."""
    from workbench.engine.models import load_model

    return load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )


def _cmd_distributions(args: argparse.Namespace) -> int:
    from workbench.measure.distributions import DistributionConfig, compute_distributions
    from workbench.study.load import load_study

    for flag in ("batch_size", "chunk_prompts"):
        if getattr(args, flag) < 1:
            raise WorkbenchError(
                f"--{flag.replace('_', '-')} must be at least 1", fix="pass a positive number"
            )
    study = load_study(args.study)
    lm = _load_model(args)
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
    lm = _load_model(args)
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
    study = load_study(args.study) if args.study else None
    result = compare(args.runs, args.human, args.out, config, names=args.names, study=study)
    print(
        f"compared {len(result.sources)} sources"
        + (" with human data" if args.human else "")
        + f": tables, figures and report.html in {args.out}"
    )
    return 0


def _split(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(t.strip() for t in text.split(",") if t.strip())


def _cmd_activations(args: argparse.Namespace) -> int:
    from workbench.interp.activations import ActivationConfig, capture_activations
    from workbench.study.load import load_study

    study = load_study(args.study)
    config = ActivationConfig(
        sites=_split(args.sites) or (),
        positions=_split(args.positions) or (),
        factors=_split(args.factors),
        questions=_split(args.questions),
        store_dtype=args.store_dtype,
        batch_size=args.batch_size,
        chunk_prompts=args.chunk_prompts,
        backend=args.backend,
        progress=not args.quiet,
    )
    lm = _load_model(args)
    store = capture_activations(study, lm, args.out, config, overwrite=args.overwrite)
    print(f"wrote {len(store.index):,} vectors to {args.out} (manifest.json written last)")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from workbench.interp.activations import ActivationStore
    from workbench.interp.probe_study import ProbeConfig, ProbeSpec, load_probe_study
    from workbench.interp.probing import run_probes

    if (args.study is None) == (not args.target):
        raise WorkbenchError(
            "give a probe study (--study FILE) or one or more --target, not both",
            fix="e.g. --study probes/organism.yaml, or --target actor --positions answer",
        )
    if args.study is not None:
        config = load_probe_study(args.study)
    else:
        positions = _split(args.positions) or ("answer",)
        config = ProbeConfig(probes=tuple(ProbeSpec(t, positions) for t in args.target))
    overrides = {
        "sites": _split(args.sites),
        "questions": _split(args.questions),
        "group_by": args.group_by,
        "n_folds": args.folds,
        "opinion": args.opinion,
    }
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    store = ActivationStore.open(args.activations)
    out = args.out or str(Path(args.activations) / "probes")
    result = run_probes(
        store, config, out, distributions=args.distributions, overwrite=args.overwrite
    )
    real = result.probes[result.probes["control"] == "none"]
    best = real.sort_values("mean", ascending=False).drop_duplicates(["target", "position_label"])
    cols = ["target", "position_label", "site", "metric", "mean", "chance", "selectivity"]
    print(best[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote probes.parquet, directions and plots to {out} (manifest.json written last)")
    return 0


def _cmd_patch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workbench.interp.pairs import factor_pairs
    from workbench.interp.patching import PatchConfig, patch_factor
    from workbench.study import prompts as P
    from workbench.study.load import load_study

    study = load_study(args.study)
    factors = _split(args.factor) or ()
    config = PatchConfig(
        sites=_split(args.sites) or (),
        positions=_split(args.positions) or (),
        directions=_split(args.directions) or (),
        questions=_split(args.questions),
        max_pairs=args.pairs,
        seed=args.seed,
        batch_size=args.batch_size,
        chunk_pairs=args.chunk_pairs,
        progress=not args.quiet,
    )
    lm = _load_model(args)
    # Every factor's pairs are checked before the first forward pass: one bad factor must
    # not cost the others' work.
    prompts = P.render(study, lm.tokenizer)
    for factor in factors:
        factor_pairs(study, prompts, factor, questions=config.questions)
    for factor in factors:
        out = Path(args.out) if len(factors) == 1 else Path(args.out) / factor
        result = patch_factor(study, lm, factor, out, config, overwrite=args.overwrite)
        t = result.patching
        t = t[t["metric"] == "normalized_effect"]
        best = t.sort_values("effect", ascending=False).drop_duplicates(
            ["question_id", "direction"]
        )
        cols = ["question_id", "direction", "site", "position", "effect", "ci_low", "ci_high"]
        print(f"{factor}: best site per direction (normalized effect)")
        print(best[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"wrote patching.parquet and the heatmap to {out} (manifest.json written last)")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from workbench.study.load import load_study

    study = load_study(args.study)
    n_q = len(study.questions)
    print(
        f"{args.study}: ok: {len(study.factors)} factors, {len(study.cells)} cells, {n_q} questions, "
        f"orders={study.orders.kind}, scoring={study.scoring.method}"
    )
    return 0


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

    p = sub.add_parser("sample", help="N sampled (or verbalized) answers per prompt, parsed")
    p.add_argument("study", help="study YAML file")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="run folder (re-running resumes it)")
    p.add_argument("--n", type=int, default=100, help="completions per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="default 24 (answers), 160 (verbalized)"
    )
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--batch-rows", type=int, default=2048, help="decoding rows per wave")
    p.add_argument(
        "--chunk-prompts", type=int, default=256, help="prompts per chunk written to disk"
    )
    p.add_argument("--overwrite", action="store_true", help="discard an existing run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("compare", help="compare run folders with each other and human data")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run folders")
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
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("activations", help="store activations at sites x positions for a study")
    p.add_argument("study", help="study YAML file")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="run folder (re-running resumes it)")
    p.add_argument(
        "--sites",
        default="blocks.*.hook_resid_post",
        help="comma-separated TransformerLens site names or globs: hook_embed, "
        "blocks.*.hook_resid_post, blocks.3.hook_attn_out, blocks.*.hook_mlp_out ...",
    )
    p.add_argument(
        "--positions",
        default="answer,span_mean,span_last",
        help="comma-separated: answer (last prompt token), span_mean, span_last (factor spans)",
    )
    p.add_argument("--factors", default=None, help="factors whose spans are kept (default: all)")
    p.add_argument("--questions", default=None, help="question ids to capture (default: all)")
    p.add_argument("--store-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument(
        "--backend",
        choices=("hf", "bridge"),
        default="hf",
        help="hf: forward hooks on HF modules; bridge: TransformerLens hook points",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-prompts", type=int, default=256, help="prompts per shard")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_activations)

    p = sub.add_parser("probe", help="linear probes with grouped CV and controls")
    p.add_argument("activations", help="activations run folder")
    p.add_argument("--study", default=None, help="probe study YAML (see probes/organism.yaml)")
    p.add_argument(
        "--target",
        action="append",
        default=[],
        help="a factor, or expected_score / modal_option_id ... (needs --distributions); "
        "repeatable",
    )
    p.add_argument(
        "--positions",
        default=None,
        help="for --target: comma-separated answer, span_mean:FACTOR, span_last:FACTOR",
    )
    p.add_argument("--sites", default=None, help="stored sites or globs (comma-separated)")
    p.add_argument("--questions", default=None, help="question ids (comma-separated)")
    p.add_argument("--group-by", default=None, help="held-out groups: title, persona_id ...")
    p.add_argument("--folds", type=int, default=None)
    p.add_argument("--opinion", default=None, help="target related to every factor")
    p.add_argument(
        "--distributions", default=None, help="distributions run of the same study and model"
    )
    p.add_argument("--out", default=None, help="probe run folder (default: ACTIVATIONS/probes)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing probe folder")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("patch", help="counterfactual activation patching of a factor's span")
    p.add_argument("study", help="study YAML file")
    _add_model_args(p)
    p.add_argument(
        "--factor", required=True, help="factor(s) to patch, comma-separated (one folder each)"
    )
    p.add_argument("--out", required=True, help="run folder (re-running resumes it)")
    p.add_argument(
        "--sites",
        default="blocks.*.hook_resid_pre,blocks.*.hook_attn_out,blocks.*.hook_mlp_out,"
        "blocks.*.hook_resid_post",
        help="comma-separated TransformerLens site names or globs",
    )
    p.add_argument(
        "--positions",
        default="span_last,span_mean,answer,persona_last",
        help="comma-separated: span_last, span_mean, answer, persona_last, all",
    )
    p.add_argument("--directions", default="denoising,noising")
    p.add_argument("--questions", default=None, help="question ids (default: all with pairs)")
    p.add_argument("--pairs", type=int, default=None, help="at most N pairs (drawn with --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="patched forwards per batch")
    p.add_argument("--chunk-pairs", type=int, default=64, help="pairs per chunk on disk")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_patch)

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
