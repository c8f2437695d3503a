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
        order = list(self.questions)
        qpos = pd.Index(order).get_indexer(pd.Index(per_cell["question_id"].astype(str)))
        k_sub = np.array([len(self.questions[q].options) for q in order])[qpos]
        k_all = np.array([len(self.questions[q].all_options) for q in order])
        mass = np.zeros((len(cells), int(k_all.max())))
        np.add.at(
            mass, (codes, long["option_id"].to_numpy(dtype=np.int64)), long["mass"].to_numpy(float)
        )
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
                "cell": np.asarray(cells)[r],
                "option_id": o,
                "prob": prob[r, o],
                "refusal": refusal[r],
                "n": per_cell["n"].to_numpy(float)[r],
                "n_eff": per_cell["n_eff"].to_numpy(float)[r],
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
        table = self.table
        spec = cells[list(self.factors)].notna().to_numpy()
        pattern = (
            spec @ (1 << np.arange(len(self.factors)))
            if self.factors
            else np.zeros(len(cells), int)
        )
        parts = []
        for code in np.unique(pattern):
            names = [f for i, f in enumerate(self.factors) if code >> i & 1]
            sub = cells.loc[pattern == code, ["question_id", *names]].astype(str)
            sub = sub.assign(cell=cells.index[pattern == code])
            wanted = table[table["question_id"].isin(set(sub["question_id"]))]
            by = ["question_id", *names]
            sums = wanted.groupby([*by, "option_id"], observed=True)["weight"].sum()
            stats = wanted.groupby(by, observed=True).agg(
                n=("respondent", "nunique"), w=("weight", "sum"), w2=("w2", "sum")
            )
            stats["n_eff"] = stats["w"] ** 2 / stats["w2"].where(stats["w2"] > 0)
            mass = sums.rename("mass").reset_index()
            mass = mass.merge(stats[["n", "n_eff"]].reset_index(), on=by)
            mass[by] = mass[by].astype(str)
            parts.append(
                sub.merge(mass, on=by)[["cell", "question_id", "option_id", "mass", "n", "n_eff"]]
            )
        if not parts:
            return pd.DataFrame(columns=OUT_COLUMNS)
        return self._finish(pd.concat(parts, ignore_index=True))

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


def _texts(column: pd.Series) -> pd.Series:
    """`_text` of every value, computed once per distinct value (files of millions of rows)."""
    uniques = pd.unique(column.to_numpy(dtype=object))
    mapping = {u: _text(u) for u in uniques}
    return column.astype(object).map(mapping)


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

    qid = _texts(frame["question_id"]).fillna("")
    in_study = qid.isin(set(questions))
    extra_questions = {str(k): int(v) for k, v in qid[~in_study].value_counts().items()}
    if not in_study.any():
        raise _fail(
            path,
            "question_id",
            f"none of its {len(extra_questions):,} question ids is a question of the study "
            f"(e.g. {next(iter(extra_questions))!r})",
            f"use the study's question ids: {', '.join(list(questions)[:10])}"
            + (", ..." if len(questions) > 10 else ""),
        )
    frame, qid = (
        frame[in_study.to_numpy()].reset_index(drop=True),
        qid[in_study].reset_index(drop=True),
    )

    by_id = option_col == "option_id"
    lookup = {
        f"{q}\x1f{name}": o
        for q, question in questions.items()
        for name, o in _option_names(question, by_id).items()
    }
    answer = _texts(frame[option_col]).fillna("\x00").str.casefold()
    option = (qid + "\x1f" + answer).map(lookup)
    if option.isna().any():
        i = int(np.flatnonzero(option.isna().to_numpy())[0])
        q = questions[qid.iloc[i]]
        raise _fail(
            path,
            option_col,
            f"row {i + 1}: {frame[option_col].iloc[i]!r} is not an option of question {q.id!r}",
            f"use an option id 0..{len(q.all_options) - 1}, its text or label: "
            + ", ".join(q.all_options),
        )
    table = pd.DataFrame(
        {"question_id": qid.to_numpy(), "option_id": option.to_numpy(dtype=np.int64)}
    )

    extra_values: dict[str, dict[str, int]] = {}
    keep = np.ones(len(frame), dtype=bool)
    for f in factors:
        allowed = set(study.factor(f).values)
        v = _texts(frame[f])
        unknown = v.notna() & ~v.isin(allowed)
        if unknown.any():
            if not (v.isin(allowed)).any():
                raise _fail(
                    path,
                    f,
                    f"none of its values is a value of factor {f!r} (e.g. {v[unknown].iloc[0]!r})",
                    f"use the study's values: {', '.join(sorted(allowed))}, or leave it empty "
                    "(unspecified)",
                )
            extra_values[f] = {str(k): int(c) for k, c in v[unknown].value_counts().items()}
            if fmt == "proportions":
                keep &= ~unknown.to_numpy()
        table[f] = pd.Categorical(v.to_numpy(dtype=object))

    raw = frame[value_col] if value_col in frame.columns else pd.Series(1.0, index=frame.index)
    text = _texts(raw)
    number = pd.to_numeric(text, errors="coerce")
    if fmt == "respondents":
        number = number.where(text.notna(), 1.0)
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
