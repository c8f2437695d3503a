"""Run folders: chunked, resumable result tables and a manifest written last.

Layout of a run folder (file names are constants here, nowhere else):

    run.json            identity of the run (fingerprint of prompts + config + model); written first
    prompts.parquet     every prompt, written before scoring starts
    chunks/NNNNN/       one finished chunk: its tables, renamed into place atomically
                        (NNNNN-rR when rank R > 0 of a data-parallel run wrote it)
    <table>.parquet     the consolidated tables, written when every chunk is done
    manifest.json       written last: its presence means the run completed

Killing a run loses at most the chunk in flight; re-running the same command skips every
prompt whose chunk is in place, and refuses (with the fix) to mix two different runs.

Data-parallel runs (`workbench.distributed`): every rank opens the same folder; rank 0
creates it, every rank reads which prompts are done before any rank writes (`begin`), each
writes chunks under its own names, and after a barrier (`ranks_done`) rank 0 merges and
writes the manifest (`finish`, which records the world size) while the others wait
(`wait_for_finish`). The run's identity never holds the world size: a run killed under one
world size resumes under another.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from workbench import distributed
from workbench.errors import WorkbenchError

T = TypeVar("T")

SCHEMA_VERSION = 1
RUN_FILE = "run.json"
MANIFEST = "manifest.json"
PROMPTS = "prompts.parquet"
CHUNKS = "chunks"
_DROPPED = "chunks.dropped"
"""The chunk folders a finished run no longer needs, renamed here before they are deleted."""
FULL_VOCAB = "full_vocab.safetensors"
ACTIVATION_INDEX = "index"
"""Activations runs: the table with one row per stored vector (`index.parquet`)."""
ACTIVATION_SHARD = "activations.safetensors"
"""Activations runs: each chunk's vectors; the chunks are kept as the run's shards."""
PROBES = "probes"
"""Probe runs: `probes.parquet`, one row per site x position x target x control."""
DIRECTIONS = "directions.safetensors"
"""Probe runs: probe weights fitted on all rows, in raw activation coordinates."""
TRACKED_PACKAGES = (
    "workbench",
    "torch",
    "transformers",
    "accelerate",
    "tokenizers",
    "transformer-lens",
    "pandas",
    "numpy",
)


def git_hash(root: Path | None = None) -> str | None:
    """The workbench checkout's commit (with `-dirty` when it has local changes), if any
    (`root`: another checkout). Changes under `results/` (committed reports, outputs of the
    benchmarks) are not code: they do not make the checkout dirty."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":(exclude)results",
            ],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def short_git_hash() -> str:
    """`git_hash()` as benchmark headers show it: 7 characters, then "(uncommitted changes)"
    when the checkout has local changes; "unknown" outside a checkout."""
    full = git_hash()
    if full is None:
        return "unknown"
    return full[:7] + (" (uncommitted changes)" if full.endswith("-dirty") else "")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in TRACKED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str, sort_keys=False) + "\n")
    os.replace(tmp, path)


def cache_root() -> Path:
    """Where the workbench caches what it builds (organisms, converted GGUF files):
    $WORKBENCH_CACHE, else ~/.cache/workbench."""
    env = os.environ.get("WORKBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "workbench"


def announce_resume(path: Path, done: int, total: int, unit: str = "prompts") -> None:
    """Say on stderr that a run picks up where it stopped (nothing when starting fresh)."""
    if done:
        print(f"resuming {path}: {done:,} of {total:,} {unit} done", file=sys.stderr)


def check_out_dir(
    path: str | Path, expected: Mapping[str, Any], *, overwrite: bool = False
) -> None:
    """Refuse, before any model loads, an output folder that holds something else.

    `expected` holds the parts of the run's identity known before loading (kind, study
    name, model as passed); a key the folder's run.json does not record is not compared
    (distributions runs record no `kind`). The full identity is checked again when the run
    starts, so this only moves the common mistakes earlier.
    """
    path = Path(path)
    # Under a launch only rank 0 looks: the others may arrive after rank 0 has started the
    # folder (RunFolder checks it again for them once rank 0 is done).
    if overwrite or not path.exists() or not distributed.launched().is_main:
        return
    if not path.is_dir():
        raise WorkbenchError(f"{path} is a file", fix="give --out a folder path")
    run_file = path / RUN_FILE
    if run_file.exists():
        previous = json.loads(run_file.read_text()).get("identity", {})
        previous.setdefault("kind", "distributions")
        changed = sorted(k for k, v in expected.items() if k in previous and previous[k] != v)
        if changed:
            was = ", ".join(f"{k}={previous[k]!r}" for k in changed)
            raise WorkbenchError(
                f"{path} holds a different run ({was}); resuming would mix results",
                fix="use a new --out folder, or pass --overwrite to discard the old one",
            )
    elif any(path.iterdir()):
        raise WorkbenchError(
            f"{path} is not empty and is not a workbench run folder",
            fix="use a new or empty --out folder",
        )


class RunFolder:
    """A run folder being written. `identity` must match to resume an existing folder."""

    def __init__(
        self, path: str | Path, identity: Mapping[str, Any], *, overwrite: bool = False
    ) -> None:
        self.path = Path(path)
        # JSON round trip: tuples come back as lists, so compare what is stored.
        self.identity = json.loads(json.dumps(dict(identity), default=str))
        self.started = time.time()
        self.ranks = distributed.current()
        if self.ranks.is_main:
            self._open(overwrite)
        # the other ranks check the folder rank 0 created (or refused)
        distributed.barrier()
        if not self.ranks.is_main:
            self._open(False)

    def _open(self, overwrite: bool) -> None:
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        run_file = self.path / RUN_FILE
        if run_file.exists():
            previous = json.loads(run_file.read_text())
            if previous.get("identity") != self.identity:
                changed = sorted(
                    k
                    for k in set(previous.get("identity", {})) | set(self.identity)
                    if previous.get("identity", {}).get(k) != self.identity.get(k)
                )
                raise WorkbenchError(
                    f"{self.path} holds a different run (changed: {', '.join(changed)}); "
                    "resuming would mix results",
                    fix="use a new --out folder, or pass --overwrite to discard the old one",
                )
        # a run.json.tmp alone: killed while writing run.json
        elif any(p.name != f"{RUN_FILE}.tmp" for p in self.path.iterdir()):
            raise WorkbenchError(
                f"{self.path} is not empty and is not a workbench run folder",
                fix="use a new or empty --out folder",
            )
        else:
            write_json(run_file, {"schema_version": SCHEMA_VERSION, "identity": self.identity})
        shutil.rmtree(self.path / _DROPPED, ignore_errors=True)
        (self.path / CHUNKS).mkdir(exist_ok=True)

    def begin(self, prompts: pd.DataFrame, table: str, column: str = "prompt_id") -> set[int]:
        """Write `prompts.parquet` (once, rank 0) and return the keys already done.

        Every rank reads them before any rank writes a chunk (a barrier), so all ranks agree
        on what is left.
        """
        if self.ranks.is_main and not (self.path / PROMPTS).exists():
            self.write_table("prompts", prompts)
        distributed.barrier()
        done = self.done_keys(table, column) if self.chunk_dirs() else set()
        distributed.barrier()
        return done

    def ranks_done(self) -> bool:
        """Wait until every rank's chunks are in place; True on the rank that merges them."""
        distributed.barrier()
        return self.ranks.is_main

    def wait_for_finish(self) -> None:
        """The other ranks: wait until rank 0 has written the manifest."""
        distributed.barrier()

    @property
    def complete(self) -> bool:
        return (self.path / MANIFEST).exists()

    def chunk_dirs(self) -> list[Path]:
        return sorted(
            p for p in (self.path / CHUNKS).iterdir() if p.is_dir() and not p.name.endswith(".tmp")
        )

    def done_keys(self, table: str, column: str) -> set[int]:
        """Keys (e.g. prompt ids) already in finished chunks."""
        done: set[int] = set()
        for chunk in self.chunk_dirs():
            frame = pd.read_parquet(chunk / f"{table}.parquet", columns=[column])
            done.update(int(x) for x in frame[column].unique())
        return done

    def write_chunk(
        self,
        tables: Mapping[str, pd.DataFrame],
        extra: Mapping[str, Any] | None = None,
        *,
        tensor_file: str = FULL_VOCAB,
    ) -> Path:
        """Write one chunk's tables (and optional safetensors, saved as `tensor_file`) and
        rename it into place."""
        n = len(self.chunk_dirs())
        suffix = self.ranks.chunk_suffix
        final = self.path / CHUNKS / f"{n:05d}{suffix}"
        while final.exists():
            n += 1
            final = self.path / CHUNKS / f"{n:05d}{suffix}"
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, frame in tables.items():
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
        if extra:
            from safetensors.torch import save_file

            save_file(dict(extra), str(tmp / tensor_file))
        os.replace(tmp, final)
        return final

    def read_chunks(self, table: str) -> pd.DataFrame:
        frames = [pd.read_parquet(c / f"{table}.parquet") for c in self.chunk_dirs()]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def write_table(self, name: str, frame: pd.DataFrame) -> Path:
        path = self.path / f"{name}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
        return path

    def finish(self, manifest: Mapping[str, Any], *, keep_chunks: bool = False) -> Path:
        """Write the manifest (last), then drop the chunk folders it supersedes.

        Rank 0 only, after `ranks_done`; releases the ranks waiting in `wait_for_finish`.
        """
        full = {
            "schema_version": SCHEMA_VERSION,
            "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_hash": git_hash(),
            "versions": versions(),
            "world_size": self.ranks.world_size,
            **manifest,
        }
        write_json(self.path / MANIFEST, full)
        chunks = self.path / CHUNKS
        if not keep_chunks:
            # renamed first: a run killed mid-delete never leaves a half-deleted chunk behind
            os.replace(chunks, self.path / _DROPPED)
            shutil.rmtree(self.path / _DROPPED, ignore_errors=True)
        else:  # chunks a killed run left half-written
            for tmp in chunks.glob("*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()
        return self.path / MANIFEST


def retry_on_oom(
    run: Callable[[int], T], batch_size: int, log: list[dict[str, Any]], what: str = ""
) -> tuple[T, int]:
    """`run(batch_size)`, halving the batch after each out-of-memory error until it fits.

    Returns the result and the batch size that worked (keep it for the rest of the run: the
    memory does not come back). Each halving is appended to `log` (for the manifest). A batch
    of 1 that still does not fit raises the error.
    """
    import torch

    while True:
        try:
            return run(batch_size), batch_size
        except torch.OutOfMemoryError:
            if batch_size <= 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.append({"where": what, "batch_size": batch_size, "retried_with": batch_size // 2})
            print(
                f"out of memory at batch size {batch_size}{' in ' + what if what else ''}: "
                f"retrying with {batch_size // 2}",
                file=sys.stderr,
            )
            batch_size //= 2
