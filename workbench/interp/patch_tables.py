"""Summaries of a patching run: `patching.parquet` from the raw reads and the layer x
position heatmap (metric definitions: `workbench.interp.patching`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS = ("normalized_effect", "score_change", "tv_source", "tv_target")
POSITIONS = ("span_last", "span_mean", "answer", "persona_last", "all")


def factor_effect(pairs: pd.DataFrame) -> dict[str, dict[str, float]]:
    out = {}
    for qid, grp in pairs.groupby("question_id"):
        out[str(qid)] = {
            "n_pairs": len(grp),
            "mean_abs_dscore": float((grp["clean_score"] - grp["corrupt_score"]).abs().mean()),
            "mean_tv": float(grp["tv_clean_corrupt"].mean()),
        }
    return out


def summarize(
    patched: pd.DataFrame,
    factor: str,
    value_range: dict[str, float | None],
    *,
    min_effect: float,
    n_boot: int,
    seed: int,
) -> pd.DataFrame:
    """`patching.parquet` from the raw reads (metric definitions in the module docstring)."""
    rng = np.random.default_rng(seed)
    rows = []
    keys = ["question_id", "site", "site_kind", "layer", "position", "direction"]
    for key, grp in patched.groupby(keys, sort=True):
        qid = str(key[0])
        n = len(grp)
        span = value_range.get(qid)
        if span is not None:
            diff = (grp["source_score"] - grp["target_score"]).to_numpy()
            moved = (grp["patched_score"] - grp["target_score"]).to_numpy() * np.sign(diff)
            gap, floor = np.abs(diff), min_effect * span
        else:
            gap = grp["tv_source_target"].to_numpy()
            moved = gap - grp["tv_source"].to_numpy()
            floor = min_effect
        idx = rng.integers(0, n, size=(n_boot, n))
        per = {
            "normalized_effect": (
                moved.sum() / max(gap.sum(), n * floor),
                moved[idx].sum(1) / np.maximum(gap[idx].sum(1), n * floor),
            ),
            "tv_source": _mean_boot(grp["tv_source"].to_numpy(), idx),
            "tv_target": _mean_boot(grp["tv_target"].to_numpy(), idx),
        }
        if span is not None:
            per["score_change"] = _mean_boot(moved, idx)
        for metric in METRICS:
            if metric not in per:
                continue
            est, boot = per[metric]
            lo, hi = np.percentile(boot, [2.5, 97.5])
            rows.append(
                {
                    "question_id": qid,
                    "factor": factor,
                    "site": key[1],
                    "site_kind": key[2],
                    "layer": int(str(key[3])),
                    "position": key[4],
                    "direction": key[5],
                    "metric": metric,
                    "effect": float(est),
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                    "n_pairs": n,
                }
            )
    return pd.DataFrame(rows)


def _mean_boot(x: np.ndarray, idx: np.ndarray) -> tuple[float, np.ndarray]:
    return float(x.mean()), x[idx].mean(1)


def heatmap(table: pd.DataFrame, metric: str = "normalized_effect") -> Figure:
    """Layer x position heatmaps of `metric`: one panel per (question, direction) x site kind."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    t = table[table["metric"] == metric]
    panels = sorted({(q, d) for q, d in zip(t["question_id"], t["direction"], strict=True)})
    kinds = [
        k
        for k in (
            "hook_embed",
            "hook_resid_pre",
            "hook_attn_out",
            "hook_mlp_out",
            "hook_resid_post",
        )
        if k in set(t["site_kind"])
    ]
    positions = [p for p in POSITIONS if p in set(t["position"])]
    # Constrained layout keeps the panels' two-line titles clear of the tick labels above.
    fig = Figure(figsize=(3.2 * len(kinds) + 1.2, 2.8 * len(panels) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), len(kinds), squeeze=False)
    for i, (q, d) in enumerate(panels):
        for j, kind in enumerate(kinds):
            sub = t[(t["question_id"] == q) & (t["direction"] == d) & (t["site_kind"] == kind)]
            grid = sub.pivot(index="layer", columns="position", values="effect").reindex(
                columns=positions
            )
            ax = axes[i][j]
            im = ax.imshow(grid.to_numpy(), vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
            bottom = i == len(panels) - 1
            labels = positions if bottom else [""] * len(positions)
            ax.set_xticks(range(len(positions)), labels, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(grid.index)), [str(x) for x in grid.index], fontsize=7)
            ax.set_title(f"{q} {d}\n{kind}", fontsize=8)
            if j == 0:
                ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes, shrink=0.6, label=metric)
    factor = str(t["factor"].iloc[0]) if len(t) else ""
    fig.suptitle(f"patching {factor}: {metric}")
    return fig
