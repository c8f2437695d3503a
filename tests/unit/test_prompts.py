"""Prompt rendering: option orders, labels, personas, deduplication, BOS and continuation ids.

Uses the tokenizers of the tiny local models (tests/conftest.py); no model forward.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from conftest import example_study_dict

from workbench.study.load import parse_study
from workbench.study.prompts import (
    continuation_ids,
    option_orders,
    option_targets,
    persona_id,
    persona_text,
    prompts_frame,
    render,
)
from workbench.study.spec import Study

FIVE = ["Strongly agree", "Agree", "Neither", "Disagree", "Strongly disagree"]


def study_with(**sections: Any) -> Study:
    raw = example_study_dict()
    raw.update(sections)
    return parse_study(raw, "study.yaml")


def five_option_study(orders: dict[str, Any], refusal: tuple[str, ...] = ("Refused",)) -> Study:
    raw = example_study_dict()
    raw["questions"] = [{"id": "q", "text": "Agree?", "options": FIVE, "refusal": list(refusal)}]
    raw["orders"] = orders
    return parse_study(raw, "study.yaml")


# --------------------------------------------------------------------------------------------
# option orders


def test_canonical_order() -> None:
    study = study_with()
    like, economy = study.questions
    assert option_orders(study, like) == [(0, 1, 2)]  # 2 = "Don't know", a refusal option
    assert option_orders(study, economy) == [(0, 1, 2)]


def test_cyclic_orders() -> None:
    study = study_with(orders={"kind": "cyclic"})
    like, economy = study.questions
    assert option_orders(study, economy) == [(0, 1, 2), (1, 2, 0), (2, 0, 1)]
    assert option_orders(study, like) == [(0, 1, 2), (1, 0, 2)]


def test_all_orders_uncapped() -> None:
    study = study_with(orders={"kind": "all"})
    orders = option_orders(study, study.questions[1])
    assert orders[0] == (0, 1, 2)
    assert sorted(orders) == sorted(itertools.permutations(range(3)))


def test_all_orders_capped_is_seeded() -> None:
    study = five_option_study({"kind": "all", "cap": 10, "seed": 1})
    orders = option_orders(study, study.questions[0])
    assert len(orders) == len(set(orders)) == 10
    assert orders[0] == (0, 1, 2, 3, 4, 5)
    assert option_orders(study, study.questions[0]) == orders
    other = five_option_study({"kind": "all", "cap": 10, "seed": 2})
    assert option_orders(other, other.questions[0]) != orders
    full = five_option_study({"kind": "all", "cap": 120})
    assert len(option_orders(full, full.questions[0])) == math.factorial(5)


def test_random_orders_are_seeded() -> None:
    study = five_option_study({"kind": "random", "k": 4, "seed": 5})
    orders = option_orders(study, study.questions[0])
    assert len(orders) == len(set(orders)) == 4
    assert orders[0] == (0, 1, 2, 3, 4, 5)  # the canonical order is always included
    assert option_orders(study, study.questions[0]) == orders
    other = five_option_study({"kind": "random", "k": 4, "seed": 6})
    assert option_orders(other, other.questions[0]) != orders


def test_random_orders_capped_at_all_permutations() -> None:
    study = study_with(orders={"kind": "random", "k": 50})
    orders = option_orders(study, study.questions[1])
    assert sorted(orders) == sorted(itertools.permutations(range(3)))


@pytest.mark.parametrize(
    "orders",
    [
        {"kind": "canonical"},
        {"kind": "cyclic"},
        {"kind": "all", "cap": 7},
        {"kind": "random", "k": 6, "seed": 3},
    ],
)
def test_refusal_options_last_and_never_permuted(orders: dict[str, Any]) -> None:
    study = five_option_study(orders, refusal=("Don't know", "Refused"))
    for order in option_orders(study, study.questions[0]):
        assert order[-2:] == (5, 6)
        assert sorted(order[:-2]) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------------
# rendering


def test_label_follows_displayed_position(llama_tokenizer: Any) -> None:
    study = study_with(orders={"kind": "cyclic"})
    prompts = [p for p in render(study, llama_tokenizer) if p.question_id == "economy"]
    shifted = next(p for p in prompts if p.permutation == 1)
    assert shifted.order == (1, 2, 0)
    assert "A. Fair\nB. Poor\nC. Good\nAnswer:" in shifted.text
    targets = [t for t in option_targets(study, shifted) if t.continuation.startswith(" ")]
    assert [(t.option_id, t.label, t.position) for t in targets] == [
        (1, "A", 0),
        (2, "B", 1),
        (0, "C", 2),
    ]
    assert [t.continuation for t in targets] == [" A", " B", " C"]
    assert not any(t.is_refusal for t in targets)


def test_refusal_label_stays_last(llama_tokenizer: Any) -> None:
    study = study_with(orders={"kind": "cyclic"})
    swapped = next(
        p for p in render(study, llama_tokenizer) if p.question_id == "like" and p.permutation
    )
    assert "A. No\nB. Yes\nC. Don't know\n" in swapped.text
    refusal = [t for t in option_targets(study, swapped) if t.is_refusal]
    assert {(t.option_id, t.label, t.position) for t in refusal} == {(2, "C", 2)}
    assert [t.continuation for t in refusal] == [" C", "C"]


def test_text_target_scores_option_texts(llama_tokenizer: Any) -> None:
    study = study_with(scoring={"method": "sequence"})
    prompt = next(p for p in render(study, llama_tokenizer) if p.question_id == "like")
    assert [t.continuation for t in option_targets(study, prompt)] == [
        " Yes",
        " No",
        " Don't know",
    ]


def test_option_targets_are_the_study_s_own_after_replace(llama_tokenizer: Any) -> None:
    """Targets are cached per study; a study derived with `dataclasses.replace` gets its own."""
    import dataclasses

    study = study_with(scoring={"method": "sequence"})
    prompt = next(p for p in render(study, llama_tokenizer) if p.question_id == "like")
    first = option_targets(study, prompt)
    assert option_targets(study, prompt) == first  # the cached ones, as a fresh list
    bare = dataclasses.replace(study, scoring=dataclasses.replace(study.scoring, variants=("{}",)))
    assert [t.surface for t in option_targets(bare, prompt)] == ["Yes", "No", "Don't know"]
    assert [t.surface for t in option_targets(study, prompt)] == [t.surface for t in first]


def test_persona_fragments_with_unspecified_factors_are_dropped() -> None:
    study = study_with()
    full = {"party": "Democrat", "age": "30", "movie": None}
    assert persona_text(study, full) == "I am 30 years old. Politically, I am a Democrat."
    coarse = {"party": "Democrat", "age": None, "movie": None}
    assert persona_text(study, coarse) == "Politically, I am a Democrat."
    assert persona_text(study, {"party": None, "age": None, "movie": None}) == ""
    assert persona_id(study, coarse) == "party=Democrat|age=*"


def test_coarse_persona_prompt(llama_tokenizer: Any) -> None:
    study = study_with(design={"coarse": [{"party": "Democrat"}]})
    prompts = render(study, llama_tokenizer)
    coarse = [p for p in prompts if p.persona_id == "party=Democrat|age=*"]
    # A coarse cell leaves `movie` unspecified, so it is asked only the question without it.
    assert [p.question_id for p in coarse] == ["economy"]
    assert coarse[0].text.startswith("Politically, I am a Democrat.\nQuestion: How is")
    assert "years old" not in coarse[0].text


def test_questions_are_deduplicated_over_stimulus_factors_they_do_not_name(
    llama_tokenizer: Any,
) -> None:
    study = study_with()
    prompts = render(study, llama_tokenizer)
    like = [p for p in prompts if p.question_id == "like"]
    economy = [p for p in prompts if p.question_id == "economy"]
    assert len(like) == 2 * 2 * 2
    assert len(economy) == 2 * 2  # not repeated per movie
    assert all(p.factors["movie"] is None for p in economy)
    assert {p.factors["movie"] for p in like} == {"Up", "Jaws"}
    assert [p.prompt_id for p in prompts] == list(range(len(prompts)))
    assert len({p.text for p in prompts}) == len(prompts)
    frame = prompts_frame(study, prompts)
    assert frame.loc[frame.question_id == "economy", "movie"].isna().all()
    assert frame.loc[frame.question_id == "like", "movie"].notna().all()
    assert (frame.n_tokens == frame.input_ids.map(len)).all()


def test_stimulus_factor_named_by_template_counts_for_every_question(llama_tokenizer: Any) -> None:
    template = {
        **example_study_dict()["template"],
        "prompt": "About {movie}. {question}\n{options}\nAnswer:",
    }
    study = study_with(template=template)
    economy = [p for p in render(study, llama_tokenizer) if p.question_id == "economy"]
    assert len(economy) == 8


def test_render_is_deterministic(llama_tokenizer: Any) -> None:
    study = study_with(orders={"kind": "random", "k": 2, "seed": 4})
    assert render(study, llama_tokenizer) == render(study, llama_tokenizer)


# --------------------------------------------------------------------------------------------
# BOS and chat templates


CHAT = {
    "format": "chat",
    "persona": ["I am {age} years old.", "Politically, I am a {party}."],
    "system": "{persona}",
    "user": "Question: {question}\n{options}",
    "prefill": "Answer: (",
}


@pytest.mark.parametrize("tokenizer_name", ["llama_tokenizer", "gpt2_tokenizer"])
def test_chat_prompt_has_exactly_one_bos(tokenizer_name: str, request: Any) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    study = study_with(template=CHAT)
    prompts = render(study, tokenizer)
    first = prompts[0]
    messages = [
        {"role": "system", "content": "I am 30 years old. Politically, I am a Democrat."},
        {"role": "user", "content": "Question: Do you like Up?\nA. Yes\nB. No\nC. Don't know"},
    ]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert first.text == expected + "Answer: ("
    assert tokenizer.bos_token_id is not None
    for p in prompts:
        assert p.input_ids[0] == tokenizer.bos_token_id
        assert p.input_ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(p.input_ids) == p.text


def test_plain_prompt_bos_llama_once_gpt2_none(llama_tokenizer: Any, gpt2_tokenizer: Any) -> None:
    study = study_with()
    for p in render(study, llama_tokenizer):
        assert p.input_ids[0] == llama_tokenizer.bos_token_id
        assert p.input_ids.count(llama_tokenizer.bos_token_id) == 1
        assert p.input_ids[1:] == tuple(llama_tokenizer(p.text, add_special_tokens=False).input_ids)
    for p in render(study, gpt2_tokenizer):
        assert gpt2_tokenizer.bos_token_id not in p.input_ids
        assert p.input_ids == tuple(gpt2_tokenizer(p.text, add_special_tokens=False).input_ids)


# --------------------------------------------------------------------------------------------
# continuation ids (docs/MEASUREMENT.md §2, lm-evaluation-harness's rule)


def lm_eval_split(tokenizer: Any, context: str, continuation: str, bos: bool) -> list[int]:
    """The rule written out: move trailing whitespace, encode jointly, drop the context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=bos).input_ids
    return whole[len(tokenizer(context, add_special_tokens=bos).input_ids) :]


@pytest.mark.parametrize("tokenizer_name", ["llama_tokenizer", "gpt2_tokenizer"])
@pytest.mark.parametrize("trailing", ["", " ", "\n", " \n "])
def test_continuation_ids_follow_lm_eval(tokenizer_name: str, trailing: str, request: Any) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    template = {**example_study_dict()["template"]}
    template["prompt"] += trailing
    study = study_with(template=template, scoring={"method": "sequence", "variants": ["{}"]})
    bos = tokenizer_name == "llama_tokenizer"
    prompt = render(study, tokenizer)[0]
    assert prompt.text.endswith("Answer:" + trailing)
    stripped = prompt.text.rstrip()
    for target in option_targets(study, prompt):
        ids = continuation_ids(tokenizer, study, prompt, target.continuation)
        assert ids == lm_eval_split(tokenizer, prompt.text, target.continuation, bos)
        assert tokenizer.decode(ids) == trailing + target.continuation
        context_ids = tokenizer(stripped, add_special_tokens=bos).input_ids
        assert context_ids + ids == tokenizer(prompt.text + target.continuation).input_ids
        assert tokenizer.bos_token_id not in ids


def test_continuation_ids_match_lm_eval_code(llama_tokenizer: Any) -> None:
    """The same split from lm-evaluation-harness's own `_encode_pair`, where installed."""
    model = pytest.importorskip("lm_eval.api.model")

    class Stub:
        backend = "causal"

        def tok_encode(self, text: str) -> list[int]:
            return llama_tokenizer(text, add_special_tokens=False).input_ids

    template = {**example_study_dict()["template"]}
    template["prompt"] += " "
    study = study_with(template=template, scoring={"method": "sequence"})
    prompt = render(study, llama_tokenizer)[0]
    for target in option_targets(study, prompt):
        _, expected = model.TemplateLM._encode_pair(Stub(), prompt.text, target.continuation)
        assert continuation_ids(llama_tokenizer, study, prompt, target.continuation) == expected


def test_continuation_ids_chat_prompt_moves_the_generation_newline(llama_tokenizer: Any) -> None:
    template = {k: v for k, v in CHAT.items() if k != "prefill"}
    study = study_with(template=template, scoring={"method": "sequence", "variants": ["{}"]})
    prompt = render(study, llama_tokenizer)[0]
    assert prompt.text.endswith("<|assistant|>\n")
    ids = continuation_ids(llama_tokenizer, study, prompt, "Yes")
    assert llama_tokenizer.decode(ids) == "\nYes"
    assert ids == lm_eval_split(llama_tokenizer, prompt.text, "Yes", bos=False)
    assert llama_tokenizer.bos_token_id not in ids
