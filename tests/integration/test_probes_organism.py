"""Probes on the small model organism recover what was planted (issue 5, validation):

- the actor is decodable from its own span and from the answer position, on held-out titles,
  at accuracy >= 0.9 at the best layer, with positive selectivity;
- the model's expected rating is decodable at the answer position with R² >= 0.8;
- title and region, present in every prompt (and decodable from their spans), have no
  behavioural effect on the rating, while the actor has a large one.

Measured on the small organism (seed 0): actor 0.99 (answer) / 1.00 (span), R² 0.999,
title TV 0.008 and region TV 0.003 against actor TV 0.37.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from workbench.engine.models import load_model
from workbench.interp.activations import ActivationConfig, capture_activations
from workbench.interp.probe_study import ProbeConfig, ProbeSpec
from workbench.interp.probing import run_probes
from workbench.measure.distributions import DistributionConfig, compute_distributions
from workbench.study.load import load_study

CONFIG = ProbeConfig(
    name="organism-validation",
    probes=(
        ProbeSpec("actor", ("answer", "span_mean:actor", "span_last:actor")),
        ProbeSpec("region", ("answer", "span_last:region")),
        ProbeSpec("title", ("span_last:title",), group_by="persona_id"),
        ProbeSpec("expected_score", ("answer",)),
    ),
    sites=("hook_embed", "blocks.*.hook_resid_post"),
    questions=("rating",),
    group_by="title",
)


@pytest.fixture(scope="module")
def probed(small_organism: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    study = load_study(small_organism / "study.yaml")
    lm = load_model(small_organism / "model", dtype="float32", device="cpu")
    dist = compute_distributions(study, lm, None, DistributionConfig(batch_size=64, progress=False))
    out = tmp_path_factory.mktemp("organism-probes")
    acts = capture_activations(
        study,
        lm,
        out / "activations",
        ActivationConfig(
            sites=CONFIG.sites,
            factors=("actor", "region", "title"),
            questions=("rating",),
            store_dtype="float32",
            batch_size=64,
            progress=False,
        ),
        log=lambda _: None,
    )
    return run_probes(acts, CONFIG, out / "probes", distributions=dist)


def _best(probes: pd.DataFrame, target: str, position: str) -> pd.Series:
    rows = probes[
        (probes["target"] == target)
        & (probes["position_label"] == position)
        & (probes["control"] == "none")
    ]
    return rows.sort_values("mean", ascending=False).iloc[0]


def test_actor_is_decodable_on_held_out_titles(probed: Any, small_organism: Path) -> None:
    n_titles = len(load_study(small_organism / "study.yaml").factor("title").values)
    for position in ("answer", "span_mean:actor", "span_last:actor"):
        best = _best(probed.probes, "actor", position)
        assert best["group_by"] == "title" and best["n_folds"] == n_titles
        assert best["mean"] >= 0.9, (position, best["mean"])
        assert min(best["fold_scores"]) >= 0.8  # every held-out title, not just on average
        assert best["selectivity"] > 0.3
    answer = probed.probes[
        (probed.probes["target"] == "actor") & (probed.probes["position"] == "answer")
    ]
    # The answer position of the embeddings is the same token in every prompt: nothing there.
    embed = answer[(answer["site"] == "hook_embed") & (answer["control"] == "none")]
    assert float(embed["mean"].iloc[0]) <= 0.2


def test_expected_rating_is_decodable_at_the_answer_position(probed: Any) -> None:
    best = _best(probed.probes, "expected_score", "answer")
    assert best["metric"] == "r2" and best["mean"] >= 0.8
    assert best["selectivity"] > 0
    shuffled = probed.probes[
        (probed.probes["target"] == "expected_score")
        & (probed.probes["site"] == best["site"])
        & (probed.probes["control"] == "shuffled")
    ]
    assert float(shuffled["mean"].iloc[0]) < 0.1


def test_title_and_region_are_decodable_but_do_not_drive_the_rating(
    probed: Any, small_organism: Path
) -> None:
    spec = json.loads((small_organism / "organism.json").read_text())
    assert {"title", "region"} <= set(spec["effects"]["rating"]["zero_effect"])
    behaviour = probed.behaviour[probed.behaviour["question_id"] == "rating"].set_index("factor")
    for factor in ("title", "region"):
        assert behaviour.loc[factor, "n_pairs"] > 0
        assert behaviour.loc[factor, "mean_tv"] < 0.03, factor
    assert behaviour.loc["actor", "mean_tv"] > 0.2
    summary = probed.summary.set_index("factor")
    assert summary.loc["actor", "decodable"] and summary.loc["actor", "drives"]
    for factor in ("title", "region"):
        assert summary.loc[factor, "decodable"], factor  # from its own span
        assert summary.loc[factor, "drives"] is not None and not summary.loc[factor, "drives"]
    # What the opinion probe reads is the actor, not the zero-effect factors.
    assert summary.loc["actor", "opinion_eta2"] > 0.5
    assert summary.loc["region", "opinion_eta2"] < 0.02


def test_probe_run_folder(probed: Any) -> None:
    from safetensors.torch import load_file

    folder = probed.out_dir
    for name in (
        "probes.parquet",
        "relation.parquet",
        "behaviour.parquet",
        "decodable_vs_drives.parquet",
        "directions.safetensors",
        "accuracy_by_layer.png",
        "manifest.json",
    ):
        assert (folder / name).exists(), name
    probes = pd.read_parquet(folder / "probes.parquet")
    assert set(probes["control"]) == {"none", "shuffled", "control_task"}
    assert {"site", "layer", "position", "target", "fold_scores", "mean", "selectivity"} <= set(
        probes.columns
    )
    directions = load_file(str(folder / "directions.safetensors"))
    assert directions["actor|answer|blocks.1.hook_resid_post|weight"].shape == (64, 8)
