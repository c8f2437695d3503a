"""The engine's attention: grouped-query attention on CPU without key/value copies, and
the last block's attention computed only for the query positions that are read.

transformers' `sdpa` attention repeats every key/value head for its query heads
(`repeat_kv`: a copy of the layer's whole key/value cache per forward) whenever a mask is
given, because on CUDA a masked grouped-query SDPA would fall back to the slow math kernel.
On CPU, torch's SDPA takes `enable_gqa=True` together with a mask and reads the shared heads
in place: the same numbers (bit-identical in `tests/integration/test_engine_fast_paths.py`)
and 1.0-2.0x faster attention on the shapes of the scoring engine (the gain grows with the
number of query heads per key/value head and with the key length). Other devices, no mask,
one query per row, models without grouped heads, position biases and soft-capping go to
transformers' own `sdpa` function with the same arguments.

In the last decoder block only the read positions' outputs matter
(`workbench.engine.readout`). `reads_only(attention, rows)` marks that block's attention
module: its queries are gathered at `rows` (a few per row), attend over every key and value
under their own rows of the mask, and every other query position's output is zero, which
nothing reads. A pass that reads nothing (a persona prefix kept for its cache) computes no
attention output in the last block at all; its keys and values are cached as before.

`engine_attention(model)` switches an `sdpa` model to this function for the duration of the
engine's forwards (the mask is built as for `sdpa`); the model is left as it was on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

NAME = "workbench_sdpa"
"""The attention implementation registered with transformers (masks built as for sdpa)."""


def cpu_gqa_sdpa(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: query [batch, heads, q, d], key and value
    [batch, kv_heads, k, d] -> ([batch, q, heads, d], None)."""
    groups = int(getattr(module, "num_key_value_groups", 1))
    plain = (
        query.device.type != "cpu"
        or groups <= 1
        or attention_mask is None
        or query.shape[2] == 1
        or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux"))
    )
    if plain:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


def engine_sdpa(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The registered function: only the read queries of a module marked by `reads_only`,
    `cpu_gqa_sdpa` for everything else."""
    rows = module.__dict__.get(_READS)
    if rows is None:
        return cpu_gqa_sdpa(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    batch, heads, width, dim = query.shape
    out = query.new_zeros((batch, width, heads, dim))
    if rows.numel() == 0:
        return out, None
    rows = torch.sort(rows.to(query.device)).values
    row_of, pos = rows // width, rows % width
    counts = torch.bincount(row_of, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows), device=rows.device) - starts[row_of]
    # [batch, most reads in a row]: each row's read positions, padded with its first read
    # (or its last position where it has none); padded outputs are dropped below
    first = torch.where(counts > 0, pos[starts.clamp(max=len(rows) - 1)], width - 1)
    at = first[:, None].repeat(1, int(counts.max()))
    at[row_of, slot] = pos
    n_read = at.shape[1]
    picked = query.gather(2, at[:, None, :, None].expand(batch, heads, n_read, dim))
    if attention_mask is not None:
        mask = attention_mask.expand(batch, -1, -1, -1)
        if mask.shape[2] != 1:  # one row per query (else broadcast over the queries)
            index = at[:, None, :, None].expand(batch, mask.shape[1], n_read, mask.shape[-1])
            mask = mask.gather(2, index)
    else:
        # transformers gives no mask only for causal attention without padding, where every
        # query sees the keys up to its own position (the cache comes first)
        n_keys = key.shape[2]
        mask = torch.arange(n_keys, device=query.device) <= (n_keys - width + at)[:, None, :, None]
        if not getattr(module, "is_causal", True):
            mask = torch.ones_like(mask)
    result, _ = cpu_gqa_sdpa(
        module,
        picked,
        key,
        value,
        mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=False,
        **kwargs,
    )
    out[row_of, pos] = result[row_of, slot]
    return out, None


_READS = "_workbench_read_rows"


@contextmanager
def reads_only(attention: torch.nn.Module, rows: Tensor) -> Iterator[None]:
    """Inside the block, `attention` (the last block's attention module) computes outputs
    only at `rows`, flat indices into [batch * query positions] of the next forward (empty:
    none), when the model runs `engine_sdpa` (`engine_attention`); elsewhere it is ignored."""
    attention.__dict__[_READS] = rows
    try:
        yield
    finally:
        attention.__dict__.pop(_READS, None)


def _register() -> None:
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, engine_sdpa)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _applies(model: PreTrainedModel) -> bool:
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    # composite configs: leave their per-part settings alone
    return not any(getattr(config, k, None) is not None for k in getattr(config, "sub_configs", {}))


@contextmanager
def engine_attention(model: PreTrainedModel) -> Iterator[bool]:
    """Inside the block, an `sdpa` model runs `engine_sdpa`; yields whether it was switched
    (the model is left as it was on exit)."""
    if not _applies(model):
        yield False
        return
    _register()
    model.config._attn_implementation = NAME
    try:
        yield True
    finally:
        model.config._attn_implementation = "sdpa"
