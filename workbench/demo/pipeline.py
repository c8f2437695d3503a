"""`workbench demo`: every capability that has landed, end to end, on the model organism.

Today: exact logit-based answer distributions, checked against the organism's planted truth,
plus option orders (position bias) and option mass. Each later capability adds a section.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from workbench.demo.causal_section import demo_blocks as causal_blocks
from workbench.demo.elicitation import demo_blocks as elicitation_blocks
from workbench.demo.probe_section import demo_blocks as probe_blocks
from workbench.engine.models import load_model
from workbench.measure.distributions import (
    DistributionConfig,
    DistributionResult,
    compute_distributions,
)
from workbench.organism.build import TRUTH_FILE, attach_truth, build_organism, organism_quality
from workbench.report import Block, Figure_, Heading, Table, Text, plural, write_report
from workbench.study.load import load_study, parse_study
from workbench.study.spec import Study

ATTITUDE = "cinema_funding"
RATING = "rating"


def _orders_study(study: Study, folder: Path) -> Study:
    """The attitude item under all cyclic option orders: measures position bias."""
    raw = copy.deepcopy(dict(study.raw))
    raw["name"] = f"{study.name}-orders"
    raw["questions"] = [q for q in raw["questions"] if q["id"] == ATTITUDE]
    raw["orders"] = {"kind": "cyclic"}
    return parse_study(raw, str(folder / "study.yaml"), base_dir=folder)


def run_demo(
    out: str | Path = "runs/demo",
    *,
    scale: str = "default",
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Build or reuse the organism, run the pipeline on it, write report.html and report.md."""
    import matplotlib
    import torch

    matplotlib.use("Agg")
    # The organism is tiny: one thread is fastest, and several threads on a busy machine
    # can slow its matrix products tenfold (measured).
    torch.set_num_threads(1)
    out = Path(out)
    stage = _Stages(progress)
    stage("the model organism (built once, then reused from the cache)")
    folder = build_organism(seed=seed, scale=scale, progress=progress)  # type: ignore[arg-type]
    study = load_study(folder / "study.yaml")
    lm = load_model(folder / "model", dtype="auto", device=device)
    config = DistributionConfig(progress=progress)
    stage("logit answer distributions of every prompt")
    main = compute_distributions(study, lm, out / "distributions", config)
    stage("option orders and position bias")
    orders = compute_distributions(_orders_study(study, folder), lm, out / "orders", config)
    stage("sampled, constrained and verbalized answers; comparison with the truth")
    sampling = elicitation_blocks(folder, out / "sampling", lm)
    stage("activations and probes")
    probing = probe_blocks(folder, out / "probing", lm, main)
    stage("what drives the rating: effects and activation patching")
    causal = causal_blocks(study, lm, main, out / "causal", progress=progress)
    stage("the report")
    quality = organism_quality(folder, main.prompts, main.distributions, main.prompt_stats)
    truth = pd.read_parquet(folder / TRUTH_FILE)
    spec = json.loads((folder / "organism.json").read_text())

    blocks: list[Block] = [
        Text(
            "The built-in model organism is a small Llama the workbench trains itself on the "
            "synthetic *unseen movies* world, whose rules we planted: the rating depends strongly "
            "on the actor, moderately on favourite genre x movie genre, weakly on party; title, "
            "region and age have exactly zero effect. Some titles never appear in training "
            "(held out). Every number below is read from the model's logits by the same "
            "pipeline a user runs on a real model (`workbench distributions`)."
        ),
        Text(
            f"Organism: `{folder}` (scale `{scale}`, seed {seed}). Model: {lm.describe()['n_parameters']:,} parameters, {lm.describe()['dtype']} on {lm.device}."
        ),
        Heading("1. Recovering the planted truth"),
        _quality_table(quality),
        _actor_figure(main, truth),
        _expected_figure(main, truth),
        Heading("2. Zero-effect factors"),
        Text(
            "Mean total variation between the extracted rating distributions of prompts that "
            "differ in exactly one factor. Title, region and age have no planted effect, so "
            "their value is the extraction's noise floor; actor, genre and favourite genre do."
        ),
        _factor_table(quality),
        Heading("3. Option order and position bias"),
        Text(
            "The attitude item asked under all cyclic orders of its options (labels follow the "
            "displayed position). Bias = mean probability at a displayed position minus 1/K; "
            "position 1 is the A-bias. The organism was trained on the canonical order only."
        ),
        Table(
            orders.position_bias.assign(position=orders.position_bias["position"] + 1),
            "position bias, attitude item, cyclic orders",
        ),
        _bias_figure(orders),
        Heading("4. Option mass and the planted preamble"),
        Text(
            f"Option mass is the raw probability the model puts on any option token at the answer "
            f"position; the renormalized distribution is conditional on answering directly. "
            f"A share of {spec['preamble']['share']:.0%} of training answers start with the "
            f"preamble `{spec['preamble']['first_token'].strip()}`; its measured first-token mass "
            f"is {quality.first_token_mass:.3f}."
        ),
        _mass_figure(main),
        Heading("5. Sampled and verbalized answers, and human-survey metrics"),
        *sampling,
        Heading("6. Probes: decodable vs drives the answer"),
        *probing,
        Heading("7. What drives the answer, and where it acts"),
        *causal,
        Heading("Run folders"),
        Text(
            f"`{out / 'distributions'}` and `{out / 'orders'}`: prompts, distributions, variants, prompt_stats, adjusted, position_bias (parquet) and manifest.json."
        ),
    ]
    html_path, _ = write_report(out, "workbench demo: the model organism", blocks)
    stage.done(html_path)
    return html_path


class _Stages:
    """Announces each demo stage on stderr with the time since the demo started."""

    TOTAL = 7

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.n = 0
        self.t0 = time.time()

    def __call__(self, what: str) -> None:
        self.n += 1
        self._say(f"[demo {self.n}/{self.TOTAL}] {what}")

    def done(self, path: Path) -> None:
        self._say(f"[demo] done: {path}")

    def _say(self, text: str) -> None:
        if self.progress:
            print(f"{text} ({time.time() - self.t0:.0f} s)", file=sys.stderr, flush=True)


def _quality_table(q: object) -> Table:
    from workbench.organism.build import OrganismQuality

    assert isinstance(q, OrganismQuality)
    rows = [
        ("rating, held-out titles: mean JS distance (base 2)", q.js_held_out, "<= 0.05"),
        ("rating, training titles: mean JS distance", q.js_seen, ""),
        ("rating, coarse personas (held-out titles): mean JS", q.js_coarse, ""),
        ("rating, held-out titles: mean total variation", q.tv_error, ""),
        ("attitude item: mean JS distance (refusal excluded)", q.js_attitude, ""),
        ("attitude item: refusal share |model - true|", q.refusal_error, ""),
    ]
    return Table(
        pd.DataFrame(rows, columns=["measure", "value", "target"]),
        f"{plural(q.n_prompts, 'prompt')} against truth.parquet",
    )


def _factor_table(q: object) -> Table:
    from workbench.organism.build import OrganismQuality

    assert isinstance(q, OrganismQuality)
    frame = pd.DataFrame(
        {
            "factor": list(q.factor_tv),
            "model TV": list(q.factor_tv.values()),
            "true TV": [q.truth_factor_tv[f] for f in q.factor_tv],
        }
    )
    return Table(frame, "TV between prompts differing only in this factor (rating)")


def _rating_rows(main: DistributionResult, truth: pd.DataFrame) -> pd.DataFrame:
    rows = main.distributions.merge(main.prompts, on="prompt_id")
    rows = rows[(rows["question_id"] == RATING) & (rows["permutation"] == 0)]
    return attach_truth(rows, truth)


def _actor_figure(main: DistributionResult, truth: pd.DataFrame) -> Figure_:
    import matplotlib.pyplot as plt

    rows = _rating_rows(main, truth)
    rows = rows[rows["held_out"].fillna(False).astype(bool)]
    actors = sorted(rows["actor"].dropna().unique())
    cols = 3
    fig, axes = plt.subplots(
        (len(actors) + cols - 1) // cols,
        cols,
        figsize=(11, 2.6 * ((len(actors) + cols - 1) // cols)),
        sharey=True,
    )
    for ax, actor in zip(np.ravel(axes), actors, strict=False):
        grp = rows[rows["actor"] == actor].groupby("option_id")[["prob", "true_prob"]].mean()
        x = np.arange(len(grp))
        ax.bar(x - 0.2, grp["prob"], 0.4, label="extracted (logits)")
        ax.bar(x + 0.2, grp["true_prob"], 0.4, label="planted truth")
        ax.set_xticks(x, [str(i + 1) for i in x])
        ax.set_title(actor, fontsize=10)
    for ax in np.ravel(axes)[len(actors) :]:
        ax.axis("off")
    np.ravel(axes)[0].legend(fontsize=8)
    fig.suptitle("Rating distribution per actor, held-out titles (mean over personas)")
    fig.tight_layout()
    return Figure_(
        fig,
        "actor_distributions",
        "extracted vs planted rating distribution per actor; titles never seen in training",
    )


def _expected_figure(main: DistributionResult, truth: pd.DataFrame) -> Figure_:
    import matplotlib.pyplot as plt

    rows = _rating_rows(main, truth)
    rows = rows.assign(
        score=rows["prob"] * (rows["option_id"] + 1),
        true_score=rows["true_prob"] * (rows["option_id"] + 1),
    )
    per = rows.groupby("prompt_id").agg(
        score=("score", "sum"), true_score=("true_score", "sum"), held=("held_out", "first")
    )
    fig, ax = plt.subplots(figsize=(5, 4.5))
    held = per["held"].fillna(False).astype(bool)
    # held-out titles as hollow circles, training titles as small dots drawn on top of them:
    # where the two coincide both stay visible
    ax.scatter(
        per.loc[held, "true_score"],
        per.loc[held, "score"],
        s=24,
        marker="o",
        facecolors="none",
        edgecolors="C1",
        linewidths=0.7,
        zorder=2,
        label=f"held-out titles ({plural(int(held.sum()), 'prompt')})",
    )
    ax.scatter(
        per.loc[~held, "true_score"],
        per.loc[~held, "score"],
        s=5,
        color="C0",
        lw=0,
        zorder=3,
        label=f"training titles ({plural(int((~held).sum()), 'prompt')})",
    )
    lo, hi = 1, 5
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("planted expected rating")
    ax.set_ylabel("extracted expected rating")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return Figure_(fig, "expected_rating", "expected rating per prompt: extracted vs planted")


def _bias_figure(orders: DistributionResult) -> Figure_:
    import matplotlib.pyplot as plt

    bias = orders.position_bias
    fig, ax = plt.subplots(figsize=(5, 3))
    positions = bias["position"].to_numpy() + 1
    ax.bar(positions, bias["mean_prob"])
    ax.set_xticks(positions)  # displayed positions are whole numbers, never 1.5
    ax.axhline(float(bias["uniform"].iloc[0]), color="k", ls="--", lw=0.8, label="uniform 1/K")
    ax.set_xlabel("displayed position")
    ax.set_ylabel("mean probability")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return Figure_(
        fig, "position_bias", "mean probability by displayed position, attitude item, cyclic orders"
    )


def _mass_figure(main: DistributionResult) -> Figure_:
    import matplotlib.pyplot as plt

    stats = main.prompt_stats.merge(main.prompts[["prompt_id", "question_id"]], on="prompt_id")
    fig, ax = plt.subplots(figsize=(6, 3))
    # shares, not counts, and outlines: a question with few prompts is not flattened or hidden
    for i, (qid, grp) in enumerate(stats.groupby("question_id")):
        ax.hist(
            grp["option_mass"],
            bins=40,
            range=(0, 1),
            weights=np.full(len(grp), 1 / len(grp)),
            histtype="step",
            lw=1.5,
            ls=("-", "--", ":", "-.")[i % 4],
            label=f"{qid} ({plural(len(grp), 'prompt')})",
        )
    ax.set_xlabel("option mass (raw probability on all option tokens)")
    ax.set_ylabel("share of the question's prompts")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return Figure_(fig, "option_mass", "option mass per prompt")
