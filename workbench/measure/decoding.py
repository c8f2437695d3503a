"""The sampling engine: prefill once, repeat the KV cache N times, decode many prompts' rows
together, stop each row at its parsed answer, and read the answer-position distributions.

Used by `workbench.measure.sampling` (which owns the run folder and the tables). The contract:

- **Prefill once.** A wave's prompts are left-padded and prefilled together (attention mask;
  position ids counted from each prompt's first real token); the cache is then repeated N
  times (`DynamicCache.batch_repeat_interleave`). HF `generate(num_return_sequences=N)`
  prefills every prompt N times.
- **Decode together, leave early.** All N x prompts rows take one token per step; a row leaves
  the batch (its cache rows are dropped with `batch_select_indices`) at EOS, at the token
  budget, or at its first *final* parse (`workbench.measure.answers`).
- **Sampling.** float32 softmax(logits / temperature), HF's top-p rule (`TopPLogitsWarper`),
  inverse-CDF draws from one `torch.Generator` per wave seeded from (seed, the wave's first
  prompt id, its size).
- **Answer positions.** Each step keeps the raw logits of every option's single-token surface
  forms (the study's `scoring.variants` of labels, texts and values), the full-vocabulary
  log-sum-exp (at temperature 1 and at the sampling temperature) and the top-p threshold, never
  a full-vocabulary row; the wave's prompt KV cache is kept for the teacher-forced slots. The
  slots themselves are read in `workbench.measure.answer_position`.
- **Memory.** A wave holds at most `WAVE_CACHE_BYTES` of KV cache: `prompts_per_wave` lowers
  the prompts per wave below `batch_rows // n` when the model's cache per token times the
  longest prompt plus `max_new` would exceed it (deterministic: the same run gets the same
  waves, also after a resume).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workbench.engine.models import LoadedModel
from workbench.errors import StudyError
from workbench.measure.answers import (
    AnswerParser,
    Parsed,
    Verbalized,
    option_surfaces,
    parse_verbalized,
)
from workbench.study import prompts as P
from workbench.study.spec import Question, Study

if TYPE_CHECKING:
    from workbench.measure.sampling import SamplingConfig

KINDS = ("label", "text", "value")
"""How an answer is written; candidates and parses carry the index into this tuple."""


# --------------------------------------------------------------------------------------------
# per-prompt plans


@dataclass
class Plan:
    """What the engine needs to know about one prompt."""

    prompt: P.Prompt
    question: Question
    parser: AnswerParser
    cand_ids: list[int]
    """Single-token surface forms of the options (study variants of labels, texts, values)."""
    cand_option: list[int]
    cand_kind: list[int]
    """Index into KINDS."""
    label_ids: list[int]
    """The label-kind candidates (constrained decoding draws among these)."""
    cand_set: set[tuple[int, int]] = field(default_factory=set)
    """(token id, kind index) of every candidate."""

    def __post_init__(self) -> None:
        self.cand_set = set(zip(self.cand_ids, self.cand_kind, strict=True))


def plan_prompts(
    study: Study, prompts: list[P.Prompt], tokenizer: Any, constrain: bool
) -> list[Plan]:
    questions = {q.id: q for q in study.questions}
    parsers: dict[tuple[str, tuple[int, ...]], AnswerParser] = {}
    cands: dict[tuple[str, tuple[int, ...]], tuple[list[int], list[int], list[int]]] = {}
    token_cache: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in token_cache:
            token_cache[text] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return token_cache[text]

    plans = []
    for prompt in prompts:
        question = questions[prompt.question_id]
        key = (question.id, prompt.order)
        if key not in parsers:
            parsers[key] = AnswerParser(question, prompt.order, study.sampling)
            seen: dict[tuple[int, int], int] = {}
            ids, opts, kinds = [], [], []
            for surface in option_surfaces(question, prompt.order):
                kind = KINDS.index(surface.kind)
                for variant in study.scoring.variants:
                    toks = encode(variant.replace("{}", surface.text))
                    if len(toks) != 1:
                        continue
                    owner = seen.get((toks[0], kind))
                    if owner is None:
                        seen[(toks[0], kind)] = surface.option_id
                        ids.append(toks[0])
                        opts.append(surface.option_id)
                        kinds.append(kind)
                    elif owner != surface.option_id:
                        raise StudyError(
                            study.path,
                            f"questions[{list(questions).index(question.id)}]",
                            f"two options are written with the same token {toks[0]}",
                            "give every option a distinct label and text",
                        )
            cands[key] = (ids, opts, kinds)
        ids, opts, kinds = cands[key]
        label_ids = [t for t, k in zip(ids, kinds, strict=True) if k == 0]
        if constrain:
            covered = {o for o, k in zip(opts, kinds, strict=True) if k == 0}
            if len(covered) < len(question.all_options):
                raise StudyError(
                    study.path,
                    f"questions[{list(questions).index(question.id)}].labels",
                    "constrained sampling needs every label to be one token under this tokenizer",
                    "use single-token labels (letters or numbers), or sample without --constrain",
                )
        plans.append(Plan(prompt, question, parsers[key], ids, opts, kinds, label_ids))
    return plans


# --------------------------------------------------------------------------------------------
# the engine


def _forward(model: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """One forward with a KV cache; returns float32 last-position logits [rows, vocab]."""
    from workbench.engine.scoring import _cache_kwarg

    cache = kwargs.pop("cache", None)
    out = model(use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache}, **kwargs)
    new_cache = getattr(out, "cache", None) or out.past_key_values
    return out.logits[:, -1].float(), new_cache


def _top_p_threshold(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """[rows] the smallest scaled logit kept by HF's top-p rule (TopPLogitsWarper)."""
    sorted_logits, _ = torch.sort(scaled, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    removed = (cumulative <= (1 - top_p)).sum(-1).clamp(max=scaled.shape[-1] - 1)
    return sorted_logits.gather(1, removed[:, None]).squeeze(1)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[rows] one token per row from `probs` [rows, vocab], by inverse CDF.

    Exact sampling like `torch.multinomial`, several times faster on CPU; `right=True`
    never returns a token of probability 0.
    """
    cdf = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


WAVE_CACHE_BYTES = 1 << 30
"""The most KV cache one wave of decoding may hold (1 GiB)."""


def kv_bytes_per_token(model: Any) -> int | None:
    """Bytes of KV cache one token takes in `model` (all layers), or None if unknown."""
    cfg = getattr(model, "config", None)
    try:
        text = cfg.get_text_config(decoder=True) if cfg is not None else None
    except (AttributeError, TypeError):
        text = cfg
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, hidden)):
        return None
    assert isinstance(layers, int) and isinstance(heads, int) and isinstance(hidden, int)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    size = next(model.parameters()).element_size()
    return int(2 * layers * kv_heads * head_dim * size)


def prompts_per_wave(
    lm: LoadedModel, plans: list[Plan], n: int, batch_rows: int, max_new: int
) -> int:
    """Prompts per wave: `batch_rows // n`, lowered so a wave's KV cache fits WAVE_CACHE_BYTES."""
    per_wave = max(1, batch_rows // n)
    per_token = kv_bytes_per_token(lm.model)
    if per_token and plans:
        width = max(len(p.prompt.input_ids) for p in plans) + max_new
        per_wave = min(per_wave, WAVE_CACHE_BYTES // (per_token * width * n))
    return max(1, per_wave)


@dataclass
class Prefix:
    """A wave's prompts minus their last token as a KV cache (left-padded, like the prefill).

    Teacher-forced slots continue it with the prompt's last token, the generated prefix and
    the option's tokens: the prompt is not run again.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer (keys, values) [prompt, kv_head, pos, head_dim]."""
    mask: torch.Tensor
    """[prompt, pos] 1 on real tokens."""
    lengths: list[int]
    """Real prompt lengths (the last token included)."""
    last: list[int]
    """Each prompt's last token (not in the cache)."""

    @property
    def bytes_per_token(self) -> int:
        rows, width = self.mask.shape
        total = sum(k.nbytes + v.nbytes for k, v in self.kv)
        return total // max(1, rows * width)


@dataclass
class Records:
    """What the decoding steps keep for the answer positions ([row, step] unless said)."""

    cand: np.ndarray
    """[row, step, cand] raw logits of the plan's candidate tokens."""
    lse: np.ndarray
    """Full-vocabulary log-sum-exp of the logits."""
    lse_t: np.ndarray
    """Full-vocabulary log-sum-exp of logits / temperature."""
    thr: np.ndarray
    """The top-p threshold in logits / temperature units (-inf: none)."""
    prefix: Prefix | None = None
    """The wave's prompt cache (None when not recorded)."""


def prefill(lm: LoadedModel, plans: list[Plan]) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Left-padded prefill of the plans' prompts: (last logits [prompt, vocab], cache, mask)."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    lengths = [len(p.prompt.input_ids) for p in plans]
    width = max(lengths)
    ids = torch.full((len(plans), width), pad, dtype=torch.long)
    mask = torch.zeros((len(plans), width), dtype=torch.long)
    for i, p in enumerate(plans):
        ids[i, width - lengths[i] :] = torch.tensor(p.prompt.input_ids)
        mask[i, width - lengths[i] :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = _forward(
        lm.model,
        input_ids=ids.to(lm.device),
        attention_mask=mask.to(lm.device),
        position_ids=positions.to(lm.device),
    )
    return logits, cache, mask.to(lm.device)


def prefix_of(cache: Any, mask: torch.Tensor, plans: list[Plan]) -> Prefix | None:
    """The prompt cache minus each prompt's last token (None for a cache without keys/values).

    Keeps references to the cache's tensors: expanding or appending to `cache` afterwards
    (`batch_repeat_interleave`, `update`) makes new tensors and leaves these intact.
    """
    kv = []
    width = mask.shape[1] - 1
    for layer in getattr(cache, "layers", []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            return None
        if keys.dim() != 4 or keys.shape[-2] != width + 1:
            return None
        kv.append((keys[..., :width, :], values[..., :width, :]))
    if not kv:
        return None
    lengths = [len(p.prompt.input_ids) for p in plans]
    return Prefix(kv, mask[:, :width], lengths, [p.prompt.input_ids[-1] for p in plans])


@dataclass
class Row:
    """One finished sample."""

    text: str
    ids: list[int]
    finish: str
    result: Parsed | Verbalized
    text_len: list[int]
    """Decoded length after each generated token (maps the answer to its token)."""


def batch_decoder(tokenizer: Any) -> Callable[[list[list[int]]], list[str]]:
    """Batch decode without special tokens: the fast tokenizer's Rust decoder when it gives
    the same text as `batch_decode` (no clean-up of tokenization spaces), else batch_decode."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: list(backend.decode_batch(ids, skip_special_tokens=True))
    return lambda ids: list(tokenizer.batch_decode(ids, skip_special_tokens=True))


def _read_verbalized(parser: AnswerParser, text: str, ended: bool) -> Verbalized:
    return parse_verbalized(text, parser, ended)


def _wave_seed(seed: int, first_prompt: int, size: int) -> int:
    digest = hashlib.sha256(f"workbench-sample/{seed}/{first_prompt}/{size}".encode()).hexdigest()
    return int(digest[:15], 16)


@torch.inference_mode()
def run_wave(
    lm: LoadedModel,
    plans: list[Plan],
    config: SamplingConfig,
    max_new: int,
    verbalized: bool,
    eos_ids: set[int],
) -> tuple[list[Row], Records]:
    """Sample `config.n` completions for every prompt of one wave.

    Returns the finished rows (prompt-major, sample-minor) and the per-step `Records`
    (with the wave's prompt cache when answer positions are recorded).
    """
    model, tok, device = lm.model, lm.tokenizer, lm.device
    n, n_prompts = config.n, len(plans)
    lengths = [len(p.prompt.input_ids) for p in plans]
    logits, cache, mask = prefill(lm, plans)
    record = config.answer_position and not verbalized
    prefix = prefix_of(cache, mask, plans) if record else None
    cache.batch_repeat_interleave(n)
    logits = logits.repeat_interleave(n, 0)
    mask = mask.repeat_interleave(n, 0)
    next_pos = torch.tensor(lengths, device=device).repeat_interleave(n)
    n_rows = n_prompts * n
    row_prompt = np.repeat(np.arange(n_prompts), n)

    # Candidate token ids per row, padded with the row's own first candidate (never 0: a
    # scatter of a pad index must not clear a real token).
    n_cand = max(1, max(len(p.cand_ids) for p in plans))
    cand_p = torch.zeros((n_prompts, n_cand), dtype=torch.long)
    for i, p in enumerate(plans):
        row = p.cand_ids or [0]
        cand_p[i] = torch.tensor(row + [row[0]] * (n_cand - len(row)))
    cand_rows = cand_p.to(device).repeat_interleave(n, 0)
    steps = max_new if record else 1  # no records needed: keep the buffers tiny
    buf_cand = torch.full((n_rows, steps, n_cand), float("nan"), device=device)
    buf_lse = torch.full((n_rows, steps), float("nan"), device=device)
    scaled_lse = config.temperature != 1.0
    buf_lse_t = torch.full((n_rows, steps), float("nan"), device=device) if scaled_lse else buf_lse
    buf_thr = torch.full((n_rows, steps), float("-inf"), device=device)
    allowed_first = None
    if config.constrain:
        n_lab = max(len(p.label_ids) for p in plans)
        lab = torch.zeros((n_prompts, n_lab), dtype=torch.long)
        for i, p in enumerate(plans):
            lab[i] = torch.tensor(p.label_ids + [p.label_ids[0]] * (n_lab - len(p.label_ids)))
        allowed_first = torch.zeros((n_prompts, logits.shape[-1]), dtype=torch.bool)
        allowed_first.scatter_(1, lab, True)
        allowed_first = allowed_first.to(device).repeat_interleave(n, 0)

    decode = batch_decoder(tok)
    read: list[Callable[[str, bool], Parsed | Verbalized]] = [
        (
            functools.partial(_read_verbalized, plans[p].parser)
            if verbalized
            else plans[p].parser.parse
        )
        for p in row_prompt.tolist()
    ]
    generator = torch.Generator(device=device)
    generator.manual_seed(_wave_seed(config.seed, plans[0].prompt.prompt_id, n_prompts))
    active = torch.arange(n_rows, device=device)
    active_np = np.arange(n_rows)
    generated = np.full((n_rows, max_new), -1, dtype=np.int64)
    text_len = np.zeros((n_rows, max_new), dtype=np.int64)
    rows: list[Row | None] = [None] * n_rows
    eos_array = np.array(sorted(eos_ids), dtype=np.int64)

    for step in range(max_new):
        if record:
            buf_lse[active, step] = torch.logsumexp(logits, -1)
            buf_cand[active, step] = logits.gather(1, cand_rows[active])
        if allowed_first is not None and step == 0:
            logits = logits.masked_fill(~allowed_first, float("-inf"))
        scaled = logits / config.temperature
        if record and scaled_lse:
            buf_lse_t[active, step] = torch.logsumexp(scaled, -1)
        if config.top_p < 1.0:
            thr = _top_p_threshold(scaled, config.top_p)
            scaled = scaled.masked_fill(scaled < thr[:, None], float("-inf"))
            if record:
                buf_thr[active, step] = thr
        nxt = _draw(torch.softmax(scaled, -1), generator)
        nxt_np = nxt.cpu().numpy()
        generated[active_np, step] = nxt_np
        is_eos = np.isin(nxt_np, eos_array)
        texts = decode(generated[active_np, : step + 1].tolist())
        last = step == max_new - 1
        lengths_now = [len(t) for t in texts]
        text_len[active_np, step] = lengths_now
        keep = np.ones(len(active_np), dtype=bool)
        for i, (r, text, eos) in enumerate(
            zip(active_np.tolist(), texts, is_eos.tolist(), strict=True)
        ):
            ended = eos or last
            result = read[r](text, ended)
            if not (ended or result.final):
                continue
            n_tok = step if eos else step + 1
            if eos:
                finish = "eos"
            elif not last or read[r](text, False).final:
                finish = "answer"
            else:
                finish = "max_tokens"
            rows[r] = Row(
                text,
                generated[r, :n_tok].tolist(),
                finish,
                result,
                text_len[r, :n_tok].tolist(),
            )
            keep[i] = False
        if not keep.any():
            break
        if not keep.all():
            keep_t = torch.from_numpy(keep).to(device)
            idx = torch.nonzero(keep_t).squeeze(1)
            cache.batch_select_indices(idx)
            active, mask, next_pos, nxt = active[idx], mask[idx], next_pos[idx], nxt[idx]
            active_np = active_np[keep]
        mask = torch.cat(
            [mask, torch.ones((len(active_np), 1), dtype=mask.dtype, device=device)], 1
        )
        logits, cache = _forward(
            model,
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            cache=cache,
        )
        next_pos = next_pos + 1
    finished = [r for r in rows if r is not None]
    assert len(finished) == n_rows
    del cache, logits
    records = Records(
        buf_cand.cpu().numpy(),
        buf_lse.cpu().numpy(),
        buf_lse_t.cpu().numpy(),
        buf_thr.cpu().numpy(),
        prefix,
    )
    return finished, records


@torch.inference_mode()
def teacher_forced_logprobs(
    lm: LoadedModel,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    temperature: float = 1.0,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the continuation's token log-probs after each context (one row per pair).

    Returns ([pair] at temperature 1, [pair] at `temperature`), float32 full-vocabulary
    log-softmax. Rows are right-padded: under causal attention pads after the last real
    token change nothing before it.
    """
    model, device = lm.model, lm.device
    pad = lm.tokenizer.pad_token_id or 0
    out1 = np.zeros(len(contexts))
    out_t = np.zeros(len(contexts))
    order = sorted(range(len(contexts)), key=lambda i: -(len(contexts[i]) + len(continuations[i])))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        rows = [list(contexts[i]) + list(continuations[i]) for i in batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        for j, i in enumerate(batch):
            n_ctx, cont = len(contexts[i]), list(continuations[i])
            reads = logits[j, n_ctx - 1 : n_ctx - 1 + len(cont)]
            target = torch.tensor(cont, device=device)[:, None]
            out1[i] = float(torch.log_softmax(reads, -1).gather(1, target).sum())
            out_t[i] = float(torch.log_softmax(reads / temperature, -1).gather(1, target).sum())
    return out1, out_t


def eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(lm.model, "generation_config", None), lm.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
