"""Data-parallel runs: which rank this process is, which prompts it runs, and the barriers.

Launched under `torchrun --nproc-per-node N` or `accelerate launch` (both set RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; several nodes
too), `workbench distributions | sample | activations | patch | attribute | steer |
mediate` split their work over the ranks, every rank writes its own chunk files into the
one run folder, and rank 0 merges them, computes what needs every row (bootstrap
intervals, figures) and writes the manifest last. Only barriers and a few counters
(`sum_over_ranks`) cross processes, so the process group is gloo whatever the device: no
activation is ever communicated, and gloo waits on the CPU for as long as the slowest rank
needs (`WORKBENCH_DIST_TIMEOUT_S`, default 24 hours). A command that splits no work
(`probe`, `effects`, `compare`, ...) runs on rank 0 `alone()` while the others wait.

Results do not depend on the world size: the units handed to ranks are the units whose
numbers never depend on what runs beside them (a persona's prefix group for
distributions; whole waves for sampling, whose draws depend only on seed, prompt, sample
and step; a fixed chunk of prompts for activations; a fixed chunk of pairs for patching
and attribution patching, of prompts for integrated gradients; a direction for steering;
a method x subspace for mediation), so every rank computes exactly what one process
would, and a resumed run may use another world size.

GPUs: each rank sees its own group of GPUs (`CUDA_VISIBLE_DEVICES`, set before CUDA starts):
`LOCAL_WORLD_SIZE` ranks on a node with G GPUs get G / LOCAL_WORLD_SIZE GPUs each, so
`--device-map auto` spreads a model too large for one GPU over its rank's group (model
parallel inside data parallel). With more ranks than GPUs, ranks share GPUs round-robin.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

T = TypeVar("T")

TIMEOUT_ENV = "WORKBENCH_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a data-parallel launch (world_size 1: a plain run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    """Rank among the processes of this node."""
    local_world_size: int = 1
    """Processes on this node."""

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that merges the chunks and writes the manifest."""
        return self.rank == 0

    @property
    def chunk_suffix(self) -> str:
        """Appended to the chunk folders this rank writes: ranks never pick the same name
        (rank 0 keeps the plain names, so a one-process run is unchanged)."""
        return f"-r{self.rank}" if self.rank else ""


_alone = False
"""Set inside `alone()`: this process acts as a one-process run."""


def launched() -> Ranks:
    """The ranks a launcher (torchrun, accelerate launch) put in the environment (a
    one-process run inside `alone()`)."""
    if _alone:
        return Ranks()
    env = os.environ

    def get(name: str, default: int) -> int:
        value = env.get(name, "")
        return int(value) if value.strip() else default

    world = get("WORLD_SIZE", 1)
    return Ranks(
        rank=get("RANK", 0),
        world_size=world,
        local_rank=get("LOCAL_RANK", 0),
        local_world_size=get("LOCAL_WORLD_SIZE", world),
    )


def current() -> Ranks:
    """This process's ranks; starts the gloo process group on first use under a launcher."""
    ranks = launched()
    if ranks.active:
        import torch.distributed as dist

        if not dist.is_initialized():
            timeout = float(os.environ.get(TIMEOUT_ENV, 24 * 3600))
            dist.init_process_group(
                "gloo",
                init_method="env://",
                rank=ranks.rank,
                world_size=ranks.world_size,
                timeout=timedelta(seconds=timeout),
            )
    return ranks


def barrier() -> None:
    """Wait until every rank gets here (nothing in a one-process run)."""
    if launched().active:
        import torch.distributed as dist

        current()
        dist.barrier()


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sums of `values` over the ranks (the values in a one-process run): a
    run's counters and timings for its manifest. Every rank must call it (it waits for all)."""
    if not launched().active:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    current()
    total = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(total)
    return [float(v) for v in total.tolist()]


@contextmanager
def alone() -> Iterator[None]:
    """Inside the block this process is a one-process run (no barrier, rank 0 of 1): the
    work one rank of a launch does by itself while the others wait for it at a barrier."""
    global _alone
    was, _alone = _alone, True
    try:
        yield
    finally:
        _alone = was


def gpu_group(local_rank: int, local_world_size: int, n_gpus: int) -> list[int]:
    """The GPUs (indices among those visible) a rank of this node uses: a contiguous block
    of n_gpus // local_world_size, or one shared round-robin when ranks outnumber GPUs."""
    if n_gpus <= 0:
        return []
    per = n_gpus // local_world_size
    if per == 0:
        return [local_rank % n_gpus]
    return list(range(local_rank * per, (local_rank + 1) * per))


def select_gpus() -> list[int] | None:
    """Narrow CUDA_VISIBLE_DEVICES to this rank's GPU group; call before anything starts CUDA.

    Returns the physical GPU ids kept (None when not launched data-parallel or no GPU).
    """
    ranks = launched()
    if not ranks.active:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
    else:
        import torch

        # nvml-based: counts the GPUs without starting CUDA in this process
        ids = [str(i) for i in range(torch.cuda.device_count())]
    group = gpu_group(ranks.local_rank, ranks.local_world_size, len(ids))
    if not group:
        return None
    kept = [ids[i] for i in group]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(kept)
    return [int(k) if k.isdigit() else -1 for k in kept]


def split(weights: Sequence[int], world_size: int) -> list[range]:
    """Contiguous ranges of unit indices, one per rank, balanced by total weight.

    Unit i goes to the rank whose share of the cumulative weight holds the unit's midpoint,
    so every rank gets about total / world_size and the order of units is kept.
    """
    total = sum(weights)
    bounds = [0] * (world_size + 1)
    bounds[world_size] = len(weights)
    if total <= 0:
        step = len(weights) / world_size
        return [range(round(r * step), round((r + 1) * step)) for r in range(world_size)]
    owner = []
    seen = 0
    for w in weights:
        mid = seen + w / 2
        owner.append(min(world_size - 1, int(mid * world_size / total)))
        seen += w
    out = []
    start = 0
    for r in range(world_size):
        end = start
        while end < len(owner) and owner[end] == r:
            end += 1
        out.append(range(start, end))
        start = end
    return out


def shard(units: Sequence[T], weight: Callable[[T], int], ranks: Ranks) -> list[T]:
    """This rank's units (all of them in a one-process run)."""
    if not ranks.active:
        return list(units)
    mine = split([weight(u) for u in units], ranks.world_size)[ranks.rank]
    return [units[i] for i in mine]


def shard_groups(items: Sequence[T], key: Callable[[T], Hashable], ranks: Ranks) -> list[T]:
    """This rank's items, whole groups (same `key`) at a time, balanced by item count; the
    items keep their order."""
    if not ranks.active:
        return list(items)
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    mine = shard(list(groups.values()), len, ranks)
    return [item for grp in mine for item in grp]
