"""Activation capture: residual-stream and sublayer vectors at the answer position and at each
factor's token span, stored as safetensors shards plus a parquet index.

Sites use TransformerLens hook names, so results read the same for every architecture:

    hook_embed                    token embeddings (HF `get_input_embeddings()` output)
    blocks.{l}.hook_resid_pre     residual stream entering block l
    blocks.{l}.hook_attn_out      the attention module's output (its residual contribution)
    blocks.{l}.hook_mlp_out       the MLP module's output
    blocks.{l}.hook_resid_post    residual stream leaving block l (HF decoder layer output)

Patterns such as `blocks.*.hook_resid_post` are matched with `fnmatch`.

Positions (docs/MEASUREMENT.md §5):

- `answer`: the last prompt token, whose next-token distribution is the answer distribution.
- `span_mean` / `span_last`: the mean over / the last of the tokens that overlap a factor
  value's characters in the prompt text, found from the tokenizer's offset mapping (the
  leading-space token " Mara" of "starring Mara Quinlan" is included). Where a value occurs
  more than once in a prompt, the last occurrence is used (the one nearest the answer).
  Character spans are exact (`workbench.study.spans.factor_spans`): a value that also appears in
  fixed template text, or inside another value, is never mistaken for the factor.

Traps (every one tested in tests/integration/test_activations.py):

- HF's `output_hidden_states[-1]` is taken *after* the final norm (Llama, GPT-2, ...), while
  `blocks.{L-1}.hook_resid_post` is before it, as in TransformerLens; the other
  `hidden_states[l + 1]` equal `blocks.{l}.hook_resid_post`.
- `hook_embed` equals `hidden_states[0]` only for models without learned absolute position
  embeddings (Llama yes; GPT-2 adds `wpe`, which TransformerLens calls `hook_pos_embed`).
- The default `hf` backend reads module outputs. For pre-norm blocks (Llama, Mistral, Qwen,
  GPT-2) attention and MLP outputs are exactly TransformerLens's `hook_attn_out` and
  `hook_mlp_out`; architectures with post-sublayer norms (Gemma 2/3) differ, and
  `backend="bridge"` takes the bridge's own hook points instead.
- Memory grows with layers x kept positions x d_model, not with the sequence: each hook
  reduces its [batch, pos, d_model] output to [batch, kept, d_model] at once (a
  [batch, kept, pos] weight matrix: one-hot rows for `answer` / `span_last`, 1/n rows for
  `span_mean`), and the forward stops after the deepest requested site.
- Rows are right-padded: pads come after every real token, so causal attention never lets a
  pad change a real position, and positions stay 0..n-1.
- float16 storage overflows above 65504 (some models carry residual outliers that large):
  a shard that would overflow is refused with the fix (`store_dtype="float32"`).

Layout of an activations run folder (`workbench.runs` owns the file names):

    run.json, prompts.parquet            as for every run folder
    chunks/NNNNN/index.parquet           the chunk's rows (kept: the chunks are the shards)
    chunks/NNNNN/activations.safetensors `vectors` [row, d_model] in the storage dtype
    index.parquet                        every stored vector: prompt_id, persona_id,
                                         question_id, permutation, one column per factor,
                                         site, site_kind, layer (-1 = hook_embed), position,
                                         factor (the span's factor; null at `answer`),
                                         token_start, token_end, shard, row
    manifest.json                        written last
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from workbench import distributed
from workbench.errors import WorkbenchError
from workbench.interp.sites import (
    POSITION_KINDS,
    Backend,
    Capturer,
    Site,
    Slot,
    batches,
    prompt_slots,
    reduction_weights,
    resolve_sites,
)
from workbench.runs import (
    ACTIVATION_INDEX,
    ACTIVATION_SHARD,
    CHUNKS,
    PROMPTS,
    RunFolder,
    announce_resume,
    retry_on_oom,
)
from workbench.study import prompts as P
from workbench.study.spans import factor_spans
from workbench.study.spec import Study

if TYPE_CHECKING:
    from workbench.engine.models import LoadedModel

STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
FLOAT16_MAX = 65504.0


# --------------------------------------------------------------------------------------------
# runs


@dataclass(frozen=True)
class ActivationConfig:
    """Settings of an activations run (written to the manifest)."""

    sites: tuple[str, ...] = ("blocks.*.hook_resid_post",)
    """TransformerLens site names or fnmatch patterns."""
    positions: tuple[str, ...] = POSITION_KINDS
    factors: tuple[str, ...] | None = None
    """Factors whose spans are kept (None: every factor of the study)."""
    questions: tuple[str, ...] | None = None
    """Question ids to capture (None: all)."""
    store_dtype: str = "float16"
    batch_size: int = 16
    chunk_prompts: int = 256
    """Prompts per shard (what a crash can lose at most)."""
    backend: Backend = "hf"
    progress: bool = True


def disk_estimate(n_vectors: int, d_model: int, store_dtype: str) -> int:
    """Bytes of the shards (the parquet index adds roughly 100 bytes per vector)."""
    return n_vectors * d_model * STORE_DTYPES[store_dtype].itemsize


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@dataclass
class ActivationStore:
    """A finished activations run: its index and lazy access to the stored vectors."""

    path: Path
    index: pd.DataFrame
    prompts: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> ActivationStore:
        import json

        from workbench.runs import MANIFEST

        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise WorkbenchError(
                f"{path} is not a finished activations run (no {MANIFEST})",
                fix="run `workbench activations ... --out DIR` (re-running resumes it)",
            )
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("kind") != "activations":
            raise WorkbenchError(
                f"{path} holds a {manifest.get('kind')!r} run, not activations",
                fix="pass the --out folder of `workbench activations`",
            )
        return cls(
            path,
            pd.read_parquet(path / f"{ACTIVATION_INDEX}.parquet"),
            pd.read_parquet(path / PROMPTS),
            manifest,
        )

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def vectors(self, rows: pd.DataFrame) -> Tensor:
        """[len(rows), d_model] float32 for index rows (any subset, any order)."""
        from safetensors import safe_open

        out = torch.empty(len(rows), self.d_model)
        where = rows.reset_index(drop=True)
        for shard, grp in where.groupby("shard", sort=False):
            r = torch.tensor(grp["row"].to_numpy())
            lo, hi = int(r.min()), int(r.max()) + 1
            with safe_open(str(self.path / str(shard)), framework="pt") as f:
                block = f.get_slice("vectors")[lo:hi]
            out[torch.tensor(grp.index.to_numpy())] = block[r - lo].float()
        return out

    def stack(
        self, site_kind: str, position: str, factor: str | None = None
    ) -> tuple[Tensor, list[Site], pd.DataFrame]:
        """Every layer of one site kind at one position: X [layer, prompt, d_model], the sites
        (layer order), and one row per prompt (the index columns of the first site).

        Prompts missing at some layer are dropped, so row n of every layer is the same prompt.
        """
        rows = self.index[
            (self.index["site_kind"] == site_kind) & (self.index["position"] == position)
        ]
        rows = rows[rows["factor"].isna()] if factor is None else rows[rows["factor"] == factor]
        if rows.empty:
            raise WorkbenchError(
                f"no stored vectors at {site_kind} / {position}"
                + (f" / {factor}" if factor else ""),
                fix="capture them: workbench activations --sites ... --positions ... --factors ...",
            )
        per_layer = {layer: grp for layer, grp in rows.groupby("layer", sort=True)}
        common = set.intersection(*(set(g["prompt_id"]) for g in per_layer.values()))
        ids = sorted(common)
        xs, sites = [], []
        for layer, grp in per_layer.items():
            grp = grp.set_index("prompt_id").loc[ids].reset_index()
            xs.append(self.vectors(grp))
            sites.append(Site(str(grp["site"].iloc[0]), site_kind, int(str(layer))))
        first = next(iter(per_layer.values())).set_index("prompt_id").loc[ids].reset_index()
        return torch.stack(xs), sites, first


def capture_activations(
    study: Study,
    lm: LoadedModel,
    out_dir: str | Path,
    config: ActivationConfig | None = None,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> ActivationStore:
    """Capture the requested sites x positions for every prompt of `study` into `out_dir`.

    Prints the disk estimate before the first forward pass. Re-running with the same
    `out_dir` resumes: prompts in finished shards are not recomputed.
    """
    from tqdm.auto import tqdm

    config = config or ActivationConfig()
    t0 = time.time()
    _check_config(study, config)
    n_layers = int(lm.model.config.get_text_config().num_hidden_layers)
    d_model = int(lm.model.config.get_text_config().hidden_size)
    sites = resolve_sites(config.sites, n_layers)
    prompts = P.render(study, lm.tokenizer)
    P.validate_for_tokenizer(study, prompts, lm.tokenizer, lm.max_length)
    factors = config.factors or tuple(f.name for f in study.factors)
    needs_spans = any(p != "answer" for p in config.positions)
    spans = factor_spans(study, prompts, lm.tokenizer, factors) if needs_spans else {}
    if config.questions is not None:
        prompts = [p for p in prompts if p.question_id in config.questions]
    slots = {
        p.prompt_id: prompt_slots(p, spans.get(p.prompt_id, []), config.positions) for p in prompts
    }
    n_vectors = sum(len(s) for s in slots.values()) * len(sites)
    est = disk_estimate(n_vectors, d_model, config.store_dtype)
    max_kept = max((len(s) for s in slots.values()), default=0)
    held = config.batch_size * max_kept * d_model * 4 * len(sites)
    log(
        f"activations: {len(prompts)} prompts x {len(sites)} sites x <= {max_kept} positions "
        f"= {n_vectors:,} vectors x d_model {d_model} x {config.store_dtype} "
        f"= {_human(est)} on disk (+ index); at most {_human(held)} of vectors held per batch"
    )

    identity = {
        "kind": "activations",
        "study": study.name,
        "prompts_fingerprint": P.prompts_fingerprint(prompts),
        "model": lm.name,
        "dtype": str(lm.dtype),
        "sites": [s.name for s in sites],
        "positions": list(config.positions),
        "factors": list(factors),
        "store_dtype": config.store_dtype,
        "backend": config.backend,
    }
    run = RunFolder(out_dir, identity, overwrite=overwrite)
    prompts_df = P.prompts_frame(study, prompts)
    done = run.begin(prompts_df, ACTIVATION_INDEX)
    if config.progress and run.ranks.is_main:
        announce_resume(run.path, len(done), len(prompts))
    # Chunks are fixed slices of the prompt list (a batch's padding, hence its float
    # rounding, depends on its neighbours); ranks take whole chunks, so every vector is the
    # one a single uninterrupted process stores.
    chunks = [
        prompts[i : i + config.chunk_prompts] for i in range(0, len(prompts), config.chunk_prompts)
    ]
    chunks = [c for c in ([p for p in c if p.prompt_id not in done] for c in chunks) if c]
    chunks = distributed.shard(chunks, len, run.ranks)
    todo = [p for c in chunks for p in c]
    capturer = Capturer(lm, sites, config.backend)
    pad_id = lm.tokenizer.pad_token_id or 0
    factor_names = [f.name for f in study.factors]
    bar = tqdm(
        total=len(done) + len(todo),
        initial=len(done),
        desc="activations",
        unit="prompt",
        disable=not config.progress,
    )
    t_capture = time.time()
    oom: list[dict[str, Any]] = []
    batch_size = config.batch_size
    for chunk in chunks:

        def capture(size: int, chunk: list[P.Prompt] = chunk) -> dict[int, dict[str, Tensor]]:
            kept: dict[int, dict[str, Tensor]] = {}
            for idx, ids, mask in batches(chunk, size, pad_id):
                batch_slots = [slots[chunk[i].prompt_id] for i in idx]
                out = capturer.run(ids, reduction_weights(batch_slots, ids.shape[1]), mask)
                for b, i in enumerate(idx):
                    n = len(batch_slots[b])
                    kept[chunk[i].prompt_id] = {name: v[b, :n] for name, v in out.items()}
                bar.update(len(idx))
            return kept

        kept, batch_size = retry_on_oom(capture, batch_size, oom, "capture")
        index, vectors = _chunk_rows(chunk, slots, kept, sites, factor_names, config.store_dtype)
        run.write_chunk(
            {ACTIVATION_INDEX: index}, {"vectors": vectors}, tensor_file=ACTIVATION_SHARD
        )
    bar.close()
    t_capture = time.time() - t_capture
    if not run.ranks_done():
        run.wait_for_finish()
        return ActivationStore.open(run.path)

    frames = []
    for chunk_dir in run.chunk_dirs():
        frame = pd.read_parquet(chunk_dir / f"{ACTIVATION_INDEX}.parquet")
        frames.append(frame.assign(shard=f"{CHUNKS}/{chunk_dir.name}/{ACTIVATION_SHARD}"))
    index = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    index = index.sort_values(["prompt_id", "layer", "site_kind", "position"], kind="stable")
    index = index.reset_index(drop=True)
    run.write_table(ACTIVATION_INDEX, index)
    manifest = {
        "kind": "activations",
        "study": {"name": study.name, "path": study.path, "definition": dict(study.raw)},
        "config": asdict(config),
        "model": lm.describe(),
        "d_model": d_model,
        "n_layers": n_layers,
        "sites": [s.name for s in sites],
        "conventions": {
            "answer": "last prompt token (its next-token distribution is the answer)",
            "span": "tokens overlapping the factor value's characters (last occurrence), "
            "from the tokenizer's offset mapping; leading-space tokens included",
            "span_mean": "float32 mean over the span's tokens, then cast to the storage dtype",
            "span_last": "the span's last token",
            "layer": "block index; -1 = hook_embed",
            "sites": "hf backend: module outputs (hook_embed = input embeddings; resid_pre = "
            "block input; attn_out / mlp_out = attention / MLP module outputs; resid_post = "
            "block output, before the final norm for the last block)"
            if config.backend == "hf"
            else "TransformerLens bridge hook points",
            "padding": "right padding; pads after every real token",
        },
        "counts": {
            "prompts": len(prompts),
            "vectors": len(index),
            "resumed_prompts": len(done),
        },
        "out_of_memory": oom,
        "disk_estimate_bytes": est,
        "max_kept_bytes_per_batch": capturer.stats.max_kept_bytes,
        "timings_s": {"capture": round(t_capture, 3), "total": round(time.time() - t0, 3)},
    }
    run.finish(manifest, keep_chunks=True)
    return ActivationStore(run.path, index, prompts_df, dict(manifest))


def _check_config(study: Study, config: ActivationConfig) -> None:
    bad = [p for p in config.positions if p not in POSITION_KINDS]
    if bad or not config.positions:
        raise WorkbenchError(
            f"unknown position {bad[0] if bad else '(none given)'!r}",
            fix=f"use one or more of: {', '.join(POSITION_KINDS)}",
        )
    names = [f.name for f in study.factors]
    for f in config.factors or ():
        if f not in names:
            raise WorkbenchError(
                f"unknown factor {f!r}", fix=f"use factors of the study: {', '.join(names)}"
            )
    qids = [q.id for q in study.questions]
    for q in config.questions or ():
        if q not in qids:
            raise WorkbenchError(f"unknown question {q!r}", fix=f"use one of: {', '.join(qids)}")
    if config.store_dtype not in STORE_DTYPES:
        raise WorkbenchError(
            f"unknown storage dtype {config.store_dtype!r}", fix="use float16 or float32"
        )
    for name in ("batch_size", "chunk_prompts"):
        if getattr(config, name) < 1:
            raise WorkbenchError(f"{name} must be at least 1", fix="pass a positive number")


def _chunk_rows(
    chunk: Sequence[P.Prompt],
    slots: dict[int, list[Slot]],
    kept: dict[int, dict[str, Tensor]],
    sites: Sequence[Site],
    factor_names: Sequence[str],
    store_dtype: str,
) -> tuple[pd.DataFrame, Tensor]:
    """One shard: rows ordered site-major (a site's rows are contiguous: cheap slices)."""
    rows: list[dict[str, Any]] = []
    parts = []
    ordered = sorted(chunk, key=lambda p: p.prompt_id)
    for site in sites:
        for p in ordered:
            ss = slots[p.prompt_id]
            if not ss:
                continue
            parts.append(kept[p.prompt_id][site.name])
            for slot in ss:
                rows.append(
                    {
                        "prompt_id": p.prompt_id,
                        "persona_id": p.persona_id,
                        "question_id": p.question_id,
                        "permutation": p.permutation,
                        **{n: p.factors.get(n) for n in factor_names},
                        "site": site.name,
                        "site_kind": site.kind,
                        "layer": site.layer,
                        "position": slot.position,
                        "factor": slot.factor,
                        "token_start": slot.token_start,
                        "token_end": slot.token_end,
                        "row": len(rows),
                    }
                )
    vectors = torch.cat(parts) if parts else torch.empty(0, 0)
    if store_dtype == "float16" and vectors.numel() and vectors.abs().max() > FLOAT16_MAX:
        raise WorkbenchError(
            f"an activation of magnitude {float(vectors.abs().max()):.0f} overflows float16",
            fix="store as float32 (--store-dtype float32)",
        )
    frame = pd.DataFrame(rows)
    for n in factor_names:
        frame[n] = frame[n].astype("string")
    frame["factor"] = frame["factor"].astype("string")
    return frame, vectors.to(STORE_DTYPES[store_dtype]).contiguous()
