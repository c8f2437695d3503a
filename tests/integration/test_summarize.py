"""The vectorized table building (`summarize`, `build_requests`, batched tokenization) gives
what a plain per-prompt loop gives: token ids, labels, log-probs and argmaxes bit for bit;
sums over options (renormalization, masses, expected score) to the last bit or two, since
pandas' grouped sums and a plain sum may add in different orders. The cross-prompt tables
(`order_adjusted`, `position_bias`, the option-mass warnings) give what their plain pandas
formulation (merge, multi-key groupby) gives, bit for bit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from test_distributions import STUDY  # the same study as the exactness tests

from workbench.engine.models import LoadedModel, load_model
from workbench.engine.scoring import EngineConfig, Request, score_requests
from workbench.measure.distributions import (
    DistributionConfig,
    build_requests,
    compute_distributions,
    option_mass_warnings,
    order_adjusted,
    position_bias,
    summarize,
)
from workbench.study import prompts as P
from workbench.study.load import parse_study


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> LoadedModel:
    return load_model(tiny_llama_dir, dtype="float32", device="cpu")


def _reference_requests(study: Any, lm: LoadedModel, prompts: list[P.Prompt]) -> pd.DataFrame:
    """One tokenizer call per prompt and per continuation, as the contract states it."""
    rows = []
    for prompt in prompts:
        fed = prompt.text.rstrip() if study.scoring.method == "sequence" else prompt.text
        plain = study.template.format == "plain"
        assert list(prompt.input_ids) == lm.tokenizer(fed, add_special_tokens=plain)["input_ids"]
        for t in P.option_targets(study, prompt):
            if study.scoring.method == "next_token":
                ids = lm.tokenizer(t.surface, add_special_tokens=False)["input_ids"]
            else:
                whole = lm.tokenizer(fed + t.continuation, add_special_tokens=plain)["input_ids"]
                n = len(prompt.input_ids)
                ok = whole[:n] == list(prompt.input_ids) and len(whole) > n
                ids = (
                    whole[n:]
                    if ok
                    else lm.tokenizer(t.continuation, add_special_tokens=False)["input_ids"]
                )
            rows.append({"prompt_id": prompt.prompt_id, "option_id": t.option_id, "ids": ids})
    return pd.DataFrame(rows)


def _reference_summary(
    study: Any, lm: LoadedModel, var: pd.DataFrame, scored: dict[int, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per prompt, per option, in plain Python: the distributions and prompt_stats rows."""
    dist_rows, stat_rows = [], []
    values = {q.id: q.values for q in study.questions}
    qid = {p.prompt_id: p.question_id for p in P.render(study, lm.tokenizer)}
    for pid, grp in var.groupby("prompt_id", sort=True):
        opts = []
        for oid, og in grp.groupby("option_id", sort=True):
            lps = og["logprob"].to_numpy()
            lp = lps.max() if study.scoring.aggregate == "max" else np.logaddexp.reduce(lps)
            row = og.iloc[0]
            opts.append([pid, oid, row["label"], row["position"], row["is_refusal"], float(lp)])
        subs = [o for o in opts if not o[4]]
        m = max(o[5] for o in subs)
        denom = pd.Series([np.exp(o[5] - m) for o in subs]).sum()
        for o in opts:
            o.append(np.nan if o[4] else np.exp(o[5] - m) / denom)
        dist_rows += opts
        modal = max(subs, key=lambda o: o[6])
        v = values[qid[int(str(pid))]]
        answers = scored[int(str(pid))].answer_logprobs
        top = torch.topk(answers, min(study.scoring.top_k, answers.shape[-1]))
        stat_rows.append(
            {
                "prompt_id": pid,
                "option_mass": pd.Series([np.exp(o[5]) for o in opts]).sum(),
                "refusal_mass": pd.Series([np.exp(o[5]) if o[4] else 0.0 for o in opts]).sum(),
                "modal_option_id": modal[1],
                "modal_prob": modal[6],
                "expected_score": None
                if v is None
                else float(
                    (np.array([o[6] for o in subs]) * np.asarray(v)[[o[1] for o in subs]]).sum()
                ),
                "top_tokens": [lm.tokenizer.decode([i]) for i in top.indices.tolist()],
            }
        )
    cols = ["prompt_id", "option_id", "label", "position", "is_refusal", "logprob", "prob"]
    return pd.DataFrame(dist_rows, columns=cols), pd.DataFrame(stat_rows)


@pytest.mark.parametrize(
    "scoring",
    [
        {"method": "next_token", "aggregate": "sum"},
        {"method": "next_token", "aggregate": "max"},
        {"method": "sequence", "target": "text", "variants": [" {}", "{}"]},
        {"method": "sequence", "target": "text", "variants": [" {}"]},
    ],
)
def test_summarize_equals_a_per_prompt_loop(llama: LoadedModel, scoring: dict[str, Any]) -> None:
    raw = copy.deepcopy(STUDY)
    raw["scoring"] = scoring
    study = parse_study(raw, "test.yaml")
    prompts = P.render(study, llama.tokenizer)
    requests, skeleton = build_requests(study, llama, prompts)
    ref_ids = _reference_requests(study, llama, prompts)
    assert [list(t) for t in skeleton["token_ids"]] == list(ref_ids["ids"])
    assert [list(r.continuations) for r in requests] == [
        [tuple(i) for i in g["ids"]] for _, g in ref_ids.groupby("prompt_id", sort=True)
    ]
    assert all(isinstance(r, Request) for r in requests)

    scored = list(score_requests(llama.model, requests, EngineConfig(batch_size=4)))
    question_of = {p.prompt_id: p.question_id for p in prompts}
    frames = summarize(study, llama, scored, skeleton, question_of)
    ref_dist, ref_stats = _reference_summary(
        study, llama, frames["variants"], {s.key: s for s in scored}
    )
    _same(frames["distributions"], ref_dist)
    _same(frames["prompt_stats"], ref_stats)


SUMS = {"prob", "option_mass", "refusal_mass", "modal_prob", "expected_score"}


def _same(frame: pd.DataFrame, ref: pd.DataFrame) -> None:
    assert len(frame) == len(ref)
    for col in ref.columns:
        a, b = frame[col].to_numpy(), ref[col].to_numpy()
        if col in SUMS:
            b = np.array([np.nan if x is None else x for x in b], dtype=float)
            np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-300, err_msg=col)
        elif a.dtype.kind == "f":
            np.testing.assert_array_equal(a, b.astype(float), err_msg=col)
        else:
            assert [list(x) if isinstance(x, list) else x for x in a] == list(b), col


def _pandas_order_adjusted(
    prompts: pd.DataFrame, distributions: pd.DataFrame, factor_names: list[str]
) -> pd.DataFrame:
    keys = ["persona_id", "question_id", *factor_names]
    merged = distributions.merge(prompts[["prompt_id", *keys]], on="prompt_id")
    merged = merged[~merged["is_refusal"]]
    grouped = merged.groupby([*keys, "option_id"], dropna=False, sort=True)
    return grouped.agg(
        prob=("prob", "mean"), prob_sd=("prob", "std"), n_orders=("prob", "size")
    ).reset_index()


def _pandas_position_bias(prompts: pd.DataFrame, distributions: pd.DataFrame) -> pd.DataFrame:
    merged = distributions[~distributions["is_refusal"]].merge(
        prompts[["prompt_id", "question_id"]], on="prompt_id"
    )
    k = merged.groupby("prompt_id")["option_id"].transform("size")
    merged = merged.assign(uniform=1.0 / k)
    out = merged.groupby(["question_id", "position"], sort=True).agg(
        mean_prob=("prob", "mean"), uniform=("uniform", "first"), n_prompts=("prob", "size")
    )
    out["bias"] = out["mean_prob"] - out["uniform"]
    return out.reset_index()


def _pandas_warnings(
    prompts: pd.DataFrame, stats: pd.DataFrame
) -> list[tuple[str, float, list[str]]]:
    """(question, mean option mass, the five most frequent top tokens) per question."""
    frame = prompts[["prompt_id", "question_id"]].merge(
        stats[["prompt_id", "option_mass", "top_tokens"]], on="prompt_id"
    )
    out = []
    for qid, grp in frame.groupby("question_id", sort=True):
        firsts = pd.Series([t[0] for t in grp["top_tokens"] if len(t)]).value_counts()
        out.append((str(qid), float(grp["option_mass"].mean()), [str(t) for t in firsts.index[:5]]))
    return out


@pytest.mark.parametrize(
    ("scoring", "orders"),
    [
        ({"method": "next_token", "aggregate": "sum"}, {"kind": "cyclic"}),
        ({"method": "sequence", "target": "text", "variants": [" {}", "{}"]}, {"kind": "all"}),
        ({"method": "sequence", "target": "text", "variants": [" {}"]}, {"kind": "canonical"}),
    ],
)
def test_cross_prompt_tables_equal_the_pandas_formulation(
    llama: LoadedModel, scoring: dict[str, Any], orders: dict[str, Any]
) -> None:
    raw = copy.deepcopy(STUDY)  # a coarse persona (NA factor values), a refusal option
    raw["scoring"], raw["orders"] = scoring, orders
    study = parse_study(raw, "test.yaml")
    config = DistributionConfig(progress=False, min_option_mass=1.0, chunk_prompts=3)
    res = compute_distributions(study, llama, None, config)
    factors = [f.name for f in study.factors]
    # as computed, then as a reader might hand them over: rows shuffled, a prompt missing
    # from `prompts` (an inner merge drops its rows), and empty
    shuffled = res.distributions.sample(frac=1.0, random_state=0)
    cases = [
        (res.prompts, res.distributions),
        (res.prompts.sample(frac=1.0, random_state=1).iloc[1:], shuffled),
        (res.prompts, res.distributions.iloc[:0]),
    ]
    for prompts, dist in cases:
        pd.testing.assert_frame_equal(
            order_adjusted(prompts, dist, factors),
            _pandas_order_adjusted(prompts, dist, factors),
            check_exact=True,
        )
        pd.testing.assert_frame_equal(
            position_bias(prompts, dist), _pandas_position_bias(prompts, dist), check_exact=True
        )
    assert res.adjusted["age"].isna().any()
    assert (res.adjusted["n_orders"].max() > 1) == (orders["kind"] != "canonical")

    for prompts in (res.prompts, res.prompts.sample(frac=1.0, random_state=2).iloc[2:]):
        got = option_mass_warnings(prompts, res.prompt_stats, 1.0)
        ref = _pandas_warnings(prompts, res.prompt_stats)
        assert [(w["question_id"], w["top_tokens"]) for w in got] == [(q, t) for q, _, t in ref]
        assert [w["mean_option_mass"] for w in got] == [round(m, 4) for _, m, _ in ref]
        assert got and all(
            f"{m:.3f}" in w["message"] for w, (_, m, _) in zip(got, ref, strict=True)
        )
    assert option_mass_warnings(res.prompts, res.prompt_stats, 0.0) == []
