"""Every cell of every question as one padded array, so a metric is one array operation.

A comparison of 1,500 questions x 60 groups x several sources must not filter or pivot per
question. Here every distribution becomes a row of `P [cell, option]`, padded with zeros to
the study's largest K, beside `qidx [cell]` (its question); the questions' ordinal values
live in `QuestionTable`, sorted and padded so that padding never counts:

- TV and JS: a padded option is 0 in both distributions (adds 0);
- normalized W1: options are visited in value order; padded options come last with a gap of
  0 to the previous value (adds 0); the gaps are divided by the question's value span;
- KL: smoothing is added to the real options only.

A question is **nominal** when it has no ordinal values or all its values are equal
(a survey's way of writing "no order": `[1, 1, 1, 1]`); its representativeness distance is TV,
never W1 (OpinionQA's convention for unordered items). Ordinal questions use normalized W1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from workbench.compare import metrics as M
from workbench.study.spec import Question

Array = NDArray[np.float64]
Metric = Literal["nw1", "tv"]


def is_nominal(question: Question) -> bool:
    """No ordinal values, or all equal (no order to measure a distance along)."""
    return question.values is None or len(set(question.values)) < 2


@dataclass(frozen=True)
class QuestionTable:
    """The questions of a study as padded arrays (one row per question)."""

    ids: tuple[str, ...]
    k: NDArray[np.int64]
    """[question] substantive options."""
    order: NDArray[np.int64]
    """[question, option] option indices in ascending value order, padding last."""
    gaps: Array
    """[question, option - 1] value gap to the next sorted option / value span (0: padding)."""
    values: Array
    """[question, option] ordinal values (0 for padding and nominal questions)."""
    nominal: NDArray[np.bool_]
    kmax: int

    def index(self, question_ids: pd.Series | NDArray[np.object_]) -> NDArray[np.int64]:
        """Row of each question id (-1: not a question of the study)."""
        codes = pd.Index(self.ids).get_indexer(pd.Index(np.asarray(question_ids, dtype=object)))
        return np.asarray(codes, dtype=np.int64)

    def metric(self) -> NDArray[np.object_]:
        """[question] "tv" (nominal) or "nw1" (ordinal): the representativeness distance."""
        return np.where(self.nominal, "tv", "nw1").astype(object)


def question_table(questions: dict[str, Question] | list[Question]) -> QuestionTable:
    qs = list(questions.values()) if isinstance(questions, dict) else list(questions)
    kmax = max((len(q.options) for q in qs), default=1)
    n = len(qs)
    k = np.array([len(q.options) for q in qs], dtype=np.int64)
    order = np.tile(np.arange(kmax, dtype=np.int64), (n, 1))
    gaps = np.zeros((n, max(kmax - 1, 0)))
    values = np.zeros((n, kmax))
    nominal = np.array([is_nominal(q) for q in qs], dtype=bool)
    for i, q in enumerate(qs):
        if nominal[i]:
            continue
        assert q.values is not None
        v = np.asarray(q.values, dtype=np.float64)
        o = np.argsort(v, kind="stable")
        order[i, : len(v)] = o
        gaps[i, : len(v) - 1] = np.diff(v[o]) / (v.max() - v.min())
        values[i, : len(v)] = v
    return QuestionTable(tuple(q.id for q in qs), k, order, gaps, values, nominal, kmax)


@dataclass(frozen=True)
class Dense:
    """Distributions of one long table as a padded matrix."""

    keys: NDArray[np.object_]
    """[cell] the table's key of each row."""
    qidx: NDArray[np.int64]
    """[cell] row of its question in the `QuestionTable`."""
    p: Array
    """[cell, option] probabilities (padding 0)."""


def to_dense(frame: pd.DataFrame, qt: QuestionTable, key: str = "key") -> Dense:
    """A long table (key, question_id, option_id, prob) as a `Dense` (rows in key order of
    first appearance; a repeated (key, option) is summed; rows of unknown questions dropped)."""
    codes, uniques = pd.factorize(frame[key], sort=True)
    p = np.zeros((len(uniques), qt.kmax))
    np.add.at(
        p, (codes, frame["option_id"].to_numpy(dtype=np.int64)), frame["prob"].to_numpy(float)
    )
    first = np.zeros(len(uniques), dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)  # each key's first row
    qidx = qt.index(frame["question_id"].iloc[first].to_numpy(dtype=object))
    keep = qidx >= 0
    return Dense(np.asarray(uniques, dtype=object)[keep], qidx[keep], p[keep])


def align(a: Dense, b: Dense) -> tuple[NDArray[np.object_], Array, Array, NDArray[np.int64]]:
    """The keys both have (sorted), with both matrices in that order and the question rows."""
    common, ia, ib = np.intersect1d(a.keys, b.keys, assume_unique=True, return_indices=True)
    return common, a.p[ia], b.p[ib], a.qidx[ia]


def normalized_w1(p: Array, q: Array, qidx: NDArray[np.int64], qt: QuestionTable) -> Array:
    """[cell] normalized W1 on each question's values; NaN for nominal questions."""
    order = qt.order[qidx]
    diff = np.take_along_axis(p - q, order, axis=1)
    cdf = np.cumsum(diff, axis=1)[:, :-1]
    out = np.abs(cdf * qt.gaps[qidx]).sum(1)
    return np.where(qt.nominal[qidx], np.nan, out)


def kl_bits(
    p: Array, q: Array, qidx: NDArray[np.int64], qt: QuestionTable, smoothing: float
) -> Array:
    """[cell] KL(p ‖ q) in bits, additive smoothing on each question's real options only."""
    real = np.arange(qt.kmax)[None, :] < qt.k[qidx][:, None]
    ps, qs = p + smoothing * real, q + smoothing * real
    ps, qs = ps / ps.sum(1, keepdims=True), qs / qs.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(ps > 0, ps * (np.log2(ps) - np.log2(qs)), 0.0)
    return np.asarray(terms.sum(1))


@dataclass(frozen=True)
class Distances:
    tv: Array
    js: Array
    nw1: Array
    """NaN for nominal questions."""
    distance: Array
    """The representativeness distance: nw1 (ordinal) or tv (nominal)."""
    metric: NDArray[np.object_]
    """[cell] "nw1" or "tv"."""


def distances(p: Array, q: Array, qidx: NDArray[np.int64], qt: QuestionTable) -> Distances:
    """Row-wise TV, JS distance (base 2), normalized W1 and the representativeness distance."""
    tv = M.total_variation(p, q)
    nw1 = normalized_w1(p, q, qidx, qt)
    nominal = qt.nominal[qidx]
    return Distances(tv, M.js_distance(p, q), nw1, np.where(nominal, tv, nw1), qt.metric()[qidx])


def entropy_norm(p: Array, qidx: NDArray[np.int64], qt: QuestionTable) -> Array:
    """[cell] H(p) / log2 K with each row's own K (0 when K = 1)."""
    k = qt.k[qidx].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(k > 1, M.entropy_bits(p) / np.log2(np.maximum(k, 2)), 0.0)


def expected_score(p: Array, qidx: NDArray[np.int64], qt: QuestionTable) -> Array:
    """[cell] Σ p_k v_k (NaN for nominal questions)."""
    return np.where(qt.nominal[qidx], np.nan, (p * qt.values[qidx]).sum(1))


def floor_distances(
    p: Array,
    n: Array,
    qidx: NDArray[np.int64],
    qt: QuestionTable,
    *,
    n_sims: int = 100,
    seed: int = 0,
    chunk: int = 4096,
) -> tuple[Array, Array]:
    """The sampling floor of each row: mean TV and mean representativeness distance between
    `n` multinomial draws from p (renormalized counts) and p itself, over `n_sims` draws.

    A resample of the same human sample size shows this distance from the sample by chance
    alone, so a model-vs-human distance near it is as close as the data can tell. Rows with
    n < 1 (or NaN) give NaN. Memory stays bounded by simulating `chunk` rows at a time.
    """
    rng = np.random.default_rng(seed)
    tv = np.full(len(p), np.nan)
    dist = np.full(len(p), np.nan)
    sizes = np.nan_to_num(np.asarray(n, dtype=float), nan=0.0).round().astype(np.int64)
    ok = np.flatnonzero(sizes >= 1)
    rows = p / np.where(p.sum(1, keepdims=True) > 0, p.sum(1, keepdims=True), 1.0)
    for start in range(0, len(ok), chunk):
        idx = ok[start : start + chunk]
        draws = rng.multinomial(sizes[idx], rows[idx], size=(n_sims, len(idx)))
        phat = draws / sizes[idx][None, :, None]
        ref = np.broadcast_to(rows[idx], phat.shape)
        flat_p, flat_q = phat.reshape(-1, qt.kmax), ref.reshape(-1, qt.kmax)
        q_rep = np.tile(qidx[idx], n_sims)
        # TV and W1 only: JS (logarithms of every draw) would cost as much as the draws
        d_tv = M.total_variation(flat_p, flat_q)
        d_dist = np.where(qt.nominal[q_rep], d_tv, normalized_w1(flat_p, flat_q, q_rep, qt))
        tv[idx] = d_tv.reshape(n_sims, -1).mean(0)
        dist[idx] = d_dist.reshape(n_sims, -1).mean(0)
    return tv, dist


def long_rows(
    keys: NDArray[np.object_], qidx: NDArray[np.int64], p: Array, qt: QuestionTable
) -> pd.DataFrame:
    """Back to a long table: key, option_id, prob for each row's real options."""
    real = np.arange(qt.kmax)[None, :] < qt.k[qidx][:, None]
    r, o = np.nonzero(real)
    return pd.DataFrame({"key": keys[r], "option_id": o, "prob": p[r, o]})
