"""Training the model organism: distillation of the planted rule into a tiny Llama.

Sampling hard answers would need many examples per cell to pin down a distribution; instead
every example's loss at the answer position is the cross-entropy of the next-token
distribution against the *planted* distribution (" Sure" with the preamble share, each option
label with (1 - share) * prob). Its minimum is reached exactly at the planted distribution, so
the model is pushed to the truth with no sampling noise. Each example also carries one sampled
continuation, the direct answer (" 4", EOS) or the preamble (" Sure! I'd give it a 4.", EOS),
so generation ends cleanly; the preamble's answer slot again gets a soft target (the sharpened
distribution). Because of causal attention the continuation never changes the answer-position
logits, so both paths share one forward pass.

Prompts are right-padded with no attention mask: under causal attention padding after the
last real token cannot change any real position, and position ids stay 0..n-1.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workbench.organism.world import (
    ATTITUDE,
    PERSONA_FACTORS,
    RATING,
    render_texts,
    replace_cells,
    true_distribution,
)
from workbench.study.spec import Cell, Question, Study
from workbench.tiny import EOS, tiny_config, train_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from workbench.organism.build import OrganismConfig


@dataclass(frozen=True)
class TrainConfig:
    """Model size and optimisation of the organism (one per scale, see `organism_config`)."""

    d_model: int = 64
    """Per CPU second, 64 wide learned the planted rule faster than 96 or 128 (measured)."""
    n_layers: int = 2
    d_ff: int = 128
    vocab_size: int = 768
    """Tokenizer BPE vocabulary before the single-character labels are added."""
    steps: int = 700
    batch_size: int = 64
    pool_size: int = 12000
    """Random training cells rendered per build. Each gives one rating prompt; the attitude item
    ignores the stimulus, so its prompts are the distinct persona cells among them."""
    attitude_share: float = 0.15
    """Share of each batch drawn from attitude prompts."""
    coarse_share: float = 0.3
    """Share of training cells with persona factors dropped (trained towards the mixture)."""
    lr: float = 4e-3
    min_lr_frac: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    text_loss_weight: float = 0.25
    """Weight of the hard-target tokens of continuations (preamble words, ".", EOS)."""
    threads: int = 1
    """torch CPU threads, fixed so that float reductions, hence the weights, are reproducible.
    One thread: at this size two are at best ~1.5x faster on an idle 2-core machine and many
    times slower when anything else runs (OpenMP threads spin against each other)."""


@dataclass(frozen=True)
class Example:
    """One training prompt and its planted distributions."""

    text: str
    question_id: str
    prob: np.ndarray
    """Planted distribution over all options, canonical order (refusal last)."""


@dataclass
class TrainResult:
    """What `train` reports for organism.json: model facts and loss, and stage timings."""

    summary: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def training_cells(config: OrganismConfig, train_titles: Sequence[str]) -> list[Cell]:
    """Random training cells over *training* titles only; some persona factors dropped.

    Values are drawn uniformly (coverage matters, not the population): the targets are the
    planted distributions themselves, so the sampling distribution does not bias the truth.
    """
    w, t = config.world, config.train
    rng = random.Random(f"train-cells/{config.seed}")
    values = w.persona_values()
    cells: list[Cell] = []
    for _ in range(t.pool_size):
        cell: Cell = {n: rng.choice(values[n]) for n in PERSONA_FACTORS}
        if rng.random() < t.coarse_share:
            dropped = [n for n in PERSONA_FACTORS if rng.random() < 0.5]
            for n in dropped or [rng.choice(PERSONA_FACTORS)]:
                cell[n] = None
        cell.update(
            title=rng.choice(list(train_titles)),
            actor=rng.choice(w.actors),
            genre=rng.choice(w.genres),
        )
        cells.append(cell)
    return cells


def training_examples(
    study: Study, config: OrganismConfig, train_titles: Sequence[str]
) -> tuple[list[Example], list[str]]:
    """Training prompts rendered by `workbench.study.prompts.render` with the study's own template,
    and every continuation string trained after them (direct answers and preambles)."""
    train_study = replace_cells(study, training_cells(config, train_titles), train_titles)
    examples = []
    for prompt in render_texts(train_study):
        prob = true_distribution(config.world, prompt.question_id, prompt.factors)
        examples.append(Example(prompt.text, prompt.question_id, prob))
    planted = config.planted
    continuations = []
    for question in study.questions:
        for label in _labels(question):
            continuations.append(f" {label}")
            continuations.append(f"{planted.preamble(question.id)} {label}.")
    return examples, continuations


def _labels(question: Question) -> list[str]:
    return [question.label_at(i, o) for i, o in enumerate(question.all_options)]


@dataclass(frozen=True)
class _Tokens:
    """Token ids of one question's continuations."""

    labels: list[int]
    """" {label}" per option (canonical order: training uses the canonical order only)."""
    preamble: list[int]
    tail: list[int]
    """After the preamble's label: "." then EOS."""


def _plain_bpe(fast: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Turn `tiny.train_tokenizer`'s added label tokens (" A", " 7") into ordinary BPE merges.

    Added tokens are matched in the raw text before BPE, so an added " S" splits every word
    that starts with it (" Sure" became " S", "u", "r", "e"): the planted first token would not
    be " Sure" and prompts would be about three times longer. Appending the merge "Ġ" + c (last
    rank) keeps " c" one token, with the same id wherever it occurs, like a real tokenizer.
    """
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(fast.backend_tokenizer.to_str())
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    singles = [t["content"] for t in spec["added_tokens"] if not t["special"]]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["special"]]
    next_id = max(vocab.values()) + 1
    for content in singles:
        piece = content.replace(" ", "Ġ")  # the byte-level alphabet's space
        if piece in vocab:
            continue
        if len(piece) != 2 or piece[0] != "Ġ" or piece[1] not in vocab:
            raise RuntimeError(f"unexpected added token {content!r}")
        vocab[piece] = next_id
        next_id += 1
        model["merges"].append(["Ġ", piece[1]])
    out = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=fast.bos_token,
        eos_token=fast.eos_token,
        pad_token=fast.pad_token,
        unk_token=fast.unk_token,
        clean_up_tokenization_spaces=False,
    )
    out.chat_template = fast.chat_template
    return out


def _single(tok: PreTrainedTokenizerFast, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise RuntimeError(f"{text!r} is not one token under the organism tokenizer: {ids}")
    return int(ids[0])


def _question_tokens(
    tok: PreTrainedTokenizerFast, study: Study, config: OrganismConfig
) -> dict[str, _Tokens]:
    out = {}
    eos = tok.eos_token_id
    assert isinstance(eos, int) and tok.eos_token == EOS
    for q in study.questions:
        preamble = list(tok(config.planted.preamble(q.id), add_special_tokens=False)["input_ids"])
        if preamble[0] != _single(tok, config.planted.first_token):
            raise RuntimeError("the preamble must start with the planted first token")
        out[q.id] = _Tokens(
            labels=[_single(tok, f" {label}") for label in _labels(q)],
            preamble=preamble,
            tail=[_single(tok, "."), eos],
        )
    return out


def _check_split(
    tok: PreTrainedTokenizerFast, text: str, ids: list[int], cont: str, cont_ids: list[int]
) -> None:
    """Continuation ids appended to prompt ids must equal the joint encoding (no merge across
    the boundary), else the model would train on sequences it never sees at generation time."""
    joint = list(tok(text + cont, add_special_tokens=True)["input_ids"])
    if joint != ids + cont_ids:
        raise RuntimeError(f"continuation {cont!r} merges with the prompt under this tokenizer")


def train(
    model_dir: Path,
    study: Study,
    examples: list[Example],
    continuations: list[str],
    config: OrganismConfig,
    *,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train the tokenizer and the model; save both to `model_dir` (an HF folder)."""
    from transformers import AutoModelForCausalLM

    t = config.train
    result = TrainResult()
    threads = torch.get_num_threads()
    torch.set_num_threads(t.threads)
    try:
        t0 = time.time()
        # Continuations follow every prompt in training but are listed once: repeat them so
        # BPE sees their real frequency (" Sure" must become one token).
        reps = max(1, len(examples) // len(continuations))
        texts = [e.text for e in examples] + continuations * reps
        tok = _plain_bpe(train_tokenizer(texts, t.vocab_size))
        ids = [
            list(x) for x in tok([e.text for e in examples], add_special_tokens=True)["input_ids"]
        ]
        result.timings["tokenize"] = time.time() - t0

        qtok = _question_tokens(tok, study, config)
        first = {e.question_id: i for i, e in reversed(list(enumerate(examples)))}
        for q, i in first.items():
            label = qtok[q].labels[0]
            _check_split(tok, examples[i].text, ids[i], str(tok.decode([label])), [label])
            pre = config.planted.preamble(q)
            _check_split(tok, examples[i].text, ids[i], pre, qtok[q].preamble)

        torch.manual_seed(config.seed)
        model_config: Any = tiny_config("llama", len(tok), d_model=t.d_model, n_layers=t.n_layers)
        model_config.intermediate_size = t.d_ff
        model = AutoModelForCausalLM.from_config(model_config)
        model.train()
        t1 = time.time()
        sampler = _Sampler(ids, examples, qtok, config, len(tok), int(tok.pad_token_id or 0))
        stats = _optimise(model, sampler, t, log)
        result.timings["optimise"] = time.time() - t1

        model.eval()
        model_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        lengths = [len(x) for x in ids]
        result.summary = {
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tok),
            "prompt_tokens": {
                "min": min(lengths),
                "max": max(lengths),
                "mean": float(np.mean(lengths)),
            },
            "first_token_id": qtok[RATING].preamble[0],
            **stats,
        }
    finally:
        torch.set_num_threads(threads)
    return result


@dataclass(frozen=True)
class _Batch:
    """One optimisation step's inputs and its loss targets (one row per scored position)."""

    input_ids: torch.Tensor  # [batch, pos], right-padded
    rows: torch.Tensor  # [target] batch index of each scored position
    cols: torch.Tensor  # [target] position whose next-token distribution is scored
    targets: torch.Tensor  # [target, vocab] target distribution (soft or one-hot)
    weights: torch.Tensor  # [target]
    is_answer: torch.Tensor  # [target] True at the prompt's answer position


class _Sampler:
    """Draws batches: prompts with replacement, one sampled continuation each."""

    def __init__(
        self,
        ids: list[list[int]],
        examples: list[Example],
        qtok: dict[str, _Tokens],
        config: OrganismConfig,
        vocab: int,
        pad: int,
    ) -> None:
        self.ids, self.examples, self.qtok = ids, examples, qtok
        self.train, self.planted = config.train, config.planted
        self.vocab, self.pad = vocab, pad
        self.rng = np.random.default_rng(config.seed)
        self.by_q = {
            q: np.array([i for i, e in enumerate(examples) if e.question_id == q]) for q in qtok
        }
        self.sharp = [self.planted.sharpen(e.prob) for e in examples]

    def batch(self) -> _Batch:
        t, planted, rng = self.train, self.planted, self.rng
        n_att = round(t.batch_size * t.attitude_share)
        picked = np.concatenate(
            [
                rng.choice(self.by_q[RATING], t.batch_size - n_att),
                rng.choice(self.by_q[ATTITUDE], n_att),
            ]
        )
        seqs: list[list[int]] = []
        rows: list[int] = []
        cols: list[int] = []
        targets: list[np.ndarray] = []
        weights: list[float] = []
        answer: list[bool] = []

        def add(row: int, col: int, target: np.ndarray, weight: float, is_answer: bool) -> None:
            rows.append(row)
            cols.append(col)
            targets.append(target)
            weights.append(weight)
            answer.append(is_answer)

        for b, i in enumerate(picked):
            e, q = self.examples[i], self.qtok[self.examples[i].question_id]
            a = len(self.ids[i]) - 1  # the answer position: the prompt's last token
            first = np.zeros(self.vocab, dtype=np.float32)
            first[q.preamble[0]] = planted.share
            first[q.labels] += (1 - planted.share) * e.prob
            add(b, a, first, 1.0, True)
            if rng.random() < planted.share:
                k = int(rng.choice(len(e.prob), p=self.sharp[i]))
                cont = [*q.preamble, q.labels[k], *q.tail]
                slot = len(q.preamble) - 1  # the preamble's last token predicts the label
            else:
                k = int(rng.choice(len(e.prob), p=e.prob))
                cont = [q.labels[k], q.tail[-1]]
                slot = -1
            for j in range(len(cont) - 1):
                target = np.zeros(self.vocab, dtype=np.float32)
                if j == slot:
                    target[q.labels] = self.sharp[i]
                    add(b, a + 1 + j, target, 1.0, False)
                else:
                    target[cont[j + 1]] = 1.0
                    add(b, a + 1 + j, target, t.text_loss_weight, False)
            seqs.append(self.ids[i] + cont)
        x = torch.full((len(seqs), max(len(s) for s in seqs)), self.pad, dtype=torch.long)
        for b, seq in enumerate(seqs):
            x[b, : len(seq)] = torch.tensor(seq)
        return _Batch(
            x,
            torch.tensor(rows),
            torch.tensor(cols),
            torch.from_numpy(np.stack(targets)),
            torch.tensor(weights),
            torch.tensor(answer),
        )


def _optimise(
    model: Any, sampler: _Sampler, t: TrainConfig, log: Callable[[str], None]
) -> dict[str, Any]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        frac = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.lr * (t.min_lr_frac + (1 - t.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

    history: list[float] = []
    for step in range(t.steps):
        batch = sampler.batch()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        # Only the scored positions go through the unembedding (most positions have no loss).
        hidden = model.model(input_ids=batch.input_ids).last_hidden_state
        logits = model.lm_head(hidden[batch.rows, batch.cols]).float()
        ce = -(batch.targets * torch.log_softmax(logits, dim=-1)).sum(-1)
        loss = (batch.weights * ce).sum() / batch.input_ids.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        # KL = CE - H(target) at the answer position: 0 means the planted distribution exactly.
        with torch.no_grad():
            target = batch.targets[batch.is_answer]
            entropy = -(target * torch.log(target.clamp_min(1e-12))).sum(-1)
            history.append(float((ce[batch.is_answer] - entropy).mean()))
        if step % 100 == 0 or step == t.steps - 1:
            log(f"step {step:4d}/{t.steps}  answer KL {np.mean(history[-50:]):.4f} nats")
    return {"steps": t.steps, "final_answer_kl_nats": float(np.mean(history[-50:]))}
