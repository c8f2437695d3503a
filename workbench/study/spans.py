"""Where each factor value sits in each prompt: exact character spans and their token spans.

Activation capture, patching and attribution all need "the tokens of the actor's name" in a
prompt. Searching the text for the value is wrong whenever the value also appears in fixed
template text ("Up" in 'Do you like "Up"? Up or down...') or inside another value. Instead the
study is rendered a second time, through the one rendering module (`workbench.study.prompts`), with
every factor value replaced by a unique sentinel; the sentinels' positions, shifted back by
the length differences, are the values' exact character spans in the real text. The
tokenizer's offset mapping (fast tokenizers) turns them into token spans: every token that
overlaps the value's characters, so a leading-space token such as " Mara" counts. A value
that occurs more than once is reported at its last occurrence (nearest the answer), with the
number of occurrences.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

from workbench.errors import WorkbenchError
from workbench.study import prompts as P
from workbench.study.spec import Study

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Span:
    """Where one factor's value sits in one prompt."""

    factor: str
    char_start: int
    char_end: int
    """Characters [char_start, char_end) of `Prompt.text` (the last occurrence)."""
    token_start: int
    token_end: int
    """Tokens [token_start, token_end) of `Prompt.input_ids` overlapping those characters."""
    n_occurrences: int


class _TextOnly:
    """A tokenizer stand-in that renders text only: chat templates go to the real tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.chat_template = getattr(tokenizer, "chat_template", None)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self._tok.apply_chat_template(*args, **kwargs)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": []}


def _sentinel(factor_i: int, value_i: int) -> str:
    # Private-use characters: never in a study's text, never changed by a chat template.
    return f"\ue000{factor_i}.{value_i}\ue001"


_SENTINEL = re.compile("\ue000(\\d+)\\.(\\d+)\ue001")


def factor_spans(
    study: Study, prompts: Sequence[P.Prompt], tokenizer: Any, factors: Sequence[str] | None = None
) -> dict[int, list[Span]]:
    """Token span of every factor value in every prompt (prompt_id -> spans).

    The study is rendered a second time with each factor value replaced by a unique sentinel
    (a bijection, so the prompts come out in the same order with the same ids); sentinel
    positions give exact character spans in the real text, and the tokenizer's offset mapping
    turns them into token spans. Needs a fast tokenizer (offset mappings).
    """
    wanted = set(factors) if factors is not None else {f.name for f in study.factors}
    names = [f.name for f in study.factors]
    value_index = [{v: j for j, v in enumerate(f.values)} for f in study.factors]
    marked_cells = tuple(
        {
            n: None if v is None else _sentinel(names.index(n), value_index[names.index(n)][v])
            for n, v in cell.items()
        }
        for cell in study.cells
    )
    marked_factors = tuple(
        replace(f, values=tuple(_sentinel(i, j) for j in range(len(f.values))))
        for i, f in enumerate(study.factors)
    )
    if not getattr(tokenizer, "is_fast", False):
        raise WorkbenchError(
            "factor spans need a fast tokenizer (offset mappings)",
            fix="load the model's tokenizer with use_fast=True, or capture --positions answer",
        )
    marked = P.render(
        replace(study, cells=marked_cells, factors=marked_factors),
        cast("PreTrainedTokenizerBase", _TextOnly(tokenizer)),
    )
    if len(marked) != len(prompts):
        raise WorkbenchError(
            "factor spans: the marked rendering does not match the prompts",
            fix="pass the prompts rendered from this study (workbench.study.prompts.render)",
        )
    add_special = study.template.format == "plain"
    out: dict[int, list[Span]] = {}
    for prompt, mark in zip(prompts, marked, strict=True):
        char_spans = _char_spans(mark.text, study, wanted)
        fed = prompt.text.rstrip() if study.scoring.method == "sequence" else prompt.text
        enc = tokenizer(fed, add_special_tokens=add_special, return_offsets_mapping=True)
        if list(enc["input_ids"]) != list(prompt.input_ids):
            raise WorkbenchError(
                f"prompt {prompt.prompt_id}: re-tokenizing the text does not give its input ids",
                fix="use the tokenizer the prompts were rendered with",
            )
        offsets = enc["offset_mapping"]
        spans = []
        for name, occurrences in char_spans.items():
            start, end = occurrences[-1]
            value = prompt.factors.get(name)
            if prompt.text[start:end] != value:
                raise WorkbenchError(
                    f"prompt {prompt.prompt_id}: factor {name!r} span {start}:{end} reads "
                    f"{prompt.text[start:end]!r}, not {value!r}",
                    fix="report this: the template rendering changed the value's text",
                )
            toks = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
            if not toks:
                continue  # a value that fell outside the fed text (trailing whitespace)
            spans.append(Span(name, start, end, toks[0], toks[-1] + 1, len(occurrences)))
        out[prompt.prompt_id] = spans
    return out


def _char_spans(
    marked_text: str, study: Study, wanted: set[str]
) -> dict[str, list[tuple[int, int]]]:
    """Character spans in the *real* text of every sentinel in `marked_text`."""
    spans: dict[str, list[tuple[int, int]]] = {}
    shift = 0
    for m in _SENTINEL.finditer(marked_text):
        factor = study.factors[int(m.group(1))]
        value = factor.values[int(m.group(2))]
        start = m.start() + shift
        if factor.name in wanted:
            spans.setdefault(factor.name, []).append((start, start + len(value)))
        shift += len(value) - (m.end() - m.start())
    return spans
