"""The acceptance tests' reference: a plain HF forward of each rendered prompt."""

from __future__ import annotations

import torch

from workbench.engine.models import LoadedModel
from workbench.measure.distributions import DistributionConfig, compute_distributions
from workbench.study.prompts import render
from workbench.study.spec import Study


def worst_logprob_error(lm: LoadedModel, study: Study, config: DistributionConfig) -> float:
    """Largest |log-prob| difference between `compute_distributions` under `config` and a
    plain HF forward of each prompt alone (float32 log-softmax at its last token)."""
    result = compute_distributions(study, lm, None, config)
    prompts = {p.prompt_id: p for p in render(study, lm.tokenizer)}
    worst = 0.0
    for pid, rows in result.variants.groupby("prompt_id"):
        ids = torch.tensor([prompts[int(pid)].input_ids])
        with torch.no_grad():
            ref = lm.model(ids).logits[0, -1].float().log_softmax(-1)
        for row in rows.itertuples():
            worst = max(worst, abs(float(ref[int(row.token_ids[0])]) - float(row.logprob)))
    return worst
