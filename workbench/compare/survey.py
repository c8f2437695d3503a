"""Survey metrics of answer distributions against human data, per cell (docs/MEASUREMENT.md §4).

Used by `workbench.compare`. Every function works on tidy tables with one row per (key,
option): `key` (a cell), `question_id`, `persona_id`, `option_id`, `prob` (over the
substantive options), `n` (parsed answers, if sampled) and `refusal` (the refusal options'
share, used to mix conditional distributions). Here live the human source and the uniform
and majority baselines, representativeness (OpinionQA: 1 - normalized W1 on ordinal
questions, 1 - TV on nominal ones), homogenization (Das Man), structural consistency (Das
Man: coarse groups vs the weighted mixture of their subgroups), A-bias, the
knowledge-to-simulation gap (Meister) and per-source distribution properties; every
aggregate with a bootstrap interval over questions and personas (`estimate`). All of it works
on padded arrays of every cell at once (`workbench.compare.dense`), never per question.
"""

from __future__ import annotations

import itertools
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from workbench.compare import dense as D
from workbench.compare import metrics as M
from workbench.compare.human import HumanData
from workbench.study.spec import Question, Study

if TYPE_CHECKING:
    from workbench.compare.comparison import CompareConfig


def estimate(
    frame: pd.DataFrame, values: Any, config: CompareConfig, weights: Any = None
) -> M.Estimate:
    """Bootstrap over questions and personas (each only with >= `min_clusters` values)."""
    units = [frame["question_id"].to_numpy(), frame["persona_id"].astype(str).to_numpy()]
    units = [u for u in units if len(pd.unique(u)) >= config.min_clusters]
    return M.bootstrap_ci(
        np.asarray(values, dtype=float),
        units,
        n_resamples=config.n_resamples,
        seed=config.seed,
        weights=weights,
    )


def human_source(
    human: HumanData, cells: pd.DataFrame, questions: dict[str, Question]
) -> pd.DataFrame:
    found = human.distributions(cells)
    found = found.merge(
        cells[["key", "question_id", "persona_id"]], left_on="cell", right_index=True
    )
    return found.assign(cell=found["key"], position=np.nan)[
        [
            "key",
            "cell",
            "question_id",
            "persona_id",
            "option_id",
            "position",
            "prob",
            "n",
            "n_eff",
            "refusal",
        ]
    ]


def baselines(human: pd.DataFrame, questions: dict[str, Question]) -> dict[str, pd.DataFrame]:
    """Uniform (1/K) and majority (one-hot on the question's modal option, human
    distributions averaged over cells) for every human cell."""
    k = pd.Series({q: len(v.options) for q, v in questions.items()})
    mean = human.groupby(["question_id", "option_id"], sort=True)["prob"].mean().reset_index()
    mode = mean.loc[mean.groupby("question_id")["prob"].idxmax()].set_index("question_id")
    base = human[["key", "cell", "question_id", "persona_id", "option_id", "position"]]
    base = base.assign(n=np.nan, n_eff=np.nan, refusal=0.0)
    uniform = base.assign(prob=1.0 / base["question_id"].map(k).to_numpy(dtype=float))
    majority = base.assign(
        prob=(base["option_id"] == base["question_id"].map(mode["option_id"])).astype(float)
    )
    return {"uniform": uniform, "majority": majority}


def factor_weight(study: Study, factor: str, value: str) -> float:
    f = study.factor(factor)
    return f.weights[f.values.index(value)] if f.weights else 1.0 / len(f.values)


def structural_groups(
    cells: pd.DataFrame, study: Study, human: HumanData | None = None
) -> list[dict[str, Any]]:
    """Coarse cells G whose subgroups by some persona factors F were all asked directly.

    For a cell G and a non-empty set F of the persona factors G leaves unspecified, the
    subgroups are the cells that equal G except that they specify every value combination of
    F (the other factors as in G). Only complete partitions count. Weights P(s | G): the
    product of the study's factor weights (uniform where a factor has none), or, for
    respondent-level human data, the respondents' weighted shares among those of G who are in
    some subgroup; `covered_share` is the share of G's respondents (weighted) in a subgroup
    (NaN for proportions: unknown). Candidate F are read off the specified-factor sets the
    study asks, so a study of many factors costs no more than the sets it has.
    """
    factors = [f.name for f in study.factors]
    persona = set(study.persona_factors)
    frame = cells[["question_id", "key", *factors]].copy()
    sig = frame[factors].astype(object).where(frame[factors].notna(), None)
    signatures = [tuple(r) for r in sig.itertuples(index=False)]
    index = dict(zip(zip(frame["question_id"], signatures, strict=True), frame["key"], strict=True))
    persona_sigs = list(dict.fromkeys(signatures))
    specsets = {
        frozenset(f for f, v in zip(factors, s, strict=True) if v is not None) for s in persona_sigs
    }
    qids_by_sig: dict[tuple[Any, ...], list[str]] = {}
    for qid, s in index:
        qids_by_sig.setdefault(s, []).append(qid)
    candidates = []
    for s in persona_sigs:
        values = dict(zip(factors, s, strict=True))
        given = frozenset(f for f in factors if values[f] is not None)
        for other in sorted(specsets, key=sorted):  # sets iterate in hash order
            extra = other - given
            if given < other and extra <= persona:
                candidates.append((s, tuple(f for f in factors if f in extra)))
    weight_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}
    groups = []
    for s, by in candidates:
        values = dict(zip(factors, s, strict=True))
        combos = list(itertools.product(*(study.factor(f).values for f in by)))
        fills = [
            tuple({**values, **dict(zip(by, c, strict=True))}[f] for f in factors) for c in combos
        ]
        study_w = [
            float(np.prod([factor_weight(study, f, v) for f, v in zip(by, c, strict=True)]))
            for c in combos
        ]
        respondents = human is not None and human.format == "respondents"
        for qid in qids_by_sig[s]:
            members = [index.get((qid, fill)) for fill in fills]
            if any(m is None for m in members):
                continue
            weights, covered, direct = study_w, float("nan"), None
            if respondents:
                assert human is not None
                spec = {f: v for f, v in values.items() if v is not None and f in human.factors}
                weights, covered, direct = _respondent_weights(
                    human, study, qid, spec, by, combos, weight_cache
                )
            groups.append(
                {
                    "question_id": qid,
                    "group": index[(qid, s)],
                    "by": ",".join(by),
                    "members": members,
                    "weights": weights,
                    "covered_share": covered,
                    "covered_direct": direct,
                }
            )
    return groups


def _respondent_weights(
    human: HumanData,
    study: Study,
    qid: str,
    spec: dict[str, str],
    by: tuple[str, ...],
    combos: list[tuple[str, ...]],
    cache: dict[tuple[tuple[str, ...], tuple[str, ...]], Any],
) -> tuple[list[float], float, np.ndarray | None]:
    """P(s | G) among G's respondents in some subgroup, their share of G (weighted), and the
    human distribution of G on that covered part (substantive options, renormalized): one
    group-by per (specified factors, F) over the whole file, then dictionary look-ups."""
    names = tuple(sorted(spec))
    by_known = tuple(f for f in by if f in human.factors)
    if not by_known:
        return [1.0 / len(combos)] * len(combos), float("nan"), None
    key = (names, by_known)
    if key not in cache:
        t = human.table
        covered_rows = np.ones(len(t), dtype=bool)
        for f in by_known:
            covered_rows &= t[f].isin(study.factor(f).values).to_numpy()
        group = ["question_id", *names]
        sums = t.groupby([*group, *by_known], observed=True)["weight"].sum()
        total = t.groupby(group, observed=True)["weight"].sum()
        options = t[covered_rows].groupby([*group, "option_id"], observed=True)["weight"].sum()
        per_group: dict[Any, dict[int, float]] = {}
        for k, w in options.items():
            kt = cast(tuple[Any, ...], k)
            per_group.setdefault(kt[:-1] if len(kt) > 2 else kt[0], {})[int(kt[-1])] = float(w)
        cache[key] = (sums.to_dict(), total.to_dict(), per_group)
    sums_d, total_d, options_d = cache[key]
    at = (qid, *(spec[n] for n in names))
    total_w = float(total_d.get(at if names else qid, 0.0))
    pick = [tuple(c[by.index(f)] for f in by_known) for c in combos]
    shares = [float(sums_d.get((*at, *p_), 0.0)) for p_ in pick]
    covered = sum(shares)
    mass = options_d.get(at if names else qid)
    if covered <= 0 or not mass:
        return [0.0] * len(combos), 0.0, None
    k = len(human.questions[qid].options)
    direct = np.array([mass.get(o, 0.0) for o in range(k)])
    own = direct / direct.sum() if direct.sum() > 0 else None
    share = covered / total_w if total_w > 0 else float("nan")
    return [x / covered for x in shares], share, own


def structural_gaps(
    groups: list[dict[str, Any]],
    cell_sources: dict[str, pd.DataFrame],
    questions: dict[str, Question],
    human_name: str | None = None,
) -> pd.DataFrame:
    """TV and JS between each group's direct distribution and the weighted mixture of its
        subgroups, per source; `covered_share` says which share of G the subgroups cover. The
        mixture weighs a subgroup by P(s | G) x P(substantive | s) (the law of total probability
        for conditional distributions), so for human respondent data, whose P(s | G) are taken
        among the covered respondents, the direct distribution of the human source (`human_name`) is
    taken on the covered part too, and the gap is then 0 by the law of total probability."""
    if not groups:
        return pd.DataFrame()
    g = pd.DataFrame(groups)
    g["gid"] = np.arange(len(g))
    links = g[["gid", "members", "weights"]].explode(["members", "weights"])
    rows = []
    for name, frame in cell_sources.items():
        qs = sorted(frame["question_id"].unique())
        kmax = max((len(questions[q].options) for q in qs if q in questions), default=0)
        kmax = max(kmax, int(frame["option_id"].max()) + 1 if len(frame) else 1)
        codes, keys = pd.factorize(frame["key"], sort=True)
        p = np.zeros((len(keys), kmax))
        np.add.at(
            p, (codes, frame["option_id"].to_numpy(dtype=np.int64)), frame["prob"].to_numpy(float)
        )
        refusal = frame.groupby(codes)["refusal"].first().fillna(0.0).to_numpy()
        pos = pd.Index(keys)
        member = pos.get_indexer(links["members"].astype(str))
        direct = pos.get_indexer(g["group"])
        complete = pd.Series(member >= 0).groupby(links["gid"].to_numpy()).all()
        ok = (direct >= 0) & complete.reindex(g["gid"]).fillna(False).to_numpy(dtype=bool)
        if not ok.any():
            continue
        keep = ok[links["gid"].to_numpy(dtype=int)]
        gid = links["gid"].to_numpy(dtype=int)[keep]
        m = member[keep]
        w = links["weights"].to_numpy(dtype=float)[keep] * (1.0 - refusal[m])
        wsum = np.bincount(gid, weights=w, minlength=len(g))
        mix = np.zeros((len(g), kmax))
        np.add.at(mix, gid, p[m] * w[:, None])
        with np.errstate(invalid="ignore", divide="ignore"):
            mix = mix / wsum[:, None]
        d = p[direct[ok]]
        mx = mix[ok]
        sub = g[ok]
        if name == human_name and "covered_direct" in sub:
            for i, own in enumerate(sub["covered_direct"]):
                if own is not None:
                    d[i, : len(own)] = own
                    d[i, len(own) :] = 0.0
        rows.append(
            pd.DataFrame(
                {
                    "question_id": sub["question_id"].to_numpy(),
                    "group": sub["group"].to_numpy(),
                    "by": sub["by"].to_numpy(),
                    "n_subgroups": sub["members"].map(len).to_numpy(),
                    "covered_share": sub["covered_share"].to_numpy(dtype=float),
                    "source": name,
                    "gap_tv": M.total_variation(d, mx),
                    "gap_js": M.js_distance(d, mx),
                    "argmax_agrees": d.argmax(1) == mx.argmax(1),
                }
            )
        )
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def grouped_means(
    frame: pd.DataFrame, by: list[str], cols: list[str], level: float = 0.95
) -> pd.DataFrame:
    """Mean of `cols` per group with a normal interval (mean ± z·sd/√n; the mean itself
    where n = 1): the per-question rows of a large survey, where a bootstrap per question
    would cost thousands of resampling runs (the pooled rows keep the bootstrap)."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    grouped = frame.groupby(by, sort=False)[cols]
    mean, sd, n = grouped.mean(), grouped.std(ddof=1), grouped.count()
    half = (sd * z / n.pow(0.5)).fillna(0.0)
    out = mean.copy()
    for c in cols:
        out[f"{c}_lo"] = mean[c] - half[c]
        out[f"{c}_hi"] = mean[c] + half[c]
    return out.reset_index()


def human_metrics(
    cell_sources: dict[str, pd.DataFrame],
    human_name: str,
    kinds: dict[str, str],
    item_sources: dict[str, pd.DataFrame],
    cell_pairs: dict[str, pd.DataFrame],
    structural: pd.DataFrame,
    questions: dict[str, Question],
    config: CompareConfig,
) -> pd.DataFrame:
    qt = D.question_table(questions)
    human = D.to_dense(cell_sources[human_name], qt)
    rows = []
    for name, frame in cell_sources.items():
        pf = cell_pairs.get(name)
        row: dict[str, Any] = {"source": name, "kind": kinds[name]}
        if pf is not None and len(pf):
            per_q = pf.groupby("question_id")["key"].transform("size")
            est = estimate(pf, 1.0 - pf["distance"], config, weights=1.0 / per_q)
            row.update(
                representativeness=est.value,
                representativeness_lo=est.lo,
                representativeness_hi=est.hi,
            )
            for col, label in (("tv", "mean_tv"), ("js", "mean_js")):
                est = estimate(pf, pf[col], config)
                row.update({label: est.value, f"{label}_lo": est.lo, f"{label}_hi": est.hi})
            row["n_cells"] = len(pf)
            row["n_nominal_questions"] = int(pf.loc[pf["metric"] == "tv", "question_id"].nunique())
        _, p, h, _ = D.align(D.to_dense(frame, qt), human)
        if len(p):
            hm = M.homogenization(p, h, config.homogenization_threshold)
            row["homogenized_share"] = hm.model_share
            row["human_homogenized_share"] = hm.human_share
            row["entropy_ratio_mean"] = hm.entropy_ratio_mean
            row["entropy_ratio_median"] = hm.entropy_ratio_median
        sub = structural[structural["source"] == name] if len(structural) else structural
        if len(sub):
            row.update(
                structural_gap_tv=float(sub["gap_tv"].mean()),
                structural_argmax_agree=float(sub["argmax_agrees"].mean()),
                structural_groups=len(sub),
                structural_covered_share=float(sub["covered_share"].mean()),
            )
        items = item_sources.get(name)
        if items is not None and items["position"].notna().any():
            first_mask = items["position"] == 0
            first = items[first_mask]
            k = items.groupby("key")["option_id"].transform("size")
            bias = first["prob"].to_numpy() - 1.0 / k[first_mask].to_numpy()
            est = estimate(first, bias, config)
            row.update(a_bias=est.value, a_bias_lo=est.lo, a_bias_hi=est.hi)
        rows.append(row)
    out = pd.DataFrame(rows)
    seq = [r for r in rows if r["kind"] == "sampled" and "mean_tv" in r]
    verb = [r for r in rows if r["kind"] == "verbalized" and "mean_tv" in r]
    if seq and verb:
        out["k2s_gap"] = np.nan
        for r in verb:
            gap = M.knowledge_to_simulation_gap(seq[0]["mean_tv"], r["mean_tv"])
            out.loc[out["source"] == r["source"], "k2s_gap"] = gap
    return out


def source_properties(
    cell_sources: dict[str, pd.DataFrame], questions: dict[str, Question], config: CompareConfig
) -> pd.DataFrame:
    """Per source and question: normalized entropy, modal share and expected score (ordinal
    questions), mean over cells with a normal 95% interval (`grouped_means`)."""
    qt = D.question_table(questions)
    parts = []
    for name, frame in cell_sources.items():
        d = D.to_dense(frame, qt)
        if not len(d.keys):
            continue
        stats = pd.DataFrame(
            {
                "question_id": np.asarray(qt.ids, dtype=object)[d.qidx],
                "qidx": d.qidx,
                "normalized_entropy": D.entropy_norm(d.p, d.qidx, qt),
                "modal_share": M.modal_share(d.p),
                "expected_score": D.expected_score(d.p, d.qidx, qt),
            }
        )
        cols = ["normalized_entropy", "modal_share", "expected_score"]
        table = grouped_means(stats, ["qidx", "question_id"], cols)
        table["n_cells"] = stats.groupby("qidx", sort=False).size().to_numpy()
        parts.append(table.sort_values("qidx").drop(columns="qidx").assign(source=name))
    if not parts:
        return pd.DataFrame()
    out = pd.concat(parts, ignore_index=True)
    first = ["source", "question_id", "n_cells"]
    return out[first + [c for c in out.columns if c not in first]]
