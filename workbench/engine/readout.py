"""The last decoder block computes only what the read positions need.

After the last block nothing mixes positions: the final norm and the head act on each
position alone. So the last block's output is needed only at the positions whose next-token
distribution is read (a few per row), while its keys and values are needed nowhere after it.
Of the last block, only the key and value projections must run at every position (the read
queries attend over all of them, and the cache keeps them). Its query projection, attention
output projection and MLP act position by position and run here only at the read positions
(zeros elsewhere, which nothing reads); under `sdpa` attention its attention itself is
computed only for the read queries (`workbench.engine.attention.reads_only`). A pass that
reads nothing (a persona prefix, kept only for its cache) skips all of them.

Worth about (query + output projection + MLP) / all weights of one block, divided by the
number of blocks: ~20% of the matmul work of a 4-layer model, ~1% of a 30-layer one, plus
the last block's share of the attention. Each read position's hidden state is the one the
full block gives (tests compare with a plain HF forward). Nothing is changed when any forward
hook sits on the last block or inside it (steering, patching, recording must see every
position), or when a module is not found.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules import module as torch_module

from workbench.engine.attention import engine_attention, reads_only

_MLP = ("mlp", "feed_forward")
_ATTENTION = ("self_attn", "attn", "attention")
_QUERY = ("q_proj",)
_OUTPUT = ("o_proj", "out_proj", "dense", "c_proj")

NOTHING_READ = torch.empty(0, dtype=torch.long)
"""For a pass kept only for its cache (a persona prefix): no final hidden state is read."""


def decoder_blocks(model: Any) -> torch.nn.ModuleList | None:
    """The model's decoder blocks in order, or None where they cannot be found."""
    base = model.base_model
    n = model.config.get_text_config().num_hidden_layers
    for path in ("layers", "h", "blocks", "decoder.layers", "model.layers", "transformer.h"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList) and len(obj) == n:
            return obj
    for module in base.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    return None


def _child(parent: Any, names: tuple[str, ...]) -> torch.nn.Module | None:
    for name in names:
        child = getattr(parent, name, None)
        if isinstance(child, torch.nn.Module):
            return child
    return None


def _hooked(block: torch.nn.Module) -> bool:
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in block.modules())


def _at_rows(inner: Callable[..., Any], rows: Tensor) -> Callable[..., Any]:
    """`inner`, a position-wise module's forward, run only at the flattened rows `rows` of
    its input [..., d]; every other row of the output is zero."""

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Any:
        flat = x.reshape(-1, x.shape[-1])
        at = rows.to(x.device)
        # An empty selection still runs one row: it gives the output's width and dtype.
        picked = flat.index_select(0, at) if at.numel() else flat[:1]
        y = inner(picked[None], *args, **kwargs)
        if not isinstance(y, Tensor):
            return inner(x, *args, **kwargs)  # a module returning more than a tensor
        out = y.new_zeros((*x.shape[:-1], y.shape[-1]))
        if at.numel():
            out.view(-1, y.shape[-1]).index_copy_(0, at, y[0])
        return out

    return forward


def read_only_modules(model: Any) -> list[torch.nn.Module]:
    """The last block's position-wise modules that `last_block_at` runs at the read positions
    only (query projection, attention output projection, MLP); empty where none is found."""
    blocks = decoder_blocks(model)
    return _read_only(blocks[-1]) if blocks else []


def _read_only(block: torch.nn.Module) -> list[torch.nn.Module]:
    attention = _child(block, _ATTENTION)
    found = (
        _child(block, _MLP),
        _child(attention, _QUERY) if attention is not None else None,
        _child(attention, _OUTPUT) if attention is not None else None,
    )
    return [m for m in found if m is not None]


@contextmanager
def last_block_at(model: Any, rows: Tensor) -> Iterator[bool]:
    """Inside the block, the last decoder block's query projection, attention output
    projection and MLP run only at `rows`, flat indices into [batch * positions] of the next
    forward's input (empty: at no position). Yields whether anything was changed."""
    blocks = decoder_blocks(model)
    targets = _read_only(blocks[-1]) if blocks else []
    if not targets or blocks is None or _hooked(blocks[-1]):
        yield False
        return
    attention = _child(blocks[-1], _ATTENTION)
    with ExitStack() as stack:
        if attention is not None:
            stack.enter_context(reads_only(attention, rows))
        for m in targets:
            # A forward already set on the instance (accelerate's device hooks) is wrapped
            # and put back on exit.
            stack.callback(_restore, m, m.__dict__.get("forward"))
            m.forward = _at_rows(m.forward, rows)
        yield True


def _restore(module: torch.nn.Module, forward: Any) -> None:
    if forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = forward


def base_forward(model: Any, rows: Tensor, **inputs: Any) -> Any:
    """`model.base_model(**inputs)` where only the flattened positions `rows` are read from
    the final hidden states (empty: only the cache is kept), with the engine's exact fast
    paths: the last block at `rows` only, CPU grouped-query attention without copies
    (`workbench.engine.attention`)."""
    with engine_attention(model), last_block_at(model, rows):
        return model.base_model(**inputs)
