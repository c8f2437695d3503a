"""Valid study files parse into the expected designs, cells, labels and ordinal values."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import example_study_dict

from workbench.study.load import load_study, parse_study
from workbench.study.spec import Study


def load(tmp_path: Path, study: dict[str, Any]) -> Study:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return load_study(path)


def cell(party: str | None = None, age: str | None = None, movie: str | None = None) -> dict:
    return {"party": party, "age": age, "movie": movie}


def test_example_study_defaults(tmp_path: Path) -> None:
    study = load(tmp_path, example_study_dict())
    assert study.name == "example"
    assert study.path == str(tmp_path / "study.yaml")
    assert study.seed == 0
    assert [f.name for f in study.factors] == ["party", "age", "movie"]
    assert study.persona_factors == ("party", "age")
    assert study.factor("movie").role == "stimulus"
    assert study.design.kind == "factorial"
    assert study.orders.kind == "canonical"
    assert study.template.format == "plain"
    assert study.template.option_line == "{label}. {text}"
    assert study.template.option_separator == "\n"
    scoring = study.scoring
    assert (scoring.method, scoring.target, scoring.aggregate) == ("next_token", "label", "sum")
    assert scoring.variants == (" {}", "{}")
    like = study.questions[0]
    assert like.options == ("Yes", "No")
    assert like.refusal == ("Don't know",)
    assert like.all_options == ("Yes", "No", "Don't know")
    assert like.values is None


def test_sequence_scoring_defaults_to_text_target(tmp_path: Path) -> None:
    raw = example_study_dict()
    raw["scoring"] = {"method": "sequence", "aggregate": "max"}
    scoring = load(tmp_path, raw).scoring
    assert (scoring.target, scoring.variants, scoring.aggregate) == ("text", (" {}",), "max")


def test_parse_study_accepts_a_mapping() -> None:
    study = parse_study(example_study_dict(), "inline.yaml")
    assert study.path == "inline.yaml"
    assert len(study.cells) == 8


def test_factorial_design_cells_in_product_order(tmp_path: Path) -> None:
    study = load(tmp_path, example_study_dict())
    expected = [
        cell(p, a, m)
        for p, a, m in itertools.product(["Democrat", "Republican"], ["30", "60"], ["Up", "Jaws"])
    ]
    assert list(study.cells) == expected


def test_random_design_is_seeded_and_distinct(tmp_path: Path) -> None:
    raw = example_study_dict()
    raw["design"] = {"kind": "random", "n": 5, "seed": 3}
    first = load(tmp_path, raw).cells
    again = load(tmp_path, raw).cells
    assert first == again
    assert len(first) == 5
    assert len({tuple(c.values()) for c in first}) == 5
    everything = load(tmp_path, example_study_dict()).cells
    assert all(c in everything for c in first)
    seeds = []
    for seed in range(6):
        raw["design"]["seed"] = seed
        seeds.append(load(tmp_path, raw).cells)
    assert len({tuple(tuple(c.values()) for c in cells) for cells in seeds}) > 1
    raw["design"] = {"kind": "random", "n": 8}
    assert sorted(map(str, load(tmp_path, raw).cells)) == sorted(map(str, everything))


TABLE_ROWS = [
    {"party": "Democrat", "age": "30", "movie": "Up"},
    {"party": "Republican", "age": None, "movie": "Jaws"},  # coarse: age unspecified
    {"party": None, "age": None, "movie": "Up"},
]


def _write_table(path: Path) -> None:
    if path.suffix == ".csv":
        lines = ["party,age,movie"] + [
            ",".join(v or "" for v in row.values()) for row in TABLE_ROWS
        ]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif path.suffix == ".jsonl":
        # Integer ages with a null in the column: pandas reads the column as float (30.0).
        rows = [{**row, "age": int(row["age"]) if row["age"] else None} for row in TABLE_ROWS]
        rows[2] = {"movie": "Up"}  # missing keys are unspecified too
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        pd.DataFrame(TABLE_ROWS).to_parquet(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_table_design(tmp_path: Path, suffix: str) -> None:
    (tmp_path / "tables").mkdir()
    _write_table(tmp_path / "tables" / f"cells{suffix}")
    raw = example_study_dict()
    raw["design"] = {"kind": "table", "path": f"tables/cells{suffix}"}
    study = load(tmp_path, raw)
    assert study.design.path == f"tables/cells{suffix}"
    assert list(study.cells) == [
        cell("Democrat", "30", "Up"),
        cell("Republican", None, "Jaws"),
        cell(None, None, "Up"),
    ]


def test_table_subset_of_columns_leaves_the_rest_unspecified(tmp_path: Path) -> None:
    (tmp_path / "cells.csv").write_text("party\nDemocrat\nDemocrat\n", encoding="utf-8")
    raw = example_study_dict()
    raw["design"] = {"kind": "table", "path": "cells.csv"}
    assert list(load(tmp_path, raw).cells) == [cell("Democrat")]  # duplicates dropped


def test_coarse_cells_follow_the_design(tmp_path: Path) -> None:
    raw = example_study_dict()
    raw["design"] = {
        "kind": "factorial",
        "coarse": [{"party": "Democrat"}, {"party": "Republican", "age": None}, {}],
    }
    study = load(tmp_path, raw)
    assert len(study.cells) == 8 + 3
    assert list(study.cells[8:]) == [cell("Democrat"), cell("Republican"), cell()]
    assert study.design.coarse[0] == cell("Democrat")


def test_coarse_cell_equal_to_a_full_cell_is_not_repeated(tmp_path: Path) -> None:
    raw = example_study_dict()
    raw["design"] = {"coarse": [{"party": "Democrat", "age": "30", "movie": "Up"}]}
    assert len(load(tmp_path, raw).cells) == 8


def test_weights_are_normalized(tmp_path: Path) -> None:
    raw = example_study_dict()
    raw["factors"][0]["weights"] = [1, 3]
    raw["factors"][1]["weights"] = [0.2, 0.2]
    study = load(tmp_path, raw)
    assert study.factor("party").weights == pytest.approx((0.25, 0.75))
    assert study.factor("age").weights == pytest.approx((0.5, 0.5))
    assert study.factor("movie").weights is None


def test_numeric_factor_values_become_text(tmp_path: Path) -> None:
    raw = example_study_dict()
    raw["factors"][1]["values"] = [30, 60]
    assert load(tmp_path, raw).factor("age").values == ("30", "60")


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (None, ("A", "B", "C")),
        ("letters", ("A", "B", "C")),
        ("numbers", ("1", "2", "3")),
        ("texts", "texts"),
        (["yes", "no", "dk"], ("yes", "no", "dk")),
    ],
)
def test_labels(tmp_path: Path, labels: Any, expected: Any) -> None:
    raw = example_study_dict()
    if labels is not None:
        raw["questions"][0]["labels"] = labels
    like = load(tmp_path, raw).questions[0]
    assert like.labels == expected
    shown = [like.label_at(pos, text) for pos, text in enumerate(like.all_options)]
    assert shown == (list(like.all_options) if expected == "texts" else list(expected))


def test_labels_count_refusal_positions(tmp_path: Path) -> None:
    raw = example_study_dict()
    raw["questions"][0]["labels"] = "numbers"
    raw["questions"][0]["refusal"] = ["Don't know", "Refused"]
    like = load(tmp_path, raw).questions[0]
    assert like.labels == ("1", "2", "3", "4")
    assert like.label_at(3, "Refused") == "4"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, None),
        ({"ordinal": False}, None),
        ({"ordinal": True}, (1.0, 2.0, 3.0)),
        ({"values": [1, 2, 1.5]}, (1.0, 2.0, 1.5)),  # OpinionQA's middle "neither"
        ({"ordinal": True, "values": [0, -1, 4]}, (0.0, -1.0, 4.0)),
    ],
)
def test_ordinal_values(tmp_path: Path, spec: dict[str, Any], expected: Any) -> None:
    raw = example_study_dict()
    raw["questions"][1].update(spec)
    raw["questions"][1]["refusal"] = ["Refused"]  # refusal options carry no value
    assert load(tmp_path, raw).questions[1].values == expected


def test_chat_template_fields(tmp_path: Path) -> None:
    raw = example_study_dict()
    raw["template"] = {
        "format": "chat",
        "persona": "I am {age}.",
        "system": "{persona}",
        "user": "{question}\n{options}",
        "prefill": "Answer: (",
        "option_line": "({label}) {text}",
        "option_separator": " ",
    }
    t = load(tmp_path, raw).template
    assert t.format == "chat"
    assert t.persona == ("I am {age}.",)
    assert (t.system, t.user, t.prefill, t.prompt) == (
        "{persona}",
        raw["template"]["user"],
        "Answer: (",
        None,
    )
    assert (t.option_line, t.option_separator) == ("({label}) {text}", " ")


def test_trailing_whitespace_allowed_under_sequence_scoring(tmp_path: Path) -> None:
    raw = example_study_dict()
    raw["template"]["prompt"] += " "
    raw["scoring"] = {"method": "sequence"}
    assert load(tmp_path, raw).template.prompt.endswith("Answer: ")


def test_orders_defaults(tmp_path: Path) -> None:
    raw = example_study_dict()
    raw["orders"] = {"kind": "random", "seed": 7}
    orders = load(tmp_path, raw).orders
    assert (orders.kind, orders.k, orders.cap, orders.seed) == ("random", 4, 24, 7)


def test_raw_is_recorded(tmp_path: Path) -> None:
    raw = example_study_dict()
    raw["description"] = "for the manifest"
    assert load(tmp_path, raw).raw == raw
