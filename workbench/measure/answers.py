"""Parsing generated text into an answer: one option, a refusal, or "unparseable" (never dropped).

Two parsers, both built per (question, displayed option order), because labels follow the
displayed position ("B" is whichever option was shown second):

- `AnswerParser` reads one answer from free text. In order of priority:
  1. the study's custom `sampling.pattern` (group `answer`, else group 1, else the match);
  2. an explicit answer phrase: "my answer is B", "Answer: (B)", "I'd give it a 4",
     "I choose option C", "rating: 4/5" (a label, an option text, or an ordinal value);
  3. an answer at the very start of the text: " 4", " B. Neutral", "(B)", " Good";
     the earliest match of 2 and 3 wins (the first answer given);
  4. a refusal phrase ("I can't", "as an AI", the study's `sampling.refusal_patterns`);
  5. once the text is complete only: exactly one distinct option mentioned anywhere.
  An answer naming a refusal option ("Don't know") has status `refusal` and its option id.
- `parse_verbalized` reads a JSON object of percentages per option (Meister et al.'s
  verbalized distribution): it repairs common slips (single quotes, trailing commas, "20%",
  unquoted keys), validates keys and values, and renormalizes; every failure has a reason.

**Streaming.** Both take `ended` (no more text will come). A parse is `final` when more text
could not change it: a strong match (1-3) followed by at least one more character ("4."
or "4\\n"; "4" alone could still become "45"), a closed JSON object, or `ended`. The
sampling engine stops a sequence at its first final parse, so it never pays for the words a
model writes after its answer; weak evidence (4-5) is only used at the end.

Labels match case-sensitively as whole tokens ("4" is not read in "45" or "4.5"; "I" and "A"
followed by a lowercase word are the pronoun and the article: "I think", "A good film");
"A or C" is two answers, so ambiguous; option texts match case-insensitively (the longest
first); ordinal values only when the labels are not numbers themselves (so "4" means
label 4 under `labels: numbers`). These are heuristics: the custom pattern overrides them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Literal

from workbench.study.spec import Question, SamplingSpec

Status = Literal["ok", "refusal", "unparseable"]
Kind = Literal["label", "text", "value"]
STATUSES: tuple[Status, ...] = ("ok", "refusal", "unparseable")

REFUSAL_PHRASES = (
    r"\bi\s*(?:can(?:no|')?t|cannot|won't|will\s+not|am\s+(?:not\s+able|unable)|'m\s+(?:not\s+able|unable))\s+(?:answer|say|choose|pick|provide|give|share|express|decide)",
    r"\bas\s+an\s+(?:ai|a\.i\.|artificial intelligence|language model)\b",
    r"\bi\s+(?:do\s+not|don't)\s+have\s+(?:personal\s+)?(?:opinions|preferences|views|feelings|beliefs)",
    r"\b(?:prefer|decline|refuse)\s+(?:not\s+)?to\s+(?:answer|say|share|choose)",
    r"\bnot\s+(?:comfortable|able)\s+(?:answering|to\s+answer)",
)
"""Built-in refusal phrases (case-insensitive); the study adds its own in `refusal_patterns`."""
_BUILTIN_REFUSAL = re.compile("|".join(f"(?:{p})" for p in REFUSAL_PHRASES), re.IGNORECASE)

_LEAD = (
    r"(?i:\b(?:answer|choice|option|rating|response|pick|choose|chose|select|selected|"
    r"go\s+with|give\s+it|rate\s+it|rated\s+it|say|vote))"
)
_GLUE = r"(?:\s*[:=\-]\s*|\s+)"
_FILLER = (
    r"(?:(?i:is|would\s+be|will\s+be|be|a|an|the|option|choice|definitely|probably)"
    r"(?:\s*[:=\-]\s*|\s+))*"
)
_OPEN = r"[\(\[\"'*]*\s*"
_BOUNDARY = r"(?![\w])(?!['’]\w)(?!\.\d)"
"""An answer token ends at a word boundary: not "45" for "4", not "I'd" for "I", not "1.5"
for "1"."""
_NOT_HEDGED = r"(?!\s+(?:or|and)\s)"
"""A strong answer is not the first half of "A or C" (that is two answers: ambiguous)."""
_WORD_AFTER = re.compile(r"\s+(?!(?:or|and)\b)[a-z]")
"""After the letters "A" and "I": a lowercase word means the article or the pronoun."""


def _is_word(written: str, rest: str) -> bool:
    """Is this "A"/"I" the English article/pronoun ("A good film", "I think")?"""
    return written in ("A", "I") and _WORD_AFTER.match(rest) is not None


@dataclass(frozen=True)
class Surface:
    """One way an option can be written in an answer."""

    text: str
    option_id: int
    kind: Kind


@dataclass(frozen=True)
class Parsed:
    """One text read as an answer."""

    option_id: int | None
    """Canonical option id, or None (free-text refusal or unparseable)."""
    status: Status
    how: str
    """Which rule decided: pattern, phrase, start, mention, refusal_phrase, ambiguous, none."""
    start: int | None
    """Character offset in the text where the answer (the label, text or value) begins."""
    kind: Kind | None
    """How the answer was written: its label, its option text or its ordinal value."""
    final: bool
    """No further text can change this parse (see the module docstring)."""


def option_surfaces(question: Question, order: tuple[int, ...]) -> list[Surface]:
    """Labels (displayed order), option texts and (when labels are not numbers) ordinal values."""
    all_options = question.all_options
    out: list[Surface] = []
    numeric_labels = True
    for pos, opt in enumerate(order):
        label = question.label_at(pos, all_options[opt])
        numeric_labels &= _is_number(label)
        out.append(Surface(label, opt, "label"))
    if question.labels != "texts":
        out += [Surface(text, opt, "text") for opt, text in enumerate(all_options)]
    if question.values is not None and not numeric_labels:
        counts: dict[str, int] = {}
        strs = [f"{v:g}" for v in question.values]
        for s in strs:
            counts[s] = counts.get(s, 0) + 1
        out += [Surface(s, opt, "value") for opt, s in enumerate(strs) if counts[s] == 1]
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _alternation(surfaces: list[Surface]) -> str:
    """One regex alternation over every surface, longest first, labels case-sensitive."""
    parts = []
    for s in sorted(surfaces, key=lambda s: -len(s.text)):
        body = re.escape(s.text)
        parts.append(f"(?i:{body})" if s.kind == "text" else body)
    return "(?:" + "|".join(parts) + ")"


class AnswerParser:
    """Reads one answer from generated text for one question shown in one option order."""

    def __init__(self, question: Question, order: tuple[int, ...], spec: SamplingSpec) -> None:
        self.question = question
        self.n_substantive = len(question.options)
        self.surfaces = option_surfaces(question, order)
        alt = _alternation(self.surfaces)
        self._lookup: dict[str, Surface] = {}
        self._lookup_folded: dict[str, Surface] = {}
        for s in self.surfaces:
            if s.kind == "text":
                self._lookup_folded.setdefault(s.text.casefold(), s)
            else:
                self._lookup.setdefault(s.text, s)
        strong = f"(?P<answer>{alt}){_BOUNDARY}{_NOT_HEDGED}"
        self._phrase = re.compile(_LEAD + _GLUE + _FILLER + _OPEN + strong)
        self._start = re.compile(r"\A\s*" + _OPEN + strong)
        self._mention = re.compile(r"(?<![\w'’])(?<!\d\.)" + f"(?P<answer>{alt}){_BOUNDARY}")
        self._custom = re.compile(spec.pattern) if spec.pattern else None
        # The built-in phrases as one alternation (one search instead of five); the study's
        # own patterns stay separate, so their group numbers and flags mean what they wrote.
        self._refusal = [
            _BUILTIN_REFUSAL,
            *(re.compile(p, re.IGNORECASE) for p in spec.refusal_patterns),
        ]

    def resolve(self, written: str) -> Surface | None:
        """The option a written answer names (exact label/value, or option text ignoring case)."""
        text = written.strip().strip("().[]\"'*:").strip()
        return self._lookup.get(text) or self._lookup_folded.get(text.casefold())

    def _result(self, surface: Surface, how: str, start: int, final: bool) -> Parsed:
        refusal = surface.option_id >= self.n_substantive
        status: Status = "refusal" if refusal else "ok"
        return Parsed(surface.option_id, status, how, start, surface.kind, final)

    def parse(self, text: str, ended: bool) -> Parsed:
        """Read `text` (the generated continuation); `ended`: no more text will come."""
        if self._custom is not None:
            m = self._custom.search(text)
            if m is not None:
                group = (
                    "answer" if "answer" in self._custom.groupindex else (1 if m.groups() else 0)
                )
                surface = self.resolve(m.group(group))
                if surface is not None:
                    start = m.start(group) + (len(m.group(group)) - len(m.group(group).lstrip()))
                    return self._result(surface, "pattern", start, ended or m.end() < len(text))
        best: tuple[int, str, re.Match[str]] | None = None
        for how, regex in (("phrase", self._phrase), ("start", self._start)):
            m = regex.search(text)
            if how == "start" and m is not None and _is_word(m.group("answer"), text[m.end() :]):
                m = None
            if m is not None and (best is None or m.start("answer") < best[0]):
                best = (m.start("answer"), how, m)
        if best is not None:
            start, how, m = best
            surface = self.resolve(m.group("answer"))
            if surface is not None:
                return self._result(surface, how, start, ended or m.end() < len(text))
        if not ended:
            return Parsed(None, "unparseable", "none", None, None, False)
        if any(r.search(text) for r in self._refusal):
            return Parsed(None, "refusal", "refusal_phrase", None, None, True)
        found: dict[int, tuple[Surface, int]] = {}
        for m in self._mention.finditer(text):
            written = m.group("answer")
            if _is_word(written, text[m.end() :]):
                continue
            surface = self.resolve(written)
            if surface is not None and surface.option_id not in found:
                found[surface.option_id] = (surface, m.start("answer"))
        if len(found) == 1:
            surface, start = next(iter(found.values()))
            return self._result(surface, "mention", start, True)
        how = "ambiguous" if found else "none"
        return Parsed(None, "unparseable", how, None, None, True)


# --------------------------------------------------------------------------------------------
# verbalized distributions


@dataclass(frozen=True)
class Verbalized:
    """A stated distribution read from text."""

    prob: tuple[float, ...] | None
    """Per canonical option (refusal options included), normalized to sum 1; None on failure."""
    status: Status
    error: str | None
    """Why it failed: no_json, unclosed_json, invalid_json, not_an_object, unknown_key: K,
    duplicate_option: K, bad_value: K, zero_total."""
    raw_total: float | None
    """Sum of the stated numbers before renormalizing (100 for percentages)."""
    n_missing: int
    """Options the object did not mention (counted as 0)."""
    final: bool


def verbalized_example(question: Question, order: tuple[int, ...]) -> str:
    """A JSON example for the instruction: every displayed label, percentages summing to 100."""
    labels = [question.label_at(p, question.all_options[o]) for p, o in enumerate(order)]
    k = len(labels)
    shares = [100 // k] * k
    shares[0] += 100 - sum(shares)
    return json.dumps(dict(zip(labels, shares, strict=True)))


def _json_span(text: str) -> tuple[int, int | None] | None:
    """(start, end) of the first {...} object; end None while it is still open."""
    start = text.find("{")
    if start < 0:
        return None
    depth, in_string, escape = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return start, i + 1
    return start, None


def _lenient_json(body: str) -> object:
    try:
        return json.loads(body)
    except ValueError:
        pass
    fixed = body.replace("'", '"')
    fixed = re.sub(r",\s*}", "}", fixed)
    fixed = re.sub(r"(\d)\s*%", r"\1", fixed)
    fixed = re.sub(r'([{,]\s*)([^\s"{},:][^"{},:]*?)\s*:', r'\1"\2":', fixed)
    return json.loads(fixed)


def parse_verbalized(
    text: str, parser: AnswerParser, ended: bool, refusal_first: bool = True
) -> Verbalized:
    """Read a JSON object of percentages per option (keys: labels, option texts or values).

    Missing options count as 0 (`n_missing`); values may be numbers or "20%"-style strings;
    the result is renormalized to sum 1 over all options (refusal included).
    """
    n_options = len(parser.question.all_options)

    def fail(error: str, final: bool = True, status: Status = "unparseable") -> Verbalized:
        return Verbalized(None, status, error, None, 0, final)

    span = _json_span(text)
    if span is None or span[1] is None:
        if not ended:
            return fail("unclosed_json" if span else "no_json", final=False)
        if refusal_first and any(r.search(text) for r in parser._refusal):
            return fail("refusal_phrase", status="refusal")
        return fail("unclosed_json" if span else "no_json")
    start, end = span
    try:
        obj = _lenient_json(text[start:end])
    except ValueError:
        return fail("invalid_json")
    if not isinstance(obj, dict):
        return fail("not_an_object")
    prob = [0.0] * n_options
    seen: set[int] = set()
    for key, value in obj.items():
        surface = parser.resolve(str(key))
        if surface is None:
            return fail(f"unknown_key: {key}")
        if surface.option_id in seen:
            return fail(f"duplicate_option: {key}")
        seen.add(surface.option_id)
        number = _number(value)
        if number is None or number < 0 or math.isnan(number) or math.isinf(number):
            return fail(f"bad_value: {key}")
        prob[surface.option_id] = number
    total = sum(prob)
    if total <= 0:
        return fail("zero_total")
    normalized = tuple(p / total for p in prob)
    return Verbalized(normalized, "ok", None, total, n_options - len(seen), True)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*%?\s*", value)
        return float(m.group(1)) if m else None
    return None
