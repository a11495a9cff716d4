"""Retrieval metrics from ranks, their chance levels, and repository-clustered bootstrap.

Everything here works on *ranks*: the 1-based position of a query's true body among the
distinct candidate bodies of its pool, ties already broken pessimistically by the search.
Queries from one repository are not independent (shared style, shared helpers), so the
confidence intervals resample repositories, not queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from codejepa.evaluate.errors import EvaluateError

RECALL_KS = (5, 10, 100)
METRIC_NAMES = ("rank@1", "recall@5", "recall@10", "recall@100", "mrr", "median_rank", "mean_rank")
# Metrics where larger is better (the rank summaries are the other way round).
HIGHER_IS_BETTER = {"rank@1": True, "recall@5": True, "recall@10": True, "recall@100": True,
                    "mrr": True, "median_rank": False, "mean_rank": False}


def _check_ranks(ranks: np.ndarray, pool_sizes: np.ndarray | None = None) -> np.ndarray:
    r = np.asarray(ranks)
    if r.ndim != 1 or len(r) == 0:
        raise EvaluateError("no queries to score (empty rank list)")
    if np.any(r < 1):
        raise EvaluateError("ranks are 1-based; got a rank below 1")
    if pool_sizes is not None and np.any(r > np.asarray(pool_sizes)):
        raise EvaluateError("a rank exceeds its pool size")
    return r.astype(np.float64)


def per_query_values(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query contributions whose mean is each mean-type metric."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {"rank@1": (r <= 1).astype(np.float64)}
    for k in RECALL_KS:
        out[f"recall@{k}"] = (r <= k).astype(np.float64)
    out["mrr"] = 1.0 / r
    out["mean_rank"] = r
    return out


def compute_metrics(ranks: np.ndarray) -> dict[str, float]:
    """rank@1, recall@5/10/100, MRR, median and mean rank of 1-based ranks."""
    r = _check_ranks(ranks)
    vals = {k: float(v.mean()) for k, v in per_query_values(r).items()}
    vals["median_rank"] = float(np.median(r))
    return {k: vals[k] for k in METRIC_NAMES}


def chance_metrics(pool_sizes: np.ndarray | int) -> dict[str, float]:
    """Expected metrics of a uniformly random ranking, averaged over the queries' pool sizes.

    With ``n`` distinct candidates the true body's rank is uniform on 1..n: rank@1 = 1/n,
    recall@k = min(k, n)/n, MRR = H_n/n, median = mean = (n+1)/2. With pool sizes that differ
    (repository pools) the median rank is that of the mixture of the queries' uniform ranks,
    not the median of their (n+1)/2.
    """
    n = np.atleast_1d(np.asarray(pool_sizes, dtype=np.float64))
    if np.any(n < 1):
        raise EvaluateError("a pool has no candidate")
    uniq, inv = np.unique(n, return_inverse=True)
    harmonic = np.array([np.sum(1.0 / np.arange(1, int(u) + 1)) for u in uniq])[inv]
    out = {"rank@1": float(np.mean(1.0 / n))}
    for k in RECALL_KS:
        out[f"recall@{k}"] = float(np.mean(np.minimum(k, n) / n))
    out["mrr"] = float(np.mean(harmonic / n))
    out["median_rank"] = _mixture_median(n)
    out["mean_rank"] = float(np.mean((n + 1) / 2))
    return {k: out[k] for k in METRIC_NAMES}


def _mixture_median(n: np.ndarray) -> float:
    """Median of the rank of a query drawn at random, its rank uniform on 1..n_i: the first r
    with P(rank <= r) = mean(min(r, n)/n) >= 1/2 (the midpoint of r and r + 1 when it is exactly
    1/2, so that one pool size n gives (n + 1)/2)."""
    lo, hi = 1, int(n.max())
    while lo < hi:
        mid = (lo + hi) // 2
        if np.mean(np.minimum(mid, n) / n) >= 0.5:
            hi = mid
        else:
            lo = mid + 1
    return lo + 0.5 if np.isclose(np.mean(np.minimum(lo, n) / n), 0.5) else float(lo)


def _cluster_index(clusters: Sequence[str] | np.ndarray) -> tuple[np.ndarray, int]:
    _, inv = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    return inv, int(inv.max()) + 1


def check_n_boot(n_boot: int) -> int:
    """Refuse a resample count that is not a positive integer (numpy would fail deep inside)."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise EvaluateError(f"--n-boot (bootstrap resamples) must be a positive integer, not {n_boot!r}")
    return int(n_boot)


def _resample_counts(n_clusters: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_clusters] multiplicities of a with-replacement resample of clusters."""
    n_boot = check_n_boot(n_boot)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    counts = np.zeros((n_boot, n_clusters), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(n_boot), n_clusters), draws.ravel()), 1.0)
    return counts


def _boot_stats(ranks: np.ndarray, cl: np.ndarray, n_cl: int, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric over every bootstrap resample: [n_boot] arrays."""
    per_cluster_n = np.bincount(cl, minlength=n_cl).astype(np.float64)
    denom = counts @ per_cluster_n
    denom[denom == 0] = np.nan
    out: dict[str, np.ndarray] = {}
    for name, v in per_query_values(ranks).items():
        sums = np.bincount(cl, weights=v, minlength=n_cl)
        out[name] = (counts @ sums) / denom
    # The median needs the resampled multiset itself: weighted median by cluster counts.
    order = np.argsort(ranks, kind="stable")
    r_sorted = np.asarray(ranks, dtype=np.float64)[order]
    cl_sorted = cl[order]
    med = np.empty(len(counts))
    for b in range(len(counts)):
        w = counts[b][cl_sorted]
        cw = np.cumsum(w)
        total = cw[-1]
        if total == 0:
            med[b] = np.nan
            continue
        # The k-th smallest (1-based) of the resampled multiset is the first sorted value
        # whose cumulative weight reaches k.
        def kth(k: float) -> float:
            return float(r_sorted[np.searchsorted(cw, k, side="left")])
        if total % 2 == 1:
            med[b] = kth((total + 1) / 2)
        else:
            med[b] = (kth(total / 2) + kth(total / 2 + 1)) / 2.0
    out["median_rank"] = med
    return out


@dataclass(frozen=True)
class MetricCI:
    value: float
    low: float
    high: float

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


def cis_overlap(a: dict[str, MetricCI], b: dict[str, MetricCI], metrics: Sequence[str] = ("rank@1", "mrr")) -> dict[str, bool]:
    """Whether two methods' own 95% intervals overlap, metric by metric: the stricter test
    beside the paired one (which takes out what moves both methods alike)."""
    return {m: a[m].low <= b[m].high and b[m].low <= a[m].high for m in metrics if m in a and m in b}


def bootstrap_cis(
    ranks: np.ndarray,
    clusters: Sequence[str] | np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, MetricCI]:
    """Percentile bootstrap CIs of every metric, resampling clusters (repositories).

    With fewer than two clusters there is nothing to resample at the repository level, so
    queries are resampled instead (the interval is then optimistic, and says so by being
    computed at all: the caller records the cluster count).
    """
    r = _check_ranks(ranks)
    cl, n_cl = _cluster_index(clusters)
    if len(cl) != len(r):
        raise EvaluateError("one cluster label per query is needed for the bootstrap")
    if n_cl < 2:
        cl, n_cl = np.arange(len(r)), len(r)
    point = compute_metrics(r)
    counts = _resample_counts(n_cl, n_boot, seed)
    boots = _boot_stats(r, cl, n_cl, counts)
    a = (1.0 - level) / 2.0
    out = {}
    for name in METRIC_NAMES:
        b = boots[name][np.isfinite(boots[name])]
        lo, hi = (np.quantile(b, [a, 1.0 - a]) if len(b) else (np.nan, np.nan))
        out[name] = MetricCI(point[name], float(lo), float(hi))
    return out


@dataclass(frozen=True)
class PairedComparison:
    """Method A minus method B on the same queries, with a repository-clustered bootstrap."""

    metric: str
    a: float
    b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided: could the true difference be zero (or of the other sign)?
    n_queries: int
    n_clusters: int
    # The clusters (repositories; queries where there is only one) where each method's own
    # figure is the better one: a consistent lead and one carried by a few clusters can have
    # the same mean difference.
    clusters_a_better: int = 0
    clusters_b_better: int = 0
    cluster_unit: str = "repository"

    def to_json(self) -> dict[str, float | int | str]:
        return dict(self.__dict__)


def paired_bootstrap(
    ranks_a: np.ndarray,
    ranks_b: np.ndarray,
    clusters: Sequence[str] | np.ndarray,
    *,
    metrics: Sequence[str] = ("rank@1", "mrr"),
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> list[PairedComparison]:
    """Paired bootstrap of A − B: both methods' ranks on the *same* queries resampled together.

    The p-value is the two-sided bootstrap tail probability of a difference of the other sign
    than observed (with the +1 correction, so it is never exactly zero).
    """
    ra, rb = _check_ranks(ranks_a), _check_ranks(ranks_b)
    if len(ra) != len(rb):
        raise EvaluateError("a paired comparison needs both methods' ranks on the same queries")
    cl, n_cl = _cluster_index(clusters)
    unit = "repository"
    if n_cl < 2:
        cl, n_cl, unit = np.arange(len(ra)), len(ra), "query"
    counts = _resample_counts(n_cl, n_boot, seed)
    ba, bb = _boot_stats(ra, cl, n_cl, counts), _boot_stats(rb, cl, n_cl, counts)
    pa, pb = compute_metrics(ra), compute_metrics(rb)
    al = (1.0 - level) / 2.0
    out = []
    for m in metrics:
        if m not in METRIC_NAMES:
            raise EvaluateError(f"unknown metric {m!r}; expected one of {list(METRIC_NAMES)}")
        d = ba[m] - bb[m]
        d = d[np.isfinite(d)]
        obs = pa[m] - pb[m]
        n = len(d)
        tail = min(np.sum(d <= 0), np.sum(d >= 0)) if obs != 0 else n
        p = min(1.0, 2.0 * (tail + 1) / (n + 1))
        lo, hi = np.quantile(d, [al, 1 - al])
        ca, cb = _per_cluster(ra, cl, n_cl, m), _per_cluster(rb, cl, n_cl, m)
        sign = 1.0 if HIGHER_IS_BETTER[m] else -1.0
        out.append(PairedComparison(m, pa[m], pb[m], obs, float(lo), float(hi), float(p), len(ra), n_cl,
                                    int(np.sum(sign * (ca - cb) > 0)), int(np.sum(sign * (ca - cb) < 0)), unit))
    return out


def _per_cluster(ranks: np.ndarray, cl: np.ndarray, n_cl: int, metric: str) -> np.ndarray:
    """One metric within each cluster: [n_cl]."""
    if metric == "median_rank":
        return np.array([np.median(ranks[cl == c]) for c in range(n_cl)])
    v = per_query_values(ranks)[metric]
    return np.bincount(cl, weights=v, minlength=n_cl) / np.maximum(np.bincount(cl, minlength=n_cl), 1)
