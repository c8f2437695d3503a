"""`workbench report`: a distributions run and a sampling run of the tiny model, with and
without human data, give one standalone HTML page with every section and no image wider
than the page allows."""

from __future__ import annotations

import base64
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from workbench.cli import main
from workbench.compare import run_report as R
from workbench.measure.distributions import DistributionConfig, compute_distributions
from workbench.measure.sampling import SamplingConfig, compute_samples
from workbench.study.load import load_study, parse_study

EXAMPLE = Path(__file__).resolve().parents[2] / "probes" / "example.yaml"
SECTIONS = (
    "Runs",
    "Distributions by persona factor",
    "Option mass and warnings",
    "Position bias",
    "Sampling status rates",
)


@pytest.fixture(scope="module")
def runs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from workbench.engine.models import load_model

    lm = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    study = load_study(EXAMPLE)
    out = tmp_path_factory.mktemp("runs")
    compute_distributions(study, lm, out / "dist", DistributionConfig(progress=False))
    compute_samples(study, lm, out / "samp", SamplingConfig(n=2, max_new_tokens=4, progress=False))
    rng = np.random.default_rng(0)
    rows = [
        {"question_id": q.id, "party": party, "answer": rng.choice(q.options), "weight": 1.0}
        for q in study.questions
        for party in ("Democrat", "Republican", "Independent")
        for _ in range(20)
    ]
    pd.DataFrame(rows).to_csv(out / "human.csv", index=False)
    return {"dist": out / "dist", "samp": out / "samp", "human": out / "human.csv"}


def _images(page: str) -> list[tuple[int, int]]:
    from PIL import Image

    sizes = []
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        sizes.append(Image.open(io.BytesIO(base64.b64decode(data))).size)
    return sizes


def _check_standalone(page: str) -> None:
    assert "<link" not in page and "<script" not in page
    assert not re.search(r'src="(?!data:)', page), "every image is embedded"


def test_report_of_runs_has_every_section(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no matplotlib warnings either
        assert main(["report", str(runs["dist"]), str(runs["samp"]), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    _check_standalone(page)
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    for name in ("dist: by age", "dist: by party", "samp: by party"):
        assert f"<h3>{name}</h3>" in page
    assert "Low option mass" in page  # the random model's own warnings
    assert "samp: sampling status" in page
    sizes = _images(page)
    assert len(sizes) >= 4 and all(w <= 2000 for w, _ in sizes)
    assert "Against human data" not in page


def test_report_with_human_data_and_pages(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main(["report", str(runs["dist"]), "--human", str(runs["human"]), "--out", str(out)])
    assert code == 0
    page = (out / "report.html").read_text()
    _check_standalone(page)
    assert "<h2>Against human data</h2>" in page
    assert "survey metrics per source" in page and "representativeness per source" in page
    assert "Sampling status rates" in page and "No sampling run." in page

    # many questions: pages of PAGE_QUESTIONS panels, capped, never wider than ~2,000 px
    many = pd.concat(
        [
            pd.DataFrame(
                {
                    "prompt_id": np.repeat(np.arange(3) + 3 * i, 2),
                    "question_id": f"q{i}",
                    "party": np.repeat(["Democrat", "Republican", "Independent"], 2),
                    "option_id": np.tile([0, 1], 3),
                    "prob": 0.5,
                }
            )
            for i in range(30)
        ]
    )
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["questions"] = [{**raw["questions"][0], "id": f"q{i}"} for i in range(30)]
    many_study = parse_study(raw, str(EXAMPLE))
    blocks = R._factor_pages("many", many, many_study, "party", R.ReportConfig(max_questions=20))
    figures = [b for b in blocks if isinstance(b, R.Figure_)]
    assert len(figures) == 2 and "first 20 questions of 30" in blocks[0].body  # type: ignore[union-attr]
    for f in figures:
        width = f.figure.get_figwidth() * 110
        assert width <= 2000
