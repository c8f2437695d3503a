"""The distributions benchmark's checks and report: path checks per method, the per-cell and
matrix markdown tables, machine and version lines. Used by `scripts.bench_distributions`."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.bench_distributions_setup import Counter, Workload
from workbench.engine.scoring import Request
from workbench.runs import short_git_hash

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
"""Max |delta log-prob| allowed against lm-eval in float32."""
METHODS = ("naive", "lm-eval", "workbench-rows", "workbench")


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
    model_times: list[float] = field(default_factory=list)
    """Per repeat: seconds inside the model's forwards (`Counter.model_s`)."""

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def best_model(self) -> float:
        """Seconds inside the model's forwards in the best repeat."""
        return self.model_times[self.times.index(self.best)]


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

    def bound(self, name: str = "workbench") -> float:
        """lm-eval's best time / `name`'s time inside the model's forwards: its speed if all
        its own work outside the model (rendering, tokenization, batching, tables) took none."""
        return self.results["lm-eval"].best / self.results[name].best_model

    def per_position(self, name: str = "workbench") -> float:
        """Positions fed per second by `name` against lm-eval's."""
        a, b = self.results[name], self.results["lm-eval"]
        return (a.count.positions / a.best) / (b.count.positions / b.best)

    def flops(self, name: str, at: str = "flop_params") -> int:
        """Matmul FLOPs `name` ran (`FlopParams.flops`), priced with `model_stats[at]`."""
        return int(self.model_stats[at].flops(self.results[name].count))

    def flop_ratio(self, name: str = "workbench", at: str = "flop_params") -> float:
        """lm-eval's FLOPs / `name`'s: `name`'s speed if both ran their FLOPs equally fast."""
        return self.flops("lm-eval", at) / self.flops(name, at)

    def per_flop(self, name: str = "workbench") -> float:
        """FLOPs per second of `name` against lm-eval's (speed / FLOP ratio)."""
        return self.ratio(name) / self.flop_ratio(name)

    def flop_ratio_8b(self, name: str = "workbench") -> float:
        """`flop_ratio` with the same positions fed, rows read and positions skipped, priced
        at Llama-3-8B's parameter counts: the speed to expect on a model that size, where
        matmuls dominate and run about equally fast for both."""
        return self.flop_ratio(name, "flop_params_8b")


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


def machine(device: torch.device) -> str:
    text = f"{os.cpu_count()} CPU cores (nproc), {cpu_model()}, torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def render_table(report: BenchReport) -> list[list[str]]:
    args = report.args
    base = report.results["lm-eval"].best
    header = [
        "method",
        "best s",
        "prompts/s",
        "req tok/s",
        "fed tok/s",
        "speed vs lm-eval",
        "in model forwards",
        "max |Δ logprob| vs lm-eval",
    ]
    cuda = args.device.startswith("cuda")
    header += ["TFLOP/s", f"% of {args.peak_tflops:g} TFLOP/s"] if cuda else ["GFLOP/s"]
    rows = [header]
    for name in [m for m in METHODS if m in report.results]:
        r = report.results[name]
        t = r.best
        flops = report.flops(name)
        delta = report.max_delta.get(f"{name} vs lm-eval", 0.0)
        row = [
            name,
            f"{t:.3f}",
            f"{report.n_prompts / t:.1f}",
            f"{report.req_tokens / t:,.0f}",
            f"{r.count.positions / t:,.0f}",
            f"{base / t:.2f}x",
            f"{r.best_model:.3f} s ({100 * r.best_model / t:.0f}%)",
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
        + f"; git {short_git_hash()}",
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
    flop = report.model_stats["flop_params"]
    return [
        "`req tok/s`: the study's context+continuation tokens per second (the same numerator for every method). "
        "`fed tok/s`: positions actually run through the model per second, padding included (counted with a hook). "
        "FLOPs: the matmul work each method really ran, 2 x (body parameters x positions fed + unembedding "
        "parameters x rows unembedded - last-block parameters x positions where the workbench skipped them) "
        f"(body {flop.body:,}, unembedding {flop.head:,}, last block's query and output projections and MLP "
        f"{flop.read_only:,}; attention scores ignored). The workbench runs those last-block modules, and the last "
        "block's attention, only at the read positions (`workbench.engine.readout`; about a fifth of this 4-layer "
        "model's matmul work per position, ~1/layers of it in general); the skipped positions are counted while it "
        "runs. `FLOPs lm-eval / workbench`: the workbench's speed if both ran their FLOPs equally fast; "
        "`per FLOP`: the speed divided by it (above 1x: the workbench also runs each FLOP faster). "
        "naive: one plain HF forward of context+continuation per (prompt, option), float32 log_softmax. "
        "lm-eval: `HFLM(pretrained=<the loaded model>, add_bos_token=True, softmax_dtype=float32).loglikelihood` "
        "(its defaults otherwise; `add_bos_token` makes its encoding equal the workbench's, `softmax_dtype` is a "
        "no-op for a float32 model). "
        "workbench: `compute_distributions(study, lm, out_dir=None)` including rendering, tokenization and the summary tables "
        "(every persona prefix run once, all of them in one padded batch; each prompt's question suffix run once with all "
        "its options packed as a token tree under a 4D attention mask, rows of several personas in one forward, each "
        "reading its own persona's KV cache; on CPU, grouped-query attention without copying keys and values, "
        "`workbench.engine.attention`). workbench-rows: the same with `DistributionConfig(pack_options=False)` "
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
            "FLOPs lm-eval / workbench",
            "per FLOP vs lm-eval",
            "FLOPs lm-eval / workbench at Llama-3-8B shape",
            "workbench in model forwards",
            "bound: lm-eval s / workbench model s",
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
                f"{r.flop_ratio():.2f}x",
                f"{r.per_flop():.2f}x",
                f"{r.flop_ratio_8b():.2f}x",
                f"{100 * wb.best_model / wb.best:.0f}%",
                f"{r.bound():.2f}x",
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
        f"FLOPs lm-eval / workbench {min(r.flop_ratio() for r in reports):.2f}x to "
        f"{max(r.flop_ratio() for r in reports):.2f}x and per FLOP {min(r.per_flop() for r in reports):.2f}x to "
        f"{max(r.per_flop() for r in reports):.2f}x; the same FLOPs at Llama-3-8B shape "
        f"{min(r.flop_ratio_8b() for r in reports):.2f}x to {max(r.flop_ratio_8b() for r in reports):.2f}x; "
        f"bound at zero overhead outside the model {min(r.bound() for r in reports):.1f}x to "
        f"{max(r.bound() for r in reports):.1f}x; "
        f"from median times {min(r.median_ratio() for r in reports):.1f}x to "
        f"{max(r.median_ratio() for r in reports):.1f}x",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(rows[0]))) + "|",
        *("| " + " | ".join(r) + " |" for r in rows[1:]),
        "",
        "`speed vs lm-eval`: lm-eval's best time / the workbench's (the whole call: rendering, tokenization, "
        "scoring, tables); `(medians)`: the same from the median times. `per position`: positions fed per second, workbench / lm-eval (what the speed would be "
        "at equal positions fed). `at Llama-3-8B shape`: the FLOPs each method ran in this cell (the same positions fed, rows "
        "unembedded and last-block positions skipped, with this benchmark's tokenizer) priced at Llama-3-8B's parameter counts (body, unembedding and last-block "
        "parameters read off a model built on the meta device): on a model that size, where the matmuls dominate and run about "
        "equally fast for both, it is the speed to expect. It is lower than this tiny model's ratio because here the "
        "unembedding, which lm-eval runs at every position, and the last block, which the workbench skips, are larger "
        "shares of the work. `in model forwards`: the share of the workbench's best time spent inside the model's body and "
        "unembedding forwards (timed with forward hooks); `bound`: lm-eval's best time / the workbench's time inside those "
        "forwards, the speed it would reach if all of its own work outside the model took no time. Every cell's full table follows.",
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


def max_abs(a: np.ndarray | None, b: np.ndarray | None) -> float:
    assert a is not None and b is not None and a.shape == b.shape
    return float(np.max(np.abs(a - b)))
