"""The design of a study: which factor combinations (cells) are asked.

`factorial` crosses every factor's values, `random` draws distinct cells from that grid,
`table` reads them from a CSV, JSONL or parquet file, and `coarse` adds cells that leave some
factors unspecified (groups such as "Democrats" asked directly, for structural consistency).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

from workbench.study.fields import Ctx
from workbench.study.spec import Cell, Design, Factor


def parse_cell(ctx: Ctx, value: Any, fp: str, factors: tuple[Factor, ...]) -> Cell:
    spec = ctx.mapping(value, fp, [f.name for f in factors])
    cell: Cell = {f.name: None for f in factors}
    for key, v in spec.items():
        if v is None:
            continue
        text = ctx.string(v, f"{fp}.{key}")
        factor = next(f for f in factors if f.name == key)
        if text not in factor.values:
            raise ctx.fail(
                f"{fp}.{key}",
                f"{text!r} is not a value of factor {key!r}",
                f"use one of: {', '.join(factor.values)}",
            )
        cell[key] = text
    return cell


def parse_design(ctx: Ctx, value: Any, factors: tuple[Factor, ...]) -> Design:
    spec = ctx.mapping(value, "design", ("kind", "path", "n", "seed", "coarse"))
    kind = ctx.choice(
        spec.get("kind", "factorial"), "design.kind", ("factorial", "table", "random")
    )
    path = n = None
    if kind == "table":
        if "path" not in spec:
            raise ctx.fail("design.path", "missing", "give the table file (CSV, JSONL or parquet)")
        path = ctx.string(spec["path"], "design.path")
    if kind == "random":
        if "n" not in spec:
            raise ctx.fail("design.n", "missing", "give the number of random combinations")
        n = ctx.integer(spec["n"], "design.n", minimum=1)
    for key, owner in (("path", "table"), ("n", "random")):
        if key in spec and kind != owner:
            raise ctx.fail(f"design.{key}", f"not used with `kind: {kind}`", f"remove `{key}`")
    seed = ctx.integer(spec.get("seed", 0), "design.seed", minimum=0)
    coarse_raw = spec.get("coarse", [])
    if not isinstance(coarse_raw, list):
        raise ctx.fail(
            "design.coarse",
            "expected a list",
            "write a list of partial cells, e.g. - {party: Democrat}",
        )
    coarse = tuple(
        parse_cell(ctx, c, f"design.coarse[{i}]", factors) for i, c in enumerate(coarse_raw)
    )
    return Design(kind, path, n, seed, coarse)


def expand_design(
    ctx: Ctx, design: Design, factors: tuple[Factor, ...], base_dir: Path
) -> tuple[Cell, ...]:
    names = [f.name for f in factors]
    cells: list[Cell]
    if design.kind == "factorial":
        cells = [
            dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(f.values for f in factors))
        ]
    elif design.kind == "random":
        assert design.n is not None
        total = 1
        for f in factors:
            total *= len(f.values)
        if design.n > total:
            raise ctx.fail(
                "design.n",
                f"asks for {design.n} distinct combinations but only {total} exist",
                f"use n <= {total}, or `kind: factorial`",
            )
        rng = random.Random(design.seed)
        chosen = sorted(rng.sample(range(total), design.n))
        all_combos = itertools.product(*(f.values for f in factors))
        wanted = set(chosen)
        cells = [dict(zip(names, c, strict=True)) for i, c in enumerate(all_combos) if i in wanted]
    else:
        assert design.path is not None
        cells = read_table(ctx, base_dir / design.path, factors)
    cells = [*cells, *design.coarse]
    seen: set[tuple[str | None, ...]] = set()
    unique: list[Cell] = []
    for cell in cells:
        key = tuple(cell[n] for n in names)
        if key not in seen:
            seen.add(key)
            unique.append(cell)
    return tuple(unique)


def read_table(ctx: Ctx, path: Path, factors: tuple[Factor, ...]) -> list[Cell]:
    import pandas as pd

    if not path.is_file():
        raise ctx.fail(
            "design.path", f"no such file {str(path)!r}", "give a path relative to the study file"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise ctx.fail(
                "design.path", f"unsupported file type {suffix!r}", "use .csv, .jsonl or .parquet"
            )
    except (ValueError, OSError) as err:
        raise ctx.fail(
            "design.path", f"cannot read {path.name}: {err}", "check the file's format"
        ) from None
    names = [f.name for f in factors]
    for col in frame.columns:
        if col not in names:
            raise ctx.fail(
                "design.path",
                f"column {col!r} of {path.name} is not a factor",
                f"rename or drop it; factors are: {', '.join(names)}",
            )
    cells: list[Cell] = []
    for row_i, row in enumerate(frame.to_dict("records")):
        cell: Cell = {n: None for n in names}
        for col_key, v in row.items():
            col = str(col_key)
            if v is None or (isinstance(v, float) and v != v) or v == "":
                continue
            text = str(v)
            factor = next(f for f in factors if f.name == col)
            # JSONL/parquet integer columns with a null become float (30 -> 30.0).
            if text not in factor.values and isinstance(v, float) and v.is_integer():
                text = str(int(v))
            if text not in factor.values:
                raise ctx.fail(
                    "design.path",
                    f"{path.name} row {row_i + 1}, column {col!r}: {text!r} is not a value of the factor",
                    f"use one of: {', '.join(factor.values)}, or leave it empty (unspecified)",
                )
            cell[str(col)] = text
        cells.append(cell)
    if not cells:
        raise ctx.fail("design.path", f"{path.name} has no rows", "add at least one row")
    return cells
