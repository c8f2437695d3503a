"""Reading a prompt's answer from its next-token log-probs, as every intervention does.

A `Reader` holds the token ids of each option variant of one prompt and how to turn the
full-vocabulary float32 log-probs at the last prompt token into the workbench's measurement
(the contract of `workbench.measure.distributions.summarize`, docs/MEASUREMENT.md §2): every
label variant aggregated (`sum` / `max` in probability space), renormalized over the
non-refusal options, expected ordinal score. Patching, attribution, steering and mediation
read their answers through it (next-token scoring only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from workbench.engine.models import LoadedModel
from workbench.study import prompts as P
from workbench.study.spec import Study


@dataclass(frozen=True)
class Reader:
    """Token ids of every option variant of one prompt, and how to read a distribution."""

    ids: Tensor
    """[option, variant] token ids, canonical option order (refusal options last)."""
    substantive: Tensor
    """[option] bool."""
    values: Tensor | None
    """[substantive option] float64 ordinal values, or None."""


def reader(study: Study, lm: LoadedModel, prompt: P.Prompt) -> Reader:
    """The `Reader` of one prompt (next-token scoring: every label is one token)."""
    targets = P.option_targets(study, prompt)
    n_opt = max(t.option_id for t in targets) + 1
    n_var = len(study.scoring.variants)
    ids = torch.zeros(n_opt, n_var, dtype=torch.long)
    refusal = torch.zeros(n_opt, dtype=torch.bool)
    for t in targets:
        (tok,) = P.continuation_ids(lm.tokenizer, study, prompt, t.surface)
        ids[t.option_id, t.variant] = tok
        refusal[t.option_id] = t.is_refusal
    q = next(q for q in study.questions if q.id == prompt.question_id)
    values = torch.tensor(q.values, dtype=torch.float64) if q.values is not None else None
    return Reader(ids, ~refusal, values)


def readers_for(study: Study, lm: LoadedModel, prompts: Iterable[P.Prompt]) -> dict[int, Reader]:
    """prompt_id -> `Reader`; prompts of one question and option order share one (a reader
    depends on nothing else under next-token scoring)."""
    by_order: dict[tuple[str, tuple[int, ...]], Reader] = {}
    out = {}
    for p in prompts:
        key = (p.question_id, p.order)
        if key not in by_order:
            by_order[key] = reader(study, lm, p)
        out[p.prompt_id] = by_order[key]
    return out


def distributions(logprobs: Tensor, readers: Sequence[Reader], aggregate: str) -> list[Tensor]:
    """Each row's substantive-option distribution (float64) from full-vocab float32 log-probs
    [row, vocab]. Rows of one batch may belong to questions with different options (or
    refusal layouts), so rows are read in groups that share a reader."""
    out: list[Tensor] = [torch.empty(0)] * len(readers)
    groups: dict[int, list[int]] = {}
    for row, r in enumerate(readers):
        groups.setdefault(id(r), []).append(row)
    for rows in groups.values():
        first = readers[rows[0]]
        index = torch.tensor(rows)
        ids = first.ids.expand(len(rows), *first.ids.shape)
        lp = logprobs[index].gather(1, ids.flatten(1)).view(ids.shape).double()
        agg = lp.logsumexp(-1) if aggregate == "sum" else lp.amax(-1)
        probs = torch.softmax(agg[:, first.substantive], dim=-1)
        for j, row in enumerate(rows):
            out[row] = probs[j]
    return out


def score(prob: Tensor, r: Reader) -> float:
    """Expected ordinal score of a substantive-option distribution (NaN without values)."""
    return float(prob @ r.values) if r.values is not None else float("nan")
