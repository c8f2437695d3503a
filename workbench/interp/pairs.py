"""Counterfactual pairs: prompts that differ in one factor alone, and where the tokens of one
sit in the other.

A pair is two prompts of the same question and option order whose cells agree on every other
factor (nulls included) and differ in `factor`. The design supplies them: a factor the design
never varies on its own (the organism's `age` moves together with party and region) has none,
and `factor_pairs` says so. Within a pair the prompt whose value comes first in the study's
value order is `clean`, the other `corrupt`; patching runs both ways.

Alignment of two prompts whose factor values have different token lengths (`align`): tokens
before the span are the same tokens at the same index; tokens after the span shift by the
length difference (`source index = target index + len(source span) - len(target span)`);
span tokens are aligned from the span's end (last with last), and a target span longer than
the source's maps its surplus leading tokens to the source span's first token.

`pair_prompts` finds the pairs without tokenizing the whole study: only the prompts in pairs
get token ids and factor spans (see its docstring).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from workbench.errors import StudyError, WorkbenchError
from workbench.study import prompts as P
from workbench.study.spans import Span, _TextOnly, factor_spans
from workbench.study.spec import Cell, Study


@dataclass(frozen=True)
class Pair:
    """Two prompts that differ in `factor` alone."""

    pair_id: int
    question_id: str
    factor: str
    clean: int
    """prompt_id of the prompt whose value comes first in the study's value order."""
    corrupt: int
    clean_value: str
    corrupt_value: str


def factor_pairs(
    study: Study,
    prompts: Sequence[P.Prompt],
    factor: str,
    *,
    questions: Sequence[str] | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
) -> list[Pair]:
    """Every pair of `prompts` that differ in `factor` alone (at most `max_pairs`, drawn
    uniformly with `seed`), in a stable order. Raises `StudyError` with the fix when the
    factor is unknown, has one level, or the design holds no such pair."""
    names = [f.name for f in study.factors]
    if factor not in names:
        raise StudyError(
            study.path,
            "factors",
            f"factor {factor!r} is not in the study",
            f"use one of: {', '.join(names)}",
        )
    values = study.factor(factor).values
    if len(values) < 2:
        raise StudyError(
            study.path,
            f"factors[{names.index(factor)}].values",
            f"factor {factor!r} has one level ({values[0]!r}): nothing to swap",
            "patch a factor with two or more values",
        )
    others = [n for n in names if n != factor]
    groups: dict[tuple[object, ...], list[P.Prompt]] = {}
    for p in prompts:
        if questions is not None and p.question_id not in questions:
            continue
        if p.factors.get(factor) is None:
            continue
        key = (p.question_id, p.permutation, *(p.factors.get(n) for n in others))
        groups.setdefault(key, []).append(p)
    order = {v: i for i, v in enumerate(values)}
    found: list[tuple[str, int, int, str, str]] = []
    for members in groups.values():
        members = sorted(members, key=lambda p: (order[str(p.factors[factor])], p.prompt_id))
        for a, b in itertools.combinations(members, 2):
            va, vb = str(a.factors[factor]), str(b.factors[factor])
            if va != vb:
                found.append((a.question_id, a.prompt_id, b.prompt_id, va, vb))
    if not found:
        raise StudyError(
            study.path,
            "design",
            f"no two prompts differ in {factor!r} alone"
            + (f" (questions {', '.join(questions)})" if questions else "")
            + ": the design never varies it with every other factor held fixed",
            f"add cells that repeat a cell with another {factor} value, or patch another factor",
        )
    found.sort(key=lambda x: (x[1], x[2]))
    if max_pairs is not None and len(found) > max_pairs:
        keep = sorted(random.Random(seed).sample(range(len(found)), max_pairs))
        found = [found[i] for i in keep]
    return [Pair(i, q, factor, c, k, vc, vk) for i, (q, c, k, vc, vk) in enumerate(found)]


def align(source: Span, target: Span, n_source: int, n_target: int) -> list[int]:
    """Source token index for each of the target's `n_target` tokens (the module's rule)."""
    shift = (source.token_end - source.token_start) - (target.token_end - target.token_start)
    out = []
    for t in range(n_target):
        if t < target.token_start:
            s = t
        elif t >= target.token_end:
            s = t + shift
        else:  # right-aligned inside the span, clamped at the source span's first token
            s = max(source.token_end - (target.token_end - t), source.token_start)
        out.append(min(max(s, 0), n_source - 1))
    return out


def persona_last_tokens(
    study: Study, prompts: Sequence[P.Prompt], tokenizer: Any
) -> dict[int, int]:
    """prompt_id -> index of the last token overlapping the persona text (prompts without a
    persona text are left out). Found like factor spans: the tokenizer's offset mapping."""
    add_special = study.template.format == "plain"
    out: dict[int, int] = {}
    for p in prompts:
        persona = P.persona_text(study, p.factors)
        start = p.text.find(persona) if persona else -1
        if start < 0:
            continue
        end = start + len(persona)
        fed = p.text.rstrip() if study.scoring.method == "sequence" else p.text
        enc = tokenizer(fed, add_special_tokens=add_special, return_offsets_mapping=True)
        toks = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end]
        if toks:
            out[p.prompt_id] = toks[-1]
    return out


@dataclass(frozen=True)
class PairPrompts:
    """The pairs of one factor and what patching needs of their prompts alone."""

    pairs: list[Pair]
    prompts: dict[int, P.Prompt]
    """prompt_id -> prompt (token ids included), for every prompt in a pair."""
    spans: dict[int, Span]
    """prompt_id -> the factor's span, for prompts in pairs where the fed text holds it."""


def pair_prompts(
    study: Study,
    tokenizer: Any,
    factor: str,
    *,
    questions: Sequence[str] | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
    spans: bool = True,
) -> PairPrompts:
    """`factor_pairs` of the study's prompts, with token ids (and the factor's spans when
    `spans`) for the prompts in pairs only.

    Pairs need no tokens: the study is rendered as text (through `workbench.study.prompts`,
    up to the last question asked; prompt ids are assigned question by question, so they are
    the full rendering's). The prompts in pairs are rendered again, tokenized, from the study
    restricted to their cells and questions: a prompt's text and ids depend only on its
    question, cell and option order, so these are the same prompts (checked: equal text), and
    their spans come from `factor_spans` on that restricted study.
    """
    asked = [i for i, q in enumerate(study.questions) if questions is None or q.id in questions]
    head = replace(study, questions=study.questions[: max(asked) + 1]) if asked else study
    text_only = P.render(head, cast("Any", _TextOnly(tokenizer)))
    pairs = factor_pairs(
        study, text_only, factor, questions=questions, max_pairs=max_pairs, seed=seed
    )
    by_id = {p.prompt_id: p for p in text_only}
    used = [by_id[i] for i in sorted({i for pr in pairs for i in (pr.clean, pr.corrupt)})]
    names = [f.name for f in study.factors]

    def key(p: P.Prompt) -> tuple[object, ...]:
        return (p.question_id, p.permutation, *(p.factors.get(n) for n in names))

    cells: dict[tuple[object, ...], Cell] = {}
    for p in used:
        cells.setdefault(tuple(p.factors.get(n) for n in names), dict(p.factors))
    qids = {p.question_id for p in used}
    small = replace(
        study,
        questions=tuple(q for q in study.questions if q.id in qids),
        cells=tuple(cells.values()),
    )
    rendered = P.render(small, tokenizer)
    found = {key(p): p for p in rendered}
    prompts: dict[int, P.Prompt] = {}
    for p in used:
        twin = found.get(key(p))
        if twin is None or twin.text != p.text:
            raise WorkbenchError(
                f"prompt {p.prompt_id}: rendering its cell alone gives another prompt",
                fix="report this: the rendering of a prompt depends on other cells",
            )
        prompts[p.prompt_id] = replace(twin, prompt_id=p.prompt_id)
    out_spans: dict[int, Span] = {}
    if spans:
        twin_of = {found[key(by_id[i])].prompt_id: i for i in prompts}
        for twin_id, ss in factor_spans(small, rendered, tokenizer, [factor]).items():
            for span in ss if twin_id in twin_of else ():
                out_spans[twin_of[twin_id]] = span
    return PairPrompts(pairs, prompts, out_spans)
