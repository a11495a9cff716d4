"""Re-ranking (`evaluate retrieval --rerank`): the scorer that lifts a first stage's top K,
checked against a direct computation, ties included."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from codejepa.evaluate.rerank import Reranker, RerankScorer
from codejepa.evaluate.search import Groups, rank_shared_pool


class Matrix:
    """A scorer over a fixed score matrix."""

    def __init__(self, m: np.ndarray) -> None:
        self.m, self.n_queries = torch.from_numpy(m), len(m)

    def block(self, q: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        return self.m[torch.from_numpy(np.asarray(q))][:, torch.from_numpy(np.asarray(cols))]


class FakeCross:
    name, epoch = "fake", 1

    def __init__(self, table: np.ndarray) -> None:
        self.table, self.calls = table, 0

    def scores(self, q_rec: np.ndarray, c_rec: np.ndarray) -> np.ndarray:
        self.calls += len(q_rec)
        return self.table[q_rec, c_rec]


def reference_ranks(base: np.ndarray, cross: np.ndarray, k: int, w: float, labels: np.ndarray,
                    true: np.ndarray) -> np.ndarray:
    """Per query: the candidates scoring above the (K+1)-th best are re-ordered by
    z(base) + w·z(cross) above all others; group max; pessimistic rank of the true label."""
    ranks = []
    for i, row in enumerate(base):
        s = row.astype(np.float64).copy()
        thr = np.sort(row)[::-1][k] if len(row) > k else -np.inf
        lift = np.flatnonzero(row > thr)
        if len(lift):
            zb = (row[lift] - row[lift].mean()) / max(row[lift].std(), 1e-6)
            zc = (cross[i, lift] - cross[i, lift].mean()) / max(cross[i, lift].std(), 1e-6)
            f = zb + w * zc
            s[lift] = 1e6 + f
        g = {lab: max(s[labels == lab]) for lab in np.unique(labels)}
        ranks.append(sum(v >= g[true[i]] for v in g.values()))
    return np.array(ranks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rerank_scorer_matches_a_direct_computation_with_ties_and_duplicates(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_q, n_c, k = 30, 60, 8
    base = rng.integers(0, 6, (n_q, n_c)).astype(np.float32)  # many ties, at the cut-off too
    labels = np.array([f"b{j // 2 if j < 10 else j}" for j in range(n_c)])  # a few duplicate bodies
    true = labels[rng.integers(0, n_c, n_q)]
    cross_table = rng.standard_normal((n_q, n_c)).astype(np.float32)
    groups, lab2g = Groups.from_labels(np.arange(n_c), labels)
    tg = np.array([lab2g[t] for t in true])
    task = SimpleNamespace(n_queries=n_q, cand_idx=np.arange(n_c), query_idx=np.arange(n_q))
    fake = FakeCross(cross_table)
    rr = Reranker(fake, k=k)
    top = rr.top(Matrix(base), task, n_records=max(n_q, n_c), cand_block=7)
    plain = rank_shared_pool(Matrix(base), tg, groups, cand_block=7).ranks
    for w in (0.0, 0.5, 3.0):
        got = rank_shared_pool(RerankScorer(Matrix(base), top, w), tg, groups, cand_block=7).ranks
        np.testing.assert_array_equal(got, reference_ranks(base, cross_table, k, w, labels, true))
        if w == 0.0:  # the first stage's own order, ties and all
            np.testing.assert_array_equal(got, plain)
    # Pairs are scored once, whatever number of rows ask for them again.
    calls = fake.calls
    rr.top(Matrix(base), task, n_records=max(n_q, n_c))
    assert fake.calls == calls


def test_rerank_moves_nothing_outside_the_top_k() -> None:
    rng = np.random.default_rng(5)
    base = rng.standard_normal((20, 40)).astype(np.float32)
    labels = np.array([f"b{j}" for j in range(40)])
    groups, _ = Groups.from_labels(np.arange(40), labels)
    task = SimpleNamespace(n_queries=20, cand_idx=np.arange(40), query_idx=np.arange(20))
    top = Reranker(FakeCross(rng.standard_normal((20, 40)).astype(np.float32)), k=5).top(Matrix(base), task, 40)
    plain = rank_shared_pool(Matrix(base), np.arange(20), groups).ranks
    got = rank_shared_pool(RerankScorer(Matrix(base), top, 5.0), np.arange(20), groups).ranks
    assert np.array_equal(got[plain > 5], plain[plain > 5])
    assert np.all(got[plain <= 5] <= 5) and not np.array_equal(got, plain)
