"""The sampling engine's draws: every token follows its own uniform, and nothing else.

Each sample's token at step t is the inverse CDF of its prefix's distribution at the
uniform u[prompt, sample, t] (`decoding.uniforms`). Checked against an independent
reference (one plain HF forward per sample and step, HF's own top-p warper, numpy's
search); then the consequences: the same samples at any batch size, wave size or after
out-of-memory halvings, and samples 0..N-1 unchanged when N grows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import TopPLogitsWarper

from workbench.engine.models import LoadedModel, load_model
from workbench.measure import decoding as D
from workbench.measure import sampling as S
from workbench.organism.build import STUDY_FILE
from workbench.study import prompts as P
from workbench.study.load import load_study
from workbench.study.spec import Study

EXACT = ["prompt_id", "sample", "text", "n_new_tokens", "finish", "option_id", "status", "how"]
EXACT += ["kind", "answer_start", "answer_token"]
FLOAT = ["answer_option_mass", "answer_logprobs", "answer_probs"]


@pytest.fixture(scope="module")
def lm(small_organism: Path) -> LoadedModel:
    return load_model(small_organism / "model", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def study(small_organism: Path) -> Study:
    full = load_study(small_organism / STUDY_FILE)
    return dataclasses.replace(full, cells=full.cells[:: max(1, len(full.cells) // 6)][:6])


def assert_same_samples(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Same draws (every text and parse equal); the stored probabilities equal up to float32
    rounding of logits computed in other batch shapes (log-probs ~ -7: a few 1e-7)."""
    pd.testing.assert_frame_equal(a[EXACT], b[EXACT])
    for col in FLOAT:
        for x, y in zip(a[col], b[col], strict=True):
            if x is None or y is None:
                assert x is None and y is None
            else:
                np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


def test_uniforms_depend_on_seed_prompt_sample_and_step_only() -> None:
    u = D.uniforms(7, [3, 11], 4, 5)
    assert u.shape == (2, 4, 5) and u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    np.testing.assert_array_equal(u[1], D.uniforms(7, [11], 4, 5)[0])  # wave mates: none
    np.testing.assert_array_equal(u[0], D.uniforms(7, [3], 8, 5)[0, :4])  # more samples
    assert not np.array_equal(u[0], D.uniforms(8, [3], 4, 5)[0])  # the seed
    assert not np.array_equal(u[0], u[1])  # the prompt


def test_draw_is_the_inverse_cdf_and_skips_tokens_of_probability_zero() -> None:
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0, 0.5]])
    below_one = float(np.nextafter(np.float32(1), np.float32(0)))
    u = torch.tensor([[0.0, 0.2499, 0.25, below_one], [0.0, 0.4999, 0.5, below_one]])
    assert D.draw(probs, u).tolist() == [[1, 1, 3, 3], [0, 0, 5, 5]]
    # a uniform that rounds onto the total (u * total == total) takes the last positive token
    assert D.draw(probs * 3, torch.ones(2, 1)).tolist() == [[3], [5]]


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (1.6, 0.9)])
def test_every_token_follows_its_own_uniform(
    study: Study, lm: LoadedModel, temperature: float, top_p: float
) -> None:
    """Rows shared by samples with one prefix, split where their tokens differ: each sample's
    tokens equal a lone plain forward of prompt + its prefix, warped by HF, searched at its
    uniform (a uniform within float rounding of a CDF boundary could flip one: ~1e-6)."""
    prompts = P.render(study, lm.tokenizer)[:3]
    plans = D.plan_prompts(study, prompts, lm.tokenizer, constrain=False)
    n, max_new = 16, 8
    config = S.SamplingConfig(n=n, seed=5, temperature=temperature, top_p=top_p)
    rows, _ = D.run_wave(lm, plans, config, max_new, False, D.eos_ids(lm))
    u = D.uniforms(5, [p.prompt.prompt_id for p in plans], n, max_new)
    warp = TopPLogitsWarper(top_p) if top_p < 1 else None
    eos = D.eos_ids(lm)
    for row in rows:
        ids = list(plans[row.prompt].prompt.input_ids)
        gen = row.ids + ([min(eos)] if row.finish == "eos" else [])
        for t, token in enumerate(gen):
            with torch.no_grad():
                logits = lm.model(torch.tensor([ids + gen[:t]])).logits[0, -1].float()
            scaled = logits / temperature
            if warp is not None:
                scaled = warp(torch.zeros(1, 1, dtype=torch.long), scaled[None])[0]
            cdf = np.cumsum(torch.softmax(scaled, -1).numpy())
            for s in row.samples:
                drawn = int(np.searchsorted(cdf, u[row.prompt, s, t] * cdf[-1], side="right"))
                if row.finish == "eos" and t == len(row.ids):
                    assert drawn in eos
                else:
                    assert drawn == token, (row.prompt, s, t)
    assert sum(len(r.samples) for r in rows) == n * len(plans)
    assert len(plans) < len(rows) < n * len(plans)  # shared rows, and splits


def test_samples_do_not_depend_on_batch_or_wave_size(study: Study, lm: LoadedModel) -> None:
    base = S.SamplingConfig(n=20, seed=0, progress=False)
    runs = {
        rows: S.compute_samples(study, lm, None, dataclasses.replace(base, batch_rows=rows))
        for rows in (20, 60, 4096)
    }
    waves = {r.manifest["conventions"]["prompts_per_wave"] for r in runs.values()}
    assert waves == {1, 3, 4096 // 20}
    for result in runs.values():
        assert_same_samples(result.samples, runs[20].samples)
    # Samples 0..N-1 are those of a run with more samples.
    more = S.compute_samples(study, lm, None, dataclasses.replace(base, n=30))
    first = more.samples[more.samples["sample"] < 20].reset_index(drop=True)
    assert_same_samples(first, runs[4096].samples)


def test_out_of_memory_halves_the_batch_and_keeps_the_samples(
    study: Study, lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A (simulated) CUDA out-of-memory error halves the prompts decoded together; the run
    goes on, lists each halving in its manifest, and draws what an unhindered run draws."""
    config = S.SamplingConfig(n=10, seed=2, batch_rows=80, chunk_prompts=4, progress=False)
    clean = S.compute_samples(study, lm, tmp_path / "clean", config)
    real = D.run_wave
    sizes: list[int] = []

    def small_memory(lm: Any, plans: list[D.Plan], *args: Any) -> Any:
        sizes.append(len(plans))
        if len(plans) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(lm, plans, *args)

    monkeypatch.setattr(D, "run_wave", small_memory)
    hit = S.compute_samples(study, lm, tmp_path / "oom", config)
    assert clean.manifest["conventions"]["prompts_per_wave"] == 8
    assert [o["retried_with"] for o in hit.manifest["out_of_memory"]] == [4, 2]
    assert clean.manifest["out_of_memory"] == []
    assert sizes[:2] == [8, 4] and set(sizes[2:]) == {2}
    assert_same_samples(hit.samples, clean.samples)
    on_disk = pd.read_parquet(tmp_path / "oom" / "samples.parquet")
    assert_same_samples(on_disk, pd.read_parquet(tmp_path / "clean" / "samples.parquet"))
