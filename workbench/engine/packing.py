"""Rows for the packed scoring path: option trees, per-persona prefix caches, 4D masks.

How a batch of the packed path is laid out (docs/MEASUREMENT.md §2, "batching never changes a
number"), and why each piece keeps every read log-prob equal to a plain forward:

- Every persona prefix of a pass runs once, all of them in right-padded batches: a real
  prefix token sees only earlier real tokens of its own prefix (causal attention, pads come
  after), so its keys and values are those of the prefix run alone.
- A row is one request's context suffix followed by the token tree (trie) of its
  continuations (all but each continuation's last token). Rows of *different* personas share
  a forward: each row gets its own persona's keys and values (gathered by persona index,
  padded to the longest prefix of the batch), and the 4D mask lets it see only its own
  prefix's real tokens, its whole context suffix (causally) and its tree ancestors.
- Position ids are per row: a suffix token at index j of a row whose prefix has n tokens sits
  at n + j, a tree token where it would sit in a plain forward of context + continuation.
  Pads see only themselves (no fully masked row: that would give NaN) and nobody sees a pad.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from workbench.engine.readout import NOTHING_READ, base_forward


def attention_window(config: object) -> int | None:
    """The fewest earlier positions any layer attends to (sliding-window or chunked
    attention), None where every layer attends to all of them; 0 for a limited layer type
    whose window is unknown. The packed path's 4D mask is one mask for every layer, so it is
    exact only for sequences no longer than this; longer ones take the row path, where
    transformers builds each layer type's own mask."""
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    types = getattr(text, "layer_types", None)
    if types is not None and all(t == "full_attention" for t in types):
        return None
    if getattr(text, "use_sliding_window", None) is False and types is None:
        return None
    sizes = [getattr(text, k, None) for k in ("sliding_window", "attention_chunk_size")]
    known = [int(n) for n in sizes if isinstance(n, int) and n > 0]
    if known:
        return min(known)
    return 0 if types is not None else None


def fits_window(config: object, longest: int) -> bool:
    """Whether sequences of `longest` tokens fit the model's attention window
    (`attention_window`), so that one mask, or a cache indexed without positions, is exact."""
    window = attention_window(config)
    return window is None or longest <= window


@dataclass
class PackedRow:
    """One request's context suffix followed by the token tree of its continuations."""

    ri: int
    """Index of the request in its pass."""
    prefix: int
    """Index of its persona prefix in the pass's `Prefixes`."""
    tokens: list[int]
    positions: list[int]
    """Position ids relative to the end of the row's own prefix."""
    n_context: int
    """Leading tokens that are the context suffix (plain causal attention among them)."""
    parents: list[int]
    """Per tree token (index `n_context + i`): the row index of its parent."""
    reads: list[int]
    """Row indices whose next-token distribution is read (index 0: the answer position)."""
    targets: list[list[tuple[int, int]]]
    """Per continuation: (index into `reads`, token id) for each of its tokens."""


def pack_request(
    ri: int, prefix: int, suffix: Sequence[int], continuations: Sequence[Sequence[int]]
) -> PackedRow:
    n = len(suffix)
    answer = n - 1
    tokens = list(suffix)
    positions = list(range(n))
    parents: list[int] = []
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
    return PackedRow(ri, prefix, tokens, positions, n, parents, reads, targets)


@dataclass
class Prefixes:
    """Keys and values of a pass's persona prefixes, right-padded to the longest."""

    lengths: list[int]
    """Real tokens per prefix (0: the rows of that group share nothing)."""
    keys: list[Tensor]
    """Per layer: [prefix, kv_head, pos, head_dim]."""
    values: list[Tensor]

    def cache(self, model: PreTrainedModel, which: Sequence[int], width: int) -> DynamicCache:
        """A fresh cache holding prefix `which[b]` for row b, cut to `width` positions."""
        index = torch.tensor(which, device=self.keys[0].device)
        data = [
            (k[:, :, :width].index_select(0, index), v[:, :, :width].index_select(0, index))
            for k, v in zip(self.keys, self.values, strict=True)
        ]
        return DynamicCache(ddp_cache_data=data, config=model.config)


def run_prefixes(
    model: PreTrainedModel,
    prefixes: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int,
) -> Prefixes | None:
    """Run every non-empty prefix once, in right-padded batches; None if all are empty."""
    device = next(model.parameters()).device
    lengths = [len(p) for p in prefixes]
    width = max(lengths, default=0)
    todo = sorted((i for i, n in enumerate(lengths) if n), key=lambda i: -lengths[i])
    if not todo:
        return None
    keys: list[Tensor] = []
    values: list[Tensor] = []
    for start in range(0, len(todo), batch_size):
        which = todo[start : start + batch_size]
        w = lengths[which[0]]
        ids = torch.full((len(which), w), pad_id, dtype=torch.long)
        mask = torch.zeros((len(which), w), dtype=torch.long)
        for b, i in enumerate(which):
            ids[b, : lengths[i]] = torch.tensor(prefixes[i])
            mask[b, : lengths[i]] = 1
        out = base_forward(
            model,
            NOTHING_READ,
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=torch.arange(w, device=device).expand(len(which), -1),
            use_cache=True,
        )
        cache = getattr(out, "cache", None) or out.past_key_values
        index = torch.tensor(which, device=device)
        for layer_i, layer in enumerate(cache.layers):
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(k, Tensor) or not isinstance(v, Tensor):
                raise NotImplementedError(
                    f"prefix sharing needs a key/value cache; {type(layer).__name__} has none: "
                    "pass share_prefix=False (--no-share-prefix)"
                )
            if layer_i == len(keys):
                shape = (len(prefixes), k.shape[1], width, k.shape[3])
                keys.append(k.new_zeros(shape))
                values.append(v.new_zeros((*shape[:3], v.shape[3])))
            keys[layer_i][:, :, :w].index_copy_(0, index, k)
            values[layer_i][:, :, :w].index_copy_(0, index, v)
    return Prefixes(lengths, keys, values)


def packed_mask(rows: Sequence[PackedRow], prefix_lengths: Sequence[int], width: int) -> Tensor:
    """[batch, 1, width, n_prefix + width] bool: what each row position may attend to, where
    n_prefix = max(prefix_lengths) (the cache width) and row b's own prefix has
    `prefix_lengths[b]` real tokens."""
    n_prefix = max(prefix_lengths, default=0)
    n = torch.tensor([len(row.tokens) for row in rows])
    context = torch.tensor([row.n_context for row in rows])
    at = torch.arange(width)
    real = at[None, :] < n[:, None]  # [batch, query]
    # Every real token sees its own prefix's real tokens.
    sees_prefix = torch.arange(n_prefix)[None, :] < torch.tensor(list(prefix_lengths))[:, None]
    prefix_part = real[:, :, None] & sees_prefix[:, None, :]
    # Context tokens see the context causally; pads see only themselves (no row is fully
    # masked, which would give NaN, and no real token ever sees a pad).
    in_context = at[None, :] < context[:, None]
    causal = at[:, None] >= at[None, :]
    own = (in_context[:, :, None] & in_context[:, None, :] & causal) | (
        (~real[:, :, None]) & torch.eye(width, dtype=torch.bool)
    )
    # Tree tokens see what their parent sees, and themselves.
    for b, row in enumerate(rows):
        c = row.n_context
        for i in range(c, len(row.tokens)):
            own[b, i] = own[b, row.parents[i - c]]
            own[b, i, i] = True
    return torch.cat([prefix_part, own], dim=2)[:, None]
