"""How `fit_logistic` batches problems changes the work, never the answer (no model).

Tasks with close class counts share one padded batch, rows no task of a batch uses are left
out of its products, and `batched_lbfgs` hands back the last iterate when it runs out of
iterations; each is checked against converged scikit-learn or the unbatched fit.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import workbench.interp.fit as fit_module
from workbench.interp.fit import fit_logistic
from workbench.interp.lbfgs import batched_lbfgs


def _data(seed: int, n: int = 300, d: int = 12) -> tuple[torch.Tensor, np.ndarray]:
    """Two layers; labels [task, n] of a 3-class and a 4-class task (-1 = missing)."""
    rng = np.random.default_rng(seed)
    y = np.stack([rng.integers(0, 3, n), rng.integers(0, 4, n)])
    X = rng.normal(size=(2, n, d)).astype(np.float32) * rng.uniform(0.5, 3.0, d) + 5.0
    X[1] += rng.normal(size=(4, d)).astype(np.float32)[y[1]] + rng.normal(size=(3, d))[y[0]]
    return torch.tensor(X), y


def _sklearn_accuracy(X: np.ndarray, y: np.ndarray, fit_rows: np.ndarray) -> float:
    pipe = make_pipeline(StandardScaler(), LogisticRegression(tol=1e-8, max_iter=5000))
    return float(pipe.fit(X[fit_rows], y[fit_rows]).score(X[fit_rows], y[fit_rows]))


def test_close_class_counts_share_one_padded_batch() -> None:
    assert fit_module._class_batches([2, 3, 4, 8, 9, 4]) == [[2], [3, 4], [8, 9]]
    X, y = _data(0)
    train = torch.ones(2, 1, X.shape[1], dtype=torch.bool)
    together = fit_logistic(X, torch.tensor(y), train, [3, 4], tol=1e-6)
    alone = fit_logistic(X, torch.tensor(y[:1]), train[:1], [3], tol=1e-6)
    assert together.weight.shape[-1] == 4
    assert bool(torch.isinf(together.bias[0, ..., 3]).all())  # the padded class never wins
    assert torch.allclose(together.weight[0, ..., :3], alone.weight[0, ..., :3], atol=2e-3)
    for task in range(2):
        for layer in range(2):
            hat = together.scores(X)[task, 0, layer].argmax(-1).numpy()
            ours = float((hat == y[task]).mean())
            rows = np.ones(len(y[task]), dtype=bool)
            assert abs(ours - _sklearn_accuracy(X[layer].numpy(), y[task], rows)) <= 0.004


def test_rows_no_task_uses_are_left_out_without_changing_the_fit() -> None:
    X, y = _data(1)
    y[:, :40] = -1  # missing in both tasks: neither batch member is fitted on these rows
    y[0, 40:60] = -1  # missing in one task only: the other still uses them
    train = torch.ones(2, 1, X.shape[1], dtype=torch.bool)
    fit = fit_logistic(X, torch.tensor(y), train, [3, 4], tol=1e-6)
    cut = fit_logistic(X[:, 40:], torch.tensor(y[:, 40:]), train[..., 40:], [3, 4], tol=1e-6)
    assert torch.allclose(fit.weight, cut.weight, atol=2e-3)
    for task in range(2):
        rows = y[task] >= 0
        for layer in range(2):
            hat = fit.scores(X)[task, 0, layer].argmax(-1).numpy()
            ours = float((hat[rows] == y[task][rows]).mean())
            assert abs(ours - _sklearn_accuracy(X[layer].numpy(), y[task], rows)) <= 0.004


def test_lbfgs_returns_the_last_iterate_at_max_iter() -> None:
    """Out of iterations, every problem still in the batch comes back at its last iterate
    (a lower loss than the start), and one that converged earlier at its solution."""
    scale = torch.tensor([1.0, 30.0], dtype=torch.float64)

    def value_and_grad(
        theta: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = torch.where((rows == 0)[:, None], torch.ones_like(scale), scale)
        g = s * theta
        return 0.5 * (g * theta).sum(-1), g, g.abs().amax(-1)

    theta = torch.ones(2, 2, dtype=torch.float64)
    out = batched_lbfgs(value_and_grad, theta, torch.ones(2, dtype=torch.bool), 3, 1e-9)
    loss = 0.5 * (torch.stack([torch.ones(2), scale]) * out * out).sum(-1)
    assert float(loss[1]) < 0.5 * float((scale * theta[1] * theta[1]).sum())  # moved
    assert float(out[0].abs().max()) < 1e-9  # a round quadratic: solved at the second step
