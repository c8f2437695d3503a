"""`workbench compare`: logits vs sampled vs verbalized vs human, with the field's metrics.

Inputs are finished run folders of one study (`workbench distributions`, `workbench sample`,
verbalized or not) and optionally a human data file (`workbench.compare.human`). Each gives *sources*,
a distribution over the substantive options per prompt:

    distributions run  ->  "<run>"                     exact logit distribution (`prob`)
    sampling run       ->  "<run>"                     counted answers (`prob`)
                           "<run> (answer position)"   mean teacher-forced slot distribution
    verbalized run     ->  "<run>"                     mean stated distribution
    --human FILE       ->  "human"                     + the "uniform" and "majority" baselines

Prompts are matched across runs by *item* (question, option order, factor values), never by
prompt id or text (a verbalized prompt has other text). Two levels:

- **item**: every model source against the *reference* (the first distributions run), per
  prompt: TV, JS distance (base 2), KL(reference ‖ source) in bits (smoothing recorded),
  normalized W1 on the ordinal values; sampled sources get the sampling floor of their N
  (`within_floor`: the mean TV is below the 95th percentile of the mean floor TV);
- **cell** (each source averaged over option orders, as `adjusted.parquet`): every source and
  both baselines against the human data, and the survey metrics of docs/MEASUREMENT.md §4.

Sampling runs also get status rates, the preamble rate (answers after other words) and the
first-token vs text mismatch (docs/MEASUREMENT.md §3) at sample and prompt level, beside what the
logits alone predict (1 − the argmax option's probability). Aggregates carry bootstrap 95%
intervals (questions and personas resampled independently).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.compare import dense as D
from workbench.compare import metrics as M
from workbench.compare import survey as U
from workbench.compare.coverage import coverage_table
from workbench.compare.figures import report_blocks
from workbench.compare.groups import group_tables
from workbench.compare.human import load_human
from workbench.compare.rates import sampling_rates
from workbench.errors import WorkbenchError
from workbench.report import write_report
from workbench.runs import MANIFEST, PROMPTS, git_hash, versions, write_json
from workbench.study.load import parse_study
from workbench.study.spec import Question, Study

BASELINES = ("uniform", "majority")
PROMPT_COLUMNS = ("prompt_id", "persona_id", "question_id", "permutation", "order", "prompt")
TABLES = (
    "pairs",
    "summary",
    "properties",
    "rates",
    "human",
    "structural",
    "mismatch_by_persona",
    "groups",
    "group_questions",
    "human_pairs",
    "coverage",
)


@dataclass(frozen=True)
class CompareConfig:
    """Settings of a comparison (written to its manifest)."""

    n_resamples: int = 1000
    seed: int = 0
    smoothing: float = M.DEFAULT_SMOOTHING
    """Additive smoothing of KL (both distributions), recorded."""
    floor_sims: int = 2000
    min_clusters: int = 5
    """A bootstrap unit (questions, personas) with fewer distinct values is not resampled but
    kept as fixed strata: resampling two questions says nothing about questions in general."""
    homogenization_threshold: float = M.HOMOGENIZATION_THRESHOLD
    human_prob_column: str = "prob"
    human_label: str = "human"
    """The human source's name in tables (the demo: "truth (stands in for human data)")."""
    group_floor_sims: int = 50
    """Resamples per human group cell for its sampling floor (`dense.floor_distances`)."""


@dataclass
class Run:
    """One finished run folder, read back."""

    name: str
    path: Path
    kind: str
    """distributions | sampling"""
    elicitation: str
    """logits | answer | verbalized"""
    manifest: dict[str, Any]
    prompts: pd.DataFrame
    dist: pd.DataFrame
    samples: pd.DataFrame | None = None


@dataclass
class CompareResult:
    """Every table of a comparison (see README "Comparing runs" for the columns)."""

    sources: dict[str, pd.DataFrame]
    """Per model source, item level: key, cell, question_id, persona_id, option_id, position,
    prob, n (parsed answers), refusal (refusal options' share)."""
    cell_sources: dict[str, pd.DataFrame]
    """Per source (model, human, baselines), cell level (averaged over option orders)."""
    kinds: dict[str, str]
    """Per source: logits | sampled | answer_position | verbalized | human | baseline."""
    reference: str | None
    pairs: pd.DataFrame
    summary: pd.DataFrame
    properties: pd.DataFrame
    rates: pd.DataFrame
    human: pd.DataFrame
    structural: pd.DataFrame
    mismatch_by_persona: pd.DataFrame
    groups: pd.DataFrame = field(default_factory=pd.DataFrame)
    """Per source and group (`workbench.compare.groups`), with "(average)" and "(worst)"."""
    group_questions: pd.DataFrame = field(default_factory=pd.DataFrame)
    human_pairs: pd.DataFrame = field(default_factory=pd.DataFrame)
    coverage: pd.DataFrame = field(default_factory=pd.DataFrame)
    """What the human file covers of the cells asked (`workbench.compare.coverage`)."""
    manifest: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


# --------------------------------------------------------------------------------------------
# reading runs


def study_from_manifest(manifest: dict[str, Any]) -> Study:
    """The study recorded in a run's manifest (its questions and factors; the design table
    is not needed here and not read)."""
    raw = copy.deepcopy(dict(manifest["study"]["definition"]))
    raw["design"] = {"kind": "random", "n": 1}
    return parse_study(raw, str(manifest["study"].get("path", "<manifest>")))


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read a finished distributions or sampling run folder."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise WorkbenchError(
            f"{path}: no {MANIFEST}: not a finished run folder",
            fix="finish the run (re-running its command resumes it) or check the path",
        )
    manifest = json.loads((path / MANIFEST).read_text())
    kind = manifest.get("kind")
    prompts = pd.read_parquet(path / PROMPTS)
    label = name or path.name
    if kind == "distributions":
        dist = pd.read_parquet(path / "distributions.parquet")
        return Run(label, path, kind, "logits", manifest, prompts, dist)
    if kind == "sampling":
        dist = pd.read_parquet(path / "sampled_distributions.parquet")
        samples = pd.read_parquet(path / "samples.parquet")
        return Run(
            label,
            path,
            kind,
            manifest.get("elicitation", "answer"),
            manifest,
            prompts,
            dist,
            samples,
        )
    raise WorkbenchError(
        f"{path}: a {kind!r} run cannot be compared",
        fix="pass folders written by `workbench distributions` or `workbench sample`",
    )


def _pieces(column: pd.Series, prefix: str) -> np.ndarray:
    """`prefix + value` (`*`: missing) for every row, built once per distinct value."""
    codes, uniques = pd.factorize(column.astype("string"), use_na_sentinel=True)
    texts = np.array([prefix + str(u) for u in uniques] + [prefix + "*"], dtype=object)
    return texts[codes]


def cell_key(frame: pd.DataFrame, factors: list[str]) -> pd.Series:
    """Question + every factor value (`*`: unspecified): one survey cell.

    Python strings (object dtype), not Arrow strings: every table of a comparison is grouped,
    merged and factorized by this key, and Arrow-backed keys cost a conversion each time."""
    key = _pieces(frame["question_id"], "")
    for f in factors:
        key = key + _pieces(frame[f], f"|{f}=")
    return pd.Series(key, index=frame.index, dtype=object)


def item_key(frame: pd.DataFrame, factors: list[str]) -> pd.Series:
    """A cell asked in one option order."""
    return cell_key(frame, factors) + _pieces(frame["permutation"], "|order=")


def _run_sources(run: Run, factors: list[str]) -> dict[str, tuple[str, pd.DataFrame]]:
    """name -> (kind, item-level table) for one run."""
    prompts = run.prompts.assign(
        key=item_key(run.prompts, factors), cell=cell_key(run.prompts, factors)
    )
    all_rows = run.dist
    if run.elicitation == "logits":
        # The refusal options' share of the raw option probability (refusal_mass / option_mass).
        raw = pd.Series(np.exp(all_rows["logprob"].to_numpy(dtype=float)), index=all_rows.index)
        ref = (
            raw.where(all_rows["is_refusal"].astype(bool), 0.0).groupby(all_rows["prompt_id"]).sum()
        )
        share = (ref / raw.groupby(all_rows["prompt_id"]).sum()).rename("refusal_share")
        all_rows = all_rows.merge(share, left_on="prompt_id", right_index=True)
    dist = all_rows[~all_rows["is_refusal"].astype(bool)].merge(
        prompts[["prompt_id", "key", "cell", "question_id", "persona_id"]], on="prompt_id"
    )
    n = dist["n_ok"].astype(float) if "n_ok" in dist.columns else np.nan
    base = dist.assign(n=n, refusal=dist["refusal_share"].astype(float))[
        ["key", "cell", "question_id", "persona_id", "option_id", "position", "n", "refusal"]
    ]
    kind = {"logits": "logits", "answer": "sampled", "verbalized": "verbalized"}[run.elicitation]
    out = {run.name: (kind, base.assign(prob=dist["prob"].to_numpy()))}
    if run.elicitation == "answer" and dist["prob_answer_position"].notna().any():
        rb = base.assign(
            prob=dist["prob_answer_position"].to_numpy(),
            n=np.nan,
            refusal=dist["refusal_share_answer_position"].astype(float).to_numpy(),
        )
        out[f"{run.name} (answer position)"] = ("answer_position", rb)
    # An item with no substantive answer at all has no distribution: left out.
    return {
        name: (kind, frame[frame.groupby("key")["prob"].transform("count") > 0])
        for name, (kind, frame) in out.items()
    }


def _cell_level(frame: pd.DataFrame) -> pd.DataFrame:
    """Average over option orders: one distribution per cell (sample sizes summed)."""
    per_key = frame.groupby("key")[["cell", "n", "refusal"]].first().groupby("cell")
    sizes, refusal = per_key["n"].sum(min_count=1), per_key["refusal"].mean()
    out = (
        frame.groupby(["cell", "question_id", "persona_id", "option_id"], sort=True)["prob"]
        .mean()
        .reset_index()
    )
    out["prob"] = out["prob"] / out.groupby("cell")["prob"].transform("sum")
    cell = out["cell"].astype(object)  # the group-by made Arrow strings of the keys
    return out.assign(cell=cell, key=cell, n=cell.map(sizes), refusal=cell.map(refusal))


# --------------------------------------------------------------------------------------------
# pairwise metrics


@dataclass
class _Pairs:
    frame: pd.DataFrame
    sims: dict[str, np.ndarray]
    """Per question: [sim, key] simulated floor TVs."""


def _pair(
    source: pd.DataFrame,
    reference: pd.DataFrame,
    qt: D.QuestionTable,
    config: CompareConfig,
    with_floor: bool,
) -> _Pairs:
    """Per shared key: tv, js, kl_bits (reference ‖ source), nw1 (NaN for nominal questions),
    distance (nw1, or tv for nominal questions) and its metric, n and the sampling floor."""
    keys, p, q, qidx = D.align(D.to_dense(source, qt), D.to_dense(reference, qt))
    if not len(keys):
        return _Pairs(pd.DataFrame(), {})
    first = source.groupby("key")[["persona_id", "n"]].first().reindex(keys)
    d = D.distances(p, q, qidx, qt)
    frame = pd.DataFrame(
        {
            "key": keys,
            "question_id": np.asarray(qt.ids, dtype=object)[qidx],
            "persona_id": first["persona_id"].to_numpy(),
            "tv": d.tv,
            "js": d.js,
            "kl_bits": D.kl_bits(q, p, qidx, qt, config.smoothing),
            "nw1": d.nw1,
            "distance": d.distance,
            "metric": d.metric,
            "n": first["n"].to_numpy(dtype=float),
            "floor": np.nan,
        }
    )
    sims: dict[str, np.ndarray] = {}
    sizes = np.nan_to_num(frame["n"].to_numpy(), nan=0).astype(int)
    if with_floor and (sizes > 0).any():
        floor = np.full(len(frame), np.nan)
        for qi in np.unique(qidx):
            rows = np.flatnonzero(qidx == qi)
            k = int(qt.k[qi])
            fl = M.sampling_floor(
                q[rows, :k], sizes[rows], n_sims=config.floor_sims, seed=config.seed, keep_sims=True
            )
            floor[rows] = fl.mean_tv
            if fl.sims is not None:
                sims[qt.ids[qi]] = fl.sims
        frame["floor"] = floor
    return _Pairs(frame, sims)


def _summary_rows(
    level: str, source: str, reference: str, pairs: _Pairs, config: CompareConfig
) -> list[dict[str, Any]]:
    """All questions together (`question_id` "all", bootstrap intervals), then each question
    when there are more (normal intervals: `survey.grouped_means`)."""
    frame = pairs.frame
    cols = ["tv", "js", "kl_bits", "nw1"]
    row: dict[str, Any] = {"question_id": "all", "n_keys": len(frame)}
    for col in cols:
        est = U.estimate(frame, frame[col], config)
        row.update({col: est.value, f"{col}_lo": est.lo, f"{col}_hi": est.hi})
    row["mean_n"] = float(frame["n"].mean()) if frame["n"].notna().any() else np.nan
    rows = [row]
    if frame["question_id"].nunique() > 1:
        per_q = U.grouped_means(frame, ["question_id"], [*cols, "n"])
        per_q["n_keys"] = frame.groupby("question_id", sort=False).size().to_numpy()
        per_q = per_q.rename(columns={"n": "mean_n"}).drop(columns=["n_lo", "n_hi"])
        rows += [{str(k): v for k, v in r.items()} for r in per_q.to_dict("records")]
    for r in rows:
        r.update(level=level, source=source, reference=reference)
        r["floor_mean"] = r["floor_q95"] = np.nan
        r["within_floor"] = None
        chosen = list(pairs.sims) if r["question_id"] == "all" else [r["question_id"]]
        sims = [pairs.sims[q] for q in chosen if q in pairs.sims]
        if sims:
            joint = np.concatenate(sims, axis=1).mean(1)
            r["floor_mean"] = float(joint.mean())
            r["floor_q95"] = float(np.quantile(joint, 0.95))
            r["within_floor"] = bool(r["tv"] <= r["floor_q95"])
    return rows


# --------------------------------------------------------------------------------------------
# human metrics


def study_cells(study: Study) -> pd.DataFrame:
    """Every cell of the study x every question, keyed like a run's prompts."""
    factors = [f.name for f in study.factors]
    persona = study.persona_factors
    cells = pd.DataFrame([dict(c) for c in study.cells], columns=factors)
    cells["persona_id"] = [
        "|".join(f"{f}={c[f] if c[f] is not None else '*'}" for f in persona) for c in study.cells
    ]
    qids = pd.DataFrame({"question_id": [q.id for q in study.questions]})
    cells = qids.merge(cells, how="cross")
    return cells.assign(key=cell_key(cells, factors)).drop_duplicates("key").reset_index(drop=True)


def _cells_table(runs: list[Run], factors: list[str]) -> pd.DataFrame:
    frames = [r.prompts[["question_id", "persona_id", *factors]] for r in runs]
    cells = pd.concat(frames, ignore_index=True)
    cells = cells.assign(key=cell_key(cells, factors)).drop_duplicates("key")
    return cells.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# the comparison


def compare(
    runs: list[str | Path],
    human: str | Path | None = None,
    out: str | Path | None = None,
    config: CompareConfig | None = None,
    *,
    names: list[str] | None = None,
    study: Study | None = None,
) -> CompareResult:
    """Compare run folders (and human data); write tables, figures and a report to `out`.

    With no run folders, `human` and `study` describe the human data alone: per-group
    tables, the human baselines and the uniform / majority baselines over the study's cells."""
    config = config or CompareConfig()
    t0 = time.time()
    if not runs and (human is None or study is None):
        raise WorkbenchError(
            "no run folders to compare",
            fix="pass at least one RUN_DIR, or --human FILE and --study STUDY for human data alone",
        )
    labels: list[str | None] = list(names) if names else [None] * len(runs)
    loaded = [load_run(p, n) for p, n in zip(runs, labels, strict=True)]
    if len({r.name for r in loaded}) < len(loaded):
        raise WorkbenchError(
            "two runs have the same folder name", fix="pass --names to tell them apart"
        )
    study = study or study_from_manifest(loaded[0].manifest)
    timings: dict[str, float] = {}
    questions = {q.id: q for q in study.questions}
    qt = D.question_table(questions)
    factors = [f.name for f in study.factors]
    items: dict[str, pd.DataFrame] = {}
    kinds: dict[str, str] = {}
    for run in loaded:
        for name, (kind, frame) in _run_sources(run, factors).items():
            items[name], kinds[name] = frame, kind
    reference = next((n for n, k in kinds.items() if k == "logits"), None)

    pair_frames: list[pd.DataFrame] = []
    summary: list[dict[str, Any]] = []
    if reference is not None:
        for name in items:
            if name == reference:
                continue
            pairs = _pair(items[name], items[reference], qt, config, kinds[name] == "sampled")
            if len(pairs.frame):
                pair_frames.append(
                    pairs.frame.assign(level="item", source=name, reference=reference)
                )
                summary.extend(_summary_rows("item", name, reference, pairs, config))

    cells = _cells_table(loaded, factors) if loaded else study_cells(study)
    cell_sources = {name: _cell_level(frame) for name, frame in items.items()}
    human_data = None
    cell_pairs: dict[str, pd.DataFrame] = {}
    human_table = pd.DataFrame()
    if human is not None:
        t_load = time.time()
        human_data = load_human(human, study, prob_column=config.human_prob_column)
        timings["load_human"] = round(time.time() - t_load, 3)
        hname = config.human_label
        cell_sources[hname] = U.human_source(human_data, cells, questions)
        kinds[hname] = "human"
        if cell_sources[hname].empty:
            raise WorkbenchError(
                f"{human}: no human cell matches a cell the study asks",
                fix="check the question ids and factor columns/values of the human file",
            )
        for name, frame in U.baselines(cell_sources[hname], questions).items():
            cell_sources[name], kinds[name] = frame, "baseline"
        for name, frame in cell_sources.items():
            if name == hname:
                continue
            pairs = _pair(frame, cell_sources[hname], qt, config, kinds[name] == "sampled")
            if len(pairs.frame):
                cell_pairs[name] = pairs.frame
                pair_frames.append(pairs.frame.assign(level="cell", source=name, reference=hname))
                summary.extend(_summary_rows("cell", name, hname, pairs, config))
    groups = U.structural_groups(cells, study, human_data)
    structural = U.structural_gaps(groups, cell_sources, questions, config.human_label)
    if human_data is not None:
        human_table = U.human_metrics(
            cell_sources,
            config.human_label,
            kinds,
            items,
            cell_pairs,
            structural,
            questions,
            config,
        )
    rates, per_persona = [], []
    for run in loaded:
        if run.kind == "sampling":
            keys = item_key(run.prompts, factors)
            row, persona = sampling_rates(
                run, keys, items.get(reference) if reference else None, config
            )
            rates.append(row)
            per_persona.append(persona)
    extra: dict[str, pd.DataFrame] = {}
    if human_data is not None:
        t_groups = time.time()
        tables = group_tables(human_data, study, questions, config, cells, cell_pairs, cell_sources)
        extra = {
            "groups": tables.groups,
            "group_questions": tables.group_questions,
            "human_pairs": tables.human_pairs,
            "coverage": coverage_table(human_data, cells, cell_sources[config.human_label]),
        }
        timings["groups"] = round(time.time() - t_groups, 3)
    result = CompareResult(
        sources=items,
        cell_sources=cell_sources,
        kinds=kinds,
        reference=reference,
        pairs=pd.concat(pair_frames, ignore_index=True) if pair_frames else pd.DataFrame(),
        summary=pd.DataFrame(summary),
        properties=U.source_properties(cell_sources, questions, config),
        rates=pd.DataFrame(rates),
        human=human_table,
        structural=structural,
        mismatch_by_persona=pd.concat(per_persona, ignore_index=True)
        if per_persona
        else pd.DataFrame(),
        groups=extra.get("groups", pd.DataFrame()),
        group_questions=extra.get("group_questions", pd.DataFrame()),
        human_pairs=extra.get("human_pairs", pd.DataFrame()),
        coverage=extra.get("coverage", pd.DataFrame()),
    )
    result.manifest = {
        "kind": "compare",
        "runs": {r.name: str(r.path) for r in loaded},
        "reference": reference,
        "human": str(human) if human is not None else None,
        "human_format": human_data.format if human_data else None,
        "human_ignored_columns": list(human_data.ignored_columns) if human_data else [],
        "structural_weights": (
            "respondents' weighted shares"
            if human_data is not None and human_data.format == "respondents"
            else "product of the study's factor weights (uniform where none)"
        ),
        "config": asdict(config),
        "conventions": {
            "tv": "1/2 sum |p - q|",
            "js": "Jensen-Shannon distance, base 2, in [0, 1]",
            "kl_bits": f"KL(reference || source), bits, additive smoothing {config.smoothing} on both",
            "nw1": "W1 on the question's ordinal values / (max - min)",
            "floor": "E[TV(multinomial(n, reference)/n, reference)], n = the source's parsed answers",
            "bootstrap": f"{config.n_resamples} resamples, questions and personas resampled "
            f"independently (a unit with < {config.min_clusters} values kept as strata), "
            "percentile 95%",
            "cell_level": "each source averaged over option orders",
            "majority_baseline": "one-hot on the question's modal human option (mean over cells)",
            "distance": "representativeness distance: nw1 on ordinal questions, tv on nominal "
            "ones (no ordinal values, or all equal); representativeness = mean over questions "
            "of 1 - distance",
            "per_question_intervals": "normal (mean +- 1.96 sd / sqrt(n) over cells)",
            "group_floor": f"mean distance of {config.group_floor_sims} multinomial resamples "
            "of the human group cell's effective n from itself",
        },
        "git_hash": git_hash(),
        "versions": versions(),
        "timings_s": {**timings, "total": round(time.time() - t0, 3)},
    }
    if out is not None:
        write_comparison(result, out, questions)
    return result


def write_comparison(
    result: CompareResult, out: str | Path, questions: dict[str, Question]
) -> Path:
    """Tables (parquet), figures and report.html/report.md; manifest.json written last."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in TABLES:
        getattr(result, name).to_parquet(out / f"{name}.parquet", index=False)
    write_report(out, "workbench compare", report_blocks(result, questions))
    result.out_dir = out
    write_json(out / MANIFEST, result.manifest)
    return out
