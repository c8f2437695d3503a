"""How many CPU threads torch uses, chosen by measurement.

torch starts with one thread per core. On a shared or busy machine that is often the
slowest choice: threads spin against other processes, and a run on 2 busy cores measured
15x slower than with one thread. `choose_threads("auto")` times the same matrix product
at each candidate count (1, half the cores, all cores) and keeps the fastest; the choice and
the timings go to the manifest. An explicit count is taken as given.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from workbench.errors import WorkbenchError


def _candidates() -> list[int]:
    cores = os.cpu_count() or 1
    return sorted({1, max(1, cores // 2), cores})


def _time_matmul(n_threads: int, size: int = 256, repeats: int = 5) -> float:
    torch.set_num_threads(n_threads)
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return best


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
        timings = {n: _time_matmul(n) for n in _candidates()}
        best = min(timings, key=lambda n: timings[n])
        torch.set_num_threads(best)
        return {
            "threads": best,
            "how": "measured (fastest 256x256 matmul)",
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
