"""What a human file covers of what the study asks, and what it holds beyond it.

A real survey holds more than any one study asks (every question of a wave, groups the
study leaves out), so nothing extra is an error: the comparison matches what the study asks
and this table says how much that was. One row per kind of thing:

| what | matched | unmatched | detail |
|---|---|---|---|
| questions | study questions with human data | study questions without | ids of the unmatched |
| cells | asked cells with human data | asked cells without | examples |
| file questions not in the study | | rows of them | ids |
| `<factor>` values not in the study | | rows of them | values (respondents: still in coarse cells) |
| respondents | in a matched question | the others | Kish effective n (all rows) |
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from workbench.compare.human import HumanData

COLUMNS = ["what", "matched", "unmatched", "detail"]


def _examples(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n:,} more)" if len(items) > n else "")


def coverage_table(human: HumanData, cells: pd.DataFrame, found: pd.DataFrame) -> pd.DataFrame:
    """`cells`: the cells asked (question_id, key); `found`: the human source (key per row)."""
    matched_keys = set(found["key"])
    asked_q = list(dict.fromkeys(cells["question_id"].astype(str)))
    matched_q = set(found["question_id"].astype(str))
    missing_q = [q for q in asked_q if q not in matched_q]
    missing_cells = [k for k in cells["key"] if k not in matched_keys]
    rows = [
        {
            "what": "questions",
            "matched": len(asked_q) - len(missing_q),
            "unmatched": len(missing_q),
            "detail": _examples(missing_q),
        },
        {
            "what": "cells",
            "matched": len(cells) - len(missing_cells),
            "unmatched": len(missing_cells),
            "detail": _examples(missing_cells),
        },
    ]
    if human.extra_questions:
        extra = list(human.extra_questions)
        rows.append(
            {
                "what": "file questions not in the study",
                "matched": 0,
                "unmatched": sum(human.extra_questions.values()),
                "detail": f"{len(extra):,} questions (rows left out): {_examples(extra)}",
            }
        )
    for factor, values in human.extra_values.items():
        where = "in coarse cells only" if human.format == "respondents" else "cells left out"
        rows.append(
            {
                "what": f"{factor} values not in the study",
                "matched": 0,
                "unmatched": sum(values.values()),
                "detail": f"rows, {where}: "
                + _examples([f"{v} ({c:,})" for v, c in values.items()]),
            }
        )
    if human.format == "respondents":
        t = human.table
        in_matched = t["question_id"].astype(str).isin(matched_q).to_numpy()
        per = pd.Series(in_matched).groupby(t["respondent"].to_numpy()).any()
        w = t["weight"].to_numpy(dtype=float)
        kish = float(w.sum() ** 2 / (w**2).sum()) if (w**2).sum() > 0 else np.nan
        rows.append(
            {
                "what": "respondents",
                "matched": int(per.sum()),
                "unmatched": int((~per).sum()),
                "detail": f"{len(t):,} respondent-question rows; Kish effective n of all rows "
                f"{kish:,.0f}",
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def summary_lines(table: pd.DataFrame) -> list[str]:
    """The coverage table as console lines."""
    lines = []
    for row in table.to_dict("records"):
        total = int(row["matched"]) + int(row["unmatched"])
        if row["what"] in ("questions", "cells", "respondents"):
            text = f"{row['what']}: {int(row['matched']):,} of {total:,} matched"
        else:
            text = f"{row['what']}: {int(row['unmatched']):,}"
        lines.append(text + (f" ({row['detail']})" if row["detail"] else ""))
    return lines
