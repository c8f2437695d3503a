"""The model organism: build, files, truth recovery, zero-effect factors, held-out titles,
determinism, the planted preamble, and the real pipeline checked against a plain HF forward.

One small-scale organism is built per session (read-only) and scored once with the real
pipeline (`workbench.measure.distributions.compute_distributions`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from transformers import AutoModelForCausalLM, AutoTokenizer

from workbench.organism import build as O
from workbench.organism.world import ATTITUDE, RATING, World, true_distribution

SMALL_JS_BOUND = 0.05
"""The issue's held-out-title bound, met by the small scale too (seed 0: about 0.024; the
default scale: about 0.01, measured by scripts/bench_organism.py)."""


@pytest.fixture(scope="session")
def organism_dir(small_organism: Path) -> Path:
    """The session's small-scale organism (shared with the other suites: one build). Read-only.
    CI starts with an empty cache, so there it is built fresh by this code."""
    return small_organism


@pytest.fixture(scope="session")
def spec(organism_dir: Path) -> dict[str, Any]:
    return dict(json.loads((organism_dir / O.SPEC_FILE).read_text()))


@pytest.fixture(scope="session")
def scored(organism_dir: Path) -> Any:
    """The organism's study scored by the real pipeline, float32 on CPU."""
    from workbench.engine.models import load_model
    from workbench.measure.distributions import DistributionConfig, compute_distributions
    from workbench.study.load import load_study

    study = load_study(organism_dir / O.STUDY_FILE)
    lm = load_model(organism_dir / O.MODEL_DIR, dtype="float32", device="cpu")
    return compute_distributions(study, lm, None, DistributionConfig(batch_size=64, progress=False))


@pytest.fixture(scope="session")
def quality(organism_dir: Path, scored: Any) -> O.OrganismQuality:
    return O.organism_quality(
        organism_dir, scored.prompts, scored.distributions, scored.prompt_stats
    )


# --------------------------------------------------------------------------------------------
# files


def test_files_written(organism_dir: Path, spec: dict[str, Any]) -> None:
    for name in O.ARTIFACTS:
        assert (organism_dir / name).exists(), name
    assert spec["config_hash"] == O.organism_config(0, "small").hash()
    assert spec["weights_sha256"] == O._sha256(organism_dir / O.MODEL_DIR / "model.safetensors")
    effects = spec["effects"][RATING]
    assert set(effects["zero_effect"]) >= {"title", "region"}
    assert len(effects["actor"]) >= 6 and len(effects["taste"]) >= 3
    assert spec["preamble"]["share"] == pytest.approx(0.3)
    for name, factor in spec["factors"]["persona"].items():
        assert len(factor["values"]) >= 3, name


def test_model_loads_with_plain_hf(organism_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(organism_dir / O.MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(organism_dir / O.MODEL_DIR)
    assert model.config.model_type == "llama"
    assert (organism_dir / O.MODEL_DIR / "model.safetensors").is_file()
    # The planted first token and every label are single tokens; BOS comes first.
    for text in (" Sure", " 1", " 5", "3", " A", " D", "B"):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1, text
    assert tok("Answer:")["input_ids"][0] == tok.bos_token_id


def test_truth_table(organism_dir: Path) -> None:
    truth = pd.read_parquet(organism_dir / O.TRUTH_FILE)
    cols = {"question_id", "option_id", "prob", "prob_text", "held_out", *O.FACTOR_NAMES}
    assert cols <= set(truth.columns)
    sums = truth.groupby(O.truth_key(truth))[["prob", "prob_text"]].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-9)
    attitude = truth[truth["question_id"] == ATTITUDE]
    assert attitude[["title", "actor", "genre"]].isna().all().all()  # persona-only item
    assert attitude["is_refusal"].sum() == attitude["persona_id"].nunique()
    rating = truth[truth["question_id"] == RATING]
    assert rating["held_out"].any() and (~rating["held_out"]).any()
    assert rating["party"].isna().any()  # coarse personas are asked


def test_study_file_is_a_valid_study(organism_dir: Path, scored: Any) -> None:
    from workbench.study.load import load_study

    study = load_study(organism_dir / O.STUDY_FILE)
    assert study.template.format == "plain" and study.scoring.method == "next_token"
    truth = pd.read_parquet(organism_dir / O.TRUTH_FILE)
    # Every prompt of the pipeline has its truth, and nothing in truth is left unasked.
    prompt_keys = set(O.truth_key(scored.prompts))
    assert prompt_keys == set(O.truth_key(truth))


# --------------------------------------------------------------------------------------------
# the world (no model)


def test_truth_ignores_title_and_region() -> None:
    w = World()
    base: dict[str, str | None] = {
        "age": "30-44",
        "party": "Democrat",
        "region": "South",
        "favourite_genre": w.favourite_genres[0],
        "title": "Silver Harbor",
        "actor": w.actors[0],
        "genre": w.genres[0],
    }
    p = true_distribution(w, RATING, base)
    for change in ({"title": "Paper Tide"}, {"region": "West"}, {"age": "65+"}):
        np.testing.assert_array_equal(true_distribution(w, RATING, {**base, **change}), p)
    assert not np.allclose(true_distribution(w, RATING, {**base, "actor": w.actors[-1]}), p)
    assert not np.allclose(true_distribution(w, RATING, {**base, "genre": w.genres[1]}), p)


def test_coarse_truth_is_the_weighted_mixture() -> None:
    w = World()
    cell: dict[str, str | None] = {
        "age": None,
        "party": "Republican",
        "region": None,
        "favourite_genre": None,
        "title": None,
        "actor": None,
        "genre": None,
    }
    expected = sum(
        wa * wf * _fine_attitude(w, "Republican", age)
        for age, wa in zip(w.ages, w.age_weights, strict=True)
        for wf in w.favourite_genre_weights
    )
    np.testing.assert_allclose(true_distribution(w, ATTITUDE, cell), expected, atol=1e-12)


def _fine_attitude(w: World, party: str, age: str) -> np.ndarray:
    s = w.party_attitude_effects[w.parties.index(party)] + w.age_attitude_effects[w.ages.index(age)]
    e = np.exp([s, 0.0, -s, w.refusal_score])
    return np.asarray(e / e.sum())


# --------------------------------------------------------------------------------------------
# quality


def test_truth_recovery_on_held_out_titles(quality: O.OrganismQuality) -> None:
    assert quality.js_held_out <= SMALL_JS_BOUND, quality
    assert quality.js_coarse <= SMALL_JS_BOUND, quality
    assert quality.js_attitude <= SMALL_JS_BOUND, quality
    assert quality.refusal_error <= 0.02, quality


def test_zero_effect_factors_move_nothing_beyond_noise(quality: O.OrganismQuality) -> None:
    tv, truth = quality.factor_tv, quality.truth_factor_tv
    assert truth["title"] == 0.0 and truth["region"] == 0.0
    for factor in ("title", "region"):
        # Far below the extraction's own error, and far below the effect of a real factor.
        assert tv[factor] <= 0.5 * quality.tv_error, quality
        assert tv[factor] <= 0.05 * tv["actor"], quality
    assert tv["actor"] == pytest.approx(truth["actor"], abs=0.05)


def test_planted_first_token(organism_dir: Path, quality: O.OrganismQuality) -> None:
    assert quality.first_token_mass == pytest.approx(0.3, abs=0.03)


def test_planted_preamble_answer_is_sharpened(organism_dir: Path, scored: Any) -> None:
    """After "Sure! I'd give it a" the label follows prob^(1/T), not prob (teacher forcing)."""
    model = AutoModelForCausalLM.from_pretrained(organism_dir / O.MODEL_DIR, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(organism_dir / O.MODEL_DIR)
    planted = O.organism_config(0, "small").planted
    truth = pd.read_parquet(organism_dir / O.TRUTH_FILE)
    prompts = scored.prompts[scored.prompts["question_id"] == RATING].head(24)
    labels = [tok(f" {k}", add_special_tokens=False)["input_ids"][0] for k in range(1, 6)]
    texts = [t + planted.preamble(RATING) for t in prompts["prompt"]]
    ids = [tok(t)["input_ids"] for t in texts]
    # Right padding: causal attention keeps padding from touching the real positions.
    x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, seq in enumerate(ids):
        x[i, : len(seq)] = torch.tensor(seq)
    with torch.no_grad():
        logits = model(x).logits[torch.arange(len(ids)), torch.tensor([len(s) - 1 for s in ids])]
    p = torch.softmax(logits.float(), -1)[:, labels].numpy()
    p /= p.sum(-1, keepdims=True)
    rows = prompts.merge(pd.DataFrame({"option_id": range(5)}), how="cross")
    true = O.attach_truth(rows, truth)["true_prob"].to_numpy().reshape(-1, 5)
    sharp = np.stack([planted.sharpen(t) for t in true])
    js_sharp = [jensenshannon(a, b, base=2) for a, b in zip(p, sharp, strict=True)]
    js_plain = [jensenshannon(a, b, base=2) for a, b in zip(p, true, strict=True)]
    assert np.mean(js_sharp) < np.mean(js_plain)
    assert np.mean(js_sharp) <= 0.08


def test_pipeline_matches_plain_hf_forward(organism_dir: Path, scored: Any) -> None:
    """The workbench's option log-probs equal a plain HF forward: full-vocab log-softmax in
    float32 at the last prompt token, " k" and "k" summed in probability space."""
    model = AutoModelForCausalLM.from_pretrained(organism_dir / O.MODEL_DIR, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(organism_dir / O.MODEL_DIR)
    picked = scored.prompts.groupby("question_id").head(6)
    for _, row in picked.iterrows():
        with torch.no_grad():
            logits = model(torch.tensor([list(row["input_ids"])])).logits[0, -1].float()
        logp = torch.log_softmax(logits, -1)
        dist = scored.distributions[scored.distributions["prompt_id"] == row["prompt_id"]]
        for _, opt in dist.iterrows():
            ids = [
                tok(v.format(opt["label"]), add_special_tokens=False)["input_ids"][0]
                for v in (" {}", "{}")
            ]
            expected = float(torch.logsumexp(logp[ids], 0))
            assert opt["logprob"] == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------------------------
# held-out titles, determinism, cache


def test_held_out_titles_never_in_training_text(organism_dir: Path, spec: dict[str, Any]) -> None:
    import hashlib

    held = spec["factors"]["stimulus"]["title"]["held_out"]
    seen = spec["factors"]["stimulus"]["title"]["seen_in_study"]
    texts = list(O.read_corpus(organism_dir))
    digest = hashlib.sha256("".join(json.dumps(t) + "\n" for t in texts).encode()).hexdigest()
    assert digest == spec["training"]["corpus_sha256"]
    corpus = "\n".join(texts)
    assert held and all(title not in corpus for title in held)
    assert seen and all(title in corpus for title in seen)  # the check can fail
    truth = pd.read_parquet(organism_dir / O.TRUTH_FILE)
    assert set(truth.loc[truth["held_out"], "title"]) == set(held)


def test_build_is_deterministic(tmp_path: Path) -> None:
    """Two builds with the same seed give byte-identical weights (a shortened training keeps
    the test fast: tokenizer, sampling, initialisation and optimiser are all exercised)."""
    base = O.organism_config(0, "small")
    short = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=8))
    a = O.build_organism(tmp_path / "a", config=short, progress=False)
    b = O.build_organism(tmp_path / "b", config=short, progress=False)
    other = O.build_organism(
        tmp_path / "c", config=dataclasses.replace(short, seed=1), progress=False
    )

    def sha(folder: Path) -> str:
        return str(json.loads((folder / O.SPEC_FILE).read_text())["weights_sha256"])

    assert sha(a) == sha(b)
    assert sha(a) != sha(other)
    for name in (O.TRUTH_FILE, O.CORPUS_FILE, O.STUDY_FILE, O.DESIGN_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_cache_reuse(
    organism_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: dict[str, Any]
) -> None:
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    assert O.organism_cache_dir() == tmp_path / "cache"
    cached = tmp_path / "cache" / f"organism-{spec['config_hash']}"
    shutil.copytree(organism_dir, cached)
    mtime = (cached / O.SPEC_FILE).stat().st_mtime_ns
    assert O.build_organism(scale="small", seed=0, progress=False) == cached
    assert (cached / O.SPEC_FILE).stat().st_mtime_ns == mtime  # reused, not rebuilt
    # An explicit folder holding the same organism is reused too.
    assert O.build_organism(cached, scale="small", seed=0, progress=False) == cached


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    from workbench.errors import WorkbenchError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(WorkbenchError, match="not an organism folder"):
        O.build_organism(tmp_path, scale="small", progress=False)
