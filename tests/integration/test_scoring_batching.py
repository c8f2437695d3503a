"""The packed engine batches rows of several personas into one forward (each row reading its
own persona's KV cache, prefixes of different lengths, right padding, per-row position ids)
and runs all persona prefixes in one padded forward; every number must equal an unbatched
plain HF forward of context + continuation, for every architecture the engine supports."""

from __future__ import annotations

import copy
import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import LOGPROB_ATOL

from workbench.engine.models import LoadedModel, load_model
from workbench.engine.scoring import EngineConfig, Request, Scored, naive_score, score_requests
from workbench.tiny import random_model


def _config_model(kind: str, vocab: int) -> Any:
    return random_model(kind, vocab, n_layers=2)


@pytest.fixture(scope="module")
def models(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> dict[str, LoadedModel]:
    llama = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    out = {"llama": llama, "gpt2": load_model(tiny_gpt2_dir, dtype="float32", device="cpu")}
    for name in ("llama", "gpt2"):
        eager = copy.deepcopy(out[name].model)
        eager.set_attn_implementation("eager")
        out[f"{name}-eager"] = dataclasses.replace(out[name], model=eager)
    vocab = int(llama.model.config.vocab_size)
    for kind in ("mistral", "qwen2", "qwen3"):
        out[kind] = dataclasses.replace(llama, model=_config_model(kind, vocab), name=kind)
    return out


def _requests(vocab: int, seed: int = 0) -> list[Request]:
    """Persona groups with shared prefixes of different lengths (9, 14, 23 tokens), question
    suffixes of different lengths, a group of one (nothing shared), a group whose prefix is
    too short to share, next-token and multi-token continuations (some sharing leading
    tokens, so they form a tree)."""
    rng = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    reqs: list[Request] = []
    spec = [("a", 14, 3, "seq"), ("b", 23, 4, "seq"), ("c", 9, 3, "next"), ("d", 30, 1, "seq")]
    spec += [("e", 5, 2, "next")]  # shorter than min_prefix_tokens: not shared
    for group, n_prefix, n_reqs, kind in spec:
        prefix = toks(n_prefix)
        for _ in range(n_reqs):
            context = (*prefix, *toks(rng.randrange(2, 9)))
            if kind == "next":
                conts: tuple[tuple[int, ...], ...] = tuple((t,) for t in toks(4))
            else:
                a, b = toks(2)
                conts = ((a,), (b, *toks(1)), (b, *toks(2)), tuple(toks(3)))
            reqs.append(Request(len(reqs), context, conts, group=group))
    return reqs


def _check(lm: LoadedModel, reqs: list[Request], config: EngineConfig) -> list[Scored]:
    model = lm.model
    got = {s.key: s for s in score_requests(model, reqs, config, pad_id=0)}
    want = {s.key: s for s in naive_score(lambda ids: model(input_ids=ids).logits, reqs)}
    assert set(got) == set(want) == {r.key for r in reqs}
    for key, ref in want.items():
        np.testing.assert_allclose(
            got[key].continuation_logprobs, ref.continuation_logprobs, atol=LOGPROB_ATOL, rtol=1e-6
        )
        # the full-vocabulary distribution at the answer position
        np.testing.assert_allclose(got[key].answer_logprobs, ref.answer_logprobs, atol=LOGPROB_ATOL)
    return list(got.values())


@pytest.mark.parametrize(
    "name", ["llama", "gpt2", "llama-eager", "gpt2-eager", "mistral", "qwen2", "qwen3"]
)
def test_rows_of_several_personas_in_one_forward_equal_plain_hf(
    models: dict[str, LoadedModel], name: str
) -> None:
    lm = models[name]
    reqs = _requests(int(lm.model.config.vocab_size))
    forwards: list[int] = []
    hook = lm.model.base_model.register_forward_pre_hook(
        lambda _m, _a, kw: forwards.append(int(kw["input_ids"].shape[0])), with_kwargs=True
    )
    try:
        list(score_requests(lm.model, reqs, EngineConfig(batch_size=64)))
    finally:
        hook.remove()
    # one padded forward for the three shared prefixes, one for every row of every group
    assert forwards == [3, len(reqs)], forwards
    _check(lm, reqs, EngineConfig(batch_size=64))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_small_batches_and_several_passes_change_nothing(
    models: dict[str, LoadedModel], batch_size: int
) -> None:
    """Batches that cut across groups, and passes (`_PASS_BATCHES` x batch size rows) that
    split the groups: the same numbers; `on_done` counts every request once."""
    lm = models["llama"]
    reqs = _requests(int(lm.model.config.vocab_size), seed=1)
    _check(lm, reqs, EngineConfig(batch_size=batch_size))
    done: list[int] = []
    list(score_requests(lm.model, reqs, EngineConfig(batch_size=batch_size), on_done=done.append))
    assert sum(done) == len(reqs)


def test_without_prefix_sharing_or_packing_the_same(models: dict[str, LoadedModel]) -> None:
    lm = models["gpt2"]
    reqs = _requests(int(lm.model.config.vocab_size), seed=2)
    _check(lm, reqs, EngineConfig(batch_size=5, share_prefix=False))
    _check(lm, reqs, EngineConfig(batch_size=5, pack_options=False))


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
def test_sequences_longer_than_a_sliding_window_stay_exact(
    kind: str, models: dict[str, LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One packed 4D mask cannot express a sliding window: sequences longer than the window
    take the row path (with transformers' own per-layer masks), shorter ones stay packed;
    both equal a plain HF forward. (Packed past the window, the numbers were off by up to
    0.12 and a prefix longer than the window crashed.)"""
    from workbench.engine import scoring

    lm = dataclasses.replace(models["llama"], model=random_model(kind, 97, sliding_window=12))
    rows_groups: list[int] = []
    real = scoring._score_group

    def spy(model: Any, reqs: list[Request], *args: Any) -> Any:
        rows_groups.append(len(reqs))
        return real(model, reqs, *args)

    monkeypatch.setattr(scoring, "_score_group", spy)
    rng = random.Random(3)
    reqs = []
    for group, n_prefix in (("a", 9), ("b", 15)):
        prefix = [rng.randrange(3, 97) for _ in range(n_prefix)]
        for _ in range(3):
            context = (*prefix, *(rng.randrange(3, 97) for _ in range(rng.randrange(2, 7))))
            conts = tuple(
                tuple(rng.randrange(3, 97) for _ in range(rng.randrange(1, 3))) for _ in range(3)
            )
            reqs.append(Request(len(reqs), context, conts, group=group))
    config = EngineConfig(min_prefix_tokens=4)
    _check(lm, reqs, config)
    assert rows_groups == [3, 3]  # longer than the window: both groups took the row path
    rows_groups.clear()
    short = [
        dataclasses.replace(r, context=r.context[-7:], continuations=((5,), (6, 7)), group="s")
        for r in reqs
    ]
    _check(lm, short, config)
    assert rows_groups == []  # within the window: packed
