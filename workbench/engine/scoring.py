"""The forward-pass engine: exact option log-probs with shared prefixes and minimal logits.

Measurement contract (docs/MEASUREMENT.md §2), as implemented here:
- Log-probs are a log-softmax over the *full vocabulary*, computed in float32 whatever the
  model dtype (bf16 log-softmax loses precision).
- `next_token`: one row per prompt; every option variant is read from the one distribution
  at the last prompt token.
- `sequence`: log P(continuation | context) = sum of its tokens' log-probs; continuation
  tokens come from the joint encoding of context + continuation (`prompts.continuation_ids`).
- Speed without changing numbers: prompts that share a token prefix (a persona) run the prefix
  once and reuse its KV cache; rows are right-padded (real tokens keep their positions, pads
  come after them and causal attention never sees them), sorted by length into batches, and
  logits are computed only at the positions that are read. Tests check all of this against
  an unbatched plain HF forward.
- Options packed in one row (`EngineConfig.pack_options`, sdpa/eager attention): a request's
  context suffix runs once, followed by a prefix tree (trie) of its continuations' tokens,
  under a 4D attention mask with the position ids of a plain forward of context +
  continuation. Rows of several personas share a forward, each reading its own persona's KV
  cache, and all persona prefixes of a pass run in one padded forward
  (`workbench.engine.packing` states the layout and why each read log-prob is the one a
  plain forward gives).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from workbench.engine.packing import (
    PackedRow,
    fits_window,
    pack_request,
    packed_mask,
    run_prefixes,
)
from workbench.engine.readout import NOTHING_READ, base_forward


@dataclass(frozen=True)
class Request:
    """Score `continuations` after `context` (token ids). A next_token request has each
    continuation of length 1; `context` is the full prompt, BOS included."""

    key: int
    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    group: str = ""
    """Requests in one group are tried for a shared prefix (a persona)."""


@dataclass
class Scored:
    """What the engine read for one request."""

    key: int
    continuation_logprobs: list[float]
    """Sum of token log-probs per continuation (float32 full-vocab log-softmax)."""
    answer_logprobs: Tensor
    """[vocab] float32 log-probs at the answer position (after the last context token)."""


@dataclass(frozen=True)
class EngineConfig:
    batch_size: int = 32
    """Rows per forward pass."""
    share_prefix: bool = True
    min_prefix_tokens: int = 8
    """Share a group's common prefix only when it is at least this long."""
    pack_options: bool = True
    """Score all continuations of a request in one row (context once + a token tree under a
    4D mask). Used with sdpa and eager attention where every sequence fits the model's
    sliding or chunked attention window (`packing.attention_window`); otherwise one row per
    continuation."""


def _logits(model: PreTrainedModel, hidden: Tensor) -> Tensor:
    """Unembed `hidden` [n, d_model] -> float32 logits [n, vocab], as the model's head would."""
    head = model.get_output_embeddings()
    assert head is not None
    logits = head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(model.config, "logit_scale", None)
    if isinstance(scale, float) and getattr(model.config, "model_type", "") == "cohere":
        logits = logits * scale
    return logits


def _expand_cache(prefix: DynamicCache, batch: int, config: object) -> DynamicCache:
    """A fresh cache holding `prefix` for `batch` rows (the model appends to it in place)."""
    data: list[tuple[Tensor, Tensor]] = []
    for layer in prefix.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, Tensor) or not isinstance(values, Tensor):
            raise NotImplementedError(
                f"prefix sharing needs a key/value cache; {type(layer).__name__} has none: "
                "pass share_prefix=False (--no-share-prefix)"
            )
        data.append((keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)))
    return DynamicCache(ddp_cache_data=data, config=config)  # type: ignore[arg-type]


def _cache_kwarg(model: PreTrainedModel) -> str:
    """transformers >= 5.2x renamed `past_key_values` to `cache`; accept both."""
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward_hidden(
    model: PreTrainedModel,
    ids: Tensor,
    mask: Tensor,
    positions: Tensor,
    prefix_cache: DynamicCache | None,
    reads: Tensor,
) -> Tensor:
    """Final hidden states [batch, pos, d_model] of rows that continue a shared prefix; only
    the flattened positions `reads` are computed exactly (`workbench.engine.readout`)."""
    device = next(model.parameters()).device
    cache = (
        _expand_cache(prefix_cache, ids.shape[0], model.config)
        if prefix_cache is not None
        else None
    )
    out = base_forward(
        model,
        reads,
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=cache is not None,
        **{_cache_kwarg(model): cache},
    )
    hidden: Tensor = out.last_hidden_state
    return hidden


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    # The common prefix of all sequences is that of the lexicographically smallest and largest.
    as_tuples = [tuple(s) for s in seqs]
    lo, hi = min(as_tuples), max(as_tuples)
    for i, t in enumerate(lo):
        if hi[i] != t:
            return i
    return len(lo)


@torch.inference_mode()
def score_requests(
    model: PreTrainedModel,
    requests: Sequence[Request],
    config: EngineConfig = EngineConfig(),
    *,
    pad_id: int = 0,
    on_done: Callable[[int], None] | None = None,
) -> Iterator[Scored]:
    """Score every request; yields results group by group (order within a group may vary)."""
    device = next(model.parameters()).device
    groups: dict[str, list[Request]] = {}
    for r in requests:
        groups.setdefault(r.group, []).append(r)
    mask_kind = _custom_mask_kind(model) if config.pack_options else None
    longest = max((len(r.context) + max(map(len, r.continuations)) for r in requests), default=0)
    if not fits_window(model.config, longest):
        mask_kind = None  # one 4D mask cannot express a window: the row path is exact
    if mask_kind is None:
        for reqs in groups.values():
            yield from _score_group(model, reqs, config, pad_id, device)
            if on_done is not None:
                on_done(len(reqs))
        return
    # Packed rows of several groups share forwards; a pass holds whole groups and about
    # `_PASS_BATCHES` batches of rows, which bounds the prefix caches held at once.
    passes: list[list[list[Request]]] = [[]]
    for reqs in groups.values():
        if sum(map(len, passes[-1])) >= _PASS_BATCHES * config.batch_size:
            passes.append([])
        passes[-1].append(reqs)
    for part in passes:
        yield from _score_packed(model, part, config, pad_id, device, mask_kind)
        if on_done is not None:
            for reqs in part:
                on_done(len(reqs))


_PASS_BATCHES = 8


def _prefix_length(reqs: Sequence[Request], config: EngineConfig) -> int:
    """Tokens of the group's common prefix to run once (0: none worth sharing). The prefix
    leaves >= 1 context token per request: its output is the answer position."""
    if not config.share_prefix or len(reqs) < 2:
        return 0
    lcp = _common_prefix([r.context for r in reqs])
    n = min(lcp, min(len(r.context) for r in reqs) - 1)
    return n if n >= config.min_prefix_tokens else 0


def _score_group(
    model: PreTrainedModel,
    reqs: list[Request],
    config: EngineConfig,
    pad_id: int,
    device: torch.device,
) -> Iterator[Scored]:
    """One row per (request, continuation) after the group's shared prefix (attention
    kernels that take no custom 4D mask)."""
    n_prefix = _prefix_length(reqs, config)
    prefix_cache = None
    if n_prefix:
        ids = torch.tensor([reqs[0].context[:n_prefix]], device=device)
        out = base_forward(model, NOTHING_READ, input_ids=ids, use_cache=True)
        prefix_cache = getattr(out, "cache", None) or out.past_key_values

    # One row per (request, continuation) for sequence scoring; next_token needs one row.
    rows: list[tuple[int, int, list[int], list[int]]] = []
    """(request index, continuation index or -1 for all, row token ids, read positions)"""
    for ri, r in enumerate(reqs):
        suffix = list(r.context[n_prefix:])
        answer_pos = len(suffix) - 1
        if all(len(c) == 1 for c in r.continuations):
            rows.append((ri, -1, suffix, [answer_pos]))
        else:
            for ci, cont in enumerate(r.continuations):
                row = suffix + list(cont[:-1])
                rows.append((ri, ci, row, list(range(answer_pos, answer_pos + len(cont)))))
    rows.sort(key=lambda x: len(x[2]), reverse=True)

    results = {
        ri: Scored(r.key, [0.0] * len(r.continuations), torch.empty(0)) for ri, r in enumerate(reqs)
    }
    for start in range(0, len(rows), config.batch_size):
        batch = rows[start : start + config.batch_size]
        width = max(len(b[2]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n_prefix + width), dtype=torch.long)
        mask[:, :n_prefix] = 1
        for i, (_, _, toks, _) in enumerate(batch):
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, n_prefix : n_prefix + len(toks)] = 1
        positions = torch.arange(n_prefix, n_prefix + width).expand(len(batch), -1)
        row_idx = torch.tensor([i for i, b in enumerate(batch) for _ in b[3]], device=device)
        pos_idx = torch.tensor([p for b in batch for p in b[3]], device=device)
        hidden = _forward_hidden(
            model, ids, mask, positions, prefix_cache, row_idx * width + pos_idx
        )
        logprobs = torch.log_softmax(_logits(model, hidden[row_idx, pos_idx]), dim=-1)
        k = 0
        for ri, ci, _, reads in batch:
            req = reqs[ri]
            res = results[ri]
            if ci == -1:
                lp = logprobs[k]
                res.answer_logprobs = lp.cpu()
                res.continuation_logprobs = [float(lp[c[0]]) for c in req.continuations]
            else:
                cont = req.continuations[ci]
                lps = logprobs[k : k + len(reads)]
                targets = torch.tensor(cont, device=device)
                res.continuation_logprobs[ci] = float(
                    lps.gather(1, targets[:, None]).double().sum()
                )
                if res.answer_logprobs.numel() == 0:
                    res.answer_logprobs = lps[0].cpu()
            k += len(reads)
    yield from results.values()


@torch.inference_mode()
def naive_score(
    forward: Callable[[Tensor], Tensor],
    requests: Sequence[Request],
    device: torch.device | str = "cpu",
) -> Iterator[Scored]:
    """The reference: one unbatched forward per (request, continuation), no cache.

    `forward` maps input ids [1, pos] to logits [1, pos, vocab]: a plain HF model
    (`lambda ids: model(ids).logits`) or a TransformerLens bridge. Tests and the benchmark's
    baseline use it; it shares no code path with `score_requests` beyond the log-softmax.
    """
    for r in requests:
        lps = []
        answer = torch.empty(0)
        for cont in r.continuations:
            ids = torch.tensor([[*r.context, *cont]], device=device)
            logprobs = torch.log_softmax(forward(ids)[0].float(), dim=-1)
            n = len(r.context)
            lps.append(sum(float(logprobs[n - 1 + j, t]) for j, t in enumerate(cont)))
            answer = logprobs[n - 1].cpu()
        yield Scored(r.key, lps, answer)


def _custom_mask_kind(model: PreTrainedModel) -> str | None:
    """How a custom 4D mask is given to the model's attention: bool (sdpa), float (eager), or
    None where arbitrary masks are not supported (flash attention, flex attention)."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "sdpa":
        return "bool"
    if impl == "eager":
        return "float"
    return None


def _score_packed(
    model: PreTrainedModel,
    groups: list[list[Request]],
    config: EngineConfig,
    pad_id: int,
    device: torch.device,
    mask_kind: str,
) -> Iterator[Scored]:
    """Every request of `groups` as one packed row; rows of different groups share forwards,
    each reading its own group's prefix cache (`workbench.engine.packing`)."""
    reqs = [r for g in groups for r in g]
    prefix_lengths = [_prefix_length(g, config) for g in groups]
    prefixes = run_prefixes(
        model,
        [g[0].context[:n] for g, n in zip(groups, prefix_lengths, strict=True)],
        config.batch_size,
        pad_id,
    )
    rows: list[PackedRow] = []
    for gi, (g, n) in enumerate(zip(groups, prefix_lengths, strict=True)):
        for r in g:
            rows.append(pack_request(len(rows), gi, r.context[n:], r.continuations))
    # longest first (least padding); rows of a group stay together among equal lengths
    rows.sort(key=lambda row: (-len(row.tokens), row.prefix))
    dtype = next(model.parameters()).dtype
    kwarg = _cache_kwarg(model)
    results: dict[int, Scored] = {}
    for start in range(0, len(rows), config.batch_size):
        batch = rows[start : start + config.batch_size]
        width = max(len(row.tokens) for row in batch)
        lengths = [prefix_lengths[row.prefix] for row in batch]
        n_prefix = max(lengths)
        # Pads sit after each row's tokens, at the positions that follow its last index.
        # (numpy converts nested lists several times faster than torch.tensor)
        ids = torch.from_numpy(
            np.array([row.tokens + [pad_id] * (width - len(row.tokens)) for row in batch], np.int64)
        )
        positions = torch.from_numpy(
            np.array(
                [
                    [n + p for p in row.positions] + list(range(n + len(row.tokens), n + width))
                    for row, n in zip(batch, lengths, strict=True)
                ],
                np.int64,
            )
        )
        allowed = packed_mask(batch, lengths, width).to(device)
        if mask_kind == "bool":
            mask = allowed
        else:
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        cache = None
        if prefixes is not None and n_prefix:
            cache = prefixes.cache(model, [row.prefix for row in batch], n_prefix)
        row_idx = torch.tensor([i for i, row in enumerate(batch) for _ in row.reads], device=device)
        pos_idx = torch.tensor([p for row in batch for p in row.reads], device=device)
        hidden = base_forward(
            model,
            row_idx * width + pos_idx,
            input_ids=ids.to(device),
            attention_mask=mask,
            position_ids=positions.to(device),
            use_cache=cache is not None,
            **{kwarg: cache},
        ).last_hidden_state
        logprobs = torch.log_softmax(_logits(model, hidden[row_idx, pos_idx]), dim=-1)
        # Gather every (read, token) pair at once; sum per continuation on the host.
        flat_rows: list[int] = []
        flat_toks: list[int] = []
        k = 0
        for row in batch:
            for tgt in row.targets:
                flat_rows.extend(k + r for r, _ in tgt)
                flat_toks.extend(t for _, t in tgt)
            k += len(row.reads)
        picked = logprobs[
            torch.tensor(flat_rows, device=device), torch.tensor(flat_toks, device=device)
        ].tolist()
        k = j = 0
        for row in batch:
            req = reqs[row.ri]
            sums = []
            for tgt in row.targets:
                sums.append(float(sum(picked[j : j + len(tgt)])))
                j += len(tgt)
            results[row.ri] = Scored(req.key, sums, logprobs[k].cpu())
            k += len(row.reads)
    yield from (results[ri] for ri in range(len(reqs)))
