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

Run folder: one chunk per `chunk_units` pairs (AtP) or prompts (IG), fixed slices of the units
left. Under a launcher (`workbench.distributed`) ranks take whole chunks; rank 0 merges them
and bootstraps, every rank then re-patches the top-k cells (each a sharded patching run under
`repatch/`), and rank 0 writes the manifest last. `cost` sums every rank's seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from workbench import distributed
from workbench.engine.models import LoadedModel
from workbench.interp import gradients as G
from workbench.interp.atp import ATP_COLUMNS, atp_batch
from workbench.interp.attribution_plan import METHODS, AttributionConfig, Context, prepare
from workbench.interp.attribution_tables import (
    CELL,
    agreement,
    incomplete,
    summarize_atp,
    summarize_ig,
    top_cells,
)
from workbench.interp.patching import PatchConfig, patch_factor
from workbench.runs import MANIFEST, RunFolder
from workbench.study import prompts as P
from workbench.study.spec import Study

__all__ = ["METHODS", "AttributionConfig", "AttributionResult", "attribute", "finished"]
ATTRIBUTION = "attribution"
"""`attribution.parquet`: one row per question x factor (or span) x site x position x
direction / baseline x metric x statistic."""
ATTRIBUTED = "attributed"
"""`attributed.parquet`: the raw estimates (AtP: pair x direction x position x site; IG:
prompt x baseline x span)."""
REPATCHED = "repatched"
AGREEMENT = "agreement"


@dataclass
class AttributionResult:
    """The tables of an attribution run (columns in the module docstrings)."""

    attribution: pd.DataFrame
    attributed: pd.DataFrame
    repatched: pd.DataFrame
    agreement: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


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
    ctx = prepare(study, lm, method, config, factors)
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
        used = [ctx.prompts[i] for i in sorted(ctx.readers)]
        done = run.begin(P.prompts_frame(study, used), ATTRIBUTED, "unit")

    n_units = len(ctx.pairs) + len(ctx.targets)
    todo = [u for u in range(n_units) if u not in done]
    # fixed chunks of the units left; ranks take whole chunks (a batch's rows share padding)
    chunks = [todo[i : i + config.chunk_units] for i in range(0, len(todo), config.chunk_units)]
    if run is not None:
        chunks = distributed.shard(chunks, len, run.ranks)
    mine = sum(map(len, chunks))
    bar = tqdm(total=len(done) + mine, initial=len(done), desc=method, disable=not config.progress)
    frames: list[pd.DataFrame] = []
    cost = {"seconds": 0.0, "plain_seconds": 0.0, "plain_rows": 0.0}
    t_run = time.time()
    for chunk in chunks:
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
    repatch = method == "atp" and config.top_k > 0
    if run is not None:
        cost = dict(zip(cost, distributed.sum_over_ranks(list(cost.values())), strict=True))
        if not run.ranks_done():
            if repatch:
                # every rank re-patches the top cells (each patching run is sharded in turn);
                # rank 0 alone bootstraps, the others read which cells from its table
                distributed.barrier()
                top = pd.read_parquet(run.path / f"{ATTRIBUTION}.parquet")
                _validate_atp(study, lm, ctx, config, top, run)
            run.wait_for_finish()
            return finished(run.path)
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
    if run is not None and run.ranks.active and repatch:
        run.write_table(ATTRIBUTION, table)
        distributed.barrier()
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
        # summed over ranks: seconds of compute per pair, whatever the world size
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


def finished(path: str | Path) -> AttributionResult:
    """A finished run folder's tables (what the ranks other than 0 return)."""
    path = Path(path)

    def read(name: str) -> pd.DataFrame:
        return pd.read_parquet(path / f"{name}.parquet")

    manifest = json.loads((path / MANIFEST).read_text())
    return AttributionResult(
        read(ATTRIBUTION), read(ATTRIBUTED), read(REPATCHED), read(AGREEMENT), manifest, path
    )


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
    ctx: Context,
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
    ctx: Context,
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
    lm: LoadedModel, ctx: Context, config: AttributionConfig, chunk: Sequence[int], agg: str
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
