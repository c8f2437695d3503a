"""Rates of a sampling run: statuses, preambles and the first-token vs text mismatch.

Statuses get Wilson intervals; the preamble rate (answers after other words: "Sure! I'd give
it a 4") and the mismatch (answers, and sampled modes, differing from the logits' argmax
option, beside what the logits alone predict) get bootstrap intervals over questions and
personas (docs/MEASUREMENT.md §3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from workbench.compare import metrics as M
from workbench.compare import survey as U

if TYPE_CHECKING:
    from workbench.compare.comparison import CompareConfig, Run


def sampling_rates(
    run: Run, keys: pd.Series, reference: pd.DataFrame | None, config: CompareConfig
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Status rates (Wilson), the preamble rate and the first-token vs text mismatch of one
    sampling run; `keys`: the item key of each of its prompts; `reference`: the logits."""
    assert run.samples is not None
    prompts = run.prompts.assign(key=keys.to_numpy())
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
