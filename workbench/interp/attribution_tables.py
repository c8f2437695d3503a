"""Summaries of an attribution run: `attribution.parquet` from the raw estimates, and the
agreement of attribution patching with real patching (definitions:
`workbench.interp.attribution`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

COLUMNS = [
    "method",
    "question_id",
    "factor",
    "direction",
    "baseline",
    "site",
    "layer",
    "position",
    "metric",
    "statistic",
    "score",
    "ci_low",
    "ci_high",
    "n",
]
CELL = ["question_id", "factor", "site", "position", "direction"]
"""One cell of the patching grid (what AtP and patching are compared on)."""


def _interval(boot: np.ndarray) -> tuple[float, float]:
    lo, hi = np.nanpercentile(boot, [2.5, 97.5]) if len(boot) else (np.nan, np.nan)
    return float(lo), float(hi)


def summarize_atp(
    raw: pd.DataFrame,
    value_range: Mapping[str, float | None],
    *,
    min_effect: float,
    n_boot: int,
    seed: int,
) -> pd.DataFrame:
    """`normalized_effect` and `change` per (question, factor, site, position, direction)."""
    rng = np.random.default_rng(seed)
    rows = []
    keys = ["question_id", "factor", "site", "layer", "position", "direction", "metric"]
    for key, grp in raw.groupby(keys, sort=True):
        qid, factor, site, layer, position, direction, metric = (str(k) for k in key)
        diff = (grp["source_value"] - grp["target_value"]).to_numpy()
        moved = grp["estimate"].to_numpy() * np.sign(diff)
        gap, n = np.abs(diff), len(grp)
        span = value_range.get(qid) if metric == "expected_score" else None
        floor = min_effect * (span if span is not None else 1.0)
        idx = rng.integers(0, n, size=(n_boot, n))
        stats = {
            "normalized_effect": (
                moved.sum() / max(gap.sum(), n * floor),
                moved[idx].sum(1) / np.maximum(gap[idx].sum(1), n * floor),
            ),
            "change": (moved.mean(), moved[idx].mean(1)),
        }
        for statistic, (est, boot) in stats.items():
            lo, hi = _interval(boot)
            rows.append(
                {
                    "method": "atp",
                    "question_id": qid,
                    "factor": factor,
                    "direction": direction,
                    "baseline": None,
                    "site": site,
                    "layer": int(layer),
                    "position": position,
                    "metric": metric,
                    "statistic": statistic,
                    "score": float(est),
                    "ci_low": lo,
                    "ci_high": hi,
                    "n": n,
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def summarize_ig(raw: pd.DataFrame, *, n_boot: int, seed: int) -> pd.DataFrame:
    """Per (question, baseline, span): mean signed and absolute attribution, share of the
    absolute attribution, and the completeness error beside the metric difference."""
    rng = np.random.default_rng(seed)
    raw = raw.copy()
    raw["abs"] = raw["attribution"].abs()
    total = raw.groupby(["prompt_id", "baseline"])["abs"].transform("sum")
    raw["share"] = np.where(total > 0, raw["abs"] / total.where(total > 0, 1.0), np.nan)
    runs = raw.drop_duplicates(["prompt_id", "baseline", "run"])
    rows = []

    def add(qid: str, baseline: str, factor: str, metric: str, stat: str, x: np.ndarray) -> None:
        x = x[~np.isnan(x)]
        n = len(x)
        boot = x[rng.integers(0, n, size=(n_boot, n))].mean(1) if n else np.array([])
        lo, hi = _interval(boot)
        rows.append(
            {
                "method": "ig",
                "question_id": qid,
                "factor": factor,
                "direction": None,
                "baseline": baseline,
                "site": "hook_embed",
                "layer": -1,
                "position": "span",
                "metric": metric,
                "statistic": stat,
                "score": float(x.mean()) if n else float("nan"),
                "ci_low": lo,
                "ci_high": hi,
                "n": n,
            }
        )

    for (qid, baseline, factor, metric), grp in raw.groupby(
        ["question_id", "baseline", "factor", "metric"], sort=True
    ):
        q, b, f, m = str(qid), str(baseline), str(factor), str(metric)
        add(q, b, f, m, "attribution", grp["attribution"].to_numpy(dtype=float))
        add(q, b, f, m, "abs_attribution", grp["abs"].to_numpy(dtype=float))
        add(q, b, f, m, "share", grp["share"].to_numpy(dtype=float))
    # per IG run: a fixed baseline's covers every token ("(all)"), a counterfactual's a factor
    runs = runs.assign(span=runs["run"].where(runs["baseline"] == "counterfactual", "(all)"))
    for (qid, baseline, span, metric), grp in runs.groupby(
        ["question_id", "baseline", "span", "metric"], sort=True
    ):
        q, b, f, m = str(qid), str(baseline), str(span), str(metric)
        err = grp["completeness_error"].abs().to_numpy(dtype=float)
        diff = (grp["value"] - grp["baseline_value"]).abs().to_numpy(dtype=float)
        add(q, b, f, m, "completeness_error", err)
        add(q, b, f, m, "metric_difference", diff)
    return pd.DataFrame(rows, columns=COLUMNS)


def incomplete(table: pd.DataFrame, tolerance: float = 0.05) -> list[str]:
    """IG runs whose mean |completeness error| exceeds `tolerance` x their mean |metric
    difference| (more steps needed), as "question/baseline/span" strings."""
    t = table[table["method"] == "ig"]
    wide = t.pivot_table(
        index=["question_id", "baseline", "factor"], columns="statistic", values="score"
    )
    if "completeness_error" not in wide:
        return []
    bad = wide[wide["completeness_error"] > tolerance * wide["metric_difference"]]
    return ["/".join(str(k) for k in key) for key in bad.index]


def _spearman(a: pd.Series, b: pd.Series) -> float:
    ra, rb = a.rank(), b.rank()
    if len(a) < 3 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement(
    attribution: pd.DataFrame, patching: pd.DataFrame, top_k: int, source: str = ""
) -> pd.DataFrame:
    """AtP against real patching over the grid cells both hold, per (question, factor, metric):
    Spearman of the normalized effects and the overlap of their top-k cells by |effect|
    (|AtP top-k ∩ patching top-k| / k)."""
    atp = attribution[
        (attribution["method"] == "atp") & (attribution["statistic"] == "normalized_effect")
    ]
    real = patching[patching["metric"] == "normalized_effect"].rename(
        columns={"effect": "patching"}
    )
    both = atp.rename(columns={"score": "atp"}).merge(real[[*CELL, "patching"]], on=CELL)
    rows = []
    for (qid, factor, metric), grp in both.groupby(["question_id", "factor", "metric"]):
        k = min(top_k, len(grp))
        top_a = set(grp["atp"].abs().nlargest(k).index)
        top_p = set(grp["patching"].abs().nlargest(k).index)
        rows.append(
            {
                "question_id": qid,
                "factor": factor,
                "metric": metric,
                "source": source,
                "n_cells": len(grp),
                "spearman": _spearman(grp["atp"], grp["patching"]),
                "top_k": k,
                "top_k_overlap": len(top_a & top_p) / k if k else float("nan"),
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "question_id",
            "factor",
            "metric",
            "source",
            "n_cells",
            "spearman",
            "top_k",
            "top_k_overlap",
        ],
    )


def top_cells(attribution: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k grid cells of largest |AtP normalized effect| per (question, factor)."""
    atp = attribution[
        (attribution["method"] == "atp") & (attribution["statistic"] == "normalized_effect")
    ]
    order = atp.assign(_abs=atp["score"].abs()).sort_values(
        ["question_id", "factor", "_abs"], ascending=[True, True, False], kind="stable"
    )
    top = order.groupby(["question_id", "factor"], sort=True).head(k).drop(columns="_abs")
    top = top.assign(rank=top.groupby(["question_id", "factor"]).cumcount() + 1)
    return top.reset_index(drop=True)
