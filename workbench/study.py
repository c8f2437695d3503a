"""Study files: factors, design, templates, questions, option orders and scoring, from YAML.

A study is data, not code. `load_study` parses and validates a YAML file into frozen
dataclasses; every problem raises one `StudyError` naming the file, the field path
(`questions[2].options`) and the fix. Checks that need the tokenizer (labels that are not one
token, prompts longer than the context) live in `workbench.prompts`.

The format is documented in README.md ("Study files"); `probes/*.yaml` are examples.
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from workbench.errors import StudyError

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
    """How a cell and a question become a prompt (rendered only in `workbench.prompts`)."""

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
    """How an option's log-probability is read (REFERENCE.md §2)."""

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
    """How `workbench sample` elicits and parses generated answers (see `workbench.sampling`)."""

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

    @property
    def persona_factors(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.factors if f.role == "persona")


# --------------------------------------------------------------------------------------------
# parsing


class _Ctx:
    """Carries the file name so every error names it."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, fieldpath: str, message: str, fix: str) -> StudyError:
        return StudyError(self.file, fieldpath, message, fix)

    def mapping(self, value: Any, fieldpath: str, allowed: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            # The top level has no field path of its own: name the file, as for YAML errors.
            raise self.fail(
                fieldpath or "(file)",
                f"expected a mapping, got {type(value).__name__}",
                f"write `{fieldpath}` as `key: value` lines"
                if fieldpath
                else "write the study as top-level `key: value` lines (name:, factors:, ...)",
            )
        for key in value:
            if key not in allowed:
                raise self.fail(
                    f"{fieldpath}.{key}" if fieldpath else str(key),
                    "unknown field",
                    f"use one of: {', '.join(allowed)}",
                )
        return value

    def string(self, value: Any, fieldpath: str, *, nonempty: bool = True) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(
                fieldpath,
                f"expected text, got {type(value).__name__}",
                "write a quoted string",
            )
        text = str(value)
        if nonempty and not text.strip():
            raise self.fail(fieldpath, "is empty", "give it a non-empty value")
        return text

    def string_list(self, value: Any, fieldpath: str, *, nonempty: bool = True) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(
                fieldpath,
                f"expected a list, got {type(value).__name__}",
                "write a YAML list, e.g. [a, b, c]",
            )
        if nonempty and not value:
            raise self.fail(fieldpath, "is empty", "list at least one value")
        out = [self.string(v, f"{fieldpath}[{i}]") for i, v in enumerate(value)]
        seen: dict[str, int] = {}
        for i, v in enumerate(out):
            if v in seen:
                raise self.fail(
                    f"{fieldpath}[{i}]",
                    f"duplicate value {v!r} (also at [{seen[v]}])",
                    "make every value distinct",
                )
            seen[v] = i
        return out

    def integer(self, value: Any, fieldpath: str, *, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(
                fieldpath,
                f"expected an integer >= {minimum}, got {value!r}",
                f"write a whole number >= {minimum}",
            )
        return value

    def choice(self, value: Any, fieldpath: str, choices: Sequence[str]) -> Any:
        if value not in choices:
            raise self.fail(
                fieldpath, f"unknown value {value!r}", f"use one of: {', '.join(choices)}"
            )
        return value

    def placeholders(self, text: str, fieldpath: str, allowed: Sequence[str]) -> set[str]:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
        except ValueError as err:
            raise self.fail(
                fieldpath,
                f"malformed placeholder ({err})",
                "close every `{` with `}`; write a literal brace as `{{` or `}}`",
            ) from None
        for name in sorted(names):
            if name == "" or name not in allowed:
                raise self.fail(
                    fieldpath,
                    f"unknown placeholder {{{name}}}",
                    f"use one of: {', '.join('{' + a + '}' for a in allowed)}",
                )
        return names


TOP_LEVEL = (
    "name",
    "description",
    "version",
    "seed",
    "factors",
    "design",
    "template",
    "questions",
    "orders",
    "scoring",
    "sampling",
)


def load_study(path: str | Path) -> Study:
    """Parse and validate a study YAML file. Raises `StudyError` on the first problem."""
    path = Path(path)
    ctx = _Ctx(str(path))
    if not path.is_file():
        raise ctx.fail("(file)", "no such file", "check the path of the study file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ctx.fail(
            "(file)",
            f"not valid YAML{where}: {getattr(err, 'problem', err)}",
            "fix the YAML syntax (indentation, quotes, colons)",
        ) from None
    return parse_study(raw, ctx.file, base_dir=path.parent)


def parse_study(raw: Any, file: str = "<study>", base_dir: Path | None = None) -> Study:
    """Validate an already-parsed study mapping (see `load_study`)."""
    ctx = _Ctx(file)
    base_dir = base_dir or Path(".")
    top = ctx.mapping(raw, "", TOP_LEVEL)
    for required in ("name", "factors", "template", "questions"):
        if required not in top:
            raise ctx.fail(required, "missing", f"add a `{required}:` section (see README)")
    name = ctx.string(top["name"], "name")
    seed = ctx.integer(top.get("seed", 0), "seed", minimum=0)
    factors = _parse_factors(ctx, top["factors"])
    scoring = _parse_scoring(ctx, top.get("scoring", {}))
    questions = _parse_questions(ctx, top["questions"], factors)
    template = _parse_template(ctx, top["template"], factors, scoring)
    design = _parse_design(ctx, top.get("design", {"kind": "factorial"}), factors)
    orders = _parse_orders(ctx, top.get("orders", {"kind": "canonical"}))
    cells = _expand_design(ctx, design, factors, base_dir)
    sampling = _parse_sampling(ctx, top.get("sampling", {}))
    return Study(
        name=name,
        path=file,
        seed=seed,
        factors=factors,
        design=design,
        template=template,
        questions=questions,
        orders=orders,
        scoring=scoring,
        cells=cells,
        raw=top,
        sampling=sampling,
    )


def _parse_factors(ctx: _Ctx, value: Any) -> tuple[Factor, ...]:
    if not isinstance(value, list):
        raise ctx.fail(
            "factors",
            f"expected a list, got {type(value).__name__}",
            "write factors as a list of `- {name: age, role: persona, values: [...]}`",
        )
    factors: list[Factor] = []
    reserved = set(PROMPT_FIELDS) | set(OPTION_LINE_FIELDS)
    for i, item in enumerate(value):
        fp = f"factors[{i}]"
        spec = ctx.mapping(item, fp, ("name", "role", "values", "weights", "description"))
        if "name" not in spec or "values" not in spec:
            raise ctx.fail(fp, "needs `name` and `values`", "add both fields")
        name = ctx.string(spec["name"], f"{fp}.name")
        if not name.isidentifier() or name in reserved:
            raise ctx.fail(
                f"{fp}.name",
                f"{name!r} cannot be a placeholder name",
                f"use letters, digits and _ only, and none of: {', '.join(sorted(reserved))}",
            )
        if any(f.name == name for f in factors):
            raise ctx.fail(f"{fp}.name", f"duplicate factor {name!r}", "rename one of them")
        role = ctx.choice(spec.get("role", "persona"), f"{fp}.role", ("persona", "stimulus"))
        values = ctx.string_list(spec["values"], f"{fp}.values")
        weights = None
        if "weights" in spec:
            w = spec["weights"]
            if (
                not isinstance(w, list)
                or len(w) != len(values)
                or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in w)
                or any(x < 0 for x in w)
                or sum(w) <= 0
            ):
                raise ctx.fail(
                    f"{fp}.weights",
                    f"expected {len(values)} non-negative numbers with a positive sum",
                    "give one weight per value, in the same order as `values`",
                )
            total = float(sum(w))
            weights = tuple(float(x) / total for x in w)
        factors.append(Factor(name, role, tuple(values), weights))
    if not factors:
        raise ctx.fail("factors", "is empty", "define at least one factor")
    return tuple(factors)


def _parse_scoring(ctx: _Ctx, value: Any) -> Scoring:
    spec = ctx.mapping(
        value, "scoring", ("method", "target", "variants", "aggregate", "top_k", "save_full_vocab")
    )
    method = ctx.choice(
        spec.get("method", "next_token"), "scoring.method", ("next_token", "sequence")
    )
    default_target = "label" if method == "next_token" else "text"
    target = ctx.choice(spec.get("target", default_target), "scoring.target", ("label", "text"))
    default_variants = [" {}", "{}"] if method == "next_token" else [" {}"]
    variants = ctx.string_list(spec.get("variants", default_variants), "scoring.variants")
    for i, v in enumerate(variants):
        if v.count("{}") != 1 or "{" in v.replace("{}", "") or "}" in v.replace("{}", ""):
            raise ctx.fail(
                f"scoring.variants[{i}]",
                f"{v!r} must contain `{{}}` exactly once",
                'write e.g. " {}" (space + label) or "{}" (bare label)',
            )
    aggregate = ctx.choice(spec.get("aggregate", "sum"), "scoring.aggregate", ("sum", "max"))
    top_k = ctx.integer(spec.get("top_k", 10), "scoring.top_k", minimum=0)
    full = spec.get("save_full_vocab", False)
    if not isinstance(full, bool):
        raise ctx.fail("scoring.save_full_vocab", "expected true or false", "write true or false")
    return Scoring(method, target, tuple(variants), aggregate, top_k, full)


def _parse_sampling(ctx: _Ctx, value: Any) -> SamplingSpec:
    import re

    spec = ctx.mapping(
        value, "sampling", ("pattern", "refusal_patterns", "verbalized", "instruction")
    )
    pattern = None
    patterns = []
    if spec.get("pattern") is not None:
        pattern = ctx.string(spec["pattern"], "sampling.pattern")
        patterns.append(("sampling.pattern", pattern))
    refusals = ctx.string_list(
        spec.get("refusal_patterns", []), "sampling.refusal_patterns", nonempty=False
    )
    patterns += [(f"sampling.refusal_patterns[{i}]", p) for i, p in enumerate(refusals)]
    for fieldpath, regex in patterns:
        try:
            re.compile(regex)
        except re.error as err:
            raise ctx.fail(
                fieldpath,
                f"not a valid regular expression ({err})",
                "fix the pattern (Python `re` syntax; in YAML, quote it and double backslashes)",
            ) from None
    verbalized = spec.get("verbalized", False)
    if not isinstance(verbalized, bool):
        raise ctx.fail("sampling.verbalized", "expected true or false", "write true or false")
    instruction = DEFAULT_VERBALIZED_INSTRUCTION
    if "instruction" in spec:
        instruction = ctx.string(spec["instruction"], "sampling.instruction")
        ctx.placeholders(instruction, "sampling.instruction", VERBALIZED_FIELDS)
    return SamplingSpec(pattern, tuple(refusals), verbalized, instruction)


def _parse_questions(ctx: _Ctx, value: Any, factors: tuple[Factor, ...]) -> tuple[Question, ...]:
    if not isinstance(value, list) or not value:
        raise ctx.fail("questions", "expected a non-empty list", "list at least one question")
    names = [f.name for f in factors]
    out: list[Question] = []
    for i, item in enumerate(value):
        fp = f"questions[{i}]"
        spec = ctx.mapping(
            item, fp, ("id", "text", "options", "labels", "values", "refusal", "ordinal")
        )
        for required in ("id", "text", "options"):
            if required not in spec:
                raise ctx.fail(f"{fp}.{required}", "missing", f"add `{required}:` to the question")
        qid = ctx.string(spec["id"], f"{fp}.id")
        if any(q.id == qid for q in out):
            raise ctx.fail(
                f"{fp}.id", f"duplicate question id {qid!r}", "give every question a unique id"
            )
        text = ctx.string(spec["text"], f"{fp}.text")
        ctx.placeholders(text, f"{fp}.text", names)
        options = ctx.string_list(spec["options"], f"{fp}.options")
        refusal = ctx.string_list(spec.get("refusal", []), f"{fp}.refusal", nonempty=False)
        for j, r in enumerate(refusal):
            if r in options:
                raise ctx.fail(
                    f"{fp}.refusal[{j}]",
                    f"{r!r} is also a substantive option",
                    "list each option once: in `options` or in `refusal`",
                )
        n_all = len(options) + len(refusal)
        labels = _parse_labels(
            ctx, spec.get("labels", "letters"), f"{fp}.labels", n_all, options + refusal
        )
        values = None
        ordinal = spec.get("ordinal", "values" in spec)
        if not isinstance(ordinal, bool):
            raise ctx.fail(f"{fp}.ordinal", "expected true or false", "write true or false")
        if "values" in spec:
            v = spec["values"]
            if (
                not isinstance(v, list)
                or len(v) != len(options)
                or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
            ):
                raise ctx.fail(
                    f"{fp}.values",
                    f"expected {len(options)} numbers (one per substantive option)",
                    "give one ordinal value per option in `options`, e.g. [1, 2, 1.5]",
                )
            values = tuple(float(x) for x in v)
        elif ordinal:
            values = tuple(float(k + 1) for k in range(len(options)))
        out.append(Question(qid, text, tuple(options), tuple(refusal), labels, values))
    return tuple(out)


def _parse_labels(
    ctx: _Ctx, value: Any, fp: str, n: int, texts: list[str]
) -> tuple[str, ...] | Literal["texts"]:
    if value == "letters":
        if n > len(LETTERS):
            raise ctx.fail(fp, f"{n} options but only 26 letters", "use `labels: numbers`")
        return tuple(LETTERS[:n])
    if value == "numbers":
        return tuple(str(k + 1) for k in range(n))
    if value == "texts":
        return "texts"
    if isinstance(value, list):
        labels = ctx.string_list(value, fp)
        if len(labels) != n:
            raise ctx.fail(
                fp,
                f"{len(labels)} labels for {n} options (refusal options included)",
                "give one label per displayed position",
            )
        return tuple(labels)
    raise ctx.fail(
        fp, f"unknown labels {value!r}", "use letters, numbers, texts or an explicit list"
    )


def _parse_template(
    ctx: _Ctx, value: Any, factors: tuple[Factor, ...], scoring: Scoring
) -> Template:
    spec = ctx.mapping(
        value,
        "template",
        (
            "format",
            "persona",
            "prompt",
            "system",
            "user",
            "prefill",
            "option_line",
            "option_separator",
        ),
    )
    fmt = ctx.choice(spec.get("format", "plain"), "template.format", ("plain", "chat"))
    names = [f.name for f in factors]
    persona_raw = spec.get("persona", [])
    if isinstance(persona_raw, str):
        persona_raw = [persona_raw]
    persona = ctx.string_list(persona_raw, "template.persona", nonempty=False)
    for i, frag in enumerate(persona):
        ctx.placeholders(frag, f"template.persona[{i}]", names)
    allowed = [*names, *PROMPT_FIELDS]
    prompt = system = user = prefill = None
    if fmt == "plain":
        for key in ("system", "user", "prefill"):
            if key in spec:
                raise ctx.fail(
                    f"template.{key}",
                    "only used with `format: chat`",
                    "set `format: chat`, or put everything in `template.prompt`",
                )
        if "prompt" not in spec:
            raise ctx.fail(
                "template.prompt", "missing", "add the prompt text with {question} and {options}"
            )
        prompt = ctx.string(spec["prompt"], "template.prompt")
        used = ctx.placeholders(prompt, "template.prompt", allowed)
        last = prompt
    else:
        if "prompt" in spec:
            raise ctx.fail(
                "template.prompt",
                "not used with `format: chat`",
                "split it into `template.system` and `template.user`",
            )
        if "user" not in spec:
            raise ctx.fail(
                "template.user", "missing", "add the user message with {question} and {options}"
            )
        user = ctx.string(spec["user"], "template.user")
        used = ctx.placeholders(user, "template.user", allowed)
        if "system" in spec:
            system = ctx.string(spec["system"], "template.system")
            used |= ctx.placeholders(system, "template.system", allowed)
        if "prefill" in spec:
            prefill = ctx.string(spec["prefill"], "template.prefill")
            used |= ctx.placeholders(prefill, "template.prefill", allowed)
        last = prefill if prefill is not None else ""
    if "question" not in used:
        raise ctx.fail(
            "template.user" if fmt == "chat" else "template.prompt",
            "never shows the question",
            "add the {question} placeholder",
        )
    if scoring.method == "next_token" and last and last != last.rstrip():
        field_name = "template.prefill" if fmt == "chat" else "template.prompt"
        raise ctx.fail(
            field_name,
            "ends with whitespace, so the answer token would have to start without its space",
            'remove the trailing whitespace; the " {}" variant already scores the spaced label',
        )
    option_line = ctx.string(spec.get("option_line", "{label}. {text}"), "template.option_line")
    ctx.placeholders(option_line, "template.option_line", OPTION_LINE_FIELDS)
    sep = spec.get("option_separator", "\n")
    if not isinstance(sep, str):
        raise ctx.fail(
            "template.option_separator", "expected text", 'write a quoted string such as "\\n"'
        )
    return Template(fmt, tuple(persona), prompt, system, user, prefill, option_line, sep)


def _parse_cell(ctx: _Ctx, value: Any, fp: str, factors: tuple[Factor, ...]) -> Cell:
    spec = ctx.mapping(value, fp, [f.name for f in factors])
    cell: Cell = {f.name: None for f in factors}
    for key, v in spec.items():
        if v is None:
            continue
        text = ctx.string(v, f"{fp}.{key}")
        factor = next(f for f in factors if f.name == key)
        if text not in factor.values:
            raise ctx.fail(
                f"{fp}.{key}",
                f"{text!r} is not a value of factor {key!r}",
                f"use one of: {', '.join(factor.values)}",
            )
        cell[key] = text
    return cell


def _parse_design(ctx: _Ctx, value: Any, factors: tuple[Factor, ...]) -> Design:
    spec = ctx.mapping(value, "design", ("kind", "path", "n", "seed", "coarse"))
    kind = ctx.choice(
        spec.get("kind", "factorial"), "design.kind", ("factorial", "table", "random")
    )
    path = n = None
    if kind == "table":
        if "path" not in spec:
            raise ctx.fail("design.path", "missing", "give the table file (CSV, JSONL or parquet)")
        path = ctx.string(spec["path"], "design.path")
    if kind == "random":
        if "n" not in spec:
            raise ctx.fail("design.n", "missing", "give the number of random combinations")
        n = ctx.integer(spec["n"], "design.n", minimum=1)
    for key, owner in (("path", "table"), ("n", "random")):
        if key in spec and kind != owner:
            raise ctx.fail(f"design.{key}", f"not used with `kind: {kind}`", f"remove `{key}`")
    seed = ctx.integer(spec.get("seed", 0), "design.seed", minimum=0)
    coarse_raw = spec.get("coarse", [])
    if not isinstance(coarse_raw, list):
        raise ctx.fail(
            "design.coarse",
            "expected a list",
            "write a list of partial cells, e.g. - {party: Democrat}",
        )
    coarse = tuple(
        _parse_cell(ctx, c, f"design.coarse[{i}]", factors) for i, c in enumerate(coarse_raw)
    )
    return Design(kind, path, n, seed, coarse)


def _parse_orders(ctx: _Ctx, value: Any) -> Orders:
    spec = ctx.mapping(value, "orders", ("kind", "k", "cap", "seed"))
    kind = ctx.choice(
        spec.get("kind", "canonical"), "orders.kind", ("canonical", "cyclic", "all", "random")
    )
    k = ctx.integer(spec.get("k", 1 if kind != "random" else 4), "orders.k", minimum=1)
    cap = ctx.integer(spec.get("cap", 24), "orders.cap", minimum=1)
    seed = ctx.integer(spec.get("seed", 0), "orders.seed", minimum=0)
    return Orders(kind, k, cap, seed)


def _expand_design(
    ctx: _Ctx, design: Design, factors: tuple[Factor, ...], base_dir: Path
) -> tuple[Cell, ...]:
    names = [f.name for f in factors]
    cells: list[Cell]
    if design.kind == "factorial":
        cells = [
            dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(f.values for f in factors))
        ]
    elif design.kind == "random":
        assert design.n is not None
        total = 1
        for f in factors:
            total *= len(f.values)
        if design.n > total:
            raise ctx.fail(
                "design.n",
                f"asks for {design.n} distinct combinations but only {total} exist",
                f"use n <= {total}, or `kind: factorial`",
            )
        rng = random.Random(design.seed)
        chosen = sorted(rng.sample(range(total), design.n))
        all_combos = itertools.product(*(f.values for f in factors))
        wanted = set(chosen)
        cells = [dict(zip(names, c, strict=True)) for i, c in enumerate(all_combos) if i in wanted]
    else:
        assert design.path is not None
        cells = _read_table(ctx, base_dir / design.path, factors)
    cells = [*cells, *design.coarse]
    seen: set[tuple[str | None, ...]] = set()
    unique: list[Cell] = []
    for cell in cells:
        key = tuple(cell[n] for n in names)
        if key not in seen:
            seen.add(key)
            unique.append(cell)
    return tuple(unique)


def _read_table(ctx: _Ctx, path: Path, factors: tuple[Factor, ...]) -> list[Cell]:
    import pandas as pd

    if not path.is_file():
        raise ctx.fail(
            "design.path", f"no such file {str(path)!r}", "give a path relative to the study file"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise ctx.fail(
                "design.path", f"unsupported file type {suffix!r}", "use .csv, .jsonl or .parquet"
            )
    except (ValueError, OSError) as err:
        raise ctx.fail(
            "design.path", f"cannot read {path.name}: {err}", "check the file's format"
        ) from None
    names = [f.name for f in factors]
    for col in frame.columns:
        if col not in names:
            raise ctx.fail(
                "design.path",
                f"column {col!r} of {path.name} is not a factor",
                f"rename or drop it; factors are: {', '.join(names)}",
            )
    cells: list[Cell] = []
    for row_i, row in enumerate(frame.to_dict("records")):
        cell: Cell = {n: None for n in names}
        for col_key, v in row.items():
            col = str(col_key)
            if v is None or (isinstance(v, float) and v != v) or v == "":
                continue
            text = str(v)
            factor = next(f for f in factors if f.name == col)
            # JSONL/parquet integer columns with a null become float (30 -> 30.0).
            if text not in factor.values and isinstance(v, float) and v.is_integer():
                text = str(int(v))
            if text not in factor.values:
                raise ctx.fail(
                    "design.path",
                    f"{path.name} row {row_i + 1}, column {col!r}: {text!r} is not a value of the factor",
                    f"use one of: {', '.join(factor.values)}, or leave it empty (unspecified)",
                )
            cell[str(col)] = text
        cells.append(cell)
    if not cells:
        raise ctx.fail("design.path", f"{path.name} has no rows", "add at least one row")
    return cells
