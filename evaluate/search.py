"""Exact retrieval by blocked matrix products: the true body's rank among distinct bodies.

A *scorer* gives the scores of a block of queries against a block of candidate columns; the
search never holds more than ``[query block, distinct bodies]`` scores at once (never a
queries × candidates matrix), so a million candidates fit in a few hundred MiB of scores.

Candidates whose bodies are identical (same normalised body hash) form one *group*: a group
scores the best of its members, and ranks are counted over groups. The true group's score
is read from the same score matrix as its competitors, so ties are exact, and they are broken
pessimistically: every other group scoring *at least* as high as the true body ranks above it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from codejepa.evaluate.errors import EvaluateError

DEFAULT_SCORE_BUDGET = 256 << 20  # bytes of group scores held per query block
DEFAULT_CAND_BLOCK = 16384
MATERIALIZE_BYTES = 1 << 30  # score matrices up to this size are held for a selection grid


class Scorer(Protocol):
    """Scores of queries (positions 0..n_queries-1) against candidate columns."""

    n_queries: int

    def block(self, q: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """float32 ``[len(q), len(cols)]`` scores; larger is more similar."""
        ...


def _as_index(cols: np.ndarray) -> slice | torch.Tensor:
    """A slice when the columns are contiguous (no copy of the candidate matrix)."""
    if len(cols) and cols[-1] - cols[0] + 1 == len(cols) and np.all(np.diff(cols) == 1):
        return slice(int(cols[0]), int(cols[-1]) + 1)
    return torch.from_numpy(np.ascontiguousarray(cols, dtype=np.int64))


def unit_rows(x: np.ndarray | torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """float32 rows scaled to unit norm (zero rows stay zero), with a single copy of ``x``;
    ``inplace=True`` reuses a float32 array's memory instead (the caller gives it up)."""
    if inplace and isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable:
        t = torch.from_numpy(x)
    else:
        t = torch.tensor(np.asarray(x), dtype=torch.float32) if not torch.is_tensor(x) else x.detach().float().clone()
    if t.ndim != 2:
        raise EvaluateError(f"expected a [n, d] matrix, got shape {tuple(t.shape)}")
    for a in range(0, len(t), 65536):  # in place, in chunks: no second full-size temporary
        blk = t[a : a + 65536]
        blk.div_(blk.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return t


class DenseScorer:
    """Cosine similarity of query vectors and candidate vectors (zero vectors score 0).

    ``candidates`` may be a tensor already made unit-norm by :func:`unit_rows`
    (``normalized=True``), so that many methods share one copy of a large candidate matrix.
    """

    def __init__(self, queries: np.ndarray | torch.Tensor, candidates: np.ndarray | torch.Tensor, *,
                 normalized: bool = False) -> None:
        self.q = unit_rows(queries)
        self.c = candidates if normalized and torch.is_tensor(candidates) else unit_rows(candidates)
        if self.q.shape[1] != self.c.shape[1]:
            raise EvaluateError(
                f"query vectors {tuple(self.q.shape)} and candidate vectors {tuple(self.c.shape)} do not match in width"
            )
        self.n_queries, self.n_cols = self.q.shape[0], self.c.shape[0]

    def block(self, q: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        return self.q[_as_index(q)] @ self.c[_as_index(cols)].T

    def pair(self, q: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """Elementwise scores of query q[i] with candidate cols[i]."""
        return (self.q[torch.as_tensor(q)] * self.c[torch.as_tensor(cols)]).sum(1)


class MaterializedScorer:
    """A scorer's whole ``[queries, candidates]`` matrix, computed once (for a selection grid)."""

    def __init__(self, base: Scorer, n_cols: int, *, q_block: int = 512) -> None:
        cols = np.arange(n_cols)
        self.n_queries, self.n_cols = base.n_queries, n_cols
        self.s = torch.cat([base.block(np.arange(a, min(a + q_block, base.n_queries)), cols).float()
                            for a in range(0, base.n_queries, q_block)]) if base.n_queries else torch.zeros(0, n_cols)

    def block(self, q: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        return self.s[_as_index(np.asarray(q, dtype=np.int64))][:, _as_index(cols)]


def materialized(scorer: Scorer, n_cols: int, *, budget_factor: float = 1.0) -> Scorer:
    """The scorer's whole matrix when it fits ``budget_factor`` × :data:`MATERIALIZE_BYTES`
    (read at call time), else the scorer itself: a selection grid (fusion weights, CSLS and
    sibling settings) then re-ranks one matrix instead of recomputing every score, and BM25
    (a Python loop over queries) is scored once, not once per use."""
    if isinstance(scorer, MaterializedScorer):
        return scorer
    held = 4 * scorer.n_queries * n_cols <= budget_factor * MATERIALIZE_BYTES
    return MaterializedScorer(scorer, n_cols) if held else scorer


SCORE_SAMPLE = 2048  # candidates a query's score statistics are estimated on (fusion, sibling T)


class ScoreSampleStats:
    """Per-query mean and std of a scorer's scores over a fixed sample of candidate columns."""

    def __init__(self, scorer: Scorer, cols: np.ndarray, *, sample: int = SCORE_SAMPLE, seed: int = 0,
                 q_block: int = 256) -> None:
        rng = np.random.default_rng(seed)
        s = np.sort(rng.choice(cols, size=min(sample, len(cols)), replace=False)) if len(cols) > sample else cols
        mus, sds = [], []
        for a in range(0, scorer.n_queries, q_block):
            q = np.arange(a, min(a + q_block, scorer.n_queries))
            b = scorer.block(q, s).double()
            mus.append(b.mean(1))
            sds.append(b.std(1, unbiased=False) if b.shape[1] > 1 else torch.ones(len(q), dtype=torch.float64))
        self.mean = torch.cat(mus).float() if mus else torch.zeros(0)
        sd = torch.cat(sds).float() if sds else torch.zeros(0)
        self.std = torch.where(sd > 1e-12, sd, torch.ones_like(sd))


class FusedScorer:
    """``w · z(a) + (1 − w) · z(b)``: each scorer's scores standardised per query (mean and std
    over a fixed sample of the pool), so a weight means the same thing for every query."""

    def __init__(self, a: Scorer, b: Scorer, weight: float, cols: np.ndarray, *,
                 stats: tuple[ScoreSampleStats, ScoreSampleStats] | None = None) -> None:
        if a.n_queries != b.n_queries:
            raise EvaluateError("fused scorers must score the same queries")
        self.a, self.b, self.w = a, b, float(weight)
        self.n_queries = a.n_queries
        self.sa, self.sb = stats if stats is not None else (ScoreSampleStats(a, cols), ScoreSampleStats(b, cols))

    def block(self, q: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        qi = torch.as_tensor(q)
        za = (self.a.block(q, cols) - self.sa.mean[qi, None]) / self.sa.std[qi, None]
        zb = (self.b.block(q, cols) - self.sb.mean[qi, None]) / self.sb.std[qi, None]
        return self.w * za + (1.0 - self.w) * zb


@dataclass(frozen=True)
class Groups:
    """Candidate columns ordered so that each group's members are contiguous.

    ``cols`` are candidate positions (into the scorer's candidates) sorted by group;
    ``group_of_col[i]`` is the group of ``cols[i]``; groups are numbered 0..n_groups-1.
    """

    cols: np.ndarray
    group_of_col: np.ndarray
    n_groups: int

    @classmethod
    def from_labels(cls, cols: np.ndarray, labels: np.ndarray) -> tuple[Groups, dict[object, int]]:
        """Group candidate positions by a label (a body hash); returns the label → group map."""
        cols = np.asarray(cols)
        labels = np.asarray(labels, dtype=object)
        if len(cols) != len(labels):
            raise EvaluateError("one body label per candidate is needed")
        uniq, first, inv = np.unique(labels.astype(str), return_index=True, return_inverse=True)
        # Number groups by first appearance so that the order follows the candidate order.
        order_of_group = np.argsort(first, kind="stable")
        rank_of_group = np.empty_like(order_of_group)
        rank_of_group[order_of_group] = np.arange(len(order_of_group))
        gid = rank_of_group[inv]
        order = np.lexsort((cols, gid))
        label_to_group = {uniq[g]: int(rank_of_group[g]) for g in range(len(uniq))}
        return cls(cols[order], gid[order], len(uniq)), label_to_group


def group_scores(scorer: Scorer, q: np.ndarray, groups: Groups, *, cand_block: int = DEFAULT_CAND_BLOCK) -> torch.Tensor:
    """``[len(q), n_groups]``: each group's best member score, computed block by block."""
    out = torch.full((len(q), groups.n_groups), float("-inf"), dtype=torch.float32)
    for a in range(0, len(groups.cols), cand_block):
        b = min(a + cand_block, len(groups.cols))
        s = scorer.block(q, groups.cols[a:b]).float()
        gid = groups.group_of_col[a:b]
        if gid[-1] - gid[0] + 1 == b - a:  # all singletons here: the block is the group slice
            out[:, int(gid[0]) : int(gid[-1]) + 1] = s
        else:
            idx = torch.from_numpy(gid.astype(np.int64)).expand(len(q), -1)
            out.scatter_reduce_(1, idx, s, reduce="amax", include_self=True)
    return out


def query_blocks(n_queries: int, n_groups: int, budget_bytes: int = DEFAULT_SCORE_BUDGET) -> Iterator[np.ndarray]:
    """Query position blocks sized so that a block's group scores fit the byte budget."""
    bq = max(1, min(1024, budget_bytes // max(1, 4 * n_groups)))
    for a in range(0, n_queries, bq):
        yield np.arange(a, min(a + bq, n_queries))


@dataclass
class SearchResult:
    """Ranks (1-based, pessimistic) of each query's true group, and what won each query."""

    ranks: np.ndarray  # [n] int64
    pool_sizes: np.ndarray  # [n] distinct bodies each query was ranked against
    top1_group: np.ndarray | None = None  # [n] group id of each query's best-scoring group


def _check_true(true_group: np.ndarray, n_groups: int) -> np.ndarray:
    t = np.asarray(true_group, dtype=np.int64)
    if np.any(t < 0) or np.any(t >= n_groups):
        raise EvaluateError("a query's true body is not among the pool's candidates")
    return t


def rank_shared_pool(
    scorer: Scorer,
    true_group: np.ndarray,
    groups: Groups,
    *,
    queries: np.ndarray | None = None,
    budget_bytes: int = DEFAULT_SCORE_BUDGET,
    cand_block: int = DEFAULT_CAND_BLOCK,
) -> SearchResult:
    """Rank every query's true group among all groups of one candidate pool.

    ``queries`` restricts to some query positions (``true_group`` is then aligned with them).
    """
    qpos = np.arange(scorer.n_queries) if queries is None else np.asarray(queries, dtype=np.int64)
    t_all = _check_true(true_group, groups.n_groups)
    if len(t_all) != len(qpos):
        raise EvaluateError("one true body per query is needed")
    ranks = np.empty(len(qpos), dtype=np.int64)
    top1 = np.empty(len(qpos), dtype=np.int64)
    for blk in query_blocks(len(qpos), groups.n_groups, budget_bytes):
        g = group_scores(scorer, qpos[blk], groups, cand_block=cand_block)
        t = torch.from_numpy(t_all[blk])
        true_score = g.gather(1, t[:, None])
        # Pessimistic ties: the true group itself is one of the ">=" and so is every tie.
        ranks[blk] = (g >= true_score).sum(1).numpy()
        top1[blk] = g.argmax(1).numpy()
    return SearchResult(ranks, np.full(len(qpos), groups.n_groups, dtype=np.int64), top1)


def sample_distractors(true_group: np.ndarray, n_groups: int, pool_size: int, seed: int) -> np.ndarray:
    """``[n, pool_size − 1]`` distinct distractor groups per query, never the true one.

    Depends only on (seed, query order, true groups, n_groups): reproducible whatever the block
    sizes of the search.
    """
    k = min(pool_size, n_groups) - 1
    rng = np.random.default_rng(seed)
    out = np.empty((len(true_group), max(k, 0)), dtype=np.int64)
    for i, t in enumerate(np.asarray(true_group)):
        d = rng.choice(n_groups - 1, size=k, replace=False) if k > 0 else np.empty(0, np.int64)
        out[i] = d + (d >= t)  # skip the true group
    return out


def rank_random_pools(
    scorer: Scorer,
    true_group: np.ndarray,
    groups: Groups,
    pool_size: int,
    seeds: tuple[int, ...] = (0, 1, 2),
    *,
    budget_bytes: int = DEFAULT_SCORE_BUDGET,
    cand_block: int = DEFAULT_CAND_BLOCK,
) -> SearchResult:
    """Ranks in random pools: the true body plus ``pool_size − 1`` distractors, per seed.

    The result's arrays are the seeds' results concatenated (seed-major), so a mean over it
    is the average over seeds.
    """
    if pool_size < 2:
        raise EvaluateError(f"a random pool needs at least 2 candidates, not {pool_size}")
    t_all = _check_true(true_group, groups.n_groups)
    distract = [sample_distractors(t_all, groups.n_groups, pool_size, s) for s in seeds]
    n = scorer.n_queries
    ranks = np.empty((len(seeds), n), dtype=np.int64)
    for blk in query_blocks(n, groups.n_groups, budget_bytes):
        g = group_scores(scorer, blk, groups, cand_block=cand_block)
        true_score = g.gather(1, torch.from_numpy(t_all[blk])[:, None])
        for si, d in enumerate(distract):
            ds = g.gather(1, torch.from_numpy(d[blk]))
            ranks[si, blk] = 1 + (ds >= true_score).sum(1).numpy()
    size = min(pool_size, groups.n_groups)
    return SearchResult(ranks.reshape(-1), np.full(ranks.size, size, dtype=np.int64), None)


def brute_force_ranks(queries: np.ndarray, candidates: np.ndarray, labels: np.ndarray, true_labels: np.ndarray) -> np.ndarray:
    """Reference implementation for tests: the whole score matrix at once, in float64."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    c = candidates / np.maximum(np.linalg.norm(candidates, axis=1, keepdims=True), 1e-12)
    s = q @ c.T
    uniq = np.unique(labels)
    best = np.stack([s[:, labels == u].max(1) for u in uniq], axis=1)
    t = best[np.arange(len(q)), np.searchsorted(uniq, true_labels)]
    return (best >= t[:, None]).sum(1)
