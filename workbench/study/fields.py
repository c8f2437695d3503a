"""Readers for the fields of a study file: each check raises one `StudyError` that names the
file, the field path (`questions[2].options`) and the fix."""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from workbench.errors import StudyError


class Ctx:
    """Carries the file name so every error names it."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, fieldpath: str, message: str, fix: str) -> StudyError:
        return StudyError(self.file, fieldpath, message, fix)

    def mapping(self, value: Any, fieldpath: str, allowed: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            # The top level has no field path of its own: name the file, as for YAML errors.
            raise self.fail(
                fieldpath or "(file)",
                f"expected a mapping, got {type(value).__name__}",
                f"write `{fieldpath}` as `key: value` lines"
                if fieldpath
                else "write the study as top-level `key: value` lines (name:, factors:, ...)",
            )
        for key in value:
            if key not in allowed:
                raise self.fail(
                    f"{fieldpath}.{key}" if fieldpath else str(key),
                    "unknown field",
                    f"use one of: {', '.join(allowed)}",
                )
        return value

    def string(self, value: Any, fieldpath: str, *, nonempty: bool = True) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(
                fieldpath,
                f"expected text, got {type(value).__name__}",
                "write a quoted string",
            )
        text = str(value)
        if nonempty and not text.strip():
            raise self.fail(fieldpath, "is empty", "give it a non-empty value")
        return text

    def string_list(self, value: Any, fieldpath: str, *, nonempty: bool = True) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(
                fieldpath,
                f"expected a list, got {type(value).__name__}",
                "write a YAML list, e.g. [a, b, c]",
            )
        if nonempty and not value:
            raise self.fail(fieldpath, "is empty", "list at least one value")
        out = [self.string(v, f"{fieldpath}[{i}]") for i, v in enumerate(value)]
        seen: dict[str, int] = {}
        for i, v in enumerate(out):
            if v in seen:
                raise self.fail(
                    f"{fieldpath}[{i}]",
                    f"duplicate value {v!r} (also at [{seen[v]}])",
                    "make every value distinct",
                )
            seen[v] = i
        return out

    def integer(self, value: Any, fieldpath: str, *, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(
                fieldpath,
                f"expected an integer >= {minimum}, got {value!r}",
                f"write a whole number >= {minimum}",
            )
        return value

    def choice(self, value: Any, fieldpath: str, choices: Sequence[str]) -> Any:
        if value not in choices:
            raise self.fail(
                fieldpath, f"unknown value {value!r}", f"use one of: {', '.join(choices)}"
            )
        return value

    def placeholders(self, text: str, fieldpath: str, allowed: Sequence[str]) -> set[str]:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
        except ValueError as err:
            raise self.fail(
                fieldpath,
                f"malformed placeholder ({err})",
                "close every `{` with `}`; write a literal brace as `{{` or `}}`",
            ) from None
        for name in sorted(names):
            if name == "" or name not in allowed:
                raise self.fail(
                    fieldpath,
                    f"unknown placeholder {{{name}}}",
                    f"use one of: {', '.join('{' + a + '}' for a in allowed)}",
                )
        return names
