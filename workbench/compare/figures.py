"""Report blocks and figures of a comparison.

`report_blocks(result)` turns a `CompareResult` into report blocks (tables with their 95%
intervals, three figures: per-question distributions side by side, expected score logits vs
the others, mismatch by persona).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from workbench.report import Block, Figure_, Heading, Table, Text
from workbench.study.spec import Question

if TYPE_CHECKING:
    from workbench.compare.comparison import CompareResult

FIRST_TOKEN_CAVEAT = (
    "A sampled answer that is a single first token, drawn at temperature 1 from the same "
    "prompt, follows exactly the logit distribution (docs/MEASUREMENT.md §3): a sampled-vs-logits "
    "difference is only informative for free text (preambles, chat templates) or other "
    "elicitations; below the sampling floor it is noise."
)


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


def report_blocks(result: CompareResult, questions: dict[str, Question]) -> list[Block]:
    """Tables and figures of a comparison (values with bootstrap 95% intervals)."""
    blocks: list[Block] = [
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
                Table(
                    table,
                    "mean over prompts [bootstrap 95% interval]; TV, JS distance (base 2), "
                    "KL(logits ‖ source) in bits, normalized W1; floor: expected TV of N draws "
                    "from the logit distribution, q95: 95th percentile of its mean",
                ),
            ]
    if len(result.rates):
        cols = ["ok_rate", "refusal_rate", "unparseable_rate"]
        rates = result.rates
        table = rates[["run", "elicitation", "n_samples"]].copy()
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
        if "failures" in rates.columns:
            table["failures"] = rates["failures"].fillna("")
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
    if len(result.properties):
        p = result.properties
        table = _with_ci(
            p,
            ["normalized_entropy", "expected_score", "modal_share"],
            ["source", "question_id", "n_cells"],
        )
        blocks += [
            Heading("Distribution properties per source", 3),
            Table(table, "mean over cells [95% interval]"),
        ]
    blocks += _figures(result, questions)
    return blocks


# --------------------------------------------------------------------------------------------
# figures


def _figures(result: CompareResult, questions: dict[str, Question]) -> list[Block]:
    import matplotlib.pyplot as plt

    out: list[Block] = []
    cell = {n: f for n, f in result.cell_sources.items() if result.kinds[n] != "baseline"}
    qids = [q for q in questions if any((f["question_id"] == q).any() for f in cell.values())]
    if qids:
        fig, axes = plt.subplots(1, len(qids), figsize=(5.5 * len(qids), 3.6), squeeze=False)
        for ax, qid in zip(axes[0], qids, strict=True):
            k = len(questions[qid].options)
            names = [n for n, f in cell.items() if (f["question_id"] == qid).any()]
            width = 0.8 / max(1, len(names))
            for i, name in enumerate(names):
                f = cell[name]
                mean = (
                    f[f["question_id"] == qid]
                    .groupby("option_id")["prob"]
                    .mean()
                    .reindex(range(k))
                    .fillna(0)
                )
                ax.bar(np.arange(k) + (i - (len(names) - 1) / 2) * width, mean, width, label=name)
            ax.set_xticks(
                np.arange(k), [o[:12] for o in questions[qid].options], rotation=20, fontsize=8
            )
            ax.set_title(qid, fontsize=10)
            ax.set_ylabel("mean probability over cells")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7)
        fig.tight_layout(rect=(0, 0.08 + 0.04 * (len(labels) // 4), 1, 1))
        out.append(
            Figure_(
                fig,
                "compare_distributions",
                "per question: every source's mean distribution, side by side",
            )
        )
    ref = result.reference
    ordinal = [q for q in questions.values() if q.values is not None]
    if ref is not None and ordinal:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        q = ordinal[0]
        base = _scores(result.sources[ref], q)
        for name, frame in result.sources.items():
            if name == ref:
                continue
            other = _scores(frame, q)
            both = base.index.intersection(other.index)
            if len(both):
                ax.scatter(base[both], other[both], s=5, alpha=0.5, label=name)
        lo, hi = min(q.values or (0.0,)), max(q.values or (1.0,))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"expected score, {ref}")
        ax.set_ylabel("expected score, other source")
        ax.set_title(q.id, fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(
            Figure_(
                fig,
                "compare_expected_score",
                "expected ordinal score per prompt: logits vs each other source",
            )
        )
    mm = result.mismatch_by_persona
    if len(mm):
        personas = sorted(mm["persona_id"].astype(str).unique())
        runs = list(mm["run"].unique())
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(personas) * max(1, len(runs) / 2) + 1.5))
        height = 0.8 / len(runs)
        for i, name in enumerate(runs):
            grp = mm[mm["run"] == name]
            grp = grp.set_index(grp["persona_id"].astype(str))
            y = np.arange(len(personas)) + (i - (len(runs) - 1) / 2) * height
            ax.barh(y, grp["sample_mismatch"].reindex(personas), height, label=str(name))
        ax.set_yticks(np.arange(len(personas)), personas)
        ax.set_xlabel("share of sampled answers differing from the logits' argmax option")
        ax.tick_params(axis="y", labelsize=6)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(
            Figure_(fig, "compare_mismatch_by_persona", "first-token vs text mismatch by persona")
        )
    return out


def _scores(frame: pd.DataFrame, question: Question) -> pd.Series:
    assert question.values is not None
    sub = frame[frame["question_id"] == question.id]
    values = np.asarray(question.values)[sub["option_id"].to_numpy(dtype=int)]
    return sub.assign(s=sub["prob"] * values).groupby("key")["s"].sum()
