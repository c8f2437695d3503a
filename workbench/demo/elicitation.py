"""The demo's elicitation section: sampled, constrained and verbalized answers of the organism.

`demo_blocks(organism_folder, out, lm)` runs the sampled, constrained and verbalized
elicitations on the model organism, compares them with its logits and with `truth.parquet`
(standing in for human data), and checks each number against what was planted.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from workbench.compare import metrics as M
from workbench.compare.figures import failure_callouts, report_blocks
from workbench.report import Block, Figure_, Heading, Table, Text, plural

if TYPE_CHECKING:
    from workbench.compare.comparison import CompareResult
    from workbench.engine.models import LoadedModel

PLANTED_TOLERANCE = 0.03
"""How far the organism may sit from its planted rates: its training error (the organism's
own test allows 0.03 on the planted first-token mass)."""


def demo_blocks(
    organism_folder: Path,
    out: Path,
    lm: LoadedModel,
    *,
    n: int = 100,
    n_verbalized: int = 10,
    progress: bool = False,
) -> list[Block]:
    """Sampled, constrained and verbalized answers of the organism, compared with its logits
    and with `truth.parquet` standing in for human data; every check against the planted
    truth. Run folders go under `out` (logits, sampled, constrained, verbalized, compare)."""
    from workbench.compare.comparison import CompareConfig, compare
    from workbench.measure.distributions import DistributionConfig, compute_distributions
    from workbench.measure.sampling import (
        SamplingConfig,
        compute_samples,
        estimator_accuracy,
        samples_needed,
    )
    from workbench.organism.build import SPEC_FILE, STUDY_FILE, TRUTH_FILE
    from workbench.study.load import load_study

    organism_folder, out = Path(organism_folder), Path(out)
    spec = json.loads((organism_folder / SPEC_FILE).read_text())
    study = load_study(organism_folder / STUDY_FILE)
    held = spec["factors"]["stimulus"]["title"]["held_out"][0]
    sub = dataclasses.replace(study, cells=tuple(c for c in study.cells if c.get("title") == held))
    verbal_cells = tuple(c for c in sub.cells if c.get("genre") == sub.cells[0].get("genre"))[:24]
    verbal = dataclasses.replace(sub, cells=verbal_cells)
    logits = compute_distributions(
        sub, lm, out / "logits", DistributionConfig(progress=progress), overwrite=True
    )
    sampled = compute_samples(
        sub, lm, out / "sampled", SamplingConfig(n=n, progress=progress), overwrite=True
    )
    compute_samples(
        sub,
        lm,
        out / "constrained",
        SamplingConfig(n=n, constrain=True, progress=progress),
        overwrite=True,
    )
    compute_samples(
        verbal,
        lm,
        out / "verbalized",
        SamplingConfig(n=n_verbalized, verbalized=True, progress=progress),
        overwrite=True,
    )
    label = "truth (stands in for human data)"
    result = compare(
        [out / "logits", out / "sampled", out / "constrained", out / "verbalized"],
        human=organism_folder / TRUTH_FILE,
        out=out / "compare",
        config=CompareConfig(human_label=label),
        study=sub,
    )
    questions = {q.id: q for q in sub.questions}
    truth = pd.read_parquet(organism_folder / TRUTH_FILE)
    checks = organism_checks(result, sampled, logits, truth, spec, label)
    exact = exact_text_distributions(lm, sub, logits, spec)
    sizes = sorted({k for k in (1, 2, 5, 10, 20, 50, 100) if k <= n} | {n})
    curve = estimator_accuracy(sampled.samples, exact, ns=sizes, n_rep=20)
    needed = pd.concat([samples_needed(curve, t) for t in (0.1, 0.05, 0.02)], ignore_index=True)
    blocks: list[Block] = [
        Text(
            f"The organism's study restricted to the held-out title `{held}` "
            f"({plural(len(sampled.prompts), 'prompt')}), sampled at temperature 1 with N = {n} "
            "answers per "
            'prompt: `sampled` (free text: the planted preamble "Sure! I\'d give it a 4." '
            "appears), `constrained` (the first token drawn among the option labels only: "
            f"guided choice), `verbalized` ({plural(n_verbalized, 'sample')} of "
            f"{plural(len(verbal.cells), 'cell')} "
            "asking for a JSON object of percentages). **`truth.parquet` stands in for human "
            "data**: it is the planted truth, not a survey."
        ),
        *failure_callouts(result),
        Heading("Checks against what was planted", 3),
        Table(
            checks,
            "measured (95% interval) vs planted; 'ok' when the planted value is within the interval or bound",
        ),
        Heading("How many samples each estimator needs", 3),
        Text(
            "Mean TV to the model's exact text-answer distribution (first-token option "
            'probabilities plus P(" Sure") times the teacher-forced option distribution after '
            "the preamble) of the counting estimator and of the answer-position estimator, from "
            "n samples per prompt (20 random subsets each)."
        ),
        Table(
            curve.pivot_table(index="n", columns="estimator", values="mean_tv")
            .reset_index()
            .rename_axis(columns=None),
            "mean TV to the exact distribution",
            4,
        ),
        Table(
            needed.assign(target_tv=needed["target_tv"].map("{:g}".format)),
            "samples per prompt needed for a given mean TV",
            1,
        ),
        _curve_figure(curve),
        Heading("The comparison (`workbench compare`)", 3),
        *report_blocks(result, questions, warnings=False),
        Text(
            f"Run folders: `{out}/logits`, `{out}/sampled`, `{out}/constrained`, `{out}/verbalized`; comparison tables and its own report: `{out}/compare`."
        ),
    ]
    return blocks


def _curve_figure(curve: pd.DataFrame) -> Figure_:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, grp in curve.groupby("estimator"):
        ax.plot(grp["n"], grp["mean_tv"], "o-", label=str(name))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("samples per prompt")
    ax.set_ylabel("mean TV to the exact distribution")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return Figure_(
        fig,
        "estimator_accuracy",
        "counting vs answer-position estimator: accuracy by number of samples",
    )


def exact_text_distributions(
    lm: LoadedModel, study: Any, logits: Any, spec: dict[str, Any]
) -> dict[int, np.ndarray]:
    """The organism model's exact distribution of the answer in its text, per prompt.

    P(text answer = k) ∝ P(first token = label k) + P(first token = " Sure") * P(label k |
    prompt + the planted preamble), over the substantive options: every other first token is
    left out (renormalized). Label probabilities sum the " k" and "k" variants.
    """
    from workbench.measure.decoding import teacher_forced_logprobs

    prompts = logits.prompts
    stats = logits.prompt_stats.set_index("prompt_id")
    dist = logits.distributions
    texts = spec["preamble"]["texts"]
    sure = spec["preamble"]["first_token"]
    contexts, conts, owners = [], [], []
    questions = {q.id: q for q in study.questions}
    for row in prompts.itertuples():
        question = questions[row.question_id]
        preamble = texts[row.question_id].split(" {label}")[0]
        pre_ids = lm.tokenizer(preamble, add_special_tokens=False)["input_ids"]
        for pos, opt in enumerate(row.order[: len(question.options)]):
            label = question.label_at(pos, question.all_options[opt])
            for variant in (" {}", "{}"):
                contexts.append(list(row.input_ids) + list(pre_ids))
                conts.append(
                    lm.tokenizer(variant.format(label), add_special_tokens=False)["input_ids"]
                )
                owners.append((row.prompt_id, opt))
    lp, _ = teacher_forced_logprobs(lm, contexts, conts)
    after: dict[int, np.ndarray] = {}
    for (pid, opt), value in zip(owners, lp, strict=True):
        k = len(questions[prompts.set_index("prompt_id").loc[pid, "question_id"]].options)
        after.setdefault(pid, np.zeros(k))[opt] += np.exp(value)
    out = {}
    for pid, q_after in after.items():
        d = dist[(dist["prompt_id"] == pid) & ~dist["is_refusal"]].sort_values("option_id")
        direct = np.exp(d["logprob"].to_numpy())
        toks, probs = stats.loc[pid, "top_tokens"], stats.loc[pid, "top_probs"]
        p_sure = float(sum(p for t, p in zip(toks, probs, strict=True) if t == sure))
        mix = direct + p_sure * q_after / q_after.sum()
        out[int(pid)] = mix / mix.sum()
    return out


def organism_checks(
    result: CompareResult,
    sampled: Any,
    logits: Any,
    truth: pd.DataFrame,
    spec: dict[str, Any],
    human_label: str,
) -> pd.DataFrame:
    """Each validation of the organism: measured, its interval, what was planted, verdict.

    Expects the demo's source names: `sampled`, `constrained` (runs) and `logits`.
    """
    rows: list[tuple[str, float, str, str, bool]] = []
    summary = {
        (r["level"], r["source"]): r
        for r in result.summary.to_dict("records")
        if r["question_id"] == "all"
    }
    c = summary[("item", "constrained")]
    rows.append(
        (
            "constrained, T=1: mean TV to the logits vs the sampling floor",
            float(c["tv"]),
            f"floor {c['floor_mean']:.4f}, q95 {c['floor_q95']:.4f}",
            "within the floor",
            bool(c["within_floor"]),
        )
    )
    r = {row["run"]: row for row in result.rates.to_dict("records")}["sampled"]
    share = float(spec["preamble"]["share"])
    rows.append(
        (
            "preamble rate (words before the answer)",
            float(r["preamble_rate"]),
            f"[{r['preamble_lo']:.4f}, {r['preamble_hi']:.4f}]",
            f"{share:.3f} planted; {_sure_mass(logits):.3f} the model's P(' Sure')",
            abs(r["preamble_rate"] - share) <= PLANTED_TOLERANCE,
        )
    )
    planted = _planted_mismatch(sampled, truth)
    lo, hi = r["sample_mismatch_lo"], r["sample_mismatch_hi"]
    rows.append(
        (
            "first-token vs text mismatch (sample level)",
            float(r["sample_mismatch"]),
            f"[{lo:.4f}, {hi:.4f}]",
            f"{planted:.4f} planted (1 - prob_text at the argmax of prob); "
            f"{r['sample_mismatch_from_logits']:.4f} if the text followed the logits",
            lo - PLANTED_TOLERANCE <= planted <= hi + PLANTED_TOLERANCE,
        )
    )
    gaps = result.structural[result.structural["source"] == human_label]["gap_tv"]
    rows.append(
        (
            "structural-consistency gap of the truth itself (max TV)",
            float(gaps.max()) if len(gaps) else float("nan"),
            plural(len(gaps), "coarse group"),
            "0 (law of total probability)",
            bool(len(gaps)) and float(gaps.max()) < 1e-9,
        )
    )
    human = {row["source"]: row for row in result.human.to_dict("records")}
    for name in ("logits", "sampled"):
        h = human.get(name, {})
        rows.append(
            (
                f"{name}: structural gap, mean TV (argmax agreement)",
                float(h.get("structural_gap_tv", np.nan)),
                f"agreement {h.get('structural_argmax_agree', np.nan):.3f}",
                "reported (trained towards the mixture; sampled: + sampling noise)",
                True,
            )
        )
        rows.append(
            (
                f"{name}: homogenized share (mode > 0.95)",
                float(h.get("homogenized_share", np.nan)),
                f"entropy ratio to truth {h.get('entropy_ratio_mean', np.nan):.3f}",
                f"truth: {h.get('human_homogenized_share', np.nan):.3f}",
                True,
            )
        )
    counted, rb, floors = [], [], []
    merged = attach_text_truth(sampled, truth)
    for _, g in merged.groupby("prompt_id"):
        text = g["true_prob_text"].to_numpy() / g["true_prob_text"].sum()
        counted.append(float(M.total_variation(g["prob"].to_numpy(), text)))
        rb.append(float(M.total_variation(g["prob_answer_position"].to_numpy(), text)))
        floors.append(float(M.sampling_floor(text, int(g["n_ok"].iloc[0]), n_sims=300).mean_tv))
    rows.append(
        (
            "sampled (counted) vs truth prob_text: mean TV",
            float(np.mean(counted)),
            f"sampling floor {np.mean(floors):.4f}",
            "the floor + the model's own error",
            True,
        )
    )
    rows.append(
        (
            "answer-position estimate vs truth prob_text: mean TV",
            float(np.mean(rb)),
            "",
            "the model's own error (no sampling floor)",
            True,
        )
    )
    return pd.DataFrame(
        rows, columns=["check", "measured", "interval / context", "planted / expected", "ok"]
    )


def attach_text_truth(sampled: Any, truth: pd.DataFrame) -> pd.DataFrame:
    """A sampling run's substantive rows with the organism's `true_prob`/`true_prob_text`."""
    from workbench.organism.build import attach_truth

    rows = attach_truth(sampled.sampled_distributions.merge(sampled.prompts, on="prompt_id"), truth)
    return rows[~rows["is_refusal"].astype(bool)].sort_values(["prompt_id", "option_id"])


def _sure_mass(logits: Any) -> float:
    stats = logits.prompt_stats
    return float(
        np.mean(
            [
                sum(p for t, p in zip(toks, probs, strict=True) if t == " Sure")
                for toks, probs in zip(stats["top_tokens"], stats["top_probs"], strict=True)
            ]
        )
    )


def _planted_mismatch(sampled: Any, truth: pd.DataFrame) -> float:
    """Planted per-sample mismatch: 1 - prob_text at the argmax of prob (substantive options),
    averaged over prompts weighted by their parsed answers (as the measurement is)."""
    values, weights = [], []
    for _, g in attach_text_truth(sampled, truth).groupby("prompt_id"):
        text = g["true_prob_text"].to_numpy() / g["true_prob_text"].sum()
        values.append(1.0 - text[int(np.argmax(g["true_prob"].to_numpy()))])
        weights.append(g["n_ok"].iloc[0])
    return float(np.average(values, weights=weights))
