"""Gradient attributions of the answer distribution: attribution patching (AtP) and integrated
gradients (IG), with the conventions below (also written to the manifest).

**Metric**: a differentiable function of one prompt's answer distribution read with the
workbench's measurement contract (full-vocab float32 softmax at the last prompt token, label
variants aggregated, renormalized over the non-refusal options; `workbench.interp.gradients`):
`expected_score` (default; questions with ordinal values), `log_odds` of two options (default
the first and the last), or `kl` (AtP only): KL(source ‖ p) in bits.

**AtP** (`method="atp"`): for each counterfactual pair of `workbench.interp.pairs`, each
direction (`denoising`: the clean prompt is the source, the corrupt one the target; `noising`
the reverse), each site and position of the patching grid, the first-order estimate of what
real patching (`workbench.interp.patching`) would do to the target's metric:

    estimate = sum over patched tokens t of (v_t - a_t) . d metric / d a_t   (at the target)

where a is the target's activation and v the value patching writes there: the source's
aligned token (`span_last`, `answer`, `persona_last`, `all` with `pairs.align`) or, for
`span_mean`, a_t shifted by (source span mean - target span mean). One forward and one
backward per prompt give every site and position at once (with `kl`, one per pair and
direction, as the gradient depends on the source). Sign: `estimate` is metric(patched) -
metric(target); it is oriented by the sign of metric(source) - metric(target) into `moved`,
and summarized like patching: `normalized_effect` = sum moved / max(sum |metric(source) -
metric(target)|, n * floor) (floor = `min_effect` x the value range for `expected_score`,
`min_effect` otherwise), `change` = mean moved. AtP is a screen, weak where the metric is far
from linear (the residual stream): its `top_k` cells are re-patched for real
(`repatched.parquet`), and its agreement with patching runs given in `patching` (Spearman of
the normalized effects over the shared cells, top-k overlap) is `agreement.parquet`.

**IG** (`method="ig"`): integrated gradients of the metric over the embedding layer's output
(`hook_embed`), `n_steps` nodes of `integration` (captum's rules; default Gauss-Legendre).
Baselines, recorded in the `baseline` column: `zero` (the zero vector) and `pad` (the pad
token's embedding) at every token but the special ones (BOS is kept: it carries no persona);
`counterfactual`, per factor, the same prompt with the factor's span holding each of its other
values (rendered by the study; values of another token length cannot align and are left out),
attributions averaged over those values. Aggregation: attributions summed over the embedding
dimensions, then over each factor's token span (`factor_spans`, the occurrence nearest the
answer) and over `rest` (every other token; zero and pad baselines only: a counterfactual
baseline equals the input outside the span). Per prompt: `share` = |span| / sum of |spans| of
that baseline. Completeness: per IG run, sum of attributions - (metric(input) -
metric(baseline)) (averaged over a counterfactual's values) is `completeness_error`, reported
beside `metric_difference`. On pre-norm models a zero baseline crosses the region where RMSNorm
rescales a near-zero residual, which takes many steps to integrate: read the error first.

Intervals: 95% percentile bootstrap over pairs (AtP) or prompts (IG), `n_boot` resamples.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from workbench.engine.models import LoadedModel
from workbench.errors import StudyError, WorkbenchError
from workbench.interp import gradients as G
from workbench.interp.atp import ATP_COLUMNS, atp_batch
from workbench.interp.attribution_tables import (
    CELL,
    agreement,
    incomplete,
    summarize_atp,
    summarize_ig,
    top_cells,
)
from workbench.interp.pairs import Pair, factor_pairs, persona_last_tokens
from workbench.interp.patch_tables import POSITIONS
from workbench.interp.patching import DIRECTIONS, PatchConfig, _Reader, _reader, patch_factor
from workbench.interp.sites import Site, _hf_modules, resolve_sites
from workbench.runs import PROMPTS, RunFolder
from workbench.study import prompts as P
from workbench.study.spans import Span, factor_spans
from workbench.study.spec import Study

METHODS = ("atp", "ig")
ATTRIBUTION = "attribution"
"""`attribution.parquet`: one row per question x factor (or span) x site x position x
direction / baseline x metric x statistic."""
ATTRIBUTED = "attributed"
"""`attributed.parquet`: the raw estimates (AtP: pair x direction x position x site; IG:
prompt x baseline x span)."""
REPATCHED = "repatched"
AGREEMENT = "agreement"


@dataclass(frozen=True)
class AttributionConfig:
    """Settings of an attribution run (written to the manifest)."""

    metric: str = "expected_score"
    """expected_score | log_odds | kl (AtP only)."""
    options: tuple[str, str] | None = None
    """log_odds: the two option texts (default: the first and the last substantive option)."""
    questions: tuple[str, ...] | None = None
    """Question ids (None: every question the metric fits)."""
    sites: tuple[str, ...] = PatchConfig.sites
    """AtP: TransformerLens site names or globs (the patching grid's)."""
    positions: tuple[str, ...] = PatchConfig.positions
    directions: tuple[str, ...] = DIRECTIONS
    max_pairs: int | None = None
    """AtP: at most this many pairs per factor, drawn like patching's (same pairs)."""
    min_effect: float = 0.05
    top_k: int = 5
    """AtP: cells per question and factor re-patched for real (0: none)."""
    patching: tuple[str, ...] = ()
    """AtP: folders of patching runs to report agreement with."""
    baselines: tuple[str, ...] = ("counterfactual", "zero")
    n_steps: int = 50
    integration: str = "gausslegendre"
    max_prompts: int | None = None
    """IG: at most this many prompts, drawn uniformly with `seed`."""
    seed: int = 0
    n_boot: int = 1000
    batch_size: int = 64
    """Rows per forward (AtP: prompts; IG: interpolation steps)."""
    chunk_units: int = 32
    """Pairs (AtP) or prompts (IG) per chunk written to disk."""
    measure_cost: bool = True
    """AtP: time a plain forward of every batch too (cost in forward-equivalents)."""
    progress: bool = True


@dataclass
class AttributionResult:
    """The tables of an attribution run (columns in the module docstrings)."""

    attribution: pd.DataFrame
    attributed: pd.DataFrame
    repatched: pd.DataFrame
    agreement: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


@dataclass
class _Context:
    """Everything checked before the first forward pass."""

    method: str
    prompts: dict[int, P.Prompt]
    questions: tuple[str, ...]
    factors: list[str]
    pairs: list[tuple[str, Pair]]
    """AtP's units: (factor, pair)."""
    targets: list[P.Prompt]
    """IG's units: prompts."""
    sites: list[Site]
    readers: dict[int, _Reader]
    spans: dict[int, list[Span]]
    options: dict[str, tuple[int, int]]
    persona_last: dict[int, int] = field(default_factory=dict)
    counterfactual: dict[tuple[int, str], list[tuple[int, ...]]] = field(default_factory=dict)


def _bad(message: str, fix: str) -> WorkbenchError:
    return WorkbenchError(message, fix=fix)


def _check_config(study: Study, config: AttributionConfig, method: str) -> None:
    if method not in METHODS:
        raise _bad(f"unknown method {method!r}", f"use one of: {', '.join(METHODS)}")
    if config.metric not in G.METRICS or (method == "ig" and config.metric == "kl"):
        ok = G.METRICS if method == "atp" else G.METRICS[:2]
        raise _bad(f"metric {config.metric!r} is not offered for {method}", f"use {', '.join(ok)}")
    for name in ("batch_size", "chunk_units", "n_boot"):
        if getattr(config, name) < 1:
            raise _bad(f"{name} must be at least 1", "pass a positive number")
    for name in ("max_pairs", "max_prompts"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise _bad(f"{name} must be at least 1", "pass a positive number (or none: all)")
    if config.top_k < 0:
        raise _bad("top_k must be 0 or more", "pass 0 to re-patch nothing")
    if study.scoring.method != "next_token":
        raise StudyError(
            study.path,
            "scoring.method",
            "attribution reads the next-token answer distribution; this study scores sequences",
            "use `scoring.method: next_token` with single-token labels",
        )
    if method == "ig":
        bad = [b for b in config.baselines if b not in G.BASELINES]
        if bad or not config.baselines:
            raise _bad(
                f"unknown baseline {bad[0] if bad else '(none given)'!r}",
                f"use one or more of: {', '.join(G.BASELINES)}",
            )
        try:
            G.quadrature(config.integration, config.n_steps)
        except WorkbenchError as err:
            raise _bad(err.message, err.fix) from err
    else:
        bad = [p for p in config.positions if p not in POSITIONS]
        if bad or not config.positions:
            raise _bad(
                f"unknown position {bad[0] if bad else '(none given)'!r}",
                f"use one or more of: {', '.join(POSITIONS)}",
            )
        bad = [d for d in config.directions if d not in DIRECTIONS]
        if bad or not config.directions:
            raise _bad(
                f"unknown direction {bad[0] if bad else '(none given)'!r}",
                f"use one or both of: {', '.join(DIRECTIONS)}",
            )
        for folder in config.patching:
            if not (Path(folder) / "patching.parquet").exists():
                raise _bad(
                    f"{folder} is not a finished patching run (no patching.parquet)",
                    "pass the --out folder of a finished `workbench patch` run",
                )


def _questions(study: Study, config: AttributionConfig) -> tuple[tuple[str, ...], dict]:
    """The questions the metric fits, and log_odds' option indices per question."""
    qids = [q.id for q in study.questions]
    for qid in config.questions or ():
        if qid not in qids:
            raise _bad(f"unknown question {qid!r}", f"use one of: {', '.join(qids)}")
    chosen, options = [], {}
    for q in study.questions:
        if config.questions is not None and q.id not in config.questions:
            continue
        if config.metric == "expected_score" and q.values is None:
            if config.questions is not None:
                raise _bad(
                    f"question {q.id!r} has no ordinal values: no expected score",
                    "use --metric log_odds (or kl for atp), or give the question `values`",
                )
            continue
        pair = (0, len(q.options) - 1)
        if config.options is not None:
            missing = [o for o in config.options if o not in q.options]
            if missing:
                raise _bad(
                    f"option {missing[0]!r} is not a substantive option of {q.id!r}",
                    f"use two of: {', '.join(q.options)}",
                )
            pair = (q.options.index(config.options[0]), q.options.index(config.options[1]))
        chosen.append(q.id)
        options[q.id] = pair
    if not chosen:
        raise _bad(
            f"no question fits the metric {config.metric!r}",
            "use --metric log_odds, or a question with ordinal `values`",
        )
    return tuple(chosen), options


def _prepare(
    study: Study,
    lm: LoadedModel,
    method: str,
    config: AttributionConfig,
    factors: Sequence[str] | None,
) -> _Context:
    """Check every input and plan the run; raises before any forward pass."""
    import random

    _check_config(study, config, method)
    questions, options = _questions(study, config)
    names = [f.name for f in study.factors]
    for f in factors or ():
        if f not in names:
            raise StudyError(
                study.path,
                "factors",
                f"factor {f!r} is not in the study",
                f"use {', '.join(names)}",
            )
    rendered = P.render(study, lm.tokenizer)
    P.validate_for_tokenizer(study, rendered, lm.tokenizer, lm.max_length)
    by_id = {p.prompt_id: p for p in rendered}
    sites: list[Site] = []
    units: list[tuple[str, Pair]] = []
    targets: list[P.Prompt] = []
    if method == "atp":
        n_layers = int(lm.model.config.get_text_config().num_hidden_layers)
        try:
            sites = resolve_sites(config.sites, n_layers)
            _hf_modules(lm.model, sites)
        except WorkbenchError as err:
            raise _bad(f"attribution patching sites: {err.message}", err.fix) from err
        wanted = list(factors) if factors else names
        for f in wanted:
            try:
                pairs = factor_pairs(
                    study,
                    rendered,
                    f,
                    questions=questions,
                    max_pairs=config.max_pairs,
                    seed=config.seed,
                )
            except StudyError:
                if factors:
                    raise
                continue  # factors=None: every factor the design varies alone
            units += [(f, pr) for pr in pairs]
        if not units:
            raise _bad("no factor has counterfactual pairs", "pass factors the design varies alone")
        factor_list = list(dict.fromkeys(f for f, _ in units))
        used = sorted({i for _, pr in units for i in (pr.clean, pr.corrupt)})
    else:
        factor_list = list(factors) if factors else names
        if "counterfactual" in config.baselines:
            one = [f for f in factor_list if len(study.factor(f).values) < 2]
            if one:
                raise _bad(
                    f"factor {one[0]!r} has one value: no counterfactual baseline",
                    "leave it out of --factor, or use --baseline zero",
                )
        if "pad" in config.baselines and lm.tokenizer.pad_token_id is None:
            raise _bad("the tokenizer has no pad token", "use --baseline zero or counterfactual")
        targets = [p for p in rendered if p.question_id in questions]
        if config.max_prompts is not None and len(targets) > config.max_prompts:
            keep = random.Random(config.seed).sample(range(len(targets)), config.max_prompts)
            targets = [targets[i] for i in sorted(keep)]
        used = [p.prompt_id for p in targets]
    try:
        spans = factor_spans(study, rendered, lm.tokenizer, factor_list)
    except WorkbenchError as err:
        raise _bad(err.message, err.fix) from err
    ctx = _Context(
        method,
        by_id,
        questions,
        factor_list,
        units,
        targets,
        sites,
        {i: _reader(study, lm, by_id[i]) for i in used},
        {i: spans[i] for i in used},
        options,
    )
    if method == "atp" and "persona_last" in config.positions:
        ctx.persona_last = persona_last_tokens(study, [by_id[i] for i in used], lm.tokenizer)
    if method == "ig" and "counterfactual" in config.baselines:
        ctx.counterfactual = G.counterfactual_ids(study, targets, factor_list, lm.tokenizer)
    return ctx


def attribute(
    study: Study,
    lm: LoadedModel,
    method: str,
    out_dir: str | Path | None = None,
    config: AttributionConfig | None = None,
    factors: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
) -> AttributionResult:
    """Attribute the answer to sites x positions (`atp`) or to factor spans (`ig`).

    `factors` None: every factor (AtP: every factor the design varies alone). Writes a run
    folder when `out_dir` is given; re-running the same call resumes it (finished chunks are
    not recomputed). Bad input raises `WorkbenchError` (with its fix) before any forward
    pass.
    """
    from tqdm.auto import tqdm

    config = config or AttributionConfig()
    t0 = time.time()
    ctx = _prepare(study, lm, method, config, factors)
    run: RunFolder | None = None
    done: set[int] = set()
    if out_dir is not None:
        units: list[Any] = [[f, pr.clean, pr.corrupt] for f, pr in ctx.pairs]
        units += [p.prompt_id for p in ctx.targets]
        identity = {
            "kind": "attribution",
            "method": method,
            "study": study.name,
            "prompts_fingerprint": P.prompts_fingerprint(list(ctx.prompts.values())),
            "model": lm.name,
            "dtype": str(lm.dtype),
            "units": units,
            "config": {k: v for k, v in asdict(config).items() if k not in _NOT_IDENTITY},
        }
        run = RunFolder(out_dir, identity, overwrite=overwrite)
        if not (run.path / PROMPTS).exists():
            used = [ctx.prompts[i] for i in sorted(ctx.readers)]
            run.write_table("prompts", P.prompts_frame(study, used))
        done = run.done_keys(ATTRIBUTED, "unit") if run.chunk_dirs() else set()

    n_units = len(ctx.pairs) + len(ctx.targets)
    todo = [u for u in range(n_units) if u not in done]
    bar = tqdm(total=n_units, initial=len(done), desc=method, disable=not config.progress)
    frames: list[pd.DataFrame] = []
    cost = {"seconds": 0.0, "plain_seconds": 0.0, "plain_rows": 0}
    t_run = time.time()
    for start in range(0, len(todo), config.chunk_units):
        chunk = todo[start : start + config.chunk_units]
        if method == "atp":
            frame = _atp_chunk(study, lm, ctx, config, chunk, cost)
        else:
            frame = _ig_chunk(lm, ctx, config, chunk, study.scoring.aggregate)
        if run is not None:
            run.write_chunk({ATTRIBUTED: frame})
        else:
            frames.append(frame)
        bar.update(len(chunk))
    bar.close()
    t_run = time.time() - t_run
    raw = run.read_chunks(ATTRIBUTED) if run is not None else pd.concat(frames, ignore_index=True)
    raw = (
        raw if len(raw) else pd.DataFrame(columns=ATP_COLUMNS if method == "atp" else G.IG_COLUMNS)
    )
    raw = raw.sort_values("unit", kind="stable").reset_index(drop=True)

    value_range = {
        q.id: (max(q.values) - min(q.values)) if q.values is not None else None
        for q in study.questions
    }
    if method == "atp":
        table = summarize_atp(
            raw, value_range, min_effect=config.min_effect, n_boot=config.n_boot, seed=config.seed
        )
    else:
        table = summarize_ig(raw, n_boot=config.n_boot, seed=config.seed)
    repatched, agree = _validate_atp(study, lm, ctx, config, table, run)
    manifest = {
        "kind": "attribution",
        "method": method,
        "study": {"name": study.name, "path": study.path, "definition": dict(study.raw)},
        "factors": ctx.factors,
        "questions": list(ctx.questions),
        "config": asdict(config),
        "model": lm.describe(),
        "sites": [s.name for s in ctx.sites],
        "conventions": _conventions(study, method, config),
        "counts": {"units": n_units, "resumed_units": len(done), "rows": len(raw)},
        "timings_s": {"attribute": round(t_run, 3), "total": round(time.time() - t0, 3)},
    }
    if method == "atp" and cost["plain_rows"] and len(todo):
        per_forward = cost["plain_seconds"] / cost["plain_rows"]
        manifest["cost"] = {
            "seconds_per_pair": cost["seconds"] / len(todo),
            "seconds_per_forward": per_forward,
            "forward_equivalents_per_pair": cost["seconds"] / len(todo) / per_forward,
        }
    if method == "ig":
        manifest["incomplete"] = incomplete(table)  # mean |error| > 5% of the difference
        manifest["counterfactual_values"] = {
            f: int(sum(len(v) for (_, g), v in ctx.counterfactual.items() if g == f))
            for f in ctx.factors
        }
    result = AttributionResult(table, raw, repatched, agree, manifest)
    if run is not None:
        run.write_table(ATTRIBUTION, table)
        run.write_table(ATTRIBUTED, raw)
        run.write_table(REPATCHED, repatched)
        run.write_table(AGREEMENT, agree)
        run.finish(manifest)
        result.out_dir = run.path
    return result


_NOT_IDENTITY = frozenset(
    ["n_boot", "batch_size", "chunk_units", "measure_cost", "progress", "top_k", "patching"]
)
"""Settings that change no raw estimate: a resumed run may differ in them."""


def _conventions(study: Study, method: str, config: AttributionConfig) -> dict[str, str]:
    out = {
        "distribution": "full-vocab float32 softmax at the last prompt token; label variants "
        f"aggregated by {study.scoring.aggregate}; renormalized over non-refusal options",
        "metric": config.metric,
        "ci": f"95% percentile bootstrap, {config.n_boot} resamples",
    }
    if method == "atp":
        out["estimate"] = "sum over patched tokens of (patched value - target activation) . "
        out["estimate"] += "gradient of the metric at the target; oriented towards the source"
        out["normalized_effect"] = "sum moved / max(sum |source - target|, n * floor)"
    else:
        out["ig"] = f"{config.n_steps} steps, {config.integration}, over hook_embed; summed "
        out["ig"] += "over d_model then spans; zero and pad baselines keep special tokens"
    return out


def _atp_chunk(
    study: Study,
    lm: LoadedModel,
    ctx: _Context,
    config: AttributionConfig,
    chunk: Sequence[int],
    cost: dict[str, float],
) -> pd.DataFrame:
    """AtP rows of the chunk's pairs, `batch_size` prompts per forward; with `measure_cost`
    a plain forward of each batch's prompts is timed too."""
    records: list[dict[str, Any]] = []
    step = max(1, config.batch_size // 2)
    for b in range(0, len(chunk), step):
        units = [(u, *ctx.pairs[u]) for u in chunk[b : b + step]]
        tic = time.time()
        records += atp_batch(
            lm,
            units,
            ctx.sites,
            ctx.prompts,
            ctx.readers,
            ctx.spans,
            ctx.persona_last,
            ctx.options,
            metric=config.metric,
            aggregate=study.scoring.aggregate,
            directions=config.directions,
            positions=config.positions,
        )
        cost["seconds"] += time.time() - tic
        if config.measure_cost:
            pids = sorted({i for *_, pr in units for i in (pr.clean, pr.corrupt)})
            ids = [ctx.prompts[i].input_ids for i in pids]
            tic = time.time()
            with torch.inference_mode():
                G.forward_logprobs(lm, input_ids=G.padded(ids, 0), lengths=[len(r) for r in ids])
            cost["plain_seconds"] += time.time() - tic
            cost["plain_rows"] += len(ids)
    return pd.DataFrame(records, columns=ATP_COLUMNS)


def _validate_atp(
    study: Study,
    lm: LoadedModel,
    ctx: _Context,
    config: AttributionConfig,
    table: pd.DataFrame,
    run: RunFolder | None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Re-patch AtP's top-k cells for real; agreement with them and with `config.patching`."""
    if ctx.method != "atp":
        return pd.DataFrame(), pd.DataFrame()
    agree = [agreement(table, pd.read_parquet(Path(d) / "patching.parquet"), config.top_k, str(d))
             for d in config.patching]  # fmt: skip
    if config.top_k == 0:
        return pd.DataFrame(), pd.concat(agree, ignore_index=True) if agree else pd.DataFrame()
    top = top_cells(table, config.top_k)
    real = []
    for (factor, position), grp in top.groupby(["factor", "position"], sort=True):
        patch_config = PatchConfig(
            sites=tuple(dict.fromkeys(grp["site"])),
            positions=(str(position),),
            directions=tuple(dict.fromkeys(grp["direction"])),
            questions=ctx.questions,
            max_pairs=config.max_pairs,
            seed=config.seed,
            min_effect=config.min_effect,
            n_boot=config.n_boot,
            batch_size=config.batch_size,
            progress=config.progress,
        )
        out = None if run is None else run.path / "repatch" / f"{factor}-{position}"
        real.append(patch_factor(study, lm, str(factor), out, patch_config).patching)
    patched = pd.concat(real, ignore_index=True)
    patched = patched[patched["metric"] == "normalized_effect"]
    cols = {"effect": "patching", "ci_low": "patching_ci_low", "ci_high": "patching_ci_high"}
    merged = top.rename(columns={"score": "atp", "ci_low": "atp_ci_low", "ci_high": "atp_ci_high"})
    merged = merged.merge(patched.rename(columns=cols)[[*CELL, *cols.values()]], on=CELL)
    merged = merged.drop(columns=["method", "baseline", "statistic"])
    agree.append(agreement(table, patched, config.top_k, "repatched top-k"))
    return merged, pd.concat(agree, ignore_index=True)


# --------------------------------------------------------------------------------------------
# integrated gradients


def _ig_chunk(
    lm: LoadedModel, ctx: _Context, config: AttributionConfig, chunk: Sequence[int], agg: str
) -> pd.DataFrame:
    records: list[dict[str, Any]] = []
    for u in chunk:
        p = ctx.targets[u]
        metric = G.metric_fn(
            config.metric, ctx.readers[p.prompt_id], agg, options=ctx.options[p.question_id]
        )
        alternatives = {f: ctx.counterfactual.get((p.prompt_id, f), []) for f in ctx.factors}
        rows = G.ig_rows(
            lm,
            p,
            metric,
            config.baselines,
            ctx.spans[p.prompt_id],
            alternatives,
            n_steps=config.n_steps,
            method=config.integration,
            batch_size=config.batch_size,
        )
        records += [{"unit": u, **r, "metric": config.metric} for r in rows]
    return pd.DataFrame(records, columns=G.IG_COLUMNS)
