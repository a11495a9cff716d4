"""The spaces retrieval is measured in: raw, centered and whitened teacher states.

Teacher states are strongly anisotropic (a common direction dominates every vector), which
is how a prototype reaches cosine 0.9 while ranking at chance. Centering removes the common
mean, whitening also equalises the variance of every direction. Both are fitted on the TRAIN
split's body vectors only and then applied, unchanged, to every query and candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from codejepa.evaluate.errors import EvaluateError

SPACE_NAMES = ("raw", "centered", "whitened")


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
        out = np.empty(x.shape, dtype=np.float32)
        mean = self.mean.astype(np.float32) if self.mean is not None else None
        tr = self.transform.astype(np.float32) if self.transform is not None else None
        for a in range(0, len(x), chunk):
            y = np.asarray(x[a : a + chunk], dtype=np.float32)
            if mean is not None:
                y = y - mean
            if tr is not None:
                y = y @ tr
            out[a : a + chunk] = y
        return out


def fit_space(name: str, train_bodies: np.ndarray, *, shrinkage: float = 0.1, eps: float = 1e-6) -> Space:
    """Fit a space on train-split body vectors ``[n, d]``.

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
    return Space("whitened", mean, transform,
                 {"fitted_on": "train", "n_train": len(x), "shrinkage": shrinkage, "eps": eps})
