"""Honest baselines: what a learned predictor must beat to mean anything.

Vector baselines produce query vectors in teacher space (prototype, signature-as-query,
ridge, nearest neighbour, oracle, noisy oracle); BM25 and the ridge + BM25 fusion produce
scores; the random baseline produces ranks directly. Every statistic is fitted on TRAIN;
hyper-parameters (ridge's λ, the fusion weight) are chosen on VAL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from codejepa.evaluate.errors import EvaluateError
from codejepa.evaluate.spaces import Space, fit_space
from codejepa.predict.lexical import BM25Scorer, code_tokens  # noqa: F401  (BM25 lives with the training-time offset)
from codejepa.predict.ridge import RidgePath

# ridge+last: ridge on [signature mean, the signature's last-token state], the pooled views the
# ridge-residual and transformer-residual predictors read — what their learned part must beat.
# reverse: the other direction — each candidate body mapped to the signature's views, ranked
# against the query's own views (see ReverseFit).
BASELINE_NAMES = ("random", "prototype", "signature", "ridge", "ridge+last", "nn", "bm25", "ridge+bm25", "reverse",
                  "oracle", "noisy_oracle")
RIDGE_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
# Weight of the (z-scored) dense score. BM25's z-scores are heavy-tailed (a body sharing a rare
# identifier scores far out), so the useful weights crowd near 1: the grid is finer there.
FUSION_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99, 1.0)


def parse_baselines(spec: str | None) -> tuple[str, ...]:
    """``all``, ``none`` or a comma-separated list of :data:`BASELINE_NAMES`."""
    if spec is None or spec.strip() == "all":
        return BASELINE_NAMES
    if spec.strip() in ("none", ""):
        return ()
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [n for n in names if n not in BASELINE_NAMES]
    if bad:
        raise EvaluateError(f"unknown baseline(s) {bad}; expected all, none or some of {list(BASELINE_NAMES)}")
    return names


# -- ridge ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RidgeFit:
    """Closed-form ridge from input vectors to body vectors, for a grid of λ at once: the
    predict stage's :class:`~codejepa.predict.ridge.RidgePath` (one eigendecomposition, float64
    sums over row chunks, λ relative to the mean eigenvalue), arrays in and out."""

    path: RidgePath

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, *, chunk: int = 8192) -> RidgeFit:
        if len(x) != len(y) or len(x) < 2:
            raise EvaluateError(f"ridge needs at least 2 train pairs, got {len(x)}")
        return cls(RidgePath(np.asarray(x), np.asarray(y), chunk=chunk))

    @property
    def scale(self) -> float:
        return self.path.scale

    def coef(self, alpha: float) -> np.ndarray:
        return self.path.coef(alpha).numpy()

    def predict(self, x: np.ndarray, alpha: float) -> np.ndarray:
        p = self.path
        return ((np.asarray(x, dtype=np.float64) - p.x_mean.numpy()) @ self.coef(alpha) + p.y_mean.numpy()).astype(np.float32)


@dataclass(frozen=True)
class ReverseFit:
    """The reverse direction: ridge from a body to its signature's pooled views.

    Instead of predicting the body from the signature, each *candidate* body is mapped to the
    signature views it predicts, and the query's own views are ranked against those. Both sides
    are whitened on the train split (body and signature spaces apart), and the ridge is fitted
    on train pairs. Nothing of the query's body is read: the query side is its signature alone.
    It is the natural competitor of any signature → body predictor, and strong wherever the
    teacher's body states echo the signature (in-context targets).
    """

    sig_space: Space
    body_space: Space
    ridge: RidgeFit

    @classmethod
    def fit(cls, sig_views: np.ndarray, bodies: np.ndarray, *, shrinkage: float = 0.1) -> ReverseFit:
        sig_space = fit_space("whitened", sig_views, shrinkage=shrinkage)
        body_space = fit_space("whitened", bodies, shrinkage=shrinkage)
        return cls(sig_space, body_space, RidgeFit.fit(body_space.apply(bodies), sig_space.apply(sig_views)))

    def queries(self, sig_views: np.ndarray) -> np.ndarray:
        """The queries' signature views in the whitened signature space."""
        return self.sig_space.apply(sig_views).astype(np.float32)

    def candidates(self, bodies: np.ndarray, alpha: float) -> np.ndarray:
        """The signature views each body predicts, in the same space."""
        return self.ridge.predict(self.body_space.apply(bodies), alpha)


# -- BM25 -------------------------------------------------------------------------------------
# -- vector helpers ---------------------------------------------------------------------------
def nearest_rows(queries: np.ndarray, keys: np.ndarray, *, q_block: int = 1024, k_block: int = 65536) -> np.ndarray:
    """Index of each query's most cosine-similar key (blocked, exact)."""
    q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(queries, dtype=np.float32)), dim=1)
    k = torch.nn.functional.normalize(torch.as_tensor(np.asarray(keys, dtype=np.float32)), dim=1)
    if len(k) == 0:
        raise EvaluateError("nearest-neighbour baseline: no train signatures to search")
    best = np.empty(len(q), dtype=np.int64)
    for a in range(0, len(q), q_block):
        qb = q[a : a + q_block]
        top_v = torch.full((len(qb),), float("-inf"))
        top_i = torch.zeros(len(qb), dtype=torch.int64)
        for c in range(0, len(k), k_block):
            s = qb @ k[c : c + k_block].T
            v, i = s.max(1)
            better = v > top_v
            top_v = torch.where(better, v, top_v)
            top_i = torch.where(better, i + c, top_i)
        best[a : a + len(qb)] = top_i.numpy()
    return best


def noisy_oracle(targets: np.ndarray, reference: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each target plus isotropic noise whose norm is the reference prediction's own error
    for that query: can an error of that size retrieve at all?"""
    t = np.asarray(targets, dtype=np.float64)
    err = np.linalg.norm(np.asarray(reference, dtype=np.float64) - t, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(t.shape)
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return (t + err * z).astype(np.float32)
