"""How many CPU threads torch uses, chosen by measurement.

torch starts with one thread per core. On a shared or busy machine that is often the
slowest choice: threads spin against other processes, and a run on 2 busy cores measured
15x slower than with one thread. `choose_threads("auto")` times the same matrix products
at each candidate count (1, half the cores, all cores), rounds interleaved, and takes more
threads only when they are clearly (30%) faster; the choice and
the timings go to the manifest. An explicit count is taken as given.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from workbench.errors import WorkbenchError

MARGIN = 1.3
"""How much faster more threads must be to be chosen."""


def _candidates() -> list[int]:
    cores = os.cpu_count() or 1
    return sorted({1, max(1, cores // 2), cores})


def _time_matmul(n_threads: int, a: torch.Tensor, b: torch.Tensor) -> float:
    torch.set_num_threads(n_threads)
    t0 = time.perf_counter()
    for _ in range(8):
        a @ b
    return time.perf_counter() - t0


def _measure(candidates: list[int], rounds: int = 5, size: int = 384) -> dict[int, float]:
    """Median time of the same products per thread count, rounds interleaved so that a
    burst of load elsewhere hits every candidate alike."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    times: dict[int, list[float]] = {n: [] for n in candidates}
    for n in candidates:
        _time_matmul(n, a, b)  # warm-up
    for _ in range(rounds):
        for n in candidates:
            times[n].append(_time_matmul(n, a, b))
    return {n: sorted(t)[len(t) // 2] for n, t in times.items()}


def choose_threads(requested: str | int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Set torch's CPU thread count; returns what was chosen and why (for the manifest).

    `requested`: "auto" (measure on CPU; keep torch's default on a GPU, where the CPU only
    feeds the device), "default" (torch's own choice), or a positive count.
    """
    device = torch.device(device)
    default = torch.get_num_threads()
    if requested == "default":
        return {"threads": default, "how": "torch default"}
    if requested == "auto":
        if device.type != "cpu":
            return {"threads": default, "how": "torch default (model on a GPU)"}
        timings = _measure(_candidates())
        # More threads only when clearly faster: a short measurement on a shared machine
        # flatters them, and a long run pays for every thread that spins against others.
        best = 1
        for n in sorted(timings):
            if timings[n] * MARGIN < timings[best]:
                best = n
        torch.set_num_threads(best)
        return {
            "threads": best,
            "how": f"measured (median of 5 interleaved rounds; more threads only if {MARGIN}x faster)",
            "timings_ms": {str(n): round(t * 1e3, 3) for n, t in timings.items()},
        }
    try:
        count = int(requested)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise WorkbenchError(
            f"--threads {requested!r} is not a thread count",
            fix="pass auto, default, or a positive whole number",
        )
    torch.set_num_threads(count)
    return {"threads": count, "how": "given"}
