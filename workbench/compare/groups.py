"""Per-group results and the human baselines (OpinionQA's figures), from padded arrays.

A **group** is everyone, or one persona factor value (`party=Democrat`), or a cell's whole
persona (`party=Democrat, age=30`) when it specifies more than one factor. Per source, group
and question: the representativeness distance (normalized W1, or TV on nominal questions),
TV, JS, the model's refusal mass beside the human refusal share, and the human sampling
floor (the distance a resample of the group's effective size shows from the sample itself).
Per source and group: representativeness = mean over questions of 1 − distance, with a
bootstrap 95% interval over questions; and per source the "(average)" and "(worst)" over
groups (everyone left out), with intervals from the same resamples.

**Human baselines** come from the human file alone: the overall population's distribution as
a prediction of each group (source `human: overall population`; its average and worst are
OpinionQA's "human average" and "human worst"), and every pair of groups of one factor
(`human_pairs`: Democrats vs Republicans).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from workbench.compare import dense as D
from workbench.compare import metrics as M
from workbench.compare.human import HumanData
from workbench.study.spec import Question, Study

if TYPE_CHECKING:
    from workbench.compare.comparison import CompareConfig

EVERYONE = "everyone"
POPULATION = "human: overall population"
"""The source name of the baseline that predicts every group by the whole population."""
SUMMARY_GROUPS = ("(average)", "(worst)")
GROUP_COLUMNS = [
    "source",
    "group",
    "representativeness",
    "mean_tv",
    "mean_js",
    "refusal_model",
    "refusal_human",
    "n_questions",
    "ci_low",
    "ci_high",
    "floor_representativeness",
]
PAIR_COLUMNS = [
    "factor",
    "group_a",
    "group_b",
    "representativeness",
    "mean_tv",
    "mean_js",
    "n_questions",
    "ci_low",
    "ci_high",
]


@dataclass
class GroupTables:
    groups: pd.DataFrame
    """source, group, representativeness, mean_tv, mean_js, refusal_model, refusal_human,
    n_questions, ci_low, ci_high, floor_representativeness."""
    group_questions: pd.DataFrame
    """source, group, question_id, metric, distance, tv, js, nw1, refusal_model,
    refusal_human, n, n_eff, floor_tv, floor_distance."""
    human_pairs: pd.DataFrame
    """factor, group_a, group_b, representativeness, mean_tv, mean_js, n_questions, ci."""


def cell_groups(cells: pd.DataFrame, study: Study) -> pd.DataFrame:
    """key -> group label, one row per (cell, group it belongs to)."""
    persona = [f for f in study.persona_factors if f in cells.columns]
    specified = cells[persona].notna().to_numpy()
    values = cells[persona].astype(object).to_numpy()
    rows: list[tuple[str, str]] = []
    for key, spec, vals in zip(cells["key"], specified, values, strict=True):
        parts = [f"{f}={v}" for f, s, v in zip(persona, spec, vals, strict=True) if s]
        labels = parts if parts else [EVERYONE]
        if len(parts) > 1:
            labels = [*parts, ", ".join(parts)]
        rows += [(key, label) for label in labels]
    return pd.DataFrame(rows, columns=["key", "group"]).drop_duplicates()


def human_group_cells(
    human: HumanData, study: Study, questions: dict[str, Question]
) -> pd.DataFrame:
    """Everyone and every persona factor value the file has, for every question."""
    factors = [f.name for f in study.factors]
    groups = [(EVERYONE, None, None)] + [
        (f"{f}={v}", f, v)
        for f in study.persona_factors
        if f in human.factors
        for v in study.factor(f).values
    ]
    g = pd.DataFrame(groups, columns=["group", "factor", "value"])
    cells = g.merge(pd.DataFrame({"question_id": list(questions)}), how="cross")
    for f in factors:
        cells[f] = cells["value"].where(cells["factor"] == f, None)
    return cells.reset_index(drop=True)


def _bootstrap(
    values: np.ndarray, n_resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values [row, question] (NaN: missing) -> per row mean, and the [resample, row] means
    over the same resampled questions (so rows' intervals and their average or minimum come
    from one set of resamples)."""
    have = ~np.isnan(values)
    v = np.nan_to_num(values)
    (w,) = M.resample_counts((values.shape[1],), n_resamples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = v.sum(1) / have.sum(1)
        boots = (w @ v.T) / (w @ have.T)
    return point, boots, have.sum(1)


def _summaries(per_q: pd.DataFrame, config: CompareConfig) -> pd.DataFrame:
    """per_q: source, group, question_id, distance, tv, js, refusal_*, floor_distance ->
    one row per (source, group) plus "(average)" and "(worst)" per source."""
    out = []
    for source, sub in per_q.groupby("source", sort=False):
        wide = sub.pivot_table(index="group", columns="question_id", values="distance", sort=False)
        score = 1.0 - wide.to_numpy(dtype=float)
        point, boots, count = _bootstrap(score, config.n_resamples, config.seed)
        means = sub.groupby("group", sort=False)[
            ["tv", "js", "refusal_model", "refusal_human", "floor_distance"]
        ].mean()
        means = means.reindex(wide.index)
        lo, hi = np.nanquantile(boots, [0.025, 0.975], axis=0)
        table = pd.DataFrame(
            {
                "source": source,
                "group": wide.index.to_numpy(),
                "representativeness": point,
                "mean_tv": means["tv"].to_numpy(),
                "mean_js": means["js"].to_numpy(),
                "refusal_model": means["refusal_model"].to_numpy(),
                "refusal_human": means["refusal_human"].to_numpy(),
                "n_questions": count,
                "ci_low": lo,
                "ci_high": hi,
                "floor_representativeness": 1.0 - means["floor_distance"].to_numpy(),
            }
        )
        out.append(table)
        real = np.asarray(wide.index != EVERYONE)
        if real.sum() > 1:
            reducers: tuple[Callable[..., Any], ...] = (np.nanmean, np.nanmin)
            for label, fn in zip(SUMMARY_GROUPS, reducers, strict=True):
                dist = fn(boots[:, real], axis=1)
                out.append(
                    pd.DataFrame(
                        [
                            {
                                "source": source,
                                "group": label,
                                "representativeness": float(fn(point[real])),
                                "mean_tv": float(fn(table["mean_tv"][real]))
                                if label == "(average)"
                                else np.nan,
                                "n_questions": int(count[real].max()),
                                "ci_low": float(np.nanquantile(dist, 0.025)),
                                "ci_high": float(np.nanquantile(dist, 0.975)),
                            }
                        ]
                    )
                )
    frame = pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=GROUP_COLUMNS)
    return frame.reindex(columns=GROUP_COLUMNS)


def _pair_rows(d: D.Dense, a: np.ndarray, b: np.ndarray, qt: D.QuestionTable) -> pd.DataFrame:
    """Per question: the distances of row `b` (a group) from row `a` (its prediction)."""
    dist = D.distances(d.p[a], d.p[b], d.qidx[a], qt)
    return pd.DataFrame(
        {
            "question_id": np.asarray(qt.ids, dtype=object)[d.qidx[a]],
            "metric": dist.metric,
            "distance": dist.distance,
            "tv": dist.tv,
            "js": dist.js,
            "nw1": dist.nw1,
        }
    )


def group_tables(
    human: HumanData,
    study: Study,
    questions: dict[str, Question],
    config: CompareConfig,
    cells: pd.DataFrame | None = None,
    cell_pairs: dict[str, pd.DataFrame] | None = None,
    cell_sources: dict[str, pd.DataFrame] | None = None,
) -> GroupTables:
    """Per-group tables for every source of `cell_pairs` (model sources and baselines against
    the human cells) and the human baselines (see the module docstring)."""
    qt = D.question_table(questions)
    hcells = human_group_cells(human, study, questions)
    found = human.distributions(hcells)
    if found.empty:
        empty = pd.DataFrame()
        return GroupTables(
            empty.reindex(columns=GROUP_COLUMNS), empty, empty.reindex(columns=PAIR_COLUMNS)
        )
    meta = hcells.loc[found["cell"].to_numpy(), ["group", "factor", "value", "question_id"]]
    found = found.assign(
        key=(meta["group"] + "|" + meta["question_id"]).to_numpy(),
        question_id=meta["question_id"].to_numpy(),
    )
    found["group"] = meta["group"].to_numpy()
    d = D.to_dense(found, qt)
    per_key = found.groupby("key").first().reindex(d.keys)
    groups = per_key["group"].to_numpy(dtype=object)
    floor_tv, floor_dist = D.floor_distances(
        d.p,
        per_key["n_eff"].to_numpy(dtype=float),
        d.qidx,
        qt,
        n_sims=config.group_floor_sims,
        seed=config.seed,
    )
    human_q = pd.DataFrame(
        {
            "group": groups,
            "question_id": np.asarray(qt.ids, dtype=object)[d.qidx],
            "refusal_human": per_key["refusal"].to_numpy(dtype=float),
            "n": per_key["n"].to_numpy(dtype=float),
            "n_eff": per_key["n_eff"].to_numpy(dtype=float),
            "floor_tv": floor_tv,
            "floor_distance": floor_dist,
        }
    )
    parts = []
    # the overall population as a prediction of each group
    everyone = np.full(len(qt.ids), -1, dtype=np.int64)
    is_everyone = groups == EVERYONE
    everyone[d.qidx[is_everyone]] = np.flatnonzero(is_everyone)
    rows = np.flatnonzero(everyone[d.qidx] >= 0)
    if len(rows):
        base = everyone[d.qidx[rows]]
        pop = _pair_rows(d, base, rows, qt).assign(
            source=POPULATION,
            group=groups[rows],
            refusal_model=human_q["refusal_human"].to_numpy()[base],
        )
        parts.append(pop)
    # model sources (and the uniform / majority baselines) against the human cells
    if cells is not None and cell_pairs:
        labels = cell_groups(cells, study)
        for name, pf in cell_pairs.items():
            refusal = (cell_sources or {}).get(name)
            ref = (
                refusal.groupby("key")["refusal"].first()
                if refusal is not None
                else pd.Series(dtype=float)
            )
            sub = pf.merge(labels, on="key")
            sub["refusal_model"] = sub["key"].map(ref)
            agg = sub.groupby(["group", "question_id"], sort=False).agg(
                metric=("metric", "first"),
                distance=("distance", "mean"),
                tv=("tv", "mean"),
                js=("js", "mean"),
                nw1=("nw1", "mean"),
                refusal_model=("refusal_model", "mean"),
            )
            parts.append(agg.reset_index().assign(source=name))
    per_q = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(per_q):
        per_q = per_q.merge(human_q, on=["group", "question_id"], how="left")
        first = ["source", "group", "question_id", "metric"]
        per_q = per_q[first + [c for c in per_q.columns if c not in first]]
    groups_table = _summaries(per_q, config) if len(per_q) else pd.DataFrame(columns=GROUP_COLUMNS)
    return GroupTables(groups_table, per_q, _human_pairs(d, groups, hcells, qt, config))


def _human_pairs(
    d: D.Dense, groups: np.ndarray, hcells: pd.DataFrame, qt: D.QuestionTable, config: CompareConfig
) -> pd.DataFrame:
    """Every pair of groups of one factor, on the questions both have."""
    factor_of = hcells.drop_duplicates("group").set_index("group")["factor"]
    names, gidx = np.unique(groups.astype(str), return_inverse=True)
    # row of (group, question) in `d`, -1 where the group lacks the question
    at = np.full((len(names), len(qt.ids)), -1, dtype=np.int64)
    at[gidx.reshape(-1), d.qidx] = np.arange(len(groups))
    slot = {g: i for i, g in enumerate(names)}
    rows = []
    for factor, members in factor_of.dropna().groupby(factor_of.dropna(), sort=False):
        present = [g for g in members.index if g in slot]
        for a, b in itertools.combinations(present, 2):
            ia, ib = at[slot[a]], at[slot[b]]
            both = (ia >= 0) & (ib >= 0)
            if not both.any():
                continue
            ia, ib = ia[both], ib[both]
            dist = D.distances(d.p[ia], d.p[ib], d.qidx[ia], qt)
            score = 1.0 - dist.distance
            point, boots, _ = _bootstrap(score[None, :], config.n_resamples, config.seed)
            rows.append(
                {
                    "factor": factor,
                    "group_a": a,
                    "group_b": b,
                    "representativeness": float(point[0]),
                    "mean_tv": float(dist.tv.mean()),
                    "mean_js": float(dist.js.mean()),
                    "n_questions": int(both.sum()),
                    "ci_low": float(np.nanquantile(boots[:, 0], 0.025)),
                    "ci_high": float(np.nanquantile(boots[:, 0], 0.975)),
                }
            )
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)
