"""Malformed study files: each gives one StudyError naming the file, the field path and a fix.

Each case edits the valid example study (tests/conftest.py), writes it as a YAML file and
loads it, so every case exercises `load_study` on a real file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import example_study_dict

from workbench.errors import StudyError
from workbench.study.load import load_study
from workbench.study.prompts import render, validate_for_tokenizer

_DELETE = object()


def _edit(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets (or, with `_DELETE`, removes) `path` such as `questions[1].id`."""
    keys: list[str | int] = [
        int(index) if index else name for name, index in re.findall(r"(\w+)|\[(\d+)\]", path)
    ]

    def apply(study: dict[str, Any]) -> None:
        node: Any = study
        for key in keys[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return apply


@dataclass(frozen=True)
class Case:
    id: str
    field: str
    """The expected `StudyError.field`."""
    edits: tuple[Callable[[dict[str, Any]], None], ...] = ()
    text: str | None = None
    """Raw file text instead of the edited example study."""
    files: dict[str, str] = field(default_factory=dict)
    """Extra files written next to the study (table designs)."""


CHAT = {"format": "chat", "persona": ["I am {age}."], "user": "{persona} {question}\n{options}"}
PROMPT = "{persona}\nQuestion: {question}\n{options}\nAnswer:"

CASES = [
    Case("not_yaml", "(file)", text="name: x\nfactors: [a, b\n  questions: {\n"),
    Case("top_level_list", "(file)", text="- name: x\n- factors: []\n"),
    Case("empty_file", "(file)", text=""),
    Case("unknown_top_level_key", "colour", (_edit("colour", "red"),)),
    Case("missing_questions", "questions", (_edit("questions", _DELETE),)),
    Case("questions_empty", "questions", (_edit("questions", []),)),
    Case("factors_not_a_list", "factors", (_edit("factors", {"party": ["D", "R"]}),)),
    Case(
        "unknown_placeholder_in_question",
        "questions[1].text",
        (_edit("questions[1].text", "How is the economy in {country}?"),),
    ),
    Case(
        "unknown_placeholder_in_template",
        "template.prompt",
        (_edit("template.prompt", PROMPT + " {answer}"),),
    ),
    Case(
        "unknown_placeholder_in_persona",
        "template.persona[1]",
        (_edit("template.persona[1]", "I vote {party} in {state}."),),
    ),
    Case(
        "unknown_placeholder_in_option_line",
        "template.option_line",
        (_edit("template.option_line", "{label}) {txt}"),),
    ),
    Case(
        "malformed_brace_in_question",
        "questions[0].text",
        (_edit("questions[0].text", "Do you like {movie?"),),
    ),
    Case(
        "malformed_brace_in_template",
        "template.prompt",
        (_edit("template.prompt", "{question} } {options}\nAnswer:"),),
    ),
    Case("duplicate_question_id", "questions[1].id", (_edit("questions[1].id", "like"),)),
    Case("duplicate_factor_name", "factors[1].name", (_edit("factors[1].name", "party"),)),
    Case("factor_name_reserved", "factors[0].name", (_edit("factors[0].name", "question"),)),
    Case("factor_without_values", "factors[2]", (_edit("factors[2].values", _DELETE),)),
    Case("empty_factor_values", "factors[2].values", (_edit("factors[2].values", []),)),
    Case("unknown_factor_role", "factors[0].role", (_edit("factors[0].role", "respondent"),)),
    Case("weights_wrong_length", "factors[0].weights", (_edit("factors[0].weights", [1]),)),
    Case("empty_options", "questions[0].options", (_edit("questions[0].options", []),)),
    Case("missing_options", "questions[0].options", (_edit("questions[0].options", _DELETE),)),
    Case("unknown_question_field", "questions[0].answer", (_edit("questions[0].answer", "A"),)),
    Case(
        "duplicate_option",
        "questions[1].options[2]",
        (_edit("questions[1].options", ["Good", "Fair", "Good"]),),
    ),
    Case(
        "refusal_duplicates_option",
        "questions[0].refusal[0]",
        (_edit("questions[0].refusal", ["No"]),),
    ),
    Case(
        "labels_wrong_length",
        "questions[0].labels",
        (_edit("questions[0].labels", ["A", "B"]),),  # 2 options + 1 refusal = 3 positions
    ),
    Case("labels_unknown_kind", "questions[0].labels", (_edit("questions[0].labels", "roman"),)),
    Case(
        "labels_duplicate",
        "questions[1].labels[2]",
        (_edit("questions[1].labels", ["x", "y", "x"]),),
    ),
    Case("values_wrong_length", "questions[1].values", (_edit("questions[1].values", [1, 2]),)),
    Case(
        "values_not_numeric",
        "questions[1].values",
        (_edit("questions[1].values", [1, "two", 3]),),
    ),
    Case("ordinal_not_bool", "questions[1].ordinal", (_edit("questions[1].ordinal", "maybe"),)),
    Case("text_is_a_list", "questions[1].text", (_edit("questions[1].text", ["How", "is"]),)),
    Case("seed_is_a_string", "seed", (_edit("seed", "zero"),)),
    Case("factor_value_is_bool", "factors[0].values[0]", (_edit("factors[0].values[0]", True),)),
    Case("unknown_design_kind", "design.kind", (_edit("design", {"kind": "latin_square"}),)),
    Case(
        "table_missing_file",
        "design.path",
        (_edit("design", {"kind": "table", "path": "cells.csv"}),),
    ),
    Case(
        "table_unknown_column",
        "design.path",
        (_edit("design", {"kind": "table", "path": "cells.csv"}),),
        files={"cells.csv": "party,colour\nDemocrat,red\n"},
    ),
    Case(
        "table_bad_value",
        "design.path",
        (_edit("design", {"kind": "table", "path": "cells.csv"}),),
        files={"cells.csv": "party,age\nDemocrat,30\nRepublican,45\n"},
    ),
    Case(
        "table_unsupported_type",
        "design.path",
        (_edit("design", {"kind": "table", "path": "cells.xlsx"}),),
        files={"cells.xlsx": "party\nDemocrat\n"},
    ),
    Case(
        "table_path_with_factorial",
        "design.path",
        (_edit("design", {"kind": "factorial", "path": "cells.csv"}),),
    ),
    Case(
        "random_n_too_large",  # 2 x 2 x 2 = 8 combinations exist
        "design.n",
        (_edit("design", {"kind": "random", "n": 9}),),
    ),
    Case("random_n_missing", "design.n", (_edit("design", {"kind": "random"}),)),
    Case(
        "coarse_unknown_factor",
        "design.coarse[0].colour",
        (_edit("design", {"coarse": [{"colour": "red"}]}),),
    ),
    Case(
        "coarse_unknown_value",
        "design.coarse[1].party",
        (_edit("design", {"coarse": [{"party": "Democrat"}, {"party": "Green"}]}),),
    ),
    Case("orders_kind_unknown", "orders.kind", (_edit("orders", {"kind": "shuffled"}),)),
    Case("orders_k_zero", "orders.k", (_edit("orders", {"kind": "random", "k": 0}),)),
    Case("scoring_method_unknown", "scoring.method", (_edit("scoring", {"method": "logits"}),)),
    Case(
        "scoring_aggregate_unknown", "scoring.aggregate", (_edit("scoring", {"aggregate": "mean"}),)
    ),
    Case(
        "variant_without_braces",
        "scoring.variants[1]",
        (_edit("scoring", {"variants": [" {}", "A"]}),),
    ),
    Case(
        "variant_with_two_braces",
        "scoring.variants[0]",
        (_edit("scoring", {"variants": ["{} {}"]}),),
    ),
    Case("chat_missing_user", "template.user", (_edit("template", {**CHAT, "user": _DELETE}),)),
    Case("chat_with_prompt", "template.prompt", (_edit("template", {**CHAT, "prompt": PROMPT}),)),
    Case(
        "plain_with_system",
        "template.system",
        (_edit("template.system", "You are a survey respondent."),),
    ),
    Case("plain_missing_prompt", "template.prompt", (_edit("template.prompt", _DELETE),)),
    Case(
        "template_without_options",
        "template.prompt",
        (_edit("template.prompt", "{persona}\nQuestion: {question}\nAnswer:"),),
    ),
    Case(
        "chat_without_options",
        "template.user",
        (_edit("template", {**CHAT, "user": "{persona} {question}"}),),
    ),
    Case(
        "orders_over_hidden_option_texts",
        "orders.kind",
        (
            _edit("template.prompt", "{persona}\nQuestion: {question} ({labels})\nAnswer:"),
            _edit("orders", {"kind": "cyclic"}),
        ),
    ),
    Case(
        "template_without_question",
        "template.prompt",
        (_edit("template.prompt", "{persona}\n{options}\nAnswer:"),),
    ),
    Case(
        "chat_without_question",
        "template.user",
        (_edit("template", {**CHAT, "user": "{persona}\n{options}"}),),
    ),
    Case(
        "next_token_prompt_ends_in_whitespace",
        "template.prompt",
        (_edit("template.prompt", PROMPT + " "),),
    ),
    Case(
        "next_token_prefill_ends_in_whitespace",
        "template.prefill",
        (_edit("template", {**CHAT, "prefill": "Answer: "}),),
    ),
]


def _strip_deleted(node: Any) -> Any:
    """Drop `_DELETE` markers left inside whole-section replacements."""
    if isinstance(node, dict):
        return {k: _strip_deleted(v) for k, v in node.items() if v is not _DELETE}
    if isinstance(node, list):
        return [_strip_deleted(v) for v in node]
    return node


def write_study(tmp_path: Path, case: Case) -> Path:
    for name, content in case.files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    path = tmp_path / "study.yaml"
    if case.text is not None:
        path.write_text(case.text, encoding="utf-8")
    else:
        study = example_study_dict()
        for edit in case.edits:
            edit(study)
        path.write_text(yaml.safe_dump(_strip_deleted(study), sort_keys=False), encoding="utf-8")
    return path


def assert_clear(err: StudyError, path: Path, expected_field: str) -> None:
    assert err.field == expected_field, str(err)
    text = str(err)
    assert text.startswith(f"error: {path}: {expected_field}: "), text
    assert err.fix.strip(), text
    assert "\n  fix: " in text


def test_cases_are_distinct() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_study_gives_clear_error(tmp_path: Path, case: Case) -> None:
    path = write_study(tmp_path, case)
    with pytest.raises(StudyError) as info:
        load_study(path)
    assert_clear(info.value, path, case.field)


def test_missing_study_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(StudyError) as info:
        load_study(path)
    assert_clear(info.value, path, "(file)")


def test_example_study_is_valid(tmp_path: Path) -> None:
    """Every case above breaks an otherwise valid file."""
    study = load_study(write_study(tmp_path, Case("valid", "")))
    assert study.name == "example"


# --------------------------------------------------------------------------------------------
# checks that need the tokenizer


def _load(tmp_path: Path, *edits: Callable[[dict[str, Any]], None]) -> Any:
    return load_study(write_study(tmp_path, Case("tok", "", edits)))


def test_multi_token_label_under_next_token(tmp_path: Path, llama_tokenizer: Any) -> None:
    labels = ["Strongly agree", "Neither", "Strongly disagree"]
    study = _load(tmp_path, _edit("questions[1].labels", labels))
    prompts = render(study, llama_tokenizer)
    with pytest.raises(StudyError) as info:
        validate_for_tokenizer(study, prompts, llama_tokenizer, max_length=1024)
    assert_clear(info.value, Path(study.path), "questions[1].labels")
    assert "'Strongly agree'" in str(info.value) or "' Strongly agree'" in str(info.value)


def test_multi_token_option_text_under_next_token(tmp_path: Path, gpt2_tokenizer: Any) -> None:
    study = _load(tmp_path, _edit("scoring", {"target": "text"}))
    prompts = render(study, gpt2_tokenizer)
    with pytest.raises(StudyError) as info:
        validate_for_tokenizer(study, prompts, gpt2_tokenizer, max_length=None)
    assert_clear(info.value, Path(study.path), "questions[0].labels")


def test_multi_token_labels_are_fine_under_sequence(tmp_path: Path, llama_tokenizer: Any) -> None:
    labels = ["Strongly agree", "Neither", "Strongly disagree"]
    study = _load(
        tmp_path, _edit("questions[1].labels", labels), _edit("scoring", {"method": "sequence"})
    )
    validate_for_tokenizer(study, render(study, llama_tokenizer), llama_tokenizer, 1024)


def test_prompt_longer_than_context(tmp_path: Path, llama_tokenizer: Any) -> None:
    study = _load(tmp_path)
    prompts = render(study, llama_tokenizer)
    validate_for_tokenizer(study, prompts, llama_tokenizer, max_length=1024)
    with pytest.raises(StudyError) as info:
        validate_for_tokenizer(study, prompts, llama_tokenizer, max_length=16)
    assert_clear(info.value, Path(study.path), "questions[0]")
    assert "context is 16" in str(info.value)


def test_chat_format_without_chat_template(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)  # a private copy to modify
    tokenizer.chat_template = None
    study = _load(tmp_path, _edit("template", CHAT))
    with pytest.raises(StudyError) as info:
        render(study, tokenizer)
    assert_clear(info.value, Path(study.path), "template.format")


# --------------------------------------------------------------------------------------------
# the command line: exit code 2, no traceback


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    cli = pytest.importorskip("workbench.cli", reason="workbench/cli.py not written yet")
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def test_cli_malformed_study_exits_2_without_traceback(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_study(tmp_path, CASES[[c.id for c in CASES].index("duplicate_question_id")])
    argv = [
        "distributions",
        str(path),
        "--model",
        str(tiny_llama_dir),
        "--out",
        str(tmp_path / "o"),
    ]
    code, err = _run_cli(argv, capsys)
    assert code == 2
    assert err.startswith(f"error: {path}: questions[1].id: ")
    assert "\n  fix: " in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_cli_validate_malformed_study_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_study(tmp_path, CASES[[c.id for c in CASES].index("not_yaml")])
    code, err = _run_cli(["validate", str(path)], capsys)
    assert code == 2
    assert err.startswith(f"error: {path}: (file): not valid YAML")


def test_cli_multi_token_label_exits_2(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tokenizer-dependent checks also reach the user as a clear error, not a traceback."""
    labels = ["Strongly agree", "Neither", "Strongly disagree"]
    path = write_study(tmp_path, Case("cli", "", (_edit("questions[1].labels", labels),)))
    argv = [
        "distributions",
        str(path),
        "--model",
        str(tiny_llama_dir),
        "--out",
        str(tmp_path / "o"),
    ]
    code, err = _run_cli([*argv, "--quiet"], capsys)
    assert code == 2
    # transformers may print a weight-loading progress bar before the error
    assert f"\nerror: {path}: questions[1].labels: " in "\n" + err.replace("\r", "\n")
    assert not (tmp_path / "o" / "manifest.json").exists()


class _CaseFoldingTokenizer:
    """One token per distinct case-folded string (as a lower-casing tokenizer would)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        ids = [[self.vocab.setdefault(t.lower(), len(self.vocab))] for t in texts]
        return {"input_ids": ids}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        names = {i: t for t, i in self.vocab.items()}
        return [names[i] for i in ids]


def test_two_options_scored_by_one_token(tmp_path: Path, llama_tokenizer: Any) -> None:
    """Labels "A" and "a" under a case-folding tokenizer: one token would count for both."""
    study = _load(tmp_path, _edit("questions[1].labels", ["A", "a", "C"]))
    prompts = render(study, llama_tokenizer)
    with pytest.raises(StudyError) as info:
        validate_for_tokenizer(study, prompts, _CaseFoldingTokenizer(), max_length=None)
    assert_clear(info.value, Path(study.path), "questions[1].labels")
    assert "scored by the same token" in str(info.value)
