"""Reports as a newcomer reads them (no model): wide tables scroll, failed runs are announced
where they cannot be missed, no figure hides a series, position axes have whole-number
ticks, long persona labels stay readable, counts agree with their nouns."""

from __future__ import annotations

import re
import types
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from workbench.compare.comparison import CompareResult
from workbench.compare.figures import (
    failure_callouts,
    mismatch_figure,
    report_blocks,
    short_persona_labels,
)
from workbench.demo.pipeline import _bias_figure, _mass_figure
from workbench.interp.probing import accuracy_figure
from workbench.report import Callout, Heading, Table, Text, plural, write_report
from workbench.study.spec import Question

PERSONA_FACTORS = {
    "age": ["18-29", "30-44", "45-64", "65+"],
    "party": ["Democrat", "Republican", "Independent"],
    "region": ["Northeast", "Midwest", "South", "West"],
    "favourite_genre": ["comedies", "dramas", "westerns"],
}


def _personas(n: int) -> list[str]:
    """`n` distinct long persona ids of the organism's form `age=..|party=..|...`."""
    rng = np.random.default_rng(0)
    out: set[str] = set()
    while len(out) < n:
        out.add("|".join(f"{f}={rng.choice(v)}" for f, v in PERSONA_FACTORS.items()))
    return sorted(out)


def _rates(ok_rates: dict[str, float], n: int = 270) -> pd.DataFrame:
    rows = []
    for run, ok in ok_rates.items():
        row = {"run": run, "elicitation": "verbalized" if "verbal" in run else "answer"}
        row["n_samples"] = n
        for status, value in (("ok", ok), ("refusal", 0.0), ("unparseable", 1 - ok)):
            row |= {f"{status}_rate": value, f"{status}_lo": value, f"{status}_hi": value}
        row["failures"] = f"json {round((1 - ok) * n)}" if ok < 1 else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _result(rates: pd.DataFrame | None = None, **tables: object) -> CompareResult:
    empty = pd.DataFrame()
    fields: dict[str, object] = {
        "sources": {},
        "cell_sources": {},
        "kinds": {},
        "reference": None,
        "pairs": empty,
        "summary": empty,
        "properties": empty,
        "rates": rates if rates is not None else empty,
        "human": empty,
        "structural": empty,
        "mismatch_by_persona": empty,
    }
    fields.update(tables)
    return CompareResult(**fields)


def _tick_values(ax: plt.Axes) -> np.ndarray:
    ax.figure.canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = np.asarray(ax.get_xticks(), dtype=float)
    return ticks[(ticks >= lo) & (ticks <= hi)]


# --------------------------------------------------------------------------------------------
# text


@pytest.mark.parametrize(
    ("n", "word", "expected"),
    [(1, "question", "1 question"), (2, "question", "2 questions"), (0, "cell", "0 cells")],
)
def test_plural(n: int, word: str, expected: str) -> None:
    assert plural(n, word) == expected


def test_plural_irregular_and_thousands() -> None:
    assert plural(1, "child", "children") == "1 child"
    assert plural(1200, "child", "children") == "1,200 children"


def test_inline_markup(tmp_path: Path) -> None:
    html, md = write_report(
        tmp_path,
        "t",
        [
            Heading("The comparison (`workbench compare`)", 3),
            Text("the *unseen movies* world; persona age=*|party=* stays as written"),
        ],
    )
    page = html.read_text()
    assert "<h3>The comparison (<code>workbench compare</code>)</h3>" in page
    assert "<i>unseen movies</i>" in page
    assert "age=*|party=*" in page
    assert "*unseen movies*" in md.read_text()


# --------------------------------------------------------------------------------------------
# tables


def test_wide_table_scrolls_inside_the_page(tmp_path: Path) -> None:
    wide = pd.DataFrame(
        {f"a_rather_long_column_name_{i}": ["0.123 [0.100, 0.150]", None] for i in range(14)}
    )
    wide.insert(0, "source", ["constrained (answer position)", "x"])
    wide["note"] = ["reported (trained towards the mixture; sampled: + sampling noise)", ""]
    html, _ = write_report(tmp_path, "t", [Table(wide, "caption")])
    page = html.read_text()
    assert ".table-wrap { overflow-x: auto" in page
    # every table sits in the scrolling wrapper, nothing outside it
    assert page.count("<table>") == 1
    assert re.search(r'<div class="table-wrap"><table>.*?</table></div>', page, re.S)
    # a value with its interval never wraps; text may; long headers may break at "_"
    assert '<td class="num">0.123 [0.100, 0.150]</td>' in page
    assert '<td class="txt short">constrained (answer position)</td>' in page
    assert '<td class="txt">reported (trained towards' in page  # long text may wrap
    assert "a_<wbr>rather_<wbr>long" in page
    assert ">None<" not in page


def test_table_has_no_pandas_artifacts(tmp_path: Path) -> None:
    pivot = pd.DataFrame({"n": [1, 2, 1, 2], "estimator": list("aabb"), "v": [1.0, 2, 3, 4]})
    pivot = pivot.pivot_table(index="n", columns="estimator", values="v").reset_index()
    html, _ = write_report(tmp_path, "t", [Table(pivot)])
    head = re.search(r"<thead>(.*?)</thead>", html.read_text()).group(1)
    assert head == "<tr><th>n</th><th>a</th><th>b</th></tr>"


# --------------------------------------------------------------------------------------------
# failed runs


def test_failed_verbalized_run_gets_a_callout_at_the_top(tmp_path: Path) -> None:
    result = _result(_rates({"sampled": 0.998, "verbalized": 0.0}))
    blocks = report_blocks(result, {})
    assert isinstance(blocks[0], Callout)
    assert "`verbalized`" in blocks[0].body and "failed entirely" in blocks[0].body
    assert "270 answers" in blocks[0].body and "json 270" in blocks[0].body
    assert sum(isinstance(b, Callout) for b in blocks) == 1  # the healthy run: none
    html, md = write_report(tmp_path, "t", blocks)
    page = html.read_text()
    assert page.index('class="callout"') < page.index("<table>")
    assert "> **Warning:** `verbalized` (verbalized) failed entirely" in md.read_text()


def test_failures_column_sits_next_to_the_run() -> None:
    blocks = report_blocks(_result(_rates({"verbalized": 0.0})), {})
    table = next(b for b in blocks if isinstance(b, Table))
    assert list(table.frame.columns[:4]) == ["run", "elicitation", "n_samples", "failures"]


def test_mostly_failed_run_gets_a_note_and_callouts_can_move() -> None:
    result = _result(_rates({"sampled": 0.3}))
    (note,) = failure_callouts(result)
    assert isinstance(note, Callout) and note.title == "Note"
    assert "81 answers of 270 (30%)" in note.body
    blocks = report_blocks(result, {}, warnings=False)
    assert not any(isinstance(b, Callout) for b in blocks)


# --------------------------------------------------------------------------------------------
# figures


def test_position_axis_has_integer_ticks() -> None:
    bias = pd.DataFrame(
        {"position": [0, 1, 2], "mean_prob": [0.26, 0.25, 0.49], "uniform": [1 / 3] * 3}
    )
    fig = _bias_figure(types.SimpleNamespace(position_bias=bias)).figure
    ticks = _tick_values(fig.axes[0])
    assert list(ticks) == [1.0, 2.0, 3.0]
    plt.close(fig)


def test_probe_layer_axis_has_integer_ticks_and_no_hidden_series() -> None:
    rows = []
    for layer in (-1, 0, 1):
        for pos in ("answer", "span_last:actor", "span_mean:actor"):
            for control in ("none", "control_task", "shuffled"):
                mean = 1.0 if control == "none" and pos != "answer" else 0.3
                rows.append(("actor", pos, control, layer, mean))
    probes = pd.DataFrame(rows, columns=["target", "position_label", "control", "layer", "mean"])
    probes = probes.assign(site_kind="hook_resid_post", metric="accuracy")
    fig = accuracy_figure(probes)
    ax = fig.axes[0]
    assert set(_tick_values(ax)) <= {-1.0, 0.0, 1.0}
    probe_lines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    # two positions both at 1.0: distinct markers and sizes, so both are seen
    assert len({ln.get_marker() for ln in probe_lines}) == 3
    assert len({ln.get_markersize() for ln in probe_lines}) == 3
    assert ax.get_ylim()[1] > 1.0
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "answer",
        "span_last:actor",
        "span_mean:actor",
    ]
    plt.close(fig)


def test_expected_score_scatter_shows_every_source() -> None:
    question = Question("rating", "?", ("1", "2", "3"), (), ("1", "2", "3"), (1.0, 2.0, 3.0))
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(20)]
    rows = [(k, "rating", o, p) for k in keys for o, p in enumerate(rng.dirichlet(np.ones(3)))]
    logits = pd.DataFrame(rows, columns=["key", "question_id", "option_id", "prob"])
    sources = {
        "logits": logits,
        "sampled": logits.assign(prob=logits["prob"] * 0.9 + 0.1 / 3),
        "constrained (answer position)": logits.copy(),  # exactly on top of the logits
        "verbalized": logits.iloc[0:0],  # failed: no rows
    }
    result = _result(sources=sources, reference="logits")
    figures = [b for b in report_blocks(result, {"rating": question}) if hasattr(b, "figure")]
    fig = next(f.figure for f in figures if f.name == "compare_expected_score")
    ax = fig.axes[0]
    drawn = ax.collections
    assert len(drawn) == 2
    assert len({tuple(c.get_sizes()) for c in drawn}) == 2  # sizes differ: nothing covered
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        "sampled (20 prompts)",
        "constrained (answer position) (20 prompts)",
        "verbalized: no data",
    ]
    plt.close(fig)


def test_short_persona_labels() -> None:
    personas = [
        "age=18-29|party=Independent|region=Midwest|favourite_genre=dramas",
        "age=65+|party=Independent|region=South|favourite_genre=westerns",
    ]
    labels, shared = short_persona_labels(personas)
    assert labels == ["18-29 · Midwest · dramas", "65+ · South · westerns"]
    assert shared == "party=Independent"
    coarse = ["age=*|party=Democrat|region=*", "age=*|party=*|region=*", "age=65+|party=x|region=y"]
    labels, shared = short_persona_labels(coarse)
    assert labels == ["party=Democrat (coarse)", "everyone (coarse)", "65+ · x · y"]
    assert shared == ""


def test_mismatch_chart_with_28_long_labels_is_readable() -> None:
    personas = _personas(28)
    rng = np.random.default_rng(1)
    mm = pd.DataFrame(
        [(p, run, rng.uniform(0.5, 0.7)) for p in personas for run in ("sampled", "constrained")],
        columns=["persona_id", "run", "sample_mismatch"],
    )
    fig = mismatch_figure(mm).figure
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 28
    assert not any("=" in lab for lab in labels)  # factor names dropped: values only
    assert max(len(line) for lab in labels for line in lab.split("\n")) <= 48
    assert ax.get_ylabel() == "persona (age · party · region · favourite_genre)"
    a, b = (c.get_offsets() for c in ax.collections[:2])  # one marker set per run
    assert len(a) == len(b) == 28
    row_means = (a[:, 0] + b[:, 0]) / 2
    assert np.all(np.diff(row_means) >= -1e-12)  # sorted by the mean over runs
    small = mismatch_figure(mm[mm["persona_id"].isin(personas[:5])]).figure
    assert fig.get_size_inches()[1] > 3 * small.get_size_inches()[1] / 2  # grows with rows
    assert fig.get_size_inches()[1] >= 0.2 * 28
    plt.close(fig)
    plt.close(small)


def test_mismatch_chart_caps_rows_and_says_so() -> None:
    personas = _personas(60)
    mm = pd.DataFrame(
        {"persona_id": personas, "run": "sampled", "sample_mismatch": np.linspace(0, 1, 60)}
    )
    fig = mismatch_figure(mm, max_rows=20).figure
    ax = fig.axes[0]
    assert len(ax.get_yticklabels()) == 20
    assert "of 60 personas" in ax.get_title()
    assert list(ax.collections[0].get_offsets()[[0, -1], 0]) == [0.0, 1.0]  # the extremes
    plt.close(fig)


def test_option_mass_histogram_shows_a_small_question() -> None:
    stats = pd.DataFrame(
        {"prompt_id": range(110), "option_mass": np.r_[np.full(100, 0.7), np.full(10, 0.4)]}
    )
    prompts = pd.DataFrame(
        {"prompt_id": range(110), "question_id": ["rating"] * 100 + ["attitude"] * 10}
    )
    main = types.SimpleNamespace(prompt_stats=stats, prompts=prompts)
    fig = _mass_figure(main).figure
    ax = fig.axes[0]
    heights = [p.get_path().vertices[:, 1].max() for p in ax.patches]
    assert heights == pytest.approx([1.0, 1.0])  # shares: the 10-prompt question is as tall
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["attitude (10 prompts)", "rating (100 prompts)"]
    plt.close(fig)


def test_figures_and_report_emit_no_warnings(tmp_path: Path) -> None:
    mm = pd.DataFrame(
        {"persona_id": _personas(28), "run": "sampled", "sample_mismatch": np.linspace(0, 1, 28)}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blocks = report_blocks(_result(_rates({"verbalized": 0.0}), mismatch_by_persona=mm), {})
        write_report(tmp_path, "t", blocks)
    assert (tmp_path / "compare_mismatch_by_persona.png").is_file()
