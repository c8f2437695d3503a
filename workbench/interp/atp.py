"""Attribution patching: the first-order estimate of every patched forward of a batch of
counterfactual pairs from one forward and one backward per prompt (conventions:
`workbench.interp.attribution`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from workbench.engine.models import LoadedModel
from workbench.interp import gradients as G
from workbench.interp.hooks import hook_sites, record_sites
from workbench.interp.pairs import Pair, align
from workbench.interp.readers import Reader
from workbench.interp.sites import Site
from workbench.study import prompts as P
from workbench.study.spans import Span

ATP_COLUMNS = [
    "unit", "pair_id", "factor", "question_id", "direction", "position", "site", "site_kind",
    "layer", "metric", "source_value", "target_value", "estimate",
]  # fmt: skip
"""`attributed.parquet` of an AtP run: one row per pair x direction x position x site."""


def grad_pass(
    lm: LoadedModel, ids: Sequence[Sequence[int]], names: Sequence[str], metrics: Sequence[Any]
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward and one backward of right-padded rows (`metrics[row]` of each row's
    [1, vocab] log-probs): activations and gradients [row, site, pos, d_model] (float32, CPU)
    and the metrics [row]. Only the activations' gradients are computed, not the weights'."""
    kept: dict[str, Tensor] = {}

    def keep(name: str) -> Any:
        def fn(h: Tensor) -> None:
            kept[name] = h

        return fn

    handles = hook_sites(lm, {n: keep(n) for n in names})
    try:
        with torch.enable_grad():
            lp = G.forward_logprobs(lm, input_ids=G.padded(ids, 0), lengths=[len(r) for r in ids])
            values = torch.cat([m(lp[r : r + 1]) for r, m in enumerate(metrics)])
            # resid_post of block l and resid_pre of block l + 1 are one tensor: ask once
            unique = list({id(kept[n]): kept[n] for n in names}.values())
            grads = torch.autograd.grad(values.sum(), unique, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    by_id = {id(t): g for t, g in zip(unique, grads, strict=True)}
    acts = torch.stack([kept[n].detach().float().cpu() for n in names], 1)
    grad = torch.stack(
        [
            torch.zeros_like(kept[n]) if by_id[id(kept[n])] is None else by_id[id(kept[n])]
            for n in names
        ],
        1,
    )
    return acts, grad.detach().float().cpu(), values.detach().cpu()


def estimates(
    position: str,
    a_s: Tensor,
    a_t: Tensor,
    g: Tensor,
    spans: tuple[Span | None, Span | None],
    persona_last: tuple[int | None, int | None],
) -> Tensor | None:
    """[site] first-order change of the target's metric when `position` is patched from the
    source (a_s, a_t and the target's gradient g are [site, pos, d_model] at each prompt's
    own length; spans and persona_last are (source, target)). None where patching skips."""
    ns, nt = a_s.shape[1], a_t.shape[1]
    s, t = spans
    if position == "answer":
        return ((a_s[:, ns - 1] - a_t[:, nt - 1]) * g[:, nt - 1]).sum(-1)
    if position == "persona_last":
        p_s, p_t = persona_last
        if p_s is None or p_t is None:
            return None
        return ((a_s[:, p_s] - a_t[:, p_t]) * g[:, p_t]).sum(-1)
    if s is None or t is None:
        return None  # the factor's value fell outside the fed text
    if position == "span_last":
        last_s, last_t = s.token_end - 1, t.token_end - 1
        return ((a_s[:, last_s] - a_t[:, last_t]) * g[:, last_t]).sum(-1)
    if position == "span_mean":
        src = a_s[:, s.token_start : s.token_end].mean(1)
        shift = src - a_t[:, t.token_start : t.token_end].mean(1)
        return (shift * g[:, t.token_start : t.token_end].sum(1)).sum(-1)
    idx = align(s, t, ns, nt)
    return ((a_s[:, idx] - a_t) * g).sum((1, 2))


def atp_batch(
    lm: LoadedModel,
    units: Sequence[tuple[int, str, Pair]],
    sites: Sequence[Site],
    prompts: Mapping[int, P.Prompt],
    readers: Mapping[int, Reader],
    spans: Mapping[int, Sequence[Span]],
    persona_last: Mapping[int, int],
    options: Mapping[str, tuple[int, int]],
    *,
    metric: str,
    aggregate: str,
    directions: Sequence[str],
    positions: Sequence[str],
) -> list[dict[str, Any]]:
    """AtP rows (`ATP_COLUMNS`) of `units` (unit index, factor, pair), in one batch."""
    names = [s.name for s in sites]
    pids = sorted({i for *_, pr in units for i in (pr.clean, pr.corrupt)})
    jobs = [
        (u, f, pr, d, *((pr.clean, pr.corrupt) if d == "denoising" else (pr.corrupt, pr.clean)))
        for u, f, pr in units
        for d in directions
    ]
    ids = [prompts[i].input_ids for i in pids]
    acts: dict[int, Tensor] = {}
    ref: dict[int, Tensor] = {}
    keys: list[tuple[int, int | None]] = [(i, None) for i in pids]
    if metric == "kl":  # the gradient depends on the source: one row per job
        with torch.no_grad(), record_sites(lm, names) as rec:
            lp = G.forward_logprobs(lm, input_ids=G.padded(ids, 0), lengths=[len(r) for r in ids])
        for k, i in enumerate(pids):
            ref[i] = G.answer_probs(lp[k : k + 1], readers[i], aggregate)[0]
            acts[i] = torch.stack([rec[n][k, : len(ids[k])] for n in names])
        keys = [(tgt, src) for *_, src, tgt in jobs]
    metrics = [
        G.metric_fn(
            metric,
            readers[t],
            aggregate,
            options=options[prompts[t].question_id],
            reference=None if s is None else ref[s],
        )
        for t, s in keys
    ]
    row_ids = [prompts[t].input_ids for t, _ in keys]
    a, g, values = grad_pass(lm, row_ids, names, metrics)
    grads = {k: g[r, :, : len(row_ids[r])] for r, k in enumerate(keys)}
    value = {k: float(values[r]) for r, k in enumerate(keys)}
    for r, (t, s) in enumerate(keys):
        if s is None:
            acts[t] = a[r, :, : len(row_ids[r])]
    records = []
    for u, f, pr, direction, src, tgt in jobs:
        key = (tgt, src) if metric == "kl" else (tgt, None)
        span_s = next((x for x in spans[src] if x.factor == f), None)
        span_t = next((x for x in spans[tgt] if x.factor == f), None)
        for position in positions:
            est = estimates(
                position,
                acts[src],
                acts[tgt],
                grads[key],
                (span_s, span_t),
                (persona_last.get(src), persona_last.get(tgt)),
            )
            if est is None:
                continue
            for site, e in zip(sites, est.tolist(), strict=True):
                records.append(
                    {
                        "unit": u,
                        "pair_id": pr.pair_id,
                        "factor": f,
                        "question_id": pr.question_id,
                        "direction": direction,
                        "position": position,
                        "site": site.name,
                        "site_kind": site.kind,
                        "layer": site.layer,
                        "metric": metric,
                        "source_value": 0.0 if metric == "kl" else value[(src, None)],
                        "target_value": value[key],
                        "estimate": e,
                    }
                )
    return records
