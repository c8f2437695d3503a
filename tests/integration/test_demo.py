"""`workbench demo` end to end on the small organism: every section, standalone HTML."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workbench.cli import main


def test_demo_writes_a_standalone_report(
    small_organism: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--scale", "small"]) == 0
    # every stage announces itself, in order, before it runs
    stages = re.findall(r"\[demo (\d)/(\d)\]", capsys.readouterr().err)
    assert [int(n) for n, _ in stages] == list(range(1, int(stages[0][1]) + 1))
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for heading in (
        "Recovering the planted truth",
        "Zero-effect factors",
        "position bias",
        "Option mass",
        "Sampled and verbalized",
        "Probes",
        "What drives the answer",
    ):
        assert heading.lower() in md.lower(), heading
        assert heading.lower() in html.lower(), heading
    # standalone: every image is embedded, nothing is fetched from elsewhere
    sources = re.findall(r'src="([^"]+)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in html and "<script src" not in html
    for png in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (out / png).is_file(), png
    for run in ("distributions", "orders"):
        assert (out / run / "manifest.json").is_file(), run
    # the organism's truth is recovered in the report's own table
    js = re.search(r"held-out titles: mean JS distance \(base 2\) \| ([0-9.]+)", md)
    assert js is not None and float(js.group(1)) <= 0.05
