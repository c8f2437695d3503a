"""Probe study files: which targets to probe, at which sites and positions, grouped how.

`load_probe_study` parses a YAML probe study (`probes/organism.yaml` is an example) into a
frozen `ProbeConfig`; every problem raises one `StudyError` naming the file, the field and the
fix. The probes themselves run in `workbench.interp.probing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from workbench.errors import StudyError

CONTROLS = ("shuffled", "control_task")
STAT_TARGETS = ("expected_score", "modal_option_id", "modal_prob", "entropy_bits", "option_mass")
"""Targets read from a distributions run's prompt_stats (joined on prompt_id)."""
RESIDUAL_KINDS = ("hook_embed", "hook_resid_post")
"""Plotted as one residual-stream curve (hook_embed is layer -1)."""


@dataclass(frozen=True)
class ProbeSpec:
    """One target and where to read it."""

    target: str
    """A factor, or a prompt_stats column of the distributions run (`STAT_TARGETS`)."""
    positions: tuple[str, ...] = ("answer",)
    """`answer`, `span_mean:FACTOR` or `span_last:FACTOR`."""
    group_by: str | None = None
    """Overrides the run's `group_by` (e.g. a title target cannot be held out by title)."""
    kind: Literal["auto", "logistic", "ridge"] = "auto"
    """`auto`: ridge for float targets, logistic otherwise."""


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of a probe run (written to its manifest). Also a probe study file's schema."""

    probes: tuple[ProbeSpec, ...]
    name: str = "probes"
    sites: tuple[str, ...] = ("hook_embed", "blocks.*.hook_resid_post")
    """Stored site names or fnmatch patterns."""
    questions: tuple[str, ...] | None = None
    """Only prompts of these questions (None: all)."""
    group_by: str = "persona_id"
    n_folds: int = 5
    controls: tuple[str, ...] = CONTROLS
    C: float = 1.0
    """Inverse L2 strength of logistic probes (sklearn's C, standardized features)."""
    alpha: float = 1.0
    """Ridge penalty (sklearn's alpha, standardized features)."""
    max_iter: int = 500
    seed: int = 0
    opinion: str | None = "expected_score"
    """Target whose answer-position probe is related to every factor (None: skip)."""
    decodable_margin: float = 0.1
    """`decodable` in the summary: metric above chance by this much, and selectivity > 0."""
    drives_tv: float = 0.02
    """`drives` in the summary: mean TV between prompts differing in the factor alone at
    least this large. On the organism, factors with no planted effect measure 0.003-0.008
    (extraction noise) and the weakest planted one (party) 0.045."""
    memory_gb: float = 2.0


# --------------------------------------------------------------------------------------------
# probe study files


_SPEC_FIELDS = ("target", "positions", "group_by", "kind")
_CONFIG_FIELDS = (
    "name",
    "description",
    "sites",
    "questions",
    "group_by",
    "folds",
    "controls",
    "C",
    "alpha",
    "max_iter",
    "seed",
    "opinion",
    "decodable_margin",
    "drives_tv",
    "probes",
)


def load_probe_study(path: str | Path) -> ProbeConfig:
    """Parse a probe study YAML file (examples in `probes/`) into a `ProbeConfig`."""
    file = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise StudyError(file, "(file)", f"cannot read: {err}", "check the path and YAML") from None
    if not isinstance(raw, dict):
        raise StudyError(file, "(file)", "expected a mapping", "write `key: value` lines")
    for key in raw:
        if key not in _CONFIG_FIELDS:
            raise StudyError(
                file, str(key), "unknown field", f"use one of: {', '.join(_CONFIG_FIELDS)}"
            )
    if not isinstance(raw.get("probes"), list) or not raw["probes"]:
        raise StudyError(
            file, "probes", "missing or empty", "list `- {target: actor, positions: [answer]}`"
        )
    specs = []
    for i, item in enumerate(raw["probes"]):
        if not isinstance(item, dict) or "target" not in item:
            raise StudyError(file, f"probes[{i}]", "needs a `target`", "write `- {target: NAME}`")
        for key in item:
            if key not in _SPEC_FIELDS:
                raise StudyError(
                    file,
                    f"probes[{i}].{key}",
                    "unknown field",
                    f"use one of: {', '.join(_SPEC_FIELDS)}",
                )
        positions = item.get("positions", ["answer"])
        if isinstance(positions, str):
            positions = [positions]
        for j, pos in enumerate(positions):
            if not valid_position(str(pos)):
                raise StudyError(
                    file,
                    f"probes[{i}].positions[{j}]",
                    f"unknown position {pos!r}",
                    "use answer, span_mean:FACTOR or span_last:FACTOR",
                )
        kind = item.get("kind", "auto")
        if kind not in ("auto", "logistic", "ridge"):
            raise StudyError(
                file, f"probes[{i}].kind", f"unknown kind {kind!r}", "use auto, logistic or ridge"
            )
        specs.append(
            ProbeSpec(
                str(item["target"]), tuple(str(p) for p in positions), item.get("group_by"), kind
            )
        )
    controls = tuple(raw.get("controls", CONTROLS))
    for c in controls:
        if c not in CONTROLS:
            raise StudyError(
                file, "controls", f"unknown control {c!r}", f"use {', '.join(CONTROLS)}"
            )
    sites = raw.get("sites", list(ProbeConfig.sites))
    questions = raw.get("questions")
    return ProbeConfig(
        probes=tuple(specs),
        name=str(raw.get("name", Path(path).stem)),
        sites=tuple([sites] if isinstance(sites, str) else sites),
        questions=None if questions is None else tuple(questions),
        group_by=str(raw.get("group_by", "persona_id")),
        n_folds=int(raw.get("folds", 5)),
        controls=controls,
        C=float(raw.get("C", 1.0)),
        alpha=float(raw.get("alpha", 1.0)),
        max_iter=int(raw.get("max_iter", 500)),
        seed=int(raw.get("seed", 0)),
        opinion=raw.get("opinion", "expected_score"),
        decodable_margin=float(raw.get("decodable_margin", 0.1)),
        drives_tv=float(raw.get("drives_tv", 0.02)),
    )


def valid_position(pos: str) -> bool:
    kind, _, factor = pos.partition(":")
    return pos == "answer" or (kind in ("span_mean", "span_last") and bool(factor))


def split_position(pos: str) -> tuple[str, str | None]:
    kind, _, factor = pos.partition(":")
    return kind, factor or None
