"""Benchmark: batched span patching against TransformerLens `run_with_hooks`, one run.

Usage (from the repository root)::

    python -m scripts.bench_patching                  # table -> results/benchmarks/patching_cpu.md
    python -m scripts.bench_patching --quick --out -  # smoke run (small organism, 6 pairs)
    python -m scripts.bench_patching --scale small --pairs 32

Workload: the model organism (`--scale`, cached build), rating question, `--pairs` actor
pairs x every site (`blocks.*.hook_resid_pre|attn_out|mlp_out|resid_post`) x position
`span_last`, denoising (clean activation into the corrupt prompt). Both sides read the answer
distribution with the same contract (full-vocab float32 softmax at the last token, variants
summed, renormalized over the options) and report each patched forward's expected score.

- workbench: `patch_factor`, everything included (rendering, pairs, spans, readers): clean
  forwards once per prompt with every site, the residual stream and the keys/values kept,
  then batched patched forwards that resume at the site's block and the first patched token
  (`workbench.interp.resume_forward`); logits at the answer only.
- baseline: a TransformerLens `TransformerBridge` over a second copy of the model; per pair
  `run_with_cache` of the source (the sites only) and of the target, then per site one
  `run_with_hooks` forward of the target with a hook writing the source's span-last vector.

Check: the two sides' patched expected scores and TVs agree within 1e-5 (float32); each row
names the code path that ran (the workbench counts its forwards and how many resumed, the
baseline its hook calls).
Timings are the best of `--repeats` interleaved runs after a warm-up, `--threads` torch threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=("small", "default"), default="default")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small organism, 6 pairs, 1 repeat")
    p.add_argument("--out", default="results/benchmarks/patching_cpu.md", help="'-': stdout only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = _args(argv)
    if args.quick:
        args.scale, args.pairs, args.repeats = "small", 6, 1
    import torch

    torch.set_num_threads(args.threads)
    from workbench.engine.models import load_bridge, load_model
    from workbench.interp import patching as PT
    from workbench.interp import readers as readers_mod
    from workbench.interp.pairs import factor_pairs
    from workbench.organism.build import build_organism
    from workbench.runs import short_git_hash, versions

    code = short_git_hash()  # at the start: the code the run uses
    from workbench.study import prompts as P
    from workbench.study.load import load_study
    from workbench.study.spans import factor_spans

    load_before = os.getloadavg()[0]
    folder = build_organism(scale=args.scale, progress=False)
    study = load_study(folder / "study.yaml")
    lm = load_model(folder / "model", dtype="float32", device="cpu")
    n_layers = lm.model.config.num_hidden_layers
    config = PT.PatchConfig(
        sites=("blocks.*.hook_resid_pre", "blocks.*.hook_attn_out", "blocks.*.hook_mlp_out",
               "blocks.*.hook_resid_post"),
        positions=("span_last",), directions=("denoising",), questions=("rating",),
        max_pairs=args.pairs, batch_size=args.batch_size, n_boot=10, progress=False,
    )  # fmt: skip
    sites = [s.name for s in PT.resolve_sites(config.sites, n_layers)]
    prompts = P.render(study, lm.tokenizer)
    by_id = {p.prompt_id: p for p in prompts}
    pairs = factor_pairs(study, prompts, "actor", questions=["rating"], max_pairs=args.pairs)
    spans = {pid: s for pid, ss in factor_spans(study, prompts, lm.tokenizer, ["actor"]).items()
             for s in ss}  # fmt: skip
    readers = {
        i: readers_mod.reader(study, lm, by_id[i]) for pr in pairs for i in (pr.clean, pr.corrupt)
    }
    bridged = load_model(folder / "model", dtype="float32", device="cpu")
    bridge = load_bridge(bridged)
    hook_calls = [0]

    def workbench() -> dict[tuple[int, str], tuple[float, float]]:
        res = PT.patch_factor(study, lm, "actor", None, config)
        counts = res.manifest["counts"]
        workbench.forwards = counts["patched_forwards"]  # type: ignore[attr-defined]
        workbench.resumed = counts["resumed_forwards"]  # type: ignore[attr-defined]
        t = res.patched
        return {
            (int(pid), str(site)): (float(score), float(tv))
            for pid, site, score, tv in zip(
                t["pair_id"], t["site"], t["patched_score"], t["tv_source"], strict=True
            )
        }

    def dist(logits: torch.Tensor, pid: int) -> torch.Tensor:
        lp = torch.log_softmax(logits[0, -1].float(), -1)[None]
        return readers_mod.distributions(lp, [readers[pid]], study.scoring.aggregate)[0]

    @torch.inference_mode()
    def baseline() -> dict[tuple[int, str], tuple[float, float]]:
        out = {}
        for pr in pairs:
            src, tgt = by_id[pr.clean], by_id[pr.corrupt]
            s_ids, t_ids = torch.tensor([src.input_ids]), torch.tensor([tgt.input_ids])
            s_logits, cache = bridge.run_with_cache(s_ids, names_filter=sites)
            q_s = dist(s_logits, src.prompt_id)
            s_pos, t_pos = spans[src.prompt_id].token_end - 1, spans[tgt.prompt_id].token_end - 1
            for site in sites:
                vec = cache[site][0, s_pos].clone()

                def hook(
                    act: torch.Tensor, hook: object, vec: torch.Tensor = vec, t_pos: int = t_pos
                ) -> torch.Tensor:
                    hook_calls[0] += 1
                    act = act.clone()
                    act[0, t_pos] = vec
                    return act

                logits = bridge.run_with_hooks(t_ids, fwd_hooks=[(site, hook)])
                q_p = dist(logits, tgt.prompt_id)
                values = readers[tgt.prompt_id].values
                assert values is not None  # the rating question is ordinal
                score = float(q_p @ values)
                out[(pr.pair_id, site)] = (score, 0.5 * float((q_p - q_s).abs().sum()))
        return out

    methods = {"TransformerLens run_with_hooks": baseline, "workbench patch_factor": workbench}
    times: dict[str, list[float]] = {m: [] for m in methods}
    results = {}
    for fn in methods.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t)
    ours, theirs = results["workbench patch_factor"], results["TransformerLens run_with_hooks"]
    assert set(ours) == set(theirs), "the two sides patched different (pair, site) grids"
    d_score = max(abs(ours[k][0] - theirs[k][0]) for k in ours)
    d_tv = max(abs(ours[k][1] - theirs[k][1]) for k in ours)
    best = {m: min(v) for m, v in times.items()}
    ratio = best["TransformerLens run_with_hooks"] / best["workbench patch_factor"]
    n_rows = len(ours)
    calls_per_run = hook_calls[0] // (args.repeats + 1)
    load_after = os.getloadavg()[0]
    v = versions()
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Patching benchmark: batched span patching vs TransformerLens run_with_hooks",
        "",
        f"- Command: `python -m scripts.bench_patching {cmd}`".rstrip(),
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {os.cpu_count()} CPU cores, torch threads {args.threads}; 1-min load average {load_before:.2f} before, {load_after:.2f} after",
        f"- Versions: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, transformer-lens {v['transformer-lens']}; git {code}",
        f"- Model: the {args.scale} model organism ({n_layers} layers, d_model {lm.model.config.hidden_size}, {sum(p.numel() for p in lm.model.parameters()):,} parameters, float32, cpu)",
        f"- Grid: {len(pairs)} actor pairs (rating) x {len(sites)} sites x span_last, denoising = {n_rows} patched forwards; batch size {args.batch_size}",
        f"- Best of {args.repeats} interleaved repeats after a warm-up (s): "
        + "; ".join(f"{m} {' '.join(f'{t:.3f}' for t in ts)}" for m, ts in times.items()),
        "",
        "| method | time | ratio (baseline / method) | path check | max \\|Δ\\| vs baseline |",
        "|---|---:|---:|---|---|",
        f"| TransformerLens run_with_hooks | {best['TransformerLens run_with_hooks']:.3f} s | 1.00x | {calls_per_run} hook calls per run (one per pair x site) + {len(pairs)} run_with_cache | - |",
        f"| workbench patch_factor | {best['workbench patch_factor']:.3f} s | {ratio:.2f}x | {workbench.forwards} forward rows per run ({n_rows} patched, {workbench.resumed} of them resumed at the site's block and first patched token; {workbench.forwards - n_rows} clean), batched | expected score {d_score:.1e}, TV to source {d_tv:.1e} |",  # type: ignore[attr-defined]
        "",
        "Baseline: per pair, `run_with_cache` of the source on a `TransformerBridge` over a second "
        "copy of the model (booting rewires the model in place and forces eager attention), then "
        "one `run_with_hooks` forward of the target per site with a hook writing the source's "
        "span-last vector; full logits, softmax at the last token. Workbench: "
        "`workbench.interp.patching.patch_factor` (rendering, pairs, spans and option readers "
        "included in its time; the baseline is handed these), clean forwards once per prompt "
        "keeping the residual stream and keys/values, then batched patched forwards that "
        "compute only the blocks from the site's on and the tokens from the patched token on "
        "(`workbench.interp.resume_forward`; equal to the full patched forward within 1e-6, "
        "tests/integration/test_patching.py), logits at the answer position only.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    if max(d_score, d_tv) > 1e-5:
        print("the two methods differ by more than 1e-5", file=sys.stderr)
    return {"ratio": ratio, "max_diff": max(d_score, d_tv), "rows": n_rows,
            "hook_calls": calls_per_run, "resumed": workbench.resumed}  # type: ignore[attr-defined]  # fmt: skip


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["max_diff"] <= 1e-5 else 1)
