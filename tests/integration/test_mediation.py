"""Mediation on the small model organism (issue 11, parts 2 and 3).

- Planted truth: removing the actor probe's subspace (7 dims: its centred class patterns) at
  hook_embed over the actor span removes >= 50% of the actor effect, both by projection and
  by mean ablation, on the mean TV between prompts differing in the actor alone and on the
  AMCE of the expected score; random subspaces of the same dimension remove <= 10%.
- Resume after a killed run, and the errors for a factor or site the directions lack.

Measured on the small organism (seed 0, 96 pairs): probe subspace 0.83-0.97 (project /
mean_ablate, TV / AMCE), random 0.03.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from workbench.engine.models import load_model
from workbench.errors import WorkbenchError
from workbench.interp import intervene as IV
from workbench.interp import mediation as MD
from workbench.interp.activations import ActivationConfig, capture_activations
from workbench.interp.directions import ProbeRun
from workbench.interp.probe_study import ProbeConfig, ProbeSpec
from workbench.interp.probing import run_probes
from workbench.study.load import load_study

CONFIG = MD.MediateConfig(
    factor="actor",
    site="hook_embed",
    positions="span",
    questions=("rating",),
    max_pairs=96,
    n_random=2,
    n_boot=200,
    progress=False,
)


@pytest.fixture(scope="module")
def setup(small_organism: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The organism's study and model, and a probe run of the actor (span_mean, hook_embed)."""
    out = tmp_path_factory.mktemp("mediation")
    study = load_study(small_organism / "study.yaml")
    lm = load_model(small_organism / "model", dtype="float32", device="cpu")
    acts = capture_activations(
        study,
        lm,
        out / "activations",
        ActivationConfig(
            sites=("hook_embed",),
            positions=("span_mean",),
            factors=("actor",),
            questions=("rating",),
            store_dtype="float32",
            batch_size=64,
            progress=False,
        ),
        log=lambda _: None,
    )
    probes = ProbeConfig(
        name="mediation-test",
        probes=(ProbeSpec("actor", ("span_mean:actor",)),),
        sites=("hook_embed",),
        questions=("rating",),
        group_by="title",
        controls=("shuffled",),
        opinion=None,
    )
    run_probes(acts, probes, out / "probes")
    return study, lm, out / "probes"


def test_actor_subspace_mediates_the_actor_effect(setup: Any) -> None:
    study, lm, probes = setup
    result = MD.mediate(study, lm, probes, CONFIG)
    t = result.mediation
    assert set(t["effect"]) == {"mean_tv", "amce"} and set(t["method"]) == set(MD.METHODS)
    assert (t["n_dims"] == 7).all()
    probe, random = t[t["subspace"] == "probe"], t[t["subspace"] == "random"]
    assert (probe["share_mediated"] >= 0.5).all(), probe
    assert (random["share_mediated"].abs() <= 0.1).all(), random
    assert (t["ci_low"] <= t["share_mediated"]).all() and (
        t["share_mediated"] <= t["ci_high"]
    ).all()
    assert (t["effect_before"] > 0.3).all()


def test_resume_after_a_killed_run(
    setup: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, lm, probes = setup
    config = MD.MediateConfig(**{**CONFIG.__dict__, "max_pairs": 16, "n_random": 1})
    fresh = MD.mediate(study, lm, probes, config)
    real, calls = IV.forwards, {"n": 0}

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 3:  # the unedited forward, then two ablations
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(IV, "forwards", dying)
    with pytest.raises(KeyboardInterrupt):
        MD.mediate(study, lm, probes, config, tmp_path / "run")
    monkeypatch.setattr(IV, "forwards", real)
    resumed = MD.mediate(study, lm, probes, config, tmp_path / "run")
    assert (tmp_path / "run" / "manifest.json").exists()
    cols = ["method", "subspace", "effect", "effect_after", "share_mediated"]
    assert resumed.mediation[cols].equals(fresh.mediation[cols])


def test_bad_input(setup: Any) -> None:
    study, lm, probes = setup
    run = ProbeRun.open(probes)
    for config, fix in [
        (MD.MediateConfig(factor="genre", site="hook_embed"), "use one of its targets"),
        (MD.MediateConfig(factor="actor", site="blocks.0.hook_resid_post"), "--site one of"),
        (MD.MediateConfig(factor="actor", site="hook_embed", methods=("zero",)), "project"),
    ]:
        with pytest.raises(WorkbenchError) as err:
            MD.mediate(study, lm, run, config)
        assert fix in err.value.fix, (config, err.value)
