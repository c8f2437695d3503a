"""The distributions benchmark's workload: the synthetic persona x Likert study, the models it
runs on, hooks that count what a model computes, and the requests of one (sub)study.

Used by `scripts.bench_distributions` (the driver; its docstring describes the benchmark) and
`scripts.bench_scaling`.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from workbench.engine import readout
from workbench.engine.models import LoadedModel, load_model
from workbench.engine.readout import last_block_at as engine_last_block_at
from workbench.engine.scoring import Request
from workbench.measure.distributions import build_requests
from workbench.study import prompts as P
from workbench.study.load import parse_study
from workbench.study.spec import Study
from workbench.tiny import build_tiny_model, train_tokenizer

# --------------------------------------------------------------------------------------------
# the study

LIKERT7 = (
    "Strongly agree",
    "Agree",
    "Somewhat agree",
    "Neither agree nor disagree",
    "Somewhat disagree",
    "Disagree",
    "Strongly disagree",
)
LIKERT5 = (
    "Strongly agree",
    "Somewhat agree",
    "Neither agree nor disagree",
    "Somewhat disagree",
    "Strongly disagree",
)
LIKERT11 = (
    "Completely agree",
    "Strongly agree",
    "Mostly agree",
    "Agree",
    "Somewhat agree",
    "Neither agree nor disagree",
    "Somewhat disagree",
    "Disagree",
    "Mostly disagree",
    "Strongly disagree",
    "Completely disagree",
)

AGES = ("19", "27", "34", "45", "58", "71")
OCCUPATIONS = (
    "a nurse",
    "a truck driver",
    "a school teacher",
    "a software developer",
    "a retired farmer",
    "a small business owner",
    "an electrician",
    "a graduate student",
)
REGIONS = (
    "rural Ohio",
    "downtown Chicago",
    "suburban Atlanta",
    "central Texas",
    "coastal Oregon",
    "upstate New York",
)
PARTIES = ("a Democrat", "a Republican", "an independent", "a libertarian")

SHORT_PERSONA = (
    "I am {age} years old, I work as {occupation}, I live in {region} and I am {party}.",
)
"""The short persona prefix (about 25 tokens with BOS)."""
PERSONA_FRAGMENTS = (
    "I am {age} years old and I work as {occupation}.",
    "I live in {region}, in the same town where I grew up, close to my parents and my two younger brothers.",
    "Politically, I consider myself {party}, and I vote in almost every local, state and national election.",
    "On weekdays I get up early, read the news over coffee, and talk with my neighbours about prices, schools, roads and the weather.",
    "My household income is about average for my area; we rent our home, own one car, and try to save a little money every month.",
    "I finished high school, took some college classes at night, and I still like to read history books and watch documentaries in the evening.",
    "On weekends I volunteer at a food bank, go to church with my family, and help my friends fix their cars and houses.",
    "When I answer survey questions I say what I really think, even when my opinion is not popular with the people around me.",
)

STATEMENTS = (
    "The government should do more to reduce differences in income between rich and poor.",
    "Immigrants generally strengthen the economy of this country.",
    "Stricter laws on gun ownership would make my community safer.",
    "Climate change is a serious threat that requires immediate action.",
    "Public schools in my area give children a good education.",
    "Taxes on large companies should be raised.",
    "The national news media reports the facts fairly and accurately.",
    "Most people in my community can be trusted.",
    "Health insurance should be provided by the government for everyone.",
    "Free trade with other countries has been good for workers like me.",
    "Police officers in my area treat people of all backgrounds equally.",
    "Social media does more harm than good to our democracy.",
    "The minimum wage should be raised substantially.",
    "Religion should play a larger role in public life.",
    "Nuclear power is a good way to produce electricity.",
    "Elections in this country are free and fair.",
    "Local governments should build more affordable housing.",
    "Artificial intelligence will create more jobs than it destroys.",
    "College education should be free at public universities.",
    "The military budget should be cut.",
)

TEMPLATE = "{persona}\n\nHow much do you agree with the following statement?\nStatement: {question}\n{options}\nAnswer:"


PERSONAS = ("long", "short")
SCORINGS = ("sequence", "next_token")
MATRIX_OPTIONS = (2, 5, 11)


def likert(n: int) -> tuple[str, ...]:
    if n == 5:
        return LIKERT5
    if n == 11:
        return LIKERT11
    if not 2 <= n <= 11:
        raise SystemExit(f"--options must be between 2 and 11, got {n}")
    scale = LIKERT7 if n <= 7 else LIKERT11
    picks = np.round(np.linspace(0, len(scale) - 1, n)).astype(int)
    return tuple(scale[i] for i in picks)


def study_dict(
    n_personas: int,
    n_questions: int,
    n_options: int,
    seed: int,
    persona: str = "long",
    scoring: str = "sequence",
) -> dict[str, Any]:
    """The benchmark study as a study-file mapping (what a YAML file would hold).

    `persona`: `long` (8 fragments, ~210 tokens) or `short` (one sentence, ~25 tokens).
    `scoring`: `sequence` (the option text, " Strongly agree") or `next_token` (the label, " A").
    """
    statements = [STATEMENTS[i % len(STATEMENTS)] for i in range(n_questions)]
    statements = [
        s if i < len(STATEMENTS) else f"{s[:-1]} (variant {i // len(STATEMENTS)})."
        for i, s in enumerate(statements)
    ]
    options = list(likert(n_options))
    return {
        "name": "bench-persona-likert",
        "description": "Benchmark: long persona prefixes x agree/disagree items, sequence scoring of option texts.",
        "seed": seed,
        "factors": [
            {"name": "age", "role": "persona", "values": list(AGES)},
            {"name": "occupation", "role": "persona", "values": list(OCCUPATIONS)},
            {"name": "region", "role": "persona", "values": list(REGIONS)},
            {"name": "party", "role": "persona", "values": list(PARTIES)},
        ],
        "design": {"kind": "random", "n": n_personas, "seed": seed},
        "template": {
            "format": "plain",
            "persona": list(PERSONA_FRAGMENTS if persona == "long" else SHORT_PERSONA),
            "prompt": TEMPLATE,
            "option_line": "{label}. {text}",
        },
        "questions": [
            {
                "id": f"q{i:02d}",
                "text": s,
                "options": options,
                "values": list(range(1, n_options + 1)),
            }
            for i, s in enumerate(statements)
        ],
        "orders": {"kind": "canonical"},
        "scoring": {
            "method": scoring,
            "target": "text" if scoring == "sequence" else "label",
            "variants": [" {}"],
            "top_k": 10,
        },
    }


def corpus(study: dict[str, Any]) -> list[str]:
    """Text the tiny tokenizer is trained on: every workload's words (so they merge into
    tokens), whatever the persona, scoring and options, so one model serves the matrix."""
    texts = []
    for age, occ, region, party in zip(AGES, OCCUPATIONS, REGIONS * 2, PARTIES * 2, strict=False):
        cell = {"age": age, "occupation": occ, "region": region, "party": party}
        texts.append(" ".join(f.format(**cell) for f in (*PERSONA_FRAGMENTS, *SHORT_PERSONA)))
    texts += [q["text"] for q in study["questions"]] + list(STATEMENTS)
    texts += [" ".join(LIKERT7), " ".join(LIKERT11), TEMPLATE]
    return texts


# --------------------------------------------------------------------------------------------
# models

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama3-toy": {
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 512,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}


def build_shape_model(
    shape: str, texts: list[str], device: str, dtype: torch.dtype, *, vocab: int, seed: int
) -> LoadedModel:
    """A random-weight Llama with a named shape, built on `device` (no saving, no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = train_tokenizer(texts, vocab)
    cfg = LlamaConfig(
        **SHAPES[shape],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if len(tokenizer) > cfg.vocab_size:
        raise SystemExit(
            f"tokenizer has {len(tokenizer)} ids but the {shape} shape only {cfg.vocab_size}"
        )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    return LoadedModel(model, tokenizer, f"random:{shape}", None, dtype, torch.device(device))


def build_model(args: argparse.Namespace, study: dict[str, Any], workdir: Path) -> LoadedModel:
    dtype = resolve_dtype(args)
    if args.shape != "tiny":
        device = "meta" if args.dry_run else args.device
        return build_shape_model(
            args.shape, corpus(study), device, dtype, vocab=args.vocab, seed=args.seed
        )
    path = Path(args.model_dir) if args.model_dir else workdir / "tiny-llama"
    if not (path / "config.json").exists():
        build_tiny_model(
            path,
            "llama",
            seed=args.seed,
            texts=corpus(study),
            vocab_size=args.vocab,
            d_model=args.d_model,
            n_layers=args.layers,
        )
    return load_model(path, dtype=dtype, device=args.device)


def resolve_dtype(args: argparse.Namespace) -> torch.dtype:
    if args.dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            args.dtype
        ]
    if args.shape == "llama3-8b" or args.device.startswith("cuda"):
        return torch.bfloat16
    return torch.float32


# --------------------------------------------------------------------------------------------
# counting what the model computes


@dataclass
class Counter:
    forwards: int = 0
    positions: int = 0
    """Positions run through the transformer body (padding included)."""
    head_rows: int = 0
    """Hidden states multiplied by the unembedding."""
    model_s: float = 0.0
    """Seconds inside the model's body and unembedding forwards (the rest of a method's time
    is its own Python work: rendering, tokenization, batching, tables)."""
    skipped: int = 0
    """Positions at which the last block's position-wise modules did not run
    (`workbench.engine.readout.last_block_at`: they run only at the read positions)."""
    reading: list[int] = field(default_factory=list)
    """Rows read by the forward under way when the engine's shortcut is on."""


@contextlib.contextmanager
def counting(model: Any) -> Iterator[Counter]:
    """Count forwards, positions fed and rows unembedded, and time the model's forwards,
    whatever calls the model."""
    c = Counter()
    cuda = next(model.parameters()).device.type == "cuda"
    started: list[float] = []

    def tick(*_: Any) -> None:
        if cuda:
            torch.cuda.synchronize()
        started.append(time.perf_counter())

    def tock(*_: Any) -> None:
        if cuda:
            torch.cuda.synchronize()
        c.model_s += time.perf_counter() - started.pop()

    def body_pre(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        c.forwards += 1
        if ids is None:
            ids = kwargs["inputs_embeds"][..., 0]
        c.positions += int(ids.numel())
        if c.reading:  # inside `last_block_at`: those modules run at the read rows (>= 1)
            c.skipped += int(ids.numel()) - max(c.reading[-1], 1)

    def head_pre(_mod: Any, args: tuple[Any, ...]) -> None:
        c.head_rows += int(args[0].numel() // args[0].shape[-1])

    @contextlib.contextmanager
    def last_block_at(model: Any, rows: torch.Tensor) -> Iterator[bool]:
        with engine_last_block_at(model, rows) as on:
            if on:
                c.reading.append(int(rows.numel()))
            try:
                yield on
            finally:
                if on:
                    c.reading.pop()

    body, head = model.base_model, model.get_output_embeddings()
    readout.last_block_at = last_block_at  # the engine calls it by its module-global name
    handles = [
        body.register_forward_pre_hook(body_pre, with_kwargs=True),
        head.register_forward_pre_hook(head_pre),
        # the timers go on last before and first after each forward
        body.register_forward_pre_hook(tick),
        head.register_forward_pre_hook(tick),
        body.register_forward_hook(tock, prepend=True),
        head.register_forward_hook(tock, prepend=True),
    ]
    try:
        yield c
    finally:
        readout.last_block_at = engine_last_block_at
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class FlopParams:
    """Parameters that each position fed, or each row read, multiplies by (2 FLOPs each)."""

    body: int
    """The transformer body without the input embedding."""
    head: int
    """The unembedding."""
    read_only: int
    """The last block's modules that the engine runs at the read positions only."""

    def flops(self, c: Counter) -> int:
        """Matmul FLOPs of what a method ran (attention scores ignored)."""
        return 2 * (self.body * c.positions - self.read_only * c.skipped + self.head * c.head_rows)


def flop_params(model: Any) -> FlopParams:
    body = sum(p.numel() for p in model.base_model.parameters())
    body -= model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    read_only = sum(p.numel() for m in readout.read_only_modules(model) for p in m.parameters())
    return FlopParams(body, head, read_only)


def shape_flop_params(shape: str) -> FlopParams:
    """`flop_params` of a named shape, read off a model built on the meta device (no memory, no
    weights): the same positions and reads, priced at that shape's parameter counts."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]))
    return flop_params(model)


# --------------------------------------------------------------------------------------------
# one workload's requests


@dataclass
class Workload:
    """The requests of one (sub)study, in the variants-skeleton row order."""

    study: Study
    prompts: list[P.Prompt]
    requests: list[Request]
    skeleton: pd.DataFrame
    """One row per scored continuation: prompt_id, option_id, variant, continuation, token_ids."""
    contexts: list[str]
    """lm-eval context per skeleton row (the prompt, without the whitespace moved to the continuation)."""

    @property
    def req_tokens(self) -> int:
        return int(
            sum(
                len(r.context) * len(r.continuations) + sum(map(len, r.continuations))
                for r in self.requests
            )
        )


def make_workload(study: Study, lm: LoadedModel) -> Workload:
    prompts = P.render(study, lm.tokenizer)
    requests, skeleton = build_requests(study, lm, prompts)
    by_id = {p.prompt_id: p for p in prompts}
    contexts = []
    for pid, cont in zip(skeleton["prompt_id"], skeleton["continuation"], strict=True):
        text = by_id[pid].text
        moved = len(text) - len(text.rstrip())
        assert cont.startswith(text[len(text) - moved :])
        contexts.append(text[: len(text) - moved])
    return Workload(study, prompts, requests, skeleton, contexts)


def sub_study(study_raw: dict[str, Any], n_personas: int) -> Study:
    raw = {**study_raw, "design": {**study_raw["design"], "n": n_personas}}
    return parse_study(raw, "<bench>")
