"""Sampled and verbalized answer distributions (docs/MEASUREMENT.md §3): `workbench sample`.

N completions per prompt, each parsed into an option, a refusal or "unparseable" (never
dropped; see `workbench.measure.answers`), counted into a sampled distribution; beside the counts,
the *answer-position* estimate: for every sample whose text reaches its answer, the exact
option distribution at that position, averaged over samples.

**The engine** (`workbench.measure.decoding`): each prompt is prefilled once (HF
`generate(num_return_sequences=N)` prefills it N times); a wave of `batch_rows // n` prompts
decodes together with one forward row per distinct generated prefix, not per sample (the
samples of a row draw from its one distribution and split it where their tokens differ);
completions leave at EOS, at `max_new_tokens`, or as soon as their answer is parsed. Float32
softmax(logits / temperature), HF's top-p rule, inverse-CDF draws whose uniforms depend only
on (seed, prompt id, sample, step) (`decoding.uniforms`): batch size, wave size, world size,
resume points and out-of-memory retries (`runs.retry_on_oom` halves the prompts decoded
together; the manifest's `out_of_memory` lists each halving) never change a draw. The same
waves give the same numbers bit for bit; other batch shapes move float32 logits in their
last bits, so the stored probabilities may differ by ~1e-7 (and a token only if a uniform
falls within that of a CDF boundary).

**Answer-position distributions (Rao-Blackwellization).** For every sample whose text reaches
its answer, the exact option distribution at the answer's token is read by teacher forcing
(from the decoding step itself when the answer, or its one-token continuation, is a candidate
token; else by batched forwards that continue the wave's prompt cache; see
`workbench.measure.answer_position`). Per sample we store the sampling distribution at the slot (temperature and top-p applied,
renormalized over the options of the kind of surface the answer used) and the raw
temperature-1 option log-probs. Their mean over samples estimates the sampled answer
distribution without bias: conditional on the prefix and on an option being written at this
slot, the option drawn follows exactly that renormalized distribution. It has far less
variance than counting (see `estimator_accuracy`).

**Verbalized** (`sampling.verbalized: true` in the study): every question gets the study's
`sampling.instruction` (a request for a JSON object of percentages per option); each sample
is parsed by `workbench.measure.answers.parse_verbalized`, failures are counted with their reason,
and the distribution is the mean of the valid stated distributions.

Outputs (run folder, resumable like `workbench distributions`, manifest written last):
`prompts.parquet`, `samples.parquet` (one row per sample), `sampled_distributions.parquet`
(per prompt and option: count, prob, prob_answer_position and the per-prompt counts).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from workbench import distributed
from workbench.engine.models import LoadedModel
from workbench.errors import WorkbenchError
from workbench.measure import answer_position as A
from workbench.measure import decoding as D
from workbench.measure.answers import REFUSAL_PHRASES, verbalized_example
from workbench.measure.sample_tables import sampled_distributions, wave_samples
from workbench.runs import MANIFEST, PROMPTS, RunFolder, announce_resume, retry_on_oom
from workbench.study import prompts as P
from workbench.study.spec import Study

DRAWS = "uniforms per (seed, prompt id): PCG64, u[sample, step]"
"""The seeding scheme (in the run identity: a run folder sampled under another is refused)."""
SAMPLES = "samples"
SAMPLED = "sampled_distributions"
TABLES = (SAMPLES, SAMPLED)


@dataclass(frozen=True)
class SamplingConfig:
    """Settings of a sampling run (written to the manifest)."""

    n: int = 100
    """Completions per prompt."""
    temperature: float = 1.0
    top_p: float = 1.0
    """HF's rule: keep the most likely tokens whose cumulative probability reaches top_p."""
    max_new_tokens: int | None = None
    """Default: 24 for answers, 160 for verbalized JSON."""
    seed: int = 0
    batch_rows: int = 2048
    """Decoding rows per wave (prompts per wave = max(1, batch_rows // n), fewer when the
    wave's KV cache would exceed `decoding.WAVE_CACHE_BYTES`; the manifest records it). It
    changes no draw, only speed and memory (rows that share a prefix share one row)."""
    constrain: bool = False
    """Guided choice: the first token is drawn among the options' single-token label forms
    only. At temperature 1 its distribution is then exactly the logit distribution."""
    verbalized: bool | None = None
    """None: the study's `sampling.verbalized`."""
    answer_position: bool = True
    """Record the answer-position (teacher-forced) distribution of every sample."""
    chunk_prompts: int = 256
    """Prompts per chunk written to disk (rounded up to whole waves)."""
    progress: bool = True

    def validate(self) -> None:
        checks = (
            (self.n >= 1, "--n must be at least 1", "pass a positive number of samples"),
            (
                self.temperature > 0 and math.isfinite(self.temperature),
                f"--temperature must be > 0, got {self.temperature}",
                "use a small positive value (e.g. 0.01) for near-greedy decoding",
            ),
            (
                0 < self.top_p <= 1,
                f"--top-p must be in (0, 1], got {self.top_p}",
                "use 1 to disable",
            ),
            (
                self.max_new_tokens is None or self.max_new_tokens >= 1,
                "--max-new-tokens must be at least 1",
                "pass a positive number",
            ),
            (self.batch_rows >= 1, "--batch-rows must be at least 1", "pass a positive number"),
            (
                self.chunk_prompts >= 1,
                "--chunk-prompts must be at least 1",
                "pass a positive number",
            ),
        )
        for ok, message, fix in checks:
            if not ok:
                raise WorkbenchError(message, fix=fix)


@dataclass
class SamplingResult:
    """The tables of a sampling run (see README "Sampling" for every column)."""

    prompts: pd.DataFrame
    samples: pd.DataFrame
    sampled_distributions: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


# --------------------------------------------------------------------------------------------
# verbalized prompts


def verbalized_study(study: Study) -> Study:
    """The same study with the verbalized instruction appended to every question's text.

    Prompts are still rendered by `workbench.study.prompts.render` (the only renderer); the
    instruction's `{example}` and `{labels}` are filled per question (canonical order).
    """
    raw = copy.deepcopy(dict(study.raw))
    raw_questions = {str(q["id"]): q for q in raw["questions"]}
    raw["questions"] = [raw_questions[q.id] for q in study.questions]
    questions = []
    for q_raw, question in zip(raw["questions"], study.questions, strict=True):
        order = tuple(range(len(question.all_options)))
        labels = [question.label_at(p, question.all_options[o]) for p, o in enumerate(order)]
        instruction = study.sampling.instruction.format(
            example=verbalized_example(question, order), labels=", ".join(labels)
        )
        text = f"{question.text} {instruction.replace('{', '{{').replace('}', '}}')}"
        q_raw["text"] = text
        questions.append(dataclasses.replace(question, text=text))
    # Cells and factors stay as given (a caller may have narrowed them).
    return dataclasses.replace(study, questions=tuple(questions), raw=raw)


# --------------------------------------------------------------------------------------------
# the run


def conventions(
    study: Study, config: SamplingConfig, verbalized: bool, max_new: int, per_wave: int = 0
) -> dict[str, Any]:
    """Every convention of a sampling run, spelled out for the manifest."""
    return {
        "elicitation": "verbalized" if verbalized else "answer",
        "sampling": "float32 softmax(logits / temperature), HF top-p rule, inverse-CDF draws",
        "seeding": "per prompt, a numpy PCG64 stream seeded with the first 16 bytes "
        "(little-endian) of sha256('workbench-sample/{seed}/{prompt_id}'); the uniform of "
        "sample s at step t is its float32 draw s * max_new_tokens + t: no batch size, wave, "
        "world size, resume point or out-of-memory retry changes a draw, and samples 0..N-1 "
        "of a run with more samples are the same",
        "prefix_sharing": "one forward row per distinct (prompt, generated prefix); its samples "
        "draw with their own uniforms from its one distribution",
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": max_new,
        "prompts_per_wave": per_wave,
        "wave_rule": "batch_rows // n, lowered so a wave's KV cache stays under "
        f"{D.WAVE_CACHE_BYTES >> 20} MiB",
        "constrained_first_token": config.constrain,
        "stop": "EOS, max_new_tokens, or the first final parse (answer followed by a character)",
        "parser": {
            "custom_pattern": study.sampling.pattern,
            "refusal_patterns": [*REFUSAL_PHRASES, *study.sampling.refusal_patterns],
            "order": "custom pattern > answer phrase / answer at start (earliest) > refusal "
            "phrase > single option mentioned (end of text only)",
        },
        "prob": "count / substantive answers; refusal options excluded (null)",
        "prob_answer_position": "mean over samples of the sampling distribution at the answer "
        "slot (teacher-forced; same surface kind as the answer; variants summed), "
        "renormalized over substantive options",
        "verbalized": {
            "instruction": study.sampling.instruction,
            "prob": "mean of valid stated distributions, renormalized over substantive options",
        }
        if verbalized
        else None,
        "statuses": "ok | refusal (refusal option or refusal phrase) | unparseable; never dropped",
    }


def compute_samples(
    study: Study,
    lm: LoadedModel,
    out_dir: str | Path | None = None,
    config: SamplingConfig | None = None,
    *,
    overwrite: bool = False,
) -> SamplingResult:
    """Sample `config.n` completions for every prompt of `study`; write a run folder if asked.

    Re-running with the same `out_dir` resumes: finished prompts are not sampled again.
    """
    config = config or SamplingConfig()
    config.validate()
    t0 = time.time()
    verbalized = study.sampling.verbalized if config.verbalized is None else config.verbalized
    run_study = verbalized_study(study) if verbalized else study
    max_new = config.max_new_tokens or (160 if verbalized else 24)
    prompts = P.render(run_study, lm.tokenizer)
    P.validate_for_tokenizer(run_study, prompts, lm.tokenizer, None)
    if lm.max_length is not None:
        too_long = [p for p in prompts if len(p.input_ids) + max_new > lm.max_length]
        if too_long:
            raise WorkbenchError(
                f"prompt {too_long[0].prompt_id} is {len(too_long[0].input_ids)} tokens; with "
                f"{max_new} new tokens it exceeds the model's context ({lm.max_length})",
                fix="lower --max-new-tokens or shorten the prompt template",
            )
    plans = D.plan_prompts(run_study, prompts, lm.tokenizer, config.constrain)
    prompts_df = P.prompts_frame(run_study, prompts)
    eos = D.eos_ids(lm)
    per_wave = D.prompts_per_wave(lm, plans, config.n, config.batch_rows, max_new)
    waves = [plans[i : i + per_wave] for i in range(0, len(plans), per_wave)]
    waves_per_chunk = max(1, math.ceil(config.chunk_prompts / per_wave))

    run: RunFolder | None = None
    done: set[int] = set()
    if out_dir is not None:
        identity = {
            "kind": "sampling",
            "study": study.name,
            "prompts_fingerprint": P.prompts_fingerprint(prompts),
            "sampling_spec": asdict(study.sampling),
            # batch_rows is left out: it changes no draw (a resume may use another)
            "config": {
                k: v
                for k, v in asdict(config).items()
                if k not in ("progress", "chunk_prompts", "batch_rows")
            },
            "draws": DRAWS,
            "max_new_tokens": max_new,
            "verbalized": verbalized,
            "model": lm.name,
            "dtype": str(lm.dtype),
        }
        run = RunFolder(out_dir, identity, overwrite=overwrite)
        done = run.begin(prompts_df, SAMPLES)
        if config.progress and run.ranks.is_main:
            announce_resume(run.path, len(done), len(plans))

    # Whole waves go to ranks and to chunks: a wave is a fixed slice of the study's prompts,
    # so every rank, resume point and world size runs the same batches (bit for bit). The
    # draws depend only on (seed, prompt, sample, step): a smaller batch after an
    # out-of-memory error draws the same tokens.
    todo = [[p for p in w if p.prompt.prompt_id not in done] for w in waves]
    todo = [w for w in todo if w]  # whole waves when resumed with the same batch_rows
    skipped = len(plans) - sum(map(len, todo))
    if run is not None:
        todo = distributed.shard(todo, len, run.ranks)
    chunks = [todo[i : i + waves_per_chunk] for i in range(0, len(todo), waves_per_chunk)]
    bar = tqdm(
        total=skipped + sum(map(len, todo)),
        initial=skipped,
        desc="sampling",
        unit="prompt",
        disable=not config.progress,
    )
    record = config.answer_position and not verbalized

    def sample_wave(size: int, wave: list[D.Plan]) -> pd.DataFrame:
        """The wave's samples, decoded `size` prompts at a time."""
        frames = []
        for start in range(0, len(wave), size):
            part = wave[start : start + size]
            rows, records = D.run_wave(lm, part, config, max_new, verbalized, eos)
            slots = A.answer_positions(lm, part, rows, records, config) if record else None
            del records  # the prompt cache: free it before the next prefill
            frames.append(wave_samples(part, rows, slots, config.n, verbalized))
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    collected: list[pd.DataFrame] = []
    oom: list[dict[str, Any]] = []
    batch = per_wave
    t_sample = time.time()
    for chunk in chunks:
        frames = []
        for wave in chunk:
            frame, batch = retry_on_oom(partial(sample_wave, wave=wave), batch, oom, "sampling")
            frames.append(frame)
            bar.update(len(wave))
        frame = pd.concat(frames, ignore_index=True)
        if run is not None:
            chunk_prompts = [p.prompt for wave in chunk for p in wave]
            dist = sampled_distributions(run_study, chunk_prompts, frame, verbalized)
            run.write_chunk({SAMPLES: frame, SAMPLED: dist})
        else:
            collected += [frame]
    bar.close()
    t_sample = time.time() - t_sample
    if run is not None and not run.ranks_done():
        run.wait_for_finish()
        _, prompts_df, samples, dist = load_sampling_run(run.path)
        manifest = json.loads((run.path / MANIFEST).read_text())
        return SamplingResult(prompts_df, samples, dist, manifest, run.path)

    if run is not None:
        samples = run.read_chunks(SAMPLES)
    else:
        samples = pd.concat(collected, ignore_index=True) if collected else pd.DataFrame()
    samples = samples.sort_values(["prompt_id", "sample"], kind="stable").reset_index(drop=True)
    dist = sampled_distributions(run_study, prompts, samples, verbalized)
    status_counts = samples["status"].value_counts().to_dict() if len(samples) else {}
    manifest = {
        "kind": "sampling",
        "elicitation": "verbalized" if verbalized else "answer",
        "study": {"name": study.name, "path": study.path, "definition": dict(run_study.raw)},
        "conventions": conventions(study, config, verbalized, max_new, per_wave),
        "config": asdict(config),
        "model": lm.describe(),
        "seed": config.seed,
        "counts": {
            "prompts": len(prompts),
            "samples": len(samples),
            "resumed_prompts": len(done),
            **{f"status_{k}": int(v) for k, v in status_counts.items()},
        },
        "out_of_memory": oom,
        "timings_s": {
            "sample": round(t_sample, 3),
            "total": round(time.time() - t0, 3),
        },
    }
    result = SamplingResult(prompts_df, samples, dist, manifest)
    if run is not None:
        run.write_table(SAMPLES, samples)
        run.write_table(SAMPLED, dist)
        run.finish(manifest)
        result.out_dir = run.path
    return result


# --------------------------------------------------------------------------------------------
# how many samples each estimator needs


def estimator_accuracy(
    samples: pd.DataFrame,
    reference: dict[int, np.ndarray],
    ns: Sequence[int] = (1, 2, 5, 10, 20, 50, 100),
    *,
    n_rep: int = 20,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean TV to `reference` of the counting and the answer-position estimators from n samples.

    `reference[prompt_id]`: the distribution both estimate ([substantive option]). For each
    n, `n_rep` random subsets of n samples per prompt (without replacement) give both
    estimates; a prompt whose subset has no substantive answer is left out of that n.
    Returns columns n, estimator (count | answer_position), mean_tv, n_prompts.
    """
    from workbench.compare.metrics import total_variation

    rng = np.random.default_rng(seed)
    out = []
    groups = dict(tuple(samples.groupby("prompt_id", sort=True)))
    for n in ns:
        tv_count: list[float] = []
        tv_rb: list[float] = []
        for pid, ref in reference.items():
            grp = groups.get(pid)
            if grp is None or len(grp) < n:
                continue
            k = len(ref)
            options = grp["option_id"].to_numpy(dtype="float64", na_value=np.nan)
            slots = np.array(
                [
                    np.asarray(p)[:k] if p is not None else np.full(k, np.nan)
                    for p in grp["answer_probs"]
                ]
            )
            for _ in range(n_rep):
                pick = rng.choice(len(grp), size=n, replace=False)
                opts = options[pick]
                opts = opts[~np.isnan(opts) & (opts < k)].astype(int)
                if opts.size:
                    tv_count.append(
                        float(total_variation(np.bincount(opts, minlength=k) / opts.size, ref))
                    )
                rows = slots[pick]
                rows = rows[~np.isnan(rows).any(1)]
                if len(rows):
                    mean = rows.mean(0)
                    tv_rb.append(float(total_variation(mean / mean.sum(), ref)))
        for name, values in (("count", tv_count), ("answer_position", tv_rb)):
            out.append(
                {
                    "n": n,
                    "estimator": name,
                    "mean_tv": float(np.mean(values)) if values else float("nan"),
                    "n_draws": len(values),
                }
            )
    return pd.DataFrame(out)


def samples_needed(curve: pd.DataFrame, target_tv: float) -> pd.DataFrame:
    """Per estimator, the samples per prompt needed for a mean TV of at most `target_tv`.

    Interpolated on log n between the measured points; beyond the largest n measured it is
    extrapolated with the 1/sqrt(n) law of sampling noise (`how` says which).
    """
    rows = []
    for name, grp in curve.groupby("estimator"):
        grp = grp.dropna(subset=["mean_tv"]).sort_values("n")
        if grp.empty:
            continue
        ns, tvs = grp["n"].to_numpy(float), grp["mean_tv"].to_numpy(float)
        hit = np.nonzero(tvs <= target_tv)[0]
        if hit.size and hit[0] == 0:
            value, how = ns[0], "measured"
        elif hit.size:
            i = int(hit[0])
            f = (tvs[i - 1] - target_tv) / (tvs[i - 1] - tvs[i])
            value = float(np.exp(np.log(ns[i - 1]) + f * (np.log(ns[i]) - np.log(ns[i - 1]))))
            how = "interpolated"
        else:
            value, how = float(ns[-1] * (tvs[-1] / target_tv) ** 2), "extrapolated (1/sqrt(n))"
        rows.append({"estimator": str(name), "target_tv": target_tv, "n_needed": value, "how": how})
    return pd.DataFrame(rows)


def load_sampling_run(
    path: str | Path,
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(manifest, prompts, samples, sampled_distributions) of a finished sampling run."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise WorkbenchError(
            f"{path}: no manifest.json (the run did not finish, or this is not a run folder)",
            fix="re-run the same `workbench sample` command to finish it",
        )
    manifest = json.loads(manifest_path.read_text())
    return (
        manifest,
        pd.read_parquet(path / PROMPTS),
        pd.read_parquet(path / f"{SAMPLES}.parquet"),
        pd.read_parquet(path / f"{SAMPLED}.parquet"),
    )
