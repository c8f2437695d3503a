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

The study, models and hook counters live in `scripts/bench_distributions_setup.py`; the path
checks and the markdown report in `scripts/bench_distributions_report.py`.

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
import cProfile
import io
import logging
import os
import pstats
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from scripts.bench_distributions_report import (
    METHODS,
    REPO,
    TOLERANCE,
    BenchReport,
    MethodResult,
    markdown,
    markdown_matrix,
    matrix_rows,
    max_abs,
    path_checks,
    path_plan,
    print_table,
    render_table,
    study_stats,
)
from scripts.bench_distributions_setup import (
    MATRIX_OPTIONS,
    PERSONAS,
    SCORINGS,
    SHAPES,
    Workload,
    build_model,
    build_shape_model,
    corpus,
    counting,
    flop_params,
    make_workload,
    resolve_dtype,
    shape_flop_params,
    study_dict,
    sub_study,
)
from workbench.engine.models import LoadedModel
from workbench.engine.scoring import naive_score
from workbench.measure.distributions import DistributionConfig, compute_distributions
from workbench.study.load import parse_study

__all__ = ["build_shape_model", "corpus", "main", "run_workbench", "study_dict"]

# --------------------------------------------------------------------------------------------
# the three methods


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
        flop = flop_params(lm.model)
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
            per_tok = 2 * (flop.body + flop.head)
            print(
                f"dry run: {len(work.prompts)} prompts; ~{per_tok / 1e9:.3g} GFLOP per token fed; the study's "
                f"{work.req_tokens:,} context+continuation tokens = {per_tok * work.req_tokens / 1e12:.3g} TFLOP "
                "if every request ran in full"
            )
            return []
        hflm = make_hflm(lm, args.batch_size)
        model_stats = {
            "describe": describe,
            "flop_params": flop,
            "flop_params_8b": shape_flop_params("llama3-8b"),
        }
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
            results[m].model_times.append(count.model_s)
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
