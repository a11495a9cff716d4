"""The spaces retrieval is measured in: raw, centered, whitened and canonical teacher states.

Teacher states are strongly anisotropic (a common direction dominates every vector), which
is how a prototype reaches cosine 0.9 while ranking at chance. Centering removes the common
mean, whitening also equalises the variance of every direction. The canonical space goes one
step further: whitened directions weighted by how well the signature predicts them (their
canonical correlation with the pooled signature views), so that the directions no signature
can predict — noise in every prediction — stop deciding the ranking. All are fitted on the
TRAIN split only (the canonical space on its signatures too) and then applied, unchanged, to
every query and candidate: predictions and bodies go through the same map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from codejepa.evaluate.errors import EvaluateError
from codejepa.predict.canonical import CANONICAL_BODY_REG, CANONICAL_INPUT_REG, canonical_fit_warning, canonical_map

SPACE_NAMES = ("raw", "centered", "whitened", "canonical")


@dataclass(frozen=True)
class Space:
    """An affine map ``x ↦ (x − mean) @ transform`` (identity for ``raw``)."""

    name: str
    mean: np.ndarray | None  # [d] or None
    transform: np.ndarray | None  # [d, d] or None
    settings: dict

    def apply(self, x: np.ndarray, *, chunk: int = 65536) -> np.ndarray:
        """float32 ``[n, d]`` in this space: a new array, except for ``raw`` (the input as
        float32, possibly the same array). Filled in chunks, so a million-row matrix needs no
        full-size temporaries beside the result."""
        x = np.asarray(x)
        if self.mean is None and self.transform is None:
            return np.asarray(x, dtype=np.float32)
        mean = self.mean.astype(np.float32) if self.mean is not None else None
        tr = self.transform.astype(np.float32) if self.transform is not None else None
        out = np.empty((len(x), x.shape[1] if tr is None else tr.shape[1]), dtype=np.float32)
        for a in range(0, len(x), chunk):
            y = np.asarray(x[a : a + chunk], dtype=np.float32)
            if mean is not None:
                y = y - mean
            if tr is not None:
                y = y @ tr
            out[a : a + chunk] = y
        return out


def fit_space(name: str, train_bodies: np.ndarray, *, shrinkage: float = 0.1, eps: float = 1e-6,
              train_inputs: np.ndarray | None = None) -> Space:
    """Fit a space on train-split body vectors ``[n, d]`` (and, for ``canonical``, the same
    records' pooled input views ``train_inputs`` ``[n, k]``).

    Whitening uses the shrunk covariance ``(1 − s)·Σ + s·(tr Σ / d)·I`` (plus ``eps``·the mean
    variance) so that directions the train split barely spans are not blown up to noise.
    """
    if name not in SPACE_NAMES:
        raise EvaluateError(f"unknown space {name!r}; expected one of {list(SPACE_NAMES)}")
    x = np.asarray(train_bodies, dtype=np.float64)
    if name == "raw":
        return Space("raw", None, None, {})
    if x.ndim != 2 or len(x) < 2:
        raise EvaluateError(f"the {name} space needs at least 2 train-split bodies to fit; the store has {len(x)}")
    mean = x.mean(0)
    if name == "centered":
        return Space("centered", mean, None, {"fitted_on": "train", "n_train": len(x)})
    if not 0.0 <= shrinkage <= 1.0:
        raise EvaluateError(f"whitening shrinkage must be in [0, 1], not {shrinkage}")
    xc = x - mean
    cov = xc.T @ xc / (len(x) - 1)
    d = cov.shape[0]
    avg_var = float(np.trace(cov)) / d
    if avg_var <= 0:
        raise EvaluateError("train-split bodies have zero variance; cannot whiten")
    cov = (1.0 - shrinkage) * cov + (shrinkage + eps) * avg_var * np.eye(d)
    w, v = np.linalg.eigh(cov)
    w = np.maximum(w, eps * avg_var)
    transform = (v / np.sqrt(w)) @ v.T  # ZCA: stays close to the original axes
    settings = {"fitted_on": "train", "n_train": len(x), "shrinkage": shrinkage, "eps": eps}
    if name == "whitened":
        return Space("whitened", mean, transform, settings)
    if train_inputs is None or len(train_inputs) != len(x):
        raise EvaluateError("the canonical space needs the train split's pooled input views, one row per body")
    if not np.all(np.isfinite(train_inputs)):
        raise EvaluateError("the canonical space's train inputs contain NaN/inf")
    m, rho = canonical_map(train_inputs, xc @ transform)
    return Space("canonical", mean, transform @ m,
                 {**settings, "input_reg": CANONICAL_INPUT_REG, "body_reg": CANONICAL_BODY_REG,
                  "canonical_correlations_top": [round(float(r), 4) for r in rho[:5]],
                  "canonical_correlation_median": float(np.median(rho)),
                  "warning": canonical_fit_warning(len(x), np.shape(train_inputs)[1], d)})
