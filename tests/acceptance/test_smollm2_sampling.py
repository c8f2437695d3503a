"""SmolLM2-135M-Instruct: the answer-position slots read from the decoding step and from the
batched prompt-cache forwards equal one plain whole-sequence forward per (sample, option)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from tests.acceptance.test_smollm2 import GGUF, _study, pytestmark  # noqa: F401
from tests.integration.test_sampling import _old_forced_slots
from workbench.engine.models import LoadedModel, load_model
from workbench.measure import answer_position as A
from workbench.measure import decoding as D
from workbench.measure.answers import option_surfaces
from workbench.measure.sampling import SamplingConfig
from workbench.study import prompts as P


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    assert GGUF is not None
    return load_model(GGUF, dtype="float32", device="cpu")


def test_forced_slots_equal_whole_sequence_forwards(lm: LoadedModel) -> None:
    """No prefill (answers such as "A." and "Very serious" at the first token). Through 30
    layers in float32 the batched paths differ from a lone forward by summation order only."""
    study = _study(prefill=None)
    study = dataclasses.replace(study, cells=study.cells[:1])
    plans = D.plan_prompts(study, P.render(study, lm.tokenizer)[:3], lm.tokenizer, False)
    config = SamplingConfig(n=3, seed=0, temperature=0.8, max_new_tokens=3, progress=False)
    rows, records = D.run_wave(lm, plans, config, 3, False, D.eos_ids(lm))
    kinds = [{s.kind for s in option_surfaces(p.question, p.prompt.order)} for p in plans]
    stats = A.ForcedStats()
    for j, before, kind in ((0, "", "label"), (1, " ", "label"), (0, "", "text")):
        fallback: list[tuple[int, int, str, str]] = [
            (r, min(j, len(row.ids) - 1), before, kind)
            for r, row in enumerate(rows)
            if row.ids and kind in kinds[row.prompt]
        ]
        out: list[dict[str, Any]] = [{} for _ in rows]
        A.forced_slots(lm, plans, rows, fallback, records, config, out, stats)
        for r, (logp, probs) in _old_forced_slots(lm, plans, rows, fallback, config).items():
            np.testing.assert_allclose(out[r]["answer_logprobs"], logp, atol=5e-5, rtol=0)
            np.testing.assert_allclose(out[r]["answer_probs"], probs, atol=1e-5, rtol=0)
    assert stats.from_records > 0 and stats.forward_rows > 0
