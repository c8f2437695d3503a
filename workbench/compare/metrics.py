"""Distances between answer distributions and the field's survey metrics (docs/MEASUREMENT.md §3, §4).

Every function takes probability arrays whose *last* axis is the option axis
(`p_option`: [..., option]) and works row-wise, so one call scores every prompt of a run.
Inputs are used as given: renormalize over the substantive options first (refusal options
are kept out of ordinal distributions, as OpinionQA does).

Definitions (and the units each number is in):

- total variation TV = ½ Σ|p − q|, in [0, 1] (Meister et al.'s headline metric);
- Jensen–Shannon *distance* = sqrt(JS divergence) with **base-2** logarithms, in [0, 1]
  (scipy's `jensenshannon` defaults to base e, bounded by sqrt(ln 2) ≈ 0.83);
  GlobalOpinionQA similarity = 1 − this;
- KL(p‖q) in **bits**; zeros are handled by additive smoothing: both distributions get
  `smoothing` added to every option and are renormalized; the constant is an argument and is
  recorded by every caller that writes a table;
- W1 over the question's ordinal values (any real numbers, not necessarily 1..N: OpinionQA
  writes [1, 2, 1.5] for a middle "neither"); normalized W1 = W1 / (max value − min value);
  OpinionQA representativeness = mean over questions of 1 − normalized W1;
- normalized entropy H(p) / log K, expected ordinal score Σ p_k v_k, modal share max_k p_k;
- homogenization (Das Man): share of cells whose modal share exceeds 0.95, beside the human
  share, and the per-cell entropy ratio H_model / H_human;
- structural consistency (Das Man): a coarse group asked directly vs the population-weighted
  mixture of its subgroups (gap and argmax agreement); 0 for human data by the law of total
  probability;
- A-bias: mean probability at displayed position 1 minus 1/K;
- knowledge-to-simulation gap (Meister): TV(sequence) / TV(verbalized) − 1;
- sampling floor: the expected TV between N multinomial draws from p and p itself
  (simulated), below which a sampled-vs-exact difference means nothing;
- uncertainty: bootstrap over clusters (questions, personas: each resampled independently),
  1,000 resamples, percentile 95% intervals.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]

DEFAULT_SMOOTHING = 1e-6
"""Additive smoothing of `kl_bits` (added to every option of both distributions)."""
HOMOGENIZATION_THRESHOLD = 0.95
"""Das Man: a cell is homogenized when its modal share exceeds this."""


def _as_prob(p: ArrayLike) -> Array:
    return np.asarray(p, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# distances between two distributions (row-wise over the last axis)


def total_variation(p_option: ArrayLike, q_option: ArrayLike) -> Array:
    """TV = ½ Σ_k |p_k − q_k| per row: [..., option] x [..., option] -> [...]."""
    p, q = _as_prob(p_option), _as_prob(q_option)
    return np.asarray(0.5 * np.abs(p - q).sum(-1))


def js_distance(p_option: ArrayLike, q_option: ArrayLike) -> Array:
    """Jensen–Shannon distance, base 2 (sqrt of the divergence), in [0, 1], per row.

    Equal to `scipy.spatial.distance.jensenshannon(p, q, base=2)` for normalized inputs.
    """
    p, q = _as_prob(p_option), _as_prob(q_option)
    m = 0.5 * (p + q)

    def kl(a: Array) -> Array:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(a > 0, a * np.log2(a / m), 0.0)
        return np.asarray(terms.sum(-1))

    return np.asarray(np.sqrt(np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, None)))


def smooth(p_option: ArrayLike, smoothing: float = DEFAULT_SMOOTHING) -> Array:
    """Additive smoothing: p + smoothing on every option, renormalized (no zero left)."""
    p = _as_prob(p_option) + smoothing
    return np.asarray(p / p.sum(-1, keepdims=True))


def kl_bits(
    p_option: ArrayLike, q_option: ArrayLike, smoothing: float = DEFAULT_SMOOTHING
) -> Array:
    """KL(p ‖ q) in bits per row, after additive `smoothing` of both (see `smooth`).

    With `smoothing=0`, an option with p > 0 = q gives inf (the exact value).
    """
    p, q = smooth(p_option, smoothing), smooth(q_option, smoothing)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log2(p) - np.log2(q)), 0.0)
    return np.asarray(terms.sum(-1))


def wasserstein1(p_option: ArrayLike, q_option: ArrayLike, values: Sequence[float]) -> Array:
    """W1 between two distributions on the ordinal `values` (one per option, any order).

    W1 = ∫ |F_p − F_q| over the value axis: sort the options by value, then sum the CDF gap
    times the distance to the next value. Values need not be 1..N nor sorted ([1, 2, 1.5]).
    """
    p, q = _as_prob(p_option), _as_prob(q_option)
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    gaps = np.diff(v[order])
    cdf_gap = np.cumsum(p[..., order] - q[..., order], axis=-1)[..., :-1]
    return np.asarray((np.abs(cdf_gap) * gaps).sum(-1))


def normalized_w1(p_option: ArrayLike, q_option: ArrayLike, values: Sequence[float]) -> Array:
    """W1 / (max value − min value), in [0, 1]."""
    v = np.asarray(values, dtype=np.float64)
    span = float(v.max() - v.min())
    if span <= 0:
        raise ValueError("normalized W1 needs at least two distinct ordinal values")
    return np.asarray(wasserstein1(p_option, q_option, values) / span)


# --------------------------------------------------------------------------------------------
# properties of one distribution


def entropy_bits(p_option: ArrayLike) -> Array:
    """Shannon entropy in bits per row (0 log 0 = 0)."""
    p = _as_prob(p_option)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return np.asarray(terms.sum(-1))


def normalized_entropy(p_option: ArrayLike) -> Array:
    """H(p) / log K in [0, 1], K = the number of options (the last axis); 0 when K = 1."""
    p = _as_prob(p_option)
    k = p.shape[-1]
    if k < 2:
        return np.zeros(p.shape[:-1])
    return np.asarray(entropy_bits(p) / np.log2(k))


def expected_score(p_option: ArrayLike, values: Sequence[float]) -> Array:
    """Σ_k p_k v_k per row."""
    return np.asarray(_as_prob(p_option) @ np.asarray(values, dtype=np.float64))


def modal_share(p_option: ArrayLike) -> Array:
    """max_k p_k per row."""
    return np.asarray(_as_prob(p_option).max(-1))


# --------------------------------------------------------------------------------------------
# survey metrics (Das Man, OpinionQA, Dominguez-Olmedo, Meister)


def representativeness(
    model_cells: Sequence[ArrayLike],
    human_cells: Sequence[ArrayLike],
    values: Sequence[Sequence[float]],
    question_ids: Sequence[str],
) -> float:
    """OpinionQA representativeness: mean over questions of 1 − normalized W1.

    One entry per cell: `model_cells[i]` and `human_cells[i]` are [option] distributions
    over `values[i]` (cells of different questions may have different K). The cells of one
    question are averaged first, so every question weighs the same.
    """
    per_question: dict[str, list[float]] = {}
    for model, human, v, qid in zip(model_cells, human_cells, values, question_ids, strict=True):
        score = 1.0 - float(normalized_w1(model, human, v))
        per_question.setdefault(qid, []).append(score)
    return float(np.mean([np.mean(v) for v in per_question.values()]))


@dataclass(frozen=True)
class Homogenization:
    """Das Man's homogenization of a set of cells (model beside human)."""

    model_share: float
    """Share of cells whose modal share exceeds `threshold` (model)."""
    human_share: float
    """The same for the human distributions of the same cells."""
    entropy_ratio_mean: float
    """Mean over cells of H_model / H_human (cells with H_human = 0 left out)."""
    entropy_ratio_median: float
    n_cells: int
    n_ratio_cells: int
    """Cells in the entropy ratio (H_human > 0)."""
    threshold: float


def homogenization(
    model_option: ArrayLike,
    human_option: ArrayLike,
    threshold: float = HOMOGENIZATION_THRESHOLD,
) -> Homogenization:
    """Share of cells with max_k p_k > threshold (model, human) and the entropy ratio."""
    model, human = _as_prob(model_option), _as_prob(human_option)
    h_model, h_human = entropy_bits(model), entropy_bits(human)
    keep = h_human > 1e-12
    ratio = h_model[keep] / h_human[keep]
    return Homogenization(
        model_share=float(np.mean(modal_share(model) > threshold)),
        human_share=float(np.mean(modal_share(human) > threshold)),
        entropy_ratio_mean=float(ratio.mean()) if ratio.size else float("nan"),
        entropy_ratio_median=float(np.median(ratio)) if ratio.size else float("nan"),
        n_cells=int(model.shape[0]),
        n_ratio_cells=int(ratio.size),
        threshold=threshold,
    )


@dataclass(frozen=True)
class StructuralGap:
    """A coarse group asked directly vs the weighted mixture of its subgroups."""

    tv: float
    js: float
    argmax_agrees: bool
    """Does the direct answer's mode equal the mixture's mode?"""
    mixture: Array
    """[option] Σ_s w_s P(·|s)."""


def structural_gap(
    direct_option: ArrayLike, fine_sub_option: ArrayLike, weights_sub: ArrayLike
) -> StructuralGap:
    """Das Man structural consistency of one coarse group G.

    `direct_option` [option]: P(·|G) asked directly; `fine_sub_option` [subgroup, option]:
    P(·|s) of its subgroups; `weights_sub` [subgroup]: population weights P(s|G)
    (normalized here). The subgroups must partition G.
    """
    direct = _as_prob(direct_option)
    fine = _as_prob(fine_sub_option)
    w = _as_prob(weights_sub)
    mixture = (w / w.sum()) @ fine
    return StructuralGap(
        tv=float(total_variation(direct, mixture)),
        js=float(js_distance(direct, mixture)),
        argmax_agrees=bool(np.argmax(direct) == np.argmax(mixture)),
        mixture=np.asarray(mixture),
    )


def a_bias(prob_position: ArrayLike) -> Array:
    """A-bias per row: probability at displayed position 1 minus 1/K.

    `prob_position` [..., position]: the distribution in *displayed* order.
    """
    p = _as_prob(prob_position)
    return np.asarray(p[..., 0] - 1.0 / p.shape[-1])


def knowledge_to_simulation_gap(tv_sequence: float, tv_verbalized: float) -> float:
    """Meister et al.: TV(sequence) / TV(verbalized) − 1 (> 0: verbalizing is closer)."""
    return float(tv_sequence / tv_verbalized - 1.0) if tv_verbalized > 0 else float("nan")


def uniform_baseline(k: int) -> Array:
    """[option] 1/K everywhere."""
    return np.full(k, 1.0 / k)


def majority_baseline(population_option: ArrayLike) -> Array:
    """[option] one-hot on the population's modal option (the 'everyone answers the
    majority answer' baseline: what a fully homogenized model predicts for every group)."""
    p = _as_prob(population_option)
    out = np.zeros_like(p)
    np.put_along_axis(out, np.argmax(p, -1)[..., None], 1.0, axis=-1)
    return out


# --------------------------------------------------------------------------------------------
# sampling noise and uncertainty


@dataclass(frozen=True)
class Floor:
    """The sampling floor of N draws from p (per row)."""

    mean_tv: Array
    """[...] E[TV(counts/N, p)] over the simulations."""
    q95_tv: Array
    """[...] its 95th percentile: a larger TV is unlikely to be sampling noise alone."""
    n: NDArray[np.int64]
    """[...] the sample size of each row."""
    mean_of_rows_q95: float
    """95th percentile of the mean TV over all rows (simulated jointly): an observed mean TV
    above it is unlikely to be sampling noise alone."""
    n_sims: int
    sims: Array | None = None
    """[sim, row] the simulated TVs (rows with n > 0), when asked for (`keep_sims`)."""


def sampling_floor(
    p_option: ArrayLike,
    n: int | ArrayLike,
    *,
    n_sims: int = 2000,
    seed: int = 0,
    keep_sims: bool = False,
) -> Floor:
    """Expected TV between the empirical distribution of `n` multinomial draws from p and p.

    `n` is a count or one count per row (e.g. each prompt's number of parsed samples); rows
    with n = 0 give NaN. Simulated with numpy's `Generator.multinomial` (seeded).
    """
    p = _as_prob(p_option)
    rows = p.reshape(-1, p.shape[-1])
    rows = rows / rows.sum(-1, keepdims=True)
    counts_n = np.broadcast_to(np.asarray(n, dtype=np.int64), p.shape[:-1]).reshape(-1)
    rng = np.random.default_rng(seed)
    mean = np.full(len(rows), np.nan)
    q95 = np.full(len(rows), np.nan)
    mean_q95 = float("nan")
    tv = None
    ok = counts_n > 0
    if ok.any():
        draws = rng.multinomial(counts_n[ok], rows[ok], size=(n_sims, int(ok.sum())))
        tv = 0.5 * np.abs(draws / counts_n[ok][None, :, None] - rows[ok][None]).sum(-1)
        mean[ok] = tv.mean(0)
        q95[ok] = np.quantile(tv, 0.95, axis=0)
        mean_q95 = float(np.quantile(tv.mean(1), 0.95))
    shape = p.shape[:-1]
    sims = tv if keep_sims else None
    return Floor(
        mean.reshape(shape), q95.reshape(shape), counts_n.reshape(shape), mean_q95, n_sims, sims
    )


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap percentile interval."""

    value: float
    lo: float
    hi: float
    n: int
    """Rows (non-NaN values) behind the statistic."""


def bootstrap_ci(
    values: ArrayLike,
    clusters: Sequence[ArrayLike] = (),
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    statistic: Callable[[Array, Array], Array] | None = None,
    weights: ArrayLike | None = None,
) -> Estimate:
    """Mean of `values` with a (multi-way) cluster bootstrap percentile interval.

    `clusters`: zero or more label arrays, one per resampled unit (e.g. question ids and
    persona ids). Each unit is resampled independently with replacement; a row's weight in a
    resample is the product of its clusters' multiplicities (no clusters: rows are resampled).
    `statistic(values [row], weights [resample, row]) -> [resample]` replaces the weighted
    mean. `weights` [row] make it a weighted mean (e.g. a per-prompt rate weighted by the
    prompt's sample count). NaN values are dropped first.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    w_row = (
        np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    )
    keep = ~np.isnan(v) & (w_row > 0)
    v, w_row = v[keep], w_row[keep]
    labels = [np.asarray(c).reshape(-1)[keep] for c in clusters]
    if v.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    if not labels:
        labels = [np.arange(v.size)]
    idxs = []
    for lab in labels:
        # pandas' sorted factorize gives np.unique's codes without sorting Python objects
        idx = pd.factorize(lab, sort=True)[0] if lab.dtype == object else None
        idxs.append(idx if idx is not None else np.unique(lab, return_inverse=True)[1])
    n_units = tuple(int(idx.max()) + 1 for idx in idxs)
    counts = list(resample_counts(n_units, n_resamples, seed))
    stat = statistic or _weighted_mean
    point = float(stat(v, w_row[None, :])[0])
    if statistic is None and len(idxs) in (1, 2):
        boots = _cluster_means(v, w_row, idxs, counts)
    else:
        resample_w = np.broadcast_to(w_row, (n_resamples, v.size)).copy()
        for idx, c in zip(idxs, counts, strict=True):
            resample_w *= c[:, idx]
        boots = stat(v, resample_w)
    boots = boots[~np.isnan(boots)]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha]) if boots.size else (np.nan, np.nan)
    return Estimate(point, float(lo), float(hi), int(v.size))


@functools.lru_cache(maxsize=16)
def resample_counts(n_units: tuple[int, ...], n_resamples: int, seed: int) -> tuple[Array, ...]:
    """[resample, unit] multiplicities of each unit in each resample, drawn in order from one
    generator seeded with `seed`. Kept (read-only): a comparison bootstraps many statistics
    over the same questions and personas, and these draws cost more than the statistic."""
    rng = np.random.default_rng(seed)
    out = []
    for n in n_units:
        c = rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(np.float64)
        c.flags.writeable = False
        out.append(c)
    return tuple(out)


def _cluster_means(v: Array, w: Array, idxs: list[NDArray[np.int64]], counts: list[Array]) -> Array:
    """The weighted means of the resamples without a [resample, row] matrix: rows are summed
    per unit (one way) or per unit pair (two ways) first, so a survey of 100,000 cells costs
    [resample, unit] products (the same numbers as weighting every row)."""
    if len(idxs) == 1:
        num = counts[0] @ np.bincount(idxs[0], weights=w * v, minlength=counts[0].shape[1])
        den = counts[0] @ np.bincount(idxs[0], weights=w, minlength=counts[0].shape[1])
    else:
        shape = (counts[0].shape[1], counts[1].shape[1])
        flat = idxs[0] * shape[1] + idxs[1]
        vm = np.bincount(flat, weights=w * v, minlength=shape[0] * shape[1]).reshape(shape)
        wm = np.bincount(flat, weights=w, minlength=shape[0] * shape[1]).reshape(shape)
        num = ((counts[0] @ vm) * counts[1]).sum(1)
        den = ((counts[0] @ wm) * counts[1]).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(num / den)


def _weighted_mean(values: Array, weights: Array) -> Array:
    total = weights.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray((weights @ values) / total)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sample-level rates)."""
    if n == 0:
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return float(centre - half), float(centre + half)
