"""Report blocks and figures of a comparison.

`report_blocks(result)` turns a `CompareResult` into report blocks (a warning for each
sampling run whose answers could not be used, tables with their 95% intervals, three figures:
per-question distributions side by side, expected score logits vs the others, mismatch by
persona).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from workbench.report import Block, Callout, Figure_, Heading, Table, Text, plural
from workbench.study.spec import Question

if TYPE_CHECKING:
    from workbench.compare.comparison import CompareResult

FIRST_TOKEN_CAVEAT = (
    "A sampled answer that is a single first token, drawn at temperature 1 from the same "
    "prompt, follows exactly the logit distribution (docs/MEASUREMENT.md §3): a sampled-vs-logits "
    "difference is only informative for free text (preambles, chat templates) or other "
    "elicitations; below the sampling floor it is noise."
)


LOW_OK_RATE = 0.5
"""A sampling run with fewer usable answers than this share gets a warning in the report."""

MAX_PERSONA_ROWS = 30
"""The mismatch-by-persona chart shows at most this many personas (the extremes)."""


def failure_callouts(result: CompareResult) -> list[Block]:
    """A warning per sampling run that failed entirely (no usable answer: its source is
    missing from every table and figure) or mostly (under `LOW_OK_RATE` usable)."""
    out: list[Block] = []
    for row in result.rates.to_dict("records"):
        n = int(row["n_samples"])
        ok = float(row.get("ok_rate", np.nan))
        if n and np.isfinite(ok) and ok >= LOW_OK_RATE:
            continue
        failures = row.get("failures") or ""
        why = f" (failures: {failures})" if isinstance(failures, str) and failures else ""
        where = "see `status` and `error` in its `samples.parquet`"
        name = f"`{row['run']}` ({row['elicitation']})"
        if not n:
            out.append(
                Callout(
                    f"{name} has no answers at all: it is missing from every table "
                    f"and figure below; {where}."
                )
            )
        elif not ok:
            out.append(
                Callout(
                    f"{name} failed entirely: none of its {plural(n, 'answer')} could be used"
                    f"{why}. It has no distribution, so it is missing from every table and figure "
                    f"below; {where}."
                )
            )
        else:
            out.append(
                Callout(
                    f"{name}: only {plural(round(ok * n), 'answer')} of {n:,} ({ok:.0%}) could "
                    f"be used{why}; its distributions rest on those alone; {where}.",
                    "Note",
                )
            )
    return out


def _ci(value: float, lo: float, hi: float, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return ""
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _with_ci(frame: pd.DataFrame, cols: list[str], keep: list[str]) -> pd.DataFrame:
    out = frame[[c for c in keep if c in frame.columns]].copy()
    for col in cols:
        if col in frame.columns:
            out[col] = [
                _ci(v, lo, hi)
                for v, lo, hi in zip(
                    frame[col], frame[f"{col}_lo"], frame[f"{col}_hi"], strict=True
                )
            ]
    return out


def _counts(values: pd.Series) -> pd.Series:
    """Counts stored as float because of missing values, shown as integers (blank if missing)."""
    finite = values.dropna()
    if len(finite) and (finite == finite.round()).all():
        return values.astype("Int64")
    return values


def report_blocks(
    result: CompareResult, questions: dict[str, Question], *, warnings: bool = True
) -> list[Block]:
    """Tables and figures of a comparison (values with bootstrap 95% intervals), after
    `failure_callouts` unless `warnings` is False (a caller that shows them higher up)."""
    blocks: list[Block] = [
        *(failure_callouts(result) if warnings else []),
        Text(
            "Sources: "
            + "; ".join(f"`{n}` ({k})" for n, k in result.kinds.items())
            + (f". Reference (item level): `{result.reference}`." if result.reference else ".")
        ),
        Text(FIRST_TOKEN_CAVEAT),
    ]
    if len(result.summary):
        item = result.summary[result.summary["level"] == "item"]
        if len(item):
            table = _with_ci(
                item,
                ["tv", "js", "kl_bits", "nw1"],
                ["source", "reference", "question_id", "n_keys"],
            )
            table["mean N"] = item["mean_n"].to_numpy()
            table["floor"] = item["floor_mean"].to_numpy()
            table["floor q95"] = item["floor_q95"].to_numpy()
            table["within floor"] = item["within_floor"].to_numpy()
            blocks += [
                Heading("Against the logits, per prompt", 3),
                _capped(
                    table,
                    "mean over prompts [bootstrap 95% interval]; TV, JS distance (base 2), "
                    "KL(logits ‖ source) in bits, normalized W1; floor: expected TV of N draws "
                    "from the logit distribution, q95: 95th percentile of its mean",
                    "summary.parquet",
                ),
            ]
    if len(result.rates):
        cols = ["ok_rate", "refusal_rate", "unparseable_rate"]
        rates = result.rates
        table = rates[["run", "elicitation", "n_samples"]].copy()
        if "failures" in rates.columns:
            # next to the run's name: a failed run must not hide in the last column
            table["failures"] = rates["failures"].fillna("")
        for col in cols:
            base = col.removesuffix("_rate")
            table[col] = [
                _ci(v, lo, hi)
                for v, lo, hi in zip(
                    rates[col], rates[f"{base}_lo"], rates[f"{base}_hi"], strict=True
                )
            ]
        for col in (
            "preamble_rate",
            "sample_mismatch",
            "sample_mismatch_from_logits",
            "prompt_mismatch",
        ):
            if col in rates.columns:
                lo = f"{col.removesuffix('_rate')}_lo" if col == "preamble_rate" else f"{col}_lo"
                hi = lo.removesuffix("_lo") + "_hi"
                table[col] = [
                    _ci(v, a, b) for v, a, b in zip(rates[col], rates[lo], rates[hi], strict=True)
                ]
        blocks += [
            Heading("Sampling runs: status, preamble and first-token vs text mismatch", 3),
            Table(
                table,
                "rates with 95% intervals (statuses: Wilson; the others: bootstrap over "
                "questions and personas). preamble: share of answers after other words "
                '("Sure! I\'d give it a 4"); sample_mismatch: share of answers differing from '
                "the logits' argmax option; ..._from_logits: the same if the text followed the logits; "
                "prompt_mismatch: share of prompts whose sampled mode differs from the argmax",
            ),
        ]
    if len(result.human):
        h = result.human
        table = _with_ci(
            h,
            ["representativeness", "mean_tv", "mean_js", "a_bias"],
            ["source", "kind", "n_cells"],
        )
        table = table.rename(columns={"representativeness": "representativeness (1 - nW1)"})
        if "n_cells" in h.columns:
            table["n_cells"] = _counts(h["n_cells"])
        for col in (
            "homogenized_share",
            "human_homogenized_share",
            "entropy_ratio_mean",
            "structural_gap_tv",
            "structural_argmax_agree",
            "k2s_gap",
        ):
            if col in h.columns:
                table[col] = h[col].to_numpy()
        blocks += [
            Heading("Against the human data, per cell", 3),
            Table(
                table,
                "cells = each source averaged over option orders. Representativeness "
                "(OpinionQA): mean over questions of 1 - normalized W1; mean TV (Meister); "
                "homogenized: share of cells with a mode above 0.95 (model vs human); entropy "
                "ratio H_model/H_human; structural gap: TV between a coarse group asked directly "
                "and the weighted mixture of its subgroups; A-bias: P(position 1) - 1/K; "
                "k2s_gap: TV(sampled)/TV(verbalized) - 1. uniform and majority are baselines.",
            ),
        ]
    blocks += group_blocks(result)
    if len(result.properties):
        p = result.properties
        table = _with_ci(
            p,
            ["normalized_entropy", "expected_score", "modal_share"],
            ["source", "question_id", "n_cells"],
        )
        blocks += [
            Heading("Distribution properties per source", 3),
            _capped(table, "mean over cells [95% interval]", "properties.parquet"),
        ]
    blocks += _figures(result, questions)
    return blocks


MAX_TABLE_ROWS = 40
"""Rows of a per-question table shown in the report (the pooled rows first); a survey of
1,500 questions keeps every row in its parquet file, not in a 5 MB page."""


def _capped(table: pd.DataFrame, caption: str, file: str) -> Table:
    if "question_id" in table.columns:
        pooled = table["question_id"] == "all"
        table = pd.concat([table[pooled], table[~pooled]])
    if len(table) <= MAX_TABLE_ROWS:
        return Table(table, caption)
    return Table(
        table.head(MAX_TABLE_ROWS),
        f"{caption}. The first {MAX_TABLE_ROWS} of {len(table):,} rows; every row is in `{file}`",
    )


def group_blocks(result: CompareResult) -> list[Block]:
    """Coverage, representativeness per source over groups ("(average)", "(worst)") beside
    the human baselines, and the pairs of groups furthest apart."""
    out: list[Block] = []
    if len(result.coverage):
        out += [
            Heading("Human data coverage", 3),
            _capped(
                result.coverage,
                "what the human file covers of the cells the study asks",
                "coverage.parquet",
            ),
        ]
    g = result.groups
    if len(g):
        summary = g[g["group"].isin(["(average)", "(worst)"])]
        wide = summary.pivot_table(
            index="source", columns="group", values="representativeness", sort=False
        ).reset_index()
        out += [
            Heading("Representativeness over groups", 3),
            Table(
                wide,
                "mean over questions of 1 - normalized W1 (1 - TV on nominal questions) per "
                "group, then the average and the worst group (OpinionQA); `human: overall "
                "population` predicts every group by everyone (human average / human worst). "
                "Every group: `groups.parquet`, with intervals and the human sampling floor",
            ),
        ]
    if len(result.human_pairs):
        pairs = result.human_pairs.sort_values("representativeness").head(10)
        out += [
            Heading("Human groups furthest apart", 3),
            Table(pairs, "pairs of groups of one factor, from the human data alone"),
        ]
    return out


# --------------------------------------------------------------------------------------------
# figures


PANELS_PER_PAGE = 12
"""Per-question panels per figure (4 across): no image wider than ~2,000 px."""
MAX_PAGES = 4
"""Per-question figures at most; with human data, the worst-represented questions come first."""


def _question_order(result: CompareResult, qids: list[str]) -> list[str]:
    """Worst-represented first (largest mean distance of the model sources to the human data),
    else the study's order."""
    gq = result.group_questions
    if len(gq):
        model = gq[
            ~gq["source"].isin(["uniform", "majority"]) & ~gq["source"].str.startswith("human")
        ]
        if len(model):
            worst = model.groupby("question_id")["distance"].mean().sort_values(ascending=False)
            return [q for q in worst.index if q in qids] + [q for q in qids if q not in worst.index]
    return qids


def _figures(result: CompareResult, questions: dict[str, Question]) -> list[Block]:
    import matplotlib.pyplot as plt

    out: list[Block] = []
    cell = {n: f for n, f in result.cell_sources.items() if result.kinds[n] != "baseline"}
    present = set().union(*(set(f["question_id"]) for f in cell.values())) if cell else set()
    qids = _question_order(result, [q for q in questions if q in present])
    pages = [qids[i : i + PANELS_PER_PAGE] for i in range(0, len(qids), PANELS_PER_PAGE)]
    means = {n: f.groupby(["question_id", "option_id"])["prob"].mean() for n, f in cell.items()}
    for page_no, page in enumerate(pages[:MAX_PAGES]):
        cols = min(4, len(page))
        rows = -(-len(page) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat[len(page) :]:
            ax.set_visible(False)
        for ax, qid in zip(axes.flat, page, strict=False):
            k = len(questions[qid].options)
            names = [n for n in cell if qid in means[n].index.get_level_values(0)]
            width = 0.8 / max(1, len(names))
            for i, name in enumerate(names):
                mean = means[name].loc[qid].reindex(range(k)).fillna(0)
                ax.bar(np.arange(k) + (i - (len(names) - 1) / 2) * width, mean, width, label=name)
            ax.set_xticks(
                np.arange(k), [o[:10] for o in questions[qid].options], rotation=30, fontsize=6
            )
            ax.set_title(qid, fontsize=9)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7)
        fig.supylabel("mean probability over cells", fontsize=8)
        fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(labels) // 4), 1, 1))
        first = page_no * PANELS_PER_PAGE + 1
        left = len(qids) - min(len(qids), MAX_PAGES * PANELS_PER_PAGE)
        note = (
            f"; {plural(left, 'more question')} in `group_questions.parquet`"
            if left and page_no == min(len(pages), MAX_PAGES) - 1
            else ""
        )
        order = "worst-represented first" if len(result.group_questions) else "study order"
        out.append(
            Figure_(
                fig,
                "compare_distributions" + (f"_{page_no + 1}" if page_no else ""),
                f"questions {first} to {first + len(page) - 1} of {len(qids)} ({order}): every "
                f"source's mean distribution, side by side{note}",
            )
        )
    out += group_figures(result)
    ref = result.reference
    ordinal = [q for q in questions.values() if q.values is not None and len(set(q.values)) > 1]
    others = [n for n in result.sources if n != ref]
    if ref is not None and ordinal and others:
        out.append(_expected_score_figure(result, ref, ordinal[0]))
    mm = result.mismatch_by_persona
    if len(mm):
        out.append(mismatch_figure(mm))
    return out


def group_figures(result: CompareResult) -> list[Block]:
    """Representativeness by group (one figure per attribute), each model source beside the
    human baselines: the overall population as a prediction of the group (its average and
    worst are OpinionQA's "human average" and "human worst")."""
    import matplotlib.pyplot as plt

    g = result.groups
    if not len(g):
        return []
    g = g[g["group"].str.contains("=") & ~g["group"].str.contains(", ")]
    out: list[Block] = []
    attrs = list(dict.fromkeys(g["group"].str.split("=").str[0]))
    sources = [s for s in dict.fromkeys(g["source"]) if s not in ("uniform", "majority")]
    for attr in attrs:
        sub = g[g["group"].str.startswith(attr + "=")]
        groups = list(dict.fromkeys(sub["group"]))
        fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.32 * len(groups) * max(1, len(sources)) / 2))
        y = np.arange(len(groups))
        h = 0.8 / max(1, len(sources))
        for i, source in enumerate(sources):
            rows = sub[sub["source"] == source].set_index("group").reindex(groups)
            pos = y + (i - (len(sources) - 1) / 2) * h
            err = np.vstack(
                [
                    rows["representativeness"] - rows["ci_low"],
                    rows["ci_high"] - rows["representativeness"],
                ]
            )
            ax.barh(
                pos,
                rows["representativeness"],
                h,
                xerr=np.nan_to_num(err),
                label=source,
                color=f"C{i % 10}",
            )
        lo = float(np.nanmin(sub["ci_low"].fillna(sub["representativeness"])))
        ax.set_xlim(max(0.0, lo - 0.05), 1.0)
        ax.set_yticks(y, [x.split("=", 1)[1] for x in groups], fontsize=7)
        ax.set_xlabel("representativeness (mean over questions of 1 - nW1; 1 - TV if nominal)")
        ax.set_title(attr, fontsize=9)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        fig.tight_layout()
        out.append(
            Figure_(
                fig,
                f"compare_groups_{attr}",
                f"representativeness by {attr} with 95% intervals (bootstrap over questions), "
                "beside the human baseline (the overall population predicting each group)",
            )
        )
    return out


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


def _expected_score_figure(result: CompareResult, ref: str, q: Question) -> Figure_:
    """One hollow marker shape and size per source, the largest drawn first, so a series that
    coincides with another (an answer-position estimate equal to the logits) stays visible;
    the legend names every source, those without data too."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    base = _scores(result.sources[ref], q)
    others = [n for n in result.sources if n != ref]
    handles = []
    for i, name in enumerate(others):
        other = _scores(result.sources[name], q)
        both = base.index.intersection(other.index)
        marker, color = MARKERS[i % len(MARKERS)], f"C{i % 10}"
        size = max(6.0, 30.0 - 6.0 * i)
        if len(both):
            ax.scatter(
                base[both],
                other[both],
                s=size,
                marker=marker,
                facecolors="none",
                edgecolors=color,
                linewidths=0.7,
                alpha=0.7,
                zorder=2 + i,
            )
        label = f"{name} ({plural(len(both), 'prompt')})" if len(both) else f"{name}: no data"
        handles.append(
            Line2D([], [], ls="", marker=marker, mfc="none", mec=color, ms=6, label=label)
        )
    lo, hi = min(q.values or (0.0,)), max(q.values or (1.0,))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, zorder=1)
    ax.set_xlabel(f"expected score, {ref}")
    ax.set_ylabel("expected score, other source")
    ax.set_title(q.id, fontsize=10)
    ax.legend(
        handles=handles,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1),
        borderaxespad=0,
        frameon=False,
    )
    fig.tight_layout()
    return Figure_(
        fig,
        "compare_expected_score",
        "expected ordinal score per prompt: logits vs each other source (one marker shape "
        "per source; a source on the diagonal agrees with the logits)",
    )


def short_persona_labels(personas: list[str], width: int = 48) -> tuple[list[str], str]:
    """Readable labels for `factor=value|...` persona ids: the values only, in factor order,
    without the factors every persona shares (returned apart, for the axis title), wrapped
    at `width`. A coarse persona (some factors `*`) shows its set factors as `factor=value`
    and ends in "(coarse)"."""
    import textwrap

    parts = [[kv.partition("=") for kv in p.split("|")] for p in personas]
    same = {
        j
        for j in range(min(map(len, parts), default=0))
        if len({tuple(x[j]) for x in parts}) == 1 and len(personas) > 1
    }
    shared = "; ".join(
        f"{parts[0][j][0]}={parts[0][j][2]}" if parts[0][j][1] else parts[0][j][0]
        for j in sorted(same)
    )
    labels = []
    for x in parts:
        kept = [(k, sep, v) for j, (k, sep, v) in enumerate(x) if j not in same]
        if any(sep and v == "*" for k, sep, v in kept):
            set_ = [f"{k}={v}" for k, sep, v in kept if sep and v != "*"]
            text = (", ".join(set_) or "everyone") + " (coarse)"
        else:
            text = " · ".join(v if sep else k for k, sep, v in kept) or "(all)"
        labels.append("\n".join(textwrap.wrap(text, width)) or text)
    return labels, shared


def _factor_order(personas: list[str], shared: str) -> str:
    """`age · party · region`: the factors of `factor=value|...` persona ids that the labels
    show (not those in `shared`); "" for ids of another form."""
    pairs = [kv.partition("=") for kv in personas[0].split("|")] if personas else []
    if not pairs or not all(sep for _, sep, _ in pairs):
        return ""
    gone = {kv.partition("=")[0] for kv in shared.split("; ")}
    return " · ".join(k for k, _, _ in pairs if k not in gone)


def mismatch_figure(mm: pd.DataFrame, max_rows: int = MAX_PERSONA_ROWS) -> Figure_:
    """Dot plot of the first-token vs text mismatch per persona: one row per persona sorted by
    its mean over runs, one marker per run; at most `max_rows` rows (the highest and lowest
    halves), the number left out said in the title. Height grows with the rows."""
    import matplotlib.pyplot as plt

    mm = mm.assign(persona_id=mm["persona_id"].astype(str))
    wide = mm.pivot_table(index="persona_id", columns="run", values="sample_mismatch")
    wide = wide.loc[wide.mean(axis=1).sort_values().index]
    n_all = len(wide)
    if n_all > max_rows:
        half = max_rows // 2
        wide = pd.concat([wide.iloc[:half], wide.iloc[-half:]])
    labels, shared = short_persona_labels([str(p) for p in wide.index])
    lines = sum(lab.count("\n") + 1 for lab in labels)
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.17 * lines + 0.05 * len(labels)))
    y = np.arange(len(wide))
    for i, run in enumerate(wide.columns):
        ax.scatter(
            wide[run],
            y,
            marker=MARKERS[i % len(MARKERS)],
            s=28,
            facecolors="none",
            edgecolors=f"C{i % 10}",
            linewidths=1.0,
            label=str(run),
            zorder=3,
        )
    ax.hlines(y, wide.min(axis=1), wide.max(axis=1), color="#bbb", lw=1, zorder=2)
    if n_all > max_rows:
        ax.axhline(max_rows // 2 - 0.5, color="k", ls=":", lw=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_ylim(-0.7, len(wide) - 0.3)
    ax.grid(axis="x", color="#eee")
    ax.set_xlabel("share of sampled answers differing from the logits' argmax option")
    order = _factor_order([str(p) for p in wide.index], shared)
    if order:
        ax.set_ylabel(f"persona ({order})", fontsize=8)
    title = "mismatch by persona, sorted"
    if n_all > max_rows:
        title += f" (the {max_rows // 2} lowest and highest of {plural(n_all, 'persona')})"
    if shared:
        title += f"\nall personas: {shared}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    return Figure_(
        fig,
        "compare_mismatch_by_persona",
        "first-token vs text mismatch by persona, one row per persona (its factor values; "
        "a coarse persona leaves some factors unspecified), sorted by the mean over runs",
    )


def _scores(frame: pd.DataFrame, question: Question) -> pd.Series:
    assert question.values is not None
    sub = frame[frame["question_id"] == question.id]
    values = np.asarray(question.values)[sub["option_id"].to_numpy(dtype=int)]
    return sub.assign(s=sub["prob"] * values).groupby("key")["s"].sum()
