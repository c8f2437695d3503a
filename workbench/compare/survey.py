"""Survey metrics of answer distributions against human data, per cell (docs/MEASUREMENT.md §4).

Used by `workbench.compare`. Every function works on tidy tables with one row per (key,
option): `key` (a cell), `question_id`, `persona_id`, `option_id`, `prob` (over the
substantive options), `n` (parsed answers, if sampled) and `refusal` (the refusal options'
share, used to mix conditional distributions). Here live the human source and the uniform
and majority baselines, representativeness (OpinionQA), homogenization (Das Man),
structural consistency (Das Man: coarse groups vs the weighted mixture of their subgroups),
A-bias, the knowledge-to-simulation gap (Meister) and per-source distribution properties;
every aggregate with a bootstrap interval over questions and personas (`estimate`).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from workbench.compare import metrics as M
from workbench.compare.human import HumanData
from workbench.study.spec import Question, Study

if TYPE_CHECKING:
    from workbench.compare.comparison import CompareConfig


def matrix(frame: pd.DataFrame, keys: list[str], k: int) -> np.ndarray:
    """[key, option] probabilities from a long table (missing options 0)."""
    wide = frame.pivot_table(index="key", columns="option_id", values="prob", aggfunc="mean")
    return wide.reindex(index=keys, columns=range(k)).fillna(0.0).to_numpy(dtype=np.float64)


def estimate(
    frame: pd.DataFrame, values: Any, config: CompareConfig, weights: Any = None
) -> M.Estimate:
    """Bootstrap over questions and personas (each only with >= `min_clusters` values)."""
    units = [frame["question_id"].to_numpy(), frame["persona_id"].astype(str).to_numpy()]
    units = [u for u in units if len(pd.unique(u)) >= config.min_clusters]
    return M.bootstrap_ci(
        np.asarray(values, dtype=float),
        units,
        n_resamples=config.n_resamples,
        seed=config.seed,
        weights=weights,
    )


def human_source(
    human: HumanData, cells: pd.DataFrame, questions: dict[str, Question]
) -> pd.DataFrame:
    found = human.distributions(cells)
    found = found.merge(
        cells[["key", "question_id", "persona_id"]], left_on="cell", right_index=True
    )
    return found.assign(cell=found["key"], position=np.nan)[
        [
            "key",
            "cell",
            "question_id",
            "persona_id",
            "option_id",
            "position",
            "prob",
            "n",
            "refusal",
        ]
    ]


def baselines(human: pd.DataFrame, questions: dict[str, Question]) -> dict[str, pd.DataFrame]:
    """Uniform (1/K) and majority (one-hot on the question's modal option, human
    distributions averaged over cells) for every human cell."""
    uniform, majority = [], []
    for qid, grp in human.groupby("question_id"):
        k = len(questions[str(qid)].options)
        mode = int(grp.groupby("option_id")["prob"].mean().to_numpy().argmax())
        keys = grp.drop_duplicates("key")
        for o in range(k):
            uniform.append(keys.assign(option_id=o, prob=1.0 / k, n=np.nan, refusal=0.0))
            majority.append(keys.assign(option_id=o, prob=float(o == mode), n=np.nan, refusal=0.0))
    return {
        "uniform": pd.concat(uniform, ignore_index=True),
        "majority": pd.concat(majority, ignore_index=True),
    }


def structural_groups(
    cells: pd.DataFrame, study: Study, human: HumanData | None = None
) -> list[dict[str, Any]]:
    """Coarse cells G whose subgroups by some persona factors F were all asked directly.

    For a cell G and a non-empty set F of the persona factors G leaves unspecified, the
    subgroups are the cells that equal G except that they specify every value combination of
    F (the other factors as in G). Only complete partitions count (then, for human data, the
    gap is exactly 0 by the law of total probability). Weights P(s | G): the product of the
    study's factor weights (uniform where a factor has none), or, for respondent-level human
    data, the respondents' weighted shares.
    """
    factors = [f.name for f in study.factors]
    persona = set(study.persona_factors)
    index = {
        (row["question_id"], *(row[f] if not pd.isna(row[f]) else None for f in factors)): row[
            "key"
        ]
        for row in cells.to_dict("records")
    }
    groups = []
    for signature, key in index.items():
        qid, values = signature[0], dict(zip(factors, signature[1:], strict=True))
        free = [f for f in factors if f in persona and values[f] is None]
        for size in range(1, len(free) + 1):
            for by in itertools.combinations(free, size):
                combos = list(itertools.product(*(study.factor(f).values for f in by)))
                members = []
                for combo in combos:
                    filled = {**values, **dict(zip(by, combo, strict=True))}
                    member = index.get((qid, *(filled[f] for f in factors)))
                    if member is None:
                        break
                    members.append(member)
                if len(members) != len(combos):
                    continue
                if human is not None and human.format == "respondents":
                    spec = {f: v for f, v in values.items() if v is not None and f in human.factors}
                    shares = human.subgroup_weights(qid, spec, list(by))
                    weights = [float(shares.get(c if len(c) > 1 else c[0], 0.0)) for c in combos]
                else:
                    weights = [
                        float(
                            np.prod(
                                [factor_weight(study, f, v) for f, v in zip(by, c, strict=True)]
                            )
                        )
                        for c in combos
                    ]
                groups.append(
                    {
                        "question_id": qid,
                        "group": key,
                        "by": ",".join(by),
                        "members": members,
                        "weights": weights,
                    }
                )
    return groups


def factor_weight(study: Study, factor: str, value: str) -> float:
    f = study.factor(factor)
    return f.weights[f.values.index(value)] if f.weights else 1.0 / len(f.values)


def structural_gaps(
    groups: list[dict[str, Any]],
    cell_sources: dict[str, pd.DataFrame],
    questions: dict[str, Question],
) -> pd.DataFrame:
    rows = []
    for name, frame in cell_sources.items():
        by_key = {k: g.sort_values("option_id")["prob"].to_numpy() for k, g in frame.groupby("key")}
        refusal = frame.groupby("key")["refusal"].first().fillna(0.0)
        for g in groups:
            direct = by_key.get(g["group"])
            fine = [by_key[m] for m in g["members"] if m in by_key]
            if direct is None or len(fine) < len(g["members"]):
                continue
            # Distributions are conditional on a substantive answer: a subgroup weighs
            # P(s | G) * P(substantive | s) (the law of total probability for conditionals).
            answering = 1.0 - refusal.reindex(g["members"]).to_numpy()
            weights = np.asarray(g["weights"]) * answering
            gap = M.structural_gap(direct, np.stack(fine), weights)
            rows.append(
                {
                    "question_id": g["question_id"],
                    "group": g["group"],
                    "by": g["by"],
                    "n_subgroups": len(fine),
                    "source": name,
                    "gap_tv": gap.tv,
                    "gap_js": gap.js,
                    "argmax_agrees": gap.argmax_agrees,
                }
            )
    return pd.DataFrame(rows)


def human_metrics(
    cell_sources: dict[str, pd.DataFrame],
    human_name: str,
    kinds: dict[str, str],
    item_sources: dict[str, pd.DataFrame],
    cell_pairs: dict[str, pd.DataFrame],
    structural: pd.DataFrame,
    questions: dict[str, Question],
    config: CompareConfig,
) -> pd.DataFrame:
    human = cell_sources[human_name]
    rows = []
    for name, frame in cell_sources.items():
        pf = cell_pairs.get(name)
        row: dict[str, Any] = {"source": name, "kind": kinds[name]}
        if pf is not None and len(pf):
            ordinal = pf[pf["nw1"].notna()]
            if len(ordinal):
                per_q = ordinal.groupby("question_id")["key"].transform("size")
                est = estimate(ordinal, 1.0 - ordinal["nw1"], config, weights=1.0 / per_q)
                row.update(
                    representativeness=est.value,
                    representativeness_lo=est.lo,
                    representativeness_hi=est.hi,
                )
            for col, label in (("tv", "mean_tv"), ("js", "mean_js")):
                est = estimate(pf, pf[col], config)
                row.update({label: est.value, f"{label}_lo": est.lo, f"{label}_hi": est.hi})
            row["n_cells"] = len(pf)
        model_m, human_m = [], []
        for qid, question in questions.items():
            keys = sorted(
                set(frame.loc[frame["question_id"] == qid, "key"])
                & set(human.loc[human["question_id"] == qid, "key"])
            )
            if keys:
                model_m.append(matrix(frame, keys, len(question.options)))
                human_m.append(matrix(human, keys, len(question.options)))
        if model_m:
            # Cells of different K are pooled through their per-cell statistics.
            shares = [M.modal_share(m) for m in model_m]
            hshares = [M.modal_share(h) for h in human_m]
            ratio = np.concatenate(
                [
                    M.entropy_bits(m)
                    / np.where(M.entropy_bits(h) > 1e-12, M.entropy_bits(h), np.nan)
                    for m, h in zip(model_m, human_m, strict=True)
                ]
            )
            row["homogenized_share"] = float(
                np.mean(np.concatenate(shares) > config.homogenization_threshold)
            )
            row["human_homogenized_share"] = float(
                np.mean(np.concatenate(hshares) > config.homogenization_threshold)
            )
            row["entropy_ratio_mean"] = float(np.nanmean(ratio))
            row["entropy_ratio_median"] = float(np.nanmedian(ratio))
        sub = structural[structural["source"] == name] if len(structural) else structural
        if len(sub):
            row.update(
                structural_gap_tv=float(sub["gap_tv"].mean()),
                structural_argmax_agree=float(sub["argmax_agrees"].mean()),
                structural_groups=len(sub),
            )
        items = item_sources.get(name)
        if items is not None and items["position"].notna().any():
            first = items[items["position"] == 0]
            k = items.groupby("key")["option_id"].transform("size")
            bias = first["prob"].to_numpy() - 1.0 / k[items["position"] == 0].to_numpy()
            est = estimate(first, bias, config)
            row.update(a_bias=est.value, a_bias_lo=est.lo, a_bias_hi=est.hi)
        rows.append(row)
    out = pd.DataFrame(rows)
    seq = [r for r in rows if r["kind"] == "sampled" and "mean_tv" in r]
    verb = [r for r in rows if r["kind"] == "verbalized" and "mean_tv" in r]
    if seq and verb:
        out["k2s_gap"] = np.nan
        for r in verb:
            gap = M.knowledge_to_simulation_gap(seq[0]["mean_tv"], r["mean_tv"])
            out.loc[out["source"] == r["source"], "k2s_gap"] = gap
    return out


def source_properties(
    cell_sources: dict[str, pd.DataFrame], questions: dict[str, Question], config: CompareConfig
) -> pd.DataFrame:
    rows = []
    for name, frame in cell_sources.items():
        for qid, question in questions.items():
            sub = frame[frame["question_id"] == qid]
            keys = sorted(set(sub["key"]))
            if not keys:
                continue
            p = matrix(sub, keys, len(question.options))
            meta = sub.groupby("key")[["question_id", "persona_id"]].first().reindex(keys)
            row: dict[str, Any] = {"source": name, "question_id": qid, "n_cells": len(keys)}
            stats = {
                "normalized_entropy": M.normalized_entropy(p),
                "modal_share": M.modal_share(p),
            }
            if question.values is not None:
                stats["expected_score"] = M.expected_score(p, question.values)
            for col, values in stats.items():
                est = estimate(meta, values, config)
                row.update({col: est.value, f"{col}_lo": est.lo, f"{col}_hi": est.hi})
            rows.append(row)
    return pd.DataFrame(rows)
