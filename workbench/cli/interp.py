"""Commands that look inside the model or explain its answers: activations, probe, patch,
attribute, effects."""

from __future__ import annotations

import argparse

from workbench.cli.common import (
    add_model_args,
    add_run_args,
    check_out,
    is_main_rank,
    load_model_from_args,
    split_list,
)
from workbench.errors import WorkbenchError


def _cmd_activations(args: argparse.Namespace) -> int:
    from workbench.interp.activations import ActivationConfig, capture_activations
    from workbench.study.load import load_study

    study = load_study(args.study)
    config = ActivationConfig(
        sites=split_list(args.sites) or (),
        positions=split_list(args.positions) or (),
        factors=split_list(args.factors),
        questions=split_list(args.questions),
        store_dtype=args.store_dtype,
        batch_size=args.batch_size,
        chunk_prompts=args.chunk_prompts,
        backend=args.backend,
        progress=not args.quiet,
    )
    check_out(args, "activations", study.name)
    lm = load_model_from_args(args)
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
        positions = split_list(args.positions) or ("answer",)
        config = ProbeConfig(probes=tuple(ProbeSpec(t, positions) for t in args.target))
    overrides = {
        "sites": split_list(args.sites),
        "questions": split_list(args.questions),
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
    factors = split_list(args.factor) or ()
    config = PatchConfig(
        sites=split_list(args.sites) or (),
        positions=split_list(args.positions) or (),
        directions=split_list(args.directions) or (),
        questions=split_list(args.questions),
        max_pairs=args.pairs,
        seed=args.seed,
        batch_size=args.batch_size,
        chunk_pairs=args.chunk_pairs,
        progress=not args.quiet,
    )
    lm = load_model_from_args(args)
    # Every factor's pairs are checked before the first forward pass: one bad factor must
    # not cost the others' work.
    prompts = P.render(study, lm.tokenizer)
    for factor in factors:
        factor_pairs(study, prompts, factor, questions=config.questions)
    for factor in factors:
        out = Path(args.out) if len(factors) == 1 else Path(args.out) / factor
        result = patch_factor(study, lm, factor, out, config, overwrite=args.overwrite)
        if not is_main_rank():
            continue
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


def _cmd_attribute(args: argparse.Namespace) -> int:
    import pandas as pd

    from workbench.interp.attribution import AttributionConfig, attribute
    from workbench.study.load import load_study

    study = load_study(args.study)
    options = split_list(args.options)
    if options is not None and len(options) != 2:
        raise WorkbenchError(
            f"--options {args.options!r}: expected two option texts",
            fix="e.g. --options Excellent,Terrible",
        )
    config = AttributionConfig(
        metric=args.metric,
        options=None if options is None else (options[0], options[1]),
        questions=split_list(args.questions),
        sites=split_list(args.sites) or (),
        positions=split_list(args.positions) or (),
        directions=split_list(args.directions) or (),
        max_pairs=args.pairs,
        top_k=args.top_k,
        patching=split_list(args.patching) or (),
        baselines=split_list(args.baseline) or (),
        n_steps=args.steps,
        integration=args.integration,
        max_prompts=args.prompts,
        seed=args.seed,
        batch_size=args.batch_size,
        chunk_units=args.chunk_units,
        progress=not args.quiet,
    )
    lm = load_model_from_args(args)
    result = attribute(
        study, lm, args.method, args.out, config, split_list(args.factor), overwrite=args.overwrite
    )
    if not is_main_rank():
        return 0
    t = result.attribution

    def show(frame: pd.DataFrame) -> str:
        return str(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    if args.method == "atp":
        t = t[t["statistic"] == "normalized_effect"]
        t = t.reindex(t["score"].abs().sort_values(ascending=False).index)
        cols = ["factor", "site", "position", "direction", "score", "ci_low", "ci_high"]
        print(f"AtP normalized effect ({config.metric}), top cells per factor:")
        print(show(t.groupby(["question_id", "factor"]).head(5)[["question_id", *cols]]))
        if len(result.agreement):
            print("agreement with real patching:")
            print(show(result.agreement))
        cost = result.manifest.get("cost")
        if cost:
            print(f"cost: {cost['forward_equivalents_per_pair']:.1f} forward-equivalents per pair")
    else:
        t = t[t["statistic"].isin(["share", "completeness_error", "metric_difference"])]
        wide = t.pivot_table(
            index=["question_id", "baseline", "factor"], columns="statistic", values="score"
        )
        print(f"IG over input embeddings ({config.metric}): span shares and completeness")
        print(wide.to_string(float_format=lambda v: f"{v:.4f}"))
        if result.manifest.get("incomplete"):
            print(f"completeness error > 5%: {', '.join(result.manifest['incomplete'])}; "
                  "raise --steps")  # fmt: skip
    print(f"wrote attribution.parquet to {args.out} (manifest.json written last)")
    return 0


def _cmd_effects(args: argparse.Namespace) -> int:
    from workbench.interp.effects import EffectsConfig, compute_effects

    baselines = []
    for item in args.baseline:
        factor, sep, level = item.partition("=")
        if not sep or not factor.strip() or not level.strip():
            raise WorkbenchError(
                f"--baseline {item!r}: expected FACTOR=LEVEL", fix="e.g. --baseline actor=Ava Stone"
            )
        baselines.append((factor.strip(), level.strip()))
    config = EffectsConfig(
        baselines=tuple(baselines),
        n_boot=args.n_boot,
        seed=args.seed,
        cluster=args.cluster,
        questions=split_list(args.questions) or (),
    )
    result = compute_effects(args.run, args.out, config, overwrite=args.overwrite)
    print(
        f"wrote {len(result.effects)} AMCEs and {len(result.importance)} importance rows to "
        f"{args.out} (manifest.json written last)"
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("activations", help="store activations at sites x positions for a study")
    p.add_argument("study", help="study YAML file")
    add_model_args(p)
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
    p.add_argument(
        "--store-dtype",
        choices=("float16", "float32"),
        default="float16",
        help="dtype of the stored vectors",
    )
    p.add_argument(
        "--backend",
        choices=("hf", "bridge"),
        default="hf",
        help="hf: forward hooks on HF modules; bridge: TransformerLens hook points",
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    p.add_argument("--chunk-prompts", type=int, default=256, help="prompts per shard")
    add_run_args(p)
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
    p.add_argument(
        "--folds",
        type=int,
        default=None,
        help="grouped cross-validation folds (default: the probe study's, else 5)",
    )
    p.add_argument("--opinion", default=None, help="target related to every factor")
    p.add_argument(
        "--distributions", default=None, help="distributions run of the same study and model"
    )
    p.add_argument("--out", default=None, help="probe run folder (default: ACTIVATIONS/probes)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing probe folder")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("patch", help="counterfactual activation patching of a factor's span")
    p.add_argument("study", help="study YAML file")
    add_model_args(p)
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
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--batch-size", type=int, default=64, help="patched forwards per batch")
    p.add_argument("--chunk-pairs", type=int, default=64, help="pairs per chunk on disk")
    add_run_args(p)
    p.set_defaults(func=_cmd_patch)

    p = sub.add_parser("attribute", help="attribution patching (atp) or integrated gradients (ig)")
    p.add_argument("study", help="study YAML file")
    add_model_args(p)
    p.add_argument("--method", required=True, choices=("atp", "ig"))
    p.add_argument("--out", required=True, help="run folder (re-running resumes it)")
    p.add_argument("--factor", default=None, help="factors, comma-separated (default: all)")
    p.add_argument(
        "--metric", default="expected_score", help="expected_score, log_odds, kl (atp only)"
    )
    p.add_argument("--options", default=None, help="log_odds: two option texts, A,B")
    p.add_argument("--questions", default=None, help="question ids (default: all that fit)")
    p.add_argument(
        "--sites",
        default="blocks.*.hook_resid_pre,blocks.*.hook_attn_out,blocks.*.hook_mlp_out,"
        "blocks.*.hook_resid_post",
        help="atp: comma-separated TransformerLens site names or globs",
    )
    p.add_argument(
        "--positions",
        default="span_last,span_mean,answer,persona_last",
        help="atp: span_last, span_mean, answer, persona_last, all",
    )
    p.add_argument("--directions", default="denoising,noising", help="atp")
    p.add_argument("--pairs", type=int, default=None, help="atp: at most N pairs per factor")
    p.add_argument("--top-k", type=int, default=5, help="atp: cells re-patched for real")
    p.add_argument("--patching", default=None, help="atp: patching run folders to compare with")
    p.add_argument(
        "--baseline", default="counterfactual,zero", help="ig: zero, pad, counterfactual"
    )
    p.add_argument("--steps", type=int, default=50, help="ig: integration steps")
    p.add_argument("--integration", default="gausslegendre", help="ig: gausslegendre or riemann_*")
    p.add_argument("--prompts", type=int, default=None, help="ig: at most N prompts")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward")
    p.add_argument(
        "--chunk-units", type=int, default=32, help="pairs (atp) or prompts (ig) per chunk on disk"
    )
    add_run_args(p)
    p.set_defaults(func=_cmd_attribute)

    p = sub.add_parser("effects", help="AMCEs and factor importance of a distributions run")
    p.add_argument("run", metavar="RUN_DIR", help="finished distributions run folder")
    p.add_argument("--out", required=True, help="output folder (tables, figures, manifest)")
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        help="FACTOR=LEVEL (repeatable; default: each factor's first value)",
    )
    p.add_argument("--n-boot", type=int, default=1000, help="cluster-bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--cluster", choices=("both", "persona", "stimulus"), default="both")
    p.add_argument("--questions", default=None, help="question ids (comma-separated)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing effects folder")
    p.set_defaults(func=_cmd_effects)
