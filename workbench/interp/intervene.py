"""What steering and mediation share: batched forwards with an edit, read with the contract.

`read` turns full-vocabulary float32 log-probs at the answer position into the workbench's
measurement (docs/MEASUREMENT.md §2, as `workbench.interp.patching` reads them): every label
variant aggregated (`sum` / `max` in probability space), the option mass (raw probability on
all options, refusal included), the distribution renormalized over the non-refusal options
and its expected ordinal score.

`forwards` runs prompts in fixed batches (the same rows, the same padding, whatever the
edit), so an edit that adds zero reproduces the unedited forward bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from workbench.engine.models import LoadedModel
from workbench.errors import WorkbenchError
from workbench.interp.hooks import Edit, edit_sites, record_sites
from workbench.interp.patching import answer_logprobs
from workbench.interp.readers import Reader
from workbench.study import prompts as P
from workbench.study.spans import Span

POSITIONS = ("span", "answer", "all")
"""Where an intervention applies: the factor's token span, the last prompt token, every token."""


class Read(NamedTuple):
    """One row's answer under the contract."""

    probs: np.ndarray
    """[substantive option] float64, renormalized."""
    option_mass: float
    score: float
    """Expected ordinal score (NaN for questions without values)."""


def read(logprobs: Tensor, readers: Sequence[Reader], aggregate: str) -> list[Read]:
    """One `Read` per row of `logprobs` [row, vocab] (float32 full-vocab log-probs)."""
    out = []
    for r, reader in enumerate(readers):
        lp = logprobs[r, reader.ids.flatten()].view(reader.ids.shape).double()
        agg = lp.logsumexp(-1) if aggregate == "sum" else lp.amax(-1)
        mass = float(agg.exp().sum())
        probs = torch.softmax(agg[reader.substantive], -1)
        score = float(probs @ reader.values) if reader.values is not None else float("nan")
        out.append(Read(probs.numpy(), mass, score))
    return out


def token_positions(prompt: P.Prompt, span: Span | None, where: str) -> list[int]:
    """Token indices of `prompt` that `where` (one of `POSITIONS`) names ([] without a span)."""
    n = len(prompt.input_ids)
    if where == "answer":
        return [n - 1]
    if where == "all":
        return list(range(n))
    return [] if span is None else list(range(span.token_start, span.token_end))


def position_tensor(rows: Sequence[Sequence[int]]) -> Tensor:
    """[batch, k] long, -1 padded."""
    k = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(k, 1)), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r)
    return out


def forwards(
    lm: LoadedModel,
    batches: Sequence[Sequence[P.Prompt]],
    readers: dict[int, Reader],
    aggregate: str,
    site: str,
    edit: Callable[[int, Sequence[P.Prompt]], Edit | None] | None = None,
    record: Callable[[int, Sequence[P.Prompt], Tensor], None] | None = None,
) -> dict[int, Read]:
    """Read every prompt of `batches` (prompt_id -> `Read`), with `edit(b, batch)` applied at
    `site` in batch b and `record(b, batch, h [batch, pos, d_model])` given the site's
    activations of the forward."""
    out: dict[int, Read] = {}
    for b, batch in enumerate(batches):
        ids = [p.input_ids for p in batch]
        e = edit(b, batch) if edit is not None else None
        with torch.inference_mode():
            if e is not None:
                with edit_sites(lm, {site: e}):
                    lp = answer_logprobs(lm, ids)
            elif record is not None:
                with record_sites(lm, [site]) as rec:
                    lp = answer_logprobs(lm, ids)
                record(b, batch, rec[site])
            else:
                lp = answer_logprobs(lm, ids)
        for p, r in zip(
            batch, read(lp, [readers[p.prompt_id] for p in batch], aggregate), strict=True
        ):
            out[p.prompt_id] = r
    return out


def tv(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


def boot_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] resample counts (a row = one bootstrap resample of n units)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    w = np.zeros((n_boot, n))
    np.add.at(w, (np.arange(n_boot)[:, None], idx), 1.0)
    return w


def interval(samples: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of bootstrap samples (NaNs dropped)."""
    s = samples[np.isfinite(samples)]
    if len(s) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(s, [2.5, 97.5])
    return float(lo), float(hi)


def check_positions(where: str) -> None:
    if where not in POSITIONS:
        raise WorkbenchError(
            f"unknown positions {where!r}", fix=f"use one of: {', '.join(POSITIONS)}"
        )
