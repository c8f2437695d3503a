"""A synthetic survey of OpinionQA's shape, for tests and the benchmark (`scripts.bench_survey`).

`SurveyShape()` is the full shape: 1,500 questions of 2 to 11 substantive options plus two
refusal options ("Not sure", "Refused"); a third of them nominal (written the survey's way,
all values equal), the others ordinal on values that are not 1..N (OpinionQA writes a middle
"neither" as 1.5); 12 persona attributes of 5 values each (60 groups); 1,000,000
respondent-question rows with survey weights; attribute 0 also holds a value the study
lacks ("Other", in coarse cells only) and some respondents leave attributes empty. Answers
follow a known model: softmax(question base + the sum of one effect per attribute value), so
groups differ. Model runs (`write_model_runs`) are distributions runs over the study's cells
(everyone and each group) whose distributions are the generating model's plus noise.

Everything is seeded; nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

REFUSAL = ("Not sure", "Refused")


@dataclass(frozen=True)
class SurveyShape:
    n_questions: int = 1500
    n_attributes: int = 12
    values_per_attribute: int = 5
    n_rows: int = 1_000_000
    questions_per_respondent: int = 200
    n_sources: int = 3
    seed: int = 0


@dataclass
class Survey:
    study: dict[str, Any]
    """The study as a parsed-YAML mapping (design: the table `design`)."""
    design: pd.DataFrame
    """Everyone and each attribute value alone (the other attributes empty)."""
    respondents: pd.DataFrame
    """respondent_id, attributes..., question_id, answer (option text), weight."""
    base: np.ndarray
    """[question, option] logits of the generating model (options beyond K: -inf)."""
    effects: np.ndarray
    """[attribute, value, question, option] logit shifts."""


def _questions(shape: SurveyShape, rng: np.random.Generator) -> list[dict[str, Any]]:
    out = []
    for i in range(shape.n_questions):
        k = int(rng.integers(2, 12))
        q: dict[str, Any] = {
            "id": f"q{i:04d}",
            "text": f"Synthetic question {i}?",
            "options": [f"option {j + 1} of q{i}" for j in range(k)],
            "refusal": list(REFUSAL),
        }
        if i % 3 == 0:
            q["values"] = [1] * k  # nominal, written the survey's way
        else:
            values = np.sort(rng.choice(np.arange(1, 3 * k + 1), size=k, replace=False))
            q["values"] = [float(v) / 2 for v in values]
        out.append(q)
    return out


def make_survey(shape: SurveyShape = SurveyShape()) -> Survey:
    rng = np.random.default_rng(shape.seed)
    attrs = [f"a{j:02d}" for j in range(shape.n_attributes)]
    values = {a: [f"{a}v{v}" for v in range(shape.values_per_attribute)] for a in attrs}
    questions = _questions(shape, rng)
    study = {
        "name": "synthetic_survey",
        "factors": [{"name": a, "role": "persona", "values": values[a]} for a in attrs],
        "template": {
            "format": "plain",
            "persona": [f"{a}: {{{a}}}." for a in attrs],
            "prompt": "{persona}\nQuestion: {question}\n{options}\nAnswer:",
        },
        "questions": questions,
        "design": {"kind": "table", "path": "design.csv"},
    }
    design = pd.DataFrame(
        [{a: "" for a in attrs}]
        + [{**{b: "" for b in attrs}, a: v} for a in attrs for v in values[a]]
    )
    kmax = 11 + len(REFUSAL)
    nq = shape.n_questions
    k = np.array([len(q["options"]) for q in questions])
    base = rng.normal(0.0, 1.0, (nq, kmax))
    base[:, 11:] = -3.0  # refusals: a few percent
    real = np.arange(kmax)[None, :] < k[:, None]
    real[:, 11:] = True
    base = np.where(real, base, -np.inf)
    nv = shape.values_per_attribute + 1  # the last value: "Other" (attribute 0) or empty
    effects = rng.normal(0.0, 0.35, (shape.n_attributes, nv, nq, kmax))
    effects[:, -1] = 0.0

    n_resp = max(1, shape.n_rows // shape.questions_per_respondent)
    codes = rng.integers(0, shape.values_per_attribute, (n_resp, shape.n_attributes))
    empty = rng.random((n_resp, shape.n_attributes)) < 0.03
    codes[empty] = shape.values_per_attribute
    other = rng.random(n_resp) < 0.05
    codes[other, 0] = shape.values_per_attribute
    per = min(shape.questions_per_respondent, nq)
    qs = np.argsort(rng.random((n_resp, nq)), axis=1)[:, :per].reshape(-1)
    resp = np.repeat(np.arange(n_resp), per)
    logits = base[qs].copy()
    for a in range(shape.n_attributes):
        logits += effects[a, codes[resp, a], qs]
    gumbel = rng.gumbel(size=logits.shape)
    choice = np.argmax(logits + gumbel, axis=1)
    names = np.array(
        [(q["options"] + [""] * (11 - len(q["options"])) + list(REFUSAL)) for q in questions],
        dtype=object,
    )
    frame = pd.DataFrame(
        {
            "respondent_id": resp,
            "question_id": np.array([q["id"] for q in questions], dtype=object)[qs],
            "answer": names[qs, choice],
            "weight": np.exp(rng.normal(0.0, 0.4, n_resp))[resp],
        }
    )
    for j, name in enumerate(attrs):
        labels = pd.Series([*values[name], "Other" if j == 0 else ""], dtype=object)
        frame[name] = labels.to_numpy()[codes[resp, j]]
        frame.loc[frame[name] == "", name] = None
    return Survey(study, design, frame, base, effects)


def write_survey(out: str | Path, survey: Survey) -> dict[str, Path]:
    """study.yaml, design.csv and human.parquet in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(yaml.safe_dump(survey.study, sort_keys=False))
    survey.design.to_csv(out / "design.csv", index=False)
    survey.respondents.to_parquet(out / "human.parquet", index=False)
    return {"study": out / "study.yaml", "human": out / "human.parquet"}


def write_model_runs(
    out: str | Path, survey: Survey, n_sources: int = 3, seed: int = 0
) -> list[Path]:
    """Distributions runs over the design's cells x every question: the generating model's
    distribution (a group's effects at the group's value; everyone: none) plus logit noise
    growing with the source's index (source 0 nearly exact)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    attrs = [f["name"] for f in survey.study["factors"]]
    questions = survey.study["questions"]
    nq, kmax = survey.base.shape
    design = survey.design.replace("", None)
    cells = design.merge(pd.DataFrame({"question_id": np.arange(nq)}), how="cross")
    logits = survey.base[cells["question_id"].to_numpy()].copy()
    for j, a in enumerate(attrs):
        v = cells[a]
        has = v.notna().to_numpy()
        idx = np.array([int(str(x).rsplit("v", 1)[1]) if x else 0 for x in v.fillna("")])
        logits[has] += survey.effects[j, idx[has], cells["question_id"].to_numpy()[has]]
    k = np.array([len(q["options"]) for q in questions])[cells["question_id"].to_numpy()]
    option_of = np.array([*range(11), *(11 + i for i in range(len(REFUSAL)))])
    prompts = cells.assign(prompt_id=np.arange(len(cells)), permutation=0)
    personas = [
        "|".join(f"{a}={r[a] or '*'}" for a in attrs) for r in design.fillna("").to_dict("records")
    ]
    prompts["persona_id"] = np.repeat(personas, nq)
    prompts["question_id"] = np.array([q["id"] for q in questions], dtype=object)[
        cells["question_id"].to_numpy()
    ]
    paths = []
    for s in range(n_sources):
        noisy = logits + rng.normal(0.0, 0.1 + 0.4 * s, logits.shape)
        noisy = noisy - np.nanmax(np.where(np.isfinite(noisy), noisy, np.nan), 1, keepdims=True)
        raw = np.exp(noisy)
        real = np.isfinite(noisy)
        substantive = (np.arange(kmax)[None, :] < k[:, None]) & (option_of[None, :] < 11)
        r, c = np.nonzero(real)
        opt = np.where(c < 11, c, k[r] + (c - 11))
        is_ref = c >= 11
        sub_total = (raw * substantive).sum(1)
        all_total = raw.sum(1)
        prob = np.where(is_ref, np.nan, raw[r, c] / sub_total[r])
        dist = pd.DataFrame(
            {
                "prompt_id": r,
                "option_id": opt,
                "label": "",
                "position": opt,
                "is_refusal": is_ref,
                "logprob": np.log(raw[r, c] / all_total[r]),
                "prob": prob,
            }
        )
        folder = out / f"model_{s}"
        folder.mkdir(parents=True, exist_ok=True)
        prompts.to_parquet(folder / "prompts.parquet", index=False)
        dist.to_parquet(folder / "distributions.parquet", index=False)
        manifest = {
            "kind": "distributions",
            "study": {"definition": survey.study, "path": str(out / "study.yaml")},
        }
        (folder / "manifest.json").write_text(json.dumps(manifest))
        paths.append(folder)
    return paths
