"""Commands that intervene along probe directions: steer and mediate."""

from __future__ import annotations

import argparse
from typing import Any

from workbench.cli.common import (
    add_model_args,
    add_run_args,
    is_main_rank,
    load_model_from_args,
    split_list,
)
from workbench.errors import WorkbenchError


def _alphas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in split_list(text) or ())
    except ValueError:
        raise WorkbenchError(
            f"--alphas {text!r}: expected comma-separated numbers", fix="e.g. --alphas 0,0.5,1,2,4"
        ) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--directions", required=True, help="probe run folder (workbench probe --out)")
    p.add_argument("--site", required=True, help="TransformerLens site the probe was fitted at")
    p.add_argument(
        "--probe-position",
        default=None,
        help="the probe's position label (answer, span_mean:F, span_last:F); default: the one "
        "closest to --positions",
    )
    p.add_argument(
        "--direction",
        default="pattern",
        choices=("pattern", "weight"),
        help="pattern: Cov(X) x probe weights (where the class is; default); weight: the weights",
    )
    p.add_argument("--random", type=int, default=3, help="random placebo seeds")
    p.add_argument("--questions", default=None, help="question ids (comma-separated)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per forward")
    p.add_argument("--out", required=True, help="run folder (re-running resumes it)")
    add_run_args(p)


def _add_steer_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "steer", help="add a probe's direction at a site over an alpha sweep, with placebos"
    )
    p.add_argument("study", help="study YAML file")
    add_model_args(p)
    p.add_argument("--probe", required=True, help="TARGET:CLASS (logistic) or TARGET (ridge)")
    p.add_argument("--positions", default="span", choices=("span", "answer", "all"))
    p.add_argument(
        "--alphas",
        default="0,0.25,0.5,1,2,4",
        help="multiples of the site's typical residual norm; must include 0",
    )
    p.add_argument(
        "--placebos", default="random,shuffled,other", help="comma-separated: random,shuffled,other"
    )
    p.add_argument("--other", default=None, help="TARGET[:CLASS] of the other-factor placebo")
    p.add_argument("--prompts", type=int, default=64, help="at most N on-target prompts")
    p.add_argument("--off-target", type=int, default=32, help="at most N off-target prompts")
    p.add_argument("--neutral-text", default=None, help="text whose log-likelihood measures damage")
    _common(p)
    p.set_defaults(func=cmd_steer)
    return p


def _add_mediate_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "mediate", help="ablate a factor probe's subspace at a site: share of the effect mediated"
    )
    p.add_argument("study", help="study YAML file")
    add_model_args(p)
    p.add_argument("--factor", required=True, help="the factor (a probe target of --directions)")
    p.add_argument("--positions", default="all", choices=("span", "answer", "all"))
    p.add_argument("--methods", default="project,mean_ablate", help="project, mean_ablate")
    p.add_argument("--pairs", type=int, default=256, help="at most N pairs (drawn with --seed)")
    _common(p)
    p.set_defaults(func=cmd_mediate)
    return p


def cmd_steer(args: argparse.Namespace) -> int:
    from workbench.interp.steering import NEUTRAL_TEXT, SteerConfig, preflight, steer
    from workbench.study.load import load_study

    study = load_study(args.study)
    config = SteerConfig(
        probe=args.probe,
        site=args.site,
        positions=args.positions,
        alphas=_alphas(args.alphas),
        probe_position=args.probe_position,
        direction=args.direction,
        placebos=split_list(args.placebos) or (),
        n_random=args.random,
        other=args.other,
        questions=split_list(args.questions),
        max_prompts=args.prompts,
        max_off_target=args.off_target,
        neutral_text=args.neutral_text or NEUTRAL_TEXT,
        seed=args.seed,
        n_boot=args.n_boot,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    run = preflight(study, config, args.directions)
    lm = load_model_from_args(args)
    result = steer(study, lm, run, config, args.out, overwrite=args.overwrite)
    if not is_main_rank():
        return 0
    t = result.steering
    shown = t[t["metric"].isin(["target_closure", "tv_unsteered", "selectivity"])]
    shown = shown[shown["role"] == "on_target"]
    wide = shown.pivot_table(index=["metric", "direction"], columns="alpha", values="value")
    print(f"norm scale {result.manifest['norm_scale']:.4g}; on-target means by alpha:")
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote steering.parquet and steering.png to {args.out} (manifest.json written last)")
    return 0


def cmd_mediate(args: argparse.Namespace) -> int:
    from workbench.interp.mediation import MediateConfig, mediate
    from workbench.study.load import load_study

    study = load_study(args.study)
    config = MediateConfig(
        factor=args.factor,
        site=args.site,
        positions=args.positions,
        probe_position=args.probe_position,
        methods=split_list(args.methods) or (),
        direction=args.direction,
        n_random=args.random,
        questions=split_list(args.questions),
        max_pairs=args.pairs,
        seed=args.seed,
        n_boot=args.n_boot,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    lm = load_model_from_args(args)
    result = mediate(study, lm, args.directions, config, args.out, overwrite=args.overwrite)
    if not is_main_rank():
        return 0
    cols = ["question_id", "method", "subspace", "effect", "effect_before", "effect_after"]
    cols += ["share_mediated", "ci_low", "ci_high"]
    print(result.mediation[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote mediation.parquet to {args.out} (manifest.json written last)")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_steer_parser(sub)
    _add_mediate_parser(sub)
