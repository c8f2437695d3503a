"""Every metric against an independent computation (scipy, or a direct formula by hand).

No model is loaded. Ordinal values include non-1..N ones such as OpinionQA's [1, 2, 1.5].
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import binom, binomtest, entropy, wasserstein_distance

from workbench.compare import metrics as M

RNG = np.random.default_rng(0)
VALUE_SETS = (
    [1.0, 2.0, 3.0, 4.0, 5.0],
    [1.0, 2.0, 1.5],  # OpinionQA: a middle "neither" between two options
    [10.0, -2.0, 0.5, 3.0],  # unsorted, negative
    [0.0, 0.0, 1.0],  # two options share a value
)


def _pairs(k: int, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    p, q = RNG.dirichlet(np.ones(k), n), RNG.dirichlet(np.ones(k) * 0.5, n)
    p[0, 0], q[-1, -1] = 0.0, 0.0  # zeros must be handled
    return p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)


def test_total_variation_is_half_l1() -> None:
    p, q = _pairs(5)
    expected = [
        0.5 * sum(abs(a - b) for a, b in zip(x, y, strict=True)) for x, y in zip(p, q, strict=True)
    ]
    np.testing.assert_allclose(M.total_variation(p, q), expected, atol=1e-12)
    assert M.total_variation([1, 0], [0, 1]) == pytest.approx(1.0)


def test_js_distance_matches_scipy_base2() -> None:
    p, q = _pairs(4)
    ref = [jensenshannon(a, b, base=2) for a, b in zip(p, q, strict=True)]
    np.testing.assert_allclose(M.js_distance(p, q), ref, atol=1e-10)
    assert M.js_distance([1, 0], [0, 1]) == pytest.approx(1.0)  # base 2: bounded by 1
    assert M.js_distance([0.3, 0.7], [0.3, 0.7]) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("smoothing", [1e-6, 1e-3])
def test_kl_bits_matches_scipy_with_recorded_smoothing(smoothing: float) -> None:
    p, q = _pairs(5)
    ps = (p + smoothing) / (p + smoothing).sum(-1, keepdims=True)
    qs = (q + smoothing) / (q + smoothing).sum(-1, keepdims=True)
    ref = [entropy(a, b, base=2) for a, b in zip(ps, qs, strict=True)]
    np.testing.assert_allclose(M.kl_bits(p, q, smoothing), ref, rtol=1e-9)


def test_kl_without_smoothing_is_exact() -> None:
    p, q = np.array([0.2, 0.8]), np.array([0.5, 0.5])
    assert M.kl_bits(p, q, 0.0) == pytest.approx(entropy(p, q, base=2))
    assert np.isinf(M.kl_bits([0.5, 0.5], [1.0, 0.0], 0.0))


@pytest.mark.parametrize("values", VALUE_SETS)
def test_w1_matches_scipy_on_any_ordinal_values(values: list[float]) -> None:
    p, q = _pairs(len(values))
    ref = [
        wasserstein_distance(values, values, u_weights=a, v_weights=b)
        for a, b in zip(p, q, strict=True)
    ]
    np.testing.assert_allclose(M.wasserstein1(p, q, values), ref, atol=1e-10)
    span = max(values) - min(values)
    np.testing.assert_allclose(M.normalized_w1(p, q, values), np.asarray(ref) / span, atol=1e-10)
    assert (M.normalized_w1(p, q, values) <= 1 + 1e-12).all()


def test_w1_middle_option_of_opinionqa() -> None:
    # All mass on "neither" (value 1.5) vs all on option 1 (value 1): W1 = 0.5, normalized 0.5.
    values = [1.0, 2.0, 1.5]
    assert M.wasserstein1([0, 0, 1], [1, 0, 0], values) == pytest.approx(0.5)
    assert M.normalized_w1([0, 0, 1], [1, 0, 0], values) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.normalized_w1([1.0], [1.0], [3.0])


def test_entropy_expected_score_modal_share() -> None:
    p, _ = _pairs(5)
    np.testing.assert_allclose(M.entropy_bits(p), [entropy(x, base=2) for x in p], atol=1e-10)
    np.testing.assert_allclose(
        M.normalized_entropy(p), [entropy(x) / np.log(5) for x in p], atol=1e-10
    )
    assert M.normalized_entropy(np.full(4, 0.25)) == pytest.approx(1.0)
    assert M.normalized_entropy([1.0]) == 0.0
    values = [1.0, 2.0, 1.5]
    p3, _ = _pairs(3)
    np.testing.assert_allclose(
        M.expected_score(p3, values),
        [sum(a * v for a, v in zip(x, values, strict=True)) for x in p3],
    )
    np.testing.assert_allclose(M.modal_share(p), [max(x) for x in p])


def test_representativeness_is_mean_over_questions_of_one_minus_nw1() -> None:
    # Question "a": 3 cells on 1..5; question "b": 1 cell on [1, 2, 1.5] (another K).
    pa, qa = _pairs(5, 3)
    pb, qb = _pairs(3, 1)
    va, vb = [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 1.5]
    by_hand_a = np.mean(
        [1 - wasserstein_distance(va, va, x, y) / 4 for x, y in zip(pa, qa, strict=True)]
    )
    by_hand_b = 1 - wasserstein_distance(vb, vb, pb[0], qb[0]) / 1.0
    got = M.representativeness([*pa, pb[0]], [*qa, qb[0]], [va, va, va, vb], ["a", "a", "a", "b"])
    assert got == pytest.approx((by_hand_a + by_hand_b) / 2)
    assert M.representativeness([qb[0]], [qb[0]], [vb], ["b"]) == pytest.approx(1.0)


def test_homogenization_shares_and_entropy_ratio() -> None:
    model = np.array([[0.97, 0.02, 0.01], [0.5, 0.3, 0.2], [0.99, 0.01, 0.0]])
    human = np.array([[0.6, 0.3, 0.1], [0.96, 0.02, 0.02], [1.0, 0.0, 0.0]])
    h = M.homogenization(model, human)
    assert h.model_share == pytest.approx(2 / 3)
    assert h.human_share == pytest.approx(2 / 3)
    ratios = [entropy(m) / entropy(x) for m, x in zip(model[:2], human[:2], strict=True)]
    assert h.entropy_ratio_mean == pytest.approx(np.mean(ratios))
    assert h.n_ratio_cells == 2  # the human cell with zero entropy is left out


def test_structural_gap_is_zero_for_a_true_mixture_and_catches_a_flip() -> None:
    fine = RNG.dirichlet(np.ones(4), 3)
    w = np.array([0.5, 0.3, 0.2])
    mixture = w @ fine
    gap = M.structural_gap(mixture, fine, w * 7.0)  # weights are normalized
    assert gap.tv == pytest.approx(0.0, abs=1e-12) and gap.js == pytest.approx(0.0, abs=1e-6)
    assert gap.argmax_agrees
    direct = np.zeros(4)
    direct[np.argmin(mixture)] = 1.0
    gap = M.structural_gap(direct, fine, w)
    assert gap.tv == pytest.approx(0.5 * np.abs(direct - mixture).sum())
    assert gap.js == pytest.approx(jensenshannon(direct, mixture, base=2))
    assert not gap.argmax_agrees


def test_a_bias_k2s_gap_and_baselines() -> None:
    displayed = np.array([[0.4, 0.3, 0.3], [0.2, 0.5, 0.3]])
    np.testing.assert_allclose(M.a_bias(displayed), [0.4 - 1 / 3, 0.2 - 1 / 3])
    assert M.knowledge_to_simulation_gap(0.3, 0.2) == pytest.approx(0.5)
    assert np.isnan(M.knowledge_to_simulation_gap(0.3, 0.0))
    np.testing.assert_allclose(M.uniform_baseline(4), [0.25] * 4)
    np.testing.assert_allclose(M.majority_baseline([0.2, 0.5, 0.3]), [0, 1, 0])


def test_sampling_floor_matches_the_exact_binomial_expectation() -> None:
    # K = 2: TV(counts/n, p) = |x/n - p| with x ~ Binomial(n, p); its mean is a finite sum.
    for p1, n in ((0.3, 30), (0.5, 100), (0.9, 10)):
        x = np.arange(n + 1)
        exact = float((binom.pmf(x, n, p1) * np.abs(x / n - p1)).sum())
        floor = M.sampling_floor([p1, 1 - p1], n, n_sims=20000, seed=1)
        assert floor.mean_tv == pytest.approx(exact, rel=0.03)
        assert floor.q95_tv >= floor.mean_tv
    rows = M.sampling_floor(np.full((3, 5), 0.2), [10, 0, 100], n_sims=500)
    assert np.isnan(rows.mean_tv[1]) and rows.mean_tv[0] > rows.mean_tv[2]
    assert rows.mean_of_rows_q95 > np.nanmean(rows.mean_tv)


def test_bootstrap_ci_mean_weights_and_clusters() -> None:
    values = RNG.normal(1.0, 1.0, 200)
    est = M.bootstrap_ci(values, n_resamples=500, seed=0)
    assert est.value == pytest.approx(values.mean())
    assert est.lo < est.value < est.hi and est.n == 200
    se = values.std(ddof=1) / np.sqrt(200)
    assert est.hi - est.lo == pytest.approx(2 * 1.96 * se, rel=0.25)
    again = M.bootstrap_ci(values, n_resamples=500, seed=0)
    assert (again.lo, again.hi) == (est.lo, est.hi)
    weighted = M.bootstrap_ci([1.0, 3.0, np.nan], weights=[3.0, 1.0, 5.0])
    assert weighted.value == pytest.approx(1.5) and weighted.n == 2
    # Clustered: 10 clusters of 20 identical values; the interval reflects 10 units, not 200.
    cluster = np.repeat(np.arange(10), 20)
    vals = np.repeat(RNG.normal(0, 1, 10), 20)
    clustered = M.bootstrap_ci(vals, [cluster], n_resamples=800, seed=0)
    naive = M.bootstrap_ci(vals, n_resamples=800, seed=0)
    assert clustered.hi - clustered.lo > 2.5 * (naive.hi - naive.lo)


def test_wilson_interval_matches_scipy() -> None:
    for k, n in ((0, 10), (3, 10), (50, 100), (999, 1000)):
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = M.wilson_interval(k, n)
        assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)
