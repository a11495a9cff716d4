"""Metrics, blocked search, pools and spaces: the parts every number of the evaluation rests on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codejepa.evaluate.errors import EvaluateError
from codejepa.evaluate.metrics import (
    MetricCI,
    bootstrap_cis,
    chance_metrics,
    cis_overlap,
    compute_metrics,
    paired_bootstrap,
    per_query_values,
)
from codejepa.evaluate.pools import PoolSpec, build_task, parse_pool, search_task
from codejepa.evaluate.search import (
    DenseScorer,
    FusedScorer,
    Groups,
    MaterializedScorer,
    brute_force_ranks,
    materialized,
    rank_random_pools,
    rank_shared_pool,
    sample_distractors,
)
from codejepa.evaluate.spaces import canonical_map, fit_space
from codejepa.evaluate.baselines import BM25Scorer, RidgeFit, code_tokens, noisy_oracle
from codejepa.evaluate.report import comparison_lines

torch.set_num_threads(1)


def _ranks_by_sorting(scores: np.ndarray, true_col: np.ndarray) -> np.ndarray:
    """Ranks by a full sort (no ties in continuous random scores)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.array([int(np.flatnonzero(order[i] == true_col[i])[0]) + 1 for i in range(len(scores))])


# -- metrics vs ranx --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_ranx_on_random_runs(seed: int) -> None:
    from ranx import Qrels, Run, evaluate

    rng = np.random.default_rng(seed)
    nq, nc, d = 60, 150, 16
    c = rng.standard_normal((nc, d)).astype(np.float32)
    true_col = rng.permutation(nc)[:nq]
    # Queries near their true candidate, at varying noise: ranks spread over 1..nc.
    q = c[true_col] + rng.standard_normal((nq, d)).astype(np.float32) * rng.uniform(0.3, 3, (nq, 1)).astype(np.float32)
    scorer = DenseScorer(q, c)
    groups, _ = Groups.from_labels(np.arange(nc), np.array([f"b{i}" for i in range(nc)], dtype=object))
    res = rank_shared_pool(scorer, true_col, groups, budget_bytes=4 * nc * 7, cand_block=37)
    mine = compute_metrics(res.ranks)

    s = scorer.block(np.arange(nq), np.arange(nc)).numpy().astype(np.float64)
    qrels = Qrels({f"q{i}": {f"d{true_col[i]}": 1} for i in range(nq)})
    run = Run({f"q{i}": {f"d{j}": float(s[i, j]) for j in range(nc)} for i in range(nq)})
    ref = evaluate(qrels, run, ["hit_rate@1", "recall@5", "recall@10", "recall@100", "mrr"])
    assert mine["rank@1"] == pytest.approx(ref["hit_rate@1"], abs=1e-12)
    for k in (5, 10, 100):
        assert mine[f"recall@{k}"] == pytest.approx(ref[f"recall@{k}"], abs=1e-12)
    assert mine["mrr"] == pytest.approx(ref["mrr"], abs=1e-9)
    # Median and mean rank against an independent full sort.
    sorted_ranks = _ranks_by_sorting(s, true_col)
    np.testing.assert_array_equal(res.ranks, sorted_ranks)
    assert mine["median_rank"] == np.median(sorted_ranks)
    assert mine["mean_rank"] == pytest.approx(sorted_ranks.mean())
    assert 1 < mine["median_rank"] < nc  # the run is neither perfect nor hopeless


def test_chance_levels() -> None:
    ch = chance_metrics(100)
    assert ch["rank@1"] == pytest.approx(0.01)
    assert ch["recall@5"] == pytest.approx(0.05)
    assert ch["recall@100"] == pytest.approx(1.0)
    assert ch["mrr"] == pytest.approx(sum(1 / k for k in range(1, 101)) / 100)
    assert ch["median_rank"] == pytest.approx(50.5)
    # A uniformly random ranking's measured metrics converge to the chance levels.
    rng = np.random.default_rng(0)
    sizes = rng.integers(20, 60, 40000)
    ranks = rng.integers(1, sizes + 1)
    m, ch = compute_metrics(ranks), chance_metrics(sizes)
    per_q = per_query_values(ranks)
    for k in ("rank@1", "recall@5", "recall@10", "mrr", "mean_rank"):
        se = per_q[k].std() / np.sqrt(len(ranks))
        assert abs(m[k] - ch[k]) < 4 * se


def test_bootstrap_resamples_repositories() -> None:
    rng = np.random.default_rng(0)
    # Two repos where the method is perfect, two where it is hopeless: the repository-level
    # CI must be wide even with many queries per repo, unlike a query-level one.
    ranks = np.concatenate([np.ones(200), np.ones(200), np.full(200, 50), np.full(200, 50)]).astype(int)
    repos = np.repeat(["a", "b", "c", "d"], 200)
    ci = bootstrap_cis(ranks, repos, n_boot=500, seed=0)
    assert ci["rank@1"].value == pytest.approx(0.5)
    assert ci["rank@1"].high - ci["rank@1"].low > 0.4
    ci_q = bootstrap_cis(ranks, np.arange(len(ranks)).astype(str), n_boot=500, seed=0)
    assert ci_q["rank@1"].high - ci_q["rank@1"].low < 0.1
    assert ci["median_rank"].low <= ci["median_rank"].value <= ci["median_rank"].high
    # Reproducible from the seed.
    assert bootstrap_cis(ranks, repos, n_boot=200, seed=3) == bootstrap_cis(ranks, repos, n_boot=200, seed=3)
    del rng


def test_paired_bootstrap() -> None:
    rng = np.random.default_rng(0)
    repos = np.repeat([f"r{i}" for i in range(20)], 30)
    good = rng.integers(1, 4, len(repos))
    bad = good + rng.integers(1, 20, len(repos))
    (c1, c2) = paired_bootstrap(good, bad, repos, n_boot=1000)
    assert c1.metric == "rank@1" and c1.diff > 0 and c1.p_value < 0.01 and c1.ci_low > 0
    assert c2.metric == "mrr" and c2.diff > 0 and c2.p_value < 0.01
    same = paired_bootstrap(good, good, repos, n_boot=500)
    assert all(c.diff == 0 and c.p_value == 1.0 for c in same)
    noise = rng.integers(1, 4, len(repos))
    close = paired_bootstrap(good, noise, repos, n_boot=1000)[0]
    assert close.p_value > 0.05
    with pytest.raises(EvaluateError):
        paired_bootstrap(good, bad[:-1], repos)
    for n_boot in (0, -5, 2.5):  # numpy would fail deep inside (negative dimensions, empty quantile)
        with pytest.raises(EvaluateError, match="--n-boot"):
            paired_bootstrap(good, bad, repos, n_boot=n_boot)  # type: ignore[arg-type]
        with pytest.raises(EvaluateError, match="--n-boot"):
            bootstrap_cis(good, repos, n_boot=n_boot)  # type: ignore[arg-type]


def test_bad_ranks_are_refused() -> None:
    with pytest.raises(EvaluateError):
        compute_metrics(np.array([0, 1]))
    with pytest.raises(EvaluateError):
        compute_metrics(np.array([], dtype=int))

def test_chance_levels_of_pools_smaller_than_k() -> None:
    """Repository pools are often smaller than k: a random ranking then always recalls the
    true body within k (recall@k = 1, not k/n > 1); each query's chance is that of its own pool."""
    ch = chance_metrics(np.array([3, 3, 101]))
    assert ch["recall@5"] == pytest.approx((1 + 1 + 5 / 101) / 3)
    assert ch["recall@100"] == pytest.approx((1 + 1 + 100 / 101) / 3)
    assert ch["rank@1"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 101) / 3)
    assert ch["mean_rank"] == pytest.approx((2 + 2 + 51) / 3)
    assert all(0.0 <= ch[k] <= 1.0 for k in ("rank@1", "recall@5", "recall@10", "recall@100", "mrr"))


def test_each_bootstrap_value_is_the_metric_of_one_resample_of_repositories() -> None:
    """With one resample, the interval is that resample's metrics: every one of them must be
    what compute_metrics gives on one with-replacement draw of whole repositories (even and odd
    resampled sizes alike, so the bootstrap median is the median of the drawn ranks)."""
    ranks = np.array([1, 2, 10])
    repos = np.array(["a", "a", "b"])
    draws = {"aa": [1, 2, 1, 2], "ab": [1, 2, 10], "bb": [10, 10]}  # two repositories drawn with replacement
    possible = {k: compute_metrics(np.array(v)) for k, v in draws.items()}
    seen = set()
    for seed in range(20):
        ci = bootstrap_cis(ranks, repos, n_boot=1, seed=seed)
        got = {m: ci[m].low for m in ci}
        assert all(ci[m].low == ci[m].high for m in ci)
        match = [k for k, want in possible.items() if all(got[m] == pytest.approx(want[m]) for m in want)]
        assert match, got
        seen.update(match)
    assert seen == set(draws)  # every kind of resample (odd and even sizes) was checked


def test_bootstrap_interval_has_its_nominal_level() -> None:
    """100 repositories of three queries, half answered at rank 1 and half not: resampled
    rank@1 is Binomial(100, ½)/100, whose central 95% interval is about [0.40, 0.60]
    (a 90% one would be [0.42, 0.58]); a level of 0.5 gives [0.47, 0.53]."""
    ranks = np.repeat(np.r_[np.ones(50), np.full(50, 7)], 3).astype(int)
    repos = np.repeat([f"r{i}" for i in range(100)], 3)
    ci = bootstrap_cis(ranks, repos, n_boot=4000, seed=0)["rank@1"]
    assert ci.value == pytest.approx(0.5)
    assert ci.low == pytest.approx(0.40, abs=0.011) and ci.high == pytest.approx(0.60, abs=0.011)
    half = bootstrap_cis(ranks, repos, n_boot=4000, seed=0, level=0.5)["rank@1"]
    assert half.low == pytest.approx(0.47, abs=0.011) and half.high == pytest.approx(0.53, abs=0.011)


def test_one_repository_resamples_queries_instead() -> None:
    """A single repository cannot be resampled (every draw is the whole set, a zero-width
    interval): the bootstrap falls back to the queries, so the interval keeps a width."""
    ranks = np.array([1, 1, 1, 5, 5, 5, 1, 9, 2, 1] * 4)
    one = np.full(len(ranks), "only")
    ci = bootstrap_cis(ranks, one, n_boot=300, seed=0)
    assert ci["rank@1"].high - ci["rank@1"].low > 0.1
    assert ci["mrr"].high > ci["mrr"].value > ci["mrr"].low
    (c,) = paired_bootstrap(ranks, ranks[::-1].copy(), one, metrics=("mrr",), n_boot=300)
    assert c.n_clusters == len(ranks) and c.ci_high > c.ci_low and c.cluster_unit == "query"


def test_paired_bootstrap_is_symmetric_and_paired() -> None:
    """A worse method compared first is as significant as a better one (two-sided p-value, a
    negative interval); identical methods differ by exactly zero in every resample (both are
    resampled with the same repositories); the resampling unit is the repository."""
    rng = np.random.default_rng(0)
    repos = np.repeat([f"r{i}" for i in range(20)], 30)
    good = rng.integers(1, 4, len(repos))
    bad = good + rng.integers(1, 20, len(repos))
    fwd = paired_bootstrap(good, bad, repos, n_boot=1000)
    back = paired_bootstrap(bad, good, repos, n_boot=1000)
    for f, b in zip(fwd, back):
        assert b.diff == pytest.approx(-f.diff) and b.diff < 0
        assert b.ci_high < 0 and b.p_value < 0.01 and b.p_value == pytest.approx(f.p_value)
        assert f.n_clusters == b.n_clusters == 20 and f.n_queries == len(repos)
    for c in paired_bootstrap(good, good, repos, n_boot=300):
        assert c.ci_low == c.ci_high == 0.0
    # A difference confined to whole repositories: 3 repositories where A wins, 2 where B does.
    # Over queries it would look certain; over 5 repositories it is not.
    reps = np.repeat(["a", "b", "c", "d", "e"], 200)
    a = np.where(np.isin(reps, ["a", "b", "c"]), 1, 9)
    b = np.where(np.isin(reps, ["a", "b", "c"]), 9, 1)
    (c,) = paired_bootstrap(a, b, reps, metrics=("rank@1",), n_boot=1000)
    assert c.diff == pytest.approx(0.2) and c.n_clusters == 5 and c.p_value > 0.05 and c.ci_low < 0 < c.ci_high
    # Their own CIs: two intervals that touch overlap; disjoint ones do not.
    def ci(lo: float, hi: float) -> dict[str, MetricCI]:
        return {"rank@1": MetricCI((lo + hi) / 2, lo, hi)}

    assert cis_overlap(ci(0.1, 0.3), ci(0.3, 0.5)) == {"rank@1": True}
    assert cis_overlap(ci(0.1, 0.29), ci(0.3, 0.5)) == {"rank@1": False} == cis_overlap(ci(0.3, 0.5), ci(0.1, 0.29))
    # … and the comparison says how many repositories each method wins: 3 against 2 here.
    assert (c.clusters_a_better, c.clusters_b_better, c.cluster_unit) == (3, 2, "repository")
    # A rank summary is better when lower; a repository where both are level counts for neither.
    a2 = np.where(reps == "e", 9, a)
    b2 = np.where(reps == "e", 9, b)
    (m,) = paired_bootstrap(a2, b2, reps, metrics=("median_rank",), n_boot=200)
    assert (m.clusters_a_better, m.clusters_b_better) == (3, 1)
    line = comparison_lines({"comparisons": [{"a": "A", "b": "B", "results": [c.to_json()]}]})[0]
    assert line.endswith("(no significant difference); A better in 3 of 5 repositories, B in 2")
    old = {k: v for k, v in c.to_json().items() if not k.startswith("cluster")}  # saved before the counts were kept
    assert comparison_lines({"comparisons": [{"a": "A", "b": "B", "results": [old]}]})[0].endswith("difference)")


# -- search -----------------------------------------------------------------------------------
def test_blocked_search_equals_brute_force_with_ties_and_duplicates() -> None:
    # ±1 vectors in 64 dims: after normalisation every product is a multiple of 1/64, exact in
    # float32, so ties are real ties in both implementations.
    rng = np.random.default_rng(0)
    nc, d = 300, 64
    c = rng.choice([-1.0, 1.0], size=(nc, d)).astype(np.float32)
    c[10] = c[11]  # identical vectors, different bodies: a tie that must count against
    labels = np.array([f"b{i}" for i in range(nc)], dtype=object)
    labels[20:24] = "dup"  # four candidates with one body: one group
    q = c[rng.integers(0, nc, 120)].copy()
    flips = rng.random(q.shape) < 0.35
    q[flips] *= -1
    true_col = rng.integers(0, nc, 120)
    true_col[:5] = [10, 11, 20, 22, 23]
    q[:5] = c[true_col[:5]]
    groups, l2g = Groups.from_labels(np.arange(nc), labels)
    tg = np.array([l2g[str(labels[t])] for t in true_col])
    want = brute_force_ranks(q.astype(np.float64), c.astype(np.float64), labels.astype(str), labels[true_col].astype(str))
    for budget, block in ((4 * groups.n_groups, 7), (4 * groups.n_groups * 33, 50), (1 << 30, 4096)):
        res = rank_shared_pool(DenseScorer(q, c), tg, groups, budget_bytes=budget, cand_block=block)
        np.testing.assert_array_equal(res.ranks, want)
    assert groups.n_groups == nc - 3
    assert (res.pool_sizes == nc - 3).all()  # pools count distinct bodies, not candidates
    assert res.ranks[0] == 2 and res.ranks[1] == 2  # exact copy of another body: pessimistic rank 2
    assert res.ranks[2] == res.ranks[3] == res.ranks[4] == 1  # a duplicate body is not a competitor


def test_all_tied_scores_rank_last() -> None:
    # A zero query (the prototype in a centred space) cannot tell bodies apart: worst rank.
    c = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    q = np.zeros((5, 8), np.float32)
    groups, _ = Groups.from_labels(np.arange(40), np.array([str(i) for i in range(40)], dtype=object))
    res = rank_shared_pool(DenseScorer(q, c), np.arange(5), groups)
    assert (res.ranks == 40).all()

def test_ties_in_random_pools_count_against_the_query() -> None:
    """A query that cannot tell bodies apart (a zero vector: every score 0) ranks last in its
    random pool as in the split pool, not first: ties are pessimistic in every pool."""
    c = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    q = np.zeros((5, 8), np.float32)
    groups, _ = Groups.from_labels(np.arange(40), np.array([str(i) for i in range(40)], dtype=object))
    res = rank_random_pools(DenseScorer(q, c), np.arange(5), groups, 10, (0, 1))
    assert (res.ranks == 10).all() and (res.pool_sizes == 10).all()


def test_random_pools_reproducible_and_consistent() -> None:
    rng = np.random.default_rng(1)
    nc, d = 200, 16
    c = rng.standard_normal((nc, d)).astype(np.float32)
    q = c + rng.standard_normal((nc, d)).astype(np.float32) * 1.5
    groups, _ = Groups.from_labels(np.arange(nc), np.array([str(i) for i in range(nc)], dtype=object))
    t = np.arange(nc)
    a = rank_random_pools(DenseScorer(q, c), t, groups, 20, (0, 1), budget_bytes=4 * nc * 3)
    b = rank_random_pools(DenseScorer(q, c), t, groups, 20, (0, 1), budget_bytes=1 << 30)
    np.testing.assert_array_equal(a.ranks, b.ranks)  # independent of block sizes
    other = rank_random_pools(DenseScorer(q, c), t, groups, 20, (5, 6))
    assert not np.array_equal(a.ranks, other.ranks)
    assert a.ranks.shape == (2 * nc,) and a.ranks.max() <= 20 and (a.pool_sizes == 20).all()
    d0 = sample_distractors(t, nc, 20, 0)
    assert d0.shape == (nc, 19) and not (d0 == t[:, None]).any()
    assert all(len(set(row)) == 19 for row in d0)
    # Brute force on the sampled pools of seed 0.
    s = DenseScorer(q, c).block(np.arange(nc), np.arange(nc)).numpy()
    want = 1 + (s[np.arange(nc)[:, None], d0] >= s[np.arange(nc), t][:, None]).sum(1)
    np.testing.assert_array_equal(a.ranks[:nc], want)
    # A random pool at least as large as the split is the split pool.
    full = rank_random_pools(DenseScorer(q, c), t, groups, 10_000, (0,))
    np.testing.assert_array_equal(full.ranks, rank_shared_pool(DenseScorer(q, c), t, groups).ranks)


def test_pool_tasks_and_repo_pools() -> None:
    rng = np.random.default_rng(0)
    n, d = 60, 8
    v = rng.standard_normal((n, d)).astype(np.float32)
    repos = np.array([f"r{i % 3}" for i in range(n)], dtype=object)
    labels = np.array([f"h{i}" for i in range(n)], dtype=object)
    q_idx = np.arange(30, 60)
    task = build_task("test", parse_pool("repo"), q_idx, repos, labels)
    res = search_task(DenseScorer(v[q_idx] + 0.8 * rng.standard_normal((30, d)).astype(np.float32), v[task.cand_idx]), task)
    for i, qi in enumerate(q_idx):
        assert res.pool_sizes[i] == np.sum(repos[q_idx] == repos[qi])  # its repo's bodies only
    assert res.ranks.max() <= res.pool_sizes.max()
    with pytest.raises(EvaluateError):
        parse_pool("banana")
    with pytest.raises(EvaluateError):
        parse_pool("1")
    assert parse_pool("1000") == PoolSpec("random", 1000)
    # No seed scores no query; a negative one fails in numpy's generator: both refused, naming --seeds.
    for seeds in ((), (-1,), (0, 1.5)):
        with pytest.raises(EvaluateError, match="--seeds"):
            parse_pool("10", seeds)  # type: ignore[arg-type]
    assert parse_pool("split", ()).kind == "split"  # seeds matter to random pools only
    all_task = build_task("test", parse_pool("all"), q_idx, repos, labels, np.arange(n))
    assert all_task.groups.n_groups == n and len(all_task.cand_idx) == n
    with pytest.raises(EvaluateError, match="whole corpus"):  # one line, not numpy's TypeError on None
        build_task("test", parse_pool("all"), q_idx, repos, labels)


def test_repo_pool_ranks_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    n, d = 45, 8
    v = rng.standard_normal((n, d)).astype(np.float32)
    repos = np.array([f"r{i % 4}" for i in range(n)], dtype=object)
    labels = np.array([f"h{i}" for i in range(n)], dtype=object)
    q_idx = np.arange(n)
    qv = v + 1.0 * rng.standard_normal((n, d)).astype(np.float32)
    task = build_task("test", parse_pool("repo"), q_idx, repos, labels)
    res = search_task(DenseScorer(qv, v), task)
    for i in range(n):
        same = np.flatnonzero(repos == repos[i])
        want = brute_force_ranks(qv[i : i + 1].astype(np.float64), v[same].astype(np.float64),
                                 labels[same].astype(str), np.array([labels[i]]).astype(str))[0]
        assert res.ranks[i] == want


# -- spaces -----------------------------------------------------------------------------------
def test_whitening_fitted_on_train_only() -> None:
    rng = np.random.default_rng(0)
    d = 6
    scale = np.array([10, 5, 2, 1, 0.5, 0.1])
    train = rng.standard_normal((500, d)) * scale + 3.0
    w = fit_space("whitened", train, shrinkage=0.0)
    y = w.apply(train)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(np.cov(y.T), np.eye(d), atol=0.02)
    # The transform depends on train data alone: other held-out data cannot change it, and
    # applying it to held-out data uses the train statistics (held-out mean is not removed).
    test_a = rng.standard_normal((50, d)) + 100.0
    w2 = fit_space("whitened", train, shrinkage=0.0)
    np.testing.assert_array_equal(w.transform, w2.transform)
    assert abs(w.apply(test_a).mean()) > 1.0
    c = fit_space("centered", train)
    np.testing.assert_allclose(c.apply(train).mean(0), 0, atol=1e-4)
    shrunk = fit_space("whitened", train, shrinkage=0.5)
    # Shrinkage toward the mean variance keeps the weakest direction from being blown up to 1.
    assert np.cov(shrunk.apply(train).T)[5, 5] < 0.1
    with pytest.raises(EvaluateError):
        fit_space("whitened", train[:1])
    with pytest.raises(EvaluateError):
        fit_space("sideways", train)


def test_canonical_space_weights_directions_by_what_the_inputs_predict() -> None:
    """Bodies with two directions the inputs determine and three they cannot see: the canonical
    space keeps the first two and all but removes the others, so a prediction's error in the
    unseen directions stops deciding the ranking."""
    rng = np.random.default_rng(1)
    n, d = 4000, 5
    seen = rng.standard_normal((n, 2))
    bodies = np.concatenate([seen, rng.standard_normal((n, 3))], 1) @ rng.standard_normal((d, d)) + 2.0
    inputs = np.concatenate([seen @ rng.standard_normal((2, 4)), rng.standard_normal((n, 2))], 1) \
        + 0.1 * rng.standard_normal((n, 6))
    m, rho = canonical_map(inputs, bodies - bodies.mean(0))
    assert m.shape == (d, d) and rho[0] >= rho[1] > 0.95 and rho[2] < 0.1
    sp = fit_space("canonical", bodies, shrinkage=0.0, train_inputs=inputs)
    assert sp.name == "canonical" and sp.settings["canonical_correlations_top"][0] > 0.95
    mapped = sp.apply(bodies)
    energy = np.sort(np.linalg.svd(mapped - mapped.mean(0), compute_uv=False))[::-1] ** 2
    assert energy[2:].sum() < 0.02 * energy[:2].sum()
    with pytest.raises(EvaluateError, match="input views"):
        fit_space("canonical", bodies)


# -- baselines --------------------------------------------------------------------------------
def test_code_tokens_split_snake_and_camel_case() -> None:
    toks = code_tokens("def parse_json_file(self, HTTPServerError, getX): return fooBar2")
    for t in ("parse", "json", "file", "parse_json_file", "http", "server", "error", "get", "x", "foo", "bar", "2"):
        assert t in toks
    assert "httpservererror" in toks and "self" in toks


def test_bm25_scorer_and_fusion() -> None:
    docs = ["def a():\n    return socket_buffer", "x = parse_json(data)", "matrix @ vector", "queue.put(item)"]
    queries = ["def send(socketBuffer)", "def parseJSON()", "def push_queue_item()"]
    bm = BM25Scorer(queries, docs)
    s = bm.block(np.arange(3), np.arange(4)).numpy()
    assert s.shape == (3, 4)
    assert s[0].argmax() == 0 and s[1].argmax() == 1 and s[2].argmax() == 3
    np.testing.assert_array_equal(bm.block(np.array([1]), np.array([3, 1])).numpy(), s[1:2, [3, 1]])
    empty = BM25Scorer(["!!!"], docs).block(np.array([0]), np.arange(4)).numpy()
    assert (empty == 0).all()
    rng = np.random.default_rng(0)
    dense = DenseScorer(rng.standard_normal((3, 4)), rng.standard_normal((4, 4)))
    f1 = FusedScorer(dense, bm, 1.0, np.arange(4)).block(np.arange(3), np.arange(4)).numpy()
    f0 = FusedScorer(dense, bm, 0.0, np.arange(4)).block(np.arange(3), np.arange(4)).numpy()
    d = dense.block(np.arange(3), np.arange(4)).numpy()
    # weight 1 is the dense ranking, weight 0 the BM25 ranking
    np.testing.assert_array_equal(np.argsort(f1, 1), np.argsort(d, 1))
    np.testing.assert_array_equal(np.argsort(-f0, 1)[:, 0], s.argmax(1))

def test_fusion_mixes_per_query_z_scores_of_both_scorers() -> None:
    """A fusion weight means the same for every query only when both scores are standardised
    per query (mean and std over the pool sample): BM25's raw scale varies by orders of
    magnitude between queries, so the intermediate weights must mix z-scores."""
    docs = ["def a():\n    return socket_buffer", "x = parse_json(data)", "matrix @ vector", "queue.put(item)"]
    bm = BM25Scorer(["def send(socketBuffer)", "def parseJSON()", "def push_queue_item()"], docs)
    rng = np.random.default_rng(0)
    dense = DenseScorer(rng.standard_normal((3, 4)), rng.standard_normal((4, 4)))
    cols = np.arange(4)

    def z(s: np.ndarray) -> np.ndarray:
        s = s.astype(np.float64)
        return (s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True)

    zd, zb = z(dense.block(np.arange(3), cols).numpy()), z(bm.block(np.arange(3), cols).numpy())
    for w in (0.3, 0.8):
        got = FusedScorer(dense, bm, w, cols).block(np.arange(3), cols).numpy()
        np.testing.assert_allclose(got, w * zd + (1 - w) * zb, rtol=1e-4, atol=1e-5)


def test_ridge_closed_form_matches_normal_equations() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 5))
    y = x @ rng.standard_normal((5, 3)) + 2.0 + 0.1 * rng.standard_normal((80, 3))
    for chunk in (8192, 7):  # the sums over row chunks (7 leaves a short last one) equal one pass
        r = RidgeFit.fit(x, y, chunk=chunk)
        alpha = 0.3
        lam = alpha * r.scale
        xc, yc = x - x.mean(0), y - y.mean(0)
        b = np.linalg.solve(xc.T @ xc + lam * np.eye(5), xc.T @ yc)
        np.testing.assert_allclose(r.coef(alpha), b, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(r.predict(x[:4], alpha), (x[:4] - x.mean(0)) @ b + y.mean(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(EvaluateError):
        RidgeFit.fit(x[:1], y[:1])


def test_noisy_oracle_matches_error_norms() -> None:
    rng = np.random.default_rng(0)
    t = rng.standard_normal((50, 10))
    ref = t + rng.standard_normal((50, 10)) * rng.uniform(0.1, 2, (50, 1))
    n = noisy_oracle(t, ref, seed=0)
    np.testing.assert_allclose(np.linalg.norm(n - t, axis=1), np.linalg.norm(ref - t, axis=1), rtol=1e-5)
    np.testing.assert_array_equal(n, noisy_oracle(t, ref, seed=0))


# -- diagnostics ------------------------------------------------------------------------------
def test_collapse_diagnostics() -> None:
    from codejepa.evaluate.diagnostics import collapse_warning, effective_rank, hubness, mean_pairwise_cosine, r_squared
    from codejepa.evaluate.metrics import MetricCI

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)) + 2.0
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = u @ u.T
    want = (s.sum() - np.trace(s)) / (40 * 39)
    assert mean_pairwise_cosine(x) == pytest.approx(want)
    # RankMe: a rank-1 matrix has effective rank 1, an orthonormal one its full rank.
    assert effective_rank(np.outer(rng.standard_normal(30), rng.standard_normal(5))) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(np.eye(8)) == pytest.approx(8.0, rel=1e-6)
    assert r_squared(x, x) == 1.0
    assert r_squared(np.repeat(x.mean(0, keepdims=True), 40, 0), x) == pytest.approx(0.0, abs=1e-12)
    h = hubness(np.array([3, 3, 3, 3, 1, 2]), 10)
    assert h["top1_winner_share"] == pytest.approx(4 / 6) and h["top10_winners_share"] == 1.0
    assert h["distinct_winners_per_query"] == pytest.approx(3 / 6)  # candidates 0 and 4..9 never won
    low = MetricCI(0.02, 0.0, 0.05)
    assert collapse_warning("m", "raw", "split", low, {"prototype": MetricCI(0.01, 0.0, 0.03)}) is not None
    high = MetricCI(0.4, 0.3, 0.5)
    assert collapse_warning("m", "raw", "split", high, {"prototype": MetricCI(0.01, 0.0, 0.03)}) is None
    # fewer candidates than k: the top k can take every win even if spread evenly
    assert hubness(np.array([0, 1, 2, 0, 1, 2]), 3)["top10_share_if_uniform"] == 0.5
    # overlapping CIs are no evidence, however high the point estimate
    overlap = MetricCI(0.10, 0.02, 0.2)
    assert collapse_warning("m", "raw", "split", overlap, {"prototype": MetricCI(0.01, 0.0, 0.05)}) is not None


def test_centring_and_the_prototype_cosine_read_the_right_vectors() -> None:
    """In a space that is already centred (space_mean given) the centred cosine is the plain one; in
    the raw space it removes the prototype. The cosine to the prototype is the predictions' own,
    the collapse signal, and not the targets'."""
    from codejepa.evaluate.diagnostics import mean_cosine, vector_diagnostics

    rng = np.random.default_rng(1)
    proto = rng.standard_normal(6) * 5
    t = proto + rng.standard_normal((50, 6))
    p = np.repeat(proto[None], 50, 0) + 0.01 * rng.standard_normal((50, 6))  # a collapsed predictor
    d = vector_diagnostics(p, t, p, t, proto, np.full(6, 3.0)).values
    assert d["centred_cosine"] == pytest.approx(d["cosine_space"])
    assert d["cosine_to_prototype_raw"] > 0.99 > d["target_cosine_to_prototype_raw"]
    raw = vector_diagnostics(p, t, p, t, proto, None).values
    assert raw["centred_cosine"] == pytest.approx(mean_cosine(p - proto, t - proto))


def test_materialized_holds_a_matrix_within_its_budget_and_scores_as_the_scorer(monkeypatch: pytest.MonkeyPatch) -> None:
    import codejepa.evaluate.search as search_mod

    g = np.random.default_rng(0)
    dense = DenseScorer(g.standard_normal((6, 4)), g.standard_normal((5, 4)))
    size = 4 * 6 * 5  # float32 bytes of the whole matrix
    monkeypatch.setattr(search_mod, "MATERIALIZE_BYTES", size)  # read at call time
    held = materialized(dense, 5)
    assert isinstance(held, MaterializedScorer) and materialized(held, 5) is held
    q, cols = np.array([4, 0, 2]), np.array([3, 1])
    assert torch.allclose(held.block(q, cols), dense.block(q, cols))
    monkeypatch.setattr(search_mod, "MATERIALIZE_BYTES", size - 1)
    assert materialized(dense, 5) is dense  # over the budget: scored on demand
    assert isinstance(materialized(dense, 5, budget_factor=2), MaterializedScorer)


def test_std_ratio_reads_only_the_directions_where_the_targets_spread() -> None:
    # The canonical space gives uncorrelated directions ~0 weight: a prediction's spread
    # there over the targets' ~0 made the mean ratio 1e10 (a noisy oracle's row).
    from codejepa.evaluate.diagnostics import vector_diagnostics

    rng = np.random.default_rng(0)
    t = rng.standard_normal((200, 6))
    t[:, 4:] *= 1e-12
    p = t + 0.1 * rng.standard_normal((200, 6))
    d = vector_diagnostics(p, t, p, t, np.zeros(6), None).values
    assert 0.9 < d["std_ratio_mean"] < 1.1 and 0.9 < d["std_ratio_median"] < 1.1


def test_chance_median_of_mixed_pool_sizes_is_the_mixtures() -> None:
    """Repository pools differ in size: the chance median rank is the median rank of a random
    ranking over all the queries (estimated here by simulation), not the median of each
    query's (n + 1)/2, which overstates it by a third on sizes spread over 2..400."""
    sizes = np.random.default_rng(0).integers(2, 400, 500)
    sim = np.median(np.random.default_rng(1).integers(1, np.tile(sizes, 200) + 1))
    assert chance_metrics(sizes)["median_rank"] == pytest.approx(sim, rel=0.02)
    assert chance_metrics(100)["median_rank"] == 50.5 and chance_metrics(101)["median_rank"] == 51.0
