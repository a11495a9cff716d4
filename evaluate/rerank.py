"""Re-ranking: a cross-scorer (``codejepa predict cross``) re-scores a row's top K candidates.

For each query, the ``K`` best candidates of a row's final scores (after its CSLS, BM25 fusion
or sibling softmax) are scored again by the cross-scorer, which reads the query's signature
tokens and the candidate body's tokens together. Their new score is the per-query z-score of
the first-stage scores plus ``w`` × that of the cross-scorer's, over the K; the K are placed
above every other candidate, which keep their first-stage order. Candidates tied with the
first one outside the K are not lifted (ties stay pessimistic), so ``w = 0`` is exactly the
first stage's ranking. ``w`` is chosen on the selection (val) split's MRR, ``w = 0`` always
among the candidates. The row is ``NAME+rerank``.

Only the ``split`` and ``all`` pools are re-ranked: the top K of a random or per-repository
pool would be another pool's top K.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from codejepa.evaluate.errors import EvaluateError
from codejepa.evaluate.pools import Task
from codejepa.evaluate.search import DEFAULT_CAND_BLOCK, Scorer, query_blocks

RERANK_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)
SUFFIX = "+rerank"
DEFAULT_K = 50
POOLS = ("split", "all")
NEVER = ("oracle", "noisy_oracle", "random", "prototype")  # rows whose re-ranking means nothing


@dataclass
class TopCandidates:
    """Each query's top K candidate positions by a first stage, their first-stage scores and
    the cross-scorer's scores of the same pairs. ``lifted`` is False for candidates tied with
    the best one left out: they stay in the first-stage order with their ties (pessimistic)."""

    cols: torch.Tensor  # [n, K] int64 candidate positions
    base: torch.Tensor  # [n, K] float32
    cross: torch.Tensor  # [n, K] float32
    lifted: torch.Tensor  # [n, K] bool


def _masked_z(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-row z-scores over the entries where ``m`` is 1."""
    n = m.sum(1, keepdim=True).clamp_min(1)
    mean = (x * m).sum(1, keepdim=True) / n
    sd = ((((x - mean) * m) ** 2).sum(1, keepdim=True) / n).sqrt()
    return (x - mean) / sd.clamp_min(1e-6)


class RerankScorer:
    """A first stage's scores with each query's top K lifted above the rest and re-ordered by
    z(first stage) + w · z(cross-scorer); every other candidate keeps its first-stage score."""

    def __init__(self, base: Scorer, top: TopCandidates, weight: float) -> None:
        self.base, self.top, self.weight = base, top, float(weight)
        self.n_queries = base.n_queries
        m = top.lifted.float()
        fused = _masked_z(top.base, m) + self.weight * _masked_z(top.cross, m)
        low = torch.where(top.lifted, fused, torch.full_like(fused, float("inf"))).min(1, keepdim=True).values
        # rowmax + 1 + (fused − its min): above every first-stage score of the row, in any unit.
        self.lift = top.base.max(1, keepdim=True).values + 1.0 + (fused - low)

    def block(self, q: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        q = np.asarray(q, dtype=np.int64)
        s = self.base.block(q, cols).float().clone()
        if len(cols) == 0:
            return s
        where = torch.full((int(np.max(cols)) + 1,), -1, dtype=torch.long)
        where[torch.from_numpy(np.asarray(cols, dtype=np.int64))] = torch.arange(len(cols))
        tq = torch.from_numpy(q)
        tc = self.top.cols[tq]
        inside = (tc < len(where)) & self.top.lifted[tq]
        pos = torch.where(inside, where[tc.clamp(max=len(where) - 1)], torch.full_like(tc, -1))
        r, k = (pos >= 0).nonzero(as_tuple=True)
        s[r, pos[r, k]] = self.lift[tq][r, k]
        return s


@dataclass
class Reranker:
    """A loaded cross-scorer, what it applies to, and the pair scores computed so far (rows
    share most of their top candidates, so each pair is scored once)."""

    cross: Any  # codejepa.predict.cross.CrossRun, prepared for the store
    k: int = DEFAULT_K
    patterns: tuple[str, ...] = ("*",)
    _keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _vals: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    n_scored: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise EvaluateError(f"--rerank-k must be ≥ 1, not {self.k}")

    def wants(self, name: str) -> bool:
        if name.split("+")[0] in NEVER or name.endswith(SUFFIX):
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def pair_scores(self, q_rec: np.ndarray, c_rec: np.ndarray, n_records: int) -> np.ndarray:
        keys = q_rec.astype(np.int64) * n_records + c_rec.astype(np.int64)
        uniq, inv = np.unique(keys, return_inverse=True)
        pos = np.searchsorted(self._keys, uniq)
        known = (pos < len(self._keys)) & (self._keys[np.minimum(pos, len(self._keys) - 1)] == uniq) \
            if len(self._keys) else np.zeros(len(uniq), bool)
        new = uniq[~known]
        if len(new):
            vals = self.cross.scores(new // n_records, new % n_records)
            self.n_scored += len(new)
            keys_all = np.concatenate([self._keys, new])
            order = np.argsort(keys_all, kind="stable")
            self._keys, self._vals = keys_all[order], np.concatenate([self._vals, vals])[order]
        return self._vals[np.searchsorted(self._keys, uniq)][inv]

    def top(self, scorer: Scorer, task: Task, n_records: int, *, cand_block: int = DEFAULT_CAND_BLOCK) -> TopCandidates:
        """The scorer's top K candidate positions of every query of ``task``, with cross scores."""
        n_cols = len(task.cand_idx)
        k = min(self.k, n_cols)
        cols = torch.empty((task.n_queries, k), dtype=torch.long)
        base = torch.empty((task.n_queries, k), dtype=torch.float32)
        all_cols = np.arange(n_cols)
        lifted = torch.empty((task.n_queries, k), dtype=torch.bool)
        for blk in query_blocks(task.n_queries, n_cols):
            s = torch.cat([scorer.block(blk, all_cols[a : a + cand_block]).float()
                           for a in range(0, n_cols, cand_block)], 1)
            v, i = s.topk(min(k + 1, n_cols), dim=1)
            cols[blk], base[blk] = i[:, :k], v[:, :k]
            # A candidate tied with the first one left out is not lifted: which of the tied
            # ones topk kept is arbitrary, and lifting it would break the tie in its favour.
            lifted[blk] = v[:, :k] > v[:, k:] if v.shape[1] > k else torch.ones_like(v, dtype=torch.bool)
        q_rec = np.repeat(task.query_idx, k)
        c_rec = task.cand_idx[cols.numpy().reshape(-1)]
        keep = lifted.numpy().reshape(-1)
        cross = np.zeros(len(q_rec), np.float32)
        cross[keep] = self.pair_scores(q_rec[keep], c_rec[keep], n_records)
        return TopCandidates(cols, base, torch.from_numpy(cross.reshape(task.n_queries, k)), lifted)
