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
Every problem raises a `WorkbenchError` naming the file, the column (and row) and the fix.
Refusal options ("Don't know") are kept out of the distribution, which is renormalized over
the substantive options, and reported as the refusal share (as OpinionQA does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.study.spec import Question, Study

Format = Literal["proportions", "respondents"]
PROB_TOLERANCE = 0.02
"""|sum - 1| allowed per question and cell in a proportions file before it is an error."""


def _fail(path: Path, field_name: str, message: str, fix: str) -> WorkbenchError:
    return WorkbenchError(f"{field_name}: {message}", fix=fix, file=str(path))


@dataclass
class HumanData:
    """Human answers, normalized: option ids resolved, factor values checked."""

    path: str
    format: Format
    factors: tuple[str, ...]
    """The study factors the file has columns for."""
    table: pd.DataFrame
    """proportions: question_id, <factors>, option_id, prob (over all options, sums to 1);
    respondents: question_id, <factors>, option_id, weight."""
    ignored_columns: tuple[str, ...] = ()
    percentages: bool = False
    """The proportions were given in percent (divided by 100)."""
    questions: dict[str, Question] = field(default_factory=dict, repr=False)

    def distributions(self, cells: pd.DataFrame) -> pd.DataFrame:
        """Human distributions for `cells` (question_id + the study's factor columns).

        Returns one row per (cell row, substantive option): `cell` (the row's index in
        `cells`), `option_id`, `prob` (renormalized over substantive options), `refusal`
        (the refusal share) and `n` (respondents, or effective weight; NaN for proportions).
        Cells without human data are absent.
        """
        if self.format == "proportions":
            return self._from_proportions(cells)
        return self._from_respondents(cells)

    def _key(self, frame: pd.DataFrame) -> pd.Series:
        key = frame["question_id"].astype(str)
        for f in self.factors:
            key = key + "|" + f + "=" + frame[f].astype("string").fillna("*")
        return key

    def _finish(self, long: pd.DataFrame) -> pd.DataFrame:
        """long: cell, question_id, option_id, mass, n -> renormalized substantive rows."""
        out = []
        for (cell, qid), grp in long.groupby(["cell", "question_id"], sort=True):
            question = self.questions[str(qid)]
            k = len(question.options)
            mass = np.zeros(len(question.all_options))
            np.add.at(mass, grp["option_id"].to_numpy(dtype=int), grp["mass"].to_numpy(float))
            total, substantive = mass.sum(), mass[:k].sum()
            if substantive <= 0:
                continue
            for o in range(k):
                out.append(
                    {
                        "cell": cell,
                        "option_id": o,
                        "prob": mass[o] / substantive,
                        "refusal": float(mass[k:].sum() / total),
                        "n": float(grp["n"].iloc[0]),
                    }
                )
        return pd.DataFrame(out, columns=["cell", "option_id", "prob", "refusal", "n"])

    def _from_proportions(self, cells: pd.DataFrame) -> pd.DataFrame:
        keys = pd.DataFrame({"cell": cells.index, "_key": self._key(cells).to_numpy()})
        table = self.table.assign(_key=self._key(self.table))
        merged = keys.merge(table[["_key", "question_id", "option_id", "prob"]], on="_key")
        merged = merged.rename(columns={"prob": "mass"}).assign(n=np.nan)
        return self._finish(merged)

    def _from_respondents(self, cells: pd.DataFrame) -> pd.DataFrame:
        parts = []
        table = self.table
        spec = cells[list(self.factors)].notna()
        pattern = spec.apply(lambda r: "|".join(r.index[r.to_numpy()]), axis=1)
        grouped = cells.groupby([cells["question_id"], pattern]).groups
        for group_key, idx in grouped.items():
            qid, joined = (str(part) for part in cast(tuple[object, object], group_key))
            rows = table[table["question_id"] == qid]
            names = joined.split("|") if joined else []
            if names:
                counts = rows.groupby([*names, "option_id"], dropna=False)["weight"].agg(
                    ["sum", "size"]
                )
                counts = counts.reset_index()
            else:
                counts = rows.groupby("option_id")["weight"].agg(["sum", "size"]).reset_index()
            sub = cells.loc[idx, names].reset_index(names="cell")
            merged = sub.merge(counts, on=names) if names else sub.merge(counts, how="cross")
            n = merged.groupby("cell")["size"].transform("sum")
            parts.append(
                merged.assign(question_id=qid, mass=merged["sum"], n=n)[
                    ["cell", "question_id", "option_id", "mass", "n"]
                ]
            )
        if not parts:
            return pd.DataFrame(columns=["cell", "option_id", "prob", "refusal", "n"])
        return self._finish(pd.concat(parts, ignore_index=True))

    def subgroup_weights(self, question_id: str, group: dict[str, str], by: list[str]) -> pd.Series:
        """Respondents only: P(s | G) over the value combinations `s` of the factors `by`
        among the respondents of `question_id` in group `group` (weighted shares)."""
        rows = self.table[self.table["question_id"] == question_id]
        for f, v in group.items():
            rows = rows[rows[f] == v]
        weights = rows.groupby(by)["weight"].sum()
        return weights / weights.sum()


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
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    return text if text.strip() and text != "<NA>" else None


def _option_resolver(question: Question, by_id: bool) -> dict[str, int]:
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
        frame = frame.melt(
            id_vars=id_vars, value_vars=qcols, var_name="question_id", value_name="answer"
        )
        frame = frame[frame["answer"].map(_text).notna()]
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
        value_col, option_cols = prob_column, ("option_id", "option")
    elif "answer" in frame.columns:
        fmt = "respondents"
        value_col, option_cols = "weight", ("answer",)
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
    known = {"question_id", value_col, *option_cols, *factors}
    ignored = tuple(c for c in frame.columns if c not in known)

    rows = []
    resolvers = {
        qid: _option_resolver(q, option_col == "option_id") for qid, q in questions.items()
    }
    values = {f.name: set(f.values) for f in study.factors}
    records = frame.to_dict("records")
    for i, rec in enumerate(records):
        where = f"row {i + 1}"
        qid = _text(rec["question_id"])
        if qid not in questions:
            raise _fail(
                path,
                "question_id",
                f"{where}: unknown question {rec['question_id']!r}",
                f"use one of the study's question ids: {', '.join(questions)}",
            )
        answer = _text(rec[option_col])
        option = resolvers[qid].get(answer.casefold()) if answer is not None else None
        if option is None:
            raise _fail(
                path,
                option_col,
                f"{where}: {rec[option_col]!r} is not an option of question {qid!r}",
                f"use an option id 0..{len(questions[qid].all_options) - 1}, its text or label: "
                + ", ".join(questions[qid].all_options),
            )
        row: dict[str, object] = {"question_id": qid, "option_id": option}
        for f in factors:
            v = _text(rec[f])
            if v is not None and v not in values[f]:
                raise _fail(
                    path,
                    f,
                    f"{where}: {v!r} is not a value of factor {f!r}",
                    f"use one of: {', '.join(sorted(values[f]))}, or leave it empty (unspecified)",
                )
            row[f] = v
        raw = rec.get(value_col, 1.0) if fmt == "respondents" else rec[value_col]
        try:
            number = (
                float(raw) if _text(raw) is not None else (1.0 if fmt == "respondents" else np.nan)
            )
        except (TypeError, ValueError):
            number = np.nan
        if not np.isfinite(number) or number < 0:
            raise _fail(
                path,
                value_col,
                f"{where}: {raw!r} is not a non-negative number",
                "write a number >= 0"
                + (" (a share or a percentage)" if fmt == "proportions" else ""),
            )
        row["prob" if fmt == "proportions" else "weight"] = number
        rows.append(row)
    table = pd.DataFrame(rows)
    for f in factors:
        table[f] = table[f].astype("string")
    percentages = False
    if fmt == "proportions":
        table, percentages = _check_proportions(path, table, factors)
    return HumanData(str(path), fmt, factors, table, ignored, percentages, questions)


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
