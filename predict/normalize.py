"""Normalisation statistics, fitted on the train split only.

Four per-dimension mean/std pairs, because tokens and pools have different spreads:

- ``in``: input tokens (context + signature) — standardises the transformer's inputs;
- ``sig``: pooled signatures — standardises the MLP's input;
- ``tok``: body tokens — the space the transformer's body slots are regressed in;
- ``pool``: pooled bodies — the space of pooled losses and of validation retrieval: per-dim
  standardised, or (``norm.pooled_space = "whitened"``) ZCA-whitened with the train
  covariance (shrunk by ``norm.whiten_shrink``), the space where the evaluate stage found
  linear maps retrieve best.

Sink tokens (marked ``special`` by the embed stage: BOS, [CLS], [SEP]) and outlier-norm
tokens (norm above ``outlier_factor`` × the train median token norm: the "massive
activations" of large LMs) are left out of every statistic and every pool, and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from codejepa.embed.store import Store

BLOCK_TOKENS = 1 << 15  # tokens per streamed read: bounded memory at any hidden size


@dataclass
class NormStats:
    in_mu: np.ndarray
    in_sd: np.ndarray
    sig_mu: np.ndarray
    sig_sd: np.ndarray
    tok_mu: np.ndarray
    tok_sd: np.ndarray
    pool_mu: np.ndarray
    pool_sd: np.ndarray
    pool_W: np.ndarray  # [d, d] ZCA whitening of pooled bodies (z = (x − pool_mu) @ pool_W)
    pool_Winv: np.ndarray
    in_outlier_norm: float  # token norm above which an input token is an outlier (inf: off)
    body_outlier_norm: float
    counts: dict[str, int] = field(default_factory=dict)

    ARRAYS = ("in_mu", "in_sd", "sig_mu", "sig_sd", "tok_mu", "tok_sd", "pool_mu", "pool_sd", "pool_W", "pool_Winv")

    def to_plain(self) -> dict[str, Any]:
        """Tensors and numbers only, so that it loads with ``torch.load(weights_only=True)``."""
        import torch

        d: dict[str, Any] = {k: torch.from_numpy(np.asarray(getattr(self, k), np.float32)) for k in self.ARRAYS}
        d["in_outlier_norm"] = float(self.in_outlier_norm)
        d["body_outlier_norm"] = float(self.body_outlier_norm)
        d["counts"] = {k: int(v) for k, v in self.counts.items()}
        return d

    @classmethod
    def from_plain(cls, d: dict[str, Any]) -> NormStats:
        arrays = {k: np.asarray(d[k].cpu().numpy() if hasattr(d[k], "cpu") else d[k], np.float32) for k in cls.ARRAYS}
        return cls(**arrays, in_outlier_norm=float(d["in_outlier_norm"]),
                   body_outlier_norm=float(d["body_outlier_norm"]), counts=dict(d.get("counts", {})))

    def summary(self) -> dict[str, Any]:
        def num(x: float) -> float | None:  # JSON has no infinity: null means "filter off"
            return float(x) if np.isfinite(x) else None

        return {"in_outlier_norm": num(self.in_outlier_norm), "body_outlier_norm": num(self.body_outlier_norm),
                "counts": self.counts}


class _Moments:
    """Per-dimension running sums in float64 (exact enough for millions of tokens); with
    ``cov``, also the full second-moment matrix (for whitening)."""

    def __init__(self, d: int, cov: bool = False) -> None:
        self.n = 0
        self.ref: np.ndarray | None = None  # moments are of x − ref: no cancellation in anisotropic spaces
        self.s = np.zeros(d, np.float64)
        self.ss = np.zeros(d, np.float64)
        self.xx = np.zeros((d, d), np.float64) if cov else None

    def add(self, x: np.ndarray) -> None:
        if not len(x):
            return
        if self.ref is None:
            self.ref = x.mean(0, dtype=np.float64).astype(x.dtype)
        y = x - self.ref  # float32 within a block, float64 across blocks
        self.n += len(y)
        self.s += y.sum(0, dtype=np.float64)
        self.ss += np.einsum("nd,nd->d", y, y).astype(np.float64)
        if self.xx is not None:
            y64 = y.astype(np.float64)
            self.xx += y64.T @ y64

    def whitening(self, shrink: float) -> tuple[np.ndarray, np.ndarray]:
        """ZCA whitening W (rows are x − μ, so z = (x − μ) W) and its inverse, with the
        covariance shrunk towards its mean eigenvalue by ``shrink`` (rank-deficient safe)."""
        d = len(self.s)
        if self.xx is None or self.n < 2:
            return np.eye(d, dtype=np.float32), np.eye(d, dtype=np.float32)
        m = self.s / self.n
        cov = self.xx / self.n - np.outer(m, m)
        ev, U = np.linalg.eigh((cov + cov.T) / 2)
        ev = np.maximum(ev, 0.0)
        ev = (1 - shrink) * ev + shrink * max(float(ev.mean()), 1e-12)
        W = (U / np.sqrt(ev)) @ U.T
        Winv = (U * np.sqrt(ev)) @ U.T
        return W.astype(np.float32), Winv.astype(np.float32)

    def result(self, eps: float) -> tuple[np.ndarray, np.ndarray]:
        if self.n == 0:
            return np.zeros_like(self.s, np.float32), np.ones_like(self.s, np.float32)
        m = self.s / self.n
        var = np.maximum(self.ss / self.n - m * m, 0.0)
        return (m + self.ref).astype(np.float32), np.sqrt(var + eps).astype(np.float32)


def _median_norm(store: Store, name: str, idx: np.ndarray) -> float:
    norms = []
    for _, states, special, _ in store.iter_blocks(name, idx, block_tokens=BLOCK_TOKENS):
        norms.append(np.linalg.norm(states[~special], axis=1))
    allnorms = np.concatenate(norms) if norms else np.zeros(0)
    return float(np.median(allnorms)) if len(allnorms) else 0.0


def compute_stats(store: Store, train_idx: np.ndarray, *, outlier_factor: float = 10.0,
                  sample_records: int = 2000, eps: float = 1e-5, whiten_shrink: float = 0.1,
                  progress: Any = None) -> NormStats:
    """One streamed pass over the train split's inputs and bodies (plus a small sample pass
    for the outlier thresholds). ``progress(n_done, n_total)`` is called per block."""
    idx = np.sort(np.asarray(train_idx))
    d = store.meta.hidden_size
    sample = idx[np.linspace(0, len(idx) - 1, min(sample_records, len(idx))).astype(int)] if len(idx) else idx
    sample = np.unique(sample)
    if outlier_factor > 0:
        in_thr = outlier_factor * _median_norm(store, "inputs", sample)
        body_thr = outlier_factor * _median_norm(store, "targets", sample)
    else:
        in_thr = body_thr = float("inf")
    seg = store.segments()
    m_in, m_sig, m_tok, m_pool = _Moments(d), _Moments(d), _Moments(d), _Moments(d, cov=True)
    c = dict.fromkeys(("records", "input_tokens", "input_special", "input_outliers", "body_tokens",
                       "body_special", "body_outliers", "empty_signature", "empty_body"), 0)
    c["records"] = len(idx)
    total = 2 * len(idx)
    done = 0
    for run, states, special, offs in store.iter_blocks("inputs", idx, block_tokens=BLOCK_TOKENS):
        norms = np.linalg.norm(states, axis=1)
        store.check_finite("inputs", norms, run, offs)  # a token's norm is finite iff its states are
        outl = (norms > in_thr) & ~special
        keep = ~special & ~outl
        c["input_tokens"] += len(states)
        c["input_special"] += int(special.sum())
        c["input_outliers"] += int(outl.sum())
        m_in.add(states[keep])
        for j, rec in enumerate(run):
            a = int(offs[j])
            s0, s1 = (int(v) for v in seg[rec][1])
            k = keep[a + s0 : a + s1]
            if k.any():
                m_sig.add(states[a + s0 : a + s1][k].mean(0, keepdims=True))
            else:
                c["empty_signature"] += 1
        done += len(run)
        if progress:
            progress(done, total)
    for run, states, special, offs in store.iter_blocks("targets", idx, block_tokens=BLOCK_TOKENS):
        norms = np.linalg.norm(states, axis=1)
        store.check_finite("targets", norms, run, offs)
        outl = (norms > body_thr) & ~special
        keep = ~special & ~outl
        c["body_tokens"] += len(states)
        c["body_special"] += int(special.sum())
        c["body_outliers"] += int(outl.sum())
        m_tok.add(states[keep])
        pooled = []
        for j in range(len(run)):
            a, b = int(offs[j]), int(offs[j + 1])
            k = keep[a:b]
            if not k.any():  # a body made only of outliers: its non-sink tokens, as body_features pools it
                k = ~special[a:b]
            if k.any():
                pooled.append(states[a:b][k].mean(0))
            else:
                c["empty_body"] += 1
        if pooled:
            m_pool.add(np.stack(pooled))
        done += len(run)
        if progress:
            progress(done, total)
    in_mu, in_sd = m_in.result(eps)
    sig_mu, sig_sd = m_sig.result(eps)
    tok_mu, tok_sd = m_tok.result(eps)
    pool_mu, pool_sd = m_pool.result(eps)
    pool_W, pool_Winv = m_pool.whitening(whiten_shrink)
    return NormStats(in_mu, in_sd, sig_mu, sig_sd, tok_mu, tok_sd, pool_mu, pool_sd, pool_W, pool_Winv,
                     in_outlier_norm=float(in_thr), body_outlier_norm=float(body_thr), counts=c)
