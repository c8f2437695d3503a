"""The forward-pass engine: exact option log-probs with shared prefixes and minimal logits.

Measurement contract (docs/MEASUREMENT.md §2), as implemented here:
- Log-probs are a log-softmax over the *full vocabulary*, computed in float32 whatever the
  model dtype (bf16 log-softmax loses precision).
- `next_token`: one row per prompt; every option variant is read from the one distribution
  at the last prompt token.
- `sequence`: log P(continuation | context) = sum of its tokens' log-probs; continuation
  tokens come from the joint encoding of context + continuation (`prompts.continuation_ids`).
- Speed without changing numbers: prompts that share a token prefix (a persona) run the prefix
  once and reuse its KV cache; rows are right-padded (real tokens keep positions 0..n-1, pads
  come after them and causal attention never sees them), sorted by length into batches, and
  logits are computed only at the positions that are read. Tests check all of this against
  an unbatched plain HF forward.
- Options packed in one row (`EngineConfig.pack_options`, sdpa/eager attention): a request's
  context suffix runs once, followed by a prefix tree (trie) of its continuations' tokens
  (all but each continuation's last token; continuations sharing leading tokens share
  nodes). A 4D attention mask lets each tree token see the persona prefix, the whole
  context suffix and its own ancestors only, with the position ids it would have in a plain
  forward of context + continuation, so every read log-prob is the one that forward gives.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel


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
    4D mask). Used with sdpa and eager attention; other attention kernels take one row per
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
) -> Tensor:
    """Final hidden states [batch, pos, d_model] of rows that continue a shared prefix."""
    device = next(model.parameters()).device
    cache = (
        _expand_cache(prefix_cache, ids.shape[0], model.config)
        if prefix_cache is not None
        else None
    )
    out = model.base_model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=cache is not None,
        **{_cache_kwarg(model): cache},
    )
    hidden: Tensor = out.last_hidden_state
    return hidden


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


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
    for reqs in groups.values():
        yield from _score_group(model, reqs, config, pad_id, device)
        if on_done is not None:
            on_done(len(reqs))


def _score_group(
    model: PreTrainedModel,
    reqs: list[Request],
    config: EngineConfig,
    pad_id: int,
    device: torch.device,
) -> Iterator[Scored]:
    # The prefix must leave >= 1 context token per request: its output is the answer position.
    n_prefix = 0
    if config.share_prefix and len(reqs) > 1:
        lcp = _common_prefix([r.context for r in reqs])
        n_prefix = min(lcp, min(len(r.context) for r in reqs) - 1)
        if n_prefix < config.min_prefix_tokens:
            n_prefix = 0
    prefix_cache = None
    if n_prefix:
        ids = torch.tensor([reqs[0].context[:n_prefix]], device=device)
        out = model.base_model(input_ids=ids, use_cache=True)
        prefix_cache = getattr(out, "cache", None) or out.past_key_values

    mask_kind = _custom_mask_kind(model) if config.pack_options else None
    if mask_kind is not None:
        yield from _score_packed(
            model, reqs, config, pad_id, device, n_prefix, prefix_cache, mask_kind
        )
        return

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
        hidden = _forward_hidden(model, ids, mask, positions, prefix_cache)
        row_idx = torch.tensor([i for i, b in enumerate(batch) for _ in b[3]], device=device)
        pos_idx = torch.tensor([p for b in batch for p in b[3]], device=device)
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


@dataclass
class _PackedRow:
    """One request's context suffix followed by the token tree of its continuations."""

    ri: int
    tokens: list[int]
    positions: list[int]
    """Position ids relative to the end of the shared prefix."""
    parents: list[int]
    """Per token: -1 for context-suffix tokens (plain causal), else the index of its parent."""
    reads: list[int]
    """Row indices whose next-token distribution is read (index 0: the answer position)."""
    targets: list[list[tuple[int, int]]]
    """Per continuation: (index into `reads`, token id) for each of its tokens."""


def _pack_request(ri: int, suffix: list[int], continuations: Sequence[Sequence[int]]) -> _PackedRow:
    n = len(suffix)
    answer = n - 1
    tokens = list(suffix)
    positions = list(range(n))
    parents = [-1] * n
    reads = [answer]
    read_of = {answer: 0}
    node: dict[tuple[int, ...], int] = {(): answer}
    targets = []
    for cont in continuations:
        tgt = []
        for j, tok in enumerate(cont):
            where = node[tuple(cont[:j])]
            if where not in read_of:
                read_of[where] = len(reads)
                reads.append(where)
            tgt.append((read_of[where], tok))
            if j + 1 < len(cont) and tuple(cont[: j + 1]) not in node:
                node[tuple(cont[: j + 1])] = len(tokens)
                tokens.append(tok)
                positions.append(answer + j + 1)
                parents.append(where)
        targets.append(tgt)
    return _PackedRow(ri, tokens, positions, parents, reads, targets)


def _packed_mask(rows: Sequence[_PackedRow], n_prefix: int, width: int) -> Tensor:
    """[batch, 1, width, n_prefix + width] bool: what each row position may attend to."""
    allowed = torch.zeros((len(rows), width, n_prefix + width), dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row.tokens)
        allowed[b, :n, :n_prefix] = True
        own = allowed[b, :, n_prefix:]
        n_ctx = sum(1 for p in row.parents if p == -1)
        own[:n_ctx, :n_ctx] = torch.ones((n_ctx, n_ctx), dtype=torch.bool).tril_()
        for i in range(n_ctx, n):
            own[i] = own[row.parents[i]]
            own[i, i] = True
        # Pads see only themselves: no row is fully masked (which would give NaN), and no
        # real token ever sees a pad.
        idx = torch.arange(n, width)
        own[idx, idx] = True
    return allowed[:, None]


def _score_packed(
    model: PreTrainedModel,
    reqs: list[Request],
    config: EngineConfig,
    pad_id: int,
    device: torch.device,
    n_prefix: int,
    prefix_cache: DynamicCache | None,
    mask_kind: str,
) -> Iterator[Scored]:
    rows = [
        _pack_request(ri, list(r.context[n_prefix:]), r.continuations) for ri, r in enumerate(reqs)
    ]
    rows.sort(key=lambda row: len(row.tokens), reverse=True)
    dtype = next(model.parameters()).dtype
    results: dict[int, Scored] = {}
    for start in range(0, len(rows), config.batch_size):
        batch = rows[start : start + config.batch_size]
        width = max(len(row.tokens) for row in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        positions = torch.arange(n_prefix, n_prefix + width).repeat(len(batch), 1)
        for i, row in enumerate(batch):
            ids[i, : len(row.tokens)] = torch.tensor(row.tokens)
            positions[i, : len(row.tokens)] = torch.tensor(row.positions) + n_prefix
        allowed = _packed_mask(batch, n_prefix, width).to(device)
        if mask_kind == "bool":
            mask = allowed
        else:
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        hidden = _forward_hidden(model, ids, mask, positions, prefix_cache)
        row_idx = torch.tensor([i for i, row in enumerate(batch) for _ in row.reads], device=device)
        pos_idx = torch.tensor([p for row in batch for p in row.reads], device=device)
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
