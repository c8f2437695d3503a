"""Answer distributions on tiny local models, checked against independent plain-HF computations."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LOGPROB_ATOL
from safetensors.torch import load_file

from workbench.engine.models import LoadedModel, load_model
from workbench.measure.distributions import DistributionConfig, compute_distributions
from workbench.study.load import parse_study

STUDY: dict[str, Any] = {
    "name": "t",
    "factors": [
        {
            "name": "party",
            "role": "persona",
            "values": ["Democrat", "Republican"],
            "weights": [1, 1],
        },
        {"name": "age", "role": "persona", "values": ["30", "60"]},
        {"name": "movie", "role": "stimulus", "values": ["Up", "Jaws"]},
    ],
    "design": {"kind": "factorial", "coarse": [{"party": "Democrat"}]},
    "template": {
        "format": "plain",
        "persona": [
            "I am {age} years old and I have lived in the same small town for my whole life.",
            "Politically, I am a {party}, and I read the news every single morning.",
        ],
        "prompt": "{persona}\nQuestion: {question}\n{options}\nAnswer:",
    },
    "questions": [
        {
            "id": "like",
            "text": "Do you like {movie}?",
            "options": ["Yes", "No"],
            "refusal": ["Don't know"],
        },
        {
            "id": "economy",
            "text": "How is the economy?",
            "options": ["Good", "Fair", "Poor"],
            "values": [1, 2, 1.5],
        },
    ],
    "orders": {"kind": "cyclic"},
}

SEQUENCE = {"method": "sequence", "target": "text", "variants": [" {}"]}


def study_with(**changes: Any) -> Any:
    raw = copy.deepcopy(STUDY)
    for key, value in changes.items():
        raw[key] = value
    return parse_study(raw, "test.yaml")


def _plain_hf(lm: LoadedModel, context: list[int], continuation: list[int]) -> float:
    """Unbatched plain HF forward, float32 full-vocab log-softmax."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(ids).logits[0].float(), dim=-1)
    n = len(context)
    return sum(float(logprobs[n - 1 + j, t]) for j, t in enumerate(continuation))


def _reference_variants(
    lm: LoadedModel, prompts: pd.DataFrame, variants: pd.DataFrame
) -> np.ndarray:
    """Recompute every variant's log-prob from the stored columns alone."""
    ids = dict(zip(prompts["prompt_id"], prompts["input_ids"], strict=True))
    return np.array(
        [
            _plain_hf(lm, list(ids[p]), list(t))
            for p, t in zip(variants["prompt_id"], variants["token_ids"], strict=True)
        ]
    )


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> LoadedModel:
    return load_model(tiny_llama_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir: Path) -> LoadedModel:
    return load_model(tiny_gpt2_dir, dtype="float32", device="cpu")


QUIET = DistributionConfig(progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scoring", [{"method": "next_token"}, SEQUENCE])
def test_logprobs_equal_unbatched_plain_hf(
    arch: str, scoring: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    lm: LoadedModel = request.getfixturevalue(arch)
    res = compute_distributions(study_with(scoring=scoring), lm, config=QUIET)
    expected = _reference_variants(lm, res.prompts, res.variants)
    # float32 summation order, plus float32's relative precision for long continuations of a
    # random model (log-probs near -75)
    np.testing.assert_allclose(
        res.variants["logprob"].to_numpy(), expected, atol=LOGPROB_ATOL, rtol=1e-6
    )
    # the persona prefix really was shared (groups of several prompts per persona)
    assert res.prompts.groupby("persona_id").size().min() > 1


def test_full_vocab_softmax_and_stats_match_plain_hf(llama: LoadedModel) -> None:
    res = compute_distributions(
        study_with(scoring={"method": "next_token", "top_k": 5}), llama, config=QUIET
    )
    row = res.prompts.iloc[3]
    with torch.no_grad():
        logits = llama.model(torch.tensor([list(row["input_ids"])])).logits[0, -1].double()
    probs = torch.softmax(logits, -1)
    stats = res.prompt_stats.set_index("prompt_id").loc[row["prompt_id"]]
    top = torch.topk(probs, 5)
    assert list(stats["top_token_ids"]) == top.indices.tolist()
    np.testing.assert_allclose(stats["top_probs"], top.values.numpy(), atol=1e-6)
    entropy = float(-(probs * probs.log()).sum() / math.log(2))
    assert stats["entropy_bits"] == pytest.approx(entropy, abs=1e-4)
    # option mass: sum over options of the summed variant probabilities (" A" and "A")
    var = res.variants[res.variants["prompt_id"] == row["prompt_id"]]
    mass = float(probs[[t[0] for t in var["token_ids"]]].sum())
    assert stats["option_mass"] == pytest.approx(mass, rel=1e-5)
    dist = res.distributions[res.distributions["prompt_id"] == row["prompt_id"]]
    refusal = float(np.exp(dist.loc[dist["is_refusal"], "logprob"]).sum())
    assert stats["refusal_mass"] == pytest.approx(refusal, rel=1e-9)


def test_renormalization_aggregation_and_expected_score(llama: LoadedModel) -> None:
    for rule in ("sum", "max"):
        res = compute_distributions(
            study_with(scoring={"method": "next_token", "aggregate": rule}), llama, config=QUIET
        )
        v = res.variants.groupby(["prompt_id", "option_id"])["logprob"]
        agg = v.max() if rule == "max" else v.apply(lambda x: math.log(np.exp(x).sum()))
        d = res.distributions.set_index(["prompt_id", "option_id"])
        np.testing.assert_allclose(d["logprob"], agg.loc[d.index], atol=1e-12)
        subs = d[~d["is_refusal"]]
        np.testing.assert_allclose(subs.groupby(level=0)["prob"].sum(), 1.0, atol=1e-12)
        assert d.loc[d["is_refusal"], "prob"].isna().all()
    econ = res.prompts[res.prompts["question_id"] == "economy"]["prompt_id"]
    stats = res.prompt_stats.set_index("prompt_id").loc[econ]
    dist = res.distributions.set_index("prompt_id").loc[econ]
    manual = dist.groupby(level=0).apply(
        lambda g: float((g["prob"] * np.array([1, 2, 1.5])[g["option_id"]]).sum())
    )
    np.testing.assert_allclose(stats["expected_score"], manual.loc[stats.index], atol=1e-12)
    assert (
        res.prompt_stats.set_index("prompt_id")
        .loc[res.prompts[res.prompts["question_id"] == "like"]["prompt_id"], "expected_score"]
        .isna()
        .all()
    )


@pytest.mark.parametrize("scoring", [{"method": "next_token"}, SEQUENCE])
def test_independent_of_batch_size_padding_and_prefix_sharing(
    llama: LoadedModel, scoring: dict[str, Any]
) -> None:
    study = study_with(scoring=scoring)
    runs = [
        compute_distributions(
            study,
            llama,
            config=DistributionConfig(batch_size=b, share_prefix=s, pack_options=k, progress=False),
        )
        # (batch size, share persona prefix, pack options as a token tree)
        for b, s, k in [
            (1, False, False),
            (3, True, True),
            (64, True, True),
            (64, False, True),
            (2, True, False),
        ]
    ]
    base = runs[0].variants["logprob"].to_numpy()
    for other in runs[1:]:
        np.testing.assert_allclose(
            other.variants["logprob"].to_numpy(), base, atol=LOGPROB_ATOL, rtol=1e-6
        )


def test_sequence_scoring_matches_manual_split(llama: LoadedModel) -> None:
    """A prompt ending in a space: the space moves to the continuation (lm-eval's rule)."""
    raw = copy.deepcopy(STUDY)
    raw["template"]["prompt"] = "{persona}\nQuestion: {question}\n{options}\nAnswer: "
    res = compute_distributions(
        parse_study({**raw, "scoring": SEQUENCE}, "t.yaml"), llama, config=QUIET
    )
    tok = llama.tokenizer
    row = res.variants.iloc[7]
    prompt = res.prompts.set_index("prompt_id").loc[row["prompt_id"]]
    assert prompt["prompt"].endswith("Answer: ")
    context = prompt["prompt"].rstrip()
    assert list(prompt["input_ids"]) == tok(context)["input_ids"]
    assert row["continuation"].startswith("  ")  # moved space + the variant's own space
    whole = tok(context + row["continuation"])["input_ids"]
    assert list(row["token_ids"]) == whole[len(prompt["input_ids"]) :]
    assert row["logprob"] == pytest.approx(
        _plain_hf(llama, list(prompt["input_ids"]), list(row["token_ids"])), abs=1e-5
    )


def test_chat_path_adds_no_second_bos(llama: LoadedModel) -> None:
    raw = copy.deepcopy(STUDY)
    raw["template"] = {
        "format": "chat",
        "persona": STUDY["template"]["persona"],
        "system": "{persona}",
        "user": "{question}\n{options}",
        "prefill": "Answer:",
    }
    res = compute_distributions(parse_study(raw, "chat.yaml"), llama, config=QUIET)
    bos = llama.tokenizer.bos_token_id
    for ids in res.prompts["input_ids"]:
        assert ids[0] == bos
        assert list(ids).count(bos) == 1
    assert res.prompts["prompt"].str.contains("<|assistant|>").all()
    expected = _reference_variants(
        llama, res.prompts.head(4), res.variants[res.variants["prompt_id"] < 4]
    )
    np.testing.assert_allclose(
        res.variants[res.variants["prompt_id"] < 4]["logprob"], expected, atol=LOGPROB_ATOL
    )


def _position_biased_model(lm: LoadedModel, label_token: int, boost: float) -> LoadedModel:
    """Zero every layer's output: the model becomes a bigram model, blind to the option order
    and content, whose next-token logits depend on the last token (":") only; then raise the
    logit of `label_token`. All of its preference is position bias."""
    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        colon = lm.tokenizer(":", add_special_tokens=False)["input_ids"][0]
        hidden = model.model.norm(model.model.embed_tokens.weight[colon])
        head = model.lm_head.weight
        head[label_token] += boost * hidden / hidden.norm() ** 2
    return LoadedModel(model, lm.tokenizer, "biased", None, lm.dtype, lm.device)


def test_permutation_averaging_removes_planted_position_bias(llama: LoadedModel) -> None:
    token_a = llama.tokenizer(" A", add_special_tokens=False)["input_ids"][0]
    biased = _position_biased_model(llama, token_a, boost=6.0)
    raw = copy.deepcopy(STUDY)
    raw["questions"] = [
        {"id": "q", "text": "Which colour?", "options": ["Red", "Green", "Blue", "Gold"]}
    ]
    raw["scoring"] = {"method": "next_token", "variants": [" {}"]}
    canonical = compute_distributions(
        parse_study({**raw, "orders": {"kind": "canonical"}}, "c.yaml"), biased, config=QUIET
    )
    cyclic = compute_distributions(
        parse_study({**raw, "orders": {"kind": "cyclic"}}, "c.yaml"), biased, config=QUIET
    )
    # the canonical order shows the planted bias: "Red" (always shown as A) dominates
    assert canonical.adjusted.groupby("option_id")["prob"].mean().loc[0] > 0.8
    bias = cyclic.position_bias.set_index("position")["bias"]
    assert bias.loc[0] > 0.5  # A-bias = P(position 1) - 1/K
    # averaging over the cyclic orders gives every option the same probability
    np.testing.assert_allclose(cyclic.adjusted["prob"], 0.25, atol=1e-6)
    assert (cyclic.adjusted["n_orders"] == 4).all()


def test_run_folder_tables_manifest_and_full_vocab(llama: LoadedModel, tmp_path: Path) -> None:
    study = study_with(scoring={"method": "next_token", "save_full_vocab": True})
    res = compute_distributions(study, llama, tmp_path / "run", QUIET)
    out = tmp_path / "run"
    for name in (
        "prompts",
        "distributions",
        "variants",
        "prompt_stats",
        "adjusted",
        "position_bias",
    ):
        on_disk = pd.read_parquet(out / f"{name}.parquet")
        assert len(on_disk) == len(getattr(res, name)) > 0
    prompts = pd.read_parquet(out / "prompts.parquet")
    assert {
        "prompt_id",
        "persona_id",
        "question_id",
        "permutation",
        "party",
        "age",
        "movie",
        "prompt",
        "input_ids",
        "n_tokens",
    } <= set(prompts.columns)
    # a question that does not name the movie is not asked once per movie
    assert prompts.loc[prompts["question_id"] == "economy", "movie"].isna().all()
    manifest = pd.read_json(out / "manifest.json", typ="series")
    for key in (
        "study",
        "conventions",
        "model",
        "versions",
        "git_hash",
        "seed",
        "timings_s",
        "config",
    ):
        assert key in manifest
    assert manifest["model"]["dtype"] == "float32"
    tensors = load_file(str(out / "full_vocab.safetensors"))
    assert tensors["logprobs"].dtype == torch.float16
    assert tensors["prompt_id"].tolist() == sorted(res.prompts["prompt_id"])
    first = res.prompts.iloc[0]
    with torch.no_grad():
        ref = torch.log_softmax(
            llama.model(torch.tensor([list(first["input_ids"])])).logits[0, -1].float(), -1
        )
    top = ref.topk(20).indices
    np.testing.assert_allclose(tensors["logprobs"][0, top].float(), ref[top], atol=2e-2)
    assert not (out / "chunks").exists()


def test_bridge_gives_the_same_distributions(llama: LoadedModel) -> None:
    from workbench.engine.models import load_bridge
    from workbench.engine.scoring import naive_score
    from workbench.measure.distributions import build_requests
    from workbench.study.prompts import render

    study = study_with(scoring={"method": "next_token"})
    res = compute_distributions(study, llama, config=QUIET)
    bridge = load_bridge(llama)
    requests, skeleton = build_requests(study, llama, render(study, llama.tokenizer))
    via_bridge = {
        s.key: s.continuation_logprobs
        for s in naive_score(lambda ids: bridge(ids, return_type="logits"), requests)
    }
    skeleton["bridge"] = np.concatenate([via_bridge[r.key] for r in requests])
    merged = res.variants.merge(
        skeleton[["prompt_id", "option_id", "variant", "bridge"]],
        on=["prompt_id", "option_id", "variant"],
    )
    assert len(merged) == len(res.variants)
    np.testing.assert_allclose(merged["logprob"], merged["bridge"], atol=LOGPROB_ATOL, rtol=1e-6)
