"""The demo's probe section: capture the organism's activations, run its probe study, report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.interp.opinion import SUMMARY_COLUMNS
from workbench.interp.probe_study import ProbeConfig, ProbeSpec, split_position
from workbench.interp.probing import accuracy_figure, run_probes

if TYPE_CHECKING:
    from workbench.measure.distributions import DistributionResult
    from workbench.report import Block


ORGANISM_PROBES = ProbeConfig(
    name="organism-traits",
    probes=(
        ProbeSpec("actor", ("answer", "span_mean:actor", "span_last:actor")),
        ProbeSpec("genre", ("answer", "span_last:genre")),
        ProbeSpec("favourite_genre", ("answer", "span_last:favourite_genre")),
        ProbeSpec("party", ("answer", "span_last:party")),
        ProbeSpec("region", ("answer", "span_last:region")),
        ProbeSpec("age", ("answer",)),
        ProbeSpec("title", ("answer", "span_last:title"), group_by="persona_id"),
        ProbeSpec("expected_score", ("answer",)),
        ProbeSpec("modal_option_id", ("answer",)),
    ),
    sites=("hook_embed", "blocks.*.hook_resid_post"),
    questions=("rating",),
    group_by="title",
    opinion="expected_score",
)
"""The organism's probe study (also `probes/organism.yaml`; a test keeps the two equal).
Unseen movies: held-out titles are the CV groups; the title itself is probed across personas
(a probe cannot name a title it never saw)."""


def demo_blocks(
    organism_folder: Path, out: Path, lm: Any, distributions_result: DistributionResult
) -> list[Block]:
    """Capture activations on the organism, run its probe study, return report blocks."""
    from workbench.interp.activations import ActivationConfig, capture_activations
    from workbench.report import Figure_, Table, Text
    from workbench.study.load import load_study

    study = load_study(organism_folder / "study.yaml")
    config = ORGANISM_PROBES
    factors = sorted({f for s in config.probes for p in s.positions if (f := split_position(p)[1])})
    acts = capture_activations(
        study,
        lm,
        out / "activations",
        ActivationConfig(
            sites=config.sites,
            positions=("answer", "span_mean", "span_last"),
            factors=tuple(factors),
            questions=config.questions,
            store_dtype="float32",
            progress=False,
        ),
        log=lambda _: None,
    )
    result = run_probes(acts, config, out / "probes", distributions=distributions_result)
    best = result.probes[result.probes["control"] == "none"].sort_values("mean", ascending=False)
    best = best.drop_duplicates(["target", "position_label"])
    best_table = best[
        ["target", "position_label", "site", "mean", "chance", "selectivity", "n_folds"]
    ]
    summary = result.summary
    measured = summary.dropna(subset=["behaviour_tv"])
    zero = measured[measured["factor"].isin(["title", "region", "age"])]
    zero_text = ", ".join(f"{r.factor} {r.behaviour_tv:.3f}" for r in zero.itertuples())
    strongest = measured.sort_values("behaviour_tv", ascending=False).head(1)
    read = summary.dropna(subset=["opinion_eta2"]).sort_values("opinion_eta2", ascending=False)
    verdict = (
        f"The planted zero-effect factors move the rating distribution by a mean TV of "
        f"{zero_text} when they alone change, against {strongest['behaviour_tv'].iloc[0]:.3f} "
        f"for {strongest['factor'].iloc[0]}: they are in the prompt and decodable, but they do "
        "not drive the answer. "
        if len(zero) and len(strongest)
        else ""
    )
    if len(read):
        verdict += (
            f"The opinion probe's prediction is explained best by "
            f"{read['factor'].iloc[0]} (eta² {read['opinion_eta2'].iloc[0]:.2f})."
        )
    shown = summary[[c for c in SUMMARY_COLUMNS if not c.endswith("_site")]]
    return [
        Text(
            "Linear probes on the residual stream (layer -1 = embeddings) at the answer position "
            "and at each factor's token span, cross-validated with whole titles held out "
            "(`group_by: title`; the title itself is held out by persona). Controls: shuffled "
            "labels and Hewitt-Liang control tasks (a random label per prompt type); "
            "selectivity = accuracy - control-task accuracy. The opinion probe reads the "
            "model's expected rating at the answer position (R²)."
        ),
        Table(best_table.reset_index(drop=True), "best layer per target and position"),
        Figure_(accuracy_figure(result.probes), "probe_accuracy", "probe metric by layer"),
        Text(
            "Decodable is not the same as used. Every factor is in the prompt, so it can be "
            "decoded from its own span; whether it drives the answer is a behavioural question, "
            "answered by prompts that differ in that factor alone (behaviour_tv: mean total "
            "variation of the rating distribution; empty where the design has no such pair). "
            "opinion_eta2: share of the opinion probe's held-out predictions explained by the "
            "factor; opinion_cos: cosine of the opinion direction with the factor probe's "
            "subspace (cos_null: a random direction). " + verdict
        ),
        Table(shown, "decodable vs drives the answer, per factor (best layer)"),
    ]
