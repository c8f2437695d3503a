"""The fast probe paths solve exactly the problems they replace (no model).

Closed-form ridge is scikit-learn's `Ridge` to 1e-6 on both of its systems (d x d and n x n);
the batched logistic reproduces converged scikit-learn per fold; warm starts and early stops
change the work, never the answer; and the probe rows of `scripts/bench_activations.py`
report both sides at the same tolerance with accuracy beside time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import workbench.interp.fit as fit_module
from workbench.interp.fit import CVTask, cross_validate, fit_logistic, fit_ridge, grouped_folds

REPO = Path(__file__).resolve().parents[2]


def _features(seed: int, L: int, n: int, d: int) -> np.ndarray:
    """Uneven scales, a large offset and one constant feature (as hook_embed has)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(L, n, d)) * rng.uniform(0.1, 10.0, size=d) + 20.0
    X[:, :, 3] = 7.0
    return X


def _sklearn_ridge(X: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    pipe = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X, y)
    coef = pipe[-1].coef_ / pipe[0].scale_
    return coef, float(pipe[-1].intercept_ - pipe[0].mean_ @ coef)


@pytest.mark.parametrize("n", [300, 30])  # n >= d: d x d system; n < d: n x n system
def test_ridge_is_sklearn_to_1e6(n: int) -> None:
    d, alpha = 40, 2.0
    X = _features(0, 2, n, d)
    rng = np.random.default_rng(1)
    targets = np.stack([X[1, :, :5].sum(-1) + rng.normal(size=n), rng.normal(size=n)])
    targets[1, :4] = np.nan  # a second task on other rows: its own factorization
    train = torch.ones(2, 1, n, dtype=torch.bool)
    fit = fit_ridge(torch.tensor(X), torch.tensor(targets), train, alpha=alpha)
    assert fit.weight.dtype == torch.float64
    for task in range(2):
        rows = ~np.isnan(targets[task])
        for layer in range(2):
            coef, intercept = _sklearn_ridge(X[layer][rows], targets[task][rows], alpha)
            ours = fit.weight[task, 0, layer, :, 0].numpy()
            assert np.abs(ours - coef).max() < 1e-6
            assert abs(float(fit.bias[task, 0, layer, 0]) - intercept) < 1e-6


def test_ridge_cross_validation_is_sklearn_to_1e6() -> None:
    X = _features(2, 3, 240, 24)
    rng = np.random.default_rng(2)
    target = X[2, :, :4].sum(-1) + rng.normal(size=240)
    folds = grouped_folds(rng.integers(0, 6, 240), 3)
    cv = cross_validate(torch.tensor(X), [CVTask("ridge", target, folds)], alpha=3.0)
    for layer in range(3):
        for f in range(3):
            test = folds == f
            pipe = make_pipeline(StandardScaler(), Ridge(alpha=3.0))
            pipe.fit(X[layer][~test], target[~test])
            assert abs(cv.scores[0, f, layer] - pipe.score(X[layer][test], target[test])) < 1e-6


def _classes(
    seed: int, n_classes: int, L: int = 3, n: int = 360, d: int = 24
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    X = rng.normal(size=(L, n, d)).astype(np.float32) + 20.0
    for layer in range(L):
        X[layer] += 0.5 * layer * rng.normal(size=(n_classes, d)).astype(np.float32)[y]
    return torch.tensor(X), y, grouped_folds(rng.integers(0, 6, n), 3)


TIE_LOGITS = 1e-3
"""A held-out row whose top two classes converged scikit-learn (float64) separates by less than
this many logits is a tie at float32 precision: the float32 fit may break it either way (on an
AVX2 core with ATen's generic kernels one such row, at 7.5e-6 logits, flips; the next-closest
row of that fold is at 0.19)."""


@pytest.mark.parametrize("n_classes", [2, 5])
def test_logistic_folds_match_converged_sklearn(n_classes: int) -> None:
    """Every out-of-fold prediction is converged scikit-learn's, except at its ties."""
    X, y, folds = _classes(3, n_classes)
    cv = cross_validate(X, [CVTask("logistic", y, folds, n_classes)])
    for layer in range(X.shape[0]):
        for f in range(3):
            test = folds == f
            pipe = make_pipeline(StandardScaler(), LogisticRegression(tol=1e-6, max_iter=5000))
            pipe.fit(X[layer][~test].numpy(), y[~test])
            held_out = X[layer][test].numpy()
            decision = pipe.decision_function(held_out)
            if decision.ndim == 1:
                margin = np.abs(decision)
            else:
                top2 = np.sort(decision, axis=1)[:, -2:]
                margin = top2[:, 1] - top2[:, 0]
            ours = cv.predictions[0, layer, test]
            differs = ours != pipe.predict(held_out)
            assert (margin[differs] < TIE_LOGITS).all(), (layer, f, margin[differs])
            ties = int((margin < TIE_LOGITS).sum())
            acc = pipe.score(held_out, y[test])
            assert abs(cv.scores[0, f, layer] - acc) <= ties / test.sum() + 1e-12
            assert cv.scores[0, f, layer] == pytest.approx(float((ours == y[test]).mean()))


def _count_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Evaluations per (layer, problem) of every `batched_lbfgs` call from now on."""
    counts: list[torch.Tensor] = []
    inner = fit_module.batched_lbfgs

    def counting(
        value_and_grad: Callable[[torch.Tensor, torch.Tensor], Any],
        theta: torch.Tensor,
        active: torch.Tensor,
        max_iter: int,
        tol: float,
        history: int = 10,
    ) -> torch.Tensor:
        seen = torch.zeros(theta.shape[0], dtype=torch.long)
        counts.append(seen)

        def wrapped(t: torch.Tensor, rows: torch.Tensor) -> Any:
            assert bool((rows[1:] > rows[:-1]).all())  # layer slices need ascending rows
            seen[rows] += 1
            return value_and_grad(t, rows)

        return inner(wrapped, theta, active, max_iter, tol, history)

    monkeypatch.setattr(fit_module, "batched_lbfgs", counting)
    return counts


def test_warm_start_at_the_optimum_costs_one_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A converged problem leaves the batch at once; the others are unaffected."""
    X, y, _ = _classes(4, 3)
    yt = torch.tensor(y)[None]
    train = torch.ones(1, 2, X.shape[1], dtype=torch.bool)
    train[0, 1, :100] = False
    cold = fit_logistic(X, yt, train, [3])
    # fold 0 starts at its own solution, fold 1 from zero
    init = fit_module.LinearFit(
        torch.cat([cold.weight[:, :1], torch.zeros_like(cold.weight[:, 1:])], 1),
        torch.cat([cold.bias[:, :1], torch.zeros_like(cold.bias[:, 1:])], 1),
    )
    # A cold fit can also stop on a stalled loss with its gradient just above `tol` (where
    # float32 rounding lands decides which): warm-start at a tol its solution meets.
    first: list[torch.Tensor] = []
    real_lbfgs = fit_module.batched_lbfgs

    def measuring(value_and_grad: Any, theta: torch.Tensor, active: torch.Tensor, *a: Any) -> Any:
        first.append(value_and_grad(theta[active], torch.nonzero(active).squeeze(1))[2])
        return theta

    monkeypatch.setattr(fit_module, "batched_lbfgs", measuring)
    fit_logistic(X, yt, train, [3], init=init)
    monkeypatch.setattr(fit_module, "batched_lbfgs", real_lbfgs)
    at_start = first[0].view(X.shape[0], 2)  # [layer, problem]: max |gradient| at the start
    tol = max(1e-5, 1.01 * float(at_start[:, 0].max()))
    assert tol < 1e-4 and float(at_start[:, 1].min()) > 100 * tol

    counts = _count_evaluations(monkeypatch)
    warm = fit_logistic(X, yt, train, [3], init=init, tol=tol)
    (seen,) = counts
    per = seen.view(X.shape[0], 2)
    assert (per[:, 0] == 1).all() and (per[1:, 1] > 10).all()
    assert torch.equal(warm.weight[:, :1], cold.weight[:, :1])  # left where it started
    alone = fit_logistic(X, yt, train, [3], tol=tol)  # fold 1 solved as if fold 0 were new
    assert torch.allclose(warm.weight[:, 1:], alone.weight[:, 1:], atol=1e-4)


def test_cross_validate_warm_starts_the_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    X, y, folds = _classes(5, 4)
    counts = _count_evaluations(monkeypatch)
    cross_validate(X, [CVTask("logistic", y, folds, 4)])
    full, per_fold = counts
    assert per_fold.float().mean() < full.float().mean()


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO))
        return importlib.import_module("scripts.bench_activations")


def test_benchmark_probe_rows(bench: ModuleType) -> None:
    """Defaults, the same tolerance on both sides, accuracy beside time, the GPU row."""
    X, y, folds = _classes(6, 3, L=2, n=240, d=16)
    rng = np.random.default_rng(6)
    logistic = [CVTask("logistic", y, folds, 3)]
    ridge = [CVTask("ridge", X[1, :, :3].sum(-1).double().numpy() + rng.normal(size=240), folds)]
    sides = bench.bench_probes(X, logistic, ridge, repeats=1)
    assert {s.tol for s in sides.values()} == {1e-4, 1e-5, 1e-6}
    rows, ok = bench.probe_table(sides, "cpu", "probes")
    assert ok
    text = "\n".join(rows)
    assert "same tol 0.0001" in text and "same tol 1e-6" in text and "acc " in text
    assert "not run" in text


def test_probe_gate_allows_the_float32_floor_and_no_more(bench: ModuleType) -> None:
    """The default must match converged scikit-learn within 0.004 accuracy, or within what
    the workbench itself reaches at tol 1e-6 (float32 vs float64 at the optimum) if larger."""
    base = np.full((1, 3, 2), 0.8)

    def sides(default: float, converged: float) -> dict[str, Any]:
        acc = {"sklearn@0.0001": 0.79, "sklearn@1e-06": 0.8, "torch@0.0001": 0.8}
        acc |= {"torch@1e-05": default, "torch@1e-06": converged}
        out = {}
        for name, a in acc.items():
            side = bench.ProbeSide(name, float(name.split("@")[1]), times=[1.0])
            side.acc = base.copy()
            side.acc[0, 1, 1] = a  # one (target, fold, layer) differs
            side.r2 = np.zeros((1, 3, 2))
            out[name] = side
        return out

    assert bench.probe_table(sides(0.803, 0.8), "cpu", "p")[1]  # within 0.004
    assert not bench.probe_table(sides(0.806, 0.8), "cpu", "p")[1]
    assert bench.probe_table(sides(0.8078, 0.8078), "cpu", "p")[1]  # at the float32 floor
    rows, ok = bench.probe_table(sides(0.815, 0.8078), "cpu", "p")  # beyond it
    assert not ok and "float32 floor" in rows[-1] and "0.0078" in rows[-1]


def _objective(X: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> float:
    """scikit-learn's multinomial objective (mean NLL + |W_std|² / (2 C n), C = 1) of raw
    weights [d, k], bias [k], in float64."""
    X = X.astype(np.float64)
    z = X @ weight + bias
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    scale = StandardScaler().fit(X).scale_
    penalty = ((weight * scale[:, None]) ** 2).sum() / (2 * len(y))
    return float(-logp[np.arange(len(y)), y].mean() + penalty)


def test_default_reaches_the_objective_sklearn_reaches() -> None:
    """The default tolerance is not looser than scikit-learn's default in what matters: the
    objective gap to a tight reference is no larger, and small in absolute terms."""
    X, y, _ = _classes(7, 4, L=2)
    fit = fit_logistic(X, torch.tensor(y)[None], torch.ones(1, 1, len(y), dtype=torch.bool), [4])
    for layer in range(2):
        gaps = {}
        for tol in (1e-4, 1e-10):
            pipe = make_pipeline(StandardScaler(), LogisticRegression(tol=tol, max_iter=20000))
            pipe.fit(X[layer].numpy(), y)
            W = pipe[-1].coef_.T / pipe[0].scale_[:, None]
            gaps[tol] = _objective(X[layer].numpy(), y, W, pipe[-1].intercept_ - pipe[0].mean_ @ W)
        ours = _objective(
            X[layer].numpy(), y, fit.weight[0, 0, layer].double().numpy(),
            fit.bias[0, 0, layer].double().numpy(),
        )  # fmt: skip
        assert ours - gaps[1e-10] <= max(gaps[1e-4] - gaps[1e-10], 0.0) + 1e-6
        assert ours - gaps[1e-10] <= 1e-5


def test_a_stall_restarts_once_then_stops() -> None:
    """A failed line search (here: the loss overflows for 30 evaluations, as float32 logits
    can) makes a problem forget its curvature pairs and go on from steepest descent, so it
    still converges; a problem that stalls again right after a restart stops; neither holds
    up its neighbours in the batch."""
    scale = torch.tensor([1.0, 100.0], dtype=torch.float64)
    evals = torch.zeros(3, dtype=torch.long)

    def value_and_grad(
        theta: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        evals[rows] += 1
        f = 0.5 * (scale * theta * theta).sum(-1)
        overflow = (rows == 0) & (evals[rows] >= 5) & (evals[rows] < 35)
        f = torch.where(overflow, torch.inf, f)
        f = torch.where(rows == 2, torch.round(f), f)  # problem 2: no visible decrease below 1
        g = scale * theta
        return f, g, g.abs().amax(-1)

    theta = torch.ones(3, 2, dtype=torch.float64)
    active = torch.ones(3, dtype=torch.bool)
    out = fit_module.batched_lbfgs(value_and_grad, theta, active, 200, 1e-3)
    measure = (scale * out).abs().amax(-1)
    assert int(evals[0]) > 35 and float(measure[0]) < 1e-3  # restarted, then converged
    assert float(measure[1]) < 1e-3 and int(evals[1]) < 40  # unaffected
    assert float(measure[2]) >= 1e-3 and int(evals[2]) < 200  # stalled twice: stopped
