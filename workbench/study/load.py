"""Study files: parse and validate a YAML study into the dataclasses of `workbench.study.spec`.

Every problem raises one `StudyError` naming the file, the field path (`questions[2].options`)
and the fix. Checks that need the tokenizer (labels that are not one token, prompts longer than
the context) live in `workbench.study.prompts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml

from workbench.study.design import expand_design, parse_design
from workbench.study.fields import Ctx
from workbench.study.spec import (
    DEFAULT_VERBALIZED_INSTRUCTION,
    LETTERS,
    OPTION_LINE_FIELDS,
    PROMPT_FIELDS,
    VERBALIZED_FIELDS,
    Factor,
    Orders,
    Question,
    SamplingSpec,
    Scoring,
    Study,
    Template,
)

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
    ctx = Ctx(str(path))
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
    ctx = Ctx(file)
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
    template = _parse_template(ctx, top["template"], factors, scoring, base_dir)
    design = parse_design(ctx, top.get("design", {"kind": "factorial"}), factors)
    orders = _parse_orders(ctx, top.get("orders", {"kind": "canonical"}))
    if orders.kind != "canonical" and not _shows_option_texts(template):
        raise ctx.fail(
            "orders.kind",
            f"`{orders.kind}` reorders the options, but the prompt never shows their texts, "
            "so every order renders the same prompt",
            "show the options with {options} (and {text} in `template.option_line`), "
            "or use `orders: {kind: canonical}`",
        )
    cells = expand_design(ctx, design, factors, base_dir)
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


def _parse_factors(ctx: Ctx, value: Any) -> tuple[Factor, ...]:
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


def _parse_scoring(ctx: Ctx, value: Any) -> Scoring:
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


def _parse_sampling(ctx: Ctx, value: Any) -> SamplingSpec:
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


def _parse_questions(ctx: Ctx, value: Any, factors: tuple[Factor, ...]) -> tuple[Question, ...]:
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


def nominal_notes(study: Study) -> list[str]:
    """One line per question whose `values` are all equal (a survey's way of writing a
    nominal item, e.g. `[1, 1, 1, 1]`): valid, and compared as nominal (TV, never W1)."""
    notes = []
    for i, q in enumerate(study.questions):
        if q.values is not None and len(q.values) > 1 and len(set(q.values)) == 1:
            notes.append(
                f"questions[{i}].values ({q.id}): all equal ({q.values[0]:g}): the question is "
                "nominal, so its distance to human data is total variation, not normalized W1 "
                "(give distinct values to make it ordinal)"
            )
    return notes


def _parse_labels(
    ctx: Ctx, value: Any, fp: str, n: int, texts: list[str]
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
    ctx: Ctx, value: Any, factors: tuple[Factor, ...], scoring: Scoring, base_dir: Path
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
            "chat_template",
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
    if "options" not in used and "labels" not in used:
        raise ctx.fail(
            "template.user" if fmt == "chat" else "template.prompt",
            "never shows the options, so the model cannot know what a label stands for "
            "(and every option order renders the same prompt)",
            "add the {options} placeholder (each option as `{label}. {text}`), or {labels}",
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
    chat_template = None
    if "chat_template" in spec:
        if fmt != "chat":
            raise ctx.fail(
                "template.chat_template",
                "only used with `format: chat`",
                "set `format: chat`, or remove `chat_template`",
            )
        file = base_dir / ctx.string(spec["chat_template"], "template.chat_template")
        if not file.is_file():
            raise ctx.fail(
                "template.chat_template",
                f"no such file {str(file)!r}",
                "give the path of a Jinja chat template file, relative to the study file",
            )
        chat_template = file.read_text(encoding="utf-8")
    return Template(
        fmt, tuple(persona), prompt, system, user, prefill, option_line, sep, chat_template
    )


def _parse_orders(ctx: Ctx, value: Any) -> Orders:
    spec = ctx.mapping(value, "orders", ("kind", "k", "cap", "seed"))
    kind = ctx.choice(
        spec.get("kind", "canonical"), "orders.kind", ("canonical", "cyclic", "all", "random")
    )
    k = ctx.integer(spec.get("k", 1 if kind != "random" else 4), "orders.k", minimum=1)
    cap = ctx.integer(spec.get("cap", 24), "orders.cap", minimum=1)
    seed = ctx.integer(spec.get("seed", 0), "orders.seed", minimum=0)
    return Orders(kind, k, cap, seed)


def _shows_option_texts(template: Template) -> bool:
    """Whether a rendered prompt shows which text each label stands for."""
    parts = [template.prompt, template.system, template.user, template.prefill]
    shown = any(p is not None and "{options}" in p for p in parts)
    return shown and "{text}" in template.option_line
