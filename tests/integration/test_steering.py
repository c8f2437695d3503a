"""Probe -> steer -> measure on the small model organism (issue 11, parts 1, 3 and 5).

- Exactness: at alpha 0 every number equals the unsteered run (shift, TV, option mass and
  neutral-text changes exactly 0), and the unsteered answer equals a plain HF forward (1e-6).
- The refitted probe (how the shuffled-label placebo is made) equals the stored weights, which
  pins the class order and the rows.
- Planted truth: steering along the actor direction (activation pattern, at the actor span of
  hook_embed) towards Mara Quinlan closes >= 50% of the TV to her distribution at some alpha,
  while norm-matched random directions close less than a fifth as much there; steering along
  region (decodable, no planted effect) moves the rating no more than the random placebo.
- Resume after a killed run, the CLI's parser, and every bad input's error.

Measured on the small organism (seed 0, 48 prompts): closure 0.87 at alpha 2 (random <= 0);
region's largest mean TV 0.003 against random's 0.002 (the actor's own effect: 0.35).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from workbench.engine.models import LoadedModel, load_model
from workbench.errors import WorkbenchError
from workbench.interp import intervene as IV
from workbench.interp import steering as ST
from workbench.interp.activations import ActivationConfig, capture_activations
from workbench.interp.directions import ProbeRun
from workbench.interp.probe_study import ProbeConfig, ProbeSpec
from workbench.interp.probing import run_probes
from workbench.interp.readers import reader
from workbench.study import prompts as P
from workbench.study.load import load_study

PROBES = ProbeConfig(
    name="steering-test",
    probes=(
        ProbeSpec("actor", ("span_mean:actor",)),
        ProbeSpec("region", ("span_mean:region",)),
    ),
    sites=("hook_embed", "blocks.0.hook_resid_post"),
    questions=("rating",),
    group_by="title",
    controls=("shuffled",),
    opinion=None,
)
ALPHAS = (0.0, 1.0, 1.5, 2.0, 3.0)


def probe_run(small_organism: Path, out: Path) -> tuple[Any, LoadedModel, Path]:
    """The organism's study and model, and a probe run of actor and region (span_mean)."""
    study = load_study(small_organism / "study.yaml")
    lm = load_model(small_organism / "model", dtype="float32", device="cpu")
    acts = capture_activations(
        study,
        lm,
        out / "activations",
        ActivationConfig(
            sites=PROBES.sites,
            positions=("span_mean",),
            factors=("actor", "region"),
            questions=("rating",),
            store_dtype="float32",
            batch_size=64,
            progress=False,
        ),
        log=lambda _: None,
    )
    run_probes(acts, PROBES, out / "probes")
    return study, lm, out / "probes"


@pytest.fixture(scope="module")
def setup(small_organism: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return probe_run(small_organism, tmp_path_factory.mktemp("steering"))


def _config(probe: str, **kw: Any) -> ST.SteerConfig:
    base: dict[str, Any] = {
        "probe": probe,
        "site": "hook_embed",
        "positions": "span",
        "alphas": ALPHAS,
        "max_prompts": 48,
        "n_boot": 200,
        "progress": False,
    }
    return ST.SteerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def actor(setup: Any) -> ST.SteerResult:
    study, lm, probes = setup
    return ST.steer(study, lm, probes, _config("actor:Mara Quinlan"))


def _wide(result: ST.SteerResult, metric: str) -> Any:
    t = result.steering
    t = t[(t["metric"] == metric) & (t["role"] == "on_target")]
    return t.pivot_table(index="direction", columns="alpha", values="value")


def test_alpha_zero_is_the_unsteered_run(setup: Any, actor: ST.SteerResult) -> None:
    study, lm, _ = setup
    rows = actor.steered[actor.steered["alpha"] == 0.0]
    for col in ("score_shift", "tv_unsteered", "option_mass_change"):
        assert (rows[col] == 0.0).all(), col
    assert (rows["tv_target"] == rows["tv_target0"]).all()
    neutral = actor.neutral[actor.neutral["alpha"] == 0.0]
    assert (neutral["neutral_logprob_change"] == 0.0).all()
    # ... and the unsteered answer is the plain HF forward's.
    by_id = {p.prompt_id: p for p in P.render(study, lm.tokenizer)}
    probe_rows = rows[rows["kind"] == "probe"].head(4)
    for pid, score, probs in zip(
        probe_rows["prompt_id"], probe_rows["expected_score"], probe_rows["probs"], strict=True
    ):
        p = by_id[int(pid)]
        with torch.inference_mode():
            logits = lm.model(input_ids=torch.tensor([p.input_ids])).logits[0, -1].float()
        (plain,) = IV.read(torch.log_softmax(logits, -1)[None], [reader(study, lm, p)], "sum")
        assert abs(plain.score - score) < 1e-6
        assert max(abs(a - b) for a, b in zip(plain.probs, probs, strict=True)) < 1e-6


def test_refitted_probe_equals_the_stored_one(setup: Any) -> None:
    study, _, probes = setup
    run = ProbeRun.open(probes)
    key = run.resolve("actor", "hook_embed", None, "span")
    stored, refit = run.matrix(key, "stored"), run.matrix(key, "none")
    cos = torch.nn.functional.cosine_similarity(stored, refit, dim=0)
    assert float(cos.min()) > 0.999, cos
    assert run.classes(key) == sorted(study.factor("actor").values)


def test_actor_steering_recovers_the_planted_truth(actor: ST.SteerResult) -> None:
    closure = _wide(actor, "target_closure")
    probe = closure.loc["actor:Mara Quinlan"]
    best = float(probe.idxmax())
    assert probe[best] >= 0.5, probe
    random = closure[[d.startswith("random:") for d in closure.index]]
    assert float(random[best].mean()) < 0.2 * probe[best], random[best]
    # selectivity rows exist beside every alpha but 0, with intervals
    sel = actor.steering[actor.steering["metric"] == "selectivity"]
    assert sorted(sel["alpha"]) == sorted(a for a in ALPHAS if a != 0)
    assert (sel["ci_low"] <= sel["value"]).all() and (sel["value"] <= sel["ci_high"]).all()
    kinds = set(actor.steering["kind"])
    assert kinds == {"probe", "random", "shuffled", "other_factor"}
    assert actor.manifest["norm_scale"] > 0


def test_region_moves_the_rating_no_more_than_random(setup: Any) -> None:
    study, lm, probes = setup
    result = ST.steer(study, lm, probes, _config("region:West", placebos=("random",)))
    tv = _wide(result, "tv_unsteered")
    region = tv.loc["region:West"]
    random = tv[[d.startswith("random:") for d in tv.index]].max()
    assert (region <= random + 0.005).all(), (region, random)
    assert float(region.max()) < 0.02


def test_resume_after_a_killed_run(
    setup: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, lm, probes = setup
    config = _config("actor:Mara Quinlan", alphas=(0.0, 2.0), max_prompts=8, n_random=1)
    fresh = ST.steer(study, lm, probes, config)
    real, calls = IV.forwards, {"n": 0}

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 2 + 2 * 2:  # unsteered + twins, then two directions of two alphas
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(IV, "forwards", dying)
    with pytest.raises(KeyboardInterrupt):
        ST.steer(study, lm, probes, config, tmp_path / "run")
    monkeypatch.setattr(IV, "forwards", real)
    resumed = ST.steer(study, lm, probes, config, tmp_path / "run")
    assert resumed.manifest["counts"]["resumed_directions"] == 2
    assert (tmp_path / "run" / "manifest.json").exists()
    assert (tmp_path / "run" / "steering.png").exists()
    cols = ["direction", "alpha", "prompt_id", "expected_score", "tv_target"]
    assert resumed.steered[cols].equals(fresh.steered[cols])


def test_bad_input(setup: Any) -> None:
    study, _, probes = setup
    cases = [
        (_config("actor:Mara Quinlan", alphas=(1.0, 2.0)), "add 0 to --alphas"),
        (_config("genre:comedy"), "use one of its targets"),
        (_config("actor:Nobody"), "Mara Quinlan"),
        (_config("actor"), "actor:CLASS"),
        (_config("actor:Mara Quinlan", site="blocks.1.hook_resid_post"), "--site one of"),
        (_config("actor:Mara Quinlan", positions="middle"), "span, answer, all"),  # type: ignore[arg-type]
    ]
    for config, fix in cases:
        with pytest.raises(WorkbenchError) as err:
            ST.preflight(study, config, probes)
        assert fix in err.value.fix, (config, err.value)


def test_cli_refuses_bad_alphas_before_loading_a_model(
    setup: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from workbench.cli import main

    study, _, probes = setup
    code = main(
        [
            "steer",
            str(study.path),
            "--model",
            str(tmp_path / "no-such-model"),
            "--directions",
            str(probes),
            "--probe",
            "actor:Mara Quinlan",
            "--site",
            "hook_embed",
            "--alphas",
            "1,2",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    # exit 2 (bad input), not 3: the model was never loaded
    assert code == 2
    assert "no 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
