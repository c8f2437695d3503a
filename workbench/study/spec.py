"""What a study is: factors, design, template, questions, option orders, scoring, sampling.

Frozen dataclasses, built by `workbench.study.load` from a YAML file. A study is data, not
code; the format is documented in README.md ("Study files"); `probes/*.yaml` are examples.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from workbench.study.prompts import OptionTarget

Cell = dict[str, str | None]
"""One factor combination: factor name -> value, or None where the factor is unspecified."""

SCHEMA_VERSION = 1
LETTERS = string.ascii_uppercase
PROMPT_FIELDS = ("persona", "question", "options", "labels")
OPTION_LINE_FIELDS = ("label", "text", "position")


@dataclass(frozen=True)
class Factor:
    """A named variable whose values fill `{name}` placeholders."""

    name: str
    role: Literal["persona", "stimulus"]
    """`persona` factors describe who answers; `stimulus` factors describe what is asked about."""
    values: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    """Population weights of the values (normalized); used to mix subgroups into coarse groups."""


@dataclass(frozen=True)
class Design:
    """Which factor combinations (cells) are asked."""

    kind: Literal["factorial", "table", "random"]
    path: str | None = None
    """`table`: CSV, JSONL or parquet file (relative to the study file); one column per factor."""
    n: int | None = None
    """`random`: number of distinct random combinations."""
    seed: int = 0
    coarse: tuple[Cell, ...] = ()
    """Extra cells that leave some factors unspecified (coarse personas such as "Democrats")."""


@dataclass(frozen=True)
class Template:
    """How a cell and a question become a prompt (rendered only in `workbench.study.prompts`)."""

    format: Literal["plain", "chat"]
    persona: tuple[str, ...]
    """Fragments joined by a space; a fragment naming an unspecified factor is dropped."""
    prompt: str | None
    """`plain`: the whole prompt, with `{persona}`, `{question}`, `{options}`, `{labels}`."""
    system: str | None
    user: str | None
    prefill: str | None
    """`chat`: text the assistant turn starts with (e.g. "Answer: (")."""
    option_line: str
    option_separator: str
    chat_template: str | None = None
    """`chat`: a Jinja chat template (the text of `template.chat_template: FILE`) used instead
    of the tokenizer's own, for tokenizers that ship none (many GGUF files)."""


@dataclass(frozen=True)
class Question:
    """One survey item. Options are in canonical order; refusal options come last, unpermuted."""

    id: str
    text: str
    options: tuple[str, ...]
    refusal: tuple[str, ...]
    labels: tuple[str, ...] | Literal["texts"]
    """Label per displayed position (substantive then refusal), or "texts" (label = option text)."""
    values: tuple[float, ...] | None
    """Ordinal value per substantive option (canonical order); None if the item is not ordinal."""

    @property
    def all_options(self) -> tuple[str, ...]:
        return self.options + self.refusal

    def label_at(self, position: int, text: str) -> str:
        """The label displayed at 0-based `position` for an option showing `text`."""
        return text if self.labels == "texts" else self.labels[position]


@dataclass(frozen=True)
class Orders:
    """Option orders to present: permutations of the substantive options."""

    kind: Literal["canonical", "cyclic", "all", "random"]
    k: int = 1
    """`random`: number of random orders (the canonical order is always included)."""
    cap: int = 24
    """`all`: at most this many orders; above it, `cap` distinct orders drawn with `seed`."""
    seed: int = 0


@dataclass(frozen=True)
class Scoring:
    """How an option's log-probability is read (docs/MEASUREMENT.md §2)."""

    method: Literal["next_token", "sequence"]
    target: Literal["label", "text"]
    """What is scored: the displayed label ("A") or the option text ("Strongly agree")."""
    variants: tuple[str, ...]
    """Surface forms, `{}` standing for the target: " {}" is space+target, "{}" the bare target."""
    aggregate: Literal["sum", "max"]
    """How variants combine, in probability space (Meister sums; OpinionQA takes the max)."""
    top_k: int = 10
    save_full_vocab: bool = False


DEFAULT_VERBALIZED_INSTRUCTION = (
    "Do not answer for yourself: estimate what percentage of people like you would choose "
    "each option. Reply with only a JSON object that maps each option label to a percentage, "
    "the percentages adding up to 100, for example {example}."
)
VERBALIZED_FIELDS = ("example", "labels")


@dataclass(frozen=True)
class SamplingSpec:
    """How `workbench sample` elicits and parses generated answers (see `workbench.measure.sampling`)."""

    pattern: str | None = None
    """Regular expression tried before the built-in parser; its group `answer` (else its first
    group, else the whole match) must hold a label, an option text or an ordinal value."""
    refusal_patterns: tuple[str, ...] = ()
    """Extra regular expressions (case-insensitive) that mark a text answer as a refusal."""
    verbalized: bool = False
    """Ask for a JSON object of percentages per option instead of one answer (Meister et al.)."""
    instruction: str = DEFAULT_VERBALIZED_INSTRUCTION
    """`verbalized`: text appended to every question; `{example}` and `{labels}` are filled."""


@dataclass(frozen=True)
class Study:
    name: str
    path: str
    seed: int
    factors: tuple[Factor, ...]
    design: Design
    template: Template
    questions: tuple[Question, ...]
    orders: Orders
    scoring: Scoring
    cells: tuple[Cell, ...] = field(repr=False)
    raw: Mapping[str, Any] = field(repr=False)
    """The parsed YAML, recorded in manifests."""
    sampling: SamplingSpec = field(default_factory=SamplingSpec)

    def factor(self, name: str) -> Factor:
        return next(f for f in self.factors if f.name == name)

    # Derived from the frozen fields, so computed once per study (rendering asks per prompt).
    @cached_property
    def persona_factors(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.factors if f.role == "persona")

    @cached_property
    def question_by_id(self) -> Mapping[str, Question]:
        return {q.id: q for q in self.questions}

    @cached_property
    def option_targets_cache(
        self,
    ) -> dict[tuple[str, tuple[int, ...], str], tuple[OptionTarget, ...]]:
        """`prompts.option_targets` per (question id, option order, moved whitespace), filled
        as prompts ask. The study is frozen, so it cannot go stale; `dataclasses.replace`
        makes a new study with an empty one."""
        return {}
