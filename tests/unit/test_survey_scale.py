"""Real surveys at real scale, on the synthetic survey generator (no model): every metric of the
padded arrays against scipy, nominal items, coverage, weights, the sampling floor, per-group
tables and human baselines, structural coverage, the human-only CLI and the benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import binom, wasserstein_distance

from workbench.cli import main
from workbench.compare import dense as D
from workbench.compare.comparison import CompareConfig, compare
from workbench.compare.human import load_human
from workbench.compare.synthetic import SurveyShape, make_survey, write_model_runs, write_survey
from workbench.study.load import load_study

SHAPE = SurveyShape(
    n_questions=24, n_attributes=3, values_per_attribute=3, n_rows=6000, questions_per_respondent=12
)


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("survey")
    sv = make_survey(SHAPE)
    paths = write_survey(out, sv)
    runs = write_model_runs(out, sv, n_sources=2)
    study = load_study(paths["study"])
    config = CompareConfig(n_resamples=200)
    result = compare(runs, paths["human"], None, config, study=study)
    return {
        "out": out,
        "survey": sv,
        "study": study,
        "runs": runs,
        "result": result,
        "human": paths["human"],
    }


def test_dense_metrics_match_scipy_on_any_values(survey: dict[str, Any]) -> None:
    study = survey["study"]
    qt = D.question_table(list(study.questions))
    rng = np.random.default_rng(1)
    qidx = rng.integers(0, len(study.questions), 200)
    p, q = np.zeros((200, qt.kmax)), np.zeros((200, qt.kmax))
    for i, qi in enumerate(qidx):
        k = int(qt.k[qi])
        p[i, :k], q[i, :k] = rng.dirichlet(np.ones(k)), rng.dirichlet(np.ones(k))
    d = D.distances(p, q, qidx, qt)
    for i, qi in enumerate(qidx):
        question = study.questions[qi]
        k = len(question.options)
        assert d.tv[i] == pytest.approx(0.5 * np.abs(p[i, :k] - q[i, :k]).sum())
        assert d.js[i] == pytest.approx(jensenshannon(p[i, :k], q[i, :k], base=2))
        v = np.asarray(question.values)
        if len(set(v)) < 2:  # written the survey's way: all equal -> nominal
            assert np.isnan(d.nw1[i]) and d.metric[i] == "tv" and d.distance[i] == d.tv[i]
        else:
            w1 = wasserstein_distance(v, v, p[i, :k], q[i, :k]) / (v.max() - v.min())
            assert d.nw1[i] == pytest.approx(w1) and d.distance[i] == d.nw1[i]
    assert qt.nominal.sum() == len(study.questions) // 3


def test_sampling_floor_matches_the_exact_binomial_expectation() -> None:
    qt = D.question_table(
        list(load_study_like_binary().questions)  # K = 2: TV = |X/n - p|
    )
    p = np.array([[0.3, 0.7]])
    tv, dist = D.floor_distances(p, np.array([40.0]), np.array([0]), qt, n_sims=20000, seed=0)
    x = np.arange(41)
    exact = float((binom.pmf(x, 40, 0.3) * np.abs(x / 40 - 0.3)).sum())
    assert tv[0] == pytest.approx(exact, rel=0.03)
    assert dist[0] == pytest.approx(tv[0])  # nominal question: the distance is TV
    assert np.isnan(D.floor_distances(p, np.array([0.0]), np.array([0]), qt)[0][0])


def load_study_like_binary() -> Any:
    from workbench.study.load import parse_study

    return parse_study(
        {
            "name": "b",
            "factors": [{"name": "g", "values": ["x"]}],
            "template": {"format": "plain", "persona": ["{g}"], "prompt": "{question} {options}"},
            "questions": [{"id": "q", "text": "?", "options": ["a", "b"]}],
        }
    )


def test_weights_respondents_and_kish(survey: dict[str, Any]) -> None:
    human = load_human(survey["human"], survey["study"])
    frame = survey["survey"].respondents
    qid, attr, value = "q0003", "a01", "a01v2"
    cells = pd.DataFrame({"question_id": [qid], "a00": [None], attr: [value], "a02": [None]})
    got = human.distributions(cells)
    rows = frame[(frame["question_id"] == qid) & (frame[attr] == value)]
    w = rows["weight"].to_numpy()
    assert got["n"].iloc[0] == len(rows)
    assert got["n_eff"].iloc[0] == pytest.approx(w.sum() ** 2 / (w**2).sum())
    question = next(q for q in survey["study"].questions if q.id == qid)
    subs = rows[rows["answer"].isin(question.options)]
    by_hand = subs.groupby("answer")["weight"].sum().reindex(question.options).fillna(0)
    np.testing.assert_allclose(
        got.sort_values("option_id")["prob"], by_hand / by_hand.sum(), atol=1e-12
    )
    assert got["refusal"].iloc[0] == pytest.approx(1 - subs["weight"].sum() / w.sum())


def test_coverage_extra_questions_and_values_are_not_fatal(
    survey: dict[str, Any], tmp_path: Path
) -> None:
    frame = survey["survey"].respondents.head(3000).copy()
    extra = frame.head(50).assign(question_id="not_in_study")
    pd.concat([frame, extra]).to_parquet(tmp_path / "h.parquet")
    human = load_human(tmp_path / "h.parquet", survey["study"])
    assert human.extra_questions == {"not_in_study": 50}
    assert "Other" in human.extra_values["a00"]
    result = compare(
        [], tmp_path / "h.parquet", None, CompareConfig(n_resamples=50), study=survey["study"]
    )
    cov = result.coverage.set_index("what")
    assert cov.loc["file questions not in the study", "unmatched"] == 50
    assert cov.loc["questions", "matched"] + cov.loc["questions", "unmatched"] == SHAPE.n_questions
    assert cov.loc["respondents", "matched"] == frame["respondent_id"].nunique()


def test_groups_and_human_baselines(survey: dict[str, Any]) -> None:
    result = survey["result"]
    groups = result.groups
    assert {"model_0", "model_1", "human: overall population"} <= set(groups["source"])
    g = groups.set_index(["source", "group"])
    assert (
        g.loc[("model_0", "(average)"), "representativeness"]
        > g.loc[("model_1", "(average)"), "representativeness"]
    )  # less noise, closer
    row = g.loc[("model_0", "a01=a01v1")]
    assert row["ci_low"] <= row["representativeness"] <= row["ci_high"]
    worst = groups[(groups["source"] == "model_0") & groups["group"].str.contains("=")]
    assert g.loc[("model_0", "(worst)"), "representativeness"] == pytest.approx(
        worst["representativeness"].min()
    )
    # one pair of groups by hand (scipy) from the human file alone
    pairs = result.human_pairs.set_index(["group_a", "group_b"])
    assert len(pairs) == 3 * 3
    human = load_human(survey["human"], survey["study"])
    scores = []
    for q in survey["study"].questions:
        cells = pd.DataFrame(
            {"question_id": [q.id] * 2, "a00": ["a00v0", "a00v1"], "a01": None, "a02": None}
        )
        got = human.distributions(cells)
        if got["cell"].nunique() < 2:
            continue
        a = got[got["cell"] == 0].sort_values("option_id")["prob"].to_numpy()
        b = got[got["cell"] == 1].sort_values("option_id")["prob"].to_numpy()
        v = np.asarray(q.values)
        if len(set(v)) < 2:
            scores.append(1 - 0.5 * np.abs(a - b).sum())
        else:
            scores.append(1 - wasserstein_distance(v, v, a, b) / (v.max() - v.min()))
    assert pairs.loc[("a00=a00v0", "a00=a00v1"), "representativeness"] == pytest.approx(
        np.mean(scores)
    )
    per_q = result.group_questions
    assert set(per_q["metric"]) == {"tv", "nw1"}
    floor = per_q[per_q["source"] == "model_0"]["floor_tv"]
    assert floor.notna().all() and (floor > 0).all()


def test_structural_covers_what_the_subgroups_cover(survey: dict[str, Any]) -> None:
    """Everyone includes respondents of a00 = "Other" (and empty): the human gap is 0 on the
    covered part and the covered share says how much that is."""
    s = survey["result"].structural
    human = s[s["source"] == "human"]
    assert len(human) and human["gap_tv"].max() < 1e-9
    by_a00 = human[human["by"] == "a00"]["covered_share"]
    assert (by_a00 < 0.97).all() and (by_a00 > 0.85).all()
    assert (s[s["source"] == "model_1"]["gap_tv"] > 0).any()


def test_cli_human_only_and_validate_note(
    survey: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "h"
    args = ["compare", "--human", str(survey["human"]), "--study", str(survey["study"].path)]
    assert main([*args, "--out", str(out), "--resamples", "50"]) == 0
    printed = capsys.readouterr().out
    assert "human data coverage" in printed and "questions: 24 of 24 matched" in printed
    pairs = pd.read_parquet(out / "human_pairs.parquet")
    assert list(pairs.columns[:7]) == [
        "factor",
        "group_a",
        "group_b",
        "representativeness",
        "mean_tv",
        "mean_js",
        "n_questions",
    ]
    groups = pd.read_parquet(out / "groups.parquet")
    assert {"human: overall population"} <= set(groups["source"])
    assert json.loads((out / "manifest.json").read_text())["runs"] == {}
    assert main(["validate", str(survey["study"].path)]) == 0
    assert "nominal" in capsys.readouterr().out
    assert main(["compare", "--out", str(tmp_path / "x")]) == 2


def test_quick_benchmark(tmp_path: Path) -> None:
    from scripts import bench_survey

    text = bench_survey.main(["--quick", "--out", str(tmp_path / "b.md")])
    assert "load the human file" in text and (tmp_path / "b.md").is_file()


def test_bootstrap_draws_are_shared_not_changed() -> None:
    """The resample multiplicities are drawn once per (units, resamples, seed) and reused:
    string labels (factorized) and integer labels give the numbers of fresh draws."""
    from workbench.compare import metrics as M

    rng = np.random.default_rng(3)
    values = rng.random(300)
    q = rng.integers(0, 40, 300)
    p = rng.integers(0, 7, 300)
    labels = [np.array([f"q{i:03d}" for i in q], dtype=object), p]
    first = M.bootstrap_ci(values, labels, n_resamples=300, seed=5)
    M.resample_counts.cache_clear()
    fresh = M.bootstrap_ci(values, [q, p], n_resamples=300, seed=5)
    assert first == fresh
    draws = np.random.default_rng(5)
    want = draws.multinomial(40, np.full(40, 1 / 40), size=300)
    np.testing.assert_array_equal(M.resample_counts((40, 7), 300, 5)[0], want)
