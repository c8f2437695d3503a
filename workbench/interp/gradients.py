"""Gradients of the answer distribution: differentiable answer metrics, forwards that keep the
graph, and integrated gradients over the input embeddings.

Every metric is a function of one prompt's answer distribution read with the workbench's
measurement contract (`workbench.measure.distributions`): full-vocabulary float32 log-softmax
at the last prompt token, label variants aggregated (`sum`: logsumexp, `max`: max, in
probability space), renormalized over the non-refusal options (float64 from there on):

- `expected_score`: sum_k p_k v_k over the question's ordinal values.
- `log_odds`: log p_a - log p_b of two substantive options (default: the first and the last;
  the renormalization cancels).
- `kl`: KL(reference || p) in bits, the reference being another prompt's distribution (AtP
  uses the pair's source: the patch moves the target towards it when the KL falls).

Integrated gradients (`integrated_gradients`) integrate the metric's gradient along the
straight line from a baseline to the input in the space of the embedding layer's output
(`hook_embed`, `model.get_input_embeddings()`), with captum's quadratures (`gausslegendre`,
`riemann_left|right|middle|trapezoid`: nodes alpha_k and weights w_k on [0, 1]):

    attribution[pos, d] = (x - x')[pos, d] * sum_k w_k * d metric / d e[pos, d] at x' + alpha_k (x - x')

Completeness: summed over positions and dimensions the attributions equal metric(x) -
metric(x') up to the quadrature's error, which is reported, never hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workbench.engine.models import LoadedModel
from workbench.engine.scoring import _logits
from workbench.errors import WorkbenchError
from workbench.interp.readers import Reader
from workbench.study import prompts as P
from workbench.study.spans import Span
from workbench.study.spec import Study

METRICS = ("expected_score", "log_odds", "kl")
QUADRATURES = (
    "gausslegendre",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
)
BASELINES = ("zero", "pad", "counterfactual")
REST = "rest"
"""The span of every token outside the attributed factors' spans."""
IG_COLUMNS = [
    "unit", "prompt_id", "question_id", "baseline", "run", "factor", "metric", "attribution",
    "value", "baseline_value", "completeness_error", "n_baselines",
]  # fmt: skip
"""`attributed.parquet` of an IG run: one row per prompt x baseline x span (`run`: the IG run,
a fixed baseline or the factor of a counterfactual one)."""

Metric = Callable[[Tensor], Tensor]
"""[row, vocab] float32 full-vocab log-probs -> [row] float64 metric (differentiable)."""


def answer_probs(logprobs: Tensor, reader: Reader, aggregate: str) -> Tensor:
    """[row, substantive option] float64 renormalized answer distributions from [row, vocab]
    log-probs of prompts that share `reader` (differentiable)."""
    ids = reader.ids.to(logprobs.device)
    lp = logprobs[:, ids.flatten()].view(-1, *ids.shape).double()
    agg = lp.logsumexp(-1) if aggregate == "sum" else lp.amax(-1)
    return torch.softmax(agg[:, reader.substantive.to(logprobs.device)], dim=-1)


def metric_value(
    name: str,
    probs: Tensor,
    reader: Reader,
    *,
    options: tuple[int, int] | None = None,
    reference: Tensor | None = None,
) -> Tensor:
    """[row] float64: the metric `name` of distributions [row, substantive option]."""
    if name == "expected_score":
        assert reader.values is not None
        return probs @ reader.values.to(probs.device)
    if name == "log_odds":
        a, b = options if options is not None else (0, probs.shape[-1] - 1)
        return probs[:, a].log() - probs[:, b].log()
    assert reference is not None
    ref = reference.to(probs.device, torch.float64)
    keep = ref > 0
    return (ref[keep] * (ref[keep].log() - probs[:, keep].log())).sum(-1) / np.log(2.0)


def metric_fn(
    name: str,
    reader: Reader,
    aggregate: str,
    *,
    options: tuple[int, int] | None = None,
    reference: Tensor | None = None,
) -> Metric:
    """The `Metric` `name` of one prompt's answer (every row read with `reader`; `kl`
    compares with `reference` [substantive option])."""

    def fn(logprobs: Tensor) -> Tensor:
        probs = answer_probs(logprobs, reader, aggregate)
        return metric_value(name, probs, reader, options=options, reference=reference)

    return fn


def forward_logprobs(
    lm: LoadedModel,
    *,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    lengths: Sequence[int],
) -> Tensor:
    """[row, vocab] float32 log-probs after each right-padded row's last token (`lengths`),
    with the autograd graph kept when grad mode is on. Logits at that position only."""
    rows = len(lengths)
    given = input_ids if input_ids is not None else inputs_embeds
    assert given is not None
    width = int(given.shape[1])
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    out = lm.model.base_model(
        input_ids=None if input_ids is None else input_ids.to(lm.device),
        inputs_embeds=inputs_embeds,
        attention_mask=mask.to(lm.device),
    )
    last = torch.tensor([n - 1 for n in lengths], device=lm.device)
    hidden = out.last_hidden_state[torch.arange(rows, device=lm.device), last]
    return torch.log_softmax(_logits(lm.model, hidden), dim=-1)


def padded(ids: Sequence[Sequence[int]], pad: int) -> Tensor:
    """[row, pos] long: rows right-padded with `pad`."""
    out = torch.full((len(ids), max(len(r) for r in ids)), pad, dtype=torch.long)
    for i, r in enumerate(ids):
        out[i, : len(r)] = torch.tensor(list(r))
    return out


# --------------------------------------------------------------------------------------------
# integrated gradients


def quadrature(method: str, n_steps: int) -> tuple[list[float], list[float]]:
    """(alphas, weights) of captum's rule `method` with `n_steps` nodes on [0, 1]."""
    if method not in QUADRATURES:
        raise WorkbenchError(
            f"unknown integration method {method!r}", fix=f"use one of: {', '.join(QUADRATURES)}"
        )
    if n_steps < (1 if method == "gausslegendre" else 2):
        raise WorkbenchError(
            f"{method} needs more than {n_steps} step(s)",
            fix="pass --steps 32 (at least 2 for the Riemann rules)",
        )
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n_steps)
        return (0.5 * (1 + x)).tolist(), (0.5 * w).tolist()
    weights = [1.0 / n_steps] * n_steps
    kind = method.removeprefix("riemann_")
    if kind == "trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        alphas = torch.linspace(0, 1, n_steps)
    elif kind == "left":
        alphas = torch.linspace(0, 1 - 1 / n_steps, n_steps)
    elif kind == "middle":
        alphas = torch.linspace(1 / (2 * n_steps), 1 - 1 / (2 * n_steps), n_steps)
    else:
        alphas = torch.linspace(1 / n_steps, 1, n_steps)
    return alphas.tolist(), weights


@dataclass(frozen=True)
class IGResult:
    """Integrated gradients of one prompt against one or more baselines."""

    attributions: Tensor
    """[baseline, pos, d_model] float64."""
    value: float
    """The metric at the input."""
    baseline_values: Tensor
    """[baseline] float64: the metric at each baseline."""

    @property
    def completeness_error(self) -> Tensor:
        """[baseline]: sum of attributions - (metric(input) - metric(baseline))."""
        return self.attributions.sum((1, 2)) - (self.value - self.baseline_values)


def embed(lm: LoadedModel, input_ids: Sequence[int]) -> Tensor:
    """[pos, d_model] float32 output of the embedding layer (`hook_embed`) for one prompt."""
    with torch.no_grad():
        ids = torch.tensor([list(input_ids)], device=lm.device)
        return lm.model.get_input_embeddings()(ids)[0].float()


def integrated_gradients(
    lm: LoadedModel,
    input_ids: Sequence[int],
    metric: Metric,
    baselines: Tensor,
    *,
    n_steps: int = 50,
    method: str = "gausslegendre",
    batch_size: int = 64,
) -> IGResult:
    """Integrated gradients of `metric` (one row) over the embedding layer's output of one
    prompt, from each baseline in `baselines` [baseline, pos, d_model] (module docstring).
    Rows (baseline x step) run `batch_size` at a time; the model is not changed."""
    alphas, weights = quadrature(method, n_steps)
    x = embed(lm, input_ids)
    base = baselines.to(device=x.device, dtype=torch.float32)
    n_base, n = base.shape[0], x.shape[0]
    dtype = lm.dtype
    steps = [(b, a, w) for b in range(n_base) for a, w in zip(alphas, weights, strict=True)]
    total = torch.zeros(n_base, n, x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, len(steps), batch_size):
        chunk = steps[start : start + batch_size]
        idx = torch.tensor([b for b, _, _ in chunk], device=x.device)
        alpha = torch.tensor([a for _, a, _ in chunk], device=x.device)[:, None, None]
        emb = (base[idx] + alpha * (x - base[idx])).to(dtype).requires_grad_(True)
        with torch.enable_grad():
            lp = forward_logprobs(lm, inputs_embeds=emb, lengths=[n] * len(chunk))
            (grad,) = torch.autograd.grad(metric(lp).sum(), emb)
        w = torch.tensor([w for _, _, w in chunk], dtype=torch.float64, device=x.device)
        total.index_add_(0, idx, grad.double() * w[:, None, None])
    attributions = (x - base).double() * total
    with torch.no_grad():
        ends = torch.cat([x[None], base]).to(dtype)
        lp = forward_logprobs(lm, inputs_embeds=ends, lengths=[n] * (n_base + 1))
        values = metric(lp).double().cpu()
    return IGResult(attributions.cpu(), float(values[0]), values[1:])


# --------------------------------------------------------------------------------------------
# baselines and span sums


def counterfactual_ids(
    study: Study,
    targets: Sequence[P.Prompt],
    factors: Sequence[str],
    tokenizer: Any,
) -> dict[tuple[int, str], list[tuple[int, ...]]]:
    """(prompt_id, factor) -> input ids of the same prompt with the factor holding each of its
    other values, rendered by `workbench.study.prompts`; values whose prompt has another
    length (a span of another token count) are left out: a baseline must align token by
    token with the input."""
    names = [f.name for f in study.factors]
    cells: dict[tuple[str | None, ...], dict[str, str | None]] = {}
    wanted: dict[tuple[str, int, tuple[str | None, ...]], tuple[int, str]] = {}
    for p in targets:
        for f in factors:
            if p.factors.get(f) is None:
                continue
            for other in study.factor(f).values:
                if other == p.factors[f]:
                    continue
                cell = {**p.factors, f: other}
                key = tuple(cell.get(n) for n in names)
                cells[key] = cell
                wanted[(p.question_id, p.permutation, key)] = (p.prompt_id, f)
    out: dict[tuple[int, str], list[tuple[int, ...]]] = {}
    if not cells:
        return out
    length = {p.prompt_id: len(p.input_ids) for p in targets}
    derived = P.render(replace(study, cells=tuple(cells.values())), tokenizer)
    for d in derived:
        hit = wanted.get((d.question_id, d.permutation, tuple(d.factors.get(n) for n in names)))
        if hit is not None and len(d.input_ids) == length[hit[0]]:
            out.setdefault(hit, []).append(d.input_ids)
    return out


def fixed_baseline(lm: LoadedModel, input_ids: Sequence[int], kind: str) -> Tensor:
    """[pos, d_model] `zero` or `pad` baseline: every token but the tokenizer's special tokens
    (BOS) replaced by the zero vector or the pad token's embedding."""
    special = set(lm.tokenizer.all_special_ids) - {lm.tokenizer.pad_token_id}
    keep = torch.tensor([i in special for i in input_ids])
    if kind == "pad":
        ids = [i if k else lm.tokenizer.pad_token_id for i, k in zip(input_ids, keep, strict=True)]
        return embed(lm, ids)
    x = embed(lm, input_ids)
    return torch.where(keep.to(x.device)[:, None], x, torch.zeros_like(x))


def span_sums(per_token: Tensor, spans: Sequence[Span], factors: Sequence[str]) -> dict[str, float]:
    """Sum of per-token attributions [pos] over each factor's span, and `rest`: every token
    outside the listed factors' spans."""
    out: dict[str, float] = {}
    inside = torch.zeros(per_token.shape[0], dtype=torch.bool)
    for s in spans:
        if s.factor in factors:
            out[s.factor] = float(per_token[s.token_start : s.token_end].sum())
            inside[s.token_start : s.token_end] = True
    out[REST] = float(per_token[~inside].sum())
    return out


def ig_rows(
    lm: LoadedModel,
    prompt: P.Prompt,
    metric: Metric,
    baselines: Sequence[str],
    spans: Sequence[Span],
    alternatives: dict[str, list[tuple[int, ...]]],
    *,
    n_steps: int,
    method: str,
    batch_size: int,
) -> list[dict[str, Any]]:
    """IG of one prompt from every baseline at once, summed over spans: a zero or pad baseline
    gives a row per factor of `alternatives` and `rest`; a counterfactual one a row per factor
    (attributions averaged over its other values in `alternatives`)."""
    groups: list[tuple[str, str | None, Tensor]] = []  # (baseline, factor, [b, pos, d])
    for kind in baselines:
        if kind != "counterfactual":
            groups.append((kind, None, fixed_baseline(lm, prompt.input_ids, kind)[None]))
            continue
        for f, alts in alternatives.items():
            if alts:
                groups.append((kind, f, torch.stack([embed(lm, a) for a in alts])))
    if not groups:
        return []
    res = integrated_gradients(
        lm,
        prompt.input_ids,
        metric,
        torch.cat([b for *_, b in groups]),
        n_steps=n_steps,
        method=method,
        batch_size=batch_size,
    )
    per_token, err = res.attributions.sum(-1), res.completeness_error
    rows, at = [], 0
    for kind, factor, base in groups:
        sl = slice(at, at + base.shape[0])
        at += base.shape[0]
        sums = span_sums(per_token[sl].mean(0), spans, list(alternatives))
        if factor is not None:
            sums = {factor: sums.get(factor, float("nan"))}
        for span, value in sums.items():
            rows.append(
                {
                    "prompt_id": prompt.prompt_id,
                    "question_id": prompt.question_id,
                    "baseline": kind,
                    "run": factor or kind,
                    "factor": span,
                    "attribution": value,
                    "value": res.value,
                    "baseline_value": float(res.baseline_values[sl].mean()),
                    "completeness_error": float(err[sl].mean()),
                    "n_baselines": base.shape[0],
                }
            )
    return rows
