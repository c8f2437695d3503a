"""Benchmark: N sampled answers per prompt, workbench engine vs HF `generate(num_return_sequences=N)`.

Usage (from the repository root)::

    python -m scripts.bench_sampling                   # CPU table -> results/benchmarks/sampling_cpu.md
    python -m scripts.bench_sampling --quick --out -   # smoke run (a few prompts), writes nothing
    python -m scripts.bench_sampling --prompts 96 --n 100 --threads 1 --repeats 3
    python -m scripts.bench_sampling --device cuda --scale default --batch-rows 8192

Model and prompts: the model organism (`workbench.organism.build_organism(scale=--scale)`,
a small Llama trained by the workbench; built once and cached) and `--prompts` of its study's
prompts (every k-th design cell, both questions), at temperature 1, top-p 1, at most
`--max-new-tokens` new tokens. About 30% of the organism's answers start with a planted
preamble ("Sure! I'd give it a 4."), so completions have 1 to 9 tokens.

Methods, in one process, on the same loaded model, dtype and prompts (`prompts.input_ids`):

- `hf-generate`: one `model.generate(input_ids, do_sample=True, temperature=1, top_p=1,
  top_k=0, num_return_sequences=N, max_new_tokens=K)` call per prompt (the prompt is
  prefilled N times), then the texts are decoded and parsed with the same parser;
- `hf-generate-batched`: the same with `--batch-rows // N` prompts per call (left-padded),
  the most a careful HF user would do;
- `workbench`: `compute_samples(study, lm, out_dir=None, SamplingConfig(n=N, ...))`, all
  included: rendering, prefill once per prompt + KV expansion, batched decoding across
  prompts with early stop, parsing, the answer-position distributions and the tables.

Each method is warmed up on two prompts, then timed `--repeats` times (interleaved; best time
counts). The two methods' sampled distributions must agree within sampling noise: per prompt
the TV between the two empirical answer distributions (options, refusal and unparseable as
categories) is compared with its two-sample floor (two independent draws of N from the pooled
distribution, simulated); the mean over prompts must be below the simulated 95th percentile
of the mean, else the exit status is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

OUT = Path("results/benchmarks/sampling_cpu.md")


@dataclasses.dataclass
class Report:
    """What one benchmark run measured."""

    times: dict[str, list[float]]
    """Wall seconds per repeat and method (CPU seconds are in the text)."""
    counts: dict[str, np.ndarray]
    """[prompt, category] answer counts per method (options, then refusal phrase, unparseable)."""
    mean_tv: float
    floor_mean: float
    floor_q95: float
    agree: bool
    n_prompts: int
    n: int
    text: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=("small", "default"), default="small")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-rows", type=int, default=2400)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: steadiest on a shared machine)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="4 prompts, 1 repeat (smoke test)")
    p.add_argument("--out", default=str(OUT), help="markdown table path, or - for none")
    return p.parse_args(argv)


def _categories(frame: pd.DataFrame, n_options: int) -> np.ndarray:
    """[category] counts: options 0..K-1, then refusal without option, then unparseable."""
    counts = np.zeros(n_options + 2, dtype=np.int64)
    for option, status in zip(frame["option_id"], frame["status"], strict=True):
        if option is not None and not pd.isna(option):
            counts[int(option)] += 1
        elif status == "refusal":
            counts[n_options] += 1
        else:
            counts[n_options + 1] += 1
    return counts


def _hf_generate(
    lm: Any, plans: list[Any], n: int, max_new: int, prompts_per_call: int, seed: int
) -> list[pd.DataFrame]:
    """HF generate + decode + the same parser; one frame (option_id, status) per prompt."""
    tok = lm.tokenizer
    torch.manual_seed(seed)
    frames = []
    for start in range(0, len(plans), prompts_per_call):
        batch = plans[start : start + prompts_per_call]
        width = max(len(p.prompt.input_ids) for p in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            row = list(p.prompt.input_ids)
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        with torch.inference_mode():
            out = lm.model.generate(
                input_ids=ids.to(lm.device),
                attention_mask=mask.to(lm.device),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new,
                num_return_sequences=n,
                pad_token_id=tok.pad_token_id,
            )
        texts = tok.batch_decode(out[:, width:].tolist(), skip_special_tokens=True)
        for i, p in enumerate(batch):
            parsed = [p.parser.parse(t, True) for t in texts[i * n : (i + 1) * n]]
            frames.append(
                pd.DataFrame(
                    {
                        "option_id": [x.option_id for x in parsed],
                        "status": [x.status for x in parsed],
                    }
                )
            )
    return frames


def two_sample_floor(
    counts_a: np.ndarray, counts_b: np.ndarray, n_sims: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """(mean, 95th percentile) of the mean over prompts of TV between two independent
    samples of each prompt's sizes from the pooled distribution (the noise-only TV)."""
    rng = np.random.default_rng(seed)
    pooled = counts_a + counts_b
    p = pooled / pooled.sum(-1, keepdims=True)
    na, nb = counts_a.sum(-1), counts_b.sum(-1)
    a = rng.multinomial(na, p, size=(n_sims, len(p))) / na[None, :, None]
    b = rng.multinomial(nb, p, size=(n_sims, len(p))) / nb[None, :, None]
    mean_tv = 0.5 * np.abs(a - b).sum(-1).mean(-1)
    return float(mean_tv.mean()), float(np.quantile(mean_tv, 0.95))


def main(argv: list[str] | None = None) -> Report:
    command = argv if argv is not None else sys.argv[1:]
    args = parse_args(command)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from workbench.engine.models import load_model
    from workbench.measure.decoding import plan_prompts
    from workbench.measure.sampling import SamplingConfig, compute_samples
    from workbench.organism.build import build_organism
    from workbench.study import prompts as P
    from workbench.study.load import load_study

    hf_logging.set_verbosity_error()
    n_prompts = 4 if args.quick else args.prompts
    repeats = 1 if args.quick else args.repeats
    folder = build_organism(scale=args.scale, progress=False)
    study = load_study(folder / "study.yaml")
    stride = max(1, len(study.cells) // n_prompts)
    cells = study.cells[::stride]
    lm = load_model(folder / "model", dtype="float32", device=args.device)
    # Every cell asks the rating item; the attitude item adds one prompt per new persona.
    study = dataclasses.replace(study, cells=cells[:n_prompts])
    prompts = P.render(study, lm.tokenizer)
    plans = plan_prompts(study, prompts, lm.tokenizer, constrain=False)
    warm_study = dataclasses.replace(study, cells=cells[:1])
    warm_plans = plan_prompts(warm_study, P.render(warm_study, lm.tokenizer), lm.tokenizer, False)
    config = SamplingConfig(
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_rows=args.batch_rows,
        progress=False,
    )
    per_call = max(1, args.batch_rows // args.n)
    n_options = max(len(q.all_options) for q in study.questions)

    methods = {
        "hf-generate": lambda: _hf_generate(lm, plans, args.n, args.max_new_tokens, 1, args.seed),
        "hf-generate-batched": lambda: _hf_generate(
            lm, plans, args.n, args.max_new_tokens, per_call, args.seed
        ),
        "workbench": lambda: compute_samples(study, lm, None, config),
    }
    # Warm-up (allocator, kernels, tokenizer caches).
    _hf_generate(lm, warm_plans, 4, args.max_new_tokens, 1, 0)
    compute_samples(warm_study, lm, None, dataclasses.replace(config, n=4))
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    outputs: dict[str, Any] = {}
    for _ in range(repeats):
        for name, run in methods.items():
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = run()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    load_after = os.getloadavg()[0]

    counts = {
        "workbench": np.stack(
            [
                _categories(grp, n_options)
                for _, grp in outputs["workbench"].samples.groupby("prompt_id", sort=True)
            ]
        ),
        "hf-generate": np.stack([_categories(f, n_options) for f in outputs["hf-generate"]]),
    }
    a, b = counts["workbench"], counts["hf-generate"]
    tv = 0.5 * np.abs(a / a.sum(-1, keepdims=True) - b / b.sum(-1, keepdims=True)).sum(-1)
    floor_mean, floor_q95 = two_sample_floor(a, b, seed=args.seed)
    agree = bool(tv.mean() <= floor_q95)

    best = {m: min(t) for m, t in times.items()}
    best_cpu = {m: min(t) for m, t in cpu.items()}
    n_samples = len(prompts) * args.n
    new_tokens = int(outputs["workbench"].samples["n_new_tokens"].sum())
    rows = []
    for name in methods:
        rows.append(
            f"| {name} | {best[name]:.3f} | {n_samples / best[name]:,.0f} | "
            f"**{best['hf-generate'] / best[name]:.2f}x** | {best_cpu[name]:.3f} | "
            f"{best_cpu['hf-generate'] / best_cpu[name]:.2f}x |"
        )
    cfg = lm.model.config
    versions = {p: metadata.version(p) for p in ("torch", "transformers")}
    text = "\n".join(
        [
            "# Sampling benchmark: workbench engine vs HF generate(num_return_sequences=N)",
            "",
            f"- Command: `{' '.join(['python -m scripts.bench_sampling', *command])}`",
            f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- Machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}; "
            f"1-min load average {load_before:.2f} before, {load_after:.2f} after",
            f"- Versions: python {platform.python_version()}, torch {versions['torch']}, transformers {versions['transformers']}",
            f"- Model: the model organism (scale `{args.scale}`): Llama, {cfg.hidden_size} hidden, {cfg.num_hidden_layers} layers, "
            f"vocab {cfg.vocab_size}, {sum(p.numel() for p in lm.model.parameters()):,} parameters, float32 on {lm.device}",
            f"- Workload: {len(prompts)} prompts (mean {np.mean([len(p.input_ids) for p in prompts]):.1f} tokens) x N = {args.n} samples "
            f"= {n_samples:,} completions, temperature 1, top-p 1, max {args.max_new_tokens} new tokens; "
            f"the workbench generated {new_tokens:,} tokens ({new_tokens / n_samples:.2f} per completion)",
            f"- Settings: workbench `batch_rows` {args.batch_rows} ({per_call} prompts per wave; also the prompts per call of "
            f"hf-generate-batched); best of {repeats} interleaved repeats; times in s: "
            + "; ".join(f"{m} {' '.join(f'{t:.2f}' for t in ts)}" for m, ts in times.items())
            + " (CPU s: "
            + "; ".join(f"{m} {' '.join(f'{t:.2f}' for t in ts)}" for m, ts in cpu.items())
            + ")",
            f"- Agreement (workbench vs hf-generate): mean over prompts of the TV between the two sampled answer "
            f"distributions {tv.mean():.4f}; two-sample sampling floor {floor_mean:.4f} (95th percentile "
            f"{floor_q95:.4f}): **{'within' if agree else 'NOT within'} sampling noise**",
            "",
            "| method | best wall s | completions/s | speed vs hf-generate (wall) | best CPU s | speed (CPU time) |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "hf-generate: one `generate(num_return_sequences=N, do_sample=True, top_k=0)` call per prompt "
            "(the prompt prefilled N times), then decode + parse. hf-generate-batched: the same with several "
            "left-padded prompts per call. workbench: `compute_samples` end to end (render, prefill once + KV "
            "expansion, decoding batched across prompts with rows leaving at their parsed answer/EOS, parsing, "
            "answer-position distributions, tables).",
            "",
        ]
    )
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return Report(
        times, counts, float(tv.mean()), floor_mean, floor_q95, agree, len(prompts), args.n, text
    )


if __name__ == "__main__":
    report = main()
    sys.exit(0 if report.agree else 1)
