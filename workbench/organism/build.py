"""The planted-trait model organism: a small causal LM trained on a world whose truth we wrote.

No method that reads traits out of a model (probes, patching, attribution, steering) can be
trusted until it has recovered a known truth. `build_organism` trains a tiny Llama in about a
minute on two CPU cores on the "unseen movies" world:

- stimulus factors: movie `title` (generated; some titles are *held out*: they never appear
  in any training text, the tokenizer's included), `actor`, `genre`;
- persona factors: `age`, `party`, `region`, `favourite_genre`;
- `rating` (1-5, ordered logit): strong actor effect, moderate favourite-genre x movie-genre
  interaction (with weak main effects of both genres), weak party effect; title, region and
  age have exactly zero effect;
- `cinema_funding` (agree / neutral / disagree + "Don't know"): persona only, strong party
  effect, weak age effect;
- coarse personas (persona factors left out of the prompt) are trained towards, and scored
  against, the population-weighted mixture of their subgroups (weights in the study file);
- a share of answers starts with a preamble ("Sure! I'd give it a 4."), so the first token
  and the answer in generated text differ in a planted, documented way (`Planted`).

The world and its truth live in `workbench.organism.world`, the training in
`workbench.organism.train`; this module builds, caches and scores.

The folder it writes (file names are the constants below):

    model/            HF folder (Llama, safetensors) + locally trained tokenizer
    study.yaml        the study that queries the organism (+ design.csv, its cells)
    truth.parquet     true distribution per asked cell, question and option
    corpus.jsonl.gz   every training text (the held-out-title check reads it)
    organism.json     world, effects, planted preamble rule, config, hashes; written last

Training (distillation of the planted rule, see `workbench.organism.train`) renders its prompts
through `workbench.study.prompts.render` with the same study template, so training and evaluation
prompts are byte-identical for the same cell.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from workbench.compare.metrics import js_distance, total_variation
from workbench.errors import WorkbenchError
from workbench.organism.train import TrainConfig
from workbench.organism.world import (
    FACTOR_NAMES,
    Planted,
    Titles,
    World,
    make_titles,
    render_texts,
    study_cells,
    study_dict,
    true_distribution,
)
from workbench.runs import cache_root
from workbench.study.spec import Study

if TYPE_CHECKING:
    import pandas as pd

Scale = Literal["small", "default"]

ORGANISM_VERSION = 1
"""Bump when the world, the training or the folder layout changes: it is part of the cache key."""

MODEL_DIR = "model"
SPEC_FILE = "organism.json"
TRUTH_FILE = "truth.parquet"
STUDY_FILE = "study.yaml"
DESIGN_FILE = "design.csv"
CORPUS_FILE = "corpus.jsonl.gz"
ARTIFACTS = (MODEL_DIR, SPEC_FILE, TRUTH_FILE, STUDY_FILE, DESIGN_FILE, CORPUS_FILE)

# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class OrganismConfig:
    """Everything a build depends on; its hash names the cache folder."""

    seed: int = 0
    scale: Scale = "default"
    n_train_titles: int = 160
    n_held_out_titles: int = 3
    """Titles in the study that never appear in training text."""
    n_seen_titles: int = 1
    """Training titles also asked in the study (for seen vs held-out comparisons)."""
    n_base_personas: int = 8
    """Fine personas in the study: each base persona is asked from two regions."""
    coarse: tuple[tuple[str, ...], ...] = (("party",), ("favourite_genre",), ("age",), ())
    """Coarse personas in the study: every value combination of each listed factor set, all
    other persona factors unspecified (`()` = nothing specified)."""
    preamble_share: float = 0.3
    preamble_temperature: float = 0.5
    world: World = field(default_factory=World)
    train: TrainConfig = field(default_factory=lambda: _train_config("default"))

    @property
    def planted(self) -> Planted:
        return Planted(self.preamble_share, self.preamble_temperature)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def hash(self) -> str:
        payload = json.dumps({"version": ORGANISM_VERSION, **self.to_json()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _train_config(scale: Scale) -> TrainConfig:
    if scale == "small":
        # The same model, trained shorter on fewer cells (the study is smaller too).
        return TrainConfig(steps=400, pool_size=6000)
    return TrainConfig()


def organism_config(seed: int = 0, scale: Scale = "default") -> OrganismConfig:
    """The configuration of a named scale (`small` is for tests: same world, smaller model)."""
    if scale not in ("small", "default"):
        raise WorkbenchError(f"unknown organism scale {scale!r}", fix="use small or default")
    if scale == "small":
        return OrganismConfig(
            seed=seed,
            scale=scale,
            n_train_titles=60,
            n_held_out_titles=2,
            n_base_personas=4,
            coarse=(("party",), ()),
            train=_train_config(scale),
        )
    return OrganismConfig(seed=seed, scale=scale, train=_train_config(scale))


def organism_cache_dir() -> Path:
    """Where cached organisms live: $WORKBENCH_CACHE, else ~/.cache/workbench."""
    return cache_root()


def write_study(folder: Path, config: OrganismConfig, titles: Titles) -> Path:
    """Write study.yaml and design.csv into `folder`; return the study path."""
    import pandas as pd
    import yaml

    cells = study_cells(config, titles)
    frame = pd.DataFrame([[c[n] or "" for n in FACTOR_NAMES] for c in cells], columns=FACTOR_NAMES)
    frame.to_csv(folder / DESIGN_FILE, index=False)
    path = folder / STUDY_FILE
    raw = study_dict(config, titles, design_path=DESIGN_FILE, version=ORGANISM_VERSION)
    text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=100)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# truth


def truth_frame(
    study: Study, world: World, planted: Planted, held_out: Sequence[str]
) -> pd.DataFrame:
    """`truth.parquet`: one row per (distinct prompt cell, question, option).

    Cells are the ones `workbench.study.prompts.render` asks (canonical order), so factors a
    question does not use are null exactly as in the pipeline's prompts table.
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    held = set(held_out)
    for prompt in render_texts(study):
        if prompt.permutation != 0:
            continue
        question = next(q for q in study.questions if q.id == prompt.question_id)
        prob = true_distribution(world, question.id, prompt.factors)
        text = planted.text_distribution(prob)
        for option_id, option in enumerate(question.all_options):
            rows.append(
                {
                    "persona_id": prompt.persona_id,
                    **{n: prompt.factors.get(n) for n in FACTOR_NAMES},
                    "question_id": question.id,
                    "option_id": option_id,
                    "option": option,
                    "is_refusal": option_id >= len(question.options),
                    "prob": float(prob[option_id]),
                    "prob_text": float(text[option_id]),
                    "held_out": prompt.factors.get("title") in held,
                }
            )
    frame = pd.DataFrame(rows)
    for n in FACTOR_NAMES:
        frame[n] = frame[n].astype("string")
    return frame


def truth_key(frame: pd.DataFrame) -> pd.Series:
    """A string key (question and every factor, `*` for null) to join truth onto prompts."""
    parts = [frame["question_id"].astype(str)]
    for n in FACTOR_NAMES:
        parts.append(n + "=" + frame[n].astype("string").fillna("*"))
    key = parts[0]
    for p in parts[1:]:
        key = key + "|" + p
    return key


def attach_truth(frame: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Add `true_prob`, `true_prob_text` and `held_out` to rows with question_id, option_id and
    the factor columns (e.g. a prompts table merged with a distributions table)."""
    t = truth.assign(_key=truth_key(truth))[
        ["_key", "option_id", "prob", "prob_text", "held_out"]
    ].rename(columns={"prob": "true_prob", "prob_text": "true_prob_text"})
    out = frame.assign(_key=truth_key(frame)).merge(t, on=["_key", "option_id"], how="left")
    return out.drop(columns="_key")


# --------------------------------------------------------------------------------------------
# build


def build_organism(
    out: str | Path | None = None,
    *,
    seed: int = 0,
    scale: Scale = "default",
    progress: bool = True,
    force: bool = False,
    config: OrganismConfig | None = None,
) -> Path:
    """Build (or reuse) the model organism and return its folder.

    `out=None` uses `organism_cache_dir() / f"organism-{config hash}"`. A folder whose
    organism.json exists and records the same configuration hash is complete and reused
    (unless `force`). The build happens in a temporary sibling folder that is renamed at the
    end, so an interrupted build never leaves a folder that looks complete. `config`
    (experiments, tests) replaces the configuration that `seed` and `scale` name.
    """
    config = config or organism_config(seed, scale)
    key = config.hash()
    folder = Path(out) if out is not None else organism_cache_dir() / f"organism-{key}"
    folder = folder.expanduser()
    if not force and _is_complete(folder, key):
        return folder
    if folder.exists() and any(folder.iterdir()) and not (folder / SPEC_FILE).exists():
        unknown = sorted(p.name for p in folder.iterdir() if p.name not in ARTIFACTS)
        if unknown:
            raise WorkbenchError(
                f"{folder} is not empty and is not an organism folder (has {unknown[:3]})",
                fix="choose an empty or new --out folder",
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _build_into(tmp, config, progress=progress)
        if folder.exists():
            # The marker goes first and comes back last: a crash in between leaves a folder
            # that is rebuilt, never one that looks complete.
            for name in (SPEC_FILE, *ARTIFACTS):
                path = folder / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            for name in (*(a for a in ARTIFACTS if a != SPEC_FILE), SPEC_FILE):
                (tmp / name).rename(folder / name)
            tmp.rmdir()
        else:
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _is_complete(folder: Path, key: str) -> bool:
    spec = folder / SPEC_FILE
    if not spec.is_file():
        return False
    try:
        return bool(json.loads(spec.read_text())["config_hash"] == key)
    except (ValueError, KeyError):
        return False


def _log(progress: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if progress:
            print(f"[organism] {message}", flush=True)

    return log


def _build_into(folder: Path, config: OrganismConfig, *, progress: bool) -> None:
    from workbench.organism import train as T
    from workbench.runs import git_hash, versions, write_json
    from workbench.study.load import load_study

    log = _log(progress)
    t0 = time.time()
    timings: dict[str, float] = {}
    titles = make_titles(config)
    study = load_study(write_study(folder, config, titles))
    log(f"config {config.hash()} ({config.scale}); study: {len(study.cells)} cells")

    examples, continuations = T.training_examples(study, config, titles.train)
    corpus_sha = _write_corpus(folder / CORPUS_FILE, [e.text for e in examples] + continuations)
    timings["render"] = time.time() - t0

    result = T.train(folder / MODEL_DIR, study, examples, continuations, config, log=log)
    timings.update({f"train_{k}": v for k, v in result.timings.items()})

    t1 = time.time()
    truth = truth_frame(study, config.world, config.planted, titles.held_out)
    truth.to_parquet(folder / TRUTH_FILE, index=False)
    timings["truth"] = time.time() - t1
    timings["total"] = time.time() - t0

    spec = {
        "schema_version": ORGANISM_VERSION,
        "kind": "workbench model organism: unseen movies",
        "config_hash": config.hash(),
        "seed": config.seed,
        "scale": config.scale,
        "factors": {
            "persona": {
                n: {"values": list(v), "weights": list(config.world.persona_weights()[n])}
                for n, v in config.world.persona_values().items()
            },
            "stimulus": {
                "title": {
                    "train": list(titles.train),
                    "held_out": list(titles.held_out),
                    "seen_in_study": list(titles.seen),
                },
                "actor": list(config.world.actors),
                "genre": list(config.world.genres),
            },
        },
        "effects": config.world.effects_table(),
        "preamble": {
            "share": config.preamble_share,
            "first_token": config.planted.first_token,
            "texts": {q: t + " {label}." for q, t in config.planted.preambles},
            "temperature": config.preamble_temperature,
            "rule": (
                "At the answer position P(' Sure') = share and P(' <label k>') = "
                "(1 - share) * prob_k, so the first-token distribution renormalized over "
                "option tokens is prob. After the preamble the label follows "
                "prob^(1/temperature) renormalized; the generated-text answer therefore "
                "follows prob_text = (1 - share) * prob + share * sharpen(prob) "
                "(truth.parquet column prob_text)."
            ),
        },
        "truth": {
            "file": TRUTH_FILE,
            "prob": "planted answer distribution over all options (refusal included)",
            "prob_text": "distribution of the answer in generated text (preamble rule)",
            "coarse": "population-weighted mixture over unspecified persona factors",
            "held_out": "the row's title never appears in any training text",
        },
        "training": {
            "objective": (
                "distillation of the planted rule: cross-entropy of the next-token "
                "distribution at the answer position against the planted first-token "
                "distribution, plus the preamble continuation (soft target at its answer slot, "
                "hard targets on its other tokens, weight text_loss_weight)"
            ),
            "examples": len(examples),
            "corpus_file": CORPUS_FILE,
            "corpus_sha256": corpus_sha,
            **result.summary,
        },
        "config": config.to_json(),
        "weights_sha256": _sha256(folder / MODEL_DIR / "model.safetensors"),
        "files": {
            "model": MODEL_DIR,
            "study": STUDY_FILE,
            "design": DESIGN_FILE,
            "truth": TRUTH_FILE,
            "corpus": CORPUS_FILE,
        },
        "git_hash": git_hash(),
        "versions": versions(),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    # Written last: its presence marks a complete organism.
    write_json(folder / SPEC_FILE, spec)
    log(f"done in {timings['total']:.1f}s")


def _write_corpus(path: Path, texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    # mtime=0: the gzip header would otherwise carry the build time.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for text in texts:
            line = json.dumps(text) + "\n"
            h.update(line.encode())
            gz.write(line.encode())
    return h.hexdigest()


def read_corpus(folder: str | Path) -> Iterator[str]:
    """The training texts of an organism (every prompt and continuation trained on)."""
    with gzip.open(Path(folder) / CORPUS_FILE, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# quality: how well an extraction recovers the planted truth


@dataclass(frozen=True)
class OrganismQuality:
    """Extracted distributions scored against truth.parquet (canonical option order only:
    the organism is trained on it). JS = Jensen-Shannon distance, base 2, in [0, 1]."""

    js_held_out: float
    """Mean JS distance, rating question, prompts whose title never appeared in training."""
    js_seen: float
    """The same on the study's training titles."""
    js_coarse: float
    """Held-out titles, coarse personas only (truth = population-weighted mixture)."""
    js_attitude: float
    """Attitude item, substantive options renormalized (refusal excluded, as the pipeline)."""
    refusal_error: float
    """Mean |model - true| share of the refusal option among all attitude options."""
    tv_error: float
    """Mean total variation to truth, rating, held-out titles: the extraction's noise level."""
    factor_tv: dict[str, float]
    """Rating: mean TV between extracted distributions of prompts that differ in exactly this
    factor. Title and region (and age) have zero planted effect: their value is pure noise."""
    truth_factor_tv: dict[str, float]
    """The same computed on truth (exactly 0 for zero-effect factors)."""
    first_token_mass: float | None
    """Mean full-vocabulary probability of the planted first token (" Sure") at the answer
    position; planted value: the preamble share. None when not measured."""
    n_prompts: int


def organism_quality(
    folder: str | Path,
    prompts: pd.DataFrame,
    distributions: pd.DataFrame,
    prompt_stats: pd.DataFrame | None = None,
) -> OrganismQuality:
    """Score a distributions run of the organism's study against its truth.

    `prompts` needs prompt_id, question_id, permutation and the factor columns;
    `distributions` prompt_id, option_id, is_refusal and `logprob` (the raw aggregated
    log-probability of the option); `prompt_stats` (optional) top_tokens and top_probs.
    These are the tables of `workbench.measure.distributions.compute_distributions`.
    """
    import pandas as pd

    folder = Path(folder)
    truth = pd.read_parquet(folder / TRUTH_FILE)
    spec = json.loads((folder / SPEC_FILE).read_text())
    keep = ["prompt_id", "question_id", "permutation", *FACTOR_NAMES]
    rows = distributions[["prompt_id", "option_id", "is_refusal", "logprob"]].merge(
        prompts[keep], on="prompt_id"
    )
    rows = attach_truth(rows[rows["permutation"] == 0], truth)
    if rows["true_prob"].isna().any():
        raise ValueError("some prompts have no truth row: is this the organism's study?")
    rows = rows.sort_values(["prompt_id", "option_id"], kind="stable")

    rating = _per_prompt(rows[rows["question_id"] == "rating"])
    held = rating["held_out"]
    coarse = rating["cells"][[n for n in FACTOR_NAMES[:4]]].isna().any(axis=1).to_numpy()
    js = js_distance(rating["model"], rating["truth"])
    tv = total_variation(rating["model"], rating["truth"])

    attitude = _per_prompt(rows[rows["question_id"] == "cinema_funding"], substantive_only=False)
    sub = ~attitude["refusal"]
    js_att = js_distance(_renorm(attitude["model"][:, sub]), _renorm(attitude["truth"][:, sub]))
    refusal_error = np.abs(
        _renorm(attitude["model"])[:, ~sub].sum(-1) - attitude["truth"][:, ~sub].sum(-1)
    )

    first_mass = None
    if prompt_stats is not None:
        token = spec["preamble"]["first_token"]
        first_mass = float(
            np.mean(
                [
                    sum(p for t, p in zip(toks, probs, strict=True) if t == token)
                    for toks, probs in zip(
                        prompt_stats["top_tokens"], prompt_stats["top_probs"], strict=True
                    )
                ]
            )
        )
    # Factors with no pair of prompts differing only in them (age, favourite genre in the
    # default design) are left out rather than reported as NaN.
    cells, model_p, true_p = rating["cells"], rating["model"], rating["truth"]
    factor_tv = {f: _factor_tv(cells, model_p, f) for f in FACTOR_NAMES}
    factor_tv = {f: v for f, v in factor_tv.items() if not np.isnan(v)}
    return OrganismQuality(
        js_held_out=float(js[held].mean()),
        js_seen=float(js[~held].mean()) if (~held).any() else float("nan"),
        js_coarse=float(js[held & coarse].mean()) if (held & coarse).any() else float("nan"),
        js_attitude=float(js_att.mean()),
        refusal_error=float(refusal_error.mean()),
        tv_error=float(tv[held].mean()),
        factor_tv=factor_tv,
        truth_factor_tv={f: _factor_tv(cells, true_p, f) for f in factor_tv},
        first_token_mass=first_mass,
        n_prompts=int(len(rating["cells"]) + len(attitude["cells"])),
    )


def _renorm(p: np.ndarray) -> np.ndarray:
    return np.asarray(p / p.sum(-1, keepdims=True))


def _per_prompt(rows: pd.DataFrame, *, substantive_only: bool = True) -> dict[str, Any]:
    """[prompt, option] arrays of model and true probabilities (one question, so one K)."""
    if substantive_only:
        rows = rows[~rows["is_refusal"].astype(bool)]
    first = rows.groupby("prompt_id", sort=True).head(1)
    k = int(rows.groupby("prompt_id").size().iloc[0])
    logp = rows["logprob"].to_numpy().reshape(-1, k)
    model = np.exp(logp - logp.max(-1, keepdims=True))
    return {
        "model": _renorm(model),
        "truth": _renorm(rows["true_prob"].to_numpy().reshape(-1, k)),
        "held_out": first["held_out"].to_numpy().astype(bool),
        "refusal": rows["is_refusal"].to_numpy().reshape(-1, k)[0].astype(bool),
        "cells": first[list(FACTOR_NAMES)].reset_index(drop=True),
    }


def _factor_tv(cells: pd.DataFrame, probs: np.ndarray, factor: str) -> float:
    """Mean TV over all pairs of prompts that differ in `factor` and in nothing else."""
    others = [n for n in FACTOR_NAMES if n != factor]
    key = cells[others].astype("string").fillna("*").agg("|".join, axis=1)
    specified = cells[factor].notna().to_numpy()
    total, count = 0.0, 0
    for idx in key[specified].groupby(key[specified]).indices.values():
        members = key[specified].index[idx].to_numpy()
        if len(members) < 2:
            continue
        p = probs[members]
        tv = total_variation(p[:, None, :], p[None, :, :])
        upper = np.triu_indices(len(members), 1)
        total += float(tv[upper].sum())
        count += len(upper[0])
    return total / count if count else float("nan")
