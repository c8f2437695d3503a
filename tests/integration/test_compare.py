"""`workbench compare` on the organism: runs of every kind against each other and against
`truth.parquet` standing in for human data; numbers recomputed independently; the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from workbench.cli import main
from workbench.compare.comparison import CompareConfig, CompareResult, compare
from workbench.engine.models import LoadedModel, load_model
from workbench.measure import sampling as S
from workbench.measure.distributions import DistributionConfig, compute_distributions
from workbench.organism.build import DESIGN_FILE, STUDY_FILE, TRUTH_FILE
from workbench.study.load import load_study
from workbench.study.spec import Study

LABEL = "truth (stands in for human data)"


def _slice(full: Study, organism: Path) -> Study:
    spec = json.loads((organism / "organism.json").read_text())
    title = spec["factors"]["stimulus"]["title"]["held_out"][0]
    actors = spec["factors"]["stimulus"]["actor"][:2]
    cells = [
        c
        for c in full.cells
        if c["title"] == title and c["actor"] in actors and c["genre"] == "comedy"
    ]
    return dataclasses.replace(full, cells=tuple(cells))


@pytest.fixture(scope="module")
def runs(small_organism: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    lm: LoadedModel = load_model(small_organism / "model", dtype="float32", device="cpu")
    study = _slice(load_study(small_organism / STUDY_FILE), small_organism)
    out = tmp_path_factory.mktemp("compare-runs")
    compute_distributions(study, lm, out / "logits", DistributionConfig(progress=False))
    S.compute_samples(study, lm, out / "sampled", S.SamplingConfig(n=60, progress=False))
    S.compute_samples(
        study,
        lm,
        out / "constrained",
        S.SamplingConfig(n=60, constrain=True, seed=2, progress=False),
    )
    few = dataclasses.replace(study, cells=study.cells[:3])
    S.compute_samples(
        few, lm, out / "verbalized", S.SamplingConfig(n=2, verbalized=True, progress=False)
    )
    return {"out": out, "study": study}


@pytest.fixture(scope="module")
def result(runs: dict[str, Any], small_organism: Path) -> CompareResult:
    out = runs["out"]
    return compare(
        [out / "logits", out / "sampled", out / "constrained", out / "verbalized"],
        human=small_organism / TRUTH_FILE,
        out=out / "compare",
        config=CompareConfig(human_label=LABEL, n_resamples=300),
        study=runs["study"],
    )


def test_outputs_written(result: CompareResult) -> None:
    out = result.out_dir
    assert out is not None
    for name in ("pairs", "summary", "properties", "rates", "human", "structural"):
        assert len(pd.read_parquet(out / f"{name}.parquet")), name
    for name in ("report.html", "report.md", "compare_distributions.png", "manifest.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["conventions"]["kl_bits"].startswith("KL(reference || source)")
    assert "within floor" in (out / "report.md").read_text()
    assert set(result.kinds.values()) >= {
        "logits",
        "sampled",
        "answer_position",
        "human",
        "baseline",
    }


def test_item_metrics_recomputed_independently(result: CompareResult) -> None:
    pairs = result.pairs[(result.pairs["level"] == "item") & (result.pairs["source"] == "sampled")]
    row = pairs[pairs["question_id"] == "rating"].iloc[0]
    src, ref = result.sources["sampled"], result.sources["logits"]
    p = src[src["key"] == row["key"]].sort_values("option_id")["prob"].to_numpy()
    q = ref[ref["key"] == row["key"]].sort_values("option_id")["prob"].to_numpy()
    values = [1, 2, 3, 4, 5]
    assert row["tv"] == pytest.approx(0.5 * np.abs(p - q).sum())
    assert row["js"] == pytest.approx(jensenshannon(p, q, base=2))
    assert row["nw1"] == pytest.approx(wasserstein_distance(values, values, p, q) / 4)


def test_constrained_within_floor_and_its_slot_is_the_logits(result: CompareResult) -> None:
    summary = result.summary[result.summary["question_id"] == "all"].set_index(["level", "source"])
    assert set(result.summary["question_id"]) == {"all", "rating", "cinema_funding"}
    assert bool(summary.loc[("item", "constrained"), "within_floor"])
    assert summary.loc[("item", "constrained (answer position)"), "tv"] < 1e-4
    assert 0.05 < summary.loc[("item", "sampled"), "floor_mean"] < 0.12  # N = 60, K = 3 and 5


def test_truth_as_human_data(result: CompareResult, small_organism: Path) -> None:
    gaps = result.structural
    truth_gaps = gaps[gaps["source"] == LABEL]
    assert len(truth_gaps) >= 2 and truth_gaps["gap_tv"].max() < 1e-9
    assert truth_gaps["argmax_agrees"].all()
    logits_gaps = gaps[gaps["source"] == "logits"]
    assert len(logits_gaps) == len(truth_gaps) and logits_gaps["gap_tv"].max() > 0
    human = result.human.set_index("source")
    assert {"uniform", "majority", "logits", "sampled"} <= set(human.index)
    assert human.loc["majority", "homogenized_share"] == 1.0
    assert human.loc["logits", "mean_tv"] < human.loc["uniform", "mean_tv"]
    # The uniform baseline's representativeness, by hand from truth.parquet.
    truth = pd.read_parquet(small_organism / TRUTH_FILE)
    cells = result.cell_sources[LABEL]
    rating = cells[cells["question_id"] == "rating"]
    scores = []
    for _, g in rating.groupby("key"):
        q = g.sort_values("option_id")["prob"].to_numpy()
        scores.append(1 - wasserstein_distance([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [0.2] * 5, q) / 4)
    # cinema_funding has no ordinal values: nominal, so 1 - TV (never W1)
    nominal = cells[cells["question_id"] == "cinema_funding"]
    tv_scores = [
        1 - 0.5 * np.abs(g["prob"].to_numpy() - 1 / 3).sum() for _, g in nominal.groupby("key")
    ]
    expected = np.mean([np.mean(scores), np.mean(tv_scores)])
    assert human.loc["uniform", "representativeness"] == pytest.approx(expected)
    assert human.loc["uniform", "n_nominal_questions"] == 1
    assert len(truth) > len(rating)  # only the cells the runs asked are compared


def test_rates_and_mismatch(result: CompareResult, runs: dict[str, Any]) -> None:
    rates = result.rates.set_index("run")
    assert rates.loc["verbalized", "unparseable_rate"] == 1.0
    assert "no_json" in rates.loc["verbalized", "failures"]
    r = rates.loc["sampled"]
    assert r["ok_lo"] <= r["ok_rate"] <= r["ok_hi"]
    assert 0.2 < r["preamble_rate"] < 0.4
    assert rates.loc["constrained", "preamble_rate"] == 0.0
    # Sample-level mismatch by hand: answers differing from the logits' argmax option.
    out = runs["out"]
    samples = pd.read_parquet(out / "sampled" / "samples.parquet")
    dist = pd.read_parquet(out / "logits" / "distributions.parquet")
    dist = dist[~dist["is_refusal"]]
    argmax = dist.loc[dist.groupby("prompt_id")["prob"].idxmax()].set_index("prompt_id")[
        "option_id"
    ]
    ok = samples[samples["status"] == "ok"]
    by_hand = float((ok["option_id"].astype(float) != ok["prompt_id"].map(argmax)).mean())
    assert r["sample_mismatch"] == pytest.approx(by_hand)
    assert r["sample_mismatch_lo"] <= r["sample_mismatch"] <= r["sample_mismatch_hi"]
    assert set(result.mismatch_by_persona["run"]) == {"sampled", "constrained"}


def test_cli_sample_and_compare(
    small_organism: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load((small_organism / STUDY_FILE).read_text())
    design = pd.read_csv(small_organism / DESIGN_FILE, dtype=str, keep_default_na=False).head(3)
    design.to_csv(tmp_path / DESIGN_FILE, index=False)
    raw["sampling"] = {"pattern": r"give it a (?P<answer>\d)"}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    model = str(small_organism / "model")
    args = ["--model", model, "--device", "cpu", "--quiet", "--n", "8", "--seed", "1"]
    out = ["--out", str(tmp_path / "s"), "--no-answer-position"]
    assert main(["sample", str(tmp_path / "study.yaml"), *args, *out]) == 0
    assert "samples of" in capsys.readouterr().out
    samples = pd.read_parquet(tmp_path / "s" / "samples.parquet")
    assert len(samples) == 8 * samples["prompt_id"].nunique()
    assert "answer_probs" not in samples.columns
    assert "pattern" in set(samples["how"]) or (samples["text"].str.startswith(" Sure").sum() == 0)
    code = main(
        [
            "compare",
            str(tmp_path / "s"),
            "--human",
            str(small_organism / TRUTH_FILE),
            "--out",
            str(tmp_path / "c"),
            "--resamples",
            "50",
        ]
    )
    assert code == 0 and (tmp_path / "c" / "report.html").is_file()
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a finished run folder" in capsys.readouterr().err
    assert (
        main(
            [
                "sample",
                str(tmp_path / "study.yaml"),
                *args,
                "--out",
                str(tmp_path / "t"),
                "--temperature",
                "0",
            ]
        )
        == 2
    )
    assert "--temperature must be > 0" in capsys.readouterr().err
