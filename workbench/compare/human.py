"""Human survey data, read against a study: aggregated proportions or weighted respondent rows.

Two formats, told apart by their columns (CSV, parquet, JSONL or JSON records, read with
pandas); both are keyed by `question_id` and any of the study's factor columns:

- **proportions**: one row per (question, cell, option) with a probability column
  (`prob`, or the column named by `prob_column`); the option is `option_id` (canonical
  index), or `option` (option text, label or ordinal value). Per question and cell the
  numbers must sum to 1 (or to 100: percentages, divided by 100). A factor left empty means
  the cell leaves it unspecified (a coarse group such as "all Democrats").
- **respondents**: one row per respondent and question with an `answer` column (option text,
  label, ordinal value or option id) and an optional `weight` column (survey weights,
  default 1); or the *wide* form, one row per respondent with one column per question id.
  A cell's distribution is the weighted share of the respondents matching its specified
  factors (a coarse cell takes everyone), so any cell can be asked for.

Factor columns that the file does not have do not matter: a survey without a `title`
column answers the same for every title. Other columns are ignored (and listed).

A file may hold more than the study asks: questions the study lacks, and factor values it
lacks (Independents beside Democrats and Republicans) are counted for the coverage table and
left out of every cell that names a factor value, while a respondent with an unknown (or
empty) value still belongs to every coarse cell that leaves the factor unspecified ("everyone"
is everyone). A file that matches no question of the study, or a factor column none of whose
values is one of the study's, is an error (the coding differs).

Sample sizes: a proportions file may carry `n` (respondents behind each question and cell);
respondent rows give the respondents behind each cell (`respondent_id` if present, else one
per row) and Kish's effective sample size (Σw)² / Σw² of their weights.
Every problem raises a `WorkbenchError` naming the file, the column (and row) and the fix.
Refusal options ("Don't know") are kept out of the distribution, which is renormalized over
the substantive options, and reported as the refusal share (as OpinionQA does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from workbench.compare.codes import Groups
from workbench.errors import WorkbenchError
from workbench.study.spec import Question, Study

Format = Literal["proportions", "respondents"]
PROB_TOLERANCE = 0.02
"""|sum - 1| allowed per question and cell in a proportions file before it is an error."""
OUT_COLUMNS = ["cell", "option_id", "prob", "refusal", "n", "n_eff"]


def _fail(path: Path | str, field_name: str, message: str, fix: str) -> WorkbenchError:
    return WorkbenchError(f"{field_name}: {message}", fix=fix, file=str(path))


@dataclass
class HumanData:
    """Human answers, normalized: option ids resolved, factor values checked."""

    path: str
    format: Format
    factors: tuple[str, ...]
    """The study factors the file has columns for."""
    table: pd.DataFrame
    """proportions: question_id, <factors>, option_id, prob (over all options, sums to 1), n;
    respondents: question_id, <factors> (values outside the study kept), option_id, weight,
    respondent."""
    ignored_columns: tuple[str, ...] = ()
    percentages: bool = False
    """The proportions were given in percent (divided by 100)."""
    questions: dict[str, Question] = field(default_factory=dict, repr=False)
    extra_questions: dict[str, int] = field(default_factory=dict)
    """Question ids of the file that the study lacks -> rows (left out)."""
    extra_values: dict[str, dict[str, int]] = field(default_factory=dict)
    """factor -> value of the file that the study lacks -> rows (in no cell naming the factor)."""
    n_rows: int = 0
    """Rows of the file (after melting a wide file)."""
    _cache: dict[tuple[str, ...], Groups] = field(default_factory=dict, repr=False, compare=False)
    _flags: dict[str, bool] = field(default_factory=dict, repr=False, compare=False)

    @property
    def respondents(self) -> int | None:
        if self.format != "respondents":
            return None
        return int(self.table["respondent"].nunique())

    def distributions(self, cells: pd.DataFrame) -> pd.DataFrame:
        """Human distributions for `cells` (question_id + the study's factor columns).

        Returns one row per (cell row, substantive option): `cell` (the row's index in
        `cells`), `option_id`, `prob` (renormalized over substantive options), `refusal`
        (the refusal share), `n` (respondents; a proportions file's `n` column, else NaN) and
        `n_eff` (Kish's effective n of the weights; `n` for proportions).
        Cells without human data are absent.
        """
        if self.format == "proportions":
            return self._from_proportions(cells)
        return self._from_respondents(cells)

    def _finish(self, long: pd.DataFrame) -> pd.DataFrame:
        """long: cell, question_id, option_id, mass, n, n_eff -> renormalized substantive rows."""
        if long.empty:
            return pd.DataFrame(columns=OUT_COLUMNS)
        codes, cells = pd.factorize(long["cell"], sort=True)
        per_cell = long.groupby(codes, sort=True)[["question_id", "n", "n_eff"]].first()
        mass = np.zeros((len(cells), self._k_all))
        np.add.at(
            mass, (codes, long["option_id"].to_numpy(dtype=np.int64)), long["mass"].to_numpy(float)
        )
        return self._finish_dense(
            np.asarray(cells),
            per_cell["question_id"].astype(str).to_numpy(dtype=object),
            mass,
            per_cell["n"].to_numpy(float),
            per_cell["n_eff"].to_numpy(float),
        )

    @property
    def _k_all(self) -> int:
        return max(len(q.all_options) for q in self.questions.values())

    def _finish_dense(
        self,
        cells: np.ndarray,
        qids: np.ndarray,
        mass: np.ndarray,
        n: np.ndarray,
        n_eff: np.ndarray,
    ) -> pd.DataFrame:
        """One row per cell: its label, question, option masses [cell, option], n, n_eff."""
        if not len(cells):
            return pd.DataFrame(columns=OUT_COLUMNS)
        order = list(self.questions)
        qpos = pd.Index(order).get_indexer(pd.Index(qids))
        k_sub = np.array([len(self.questions[q].options) for q in order])[qpos]
        real = np.arange(mass.shape[1])[None, :] < k_sub[:, None]
        substantive = (mass * real).sum(1)
        total = mass.sum(1)
        keep = substantive > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            prob = mass / substantive[:, None]
            refusal = (total - substantive) / total
        r, o = np.nonzero(real & keep[:, None])
        return pd.DataFrame(
            {
                "cell": cells[r],
                "option_id": o,
                "prob": prob[r, o],
                "refusal": refusal[r],
                "n": n[r],
                "n_eff": n_eff[r],
            }
        )

    def _from_proportions(self, cells: pd.DataFrame) -> pd.DataFrame:
        keys = ["question_id", *self.factors]
        left = cells[keys].astype("string").fillna("*").assign(cell=cells.index.to_numpy())
        table = self.table.copy()
        table[list(keys)] = table[list(keys)].astype("string").fillna("*")
        merged = left.merge(table, on=keys)
        merged = merged.rename(columns={"prob": "mass"}).assign(n_eff=merged["n"])
        return self._finish(merged)

    def _from_respondents(self, cells: pd.DataFrame) -> pd.DataFrame:
        spec = cells[list(self.factors)].notna().to_numpy()
        pattern = (
            spec @ (1 << np.arange(len(self.factors)))
            if self.factors
            else np.zeros(len(cells), int)
        )
        found, rows = [], []
        for code in np.unique(pattern):
            names = tuple(f for i, f in enumerate(self.factors) if code >> i & 1)
            at = np.flatnonzero(pattern == code)
            groups = self._groups(names)
            g = groups.find(self._row_codes(cells.iloc[at], names))
            found.append(at[g >= 0])
            rows.append((groups, g[g >= 0]))
        at = np.concatenate(found)
        order = np.argsort(cells.index.to_numpy()[at], kind="stable")
        mass = np.concatenate([grp.mass[g] for grp, g in rows])[order]
        n = np.concatenate([grp.n[g] for grp, g in rows])[order]
        n_eff = np.concatenate([grp.n_eff[g] for grp, g in rows])[order]
        at = at[order]
        qids = cells["question_id"].astype(str).to_numpy(dtype=object)[at]
        return self._finish_dense(cells.index.to_numpy()[at], qids, mass, n, n_eff)

    def _row_codes(self, frame: pd.DataFrame, names: tuple[str, ...]) -> list[np.ndarray]:
        """The table's category codes of `frame`'s question and `names` values (-1: absent)."""
        table = self.table
        out = []
        for col in ("question_id", *names):
            cats = table[col].cat.categories
            values = pd.Index(frame[col].astype(str).to_numpy(dtype=object))
            out.append(np.asarray(cats.get_indexer(values), dtype=np.int64))
        return out

    def _groups(self, names: tuple[str, ...]) -> Groups:
        """Every (question, values of `names`) group's weighted option counts, respondents and
        Kish n, from integer codes: one pass over the rows per pattern of specified factors,
        kept, so the human source and the per-group tables share it."""
        if names not in self._cache:
            t = self.table
            codes = [t[c].cat.codes.to_numpy(dtype=np.int64) for c in ("question_id", *names)]
            sizes = [len(t[c].cat.categories) for c in ("question_id", *names)]
            groups = Groups(sizes)
            ok = np.all(np.stack(codes) >= 0, axis=0)
            key = groups.key([c[ok] for c in codes], build=True)
            uniq, inv = np.unique(key, return_inverse=True)
            inv = inv.reshape(-1)
            k_all = self._k_all
            option = t["option_id"].to_numpy(dtype=np.int64)[ok]
            w = t["weight"].to_numpy(dtype=float)[ok]
            groups.uniq = uniq
            mass = np.bincount(inv * k_all + option, weights=w, minlength=len(uniq) * k_all)
            groups.mass = mass.astype(float).reshape(len(uniq), k_all)
            wsum = np.bincount(inv, weights=w, minlength=len(uniq))
            w2sum = np.bincount(inv, weights=t["w2"].to_numpy(dtype=float)[ok], minlength=len(uniq))
            with np.errstate(invalid="ignore", divide="ignore"):
                groups.n_eff = np.where(w2sum > 0, wsum**2 / w2sum, np.nan)
            respondent = t["respondent"].to_numpy(dtype=np.int64)[ok]
            if self._one_row_per_answer() or not len(respondent):
                groups.n = np.bincount(inv, minlength=len(uniq)).astype(float)
            else:
                pairs = np.unique(inv * (int(respondent.max()) + 1) + respondent)
                groups.n = np.bincount(
                    pairs // (int(respondent.max()) + 1), minlength=len(uniq)
                ).astype(float)
            self._cache[names] = groups
        return self._cache[names]

    def _one_row_per_answer(self) -> bool:
        """No respondent answers a question twice (then a group's respondents are its rows)."""
        if "one_row" not in self._flags:
            t = self.table
            pair = t["question_id"].cat.codes.to_numpy(dtype=np.int64) * (
                int(t["respondent"].max()) + 1
            ) + t["respondent"].to_numpy(dtype=np.int64)
            self._flags["one_row"] = len(np.unique(pair)) == len(pair)
        return self._flags["one_row"]

    def subgroup_weights(
        self, question_id: str, group: dict[str, str], by: list[str], values: list[tuple[str, ...]]
    ) -> tuple[list[float], float]:
        """Respondents only: P(s | G) for the value combinations `values` of the factors `by`
        among the respondents of `question_id` in group `group` (weighted shares), and the
        share of G's weight those subgroups cover (respondents with another or no value of
        `by` are in G but in no subgroup)."""
        rows = self.table[self.table["question_id"] == question_id]
        for f, v in group.items():
            rows = rows[rows[f] == v]
        total = float(rows["weight"].sum())
        weights = rows.groupby(by, observed=True)["weight"].sum()
        shares = [float(weights.get(c if len(c) > 1 else c[0], 0.0)) for c in values]
        covered = sum(shares)
        if covered <= 0:
            return [0.0] * len(values), 0.0
        return [s / covered for s in shares], covered / total if total > 0 else 0.0

    def covered(
        self, question_id: str, group: dict[str, str], by: list[str], values: list[tuple[str, ...]]
    ) -> pd.DataFrame:
        """Respondents of `question_id` in `group` whose values of `by` are among `values`."""
        rows = self.table[self.table["question_id"] == question_id]
        for f, v in group.items():
            rows = rows[rows[f] == v]
        combos = (
            rows[by].astype(str).apply(tuple, axis=1) if len(rows) else pd.Series([], dtype=object)
        )
        return rows[combos.isin(set(values)).to_numpy()]


def _read(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".json":
            return pd.read_json(path, orient="records", dtype=False)
    except (ValueError, OSError) as err:
        raise _fail(path, "(file)", f"cannot read it: {err}", "check the file's format") from None
    raise _fail(
        path, "(file)", f"unsupported file type {suffix!r}", "use .csv, .parquet, .jsonl or .json"
    )


def _text(value: object) -> str | None:
    """A factor value as the study writes it; None for empty/missing."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    return text if text.strip() and text != "<NA>" else None


def _coded(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """`_text` of every value as integer codes into sorted distinct texts (-1: empty).

    `_text` runs once per distinct value, and the column is never turned into a million
    Python objects (files of millions of rows)."""
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    texts = [_text(u) for u in np.asarray(uniques, dtype=object)]
    cats = np.array(sorted({t for t in texts if t is not None}), dtype=object)
    at = {t: i for i, t in enumerate(cats)}
    remap = np.array([at[t] if t is not None else -1 for t in texts] + [-1], dtype=np.int64)
    return remap[codes], cats


def _decode(codes: np.ndarray, cats: np.ndarray) -> np.ndarray:
    out = np.full(len(codes), None, dtype=object)
    have = codes >= 0
    out[have] = cats[codes[have]]
    return out


def _texts(column: pd.Series) -> pd.Series:
    """`_text` of every value (see `_coded`)."""
    return pd.Series(_decode(*_coded(column)), index=column.index, dtype=object)


def _option_names(question: Question, by_id: bool) -> dict[str, int]:
    """How a file names an option: its id (`option_id` columns), else its text (any case),
    canonical label or ordinal value (`option` and `answer` columns)."""
    names: dict[str, int] = {}
    if by_id:
        return {str(o): o for o in range(len(question.all_options))}
    for o, text in enumerate(question.all_options):
        names[text.casefold()] = o
        names[question.label_at(o, text).casefold()] = o
    if question.values is not None:
        values = [f"{v:g}" for v in question.values]
        for o, v in enumerate(values):
            if values.count(v) == 1:
                names.setdefault(v, o)
    return names


def load_human(path: str | Path, study: Study, *, prob_column: str = "prob") -> HumanData:
    """Read and validate a human data file against `study` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "(file)", "no such file", "check the path given to --human")
    frame = _read(path)
    if frame.empty:
        raise _fail(path, "(file)", "has no rows", "add at least one row")
    frame.columns = [str(c) for c in frame.columns]
    questions = {q.id: q for q in study.questions}
    factor_names = [f.name for f in study.factors]
    wide = "question_id" not in frame.columns and any(q in frame.columns for q in questions)
    if wide:
        qcols = [q for q in questions if q in frame.columns]
        id_vars = [c for c in frame.columns if c not in qcols]
        if "respondent_id" not in frame.columns:
            frame = frame.assign(respondent_id=np.arange(len(frame)))
            id_vars.append("respondent_id")
        frame = frame.melt(
            id_vars=id_vars, value_vars=qcols, var_name="question_id", value_name="answer"
        )
        frame = frame[_texts(frame["answer"]).notna()].reset_index(drop=True)
    if "question_id" not in frame.columns:
        raise _fail(
            path,
            "question_id",
            "missing column",
            "add a `question_id` column (or, for respondent rows, one column per question id)",
        )
    option_cols: tuple[str, ...]
    if prob_column in frame.columns:
        fmt: Format = "proportions"
        value_col, option_cols, extra_cols = prob_column, ("option_id", "option"), ("n",)
    elif "answer" in frame.columns:
        fmt = "respondents"
        value_col, option_cols, extra_cols = "weight", ("answer",), ("respondent_id",)
    else:
        raise _fail(
            path,
            "(columns)",
            f"cannot tell the format: no `{prob_column}` column (aggregated proportions) and no "
            "`answer` column (respondent rows)",
            f"add `{prob_column}` + `option_id`/`option` for proportions, or `answer` "
            "(+ optional `weight`) for respondent rows",
        )
    option_col = next((c for c in option_cols if c in frame.columns), None)
    if option_col is None:
        raise _fail(
            path, "option_id", "missing column", "add `option_id` (0-based) or `option` (its text)"
        )
    factors = tuple(f for f in factor_names if f in frame.columns)
    known = {"question_id", value_col, *option_cols, *factors, *extra_cols}
    ignored = tuple(c for c in frame.columns if c not in known)
    n_rows = len(frame)

    qcodes, qcats = _coded(frame["question_id"])
    qcats = np.append(qcats, "")  # code -1 (empty) reads as ""
    qcodes = np.where(qcodes < 0, len(qcats) - 1, qcodes)
    cat_in_study = np.array([q in questions for q in qcats], dtype=bool)
    in_study = cat_in_study[qcodes]
    counts = np.bincount(qcodes, minlength=len(qcats))
    extra = [i for i in np.argsort(-counts, kind="stable") if counts[i] and not cat_in_study[i]]
    extra_questions = {str(qcats[i]): int(counts[i]) for i in extra}
    if not in_study.any():
        raise _fail(
            path,
            "question_id",
            f"none of its {len(extra_questions):,} question ids is a question of the study "
            f"(e.g. {next(iter(extra_questions))!r})",
            f"use the study's question ids: {', '.join(list(questions)[:10])}"
            + (", ..." if len(questions) > 10 else ""),
        )
    frame = frame[in_study].reset_index(drop=True)
    qcodes = qcodes[in_study]
    qid = qcats[qcodes]

    by_id = option_col == "option_id"
    names_of = {q: _option_names(question, by_id) for q, question in questions.items()}
    acodes, acats = _coded(frame[option_col])
    afold = np.array([a.casefold() for a in acats], dtype=object)
    # one look-up per distinct (question, answer) pair, not per row
    pair = qcodes.astype(np.int64) * (len(acats) + 1) + (acodes + 1)
    upair, inverse = np.unique(pair, return_inverse=True)
    resolved = np.array(
        [
            names_of[qcats[u // (len(acats) + 1)]].get(
                afold[u % (len(acats) + 1) - 1] if u % (len(acats) + 1) else "\x00", np.nan
            )
            for u in upair
        ],
        dtype=float,
    )
    option = resolved[inverse.reshape(-1)]
    if np.isnan(option).any():
        i = int(np.flatnonzero(np.isnan(option))[0])
        q = questions[qid[i]]
        raise _fail(
            path,
            option_col,
            f"row {i + 1}: {frame[option_col].iloc[i]!r} is not an option of question {q.id!r}",
            f"use an option id 0..{len(q.all_options) - 1}, its text or label: "
            + ", ".join(q.all_options),
        )
    table = pd.DataFrame({"question_id": qid, "option_id": option.astype(np.int64)})

    extra_values: dict[str, dict[str, int]] = {}
    keep = np.ones(len(frame), dtype=bool)
    for f in factors:
        allowed = set(study.factor(f).values)
        codes, cats = _coded(frame[f])
        ok_cat = np.array([c in allowed for c in cats], dtype=bool)
        unknown = (codes >= 0) & ~np.append(ok_cat, True)[codes]
        if unknown.any():
            if not ok_cat[np.unique(codes[codes >= 0])].any():
                first = str(cats[codes[np.flatnonzero(unknown)[0]]])
                raise _fail(
                    path,
                    f,
                    f"none of its values is a value of factor {f!r} (e.g. {first!r})",
                    f"use the study's values: {', '.join(sorted(allowed))}, or leave it empty "
                    "(unspecified)",
                )
            n_of = np.bincount(codes[unknown], minlength=len(cats))
            order = np.argsort(-n_of, kind="stable")
            extra_values[f] = {str(cats[i]): int(n_of[i]) for i in order if n_of[i]}
            if fmt == "proportions":
                keep &= ~unknown
        table[f] = pd.Categorical.from_codes(codes, categories=pd.Index(cats, dtype=object))

    if value_col in frame.columns:
        raw = frame[value_col]
        vcodes, vcats = _coded(raw)
        vnum = pd.to_numeric(pd.Series(vcats, dtype=object), errors="coerce").to_numpy(float)
        number = pd.Series(np.append(vnum, np.nan)[vcodes], dtype=float)
        missing = pd.Series(vcodes < 0)
    else:
        raw = pd.Series(1.0, index=frame.index)
        number, missing = pd.Series(np.ones(len(frame))), pd.Series(np.zeros(len(frame), bool))
    if fmt == "respondents":
        number = number.where(~missing, 1.0)
    bad = ~np.isfinite(number.to_numpy(dtype=float)) | (number.to_numpy(dtype=float) < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _fail(
            path,
            value_col,
            f"row {i + 1}: {raw.iloc[i]!r} is not a non-negative number",
            "write a number >= 0" + (" (a share or a percentage)" if fmt == "proportions" else ""),
        )
    percentages = False
    if fmt == "respondents":
        table["weight"] = number.to_numpy(dtype=float)
        table["w2"] = table["weight"] ** 2
        rid = (
            frame["respondent_id"]
            if "respondent_id" in frame.columns
            else pd.Series(np.arange(len(frame)))
        )
        table["respondent"] = pd.factorize(rid.to_numpy())[0]
        table["question_id"] = table["question_id"].astype("category")
    else:
        table["prob"] = number.to_numpy(dtype=float)
        table["n"] = np.nan
        if "n" in frame.columns:
            ntext = _texts(frame["n"])
            n = pd.to_numeric(ntext, errors="coerce")
            bad_n = ((ntext.notna() & n.isna()) | (n < 0)).to_numpy()
            if bad_n.any():
                i = int(np.flatnonzero(bad_n)[0])
                raise _fail(
                    path,
                    "n",
                    f"row {i + 1}: {frame['n'].iloc[i]!r} is not a count >= 0",
                    "write the respondents behind the question and cell (or leave it empty)",
                )
            table["n"] = n.to_numpy(dtype=float)
        table = table[keep].reset_index(drop=True)
        for f in factors:
            table[f] = table[f].astype(object).where(table[f].notna(), None).astype("string")
        table, percentages = _check_proportions(path, table, factors)
    return HumanData(
        str(path),
        fmt,
        factors,
        table,
        ignored,
        percentages,
        questions,
        extra_questions,
        extra_values,
        n_rows,
    )


def _check_proportions(
    path: Path, table: pd.DataFrame, factors: tuple[str, ...]
) -> tuple[pd.DataFrame, bool]:
    keys = ["question_id", *factors]
    dup = table.duplicated([*keys, "option_id"], keep=False)
    if dup.any():
        first = table[dup].iloc[0]
        raise _fail(
            path,
            "option_id",
            f"option {first['option_id']} of question {first['question_id']!r} appears twice "
            "for the same cell",
            "give each (question, cell, option) one row",
        )
    sums = table.groupby(keys, dropna=False)["prob"].transform("sum")
    percentages = bool((sums.between(100 - 100 * PROB_TOLERANCE, 100 + 100 * PROB_TOLERANCE)).all())
    if percentages:
        table = table.assign(prob=table["prob"] / 100.0)
        sums = sums / 100.0
    bad = (sums - 1.0).abs() > PROB_TOLERANCE
    if bad.any():
        row = table[bad].iloc[0]
        cell = ", ".join(f"{f}={row[f]}" for f in factors if not pd.isna(row[f])) or "all"
        raise _fail(
            path,
            "prob",
            f"the proportions of question {row['question_id']!r}, cell ({cell}) sum to "
            f"{float(sums[bad].iloc[0]):.3f}",
            "make each question and cell sum to 1 (or 100 for percentages)",
        )
    return table.assign(prob=table["prob"] / sums), percentages
