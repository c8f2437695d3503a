"""Activation sites and hooks: TransformerLens site names, prompt positions, and a capturer
that reads residual-stream activations from a plain HF model or a TransformerBridge.

"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from workbench.engine.models import LoadedModel
from workbench.engine.readout import decoder_blocks
from workbench.errors import WorkbenchError
from workbench.study import prompts as P
from workbench.study.spans import Span

SITE_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
"""Per-block sites, in the order they fire inside a block."""
EMBED = "hook_embed"
POSITION_KINDS = ("answer", "span_mean", "span_last")

Backend = Literal["hf", "bridge"]


# --------------------------------------------------------------------------------------------
# sites


@dataclass(frozen=True)
class Site:
    """One activation site, named as in TransformerLens."""

    name: str
    kind: str
    """`hook_embed` or one of `SITE_KINDS`."""
    layer: int
    """Block index; -1 for `hook_embed` (it comes before block 0)."""

    @property
    def order(self) -> tuple[int, int]:
        """Execution order within a forward pass."""
        return (self.layer, -1 if self.kind == EMBED else SITE_KINDS.index(self.kind))


def all_sites(n_layers: int) -> list[Site]:
    """Every site a model with `n_layers` blocks offers, in execution order."""
    sites = [Site(EMBED, EMBED, -1)]
    for layer in range(n_layers):
        sites += [Site(f"blocks.{layer}.{kind}", kind, layer) for kind in SITE_KINDS]
    return sites


def resolve_sites(patterns: Sequence[str], n_layers: int) -> list[Site]:
    """Sites matching any of `patterns` (exact names or fnmatch globs), in execution order."""
    available = all_sites(n_layers)
    chosen: dict[str, Site] = {}
    for pattern in patterns:
        hits = [s for s in available if fnmatch.fnmatchcase(s.name, pattern.strip())]
        if not hits:
            examples = ", ".join(s.name for s in available[:6])
            raise WorkbenchError(
                f"site {pattern!r} matches no site of this {n_layers}-layer model",
                fix=f"use TransformerLens names or globs, e.g. blocks.*.hook_resid_post "
                f"(available: {examples}, ...)",
            )
        chosen.update({s.name: s for s in hits})
    return sorted(chosen.values(), key=lambda s: s.order)


# --------------------------------------------------------------------------------------------
# capture


@dataclass(frozen=True)
class Slot:
    """One kept position of one prompt: a token range averaged (or one token)."""

    position: str
    """`answer`, `span_mean` or `span_last`."""
    factor: str | None
    token_start: int
    token_end: int


def prompt_slots(prompt: P.Prompt, spans: Sequence[Span], positions: Sequence[str]) -> list[Slot]:
    """The positions kept for one prompt, in a fixed order: answer, then per factor the span
    kinds asked (factors in study order, as `spans` lists them)."""
    n = len(prompt.input_ids)
    slots = []
    if "answer" in positions:
        slots.append(Slot("answer", None, n - 1, n))
    for span in spans:
        if "span_mean" in positions:
            slots.append(Slot("span_mean", span.factor, span.token_start, span.token_end))
        if "span_last" in positions:
            slots.append(Slot("span_last", span.factor, span.token_end - 1, span.token_end))
    return slots


@dataclass
class CaptureStats:
    """What a capture held in memory: kept vectors only, never [batch, pos, d_model]."""

    max_kept_bytes: int = 0
    """Largest float32 [batch, kept, d_model] block summed over sites in one batch."""
    forwards: int = 0
    tokens: int = 0


class _Stop(Exception):
    """Raised by the deepest requested hook: later layers and the head are not needed."""


def _find_blocks(model: Any) -> Any:
    blocks = decoder_blocks(model)
    if blocks is None:
        raise WorkbenchError(
            f"cannot find the {model.config.get_text_config().num_hidden_layers} decoder "
            f"blocks of {type(model).__name__}",
            fix="use backend='bridge' (TransformerLens hook points)",
        )
    return blocks


def _child(block: Any, names: Sequence[str], what: str) -> Any:
    for name in names:
        if isinstance(getattr(block, name, None), torch.nn.Module):
            return getattr(block, name)
    raise WorkbenchError(
        f"cannot find the {what} module of {type(block).__name__} (tried {', '.join(names)})",
        fix="use backend='bridge' (TransformerLens hook points)",
    )


def _hf_modules(model: Any, sites: Sequence[Site]) -> dict[str, tuple[Any, bool]]:
    """Site name -> (module, read its input instead of its output)."""
    blocks = _find_blocks(model) if any(s.layer >= 0 for s in sites) else None
    out: dict[str, tuple[Any, bool]] = {}
    for s in sites:
        if s.kind == EMBED:
            out[s.name] = (model.get_input_embeddings(), False)
            continue
        assert blocks is not None
        block = blocks[s.layer]
        if s.kind == "hook_resid_pre":
            out[s.name] = (block, True)
        elif s.kind == "hook_resid_post":
            out[s.name] = (block, False)
        elif s.kind == "hook_attn_out":
            out[s.name] = (_child(block, ("self_attn", "attn", "attention"), "attention"), False)
        else:
            out[s.name] = (_child(block, ("mlp", "feed_forward", "ffn"), "MLP"), False)
    return out


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"hook saw {type(value).__name__}, expected a tensor")


class Capturer:
    """Keeps only requested positions of requested sites during forward passes.

    `run(ids, weights)` takes right-padded ids [batch, pos] and a reduction matrix
    [batch, kept, pos] (`reduction_weights`) and returns site name -> [batch, kept, d_model]
    float32. Hooks live only for the duration of one `run`.
    """

    def __init__(self, lm: LoadedModel, sites: Sequence[Site], backend: Backend = "hf") -> None:
        self.lm = lm
        self.sites = list(sorted(sites, key=lambda s: s.order))
        self.backend = backend
        self.stats = CaptureStats()
        self._bridge: Any = None
        if backend == "hf":
            _hf_modules(lm.model, self.sites)  # fail early on an unknown architecture
        elif backend == "bridge":
            from workbench.engine.models import load_bridge

            self._bridge = load_bridge(lm)
        else:
            raise WorkbenchError(f"unknown backend {backend!r}", fix="use hf or bridge")

    def _hook(
        self, site: Site, weights: Tensor, kept: dict[str, Tensor], last: bool
    ) -> Callable[[Tensor], None]:
        def reduce(h: Tensor) -> None:
            # [batch, kept, pos] @ [batch, pos, d_model]: one-hot rows copy a token exactly,
            # 1/n rows average a span; nothing of size pos survives the hook.
            kept[site.name] = torch.bmm(weights, h.float()).cpu()
            if last:
                raise _Stop

        return reduce

    @torch.inference_mode()
    def run(self, ids: Tensor, weights: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        device = self.lm.device
        weights = weights.to(device)
        kept: dict[str, Tensor] = {}
        deepest = self.sites[-1].name
        if self.backend == "hf":
            # Resolved at every call: booting a TransformerBridge over the same model swaps
            # its blocks for bridge components in place, which would strand older hooks.
            modules = _hf_modules(self.lm.model, self.sites)
            handles = []
            for site in self.sites:
                module, pre = modules[site.name]
                reduce = self._hook(site, weights, kept, site.name == deepest)
                if pre:

                    def pre_hook(
                        mod: Any, args: Any, kwargs: Any, reduce: Callable[[Tensor], None] = reduce
                    ) -> None:
                        reduce(_first_tensor(args) if args else kwargs["hidden_states"])

                    handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
                else:

                    def post_hook(
                        mod: Any, args: Any, output: Any, reduce: Callable[[Tensor], None] = reduce
                    ) -> None:
                        reduce(_first_tensor(output))

                    handles.append(module.register_forward_hook(post_hook))
            try:
                self.lm.model.base_model(
                    input_ids=ids.to(device), attention_mask=attention_mask.to(device)
                )
            except _Stop:
                pass
            finally:
                for handle in handles:
                    handle.remove()
        else:
            fwd = []
            for site in self.sites:
                reduce = self._hook(site, weights, kept, False)

                def tl_hook(
                    act: Tensor, hook: Any, reduce: Callable[[Tensor], None] = reduce
                ) -> None:
                    reduce(act)

                fwd.append((site.name, tl_hook))
            self._bridge.run_with_hooks(
                ids.to(device),
                fwd_hooks=fwd,
                attention_mask=attention_mask.to(device),
                return_type=None,
            )
        missing = [s.name for s in self.sites if s.name not in kept]
        if missing:
            raise WorkbenchError(
                f"sites never fired: {', '.join(missing[:4])}",
                fix="report the architecture; try the other backend",
            )
        size = sum(v.numel() * 4 for v in kept.values())
        self.stats.max_kept_bytes = max(self.stats.max_kept_bytes, size)
        self.stats.forwards += 1
        self.stats.tokens += int(attention_mask.sum())
        return kept


def reduction_weights(slots: Sequence[Sequence[Slot]], width: int) -> Tensor:
    """[batch, kept, pos] float32: row k of prompt b averages the tokens of its slot k.
    Prompts with fewer slots get zero rows (dropped when the rows are written)."""
    kept = max((len(s) for s in slots), default=0)
    weights = torch.zeros(len(slots), kept, width)
    for b, prompt_slots_ in enumerate(slots):
        for k, slot in enumerate(prompt_slots_):
            weights[b, k, slot.token_start : slot.token_end] = 1.0 / (
                slot.token_end - slot.token_start
            )
    return weights


def batches(
    prompts: Sequence[P.Prompt], batch_size: int, pad_id: int
) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """(indices into `prompts`, ids [batch, pos], attention mask) right-padded, longest first."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].input_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i].input_ids) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for b, i in enumerate(idx):
            n = len(prompts[i].input_ids)
            ids[b, :n] = torch.tensor(prompts[i].input_ids)
            mask[b, :n] = 1
        yield idx, ids, mask
