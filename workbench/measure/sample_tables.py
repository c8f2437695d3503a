"""The tables of a sampling run: `samples.parquet` (one row per sample) and
`sampled_distributions.parquet` (per prompt and option), see `workbench.measure.sampling`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from workbench.measure import decoding as D
from workbench.measure.answers import Parsed, Verbalized
from workbench.study import prompts as P
from workbench.study.spec import Study


def _row_columns(
    plan: D.Plan, row: D.Row, slot: dict[str, Any] | None, verbalized: bool
) -> dict[str, Any]:
    """The columns of `samples.parquet` that a distinct completion gives its samples."""
    base: dict[str, Any] = {"text": row.text, "n_new_tokens": len(row.ids), "finish": row.finish}
    if verbalized:
        v = row.result
        assert isinstance(v, Verbalized)
        n_sub = len(plan.question.options)
        option = int(np.argmax(v.prob[:n_sub])) if v.prob is not None else None
        base.update(
            option_id=option,
            status=v.status,
            how="json" if v.status == "ok" else (v.error or "none"),
            stated_probs=list(v.prob) if v.prob is not None else None,
            error=v.error,
            raw_total=v.raw_total,
            n_missing=v.n_missing,
        )
    else:
        parsed = row.result
        assert isinstance(parsed, Parsed)
        base.update(
            option_id=parsed.option_id,
            status=parsed.status,
            how=parsed.how,
            kind=parsed.kind,
            answer_start=parsed.start,
        )
        if slot is not None:
            base.update(slot)
    return base


def wave_samples(
    plans: list[D.Plan],
    rows: list[D.Row],
    slots: list[dict[str, Any]] | None,
    n: int,
    verbalized: bool,
) -> pd.DataFrame:
    """One wave's samples (`samples.parquet` rows), prompt-major then by sample: every sample
    takes the columns of the distinct completion it drew."""
    which = np.full((len(plans), n), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        which[row.prompt, row.samples] = i
    assert (which >= 0).all(), "a sample without a completion"
    per_row = [
        _row_columns(plans[row.prompt], row, slots[i] if slots is not None else None, verbalized)
        for i, row in enumerate(rows)
    ]
    flat = which.ravel().tolist()
    columns: dict[str, Any] = {
        "prompt_id": np.repeat([p.prompt.prompt_id for p in plans], n),
        "sample": np.tile(np.arange(n), len(plans)),
    }
    for key in per_row[0]:
        values = [d[key] for d in per_row]
        columns[key] = [values[i] for i in flat]
    return samples_frame(pd.DataFrame(columns))


def samples_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """`samples.parquet` with stable dtypes (nullable integers for ids that may be null)."""
    for col in ("prompt_id", "sample", "n_new_tokens"):
        frame[col] = frame[col].astype("int64")
    for col in ("option_id", "answer_start", "answer_token", "n_missing"):
        if col in frame.columns:
            frame[col] = frame[col].astype("Int64")
    for col in ("kind", "error"):
        if col in frame.columns:
            frame[col] = frame[col].astype("string")
    return frame


def sampled_distributions(
    study: Study, prompts: list[P.Prompt], samples: pd.DataFrame, verbalized: bool
) -> pd.DataFrame:
    """Per prompt and option: count, prob, prob_answer_position and per-prompt counts.

    `prob` = count / (substantive answers), null for refusal options (as `distributions`).
    `prob_answer_position` = mean over samples with an answer slot of the slot's sampling
    distribution (over all options), renormalized over the substantive options.
    Verbalized: `prob` = mean of the valid stated distributions (renormalized over the
    substantive options); `count` = valid samples whose stated mode is the option.
    `refusal_share` (and `..._answer_position`): the refusal options' share among answers
    naming an option (verbalized: the mean stated share), per prompt.
    """
    questions = {q.id: q for q in study.questions}
    # One stable sort and numpy slices per prompt (a groupby makes a frame per prompt).
    pid = samples["prompt_id"].to_numpy() if len(samples) else np.zeros(0, dtype=np.int64)
    order = np.argsort(pid, kind="stable")
    ids, starts = np.unique(pid[order], return_index=True)
    spans = dict(zip(ids.tolist(), zip(starts, [*starts[1:], len(pid)], strict=True), strict=True))

    def column(name: str, **kwargs: Any) -> np.ndarray | None:
        return samples[name].to_numpy(**kwargs)[order] if name in samples.columns else None

    all_status = column("status")
    all_options = column("option_id", dtype="float64", na_value=np.nan)
    all_stated = column("stated_probs")
    all_slots = column("answer_probs")
    rows = []
    for prompt in prompts:
        if prompt.prompt_id not in spans:
            continue
        lo, hi = spans[prompt.prompt_id]
        assert all_status is not None and all_options is not None
        question = questions[prompt.question_id]
        n_sub, n_all = len(question.options), len(question.all_options)
        status = all_status[lo:hi]
        options = all_options[lo:hi]
        counts = np.array([(options == o).sum() for o in range(n_all)], dtype=np.int64)
        n_ok = int((status == "ok").sum())
        prob = np.full(n_all, np.nan)
        rb = np.full(n_all, np.nan)
        n_slot = 0
        refusal = refusal_rb = np.nan
        if verbalized:
            assert all_stated is not None
            stated = all_stated[lo:hi]
            valid = [np.asarray(p) for p, s in zip(stated, status, strict=True) if s == "ok"]
            if valid:
                full = np.mean(valid, axis=0)
                refusal = float(full[n_sub:].sum())
                if full[:n_sub].sum() > 0:
                    prob[:n_sub] = full[:n_sub] / full[:n_sub].sum()
        else:
            if counts.sum():
                refusal = float(counts[n_sub:].sum() / counts.sum())
            if n_ok:
                prob[:n_sub] = counts[:n_sub] / counts[:n_sub].sum()
            if all_slots is not None:
                slots = [np.asarray(p) for p in all_slots[lo:hi] if p is not None]
                slots = [p for p in slots if not np.isnan(p).any()]
                n_slot = len(slots)
                if slots:
                    full = np.mean(slots, axis=0)
                    refusal_rb = float(full[n_sub:].sum())
                    if full[:n_sub].sum() > 0:
                        rb[:n_sub] = full[:n_sub] / full[:n_sub].sum()
        labels = {
            o: question.label_at(pos, question.all_options[o]) for pos, o in enumerate(prompt.order)
        }
        positions = {o: pos for pos, o in enumerate(prompt.order)}
        for o in range(n_all):
            rows.append(
                {
                    "prompt_id": prompt.prompt_id,
                    "option_id": o,
                    "label": labels[o],
                    "position": positions[o],
                    "is_refusal": o >= n_sub,
                    "count": int(counts[o]),
                    "prob": float(prob[o]),
                    "prob_answer_position": float(rb[o]),
                    "n_samples": int(hi - lo),
                    "n_ok": n_ok,
                    "n_refusal": int((status == "refusal").sum()),
                    "n_unparseable": int((status == "unparseable").sum()),
                    "n_answer_position": n_slot,
                    "refusal_share": refusal,
                    "refusal_share_answer_position": refusal_rb,
                }
            )
    return pd.DataFrame(rows)
