"""Benchmark: `workbench compare` on a survey of OpinionQA's full shape (synthetic, no model).

Usage (from the repository root)::

    python -m scripts.bench_survey            # table -> results/benchmarks/survey_cpu.md
    python -m scripts.bench_survey --quick --out -   # 60 questions, 20,000 rows (a smoke test)
    python -m scripts.bench_survey --report          # + report.html: MB, widest PNG, warnings

The survey (`workbench.compare.synthetic`): 1,500 questions of 2 to 11 options (non-1..N
and nominal ordinal values, two refusal options), 60 groups over 12 attributes, 1,000,000
weighted respondent-question rows, three model sources (distributions runs over everyone and
the 60 groups). Times: loading the human file (`load_human`), and the whole comparison
(`compare`, tables only, then the report); peak memory is the process's maximum RSS. Goals:
load under 30 s, compare under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

from workbench.compare.comparison import CompareConfig, compare, write_comparison
from workbench.compare.human import load_human
from workbench.compare.synthetic import SurveyShape, make_survey, write_model_runs, write_survey
from workbench.runs import short_git_hash
from workbench.study.load import load_study


def _report_note(out: Path, caught: list[warnings.WarningMessage]) -> str:
    """Size of report.html, its images' widest width (goal: under ~2,000 px) and the warnings
    written while drawing it (goal: none)."""
    from PIL import Image

    size = (out / "report.html").stat().st_size / 1e6
    widths = [Image.open(p).size[0] for p in out.glob("*.png")]
    for w in caught:
        print(f"warning while writing the report: {w.category.__name__}: {w.message}")
    return (
        f"{size:.1f} MB report.html (goal < 5 MB); {len(widths)} images, the widest "
        f"{max(widths, default=0):,} px; {len(caught)} warnings |"
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 questions, 20,000 rows")
    parser.add_argument("--report", action="store_true", help="also time report.html")
    parser.add_argument("--out", default="results/benchmarks/survey_cpu.md")
    args = parser.parse_args(argv)
    code = short_git_hash()  # at the start: the code the run uses
    shape = (
        SurveyShape(n_questions=60, n_rows=20_000, questions_per_respondent=30)
        if args.quick
        else SurveyShape()
    )
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        survey = make_survey(shape)
        paths = write_survey(tmp, survey)
        runs = write_model_runs(tmp, survey, shape.n_sources)
        t_make = time.perf_counter() - t0
        study = load_study(paths["study"])
        t0 = time.perf_counter()
        load_human(paths["human"], study)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_dirs: list[str | Path] = [*runs]
        result = compare(run_dirs, paths["human"], None, CompareConfig(), study=study)
        t_compare = time.perf_counter() - t0
        t0 = time.perf_counter()
        human_only = compare([], paths["human"], None, CompareConfig(), study=study)
        t_human = time.perf_counter() - t0
        report = ""
        if args.report:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = write_comparison(
                    result, Path(tmp) / "compare", {q.id: q for q in study.questions}
                )
            t_report = time.perf_counter() - t0
            report = (
                f"| report (tables + figures + report.html) | {t_report:.1f} | "
                + _report_note(out, caught)
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    timings = result.manifest["timings_s"]
    command = (
        "python -m scripts.bench_survey"
        + (" --quick" if args.quick else "")
        + (" --report" if args.report else "")
    )
    lines = [
        "# Survey benchmark: `workbench compare` at OpinionQA's scale (synthetic survey)",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; git {code}",
        f"- Machine: {os.cpu_count()} CPU cores, {platform.machine()}; 1-min load average "
        f"{load:.2f} before, {os.getloadavg()[0]:.2f} after; Python {platform.python_version()}",
        f"- Survey: {shape.n_questions:,} questions (2 to 11 options + 2 refusal options, a third "
        f"nominal), {shape.n_attributes} attributes x {shape.values_per_attribute} values = "
        f"{shape.n_attributes * shape.values_per_attribute} groups, "
        f"{len(survey.respondents):,} weighted respondent-question rows, "
        f"{shape.n_sources} model sources (distributions runs over everyone + each group: "
        f"{len(result.cell_sources['human']['key'].unique()):,} cells)",
        f"- Peak memory (max RSS of the process): {peak:.2f} GB",
        "",
        "| step | seconds | note |",
        "|---|---:|---|",
        f"| generate and write the survey and runs | {t_make:.1f} | not part of the goal |",
        f"| load the human file (`load_human`) | {t_load:.1f} | goal < 30 s |",
        f"| compare: 3 model sources + human (tables) | {t_compare:.1f} | goal < 60 s; of it: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k != "total")
        + " |",
        f"| compare: human data alone (`--human --study`, no run) | {t_human:.1f} | "
        f"{len(human_only.human_pairs):,} group pairs |",
        *([report] if report else []),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
