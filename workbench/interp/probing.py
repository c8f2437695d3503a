"""Probes on stored activations: which traits are decodable, where, and whether the model's
opinion representation tracks them.

A probe run reads an activations run (`workbench.interp.activations`) and, for every site x position
x target asked, fits linear probes with grouped cross-validation and two controls
(docs/MEASUREMENT.md §5):

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
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from workbench.errors import WorkbenchError
from workbench.interp.activations import ActivationStore
from workbench.interp.fit import (
    CVTask,
    control_task_labels,
    cross_validate,
    grouped_folds,
    shuffled_labels,
)
from workbench.interp.opinion import (
    behavioural_effects,
    decodable_vs_drives,
    opinion_relation,
    row_keys,
)
from workbench.interp.probe_study import (
    RESIDUAL_KINDS,
    STAT_TARGETS,
    ProbeConfig,
    ProbeSpec,
    split_position,
)
from workbench.interp.sites import Site
from workbench.runs import DIRECTIONS, PROBES, RunFolder

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from workbench.measure.distributions import DistributionResult


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
            groups.setdefault(split_position(pos), []).append(spec)

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
    """Metric by layer per target: one colour and marker per position (residual stream:
    hook_embed is layer -1), solid = probe, dashed = control task, dotted = shuffled labels.
    Markers are hollow and shrink per position, so curves that coincide (two positions both
    at 1.0) stay visible; each panel's legend sits under it, off the curves."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    targets = list(dict.fromkeys(probes["target"]))
    cols = min(3, len(targets))
    nrows = (len(targets) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.9 * nrows), squeeze=False)
    styles = {"none": "-", "control_task": "--", "shuffled": ":"}
    markers = ("o", "s", "^", "D", "v", "P")
    for ax, target in zip(axes.ravel(), targets, strict=False):
        sub = probes[probes["target"] == target]
        family = np.where(sub["site_kind"].isin(RESIDUAL_KINDS), "resid", sub["site_kind"])
        sub = sub.assign(family=family)
        seen: dict[str, int] = {}
        for (fam, pos, control), grp in sub.groupby(["family", "position_label", "control"]):
            label = f"{pos}" if fam == "resid" else f"{fam} {pos}"
            i = seen.setdefault(label, len(seen))
            grp = grp.sort_values("layer")
            probe = control == "none"
            ax.plot(
                grp["layer"],
                grp["mean"],
                styles.get(str(control), "-"),
                color=f"C{i % 10}",
                marker=markers[i % len(markers)] if probe else None,
                ms=max(3.0, 7.0 - 1.5 * i),
                mfc="none",
                lw=1.2 if probe else 0.9,
                label=label if probe else None,
            )
        metric = str(sub["metric"].iloc[0])
        ax.set_title(f"{target} ({metric})", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (-1 = embeddings)")
        # headroom above 1.0: markers of a perfect probe are not cut in half
        ax.set_ylim(min(0.0, float(sub["mean"].min())) if metric == "r2" else 0.0, 1.08)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(
                fontsize=7,
                loc="upper center",
                bbox_to_anchor=(0.5, -0.2),
                ncol=min(3, len(seen)),
                frameon=False,
            )
    for ax in axes.ravel()[len(targets) :]:
        ax.axis("off")
    fig.suptitle("Probe metric by layer (solid: probe, dashed: control task, dotted: shuffled)")
    fig.tight_layout()
    return fig
