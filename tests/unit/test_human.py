"""Human survey data: both formats, every file type, the errors, and the law of total
probability (structural-consistency gap 0) for respondent data. No model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import example_study_dict

from workbench.compare.comparison import cell_key
from workbench.compare.human import load_human
from workbench.compare.survey import structural_gaps, structural_groups
from workbench.errors import WorkbenchError
from workbench.study.load import parse_study
from workbench.study.spec import Study

FACTORS = ["party", "age", "movie"]


@pytest.fixture
def study() -> Study:
    raw = example_study_dict()
    raw["factors"][0]["weights"] = [0.6, 0.4]
    return parse_study(raw)


def _cells(rows: list[dict[str, str | None]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for f in FACTORS:
        if f not in frame:
            frame[f] = None
    frame["persona_id"] = "p"
    return frame.assign(key=cell_key(frame, FACTORS))


def test_proportions_with_coarse_cells_and_refusal(tmp_path: Path, study: Study) -> None:
    path = tmp_path / "human.csv"
    pd.DataFrame(
        {
            "question_id": ["like"] * 3 + ["like"] * 3 + ["economy"] * 3,
            "party": ["Democrat"] * 3 + [""] * 3 + ["Republican"] * 3,
            "option": ["Yes", "No", "Don't know"] * 2 + ["Good", "fair", "Poor"],
            "prob": [0.6, 0.2, 0.2, 0.5, 0.5, 0.0, 0.1, 0.3, 0.6],
            "source_note": ["x"] * 9,
        }
    ).to_csv(path, index=False)
    human = load_human(path, study)
    assert human.format == "proportions" and human.factors == ("party",)
    assert human.ignored_columns == ("source_note",)
    cells = _cells(
        [
            {"question_id": "like", "party": "Democrat", "movie": "Up"},
            {"question_id": "like", "movie": "Jaws"},  # coarse: party unspecified
            {"question_id": "economy", "party": "Republican", "age": "30"},
            {"question_id": "economy", "party": "Democrat"},  # no human data
        ]
    )
    got = human.distributions(cells)
    first = got[got["cell"] == 0].sort_values("option_id")
    np.testing.assert_allclose(first["prob"], [0.75, 0.25])  # renormalized without refusal
    assert first["refusal"].iloc[0] == pytest.approx(0.2)
    np.testing.assert_allclose(got[got["cell"] == 1]["prob"], [0.5, 0.5])
    np.testing.assert_allclose(
        got[got["cell"] == 2].sort_values("option_id")["prob"], [0.1, 0.3, 0.6]
    )
    assert 3 not in set(got["cell"])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".json"])
def test_file_types_and_percentages(tmp_path: Path, study: Study, suffix: str) -> None:
    frame = pd.DataFrame(
        {"question_id": "economy", "option_id": [0, 1, 2], "share": [20.0, 30.0, 50.0]}
    )
    path = tmp_path / f"human{suffix}"
    if suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        frame.to_json(path, orient="records")
    else:
        frame.to_parquet(path)
    human = load_human(path, study, prob_column="share")
    assert human.percentages
    got = human.distributions(_cells([{"question_id": "economy", "party": "Democrat"}]))
    np.testing.assert_allclose(got.sort_values("option_id")["prob"], [0.2, 0.3, 0.5])


def test_respondent_rows_long_and_wide(tmp_path: Path, study: Study) -> None:
    long = pd.DataFrame(
        {
            "question_id": "economy",
            "party": ["Democrat", "Democrat", "Republican", "Republican", "Republican"],
            "age": ["30", "60", "30", "60", "60"],
            "answer": ["Good", "Poor", "Fair", "Fair", "Good"],
            "weight": [1.0, 3.0, 2.0, 1.0, 1.0],
        }
    )
    long.to_csv(tmp_path / "long.csv", index=False)
    human = load_human(tmp_path / "long.csv", study)
    assert human.format == "respondents"
    cells = _cells(
        [
            {"question_id": "economy", "party": "Democrat"},
            {"question_id": "economy"},
            {"question_id": "economy", "party": "Republican", "age": "60"},
        ]
    )
    got = human.distributions(cells)
    dem = got[got["cell"] == 0].sort_values("option_id")
    np.testing.assert_allclose(dem["prob"], [0.25, 0.0, 0.75])
    everyone = got[got["cell"] == 1].sort_values("option_id")
    np.testing.assert_allclose(everyone["prob"], np.array([2.0, 3.0, 3.0]) / 8)
    assert everyone["n"].iloc[0] == 5
    np.testing.assert_allclose(
        got[got["cell"] == 2].sort_values("option_id")["prob"], [0.5, 0.5, 0.0]
    )
    # The wide form (one column per question id) reads the same.
    wide = long.rename(columns={"answer": "economy"}).drop(columns="question_id")
    wide.to_parquet(tmp_path / "wide.parquet")
    again = load_human(tmp_path / "wide.parquet", study).distributions(cells)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), again.reset_index(drop=True))


def test_structural_gap_of_respondent_data_is_zero(tmp_path: Path, study: Study) -> None:
    """Everyone vs the party subgroups mixed with the respondents' own weights (refusals
    included: conditionals mix with P(s) * P(substantive | s))."""
    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame(
        {
            "question_id": "like",
            "party": rng.choice(["Democrat", "Republican"], n, p=[0.3, 0.7]),
            "answer": rng.choice(["Yes", "No", "Don't know"], n),
            "weight": rng.uniform(0.5, 2.0, n),
        }
    )
    frame.to_csv(tmp_path / "r.csv", index=False)
    human = load_human(tmp_path / "r.csv", study)
    cells = _cells(
        [
            {"question_id": "like", "movie": "Up"},
            {"question_id": "like", "movie": "Up", "party": "Democrat"},
            {"question_id": "like", "movie": "Up", "party": "Republican"},
        ]
    )
    groups = structural_groups(cells, study, human)
    assert len(groups) == 1 and groups[0]["by"] == "party"
    assert sum(groups[0]["weights"]) == pytest.approx(1.0)
    found = human.distributions(cells).merge(cells[["key"]], left_on="cell", right_index=True)
    table = structural_gaps(groups, {"human": found.assign(question_id="like")}, {})
    assert table["gap_tv"].iloc[0] == pytest.approx(0.0, abs=1e-12)
    assert bool(table["argmax_agrees"].iloc[0])


@pytest.mark.parametrize(
    ("frame", "field", "fix"),
    [
        (
            {"question_id": ["nope"], "option_id": [0], "prob": [1.0]},
            "question_id",
            "study's question ids",
        ),
        (
            {"question_id": ["economy"], "option": ["Great"], "prob": [1.0]},
            "option",
            "Good, Fair, Poor",
        ),
        ({"question_id": ["economy"], "option_id": [7], "prob": [1.0]}, "option_id", "0..2"),
        (
            {"question_id": ["economy"], "party": ["Green"], "option_id": [0], "prob": [1.0]},
            "party",
            "Democrat",
        ),
        (
            {"question_id": ["economy"] * 2, "option_id": [0, 1], "prob": [0.2, 0.3]},
            "prob",
            "sum to 1",
        ),
        ({"question_id": ["economy"], "option_id": [0], "prob": [-1.0]}, "prob", ">= 0"),
        (
            {"question_id": ["economy"] * 2, "option_id": [0, 0], "prob": [0.5, 0.5]},
            "option_id",
            "one row",
        ),
        ({"question": ["economy"], "answer": ["Good"]}, "question_id", "question_id"),
        ({"question_id": ["economy"], "value": [1]}, "(columns)", "answer"),
        ({"question_id": ["economy"], "answer": ["Good"], "weight": ["heavy"]}, "weight", ">= 0"),
    ],
)
def test_errors_name_file_field_and_fix(
    tmp_path: Path, study: Study, frame: dict[str, list[object]], field: str, fix: str
) -> None:
    path = tmp_path / "bad.csv"
    pd.DataFrame(frame).to_csv(path, index=False)
    with pytest.raises(WorkbenchError) as info:
        load_human(path, study)
    message = str(info.value)
    assert str(path) in message and f"{field}:" in message and "fix:" in message, message
    assert fix in message, message


def test_unreadable_and_missing_files(tmp_path: Path, study: Study) -> None:
    with pytest.raises(WorkbenchError, match="no such file"):
        load_human(tmp_path / "none.csv", study)
    (tmp_path / "h.txt").write_text("x")
    with pytest.raises(WorkbenchError, match="unsupported file type"):
        load_human(tmp_path / "h.txt", study)


def _reference_distributions(frame: pd.DataFrame, study: Study, cells: pd.DataFrame) -> dict:
    """The plain definition, one cell at a time: the weighted option shares of the rows that
    match every factor the cell specifies; n = distinct respondents, Kish n of the weights."""
    out = {}
    for i, cell in cells.iterrows():
        q = next(q for q in study.questions if q.id == cell["question_id"])
        rows = frame[frame["question_id"] == q.id]
        for f in ("party", "age"):
            if cell[f] is not None and not pd.isna(cell[f]):
                rows = rows[rows[f] == cell[f]]
        mass = np.array([rows.loc[rows["answer"] == o, "weight"].sum() for o in q.all_options])
        k = len(q.options)
        if mass[:k].sum() <= 0:
            continue
        w = rows["weight"].to_numpy()
        out[i] = (
            mass[:k] / mass[:k].sum(),
            1 - mass[:k].sum() / mass.sum(),
            rows["respondent_id"].nunique(),
            w.sum() ** 2 / (w**2).sum(),
        )
    return out


@pytest.mark.parametrize("repeat_answers", [False, True])
def test_respondent_aggregation_matches_the_plain_definition(
    tmp_path: Path, study: Study, repeat_answers: bool
) -> None:
    """`distributions` groups integer codes once per pattern of specified factors (and keeps
    the groups for the next call); every cell equals the row-by-row definition, with values
    outside the study, empty values, a refusal option and repeated answers."""
    rng = np.random.default_rng(1)
    n = 400
    frame = pd.DataFrame(
        {
            "respondent_id": rng.integers(0, 120, n) if repeat_answers else np.arange(n),
            "question_id": rng.choice(["like", "economy", "other"], n, p=[0.45, 0.45, 0.1]),
            "party": rng.choice(["Democrat", "Republican", "Green", ""], n),
            "age": rng.choice(["30", "60", ""], n),
            "weight": rng.uniform(0.2, 3.0, n).round(3),
        }
    )
    options = {"like": ["Yes", "No", "Don't know"], "economy": ["Good", "Fair", "Poor"]}
    frame["answer"] = [rng.choice(options.get(q, ["x"])) for q in frame["question_id"]]
    frame.to_csv(tmp_path / "rows.csv", index=False)
    human = load_human(tmp_path / "rows.csv", study)
    frame = frame[frame["question_id"] != "other"].replace("", None)
    assert human.extra_values["party"]["Green"] == int((frame["party"] == "Green").sum())
    grid = [
        {"question_id": q, "party": p, "age": a}
        for q in ("like", "economy")
        for p in (None, "Democrat", "Republican")
        for a in (None, "30", "60")
    ]
    cells = _cells(grid).sample(frac=1.0, random_state=0)  # any index order
    got = human.distributions(cells)
    again = human.distributions(cells)  # from the kept groups
    pd.testing.assert_frame_equal(got, again)
    want = _reference_distributions(frame, study, cells)
    assert set(got["cell"]) == set(want)
    assert list(got["cell"].drop_duplicates()) == sorted(want)
    for cell, sub in got.groupby("cell"):
        prob, refusal, respondents, kish = want[cell]
        np.testing.assert_allclose(sub.sort_values("option_id")["prob"], prob, rtol=1e-12)
        assert sub["refusal"].iloc[0] == pytest.approx(refusal, rel=1e-12, abs=1e-15)
        assert sub["n"].iloc[0] == respondents
        assert sub["n_eff"].iloc[0] == pytest.approx(kish, rel=1e-12)
