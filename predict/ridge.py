"""Initialisation from the train split: the MLP's input statistics (multi-view inputs) and the
closed-form ridge solution of its linear path (``model.linear_skip = "ridge"``).

On a few thousand train functions, ridge regression from the pooled signature to the pooled
body, in the whitened space, is the strongest linear baseline the evaluate stage knows; an
MLP trained from scratch stays below it. So the predictor starts AT ridge — its linear path
holds the ridge solution, its MLP residual starts at zero — and training (InfoNCE beside the
regression, early-stopped on val MRR) can only move away from it where val retrieval agrees.

Everything is fitted on the train split; λ is chosen on the val split's retrieval (MRR), as
the evaluate stage chooses its ridge baseline's λ (over its own, wider grid). The solution lives in the model's weights,
so the checkpoint holds it and loading needs nothing else.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from codejepa.predict.metrics import retrieval_ranks

# λ relative to the mean eigenvalue of XᵀX, so that the grid means the same at every scale.
RIDGE_ALPHAS = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 10.0)


@dataclass(frozen=True)
class RidgeSolution:
    """``y ≈ x @ weight + bias`` for one λ; ``weight`` is [d_in, d_out]."""

    weight: torch.Tensor
    bias: torch.Tensor
    alpha: float


class RidgePath:
    """One eigendecomposition of the centred XᵀX serves every λ of a grid.

    With XᵀX = V diag(e) Vᵀ, B(λ) = V diag(1 / (e + λ)) Vᵀ XᵀY. The sums are accumulated in
    float64 over row chunks, so memory stays O(d²) however many train pairs (no float64 copy of
    X); λ is relative to the mean eigenvalue of XᵀX, so a grid means the same at every scale.
    Takes tensors or arrays; the evaluate stage's ridge baselines fit with it too.
    """

    def __init__(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *, chunk: int = 8192) -> None:
        x, y = torch.as_tensor(x), torch.as_tensor(y)  # callers check the pair count in their own words
        self.x_mean, self.y_mean = x.mean(0, dtype=torch.float64), y.mean(0, dtype=torch.float64)
        xtx = torch.zeros(len(self.x_mean), len(self.x_mean), dtype=torch.float64)
        xty = torch.zeros(len(self.x_mean), len(self.y_mean), dtype=torch.float64)
        for a in range(0, len(x), chunk):
            xc = x[a : a + chunk].double() - self.x_mean
            xtx += xc.T @ xc
            xty += xc.T @ (y[a : a + chunk].double() - self.y_mean)
        e, v = torch.linalg.eigh(xtx)
        self.e, self.v = e.clamp(min=0), v
        self.vtxty = v.T @ xty
        self.scale = max(float(self.e.mean()), 1e-12)

    def coef(self, alpha: float) -> torch.Tensor:
        """B(λ) in float64, [d_in, d_out]."""
        return (self.v / (self.e + alpha * self.scale)) @ self.vtxty

    def solve(self, alpha: float) -> RidgeSolution:
        w = self.coef(alpha)
        return RidgeSolution(w.float(), (self.y_mean - self.x_mean @ w).float(), float(alpha))


def val_mrr(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((1.0 / retrieval_ranks(pred, target).double()).mean())


def fit_ridge(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, *,
              alpha: float = 0.0, alphas: Sequence[float] = RIDGE_ALPHAS) -> tuple[RidgeSolution, dict[str, float]]:
    """The ridge solution on train; λ = ``alpha`` if positive, else the grid's best val MRR.
    Returns it with the val MRR of every λ tried."""
    path = RidgePath(x_train, y_train)
    grid = (alpha,) if alpha > 0 else tuple(alphas)
    best: RidgeSolution | None = None
    scores: dict[str, float] = {}
    best_mrr = -1.0
    for a in grid:
        sol = path.solve(a)
        m = val_mrr(x_val.float() @ sol.weight + sol.bias, y_val.float())
        scores[f"{a:g}"] = m
        if m > best_mrr:
            best, best_mrr = sol, m
    assert best is not None
    return best, scores


def view_subsets(n_views: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``n_views`` views, in order (the full set last)."""
    return [c for k in range(1, n_views + 1) for c in itertools.combinations(range(n_views), k)]


def fit_ridge_views(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                    n_views: int, *, alpha: float = 0.0, subsets: Sequence[tuple[int, ...]] | None = None,
                    ) -> tuple[RidgeSolution, tuple[int, ...], dict[tuple[int, ...], float]]:
    """Ridge on the best subset of ``n_views`` equal-width views concatenated in ``x``, by val MRR
    (λ chosen per subset as in :func:`fit_ridge`). The solution has the full input width: the
    rows of the views left out are zero. Returns it, the chosen views and each subset's val MRR."""
    d = x_train.shape[1] // n_views
    if d * n_views != x_train.shape[1]:
        raise ValueError(f"input width {x_train.shape[1]} is not {n_views} views of equal width")
    best: tuple[float, RidgeSolution, tuple[int, ...]] | None = None
    scores: dict[tuple[int, ...], float] = {}
    for sub in subsets if subsets is not None else view_subsets(n_views):
        cols = torch.cat([torch.arange(v * d, (v + 1) * d) for v in sub])
        sol, grid = fit_ridge(x_train[:, cols], y_train, x_val[:, cols], y_val, alpha=alpha)
        mrr = grid[f"{sol.alpha:g}"]
        scores[tuple(sub)] = mrr
        if best is None or mrr > best[0]:
            w = torch.zeros(x_train.shape[1], sol.weight.shape[1], dtype=sol.weight.dtype)
            w[cols] = sol.weight
            best = (mrr, RidgeSolution(w, sol.bias, sol.alpha), sub)
    assert best is not None
    return best[1], best[2], scores


def pooled_arrays(table: Any, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(pooled signatures, pooled bodies) of every row of a feature table, RAM or streaming."""
    if getattr(table, "body", None) is not None and hasattr(table, "sig"):
        return table.sig, table.body
    sig, body = [], []
    for a in range(0, len(table), batch_size):
        b = table.batch(np.arange(a, min(a + batch_size, len(table))))
        sig.append(b["sig"])
        body.append(b["body"])
    d = 0 if not sig else sig[0].shape[1]
    return (np.concatenate(sig) if sig else np.zeros((0, d), np.float32),
            np.concatenate(body) if body else np.zeros((0, d), np.float32))


@torch.no_grad()
def init_input_stats(model: torch.nn.Module, train_table: Any, eps: float = 1e-5) -> None:
    """Per-dimension mean and std of the model's pooled input views over the train split."""
    sig, _ = pooled_arrays(train_table)
    x = torch.from_numpy(np.asarray(sig, np.float64))
    model.view_mu.copy_(x.mean(0).float())
    model.view_sd.copy_((x.var(0, unbiased=False) + eps).sqrt().float())


@torch.no_grad()
def init_linear_path(model: torch.nn.Module, train_table: Any, val_table: Any, alpha: float = 0.0,
                     select_views: bool = False) -> dict[str, Any]:
    """Fit ridge from the model's input features to its pooled targets (train split, λ on val)
    and write it into ``model.skip``. With ``select_views``, on the subset of the model's input
    views with the best val MRR. Returns what was chosen, for the run's log."""
    def xy(table: Any) -> tuple[torch.Tensor, torch.Tensor]:
        sig, body = pooled_arrays(table)
        dev = model.norm.sig_mu.device
        x = model.features({"sig": torch.from_numpy(np.asarray(sig, np.float32)).to(dev)})
        y = model.norm.body_to_norm(torch.from_numpy(np.asarray(body, np.float32)).to(dev))
        return x.cpu(), y.cpu()

    xt, yt = xy(train_table)
    xv, yv = xy(val_table)
    views = tuple(getattr(model, "views", ("mean",)))
    info: dict[str, Any] = {"train_records": int(len(xt))}
    if select_views and len(views) > 1:
        sol, chosen, by_views = fit_ridge_views(xt, yt, xv, yv, len(views), alpha=alpha)
        info |= {"views": ",".join(views[v] for v in chosen),
                 "val_mrr_by_views": {",".join(views[v] for v in sub): m for sub, m in by_views.items()}}
        scores = {f"{sol.alpha:g}": by_views[chosen]}
    else:
        sol, scores = fit_ridge(xt, yt, xv, yv, alpha=alpha)
        info |= {"views": ",".join(views), "val_mrr_by_alpha": scores}
    model.skip.weight.copy_(sol.weight.T.to(model.skip.weight.device))
    model.skip.bias.copy_(sol.bias.to(model.skip.bias.device))
    return {"alpha": sol.alpha, "val_mrr": scores[f"{sol.alpha:g}"], **info}
