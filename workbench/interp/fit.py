"""Linear probes fitted in batched torch: every layer, target, control and fold at once.

`fit_logistic` and `fit_ridge` solve the same problems as scikit-learn's
`StandardScaler` + `LogisticRegression(C)` (multinomial, L2, lbfgs) and
`StandardScaler` + `Ridge(alpha)` (tests/unit/test_probing.py and test_fit_speed.py check
agreement), but for a whole stack of problems in one go:

    X      [layer, n, d_model]     activations of one site kind at one position
    y      [task, n]               labels (int codes, -1 = missing) or values (NaN = missing)
    train  [task, fold, n] bool    rows each (task, fold) problem is fitted on

Features are standardized per problem with its own training rows (population variance, a
constant feature gets scale 1, as `StandardScaler`); the returned weights are mapped back to
raw activation coordinates, so a probe's score is `x @ weight + bias` on stored vectors.

Logistic problems are independent; `lbfgs.batched_lbfgs` runs L-BFGS on all of them at once,
each with its own history, line search and stopping test, and drops a problem from the batch
as soon as it converges (finished problems cost nothing). Each objective is sklearn's divided
by C * n_train (same minimizer), with the gradient written out by hand. Per layer the work is
two matrix products over all of that layer's problems, shaped long-axis-last
([problems x classes, d] @ [d, n] and [problems x classes, n] @ [n, d]; see `_lbfgs_logistic`
for why the shape matters on CPU); everything else runs once for all layers. As sklearn, a
problem is fitted on the classes present in its training rows, and two classes are one binary
logistic (C halved for the two-column softmax, see `_fit_logistic_group`). Tasks whose
class counts are within 4/3 of each other share a batch (`_class_batches`); rows no problem
of a batch is fitted on are left out of its products; `cross_validate` fits every row first
and warm-starts each fold from that solution. Ridge is closed form (`fit_ridge`:
batched Cholesky in float64 on the d x d or n x n normal equations, whichever is smaller;
sklearn's `Ridge` to 1e-6). Memory is bounded by fitting layers in chunks (`memory_gb`).
Everything runs on X's device.

Precision: the logistic solver runs in X's dtype (float32 for stored activations; float64
costs 3x on CPU). On flat, weakly regularized problems float32 at tol 1e-5 reproduces
scikit-learn run to convergence (tol 1e-6) within 0.004 held-out accuracy per fold, while
scikit-learn at its own default 1e-4 stops up to 0.012 away from it (organism benchmark):
the default `tol` is 1e-5. The unit tests and `scripts/bench_activations.py` check held-out
accuracy against sklearn.

Cross-validation is grouped (`grouped_folds`): whole groups (titles, persona ids) go to one
fold, so a probe is always scored on groups it never saw. Controls (docs/MEASUREMENT.md §5):
`shuffled_labels` and Hewitt & Liang control tasks (`control_task_labels`: a random label per
*type*, consistent across rows, drawn from the empirical label distribution).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as nnf
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.interp.lbfgs import HISTORY, batched_lbfgs


@dataclass(frozen=True)
class LinearFit:
    """Probe weights in raw activation coordinates: score = x @ weight + bias."""

    weight: Tensor
    """[task, fold, layer, d_model, out] float32 (out = classes, or 1 for ridge)."""
    bias: Tensor
    """[task, fold, layer, out] float32."""

    def scores(self, X: Tensor) -> Tensor:
        """[task, fold, layer, n, out] scores (logits for logistic, predictions for ridge)."""
        z = torch.einsum("lnd,tfldo->tflno", X, self.weight)
        return z + self.bias[:, :, :, None, :]


# --------------------------------------------------------------------------------------------
# folds and controls


def grouped_folds(groups: Sequence[Any] | np.ndarray, n_folds: int) -> np.ndarray:
    """Fold id per row (-1 where the group is missing); every group lies in exactly one fold.

    Groups are assigned largest first to the currently smallest fold (as sklearn's
    GroupKFold), deterministically. With fewer groups than `n_folds`, each group is a fold
    (leave-one-group-out).
    """
    values = np.asarray(["" if pd.isna(g) else str(g) for g in groups], dtype=object)
    valid = values != ""
    uniq, inv, counts = np.unique(
        values[valid].astype(str), return_inverse=True, return_counts=True
    )
    k = min(n_folds, len(uniq))
    if k < 2:
        raise WorkbenchError(
            f"grouped cross-validation needs at least 2 groups, found {len(uniq)}",
            fix="group by a column with several values (title, persona_id, question_id)",
        )
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    sizes = np.zeros(k, dtype=np.int64)
    for g in np.argsort(-counts, kind="stable"):
        f = int(np.argmin(sizes))
        fold_of_group[g] = f
        sizes[f] += counts[g]
    out = np.full(len(values), -1, dtype=np.int64)
    out[valid] = fold_of_group[inv]
    return out


def shuffled_labels(y: np.ndarray, valid: np.ndarray, seed: int) -> np.ndarray:
    """The labels permuted among valid rows (the shuffled-label control)."""
    rng = np.random.default_rng(seed)
    out = y.copy()
    idx = np.flatnonzero(valid)
    out[idx] = y[rng.permutation(idx)]
    return out


def control_task_labels(
    y: np.ndarray, valid: np.ndarray, types: np.ndarray, seed: int
) -> np.ndarray:
    """Hewitt & Liang control task: each *type* gets one random label, drawn from the empirical
    distribution of the valid labels, and every row of that type carries it.

    A probe that scores well here memorizes types rather than reading the property; the
    difference to the real task is the selectivity.
    """
    rng = np.random.default_rng(seed)
    out = y.copy()
    pool = y[valid]
    uniq, inv = np.unique(types[valid].astype(str), return_inverse=True)
    draws = pool[rng.integers(0, len(pool), size=len(uniq))]
    out[np.flatnonzero(valid)] = draws[inv]
    return out


# --------------------------------------------------------------------------------------------
# standardization


def _moments(Xc: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-problem mean and scale of centred features over weighted rows.

    Xc [layer, n, d] (already centred on the global mean, so one-pass variances are exact
    enough in float32), w [problem, n] 0/1 -> count [problem], mu, sd [problem, layer, d].
    """
    cnt = w.sum(-1).clamp_min(1.0)
    mu = torch.einsum("mn,lnd->mld", w, Xc) / cnt[:, None, None]
    ex2 = torch.einsum("mn,lnd->mld", w, Xc * Xc) / cnt[:, None, None]
    var = (ex2 - mu * mu).clamp_min(0.0)
    sd = var.sqrt()
    sd = torch.where(var > 1e-12 * (1.0 + ex2), sd, torch.ones_like(sd))
    return cnt, mu, sd


def _layer_chunks(n_layers: int, per_layer_bytes: int, memory_gb: float) -> list[slice]:
    step = max(1, int(memory_gb * 2**30 // max(per_layer_bytes, 1)))
    return [slice(i, min(i + step, n_layers)) for i in range(0, n_layers, step)]


# --------------------------------------------------------------------------------------------
# logistic


def fit_logistic(
    X: Tensor,
    y: Tensor,
    train: Tensor,
    n_classes: Sequence[int],
    *,
    C: float = 1.0,
    max_iter: int = 500,
    tol: float = 1e-5,
    memory_gb: float = 2.0,
    init: LinearFit | None = None,
) -> LinearFit:
    """Multinomial logistic probes with L2 penalty for every (task, fold, layer).

    X [layer, n, d], y [task, n] int64 codes in 0..n_classes[t]-1 (-1 = missing),
    train [task, fold, n] bool. As sklearn, a problem is fitted on the classes present in its
    training rows; the others (and the padding of tasks with fewer classes) get bias -inf.
    A (task, fold) with no training rows gets zero weights. `tol` bounds max |gradient| of the
    mean loss (sklearn's `tol` means the same, but its float64 L-BFGS stops closer to the
    optimum at equal tol than this float32 one: 1e-5 here matches its 1e-4). `init` (raw
    weights of the same shape, e.g. the all-rows fit broadcast over folds) is a warm start:
    it changes the iterations, not the minimizer.
    """
    T, F, _ = train.shape
    L, _, d = X.shape
    c_max = max(n_classes)
    weight = torch.zeros(T, F, L, d, c_max, dtype=X.dtype, device=X.device)
    bias = torch.full((T, F, L, c_max), float("-inf"), dtype=X.dtype, device=X.device)
    gm = X.mean(1, keepdim=True)
    for ks in _class_batches(n_classes):
        k = max(ks)
        sel = torch.tensor([t for t in range(T) if n_classes[t] in ks], device=X.device)
        start = None if init is None else (init.weight[sel, ..., :k], init.bias[sel, ..., :k])
        W, b = _fit_logistic_group(X, gm, y[sel], train[sel], k, C, max_iter, tol, memory_gb, start)
        weight[sel, :, :, :, :k] = W
        bias[sel, :, :, :k] = b
    return LinearFit(weight, bias)


def _class_batches(n_classes: Sequence[int]) -> list[list[int]]:
    """Class counts whose tasks share one batch, padded to the largest count (a class a
    problem lacks gets logit -1e9: flops, no effect). Counts within 4/3 of each other go
    together: one L-BFGS loop instead of one per count (each loop's slow tail is mostly
    per-call overhead) and taller matrix products, for at most a third more logits."""
    batches: list[list[int]] = []
    for k in sorted(set(n_classes)):
        if batches and 3 * k <= 4 * batches[-1][0]:
            batches[-1].append(k)
        else:
            batches.append([k])
    return batches


def _fit_logistic_group(
    X: Tensor,
    gm: Tensor,
    y: Tensor,
    train: Tensor,
    k: int,
    C: float,
    max_iter: int,
    tol: float,
    memory_gb: float,
    start: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """`fit_logistic` for tasks with `k` classes: W [task, fold, layer, d, k], b [.., k]."""
    T, F, n = train.shape
    L, _, d = X.shape
    w = (train & (y[:, None, :] >= 0)).reshape(T * F, n).to(X.dtype)
    labels = y.clamp_min(0)[:, None, :].expand(T, F, n).reshape(T * F, n)
    present = (nnf.one_hot(labels, k).to(X.dtype) * w[..., None]).sum(1) > 0  # [problem, k]
    # Rows no problem of the batch is fitted on (a label missing for every task here) would
    # only multiply zero weights: leave them out of X.
    used = torch.nonzero(w.sum(0) > 0).squeeze(1)
    if len(used) < n:
        w, labels, n = w[:, used], labels[:, used], len(used)
    # sklearn fits two classes as one binary logistic (one weight vector w, penalty |w|²/2);
    # the softmax over two columns is the same model with w = w1 - w2, and at its optimum
    # w1 = -w2, so its penalty (|w1|² + |w2|²)/2 = |w|²/4: halving C makes the two equal.
    c_eff = torch.full((T * F,), C, dtype=X.dtype, device=X.device)
    c_eff = torch.where(present.sum(-1) == 2, c_eff / 2, c_eff)
    weight = torch.zeros(T * F, L, d, k, dtype=X.dtype, device=X.device)
    bias = torch.zeros(T * F, L, k, dtype=X.dtype, device=X.device)
    # L-BFGS keeps 2 x HISTORY copies of the parameters; logits are [problem, layer, k, n].
    per_layer = 4 * T * F * ((d + 1) * k * (2 * HISTORY + 6) + 4 * n * k) + 12 * n * d
    for chunk in _layer_chunks(L, per_layer, memory_gb):
        Xc = (X[chunk] if len(used) == X.shape[1] else X[chunk][:, used]) - gm[chunk]
        cnt, mu, sd = _moments(Xc, w)
        theta0 = None
        if start is not None:  # raw -> standardized: W_std = W_raw sd, b_std = b + x0 W_raw
            w_raw = start[0].reshape(T * F, L, d, k)[:, chunk]
            b_raw = torch.nan_to_num(start[1].reshape(T * F, L, k)[:, chunk], neginf=0.0)
            offset = torch.einsum("mld,mldc->mlc", gm[chunk].squeeze(1) + mu, w_raw)
            w_std = (w_raw * sd[..., None]).transpose(-1, -2)  # [problem, layer, k, d]
            theta0 = torch.cat([w_std.flatten(2), b_raw + offset], dim=-1)
            theta0 = theta0.transpose(0, 1).reshape(-1, (d + 1) * k)
        W, b = _lbfgs_logistic(Xc, w, labels, present, cnt, mu, sd, c_eff, max_iter, tol, theta0)
        weight[:, chunk] = W / sd[..., None]
        bias[:, chunk] = b - torch.einsum("mld,mldc->mlc", (gm[chunk].squeeze(1) + mu) / sd, W)
    bias = bias.masked_fill(~present[:, None, :], float("-inf"))
    return weight.reshape(T, F, L, d, k), bias.reshape(T, F, L, k)


def _lbfgs_logistic(
    Xc: Tensor,
    w: Tensor,
    labels: Tensor,
    class_ok: Tensor,
    cnt: Tensor,
    mu: Tensor,
    sd: Tensor,
    C: Tensor,
    max_iter: int,
    tol: float,
    theta0: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimize, per (problem, layer), mean NLL + ||W||^2 / (2 C n_train) in standardized
    coordinates; returns W [problem, layer, d, k] and b [problem, layer, k].

    The flat problem index is layer * M + problem, so the rows `batched_lbfgs` passes (kept
    in ascending order) come grouped by layer and each layer is one contiguous slice.
    Parameters are stored class-major ([k, d] per problem) so both matrix products put the
    long axis last: logits [problems x k, n] = V [problems x k, d] @ Xc^T [d, n] and the
    gradient [problems x k, d] = residuals [problems x k, n] @ Xc [n, d]. The transposed
    shapes ([n, d] @ [d, few columns]) hit a slow narrow-output GEMM path on CPU (5x slower
    at k x problems < 16 with torch 2.x + MKL, one thread).
    """
    M, n = w.shape
    L, _, d = Xc.shape
    k = class_ok.shape[-1]
    dev, dt = Xc.device, Xc.dtype
    Xt = Xc.transpose(1, 2).contiguous()
    inv_sd = (1.0 / sd).transpose(0, 1).reshape(L * M, d)
    scale = (mu / sd).transpose(0, 1).reshape(L * M, d)
    absent = torch.where(class_ok, 0.0, -1e9).to(dt)  # classes absent from a problem never win
    row_weight = w / cnt[:, None]
    ridge = 1.0 / (C * cnt)

    def value_and_grad(theta: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Losses [K], gradients [K, P] and max |gradient| [K] of the (layer, problem) pairs
        `rows` (ascending), written out by hand: autograd's graph would cost more than the
        two matrix products per layer that are the real work, and everything but those
        products runs once for all layers."""
        K = len(rows)
        m = rows % M
        W = theta[:, : k * d].view(K, k, d)
        isd, sc = inv_sd[rows], scale[rows]
        V = W * isd[:, None, :]  # raw-coordinate weights of centred X
        off = theta[:, k * d :] - (W * sc[:, None, :]).sum(-1) + absent[m]
        ends = torch.bincount(rows // M, minlength=L).cumsum(0).tolist()
        spans = [
            (ell, s, e)
            for ell, (s, e) in enumerate(zip([0, *ends[:-1]], ends, strict=True))
            if e > s
        ]
        z = torch.empty(K, k, n, dtype=dt, device=dev)
        for ell, s, e in spans:
            torch.mm(V[s:e].reshape(-1, d), Xt[ell], out=z[s:e].view(-1, n))
        logp = torch.log_softmax(z.add_(off[..., None]), 1)
        target = labels[m][:, None, :]
        rw = row_weight[m][:, None, :]
        nll = -logp.gather(1, target)
        rg = ridge[m]
        loss = (nll * rw).sum((1, 2)) + 0.5 * rg * (W * W).sum((1, 2))
        resid = logp.exp_().scatter_add_(1, target, torch.full_like(nll, -1.0)).mul_(rw)
        g_b = resid.sum(-1)
        g_v = torch.empty(K, k, d, dtype=dt, device=dev)
        for ell, s, e in spans:
            torch.mm(resid[s:e].view(-1, n), Xc[ell], out=g_v[s:e].view(-1, d))
        g_w = g_v * isd[:, None, :] - sc[:, None, :] * g_b[..., None] + rg[:, None, None] * W
        grad = torch.cat([g_w.reshape(K, -1), g_b], dim=1)
        return loss, grad, grad.abs().amax(-1)

    theta = batched_lbfgs(
        value_and_grad,
        torch.zeros(L * M, (d + 1) * k, dtype=dt, device=dev) if theta0 is None else theta0,
        (w.sum(-1) > 0).repeat(L),
        max_iter,
        tol,
    )
    W = theta[:, : k * d].view(L, M, k, d).permute(1, 0, 3, 2)
    return W, theta[:, k * d :].view(L, M, k).transpose(0, 1)


# --------------------------------------------------------------------------------------------
# ridge


def fit_ridge(
    X: Tensor, y: Tensor, train: Tensor, *, alpha: float = 1.0, memory_gb: float = 2.0
) -> LinearFit:
    """Ridge probes (unpenalized intercept) for every (task, fold, layer), in closed form.

    X [layer, n, d], y [task, n] float (NaN = missing), train [task, fold, n] bool.
    Exactly sklearn's `StandardScaler` + `Ridge(alpha)` objective, ||y - Xs w - b||² +
    alpha ||w||², solved from the normal equations in float64 with a batched Cholesky
    (every layer of a chunk at once): on the d x d system (Xs'Xs + alpha I) w = Xs'y when a
    problem has at least d training rows, else on the n x n one (Xs Xs' + alpha I) a = y,
    w = Xs'a (the same w, and the smaller matrix). Problems with the same training rows share
    one factorization (controls and targets on the same rows are one multi-output solve).
    Weights come back in X's dtype and device.
    """
    T, F, n = train.shape
    L, _, d = X.shape
    dev = X.device
    valid = train & ~torch.isnan(y)[:, None, :]
    flat = valid.reshape(T * F, n)
    yflat = torch.nan_to_num(y).double()[:, None, :].expand(T, F, n).reshape(T * F, n)
    weight = torch.zeros(T * F, L, d, dtype=X.dtype, device=dev)
    bias = torch.zeros(T * F, L, dtype=X.dtype, device=dev)
    uniq, inverse = torch.unique(flat, dim=0, return_inverse=True)
    for u in range(len(uniq)):
        rows = uniq[u]
        members = torch.nonzero(inverse == u).squeeze(1)
        n_u = int(rows.sum())
        if n_u == 0:
            continue
        Yu = yflat[members][:, rows]  # [k, n_u]
        ybar = Yu.mean(-1)
        Yc = (Yu - ybar[:, None]).T  # [n_u, k]
        m = min(n_u, d)
        per_layer = 8 * (3 * n_u * d + 3 * m * m)
        eye = alpha * torch.eye(m, dtype=torch.float64, device=dev)
        for chunk in _layer_chunks(L, per_layer, memory_gb):
            Xu = X[chunk][:, rows].double()
            mu = Xu.mean(1)
            var = Xu.var(1, unbiased=False)
            sd = torch.where(var > 1e-12 * (1.0 + mu * mu), var.sqrt(), 1.0)
            Xs = (Xu - mu[:, None]) / sd[:, None]  # [l, n_u, d]
            if n_u >= d:
                sol = _spd_solve(Xs.transpose(1, 2) @ Xs + eye, Xs.transpose(1, 2) @ Yc)
            else:
                sol = Xs.transpose(1, 2) @ _spd_solve(
                    Xs @ Xs.transpose(1, 2) + eye, Yc.expand(len(Xs), -1, -1)
                )
            raw = sol / sd[:, :, None]  # [l, d, k]
            weight[members, chunk] = raw.permute(2, 0, 1).to(X.dtype)
            offset = torch.einsum("ld,ldk->lk", mu, raw)
            bias[members, chunk] = (ybar[None, :] - offset).T.to(X.dtype)
    return LinearFit(weight.reshape(T, F, L, d, 1), bias.reshape(T, F, L, 1))


def _spd_solve(A: Tensor, B: Tensor) -> Tensor:
    """A^-1 B for a batch of symmetric positive definite A (Cholesky); least squares where a
    factorization fails (alpha = 0 with collinear features)."""
    chol, info = torch.linalg.cholesky_ex(A)
    if bool((info == 0).all()):
        return torch.cholesky_solve(B, chol)
    return torch.linalg.lstsq(A.cpu(), B.cpu()).solution.to(A.device)


# --------------------------------------------------------------------------------------------
# cross-validation


@dataclass(frozen=True)
class CVTask:
    """One probe problem: labels or values, and the fold of every row."""

    kind: Literal["logistic", "ridge"]
    y: np.ndarray
    """[n] int class codes (-1 = missing) for logistic, float (NaN = missing) for ridge."""
    folds: np.ndarray
    """[n] fold id (`grouped_folds`); -1 = row not used."""
    n_classes: int = 0


@dataclass(frozen=True)
class CVResult:
    """Held-out scores of every task on every fold and layer."""

    scores: np.ndarray
    """[task, fold, layer] accuracy (logistic) or R² against the fold's own mean (ridge);
    NaN for folds a task does not have."""
    chance: np.ndarray
    """[task, fold, layer] the same metric for predicting the training fold's majority class
    (logistic) or mean (ridge)."""
    predictions: np.ndarray
    """[task, layer, n] out-of-fold predictions (class code or value); NaN outside folds."""
    fit: LinearFit
    """Weights [task, fold + 1, layer, ...]: the last "fold" is fitted on every used row."""


def cross_validate(
    X: Tensor,
    tasks: Sequence[CVTask],
    *,
    C: float = 1.0,
    alpha: float = 1.0,
    max_iter: int = 500,
    tol: float = 1e-5,
    memory_gb: float = 2.0,
) -> CVResult:
    """Fit every task (all of one kind) on every fold of every layer of X [layer, n, d] at
    once, plus once on all rows, and score each held-out fold. A fold's training rows are
    exactly the used rows outside it, so no group is ever on both sides. Runs on X's device
    (`tol`: the logistic stopping test, see `fit_logistic`); the result is on the CPU."""
    kinds = {t.kind for t in tasks}
    if len(kinds) != 1:
        raise ValueError(f"cross_validate needs tasks of one kind, got {sorted(kinds)}")
    L, n, _ = X.shape
    n_folds = max(int(t.folds.max()) + 1 for t in tasks)
    dev = X.device
    train = torch.zeros(len(tasks), n_folds + 1, n, dtype=torch.bool, device=dev)
    for ti, t in enumerate(tasks):
        used = t.folds >= 0
        for f in range(int(t.folds.max()) + 1):
            train[ti, f] = torch.tensor(used & (t.folds != f), device=dev)
        train[ti, n_folds] = torch.tensor(used, device=dev)
    if tasks[0].kind == "logistic":
        y = torch.tensor(np.stack([t.y for t in tasks]), dtype=torch.long, device=dev)
        n_classes = [max(t.n_classes, 1) for t in tasks]
        kw: dict[str, Any] = {"C": C, "max_iter": max_iter, "tol": tol, "memory_gb": memory_gb}
        # Every row first; each fold then starts from that solution (same minimizers, far
        # fewer iterations: a fold drops a third of the rows at most).
        full = fit_logistic(X, y, train[:, -1:], n_classes, **kw)
        start = LinearFit(
            full.weight.expand(-1, n_folds, -1, -1, -1), full.bias.expand(-1, n_folds, -1, -1)
        )
        folds = fit_logistic(X, y, train[:, :-1], n_classes, init=start, **kw)
        fit = LinearFit(
            torch.cat([folds.weight, full.weight], 1), torch.cat([folds.bias, full.bias], 1)
        )
    else:
        y = torch.tensor(np.stack([t.y for t in tasks]), dtype=X.dtype, device=dev)
        fit = fit_ridge(X, y, train, alpha=alpha, memory_gb=memory_gb)
    z = fit.scores(X).cpu()  # [task, fold, layer, n, out]
    fit = LinearFit(fit.weight.cpu(), fit.bias.cpu())
    scores = np.full((len(tasks), n_folds, L), np.nan)
    chance = np.full((len(tasks), n_folds, L), np.nan)
    preds = np.full((len(tasks), L, n), np.nan)
    for ti, t in enumerate(tasks):
        for f in range(int(t.folds.max()) + 1):
            test = t.folds == f
            tr = (t.folds >= 0) & (t.folds != f)
            if not test.any() or not tr.any():
                continue
            zf = z[ti, f][:, torch.tensor(test)]  # [layer, n_test, out]
            truth = t.y[test]
            if t.kind == "logistic":
                hat = zf.argmax(-1).numpy()
                scores[ti, f] = (hat == truth[None, :]).mean(-1)
                chance[ti, f] = float((truth == np.bincount(t.y[tr]).argmax()).mean())
            else:
                hat = zf[..., 0].numpy()
                total = float(((truth - truth.mean()) ** 2).sum())
                if total > 0:
                    scores[ti, f] = 1.0 - ((truth[None, :] - hat) ** 2).sum(-1) / total
                    chance[ti, f] = 1.0 - float(((truth - t.y[tr].mean()) ** 2).sum()) / total
            preds[ti][:, test] = hat
    return CVResult(scores, chance, preds, fit)
