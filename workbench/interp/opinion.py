"""The model's opinion against the traits: what an opinion probe reads, and what drives the
answer, side by side (docs/MEASUREMENT.md §5: decodable is not the same as used).

- `opinion_relation`: per site and factor, the share of the opinion probe's held-out
  predictions explained by the factor (eta²) and the cosine between the opinion direction and
  the factor probe's class subspace (a random direction's expected value is
  sqrt((C - 1) / d_model)). Both read `workbench.interp.probing` outputs.
- `behavioural_effects`: each factor's counterfactual effect on the answer distribution in a
  distributions run (prompts that differ in that factor alone).
- `decodable_vs_drives`: one row per factor with both kinds of evidence and two verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch


def row_keys(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """An integer id per distinct combination of `columns` (nulls are a value)."""
    return frame.groupby(list(columns), dropna=False, sort=True).ngroup().to_numpy()


def _eta2(values: np.ndarray, labels: pd.Series) -> float:
    """Share of the variance of `values` explained by the groups in `labels` (eta squared)."""
    ok = ~np.isnan(values) & labels.notna().to_numpy()
    v, g = values[ok], labels[ok].astype(str).to_numpy()
    if len(v) < 2 or v.var() == 0:
        return float("nan")
    means = pd.Series(v).groupby(g).transform("mean").to_numpy()
    return float(((means - v.mean()) ** 2).sum() / ((v - v.mean()) ** 2).sum())


def opinion_relation(
    probes: pd.DataFrame,
    directions: dict[str, torch.Tensor],
    oof: dict[tuple[str, str], np.ndarray],
    frames: dict[str, pd.DataFrame],
    opinion: str,
    held_out: str,
    factor_names: Sequence[str],
) -> pd.DataFrame:
    """Per site x factor: how much of the opinion probe is that factor.

    `eta2_prediction`: share of the opinion probe's out-of-fold prediction variance explained
    by the factor; `eta2_target`: the same for the model's actual opinion (behaviour through
    the probe's eyes); `cos_subspace`: norm of the opinion direction's projection onto the
    span of the factor probe's centred class directions (both fitted on all rows, at the
    answer position), with `cos_null` = sqrt((C-1)/d_model) for a random direction.
    """
    rows = []
    opinion_rows = probes[
        (probes["target"] == opinion)
        & (probes["position"] == "answer")
        & (probes["control"] == "none")
    ]
    for _, op in opinion_rows.iterrows():
        w_op = directions[f"{opinion}|answer|{op['site']}|weight"].reshape(-1)
        pred = oof[(op["site"], opinion)]
        frame = frames[op["site_kind"]]
        for factor in factor_names:
            if factor not in frame.columns or frame[factor].notna().sum() == 0:
                continue
            row: dict[str, Any] = {
                "site": op["site"],
                "site_kind": op["site_kind"],
                "layer": op["layer"],
                "opinion": opinion,
                "opinion_r2": op["mean"],
                "factor": factor,
                # Out-of-fold predictions of the held-out group come from one fold's probe
                # each, so grouping them by that column measures fold shifts: left out.
                "eta2_prediction": np.nan if factor == held_out else _eta2(pred, frame[factor]),
                "eta2_target": _eta2(frame[opinion].to_numpy(dtype=float), frame[factor]),
                "cos_subspace": np.nan,
                "cos_null": np.nan,
            }
            fkey = f"{factor}|answer|{op['site']}|weight"
            if fkey in directions:
                W = directions[fkey]
                n_cls = int(
                    probes[
                        (probes["target"] == factor)
                        & (probes["site"] == op["site"])
                        & (probes["position"] == "answer")
                    ]["n_classes"].iloc[0]
                )
                W = W[:, :n_cls]
                basis = torch.linalg.svd(W - W.mean(1, keepdim=True), full_matrices=False)
                singular = basis.S
                tol = 1e-6 * float(singular.max()) if singular.numel() else 0.0
                rank = int((singular > tol).sum())
                Q = basis.U[:, :rank]
                row["cos_subspace"] = float((Q.T @ w_op).norm() / w_op.norm().clamp_min(1e-12))
                row["cos_null"] = float(np.sqrt(rank / W.shape[0]))
            rows.append(row)
    return pd.DataFrame(rows)


def behavioural_effects(
    prompts: pd.DataFrame,
    distributions: pd.DataFrame,
    stats: pd.DataFrame,
    factor_names: Sequence[str],
) -> pd.DataFrame:
    """Each factor's counterfactual effect on the answer, per question.

    Over all pairs of prompts (same question and option order) that differ in this factor
    and in nothing else: `mean_tv` between their answer distributions, `mean_abs_dscore`
    between their expected scores; `eta2_score`: share of the expected score's variance
    explained by the factor (not counterfactual: confounded where the design is not crossed).
    """
    probs = distributions[~distributions["is_refusal"].astype(bool)].pivot(
        index="prompt_id", columns="option_id", values="prob"
    )
    rows = []
    for qid, qp in prompts.groupby("question_id"):
        qp = qp.merge(stats[["prompt_id", "expected_score"]], on="prompt_id", how="left")
        qprobs = probs.loc[qp["prompt_id"]].to_numpy()
        qprobs = qprobs[:, ~np.isnan(qprobs).all(0)]
        for factor in factor_names:
            if qp[factor].notna().sum() == 0:
                continue
            others = [f for f in factor_names if f != factor] + ["permutation"]
            key = row_keys(qp, others)
            spec = qp[factor].notna().to_numpy()
            tv_sum, d_sum, count = 0.0, 0.0, 0
            scores = qp["expected_score"].to_numpy(dtype=float)
            for members in pd.Series(np.arange(len(qp))[spec]).groupby(key[spec]).indices.values():
                idx = np.arange(len(qp))[spec][members]
                if len(idx) < 2:
                    continue
                p = qprobs[idx]
                upper = np.triu_indices(len(idx), 1)
                tv_sum += float((0.5 * np.abs(p[:, None] - p[None, :]).sum(-1))[upper].sum())
                s = scores[idx]
                d_sum += float(np.nansum(np.abs(s[:, None] - s[None, :])[upper]))
                count += len(upper[0])
            rows.append(
                {
                    "question_id": qid,
                    "factor": factor,
                    "n_pairs": count,
                    "mean_tv": tv_sum / count if count else np.nan,
                    "mean_abs_dscore": d_sum / count if count else np.nan,
                    "eta2_score": _eta2(scores, qp[factor]),
                }
            )
    return pd.DataFrame(rows)


SUMMARY_COLUMNS = (
    "factor",
    "decodable",
    "drives",
    "answer_acc",
    "answer_chance",
    "answer_selectivity",
    "span_acc",
    "span_selectivity",
    "opinion_eta2",
    "opinion_cos",
    "cos_null",
    "behaviour_tv",
    "behaviour_dscore",
    "answer_site",
    "span_site",
)


def _best(frame: pd.DataFrame, column: str) -> pd.Series | None:
    if frame.empty or frame[column].isna().all():
        return None
    return frame.sort_values(column, ascending=False, kind="stable").iloc[0]


def decodable_vs_drives(
    probes: pd.DataFrame,
    relation: pd.DataFrame,
    behaviour: pd.DataFrame,
    factor_names: Sequence[str],
    *,
    decodable_margin: float = 0.1,
    drives_tv: float = 0.02,
) -> pd.DataFrame:
    """One row per factor: best-layer decodability at the answer position and at its own span,
    what the opinion probe reads of it, its behavioural effect, and the two verdicts:
    `decodable` (metric - chance >= decodable_margin with selectivity > 0, at either place)
    and `drives` (behaviour_tv >= drives_tv; null where the design has no pair of prompts
    differing in this factor alone)."""
    rows = []
    real = probes[probes["control"] == "none"] if len(probes) else probes
    for factor in factor_names:
        row: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS, np.nan)
        row["factor"] = factor
        mine = real[real["target"] == factor] if len(real) else real
        decodable = False
        for where, cand in (
            ("answer", mine[mine["position"] == "answer"] if len(mine) else mine),
            ("span", mine[mine["factor"] == factor] if len(mine) else mine),
        ):
            best = _best(cand, "mean")
            if best is None:
                continue
            row[f"{where}_acc"] = best["mean"]
            row[f"{where}_selectivity"] = best["selectivity"]
            row[f"{where}_site"] = f"{best['site']} @ {best['position_label']}"
            if where == "answer":
                row["answer_chance"] = best["chance"]
            decodable |= bool(
                best["mean"] - best["chance"] >= decodable_margin and best["selectivity"] > 0
            )
        rel = relation[relation["factor"] == factor] if len(relation) else relation
        best = _best(rel, "opinion_r2")
        if best is not None:
            row["opinion_eta2"] = best["eta2_prediction"]
            row["opinion_cos"] = best["cos_subspace"]
            row["cos_null"] = best["cos_null"]
        beh = behaviour[behaviour["factor"] == factor] if len(behaviour) else behaviour
        beh = beh[beh["n_pairs"] > 0] if len(beh) else beh
        if len(beh):
            row["behaviour_tv"] = float(beh["mean_tv"].max())
            row["behaviour_dscore"] = float(beh["mean_abs_dscore"].max())
        row["decodable"] = decodable
        tv = float(row["behaviour_tv"])
        row["drives"] = None if np.isnan(tv) else bool(tv >= drives_tv)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
