"""The sampling engine: prefill once, decode one row per distinct generated prefix, draw each
sample's tokens with its own uniforms, stop at the parsed answer, and keep what the
answer-position distributions need.

Used by `workbench.measure.sampling` (which owns the run folder and the tables). The contract:

- **Prefill once.** A wave's prompts are left-padded and prefilled together (attention mask;
  position ids counted from each prompt's first real token). HF
  `generate(num_return_sequences=N)` prefills every prompt N times.
- **One row per distinct prefix.** The N samples of a prompt start as one row (the prompt).
  At each step every sample of a row draws its next token from the row's one distribution,
  and the row splits into one child per distinct token drawn (the children's KV cache rows
  are copies of the parent's, `batch_select_indices`): the forward batch holds the distinct
  (prompt, generated prefix) pairs, not N x prompts rows, and each distinct completion is
  decoded and parsed once. A child leaves at EOS, at the token budget, or at its first
  *final* parse (`workbench.measure.answers`).
- **Sampling.** float32 softmax(logits / temperature), HF's top-p rule (`TopPLogitsWarper`),
  inverse-CDF draws (`draw`) at uniforms that depend only on (seed, prompt id, sample,
  step) (`uniforms`). Sharing a row changes no draw (each sample keeps its uniform), and
  neither do the wave's other prompts: the same samples at any batch or wave size (up to
  float32 rounding of logits computed in other batch shapes, which moves a token only when
  a uniform falls within ~1e-7 of a CDF boundary).
- **Answer positions.** Each step keeps the raw logits of every option's single-token surface
  forms (the study's `scoring.variants` of labels, texts and values), the full-vocabulary
  log-sum-exp (at temperature 1 and at the sampling temperature) and the top-p threshold, never
  a full-vocabulary row, per distinct completion; the wave's prompt KV cache is kept for the
  teacher-forced slots. The slots themselves are read in `workbench.measure.answer_position`.
- **Memory.** A wave holds at most `WAVE_CACHE_BYTES` of KV cache: `prompts_per_wave` lowers
  the prompts per wave below `batch_rows // n` when the model's cache per token times the
  longest prompt plus `max_new` would exceed it with every sample in its own row (a bound;
  deterministic: the same run gets the same waves, also after a resume).
"""

from __future__ import annotations

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


def uniforms(seed: int, prompt_ids: Sequence[int], n: int, max_new: int) -> np.ndarray:
    """[prompt, sample, step] the uniforms in [0, 1) that draw every token (float32).

    `u[p, s, t]` is draw `s * max_new + t` of a PCG64 stream seeded from (seed, prompt id):
    it depends on nothing else, so no batch, wave, world size or resume point changes a
    draw, and sample s of a run with N samples is sample s of a run with more.
    """
    out = np.empty((len(prompt_ids), n, max_new), dtype=np.float32)
    for i, pid in enumerate(prompt_ids):
        digest = hashlib.sha256(f"workbench-sample/{seed}/{pid}".encode()).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
        out[i] = rng.random((n, max_new), dtype=np.float32)
    return out


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[row, k] tokens from `probs` [row, vocab] by inverse CDF at the uniforms `u` [row, k].

    Exact sampling like `torch.multinomial`, several times faster on CPU. `right=True`
    skips tokens of probability 0; a uniform that rounds onto the total takes the last
    token of positive probability.
    """
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:].contiguous()
    last = torch.searchsorted(cdf, total)  # the last token of positive probability
    return torch.searchsorted(cdf, u * total, right=True).minimum(last)


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
    """Prompts per wave: `batch_rows // n`, lowered so a wave's KV cache fits WAVE_CACHE_BYTES
    even when all its samples differ (a bound: rows that share a prefix share a cache row)."""
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
    """What the decoding steps keep for the answer positions ([row, step] unless said), one
    row per `Row` (a distinct completion: its samples share every step)."""

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

    Keeps references to the cache's tensors: selecting rows of `cache` or appending to it
    afterwards (`batch_select_indices`, `update`) makes new tensors and leaves these intact.
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
    """One distinct finished completion of a prompt, shared by the samples that drew it."""

    text: str
    ids: list[int]
    finish: str
    result: Parsed | Verbalized
    text_len: list[int]
    """Decoded length after each generated token (maps the answer to its token)."""
    prompt: int = 0
    """Index of its prompt in the wave."""
    samples: list[int] = field(default_factory=lambda: [0])
    """The sample indices (0..n-1) that drew exactly this completion."""


def batch_decoder(tokenizer: Any) -> Callable[[list[list[int]]], list[str]]:
    """Batch decode without special tokens: the fast tokenizer's Rust decoder when it gives
    the same text as `batch_decode` (no clean-up of tokenization spaces), else batch_decode."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: list(backend.decode_batch(ids, skip_special_tokens=True))
    return lambda ids: list(tokenizer.batch_decode(ids, skip_special_tokens=True))


def _token_tables(
    plans: list[Plan], vocab: int, device: Any, constrain: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([prompt, cand] candidate token ids, [prompt, vocab] tokens allowed first or None).

    Candidates are padded with the prompt's own first candidate (never 0: a scatter of a pad
    index must not clear a real token).
    """
    n_cand = max(1, max(len(p.cand_ids) for p in plans))
    cand = torch.zeros((len(plans), n_cand), dtype=torch.long)
    for i, p in enumerate(plans):
        row = p.cand_ids or [0]
        cand[i] = torch.tensor(row + [row[0]] * (n_cand - len(row)))
    if not constrain:
        return cand.to(device), None
    n_lab = max(len(p.label_ids) for p in plans)
    lab = torch.zeros((len(plans), n_lab), dtype=torch.long)
    for i, p in enumerate(plans):
        lab[i] = torch.tensor(p.label_ids + [p.label_ids[0]] * (n_lab - len(p.label_ids)))
    allowed = torch.zeros((len(plans), vocab), dtype=torch.bool)
    allowed.scatter_(1, lab, True)
    return cand.to(device), allowed.to(device)


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

    The forward batch holds one row per distinct (prompt, generated prefix), not one per
    sample: a row's samples draw their next tokens from its one distribution (each with its
    own uniform, `uniforms`), and the row splits into one child per distinct token drawn
    (the children's KV cache rows are copies of the parent's, `batch_select_indices`). A
    child leaves at EOS, at `max_new`, or at its first final parse (parsed once per child,
    not per sample). Returns the distinct finished completions (each with the samples that
    drew it) and their per-step `Records` (with the wave's prompt cache when answer
    positions are recorded).
    """
    model, device = lm.model, lm.device
    n, temperature = config.n, config.temperature
    logits, cache, mask = prefill(lm, plans)
    vocab = logits.shape[-1]
    record = config.answer_position and not verbalized
    prefix = prefix_of(cache, mask, plans) if record else None
    u_all = uniforms(config.seed, [p.prompt.prompt_id for p in plans], n, max_new)
    cand_p, allowed_first = _token_tables(plans, vocab, device, config.constrain)
    decode = batch_decoder(lm.tokenizer)
    parsed: dict[tuple[int, str, bool], Parsed | Verbalized] = {}

    def read(p: int, text: str, ended: bool) -> Parsed | Verbalized:
        parser = plans[p].parser
        key = (id(parser), text, ended)
        if key not in parsed:
            parsed[key] = (
                parse_verbalized(text, parser, ended) if verbalized else parser.parse(text, ended)
            )
        return parsed[key]

    # The tree's live rows (one per distinct prefix) and their samples, grouped by row.
    node_prompt = np.arange(len(plans))
    node_ids = np.zeros((len(plans), 0), dtype=np.int64)
    node_len = np.zeros((len(plans), 0), dtype=np.int64)
    s_node = np.repeat(np.arange(len(plans)), n)
    s_idx = np.tile(np.arange(n), len(plans))
    steps = max_new if record else 0
    n_cand = cand_p.shape[1]
    rec = {
        "cand": np.full((len(plans), steps, n_cand), np.nan, dtype=np.float32),
        "lse": np.full((len(plans), steps), np.nan, dtype=np.float32),
        "lse_t": np.full((len(plans), steps), np.nan, dtype=np.float32),
        "thr": np.full((len(plans), steps), -np.inf, dtype=np.float32),
    }
    done_rec: list[dict[str, np.ndarray]] = []
    next_pos = torch.tensor([len(p.prompt.input_ids) for p in plans], device=device)
    eos_array = np.array(sorted(eos_ids), dtype=np.int64)
    finished: list[Row] = []

    for step in range(max_new):
        n_rows = len(node_prompt)
        if record:
            rec["lse"][:, step] = torch.logsumexp(logits, -1).cpu().numpy()
            rows_cand = cand_p[torch.from_numpy(node_prompt).to(device)]
            rec["cand"][:, step] = logits.gather(1, rows_cand).cpu().numpy()
        if allowed_first is not None and step == 0:  # the rows are the prompts, in order
            logits = logits.masked_fill(~allowed_first, float("-inf"))
        scaled = logits / temperature
        if record:
            rec["lse_t"][:, step] = (
                torch.logsumexp(scaled, -1).cpu().numpy()
                if temperature != 1.0
                else rec["lse"][:, step]
            )
        if config.top_p < 1.0:
            thr = _top_p_threshold(scaled, config.top_p)
            scaled = scaled.masked_fill(scaled < thr[:, None], float("-inf"))
            if record:
                rec["thr"][:, step] = thr.cpu().numpy()
        # Each live sample's uniform, laid out [row, k-th sample of the row].
        counts = np.bincount(s_node, minlength=n_rows)
        pos = np.arange(len(s_node)) - (np.cumsum(counts) - counts)[s_node]
        u = np.zeros((n_rows, int(counts.max())), dtype=np.float32)
        u[s_node, pos] = u_all[node_prompt[s_node], s_idx, step]
        drawn = draw(torch.softmax(scaled, -1), torch.from_numpy(u).to(device)).cpu().numpy()
        # One child per distinct (row, token); its samples keep their order.
        keys, s_child = np.unique(s_node * vocab + drawn[s_node, pos], return_inverse=True)
        parent, child_tok = keys // vocab, keys % vocab
        order = np.argsort(s_child, kind="stable")
        s_child, s_idx = s_child[order], s_idx[order]
        bounds = np.searchsorted(s_child, np.arange(len(keys) + 1))
        child_ids = np.concatenate([node_ids[parent], child_tok[:, None]], 1)
        texts = decode(child_ids.tolist())
        lengths_now = np.array([[len(t)] for t in texts], dtype=np.int64)
        child_len = np.concatenate([node_len[parent], lengths_now], 1)
        is_eos = np.isin(child_tok, eos_array)
        last = step == max_new - 1
        keep = np.ones(len(keys), dtype=bool)
        for c, text in enumerate(texts):
            eos = bool(is_eos[c])
            ended = eos or last
            p = int(node_prompt[parent[c]])
            result = read(p, text, ended)
            if not (ended or result.final):
                continue
            n_tok = step if eos else step + 1
            if eos:
                finish = "eos"
            elif not last or read(p, text, False).final:
                finish = "answer"
            else:
                finish = "max_tokens"
            samples = s_idx[bounds[c] : bounds[c + 1]].tolist()
            ids, tl = child_ids[c, :n_tok].tolist(), child_len[c, :n_tok].tolist()
            finished.append(Row(text, ids, finish, result, tl, p, samples))
            keep[c] = False
        if not keep.all():
            done_rec.append({k: v[parent[~keep]] for k, v in rec.items()})
        if not keep.any():
            break
        sel = parent[keep]
        alive = keep[s_child]
        s_node = (np.cumsum(keep) - 1)[s_child[alive]]
        s_idx = s_idx[alive]
        if len(sel) != n_rows or (sel != np.arange(n_rows)).any():
            idx = torch.from_numpy(sel).to(device)
            cache.batch_select_indices(idx)
            mask, next_pos = mask[idx], next_pos[idx]
            rec = {k: v[sel] for k, v in rec.items()}
        node_prompt, node_ids, node_len = node_prompt[sel], child_ids[keep], child_len[keep]
        mask = torch.cat([mask, torch.ones((len(sel), 1), dtype=mask.dtype, device=device)], 1)
        logits, cache = _forward(
            model,
            input_ids=torch.from_numpy(child_tok[keep])[:, None].to(device),
            attention_mask=mask,
            position_ids=next_pos[:, None],
            cache=cache,
        )
        next_pos = next_pos + 1
    assert sum(len(r.samples) for r in finished) == n * len(plans)
    del cache, logits
    stacked = {k: np.concatenate([d[k] for d in done_rec]) for k in rec}
    records = Records(stacked["cand"], stacked["lse"], stacked["lse_t"], stacked["thr"], prefix)
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
