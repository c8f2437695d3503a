"""Behavioural effects (AMCE, Shapley importance) on synthetic designed data with known effects.

No model: a balanced factorial design (2 persona factors, 2 stimulus factors) whose expected
score is additive in the factors plus noise, written as a distributions run's tables.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from workbench.errors import WorkbenchError
from workbench.interp.effects import (
    ALL,
    EffectsConfig,
    compute_effects,
    estimate_effects,
    subset_values,
)
from workbench.interp.effects_figures import effects_blocks
from workbench.measure.distributions import DistributionResult, order_adjusted
from workbench.report import write_report
from workbench.study.load import parse_study
from workbench.study.spec import Study

STUDY: dict[str, Any] = {
    "name": "synthetic-effects",
    "factors": [
        {"name": "group", "role": "persona", "values": ["g0", "g1", "g2", "g3"]},
        {"name": "age", "role": "persona", "values": ["young", "mid", "old"]},
        {"name": "item", "role": "stimulus", "values": ["i0", "i1", "i2", "i3", "i4", "i5"]},
        {"name": "colour", "role": "stimulus", "values": ["red", "blue"]},
    ],
    "design": {"kind": "factorial"},
    "template": {
        "format": "plain",
        "persona": ["I am in {group}.", "I am {age}."],
        "prompt": "{persona}\nQuestion: {question}\n{options}\nAnswer:",
    },
    "questions": [
        {
            "id": "rate",
            "text": "Rate the {colour} {item}.",
            "options": ["low", "mid", "high"],
            "values": [1, 2, 3],
        }
    ],
}
# Effect of each level on P(high) - P(low), so on the expected score it is twice this.
EFFECTS = {
    "group": {"g0": 0.0, "g1": 0.10, "g2": -0.05, "g3": 0.0},
    "age": {"young": 0.0, "mid": 0.0, "old": 0.08},
    "item": {"i0": 0.0, "i1": 0.15, "i2": 0.04, "i3": 0.0, "i4": -0.03, "i5": 0.02},
    "colour": {"red": 0.0, "blue": 0.0},
}
FACTORS = list(EFFECTS)


def _study(raw: dict[str, Any] | None = None) -> Study:
    return parse_study(copy.deepcopy(raw or STUDY), "synthetic.yaml")


def _adjusted(noise: float = 0.02, seed: int = 0, coarse: bool = False) -> pd.DataFrame:
    """The `adjusted` table: one row per cell x option."""
    rng = np.random.default_rng(seed)
    grid = pd.MultiIndex.from_product([list(v) for v in EFFECTS.values()], names=FACTORS)
    cells = grid.to_frame(index=False)
    if coarse:  # "people in group g", age unspecified, with a far-off answer
        extra = grid.to_frame(index=False).drop_duplicates(["group", "item", "colour"])
        cells = pd.concat([cells, extra.assign(age=None)], ignore_index=True)
    shift = sum(cells[f].map(EFFECTS[f]).fillna(0.05) for f in FACTORS)
    shift = shift + rng.normal(0, noise, len(cells))
    probs = np.column_stack([0.4 - shift, np.full(len(cells), 0.2), 0.4 + shift])
    cells["persona_id"] = (
        "group=" + cells["group"] + "|age=" + cells["age"].astype("string").fillna("*")
    )
    rows = []
    for k in range(3):
        rows.append(cells.assign(question_id="rate", option_id=k, prob=probs[:, k]))
    out = pd.concat(rows, ignore_index=True)
    for f in FACTORS:
        out[f] = out[f].astype("string")
    return out


def _score_cells(adjusted: pd.DataFrame) -> pd.DataFrame:
    """Expected score per cell; factors categorical in the study's order (baseline first)."""
    wide = adjusted.pivot_table(
        index=["persona_id", *FACTORS], columns="option_id", values="prob"
    ).reset_index()
    wide["score"] = wide[0] * 1 + wide[1] * 2 + wide[2] * 3
    for f in FACTORS:
        wide[f] = pd.Categorical(wide[f].astype(str), categories=list(EFFECTS[f]))
    return wide


def _manifest(raw: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "kind": "distributions",
        "study": {"name": "synthetic", "path": "synthetic.yaml", "definition": raw or STUDY},
    }


def _result(adjusted: pd.DataFrame, raw: dict[str, Any] | None = None) -> DistributionResult:
    empty = pd.DataFrame()
    return DistributionResult(empty, empty, empty, empty, adjusted, empty, _manifest(raw))


@pytest.fixture(scope="module")
def fitted() -> Any:
    adjusted = _adjusted()
    result = estimate_effects(adjusted, _study(), EffectsConfig(n_boot=40, seed=1))
    return adjusted, result


def _score_effects(result: Any) -> pd.DataFrame:
    eff = result.effects
    return eff[eff["metric"] == "expected_score"].set_index(["factor", "level"])


def test_amce_covers_the_planted_effects(fitted: Any) -> None:
    _, result = fitted
    eff = _score_effects(result)
    assert len(eff) == sum(len(v) - 1 for v in EFFECTS.values())
    assert (eff["baseline"] == [next(iter(EFFECTS[f])) for f, _ in eff.index]).all()
    # Coverage over 20 noise draws of the 10 intervals (two-way CRV1, t with 11 df: 12
    # personas x 12 stimuli). Measured 0.75: two-way cluster-robust intervals with this few
    # clusters under-cover (a known small-sample property), far from a wrong estimator's 0.
    hits = []
    for seed in range(20):
        res = estimate_effects(_adjusted(seed=seed), _study(), EffectsConfig(n_boot=0))
        for (factor, level), row in _score_effects(res).iterrows():
            truth = 2 * (EFFECTS[factor][level] - next(iter(EFFECTS[factor].values())))
            hits.append(row["ci_low"] <= truth <= row["ci_high"])
            assert abs(row["estimate"] - truth) < 0.06
    assert np.mean(hits) >= 0.7, np.mean(hits)


def test_amce_equals_difference_of_means_and_lstsq(fitted: Any) -> None:
    adjusted, result = fitted
    cells = _score_cells(adjusted)
    eff = _score_effects(result)
    dummies = pd.get_dummies(cells[FACTORS], drop_first=True, dtype=float)
    x = np.column_stack([np.ones(len(cells)), dummies.to_numpy()])
    beta = np.linalg.lstsq(x, cells["score"].to_numpy(), rcond=None)[0]
    for j, name in enumerate(dummies.columns, start=1):
        factor, level = name.split("_", 1)
        base = next(iter(EFFECTS[factor]))
        means = cells.groupby(factor)["score"].mean()
        assert eff.loc[(factor, level), "estimate"] == pytest.approx(beta[j], abs=1e-10)
        assert eff.loc[(factor, level), "estimate"] == pytest.approx(
            means[level] - means[base], abs=1e-10
        )
    # Option probabilities: P(high) moves by half the score's effect, P(mid) not at all.
    probs = result.effects.set_index(["factor", "level", "metric"])["estimate"]
    assert probs[("item", "i1", "prob:high")] == pytest.approx(
        eff.loc[("item", "i1"), "estimate"] / 2, abs=1e-10
    )
    assert abs(probs[("item", "i1", "prob:mid")]) < 1e-10


def test_intervals_are_statsmodels_two_way_cluster_robust(fitted: Any) -> None:
    adjusted, result = fitted
    cells = _score_cells(adjusted)
    dummies = pd.get_dummies(cells[FACTORS], drop_first=True, dtype=float)
    x = sm.add_constant(dummies)
    groups = np.column_stack(
        [
            cells["persona_id"].astype("category").cat.codes,
            (cells["item"].astype(str) + "|" + cells["colour"].astype(str))
            .astype("category")
            .cat.codes,
        ]
    )
    fit = sm.OLS(cells["score"].to_numpy(), x).fit(
        cov_type="cluster", cov_kwds={"groups": groups}, use_t=True
    )
    ci = fit.conf_int(0.05)
    # A negative two-way variance (null interval) falls back to the wider one-way interval.
    one = [
        sm.OLS(cells["score"].to_numpy(), x).fit(
            cov_type="cluster", cov_kwds={"groups": g}, use_t=True
        )
        for g in groups.T
    ]
    eff = _score_effects(result)
    n_fallback = 0
    for name in dummies.columns:
        factor, level = name.split("_", 1)
        expected = ci.loc[name]
        if expected.isna().any():
            n_fallback += 1
            expected = max(one, key=lambda f: f.bse[name]).conf_int(0.05).loc[name]
        assert eff.loc[(factor, level), "ci_low"] == pytest.approx(expected[0], abs=1e-10)
        assert eff.loc[(factor, level), "ci_high"] == pytest.approx(expected[1], abs=1e-10)
    assert n_fallback < len(dummies.columns) / 2


def _eta2(cells: pd.DataFrame, factor: str) -> float:
    y = cells["score"]
    means = y.groupby(cells[factor]).transform("mean")
    return float(((means - y.mean()) ** 2).sum() / ((y - y.mean()) ** 2).sum())


@pytest.mark.parametrize("interactions", [None, False])
def test_shapley_shares_sum_to_r2_and_equal_eta2(fitted: Any, interactions: bool | None) -> None:
    adjusted, result = fitted
    if interactions is not None:
        result = estimate_effects(
            adjusted, _study(), EffectsConfig(n_boot=20, interactions=interactions)
        )
    cells = _score_cells(adjusted)
    imp = result.importance
    for metric in ("expected_score", "mean_tv"):
        rows = imp[imp["metric"] == metric].set_index("factor")
        parts = rows.drop(index=ALL)["share"]
        assert parts.sum() == pytest.approx(rows.loc[ALL, "share"], abs=1e-8)
        # Percentile intervals; with 12 personas x 12 stimuli a resample duplicates clusters
        # and unbalances the design, so they need not contain the estimate here.
        assert (rows["ci_low"] <= rows["ci_high"]).all()
    score = imp[imp["metric"] == "expected_score"].set_index("factor")["share"]
    # The full model: main effects, plus every pairwise interaction in a factorial design.
    terms = " + ".join(f"C({f})" for f in FACTORS)
    if interactions is None:
        terms = f"({terms})**2"
        assert {"group×age", "item×colour"} <= set(score.index)
    else:
        assert not any("×" in f for f in score.index)
    import statsmodels.formula.api as smf

    full = smf.ols(f"score ~ {terms}", data=cells).fit()
    assert score[ALL] == pytest.approx(full.rsquared, abs=1e-8)
    # Balanced design: each main effect's share is the variance it explains alone.
    for factor in FACTORS:
        assert score[factor] == pytest.approx(_eta2(cells, factor), abs=1e-8)
    assert score["item"] > score["group"] > score["age"] > score["colour"]


def test_replicate_values_match_statsmodels_wls() -> None:
    adjusted = _adjusted()
    study = _study()
    result = estimate_effects(adjusted, study, EffectsConfig(n_boot=0))
    cells = result.cells
    from workbench.interp.effects import _players

    baselines = {f: next(iter(v)) for f, v in EFFECTS.items()}
    x, players = _players(cells, study, FACTORS, baselines, pairs=False)
    rng = np.random.default_rng(3)
    weights = rng.integers(0, 4, size=(2, len(cells))).astype(float)
    probs = cells[["prob:low", "prob:mid", "prob:high"]].to_numpy()
    values = subset_values(x, players, cells["expected_score"].to_numpy(), probs, weights)
    subset = 0b0101  # group and item
    cols = players[0][1] + players[2][1]
    xs = sm.add_constant(x[:, cols])
    for b, w in enumerate(weights):
        wls = sm.WLS(cells["expected_score"].to_numpy(), xs, weights=w).fit()
        assert values["expected_score"][subset, b] == pytest.approx(wls.rsquared, abs=1e-8)
        fitted_p = np.column_stack(
            [sm.WLS(probs[:, k], xs, weights=w).fit().fittedvalues for k in range(3)]
        )
        mean_p = (w[:, None] * probs).sum(0) / w.sum()
        tv = 0.5 * np.abs(fitted_p - mean_p).sum(1)
        assert values["mean_tv"][subset, b] == pytest.approx((w * tv).sum() / w.sum(), abs=1e-8)


def test_coarse_cells_leave_the_unspecified_factor_alone() -> None:
    fine = estimate_effects(_adjusted(), _study(), EffectsConfig(n_boot=0))
    coarse = estimate_effects(_adjusted(coarse=True), _study(), EffectsConfig(n_boot=0))
    a, b = _score_effects(fine), _score_effects(coarse)
    assert a.loc[("age", "old"), "n"] == b.loc[("age", "old"), "n"] == 48
    assert b.loc[("age", "old"), "estimate"] == pytest.approx(a.loc[("age", "old"), "estimate"])
    assert b.loc[("group", "g1"), "n"] == a.loc[("group", "g1"), "n"] + 12
    # Coarse cells never enter the importance (fine cells only).
    pd.testing.assert_frame_equal(fine.importance, coarse.importance)


def test_baseline_choice_shifts_the_reference() -> None:
    config = EffectsConfig(n_boot=0, baselines=(("item", "i1"),))
    eff = _score_effects(estimate_effects(_adjusted(), _study(), config))
    default = _score_effects(estimate_effects(_adjusted(), _study(), EffectsConfig(n_boot=0)))
    assert set(eff.loc["item"].index) == {"i0", "i2", "i3", "i4", "i5"}
    assert eff.loc[("item", "i0"), "baseline"] == "i1"
    assert eff.loc[("item", "i0"), "estimate"] == pytest.approx(
        -default.loc[("item", "i1"), "estimate"]
    )


def _write_run(path: Path, adjusted: pd.DataFrame, kind: str = "distributions") -> Path:
    """A distributions run folder whose two option orders average to `adjusted`."""
    path.mkdir(parents=True)
    cells = adjusted[adjusted["option_id"] == 0].reset_index(drop=True)
    prompts = pd.concat(
        [cells.assign(permutation=0), cells.assign(permutation=1)], ignore_index=True
    ).drop(columns=["option_id", "prob"])
    prompts["prompt_id"] = np.arange(len(prompts))
    dist = adjusted.merge(prompts[["prompt_id", "persona_id", *FACTORS, "permutation"]])
    # Order 1 moves 0.02 from "low" to "high", order 0 the other way: the mean is unchanged.
    tilt = np.where(dist["permutation"] == 0, 1, -1) * 0.02 * (dist["option_id"] - 1)
    dist = dist.assign(prob=dist["prob"] + tilt, is_refusal=False)
    prompts.to_parquet(path / "prompts.parquet")
    dist[["prompt_id", "option_id", "is_refusal", "prob"]].to_parquet(
        path / "distributions.parquet"
    )
    (path / "manifest.json").write_text(json.dumps({**_manifest(), "kind": kind}))
    return path


def test_run_folder_in_effects_folder_out(tmp_path: Path) -> None:
    adjusted = _adjusted()
    run = _write_run(tmp_path / "dist", adjusted)
    prompts = pd.read_parquet(run / "prompts.parquet")
    dist = pd.read_parquet(run / "distributions.parquet")
    assert len(order_adjusted(prompts, dist, FACTORS)) == len(adjusted)
    out = tmp_path / "effects"
    config = EffectsConfig(n_boot=50)
    result = compute_effects(run, out, config)
    direct = estimate_effects(adjusted, _study(), config)
    pd.testing.assert_frame_equal(result.effects, direct.effects, atol=1e-12)
    names = {p.name for p in out.iterdir()}
    assert {"effects.parquet", "importance.parquet", "manifest.json"} <= names
    assert {"forest_rate.png", "importance_rate.png"} <= names
    assert "chunks" not in names
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "effects" and manifest["baselines"]["item"] == "i0"
    assert manifest["config"]["n_boot"] == 50 and "versions" in manifest
    table = pd.read_parquet(out / "effects.parquet")
    assert list(table.columns) == [
        "question_id",
        "factor",
        "level",
        "baseline",
        "metric",
        "estimate",
        "ci_low",
        "ci_high",
        "n",
    ]
    # A different configuration into the same folder is refused before any work.
    with pytest.raises(WorkbenchError, match="different run"):
        compute_effects(run, out, EffectsConfig(n_boot=10))
    write_report(tmp_path / "report", "effects", effects_blocks(result))
    assert (tmp_path / "report" / "report.html").stat().st_size > 1000


def _one_level_study() -> dict[str, Any]:
    raw = copy.deepcopy(STUDY)
    raw["factors"][3]["values"] = ["red"]
    return raw


@pytest.mark.parametrize(
    ("case", "field", "fix"),
    [
        ("one_level", "factors.colour", "two or more values"),
        ("unknown_factor", "baselines", "--baseline FACTOR=LEVEL"),
        ("unknown_level", "baselines.item", "one of ['i0', 'i1', 'i2', 'i3'"),
        ("unknown_question", "questions", "one of ['rate']"),
        ("sampling_run", "kind is 'sampling'", "workbench distributions"),
        ("no_manifest", "not a finished distributions run", "workbench distributions"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path: Path, case: str, field: str, fix: str) -> None:
    adjusted = _adjusted()
    run: Any = _result(adjusted)
    config = EffectsConfig(n_boot=0)
    if case == "one_level":
        run = _result(adjusted[adjusted["colour"] == "red"], _one_level_study())
    elif case == "unknown_factor":
        config = EffectsConfig(baselines=(("flavour", "x"),))
    elif case == "unknown_level":
        config = EffectsConfig(baselines=(("item", "i9"),))
    elif case == "unknown_question":
        config = EffectsConfig(questions=("nope",))
    elif case == "sampling_run":
        run = _write_run(tmp_path / "run", adjusted, kind="sampling")
    elif case == "no_manifest":
        run = tmp_path
    out = tmp_path / "out"
    with pytest.raises(WorkbenchError) as err:
        compute_effects(run, out, config)
    assert field in str(err.value) and fix in err.value.fix
    assert not out.exists()
