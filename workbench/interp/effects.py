"""Behavioural effects of a designed study: AMCEs per factor level and Shapley factor importance.

No model is needed: everything is computed from a finished `distributions` run (or its
`DistributionResult`). Conventions, also written to the manifest under `conventions`:

- **Unit of analysis**: a *cell* (question x persona x factor values) with its order-adjusted
  distribution (`workbench.measure.distributions.order_adjusted`: each option's probability
  averaged over the option orders shown, refusal options excluded), and its expected score
  (that distribution times the question's ordinal values). Option order is averaged out, never
  a regressor, so a run with one order and a run with all cyclic orders give one row per cell.
- **AMCE** (average marginal component effect, the conjoint-analysis convention): per question,
  factor and non-baseline level, the coefficient of the level's indicator in an OLS
  (statsmodels) of the outcome on the indicators of every level but the baseline of *every*
  factor the question uses, over the cells of the design. The outcome is the expected score and
  each option's probability (metrics `expected_score`, `prob:<option>`). In a design where the
  factors are crossed (independent) this is the difference of the level's and the baseline's
  mean outcome, averaged over the design's distribution of the other factors.
- **Baseline**: `EffectsConfig.baselines`, else the factor's first value in the study's order.
- **Coarse cells** (a factor unspecified, i.e. null) are excluded from the regression of the
  factor they leave unspecified: "unspecified" is not a level of it. In the regressions of the
  other factors they are kept, "unspecified" entering as one more (never reported) level of the
  factor it concerns.
- **Intervals** (AMCE): 95%, from statsmodels' cluster-robust covariance (CRV1 with its
  small-sample correction; two-way, Cameron-Gelbach-Miller, with `cluster="both"`) and Student
  t with (smallest number of clusters - 1) degrees of freedom. Clusters are the persona
  (`persona_id`) and the stimulus (the combination of the stimulus factors the question uses);
  a dimension with a single cluster is dropped. Where the two-way variance comes out negative
  (it is a difference of variances: the organism's actor, constant within stimuli), the wider
  of the two one-way intervals is used (manifest note `one_way_fallback`). A level whose indicator is aliased with other
  factors (a table design where two persona factors always co-vary) is not identified: its
  estimate and interval are null and the manifest lists it under `not_identified`.
- **Importance**: per question, a Shapley decomposition over the *players*: the main effect of
  each factor the question uses, and in factorial designs also each pairwise interaction (a
  player `a×b`, coded as products of the two factors' centred indicators, so that in a
  balanced design it is orthogonal to both main effects). The value of a player set S is, for
  `expected_score`, the R² of the OLS of the expected score on the columns of S; for `mean_tv`,
  the mean total variation between the distributions fitted by the OLS of the option
  probabilities on S and the grand-mean distribution. Shares therefore sum to the value of the
  full model (the row `(all)`): the full R², not 1. In a balanced design without interaction,
  a factor's share is the variance it explains alone (eta²). Only fine cells (every factor the
  question uses specified) enter.
- **Bootstrap** (importance): `n_boot` resamples of persona ids and stimuli (independently;
  a cell weighs the product of its clusters' counts), 95% percentile intervals, a seeded numpy
  Generator per question; each replicate solves its weighted normal equations, batched (tests
  check them against statsmodels' WLS). A resample repeats clusters and unbalances the design,
  so a share near 0 (a crossed null factor) gets an interval above it: read such intervals as
  the spread, not as a test.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.interp.effects_figures import ALL, SCORE, figures
from workbench.interp.opinion import row_keys
from workbench.runs import MANIFEST, RunFolder

if TYPE_CHECKING:
    from workbench.measure.distributions import DistributionResult
    from workbench.study.spec import Question, Study

EFFECTS = "effects"
IMPORTANCE = "importance"
EFFECTS_COLUMNS = (
    "question_id",
    "factor",
    "level",
    "baseline",
    "metric",
    "estimate",
    "ci_low",
    "ci_high",
    "n",
)
IMPORTANCE_COLUMNS = ("question_id", "factor", "metric", "share", "ci_low", "ci_high")
MEAN_TV = "mean_tv"
UNSPECIFIED = "(unspecified)"
MAX_PLAYERS = 12
"""Exact Shapley enumerates 2^players subsets."""
_RIDGE = 1e-12


@dataclass(frozen=True)
class EffectsConfig:
    """Settings of `workbench effects` (written to its manifest)."""

    baselines: tuple[tuple[str, str], ...] = ()
    """(factor, level) pairs; a factor not listed takes its first value in the study."""
    n_boot: int = 1000
    """Cluster-bootstrap resamples for the importance intervals (0: no intervals)."""
    seed: int = 0
    cluster: Literal["both", "persona", "stimulus"] = "both"
    """Which clusters the intervals account for (AMCE covariance and bootstrap alike)."""
    interactions: bool | None = None
    """Pairwise interaction players in the importance; None: only for factorial designs."""
    questions: tuple[str, ...] = ()
    """Question ids to analyse; empty: all."""


@dataclass
class EffectsResult:
    """The tables of an effects run (columns: `EFFECTS_COLUMNS`, `IMPORTANCE_COLUMNS`)."""

    effects: pd.DataFrame
    importance: pd.DataFrame
    cells: pd.DataFrame
    """One row per question x cell: persona_id, factor columns, `prob:<option>`, expected_score."""
    manifest: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


def _read_run(run: DistributionResult | str | Path) -> tuple[Study, pd.DataFrame, str]:
    """The study, the order-adjusted table and a description of the source."""
    from workbench.compare.comparison import load_run, study_from_manifest
    from workbench.measure.distributions import order_adjusted

    fix = "pass a folder written by `workbench distributions STUDY --model M --out DIR`"
    if isinstance(run, str | Path):
        path = Path(run)
        if not (path / MANIFEST).is_file():
            raise WorkbenchError(
                f"{path}: no {MANIFEST}: not a finished distributions run", fix=fix
            )
        kind = json.loads((path / MANIFEST).read_text()).get("kind")
        if kind != "distributions":
            raise WorkbenchError(
                f"{path}: manifest.json kind is {kind!r}; effects need a distributions run", fix=fix
            )
        loaded = load_run(path)
        study = study_from_manifest(loaded.manifest)
        factors = [f.name for f in study.factors]
        return study, order_adjusted(loaded.prompts, loaded.dist, factors), str(path)
    if run.manifest.get("kind") != "distributions" or "study" not in run.manifest:
        raise WorkbenchError("the result's manifest is not a distributions run's", fix=fix)
    return study_from_manifest(run.manifest), run.adjusted, str(run.out_dir or "<in memory>")


def _fail(field_: str, message: str, fix: str) -> WorkbenchError:
    return WorkbenchError(f"{field_}: {message}", fix=fix)


def _check_config(study: Study, config: EffectsConfig) -> dict[str, str]:
    """Baseline per factor; every problem of the configuration raised before any work."""
    names = [f.name for f in study.factors]
    if config.n_boot < 0:
        raise _fail("n_boot", f"{config.n_boot} is negative", "pass --n-boot 0 or more")
    if config.cluster not in ("both", "persona", "stimulus"):
        raise _fail("cluster", f"unknown {config.cluster!r}", "use both, persona or stimulus")
    known = [q.id for q in study.questions]
    for qid in set(config.questions) - set(known):
        raise _fail("questions", f"unknown question {qid!r}", f"use one of {known}")
    baselines = {f.name: f.values[0] for f in study.factors}
    for factor, level in config.baselines:
        if factor not in names:
            raise _fail(
                "baselines",
                f"unknown factor {factor!r}",
                f"use --baseline FACTOR=LEVEL with a factor of the study: {names}",
            )
        values = list(study.factor(factor).values)
        if level not in values:
            raise _fail(f"baselines.{factor}", f"{level!r} is not a level", f"use one of {values}")
        baselines[factor] = level
    return baselines


def cell_table(adjusted: pd.DataFrame, study: Study, question: Question) -> pd.DataFrame:
    """One row per cell of `question`: persona_id, factor columns, `prob:<option>` (the
    order-adjusted distribution over the substantive options) and `expected_score`."""
    factors = [f.name for f in study.factors]
    q = adjusted[adjusted["question_id"] == question.id]
    q = q.assign(_cell=row_keys(q, ["persona_id", *factors]))
    wide = q.pivot(index="_cell", columns="option_id", values="prob")
    wide = wide.reindex(columns=range(len(question.options)))
    meta = q.groupby("_cell", sort=True)[["persona_id", *factors]].first()
    out = meta.reset_index(drop=True)
    probs = wide.to_numpy(dtype=float)
    for k, option in enumerate(question.options):
        out[f"prob:{option}"] = probs[:, k]
    if question.values is not None:
        out[SCORE] = probs @ np.asarray(question.values, dtype=float)
    return out.assign(question_id=question.id)


def _levels(cells: pd.DataFrame, study: Study, factor: str) -> list[str]:
    seen = set(cells[factor].dropna().astype(str))
    return [v for v in study.factor(factor).values if v in seen]


def _check_question(
    cells: pd.DataFrame, study: Study, used: list[str], baselines: dict[str, str]
) -> None:
    qid = cells["question_id"].iloc[0] if len(cells) else "?"
    for factor in used:
        levels = _levels(cells, study, factor)
        if len(levels) < 2:
            raise _fail(
                f"factors.{factor}",
                f"has one level ({levels[0]!r}) in question {qid!r}: no effect to estimate",
                "give the factor two or more values in the design, or drop it from the study",
            )
        if baselines[factor] not in levels:
            raise _fail(
                f"baselines.{factor}",
                f"{baselines[factor]!r} is never asked in question {qid!r}",
                f"pass --baseline {factor}=LEVEL with one of {levels}",
            )


def _dummies(
    cells: pd.DataFrame, study: Study, factor: str, baseline: str, *, unspecified: bool
) -> pd.DataFrame:
    """Indicators of every observed level but the baseline (+ `(unspecified)` if asked)."""
    col = cells[factor].astype("string")
    out = {
        f"{factor}={v}": (col == v).fillna(False).to_numpy(dtype=float)
        for v in _levels(cells, study, factor)
        if v != baseline
    }
    if unspecified and col.isna().any():
        out[f"{factor}={UNSPECIFIED}"] = col.isna().to_numpy(dtype=float)
    return pd.DataFrame(out, index=cells.index)


def _clusters(cells: pd.DataFrame, study: Study, used: list[str], which: str) -> np.ndarray:
    """[cell, dim] integer cluster ids: persona, stimulus (dimensions with one cluster dropped)."""
    stimulus = [f.name for f in study.factors if f.role == "stimulus" and f.name in used]
    dims = []
    if which in ("both", "persona"):
        dims.append(row_keys(cells, ["persona_id"]))
    if which in ("both", "stimulus") and stimulus:
        dims.append(row_keys(cells, stimulus))
    dims = [d for d in dims if len(np.unique(d)) > 1]
    return np.column_stack(dims) if dims else np.zeros((len(cells), 0), dtype=int)


def _identified(x: np.ndarray) -> np.ndarray:
    """Per column: is its coefficient identified (the column is not in the others' span)?"""
    rank = np.linalg.matrix_rank(x)
    return np.array(
        [np.linalg.matrix_rank(np.delete(x, j, axis=1)) < rank for j in range(x.shape[1])]
    )


def _metrics(cells: pd.DataFrame) -> list[str]:
    return ([SCORE] if SCORE in cells.columns else []) + [
        c for c in cells.columns if c.startswith("prob:")
    ]


def _amce(
    cells: pd.DataFrame,
    study: Study,
    used: list[str],
    baselines: dict[str, str],
    config: EffectsConfig,
    notes: dict[str, list[str]],
) -> list[dict[str, Any]]:
    import warnings

    import statsmodels.api as sm

    rows: list[dict[str, Any]] = []
    qid = str(cells["question_id"].iloc[0])
    by_mask: dict[bytes, list[str]] = {}
    for factor in used:
        by_mask.setdefault(cells[factor].notna().to_numpy().tobytes(), []).append(factor)
    for factors in by_mask.values():
        sub = cells[cells[factors[0]].notna()]
        parts = [_dummies(sub, study, g, baselines[g], unspecified=g not in factors) for g in used]
        design = pd.concat(parts, axis=1)
        x = np.column_stack([np.ones(len(sub)), design.to_numpy()])
        ok = dict(zip(design.columns, _identified(x)[1:], strict=True))
        groups = _clusters(sub, study, used, config.cluster)
        if groups.shape[1]:
            cov: dict[str, Any] = {
                "cov_type": "cluster",
                "cov_kwds": {"groups": groups if groups.shape[1] > 1 else groups[:, 0]},
            }
        else:
            cov = {"cov_type": "HC1"}
            notes["heteroskedasticity_robust_only"].append(qid)
        for metric in _metrics(sub):
            y = sub[metric].to_numpy(dtype=float)
            with warnings.catch_warnings():
                # Two-way cluster variances can come out negative (their sqrt is null), and
                # aliased levels make X rank-deficient: both are reported, not warned about.
                warnings.simplefilter("ignore", RuntimeWarning)
                warnings.simplefilter("ignore", sm.tools.sm_exceptions.SingularMatrixWarning)
                fit = sm.OLS(y, x).fit(use_t=True, **cov)
                ci = np.asarray(fit.conf_int(0.05))
                bad = np.isnan(ci[:, 0])
                if bad.any() and groups.shape[1] > 1:
                    one = [
                        sm.OLS(y, x).fit(use_t=True, cov_type="cluster", cov_kwds={"groups": g})
                        for g in groups.T
                    ]
                    wider = np.argmax([f.bse for f in one], axis=0)
                    alt = np.stack([np.asarray(f.conf_int(0.05)) for f in one])
                    ci[bad] = alt[wider[bad], np.flatnonzero(bad)]
                    notes["one_way_fallback"].append(f"{qid}: {metric}")
            for j, name in enumerate(design.columns, start=1):
                factor, level = name.split("=", 1)
                if factor not in factors:
                    continue
                good = bool(ok[name])
                if not good and metric == _metrics(sub)[0]:
                    notes["not_identified"].append(f"{qid}: {name}")
                rows.append(
                    {
                        "question_id": qid,
                        "factor": factor,
                        "level": level,
                        "baseline": baselines[factor],
                        "metric": metric,
                        "estimate": float(fit.params[j]) if good else np.nan,
                        "ci_low": float(ci[j, 0]) if good else np.nan,
                        "ci_high": float(ci[j, 1]) if good else np.nan,
                        "n": int(design[name].sum()),
                    }
                )
    return rows


# --------------------------------------------------------------------------------------------
# importance: Shapley over main effects (and pairwise interactions)


def _players(
    cells: pd.DataFrame, study: Study, used: list[str], baselines: dict[str, str], pairs: bool
) -> tuple[np.ndarray, list[tuple[str, list[int]]]]:
    """The regressors of every player (no intercept) and each player's column indices."""
    blocks: list[np.ndarray] = []
    players: list[tuple[str, list[int]]] = []
    main: dict[str, np.ndarray] = {}
    start = 0
    for factor in used:
        frame = _dummies(cells, study, factor, baselines[factor], unspecified=False)
        main[factor] = frame.to_numpy()
    terms = [(f, main[f]) for f in used]
    if pairs:
        centred = {f: m - m.mean(0) for f, m in main.items()}
        for i, a in enumerate(used):
            for b in used[i + 1 :]:
                prod = centred[a][:, :, None] * centred[b][:, None, :]
                terms.append((f"{a}×{b}", prod.reshape(len(cells), -1)))
    for name, block in terms:
        blocks.append(block)
        players.append((name, list(range(start, start + block.shape[1]))))
        start += block.shape[1]
    return np.column_stack(blocks), players


def _boot_weights(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[1 + n_boot, cell] weights: row 0 all ones (the estimate), then cluster resamples."""
    weights = np.ones((1 + n_boot, len(groups)))
    for d in range(groups.shape[1] if n_boot else 0):
        ids = np.unique(groups[:, d], return_inverse=True)[1]
        n_clusters = int(ids.max()) + 1
        draws = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
        counts = (draws[:, :, None] == np.arange(n_clusters)).sum(1)
        weights[1:] *= counts[:, ids]
    return weights


def subset_values(
    x: np.ndarray,
    players: Sequence[tuple[str, list[int]]],
    score: np.ndarray | None,
    probs: np.ndarray,
    weights: np.ndarray,
) -> dict[str, np.ndarray]:
    """[subset, replicate] value of every player subset (bit i = player i) under each row of
    `weights` [replicate, cell]: `expected_score` (weighted R² of the OLS with an intercept) and
    `mean_tv` (weighted mean TV of the fitted distributions from the weighted grand mean)."""
    n_sub = 1 << len(players)
    sw = weights.sum(1)
    gram = np.matmul(x.T[None] * weights[:, None, :], x)
    mx_all = weights @ x / sw[:, None]
    out: dict[str, np.ndarray] = {MEAN_TV: np.zeros((n_sub, len(weights)))}
    if score is not None:
        my = weights @ score / sw
        tss = weights @ score**2 - sw * my**2
        xy_all = weights @ (x * score[:, None])
        out[SCORE] = np.zeros((n_sub, len(weights)))
    mp = weights @ probs / sw[:, None]
    xp_all = np.matmul(x.T[None] * weights[:, None, :], probs)
    for s in range(1, n_sub):
        idx = _basis(x, [c for i, (_, cols) in enumerate(players) if s >> i & 1 for c in cols])
        mx = mx_all[:, idx]
        g = gram[:, idx][:, :, idx] - sw[:, None, None] * mx[:, :, None] * mx[:, None, :]
        # A level a replicate never draws leaves a zero row and column: the tiny ridge keeps
        # the solve defined and gives that column a zero coefficient.
        ridge = _RIDGE * np.trace(g, axis1=1, axis2=2) / len(idx) + 1e-300
        g = g + ridge[:, None, None] * np.eye(len(idx))
        cp = xp_all[:, idx] - sw[:, None, None] * mx[:, :, None] * mp[:, None, :]
        rhs = cp
        if score is not None:
            c = xy_all[:, idx] - sw[:, None] * mx * my[:, None]
            rhs = np.concatenate([cp, c[:, :, None]], axis=2)
        sol = np.linalg.solve(g, rhs)
        if score is not None:
            out[SCORE][s] = (c * sol[:, :, -1]).sum(1) / tss
        beta = sol[:, :, : cp.shape[2]]
        dev = np.matmul(x[None, :, idx], beta) - np.matmul(mx[:, None, :], beta)
        out[MEAN_TV][s] = (weights * 0.5 * np.abs(dev).sum(-1)).sum(1) / sw
    return out


def _basis(x: np.ndarray, cols: list[int]) -> list[int]:
    """A subset of `cols` spanning the same centred column space (aliased columns dropped)."""
    from scipy.linalg import qr

    xc = x[:, cols] - x[:, cols].mean(0)
    r, piv = qr(xc, mode="r", pivoting=True)
    diag = np.abs(np.diag(r))
    rank = int((diag > 1e-9 * max(float(diag.max(initial=0.0)), 1e-300)).sum())
    return sorted(cols[i] for i in piv[:rank])


def shapley(values: np.ndarray, n_players: int) -> np.ndarray:
    """[player, replicate] Shapley values from [subset, replicate] values (bit i = player i)."""
    subsets = np.arange(1 << n_players)
    sizes = np.array([bin(s).count("1") for s in subsets])
    fact = [math.factorial(k) for k in range(n_players + 1)]
    out = np.zeros((n_players, values.shape[1]))
    for i in range(n_players):
        without = subsets[(subsets >> i & 1) == 0]
        w = np.array([fact[k] * fact[n_players - k - 1] for k in sizes[without]]) / fact[n_players]
        out[i] = w @ (values[without | (1 << i)] - values[without])
    return out


def _importance(
    cells: pd.DataFrame,
    study: Study,
    used: list[str],
    baselines: dict[str, str],
    config: EffectsConfig,
    rng: np.random.Generator,
    notes: dict[str, list[str]],
) -> list[dict[str, Any]]:
    qid = str(cells["question_id"].iloc[0])
    fine = cells.dropna(subset=used).reset_index(drop=True)
    pairs = study.design.kind == "factorial" if config.interactions is None else config.interactions
    n_players = len(used) + (len(used) * (len(used) - 1) // 2 if pairs else 0)
    if n_players > MAX_PLAYERS and config.interactions is None and pairs:
        notes["interactions_dropped"].append(qid)
        pairs, n_players = False, len(used)
    if n_players > MAX_PLAYERS:
        raise _fail(
            "interactions" if pairs else "factors",
            f"question {qid!r} has {n_players} Shapley players (at most {MAX_PLAYERS})",
            "set interactions=False, or analyse fewer factors",
        )
    if len(fine) < 3:
        notes["no_fine_cells"].append(qid)
        return []
    x, players = _players(fine, study, used, baselines, pairs)
    groups = _clusters(fine, study, used, config.cluster)
    weights = _boot_weights(groups, config.n_boot, rng)
    score = fine[SCORE].to_numpy(dtype=float) if SCORE in fine.columns else None
    probs = fine[[c for c in fine.columns if c.startswith("prob:")]].to_numpy(dtype=float)
    chunks = [weights[:1]] + [weights[i : i + 128] for i in range(1, len(weights), 128)]
    parts = [subset_values(x, players, score, probs, w) for w in chunks]
    rows: list[dict[str, Any]] = []
    for metric in parts[0]:
        values = np.concatenate([p[metric] for p in parts], axis=1)
        phi = shapley(values, len(players))
        names = [name for name, _ in players] + [ALL]
        for name, reps in zip(names, [*phi, values[-1]], strict=True):
            boot = reps[1:][np.isfinite(reps[1:])]
            lo, hi = np.percentile(boot, [2.5, 97.5]) if len(boot) else (np.nan, np.nan)
            rows.append(
                {
                    "question_id": qid,
                    "factor": name,
                    "metric": metric,
                    "share": float(reps[0]),
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                }
            )
    return rows


@dataclass
class _Prepared:  # checked inputs: a baseline per factor, cells and used factors per question
    baselines: dict[str, str]
    tables: list[tuple[Question, pd.DataFrame]]
    used: dict[str, list[str]]


def _prepare(adjusted: pd.DataFrame, study: Study, config: EffectsConfig) -> _Prepared:
    baselines = _check_config(study, config)
    questions = [q for q in study.questions if not config.questions or q.id in config.questions]
    tables = [(q, cell_table(adjusted, study, q)) for q in questions]
    tables = [(q, c) for q, c in tables if len(c)]
    if not tables:
        raise _fail("questions", "no cells to analyse", "check the run and --questions")
    used = {q.id: [f.name for f in study.factors if c[f.name].notna().any()] for q, c in tables}
    for q, c in tables:
        _check_question(c, study, used[q.id], baselines)
    return _Prepared(baselines, tables, used)


def estimate_effects(
    adjusted: pd.DataFrame, study: Study, config: EffectsConfig | None = None
) -> EffectsResult:
    """AMCEs and importance from an order-adjusted table (the `adjusted.parquet` columns:
    persona_id, question_id, factor columns, option_id, prob); nothing is written."""
    config = config or EffectsConfig()
    return _estimate(_prepare(adjusted, study, config), study, config)


def _estimate(prep: _Prepared, study: Study, config: EffectsConfig) -> EffectsResult:
    t0 = time.time()
    baselines, tables, used = prep.baselines, prep.tables, prep.used
    kinds = ("not_identified", "one_way_fallback", "heteroskedasticity_robust_only")
    notes: dict[str, list[str]] = {k: [] for k in (*kinds, "interactions_dropped", "no_fine_cells")}
    effects: list[dict[str, Any]] = []
    importance: list[dict[str, Any]] = []
    for i, (q, c) in enumerate(tables):
        effects += _amce(c, study, used[q.id], baselines, config, notes)
        rng = np.random.default_rng([config.seed, i])
        importance += _importance(c, study, used[q.id], baselines, config, rng, notes)
    manifest = {
        "kind": "effects",
        "study": {"name": study.name, "definition": dict(study.raw)},
        "config": asdict(config),
        "baselines": baselines,
        "conventions": {
            "amce": "OLS (statsmodels) on level indicators vs baseline, order-adjusted cells; "
            "coarse cells left out for the factor they leave unspecified",
            "amce_intervals": f"95% cluster-robust (CRV1, t), clusters: {config.cluster}",
            "importance": "Shapley shares of R² (expected_score) and of mean TV from the grand "
            "mean (mean_tv); they sum to the row (all); fine cells only",
            "importance_intervals": "95% percentile, cluster bootstrap (personas x stimuli)",
        },
        "notes": {k: sorted(set(v)) for k, v in notes.items() if v},
        "counts": {q.id: len(c) for q, c in tables},
        "timings_s": {"total": round(time.time() - t0, 3)},
    }
    return EffectsResult(
        pd.DataFrame(effects, columns=list(EFFECTS_COLUMNS)),
        pd.DataFrame(importance, columns=list(IMPORTANCE_COLUMNS)),
        pd.concat([c for _, c in tables], ignore_index=True),
        manifest,
    )


def compute_effects(
    run: DistributionResult | str | Path,
    out_dir: str | Path | None = None,
    config: EffectsConfig | None = None,
    *,
    overwrite: bool = False,
) -> EffectsResult:
    """AMCEs and factor importance of a distributions run (a folder or its result); with
    `out_dir`: effects.parquet, importance.parquet, PNG figures, manifest.json written last."""
    config = config or EffectsConfig()
    study, adjusted, source = _read_run(run)
    prep = _prepare(adjusted, study, config)
    folder = None
    if out_dir is not None:
        # Opened before the work: a refused folder costs nothing computed.
        folder = RunFolder(
            out_dir,
            {"kind": "effects", "source": source, "config": asdict(config)},
            overwrite=overwrite,
        )
    result = _estimate(prep, study, config)
    result.manifest["source"] = source
    if folder is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        folder.write_table(EFFECTS, result.effects)
        folder.write_table(IMPORTANCE, result.importance)
        for _, fig, name in figures(result):
            fig.savefig(folder.path / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
        folder.finish(result.manifest)
        result.out_dir = folder.path
    return result
