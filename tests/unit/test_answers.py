"""The answer parser and the verbalized parser: labels, texts, numbers, preambles, refusals,
custom patterns, streaming finality, and never dropping a text. No model."""

from __future__ import annotations

import json

import pytest

from workbench.measure.answers import AnswerParser, parse_verbalized, verbalized_example
from workbench.study.spec import Question, SamplingSpec

RATING = Question(
    "rating",
    "How would you rate it?",
    ("Terrible", "Poor", "Average", "Good", "Excellent"),
    (),
    ("1", "2", "3", "4", "5"),
    (1.0, 2.0, 3.0, 4.0, 5.0),
)
ATTITUDE = Question(
    "att",
    "Should cinemas be funded?",
    ("Agree", "Neutral", "Disagree"),
    ("Don't know",),
    ("A", "B", "C", "D"),
    None,
)
LIKERT = Question(
    "likert",
    "Do you agree?",
    ("Strongly agree", "Agree", "Neither", "Disagree"),
    (),
    ("A", "B", "C", "D"),
    (1.0, 2.0, 1.5, 3.0),
)


def parser(
    question: Question, order: tuple[int, ...] | None = None, **spec: object
) -> AnswerParser:
    order = order or tuple(range(len(question.all_options)))
    return AnswerParser(question, order, SamplingSpec(**spec))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "option", "how"),
    [
        (" 4", 3, "start"),
        (" 4.", 3, "start"),
        (" (2) Poor", 1, "start"),
        (" Sure! I'd give it a 4.", 3, "phrase"),
        (" I would rate it 5/5", 4, "phrase"),
        (" My rating: 1", 0, "phrase"),
        (" Excellent", 4, "start"),
        (" excellent, really.", 4, "start"),
        (" Hmm. It looks Good to me", 3, "mention"),
    ],
)
def test_rating_answers(text: str, option: int, how: str) -> None:
    got = parser(RATING).parse(text, ended=True)
    assert (got.option_id, got.status, got.how) == (option, "ok", how)
    assert got.start is not None and text[got.start :].lower().startswith(
        ("1", "2", "3", "4", "5", "poor", "excellent", "good")
    )


def test_labels_follow_the_displayed_order() -> None:
    # Displayed order (2, 0, 1, 3): "A" is option 2 (Disagree), "B" option 0 (Agree).
    p = parser(ATTITUDE, (2, 0, 1, 3))
    assert p.parse(" A", True).option_id == 2
    assert p.parse(" My answer is B.", True).option_id == 0
    assert p.parse(" Agree", True).option_id == 0  # texts are canonical


@pytest.mark.parametrize(
    ("text", "status", "option"),
    [
        (" D", "refusal", 3),  # the refusal option: status refusal, its id kept
        (" Don't know.", "refusal", 3),
        (" As an AI, I don't have personal opinions.", "refusal", None),
        (" I cannot answer that question.", "refusal", None),
        (" I'm not sure what you mean", "unparseable", None),
        (" A or C, hard to say", "unparseable", None),  # two options: ambiguous
        ("", "unparseable", None),
    ],
)
def test_refusals_and_unparseable(text: str, status: str, option: int | None) -> None:
    got = parser(ATTITUDE).parse(text, ended=True)
    assert (got.status, got.option_id) == (status, option)


def test_builtin_refusal_phrases_match_as_one_pattern_as_they_do_one_by_one() -> None:
    import re

    from workbench.measure.answers import _BUILTIN_REFUSAL, REFUSAL_PHRASES

    texts = [
        " As an AI, I don't have personal opinions.",
        " I cannot answer that question.",
        " i won't choose",
        " I'd prefer not to say.",
        " I am not comfortable answering",
        " As a language model I",
        " I do not have views on this",
        " I'm unable to decide",
        " I can answer that: B",
        " as anything goes",
        " I choose A",
        " not able to",
        "",
    ]
    one_by_one = [any(re.search(p, t, re.IGNORECASE) for p in REFUSAL_PHRASES) for t in texts]
    assert [bool(_BUILTIN_REFUSAL.search(t)) for t in texts] == one_by_one
    assert 4 <= sum(one_by_one) < len(texts)  # both kinds of text are in the list


def test_pronoun_and_article_are_not_labels() -> None:
    many = Question("q", "t", tuple(f"o{i}" for i in range(10)), (), tuple("ABCDEFGHIJ"), None)
    p = parser(many)
    assert p.parse(" I think it is good", True).status == "unparseable"
    assert p.parse(" A good question; I'd pick C", True).option_id == 2
    assert p.parse(" I'd say I.", True).option_id == 8


def test_numbers_and_ordinal_values() -> None:
    p = parser(RATING)
    assert p.parse(" 45", True).status == "unparseable"  # not label 4
    assert p.parse(" 4.5 stars", True).status == "unparseable"
    # Letter labels with ordinal values [1, 2, 1.5, 3]: "1.5" names "Neither".
    q = parser(LIKERT)
    assert q.parse(" I'd give it a 1.5", True).option_id == 2
    assert q.parse(" Answer: 3", True).option_id == 3
    assert q.parse(" strongly agree!", True).option_id == 0  # longest text wins over "Agree"


def test_custom_pattern_has_priority() -> None:
    p = parser(RATING, pattern=r"SCORE=(?P<answer>\d)")
    assert p.parse(" 2 ... SCORE=5;", True).option_id == 4
    assert p.parse(" 2 ... SCORE=5;", True).how == "pattern"
    # An unresolved custom match falls back to the built-in rules.
    assert p.parse(" 2. SCORE=9;", True).option_id == 1
    q = parser(RATING, refusal_patterns=[r"no comment"])
    assert q.parse(" No comment.", True).status == "refusal"


def test_streaming_finality() -> None:
    p = parser(RATING)
    assert not p.parse(" 4", False).final  # could still become "45"
    assert p.parse(" 4", True).final
    assert p.parse(" 4.", False).final and p.parse(" 4.", False).option_id == 3
    assert not p.parse(" Sure! I'd give it a", False).final
    assert p.parse(" Sure! I'd give it a 2.", False).final
    # Weak evidence (a mention) and refusal phrases wait for the end of the text.
    assert not p.parse(" It looks Good to me ", False).final
    assert not parser(ATTITUDE).parse(" As an AI, I", False).final


def test_verbalized_parse_repairs_and_validates() -> None:
    p = parser(ATTITUDE)
    ok = parse_verbalized(' {"A": 20, "B": 30, "C": 40, "D": 10} thanks', p, ended=False)
    assert ok.status == "ok" and ok.final and ok.raw_total == pytest.approx(100)
    assert ok.prob == pytest.approx((0.2, 0.3, 0.4, 0.1))
    loose = parse_verbalized("{'Agree': '50%', 'Neutral': 25, 'disagree': 25,}", p, ended=True)
    assert loose.prob == pytest.approx((0.5, 0.25, 0.25, 0.0)) and loose.n_missing == 1
    bare = parse_verbalized("{A: 1, B: 1}", p, ended=True)
    assert bare.prob == pytest.approx((0.5, 0.5, 0.0, 0.0))
    assert not parse_verbalized(' {"A": 20, "B"', p, ended=False).final
    for text, error in (
        (" I think A", "no_json"),
        (' {"A": 20, "B"', "unclosed_json"),
        ('{"A": [1]}', "bad_value: A"),
        ('{"A": -5, "B": 10}', "bad_value: A"),
        ('{"E": 5}', "unknown_key: E"),
        ('{"A": 5, "Agree": 5}', "duplicate_option: Agree"),
        ('{"A": 0, "B": 0}', "zero_total"),
        ("{,,}", "invalid_json"),
    ):
        got = parse_verbalized(text, p, ended=True)
        assert (got.status, got.error, got.prob) == ("unparseable", error, None), text
    refused = parse_verbalized(" As an AI I cannot answer that.", p, ended=True)
    assert refused.status == "refusal"


def test_verbalized_example_lists_every_label() -> None:
    assert verbalized_example(ATTITUDE, (0, 1, 2, 3)) == '{"A": 25, "B": 25, "C": 25, "D": 25}'
    assert sum(json.loads(verbalized_example(RATING, (0, 1, 2, 3, 4))).values()) == 100


def test_study_sampling_section() -> None:
    from conftest import example_study_dict

    from workbench.errors import StudyError
    from workbench.study.load import parse_study
    from workbench.study.spec import DEFAULT_VERBALIZED_INSTRUCTION

    assert parse_study(example_study_dict()).sampling == SamplingSpec()
    raw = example_study_dict()
    raw["sampling"] = {
        "pattern": r"answer: (?P<answer>\w+)",
        "refusal_patterns": ["no opinion"],
        "verbalized": True,
    }
    spec = parse_study(raw).sampling
    assert spec.verbalized and spec.refusal_patterns == ("no opinion",)
    assert spec.instruction == DEFAULT_VERBALIZED_INSTRUCTION
    for bad, field in (
        ({"pattern": "(unclosed"}, "sampling.pattern"),
        ({"refusal_patterns": ["ok", "[x"]}, "sampling.refusal_patterns[1]"),
        ({"verbalized": "yes"}, "sampling.verbalized"),
        ({"instruction": "give {percentages}"}, "sampling.instruction"),
        ({"temperature": 1}, "sampling.temperature"),
    ):
        raw = example_study_dict()
        raw["sampling"] = bad
        with pytest.raises(StudyError) as info:
            parse_study(raw, "study.yaml")
        assert info.value.field == field and "fix:" in str(info.value), str(info.value)
