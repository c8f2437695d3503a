"""The engine's exact fast paths, each against the plain HF computation it replaces: CPU
grouped-query attention without key/value copies and attention for the read queries only
(`workbench.engine.attention`), and the last decoder block run only at the read positions
(`workbench.engine.readout`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import workbench.engine.attention as engine_attention_module
from workbench.engine.attention import NAME, cpu_gqa_sdpa, engine_attention, engine_sdpa, reads_only
from workbench.engine.readout import (
    NOTHING_READ,
    base_forward,
    decoder_blocks,
    last_block_at,
    read_only_modules,
)
from workbench.tiny import random_model, tiny_config

VOCAB = 97


def _llama() -> Any:
    torch.manual_seed(0)
    config = tiny_config("llama", VOCAB, d_model=32, n_layers=3)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def _gpt2() -> Any:
    torch.manual_seed(0)
    config = tiny_config("gpt2", VOCAB, d_model=32, n_layers=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


MODELS = {
    "llama": _llama,
    "gpt2": _gpt2,
    "mistral": lambda: random_model("mistral", VOCAB),
    "qwen3": lambda: random_model("qwen3", VOCAB),
}


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows of different lengths and their 2D attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    for b, n in enumerate((11, 7, 9, 4)):
        ids[b, n:] = 0
        mask[b, n:] = 0
    return ids, mask


class _Module(torch.nn.Module):
    num_key_value_groups = 3


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_cpu_gqa_sdpa_equals_transformers_sdpa(mask_kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 5, 8, generator=g)
    k = torch.randn(2, 2, 9, 8, generator=g)
    v = torch.randn(2, 2, 9, 8, generator=g)
    allowed = torch.rand(2, 1, 5, 9, generator=g) > 0.4
    allowed[..., 0] = True
    mask = (
        allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, -1e30)
    )
    ours, _ = cpu_gqa_sdpa(_Module(), q, k, v, mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(_Module(), q, k, v, mask, scaling=0.3)
    assert ours.shape == theirs.shape == (2, 5, 6, 8)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # and it is a different computation than ignoring the mask
    unmasked, _ = sdpa_attention_forward(_Module(), q, k, v, None, scaling=0.3, is_causal=False)
    assert (ours - unmasked).abs().max() > 1e-3


@pytest.mark.parametrize("kind", list(MODELS))
def test_switched_model_gives_the_plain_forward_and_is_restored(kind: str) -> None:
    model = MODELS[kind]()
    ids, mask = _batch()
    with torch.inference_mode():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with engine_attention(model) as switched:
            assert switched and model.config._attn_implementation == NAME
            fast = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa"
    real = mask.bool()
    torch.testing.assert_close(fast[real], plain[real], rtol=0, atol=1e-5)


def test_eager_models_are_left_alone() -> None:
    llama = _llama()
    llama.set_attn_implementation("eager")
    with engine_attention(llama) as switched:
        assert not switched and llama.config._attn_implementation == "eager"


class _Causal(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def _full_and_read(
    mask: torch.Tensor | None, rows: torch.Tensor, width: int, n_keys: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 4, width, 8, generator=g)
    k = torch.randn(4, 2, n_keys, 8, generator=g)
    v = torch.randn(4, 2, n_keys, 8, generator=g)
    module = _Causal()
    full, _ = cpu_gqa_sdpa(module, q, k, v, mask, scaling=0.3)
    with reads_only(module, rows):
        read, _ = engine_sdpa(module, q, k, v, mask, scaling=0.3)
    assert "_workbench_read_rows" not in module.__dict__
    return full, read


def _check_reads(full: torch.Tensor, read: torch.Tensor, rows: torch.Tensor) -> None:
    flat_full, flat_read = full.reshape(-1, 4, 8), read.reshape(-1, 4, 8)
    torch.testing.assert_close(flat_read[rows], flat_full[rows], rtol=0, atol=1e-6)
    unread = torch.ones(len(flat_full), dtype=torch.bool)
    unread[rows] = False
    assert flat_read[unread].abs().max() == 0  # nothing computed where nothing is read


def test_read_queries_only_equal_the_full_attention_there() -> None:
    """Rows with 3, 1, 0 and 2 reads in any order, under a mask with a cache before the
    queries; a row without reads gets no output at all."""
    width, n_keys = 6, 10
    g = torch.Generator().manual_seed(4)
    allowed = torch.rand(4, 1, width, n_keys, generator=g) > 0.3
    allowed[..., 0] = True
    rows = torch.tensor([5, 0, 3, 1 * width + 2, 3 * width + 4, 3 * width + 1])
    full, read = _full_and_read(allowed, rows, width, n_keys)
    _check_reads(full, read, rows)
    # empty: a pass kept for its cache computes nothing
    _, none = _full_and_read(allowed, torch.empty(0, dtype=torch.long), width, n_keys)
    assert none.abs().max() == 0


def test_read_queries_without_a_mask_are_causal() -> None:
    """transformers passes no mask for causal attention without padding; the read queries
    then see the keys up to their own position, a cache of earlier keys included."""
    width, rows = 6, torch.tensor([5, 2, 6 + 0, 18 + 5, 12 + 3])
    full, read = _full_and_read(None, rows, width, width)  # no cache: SDPA's own causal flag
    _check_reads(full, read, rows)
    n_keys = 9  # three cached keys before the queries: the causal mask is built explicitly
    causal = torch.ones(width, n_keys, dtype=torch.bool).tril(n_keys - width)
    full, read = _full_and_read(None, rows, width, n_keys)
    ref, _ = _full_and_read(causal.expand(4, 1, width, n_keys), rows, width, n_keys)
    _check_reads(ref, read, rows)


def _reads(mask: torch.Tensor) -> torch.Tensor:
    """Two read positions per row (the last real token and the one before), flattened."""
    width = mask.shape[1]
    last = mask.sum(1) - 1
    return torch.cat([torch.arange(4) * width + last, torch.arange(4) * width + last - 1])


@pytest.mark.parametrize("kind", list(MODELS))
def test_last_block_at_reads_equals_plain_forward(kind: str) -> None:
    model = MODELS[kind]()
    ids, mask = _batch()
    rows = _reads(mask)
    with torch.inference_mode():
        plain = model.base_model(input_ids=ids, attention_mask=mask, use_cache=True)
        fast = base_forward(model, rows, input_ids=ids, attention_mask=mask, use_cache=True)
    d = plain.last_hidden_state.shape[-1]
    p_flat = plain.last_hidden_state.reshape(-1, d)
    f_flat = fast.last_hidden_state.reshape(-1, d)
    torch.testing.assert_close(f_flat[rows], p_flat[rows], rtol=0, atol=1e-5)
    # the shortcut really ran: the unread positions differ from the full block's output
    unread = torch.ones(len(p_flat), dtype=torch.bool)
    unread[rows] = False
    assert (f_flat[unread] - p_flat[unread]).abs().max() > 1e-3
    # every layer's keys and values (the cache) are untouched
    for a, b in zip(plain.past_key_values.layers, fast.past_key_values.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-5)
    # the modules are restored
    block = decoder_blocks(model)[-1]  # type: ignore[index]
    assert not any(
        "forward" in m.__dict__ or "_workbench_read_rows" in m.__dict__ for m in block.modules()
    )


def test_last_block_attention_runs_for_the_read_queries_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _llama()
    ids, mask = _batch()
    widths: list[int] = []
    inner = engine_attention_module.cpu_gqa_sdpa

    def spy(module: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        widths.append(query.shape[2])
        return inner(module, query, *args, **kwargs)

    monkeypatch.setattr(engine_attention_module, "cpu_gqa_sdpa", spy)
    with torch.inference_mode():
        base_forward(model, _reads(mask), input_ids=ids, attention_mask=mask)
        base_forward(model, NOTHING_READ, input_ids=ids, attention_mask=mask)
    # 3 layers, then 3 layers again: the last block's attention saw the 2 reads per row,
    # then (nothing read) did not run at all
    assert widths == [11, 11, 2, 11, 11]


def test_read_only_modules_are_the_last_blocks_position_wise_ones() -> None:
    llama = _llama()
    last = decoder_blocks(llama)[-1]  # type: ignore[index]
    assert read_only_modules(llama) == [last.mlp, last.self_attn.q_proj, last.self_attn.o_proj]
    gpt2 = _gpt2()
    last = decoder_blocks(gpt2)[-1]  # type: ignore[index]
    # GPT-2 computes queries, keys and values in one projection: only the MLP and output
    assert read_only_modules(gpt2) == [last.mlp, last.attn.c_proj]


def test_nothing_read_keeps_the_cache() -> None:
    model = _llama()
    ids, mask = _batch()
    with torch.inference_mode():
        plain = model.base_model(input_ids=ids, attention_mask=mask, use_cache=True)
        fast = base_forward(model, NOTHING_READ, input_ids=ids, attention_mask=mask, use_cache=True)
    assert fast.last_hidden_state.shape == plain.last_hidden_state.shape
    for a, b in zip(plain.past_key_values.layers, fast.past_key_values.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-5)


def test_hooks_on_the_last_block_turn_the_shortcut_off() -> None:
    model = _llama()
    ids, mask = _batch()
    rows = _reads(mask)
    block = decoder_blocks(model)[-1]  # type: ignore[index]
    seen: list[torch.Tensor] = []
    handle = block.mlp.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.inference_mode(), last_block_at(model, rows) as on:
            assert not on
            out = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        handle.remove()
    assert seen[0].shape[:2] == ids.shape and seen[0].abs().sum(-1).min() > 0  # every position
    with torch.inference_mode():
        plain = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


def test_an_instance_forward_already_set_is_put_back() -> None:
    """accelerate's device hooks set `forward` on the module instance; it must survive."""
    model = _llama()
    mlp = decoder_blocks(model)[-1].mlp  # type: ignore[index]
    calls: list[int] = []
    original = mlp.forward

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[-2])
        return original(x)

    mlp.forward = wrapped
    ids, mask = _batch()
    rows = _reads(mask)
    with torch.inference_mode(), last_block_at(model, rows):
        model.base_model(input_ids=ids, attention_mask=mask)
    assert mlp.forward is wrapped
    assert calls == [len(rows)]  # the instance forward ran, on the read rows only
