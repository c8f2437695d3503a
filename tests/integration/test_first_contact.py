"""What a new user meets first: a fast --help, bad folders refused before the model loads,
documented exit codes, a resumed run that says so, and warnings for low option mass."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.measure.distributions import DistributionConfig, compute_distributions
from workbench.runs import RunFolder
from workbench.study.load import load_study

EXAMPLE = Path(__file__).resolve().parents[2] / "probes" / "example.yaml"


def _imported_after(code: str) -> set[str]:
    """Heavy modules imported by running `code` in a fresh interpreter."""
    probe = (
        f"{code}\nimport sys, json\n"
        "print(json.dumps([m for m in ('torch', 'transformers', 'transformer_lens', 'pandas') "
        "if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_and_validate_import_no_torch() -> None:
    """`--help` and `validate` start in well under a second because they import neither torch
    nor transformers (scripts/bench_startup.py times it against `import torch`)."""
    assert _imported_after("import workbench") == set()
    assert (
        _imported_after(
            "from workbench.cli import main\n"
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    main(['validate', {str(EXAMPLE)!r}])\n"
            "try:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        main(['distributions', '--help'])\n"
            "except SystemExit:\n"
            "    pass"
        )
        == set()
    )


def test_public_names_still_resolve() -> None:
    import workbench as wb

    assert wb.load_study(EXAMPLE).name == "example"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = wb.nope  # type: ignore[attr-defined]


def test_other_run_in_out_folder_is_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(
        json.dumps({"schema_version": 1, "identity": {"study": "another", "model": "m"}})
    )
    # The model does not exist: had it been loaded first, the exit code would be 3.
    code = main(
        ["distributions", str(EXAMPLE), "--model", str(tmp_path / "none"), "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "holds a different run" in err and "study='another'" in err and "fix:" in err
    assert "Traceback" not in err

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    code = main(["sample", str(EXAMPLE), "--model", str(tmp_path / "none"), "--out", str(stray)])
    assert code == 2 and "not a workbench run folder" in capsys.readouterr().err
    assert (stray / "notes.txt").read_text() == "mine"


def test_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["distributions", "--help"])
    text = capsys.readouterr().out
    assert "(default: 256)" in text and "(default: auto)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_low_option_mass_warns_and_resume_announces(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A random-weight model puts almost no mass on the option labels: every question is
    named in a warning with the tokens it wanted, and the manifest records it."""
    from workbench.engine.models import load_model

    lm = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    study = load_study(EXAMPLE)
    out = tmp_path / "d"
    config = DistributionConfig(chunk_prompts=8, progress=True)
    result = compute_distributions(study, lm, out, config)
    err = capsys.readouterr().err
    warnings = result.manifest["warnings"]
    mass = result.prompt_stats.merge(result.prompts, on="prompt_id").groupby("question_id")[
        "option_mass"
    ]
    assert {w["question_id"] for w in warnings} == set(mass.mean()[mass.mean() < 0.5].index)
    assert warnings, "a random model should put little mass on the labels"
    for w in warnings:
        assert f"question {w['question_id']!r}: mean option mass" in err
        assert w["top_tokens"] and w["mean_option_mass"] < 0.5
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["warnings"] == warnings

    # A run stopped after its first chunk says where it picks up.
    again = tmp_path / "again"

    def stop(self: RunFolder, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RunFolder, "finish", stop)
        with pytest.raises(KeyboardInterrupt):
            compute_distributions(study, lm, again, config)
    chunks = sorted((again / "chunks").iterdir())
    assert len(chunks) > 1
    kept = pd.read_parquet(chunks[0] / "distributions.parquet")["prompt_id"].nunique()
    for chunk in chunks[1:]:
        shutil.rmtree(chunk)
    capsys.readouterr()
    compute_distributions(study, lm, again, config)
    err = capsys.readouterr().err
    assert f"resuming {again}: {kept} of {len(result.prompts):,} prompts done" in err


def test_thread_choice_is_recorded_and_overridable() -> None:
    import torch

    from workbench.engine.threads import choose_threads

    before = torch.get_num_threads()
    try:
        auto = choose_threads("auto", "cpu")
        assert auto["threads"] == torch.get_num_threads()
        assert set(auto["timings_ms"]) >= {"1"} and auto["how"].startswith("measured")
        assert choose_threads("1", "cpu") == {"threads": 1, "how": "given"}
        assert torch.get_num_threads() == 1
        with pytest.raises(WorkbenchError, match="not a thread count"):
            choose_threads("many", "cpu")
    finally:
        torch.set_num_threads(before)
