"""What an attribution run is asked and checks before its first forward pass: its settings
(`AttributionConfig`), every input check, and the plan (`prepare`: the pairs AtP patches,
the prompts IG integrates, their readers, spans and counterfactual inputs). The method and
its conventions are `workbench.interp.attribution`'s docstring."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workbench.engine.models import LoadedModel
from workbench.errors import StudyError, WorkbenchError
from workbench.interp import gradients as G
from workbench.interp import readers as R
from workbench.interp.pairs import Pair, factor_pairs, persona_last_tokens
from workbench.interp.patch_tables import POSITIONS
from workbench.interp.patching import DIRECTIONS, PatchConfig
from workbench.interp.sites import Site, _hf_modules, resolve_sites
from workbench.study import prompts as P
from workbench.study.spans import Span, factor_spans
from workbench.study.spec import Study

METHODS = ("atp", "ig")


@dataclass(frozen=True)
class AttributionConfig:
    """Settings of an attribution run (written to the manifest)."""

    metric: str = "expected_score"
    """expected_score | log_odds | kl (AtP only)."""
    options: tuple[str, str] | None = None
    """log_odds: the two option texts (default: the first and the last substantive option)."""
    questions: tuple[str, ...] | None = None
    """Question ids (None: every question the metric fits)."""
    sites: tuple[str, ...] = PatchConfig.sites
    """AtP: TransformerLens site names or globs (the patching grid's)."""
    positions: tuple[str, ...] = PatchConfig.positions
    directions: tuple[str, ...] = DIRECTIONS
    max_pairs: int | None = None
    """AtP: at most this many pairs per factor, drawn like patching's (same pairs)."""
    min_effect: float = 0.05
    top_k: int = 5
    """AtP: cells per question and factor re-patched for real (0: none)."""
    patching: tuple[str, ...] = ()
    """AtP: folders of patching runs to report agreement with."""
    baselines: tuple[str, ...] = ("counterfactual", "zero")
    n_steps: int = 50
    integration: str = "gausslegendre"
    max_prompts: int | None = None
    """IG: at most this many prompts, drawn uniformly with `seed`."""
    seed: int = 0
    n_boot: int = 1000
    batch_size: int = 64
    """Rows per forward (AtP: prompts; IG: interpolation steps)."""
    chunk_units: int = 32
    """Pairs (AtP) or prompts (IG) per chunk written to disk."""
    measure_cost: bool = True
    """AtP: time a plain forward of every batch too (cost in forward-equivalents)."""
    progress: bool = True


@dataclass
class Context:
    """Everything checked before the first forward pass."""

    method: str
    prompts: dict[int, P.Prompt]
    questions: tuple[str, ...]
    factors: list[str]
    pairs: list[tuple[str, Pair]]
    """AtP's units: (factor, pair)."""
    targets: list[P.Prompt]
    """IG's units: prompts."""
    sites: list[Site]
    readers: dict[int, R.Reader]
    spans: dict[int, list[Span]]
    options: dict[str, tuple[int, int]]
    persona_last: dict[int, int] = field(default_factory=dict)
    counterfactual: dict[tuple[int, str], list[tuple[int, ...]]] = field(default_factory=dict)


def _bad(message: str, fix: str) -> WorkbenchError:
    return WorkbenchError(message, fix=fix)


def _check_config(study: Study, config: AttributionConfig, method: str) -> None:
    if method not in METHODS:
        raise _bad(f"unknown method {method!r}", f"use one of: {', '.join(METHODS)}")
    if config.metric not in G.METRICS or (method == "ig" and config.metric == "kl"):
        ok = G.METRICS if method == "atp" else G.METRICS[:2]
        raise _bad(f"metric {config.metric!r} is not offered for {method}", f"use {', '.join(ok)}")
    for name in ("batch_size", "chunk_units", "n_boot"):
        if getattr(config, name) < 1:
            raise _bad(f"{name} must be at least 1", "pass a positive number")
    for name in ("max_pairs", "max_prompts"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise _bad(f"{name} must be at least 1", "pass a positive number (or none: all)")
    if config.top_k < 0:
        raise _bad("top_k must be 0 or more", "pass 0 to re-patch nothing")
    if study.scoring.method != "next_token":
        raise StudyError(
            study.path,
            "scoring.method",
            "attribution reads the next-token answer distribution; this study scores sequences",
            "use `scoring.method: next_token` with single-token labels",
        )
    if method == "ig":
        bad = [b for b in config.baselines if b not in G.BASELINES]
        if bad or not config.baselines:
            raise _bad(
                f"unknown baseline {bad[0] if bad else '(none given)'!r}",
                f"use one or more of: {', '.join(G.BASELINES)}",
            )
        try:
            G.quadrature(config.integration, config.n_steps)
        except WorkbenchError as err:
            raise _bad(err.message, err.fix) from err
    else:
        bad = [p for p in config.positions if p not in POSITIONS]
        if bad or not config.positions:
            raise _bad(
                f"unknown position {bad[0] if bad else '(none given)'!r}",
                f"use one or more of: {', '.join(POSITIONS)}",
            )
        bad = [d for d in config.directions if d not in DIRECTIONS]
        if bad or not config.directions:
            raise _bad(
                f"unknown direction {bad[0] if bad else '(none given)'!r}",
                f"use one or both of: {', '.join(DIRECTIONS)}",
            )
        for folder in config.patching:
            if not (Path(folder) / "patching.parquet").exists():
                raise _bad(
                    f"{folder} is not a finished patching run (no patching.parquet)",
                    "pass the --out folder of a finished `workbench patch` run",
                )


def _questions(study: Study, config: AttributionConfig) -> tuple[tuple[str, ...], dict]:
    """The questions the metric fits, and log_odds' option indices per question."""
    qids = [q.id for q in study.questions]
    for qid in config.questions or ():
        if qid not in qids:
            raise _bad(f"unknown question {qid!r}", f"use one of: {', '.join(qids)}")
    chosen, options = [], {}
    for q in study.questions:
        if config.questions is not None and q.id not in config.questions:
            continue
        if config.metric == "expected_score" and q.values is None:
            if config.questions is not None:
                raise _bad(
                    f"question {q.id!r} has no ordinal values: no expected score",
                    "use --metric log_odds (or kl for atp), or give the question `values`",
                )
            continue
        pair = (0, len(q.options) - 1)
        if config.options is not None:
            missing = [o for o in config.options if o not in q.options]
            if missing:
                raise _bad(
                    f"option {missing[0]!r} is not a substantive option of {q.id!r}",
                    f"use two of: {', '.join(q.options)}",
                )
            pair = (q.options.index(config.options[0]), q.options.index(config.options[1]))
        chosen.append(q.id)
        options[q.id] = pair
    if not chosen:
        raise _bad(
            f"no question fits the metric {config.metric!r}",
            "use --metric log_odds, or a question with ordinal `values`",
        )
    return tuple(chosen), options


def prepare(
    study: Study,
    lm: LoadedModel,
    method: str,
    config: AttributionConfig,
    factors: Sequence[str] | None,
) -> Context:
    """Check every input and plan the run; raises before any forward pass."""
    _check_config(study, config, method)
    questions, options = _questions(study, config)
    names = [f.name for f in study.factors]
    for f in factors or ():
        if f not in names:
            raise StudyError(
                study.path,
                "factors",
                f"factor {f!r} is not in the study",
                f"use {', '.join(names)}",
            )
    rendered = P.render(study, lm.tokenizer)
    P.validate_for_tokenizer(study, rendered, lm.tokenizer, lm.max_length)
    by_id = {p.prompt_id: p for p in rendered}
    sites: list[Site] = []
    units: list[tuple[str, Pair]] = []
    targets: list[P.Prompt] = []
    if method == "atp":
        n_layers = int(lm.model.config.get_text_config().num_hidden_layers)
        try:
            sites = resolve_sites(config.sites, n_layers)
            _hf_modules(lm.model, sites)
        except WorkbenchError as err:
            raise _bad(f"attribution patching sites: {err.message}", err.fix) from err
        wanted = list(factors) if factors else names
        for f in wanted:
            try:
                pairs = factor_pairs(
                    study,
                    rendered,
                    f,
                    questions=questions,
                    max_pairs=config.max_pairs,
                    seed=config.seed,
                )
            except StudyError:
                if factors:
                    raise
                continue  # factors=None: every factor the design varies alone
            units += [(f, pr) for pr in pairs]
        if not units:
            raise _bad("no factor has counterfactual pairs", "pass factors the design varies alone")
        factor_list = list(dict.fromkeys(f for f, _ in units))
        used = sorted({i for _, pr in units for i in (pr.clean, pr.corrupt)})
    else:
        factor_list = list(factors) if factors else names
        if "counterfactual" in config.baselines:
            one = [f for f in factor_list if len(study.factor(f).values) < 2]
            if one:
                raise _bad(
                    f"factor {one[0]!r} has one value: no counterfactual baseline",
                    "leave it out of --factor, or use --baseline zero",
                )
        if "pad" in config.baselines and lm.tokenizer.pad_token_id is None:
            raise _bad("the tokenizer has no pad token", "use --baseline zero or counterfactual")
        targets = [p for p in rendered if p.question_id in questions]
        if config.max_prompts is not None and len(targets) > config.max_prompts:
            keep = random.Random(config.seed).sample(range(len(targets)), config.max_prompts)
            targets = [targets[i] for i in sorted(keep)]
        used = [p.prompt_id for p in targets]
    try:
        spans = factor_spans(study, rendered, lm.tokenizer, factor_list)
    except WorkbenchError as err:
        raise _bad(err.message, err.fix) from err
    ctx = Context(
        method,
        by_id,
        questions,
        factor_list,
        units,
        targets,
        sites,
        R.readers_for(study, lm, [by_id[i] for i in used]),
        {i: spans[i] for i in used},
        options,
    )
    if method == "atp" and "persona_last" in config.positions:
        ctx.persona_last = persona_last_tokens(study, [by_id[i] for i in used], lm.tokenizer)
    if method == "ig" and "counterfactual" in config.baselines:
        ctx.counterfactual = G.counterfactual_ids(study, targets, factor_list, lm.tokenizer)
    return ctx
