"""`workbench report`: a standalone report of any runs (distributions, sampling, several).

For each run and each of its sources (a distributions run: its logit distribution; a sampling
run: its counted answers and, where present, the answer-position estimate):

- **distributions by persona factor**: per question, the mean distribution over the prompts
  of each value of one persona factor (other factors and option orders averaged), as small
  multiples: pages of at most `PAGE_QUESTIONS` questions, at most `PAGE_COLUMNS` panels
  across, so no image is wider than ~1,600 px however many questions a study has;
- **option mass** (distributions runs): the probability the model put on the option labels at
  all, per question, with the run's own warnings (its manifest's `warnings`);
- **position bias**: per question, the mean probability of the option shown first and last
  minus 1/K (A-bias; 0 for a model without position preference);
- **sampling status rates** (sampling runs): ok / refusal / unparseable shares, overall and
  per question.

With `human`, the comparison of the runs with the human data (`workbench.compare.compare`):
its source-level survey metrics, per-group representativeness and coverage tables.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from workbench.compare.comparison import Run, compare, load_run, study_from_manifest
from workbench.report import Block, Callout, Figure_, Heading, Table, Text, plural, write_report
from workbench.study.spec import Study

PAGE_QUESTIONS = 12
"""Questions per figure (3 rows of `PAGE_COLUMNS`)."""
PAGE_COLUMNS = 4
PANEL_INCHES = (3.4, 2.5)
"""Width and height of one panel; 4 across at the report's 110 dpi: ~1,500 px."""
MAX_QUESTIONS = 48
"""Questions drawn per source and factor; the rest are named in a note (the tables keep all)."""
MAX_PANELS = 192
"""Panels in the whole report: with many sources x factors, fewer questions each (at least 4),
so a survey of 12 factors and 3 sources stays a page of a few MB."""
MAX_WARNINGS = 10


@dataclass(frozen=True)
class ReportConfig:
    """Settings of `run_report`."""

    max_questions: int = MAX_QUESTIONS
    human_prob_column: str = "prob"
    human_label: str = "human"


def _sources(run: Run) -> dict[str, pd.DataFrame]:
    """name -> long table: prompt_id, question_id, option_id, position, prob (substantive
    options, renormalized per prompt) + the prompts' factor columns."""
    dist = run.dist[~run.dist["is_refusal"].astype(bool)]
    columns = {run.name: "prob"}
    if run.kind == "sampling" and dist["prob_answer_position"].notna().any():
        columns[f"{run.name} (answer position)"] = "prob_answer_position"
    out = {}
    for name, col in columns.items():
        frame = dist[["prompt_id", "option_id", "position"]].assign(prob=dist[col].astype(float))
        frame = frame[frame.groupby("prompt_id")["prob"].transform("count") > 0]
        frame = frame.merge(run.prompts.drop(columns=["prompt", "input_ids"], errors="ignore"))
        out[name] = frame
    return out


def _by_factor(frame: pd.DataFrame, factor: str) -> pd.DataFrame:
    """question_id, value, option_id, prob: the mean over prompts of each factor value."""
    sub = frame[frame[factor].notna()]
    mean = sub.groupby(["question_id", factor, "option_id"], observed=True)["prob"].mean()
    mean = mean / mean.groupby(level=[0, 1]).transform("sum")
    return mean.rename("prob").reset_index().rename(columns={factor: "value"})


def _factor_pages(
    name: str, frame: pd.DataFrame, study: Study, factor: str, config: ReportConfig
) -> list[Block]:
    import matplotlib.pyplot as plt

    table = _by_factor(frame, factor)
    if table.empty:
        return []
    by_id = {q.id: q for q in study.questions}
    asked = set(table["question_id"])
    order = [q for q in by_id if q in asked]
    shown = order[: config.max_questions]
    values = [v for v in study.factor(factor).values if v in set(table["value"])]
    colors = plt.get_cmap("tab10")
    blocks: list[Block] = []
    if len(order) > len(shown):
        blocks.append(
            Text(
                f"The first {plural(len(shown), 'question')} of {len(order):,} are drawn; "
                "every question's numbers are in the tables of `workbench compare`."
            )
        )
    slug = "".join(c if c.isalnum() else "_" for c in f"{name}_{factor}")
    for page, start in enumerate(range(0, len(shown), PAGE_QUESTIONS)):
        qids = shown[start : start + PAGE_QUESTIONS]
        cols = min(PAGE_COLUMNS, len(qids))
        rows = -(-len(qids) // cols)
        fig, axes = plt.subplots(
            rows,
            cols,
            figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows + 0.6),
            squeeze=False,
        )
        width = 0.8 / max(len(values), 1)
        for ax, qid in zip(axes.flat, qids, strict=False):
            question = by_id[qid]
            k = len(question.options)
            sub = table[table["question_id"] == qid]
            for j, value in enumerate(values):
                probs = np.zeros(k)
                v = sub[sub["value"] == value]
                probs[v["option_id"].to_numpy(dtype=int)] = v["prob"].to_numpy()
                x = np.arange(k) + (j - (len(values) - 1) / 2) * width
                ax.bar(x, probs, width, color=colors(j % 10), label=str(value))
            ax.set_xticks(np.arange(k))
            ax.set_xticklabels([o[:10] for o in question.options], rotation=45, ha="right")
            ax.tick_params(labelsize=7)
            ax.set_ylim(0, 1)
            ax.set_title(qid[:40], fontsize=9)
        for ax in list(axes.flat)[len(qids) :]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=min(len(values), 8), fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
        pages = -(-len(shown) // PAGE_QUESTIONS)
        blocks.append(
            Figure_(
                fig,
                f"{slug}_{page + 1}",
                f"{name}: mean distribution by {factor} (page {page + 1} of {pages})",
            )
        )
    return blocks


def _option_mass(run: Run) -> list[Block]:
    path = run.path / "prompt_stats.parquet"
    if run.kind != "distributions" or not path.is_file():
        return []
    stats = pd.read_parquet(path).merge(run.prompts[["prompt_id", "question_id"]])
    mass = stats.groupby("question_id", sort=False)["option_mass"]
    table = pd.DataFrame(
        {"mean_option_mass": mass.mean(), "min_option_mass": mass.min(), "prompts": mass.size()}
    ).reset_index()
    blocks: list[Block] = [
        Heading(f"{run.name}: option mass", 3),
        Text(
            "The probability the model put on the option labels at all (refusal options "
            "included); the distributions are conditional on it. Low mass means the model "
            "mostly wanted to say something else."
        ),
        Table(table),
    ]
    warnings = run.manifest.get("warnings") or []
    for w in warnings[:MAX_WARNINGS]:
        blocks.append(Callout(str(w.get("message", w)), "Low option mass"))
    if len(warnings) > MAX_WARNINGS:
        blocks.append(
            Text(f"... and {plural(len(warnings) - MAX_WARNINGS, 'more warning')} (manifest.json).")
        )
    return blocks


def _position_bias(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    k = frame.groupby("prompt_id")["option_id"].transform("size")
    frame = frame.assign(k=k, last=frame["position"] == k - 1)
    rows = []
    for qid, sub in frame.groupby("question_id", sort=False):
        first = sub[sub["position"] == 0]
        last = sub[sub["last"]]
        uniform = 1.0 / sub["k"].iloc[0]
        rows.append(
            {
                "source": name,
                "question_id": qid,
                "options": int(sub["k"].iloc[0]),
                "orders": int(sub["permutation"].nunique()) if "permutation" in sub else 1,
                "first_minus_uniform": float(first["prob"].mean() - uniform),
                "last_minus_uniform": float(last["prob"].mean() - uniform),
            }
        )
    return pd.DataFrame(rows)


def _status_rates(run: Run) -> list[Block]:
    if run.samples is None or run.samples.empty:
        return []
    samples = run.samples.merge(run.prompts[["prompt_id", "question_id"]])
    overall = samples["status"].value_counts(normalize=True).rename("share").reset_index()
    per_q = pd.crosstab(samples["question_id"], samples["status"], normalize="index").reset_index()
    return [
        Heading(f"{run.name}: sampling status", 3),
        Text(
            f"{plural(len(samples), 'sample')} of {plural(samples['prompt_id'].nunique(), 'prompt')}."
        ),
        Table(overall, "share of all samples"),
        Table(per_q, "share per question"),
    ]


def _human_blocks(
    runs: list[str | Path], human: str | Path, study: Study, config: ReportConfig
) -> list[Block]:
    from workbench.compare.comparison import CompareConfig
    from workbench.compare.coverage import summary_lines

    result = compare(
        runs,
        human,
        None,
        CompareConfig(human_prob_column=config.human_prob_column, human_label=config.human_label),
        study=study,
    )
    blocks: list[Block] = [Heading("Against human data"), Text(f"Human data: `{human}`.")]
    if len(result.coverage):
        blocks.append(Text("Coverage: " + "; ".join(summary_lines(result.coverage))))
    if len(result.human):
        keep = [
            c
            for c in (
                "source",
                "kind",
                "representativeness",
                "representativeness_lo",
                "representativeness_hi",
                "mean_tv",
                "mean_js",
                "homogenized_share",
                "human_homogenized_share",
                "structural_gap_tv",
                "a_bias",
                "n_cells",
            )
            if c in result.human.columns
        ]
        blocks.append(Table(result.human[keep], "survey metrics per source (cell level)"))
    if len(result.groups):
        blocks.append(Table(result.groups, "representativeness per source and group"))
    if len(result.human_pairs):
        blocks.append(Table(result.human_pairs, "human groups against each other"))
    return blocks


def run_blocks(
    runs: list[str | Path],
    human: str | Path | None = None,
    config: ReportConfig | None = None,
    *,
    study: Study | None = None,
) -> list[Block]:
    """The report's blocks (see the module docstring)."""
    config = config or ReportConfig()
    loaded = [load_run(p) for p in runs]
    study = study or study_from_manifest(loaded[0].manifest)
    overview = pd.DataFrame(
        [
            {
                "run": r.name,
                "kind": r.kind,
                "elicitation": r.elicitation,
                "model": (r.manifest.get("model") or {}).get("name", ""),
                "prompts": len(r.prompts),
                "questions": r.prompts["question_id"].nunique(),
                "warnings": len(r.manifest.get("warnings") or []),
            }
            for r in loaded
        ]
    )
    blocks: list[Block] = [
        Heading("Runs"),
        Text(
            f"Study `{study.name}`: {plural(len(study.questions), 'question')}, persona factors "
            + (", ".join(f"`{f}`" for f in study.persona_factors) or "none")
            + "."
        ),
        Table(overview),
    ]
    sources = {name: frame for r in loaded for name, frame in _sources(r).items()}
    blocks.append(Heading("Distributions by persona factor"))
    persona = study.persona_factors
    if not persona:
        blocks.append(Text("The study has no persona factor."))
    combos = sum(f in frame.columns for frame in sources.values() for f in persona)
    per = max(4, MAX_PANELS // max(combos, 1))
    config = replace(config, max_questions=min(config.max_questions, per))
    for name, frame in sources.items():
        for factor in persona:
            if factor in frame.columns:
                blocks.append(Heading(f"{name}: by {factor}", 3))
                blocks += _factor_pages(name, frame, study, factor, config)
    blocks.append(Heading("Option mass and warnings"))
    mass = [b for r in loaded for b in _option_mass(r)]
    blocks += mass or [Text("No distributions run: option mass is a logit measurement.")]
    blocks.append(Heading("Position bias"))
    blocks.append(
        Text(
            "Mean probability of the option shown first (and last) minus 1/K, per question; "
            "0 for a model without position preference. One option order per question "
            "confounds position with content."
        )
    )
    bias = pd.concat([_position_bias(n, f) for n, f in sources.items()], ignore_index=True)
    blocks.append(Table(bias))
    blocks.append(Heading("Sampling status rates"))
    rates = [b for r in loaded for b in _status_rates(r)]
    blocks += rates or [Text("No sampling run.")]
    if human is not None:
        blocks += _human_blocks(runs, human, study, config)
    return blocks


def run_report(
    runs: list[str | Path],
    out: str | Path,
    human: str | Path | None = None,
    config: ReportConfig | None = None,
    *,
    study: Study | None = None,
) -> Path:
    """Write report.html (standalone) and report.md with its PNGs to `out`; returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    # every figure stays open until the page is written (a block list holds them); a survey of
    # many factors has more than matplotlib's 20 before it warns
    with matplotlib.rc_context({"figure.max_open_warning": 0}):
        write_report(out, "workbench report", run_blocks(runs, human, config, study=study))
    return out
