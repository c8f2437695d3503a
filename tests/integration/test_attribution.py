"""Attribution patching and integrated gradients on the small model organism (issue 10, part 3).

- Exactness: IG over the embedding layer equals captum's `LayerIntegratedGradients` (pad and
  counterfactual baselines, Gauss-Legendre and trapezoid rules) within 1e-4; completeness holds
  where the path is smooth, and where it is not the run says so.
- Planted truth (rating question): AtP agrees with real patching over the grid (Spearman >= 0.8)
  and its top-k cells are re-patched for real; IG with the counterfactual baseline ranks the actor
  first and title, region and age last.
- Age: the design never varies it alone, so a derived study adds cells that differ from existing
  ones in age only; patching and AtP of its span then move the answer by no more than noise.
- Resume after a killed chunk, the other metrics, every bad input's error, the CLI.

Measured on the small organism (seed 0): AtP vs patching Spearman 0.94 over 64 cells (32 pairs);
IG (counterfactual, 8 prompts) mean |attribution| actor 0.72, genre 0.35, favourite genre 0.29,
party 0.09, age / region / title <= 0.0044.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from workbench.engine.models import LoadedModel, load_model
from workbench.errors import StudyError, WorkbenchError
from workbench.interp import attribution as A
from workbench.interp import gradients as G
from workbench.interp.attribution_tables import COLUMNS, agreement
from workbench.interp.patching import PatchConfig, patch_factor
from workbench.interp.readers import reader
from workbench.study import prompts as P
from workbench.study.load import load_study

ATP = A.AttributionConfig(questions=("rating",), max_pairs=32, n_boot=300, progress=False)
IG = A.AttributionConfig(
    questions=("rating",), max_prompts=8, n_steps=32, n_boot=300, progress=False
)


@pytest.fixture(scope="module")
def organism(small_organism: Path) -> tuple[Any, LoadedModel]:
    study = load_study(small_organism / "study.yaml")
    return study, load_model(small_organism / "model", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def ig_run(organism: tuple[Any, LoadedModel]) -> A.AttributionResult:
    study, lm = organism
    return A.attribute(study, lm, "ig", None, IG)


def _rating_prompt(study: Any, lm: LoadedModel, k: int = 5) -> P.Prompt:
    return [p for p in P.render(study, lm.tokenizer) if p.question_id == "rating"][k]


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_ig_equals_captum(organism: tuple[Any, LoadedModel], method: str) -> None:
    from captum.attr import LayerIntegratedGradients

    study, lm = organism
    prompt = _rating_prompt(study, lm)
    metric = G.metric_fn("expected_score", reader(study, lm, prompt), study.scoring.aggregate)
    ids = list(prompt.input_ids)
    pad = [i if i == lm.tokenizer.bos_token_id else lm.tokenizer.pad_token_id for i in ids]
    other = G.counterfactual_ids(study, [prompt], ["actor"], lm.tokenizer)[
        (prompt.prompt_id, "actor")
    ][0]

    def forward(input_ids: torch.Tensor) -> torch.Tensor:  # plain HF, not the workbench's path
        return metric(torch.log_softmax(lm.model(input_ids=input_ids).logits[:, -1].float(), -1))

    lig = LayerIntegratedGradients(forward, lm.model.get_input_embeddings())
    ours = G.integrated_gradients(
        lm, ids, metric, torch.stack([G.embed(lm, pad), G.embed(lm, other)]), n_steps=16,
        method=method,
    )  # fmt: skip
    assert torch.equal(G.fixed_baseline(lm, ids, "pad"), G.embed(lm, pad))
    for b, baseline in enumerate((pad, other)):
        theirs, delta = lig.attribute(
            torch.tensor([ids]),
            baselines=torch.tensor([list(baseline)]),
            n_steps=16,
            method=method,
            return_convergence_delta=True,
        )
        assert (theirs[0].double() - ours.attributions[b]).abs().max() < 1e-4
        assert abs(float(delta) - float(ours.completeness_error[b])) < 1e-4


def test_ig_ranks_the_actor_first(ig_run: A.AttributionResult) -> None:
    t = ig_run.attribution
    cf = t[(t["baseline"] == "counterfactual") & (t["statistic"] == "abs_attribution")]
    ranked = cf.sort_values("score", ascending=False)["factor"].tolist()
    assert ranked[0] == "actor", ranked
    assert set(ranked[-3:]) == {"title", "region", "age"}, ranked
    assert set(cf["n"]) and cf.set_index("factor").loc["actor", "n"] == 8
    # completeness: tight where the path is smooth (two-token names), reported where it is not
    err = t[t["statistic"] == "completeness_error"].set_index(["baseline", "factor"])["score"]
    diff = t[t["statistic"] == "metric_difference"].set_index(["baseline", "factor"])["score"]
    assert err[("counterfactual", "actor")] < 0.01 * diff[("counterfactual", "actor")]
    flagged = set(ig_run.manifest["incomplete"])
    for key in err.index:
        assert (f"rating/{key[0]}/{key[1]}" in flagged) == (err[key] > 0.05 * diff[key]), key
    # the zero baseline covers every token: its spans and `rest` carry each prompt's whole sum
    raw = ig_run.attributed[ig_run.attributed["baseline"] == "zero"]
    sums = raw.groupby("prompt_id").agg(
        total=("attribution", "sum"),
        diff=("value", "first"),
        base=("baseline_value", "first"),
        err=("completeness_error", "first"),
    )
    assert ((sums["total"] - (sums["diff"] - sums["base"]) - sums["err"]).abs() < 1e-6).all()
    assert set(raw["factor"]) == {*ig_run.manifest["factors"], G.REST}


@pytest.fixture(scope="module")
def atp_actor(organism: tuple[Any, LoadedModel]) -> A.AttributionResult:
    study, lm = organism
    return A.attribute(study, lm, "atp", None, ATP, ["actor"])


def test_atp_agrees_with_patching(
    organism: tuple[Any, LoadedModel], atp_actor: A.AttributionResult
) -> None:
    study, lm = organism
    real = patch_factor(
        study, lm, "actor", None, PatchConfig(questions=("rating",), max_pairs=32, n_boot=300,
                                              progress=False)
    )  # fmt: skip
    agree = agreement(atp_actor.attribution, real.patching, 5)
    row = agree.iloc[0]
    assert row["n_cells"] == len(ATP.sites) * 2 * len(ATP.positions) * 2  # 2 layers, 2 directions
    assert row["spearman"] >= 0.8, agree
    # AtP's own top-k, re-patched for real, carry a large share of the actor effect
    top = atp_actor.repatched
    assert len(top) == ATP.top_k and (top["patching"] > 0.5).all(), top
    assert set(atp_actor.agreement["source"]) == {"repatched top-k"}
    assert atp_actor.manifest["cost"]["forward_equivalents_per_pair"] > 1


def test_age_patched_in_a_derived_study(organism: tuple[Any, LoadedModel]) -> None:
    study, lm = organism
    ages = study.factor("age").values
    base = [
        c
        for c in study.cells
        if c.get("age") is not None
        and c.get("title") == "Paper Carnival"
        and c.get("genre") == "comedy"
        and c.get("actor") in {"Mara Quinlan", "Omar Haddad"}
    ]
    # every base cell again with each other age: pairs that differ in age alone
    cells = {tuple({**c, "age": a}.items()): {**c, "age": a} for c in base for a in ages}
    derived = dataclasses.replace(study, cells=tuple(cells.values()))
    config = PatchConfig(
        sites=("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"),
        positions=("span_mean", "span_last"),  # the age span (the answer carries any effect)
        questions=("rating",),
        n_boot=300,
        progress=False,
    )
    patched = patch_factor(derived, lm, "age", None, config)
    assert patched.manifest["factor_effect"]["rating"]["n_pairs"] == 96
    # age's own effect is at the organism's noise (title / region pairs: mean TV 0.001-0.008)
    assert patched.manifest["factor_effect"]["rating"]["mean_tv"] < 0.01
    real = patched.patching
    atp = A.attribute(
        derived, lm, "atp", None,
        dataclasses.replace(
            ATP, sites=config.sites, positions=config.positions, max_pairs=None, top_k=0
        ),
        ["age"],
    ).attribution  # fmt: skip
    for ne in (
        real[real["metric"] == "normalized_effect"].rename(columns={"effect": "score"}),
        atp[atp["statistic"] == "normalized_effect"],
    ):
        assert len(ne) == 3 * 2 * 2  # sites x positions x directions
        for _, row in ne.iterrows():
            assert abs(row["score"]) < 0.05 or row["ci_low"] <= 0 <= row["ci_high"], row.to_dict()
    ig = A.attribute(
        derived, lm, "ig", None,
        dataclasses.replace(IG, max_prompts=4, baselines=("counterfactual",)), ["age", "actor"],
    ).attribution  # fmt: skip
    mean_abs = ig[ig["statistic"] == "abs_attribution"].set_index("factor")["score"]
    assert mean_abs["age"] < 0.05 * mean_abs["actor"], mean_abs


def test_resume_and_other_metrics(
    organism: tuple[Any, LoadedModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, lm = organism
    config = dataclasses.replace(
        ATP, sites=("blocks.0.hook_resid_post",), max_pairs=8, chunk_units=4, top_k=1
    )
    reference = A.attribute(study, lm, "atp", None, config, ["actor"])
    real, calls = A._atp_chunk, []

    def dies_after_one(*args: Any, **kwargs: Any) -> Any:
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "_atp_chunk", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        A.attribute(study, lm, "atp", tmp_path / "run", config, ["actor"])
    assert not (tmp_path / "run" / "manifest.json").exists()
    monkeypatch.setattr(A, "_atp_chunk", real)
    resumed = A.attribute(study, lm, "atp", tmp_path / "run", config, ["actor"])
    assert resumed.manifest["counts"]["resumed_units"] == 4
    pd.testing.assert_frame_equal(resumed.attributed, reference.attributed)
    pd.testing.assert_frame_equal(resumed.attribution, reference.attribution)
    for name in ("attribution", "attributed", "repatched", "agreement", "manifest"):
        assert any((tmp_path / "run").glob(f"{name}.*")), name
    assert (tmp_path / "run" / "repatch").is_dir()
    # kl (to the source) and log-odds: a span patch at block 0 moves the target towards the source
    for metric in ("kl", "log_odds"):
        t = A.attribute(
            study, lm, "atp", None, dataclasses.replace(config, metric=metric, top_k=0), ["actor"]
        ).attribution
        ne = t[(t["statistic"] == "normalized_effect") & (t["position"] == "span_mean")]
        assert (ne["score"] > 0.1).all(), (metric, ne)


def test_bad_input(organism: tuple[Any, LoadedModel], tmp_path: Path) -> None:
    study, lm = organism
    r = dataclasses.replace
    cases: list[tuple[str, A.AttributionConfig, list[str] | None, str]] = [
        ("shap", ATP, None, "unknown method"),
        ("ig", r(IG, metric="kl"), None, "not offered"),
        ("ig", r(IG, baselines=("mean",)), None, "baseline"),
        ("ig", r(IG, integration="riemann_left", n_steps=1), None, "step"),
        ("ig", r(IG, integration="simpson"), None, "integration method"),
        ("atp", r(ATP, positions=("middle",)), ["actor"], "position"),
        ("atp", r(ATP, sites=("blocks.9.hook_resid_pre",)), ["actor"], "site"),
        ("atp", r(ATP, directions=("sideways",)), ["actor"], "direction"),
        ("atp", ATP, ["budget"], "not in the study"),
        ("atp", ATP, ["age"], "alone"),
        ("atp", r(ATP, questions=("weather",)), ["actor"], "unknown question"),
        ("atp", r(ATP, questions=("cinema_funding",)), ["party"], "ordinal values"),
        ("atp", r(ATP, metric="log_odds", options=("Good", "Great")), ["actor"], "Great"),
        ("atp", r(ATP, patching=(str(tmp_path / "none"),)), ["actor"], "patching run"),
        ("atp", r(ATP, max_pairs=0), ["actor"], "max_pairs"),
    ]
    for method, config, factors, words in cases:
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        with pytest.raises(WorkbenchError, match=words) as err:
            A.attribute(study, lm, method, out, config, factors)
        assert err.value.fix and err.value.exit_code == 2, words
        assert not out.exists(), words  # raised before anything was computed or written
    with pytest.raises(StudyError):
        A.attribute(study, lm, "atp", None, ATP, ["age"])


def test_cli(small_organism: Path, tmp_path: Path) -> None:
    from workbench.cli import main

    common = [str(small_organism / "study.yaml"), "--model", str(small_organism / "model"),
              "--device", "cpu", "--quiet"]  # fmt: skip
    out = tmp_path / "ig"
    code = main(["attribute", *common, "--method", "ig", "--factor", "actor,title",
                 "--prompts", "2", "--steps", "8", "--baseline", "counterfactual,pad",
                 "--out", str(out)])  # fmt: skip
    assert code == 0 and (out / "manifest.json").exists()
    table = pd.read_parquet(out / "attribution.parquet")
    assert set(table["baseline"]) == {"counterfactual", "pad"}
    assert set(COLUMNS) <= set(table.columns)
    bad = tmp_path / "bad"
    code = main(["attribute", *common, "--method", "atp", "--factor", "actor,age",
                 "--out", str(bad)])  # fmt: skip
    assert code == 2 and not bad.exists()
