"""Read and change activations at TransformerLens-named sites of a plain HF model.

Two context managers over forward hooks on the HF modules that `workbench.interp.sites`
maps each site to (`hook_embed`: input embeddings output; `blocks.{l}.hook_resid_pre`: the
block's input; `hook_attn_out` / `hook_mlp_out`: the attention / MLP module output;
`hook_resid_post`: the block's output):

- `edit_sites(lm, {site: Edit(positions, values, mode)})`: during every forward inside the
  block, row b's activation at `positions[b, k]` is replaced by (`"replace"`) or incremented
  by (`"add"`) `values[b, k]`; `-1` marks an unused slot. Patching replaces, steering adds.
- `record_sites(lm, sites)`: keeps each site's [batch, pos, d_model] output (float32, a
  clone) of the last forward.

Hooks live only inside the `with` block and are resolved from the model at entry, so a
TransformerBridge booted over the same model earlier does not strand them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from workbench.engine.models import LoadedModel
from workbench.errors import WorkbenchError
from workbench.interp.sites import Site, _first_tensor, _hf_modules, all_sites


@dataclass(frozen=True)
class Edit:
    """A change to one site's output, per row of the batch."""

    positions: Tensor
    """[batch, k] long: token positions to change in each row; -1 = an unused slot."""
    values: Tensor
    """[batch, k, d_model] (one vector per slot) or [d_model] (the same vector everywhere)."""
    mode: Literal["replace", "add"] = "replace"


def site(name: str, n_layers: int) -> Site:
    """The `Site` called `name` (exact TransformerLens name, no globs)."""
    for s in all_sites(n_layers):
        if s.name == name:
            return s
    raise WorkbenchError(
        f"unknown site {name!r} for a {n_layers}-layer model",
        fix="use hook_embed or blocks.{l}.hook_resid_pre|hook_attn_out|hook_mlp_out|hook_resid_post",
    )


def _modules(lm: LoadedModel, names: Sequence[str]) -> dict[str, tuple[Any, bool]]:
    n_layers = int(lm.model.config.get_text_config().num_hidden_layers)
    return _hf_modules(lm.model, [site(n, n_layers) for n in names])


def _apply(h: Tensor, edit: Edit) -> Tensor:
    keep = edit.positions >= 0
    rows = torch.arange(h.shape[0], device=h.device)[:, None].expand_as(edit.positions)
    b, p = rows[keep.to(h.device)], edit.positions.to(h.device)[keep.to(h.device)]
    values = edit.values.to(device=h.device, dtype=h.dtype)
    values = values.expand(len(b), -1) if values.dim() == 1 else values[keep.to(h.device)]
    h = h.clone()
    # index_put with explicit (row, position) pairs: a masked slot writes nowhere, so a -1
    # never aliases position 0 of its row.
    if edit.mode == "replace":
        h[b, p] = values
    else:
        h.index_put_((b, p), values, accumulate=True)
    return h


def hook_sites(
    lm: LoadedModel, fns: Mapping[str, Callable[[Tensor], Tensor | None]]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook `fns[site](activation)` at each site; a returned tensor replaces the activation.

    The caller removes the returned handles (`edit_sites` and `record_sites` do it on exit)."""
    handles = []
    for name, (module, pre) in _modules(lm, list(fns)).items():
        fn = fns[name]
        if pre:

            def pre_hook(mod: Any, args: Any, kwargs: Any, fn: Any = fn) -> Any:
                if args:
                    new = fn(_first_tensor(args))
                    return None if new is None else ((new, *args[1:]), kwargs)
                new = fn(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:

            def post_hook(mod: Any, args: Any, output: Any, fn: Any = fn) -> Any:
                new = fn(_first_tensor(output))
                if new is None:
                    return None
                return new if isinstance(output, Tensor) else (new, *output[1:])

            handles.append(module.register_forward_hook(post_hook))
    return handles


@contextmanager
def edit_sites(lm: LoadedModel, edits: Mapping[str, Edit]) -> Iterator[None]:
    """Apply `edits` (site name -> `Edit`) to every forward of `lm.model` inside the block.

    An edit whose positions are all -1 leaves the forward bit-identical to a plain one (the
    hook returns the activation untouched), so rows of one batch can carry edits at
    different sites.
    """

    def make(edit: Edit) -> Callable[[Tensor], Tensor | None]:
        def fn(h: Tensor) -> Tensor | None:
            return _apply(h, edit) if bool((edit.positions >= 0).any()) else None

        return fn

    handles = hook_sites(lm, {name: make(e) for name, e in edits.items()})
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_sites(lm: LoadedModel, sites: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Yield a dict that each forward inside the block fills with site name ->
    [batch, pos, d_model] float32 (a copy; the forward is not changed)."""
    store: dict[str, Tensor] = {}

    def make(name: str) -> Callable[[Tensor], None]:
        def fn(h: Tensor) -> None:
            store[name] = h.detach().float().clone()

        return fn

    handles = hook_sites(lm, {name: make(name) for name in sites})
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
