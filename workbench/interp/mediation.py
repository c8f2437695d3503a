"""Mediation: how much of a factor's behavioural effect goes through its probe's subspace.

`mediate(study, lm, probe_run, MediateConfig(factor="actor", site=...))` removes the factor
probe's subspace (`workbench.interp.directions.subspace`: its centred class directions,
orthonormalized; C - 1 dimensions for C classes) from the activation at `site` at the chosen
positions, and measures the factor's effect before and after, beside random subspaces of the
same dimension (`n_random` seeds):

- `project`: h <- h - Q Q^T h (the component in the subspace set to zero);
- `mean_ablate`: h <- h - Q Q^T (h - mu), mu the mean unedited activation at the site over
  the same positions of the run's prompts (the component set to its mean).

The edit is applied as an `add` edit of the computed delta (the unedited activation at the
site is recorded first; nothing upstream of the site changes, so it is the activation the
edited forward sees).

The factor's effect (pairs of prompts that differ in the factor alone,
`workbench.interp.pairs`; both prompts of a pair get the same edit):

- `mean_tv`: mean over pairs of the TV between the two answer distributions;
- `amce`: per level v other than the baseline (the factor's first value), the mean over pairs
  (baseline, v) of score(v) - score(baseline), the AMCE on the expected score; the effect is
  the mean of |AMCE_v| over levels (questions with ordinal values only).

`share_mediated` = 1 - effect_after / effect_before, with a 95% percentile bootstrap interval
over pairs (random subspaces: effect_after averaged over seeds within each resample).
`mediation.parquet` (factor, site, positions, question_id, method, subspace, n_dims, effect,
effect_before, effect_after, share_mediated, ci_low, ci_high, n); `ablated.parquet` holds
each prompt's reading per method x subspace. Run folder: one chunk per method x subspace;
manifest last. Under a launcher (`workbench.distributed`) every rank runs the unedited
forwards (the mean and the recorded activations) and takes whole ablations; rank 0 merges,
bootstraps and writes the manifest.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from workbench import distributed
from workbench.engine.models import LoadedModel
from workbench.errors import StudyError, WorkbenchError
from workbench.interp import directions as DR
from workbench.interp import intervene as IV
from workbench.interp.hooks import Edit, site
from workbench.interp.pairs import Pair, pair_prompts
from workbench.interp.readers import readers_for
from workbench.runs import MANIFEST, RunFolder
from workbench.study import prompts as P
from workbench.study.spec import Study

MEDIATION = "mediation"
"""`mediation.parquet`: one row per question x method x subspace kind x effect."""
ABLATED = "ablated"
"""`ablated.parquet`: one row per method x subspace x prompt."""
METHODS = ("project", "mean_ablate")
MEDIATION_COLUMNS = (
    "factor",
    "site",
    "positions",
    "question_id",
    "method",
    "subspace",
    "n_dims",
    "effect",
    "effect_before",
    "effect_after",
    "share_mediated",
    "ci_low",
    "ci_high",
    "n",
)


@dataclass(frozen=True)
class MediateConfig:
    """Settings of a mediation run (written to the manifest)."""

    factor: str
    site: str
    positions: Literal["span", "answer", "all"] = "all"
    probe_position: str | None = None
    """The probe's position label; None: the stored one closest to `positions`."""
    methods: tuple[str, ...] = METHODS
    direction: DR.DirectionKind = "pattern"
    n_random: int = 3
    questions: tuple[str, ...] | None = None
    max_pairs: int | None = 256
    seed: int = 0
    n_boot: int = 1000
    batch_size: int = 32
    progress: bool = True


@dataclass
class MediateResult:
    mediation: pd.DataFrame
    ablated: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


def _check(study: Study, lm: LoadedModel, config: MediateConfig) -> None:
    IV.check_positions(config.positions)
    bad = [m for m in config.methods if m not in METHODS]
    if bad or not config.methods:
        raise WorkbenchError(
            f"unknown method {bad[0] if bad else '(none)'!r}", fix=f"use {', '.join(METHODS)}"
        )
    if study.scoring.method != "next_token":
        raise StudyError(
            study.path,
            "scoring.method",
            "mediation reads the next-token answer distribution; this study scores sequences",
            "use `scoring.method: next_token` with single-token labels",
        )
    site(config.site, int(lm.model.config.get_text_config().num_hidden_layers))


def mediate(
    study: Study,
    lm: LoadedModel,
    directions: str | Path | DR.ProbeRun,
    config: MediateConfig,
    out_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
) -> MediateResult:
    """Ablate `config.factor`'s probe subspace (and random ones) at `config.site`; measure the
    share of the factor's effect that disappears. Resumable when `out_dir` is given."""
    from tqdm.auto import tqdm

    t0 = time.time()
    _check(study, lm, config)
    run = directions if isinstance(directions, DR.ProbeRun) else DR.ProbeRun.open(directions)
    key = run.resolve(config.factor, config.site, config.probe_position, config.positions)
    X, _ = run.rows(key)
    logistic = run.kind(key) == "logistic"
    Q = DR.subspace(run.matrix(key, "stored"), X, config.direction, logistic)
    k = Q.shape[1]
    subspaces = [("probe", -1, Q)] + [
        ("random", config.seed + i, DR.random_subspace(Q.shape[0], k, config.seed + i))
        for i in range(config.n_random)
    ]
    found = pair_prompts(
        study,
        lm.tokenizer,
        config.factor,
        questions=config.questions,
        max_pairs=config.max_pairs,
        seed=config.seed,
        spans=config.positions == "span",
    )
    pairs = found.pairs
    if config.positions == "span":
        pairs = [p for p in pairs if p.clean in found.spans and p.corrupt in found.spans]
    prompts = sorted(
        (found.prompts[i] for i in {j for p in pairs for j in (p.clean, p.corrupt)}),
        key=lambda p: -len(p.input_ids),
    )
    P.validate_for_tokenizer(study, prompts, lm.tokenizer, lm.max_length)
    readers = readers_for(study, lm, prompts)
    agg = study.scoring.aggregate
    batches = [
        prompts[i : i + config.batch_size] for i in range(0, len(prompts), config.batch_size)
    ]
    pos = {
        p.prompt_id: IV.token_positions(p, found.spans.get(p.prompt_id), config.positions)
        for p in prompts
    }
    acts: dict[int, Tensor] = {}
    """batch -> the unedited site activations at each row's positions [batch, k, d_model]."""

    def record(b: int, batch: Sequence[P.Prompt], h: Tensor) -> None:
        P_ = IV.position_tensor([pos[p.prompt_id] for p in batch])
        acts[b] = torch.stack([h[r, P_[r].clamp_min(0)] for r in range(len(batch))]).cpu()

    base = IV.forwards(lm, batches, readers, agg, config.site, record=record)
    masks = {
        b: IV.position_tensor([pos[p.prompt_id] for p in bt]) >= 0 for b, bt in enumerate(batches)
    }
    total = sum(float(masks[b].sum()) for b in acts)
    mu = sum((acts[b] * masks[b][..., None]).sum((0, 1)) for b in acts) / max(total, 1.0)

    run_dir: RunFolder | None = None
    done: set[int] = set()
    units = [
        (u, method, kind, seed, basis)
        for u, (method, (kind, seed, basis)) in enumerate(
            (m, s) for m in config.methods for s in subspaces
        )
    ]
    if out_dir is not None:
        identity = {
            "kind": "mediation",
            "study": study.name,
            "prompts_fingerprint": P.prompts_fingerprint(prompts),
            "model": lm.name,
            "dtype": str(lm.dtype),
            "directions": str(Path(run.path).resolve()),
            "config": asdict(replace(config, progress=True)),
        }
        run_dir = RunFolder(out_dir, identity, overwrite=overwrite)
        done = run_dir.begin(P.prompts_frame(study, prompts), ABLATED, "unit")
    todo = [unit for unit in units if unit[0] not in done]
    if run_dir is not None:
        # an ablation's forwards are the same batches at any world size: ranks take whole
        # ablations (every rank ran the unedited forwards above, the same on each)
        todo = distributed.shard(todo, lambda _: 1, run_dir.ranks)
    frames: list[pd.DataFrame] = []
    bar = tqdm(
        total=len(done) + len(todo),
        initial=len(done),
        desc=f"mediating {config.factor}",
        unit="ablation",
        disable=not config.progress,
    )
    for u, method, kind, seed, basis in todo:

        def edit(
            b: int, batch: Sequence[P.Prompt], method: str = method, basis: Tensor = basis
        ) -> Edit:
            h = acts[b]
            centred = h if method == "project" else h - mu
            delta = -((centred @ basis) @ basis.T)
            return Edit(IV.position_tensor([pos[p.prompt_id] for p in batch]), delta, "add")

        got = IV.forwards(lm, batches, readers, agg, config.site, edit=edit)
        frame = pd.DataFrame(
            [
                {
                    "unit": u,
                    "method": method,
                    "subspace": kind,
                    "seed": seed,
                    "prompt_id": pid,
                    "expected_score": r.score,
                    "option_mass": r.option_mass,
                    "probs": r.probs.tolist(),
                }
                for pid, r in got.items()
            ]
        )
        if run_dir is not None:
            run_dir.write_chunk({ABLATED: frame})
        else:
            frames.append(frame)
        bar.update(1)
    bar.close()
    if run_dir is not None and not run_dir.ranks_done():
        run_dir.wait_for_finish()
        return finished(run_dir.path)
    ablated = run_dir.read_chunks(ABLATED) if run_dir is not None else pd.concat(frames)
    ablated = ablated.sort_values(["unit", "prompt_id"]).reset_index(drop=True)
    table = _summarize(study, config, pairs, base, ablated, k)
    manifest: dict[str, Any] = {
        "kind": "mediation",
        "study": {"name": study.name, "path": study.path},
        "config": asdict(config),
        "model": lm.describe(),
        "directions_run": str(run.path),
        "probe": asdict(key),
        "subspace_dims": k,
        "conventions": {
            "project": "h - Q Q^T h at the site and positions",
            "mean_ablate": "h - Q Q^T (h - mu), mu = mean unedited activation there",
            "subspace": f"{config.direction} class directions, centred, orthonormalized",
            "mean_tv": "mean over pairs of TV(clean, corrupt)",
            "amce": "mean over levels of |mean over (baseline, level) pairs of the score "
            "difference|; baseline = the factor's first value",
            "share_mediated": "1 - effect_after / effect_before",
            "ci": f"95% percentile bootstrap over pairs, {config.n_boot} resamples",
        },
        "counts": {"pairs": len(pairs), "prompts": len(prompts), "ablations": len(units)},
        "timings_s": {"total": round(time.time() - t0, 3)},
    }
    result = MediateResult(table, ablated, manifest)
    if run_dir is not None:
        run_dir.write_table(MEDIATION, table)
        run_dir.write_table(ABLATED, ablated)
        run_dir.finish(manifest)
        result.out_dir = run_dir.path
    return result


def finished(path: str | Path) -> MediateResult:
    """A finished run folder's tables (what the ranks other than 0 return)."""
    path = Path(path)

    def read(name: str) -> pd.DataFrame:
        return pd.read_parquet(path / f"{name}.parquet")

    manifest = json.loads((path / MANIFEST).read_text())
    return MediateResult(read(MEDIATION), read(ABLATED), manifest, path)


def _effects(
    pairs: Sequence[Pair],
    probs: dict[int, np.ndarray],
    score: dict[int, float],
    baseline: str,
    w: np.ndarray,
) -> dict[str, tuple[float, np.ndarray]]:
    """effect name -> (value, bootstrap samples) over the pairs, resampled by `w` [boot, n]."""
    n = len(pairs)
    tv = np.array([IV.tv(probs[p.clean], probs[p.corrupt]) for p in pairs])
    out = {"mean_tv": (float(tv.mean()), (w @ tv) / n)}
    diff = np.array([score[p.corrupt] - score[p.clean] for p in pairs])
    levels = sorted({p.corrupt_value for p in pairs if p.clean_value == baseline})
    if levels and np.isfinite(diff).all():
        onehot = np.array(
            [[p.clean_value == baseline and p.corrupt_value == v for v in levels] for p in pairs],
            dtype=float,
        )
        amce = (diff @ onehot) / onehot.sum(0)
        with warnings.catch_warnings():  # a resample can miss a level: its AMCE is NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            boot = np.nanmean(np.abs((w @ (diff[:, None] * onehot)) / (w @ onehot)), 1)
        out["amce"] = (float(np.abs(amce).mean()), boot)
    return out


def _summarize(
    study: Study,
    config: MediateConfig,
    pairs: Sequence[Pair],
    base: dict[int, IV.Read],
    ablated: pd.DataFrame,
    k: int,
) -> pd.DataFrame:
    baseline = study.factor(config.factor).values[0]
    rows: list[dict[str, Any]] = []
    for qid in sorted({p.question_id for p in pairs}):
        qp = [p for p in pairs if p.question_id == qid]
        w = IV.boot_weights(len(qp), config.n_boot, config.seed)
        before = _effects(
            qp,
            {i: r.probs for i, r in base.items()},
            {i: r.score for i, r in base.items()},
            baseline,
            w,
        )
        for method in config.methods:
            for kind in ("probe", "random"):
                sub = ablated[(ablated["method"] == method) & (ablated["subspace"] == kind)]
                afters: list[dict[str, tuple[float, np.ndarray]]] = []
                for _, grp in sub.groupby("seed"):
                    probs = {
                        int(i): np.asarray(v)
                        for i, v in zip(grp["prompt_id"], grp["probs"], strict=True)
                    }
                    score = dict(
                        zip(grp["prompt_id"].astype(int), grp["expected_score"], strict=True)
                    )
                    afters.append(_effects(qp, probs, score, baseline, w))
                if not afters:
                    continue
                for effect, (b_val, b_boot) in before.items():
                    a_val = float(np.mean([a[effect][0] for a in afters]))
                    a_boot = np.mean([a[effect][1] for a in afters], axis=0)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        share = 1.0 - a_val / b_val if b_val > 0 else float("nan")
                        lo, hi = IV.interval(1.0 - a_boot / b_boot)
                    rows.append(
                        {
                            "factor": config.factor,
                            "site": config.site,
                            "positions": config.positions,
                            "question_id": qid,
                            "method": method,
                            "subspace": kind,
                            "n_dims": k,
                            "effect": effect,
                            "effect_before": b_val,
                            "effect_after": a_val,
                            "share_mediated": share,
                            "ci_low": lo,
                            "ci_high": hi,
                            "n": len(qp),
                        }
                    )
    return pd.DataFrame(rows, columns=list(MEDIATION_COLUMNS))
