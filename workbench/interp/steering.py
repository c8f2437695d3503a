"""Probe -> steer -> measure: add a probe's direction at a site and read the answer distribution.

`steer(study, lm, probe_run, SteerConfig(probe="actor:Mara Quinlan", site=..., ...))` adds
alpha x s x u to the activation at `site` at the chosen token positions of every steered
prompt, for each alpha of a sweep, where u is a unit direction (`workbench.interp.directions`:
the probe's activation pattern by default) and s is the site's *typical residual norm*: the
median L2 norm of the unsteered activation at those positions over the on-target prompts
(recorded in the manifest as `norm_scale`). Alpha 0 must be in the sweep: its forwards add
zero in the same batches as the unsteered forwards, so every number at alpha 0 equals the
unsteered run exactly (tested).

Directions, all unit vectors, so all are norm-matched at each alpha (column `kind`):

- `probe`: towards the probe's class (a logistic probe's class direction, a ridge probe's
  weight direction);
- `random`: `n_random` directions uniform on the sphere (seeds `seed`, `seed + 1`, ...);
- `shuffled`: the same class of the shuffled-label probe refitted with the probe run's seed;
- `other_factor`: a class direction of another factor's probe at the same site (one that
  should not matter; default: the first other factor the probe run holds there).

Prompts (docs/MEASUREMENT.md §2 contract, next-token scoring):

- on-target: prompts of the on-target questions (default: the probe run's questions) whose
  factor value is not the steered class; where the class is a level of the factor, each comes
  with its *twin* (the prompt that differs in that factor alone and holds the class:
  `workbench.interp.pairs.factor_pairs`), whose unsteered distribution is the target;
- off-target: prompts of questions that do not involve the factor (its value is null there),
  steered the same way, for specificity (not with `positions="span"`: they have no span);
- neutral text (`neutral_text`, steered at every token): the change of its mean per-token
  log-likelihood is the damage measure beside the option mass.

Per prompt (`steered.parquet`): the distribution, option mass, expected score, TV to the
unsteered distribution, TV to the twin (`tv_target`; `tv_target0` unsteered). Summaries
(`steering.parquet`, `workbench.interp.steer_tables`): means with bootstrap intervals over
prompts of expected_score, score_shift, tv_unsteered, tv_target, option_mass,
option_mass_change, prob:OPTION; `target_closure` = 1 - sum tv_target / sum tv_target0 (the
share of the way to the class's own distribution: 1 = there); `selectivity` (probe rows) =
the probe's mean tv_unsteered / the largest placebo's; neutral_logprob(_change) per token.

Run folder: one chunk per direction (a killed run resumes at the next direction); manifest
last. `steering.png` holds the dose-response plot. Under a launcher (`workbench.distributed`)
every rank runs the unsteered forwards (the norm scale needs them all) and takes whole
directions; rank 0 merges, bootstraps, plots and writes the manifest.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor

from workbench import distributed
from workbench.engine.models import LoadedModel
from workbench.errors import StudyError, WorkbenchError
from workbench.interp import directions as DR
from workbench.interp import intervene as IV
from workbench.interp.hooks import Edit, edit_sites, site
from workbench.interp.pairs import factor_pairs
from workbench.interp.readers import readers_for
from workbench.interp.steer_tables import dose_response, options_of, summarize
from workbench.runs import MANIFEST, RunFolder
from workbench.study import prompts as P
from workbench.study.spans import Span, factor_spans
from workbench.study.spec import Study

STEERING = "steering"
"""`steering.parquet`: one row per direction x alpha x question x metric."""
STEERED = "steered"
"""`steered.parquet`: one row per direction x alpha x prompt."""
NEUTRAL_TABLE = "neutral"
"""`neutral.parquet`: one row per direction x alpha x neutral-text token."""
PLACEBOS = ("random", "shuffled", "other")
NEUTRAL_TEXT = (
    "The library opens at nine in the morning and closes at six. Visitors can borrow up to "
    "ten books at a time, and the reading room on the second floor is quiet all day."
)


@dataclass(frozen=True)
class SteerConfig:
    """Settings of a steering run (written to the manifest)."""

    probe: str
    """`TARGET:CLASS` (a logistic probe's class) or `TARGET` (a ridge probe)."""
    site: str
    """A TransformerLens site the probe was fitted at."""
    positions: Literal["span", "answer", "all"] = "span"
    """Where the direction is added: the factor's token span, the last prompt token, or all."""
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    """Multiples of the typical residual norm; must hold 0 (the unsteered reference)."""
    probe_position: str | None = None
    """The probe's position label (`span_mean:actor`, `answer`, ...); None: the stored one
    closest to `positions` (span_mean, span_last, answer in that order for span/all)."""
    direction: DR.DirectionKind = "pattern"
    placebos: tuple[str, ...] = PLACEBOS
    n_random: int = 3
    other: str | None = None
    """`TARGET[:CLASS]` of the other-factor placebo; None: the first other factor probe at
    the site (its first class)."""
    questions: tuple[str, ...] | None = None
    """On-target questions (None: the probe run's, else every question with the factor)."""
    max_prompts: int | None = 64
    """At most this many on-target prompts, drawn with `seed` (None: all)."""
    max_off_target: int | None = 32
    neutral_text: str = NEUTRAL_TEXT
    seed: int = 0
    n_boot: int = 1000
    batch_size: int = 32
    progress: bool = True


@dataclass
class SteerResult:
    """The tables of a steering run (columns in the module docstring)."""

    steering: pd.DataFrame
    steered: pd.DataFrame
    neutral: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


@dataclass(frozen=True)
class _Direction:
    direction_id: int
    name: str
    kind: str
    vector: Tensor


def parse_probe(text: str) -> tuple[str, str | None]:
    target, sep, cls = text.partition(":")
    return target.strip(), (cls.strip() if sep else None)


# --------------------------------------------------------------------------------------------
# checks and directions


def check_alphas(alphas: Sequence[float]) -> None:
    if not any(a == 0 for a in alphas):
        raise WorkbenchError(
            f"the alpha grid {list(alphas)} has no 0",
            fix="add 0 to --alphas: alpha 0 is the unsteered reference every shift is read "
            "against (e.g. --alphas 0,0.5,1,2,4)",
        )


def preflight(study: Study, config: SteerConfig, directions: str | Path) -> DR.ProbeRun:
    """Every check that needs no model (alphas, positions, the probe, its class and site):
    the CLI runs it before loading the model. Returns the opened probe run."""
    check_alphas(config.alphas)
    IV.check_positions(config.positions)
    run = DR.ProbeRun.open(directions)
    target, cls = parse_probe(config.probe)
    key = run.resolve(target, config.site, config.probe_position, config.positions)
    _class_column(run, key, cls, "--probe")
    return run


def check_config(study: Study, lm: LoadedModel, config: SteerConfig) -> None:
    """Raise (with the fix) on bad input, before any forward pass."""
    check_alphas(config.alphas)
    IV.check_positions(config.positions)
    bad = [p for p in config.placebos if p not in PLACEBOS]
    if bad:
        raise WorkbenchError(f"unknown placebo {bad[0]!r}", fix=f"use {', '.join(PLACEBOS)}")
    if config.direction not in ("pattern", "weight"):
        raise WorkbenchError(
            f"unknown direction kind {config.direction!r}", fix="use pattern or weight"
        )
    if study.scoring.method != "next_token":
        raise StudyError(
            study.path,
            "scoring.method",
            "steering reads the next-token answer distribution; this study scores sequences",
            "use `scoring.method: next_token` with single-token labels",
        )
    site(config.site, int(lm.model.config.get_text_config().num_hidden_layers))
    qids = [q.id for q in study.questions]
    for q in config.questions or ():
        if q not in qids:
            raise WorkbenchError(f"unknown question {q!r}", fix=f"use one of: {', '.join(qids)}")


def _class_column(run: DR.ProbeRun, key: DR.ProbeKey, cls: str | None, flag: str) -> int | None:
    classes = run.classes(key)
    if not classes:
        if cls is not None:
            raise WorkbenchError(
                f"probe {key.target!r} is a ridge probe: it has no class {cls!r}",
                fix=f"pass {flag} {key.target} (no class)",
            )
        return None
    if cls is None or cls not in classes:
        what = "needs a class" if cls is None else f"has no class {cls!r}"
        raise WorkbenchError(
            f"probe {key.target!r} {what}",
            fix=f"pass {flag} {key.target}:CLASS with CLASS one of: {', '.join(classes)}",
        )
    return classes.index(cls)


def build_directions(
    run: DR.ProbeRun, config: SteerConfig, factors: Sequence[str]
) -> tuple[list[_Direction], DR.ProbeKey, dict[str, Any]]:
    """The probe's direction and its placebos, and what they are (for the manifest)."""
    target, cls = parse_probe(config.probe)
    key = run.resolve(target, config.site, config.probe_position, config.positions)
    col = _class_column(run, key, cls, "--probe")
    X, _ = run.rows(key)
    W = run.matrix(key, "stored")
    out = [_Direction(0, config.probe, "probe", DR.class_direction(W, X, col, config.direction))]
    info: dict[str, Any] = {"probe": asdict(key), "placebos": {}}
    if "random" in config.placebos:
        for i in range(config.n_random):
            s = config.seed + i
            out.append(
                _Direction(len(out), f"random:{s}", "random", DR.random_direction(W.shape[0], s))
            )
    if "shuffled" in config.placebos:
        Ws = run.matrix(key, "shuffled")
        v = DR.class_direction(Ws, X, col, config.direction)
        out.append(_Direction(len(out), f"shuffled:{config.probe}", "shuffled", v))
    if "other" in config.placebos:
        other = config.other
        if other is None:
            found = sorted(
                {k.target for k in run.keys if k.site == config.site} & (set(factors) - {target})
            )
            if not found:
                raise WorkbenchError(
                    f"no other factor's probe at {config.site} for the other-factor placebo",
                    fix="probe another factor at this site, or leave it out "
                    "(--placebos random,shuffled)",
                )
            other = found[0]
        o_target, o_cls = parse_probe(other)
        o_key = run.resolve(o_target, config.site, None, config.positions)
        o_classes = run.classes(o_key)
        if o_cls is None and o_classes:
            o_cls = o_classes[0]
        o_col = _class_column(run, o_key, o_cls, "--other")
        o_X, _ = run.rows(o_key)
        v = DR.class_direction(run.matrix(o_key, "stored"), o_X, o_col, config.direction)
        name = o_target if o_cls is None else f"{o_target}:{o_cls}"
        out.append(_Direction(len(out), name, "other_factor", v))
        info["placebos"]["other_factor"] = asdict(o_key) | {"class": o_cls}
    info["cosines_with_probe"] = {
        d.name: round(float(d.vector @ out[0].vector), 4) for d in out[1:]
    }
    return out, key, info


# --------------------------------------------------------------------------------------------
# prompts


@dataclass
class _Prompts:
    on: list[P.Prompt]
    off: list[P.Prompt]
    twins: dict[int, P.Prompt]
    """steered prompt_id -> its twin (holds the class), where there is one."""
    spans: dict[int, Span]
    notes: list[str]


def select_prompts(
    study: Study,
    lm: LoadedModel,
    run: DR.ProbeRun,
    config: SteerConfig,
) -> _Prompts:
    target, cls = parse_probe(config.probe)
    factors = [f.name for f in study.factors]
    factor = target if target in factors else None
    prompts = P.render(study, lm.tokenizer)
    probe_q = run.manifest.get("config", {}).get("questions")
    if config.questions is not None:
        on_q = set(config.questions)
    elif probe_q:
        on_q = set(probe_q)
    else:
        on_q = {p.question_id for p in prompts if factor is None or p.factors.get(factor)}
    notes: list[str] = []
    on = [
        p
        for p in prompts
        if p.question_id in on_q
        and (factor is None or (p.factors.get(factor) is not None and p.factors[factor] != cls))
    ]
    twins: dict[int, P.Prompt] = {}
    if factor is not None and cls is not None and cls in study.factor(factor).values:
        by_id = {p.prompt_id: p for p in prompts}
        try:
            pairs = factor_pairs(study, prompts, factor, questions=sorted(on_q))
        except StudyError:
            pairs = []
        for pr in pairs:
            if pr.clean_value == cls:
                twins[pr.corrupt] = by_id[pr.clean]
            elif pr.corrupt_value == cls:
                twins[pr.clean] = by_id[pr.corrupt]
        if twins:
            on = [p for p in on if p.prompt_id in twins]
        else:
            notes.append(f"no prompt has a twin with {factor}={cls}: no tv_target")
    if not on:
        raise WorkbenchError(
            f"no on-target prompt for {config.probe} (questions {sorted(on_q)})",
            fix="pass --questions with questions that involve the factor",
        )
    rng = random.Random(config.seed)
    if config.max_prompts is not None and len(on) > config.max_prompts:
        on = sorted(rng.sample(on, config.max_prompts), key=lambda p: p.prompt_id)
    off = [
        p
        for p in prompts
        if p.question_id not in on_q and (factor is None or p.factors.get(factor) is None)
    ]
    if config.positions == "span":
        if off:
            notes.append("off-target questions have no span of the factor: not steered")
        off = []
    elif config.max_off_target is not None and len(off) > config.max_off_target:
        off = sorted(rng.sample(off, config.max_off_target), key=lambda p: p.prompt_id)
    if not off and config.positions != "span":
        notes.append("no off-target question (every question involves the factor)")
    spans: dict[int, Span] = {}
    if config.positions == "span":
        if factor is None:
            raise WorkbenchError(
                f"positions 'span' need a factor; {target!r} is not one",
                fix="use --positions answer or all",
            )
        for pid, ss in factor_spans(study, prompts, lm.tokenizer, [factor]).items():
            for s in ss:
                spans[pid] = s
        on = [p for p in on if p.prompt_id in spans]
    used = [*on, *off, *twins.values()]
    P.validate_for_tokenizer(study, used, lm.tokenizer, lm.max_length)
    return _Prompts(
        on, off, {p.prompt_id: twins[p.prompt_id] for p in on if p.prompt_id in twins}, spans, notes
    )


# --------------------------------------------------------------------------------------------
# the run


def steer(
    study: Study,
    lm: LoadedModel,
    directions: str | Path | DR.ProbeRun,
    config: SteerConfig,
    out_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
) -> SteerResult:
    """Steer along `config.probe`'s direction and its placebos over the alpha sweep.

    Writes a run folder when `out_dir` is given; re-running the same call resumes it
    (directions in finished chunks are not recomputed). Bad input raises before any forward.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    check_config(study, lm, config)
    run = directions if isinstance(directions, DR.ProbeRun) else DR.ProbeRun.open(directions)
    dirs, _key, info = build_directions(run, config, [f.name for f in study.factors])
    sel = select_prompts(study, lm, run, config)
    agg = study.scoring.aggregate
    readers = readers_for(study, lm, [*sel.on, *sel.off, *sel.twins.values()])
    steered = sorted([*sel.on, *sel.off], key=lambda p: -len(p.input_ids))
    batches = [
        steered[i : i + config.batch_size] for i in range(0, len(steered), config.batch_size)
    ]
    rows_pos = {
        p.prompt_id: IV.token_positions(p, sel.spans.get(p.prompt_id), config.positions)
        for p in steered
    }
    on_ids = {p.prompt_id for p in sel.on}

    norms: list[Tensor] = []

    def record(b: int, batch: Sequence[P.Prompt], h: Tensor) -> None:
        for r, p in enumerate(batch):
            if p.prompt_id in on_ids:
                norms.append(h[r, rows_pos[p.prompt_id]].norm(dim=-1))

    base = IV.forwards(lm, batches, readers, agg, config.site, record=record)
    twin_list = sorted(sel.twins.values(), key=lambda p: -len(p.input_ids))
    twin_read = IV.forwards(
        lm,
        [twin_list[i : i + config.batch_size] for i in range(0, len(twin_list), config.batch_size)],
        readers,
        agg,
        config.site,
    )
    scale = float(torch.cat(norms).median())
    neutral_ids = list(lm.tokenizer(config.neutral_text)["input_ids"])
    neutral0 = _neutral_logprobs(lm, neutral_ids, config.site, None)

    run_dir: RunFolder | None = None
    done: set[int] = set()
    if out_dir is not None:
        identity = {
            "kind": "steering",
            "study": study.name,
            "prompts_fingerprint": P.prompts_fingerprint([*steered, *twin_list]),
            "model": lm.name,
            "dtype": str(lm.dtype),
            "directions": str(Path(run.path).resolve()),
            "config": asdict(replace(config, progress=True)),
        }
        run_dir = RunFolder(out_dir, identity, overwrite=overwrite)
        frame = P.prompts_frame(study, [*steered, *twin_list])
        done = run_dir.begin(frame, STEERED, "direction_id")

    todo = [d for d in dirs if d.direction_id not in done]
    if run_dir is not None:
        # a direction's forwards are the same batches at any world size: ranks take whole
        # directions (every rank ran the unsteered forwards above, the same on each)
        todo = distributed.shard(todo, lambda _: 1, run_dir.ranks)
    bar = tqdm(
        total=(len(done) + len(todo)) * len(config.alphas),
        initial=len(done) * len(config.alphas),
        desc=f"steering {config.probe}",
        unit="alpha",
        disable=not config.progress,
    )
    frames: dict[str, list[pd.DataFrame]] = {STEERED: [], NEUTRAL_TABLE: []}
    for d in todo:
        recs: list[dict[str, Any]] = []
        neutral: list[dict[str, Any]] = []
        for alpha in config.alphas:
            vec = float(alpha) * scale * d.vector

            def edit(b: int, batch: Sequence[P.Prompt], vec: Tensor = vec) -> Edit:
                pos = IV.position_tensor([rows_pos[p.prompt_id] for p in batch])
                return Edit(pos, vec, "add")

            got = IV.forwards(lm, batches, readers, agg, config.site, edit=edit)
            for p in steered:
                r, r0 = got[p.prompt_id], base[p.prompt_id]
                twin = sel.twins.get(p.prompt_id)
                qt = twin_read[twin.prompt_id].probs if twin is not None else None
                recs.append(
                    {
                        "direction_id": d.direction_id,
                        "direction": d.name,
                        "kind": d.kind,
                        "alpha": float(alpha),
                        "prompt_id": p.prompt_id,
                        "question_id": p.question_id,
                        "role": "on_target" if p.prompt_id in on_ids else "off_target",
                        "expected_score": r.score,
                        "score_shift": r.score - r0.score,
                        "option_mass": r.option_mass,
                        "option_mass_change": r.option_mass - r0.option_mass,
                        "tv_unsteered": IV.tv(r.probs, r0.probs),
                        "tv_target": IV.tv(r.probs, qt) if qt is not None else float("nan"),
                        "tv_target0": IV.tv(r0.probs, qt) if qt is not None else float("nan"),
                        "probs": r.probs.tolist(),
                    }
                )
            lp = _neutral_logprobs(lm, neutral_ids, config.site, vec)
            for t, (v, v0) in enumerate(zip(lp.tolist(), neutral0.tolist(), strict=True)):
                neutral.append(
                    {
                        "direction_id": d.direction_id,
                        "direction": d.name,
                        "kind": d.kind,
                        "alpha": float(alpha),
                        "token": t,
                        "neutral_logprob": v,
                        "neutral_logprob_change": v - v0,
                    }
                )
            bar.update(1)
        chunk = {STEERED: pd.DataFrame(recs), NEUTRAL_TABLE: pd.DataFrame(neutral)}
        if run_dir is not None:
            run_dir.write_chunk(chunk)
        else:
            for name, frame in chunk.items():
                frames[name].append(frame)
    bar.close()
    if run_dir is not None and not run_dir.ranks_done():
        run_dir.wait_for_finish()
        return finished(run_dir.path)
    if run_dir is not None:
        steered_df, neutral_df = run_dir.read_chunks(STEERED), run_dir.read_chunks(NEUTRAL_TABLE)
    else:
        steered_df = pd.concat(frames[STEERED], ignore_index=True)
        neutral_df = pd.concat(frames[NEUTRAL_TABLE], ignore_index=True)
    steered_df = steered_df.sort_values(["direction_id", "alpha", "prompt_id"]).reset_index(
        drop=True
    )
    neutral_df = neutral_df.sort_values(["direction_id", "alpha", "token"]).reset_index(drop=True)
    meta = {"site": config.site, "positions": config.positions}
    table = summarize(
        steered_df,
        neutral_df,
        options_of(study.questions),
        meta,
        n_boot=config.n_boot,
        seed=config.seed,
    )
    manifest: dict[str, Any] = {
        "kind": "steering",
        "study": {"name": study.name, "path": study.path},
        "config": asdict(config),
        "model": lm.describe(),
        "directions_run": str(run.path),
        "directions": info,
        "norm_scale": scale,
        "norm_scale_rule": f"median L2 norm of {config.site} at the steered positions "
        "({config.positions}) over the on-target prompts, unsteered",
        "conventions": {
            "distribution": "full-vocab float32 softmax at the last prompt token; label variants "
            f"aggregated by {agg}; renormalized over non-refusal options",
            "direction": f"{config.direction} (unit vector; alpha x norm_scale added)",
            "target_closure": "1 - sum TV(steered, twin) / sum TV(unsteered, twin)",
            "selectivity": "probe mean TV to unsteered / largest placebo's, paired bootstrap",
            "neutral": "neutral text steered at every token; mean per-token log-prob",
            "ci": f"95% percentile bootstrap over prompts (tokens), {config.n_boot} resamples",
        },
        "notes": sel.notes,
        "counts": {
            "on_target_prompts": len(sel.on),
            "off_target_prompts": len(sel.off),
            "twins": len(sel.twins),
            "directions": len(dirs),
            "resumed_directions": len(done),
            "neutral_tokens": len(neutral0),
        },
        "timings_s": {"total": round(time.time() - t0, 3)},
    }
    result = SteerResult(table, steered_df, neutral_df, manifest)
    if run_dir is not None:
        run_dir.write_table(STEERING, table)
        run_dir.write_table(STEERED, steered_df)
        run_dir.write_table(NEUTRAL_TABLE, neutral_df)
        import matplotlib.pyplot as plt

        on_q = sorted({p.question_id for p in sel.on})
        fig = dose_response(table, on_q[0] if on_q else None)
        fig.savefig(run_dir.path / "steering.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        run_dir.finish(manifest)
        result.out_dir = run_dir.path
    return result


def finished(path: str | Path) -> SteerResult:
    """A finished run folder's tables (what the ranks other than 0 return)."""
    path = Path(path)

    def read(name: str) -> pd.DataFrame:
        return pd.read_parquet(path / f"{name}.parquet")

    manifest = json.loads((path / MANIFEST).read_text())
    return SteerResult(read(STEERING), read(STEERED), read(NEUTRAL_TABLE), manifest, path)


def _neutral_logprobs(
    lm: LoadedModel, ids: list[int], site_name: str, vec: Tensor | None
) -> Tensor:
    """[token - 1] log p(token_t | tokens < t) of the neutral text, steered at every token."""
    x = torch.tensor([ids], device=lm.model.device)
    with torch.inference_mode():
        if vec is None:
            logits = lm.model(input_ids=x).logits
        else:
            pos = torch.arange(len(ids))[None]
            with edit_sites(lm, {site_name: Edit(pos, vec, "add")}):
                logits = lm.model(input_ids=x).logits
    lp = torch.log_softmax(logits[0, :-1].float(), -1)
    return lp.gather(1, x[0, 1:, None].to(lp.device))[:, 0].cpu().double()
