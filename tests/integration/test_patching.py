"""Span-aligned activation patching on the small model organism (issue 10, part 2).

- Exactness: an edit with the target's own activations, and a zero `add` edit, change no bit
  of the batched forward and reproduce the plain HF forward's answer distribution within 1e-6; the whole residual of the source at
  `blocks.0.hook_resid_pre` over all positions (equal lengths) gives the source's answer.
- Planted truth: the actor span carries the actor effect (normalized effect >= 0.8 at the best
  block-0 site, both directions); patching the title or region span moves the answer by no
  more than noise. `age` has no pair in the design (it moves with party and region) and says so.
- Unequal span lengths, resume after a killed chunk, and every bad input's error.
- Resumed forwards (`workbench.interp.resume_forward`: start at the site's block and the first
  patched token) equal the full patched forward within 1e-6 in probability on tiny Llama and
  GPT-2 (sdpa and eager), Mistral, Qwen2 and Qwen3 models and the small organism; a whole
  patching run with them equals one with full forwards; other models fall back to full
  forwards.
- `pair_prompts` (only the prompts in pairs tokenized and spanned) gives the full rendering's
  prompts and spans.

Measured on the small organism (seed 0, 32 pairs): actor span_mean at blocks.0.hook_resid_pre
1.00 (denoising) / 0.96 (noising); title and region |normalized effect| <= 0.03.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from workbench.engine.models import LoadedModel, load_model
from workbench.errors import StudyError, WorkbenchError
from workbench.interp import patching as PT
from workbench.interp import readers as R
from workbench.interp import resume_forward as RF
from workbench.interp.hooks import Edit, edit_sites, record_sites
from workbench.interp.pairs import align, factor_pairs, pair_prompts
from workbench.interp.sites import all_sites
from workbench.study import prompts as P
from workbench.study.load import load_study
from workbench.study.spans import Span, factor_spans
from workbench.tiny import random_model

EARLY = ("blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out")
CONFIG = PT.PatchConfig(
    sites=(*EARLY, "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"),
    positions=("span_last", "span_mean"),
    questions=("rating",),
    max_pairs=32,
    n_boot=300,
    progress=False,
)


@pytest.fixture(scope="module")
def organism(small_organism: Path) -> tuple[Any, LoadedModel]:
    study = load_study(small_organism / "study.yaml")
    return study, load_model(small_organism / "model", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def runs(organism: tuple[Any, LoadedModel]) -> dict[str, PT.PatchResult]:
    study, lm = organism
    return {f: PT.patch_factor(study, lm, f, None, CONFIG) for f in ("actor", "title", "region")}


def _plain(lm: LoadedModel, ids: tuple[int, ...]) -> torch.Tensor:
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, -1)


def test_identity_and_zero_edits_match_plain_hf(organism: tuple[Any, LoadedModel]) -> None:
    study, lm = organism
    prompts = [p for p in P.render(study, lm.tokenizer) if p.question_id == "rating"][:3]
    ids = [p.input_ids for p in prompts]
    sites = ["hook_embed", *EARLY, "blocks.1.hook_resid_post"]
    with record_sites(lm, sites) as rec:
        plain_batch = PT.answer_logprobs(lm, ids)
        own = dict(rec)
    width = own[sites[0]].shape[1]
    pos = torch.tensor([[i if i < len(r) else -1 for i in range(width)] for r in ids])
    for mode, values in (
        ("replace", own),
        ("add", {s: torch.zeros_like(v) for s, v in own.items()}),
    ):
        with edit_sites(lm, {s: Edit(pos, values[s], mode) for s in sites}):
            got = PT.answer_logprobs(lm, ids)
        assert torch.equal(got, plain_batch), mode  # the edit itself changes no bit
        for k, p in enumerate(prompts):  # the distribution of an unbatched plain HF forward
            assert (got[k].exp() - _plain(lm, p.input_ids).exp()).abs().max() < 1e-6, mode


def test_whole_residual_at_layer0_gives_the_source(organism: tuple[Any, LoadedModel]) -> None:
    study, lm = organism
    prompts = P.render(study, lm.tokenizer)
    pairs = factor_pairs(study, prompts, "actor", questions=["rating"])
    by_id = {p.prompt_id: p for p in prompts}
    pair = next(
        pr for pr in pairs if len(by_id[pr.clean].input_ids) == len(by_id[pr.corrupt].input_ids)
    )
    src, tgt = by_id[pair.clean].input_ids, by_id[pair.corrupt].input_ids
    assert src != tgt
    with record_sites(lm, ["blocks.0.hook_resid_pre"]) as rec:
        PT.answer_logprobs(lm, [src])
        h = rec["blocks.0.hook_resid_pre"]
    edit = Edit(torch.arange(len(tgt))[None], h, "replace")
    with edit_sites(lm, {"blocks.0.hook_resid_pre": edit}):
        got = PT.answer_logprobs(lm, [tgt])[0]
    assert (got.exp() - _plain(lm, src).exp()).abs().max() < 1e-6
    assert (got.exp() - _plain(lm, tgt).exp()).abs().max() > 1e-3


def _ne(result: PT.PatchResult) -> pd.DataFrame:
    t = result.patching
    return t[t["metric"] == "normalized_effect"]


def test_actor_span_restores_the_actor_effect(runs: dict[str, PT.PatchResult]) -> None:
    ne = _ne(runs["actor"])
    assert set(ne["direction"]) == {"denoising", "noising"}
    for direction, grp in ne[ne["site"].isin(EARLY)].groupby("direction"):
        best = grp.sort_values("effect").iloc[-1]
        assert best["effect"] >= 0.8, (direction, best.to_dict())
        assert best["ci_low"] > 0.5 and best["n_pairs"] == 32
    # the planted effect is large against its floor, and the pairs carry it
    assert runs["actor"].pairs["tv_clean_corrupt"].mean() > 0.2


@pytest.mark.parametrize("factor", ["title", "region"])
def test_null_factor_spans_move_nothing(runs: dict[str, PT.PatchResult], factor: str) -> None:
    ne = _ne(runs[factor])
    assert len(ne) == len(CONFIG.sites) * 2 * 2
    for _, row in ne.iterrows():
        noise = row["ci_low"] <= 0 <= row["ci_high"] or abs(row["effect"]) < 0.05
        assert noise, row.to_dict()
    tv = runs[factor].patching
    assert tv[tv["metric"] == "tv_target"]["effect"].max() < 0.02


def _renamed(study: Any, old: str, new: str) -> Any:
    """The study with one actor renamed (a longer name: spans of unequal token lengths)."""
    factors = tuple(
        dataclasses.replace(f, values=tuple(new if v == old else v for v in f.values))
        if f.name == "actor"
        else f
        for f in study.factors
    )
    cells = tuple(
        {k: new if (k == "actor" and v == old) else v for k, v in c.items()} for c in study.cells
    )
    return dataclasses.replace(study, factors=factors, cells=cells)


def _check_unequal_patches(study: Any, lm: LoadedModel, result: PT.PatchResult) -> None:
    """Recompute patched scores of unequal-span pairs at `blocks.0.hook_resid_pre` without the
    patching code: there the residual is the token embedding, so `all` is a plain forward of
    the target's token ids remapped by `align`, and `span_mean` a plain forward of the
    target's embeddings with its span shifted by (source span mean - target span mean)."""
    prompts = {p.prompt_id: p for p in P.render(study, lm.tokenizer)}
    spans = {
        i: s
        for i, ss in factor_spans(study, list(prompts.values()), lm.tokenizer, ["actor"]).items()
        for s in ss
    }
    embed = lm.model.get_input_embeddings()
    patched = result.patched.set_index(["pair_id", "direction", "position"])["patched_score"]
    checked = 0
    for pair in result.pairs.head(3).itertuples():
        for direction, src, tgt in (
            ("denoising", pair.clean, pair.corrupt),
            ("noising", pair.corrupt, pair.clean),
        ):
            s_ids, t_ids = prompts[src].input_ids, prompts[tgt].input_ids
            s, t = spans[src], spans[tgt]
            assert s.token_end - s.token_start != t.token_end - t.token_start
            remapped = [s_ids[j] for j in align(s, t, len(s_ids), len(t_ids))]
            with torch.inference_mode():
                h_s, h_t = embed(torch.tensor(s_ids)), embed(torch.tensor(t_ids))
                shift = h_s[s.token_start : s.token_end].mean(0)
                shift = shift - h_t[t.token_start : t.token_end].mean(0)
                h_t[t.token_start : t.token_end] += shift
                logits = lm.model(inputs_embeds=h_t[None]).logits[0, -1].float()
            expected = {"all": _plain(lm, tuple(remapped)), "span_mean": logits.log_softmax(-1)}
            reader = R.reader(study, lm, prompts[tgt])
            for position, lp in expected.items():
                (q,) = R.distributions(lp[None], [reader], study.scoring.aggregate)
                want = R.score(q, reader)
                got = patched.loc[(pair.pair_id, direction, position)]
                assert abs(got - want) < 1e-5, (pair.pair_id, direction, position, got, want)
                checked += 1
    assert checked == 12


def test_unequal_span_lengths(organism: tuple[Any, LoadedModel]) -> None:
    study, lm = organism
    # Every actor name of the organism is two tokens; "Dev Oka Okafor" is more (five with the
    # small organism's tokenizer: " Oka" is not one of its tokens).
    longer = _renamed(study, "Dev Okafor", "Dev Oka Okafor")
    config = dataclasses.replace(
        CONFIG, sites=("blocks.0.hook_resid_pre",), positions=PT.POSITIONS, max_pairs=None
    )
    # one title and genre: 96 pairs of Mara Quinlan (2 tokens) and Dev Oka Okafor
    small = dataclasses.replace(
        longer,
        cells=tuple(
            c
            for c in longer.cells
            if c.get("actor") in {"Mara Quinlan", "Dev Oka Okafor"}
            and c.get("title") == "Paper Carnival"
            and c.get("genre") == "comedy"
        ),
    )
    result = PT.patch_factor(small, lm, "actor", None, config)
    unequal = result.pairs[result.pairs["clean_span_tokens"] != result.pairs["corrupt_span_tokens"]]
    assert len(unequal) == len(result.pairs) > 0
    t = result.patching
    assert t["effect"].notna().all()
    assert set(t["position"]) == set(PT.POSITIONS)
    ne = t[t["metric"] == "normalized_effect"].set_index(["position", "direction"])
    # The span moves the answer towards the source's in both directions. How far depends on
    # how the trained weights treat a name they never saw, which differs between CPUs (float32
    # rounding in training): 0.50-0.88 here, so only the interval's side is asserted; the
    # exact check is the recomputation below.
    for position in ("span_mean", "all"):
        assert (ne.loc[position, "ci_low"] > 0).all(), ne
    _check_unequal_patches(small, lm, result)
    # the rule: before the span same index, after it shifted, inside right-aligned + clamped
    s, u = Span("x", 0, 0, 3, 5, 1), Span("x", 0, 0, 3, 6, 1)
    assert align(s, u, 9, 10) == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8]
    assert align(u, s, 10, 9) == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_resume_after_a_killed_chunk(
    organism: tuple[Any, LoadedModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, lm = organism
    config = dataclasses.replace(CONFIG, max_pairs=12, chunk_pairs=4, sites=EARLY[:1])
    reference = PT.patch_factor(study, lm, "actor", None, config)
    real, calls = PT._run_chunk, []

    def dies_after_one(*args: Any, **kwargs: Any) -> Any:
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(PT, "_run_chunk", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        PT.patch_factor(study, lm, "actor", tmp_path / "run", config)
    assert not (tmp_path / "run" / "manifest.json").exists()
    monkeypatch.setattr(PT, "_run_chunk", real)
    resumed = PT.patch_factor(study, lm, "actor", tmp_path / "run", config)
    assert resumed.manifest["counts"]["resumed_pairs"] == 4
    pd.testing.assert_frame_equal(resumed.patched, reference.patched)
    pd.testing.assert_frame_equal(resumed.patching, reference.patching)
    assert (tmp_path / "run" / "patching.parquet").exists()
    assert (tmp_path / "run" / "patching_actor.png").exists()


def test_bad_input(organism: tuple[Any, LoadedModel], tmp_path: Path) -> None:
    study, lm = organism
    one_level = dataclasses.replace(
        study,
        factors=tuple(
            dataclasses.replace(f, values=f.values[:1]) if f.name == "genre" else f
            for f in study.factors
        ),
    )
    cases: list[tuple[Any, str, PT.PatchConfig, str]] = [
        (study, "budget", CONFIG, "not in the study"),
        (one_level, "genre", CONFIG, "one level"),
        (study, "age", CONFIG, "alone"),
        (study, "actor", dataclasses.replace(CONFIG, sites=("blocks.9.hook_resid_pre",)), "site"),
        (study, "actor", dataclasses.replace(CONFIG, positions=("middle",)), "position"),
    ]
    for st, factor, config, words in cases:
        with pytest.raises(WorkbenchError, match=words) as err:
            PT.patch_factor(st, lm, factor, tmp_path / factor, config)
        assert err.value.fix
    with pytest.raises(StudyError):
        PT.patch_factor(study, lm, "age", None, CONFIG)
    # an architecture whose blocks the hooks cannot find
    odd = copy.deepcopy(lm.model)
    layers = odd.model.layers
    odd.model.layers = torch.nn.ModuleDict({str(i): b for i, b in enumerate(layers)})
    with pytest.raises(WorkbenchError, match="cannot address"):
        PT.patch_factor(study, dataclasses.replace(lm, model=odd), "actor", None, CONFIG)


def test_cli_checks_every_factor_first(small_organism: Path, tmp_path: Path) -> None:
    from workbench.cli import main

    out = tmp_path / "patch"
    code = main(
        [
            "patch", str(small_organism / "study.yaml"), "--model", str(small_organism / "model"),
            "--device", "cpu", "--factor", "actor,age", "--out", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 2
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# resumed forwards


def _config_model(kind: str, vocab: int) -> Any:
    return random_model(kind, vocab, n_layers=3)


@pytest.fixture(scope="module")
def resumable_models(
    tiny_llama_dir: Path, tiny_gpt2_dir: Path, organism: tuple[Any, LoadedModel]
) -> dict[str, LoadedModel]:
    llama = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    out = {
        "tiny-llama": llama,
        "tiny-gpt2": load_model(tiny_gpt2_dir, dtype="float32", device="cpu"),
        "organism": organism[1],
    }
    vocab = int(llama.model.config.vocab_size)
    for kind in ("mistral", "qwen2", "qwen3"):
        out[kind] = dataclasses.replace(llama, model=_config_model(kind, vocab), name=kind)
    for name in ("tiny-llama", "tiny-gpt2"):
        eager = copy.deepcopy(out[name].model)
        eager.set_attn_implementation("eager")
        out[f"{name}-eager"] = dataclasses.replace(out[name], model=eager)
    return out


@pytest.mark.parametrize(
    "name",
    ["tiny-llama", "tiny-gpt2", "tiny-llama-eager", "tiny-gpt2-eager", "organism", "mistral",
     "qwen2", "qwen3"],
)  # fmt: skip
def test_resumed_forward_equals_full_patched_forward(
    resumable_models: dict[str, LoadedModel], name: str
) -> None:
    lm = resumable_models[name]
    model = lm.model
    assert RF.resumable(model, 64) is None
    n_layers = int(model.config.get_text_config().num_hidden_layers)
    vocab = int(model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (14, 9, 17, 6)]
    sites = [s for s in all_sites(n_layers) if s.layer >= 0]
    plain, rec, states = RF.clean_forward(lm, ids, [s.name for s in sites])
    # the same forward with and without the cache it keeps: equal up to the BLAS's summation
    # order for the two layouts (bit-identical with some BLAS builds, not all)
    torch.testing.assert_close(plain, PT.answer_logprobs(lm, ids), rtol=0, atol=1e-5)
    starts = [3, 8, 0, 4]  # a span, the answer token, the whole prompt, the last two tokens
    pos = torch.tensor([[3, 5, 6], [8, -1, -1], [0, 7, 16], [4, 5, -1]])
    d = rec[sites[0].name].shape[-1]
    for s in sites:
        layer, hooked = RF.start(s, n_layers)  # type: ignore[misc]
        for mode in ("replace", "add"):
            edit = Edit(pos, torch.randn(4, 3, d, generator=g), mode)  # type: ignore[arg-type]
            with edit_sites(lm, {s.name: edit}):
                full = PT.answer_logprobs(lm, ids)
            got = RF.resumed_logprobs(lm, states, layer, starts, {hooked: edit})
            assert (full.exp() - plain.exp()).abs().max() > 1e-3, (s.name, mode)  # it patched
            assert (got.exp() - full.exp()).abs().max() < 1e-6, (name, s.name, mode)
    # no edit: the resumed forward is the clean one; an edit before the start is refused
    got = RF.resumed_logprobs(lm, states, n_layers - 1, [13, 8, 16, 5], {})
    assert (got.exp() - plain.exp()).abs().max() < 1e-6
    with pytest.raises(ValueError, match="before"):
        RF.resumed_logprobs(lm, states, 0, [4, 8, 0, 5], {sites[0].name: Edit(pos, pos, "add")})


def test_patching_with_resumed_forwards_equals_full_forwards(
    organism: tuple[Any, LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    study, lm = organism
    config = dataclasses.replace(
        CONFIG,
        sites=("hook_embed", "blocks.*"),
        positions=PT.POSITIONS,
        max_pairs=6,
        batch_size=16,
        n_boot=20,
    )
    resumed = PT.patch_factor(study, lm, "actor", None, config)
    monkeypatch.setattr(RF, "resumable", lambda model, n: "forced full forwards")
    full = PT.patch_factor(study, lm, "actor", None, config)
    rows = len(full.patched)
    assert full.manifest["counts"]["resumed_forwards"] == 0
    # every row but hook_embed's resumed
    assert resumed.manifest["counts"]["resumed_forwards"] == rows - rows // 9
    cols = ["patched_score", "tv_source", "tv_target"]
    assert (resumed.patched[cols] - full.patched[cols]).abs().max().max() < 1e-6
    pd.testing.assert_frame_equal(
        resumed.patched.drop(columns=cols), full.patched.drop(columns=cols)
    )


def test_unaddressed_models_fall_back(resumable_models: dict[str, LoadedModel]) -> None:
    model = copy.deepcopy(resumable_models["tiny-llama"].model)
    model.config.model_type = "gemma2"
    assert "gemma2" in str(RF.resumable(model, 8))
    model = resumable_models["mistral"].model
    assert RF.resumable(model, 8) is None
    model.config.sliding_window = 16
    try:
        assert "sliding window" in str(RF.resumable(model, 32))
        assert RF.resumable(model, 16) is None
    finally:
        model.config.sliding_window = None


def test_pair_prompts_are_the_full_renderings(organism: tuple[Any, LoadedModel]) -> None:
    study, lm = organism
    found = pair_prompts(study, lm.tokenizer, "actor", questions=["rating"], max_pairs=40)
    prompts = P.render(study, lm.tokenizer)
    assert found.pairs == factor_pairs(study, prompts, "actor", questions=["rating"], max_pairs=40)
    spans = factor_spans(study, prompts, lm.tokenizer, ["actor"])
    assert len(found.prompts) > 40
    for pid, prompt in found.prompts.items():
        assert prompt == prompts[pid]
        assert [found.spans[pid]] == spans[pid]


def test_one_batch_mixes_questions_with_different_options(
    organism: tuple[Any, LoadedModel],
) -> None:
    """Party pairs (coarse personas) exist for the rating (5 options) and the attitude item
    (3 options + a refusal option): rows of both share a batch and each must be read with its
    own options, exactly as when every row is a batch of its own."""
    study, lm = organism
    # All 3 attitude pairs and a few rating pairs: a study restricted to some rating cells.
    keep = [c for c in study.cells if c.get("actor") == "Mara Quinlan"]
    study = dataclasses.replace(study, cells=tuple(keep))
    config = PT.PatchConfig(
        sites=("blocks.0.hook_resid_post",),
        positions=("answer",),
        directions=("denoising",),
        n_boot=10,
        batch_size=64,
        progress=False,
    )
    mixed = PT.patch_factor(study, lm, "party", None, config).patched
    single = PT.patch_factor(
        study, lm, "party", None, dataclasses.replace(config, batch_size=1)
    ).patched
    assert set(mixed["question_id"]) == {"rating", "cinema_funding"}
    key = ["pair_id", "question_id", "site", "position", "direction"]
    merged = mixed.merge(single, on=key, suffixes=("", "_single"))
    assert len(merged) == len(mixed) == len(single)
    for col in ("patched_score", "tv_source", "tv_target"):
        if col in mixed.columns:
            diff = (merged[col] - merged[f"{col}_single"]).abs().max()
            assert diff < 1e-5 or pd.isna(diff), col
