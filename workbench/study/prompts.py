"""The one place prompts are rendered: study cells x questions x option orders -> token ids.

Traps handled here (docs/MEASUREMENT.md §2):
- Labels follow the *displayed position* (A is always the first option shown); `option_id`
  is the canonical index, so permutations can be averaged back per option.
- Refusal options are shown last and never permuted.
- Plain prompts are tokenized with the tokenizer's special tokens (BOS for Llama-style);
  chat prompts are rendered with the tokenizer's chat template, which writes BOS itself, and
  tokenized with `add_special_tokens=False`, so there is never a second BOS.
- A question only depends on the factors it names: prompts are deduplicated over factors a
  question does not use (their column is null for that prompt).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import random
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workbench.errors import StudyError
from workbench.study.encoding import Joint, encode, joint_continuations
from workbench.study.spec import Cell, Question, Study

if TYPE_CHECKING:
    import pandas as pd
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Prompt:
    """One rendered prompt: a cell, a question and one option order."""

    prompt_id: int
    persona_id: str
    question_id: str
    permutation: int
    """Index of the option order (0 = canonical)."""
    order: tuple[int, ...]
    """Canonical option ids in displayed order (refusal options last)."""
    factors: Cell
    text: str
    """The exact text fed to the model, after any chat template."""
    input_ids: tuple[int, ...]
    """The exact context ids fed to the model (BOS included where the tokenizer adds it)."""
    answer_offset: int
    """Character offset in `text` where the model's answer begins (len(text))."""


@dataclass(frozen=True)
class OptionTarget:
    """One scored surface form of one option of one prompt."""

    option_id: int
    label: str
    position: int
    is_refusal: bool
    variant: int
    surface: str
    """The variant's surface form, e.g. " A"."""
    continuation: str
    """The exact string scored after the context: under `sequence` scoring the prompt's
    trailing whitespace moved in front of `surface` (lm-eval's rule), else `surface`."""


def option_orders(study: Study, question: Question) -> list[tuple[int, ...]]:
    """Displayed orders of the substantive options; refusal options are appended unpermuted."""
    n = len(question.options)
    canonical = tuple(range(n))
    spec = study.orders
    if spec.kind == "canonical" or n == 1:
        orders = [canonical]
    elif spec.kind == "cyclic":
        orders = [tuple((i + s) % n for i in range(n)) for s in range(n)]
    elif spec.kind == "all":
        if math.factorial(n) <= spec.cap:
            orders = list(itertools.permutations(canonical))
        else:
            rng = random.Random(f"{spec.seed}/{question.id}")
            picked = {canonical}
            while len(picked) < spec.cap:
                perm = list(canonical)
                rng.shuffle(perm)
                picked.add(tuple(perm))
            orders = [canonical, *sorted(picked - {canonical})]
    else:
        rng = random.Random(f"{spec.seed}/{question.id}")
        wanted = min(spec.k, math.factorial(n))
        picked_list = [canonical]
        while len(picked_list) < wanted:
            perm = list(canonical)
            rng.shuffle(perm)
            if tuple(perm) not in picked_list:
                picked_list.append(tuple(perm))
        orders = picked_list
    refusal = tuple(range(n, n + len(question.refusal)))
    return [o + refusal for o in orders]


def _fill(template: str, values: dict[str, str]) -> str:
    return template.format_map(values)


@functools.lru_cache(maxsize=1024)
def _names(template: str) -> frozenset[str]:
    return frozenset(n for _, n, _, _ in string.Formatter().parse(template) if n)


def persona_text(study: Study, cell: Cell) -> str:
    """Join the persona fragments whose factors are all specified in `cell`."""
    parts = []
    for frag in study.template.persona:
        needed = _names(frag)
        if all(cell.get(n) is not None for n in needed):
            parts.append(_fill(frag, {k: v for k, v in cell.items() if v is not None}))
    return " ".join(parts)


def persona_id(study: Study, cell: Cell) -> str:
    """A readable, stable id: the persona factors' values, `*` where unspecified."""
    names = study.persona_factors
    if not names:
        return "all"
    return "|".join(f"{n}={cell.get(n) or '*'}" for n in names)


def question_factors(study: Study, question: Question) -> set[str]:
    """Stimulus factors a question names (directly or via the shared templates)."""
    t = study.template
    used = _names(question.text)
    for part in (t.prompt, t.system, t.user, t.prefill):
        if part:
            used |= _names(part)
    return {f.name for f in study.factors if f.role == "stimulus" and f.name in used}


def render(study: Study, tokenizer: PreTrainedTokenizerBase) -> list[Prompt]:
    """All prompts of a study, in a deterministic order, with their exact token ids."""
    # Render every text first, then tokenize them in one batched call (the per-prompt calls
    # cost more than the rendering); the ids are the same as one call per text.
    pending: list[tuple[Question, Cell, int, tuple[int, ...], str, str, str]] = []
    seen: set[tuple[str, tuple[str | None, ...], int]] = set()
    personas: dict[tuple[str | None, ...], tuple[str, str]] = {}
    persona_names = set(study.persona_factors)
    for question in study.questions:
        q_factors = question_factors(study, question)
        orders = option_orders(study, question)
        relevant = [f.name for f in study.factors if f.name in persona_names | q_factors]
        for cell in study.cells:
            missing = [n for n in q_factors if cell.get(n) is None]
            if missing:
                continue  # a coarse cell cannot be asked a question about an unspecified stimulus
            reduced: Cell = {
                f.name: (cell[f.name] if f.name in relevant else None) for f in study.factors
            }
            key_vals = tuple(reduced[f.name] for f in study.factors)
            # persona id and text depend only on the reduced cell: once per distinct one
            persona = personas.get(key_vals)
            if persona is None:
                persona = personas[key_vals] = (
                    persona_id(study, reduced),
                    persona_text(study, reduced),
                )
            for perm_i, order in enumerate(orders):
                key = (question.id, key_vals, perm_i)  # key_vals fix the persona too
                if key in seen:
                    continue
                seen.add(key)
                text = _render_text(study, question, reduced, order, tokenizer, persona[1])
                # Under sequence scoring the context is fed without its trailing whitespace,
                # which moves to the continuation (see `continuation_ids`).
                fed = text.rstrip() if study.scoring.method == "sequence" else text
                pending.append((question, reduced, perm_i, order, text, fed, persona[0]))
    all_ids = _encode_prompts(study, [p[5] for p in pending], tokenizer)
    return [
        Prompt(
            prompt_id=i,
            persona_id=pid,
            question_id=question.id,
            permutation=perm_i,
            order=order,
            factors=reduced,
            text=text,
            input_ids=tuple(ids),
            answer_offset=len(text),
        )
        for i, ((question, reduced, perm_i, order, text, _, pid), ids) in enumerate(
            zip(pending, all_ids, strict=True)
        )
    ]


def _render_text(
    study: Study,
    question: Question,
    cell: Cell,
    order: tuple[int, ...],
    tokenizer: PreTrainedTokenizerBase,
    persona: str,
) -> str:
    """The prompt's text; `persona` is `persona_text(study, cell)` (once per cell in `render`)."""
    t = study.template
    values = {k: v for k, v in cell.items() if v is not None}
    all_options = question.all_options
    lines = []
    labels = []
    for pos, opt in enumerate(order):
        label = question.label_at(pos, all_options[opt])
        labels.append(label)
        lines.append(
            _fill(
                t.option_line, {"label": label, "text": all_options[opt], "position": str(pos + 1)}
            )
        )
    fields = {
        **values,
        "persona": persona,
        "question": _fill(question.text, values),
        "options": t.option_separator.join(lines),
        "labels": ", ".join(labels),
    }
    if t.format == "plain":
        assert t.prompt is not None
        return _fill(t.prompt, fields)
    messages = []
    if t.system is not None:
        messages.append({"role": "system", "content": _fill(t.system, fields)})
    assert t.user is not None
    messages.append({"role": "user", "content": _fill(t.user, fields)})
    if t.chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise StudyError(
            study.path,
            "template.format",
            "the model's tokenizer has no chat template",
            "give one with `template.chat_template: FILE` (or `--chat-template FILE`), "
            "or use `format: plain` for base models",
        )
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=t.chat_template, tokenize=False, add_generation_prompt=True
    )
    assert isinstance(rendered, str)
    if t.prefill is not None:
        rendered += _fill(t.prefill, fields)
    return rendered


def _encode_prompts(
    study: Study, texts: list[str], tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    # Chat templates write BOS themselves: adding special tokens would put a second BOS.
    add_special = study.template.format == "plain"
    return encode(tokenizer, texts, add_special)


def option_targets(study: Study, prompt: Prompt) -> list[OptionTarget]:
    """Every (option, variant) continuation scored for a prompt."""
    moved = prompt.text[len(prompt.text.rstrip()) :] if study.scoring.method == "sequence" else ""
    return list(_targets(study, prompt.question_id, prompt.order, moved))


def _targets(
    study: Study, question_id: str, order: tuple[int, ...], moved: str
) -> tuple[OptionTarget, ...]:
    """`option_targets` of every prompt of one question, order and moved whitespace, kept in
    `study.option_targets_cache` (a grid repeats them once per persona)."""
    cache = study.option_targets_cache
    key = (question_id, order, moved)
    found = cache.get(key)
    if found is not None:
        return found
    question = study.question_by_id[question_id]
    all_options = question.all_options
    out = []
    for pos, opt in enumerate(order):
        label = question.label_at(pos, all_options[opt])
        target = label if study.scoring.target == "label" else all_options[opt]
        for v_i, variant in enumerate(study.scoring.variants):
            surface = variant.replace("{}", target)
            out.append(
                OptionTarget(
                    option_id=opt,
                    label=label,
                    position=pos,
                    is_refusal=opt >= len(question.options),
                    variant=v_i,
                    surface=surface,
                    continuation=moved + surface,
                )
            )
    cache[key] = found = tuple(out)
    return found


def continuation_ids(
    tokenizer: PreTrainedTokenizerBase, study: Study, prompt: Prompt, surface: str
) -> list[int]:
    """Token ids scored for the surface form `surface` (e.g. " Agree") after `prompt`.

    `next_token`: the surface's own single token, read at the last prompt token.
    `sequence`: split the way lm-evaluation-harness does. The context's trailing whitespace
    moves to the front of the continuation; context and continuation are encoded together and
    the continuation is the tokens after the context's tokens, so merges across the boundary
    are kept. If the context's tokens are not a prefix of the joint encoding, fall back to
    encoding the continuation alone (the ids actually scored are recorded either way). The
    joint encoding is computed from the context's tail where that gives the same ids
    (`workbench.study.encoding`).
    """
    return continuation_ids_many(tokenizer, study, [(prompt, surface)])[0]


def continuation_ids_many(
    tokenizer: PreTrainedTokenizerBase, study: Study, pairs: list[tuple[Prompt, str]]
) -> list[list[int]]:
    """`continuation_ids` of every (prompt, surface) pair, with batched tokenizer calls."""
    if study.scoring.method == "next_token":
        surfaces = sorted({s for _, s in pairs})
        own = dict(zip(surfaces, encode(tokenizer, surfaces, False), strict=True))
        return [list(own[s]) for _, s in pairs]
    add_special = study.template.format == "plain"
    joints = []
    for prompt, surface in pairs:
        # `render` fed exactly the stripped text under sequence scoring: reuse its ids.
        stripped = prompt.text.rstrip()
        moved = prompt.text[len(stripped) :]
        joints.append(Joint(stripped, prompt.input_ids, moved + surface))
    return joint_continuations(tokenizer, joints, add_special)


def validate_for_tokenizer(
    study: Study,
    prompts: list[Prompt],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
) -> None:
    """Checks that need the tokenizer: single-token labels and prompt lengths."""
    if study.scoring.method == "next_token":
        # every (question, option, variant) surface, tokenized in one batched call
        slots = [
            (q_i, text, variant.replace("{}", target))
            for q_i, question in enumerate(study.questions)
            for pos, text in enumerate(question.all_options)
            for target in [
                question.label_at(pos, text) if study.scoring.target == "label" else text
            ]
            for variant in study.scoring.variants
        ]
        surfaces = sorted({surface for _, _, surface in slots})
        encoded = tokenizer(surfaces, add_special_tokens=False)["input_ids"] if surfaces else []
        ids_of = dict(zip(surfaces, encoded, strict=True))
        for q_i, _, surface in slots:
            ids = ids_of[surface]
            if len(ids) != 1:
                pieces = tokenizer.convert_ids_to_tokens(ids)
                raise StudyError(
                    study.path,
                    f"questions[{q_i}].labels",
                    f"{surface!r} is {len(ids)} tokens {pieces} under this tokenizer, "
                    "but `scoring.method: next_token` needs one",
                    "use `scoring.method: sequence`, shorter labels (letters), "
                    "or drop that variant from `scoring.variants`",
                )
    if max_length is not None:
        for p in prompts:
            if len(p.input_ids) >= max_length:
                q_i = next(i for i, q in enumerate(study.questions) if q.id == p.question_id)
                raise StudyError(
                    study.path,
                    f"questions[{q_i}]",
                    f"prompt {p.prompt_id} ({p.persona_id}) is {len(p.input_ids)} tokens, "
                    f"the model's context is {max_length}",
                    "shorten the persona or question template, or use a model with a longer context",
                )
    # Two options must not share a scored token (e.g. labels "A" and " A" under variants
    # " {}" and "{}"): their probabilities would be counted twice.
    if study.scoring.method == "next_token":
        owner: dict[tuple[int, int], str] = {}
        for q_i, text, surface in slots:
            (tid,) = ids_of[surface]
            if owner.get((q_i, tid), text) != text:
                raise StudyError(
                    study.path,
                    f"questions[{q_i}].labels",
                    f"options {owner[(q_i, tid)]!r} and {text!r} are scored by the same token "
                    f"{tokenizer.convert_ids_to_tokens([tid])[0]!r}",
                    "give every option a distinct label",
                )
            owner[(q_i, tid)] = text


def prompts_frame(study: Study, prompts: list[Prompt]) -> pd.DataFrame:
    """`prompts.parquet`: one row per prompt, one column per factor."""
    import pandas as pd

    rows = []
    for p in prompts:
        row: dict[str, object] = {
            "prompt_id": p.prompt_id,
            "persona_id": p.persona_id,
            "question_id": p.question_id,
            "permutation": p.permutation,
            "order": list(p.order),
        }
        for f in study.factors:
            row[f.name] = p.factors.get(f.name)
        row.update({"prompt": p.text, "input_ids": list(p.input_ids), "n_tokens": len(p.input_ids)})
        rows.append(row)
    frame = pd.DataFrame(rows)
    for f in study.factors:
        frame[f.name] = frame[f.name].astype("string")
    return frame


def prompts_fingerprint(prompts: list[Prompt]) -> str:
    """A hash of the exact prompts and ids: a resumed run must see the same ones."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.prompt_id, p.text, list(p.input_ids), list(p.order)]).encode())
    return h.hexdigest()[:16]
