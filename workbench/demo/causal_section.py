"""The demo's causal section: which traits drive the organism's rating, and where they act.

Behavioural effects (AMCEs and Shapley importance) from the distributions run, then
span-aligned activation patching of the actor and of two zero-effect factors (title, region)
on the rating question. Beside the probe section, it reads as "decodable vs drives the answer
vs where it acts".
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from workbench.interp.effects import EffectsConfig, compute_effects
from workbench.interp.effects_figures import effects_blocks
from workbench.interp.patch_tables import heatmap
from workbench.interp.patching import PatchConfig, patch_factor
from workbench.report import Block, Figure_, Table, Text

if TYPE_CHECKING:
    from workbench.engine.models import LoadedModel
    from workbench.measure.distributions import DistributionResult
    from workbench.study.spec import Study

QUESTION = "rating"
FACTORS = ("actor", "title", "region")
"""The actor drives the rating; title and region have no planted effect."""


def demo_blocks(
    study: Study,
    lm: LoadedModel,
    distributions: DistributionResult,
    out: Path,
    *,
    progress: bool = False,
) -> list[Block]:
    """Effects from the distributions run, patching of three factors; report blocks."""
    # 200 resamples keep the demo quick; `workbench effects` defaults to 1,000.
    effects = compute_effects(
        distributions,
        out / "effects",
        EffectsConfig(n_boot=200, questions=(QUESTION,)),
    )
    blocks: list[Block] = [
        Text(
            "**Behavioural effects** of each factor level on the expected rating (AMCE against "
            "the factor's first value, OLS with cluster-robust 95% intervals) and each "
            "factor's share of the rating's explained variance (Shapley). The actor should "
            "carry almost all of it; title and region nothing."
        ),
        *effects_blocks(effects),
    ]
    config = PatchConfig(
        sites=("blocks.*.hook_resid_pre", "blocks.*.hook_resid_post"),
        positions=("span_mean", "answer"),
        questions=(QUESTION,),
        max_pairs=32,
        n_boot=200,
        progress=progress,
    )
    rows = []
    for factor in FACTORS:
        result = patch_factor(study, lm, factor, out / "patching" / factor, config)
        table = result.patching
        # The factor's own span: where its value enters (the answer position late in the
        # network carries every factor's effect by construction; see the heatmap).
        table = table[(table["metric"] == "normalized_effect") & (table["position"] == "span_mean")]
        best = table.loc[table["effect"].abs().groupby(table["direction"]).idxmax()]
        rows.append(best.assign(factor=factor))
        if factor == "actor":
            actor_map = heatmap(result.patching)
    summary = pd.concat(rows, ignore_index=True)[
        ["factor", "direction", "site", "position", "effect", "ci_low", "ci_high", "n_pairs"]
    ]
    blocks += [
        Text(
            "**Activation patching**: for pairs of prompts that differ in one factor alone, the "
            "source prompt's activation at a site and position is written into the target's "
            "forward; the normalized effect is the share of the pair's expected-rating "
            "difference that the patch restores (1: the site carries all of it). The table "
            "shows each factor's largest effect at its own span (mean) in each direction: the "
            "actor's span carries its effect at the first block; title and region have "
            "nothing to carry. The heatmap follows the actor's effect from its span to the "
            "answer position through the layers."
        ),
        Table(
            summary, "largest normalized effect at the factor's span, per direction [95% interval]"
        ),
        Figure_(actor_map, "patching_actor", "actor: normalized effect by site and position"),
        Text(
            f"Run folders: `{out / 'effects'}` (effects.parquet, importance.parquet) and "
            f"`{out / 'patching'}` (one patching run per factor)."
        ),
    ]
    return blocks
