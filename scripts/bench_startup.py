"""Benchmark: how long the CLI takes to start, against `import torch`.

Usage (from the repository root)::

    python -m scripts.bench_startup                 # table -> results/benchmarks/startup_cpu.md
    python -m scripts.bench_startup --repeats 3 --out -

Each command runs in a fresh interpreter, interleaved, `--repeats` times; the median counts.
`workbench --help` and `workbench validate` import neither torch nor transformers (the
package's names load on first use), so they should cost a fraction of `import torch`; the
path check below confirms which heavy modules each one imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from workbench.runs import short_git_hash

STUDY = Path(__file__).resolve().parents[1] / "probes" / "example.yaml"
HEAVY = ("torch", "transformers", "transformer_lens", "pandas")
PROBE = (
    "import sys, json\n"
    "print(json.dumps([m for m in {heavy!r} if m in sys.modules]), file=sys.stderr)\n"
)

COMMANDS = {
    "import torch": "import torch",
    "workbench --help": (
        "from workbench.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    ),
    "workbench validate": f"from workbench.cli import main\nmain(['validate', {str(STUDY)!r}])",
}


def run(code: str) -> tuple[float, list[str]]:
    script = code + "\n" + PROBE.format(heavy=HEAVY)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - t0
    return elapsed, json.loads(out.stderr.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="results/benchmarks/startup_cpu.md")
    args = parser.parse_args(argv)
    commit = short_git_hash()  # at the start: the code the run uses
    load = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    imported: dict[str, list[str]] = {}
    for code in COMMANDS.values():  # warm the file cache
        run(code)
    for _ in range(args.repeats):
        for name, code in COMMANDS.items():
            t, mods = run(code)
            times[name].append(t)
            imported[name] = mods
    base = statistics.median(times["import torch"])
    rows = []
    for name in COMMANDS:
        med = statistics.median(times[name])
        rows.append(
            f"| {name} | {med:.3f} | {med / base:.2f}x | {', '.join(imported[name]) or 'none'} |"
        )
    command = "python -m scripts.bench_startup" + (
        f" --repeats {args.repeats}" if args.repeats != 7 else ""
    )
    text = "\n".join(
        [
            "# Startup benchmark: the CLI against `import torch`",
            "",
            f"- Command: `{command}`",
            f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; git {commit}",
            f"- Machine: {os.cpu_count()} CPU cores, {platform.machine()}; 1-min load average "
            f"{load:.2f} before, {os.getloadavg()[0]:.2f} after",
            f"- Python {platform.python_version()}; each command in a fresh interpreter, "
            f"median of {args.repeats} interleaved runs (interpreter start included)",
            "",
            "| command | median s | vs `import torch` | heavy modules imported (path check) |",
            "|---|---:|---:|---|",
            *rows,
            "",
        ]
    )
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
