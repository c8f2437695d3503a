"""Several `workbench` commands in one process, for one torchrun launch (one startup):
`torchrun ... tests/integration/dp_commands.py sample ARGS... ";;" activations ARGS...`.

Prefixes that stop a command part-way, as a killed rank leaves its run folder:

- `@kill-rank1-after N CMD...`: rank 1 dies by SIGKILL right after writing its N-th chunk of
  the command (torchrun then ends the others: put it last, the launch ends there);
- `@abort-after N CMD...`: every rank leaves the command right after its N-th chunk (no rank
  reaches the command's next barrier, so the launch goes on with the next command; every rank
  must write N chunks).

With `DP_CHUNK_LOG=FILE` every rank appends the chunk folders it writes to FILE (which rank
did which work); each command's time goes to stderr.
"""

import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from workbench.cli.main import main
from workbench.runs import RunFolder

REAL_WRITE = RunFolder.write_chunk


class _Abort(BaseException):
    """Leaves a command mid-run (not an Exception: the CLI catches none of it)."""


def _after_write(then: Callable[[Any, int], None]) -> None:
    """Wrap `RunFolder.write_chunk`: `then(chunk_path, n_written)` after each chunk."""
    written = [0]

    def write_chunk(self: RunFolder, *args: Any, **kwargs: Any) -> Any:
        out = REAL_WRITE(self, *args, **kwargs)
        written[0] += 1
        then(out, written[0])
        return out

    RunFolder.write_chunk = write_chunk  # type: ignore[method-assign]  # a test wrapper


def _log(path: Any, n: int) -> None:
    with open(os.environ["DP_CHUNK_LOG"], "a") as f:
        f.write(f"{path}\n")


def _stop(kind: str, after: int) -> Callable[[Any, int], None]:
    def then(path: Any, n: int) -> None:
        if os.environ.get("DP_CHUNK_LOG"):
            _log(path, n)
        if n < after:
            return
        if kind == "@abort-after":
            raise _Abort
        if os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)

    return then


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:2] if a != "--"] + sys.argv[2:]
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == ";;":
            commands.append([])
        else:
            commands[-1].append(arg)
    for command in commands:
        RunFolder.write_chunk = REAL_WRITE  # type: ignore[method-assign]  # a test wrapper
        if os.environ.get("DP_CHUNK_LOG"):
            _after_write(_log)
        if command[0] in ("@kill-rank1-after", "@abort-after"):
            _after_write(_stop(command[0], int(command[1])))
            command = command[2:]
        tic = time.time()
        try:
            code = main(command)
        except _Abort:
            code = 0
        print(f"dp_commands: {command[0]} {time.time() - tic:.1f} s", file=sys.stderr)
        if code:
            sys.exit(code)
