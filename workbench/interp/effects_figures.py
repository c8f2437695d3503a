"""Figures and report blocks of `workbench.interp.effects`: a forest plot of the AMCEs and a
bar chart of the Shapley importance per question."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from workbench.report import Block, Figure_, Heading, Table, Text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from workbench.interp.effects import EffectsResult

# The effects module imports this one (to save figures), so the shared names live here.
SCORE = "expected_score"
ALL = "(all)"
"""The importance row holding the full model's value (what the shares sum to)."""
FOREST_PNG = "forest_{question}.png"
IMPORTANCE_PNG = "importance_{question}.png"


def forest_figure(result: EffectsResult, question_id: str) -> Figure:
    """AMCEs on the expected score with their intervals, one panel per factor."""
    import matplotlib.pyplot as plt

    eff = result.effects
    eff = eff[(eff["question_id"] == question_id) & (eff["metric"] == SCORE)]
    factors = list(dict.fromkeys(eff["factor"]))
    heights = [eff["factor"].eq(f).sum() + 1 for f in factors]
    fig, axes = plt.subplots(
        len(factors),
        1,
        figsize=(6.5, 0.32 * sum(heights) + 1.0),
        sharex=True,
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, factor in zip(axes[:, 0], factors, strict=True):
        rows = eff[eff["factor"] == factor]
        labels = [f"{rows['baseline'].iloc[0]} (baseline)", *rows["level"]]
        est = np.r_[0.0, rows["estimate"].to_numpy()]
        lo = np.r_[0.0, rows["ci_low"].to_numpy()]
        hi = np.r_[0.0, rows["ci_high"].to_numpy()]
        y = np.arange(len(labels))[::-1]
        ax.errorbar(est, y, xerr=[est - lo, hi - est], fmt="o", color="C0", capsize=2)
        ax.plot([0], [y[0]], "o", mfc="white", color="C0")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_ylabel(factor, fontsize=9)
    axes[-1, 0].set_xlabel("AMCE on the expected score (95% cluster-robust interval)")
    fig.suptitle(f"{question_id}: effect of each level against its factor's baseline", fontsize=10)
    fig.tight_layout()
    return fig


def importance_figure(result: EffectsResult, question_id: str) -> Figure:
    """Shapley shares with bootstrap intervals, one panel per metric."""
    import matplotlib.pyplot as plt

    imp = result.importance[result.importance["question_id"] == question_id]
    metrics = list(dict.fromkeys(imp["metric"]))
    n_bars = int(imp["metric"].eq(metrics[0]).sum()) if metrics else 1
    fig, axes = plt.subplots(
        1, max(len(metrics), 1), figsize=(4.2 * max(len(metrics), 1), 0.3 * n_bars + 1.2)
    )
    axes = np.atleast_1d(axes)
    for ax, metric in zip(axes, metrics, strict=False):
        rows = imp[(imp["metric"] == metric) & (imp["factor"] != ALL)].sort_values("share")
        total = float(imp[(imp["metric"] == metric) & (imp["factor"] == ALL)]["share"].iloc[0])
        err = [rows["share"] - rows["ci_low"], rows["ci_high"] - rows["share"]]
        ax.barh(rows["factor"], rows["share"], xerr=np.clip(np.asarray(err), 0, None), color="C1")
        ax.tick_params(axis="y", labelsize=8)
        what = "R² share" if metric == SCORE else "mean TV share"
        ax.set_xlabel(f"{what} (full model {total:.3f})", fontsize=9)
        ax.set_title(metric, fontsize=9)
    fig.suptitle(f"{question_id}: factor importance (Shapley)", fontsize=10)
    fig.tight_layout()
    return fig


def figures(result: EffectsResult) -> list[tuple[str, Figure, str]]:
    """(question, figure, file name) for every figure of a result."""
    out = []
    for qid in dict.fromkeys(result.effects["question_id"]):
        if (result.effects[result.effects["question_id"] == qid]["metric"] == SCORE).any():
            out.append((str(qid), forest_figure(result, str(qid)), FOREST_PNG.format(question=qid)))
    for qid in dict.fromkeys(result.importance["question_id"]):
        out.append(
            (str(qid), importance_figure(result, str(qid)), IMPORTANCE_PNG.format(question=qid))
        )
    return out


def effects_blocks(result: EffectsResult) -> list[Block]:
    """Report blocks: conventions, per question the forest plot, importance table and chart."""
    blocks: list[Block] = [
        Text(
            "AMCE: the OLS coefficient of a level's indicator (all factors' main effects, "
            "order-adjusted cells, coarse cells left out for the factor they leave unspecified), "
            "against the factor's baseline, with 95% cluster-robust intervals (personas and "
            "stimuli). Importance: Shapley shares of the expected score's R² and of the mean TV "
            "of the fitted distributions from the grand mean; shares sum to the full model's "
            f"value (`{ALL}`); intervals from a cluster bootstrap."
        )
    ]
    figs = figures(result)
    for qid in dict.fromkeys(str(q) for q in result.cells["question_id"]):
        blocks.append(Heading(f"Effects: {qid}", level=3))
        for fq, fig, name in figs:
            if fq == qid:
                blocks.append(Figure_(fig, name.removesuffix(".png")))
        imp = result.importance[result.importance["question_id"] == qid]
        if len(imp):
            table = imp.pivot(index="factor", columns="metric", values="share").reset_index()
            blocks.append(Table(table, f"{qid}: Shapley shares", digits=4))
    return blocks
