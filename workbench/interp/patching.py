"""Span-aligned counterfactual activation patching, measured on the answer distribution.

For each pair of prompts that differ in one factor alone (`workbench.interp.pairs`), each site
(TransformerLens names) and each position, the source prompt's activation is written into the
target prompt's forward at that site and the answer distribution is read with the
workbench's measurement contract (`workbench.measure.distributions`): full-vocabulary float32
softmax at the last prompt token, every label variant aggregated (`sum` / `max` in
probability space), renormalized over the non-refusal options, expected ordinal score.

Directions: `denoising` writes the clean prompt's activation into the corrupt prompt (is the
site sufficient to carry the factor's effect?), `noising` writes the corrupt one into the
clean prompt (is it necessary?). Both are read the same way: how far the patch moves the
target's answer towards the source's.

Positions (the pair's token alignment is `workbench.interp.pairs.align`):

- `span_last`: the factor span's last token <- the source span's last token.
- `span_mean`: every token of the target span is shifted by (source span mean - target span
  mean): the span's mean becomes the source's, its within-span shape stays the target's.
  Defined for spans of any two lengths.
- `answer`: the last prompt token <- the source's last prompt token.
- `persona_last`: the last token of the persona text <- the source's (pairs whose prompts
  have no persona text are skipped at this position).
- `all`: every target token <- its aligned source token (after the span, shifted by the
  length difference); with equal lengths at `blocks.0.hook_resid_pre` this *is* the source.

Metrics per (question, site, position, direction), over pairs, with 95% percentile bootstrap
intervals (pairs resampled):

- `normalized_effect` = sum_i r_i / max(sum_i g_i, n * floor): r_i the patch's movement of the
  expected score from the target's towards the source's (the sign of the pair's own difference
  orients it), g_i = |score(source) - score(target)|; 1 = the site carries the whole
  difference, 0 = nothing. A ratio of sums, so pairs with noise-sized differences weigh
  little. `floor` = `min_effect` x the question's value range: a factor whose own effect is
  below it has nothing to localize (at `hook_resid_pre` of block 0 over its span the patched
  prompt *is* the source, so a share of its own noise would read 1.0); against the floor its
  normalized effect reads as a share of the smallest effect worth localizing. Questions
  without ordinal values use TV instead: r_i = TV(target, source) - TV(patched, source),
  g_i = TV(target, source), floor = `min_effect`.
- `score_change`: mean r_i (score points).
- `tv_source`, `tv_target`: mean total variation of the patched distribution to the source's
  and to the target's (substantive options).

Speed: only the prompts in pairs are tokenized and spanned (`workbench.interp.pairs.
pair_prompts`). Each prompt's clean forward runs once (recording every site, the residual
stream and the attention keys and values), then patched forwards run in batches of rows that
each carry an edit at one site (rows of one batch mix sites and pairs; an edit only touches
its own row). Where `workbench.interp.resume_forward` addresses the model, a patched row
computes only the blocks from its site's on and the tokens from its first patched token on,
reading the clean run's keys and values before it (the full patched forward's numbers); else
(and at `hook_embed`) it runs the full forward. Logits at the answer position only.

Run folder: one chunk per `chunk_pairs` pairs, a fixed slice of the pairs left. Under a
launcher (`workbench.distributed`) ranks take whole chunks; rank 0 merges them, bootstraps the
intervals, draws the heatmap and writes the manifest last (same numbers at any world size).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from torch import Tensor

from workbench import distributed
from workbench.engine.models import LoadedModel
from workbench.errors import StudyError, WorkbenchError
from workbench.interp import readers as R
from workbench.interp import resume_forward as RF
from workbench.interp.hooks import Edit, edit_sites
from workbench.interp.pairs import Pair, align, pair_prompts, persona_last_tokens
from workbench.interp.patch_tables import POSITIONS, factor_effect, heatmap, summarize
from workbench.interp.sites import Site, _hf_modules, resolve_sites
from workbench.runs import MANIFEST, RunFolder
from workbench.study import prompts as P
from workbench.study.spans import Span
from workbench.study.spec import Study

DIRECTIONS = ("denoising", "noising")
PATCHING = "patching"
"""`patching.parquet`: one row per question x site x position x direction x metric."""
PATCHED = "patched"
"""`patched.parquet`: one row per pair x site x position x direction (the raw reads)."""
PAIRS = "pairs"
"""`pairs.parquet`: one row per pair, with both prompts' own answers."""


@dataclass(frozen=True)
class PatchConfig:
    """Settings of a patching run (written to the manifest)."""

    sites: tuple[str, ...] = (
        "blocks.*.hook_resid_pre",
        "blocks.*.hook_attn_out",
        "blocks.*.hook_mlp_out",
        "blocks.*.hook_resid_post",
    )
    """TransformerLens site names or fnmatch globs."""
    positions: tuple[str, ...] = ("span_last", "span_mean", "answer", "persona_last")
    directions: tuple[str, ...] = DIRECTIONS
    questions: tuple[str, ...] | None = None
    """Question ids (None: every question with pairs)."""
    max_pairs: int | None = None
    """At most this many pairs, drawn uniformly with `seed` (None: all)."""
    seed: int = 0
    min_effect: float = 0.05
    """Floor of the normalized effect's denominator, as a share of the value range."""
    n_boot: int = 1000
    batch_size: int = 64
    """Rows (patched forwards) per batch."""
    chunk_pairs: int = 64
    """Pairs per chunk written to disk (what a crash can lose at most)."""
    progress: bool = True


@dataclass
class PatchResult:
    """The tables of a patching run (columns in the module docstring and README)."""

    patching: pd.DataFrame
    patched: pd.DataFrame
    pairs: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


def finished(path: str | Path) -> PatchResult:
    """A finished patching run folder's tables (what the ranks other than 0 return)."""
    path = Path(path)
    tables = {
        name: pd.read_parquet(path / f"{name}.parquet") for name in (PATCHING, PATCHED, PAIRS)
    }
    manifest = json.loads((path / MANIFEST).read_text())
    return PatchResult(tables[PATCHING], tables[PATCHED], tables[PAIRS], manifest, path)


# --------------------------------------------------------------------------------------------
# reading the answer


def answer_logprobs(lm: LoadedModel, ids: Sequence[Sequence[int]]) -> Tensor:
    """[row, vocab] float32 full-vocab log-probs after each row's last token, for right-padded
    rows of any lengths (logits at that position only). Edits and recordings of
    `workbench.interp.hooks` apply when called inside their blocks."""
    return RF.full_logprobs(lm, ids)[0]


# --------------------------------------------------------------------------------------------
# plans: which target tokens get which values


@dataclass(frozen=True)
class _Plan:
    """One patched forward before its site is chosen: target, source, positions, rule."""

    pair_id: int
    direction: str
    position: str
    target: int
    source: int
    tpos: tuple[int, ...]
    spos: tuple[int, ...]
    """Source token per target token (copy), or the source span (span_mean)."""
    tspan: tuple[int, int] = (0, 0)
    """span_mean: the target span [start, end)."""


def _plans(
    pair: Pair,
    directions: Sequence[str],
    positions: Sequence[str],
    prompts: dict[int, P.Prompt],
    spans: dict[int, Span],
    persona_last: dict[int, int],
) -> list[_Plan]:
    out = []
    for direction in directions:
        src, tgt = (
            (pair.clean, pair.corrupt) if direction == "denoising" else (pair.corrupt, pair.clean)
        )
        s, t = spans.get(src), spans.get(tgt)
        ns, nt = len(prompts[src].input_ids), len(prompts[tgt].input_ids)
        for pos in positions:
            base = (pair.pair_id, direction, pos, tgt, src)
            if pos == "answer":
                out.append(_Plan(*base, (nt - 1,), (ns - 1,)))
            elif pos == "persona_last":
                if src in persona_last and tgt in persona_last:
                    out.append(_Plan(*base, (persona_last[tgt],), (persona_last[src],)))
            elif s is None or t is None:
                continue  # the factor's value fell outside the fed text
            elif pos == "span_last":
                out.append(_Plan(*base, (t.token_end - 1,), (s.token_end - 1,)))
            elif pos == "span_mean":
                out.append(
                    _Plan(
                        *base,
                        tuple(range(t.token_start, t.token_end)),
                        tuple(range(s.token_start, s.token_end)),
                        (t.token_start, t.token_end),
                    )
                )
            else:  # all
                out.append(_Plan(*base, tuple(range(nt)), tuple(align(s, t, ns, nt))))
    return out


def _values(plan: _Plan, h_source: Tensor, h_target: Tensor) -> Tensor:
    """[k, d_model] values written at `plan.tpos` (h_* are [pos, d_model] at one site)."""
    if plan.position == "span_mean":
        t0, t1 = plan.tspan
        shift = h_source[list(plan.spos)].mean(0) - h_target[t0:t1].mean(0)
        return h_target[list(plan.tpos)] + shift
    return h_source[list(plan.spos)]


# --------------------------------------------------------------------------------------------
# the run


def _check(study: Study, lm: LoadedModel, config: PatchConfig) -> list[Site]:
    bad = [p for p in config.positions if p not in POSITIONS]
    if bad or not config.positions:
        raise WorkbenchError(
            f"unknown position {bad[0] if bad else '(none given)'!r}",
            fix=f"use one or more of: {', '.join(POSITIONS)}",
        )
    bad = [d for d in config.directions if d not in DIRECTIONS]
    if bad or not config.directions:
        raise WorkbenchError(
            f"unknown direction {bad[0] if bad else '(none given)'!r}",
            fix=f"use one or both of: {', '.join(DIRECTIONS)}",
        )
    if study.scoring.method != "next_token":
        raise StudyError(
            study.path,
            "scoring.method",
            "patching reads the next-token answer distribution; this study scores sequences",
            "use `scoring.method: next_token` with single-token labels for patching",
        )
    qids = [q.id for q in study.questions]
    for q in config.questions or ():
        if q not in qids:
            raise WorkbenchError(f"unknown question {q!r}", fix=f"use one of: {', '.join(qids)}")
    for name in ("batch_size", "chunk_pairs", "n_boot"):
        if getattr(config, name) < 1:
            raise WorkbenchError(f"{name} must be at least 1", fix="pass a positive number")
    n_layers = int(lm.model.config.get_text_config().num_hidden_layers)
    sites = resolve_sites(config.sites, n_layers)
    try:
        _hf_modules(lm.model, sites)
    except WorkbenchError as err:
        raise WorkbenchError(
            f"patching cannot address this model's sites: {err.message}",
            fix="patching hooks HF decoder blocks (Llama, Mistral, Qwen, Gemma, GPT-2 style); "
            "report the architecture",
        ) from err
    return sites


def patch_factor(
    study: Study,
    lm: LoadedModel,
    factor: str,
    out_dir: str | Path | None = None,
    config: PatchConfig | None = None,
    *,
    overwrite: bool = False,
) -> PatchResult:
    """Patch `factor`'s counterfactual pairs at every site x position x direction of `config`.

    Writes a run folder when `out_dir` is given; re-running the same call resumes it (pairs in
    finished chunks are not recomputed). Bad input raises before any forward pass.
    """
    from tqdm.auto import tqdm

    config = config or PatchConfig()
    t0 = time.time()
    sites = _check(study, lm, config)
    needs_span = any(p.startswith("span") or p == "all" for p in config.positions)
    found = pair_prompts(
        study,
        lm.tokenizer,
        factor,
        questions=config.questions,
        max_pairs=config.max_pairs,
        seed=config.seed,
        spans=needs_span,
    )
    pairs, by_id, spans = found.pairs, found.prompts, found.spans
    used_prompts = [by_id[i] for i in sorted(by_id)]
    P.validate_for_tokenizer(study, used_prompts, lm.tokenizer, lm.max_length)
    persona_last = (
        persona_last_tokens(study, used_prompts, lm.tokenizer)
        if "persona_last" in config.positions
        else {}
    )
    readers = R.readers_for(study, lm, used_prompts)

    run: RunFolder | None = None
    done: set[int] = set()
    if out_dir is not None:
        identity = {
            "kind": "patching",
            "study": study.name,
            "prompts_fingerprint": P.prompts_fingerprint(used_prompts),
            "model": lm.name,
            "dtype": str(lm.dtype),
            "factor": factor,
            "pairs": [[p.clean, p.corrupt] for p in pairs],
            "sites": [s.name for s in sites],
            "positions": list(config.positions),
            "directions": list(config.directions),
        }
        run = RunFolder(out_dir, identity, overwrite=overwrite)
        done = run.begin(P.prompts_frame(study, used_prompts), PAIRS, "pair_id")

    todo = [p for p in pairs if p.pair_id not in done]
    # Chunks are fixed slices of the pairs left (a batch's padding, hence its float rounding,
    # depends on the rows beside it); ranks take whole chunks, so every number is the one a
    # single process computes.
    chunks = [todo[i : i + config.chunk_pairs] for i in range(0, len(todo), config.chunk_pairs)]
    if run is not None:
        chunks = distributed.shard(chunks, len, run.ranks)
    bar = tqdm(
        total=len(done) + sum(map(len, chunks)),
        initial=len(done),
        desc=f"patching {factor}",
        unit="pair",
        disable=not config.progress,
    )
    collected: dict[str, list[pd.DataFrame]] = {PAIRS: [], PATCHED: []}
    t_patch = time.time()
    forwards = resumed = 0
    for chunk in chunks:
        done_chunk = _run_chunk(
            study, lm, chunk, sites, config, by_id, spans, persona_last, readers
        )
        forwards += done_chunk.forwards
        resumed += done_chunk.resumed
        if run is not None:
            run.write_chunk(done_chunk.frames)
        else:
            for name, frame in done_chunk.frames.items():
                collected[name].append(frame)
        bar.update(len(chunk))
    bar.close()
    if run is not None:
        forwards, resumed = map(int, distributed.sum_over_ranks([forwards, resumed]))
        if not run.ranks_done():
            run.wait_for_finish()
            return finished(run.path)
    t_patch = time.time() - t_patch

    if run is not None:
        pairs_df, patched = run.read_chunks(PAIRS), run.read_chunks(PATCHED)
    else:
        pairs_df = pd.concat(collected[PAIRS], ignore_index=True)
        patched = pd.concat(collected[PATCHED], ignore_index=True)
    pairs_df = pairs_df.sort_values("pair_id").reset_index(drop=True)
    patched = patched.sort_values(
        ["pair_id", "direction", "position", "layer", "site_kind"], kind="stable"
    ).reset_index(drop=True)
    value_range = {
        q.id: (max(q.values) - min(q.values)) if q.values is not None else None
        for q in study.questions
    }
    table = summarize(
        patched,
        factor,
        value_range,
        min_effect=config.min_effect,
        n_boot=config.n_boot,
        seed=config.seed,
    )
    manifest = {
        "kind": "patching",
        "study": {"name": study.name, "path": study.path, "definition": dict(study.raw)},
        "factor": factor,
        "config": asdict(config),
        "model": lm.describe(),
        "sites": [s.name for s in sites],
        "conventions": {
            "distribution": "full-vocab float32 softmax at the last prompt token; label variants "
            f"aggregated by {study.scoring.aggregate} in probability space; renormalized over "
            "non-refusal options",
            "pairs": "same question and option order, every other factor equal (nulls "
            "included); clean = the value first in the study's order",
            "denoising": "clean activation into the corrupt prompt",
            "noising": "corrupt activation into the clean prompt",
            "alignment": "before the span same index; after the span shifted by the length "
            "difference; inside the span right-aligned, clamped at the source span's start",
            "span_mean": "target span tokens shifted by (source span mean - target span mean)",
            "normalized_effect": "sum of movement towards the source / max(sum |source - "
            f"target|, n * {config.min_effect} * value range) in expected score",
            "ci": f"95% percentile bootstrap over pairs, {config.n_boot} resamples",
        },
        "factor_effect": factor_effect(pairs_df),
        "counts": {
            "pairs": len(pairs),
            "resumed_pairs": len(done),
            "patched_forwards": forwards,
            "resumed_forwards": resumed,
            "rows": len(patched),
        },
        "timings_s": {"patch": round(t_patch, 3), "total": round(time.time() - t0, 3)},
    }
    result = PatchResult(table, patched, pairs_df, manifest)
    if run is not None:
        run.write_table(PATCHING, table)
        run.write_table(PATCHED, patched)
        run.write_table(PAIRS, pairs_df)
        if len(table):
            fig = heatmap(table)
            fig.savefig(run.path / f"patching_{factor}.png", dpi=110, bbox_inches="tight")
        run.finish(manifest)
        result.out_dir = run.path
    return result


def _run_chunk(
    study: Study,
    lm: LoadedModel,
    chunk: Sequence[Pair],
    sites: Sequence[Site],
    config: PatchConfig,
    prompts: dict[int, P.Prompt],
    spans: dict[int, Span],
    persona_last: dict[int, int],
    readers: dict[int, R.Reader],
) -> _Chunk:
    """Clean forwards of the chunk's prompts (once each), then every patched forward."""
    names = [s.name for s in sites]
    agg = study.scoring.aggregate
    pids = sorted(
        {i for p in chunk for i in (p.clean, p.corrupt)}, key=lambda i: -len(prompts[i].input_ids)
    )
    n_layers = int(lm.model.config.get_text_config().num_hidden_layers)
    why_not = RF.resumable(lm.model, max(len(prompts[i].input_ids) for i in pids))
    acts: dict[int, dict[str, Tensor]] = {}
    clean: dict[int, Tensor] = {}
    states: dict[int, RF.CleanState] = {}
    for b in range(0, len(pids), config.batch_size):
        ids = pids[b : b + config.batch_size]
        lp, rec, st = RF.clean_forward(
            lm, [prompts[i].input_ids for i in ids], names, states=why_not is None
        )
        for k, i in enumerate(ids):
            n = len(prompts[i].input_ids)
            acts[i] = {name: rec[name][k, :n].cpu() for name in names}
            clean[i] = R.distributions(lp[k : k + 1], [readers[i]], agg)[0]
            if st:
                states[i] = st[k]

    plans = [
        pl
        for pair in chunk
        for pl in _plans(pair, config.directions, config.positions, prompts, spans, persona_last)
    ]
    rows = [(pl, s, None if why_not else RF.start(s, n_layers)) for pl in plans for s in sites]
    # Rows that resume at one block share a batch (full forwards: start -1); rows of similar
    # width and edit size share a batch (less padding, smaller edits).
    rows.sort(
        key=lambda r: (
            _start_layer(r),
            len(r[0].tpos),
            len(prompts[r[0].target].input_ids) - (min(r[0].tpos) if r[2] else 0),
        )
    )
    records: list[dict[str, Any]] = []
    resumed = 0
    batches = [
        (layer, grp[i : i + config.batch_size])
        for layer, grp in ((g, list(rs)) for g, rs in groupby(rows, key=_start_layer))
        for i in range(0, len(grp), config.batch_size)
    ]
    for layer, group in batches:
        batch = [(pl, s) for pl, s, _ in group]
        hooked = [st[1] if st else s.name for _, s, st in group]
        k = max(len(pl.tpos) for pl, _ in batch)
        d = next(iter(acts[batch[0][0].target].values())).shape[-1]
        edits: dict[str, Edit] = {}
        for site in set(hooked):
            pos = torch.full((len(batch), k), -1, dtype=torch.long)
            val = torch.zeros(len(batch), k, d)
            for r, (pl, s) in enumerate(batch):
                if hooked[r] == site:
                    pos[r, : len(pl.tpos)] = torch.tensor(pl.tpos)
                    val[r, : len(pl.tpos)] = _values(
                        pl, acts[pl.source][s.name], acts[pl.target][s.name]
                    )
            edits[site] = Edit(pos, val, "replace")
        targets = [pl.target for pl, _ in batch]
        if layer >= 0:
            starts = [min(pl.tpos) for pl, _ in batch]
            lp = RF.resumed_logprobs(lm, [states[t] for t in targets], layer, starts, edits)
            resumed += len(batch)
        else:
            with edit_sites(lm, edits):
                lp = answer_logprobs(lm, [prompts[t].input_ids for t in targets])
        probs = R.distributions(lp, [readers[pl.target] for pl, _ in batch], agg)
        for r, (pl, s) in enumerate(batch):
            reader = readers[pl.target]
            q_s, q_t, q_p = clean[pl.source], clean[pl.target], probs[r]
            records.append(
                {
                    "pair_id": pl.pair_id,
                    "question_id": prompts[pl.target].question_id,
                    "direction": pl.direction,
                    "position": pl.position,
                    "site": s.name,
                    "site_kind": s.kind,
                    "layer": s.layer,
                    "source_score": R.score(q_s, reader),
                    "target_score": R.score(q_t, reader),
                    "patched_score": R.score(q_p, reader),
                    "tv_source_target": 0.5 * float((q_s - q_t).abs().sum()),
                    "tv_source": 0.5 * float((q_p - q_s).abs().sum()),
                    "tv_target": 0.5 * float((q_p - q_t).abs().sum()),
                }
            )
    pair_rows = []
    for p in chunk:
        qc, qk = clean[p.clean], clean[p.corrupt]
        sc, sk = spans.get(p.clean), spans.get(p.corrupt)
        pair_rows.append(
            {
                **asdict(p),
                "clean_score": R.score(qc, readers[p.clean]),
                "corrupt_score": R.score(qk, readers[p.corrupt]),
                "tv_clean_corrupt": 0.5 * float((qc - qk).abs().sum()),
                "clean_span_tokens": sc.token_end - sc.token_start if sc else None,
                "corrupt_span_tokens": sk.token_end - sk.token_start if sk else None,
            }
        )
    frames = {PAIRS: pd.DataFrame(pair_rows), PATCHED: pd.DataFrame(records)}
    return _Chunk(frames, len(pids) + len(rows), resumed)


class _Chunk(NamedTuple):
    frames: dict[str, pd.DataFrame]
    forwards: int
    """Clean forwards plus patched rows."""
    resumed: int
    """Patched rows that resumed at their site's block (the rest ran full forwards)."""


def _start_layer(row: tuple[_Plan, Site, tuple[int, str] | None]) -> int:
    """The block a patched row resumes at; -1 for a full forward."""
    return row[2][0] if row[2] is not None else -1
