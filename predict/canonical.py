"""The canonical space: where the evaluate stage ranks, and where training can score too.

Whitening gives every direction of the body space the same weight, including the many that
no signature can predict: noise in every prediction. The canonical space weights the
whitened directions by their canonical correlation with the pooled signature views (a
regularised CCA, fitted on the train split), so that each direction counts as much as the
inputs can tell about it. The evaluate stage scores every method in it
(:mod:`codejepa.evaluate.spaces`); with ``loss.space = "canonical"`` a predictor's InfoNCE
and its validation retrieval score there as well, so that training ranks as the evaluation
will (the predictor still predicts the pooled body: the map applies to predictions and
bodies alike). Measured on python-40, that lowers the hubness-corrected rows by 1.5–3 points
(bench/RESULTS.md, "Training in the canonical space"), so it is not the default.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from codejepa.predict.ridge import pooled_arrays

CANONICAL_VIEWS = ("mean", "last")  # the pooled input views the map is fitted on: ridge+last's inputs
CANONICAL_INPUT_REG = 0.01  # ridge on the inputs' covariance, relative to its mean eigenvalue
CANONICAL_BODY_REG = 1e-4  # the same on the (already whitened and shrunk) bodies' covariance
# Sample canonical correlations are biased upward unless the records far outnumber the
# dimensions of both sides; on the demo (2,000 records, 768 + 384 dimensions) the map overfits.
CANONICAL_RECORDS_PER_DIM = 10


def _inv_sqrt(cov: np.ndarray, reg: float) -> np.ndarray:
    d = cov.shape[0]
    avg = max(float(np.trace(cov)) / d, 1e-12)
    w, v = np.linalg.eigh(cov + reg * avg * np.eye(d))
    return (v / np.sqrt(np.maximum(w, 1e-12 * avg))) @ v.T


def canonical_map(inputs: np.ndarray, bodies_white: np.ndarray, *, input_reg: float = CANONICAL_INPUT_REG,
                  body_reg: float = CANONICAL_BODY_REG) -> tuple[np.ndarray, np.ndarray]:
    """Regularised CCA of train inputs ``[n, k]`` and whitened train bodies ``[n, d]``: returns
    ``(M, ρ)`` with ``M = B·diag(ρ)`` ``[d, r]`` (r = min(k, d)), B the body-side canonical directions and ρ
    their canonical correlations (descending). A prediction of the body that is the regression
    on the inputs maps to about ``U·ρ²`` and the body to ``V·ρ`` (U, V the canonical variates):
    each canonical direction counts as much as the inputs can tell about it."""
    x = np.asarray(inputs, dtype=np.float64)
    y = np.asarray(bodies_white, dtype=np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    y = y - y.mean(0)
    n = len(x)
    wx, wy = _inv_sqrt(x.T @ x / n, input_reg), _inv_sqrt(y.T @ y / n, body_reg)
    _, rho, vt = np.linalg.svd(wx @ (x.T @ y / n) @ wy, full_matrices=False)
    b = wy @ vt.T  # [d, r], r = min(k, d)
    rho = np.clip(rho, 0.0, 1.0)
    return b * rho, rho


def canonical_fit_warning(n_records: int, input_dim: int, body_dim: int) -> str | None:
    """A message when a canonical map fitted on ``n_records`` train records of ``input_dim`` +
    ``body_dim`` dimensions is likely to overfit (fewer than
    :data:`CANONICAL_RECORDS_PER_DIM` records per dimension), else None."""
    need = CANONICAL_RECORDS_PER_DIM * (input_dim + body_dim)
    if n_records >= need:
        return None
    return (f"the canonical map is fitted on {n_records} train records for {input_dim} + {body_dim} dimensions "
            f"(fewer than {need}, {CANONICAL_RECORDS_PER_DIM} per dimension): its correlations are inflated "
            f"and rankings in that space may be worse than whitened")


def canonical_columns(views: tuple[str, ...], d: int) -> np.ndarray:
    """Columns of a ``[n, len(views)·d]`` view matrix that hold :data:`CANONICAL_VIEWS` (all of
    them when the model reads neither)."""
    chosen = [i for i, v in enumerate(views) if v in CANONICAL_VIEWS] or list(range(len(views)))
    return np.concatenate([np.arange(i * d, (i + 1) * d) for i in chosen])


@torch.no_grad()
def init_score_map(model: torch.nn.Module, train_table: Any) -> dict[str, Any]:
    """Fit the canonical map on the train split's pooled views and pooled bodies (in the model's
    pooled space) and write it into ``model.norm.score_map``. Returns what the log keeps."""
    sig, body = pooled_arrays(train_table)
    d = body.shape[1]
    views = tuple(getattr(model, "views", ("mean",)))
    cols = canonical_columns(views, d)
    x = np.asarray(sig, np.float64)[:, cols]
    y = model.norm.body_to_norm(torch.from_numpy(np.asarray(body, np.float32)).to(model.norm.pool_mu.device))
    m, rho = canonical_map(x, y.double().cpu().numpy())
    full = np.zeros((d, d), np.float32)  # r = min(inputs' width, d) = d: each view is d wide
    full[:, : m.shape[1]] = m
    model.norm.score_map.copy_(torch.from_numpy(full))
    used = [v for v in views if v in CANONICAL_VIEWS] or list(views)
    return {"space": "canonical", "views": ",".join(used), "train_records": int(len(x)),
            "canonical_correlations_top": [round(float(r), 4) for r in rho[:5]],
            "canonical_correlation_median": float(np.median(rho)),
            "warning": canonical_fit_warning(len(x), x.shape[1], d)}
