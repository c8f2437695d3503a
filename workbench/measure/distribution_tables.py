"""The tables of a distributions run, built from the engine's raw scores (`distributions.py`).

A tiny model scores a study in a fraction of a second, so per-call pandas overhead (merges and
multi-key groupbys on frames of a few hundred rows) would cost as much as the forward. Keys are
therefore turned into integer group ids with numpy; the float reductions that pandas performs
with its own summation (compensated sums, means, standard deviations) still go through a pandas
groupby, on one column and integer ids, so every number is the one the plain pandas formulation
gives, bit for bit (tests/integration/test_summarize.py checks that against it).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import torch

from workbench.engine.models import LoadedModel
from workbench.engine.scoring import Scored
from workbench.study.spec import Study


def summarize(
    study: Study,
    lm: LoadedModel,
    scored: list[Scored],
    skeleton: pd.DataFrame,
    question_of: dict[int, str],
) -> dict[str, pd.DataFrame]:
    """Turn a chunk's raw scores into its `variants`, `distributions` and `prompt_stats` rows."""
    scored = sorted(scored, key=lambda s: s.key)
    keys = np.asarray([s.key for s in scored], dtype=np.int64)
    by_key = {s.key: s for s in scored}
    sk_pid = skeleton["prompt_id"].to_numpy()
    rows = np.flatnonzero(np.isin(sk_pid, keys))
    # The skeleton lists a prompt's continuations in the order they were requested.
    lp_col = np.concatenate(
        [
            np.asarray(by_key[int(k)].continuation_logprobs, dtype=np.float64)
            for k in pd.unique(sk_pid[rows])
        ]
    )
    order = np.lexsort(
        (
            skeleton["variant"].to_numpy()[rows],
            skeleton["option_id"].to_numpy()[rows],
            sk_pid[rows],
        )
    )
    lp_col = lp_col[order]
    var = skeleton.take(rows[order]).reset_index(drop=True)
    var["logprob"] = lp_col

    # Sorted by (prompt, option, variant) with every variant present: one option per
    # `n_var` consecutive rows, so the per-option reductions are reshapes, not groupbys.
    n_var = len(study.scoring.variants)
    per_option = lp_col.reshape(-1, n_var)
    if study.scoring.aggregate == "max":
        agg = per_option.max(axis=1)
    else:  # log-sum-exp over variants, i.e. summing their probabilities
        agg = np.logaddexp.reduce(per_option, axis=1)
    pid = var["prompt_id"].to_numpy()[::n_var]
    option_id = var["option_id"].to_numpy()[::n_var]
    substantive = ~var["is_refusal"].to_numpy()[::n_var]
    # Prompts are contiguous: `gid` numbers them in prompt_id order, as a groupby would.
    new_prompt = np.r_[True, pid[1:] != pid[:-1]]
    starts = np.flatnonzero(new_prompt)
    gid = np.cumsum(new_prompt) - 1
    if not np.array_equal(pid[starts], keys):
        raise ValueError("every scored prompt needs rows in the variants skeleton")

    shifted = np.where(substantive, agg, -np.inf)
    pmax = np.fmax.reduceat(shifted, starts)[gid]  # fmax: skip NaN, as pandas' max does
    e = np.where(substantive, np.exp(shifted - pmax), 0.0)
    raw = np.exp(agg)
    sums = pd.DataFrame({"e": e, "raw": raw, "refusal": np.where(substantive, 0.0, raw)})
    sums = sums.groupby(pd.Index(gid)).sum()  # an Index key: no column-name lookup
    prob = np.where(substantive, e / sums["e"].to_numpy()[gid], np.nan)
    dist = pd.DataFrame(
        {
            "prompt_id": pid,
            "option_id": option_id,
            "label": var["label"].to_numpy()[::n_var],
            "position": var["position"].to_numpy()[::n_var],
            "is_refusal": ~substantive,
            "logprob": agg,
            "prob": prob,
        }
    )
    modal = _first_argmax(prob, gid, substantive, len(keys))
    exp_score = _expected_scores(study, prob, option_id, gid, substantive, keys, question_of)

    answers = torch.stack([s.answer_logprobs for s in scored])
    entropy_bits = (-(answers.exp() * answers).nan_to_num().sum(-1) / math.log(2)).tolist()
    k = min(study.scoring.top_k, answers.shape[-1])
    top = torch.topk(answers, k, dim=-1)
    top_ids = top.indices.tolist()
    # One decode per distinct token, not per (prompt, rank).
    decoded = {i: lm.tokenizer.decode([i]) for i in {i for row in top_ids for i in row}}
    stats = pd.DataFrame(
        {
            "prompt_id": keys,
            "option_mass": sums["raw"].to_numpy(),
            "refusal_mass": sums["refusal"].to_numpy(),
            "entropy_bits": entropy_bits,
            "modal_option_id": option_id[modal].astype(np.int64),
            "modal_prob": prob[modal],
            "expected_score": exp_score,
            "top_token_ids": top_ids,
            "top_tokens": [[decoded[i] for i in row] for row in top_ids],
            "top_probs": top.values.exp().tolist(),
        }
    )
    return {"variants": var, "distributions": dist, "prompt_stats": stats}


def _first_argmax(
    prob: np.ndarray, gid: np.ndarray, substantive: np.ndarray, n_groups: int
) -> np.ndarray:
    """Per group, the row of its largest substantive `prob` (the first on ties, like idxmax)."""
    sub = np.flatnonzero(substantive)
    sub_gid = gid[sub]
    sub_starts = np.flatnonzero(np.r_[True, sub_gid[1:] != sub_gid[:-1]])
    if len(sub_starts) != n_groups:
        raise ValueError("every prompt needs a substantive option")
    best = np.fmax.reduceat(prob[sub], sub_starts)  # one per group: `gid` indexes it
    hits = sub[prob[sub] == best[sub_gid]]
    first = np.r_[True, gid[hits][1:] != gid[hits][:-1]]
    if first.sum() != n_groups:
        raise ValueError("a prompt's substantive probabilities are all NaN")
    return hits[first]


def _expected_scores(
    study: Study,
    prob: np.ndarray,
    option_id: np.ndarray,
    gid: np.ndarray,
    substantive: np.ndarray,
    keys: np.ndarray,
    question_of: dict[int, str],
) -> np.ndarray:
    """Per prompt, sum over substantive options of prob x the option's value; NaN where the
    question has no values. Each prompt's products are summed as one contiguous numpy row,
    exactly as `(probs * values).sum()` on that prompt alone would."""
    values = {q.id: q.values for q in study.questions}
    width = max((len(v) for v in values.values() if v is not None), default=0)
    qids = list(values)
    table = np.full((len(qids), max(width, int(option_id.max(initial=0)) + 1)), np.nan)
    for i, q in enumerate(qids):
        v = values[q]
        if v is not None:
            table[i, : len(v)] = np.asarray(v, dtype=np.float64)
    q_of_prompt = np.asarray([qids.index(question_of[int(k)]) for k in keys], dtype=np.int64)
    sub = np.flatnonzero(substantive)
    products = prob[sub] * table[q_of_prompt[gid[sub]], option_id[sub]]
    sub_gid = gid[sub]
    sizes = np.bincount(sub_gid, minlength=len(keys))
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    out = np.full(len(keys), np.nan)
    for n in np.unique(sizes[sizes > 0]):
        groups = np.flatnonzero(sizes == n)
        out[groups] = products[starts[groups][:, None] + np.arange(n)].sum(axis=1)
    has_values = np.asarray([values[question_of[int(k)]] is not None for k in keys], dtype=bool)
    return np.where(has_values, out, np.nan)


def _group_ids(frame: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the rows' key combinations numbered in sorted key order, NA last (what
    `groupby(columns, sort=True, dropna=False)` numbers), and the first row of each group."""
    combined = np.zeros(len(frame), dtype=np.int64)
    for col in columns:
        codes, uniques = pd.factorize(frame[col], sort=True, use_na_sentinel=False)
        combined = combined * (len(uniques) + 1) + codes
    _, first, ids = np.unique(combined, return_index=True, return_inverse=True)
    return ids.reshape(-1), first


def _rows_in(prompts: pd.DataFrame, distributions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The substantive rows of `distributions` whose prompt is in `prompts` (an inner merge on
    prompt_id keeps the left frame's order) and each one's row in `prompts`."""
    at = pd.Index(prompts["prompt_id"]).get_indexer(distributions["prompt_id"])
    keep = np.flatnonzero((at >= 0) & ~distributions["is_refusal"].to_numpy(dtype=bool))
    return keep, at[keep]


def order_adjusted(
    prompts: pd.DataFrame, distributions: pd.DataFrame, factor_names: list[str]
) -> pd.DataFrame:
    """Average each option's probability over the option orders shown for the same item."""
    keys = ["persona_id", "question_id", *factor_names]
    rows, at = _rows_in(prompts, distributions)
    item, _ = _group_ids(prompts, keys)
    option = distributions["option_id"].to_numpy()[rows]
    opt_codes, opt_uniques = pd.factorize(option, sort=True)
    _, first, ids = np.unique(
        item[at] * (len(opt_uniques) + 1) + opt_codes, return_index=True, return_inverse=True
    )
    grouped = pd.Series(distributions["prob"].to_numpy()[rows]).groupby(ids.reshape(-1))
    out = prompts[keys].take(at[first]).reset_index(drop=True)
    out["option_id"] = distributions["option_id"].take(rows[first]).to_numpy()
    out["prob"] = grouped.mean().to_numpy()
    out["prob_sd"] = grouped.std().to_numpy()
    out["n_orders"] = grouped.size().to_numpy()
    return out


def position_bias(prompts: pd.DataFrame, distributions: pd.DataFrame) -> pd.DataFrame:
    """Mean probability at each displayed position, minus 1/K (position 0 is the A-bias)."""
    rows, at = _rows_in(prompts, distributions)
    pid = distributions["prompt_id"].to_numpy()[rows]
    _, pid_codes, k = np.unique(pid, return_inverse=True, return_counts=True)
    uniform = 1.0 / k[pid_codes.reshape(-1)]
    question, _ = _group_ids(prompts, ["question_id"])
    pos_codes, pos_uniques = pd.factorize(distributions["position"].to_numpy()[rows], sort=True)
    _, first, ids = np.unique(
        question[at] * (len(pos_uniques) + 1) + pos_codes, return_index=True, return_inverse=True
    )
    grouped = pd.Series(distributions["prob"].to_numpy()[rows]).groupby(ids.reshape(-1))
    out = pd.DataFrame(
        {
            "question_id": prompts["question_id"].take(at[first]).reset_index(drop=True),
            "position": distributions["position"].take(rows[first]).reset_index(drop=True),
            "mean_prob": grouped.mean().to_numpy(),
            "uniform": uniform[first],
            "n_prompts": grouped.size().to_numpy(),
        }
    )
    out["bias"] = out["mean_prob"] - out["uniform"]
    return out


def option_mass_warnings(
    prompts: pd.DataFrame, stats: pd.DataFrame, threshold: float
) -> list[dict[str, Any]]:
    """One warning per question whose mean option mass is below `threshold`, naming the
    tokens the model wanted instead (its most frequent full-vocabulary top tokens)."""
    if stats.empty:
        return []
    at = pd.Index(stats["prompt_id"]).get_indexer(prompts["prompt_id"])
    keep = np.flatnonzero(at >= 0)  # prompts order, as an inner merge keeps it
    at = at[keep]
    mass_all = stats["option_mass"].to_numpy(dtype=np.float64)[at]
    tokens_all = stats["top_tokens"].to_numpy()[at]
    codes, uniques = pd.factorize(prompts["question_id"].take(keep), sort=True)
    out: list[dict[str, Any]] = []
    for code, qid in enumerate(uniques):
        members = np.flatnonzero(codes == code)
        mass = _nanmean(mass_all[members])
        if mass >= threshold:
            continue
        counts = Counter(t[0] for t in tokens_all[members] if len(t))
        # most_common is a stable sort: ties keep first appearance, as value_counts does
        wanted = [str(t) for t, _ in counts.most_common(5)]
        out.append(
            {
                "question_id": str(qid),
                "mean_option_mass": round(mass, 4),
                "threshold": threshold,
                "top_tokens": wanted,
                "message": (
                    f"question {qid!r}: mean option mass {mass:.3f} < {threshold} (the model "
                    f"mostly wanted {', '.join(repr(t) for t in wanted)}); its distribution is "
                    "conditional on an answer the model would rarely give: check the labels, "
                    "the template's answer cue, or use a chat template / prefill"
                ),
            }
        )
    return out


def _nanmean(values: np.ndarray) -> float:
    """`Series.mean()`: NaN skipped, a plain numpy sum divided by the count."""
    missing = np.isnan(values)
    count = float(len(values) - missing.sum())
    return float(np.where(missing, 0.0, values).sum() / count) if count > 0 else math.nan
