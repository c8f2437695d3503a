"""Batched encoding, and the continuation ids of context + continuation from the context's tail.

`sequence` scoring needs, for every (prompt, option), the ids after the context's ids in the
joint encoding of context + continuation (lm-evaluation-harness's split; see
`prompts.continuation_ids`). Encoding every joint text whole (`joint_continuations_whole`,
the reference) re-encodes the same ~250-token context once per option. `joint_continuations`
returns the same ids from the context's last few characters only, where that is proven exact,
and falls back to the whole-text path everywhere else.

Why a tail suffices (for the tokenizers `local_rule` accepts). A fast tokenizer encodes a
text in stages: added tokens are cut out, the rest is normalized, pre-tokenized (split into
pieces), each piece is encoded by BPE on its own (merges never cross pieces), and the
post-processor adds special tokens. Take a context C (length n), a continuation X, and a cut
b with C[b-1] an ASCII letter and C[b] an ASCII non-letter, b <= n - 2, and an ASCII graphic
(non-space) character in C[b:]. Then, encoded without special tokens,
encode(C + X) == encode(C)[:j] + encode(C[b:] + X) with j = len(encode(C)) - len(encode(C[b:])),
because the pieces of C + X are C's pieces before b followed by the pieces of C[b:] + X
encoded alone, and BPE (without dropout) gives the same piece the same ids:

- No normalizer, so every stage sees the raw text.
- Every accepted pre-tokenizer is a sequence of regex splits (the GPT-2, Llama-3 and Qwen2
  patterns, alone or inside ByteLevel), digit splits and a final byte mapping. None of these
  patterns looks behind or uses anchors, so a scan from a piece boundary equals the scan of
  the text from there on alone.
- b is a piece boundary in both C and C + X: every alternative that can hold a letter (a
  letter run, a contraction such as 's) ends at the first non-letter, C[b].
- The scan up to b is the same in C and C + X: deciding a match [a, e) reads at most two
  characters past e (a failed contraction such as 'll) or, for the whitespace
  alternatives, their run and the character that ends it. For e <= b all of it lies
  inside C: b <= n - 2, C[b-1] is not a space and C[b:] has a non-space. Digit splits
  depend on two adjacent characters only.
- Added tokens: none occurs in C[b-L:] + X (L: the longest added token), so every occurrence
  in C + X ends before b (whitespace an `rstrip` token swallows stops at the letter C[b-1]):
  cutting them out gives the same text pieces before b in C and C + X, and none after b.
- The post-processor only prepends special tokens (or none), so with special tokens
  encode(C + X) = prefix + pieces before b + encode(C[b:] + X), and the same for C.

A second cut, for contexts that end in an added token or shortly after one (chat prompts:
"<|im_start|>assistant", or "<|end_header_id|>" itself once the trailing newlines have moved
to the continuation): b = the end of the context's last added token T, found by the same
leftmost-longest scan that cuts added tokens out, and confirmed from encode(C) itself: its
last ids must be T's id followed by encode(C[b:]) (byte-level BPE ids spell their text, so
the tokenizer cut T out right there). Added tokens are cut out before anything else, and
each text piece between them is normalized, pre-tokenized and encoded on its own. If no
added token's occurrence in C + X crosses b or starts at or after it, the cutting of C + X
decides everything before b as the cutting of C does, so the pieces before b are the same,
and C[b:] + X is one piece, encoded exactly as the text C[b:] + X alone. T must not strip
the whitespace after it (`rstrip`) nor match only as a single word: both would let the
first characters of C[b:] + X decide T's own match. The same identity as above follows,
with j = len(encode(C)) - len(encode(C[b:])) (C[b:] may be empty).

Everything else (SentencePiece/Metaspace, other patterns, normalizers, BPE dropout,
post-processors that append tokens, Python-side encoding overrides, contexts without either
cut near their end, added tokens across the junction) takes the whole-text path.
`tests/integration/test_continuation_ids.py` checks both paths agree on randomized texts.
"""

from __future__ import annotations

import json
import re
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
"""The split of GPT-2 (and `ByteLevel(use_regex=True)`, e.g. SmolLM2 and this project's BPE)."""
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
LOCAL_PATTERNS = frozenset({GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN})
"""Split patterns analysed in the module docstring; any other pattern takes the whole path."""

MIN_TAIL = 4
"""Shortest tail (characters) cut off a context: the argument needs 2; 4 leaves slack."""
MAX_TAIL = 128
"""Longest tail searched for a cut; a context without one takes the whole-text path."""

_LETTERS = frozenset(string.ascii_letters)


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], add_special: bool
) -> list[list[int]]:
    """Token ids of each text: one batched tokenizer call (the same ids as one call each).

    Text-only stand-ins (`spans._TextOnly`, the organism's) are not `PreTrainedTokenizerBase`
    and take one text per call: they get one call per text.
    """
    if not texts:
        return []
    # No transformers import here (`workbench validate` stays light): a real tokenizer means
    # transformers is already loaded.
    loaded = sys.modules.get("transformers")
    base = getattr(loaded, "PreTrainedTokenizerBase", None) if loaded is not None else None
    if base is None or not isinstance(tokenizer, base):
        return [list(tokenizer(t, add_special_tokens=add_special)["input_ids"]) for t in texts]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special)["input_ids"]]


@dataclass(frozen=True)
class Joint:
    """One context and continuation whose joint encoding is split."""

    context: str
    context_ids: Sequence[int]
    """`encode(context)` with the same `add_special` (a prompt's `input_ids`)."""
    continuation: str


def joint_continuations_whole(
    tokenizer: PreTrainedTokenizerBase, joints: Sequence[Joint], add_special: bool
) -> list[list[int]]:
    """The reference: encode each context + continuation whole and keep the ids after the
    context's ids; if those are not a prefix (or nothing follows), the continuation alone."""
    wholes = encode(tokenizer, [j.context + j.continuation for j in joints], add_special)
    out: list[list[int] | None] = []
    fallback: list[int] = []
    for i, (joint, whole) in enumerate(zip(joints, wholes, strict=True)):
        ctx_ids = list(joint.context_ids)
        if whole[: len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
            out.append(whole[len(ctx_ids) :])
        else:
            out.append(None)
            fallback.append(i)
    alone = encode(tokenizer, [joints[i].continuation for i in fallback], False)
    for i, ids in zip(fallback, alone, strict=True):
        out[i] = ids
    return [ids if ids is not None else [] for ids in out]


def joint_continuations(
    tokenizer: PreTrainedTokenizerBase, joints: Sequence[Joint], add_special: bool
) -> list[list[int]]:
    """`joint_continuations_whole`, the same ids, from the contexts' tails where proven exact.

    Each distinct tail and tail + continuation is encoded once (prompts share their endings,
    e.g. "\\nAnswer:", so a study needs a few dozen short encodings instead of one long one
    per option).
    """
    rule = local_rule(tokenizer, add_special)
    if rule is None:
        return joint_continuations_whole(tokenizer, joints, add_special)
    cuts: list[int | None] = []
    after: dict[int, frozenset[int]] = {}
    """joint index -> ids the token before the tail must have (the second cut)"""
    last_added: dict[str, tuple[int, frozenset[int]] | None] = {}
    for i, j in enumerate(joints):
        b = tail_start(j.context)
        if b is None or rule.added_near(j.context, b, j.continuation):
            if j.context not in last_added:
                last_added[j.context] = rule.last_added(j.context)
            found = last_added[j.context]
            b = None
            if found is not None and rule.clear_after(j.context + j.continuation, found[0]):
                b, after[i] = found
        cuts.append(b)
    texts = {j.context[b:] for j, b in zip(joints, cuts, strict=True) if b is not None}
    texts |= {
        j.context[b:] + j.continuation for j, b in zip(joints, cuts, strict=True) if b is not None
    }
    ordered = sorted(texts)
    ids_of = dict(zip(ordered, encode(tokenizer, ordered, False), strict=True))
    out: list[list[int] | None] = [None] * len(joints)
    whole: list[int] = []
    alone: list[int] = []
    for i, (joint, b) in enumerate(zip(joints, cuts, strict=True)):
        if b is None:
            whole.append(i)
            continue
        tail_ids = ids_of[joint.context[b:]]
        n_head = len(joint.context_ids) - len(tail_ids)
        if n_head < 0 or list(joint.context_ids[n_head:]) != tail_ids:
            whole.append(i)  # context_ids are not this tokenizer's encoding of the context
            continue
        if i in after and (n_head == 0 or joint.context_ids[n_head - 1] not in after[i]):
            whole.append(i)  # the tokenizer did not cut the added token out right before b
            continue
        # The joint encoding is context_ids[:n_head] + ids; the reference's prefix test on it.
        ids = ids_of[joint.context[b:] + joint.continuation]
        if ids[: len(tail_ids)] == tail_ids and len(ids) > len(tail_ids):
            out[i] = ids[len(tail_ids) :]
        else:
            alone.append(i)
    rest = joint_continuations_whole(tokenizer, [joints[i] for i in whole], add_special)
    rest += encode(tokenizer, [joints[i].continuation for i in alone], False)
    for i, ids in zip(whole + alone, rest, strict=True):
        out[i] = ids
    return [ids if ids is not None else [] for ids in out]


def tail_start(context: str) -> int | None:
    """The cut b of the module docstring nearest the end of `context` (None: no cut).

    b >= 1 and b <= len - MIN_TAIL, context[b-1] an ASCII letter, context[b] an ASCII
    non-letter, an ASCII graphic character in context[b:]; searched in the last MAX_TAIL
    characters.
    """
    n = len(context)
    graphic = next(
        (i for i in range(n - 1, max(n - MAX_TAIL, 0) - 1, -1) if "!" <= context[i] <= "~"), -1
    )
    for b in range(min(n - MIN_TAIL, graphic), max(n - MAX_TAIL, 0), -1):
        c = context[b]
        if context[b - 1] in _LETTERS and c < "\x80" and c not in _LETTERS:
            return b
    return None


@dataclass(frozen=True)
class LocalRule:
    """A tokenizer for which `joint_continuations`' tail split is proven exact."""

    added: re.Pattern[str] | None
    """Matches any added (special or not) token's text, the longest first at each position
    (so `finditer` is the tokenizer's leftmost-longest scan); None when there are none."""
    longest: int
    """Length of the longest added token's text."""
    cut_after: dict[str, frozenset[int]] = field(default_factory=dict)
    """Added tokens that neither strip the whitespace after them nor match only as a single
    word, with their ids: a context may be cut right after one (the docstring's second cut)."""

    def added_near(self, context: str, b: int, continuation: str) -> bool:
        """Whether an added token's text occurs in context[b - longest:] + continuation."""
        if self.added is None:
            return False
        return self.added.search(context[max(b - self.longest, 0) :] + continuation) is not None

    def last_added(self, context: str) -> tuple[int, frozenset[int]] | None:
        """The second cut's candidate: (b, the ids of T), with b the end of the last added
        token T found in the context's last MAX_TAIL + longest characters, where T is in
        `cut_after` and ends at most MAX_TAIL characters before the context's end."""
        if self.added is None:
            return None
        last = None
        start = max(len(context) - MAX_TAIL - self.longest, 0)
        for last in self.added.finditer(context, start):  # noqa: B007 (the last one is kept)
            pass
        if last is None or len(context) - last.end() > MAX_TAIL:
            return None
        ids = self.cut_after.get(last.group())
        return None if ids is None else (last.end(), ids)

    def clear_after(self, text: str, b: int) -> bool:
        """Whether no added token's occurrence in `text` crosses b or starts at or after b."""
        if self.added is None:
            return True
        if self.added.search(text, b) is not None:
            return False
        for start in range(max(b - self.longest + 1, 0), b):
            crossing = self.added.match(text, start)
            if crossing is not None and crossing.end() > b:
                return False
        return True


def local_rule(tokenizer: Any, add_special: bool) -> LocalRule | None:
    """The tail rule for `tokenizer`, or None where exactness is not proven (see module doc)."""
    loaded = sys.modules.get("transformers")
    if loaded is None:
        return None
    from transformers import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    # Python-side overrides could change the text before the Rust tokenizer sees it.
    cls = type(tokenizer)
    if (
        not isinstance(tokenizer, TokenizersBackend)
        or cls._encode_plus is not TokenizersBackend._encode_plus
        or cls.__call__ is not PreTrainedTokenizerBase.__call__
    ):
        return None
    from tokenizers.models import BPE

    backend = tokenizer.backend_tokenizer
    model = backend.model
    if not isinstance(model, BPE) or model.dropout is not None or backend.normalizer is not None:
        return None
    pre = backend.pre_tokenizer
    if pre is None or not _local_pre_tokenizer(json.loads(pre.__getstate__())):
        return None
    post = backend.post_processor
    if add_special and post is not None and not _prepends_only(json.loads(post.__getstate__())):
        return None
    contents = [t.content for t in backend.get_added_tokens_decoder().values()]
    if any(not c for c in contents):
        return None
    if not contents:
        return LocalRule(None, 0)
    ordered = sorted(set(contents), key=len, reverse=True)
    ids: dict[str, set[int]] = {}
    unsafe: set[str] = set()
    for token_id, token in backend.get_added_tokens_decoder().items():
        ids.setdefault(token.content, set()).add(token_id)
        if token.rstrip or token.single_word:
            unsafe.add(token.content)
    cut_after = {c: frozenset(i) for c, i in ids.items() if c not in unsafe}
    return LocalRule(re.compile("|".join(map(re.escape, ordered))), len(ordered[0]), cut_after)


def _local_pre_tokenizer(spec: dict[str, Any]) -> bool:
    """Splits (accepted patterns, digits), then an optional final byte mapping; one regex."""
    stages = spec["pretokenizers"] if spec.get("type") == "Sequence" else [spec]
    regex = False
    for i, stage in enumerate(stages):
        kind = stage.get("type")
        if kind == "ByteLevel":
            # Byte mapping turns spaces into letters: nothing may split after it. A prefix
            # space would be added to every piece, the tail included.
            if i != len(stages) - 1 or stage.get("add_prefix_space") is not False:
                return False
            regex = regex or stage.get("use_regex") is True
        elif kind == "Split":
            pattern = stage.get("pattern", {}).get("Regex")
            if (
                pattern not in LOCAL_PATTERNS
                or stage.get("behavior") != "Isolated"
                or stage.get("invert") is not False
            ):
                return False
            regex = True
        elif kind != "Digits":
            return False
    # Without a regex split the whole text is one piece and BPE merges across the junction.
    return regex


def _prepends_only(spec: dict[str, Any]) -> bool:
    """Whether a post-processor adds special tokens only before the sequence (or none)."""
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_prepends_only(p) for p in spec["processors"])
    if kind == "ByteLevel":
        return True  # offsets only
    if kind == "TemplateProcessing":
        single = spec["single"]
        return (
            bool(single)
            and "Sequence" in single[-1]
            and all("SpecialToken" in piece for piece in single[:-1])
        )
    return False
