"""Logit-based answer distributions for a study: the workbench's core measurement.

Per prompt and option (docs/MEASUREMENT.md §2): the raw log-prob of every surface variant (" A", "A"),
the aggregated log-prob (`sum` or `max` over variants, in probability space) and the
probability renormalized over the *non-refusal* options. Per prompt: the option mass (raw
probability on all options: a low mass means the renormalized distribution is a conditional
the model would rarely produce), the refusal mass, the full-vocabulary entropy (bits), the
top-k full-vocabulary tokens, the expected ordinal score. Across option orders: the
order-adjusted distribution (each option's probability averaged over the orders shown) and
the position bias (mean probability at displayed position minus 1/K; position 0 = A-bias).

Every number is reproducible from `prompts.parquet` (`input_ids`) and `variants.parquet`
(`token_ids`) with a plain HF forward: log_softmax(float32 logits) at the positions after the
context, summed over the continuation's tokens.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench import distributed
from workbench.engine.models import LoadedModel
from workbench.engine.scoring import EngineConfig, Request, Scored, score_requests
from workbench.measure.distribution_tables import (
    option_mass_warnings,
    order_adjusted,
    position_bias,
    summarize,
)
from workbench.runs import FULL_VOCAB, MANIFEST, RunFolder, announce_resume, retry_on_oom
from workbench.study import prompts as P
from workbench.study.spec import Study

TABLES = ("distributions", "variants", "prompt_stats")


@dataclass(frozen=True)
class DistributionConfig:
    """Settings of a distributions run (written to the manifest)."""

    batch_size: int = 32
    share_prefix: bool = True
    min_prefix_tokens: int = 8
    pack_options: bool = True
    """Score all options of a prompt in one row (a token tree under a 4D attention mask)."""
    chunk_prompts: int = 256
    """Prompts per chunk written to disk (what a crash can lose at most)."""
    progress: bool = True
    min_option_mass: float = 0.5
    """A question whose mean option mass is below this gets a warning (printed when
    `progress`, always in the manifest's `warnings`): its renormalized distribution is a
    conditional the model would rarely produce."""


@dataclass
class DistributionResult:
    """The tables of a distributions run (see README "Output tables" for every column)."""

    prompts: pd.DataFrame
    distributions: pd.DataFrame
    variants: pd.DataFrame
    prompt_stats: pd.DataFrame
    adjusted: pd.DataFrame
    """Order-adjusted distribution per item (question x cell) and option."""
    position_bias: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


def conventions(study: Study) -> dict[str, Any]:
    """Every measurement convention of a run, spelled out for the manifest."""
    s = study.scoring
    return {
        "softmax": "full vocabulary, float32, at the answer position",
        "scoring_method": s.method,
        "scored_target": s.target,
        "variants": list(s.variants),
        "variant_aggregation": s.aggregate + " (in probability space)",
        "renormalization": "over non-refusal options",
        "refusal_options": "excluded from the distribution; reported as refusal_mass",
        "option_mass": "sum over all options (refusal included) of the aggregated probability",
        "continuation_split": "lm-eval rule: context trailing whitespace moves to the continuation; "
        "joint encoding, tokens after the context's tokens",
        "bos": "tokenizer special tokens for plain prompts; none added to chat-template prompts",
        "entropy_units": "bits",
        "top_k": s.top_k,
        "option_orders": asdict(study.orders),
        "position_bias": "mean prob at displayed position minus 1/K (position 0: A-bias)",
    }


def build_requests(
    study: Study, lm: LoadedModel, prompts: list[P.Prompt]
) -> tuple[list[Request], pd.DataFrame]:
    """Engine requests and the `variants` skeleton (one row per scored continuation)."""
    # (`option_targets` builds each distinct (question, order) once per study)
    per_prompt = [P.option_targets(study, p) for p in prompts]
    flat = [t for targets in per_prompt for t in targets]
    all_ids = P.continuation_ids_many(
        lm.tokenizer,
        study,
        [(p, t.surface) for p, targets in zip(prompts, per_prompt, strict=True) for t in targets],
    )
    requests = []
    k = 0
    for prompt, targets in zip(prompts, per_prompt, strict=True):
        n = len(targets)
        conts = tuple(tuple(ids) for ids in all_ids[k : k + n])
        requests.append(Request(prompt.prompt_id, prompt.input_ids, conts, group=prompt.persona_id))
        k += n
    skeleton = pd.DataFrame(
        {
            "prompt_id": np.repeat(
                np.asarray([p.prompt_id for p in prompts], dtype=np.int64),
                [len(t) for t in per_prompt],
            ),
            "option_id": [t.option_id for t in flat],
            "label": [t.label for t in flat],
            "position": [t.position for t in flat],
            "is_refusal": [t.is_refusal for t in flat],
            "variant": [t.variant for t in flat],
            "continuation": [t.continuation for t in flat],
            "token_ids": all_ids,
        }
    )
    return requests, skeleton


def compute_distributions(
    study: Study,
    lm: LoadedModel,
    out_dir: str | Path | None = None,
    config: DistributionConfig | None = None,
    *,
    overwrite: bool = False,
) -> DistributionResult:
    """Score every prompt of `study` with `lm`; write a run folder when `out_dir` is given.

    Re-running with the same `out_dir` resumes: finished prompts are not recomputed.
    """
    config = config or DistributionConfig()
    t0 = time.time()
    prompts = P.render(study, lm.tokenizer)
    P.validate_for_tokenizer(study, prompts, lm.tokenizer, lm.max_length)
    prompts_df = P.prompts_frame(study, prompts)
    requests, variant_skeleton = build_requests(study, lm, prompts)
    t_render = time.time() - t0
    engine = EngineConfig(
        batch_size=config.batch_size,
        share_prefix=config.share_prefix,
        min_prefix_tokens=config.min_prefix_tokens,
        pack_options=config.pack_options,
    )
    factor_names = [f.name for f in study.factors]

    run: RunFolder | None = None
    done: set[int] = set()
    if out_dir is not None:
        identity = {
            "study": study.name,
            "prompts_fingerprint": P.prompts_fingerprint(prompts),
            "scoring": asdict(study.scoring),
            "model": lm.name,
            "dtype": str(lm.dtype),
        }
        run = RunFolder(out_dir, identity, overwrite=overwrite)
        done = run.begin(prompts_df, "distributions")
        if config.progress and run.ranks.is_main:
            announce_resume(run.path, len(done), len(prompts))

    question_of = {p.prompt_id: p.question_id for p in prompts}
    todo = [r for r in requests if r.key not in done]
    if run is not None and run.ranks.active:
        # whole persona groups per rank: a group's numbers never depend on its neighbours
        todo = distributed.shard_groups(todo, lambda r: r.group, run.ranks)
    collected: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLES}
    full_vocab: list[tuple[int, torch.Tensor]] = []
    bar = tqdm(
        total=len(done) + len(todo),
        initial=len(done),
        desc="distributions",
        unit="prompt",
        disable=not config.progress,
    )

    t_score = time.time()
    oom: list[dict[str, Any]] = []
    batch_size = engine.batch_size
    for chunk_reqs in _chunks_by_group(todo, config.chunk_prompts):
        vocab_rows: list[tuple[int, torch.Tensor]] = []

        def score(size: int, chunk_reqs: list[Request] = chunk_reqs) -> list[Scored]:
            return list(
                score_requests(
                    lm.model,
                    chunk_reqs,
                    replace(engine, batch_size=size),
                    pad_id=lm.tokenizer.pad_token_id or 0,
                    on_done=bar.update,
                )
            )

        scored_chunk, batch_size = retry_on_oom(score, batch_size, oom, "scoring")
        frames = summarize(study, lm, scored_chunk, variant_skeleton, question_of)
        if study.scoring.save_full_vocab:
            vocab_rows = [(s.key, s.answer_logprobs.half()) for s in scored_chunk]
        if run is not None:
            extra = _vocab_tensors(vocab_rows) if vocab_rows else None
            run.write_chunk(frames, extra)
        else:
            for name, frame in frames.items():
                collected[name].append(frame)
            full_vocab.extend(vocab_rows)
    bar.close()
    t_score = time.time() - t_score
    if run is not None and not run.ranks_done():
        run.wait_for_finish()
        return _finished(run.path)

    if run is not None:
        tables_out = {name: run.read_chunks(name) for name in TABLES}
    else:
        tables_out = {
            name: pd.concat(collected[name], ignore_index=True)
            if collected[name]
            else pd.DataFrame()
            for name in TABLES
        }
    tables_out = {
        name: frame.sort_values(
            [c for c in ("prompt_id", "option_id", "variant") if c in frame.columns], kind="stable"
        ).reset_index(drop=True)
        for name, frame in tables_out.items()
    }
    tables_out["variants"] = tables_out["variants"][
        [
            "prompt_id",
            "option_id",
            "label",
            "position",
            "is_refusal",
            "variant",
            "continuation",
            "token_ids",
            "logprob",
        ]
    ]
    adjusted = order_adjusted(prompts_df, tables_out["distributions"], factor_names)
    bias = position_bias(prompts_df, tables_out["distributions"])
    warnings = option_mass_warnings(prompts_df, tables_out["prompt_stats"], config.min_option_mass)
    if config.progress:
        for w in warnings:
            print(f"warning: {w['message']}", file=sys.stderr)
    manifest = {
        "kind": "distributions",
        "study": {"name": study.name, "path": study.path, "definition": dict(study.raw)},
        "conventions": conventions(study),
        "config": asdict(config),
        "model": lm.describe(),
        "seed": study.seed,
        "counts": {
            "prompts": len(prompts),
            "rows": len(tables_out["distributions"]),
            "resumed_prompts": len(done),
        },
        "warnings": warnings,
        "out_of_memory": oom,
        "timings_s": {
            "render": round(t_render, 3),
            "score": round(t_score, 3),
            "total": round(time.time() - t0, 3),
        },
    }
    result = DistributionResult(
        prompts_df,
        tables_out["distributions"],
        tables_out["variants"],
        tables_out["prompt_stats"],
        adjusted,
        bias,
        manifest,
    )
    if run is not None:
        for name in TABLES:
            run.write_table(name, tables_out[name])
        run.write_table("adjusted", adjusted)
        run.write_table("position_bias", bias)
        if study.scoring.save_full_vocab:
            _consolidate_vocab(run)
        run.finish(manifest)
        result.out_dir = run.path
    elif full_vocab:
        result.manifest["full_vocab"] = _vocab_tensors(full_vocab)
    return result


def _finished(path: Path) -> DistributionResult:
    """A finished run folder's tables (what the ranks other than 0 return)."""
    import json

    tables = {
        name: pd.read_parquet(path / f"{name}.parquet")
        for name in ("prompts", *TABLES, "adjusted", "position_bias")
    }
    manifest = json.loads((path / MANIFEST).read_text())
    return DistributionResult(
        tables["prompts"],
        tables["distributions"],
        tables["variants"],
        tables["prompt_stats"],
        tables["adjusted"],
        tables["position_bias"],
        manifest,
        path,
    )


def _chunks_by_group(requests: list[Request], size: int) -> list[list[Request]]:
    """Chunks of about `size` requests that never split a prefix group."""
    chunks: list[list[Request]] = []
    current: list[Request] = []
    groups: dict[str, list[Request]] = {}
    for r in requests:
        groups.setdefault(r.group, []).append(r)
    for grp in groups.values():
        if current and len(current) + len(grp) > size:
            chunks.append(current)
            current = []
        current.extend(grp)
    if current:
        chunks.append(current)
    return chunks


def _vocab_tensors(rows: list[tuple[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    rows = sorted(rows, key=lambda r: r[0])
    return {
        "prompt_id": torch.tensor([r[0] for r in rows], dtype=torch.int64),
        "logprobs": torch.stack([r[1] for r in rows]).contiguous(),
    }


def _consolidate_vocab(run: RunFolder) -> None:
    from safetensors.torch import load_file, save_file

    parts = [load_file(str(c / FULL_VOCAB)) for c in run.chunk_dirs() if (c / FULL_VOCAB).exists()]
    if not parts:
        return
    ids = torch.cat([p["prompt_id"] for p in parts])
    lps = torch.cat([p["logprobs"] for p in parts])
    order = torch.argsort(ids)
    save_file(
        {"prompt_id": ids[order].contiguous(), "logprobs": lps[order].contiguous()},
        str(run.path / FULL_VOCAB),
    )
