"""Patched forwards that resume a prompt's clean run at the patched block and token.

An edit at a site of block `l` that touches target tokens `>= p` changes nothing before
block `l`, and (causal attention) nothing at tokens `< p` in any block. A resumed forward
therefore computes only tokens `p..n-1` of blocks `l..L-1`: it starts from the clean run's
residual stream entering block `l` at those tokens, and each attention reads the clean run's
keys and values for tokens `< p` (the patched run's are the same) with its own for tokens
`>= p`. The blocks are the HF modules themselves, called with what the model's own forward
would pass them: a causal mask over the prompt's real tokens, the tokens' true positions
(rotary position embeddings at `p..n-1`) and a key/value cache, so edits apply through the
same hooks as in a full forward (`workbench.interp.hooks.edit_sites`) and the numbers are the
full patched forward's up to float rounding (tests: within 1e-6 in probability on tiny
Llama, GPT-2, Mistral, Qwen2 and Qwen3 models, sdpa and eager, and the model organism).

Addressed (`resumable`): model types Llama, Mistral, Qwen2, Qwen3 (the Llama decoder layer)
and GPT-2, with `sdpa` or `eager` attention and no sliding window shorter than the prompts.
Anything else (Gemma's alternating windows, flash or flex attention, remote code, a model
spread over devices) is answered with the reason, and `workbench.interp.patching` runs full
forwards instead; `hook_embed` edits always run full forwards (they precede block 0).

Memory: a clean state keeps, per prompt, the residual entering every block and every
block's keys and values (model dtype, on the model's device).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from workbench.engine.models import LoadedModel
from workbench.engine.scoring import _logits
from workbench.interp.hooks import Edit, edit_sites, record_sites
from workbench.interp.sites import EMBED, Site, _find_blocks

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
"""Model types whose blocks a resumed forward can call (tested: llama, gpt2, mistral, qwen2,
qwen3 built from configs)."""
ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class CleanState:
    """What a resumed forward reads from one prompt's clean run (model dtype and device)."""

    n: int
    """Real tokens of the prompt."""
    resid: Tensor
    """[layer + 1, pos, d_model]: the residual entering each block; index L is the last
    block's output."""
    keys: Tensor
    """[layer, kv_head, pos, head_dim] as the attention's cache holds them (after rotary)."""
    values: Tensor
    """[layer, kv_head, pos, head_dim]."""


def resumable(model: Any, max_tokens: int) -> str | None:
    """None if resumed forwards can address `model` for prompts up to `max_tokens` tokens,
    else why not (the caller runs full forwards)."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in MODEL_TYPES:
        return f"model type {kind!r} is not one of {', '.join(MODEL_TYPES)}"
    attn = getattr(config, "_attn_implementation", None)
    if attn not in ATTENTION:
        return f"attention implementation {attn!r} is not one of {', '.join(ATTENTION)}"
    types = getattr(config, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return "some layers use sliding-window attention"
    window = getattr(config, "sliding_window", None)
    if window is not None and max_tokens > int(window):
        return f"prompts of {max_tokens} tokens exceed the sliding window ({window})"
    if _final_norm(model) is None:
        return "no final norm (norm / ln_f) found"
    if len(set(dict(getattr(model, "hf_device_map", None) or {}).values())) > 1:
        return "the model is spread over devices (device_map)"
    return None


def start(site: Site, n_layers: int) -> tuple[int, str] | None:
    """(block a patched forward at `site` resumes at, the site to hook there), None for
    `hook_embed`. `blocks.{l}.hook_resid_post` is `blocks.{l+1}.hook_resid_pre` (the same
    tensor) except after the last block."""
    if site.kind == EMBED:
        return None
    if site.kind == "hook_resid_post" and site.layer + 1 < n_layers:
        return site.layer + 1, f"blocks.{site.layer + 1}.hook_resid_pre"
    return site.layer, site.name


def _final_norm(model: Any) -> Any:
    base = model.base_model
    for name in ("norm", "ln_f"):
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return getattr(base, name)
    return None


def _batch(lm: LoadedModel, ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    pad = lm.tokenizer.pad_token_id or 0
    width = max(len(r) for r in ids)
    batch = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, r in enumerate(ids):
        batch[i, : len(r)] = torch.tensor(list(r))
        mask[i, : len(r)] = 1
    return batch.to(lm.device), mask.to(lm.device)


def _answer(lm: LoadedModel, hidden: Tensor, last: Tensor) -> Tensor:
    """[row, vocab] float32 log-probs from final hidden states [row, pos, d_model]."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return torch.log_softmax(_logits(lm.model, hidden[rows, last.to(hidden.device)]), -1).cpu()


@torch.inference_mode()
def full_logprobs(
    lm: LoadedModel, ids: Sequence[Sequence[int]], *, with_cache: bool = False
) -> tuple[Tensor, Any]:
    """[row, vocab] float32 log-probs after each right-padded row's last token, and the
    forward's key/value cache when `with_cache` (else None). Hooks active around the call
    apply."""
    batch, mask = _batch(lm, ids)
    out = lm.model.base_model(input_ids=batch, attention_mask=mask, use_cache=with_cache)
    last = torch.tensor([len(r) - 1 for r in ids])
    cache = (
        (getattr(out, "cache", None) or getattr(out, "past_key_values", None))
        if with_cache
        else None
    )
    return _answer(lm, out.last_hidden_state, last), cache


def clean_forward(
    lm: LoadedModel, ids: Sequence[Sequence[int]], sites: Sequence[str], *, states: bool = True
) -> tuple[Tensor, dict[str, Tensor], list[CleanState]]:
    """One batched clean forward: answer log-probs [row, vocab], `sites` recorded
    ([row, pos, d_model] float32) and each row's `CleanState` (none unless `states`)."""
    if not states:
        with record_sites(lm, sites) as rec:
            lp, _ = full_logprobs(lm, ids)
        return lp, dict(rec), []
    n_layers = int(lm.model.config.get_text_config().num_hidden_layers)
    resid = [f"blocks.{j}.hook_resid_pre" for j in range(n_layers)]
    resid.append(f"blocks.{n_layers - 1}.hook_resid_post")
    with record_sites(lm, list(dict.fromkeys([*sites, *resid]))) as rec:
        lp, cache = full_logprobs(lm, ids, with_cache=True)
    dtype = next(lm.model.parameters()).dtype
    stream = torch.stack([rec[name] for name in resid], 1).to(lm.device, dtype)
    keys = torch.stack([layer.keys for layer in cache.layers[:n_layers]], 1)
    values = torch.stack([layer.values for layer in cache.layers[:n_layers]], 1)
    out = [
        CleanState(
            len(r), stream[i, :, : len(r)], keys[i, :, :, : len(r)], values[i, :, :, : len(r)]
        )
        for i, r in enumerate(ids)
    ]
    return lp, {s: rec[s] for s in sites}, out


class _RowCache:
    """The cache protocol HF attention calls (`update`): each row's clean keys and values
    with the resumed tokens' own written over positions `start..n-1`."""

    def __init__(self, states: Sequence[CleanState], layer: int, starts: Tensor, width: int):
        first = states[0].keys
        shape = (len(states), first.shape[1], width, first.shape[3])
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        for j in range(layer, first.shape[0]):
            k = first.new_zeros(shape)
            v = first.new_zeros(shape)
            for r, s in enumerate(states):
                k[r, :, : s.n] = s.keys[j]
                v[r, :, : s.n] = s.values[j]
            self.keys[j], self.values[j] = k, v
        n = torch.tensor([s.n for s in states])
        span = int((n - starts).max())
        offs = torch.arange(span)
        valid = offs[None] < (n - starts)[:, None]
        self.rows = torch.arange(len(states))[:, None].expand(-1, span)[valid].to(first.device)
        self.cols = (starts[:, None] + offs[None])[valid].to(first.device)
        self.offs = offs[None].expand(len(states), -1)[valid].to(first.device)

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[self.rows, :, self.cols] = key_states[self.rows, :, self.offs]
        v[self.rows, :, self.cols] = value_states[self.rows, :, self.offs]
        return k, v


@torch.inference_mode()
def resumed_logprobs(
    lm: LoadedModel,
    states: Sequence[CleanState],
    layer: int,
    starts: Sequence[int],
    edits: Mapping[str, Edit],
) -> Tensor:
    """[row, vocab] float32 answer log-probs of patched forwards that resume row r's clean
    run (`states[r]`) at block `layer`, token `starts[r]`. `edits` are `edit_sites` edits at
    sites of blocks >= `layer` (TransformerLens names), positions in prompt tokens, none
    before `starts[r]`."""
    model, base = lm.model, lm.model.base_model
    blocks = _find_blocks(model)
    dev = lm.device
    p = torch.tensor(list(starts))
    n = torch.tensor([s.n for s in states])
    if bool((p < 0).any() | (p >= n).any()):
        raise ValueError("a resumed forward starts outside its prompt")
    span, width = int((n - p).max()), int(n.max())
    h = states[0].resid.new_zeros(len(states), span, states[0].resid.shape[-1])
    for r, s in enumerate(states):
        h[r, : s.n - starts[r]] = s.resid[layer, starts[r] : s.n]
    pos = p[:, None] + torch.arange(span)[None]
    key = torch.arange(width)
    allowed = (key[None, None] <= pos[:, :, None]) & (key[None, None] < n[:, None, None])
    mask = allowed[:, None].to(dev)
    if model.config._attn_implementation == "eager":
        mask = torch.zeros(mask.shape, dtype=h.dtype, device=dev).masked_fill(
            ~mask, torch.finfo(h.dtype).min
        )
    shifted = {}
    for name, e in edits.items():
        used = e.positions >= 0
        rel = e.positions - p[: e.positions.shape[0], None]
        if bool((used & (rel < 0)).any()):
            raise ValueError(f"an edit at {name} lies before its row's start token")
        shifted[name] = Edit(torch.where(used, rel, -1), e.values, e.mode)
    kwargs: dict[str, Any] = {
        "attention_mask": mask,
        _layer_cache_kwarg(blocks[layer]): _RowCache(states, layer, p, width),
        "use_cache": False,
    }
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None:
        kwargs["position_ids"] = pos.to(dev)
        kwargs["position_embeddings"] = rotary(h, position_ids=pos.to(dev))
    with edit_sites(lm, shifted):
        for j in range(layer, len(blocks)):
            out = blocks[j](h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        h = _final_norm(model)(h)
    return _answer(lm, h, n - 1 - p)


def _layer_cache_kwarg(block: Any) -> str:
    params = inspect.signature(block.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
