"""The summary tables and the dose-response figure of a steering run (`workbench.interp.steering`).

Every number is a mean over prompts (or neutral-text tokens) of one direction x alpha x
question, with a 95% percentile bootstrap interval over those prompts. The prompts are the same
for every direction and alpha, and each resample uses the same prompts everywhere (the same
seeded weights), so the selectivity's interval is a paired one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from workbench.interp.intervene import boot_weights, interval

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STEERING_COLUMNS = (
    "direction",
    "kind",
    "site",
    "positions",
    "alpha",
    "role",
    "question_id",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
)
MEAN_METRICS = (
    "expected_score",
    "score_shift",
    "tv_unsteered",
    "tv_target",
    "option_mass",
    "option_mass_change",
)
NEUTRAL = "(neutral text)"


def _row(meta: dict[str, Any], metric: str, value: float, samples: np.ndarray, n: int) -> dict:
    lo, hi = interval(samples)
    return {**meta, "metric": metric, "value": value, "ci_low": lo, "ci_high": hi, "n": n}


def summarize(
    steered: pd.DataFrame,
    neutral: pd.DataFrame,
    options: dict[str, list[str]],
    meta: dict[str, Any],
    *,
    n_boot: int,
    seed: int,
) -> pd.DataFrame:
    """`steering.parquet`: one row per direction x alpha x question x metric (module doc)."""
    rows: list[dict[str, Any]] = []
    steered = steered.sort_values(["direction_id", "alpha", "question_id", "prompt_id"])
    weights: dict[int, np.ndarray] = {}
    for (_d, alpha, qid), grp in steered.groupby(["direction_id", "alpha", "question_id"]):
        n = len(grp)
        w = weights.setdefault(n, boot_weights(n, n_boot, seed))
        head = grp.iloc[0]
        m = {
            **meta,
            "direction": head["direction"],
            "kind": head["kind"],
            "alpha": float(alpha),  # type: ignore[arg-type]  # a groupby key (Hashable)
            "role": head["role"],
            "question_id": qid,
        }
        for metric in MEAN_METRICS:
            x = grp[metric].to_numpy(dtype=float)
            if np.isnan(x).all():
                continue
            rows.append(_row(m, metric, float(np.mean(x)), (w @ x) / n, n))
        probs = np.stack(list(grp["probs"]))
        for j, option in enumerate(options.get(str(qid), [])):
            x = probs[:, j]
            rows.append(_row(m, f"prob:{option}", float(x.mean()), (w @ x) / n, n))
        a, b = grp["tv_target"].to_numpy(float), grp["tv_target0"].to_numpy(float)
        if not np.isnan(a).all() and np.nansum(b) > 0:
            value = 1.0 - a.sum() / b.sum()
            rows.append(_row(m, "target_closure", value, 1.0 - (w @ a) / (w @ b), n))
    rows += _selectivity(steered, meta, weights, n_boot, seed)
    for (_d, alpha), grp in neutral.groupby(["direction_id", "alpha"]):
        head = grp.iloc[0]
        m = {
            **meta,
            "direction": head["direction"],
            "kind": head["kind"],
            "alpha": float(alpha),  # type: ignore[arg-type]  # a groupby key (Hashable)
            "role": "neutral",
            "question_id": NEUTRAL,
        }
        grp = grp.sort_values("token")
        n = len(grp)
        w = boot_weights(n, n_boot, seed)
        for metric in ("neutral_logprob", "neutral_logprob_change"):
            x = grp[metric].to_numpy(float)
            rows.append(_row(m, metric, float(x.mean()), (w @ x) / n, n))
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=list(STEERING_COLUMNS))
    return table[list(STEERING_COLUMNS)]


def _selectivity(
    steered: pd.DataFrame,
    meta: dict[str, Any],
    weights: dict[int, np.ndarray],
    n_boot: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Causal selectivity per alpha and on-target question: the probe's mean TV to the
    unsteered distribution over the largest placebo's (each resample takes its own max)."""
    rows: list[dict[str, Any]] = []
    on = steered[steered["role"] == "on_target"]
    for (alpha, qid), grp in on.groupby(["alpha", "question_id"]):
        wide = grp.pivot(index="prompt_id", columns="direction_id", values="tv_unsteered")
        kinds = grp.drop_duplicates("direction_id").set_index("direction_id")["kind"]
        probe = [d for d in wide.columns if kinds[d] == "probe"]
        placebo = [d for d in wide.columns if kinds[d] != "probe"]
        if not probe or not placebo or alpha == 0:
            continue  # at alpha 0 every shift is 0: no ratio
        n = len(wide)
        w = weights.setdefault(n, boot_weights(n, n_boot, seed))
        x = wide[probe[0]].to_numpy(float)
        y = wide[placebo].to_numpy(float)  # [n, placebo]
        top = y.mean(0).max()
        value = float(x.mean() / top) if top > 0 else float("nan")
        with np.errstate(divide="ignore", invalid="ignore"):
            samples = ((w @ x) / n) / ((w @ y) / n).max(1)
        head = grp[grp["direction_id"] == probe[0]].iloc[0]
        m = {
            **meta,
            "direction": head["direction"],
            "kind": "probe",
            "alpha": float(alpha),  # type: ignore[arg-type]  # a groupby key (Hashable)
            "role": "on_target",
            "question_id": qid,
        }
        rows.append(_row(m, "selectivity", value, samples, n))
    return rows


def dose_response(table: pd.DataFrame, question: str | None) -> Figure:
    """Dose-response panels for one on-target question, one line per direction (probe: solid
    with its interval; random: grey; shuffled: dashed; other factor: dotted), and the damage
    on neutral text."""
    import matplotlib.pyplot as plt

    panels: list[tuple[str, str]] = []
    metrics = set(table.loc[table["question_id"] == question, "metric"])
    for metric, title in (
        ("target_closure", "share of the way to the target class"),
        ("tv_unsteered", "TV to the unsteered answer"),
        ("score_shift", "expected score shift"),
        ("option_mass_change", "option mass change"),
    ):
        if metric in metrics:
            panels.append((metric, title))
    panels.append(("neutral_logprob_change", "neutral text log-prob change / token"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.3), squeeze=False)
    styles = {"probe": "-", "random": "-", "shuffled": "--", "other_factor": ":"}
    for ax, (metric, title) in zip(axes[0], panels, strict=True):
        q = NEUTRAL if metric.startswith("neutral") else question
        sub = table[(table["metric"] == metric) & (table["question_id"] == q)]
        for i, (name, grp) in enumerate(sub.groupby("direction", sort=False)):
            grp = grp.sort_values("alpha")
            kind = str(grp["kind"].iloc[0])
            color = "0.6" if kind == "random" else f"C{i % 10}"
            ax.plot(
                grp["alpha"],
                grp["value"],
                styles.get(kind, "-"),
                color=color,
                marker="o" if kind == "probe" else None,
                ms=3,
                lw=1.6 if kind == "probe" else 1.0,
                label=name,
            )
            if kind == "probe":
                ax.fill_between(grp["alpha"], grp["ci_low"], grp["ci_high"], color=color, alpha=0.2)
        ax.axhline(0.0, color="0.8", lw=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("alpha (x typical residual norm)")
    axes[0][0].legend(fontsize=7, frameon=False)
    fig.suptitle(f"Steering dose-response ({question})", fontsize=10)
    fig.tight_layout()
    return fig


def options_of(questions: Sequence[Any]) -> dict[str, list[str]]:
    """Substantive option texts per question id, canonical order."""
    return {q.id: list(q.options) for q in questions}
