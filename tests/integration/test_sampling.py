"""The sampling engine on the model organism and on a scripted fake model.

Organism (small scale, cached): nothing dropped, reproducible and resumable, each prompt
prefilled once, the answer-position distributions equal a plain HF teacher-forced forward,
constrained sampling at temperature 1 within the sampling floor of the logits, the planted
preamble rate and first-token vs text mismatch recovered, top-p and temperature honoured.
Scripted fake (its next token is a fixed function of the step): early stop at the parsed
answer, a known answer distribution, verbalized JSON parsed, refusals kept.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LOGPROB_ATOL
from transformers import DynamicCache, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from workbench.compare import metrics as M
from workbench.engine.models import LoadedModel, load_model
from workbench.measure import answer_position as A
from workbench.measure import decoding as D
from workbench.measure import sampling as S
from workbench.measure.answers import option_surfaces
from workbench.measure.distributions import DistributionConfig, compute_distributions
from workbench.organism.build import STUDY_FILE, TRUTH_FILE, attach_truth
from workbench.study import prompts as P
from workbench.study.load import load_study
from workbench.study.spec import Study
from workbench.tiny import random_model

N = 100


@pytest.fixture(scope="module")
def lm(small_organism: Path) -> LoadedModel:
    return load_model(small_organism / "model", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def study(small_organism: Path) -> Study:
    """A slice of the organism's study: one held-out title, two actors, two genres."""
    full = load_study(small_organism / STUDY_FILE)
    spec = json.loads((small_organism / "organism.json").read_text())
    title = spec["factors"]["stimulus"]["title"]["held_out"][0]
    actors = spec["factors"]["stimulus"]["actor"][:2] + spec["factors"]["stimulus"]["actor"][-1:]
    cells = [
        c
        for c in full.cells
        if c["title"] == title and c["actor"] in actors and c["genre"] in ("comedy", "drama")
    ]
    return dataclasses.replace(full, cells=tuple(cells))


@pytest.fixture(scope="module")
def logits(study: Study, lm: LoadedModel) -> Any:
    return compute_distributions(study, lm, None, DistributionConfig(progress=False))


@pytest.fixture(scope="module")
def sampled(study: Study, lm: LoadedModel) -> S.SamplingResult:
    return S.compute_samples(study, lm, None, S.SamplingConfig(n=N, seed=0, progress=False))


@pytest.fixture(scope="module")
def constrained(study: Study, lm: LoadedModel) -> S.SamplingResult:
    config = S.SamplingConfig(n=N, seed=1, constrain=True, progress=False)
    return S.compute_samples(study, lm, None, config)


# --------------------------------------------------------------------------------------------
# the organism


def test_every_sample_is_kept_and_counted(sampled: S.SamplingResult) -> None:
    s, d = sampled.samples, sampled.sampled_distributions
    assert len(s) == N * len(sampled.prompts)
    assert (s.groupby("prompt_id")["sample"].nunique() == N).all()
    assert set(s["status"]) <= {"ok", "refusal", "unparseable"}
    assert s.loc[s["status"] == "ok", "option_id"].notna().all()
    assert s.loc[s["status"] == "unparseable", "option_id"].isna().all()
    per_prompt = d.groupby("prompt_id").agg(count=("count", "sum"), n=("n_samples", "first"))
    answered = s["option_id"].notna().groupby(s["prompt_id"]).sum()
    assert (per_prompt["count"] == answered).all() and (per_prompt["n"] == N).all()
    sums = d[~d["is_refusal"]].groupby("prompt_id")[["prob", "prob_answer_position"]].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-9)
    assert d.loc[d["is_refusal"], "prob"].isna().all()
    # The organism's two answer forms: " 4" then EOS, or the planted preamble then ".".
    assert {"eos", "answer"} <= set(s["finish"])
    preamble = s[s["text"].str.startswith(" Sure") & (s["status"] == "ok")]
    assert (preamble["how"] == "phrase").mean() > 0.98  # a few garbled: "Sure! a 3." (mention)


def test_reproducible_and_seeded(study: Study, lm: LoadedModel, sampled: S.SamplingResult) -> None:
    few = dataclasses.replace(study, cells=study.cells[:6])
    config = S.SamplingConfig(n=20, seed=0, batch_rows=40, progress=False)
    a = S.compute_samples(few, lm, None, config).samples
    b = S.compute_samples(few, lm, None, config).samples
    other = S.compute_samples(few, lm, None, dataclasses.replace(config, seed=1)).samples
    pd.testing.assert_frame_equal(a, b)
    assert not a["text"].equals(other["text"])


def test_resume_after_a_crash_draws_the_same_samples(
    study: Study, lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    few = dataclasses.replace(study, cells=study.cells[:8])
    config = S.SamplingConfig(n=10, seed=3, batch_rows=30, chunk_prompts=3, progress=False)
    whole = S.compute_samples(few, lm, None, config).samples
    real, calls = D.run_wave, {"n": 0}

    def crash_on_third(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(D, "run_wave", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        S.compute_samples(few, lm, tmp_path / "run", config)
    assert not (tmp_path / "run" / "manifest.json").exists()
    monkeypatch.setattr(D, "run_wave", real)
    resumed = S.compute_samples(few, lm, tmp_path / "run", config)
    assert resumed.manifest["counts"]["resumed_prompts"] == 6
    pd.testing.assert_frame_equal(resumed.samples, whole)
    on_disk = pd.read_parquet(tmp_path / "run" / "samples.parquet")
    assert len(on_disk) == len(whole) and (tmp_path / "run" / "manifest.json").exists()


def test_each_prompt_is_prefilled_once(study: Study, lm: LoadedModel) -> None:
    few = dataclasses.replace(study, cells=study.cells[:10])
    fed: list[tuple[int, int]] = []
    hook = lm.model.model.register_forward_pre_hook(
        lambda _m, args, kwargs: fed.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        result = S.compute_samples(few, lm, None, S.SamplingConfig(n=50, progress=False))
    finally:
        hook.remove()
    prefills = [shape for shape in fed if shape[1] > 1]
    assert sum(rows for rows, _ in prefills) == len(result.prompts)  # once each, not 50 times
    decode_rows = sum(rows for rows, width in fed if width == 1)
    assert decode_rows < 50 * len(result.prompts) * 9  # rows leave the batch when done


def test_answer_position_equals_a_plain_teacher_forced_forward(
    sampled: S.SamplingResult, lm: LoadedModel
) -> None:
    """At T=1 the stored slot distribution is the full-vocabulary softmax of a plain HF forward
    of prompt + generated prefix, on the option label tokens (" k" and "k" summed)."""
    s = sampled.samples.merge(sampled.prompts[["prompt_id", "input_ids"]], on="prompt_id")
    picked = pd.concat(
        [s[s["answer_token"] == 0].head(3), s[s["answer_token"] > 0].head(3)], ignore_index=True
    )
    assert len(picked) == 6
    tok = lm.tokenizer
    for row in picked.itertuples():
        gen = tok(row.text, add_special_tokens=False)["input_ids"][: int(row.answer_token)]
        ids = torch.tensor([[*row.input_ids, *gen]])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(ids).logits[0, -1].float(), -1)
        labels = [str(k) if row.prompt_id >= 0 else "" for k in range(1, 6)]
        if len(row.answer_logprobs) == 4:  # the attitude item: letters, refusal last
            labels = ["A", "B", "C", "D"]
        expected = [
            float(
                torch.logsumexp(
                    logp[
                        [tok(v + lab, add_special_tokens=False)["input_ids"][0] for v in (" ", "")]
                    ],
                    0,
                )
            )
            for lab in labels
        ]
        np.testing.assert_allclose(row.answer_logprobs, expected, atol=1e-4)
        probs = np.exp(expected) / np.exp(expected).sum()
        np.testing.assert_allclose(row.answer_probs, probs, atol=1e-5)


def test_constrained_sampling_is_the_logit_distribution(
    constrained: S.SamplingResult, logits: Any
) -> None:
    """Temperature 1, first token among the labels only: the sampled distribution is within
    the sampling floor of the logit distribution, and its slot distribution is it exactly."""
    d = constrained.sampled_distributions
    ref = logits.distributions
    tvs, probs, sizes = [], [], []
    for pid, grp in d[~d["is_refusal"]].groupby("prompt_id"):
        p = ref[(ref["prompt_id"] == pid) & ~ref["is_refusal"]].sort_values("option_id")["prob"]
        grp = grp.sort_values("option_id")
        np.testing.assert_allclose(grp["prob_answer_position"], p, atol=2e-5)
        tvs.append(float(M.total_variation(grp["prob"], p)))
        probs.append(p.to_numpy())
        sizes.append(int(grp["n_ok"].iloc[0]))
    floors = [
        M.sampling_floor(p, n, n_sims=400, seed=i, keep_sims=True)
        for i, (p, n) in enumerate(zip(probs, sizes, strict=True))
    ]
    joint = np.concatenate([f.sims for f in floors if f.sims is not None], axis=1).mean(1)
    assert np.mean(tvs) <= np.quantile(joint, 0.99), (np.mean(tvs), joint.mean())
    assert (constrained.samples["answer_token"].dropna() == 0).all()
    assert (constrained.samples["status"] != "unparseable").all()


def test_planted_preamble_rate_and_mismatch(
    sampled: S.SamplingResult, logits: Any, small_organism: Path
) -> None:
    """The share of answers after the preamble is the model's P(" Sure") (within sampling
    error) and the planted share 0.3 (within the organism's training error); the share of
    text answers that differ from the first-token argmax is the planted 1 - prob_text[argmax]."""
    s = sampled.samples
    ok = s[s["status"] == "ok"]
    late = int((ok["answer_token"] > 0).sum())
    lo, hi = M.wilson_interval(late, len(ok))
    sure = logits.prompt_stats.apply(
        lambda r: sum(
            p for t, p in zip(r["top_tokens"], r["top_probs"], strict=True) if t == " Sure"
        ),
        axis=1,
    )
    spread = 3 * np.sqrt(0.21 / len(ok))  # clustering by prompt: a looser band than Wilson's
    assert lo - spread <= float(sure.mean()) <= hi + spread, (late / len(ok), sure.mean())
    assert late / len(ok) == pytest.approx(0.3, abs=0.03)
    truth = pd.read_parquet(small_organism / TRUTH_FILE)
    rows = attach_truth(sampled.sampled_distributions.merge(sampled.prompts, on="prompt_id"), truth)
    rows = rows[~rows["is_refusal"]].sort_values(["prompt_id", "option_id"])
    argmax = logits.distributions[~logits.distributions["is_refusal"]]
    argmax = argmax.loc[argmax.groupby("prompt_id")["prob"].idxmax()].set_index("prompt_id")[
        "option_id"
    ]
    measured = (ok["option_id"] != ok["prompt_id"].map(argmax)).mean()
    planted = []
    for _, g in rows.groupby("prompt_id"):
        text = g["true_prob_text"].to_numpy() / g["true_prob_text"].sum()
        planted.append((1 - text[int(np.argmax(g["true_prob"].to_numpy()))]) * g["n_ok"].iloc[0])
    planted_rate = sum(planted) / rows.groupby("prompt_id")["n_ok"].first().sum()
    assert measured == pytest.approx(planted_rate, abs=0.03)


def test_top_p_and_temperature(study: Study, lm: LoadedModel) -> None:
    few = dataclasses.replace(study, cells=study.cells[:8])
    nucleus = S.compute_samples(few, lm, None, S.SamplingConfig(n=40, top_p=0.2, progress=False))
    logits = compute_distributions(few, lm, None, DistributionConfig(progress=False))
    stats = logits.prompt_stats.set_index("prompt_id")
    first = nucleus.samples.groupby("prompt_id").head(40)
    for row in first.itertuples():
        top = stats.loc[row.prompt_id, "top_tokens"]
        probs = np.asarray(stats.loc[row.prompt_id, "top_probs"])
        keep = [
            t for t, c in zip(top, np.cumsum(probs), strict=True) if c - probs[top.index(t)] < 0.2
        ]
        assert any(row.text.startswith(t) for t in keep), (row.text, keep)
    cold = S.compute_samples(
        few, lm, None, S.SamplingConfig(n=20, temperature=0.01, progress=False)
    )
    texts = cold.samples.groupby("prompt_id")["text"].nunique()
    assert (texts == 1).all()  # near-greedy: one answer per prompt


def test_verbalized_failures_are_counted_not_dropped(study: Study, lm: LoadedModel) -> None:
    few = dataclasses.replace(study, cells=study.cells[:4])
    result = S.compute_samples(
        few, lm, None, S.SamplingConfig(n=5, verbalized=True, progress=False)
    )
    assert "JSON object" in result.prompts["prompt"].iloc[0]
    assert len(result.samples) == 5 * len(result.prompts)
    assert (result.samples["status"] == "unparseable").all()  # the organism never writes JSON
    assert set(result.samples["error"]) <= {"no_json", "unclosed_json"}
    assert result.manifest["elicitation"] == "verbalized"


# --------------------------------------------------------------------------------------------
# a scripted fake model


class Scripted(torch.nn.Module):
    """A causal LM whose next token depends only on how many tokens it has generated.

    `script[i]`: {token id: probability} of the i-th generated token (EOS after the script).
    Its KV cache stores the token ids (layer 0) and each row's prompt length (layer 1), so it
    follows the engine's cache expansion and row selection like a real model.
    """

    def __init__(self, vocab: int, script: list[dict[int, float]], eos: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(1, vocab, bias=False)
        self.script, self.eos = script, eos
        self.config = PretrainedConfig(max_position_embeddings=4096)
        self.generation_config = PretrainedConfig(eos_token_id=eos)

    @property
    def base_model(self) -> torch.nn.Module:
        return self

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        **_: Any,
    ) -> CausalLMOutputWithPast:
        rows, width = input_ids.shape
        ids = input_ids.float()[:, None, :, None]
        if cache is None:
            cache = DynamicCache()
            lengths = (
                attention_mask.sum(-1) if attention_mask is not None else torch.full((rows,), width)
            )
        else:
            lengths = cache.layers[1].keys[:, 0, 0, 0]
        cache.update(ids, ids, 0)
        cache.update(lengths.float()[:, None, None, None].expand(rows, 1, width, 1), ids, 1)
        assert position_ids is not None
        step = (position_ids[:, -1] + 1 - lengths).long()
        logits = torch.full((rows, 1, self.head.out_features), -1e4)
        for r in range(rows):
            i = int(step[r])
            choices = self.script[i] if i < len(self.script) else {self.eos: 1.0}
            for token, p in choices.items():
                logits[r, 0, token] = float(np.log(p))
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)


def scripted_lm(lm: LoadedModel, script: list[str | dict[str, float]]) -> LoadedModel:
    tok = lm.tokenizer
    steps: list[dict[int, float]] = []
    for part in script:
        if isinstance(part, dict):
            steps.append(
                {tok(k, add_special_tokens=False)["input_ids"][0]: v for k, v in part.items()}
            )
        else:
            steps += [{t: 1.0} for t in tok(part, add_special_tokens=False)["input_ids"]]
    model = Scripted(len(tok), steps, tok.eos_token_id)
    return dataclasses.replace(lm, model=model)  # type: ignore[arg-type]


def _attitude(study: Study) -> Study:
    questions = tuple(q for q in study.questions if q.id == "cinema_funding")
    return dataclasses.replace(study, questions=questions, cells=study.cells[:12])


def test_stops_at_the_parsed_answer_and_counts_a_known_distribution(
    study: Study, lm: LoadedModel
) -> None:
    fake = scripted_lm(lm, [{" A": 0.3, " B": 0.7}, ". Because it is good and I like it a lot."])
    result = S.compute_samples(
        _attitude(study), fake, None, S.SamplingConfig(n=200, max_new_tokens=30, progress=False)
    )
    s = result.samples
    assert (s["finish"] == "answer").all() and (s["n_new_tokens"] == 2).all()  # " B" then "."
    d = result.sampled_distributions
    d = d[d["option_id"] < 2].groupby("option_id")[["prob_answer_position"]].mean()
    np.testing.assert_allclose(d["prob_answer_position"], [0.3, 0.7], atol=1e-6)
    share_b = float((s["option_id"] == 1).mean())
    assert share_b == pytest.approx(0.7, abs=4 * np.sqrt(0.21 / len(s)))


def test_verbalized_json_is_parsed_and_renormalized(study: Study, lm: LoadedModel) -> None:
    fake = scripted_lm(lm, [' {"A": 30, "B": 50, "C": 10, "D": 10} and more text'])
    config = S.SamplingConfig(n=3, verbalized=True, progress=False)
    result = S.compute_samples(_attitude(study), fake, None, config)
    s = result.samples
    assert (s["status"] == "ok").all() and (s["finish"] == "answer").all()
    assert all(t.rstrip().endswith("}") for t in s["text"])
    d = result.sampled_distributions
    row = d[d["prompt_id"] == d["prompt_id"].iloc[0]].sort_values("option_id")
    np.testing.assert_allclose(row["prob"].to_numpy()[:3], np.array([30, 50, 10]) / 90)
    assert row["refusal_share"].iloc[0] == pytest.approx(0.1)


def test_refusals_are_kept(study: Study, lm: LoadedModel) -> None:
    fake = scripted_lm(lm, [{" D": 0.5, " As": 0.5}, " an AI I cannot answer that."])
    result = S.compute_samples(_attitude(study), fake, None, S.SamplingConfig(n=40, progress=False))
    s = result.samples
    assert (s["status"] == "refusal").all()
    assert set(s["how"]) == {"start", "refusal_phrase"}
    assert s.loc[s["how"] == "start", "option_id"].eq(3).all()
    assert s.loc[s["how"] == "refusal_phrase", "option_id"].isna().all()


def test_answer_inside_a_token_is_teacher_forced(study: Study, lm: LoadedModel) -> None:
    """ " excellent" is written [" e", "xcell", "ent"], no option token: the slot is scored by an
    explicit forward of prompt + prefix + each option's text, checked against plain HF."""
    prompts = P.render(study, lm.tokenizer)
    plan = D.plan_prompts(study, [prompts[0]], lm.tokenizer, constrain=False)[0]
    assert plan.question.id == "rating"
    tok = lm.tokenizer
    text = " excellent, really."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    lengths = [len(tok.decode(ids[: j + 1])) for j in range(len(ids))]
    row = D.Row(text, ids, "eos", plan.parser.parse(text, True), lengths)
    assert row.result.kind == "text" and row.result.option_id == 4
    # No decoding steps recorded (and no prompt cache): every option is a forward.
    empty = np.zeros((1, 0))
    records = D.Records(np.zeros((1, 0, max(1, len(plan.cand_ids)))), empty, empty, empty)
    config = S.SamplingConfig(n=1, temperature=0.7)
    stats = A.ForcedStats()
    (slot,) = A.answer_positions(lm, [plan], [row], records, config, stats)
    assert stats.from_records == 0 and stats.forward_rows == len(plan.question.options)
    assert slot["answer_token"] == 0
    context = list(plan.prompt.input_ids)
    expected, scaled = [], []
    with torch.no_grad():
        for option in plan.question.options:
            cont = tok(" " + option, add_special_tokens=False)["input_ids"]
            logits = lm.model(torch.tensor([context + cont])).logits[0].float()
            reads = logits[len(context) - 1 : len(context) - 1 + len(cont)]
            target = torch.tensor(cont)[:, None]
            expected.append(float(torch.log_softmax(reads, -1).gather(1, target).sum()))
            scaled.append(float(torch.log_softmax(reads / 0.7, -1).gather(1, target).sum()))
    np.testing.assert_allclose(slot["answer_logprobs"], expected, atol=1e-4)
    weights = np.exp(np.array(scaled) - max(scaled))
    np.testing.assert_allclose(slot["answer_probs"], weights / weights.sum(), atol=1e-5)


# --------------------------------------------------------------------------------------------
# the teacher-forced slots: the fast paths equal the old whole-sequence forwards


def _old_forced_slots(
    lm: LoadedModel,
    plans: list[D.Plan],
    rows: list[D.Row],
    fallback: list[tuple[int, int, str, str]],
    config: S.SamplingConfig,
) -> dict[int, tuple[list[float], list[float]]]:
    """The previous implementation: one whole-sequence forward per (sample, option)."""
    contexts, continuations, owners = [], [], []
    for r, j, before, kind in fallback:
        plan = plans[rows[r].prompt]
        for surface in option_surfaces(plan.question, plan.prompt.order):
            if surface.kind == kind:
                ids = lm.tokenizer(before + surface.text, add_special_tokens=False)["input_ids"]
                contexts.append(list(plan.prompt.input_ids) + rows[r].ids[:j])
                continuations.append(ids)
                owners.append((r, surface.option_id))
    lp1, lp_t = D.teacher_forced_logprobs(lm, contexts, continuations, config.temperature)
    per_row: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for (r, opt), a, b in zip(owners, lp1, lp_t, strict=True):
        k = len(plans[rows[r].prompt].question.all_options)
        per_row.setdefault(r, (np.full(k, -np.inf), np.full(k, -np.inf)))
        per_row[r][0][opt], per_row[r][1][opt] = a, b
    out = {}
    for r, (logp, logp_t) in per_row.items():
        w = np.exp(logp_t - logp_t.max())
        out[r] = (logp.tolist(), (w / w.sum()).tolist())
    return out


@pytest.mark.parametrize("which", ["organism", "tiny_llama"])
def test_forced_slots_equal_whole_sequence_forwards(
    which: str, study: Study, lm: LoadedModel, request: pytest.FixtureRequest
) -> None:
    """Every way `forced_slots` reads a slot (the decoding step's records for one-token
    candidate continuations; batched forwards on the wave's prompt cache for the others,
    deduplicated) equals one plain whole-sequence forward per (sample, option): 1e-5."""
    if which == "tiny_llama":
        from tests.conftest import example_study_dict
        from workbench.study.load import parse_study

        lm = load_model(request.getfixturevalue("tiny_llama_dir"), dtype="float32", device="cpu")
        study = parse_study(example_study_dict(), "example.yaml")
    stats, worst = _check_forced_slots(lm, study)
    # Both fast paths ran, and duplicates were scored once.
    assert stats.from_records > 0 and stats.forward_rows > 0
    assert stats.from_records + stats.forward_rows < stats.pairs
    print(f"{which}: {stats}, worst |answer_probs difference| {worst:.2e}")


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
def test_forced_slots_past_a_sliding_window_equal_whole_sequence_forwards(
    kind: str, study: Study, lm: LoadedModel
) -> None:
    """Prompts of ~70 tokens fit a 72-token window, prompt + completion + option do not: the
    cached rows (pads between prompt and continuation, a window built on cache indices) were
    off by up to 1.6e-3; such slots are scored as whole sequences."""
    lm = dataclasses.replace(lm, model=random_model(kind, len(lm.tokenizer), sliding_window=72))
    assert max(len(p.input_ids) for p in P.render(study, lm.tokenizer)[:5]) < 72
    stats, _ = _check_forced_slots(lm, study)
    assert stats.forward_rows > 0


def _check_forced_slots(lm: LoadedModel, study: Study) -> tuple[A.ForcedStats, float]:
    """`forced_slots` against one whole-sequence forward per (sample, option), 1e-5."""
    few = P.render(study, lm.tokenizer)[:5]
    plans = D.plan_prompts(study, few, lm.tokenizer, constrain=False)
    config = S.SamplingConfig(n=6, seed=0, temperature=0.7, max_new_tokens=5, progress=False)
    rows, records = D.run_wave(lm, plans, config, 5, False, D.eos_ids(lm))
    assert records.prefix is not None
    kinds = [{s.kind for s in option_surfaces(p.question, p.prompt.order)} for p in plans]
    stats = A.ForcedStats()
    worst = 0.0
    for j in range(3):
        for before, kind in (("", "label"), (" ", "label"), ("(", "label"), (" ", "text")):
            fallback: list[tuple[int, int, str, str]] = [
                (r, min(j, len(row.ids) - 1), before, kind)
                for r, row in enumerate(rows)
                if row.ids and kind in kinds[row.prompt]
            ]
            out: list[dict[str, Any]] = [{} for _ in rows]
            A.forced_slots(lm, plans, rows, fallback, records, config, out, stats)
            old = _old_forced_slots(lm, plans, rows, fallback, config)
            assert set(old) == {r for r, slot in enumerate(out) if slot}
            for r, (logp, probs) in old.items():
                # float32 log-probs of -20 on the random tiny model: 1e-6 relative
                np.testing.assert_allclose(
                    out[r]["answer_logprobs"], logp, atol=LOGPROB_ATOL, rtol=1e-6
                )
                np.testing.assert_allclose(out[r]["answer_probs"], probs, atol=1e-5, rtol=0)
                worst = max(worst, float(np.abs(np.subtract(out[r]["answer_probs"], probs)).max()))
    return stats, worst
