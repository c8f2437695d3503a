"""Activation capture on tiny local models, checked against plain HF and the TransformerLens
bridge: stored vectors, factor spans, resume after a crash, and keeping only what was asked."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from workbench.cli import main
from workbench.engine.models import LoadedModel, load_model
from workbench.errors import WorkbenchError
from workbench.interp import activations as A
from workbench.study import prompts as P
from workbench.study.load import parse_study
from workbench.study.spans import factor_spans
from workbench.study.spec import Study

STUDY: dict[str, Any] = {
    "name": "acts",
    "factors": [
        {"name": "party", "role": "persona", "values": ["Democrat", "Republican"]},
        {"name": "age", "role": "persona", "values": ["30", "65"]},
        # "Up" also appears in the fixed question text, after the movie: a text search for the
        # value would find the wrong occurrence.
        {"name": "movie", "role": "stimulus", "values": ["Up", "Jaws 3"]},
    ],
    "design": {"kind": "factorial", "coarse": [{"party": "Democrat"}]},
    "template": {
        "format": "plain",
        "persona": ["I am {age} years old.", "Politically, I am a {party}."],
        "prompt": "{persona}\nQuestion: {question}\n{options}\nAnswer:",
    },
    "questions": [
        {
            "id": "like",
            "text": 'Do you like "{movie}"? Up or down, 30 seconds.',
            "options": ["Yes", "No"],
        },
        {"id": "economy", "text": "How is the economy?", "options": ["Good", "Bad"]},
    ],
}
SITES = ("hook_embed", "blocks.*.hook_resid_pre", "blocks.*.hook_resid_post")


@pytest.fixture(scope="module")
def lm(tiny_llama_dir: Path) -> LoadedModel:
    return load_model(tiny_llama_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def study() -> Study:
    return parse_study(copy.deepcopy(STUDY))


@pytest.fixture(scope="module")
def store(study: Study, lm: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = A.ActivationConfig(
        sites=SITES, store_dtype="float32", batch_size=3, chunk_prompts=4, progress=False
    )
    return A.capture_activations(
        study, lm, tmp_path_factory.mktemp("acts") / "run", config, log=lambda _: None
    )


def _hidden_states(lm: LoadedModel, prompt: P.Prompt) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = lm.model(torch.tensor([prompt.input_ids]), output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


def test_stored_vectors_equal_hf_hidden_states(store: Any, study: Study, lm: LoadedModel) -> None:
    """Every stored vector against an unbatched plain HF forward (float32, 1e-5).

    hidden_states[0] is hook_embed (no learned positions in Llama) and blocks.0.hook_resid_pre;
    hidden_states[l + 1] is blocks.l.hook_resid_post, except the last one, which HF takes
    after the final norm."""
    prompts = {p.prompt_id: p for p in P.render(study, lm.tokenizer)}
    n_layers = lm.model.config.num_hidden_layers
    index = store.index
    assert set(index["site"]) == {
        "hook_embed",
        *(
            f"blocks.{i}.{k}"
            for i in range(n_layers)
            for k in ("hook_resid_pre", "hook_resid_post")
        ),
    }
    vectors = store.vectors(index)
    checked = 0
    for pid, rows in index.groupby("prompt_id"):
        hs = _hidden_states(lm, prompts[int(str(pid))])
        for i, row in zip(rows.index, rows.itertuples(), strict=True):
            if row.site_kind == "hook_embed":
                h = hs[0]
            elif row.site_kind == "hook_resid_pre":
                h = hs[row.layer]
            elif row.layer < n_layers - 1:
                h = hs[row.layer + 1]
            else:
                if row.position == "span_mean":
                    continue  # the final norm does not commute with the span mean
                with torch.no_grad():
                    normed = lm.model.model.norm(vectors[i][None])[0]
                assert torch.allclose(normed, hs[-1][row.token_end - 1], atol=1e-5)
                checked += 1
                continue
            expected = h[row.token_start : row.token_end].mean(0)
            assert torch.allclose(vectors[i], expected, atol=1e-5), (row.site, row.position)
            checked += 1
    assert checked > 200


def test_attention_and_mlp_outputs_equal_the_bridge(
    study: Study, tiny_llama_dir: Path, lm: LoadedModel
) -> None:
    """HF module outputs are TransformerLens's hook_attn_out / hook_mlp_out (its own hook
    points, on a separate copy of the model: booting the bridge rewires the model in place),
    and resid_pre + attn_out + mlp_out = resid_post."""
    prompts = P.render(study, lm.tokenizer)[:6]
    spans = factor_spans(study, P.render(study, lm.tokenizer), lm.tokenizer)
    sites = A.resolve_sites(["hook_embed", "blocks.*"], lm.model.config.num_hidden_layers)
    bridged = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    hf = A.Capturer(lm, sites, "hf")
    tl = A.Capturer(bridged, sites, "bridge")
    for idx, ids, mask in A.batches(prompts, 3, lm.tokenizer.pad_token_id):
        slots = [
            A.prompt_slots(prompts[i], spans[prompts[i].prompt_id], A.POSITION_KINDS) for i in idx
        ]
        weights = A.reduction_weights(slots, ids.shape[1])
        ours, theirs = hf.run(ids, weights, mask), tl.run(ids, weights, mask)
        for name in ours:
            # The bridge forces eager attention, HF runs sdpa: float32 rounding only
            # (~1e-6 relative on these |x| ~ 25 activations).
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=5e-5)
        for layer in range(lm.model.config.num_hidden_layers):
            parts = [ours[f"blocks.{layer}.hook_{k}"] for k in ("resid_pre", "attn_out", "mlp_out")]
            assert torch.allclose(sum(parts), ours[f"blocks.{layer}.hook_resid_post"], atol=1e-5)


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_spans_cover_exactly_the_factor_values(fmt: str, study: Study, lm: LoadedModel) -> None:
    raw = copy.deepcopy(STUDY)
    if fmt == "chat":
        raw["template"] = {
            "format": "chat",
            "persona": raw["template"]["persona"],
            "system": "{persona}",
            "user": "{question}\n{options}",
            "prefill": "Answer:",
        }
    chat_study = parse_study(raw)
    prompts = P.render(chat_study, lm.tokenizer)
    spans = factor_spans(chat_study, prompts, lm.tokenizer)
    seen = set()
    for p in prompts:
        for span in spans[p.prompt_id]:
            value = p.factors[span.factor]
            assert p.text[span.char_start : span.char_end] == value
            decoded = lm.tokenizer.decode(list(p.input_ids[span.token_start : span.token_end]))
            assert decoded.strip() == value
            seen.add(span.factor)
            if span.factor == "movie":
                assert p.text[span.char_end] == '"'  # the quoted title, not the later "Up"
        named = {f for f, v in p.factors.items() if v is not None}
        assert {s.factor for s in spans[p.prompt_id]} == named
    assert seen == {"party", "age", "movie"}


def test_resume_after_a_crash_gives_the_same_run(
    study: Study, lm: LoadedModel, store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = A.ActivationConfig(
        sites=SITES, store_dtype="float32", batch_size=3, chunk_prompts=4, progress=False
    )
    original = A.Capturer.run
    calls = {"n": 0}

    def crash_on_fourth(self: A.Capturer, *args: Any) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(A.Capturer, "run", crash_on_fourth)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        A.capture_activations(study, lm, out, config, log=lambda _: None)
    assert not (out / "manifest.json").exists()
    assert len(list((out / "chunks").iterdir())) == 1  # the finished chunk survived
    monkeypatch.setattr(A.Capturer, "run", original)
    resumed = A.capture_activations(study, lm, out, config, log=lambda _: None)
    assert resumed.manifest["counts"]["resumed_prompts"] == 4
    keys = ["prompt_id", "site", "position", "factor"]
    assert not resumed.index.duplicated(keys).any()
    a = resumed.index.sort_values(keys).reset_index(drop=True)
    b = store.index.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(
        a.drop(columns=["shard", "row"]), b.drop(columns=["shard", "row"])
    )
    assert torch.equal(resumed.vectors(a), store.vectors(b))
    with pytest.raises(WorkbenchError, match="different run"):
        other = A.ActivationConfig(sites=("hook_embed",), progress=False)
        A.capture_activations(study, lm, out, other, log=lambda _: None)


def test_keeps_only_the_sites_and_positions_asked(
    study: Study, lm: LoadedModel, tmp_path: Path
) -> None:
    """Memory is batch x kept positions x d_model per site, whatever the prompt length, and
    the forward stops after the deepest site asked."""
    d = lm.model.config.hidden_size
    ran: list[int] = []
    handle = lm.model.model.layers[1].register_forward_hook(lambda *a: ran.append(1))
    held = {}
    try:
        for name, persona in (("short", "I am {age}."), ("long", "I am {age}. " + "Hm. " * 60)):
            raw = copy.deepcopy(STUDY)
            raw["template"]["persona"] = [persona, "Politically, I am a {party}."]
            config = A.ActivationConfig(
                sites=("blocks.0.hook_resid_post",),
                positions=("answer", "span_last"),
                factors=("movie",),
                store_dtype="float32",
                batch_size=2,
                progress=False,
            )
            messages: list[str] = []
            run = A.capture_activations(
                parse_study(raw), lm, tmp_path / name, config, log=messages.append
            )
            held[name] = run.manifest["max_kept_bytes_per_batch"]
            assert set(run.index["site"]) == {"blocks.0.hook_resid_post"}
            assert set(
                zip(run.index["position"], run.index["factor"].fillna("-"), strict=True)
            ) == {
                ("answer", "-"),
                ("span_last", "movie"),
            }
            shards = sum(p.stat().st_size for p in (tmp_path / name).glob("chunks/*/*.safetensors"))
            estimate = A.disk_estimate(len(run.index), d, "float32")
            assert "on disk" in messages[0] and estimate <= shards < estimate + 2048
    finally:
        handle.remove()
    assert ran == []  # block 1 never ran
    assert held["short"] == held["long"] == 2 * 2 * d * 4  # batch 2 x (answer + movie span)


def test_float16_storage_and_overflow(
    study: Study, lm: LoadedModel, store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = A.ActivationConfig(sites=SITES, store_dtype="float16", progress=False)
    half = A.capture_activations(study, lm, tmp_path / "half", config, log=lambda _: None)
    keys = ["prompt_id", "site", "position", "factor"]
    a = half.index.sort_values(keys)
    b = store.index.sort_values(keys)
    assert torch.allclose(half.vectors(a), store.vectors(b), rtol=1e-3, atol=1e-3)
    monkeypatch.setattr(A, "FLOAT16_MAX", 1e-3)
    with pytest.raises(WorkbenchError, match="overflows float16"):
        A.capture_activations(study, lm, tmp_path / "over", config, log=lambda _: None)


def test_cli_activations_and_bad_sites(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = Path(__file__).resolve().parents[2] / "probes" / "example.yaml"
    args = ["activations", str(study), "--model", str(tiny_llama_dir), "--quiet"]
    code = main([*args, "--sites", "blocks.9.hook_resid_post", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "matches no site" in err and "fix:" in err and "Traceback" not in err
    out = tmp_path / "b"
    code = main(
        [*args, "--sites", "blocks.*.hook_mlp_out", "--positions", "answer", "--out", str(out)]
    )
    assert code == 0
    loaded = A.ActivationStore.open(out)
    assert set(loaded.index["position"]) == {"answer"}
    assert loaded.manifest["config"]["store_dtype"] == "float16"
    assert "on disk" in capsys.readouterr().out


def test_gpt2_sites(study: Study, tiny_gpt2_dir: Path) -> None:
    """GPT-2 (learned positions, no BOS): hook_embed is the token embedding alone, so
    hidden_states[0] = hook_embed + wpe; block outputs are hidden_states[l + 1]."""
    gpt2 = load_model(tiny_gpt2_dir, dtype="float32", device="cpu")
    prompts = P.render(study, gpt2.tokenizer)[:4]
    sites = A.resolve_sites(["hook_embed", "blocks.0.hook_resid_post"], 2)
    capturer = A.Capturer(gpt2, sites, "hf")
    spans = factor_spans(study, P.render(study, gpt2.tokenizer), gpt2.tokenizer)
    for idx, ids, mask in A.batches(prompts, 4, gpt2.tokenizer.pad_token_id):
        slots = [A.prompt_slots(prompts[i], spans[prompts[i].prompt_id], ["answer"]) for i in idx]
        kept = capturer.run(ids, A.reduction_weights(slots, ids.shape[1]), mask)
        for b, i in enumerate(idx):
            hs = _hidden_states(gpt2, prompts[i])
            last = len(prompts[i].input_ids) - 1
            wpe = gpt2.model.transformer.wpe.weight[last]
            assert torch.allclose(kept["hook_embed"][b, 0] + wpe, hs[0][last], atol=1e-5)
            assert torch.allclose(kept["blocks.0.hook_resid_post"][b, 0], hs[1][last], atol=1e-5)
