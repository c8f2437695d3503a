"""Probe runs as interventions: a probe's class direction (steering) and its subspace (mediation).

A probe run (`workbench.interp.probing`) stores, per target x position x site, the weights of
the probe fitted on every row, in raw activation coordinates (`directions.safetensors`,
`{target}|{position_label}|{site}|weight` [d_model, out] and `|bias` [out]). Class names are
not stored: a logistic probe's columns are the sorted string values of the target on the rows
it was fitted on, which are read back from the activations run the probe run names in its
manifest (the same rows, the same order).

Direction of a probe (`kind`):

- `pattern` (default): the probe's *activation pattern* (Haufe et al. 2014), A = Cov(X) W on
  the probe's own rows X. A decoder's weights point where the class is easiest to *read*
  (they cancel noise, so they lean on low-variance coordinates); the pattern points where the
  class *is*, the direction in which activations of that class differ. For a logistic probe,
  class c's direction is A[:, c] - mean_k A[:, k]; for ridge, A[:, 0]. On the small organism
  the actor's weight direction moves the rating at most 0.3 of the way to the target actor
  and its 7-dim weight subspace mediates 0.16-0.3 of the actor effect; the pattern direction
  moves it 0.89 of the way and the pattern subspace mediates 0.85.
- `weight`: the weights themselves, W[:, c] - mean_k W[:, k] (ridge: W[:, 0]).

Subspace of a probe: the span of its centred class directions (rank C - 1 for C classes; 1
for ridge), orthonormalized (SVD, singular values below 1e-6 of the largest dropped).

The shuffled-label probe (a steering placebo) is not stored by probe runs: it is refitted
here on the same rows with the probe run's own settings and seed (`shuffled_labels(y, valid,
config.seed + sum(map(ord, target)))`, as `probing._tasks` does), with every row as training
rows. `probe_matrix(..., control="none")` refits the real probe the same way; a test checks
it equals the stored weights, which pins the class order and the rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.interp.activations import ActivationStore
from workbench.interp.fit import fit_logistic, fit_ridge, shuffled_labels
from workbench.interp.probe_study import split_position
from workbench.runs import DIRECTIONS, MANIFEST, PROBES

DirectionKind = Literal["pattern", "weight"]


@dataclass(frozen=True)
class ProbeKey:
    """One stored probe: a target read at a position label and a site."""

    target: str
    position: str
    """Position label: `answer`, `span_mean:FACTOR` or `span_last:FACTOR`."""
    site: str


@dataclass
class ProbeRun:
    """A finished probe run: its stored weights and, lazily, the activations they came from."""

    path: Path
    weights: dict[str, Tensor]
    manifest: dict[str, Any]
    probes: pd.DataFrame
    _store: ActivationStore | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> ProbeRun:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / MANIFEST).is_file() or not (path / DIRECTIONS).is_file():
            raise WorkbenchError(
                f"{path} is not a finished probe run (no {MANIFEST} or {DIRECTIONS})",
                fix="pass the folder `workbench probe ACTIVATIONS --out DIR` wrote",
            )
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("kind") != "probes":
            raise WorkbenchError(
                f"{path} holds a {manifest.get('kind')!r} run, not probes",
                fix="pass the folder `workbench probe` wrote",
            )
        probes = pd.read_parquet(path / f"{PROBES}.parquet")
        return cls(path, load_file(str(path / DIRECTIONS)), manifest, probes)

    @property
    def keys(self) -> list[ProbeKey]:
        out = []
        for k in self.weights:
            target, position, site, part = k.split("|")
            if part == "weight":
                out.append(ProbeKey(target, position, site))
        return out

    @property
    def store(self) -> ActivationStore:
        if self._store is None:
            where = Path(str(self.manifest.get("activations", "")))
            if not (where / MANIFEST).is_file():
                raise WorkbenchError(
                    f"the activations run this probe run was fitted on ({where}) is gone",
                    fix="keep the activations run next to its probe run (class names, the "
                    "pattern direction and the shuffled-label probe are read from it), or "
                    "re-run `workbench activations` and `workbench probe`",
                )
            self._store = ActivationStore.open(where)
        return self._store

    def resolve(self, target: str, site: str, position: str | None, prefer: str) -> ProbeKey:
        """The stored probe of `target` at `site` (and `position`, or the one `prefer`s)."""
        mine = [k for k in self.keys if k.target == target]
        if not mine:
            targets = sorted({k.target for k in self.keys})
            raise WorkbenchError(
                f"probe {target!r} is not in {self.path / DIRECTIONS}",
                fix=f"use one of its targets ({', '.join(targets)}), or fit it: add "
                f"`- {{target: {target}}}` to the probe study and re-run `workbench probe`",
            )
        at_site = [k for k in mine if k.site == site]
        if not at_site:
            sites = sorted({k.site for k in mine})
            raise WorkbenchError(
                f"probe {target!r} was not fitted at {site}",
                fix=f"pass --site one of {', '.join(sites)}, or capture and probe {site}",
            )
        labels = [k.position for k in at_site]
        if position is not None:
            if position not in labels:
                raise WorkbenchError(
                    f"probe {target!r} at {site} was not fitted at position {position!r}",
                    fix=f"pass --probe-position one of {', '.join(labels)}",
                )
            return next(k for k in at_site if k.position == position)
        order = {
            "span": ("span_mean", "span_last", "answer"),
            "all": ("span_mean", "span_last", "answer"),
            "answer": ("answer", "span_mean", "span_last"),
        }[prefer]
        for kind in order:
            hits = [k for k in at_site if split_position(k.position)[0] == kind]
            if hits:
                return hits[0]
        return at_site[0]

    def _config(self) -> dict[str, Any]:
        return dict(self.manifest.get("config", {}))

    def kind(self, key: ProbeKey) -> str:
        rows = self.probes[
            (self.probes["target"] == key.target) & (self.probes["site"] == key.site)
        ]
        return str(rows["probe"].iloc[0]) if len(rows) else "logistic"

    def rows(self, key: ProbeKey) -> tuple[Tensor, pd.DataFrame]:
        """The activations [n, d_model] the probe was fitted on, and their index rows."""
        position, factor = split_position(key.position)
        store = self.store
        kinds = store.index[store.index["site"] == key.site]["site_kind"].unique()
        if len(kinds) == 0:
            raise WorkbenchError(
                f"no stored vectors at {key.site} in {store.path}", fix="re-run the capture"
            )
        X, sites, frame = store.stack(str(kinds[0]), position, factor)
        li = [s.name for s in sites].index(key.site)
        questions = self._config().get("questions")
        keep = np.ones(len(frame), dtype=bool)
        if questions is not None:
            keep = frame["question_id"].isin(list(questions)).to_numpy().copy()
        if key.target in frame.columns:
            keep = keep & frame[key.target].notna().to_numpy()
        idx = torch.tensor(np.flatnonzero(keep))
        return X[li][idx], frame[keep].reset_index(drop=True)

    def classes(self, key: ProbeKey) -> list[str]:
        """Class names of a logistic probe, in its column order ([] for ridge probes)."""
        if self.kind(key) != "logistic":
            return []
        _, frame = self.rows(key)
        if key.target not in frame.columns:
            return []
        classes = sorted(frame[key.target].astype(str).unique())
        n_out = self.weights[f"{key.target}|{key.position}|{key.site}|weight"].shape[1]
        if len(classes) != n_out:
            raise WorkbenchError(
                f"probe {key.target!r} has {n_out} classes but its activations run holds "
                f"{len(classes)} values",
                fix="re-run `workbench probe` on the activations run it names",
            )
        return classes

    def matrix(self, key: ProbeKey, control: Literal["none", "stored", "shuffled"]) -> Tensor:
        """Weights [d_model, out]: stored, or refitted on all rows (`none`: real labels)."""
        if control == "stored":
            return self.weights[f"{key.target}|{key.position}|{key.site}|weight"].float()
        X, frame = self.rows(key)
        if key.target not in frame.columns:
            raise WorkbenchError(
                f"probe {key.target!r} is a distributions statistic: its labels are not in the "
                "activations run, so it cannot be refitted (shuffled-label placebo)",
                fix="leave out the shuffled placebo (--placebos random,other) for this target",
            )
        values = frame[key.target]
        cfg = self._config()
        seed = int(cfg.get("seed", 0)) + sum(map(ord, key.target))
        valid = values.notna().to_numpy()
        train = torch.ones(1, 1, len(frame), dtype=torch.bool)
        if self.kind(key) == "logistic":
            classes = sorted(values[valid].astype(str).unique())
            code = {c: i for i, c in enumerate(classes)}
            y = np.array([code[str(v)] if ok else -1 for v, ok in zip(values, valid, strict=True)])
            if control == "shuffled":
                y = shuffled_labels(y, valid, seed)
            fit = fit_logistic(
                X[None],
                torch.tensor(y)[None],
                train,
                [len(classes)],
                C=float(cfg.get("C", 1.0)),
                max_iter=int(cfg.get("max_iter", 500)),
            )
        else:
            yf = values.astype("float64").to_numpy()
            if control == "shuffled":
                yf = shuffled_labels(yf, valid, seed)
            fit = fit_ridge(
                X[None],
                torch.tensor(yf, dtype=torch.float32)[None],
                train,
                alpha=float(cfg.get("alpha", 1.0)),
            )
        return fit.weight[0, 0, 0].float()


def _directions(W: Tensor, X: Tensor, kind: DirectionKind) -> Tensor:
    """Class directions [d_model, out] (uncentred) in activation coordinates."""
    if kind == "weight":
        return W
    Xc = X - X.mean(0)
    return (Xc.T @ (Xc @ W)) / max(len(X) - 1, 1)


def class_direction(W: Tensor, X: Tensor, column: int | None, kind: DirectionKind) -> Tensor:
    """Unit vector [d_model]: towards class `column` (None: a ridge probe's one column)."""
    A = _directions(W, X, kind)
    v = A[:, 0] if column is None else A[:, column] - A.mean(1)
    norm = v.norm()
    if float(norm) == 0.0:
        raise WorkbenchError(
            "the probe's direction is zero", fix="check that the probe was fitted (probes.parquet)"
        )
    return v / norm


def subspace(W: Tensor, X: Tensor, kind: DirectionKind, logistic: bool) -> Tensor:
    """Orthonormal basis [d_model, k] of the probe's (centred) class directions."""
    A = _directions(W, X, kind)
    if logistic and A.shape[1] > 1:
        A = A - A.mean(1, keepdim=True)
    U, S, _ = torch.linalg.svd(A.double(), full_matrices=False)
    k = int((1e-6 * S[0] < S).sum()) if float(S[0]) > 0 else 0
    if k == 0:
        raise WorkbenchError("the probe's subspace is empty", fix="check that it was fitted")
    return U[:, :k].float()


def random_direction(d_model: int, seed: int) -> Tensor:
    """A unit vector [d_model] uniform on the sphere (a norm-matched placebo once scaled)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d_model, generator=g, dtype=torch.float64)
    return (v / v.norm()).float()


def random_subspace(d_model: int, k: int, seed: int) -> Tensor:
    """An orthonormal basis [d_model, k] of a uniformly random k-dim subspace."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d_model, k, generator=g, dtype=torch.float64))
    return Q.float()
