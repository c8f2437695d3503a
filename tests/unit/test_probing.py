"""Probe estimators, folds and controls on synthetic data (no model).

The batched torch probes must solve the problems scikit-learn solves (StandardScaler +
LogisticRegression / Ridge), grouped folds must never put a group on both sides, and the
controls must have the structure Hewitt & Liang define.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from workbench.demo.probe_section import ORGANISM_PROBES
from workbench.errors import StudyError, WorkbenchError
from workbench.interp.fit import (
    CVTask,
    control_task_labels,
    cross_validate,
    fit_logistic,
    fit_ridge,
    grouped_folds,
    shuffled_labels,
)
from workbench.interp.opinion import behavioural_effects, decodable_vs_drives
from workbench.interp.probe_study import load_probe_study
from workbench.interp.probing import control_types

ROOT = Path(__file__).resolve().parents[2]


def _data(seed: int, n_classes: int, L: int = 3, n: int = 360, d: int = 24):
    """Layers of increasing signal, a large common offset (as residual streams have)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    X = rng.normal(size=(L, n, d)).astype(np.float32) + 20.0
    for layer in range(L):
        means = rng.normal(size=(n_classes, d)).astype(np.float32)
        X[layer] += 0.6 * layer * means[y]
    groups = rng.integers(0, 6, n)
    return torch.tensor(X), y, groups


@pytest.mark.parametrize("n_classes", [2, 4])
def test_logistic_agrees_with_sklearn(n_classes: int) -> None:
    X, y, groups = _data(1, n_classes)
    folds = grouped_folds(groups, 3)
    cv = cross_validate(X, [CVTask("logistic", y, folds, n_classes)], C=0.5)
    for layer in range(X.shape[0]):
        accs = []
        for f in range(3):
            test = folds == f
            pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000))
            pipe.fit(X[layer][~test].numpy(), y[~test])
            accs.append((pipe.predict(X[layer][test].numpy()) == y[test]).mean())
        assert cv.scores[0, :, layer] == pytest.approx(accs, abs=0.01)


def test_logistic_probabilities_match_sklearn_decision_function() -> None:
    X, y, _ = _data(2, 3, L=1)
    train = torch.ones(1, 1, X.shape[1], dtype=torch.bool)
    fit = fit_logistic(X, torch.tensor(y)[None], train, [3], C=1.0, tol=1e-6)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, tol=1e-8, max_iter=5000))
    pipe.fit(X[0].numpy(), y)
    ours = torch.softmax(fit.scores(X)[0, 0, 0], -1).numpy()
    assert np.abs(ours - pipe.predict_proba(X[0].numpy())).max() < 0.01


def test_ridge_agrees_with_sklearn() -> None:
    X, _, groups = _data(3, 2)
    rng = np.random.default_rng(3)
    target = X[2, :, :4].sum(-1).numpy().astype(np.float64) + rng.normal(size=X.shape[1])
    folds = grouped_folds(groups, 4)
    cv = cross_validate(X, [CVTask("ridge", target, folds)], alpha=2.0)
    for layer in range(X.shape[0]):
        r2 = []
        for f in range(4):
            test = folds == f
            pipe = make_pipeline(StandardScaler(), Ridge(alpha=2.0))
            pipe.fit(X[layer][~test].numpy(), target[~test])
            r2.append(pipe.score(X[layer][test].numpy(), target[test]))
        assert cv.scores[0, :, layer] == pytest.approx(r2, abs=0.01)
    # Raw-coordinate weights: a stored vector times the direction is the prediction.
    train = torch.ones(1, 1, X.shape[1], dtype=torch.bool)
    fit = fit_ridge(X, torch.tensor(target, dtype=torch.float32)[None], train, alpha=2.0)
    pipe = make_pipeline(StandardScaler(), Ridge(alpha=2.0)).fit(X[1].numpy(), target)
    ours = (X[1] @ fit.weight[0, 0, 1, :, 0] + fit.bias[0, 0, 1, 0]).numpy()
    assert np.abs(ours - pipe.predict(X[1].numpy())).max() < 1e-3


def test_batched_problems_do_not_interact() -> None:
    """A task fitted alone and next to others (other labels, folds, class counts) is the same."""
    X, y, groups = _data(4, 4)
    folds = grouped_folds(groups, 3)
    alone = cross_validate(X, [CVTask("logistic", y, folds, 4)])
    other = CVTask("logistic", (y + groups) % 2, grouped_folds(groups, 5), 2)
    together = cross_validate(X, [other, CVTask("logistic", y, folds, 4)])
    assert np.nanmax(np.abs(alone.scores[0] - together.scores[1, :3])) <= 0.01


def test_grouped_folds_never_split_a_group() -> None:
    rng = np.random.default_rng(0)
    groups = rng.choice([f"title {i}" for i in range(11)], size=500).astype(object)
    groups[:7] = None
    folds = grouped_folds(groups, 4)
    assert (folds[:7] == -1).all()
    frame = pd.DataFrame({"g": groups[7:], "f": folds[7:]})
    assert (frame.groupby("g")["f"].nunique() == 1).all()
    sizes = np.bincount(folds[7:])
    assert len(sizes) == 4 and sizes.min() > 0.6 * sizes.max()
    assert (grouped_folds(groups, 4) == folds).all()  # deterministic
    assert set(grouped_folds(["a", "b", "a", "c"], 10)) == {0, 1, 2}  # leave one group out
    with pytest.raises(WorkbenchError, match="at least 2 groups"):
        grouped_folds(["a", "a"], 5)


def test_cross_validation_scores_only_held_out_groups() -> None:
    """Labels are a random function of the group and X is the group's identity: a probe that
    saw the test group would score 1.0; held out by group, it is at chance."""
    rng = np.random.default_rng(5)
    groups = rng.integers(0, 40, 800)
    labels = rng.integers(0, 2, 40)[groups]
    X = torch.tensor(np.eye(40, dtype=np.float32)[groups])[None]
    held_out = cross_validate(X, [CVTask("logistic", labels, grouped_folds(groups, 5), 2)])
    leaky = cross_validate(X, [CVTask("logistic", labels, np.arange(800) % 5, 2)])
    assert np.nanmean(leaky.scores) > 0.95
    assert np.nanmean(held_out.scores) < 0.7
    fit = held_out.fit
    assert fit.weight.shape[:3] == (1, 6, 1)  # five folds + one fit on every row


def test_shuffled_labels_are_a_permutation() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 2, -1])
    valid = y >= 0
    out = shuffled_labels(y, valid, seed=0)
    assert out[-1] == -1 and sorted(out[:-1]) == sorted(y[:-1])
    assert (shuffled_labels(y, valid, seed=0) == out).all()


def test_control_task_is_consistent_per_type_and_drawn_from_the_labels() -> None:
    rng = np.random.default_rng(0)
    types = rng.choice(list("abcdefghij"), size=300)
    y = rng.choice([0, 1, 2], p=[0.6, 0.3, 0.1], size=300)
    y[:5] = -1
    valid = y >= 0
    out = control_task_labels(y, valid, types, seed=1)
    assert (out[:5] == -1).all()
    frame = pd.DataFrame({"type": types[valid], "label": out[valid]})
    assert (frame.groupby("type")["label"].nunique() == 1).all()
    assert set(out[valid]) <= {0, 1, 2}
    draws = [control_task_labels(y, valid, types, seed=s)[valid] for s in range(200)]
    share = np.mean([(d == 0).mean() for d in draws])
    assert share == pytest.approx((y[valid] == 0).mean(), abs=0.04)  # empirical distribution
    floats = control_task_labels(np.linspace(1, 5, 300), np.ones(300, bool), types, seed=2)
    assert set(np.round(floats, 6)) <= set(np.round(np.linspace(1, 5, 300), 6))


def test_control_types_leave_out_what_identifies_the_held_out_group() -> None:
    frame = pd.DataFrame(
        {
            "question_id": ["q"] * 6,
            "persona_id": ["p1", "p1", "p2", "p2", "p3", "p3"],
            "party": ["D", "D", "R", "R", "D", "D"],
            "title": ["A", "B", "A", "B", "A", "B"],
        }
    )
    by_persona = control_types(frame, ["question_id", "party", "title"], "persona_id")
    assert list(pd.Series(by_persona).groupby(frame["title"]).nunique()) == [1, 1]
    by_title = control_types(frame, ["question_id", "party", "title"], "title")
    assert len(set(by_title)) == 2  # party only: title is the held-out group


def test_behavioural_effects_and_verdicts() -> None:
    rows, dist, stats = [], [], []
    for pid, (actor, title) in enumerate([(a, t) for a in "XY" for t in "AB"]):
        rows.append(
            {"prompt_id": pid, "question_id": "r", "permutation": 0, "actor": actor, "title": title}
        )
        p = [0.8, 0.2] if actor == "X" else [0.3, 0.7]
        dist += [
            {"prompt_id": pid, "option_id": k, "prob": v, "is_refusal": False}
            for k, v in enumerate(p)
        ]
        stats.append({"prompt_id": pid, "expected_score": 1 + p[1]})
    effects = behavioural_effects(
        pd.DataFrame(rows), pd.DataFrame(dist), pd.DataFrame(stats), ["actor", "title"]
    )
    by = effects.set_index("factor")
    assert by.loc["actor", "mean_tv"] == pytest.approx(0.5)
    assert by.loc["title", "mean_tv"] == 0.0 and by.loc["title", "n_pairs"] == 2
    assert by.loc["actor", "mean_abs_dscore"] == pytest.approx(0.5)
    summary = decodable_vs_drives(pd.DataFrame(), pd.DataFrame(), effects, ["actor", "title"])
    assert summary["drives"].tolist() == [True, False]


def test_organism_probe_study_file_matches_the_built_in_config() -> None:
    assert load_probe_study(ROOT / "probes" / "organism.yaml") == ORGANISM_PROBES


def test_probe_study_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nprobes:\n  - {target: actor, positions: [middle]}\n")
    with pytest.raises(StudyError, match=r"probes\[0\]\.positions\[0\]"):
        load_probe_study(path)
    path.write_text("name: x\nlayers: 3\nprobes: [{target: actor}]\n")
    with pytest.raises(StudyError, match="layers: unknown field"):
        load_probe_study(path)
    path.write_text("probes: [{target: actor}]\n")
    assert dataclasses.replace(load_probe_study(path)).probes[0].positions == ("answer",)
