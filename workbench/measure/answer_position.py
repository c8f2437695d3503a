"""Answer-position distributions (docs/MEASUREMENT.md §3): for every sample whose text reaches
its answer, the exact option distribution at the answer's slot.

The slot is the model's next-token distribution after the prompt and the generated prefix
`ids[:j]`, where token `j` holds the start of the answer. Three ways to read it, all equal
to a plain teacher-forced HF forward of prompt + prefix + option (tests check each):

- **From the decoding step** (the answer is a whole token that is one of the options'
  single-token forms, e.g. " B"): the raw logits the step recorded for every candidate
  token; options summed over the variants of the answer's kind, temperature and top-p
  applied (`_slots_from_records`).
- **Teacher-forced, one token** (the answer starts inside a token, or its token is not a
  candidate, e.g. "B." written as one token): each option's continuation `before + text`
  (`before`: the token's text ahead of the answer) is scored at the slot. When that
  continuation is one candidate token it is read from the same decoding step's records
  (its logit, the full-vocabulary log-sum-exp at temperature 1 and at the sampling
  temperature): the same forward, no extra pass.
- **Teacher-forced, longer** (a multi-token continuation such as "Very serious"): batched
  forwards that continue the wave's prompt KV cache (`decoding.Prefix`) with the prompt's
  last token, the generated prefix and the continuation; identical (prompt, prefix,
  continuation) requests of different samples run once; rows per forward are bounded by
  `FORCED_BYTES` (KV cache plus the kept logits, only the last positions' logits are
  computed).

On both teacher-forced paths temperature is applied and top-p is not (as before). Slots are
read once per distinct completion (`decoding.Row`); the samples that drew it share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workbench.engine.models import LoadedModel
from workbench.engine.packing import fits_window
from workbench.measure.answers import Parsed, option_surfaces
from workbench.measure.decoding import (
    KINDS,
    Plan,
    Prefix,
    Records,
    Row,
    prefill,
    prefix_of,
    teacher_forced_logprobs,
)

if TYPE_CHECKING:
    from workbench.measure.sampling import SamplingConfig

FORCED_BYTES = 256 << 20
"""The most memory one teacher-forced forward may hold (KV cache and logits), 256 MiB."""
FORCED_ROWS = 256
"""The most rows one teacher-forced forward may take."""


@dataclass
class ForcedStats:
    """How the teacher-forced slots of one call were read (for tests and benchmarks)."""

    pairs: int = 0
    """(distinct completion, option) continuations scored."""
    from_records: int = 0
    """Of those, read from the decoding step's records."""
    forward_rows: int = 0
    """Distinct (prompt, prefix, continuation) rows run through the model."""
    forwards: int = 0


def _answer_token(row: Row, start: int) -> int | None:
    for j, length in enumerate(row.text_len):
        if length > start:
            return j
    return None


def _slots_from_records(
    plans: list[Plan],
    fast: list[tuple[int, int, int]],
    records: Records,
    owner: np.ndarray,
    temperature: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Slots read from the decoding records, vectorized over rows.

    `fast`: (row, token index, kind index); `owner`: [fast] each row's prompt in `plans`.
    Returns ([fast, option] raw temperature-1 log-probs, [fast, option] sampling
    distribution), options padded to the widest question with zero probability (-inf
    log-prob).
    """
    n_options = max(len(p.question.all_options) for p in plans)
    n_cand = records.cand.shape[-1]
    rows = np.array([f[0] for f in fast])
    steps = np.array([f[1] for f in fast])
    kinds = np.array([f[2] for f in fast])
    option = np.zeros((len(plans), n_cand), dtype=np.int64)
    kind = np.full((len(plans), n_cand), -1, dtype=np.int64)
    for i, p in enumerate(plans):
        option[i, : len(p.cand_ids)] = p.cand_option
        kind[i, : len(p.cand_ids)] = p.cand_kind
    cand = records.cand[rows, steps].astype(np.float64)  # [sample, cand]
    use = kind[owner] == kinds[:, None]
    raw = np.where(use, np.exp(cand - records.lse[rows, steps][:, None]), 0.0)
    scaled = cand / temperature
    top = np.where(use, scaled, -np.inf).max(-1, keepdims=True)
    kept = use & (scaled >= records.thr[rows, steps][:, None])
    weight = np.where(kept, np.exp(scaled - top), 0.0)
    onehot = np.zeros((len(fast), n_cand, n_options))
    np.put_along_axis(onehot, option[owner][:, :, None], 1.0, axis=-1)
    raw_opt = np.einsum("sc,sco->so", raw, onehot)
    weight_opt = np.einsum("sc,sco->so", weight, onehot)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(raw_opt), weight_opt / weight_opt.sum(-1, keepdims=True)


def answer_positions(
    lm: LoadedModel,
    plans: list[Plan],
    rows: list[Row],
    records: Records,
    config: SamplingConfig,
    stats: ForcedStats | None = None,
) -> list[dict[str, Any]]:
    """Per row (a distinct completion; its samples share it): answer_token,
    answer_option_mass, answer_logprobs, answer_probs (or nulls)."""
    out: list[dict[str, Any]] = [
        {
            "answer_token": None,
            "answer_option_mass": float("nan"),
            "answer_logprobs": None,
            "answer_probs": None,
        }
        for _ in rows
    ]
    fast_rows: list[tuple[int, int, int]] = []
    fallback: list[tuple[int, int, str, str]] = []
    """(row, token index, text before the answer inside its token, kind)"""
    for r, row in enumerate(rows):
        parsed = row.result
        if not isinstance(parsed, Parsed) or parsed.start is None or parsed.kind is None:
            continue
        j = _answer_token(row, parsed.start)
        if j is None:
            continue
        plan = plans[row.prompt]
        before = row.text[(row.text_len[j - 1] if j > 0 else 0) : parsed.start]
        kind = KINDS.index(parsed.kind)
        token = row.ids[j]
        fast = before.strip() == "" and (token, kind) in plan.cand_set
        out[r]["answer_token"] = j
        if fast:
            fast_rows.append((r, j, kind))
        else:
            fallback.append((r, j, before, parsed.kind))
    if fast_rows:
        owner = np.array([rows[r].prompt for r, _, _ in fast_rows], dtype=np.int64)
        logp, probs = _slots_from_records(plans, fast_rows, records, owner, config.temperature)
        n_options = np.array([len(p.question.all_options) for p in plans])[owner]
        mass = np.exp(logp).sum(-1)  # padded options: exp(-inf) = 0
        for i, (r, _, _) in enumerate(fast_rows):
            k = int(n_options[i])
            out[r].update(
                answer_option_mass=float(mass[i]),
                answer_logprobs=logp[i, :k].tolist(),
                answer_probs=probs[i, :k].tolist(),
            )
    if fallback:
        forced_slots(lm, plans, rows, fallback, records, config, out, stats)
    return out


def forced_slots(
    lm: LoadedModel,
    plans: list[Plan],
    rows: list[Row],
    fallback: list[tuple[int, int, str, str]],
    records: Records | None,
    config: SamplingConfig,
    out: list[dict[str, Any]],
    stats: ForcedStats | None = None,
) -> None:
    """Score each option's continuation `before + text` at the slot (row, token index j).

    One-token continuations that are candidate tokens come from `records` (the decoding step
    at j); the others from batched forwards continuing the prompt cache (`records.prefix`,
    made here by a prefill of the prompts concerned when absent).
    """
    stats = stats if stats is not None else ForcedStats()
    temperature = config.temperature
    encoded: dict[str, list[int]] = {}
    cand_index = [{t: i for i, t in reversed(list(enumerate(p.cand_ids)))} for p in plans]
    lp1: dict[tuple[int, int], float] = {}
    lp_t: dict[tuple[int, int], float] = {}
    requests: dict[tuple[int, tuple[int, ...], tuple[int, ...]], list[tuple[int, int]]] = {}
    """(prompt, generated prefix, continuation) -> the (row, option) pairs it scores"""
    t32 = np.float32(temperature)
    for r, j, before, kind in fallback:
        p = rows[r].prompt
        plan = plans[p]
        for surface in option_surfaces(plan.question, plan.prompt.order):
            if surface.kind != kind:
                continue
            text = before + surface.text
            if text not in encoded:
                encoded[text] = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
            cont = encoded[text]
            stats.pairs += 1
            c = cand_index[p].get(cont[0]) if len(cont) == 1 else None
            if c is not None and records is not None and records.cand.shape[1] > j:
                logit = records.cand[r, j, c]
                lp1[(r, surface.option_id)] = float(logit - records.lse[r, j])
                lp_t[(r, surface.option_id)] = float(logit / t32 - records.lse_t[r, j])
                stats.from_records += 1
            else:
                key = (p, tuple(rows[r].ids[:j]), tuple(cont))
                requests.setdefault(key, []).append((r, surface.option_id))
    if requests:
        keys = list(requests)
        # The cached rows put pads between a prompt and its continuation, and transformers
        # builds a sliding window from cache indices, not positions: past the model's
        # attention window only whole sequences are exact.
        longest = max(len(plans[k[0]].prompt.input_ids) + len(k[1]) + len(k[2]) for k in keys)
        prefix, cached_keys = None, keys
        if fits_window(lm.model.config, longest):
            prefix = records.prefix if records is not None else None
            if prefix is None:
                wanted = sorted({k[0] for k in keys})
                prefix = _make_prefix(lm, [plans[p] for p in wanted])
                local = {p: i for i, p in enumerate(wanted)}
                cached_keys = [(local[k[0]], k[1], k[2]) for k in keys]
        if prefix is not None:
            a, b = _forced_forwards(lm, prefix, cached_keys, temperature, stats)
        else:  # a model without a key/value cache, or past its window: whole sequences
            contexts = [list(plans[k[0]].prompt.input_ids) + list(k[1]) for k in keys]
            a, b = teacher_forced_logprobs(lm, contexts, [list(k[2]) for k in keys], temperature)
            stats.forward_rows += len(keys)
        for key, x, y in zip(keys, a, b, strict=True):
            for pair in requests[key]:
                lp1[pair], lp_t[pair] = float(x), float(y)
    per_row: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for (r, opt), a1 in lp1.items():
        n_options = len(plans[rows[r].prompt].question.all_options)
        if r not in per_row:
            per_row[r] = (np.full(n_options, -np.inf), np.full(n_options, -np.inf))
        per_row[r][0][opt] = a1
        per_row[r][1][opt] = lp_t[(r, opt)]
    for r, (logp, logp_t) in per_row.items():
        weights = np.exp(logp_t - logp_t.max())
        out[r].update(
            answer_option_mass=float(np.exp(logp).sum()),
            answer_logprobs=logp.tolist(),
            answer_probs=(weights / weights.sum()).tolist(),
        )


@torch.inference_mode()
def _make_prefix(lm: LoadedModel, plans: list[Plan]) -> Prefix | None:
    _, cache, mask = prefill(lm, plans)
    return prefix_of(cache, mask, plans)


@torch.inference_mode()
def _forced_forwards(
    lm: LoadedModel,
    prefix: Prefix,
    keys: list[tuple[int, tuple[int, ...], tuple[int, ...]]],
    temperature: float,
    stats: ForcedStats,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the continuation's log-probs per (prompt, generated prefix, continuation) key.

    Each row is the prompt's last token + prefix + continuation[:-1], placed against the
    right edge (left-padded) after the cached prompt, so the continuation is read from the
    last positions of every row and only those get logits. Returns ([key] at temperature 1,
    [key] at `temperature`), float32 full-vocabulary log-softmax as `teacher_forced_logprobs`.
    """
    from transformers import DynamicCache

    from workbench.engine.scoring import _cache_kwarg

    model, device = lm.model, lm.device
    pad = lm.tokenizer.pad_token_id or 0
    vocab = int(model.get_output_embeddings().weight.shape[0])
    out1 = np.zeros(len(keys))
    out_t = np.zeros(len(keys))
    tokens = [[prefix.last[p], *g, *c[:-1]] for p, g, c in keys]
    order = sorted(range(len(keys)), key=lambda i: -len(tokens[i]))
    per_token = prefix.bytes_per_token
    start = 0
    while start < len(order):
        width = len(tokens[order[start]])
        keep = max(len(keys[i][2]) for i in order[start : start + FORCED_ROWS])
        per_row = per_token * (prefix.mask.shape[1] + width) + 3 * 4 * keep * vocab
        size = int(min(FORCED_ROWS, max(1, FORCED_BYTES // max(1, per_row))))
        batch = order[start : start + size]
        start += size
        keep = max(len(keys[i][2]) for i in batch)
        idx = torch.tensor([keys[i][0] for i in batch], device=device)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        smask = torch.zeros((len(batch), width), dtype=torch.long)
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        for b, i in enumerate(batch):
            row = tokens[i]
            ids[b, width - len(row) :] = torch.tensor(row)
            smask[b, width - len(row) :] = 1
            first = prefix.lengths[keys[i][0]] - 1
            pos[b, width - len(row) :] = torch.arange(first, first + len(row))
        cache = DynamicCache(
            ddp_cache_data=[(k[idx], v[idx]) for k, v in prefix.kv],
            config=model.config,
        )
        mask = torch.cat([prefix.mask[idx], smask.to(device)], 1)
        result = model(
            input_ids=ids.to(device),
            attention_mask=mask,
            position_ids=pos.to(device),
            use_cache=True,
            logits_to_keep=keep,
            **{_cache_kwarg(model): cache},
        )
        logits = result.logits[:, -keep:].float()  # [row, keep, vocab]
        del cache, result
        stats.forwards += 1
        stats.forward_rows += len(batch)
        for scale, out in ((1.0, out1), (temperature, out_t)):
            logp = torch.log_softmax(logits / scale if scale != 1.0 else logits, -1)
            for b, i in enumerate(batch):
                cont = keys[i][2]
                reads = logp[b, keep - len(cont) :]
                target = torch.tensor(cont, device=device)[:, None]
                out[i] = float(reads.gather(1, target).sum())
            del logp
    return out1, out_t
