"""Probes on stored activations: which traits are decodable, where, and whether the model's
opinion representation tracks them.

A probe run reads an activations run (`workbench.activations`) and, for every site x position
x target asked, fits linear probes with grouped cross-validation and two controls
(REFERENCE.md §5):

- categorical targets (a factor, the modal option) get multinomial logistic probes scored by
  accuracy; continuous targets (the expected score from a distributions run) get ridge
  probes scored by R² on each held-out fold (against that fold's own mean, as sklearn's
  `r2_score`);
- folds hold out whole groups (`group_by`: `title` for unseen movies, `persona_id` for unseen
  personas), so a probe never scores on a group it was fitted on;
- `shuffled`: labels permuted across rows; `control_task`: Hewitt & Liang, one random label
  per *type*. A prompt-level probe's "word type" is the prompt's content, so a type is the
  question plus every factor value that does not identify the held-out group (for
  `group_by: title` the title is left out; for `persona_id` the persona factors are). Types
  therefore recur across folds, as word types recur across sentences, and a probe can score
  on the control task only by memorizing types. `selectivity` = metric - control-task metric.

Decodable is not the same as used: a trait in the prompt is decodable whether or not it
drives the answer. `opinion` relates the probe of the model's answer (e.g. `expected_score`
at the answer position) to each factor two ways, per layer: the share of the opinion probe's
out-of-fold prediction variance explained by the factor (eta², "what the opinion probe
reads"), and the cosine between the opinion direction and the factor probe's subspace (its
class directions, centred; a random direction's expected value is sqrt((C-1)/d_model)). Beside
them, `behaviour` is each factor's counterfactual effect from a distributions run: the mean
total variation between answer distributions of prompts that differ in that factor only.

Outputs (file names in `workbench.runs`): probes.parquet, relation.parquet,
behaviour.parquet, decodable_vs_drives.parquet, directions.safetensors (probe weights fitted on
all rows, raw activation coordinates: score = x @ weight + bias), accuracy_by_layer.png, and
manifest.json last.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
import yaml

from workbench.activations import ActivationStore, Site
from workbench.errors import StudyError, WorkbenchError
from workbench.opinion import (
    SUMMARY_COLUMNS,
    behavioural_effects,
    decodable_vs_drives,
    opinion_relation,
    row_keys,
)
from workbench.probe_fit import (
    CVTask,
    control_task_labels,
    cross_validate,
    grouped_folds,
    shuffled_labels,
)
from workbench.runs import DIRECTIONS, PROBES, RunFolder

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from workbench.distributions import DistributionResult
    from workbench.report import Block

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


@dataclass
class ProbeResult:
    """The tables of a probe run (see the module docstring for every column)."""

    probes: pd.DataFrame
    relation: pd.DataFrame
    behaviour: pd.DataFrame
    summary: pd.DataFrame
    """Decodable vs drives the answer, one row per factor."""
    directions: dict[str, torch.Tensor] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


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
            if not _valid_position(str(pos)):
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


def _valid_position(pos: str) -> bool:
    kind, _, factor = pos.partition(":")
    return pos == "answer" or (kind in ("span_mean", "span_last") and bool(factor))


def _split_position(pos: str) -> tuple[str, str | None]:
    kind, _, factor = pos.partition(":")
    return kind, factor or None


# --------------------------------------------------------------------------------------------
# running


@dataclass
class _Task:
    target: str
    control: str
    group_by: str
    classes: list[str]
    cv: CVTask


def run_probes(
    store: ActivationStore,
    config: ProbeConfig,
    out_dir: str | Path | None = None,
    *,
    distributions: DistributionResult | str | Path | None = None,
    overwrite: bool = False,
) -> ProbeResult:
    """Fit every probe of `config` on `store`; write a probe run folder when `out_dir` is given.

    `distributions` (a result or a finished run folder of the same study and model) supplies
    `STAT_TARGETS` and the behavioural effects.
    """
    t0 = time.time()
    stats, dist = _distributions_tables(store, distributions)
    prompts = store.prompts
    if config.questions is not None:
        prompts = prompts[prompts["question_id"].isin(config.questions)]
    factor_names = [c for c in _factor_columns(store)]
    kinds = _site_kinds(store, config.sites)
    groups: dict[tuple[str, str | None], list[ProbeSpec]] = {}
    for spec in config.probes:
        if spec.target not in factor_names and spec.target not in STAT_TARGETS:
            raise WorkbenchError(
                f"unknown probe target {spec.target!r}",
                fix=f"use a factor ({', '.join(factor_names)}) or one of {', '.join(STAT_TARGETS)}",
            )
        if spec.target in STAT_TARGETS and stats is None:
            raise WorkbenchError(
                f"target {spec.target!r} needs a distributions run",
                fix="pass --distributions DIR (a finished distributions run of the same study)",
            )
        for pos in spec.positions:
            groups.setdefault(_split_position(pos), []).append(spec)

    rows: list[dict[str, Any]] = []
    directions: dict[str, torch.Tensor] = {}
    oof: dict[tuple[str, str], np.ndarray] = {}
    """(site, target) -> out-of-fold predictions [n] at the answer position."""
    opinion_frames: dict[str, pd.DataFrame] = {}
    """site kind -> the answer-position rows the opinion probe was fitted on."""
    for (position, factor), specs in groups.items():
        X, sites, frame = _stack_kinds(store, kinds, position, factor, prompts["prompt_id"])
        if stats is not None:
            frame = frame.merge(stats, on="prompt_id", how="left")
        tasks = [t for spec in specs for t in _tasks(spec, frame, factor_names, config)]
        pos_label = position if factor is None else f"{position}:{factor}"
        for kind_name in ("logistic", "ridge"):
            batch = [t for t in tasks if t.cv.kind == kind_name]
            if not batch:
                continue
            cv = cross_validate(
                X,
                [t.cv for t in batch],
                C=config.C,
                alpha=config.alpha,
                max_iter=config.max_iter,
                memory_gb=config.memory_gb,
            )
            for ti, task in enumerate(batch):
                for li, site in enumerate(sites):
                    folds = cv.scores[ti, :, li]
                    folds = folds[~np.isnan(folds)]
                    rows.append(
                        {
                            "site": site.name,
                            "site_kind": site.kind,
                            "layer": site.layer,
                            "position": position,
                            "factor": factor,
                            "position_label": pos_label,
                            "target": task.target,
                            "probe": task.cv.kind,
                            "metric": "accuracy" if task.cv.kind == "logistic" else "r2",
                            "control": task.control,
                            "group_by": task.group_by,
                            "n_folds": len(folds),
                            "n": int((task.cv.folds >= 0).sum()),
                            "n_classes": len(task.classes) if task.classes else None,
                            "fold_scores": folds.tolist(),
                            "mean": float(folds.mean()),
                            "sd": float(folds.std()),
                            "chance": float(np.nanmean(cv.chance[ti, :, li])),
                        }
                    )
                    if task.control == "none":
                        key = f"{task.target}|{pos_label}|{site.name}"
                        directions[f"{key}|weight"] = cv.fit.weight[ti, -1, li].contiguous()
                        directions[f"{key}|bias"] = cv.fit.bias[ti, -1, li].contiguous()
                        if position == "answer":
                            oof[(site.name, task.target)] = cv.predictions[ti, li]
                if (
                    task.control == "none"
                    and position == "answer"
                    and task.target == config.opinion
                ):
                    opinion_frames.update(dict.fromkeys(kinds, frame))
    probes = _with_selectivity(pd.DataFrame(rows))
    behaviour = (
        behavioural_effects(prompts, dist, stats, factor_names)
        if dist is not None and stats is not None
        else pd.DataFrame()
    )
    relation = pd.DataFrame()
    if config.opinion is not None and opinion_frames:
        held_out = next(
            (p.group_by for p in config.probes if p.target == config.opinion and p.group_by),
            config.group_by,
        )
        relation = opinion_relation(
            probes, directions, oof, opinion_frames, config.opinion, held_out, factor_names
        )
    summary = decodable_vs_drives(
        probes,
        relation,
        behaviour,
        factor_names,
        decodable_margin=config.decodable_margin,
        drives_tv=config.drives_tv,
    )
    manifest: dict[str, Any] = {
        "kind": "probes",
        "activations": str(store.path),
        "config": asdict(config),
        "model": store.manifest.get("model", {}),
        "study": store.manifest.get("study", {}).get("name"),
        "counts": {"probe_rows": len(probes), "directions": len(directions) // 2},
        "timings_s": {"total": round(time.time() - t0, 3)},
    }
    result = ProbeResult(probes, relation, behaviour, summary, directions, manifest)
    if out_dir is not None:
        result.out_dir = _write(result, out_dir, store, config, overwrite)
    return result


def _stack_kinds(
    store: ActivationStore,
    kinds: Sequence[str],
    position: str,
    factor: str | None,
    prompt_ids: pd.Series,
) -> tuple[torch.Tensor, list[Site], pd.DataFrame]:
    """Every layer of every site kind at one position, on the prompts they all have:
    X [site, prompt, d_model]. Sites are independent problems over the same rows, so one
    `cross_validate` call fits them all (hook_embed and the residual stream together)."""
    stacks = [store.stack(kind, position, factor) for kind in kinds]
    common = set(prompt_ids)
    for _, _, frame in stacks:
        common &= set(frame["prompt_id"])
    ids = sorted(common)
    xs, sites = [], []
    for X, kind_sites, frame in stacks:
        pos = frame.reset_index(drop=True).reset_index().set_index("prompt_id").loc[ids, "index"]
        xs.append(X[:, torch.tensor(pos.to_numpy())])
        sites += kind_sites
    frame = stacks[0][2].set_index("prompt_id").loc[ids].reset_index()
    return torch.cat(xs), sites, frame


def _factor_columns(store: ActivationStore) -> list[str]:
    study = store.manifest.get("study", {}).get("definition", {})
    return [str(f["name"]) for f in study.get("factors", [])]


def _site_kinds(store: ActivationStore, patterns: Sequence[str]) -> list[str]:
    stored = store.index.drop_duplicates("site")[["site", "site_kind"]]
    kinds: list[str] = []
    for pattern in patterns:
        hits = stored[[fnmatch.fnmatchcase(s, pattern) for s in stored["site"]]]
        if hits.empty:
            raise WorkbenchError(
                f"site {pattern!r} matches no stored site",
                fix=f"stored sites: {', '.join(stored['site'].head(8))} ...",
            )
        kinds += [k for k in hits["site_kind"].unique() if k not in kinds]
    return kinds


def _distributions_tables(
    store: ActivationStore, distributions: DistributionResult | str | Path | None
) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """prompt_stats and distributions of a distributions run, checked to share the prompts."""
    if distributions is None:
        return None, None
    if isinstance(distributions, str | Path):
        path = Path(distributions)
        if not (path / "manifest.json").is_file():
            raise WorkbenchError(
                f"{path} is not a finished distributions run", fix="run `workbench distributions`"
            )
        prompts = pd.read_parquet(path / "prompts.parquet")
        stats = pd.read_parquet(path / "prompt_stats.parquet")
        dist = pd.read_parquet(path / "distributions.parquet")
    else:
        prompts, stats, dist = (
            distributions.prompts,
            distributions.prompt_stats,
            distributions.distributions,
        )
    mine = store.prompts.set_index("prompt_id")["prompt"]
    theirs = prompts.set_index("prompt_id")["prompt"].reindex(mine.index)
    if not (theirs == mine).all():
        raise WorkbenchError(
            "the distributions run holds other prompts than the activations run",
            fix="run both on the same study file and model",
        )
    return stats[["prompt_id", *[c for c in STAT_TARGETS if c in stats.columns]]], dist


def _tasks(
    spec: ProbeSpec, frame: pd.DataFrame, factor_names: list[str], config: ProbeConfig
) -> list[_Task]:
    """The real task and its controls, on the rows of `frame`."""
    group_by = spec.group_by or config.group_by
    if group_by not in frame.columns:
        raise WorkbenchError(
            f"cannot group by {group_by!r}", fix="use persona_id, question_id or a factor"
        )
    values = frame[spec.target]
    kind = spec.kind
    if kind == "auto":
        kind = "ridge" if pd.api.types.is_float_dtype(values) else "logistic"
    valid = values.notna().to_numpy()
    if kind == "logistic":
        classes = sorted(values[valid].astype(str).unique())
        code = {c: i for i, c in enumerate(classes)}
        y: np.ndarray = np.array(
            [code[str(v)] if ok else -1 for v, ok in zip(values, valid, strict=True)]
        )
    else:
        classes = []
        y = values.astype("float64").to_numpy()
    groups = frame[group_by].where(valid, None).to_numpy()
    folds = grouped_folds(groups, config.n_folds)
    n_classes = len(classes)
    tasks = [_Task(spec.target, "none", group_by, classes, CVTask(kind, y, folds, n_classes))]
    seed = config.seed + sum(map(ord, spec.target))
    if "shuffled" in config.controls:
        shuffled = CVTask(kind, shuffled_labels(y, valid, seed), folds, n_classes)
        tasks.append(_Task(spec.target, "shuffled", group_by, classes, shuffled))
    if "control_task" in config.controls:
        types = control_types(frame, ["question_id", *factor_names], group_by)
        control = CVTask(kind, control_task_labels(y, valid, types, seed + 1), folds, n_classes)
        tasks.append(_Task(spec.target, "control_task", group_by, classes, control))
    return tasks


def control_types(frame: pd.DataFrame, columns: Sequence[str], group_by: str) -> np.ndarray:
    """A prompt's control-task type: its values of `columns`, leaving out the held-out group's
    column and every column the group determines (so types recur across folds)."""
    keep = []
    for c in columns:
        if c == group_by or c not in frame.columns:
            continue
        per_group = frame.groupby(group_by, dropna=False)[c].nunique(dropna=False)
        if (per_group <= 1).all() and frame[c].nunique(dropna=False) > 1:
            continue  # a function of the group: it would identify the held-out group
        keep.append(c)
    if not keep:
        return np.zeros(len(frame), dtype=np.int64)
    return row_keys(frame, keep)


def _with_selectivity(probes: pd.DataFrame) -> pd.DataFrame:
    if probes.empty:
        return probes
    keys = ["site", "position_label", "target"]
    control = probes[probes["control"] == "control_task"].set_index(keys)["mean"]
    real = probes["control"] == "none"
    joined = probes.loc[real, keys].merge(
        control.rename("_control").reset_index(), on=keys, how="left"
    )
    probes["selectivity"] = np.nan
    probes.loc[real, "selectivity"] = (
        probes.loc[real, "mean"].to_numpy() - joined["_control"].to_numpy()
    )
    return probes


# --------------------------------------------------------------------------------------------
# output


def _write(
    result: ProbeResult,
    out_dir: str | Path,
    store: ActivationStore,
    config: ProbeConfig,
    overwrite: bool,
) -> Path:
    from safetensors.torch import save_file

    identity = {"kind": "probes", "activations": str(store.path), "config": asdict(config)}
    run = RunFolder(out_dir, identity, overwrite=overwrite)
    run.write_table(PROBES, result.probes)
    for name in ("relation", "behaviour"):
        run.write_table(name, getattr(result, name))
    run.write_table("decodable_vs_drives", result.summary)
    save_file(result.directions, str(run.path / DIRECTIONS))
    fig = accuracy_figure(result.probes)
    fig.savefig(run.path / "accuracy_by_layer.png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    run.finish(result.manifest)
    return run.path


def accuracy_figure(probes: pd.DataFrame) -> Figure:
    """Metric by layer per target: one line per position (residual stream: hook_embed is
    layer -1), solid = probe, dashed = control task, dotted = shuffled labels."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    targets = list(dict.fromkeys(probes["target"]))
    cols = min(3, len(targets))
    nrows = (len(targets) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    styles = {"none": "-", "control_task": "--", "shuffled": ":"}
    for ax, target in zip(axes.ravel(), targets, strict=False):
        sub = probes[probes["target"] == target]
        family = np.where(sub["site_kind"].isin(RESIDUAL_KINDS), "resid", sub["site_kind"])
        sub = sub.assign(family=family)
        colors: dict[str, Any] = {}
        for (fam, pos, control), grp in sub.groupby(["family", "position_label", "control"]):
            label = f"{pos}" if fam == "resid" else f"{fam} {pos}"
            color = colors.setdefault(label, f"C{len(colors) % 10}")
            grp = grp.sort_values("layer")
            ax.plot(
                grp["layer"],
                grp["mean"],
                styles.get(str(control), "-"),
                color=color,
                marker="o" if control == "none" else None,
                ms=3,
                label=label if control == "none" else None,
            )
        metric = str(sub["metric"].iloc[0])
        ax.set_title(f"{target} ({metric})", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (-1 = embeddings)")
        ax.set_ylim(min(0.0, float(sub["mean"].min())) if metric == "r2" else 0.0, 1.02)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(targets) :]:
        ax.axis("off")
    fig.suptitle("Probe metric by layer (solid: probe, dashed: control task, dotted: shuffled)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# demo


ORGANISM_PROBES = ProbeConfig(
    name="organism-traits",
    probes=(
        ProbeSpec("actor", ("answer", "span_mean:actor", "span_last:actor")),
        ProbeSpec("genre", ("answer", "span_last:genre")),
        ProbeSpec("favourite_genre", ("answer", "span_last:favourite_genre")),
        ProbeSpec("party", ("answer", "span_last:party")),
        ProbeSpec("region", ("answer", "span_last:region")),
        ProbeSpec("age", ("answer",)),
        ProbeSpec("title", ("answer", "span_last:title"), group_by="persona_id"),
        ProbeSpec("expected_score", ("answer",)),
        ProbeSpec("modal_option_id", ("answer",)),
    ),
    sites=("hook_embed", "blocks.*.hook_resid_post"),
    questions=("rating",),
    group_by="title",
    opinion="expected_score",
)
"""The organism's probe study (also `probes/organism.yaml`; a test keeps the two equal).
Unseen movies: held-out titles are the CV groups; the title itself is probed across personas
(a probe cannot name a title it never saw)."""


def demo_blocks(
    organism_folder: Path, out: Path, lm: Any, distributions_result: DistributionResult
) -> list[Block]:
    """Capture activations on the organism, run its probe study, return report blocks."""
    from workbench.activations import ActivationConfig, capture_activations
    from workbench.report import Figure_, Table, Text
    from workbench.study import load_study

    study = load_study(organism_folder / "study.yaml")
    config = ORGANISM_PROBES
    factors = sorted(
        {f for s in config.probes for p in s.positions if (f := _split_position(p)[1])}
    )
    acts = capture_activations(
        study,
        lm,
        out / "activations",
        ActivationConfig(
            sites=config.sites,
            positions=("answer", "span_mean", "span_last"),
            factors=tuple(factors),
            questions=config.questions,
            store_dtype="float32",
            progress=False,
        ),
        log=lambda _: None,
    )
    result = run_probes(acts, config, out / "probes", distributions=distributions_result)
    best = result.probes[result.probes["control"] == "none"].sort_values("mean", ascending=False)
    best = best.drop_duplicates(["target", "position_label"])
    best_table = best[
        ["target", "position_label", "site", "mean", "chance", "selectivity", "n_folds"]
    ]
    summary = result.summary
    measured = summary.dropna(subset=["behaviour_tv"])
    zero = measured[measured["factor"].isin(["title", "region", "age"])]
    zero_text = ", ".join(f"{r.factor} {r.behaviour_tv:.3f}" for r in zero.itertuples())
    strongest = measured.sort_values("behaviour_tv", ascending=False).head(1)
    read = summary.dropna(subset=["opinion_eta2"]).sort_values("opinion_eta2", ascending=False)
    verdict = (
        f"The planted zero-effect factors move the rating distribution by a mean TV of "
        f"{zero_text} when they alone change, against {strongest['behaviour_tv'].iloc[0]:.3f} "
        f"for {strongest['factor'].iloc[0]}: they are in the prompt and decodable, but they do "
        "not drive the answer. "
        if len(zero) and len(strongest)
        else ""
    )
    if len(read):
        verdict += (
            f"The opinion probe's prediction is explained best by "
            f"{read['factor'].iloc[0]} (eta² {read['opinion_eta2'].iloc[0]:.2f})."
        )
    shown = summary[[c for c in SUMMARY_COLUMNS if not c.endswith("_site")]]
    return [
        Text(
            "Linear probes on the residual stream (layer -1 = embeddings) at the answer position "
            "and at each factor's token span, cross-validated with whole titles held out "
            "(`group_by: title`; the title itself is held out by persona). Controls: shuffled "
            "labels and Hewitt-Liang control tasks (a random label per prompt type); "
            "selectivity = accuracy - control-task accuracy. The opinion probe reads the "
            "model's expected rating at the answer position (R²)."
        ),
        Table(best_table.reset_index(drop=True), "best layer per target and position"),
        Figure_(accuracy_figure(result.probes), "probe_accuracy", "probe metric by layer"),
        Text(
            "Decodable is not the same as used. Every factor is in the prompt, so it can be "
            "decoded from its own span; whether it drives the answer is a behavioural question, "
            "answered by prompts that differ in that factor alone (behaviour_tv: mean total "
            "variation of the rating distribution; empty where the design has no such pair). "
            "opinion_eta2: share of the opinion probe's held-out predictions explained by the "
            "factor; opinion_cos: cosine of the opinion direction with the factor probe's "
            "subspace (cos_null: a random direction). " + verdict
        ),
        Table(shown, "decodable vs drives the answer, per factor (best layer)"),
    ]
