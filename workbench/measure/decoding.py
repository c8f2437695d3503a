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
  log-sum-exp and the top-p threshold. A sample whose answer begins at a token boundary with
  one of those tokens reads its slot from these records: the same prefix and the same forward
  as a teacher-forced pass. Otherwise (the answer starts inside a token such as "(4", or is a
  multi-token text) `teacher_forced_logprobs` scores every option's continuation after the
  generated prefix (temperature applied; top-p is not, on this path only). Tests check both
  against a plain HF forward.
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
) -> tuple[list[Row], dict[str, np.ndarray]]:
    """Sample `config.n` completions for every prompt of one wave.

    Returns the finished rows (prompt-major, sample-minor) and the per-step candidate
    records: cand [row, step, cand] raw logits, lse [row, step] full-vocab log-sum-exp,
    thr [row, step] the top-p threshold in logits/temperature units.
    """
    model, tok, device = lm.model, lm.tokenizer, lm.device
    n, n_prompts = config.n, len(plans)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    lengths = [len(p.prompt.input_ids) for p in plans]
    width = max(lengths)
    ids = torch.full((n_prompts, width), pad, dtype=torch.long)
    mask = torch.zeros((n_prompts, width), dtype=torch.long)
    for i, p in enumerate(plans):
        ids[i, width - lengths[i] :] = torch.tensor(p.prompt.input_ids)
        mask[i, width - lengths[i] :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = _forward(
        model,
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
    )
    cache.batch_repeat_interleave(n)
    logits = logits.repeat_interleave(n, 0)
    mask = mask.to(device).repeat_interleave(n, 0)
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
    record = config.answer_position and not verbalized
    steps = max_new if record else 1  # no records needed: keep the buffers tiny
    buf_cand = torch.full((n_rows, steps, n_cand), float("nan"), device=device)
    buf_lse = torch.full((n_rows, steps), float("nan"), device=device)
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
    records = {
        "cand": buf_cand.cpu().numpy(),
        "lse": buf_lse.cpu().numpy(),
        "thr": buf_thr.cpu().numpy(),
    }
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


# --------------------------------------------------------------------------------------------
# answer-position distributions


def _answer_token(row: Row, start: int) -> int | None:
    for j, length in enumerate(row.text_len):
        if length > start:
            return j
    return None


def _slots_from_records(
    plans: list[Plan],
    fast: list[tuple[int, int, int]],
    records: dict[str, np.ndarray],
    n: int,
    temperature: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Slots read from the decoding records, vectorized over samples.

    `fast`: (row, token index, kind index). Returns ([sample, option] raw temperature-1
    log-probs, [sample, option] sampling distribution), options padded to the widest
    question with zero probability (-inf log-prob).
    """
    n_options = max(len(p.question.all_options) for p in plans)
    n_cand = records["cand"].shape[-1]
    rows = np.array([f[0] for f in fast])
    steps = np.array([f[1] for f in fast])
    kinds = np.array([f[2] for f in fast])
    owner = rows // n
    option = np.zeros((len(plans), n_cand), dtype=np.int64)
    kind = np.full((len(plans), n_cand), -1, dtype=np.int64)
    for i, p in enumerate(plans):
        option[i, : len(p.cand_ids)] = p.cand_option
        kind[i, : len(p.cand_ids)] = p.cand_kind
    cand = records["cand"][rows, steps].astype(np.float64)  # [sample, cand]
    use = kind[owner] == kinds[:, None]
    raw = np.where(use, np.exp(cand - records["lse"][rows, steps][:, None]), 0.0)
    scaled = cand / temperature
    top = np.where(use, scaled, -np.inf).max(-1, keepdims=True)
    kept = use & (scaled >= records["thr"][rows, steps][:, None])
    weight = np.where(kept, np.exp(scaled - top), 0.0)
    onehot = np.zeros((len(fast), n_cand, n_options))
    np.put_along_axis(onehot, option[owner][:, :, None], 1.0, axis=-1)
    raw_opt = np.einsum("sc,sco->so", raw, onehot)
    weight_opt = np.einsum("sc,sco->so", weight, onehot)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(raw_opt), weight_opt / weight_opt.sum(-1, keepdims=True)


def answer_positions(
    lm: LoadedModel,
    plans: list[Plan],
    rows: list[Row],
    records: dict[str, np.ndarray],
    config: SamplingConfig,
) -> list[dict[str, Any]]:
    """Per row: answer_token, answer_option_mass, answer_logprobs, answer_probs (or nulls)."""
    n = config.n
    out: list[dict[str, Any]] = [
        {
            "answer_token": None,
            "answer_option_mass": float("nan"),
            "answer_logprobs": None,
            "answer_probs": None,
        }
        for _ in rows
    ]
    fast_rows: list[tuple[int, int, int]] = []
    fallback: list[tuple[int, int, str, str]] = []
    """(row, token index, text before the answer inside its token, kind)"""
    for r, row in enumerate(rows):
        parsed = row.result
        if not isinstance(parsed, Parsed) or parsed.start is None or parsed.kind is None:
            continue
        j = _answer_token(row, parsed.start)
        if j is None:
            continue
        plan = plans[r // n]
        before = row.text[(row.text_len[j - 1] if j > 0 else 0) : parsed.start]
        kind = KINDS.index(parsed.kind)
        token = row.ids[j]
        fast = before.strip() == "" and (token, kind) in plan.cand_set
        out[r]["answer_token"] = j
        if fast:
            fast_rows.append((r, j, kind))
        else:
            fallback.append((r, j, before, parsed.kind))
    if fast_rows:
        logp, probs = _slots_from_records(plans, fast_rows, records, n, config.temperature)
        for i, (r, _, _) in enumerate(fast_rows):
            k = len(plans[r // n].question.all_options)
            out[r].update(
                answer_option_mass=float(np.exp(logp[i, :k]).sum()),
                answer_logprobs=logp[i, :k].tolist(),
                answer_probs=probs[i, :k].tolist(),
            )
    if fallback:
        _fallback_slots(lm, plans, rows, fallback, config, out)
    return out


def _fallback_slots(
    lm: LoadedModel,
    plans: list[Plan],
    rows: list[Row],
    fallback: list[tuple[int, int, str, str]],
    config: SamplingConfig,
    out: list[dict[str, Any]],
) -> None:
    """Teacher-force each option's continuation after the generated prefix of the slot."""
    contexts, continuations, owners = [], [], []
    for r, j, before, kind in fallback:
        plan = plans[r // config.n]
        context = list(plan.prompt.input_ids) + rows[r].ids[:j]
        for surface in option_surfaces(plan.question, plan.prompt.order):
            if surface.kind != kind:
                continue
            ids = lm.tokenizer(before + surface.text, add_special_tokens=False)["input_ids"]
            contexts.append(context)
            continuations.append(ids)
            owners.append((r, surface.option_id))
    lp1, lp_t = teacher_forced_logprobs(lm, contexts, continuations, config.temperature)
    per_row: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for (r, opt), a, b in zip(owners, lp1, lp_t, strict=True):
        n_options = len(plans[r // config.n].question.all_options)
        if r not in per_row:
            per_row[r] = (np.full(n_options, -np.inf), np.full(n_options, -np.inf))
        per_row[r][0][opt] = a
        per_row[r][1][opt] = b
    for r, (logp, logp_t) in per_row.items():
        weights = np.exp(logp_t - logp_t.max())
        out[r].update(
            answer_option_mass=float(np.exp(logp).sum()),
            answer_logprobs=logp.tolist(),
            answer_probs=(weights / weights.sum()).tolist(),
        )


def eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(lm.model, "generation_config", None), lm.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
