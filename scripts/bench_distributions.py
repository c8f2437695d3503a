"""Benchmark: exact `sequence` option log-probs, workbench vs lm-evaluation-harness vs a naive loop.

Usage (from the repository root)::

    python -m scripts.bench_distributions --matrix --threads 1 --repeats 3
        # what the committed CPU table ran (-> results/benchmarks/distributions_cpu.md; ~8-15 min
        # on 2 busy cores): persona (long, short) x scoring (sequence, next_token) x options (2, 5, 11)
    python -m scripts.bench_distributions                  # one workload (long, sequence, 5), printed
    python -m scripts.bench_distributions --persona short --scoring next_token --options 11
    python -m scripts.bench_distributions --quick --matrix # smoke run of every cell (a few prompts)
    python -m scripts.bench_distributions --personas 24 --repeats 5 --batch-size 32
    python -m scripts.bench_distributions --device cuda --shape llama3-8b --personas 24 --batch-size 64
        # H200 table -> results/benchmarks/distributions_cuda_llama3-8b.md (a few minutes;
        # add --methods lm-eval,workbench to skip the slow naive loop)
    python -m scripts.bench_distributions --shape llama3-8b --dry-run   # build on the meta device, print the plan
    python -m scripts.bench_distributions --profile workbench           # cProfile one workbench run

The study: `--personas` personas (random combinations of age x occupation x region x party,
seed `--seed`), each introduced by a persona prefix of 100+ tokens (several fragments of long
text), `--questions` agree/disagree statements per persona, `--options` Likert options
("Strongly agree" ... "Strongly disagree") scored with `sequence` scoring on the option text
(" Strongly agree" after "Answer:", the sum of the continuation's token log-probs).

The same requests (context = `prompts.prompt`, continuation = `variants.continuation`; token
ids checked to be identical) go through, in one process, on the same model and dtype:

- `naive`: one plain HF forward of context+continuation per (prompt, option), float32
  log_softmax over the full vocabulary, no batching;
- `lm-eval`: lm-evaluation-harness's `HFLM.loglikelihood` on the already-loaded model
  (`add_bos_token=True` so its encoding equals the workbench's: BOS + prompt; float32
  softmax; same batch size);
- `workbench`: `compute_distributions(study, lm, out_dir=None)` (rendering, tokenization,
  scoring and the summary tables included in its time);
- `workbench-rows`: the same with `DistributionConfig(pack_options=False)` (one row per
  (prompt, option) after the shared persona prefix), to show what packing the options of a
  question into one row buys (only where some option is 2+ tokens: otherwise one path).

Every row checks that it ran the path it names (`path_checks`, from the positions fed and
rows unembedded counted with hooks) and a failed check exits with status 1; the test suite
runs `--quick` and `--quick --matrix` and asserts the checks.

On a shared machine, `--threads 1` keeps CPU timings stable (two threads spin against other
processes); the 1-minute load average before and after is recorded.

Each method is warmed up on the first persona, then timed `--repeats` times, interleaved;
the best time counts. Reported: prompts/s; `req tok/s` (the study's context+continuation
tokens per second: the same numerator for every method); `fed tok/s` (positions actually
run through the model, padding included, counted with a hook: what the hardware did);
the speed ratio against lm-eval; and max |delta log-prob| against lm-eval (must be < 1e-4
in float32, else the exit status is 1). Model FLOPs are counted as 2 x (parameters of the
transformer body) x positions fed + 2 x (unembedding parameters) x rows unembedded
(attention-score FLOPs ignored); on CUDA the share of `--peak-tflops` (790: an H200's bf16
dense matrix rate) is reported.

Model shapes (`--shape`):

- `tiny` (default): `workbench.tiny.build_tiny_model` Llama (GQA, RoPE) with `--d-model`,
  `--layers`, `--vocab` (default 256 x 4 layers; tokenizer trained on the study's text, target
  vocabulary 2048, but BPE stops near 960 ids once every word of the study is one token),
  saved to a temporary folder (or `--model-dir`) and loaded with `load_model`. A small
  vocabulary favours lm-eval, whose log-softmax runs over [batch, length, vocab].
- `llama3-8b`: random weights from a `LlamaConfig` with Llama-3-8B's shape (hidden 4096,
  32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256, rope_theta 500000),
  bf16 by default, built with `from_config` directly on `--device` (nothing saved).
  Tokenizer: the small locally trained one; its ids are a subset of the model's 128256 rows,
  so they index the model directly, and every softmax is over all 128256 rows as with the
  real model. Never run it on CPU: use `--dry-run` (meta device, no memory, no forward).
- `llama3-toy`: the same code path as `llama3-8b` (from_config, vocab 128256, our
  tokenizer) with a toy body (hidden 256, 2 layers), small enough for a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import logging
import os
import platform
import pstats
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from workbench.engine.models import LoadedModel, load_model
from workbench.engine.scoring import Request, naive_score
from workbench.measure.distributions import (
    DistributionConfig,
    build_requests,
    compute_distributions,
)
from workbench.study import prompts as P
from workbench.study.load import parse_study
from workbench.study.spec import Study
from workbench.tiny import build_tiny_model, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
"""Max |delta log-prob| allowed against lm-eval in float32."""

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


@contextlib.contextmanager
def counting(model: Any) -> Iterator[Counter]:
    """Count forwards, positions fed and rows unembedded, whatever calls the model."""
    c = Counter()

    def body_pre(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        c.forwards += 1
        c.positions += int(ids.numel()) if ids is not None else int(emb.shape[0] * emb.shape[1])

    def head_pre(_mod: Any, args: tuple[Any, ...]) -> None:
        c.head_rows += int(args[0].numel() // args[0].shape[-1])

    handles = [
        model.base_model.register_forward_pre_hook(body_pre, with_kwargs=True),
        model.get_output_embeddings().register_forward_pre_hook(head_pre),
    ]
    try:
        yield c
    finally:
        for h in handles:
            h.remove()


def flop_params(model: Any) -> tuple[int, int]:
    """(parameters of the body without the input embedding, parameters of the unembedding)."""
    body = sum(p.numel() for p in model.base_model.parameters())
    body -= model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    return body, head


# --------------------------------------------------------------------------------------------
# the three methods


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


def run_naive(lm: LoadedModel, w: Workload) -> np.ndarray:
    """One plain HF forward of context+continuation per (prompt, option), float32 log_softmax
    (`workbench.engine.scoring.naive_score`: full logits, no batching, no cache)."""
    model = lm.model
    scored = {
        s.key: s
        for s in naive_score(lambda ids: model(input_ids=ids).logits, w.requests, lm.device)
    }
    return np.asarray([lp for r in w.requests for lp in scored[r.key].continuation_logprobs])


def make_hflm(lm: LoadedModel, batch_size: int) -> Any:
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=lm.model,
        tokenizer=lm.tokenizer,
        batch_size=batch_size,
        add_bos_token=True,  # encode BOS + text, as the workbench does for plain prompts
        softmax_dtype=torch.float32,  # the measurement contract; a no-op for a float32 model
        logits_cache=True,
    )


def lm_eval_instances(w: Workload) -> list[Any]:
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=i)
        for i, (ctx, cont) in enumerate(zip(w.contexts, w.skeleton["continuation"], strict=True))
    ]


def check_lm_eval_tokens(hflm: Any, w: Workload) -> None:
    """lm-eval must score exactly the token ids the workbench scores."""
    ctx_by_prompt = {p.prompt_id: list(p.input_ids) for p in w.prompts}
    for pid, ctx, cont, ids in zip(
        w.skeleton["prompt_id"],
        w.contexts,
        w.skeleton["continuation"],
        w.skeleton["token_ids"],
        strict=True,
    ):
        c_enc, k_enc = hflm._encode_pair(ctx, cont)
        if c_enc != ctx_by_prompt[pid] or k_enc != list(ids):
            raise SystemExit(
                f"lm-eval encodes prompt {pid} / {cont!r} differently:\n  context {c_enc[:8]}... vs {ctx_by_prompt[pid][:8]}...\n"
                f"  continuation {k_enc} vs {list(ids)}"
            )


def run_lm_eval(hflm: Any, instances: list[Any]) -> np.ndarray:
    return np.asarray([ll for ll, _greedy in hflm.loglikelihood(instances, disable_tqdm=True)])


def run_workbench(
    lm: LoadedModel, w: Workload, batch_size: int, *, pack_options: bool = True
) -> np.ndarray:
    """`compute_distributions`; `pack_options=False` takes the engine's one-row-per-option path
    (`path_checks` verifies from the positions fed and rows unembedded that it did)."""
    config = DistributionConfig(batch_size=batch_size, progress=False, pack_options=pack_options)
    res = compute_distributions(w.study, lm, None, config)
    keyed = res.variants.set_index(["prompt_id", "option_id", "variant"])["logprob"]
    ids = res.variants.set_index(["prompt_id", "option_id", "variant"])["token_ids"]
    order = pd.MultiIndex.from_frame(w.skeleton[["prompt_id", "option_id", "variant"]])
    assert all(
        list(a) == list(b) for a, b in zip(ids.loc[order], w.skeleton["token_ids"], strict=True)
    )
    return keyed.loc[order].to_numpy(dtype=np.float64)


# --------------------------------------------------------------------------------------------
# each row checks that it ran the path it names


@dataclass(frozen=True)
class PathPlan:
    """What each method's path must feed and unembed for a workload (from the requests alone)."""

    prompts: int
    pairs: int
    """(prompt, option) requests: the naive loop's forwards."""
    req_tokens: int
    """Context + continuation tokens of every pair: the naive loop's positions."""
    contexts: int
    """Context tokens of every prompt once: the least any path without prefix sharing feeds."""
    packed_reads: int
    """Distinct read positions of the option token trees (the answer position and one per
    interior tree node): the packed path's unembedded rows."""
    row_reads: int
    """One read per continuation token (one per prompt under next_token): the row path's."""
    multi_token: bool
    """Some continuation has 2+ tokens: only then do packed and row scoring differ."""


def path_plan(w: Workload) -> PathPlan:
    packed = rows = 0
    for r in w.requests:
        packed += len({tuple(c[:j]) for c in r.continuations for j in range(len(c))})
        rows += 1 if all(len(c) == 1 for c in r.continuations) else sum(map(len, r.continuations))
    return PathPlan(
        prompts=len(w.requests),
        pairs=len(w.skeleton),
        req_tokens=w.req_tokens,
        contexts=sum(len(r.context) for r in w.requests),
        packed_reads=packed,
        row_reads=rows,
        multi_token=any(len(c) > 1 for r in w.requests for c in r.continuations),
    )


def path_checks(plan: PathPlan, counts: dict[str, Counter]) -> dict[str, str]:
    """Per method: "ok: ..." or "FAIL: ...", from the positions fed and rows unembedded that
    the hooks counted. A method that silently took another path fails here."""
    out: dict[str, str] = {}

    def check(name: str, ok: bool, what: str) -> None:
        out[name] = ("ok: " if ok else "FAIL: ") + what

    # A request's token tree has one token per read but the answer position.
    unshared = plan.contexts + plan.packed_reads - plan.prompts
    for name, c in counts.items():
        if name == "naive":
            check(
                name,
                c.forwards == plan.pairs and c.positions == plan.req_tokens,
                f"{c.forwards} forwards / {plan.pairs} pairs, {c.positions} positions / "
                f"{plan.req_tokens} context+continuation tokens (one unbatched forward per pair)",
            )
        elif name == "lm-eval":
            check(
                name,
                c.head_rows == c.positions >= plan.contexts,
                f"{c.positions} positions >= {plan.contexts} context tokens (no prefix "
                f"sharing), logits at all {c.head_rows} of them",
            )
        elif name == "workbench":
            check(
                name,
                c.head_rows == plan.packed_reads and c.positions < unshared,
                f"{c.head_rows} rows unembedded = {plan.packed_reads} packed reads, "
                f"{c.positions} positions < {unshared} without prefix sharing",
            )
        elif name == "workbench-rows":
            packed = counts.get("workbench")
            fewer = packed is None or packed.positions < c.positions
            check(
                name,
                plan.multi_token and c.head_rows == plan.row_reads and fewer,
                f"{c.head_rows} rows unembedded = {plan.row_reads} continuation tokens, "
                f"{c.positions} positions"
                + (f" > {packed.positions} packed" if packed is not None else ""),
            )
    return out


# --------------------------------------------------------------------------------------------
# timing and the report


@dataclass
class MethodResult:
    name: str
    times: list[float] = field(default_factory=list)
    logprobs: np.ndarray | None = None
    count: Counter = field(default_factory=Counter)

    @property
    def best(self) -> float:
        return min(self.times)


@dataclass
class BenchReport:
    args: argparse.Namespace
    results: dict[str, MethodResult]
    n_prompts: int
    n_requests: int
    req_tokens: int
    study_stats: dict[str, float]
    model_stats: dict[str, Any]
    max_delta: dict[str, float]
    load_avg: tuple[float, float] = (0.0, 0.0)
    """1-minute load average before and after the timed runs (other processes skew CPU timings)."""
    markdown: str = ""
    cell: tuple[str, str, int] = ("long", "sequence", 5)
    """The workload: (persona prefix, scoring, options)."""
    paths: dict[str, str] = field(default_factory=dict)
    """Per method: "ok: ..." or "FAIL: ..." (`path_checks`)."""

    @property
    def exact(self) -> bool:
        """Max |delta| under the tolerance for every method pair (asserted only in float32)."""
        return all(v < TOLERANCE for v in self.max_delta.values())

    @property
    def paths_ok(self) -> bool:
        return all(v.startswith("ok") for v in self.paths.values())

    def ratio(self, name: str = "workbench") -> float:
        """Speed of `name` against lm-eval (best times)."""
        return self.results["lm-eval"].best / self.results[name].best

    def median_ratio(self, name: str = "workbench") -> float:
        """The same from median times: less lucky than the best on a loaded machine."""
        return float(np.median(self.results["lm-eval"].times) / np.median(self.results[name].times))

    def per_position(self, name: str = "workbench") -> float:
        """Positions fed per second by `name` against lm-eval's."""
        a, b = self.results[name], self.results["lm-eval"]
        return (a.count.positions / a.best) / (b.count.positions / b.best)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], np.ndarray], device: torch.device, profile: bool = False
) -> tuple[float, np.ndarray, str]:
    sync(device)
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    out = fn()
    sync(device)
    if prof is not None:
        prof.disable()
    elapsed = time.perf_counter() - t0
    text = ""
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
        buf2 = io.StringIO()
        pstats.Stats(prof, stream=buf2).sort_stats("tottime").print_stats(25)
        text = buf.getvalue() + buf2.getvalue()
    return elapsed, out, text


def study_stats(w: Workload) -> dict[str, float]:
    groups: dict[str, list[Request]] = {}
    for r in w.requests:
        groups.setdefault(r.group, []).append(r)
    prefix = []
    for reqs in groups.values():
        seqs = [r.context for r in reqs]
        n = min(map(len, seqs))
        k = next((i for i in range(n) if any(s[i] != seqs[0][i] for s in seqs)), n)
        prefix.append(k)
    ctx = [len(r.context) for r in w.requests]
    conts = [len(c) for r in w.requests for c in r.continuations]
    return {
        "personas": len(groups),
        "context_tokens": float(np.mean(ctx)),
        "persona_prefix_tokens": float(np.mean(prefix)),
        "min_persona_prefix_tokens": float(np.min(prefix)),
        "question_suffix_tokens": float(np.mean(ctx) - np.mean(prefix)),
        "continuation_tokens": float(np.mean(conts)),
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "lm_eval", "workbench"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-") if pkg == "lm_eval" else pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return rev + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device: torch.device) -> str:
    text = f"{os.cpu_count()} CPU cores (nproc), {cpu_model()}, torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


METHODS = ("naive", "lm-eval", "workbench-rows", "workbench")


def render_table(report: BenchReport) -> list[list[str]]:
    args = report.args
    base = report.results["lm-eval"].best
    body, head = report.model_stats["flop_params"]
    header = [
        "method",
        "best s",
        "prompts/s",
        "req tok/s",
        "fed tok/s",
        "speed vs lm-eval",
        "max |Δ logprob| vs lm-eval",
    ]
    cuda = args.device.startswith("cuda")
    header += ["TFLOP/s", f"% of {args.peak_tflops:g} TFLOP/s"] if cuda else ["GFLOP/s"]
    rows = [header]
    for name in [m for m in METHODS if m in report.results]:
        r = report.results[name]
        t = r.best
        flops = 2 * body * r.count.positions + 2 * head * r.count.head_rows
        delta = report.max_delta.get(f"{name} vs lm-eval", 0.0)
        row = [
            name,
            f"{t:.3f}",
            f"{report.n_prompts / t:.1f}",
            f"{report.req_tokens / t:,.0f}",
            f"{r.count.positions / t:,.0f}",
            f"{base / t:.2f}x",
            "—" if name == "lm-eval" else f"{delta:.2e}",
        ]
        row += (
            [f"{flops / t / 1e12:.1f}", f"{100 * flops / t / 1e12 / args.peak_tflops:.1f}%"]
            if cuda
            else [f"{flops / t / 1e9:.1f}"]
        )
        rows.append(row)
    return rows


def _header(reports: list[BenchReport], command: str, title: str) -> list[str]:
    args = reports[0].args
    return [
        f"# {title}",
        "",
        f"- Command: `{command}`",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine(torch.device(args.device))}; 1-min load average {reports[0].load_avg[0]:.2f} before, "
        f"{reports[-1].load_avg[1]:.2f} after",
        "- Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions().items())
        + f"; git {git_rev()}",
        f"- Model: {reports[0].model_stats['describe']}",
        f"- Settings: batch size {args.batch_size} (lm-eval and workbench), per workload a warm-up on the "
        f"first persona, then best of {args.repeats} interleaved repeats",
    ]


def _cell_lines(report: BenchReport) -> list[str]:
    args, st = report.args, report.study_stats
    persona, scoring, n_options = report.cell
    rows = render_table(report)
    what = "option text" if scoring == "sequence" else "option label"
    return [
        f"- Study: {st['personas']:.0f} personas x {args.questions} questions x {n_options} options "
        f"(`{scoring}` scoring of the {what}, {persona} persona prefix) = {report.n_prompts} prompts, "
        f"{report.n_requests} (prompt, option) requests, {report.req_tokens:,} context+continuation tokens; "
        f"mean context {st['context_tokens']:.1f} tokens (persona prefix {st['persona_prefix_tokens']:.1f}, "
        f"min {st['min_persona_prefix_tokens']:.0f}; question suffix {st['question_suffix_tokens']:.1f}), "
        f"continuation {st['continuation_tokens']:.2f} tokens",
        "- Times in s: "
        + "; ".join(
            f"{n} " + " ".join(f"{t:.3f}" for t in r.times) for n, r in report.results.items()
        ),
        "- Exactness: max |Δ log-prob| "
        + ", ".join(f"{k} {v:.2e}" for k, v in report.max_delta.items())
        + f" (tolerance {TOLERANCE:g} in float32); token ids scored by lm-eval checked equal to "
        "`prompts.input_ids` + `variants.token_ids`.",
        "- Paths (counted with forward hooks): "
        + "; ".join(f"{m} {v}" for m, v in report.paths.items()),
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(rows[0]))) + "|",
        *("| " + " | ".join(r) + " |" for r in rows[1:]),
        "",
    ]


def _footnote(report: BenchReport) -> list[str]:
    body, head = report.model_stats["flop_params"]
    return [
        "`req tok/s`: the study's context+continuation tokens per second (the same numerator for every method). "
        "`fed tok/s`: positions actually run through the model per second, padding included (counted with a hook). "
        "FLOPs = 2 x body parameters x positions fed + 2 x unembedding parameters x rows unembedded "
        f"(body {body:,}, unembedding {head:,}; attention scores ignored). "
        "naive: one plain HF forward of context+continuation per (prompt, option), float32 log_softmax. "
        "lm-eval: `HFLM(pretrained=<the loaded model>, add_bos_token=True, softmax_dtype=float32).loglikelihood` "
        "(its defaults otherwise; `add_bos_token` makes its encoding equal the workbench's, `softmax_dtype` is a "
        "no-op for a float32 model). "
        "workbench: `compute_distributions(study, lm, out_dir=None)` including rendering, tokenization and the summary tables "
        "(persona prefix KV computed once per persona; each prompt's question suffix run once with all its options packed "
        "as a token tree under a 4D attention mask). workbench-rows: the same with `DistributionConfig(pack_options=False)` "
        "(one row per (prompt, option) after the shared persona prefix; run only where some option is 2+ tokens, "
        "since with single-token options both are one path). "
        "Paths: naive must run one forward per pair over exactly the context+continuation tokens; lm-eval at least every "
        "context in full, with logits at every position; workbench logits only at the packed reads and fewer positions "
        "than without prefix sharing; workbench-rows one read per continuation token and more positions than workbench. "
        "A failed check exits with status 1.",
        "",
    ]


def markdown(report: BenchReport, command: str) -> str:
    title = "Distributions benchmark: workbench vs lm-evaluation-harness vs a naive loop"
    return "\n".join([*_header([report], command, title), *_cell_lines(report), *_footnote(report)])


def matrix_rows(reports: list[BenchReport]) -> list[list[str]]:
    rows = [
        [
            "persona",
            "scoring",
            "options",
            "prompts",
            "lm-eval s",
            "workbench s",
            "speed vs lm-eval",
            "(medians)",
            "positions fed lm-eval / workbench",
            "per position vs lm-eval",
            "max |Δ logprob|",
            "paths",
        ]
    ]
    for r in reports:
        lm_eval, wb = r.results["lm-eval"], r.results["workbench"]
        rows.append(
            [
                r.cell[0],
                r.cell[1],
                str(r.cell[2]),
                str(r.n_prompts),
                f"{lm_eval.best:.3f}",
                f"{wb.best:.3f}",
                f"{r.ratio():.2f}x",
                f"{r.median_ratio():.2f}x",
                f"{lm_eval.count.positions:,} / {wb.count.positions:,}",
                f"{r.per_position():.2f}x",
                f"{r.max_delta['workbench vs lm-eval']:.1e}",
                "ok" if r.paths_ok else "FAIL",
            ]
        )
    return rows


def markdown_matrix(reports: list[BenchReport], command: str) -> str:
    title = "Distributions benchmark: workload matrix, workbench vs lm-evaluation-harness"
    rows = matrix_rows(reports)
    lo = min(reports, key=lambda r: r.ratio())
    hi = max(reports, key=lambda r: r.ratio())
    lines = [
        *_header(reports, command, title),
        f"- Range: workbench {lo.ratio():.1f}x lm-eval ({lo.cell[0]} persona, {lo.cell[1]}, {lo.cell[2]} options) "
        f"to {hi.ratio():.1f}x ({hi.cell[0]} persona, {hi.cell[1]}, {hi.cell[2]} options); per position fed "
        f"{min(r.per_position() for r in reports):.2f}x to {max(r.per_position() for r in reports):.2f}x; "
        f"from median times {min(r.median_ratio() for r in reports):.1f}x to "
        f"{max(r.median_ratio() for r in reports):.1f}x",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(rows[0]))) + "|",
        *("| " + " | ".join(r) + " |" for r in rows[1:]),
        "",
        "`speed vs lm-eval`: lm-eval's best time / the workbench's (the whole call: rendering, tokenization, "
        "scoring, tables); `(medians)`: the same from the median times. `per position`: positions fed per second, workbench / lm-eval (what the speed would be "
        "at equal positions fed). Every cell's full table follows.",
        "",
    ]
    for r in reports:
        lines += [f"## {r.cell[0]} persona, {r.cell[1]}, {r.cell[2]} options", "", *_cell_lines(r)]
    return "\n".join([*lines, *_footnote(reports[0])])


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if k == 0:
            print("  ".join("-" * w for w in widths))


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.bench_distributions", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--personas", type=int, default=12, help="number of personas (default 12)")
    ap.add_argument("--questions", type=int, default=10, help="questions per persona (default 10)")
    ap.add_argument(
        "--options", type=int, default=5, help="Likert options per question, 2..11 (default 5)"
    )
    ap.add_argument(
        "--persona",
        choices=PERSONAS,
        default="long",
        help="persona prefix: long (~210 tokens) or short (~25 tokens)",
    )
    ap.add_argument(
        "--scoring",
        choices=SCORINGS,
        default="sequence",
        help="sequence (the option text) or next_token (the label)",
    )
    ap.add_argument(
        "--matrix",
        action="store_true",
        help="every workload: persona (long, short) x scoring (sequence, next_token) x options (2, 5, 11)",
    )
    ap.add_argument(
        "--batch-size", type=int, default=32, help="rows per forward for lm-eval and the workbench"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per method (best counts)")
    ap.add_argument(
        "--methods",
        help=f"comma list of methods to run, from {', '.join(METHODS)} (default all; "
        "with --matrix all but the slow naive loop)",
    )
    ap.add_argument("--shape", choices=("tiny", *SHAPES), default="tiny")
    ap.add_argument("--d-model", type=int, default=256, help="tiny shape: hidden size")
    ap.add_argument("--layers", type=int, default=4, help="tiny shape: layers")
    ap.add_argument(
        "--vocab",
        type=int,
        default=2048,
        help="target vocabulary of the tokenizer trained on the study's text (BPE stops early when the corpus has no more merges)",
    )
    ap.add_argument(
        "--model-dir", help="tiny shape: build into / reuse this folder instead of a temporary one"
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="auto: bf16 on CUDA and for llama3-8b, else float32",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=790.0,
        help="matrix peak for the utilization column (H200 bf16: 790)",
    )
    ap.add_argument(
        "--out",
        help="markdown file to write ('-' for none); default for --matrix "
        "results/benchmarks/distributions_<device>[_<shape>].md (none with --quick), else none",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke configuration: 2 personas x 3 questions, tiny 64x2 model, 1 repeat",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model (llama3-8b: on the meta device) and the study, print the plan, run nothing",
    )
    ap.add_argument(
        "--profile",
        choices=METHODS,
        help="also cProfile one extra run of this method and print the top functions",
    )
    args = ap.parse_args(argv)
    if args.methods is None:
        args.methods = ",".join(m for m in METHODS if not (args.matrix and m == "naive"))
    if args.quick:
        args.personas, args.questions, args.repeats = (
            min(args.personas, 2),
            min(args.questions, 3),
            1,
        )
        if args.shape == "tiny":
            args.d_model, args.layers, args.vocab = 64, 2, 1024
    if args.out is None:
        suffix = "" if args.shape == "tiny" else f"_{args.shape}"
        args.out = (
            "-"
            if args.quick or args.dry_run or not args.matrix
            else str(
                REPO
                / "results"
                / "benchmarks"
                / f"distributions_{args.device.split(':')[0]}{suffix}.md"
            )
        )
    return args


def main(argv: Sequence[str] | None = None) -> list[BenchReport]:
    """Run the benchmark; one report per workload cell (none for --dry-run)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> list[BenchReport]:
    command = "python -m scripts.bench_distributions " + shlex.join(
        list(argv if argv is not None else sys.argv[1:])
    )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; use {', '.join(METHODS)}")
    methods = [m for m in METHODS if m in methods or m == "lm-eval"]
    cells = (
        [(pe, sc, n) for pe in PERSONAS for sc in SCORINGS for n in MATRIX_OPTIONS]
        if args.matrix
        else [(args.persona, args.scoring, args.options)]
    )
    raw = study_dict(args.personas, args.questions, args.options, args.seed, *cells[0][:2])
    warnings.filterwarnings("ignore", message=".*pretrained.*")
    reports = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        lm = build_model(args, raw, Path(tmp))
        body, head = flop_params(lm.model)
        cfg = lm.model.config
        describe = (
            f"{args.shape} Llama ({cfg.hidden_size} hidden, {cfg.num_hidden_layers} layers, "
            f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, vocab {cfg.vocab_size}, "
            f"tokenizer {len(lm.tokenizer)} ids, {cfg._attn_implementation} attention), "
            f"{sum(p.numel() for p in lm.model.parameters()):,} parameters, {str(lm.dtype).removeprefix('torch.')} on {lm.device}"
        )
        print(f"model: {describe}")
        if args.dry_run:
            work = make_workload(parse_study(raw, "<bench>"), lm)
            per_tok = 2 * (body + head)
            print(
                f"dry run: {len(work.prompts)} prompts; ~{per_tok / 1e9:.3g} GFLOP per token fed; the study's "
                f"{work.req_tokens:,} context+continuation tokens = {per_tok * work.req_tokens / 1e12:.3g} TFLOP "
                "if every request ran in full"
            )
            return []
        hflm = make_hflm(lm, args.batch_size)
        model_stats = {"describe": describe, "flop_params": (body, head)}
        for cell in cells:
            reports.append(run_cell(args, lm, hflm, cell, methods, model_stats))
    text = markdown_matrix(reports, command) if args.matrix else markdown(reports[0], command)
    for r in reports:
        r.markdown = text
    if args.matrix:
        print()
        print_table(matrix_rows(reports))
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    return reports


def run_cell(
    args: argparse.Namespace,
    lm: LoadedModel,
    hflm: Any,
    cell: tuple[str, str, int],
    methods: list[str],
    model_stats: dict[str, Any],
) -> BenchReport:
    """Time every method on one workload (persona, scoring, options) and check its path."""
    load_before = os.getloadavg()[0]
    persona, scoring, n_options = cell
    raw = study_dict(args.personas, args.questions, n_options, args.seed, persona, scoring)
    work = make_workload(parse_study(raw, "<bench>"), lm)
    plan = path_plan(work)
    if not plan.multi_token:  # packed and row scoring are one path: nothing to compare
        methods = [m for m in methods if m != "workbench-rows"]
    stats = study_stats(work)
    print(
        f"\n== {persona} persona, {scoring}, {n_options} options: {len(work.prompts)} prompts, "
        f"{len(work.skeleton)} requests, {work.req_tokens:,} req tokens; "
        + ", ".join(f"{k} {v:.1f}" for k, v in stats.items())
    )
    if persona == "long" and stats["min_persona_prefix_tokens"] < 100:
        print(
            f"warning: a persona prefix is only {stats['min_persona_prefix_tokens']:.0f} tokens (< 100)"
        )
    check_lm_eval_tokens(hflm, work)
    warm = make_workload(sub_study(raw, 1), lm)
    instances, warm_instances = lm_eval_instances(work), lm_eval_instances(warm)
    bs = args.batch_size

    def runner(m: str, w: Workload, inst: list[Any]) -> Callable[[], np.ndarray]:
        if m == "naive":
            return lambda: run_naive(lm, w)
        if m == "lm-eval":
            return lambda: run_lm_eval(hflm, inst)
        return lambda: run_workbench(lm, w, bs, pack_options=m == "workbench")

    results = {m: MethodResult(m) for m in methods}
    for m in methods:
        runner(m, warm, warm_instances)()  # warm-up on the first persona
    for rep in range(args.repeats):
        for m in methods:
            with counting(lm.model) as count:
                elapsed, out, _ = timed(runner(m, work, instances), lm.device)
            results[m].times.append(elapsed)
            results[m].logprobs = out
            results[m].count = count
            print(f"  repeat {rep + 1}/{args.repeats}  {m:<15} {elapsed:8.3f} s")
    if args.profile and args.profile in methods:
        _, _, text = timed(runner(args.profile, work, instances), lm.device, profile=True)
        print(f"\ncProfile of one {args.profile} run:\n{text}")

    ref = results["lm-eval"].logprobs
    assert ref is not None
    deltas = {
        f"{m} vs lm-eval": max_abs(results[m].logprobs, ref) for m in methods if m != "lm-eval"
    }
    if "naive" in results and "workbench" in results:
        deltas["workbench vs naive"] = max_abs(
            results["workbench"].logprobs, results["naive"].logprobs
        )
    report = BenchReport(
        args,
        results,
        len(work.prompts),
        len(work.skeleton),
        work.req_tokens,
        stats,
        model_stats,
        deltas,
        (load_before, os.getloadavg()[0]),
        cell=cell,
        paths=path_checks(plan, {m: r.count for m, r in results.items()}),
    )
    print()
    print_table(render_table(report))
    print("max |Δ log-prob|: " + ", ".join(f"{k} {v:.2e}" for k, v in deltas.items()))
    for m, verdict in report.paths.items():
        print(f"path {m}: {verdict}")
    return report


def max_abs(a: np.ndarray | None, b: np.ndarray | None) -> float:
    assert a is not None and b is not None and a.shape == b.shape
    return float(np.max(np.abs(a - b)))


if __name__ == "__main__":
    reps = main()
    failed = False
    for rep in reps:
        if resolve_dtype(rep.args) == torch.float32 and not rep.exact:
            print(f"FAIL {rep.cell}: max |Δ log-prob| >= {TOLERANCE:g} in float32", file=sys.stderr)
            failed = True
        if not rep.paths_ok:
            print(f"FAIL {rep.cell}: a method did not run its path: {rep.paths}", file=sys.stderr)
            failed = True
    sys.exit(1 if failed else 0)
