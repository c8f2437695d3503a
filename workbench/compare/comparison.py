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

from workbench.compare import metrics as M
from workbench.compare import survey as U
from workbench.compare.figures import report_blocks
from workbench.compare.human import load_human
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


def cell_key(frame: pd.DataFrame, factors: list[str]) -> pd.Series:
    """Question + every factor value (`*`: unspecified): one survey cell."""
    key = frame["question_id"].astype(str)
    for f in factors:
        key = key + "|" + f + "=" + frame[f].astype("string").fillna("*")
    return key


def item_key(frame: pd.DataFrame, factors: list[str]) -> pd.Series:
    """A cell asked in one option order."""
    return cell_key(frame, factors) + "|order=" + frame["permutation"].astype(str)


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
    return out.assign(key=out["cell"], n=out["cell"].map(sizes), refusal=out["cell"].map(refusal))


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
    questions: dict[str, Question],
    config: CompareConfig,
    with_floor: bool,
) -> _Pairs:
    """Per shared key: tv, js, kl_bits (reference ‖ source), nw1, n and the sampling floor."""
    frames: list[pd.DataFrame] = []
    sims: dict[str, np.ndarray] = {}
    for qid, question in questions.items():
        src = source[source["question_id"] == qid]
        ref = reference[reference["question_id"] == qid]
        keys = sorted(set(src["key"]) & set(ref["key"]))
        if not keys:
            continue
        k = len(question.options)
        p, q = U.matrix(src, keys, k), U.matrix(ref, keys, k)
        first = src.groupby("key")[["persona_id", "n"]].first().reindex(keys)
        frame = pd.DataFrame(
            {
                "key": keys,
                "question_id": qid,
                "persona_id": first["persona_id"].to_numpy(),
                "tv": M.total_variation(p, q),
                "js": M.js_distance(p, q),
                "kl_bits": M.kl_bits(q, p, config.smoothing),
                "nw1": M.normalized_w1(p, q, question.values) if question.values else np.nan,
                "n": first["n"].to_numpy(dtype=float),
                "floor": np.nan,
            }
        )
        sizes = np.nan_to_num(frame["n"].to_numpy(), nan=0).astype(int)
        if with_floor and (sizes > 0).any():
            fl = M.sampling_floor(
                q, sizes, n_sims=config.floor_sims, seed=config.seed, keep_sims=True
            )
            frame["floor"] = fl.mean_tv
            assert fl.sims is not None
            sims[qid] = fl.sims
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return _Pairs(frame, sims)


def _summary_rows(
    level: str, source: str, reference: str, pairs: _Pairs, config: CompareConfig
) -> list[dict[str, Any]]:
    """All questions together (`question_id` "all"), then each question when there are more."""
    qids = list(pd.unique(pairs.frame["question_id"]))
    parts = [("all", qids)] + ([(q, [q]) for q in qids] if len(qids) > 1 else [])
    rows = []
    for label, chosen in parts:
        frame = pairs.frame[pairs.frame["question_id"].isin(chosen)]
        row: dict[str, Any] = {
            "level": level,
            "source": source,
            "reference": reference,
            "question_id": label,
            "n_keys": len(frame),
        }
        for col in ("tv", "js", "kl_bits", "nw1"):
            est = U.estimate(frame, frame[col], config)
            row.update({col: est.value, f"{col}_lo": est.lo, f"{col}_hi": est.hi})
        row["floor_mean"] = row["floor_q95"] = np.nan
        row["within_floor"] = None
        sims = [pairs.sims[q] for q in chosen if q in pairs.sims]
        if sims:
            joint = np.concatenate(sims, axis=1).mean(1)
            row["floor_mean"] = float(joint.mean())
            row["floor_q95"] = float(np.quantile(joint, 0.95))
            row["within_floor"] = bool(row["tv"] <= row["floor_q95"])
        row["mean_n"] = float(frame["n"].mean()) if frame["n"].notna().any() else np.nan
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# rates of a sampling run


def _rates(
    run: Run, factors: list[str], reference: pd.DataFrame | None, config: CompareConfig
) -> tuple[dict[str, Any], pd.DataFrame]:
    assert run.samples is not None
    prompts = run.prompts.assign(key=item_key(run.prompts, factors))
    s = run.samples.merge(
        prompts[["prompt_id", "key", "question_id", "persona_id"]], on="prompt_id"
    )
    n = len(s)
    row: dict[str, Any] = {"run": run.name, "elicitation": run.elicitation, "n_samples": n}
    for status in ("ok", "refusal", "unparseable"):
        k = int((s["status"] == status).sum())
        lo, hi = M.wilson_interval(k, n)
        row.update(
            {f"{status}_rate": k / n if n else np.nan, f"{status}_lo": lo, f"{status}_hi": hi}
        )
    per_persona = pd.DataFrame()
    if run.elicitation == "verbalized":
        errors = s.loc[s["status"] != "ok", "error"].fillna("refusal").str.split(":").str[0]
        row["failures"] = ", ".join(f"{k} {v}" for k, v in errors.value_counts().items())
        return row, per_persona
    if "answer_probs" in s.columns:
        row["answer_position_coverage"] = float(s["answer_probs"].notna().mean()) if n else np.nan
    ok = s[s["status"] == "ok"].copy()
    # A preamble: any word before the answer ("Sure! I'd give it a 4"), not just "(" or spaces.
    before = [t[: int(a)] for t, a in zip(ok["text"], ok["answer_start"].fillna(0), strict=True)]
    ok["late"] = [float(b.strip(" \t\n([*\"'") != "") for b in before]
    per_item = ok.groupby("key").agg(
        question_id=("question_id", "first"),
        persona_id=("persona_id", "first"),
        n=("late", "size"),
        preamble=("late", "mean"),
    )
    est = U.estimate(per_item, per_item["preamble"], config, weights=per_item["n"])
    row.update(preamble_rate=est.value, preamble_lo=est.lo, preamble_hi=est.hi)
    if reference is None:
        return row, per_persona
    ref = reference.sort_values("prob", ascending=False).drop_duplicates("key")
    argmax = ref.set_index("key")["option_id"]
    top = ref.set_index("key")["prob"]
    ok["mismatch"] = (ok["option_id"].astype(float) != ok["key"].map(argmax)).astype(float)
    ok = ok[ok["key"].isin(argmax.index)]
    per_item = ok.groupby("key").agg(
        question_id=("question_id", "first"),
        persona_id=("persona_id", "first"),
        n=("mismatch", "size"),
        mismatch=("mismatch", "mean"),
    )
    per_item["expected"] = 1.0 - top.reindex(per_item.index).to_numpy(dtype=float)
    counts = ok.groupby(["key", "option_id"]).size().reset_index(name="c")
    mode = (
        counts.sort_values("c", ascending=False)
        .drop_duplicates("key")
        .set_index("key")["option_id"]
    )
    differs = mode.reindex(per_item.index).to_numpy() != argmax.reindex(per_item.index).to_numpy()
    per_item["mode_differs"] = differs.astype(float)
    for col, name in (
        ("mismatch", "sample_mismatch"),
        ("expected", "sample_mismatch_from_logits"),
    ):
        est = U.estimate(per_item, per_item[col], config, weights=per_item["n"])
        row.update({name: est.value, f"{name}_lo": est.lo, f"{name}_hi": est.hi})
    est = U.estimate(per_item, per_item["mode_differs"], config)
    row.update(prompt_mismatch=est.value, prompt_mismatch_lo=est.lo, prompt_mismatch_hi=est.hi)
    per_persona = (
        per_item.assign(weighted=per_item["mismatch"] * per_item["n"])
        .groupby("persona_id")
        .agg(weighted=("weighted", "sum"), n=("n", "sum"), prompts=("n", "size"))
        .reset_index()
    )
    per_persona["sample_mismatch"] = per_persona["weighted"] / per_persona["n"]
    per_persona = per_persona.drop(columns="weighted").assign(run=run.name)
    return row, per_persona


# --------------------------------------------------------------------------------------------
# human metrics


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
    """Compare run folders (and human data); write tables, figures and a report to `out`."""
    config = config or CompareConfig()
    t0 = time.time()
    if not runs:
        raise WorkbenchError("no run folders to compare", fix="pass at least one RUN_DIR")
    labels: list[str | None] = list(names) if names else [None] * len(runs)
    loaded = [load_run(p, n) for p, n in zip(runs, labels, strict=True)]
    if len({r.name for r in loaded}) < len(loaded):
        raise WorkbenchError(
            "two runs have the same folder name", fix="pass --names to tell them apart"
        )
    study = study or study_from_manifest(loaded[0].manifest)
    questions = {q.id: q for q in study.questions}
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
            pairs = _pair(
                items[name], items[reference], questions, config, kinds[name] == "sampled"
            )
            if len(pairs.frame):
                pair_frames.append(
                    pairs.frame.assign(level="item", source=name, reference=reference)
                )
                summary.extend(_summary_rows("item", name, reference, pairs, config))

    cells = _cells_table(loaded, factors)
    cell_sources = {name: _cell_level(frame) for name, frame in items.items()}
    human_data = None
    cell_pairs: dict[str, pd.DataFrame] = {}
    human_table = pd.DataFrame()
    if human is not None:
        human_data = load_human(human, study, prob_column=config.human_prob_column)
        hname = config.human_label
        cell_sources[hname] = U.human_source(human_data, cells, questions)
        kinds[hname] = "human"
        if cell_sources[hname].empty:
            raise WorkbenchError(
                f"{human}: no human cell matches a prompt of the runs",
                fix="check the question ids and factor columns/values of the human file",
            )
        for name, frame in U.baselines(cell_sources[hname], questions).items():
            cell_sources[name], kinds[name] = frame, "baseline"
        for name, frame in cell_sources.items():
            if name == hname:
                continue
            pairs = _pair(frame, cell_sources[hname], questions, config, kinds[name] == "sampled")
            if len(pairs.frame):
                cell_pairs[name] = pairs.frame
                pair_frames.append(pairs.frame.assign(level="cell", source=name, reference=hname))
                summary.extend(_summary_rows("cell", name, hname, pairs, config))
    groups = U.structural_groups(cells, study, human_data)
    structural = U.structural_gaps(groups, cell_sources, questions)
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
            row, persona = _rates(run, factors, items.get(reference) if reference else None, config)
            rates.append(row)
            per_persona.append(persona)
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
        },
        "git_hash": git_hash(),
        "versions": versions(),
        "timings_s": {"total": round(time.time() - t0, 3)},
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
