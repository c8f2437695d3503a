"""User-facing errors: each names the file, the field and the fix.

The CLI catches `WorkbenchError`, prints `str(err)` and exits with `err.exit_code`, no traceback.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """An error caused by the user's input or environment, with a fix to suggest."""

    exit_code = 2
    """Bad input; `ModelLoadError` is 3. Exit code 1 is left to unexpected errors (bugs)."""

    def __init__(self, message: str, *, fix: str = "", file: str | None = None) -> None:
        self.message = message
        self.fix = fix
        self.file = file
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        fix = f"\n  fix: {self.fix}" if self.fix else ""
        return f"error: {where}{self.message}{fix}"


class StudyError(WorkbenchError):
    """A malformed study file. `field` is a path such as `questions[2].options`."""

    exit_code = 2

    def __init__(self, file: str, field: str, message: str, fix: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}", fix=fix, file=file)


class ModelLoadError(WorkbenchError):
    """A model that cannot be loaded (missing folder, not cached offline, no safetensors)."""

    exit_code = 3
