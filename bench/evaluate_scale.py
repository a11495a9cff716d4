"""Scale check of the evaluate stage's exact search: 1M candidates on a 24 GiB machine.

    .venv/bin/python bench/evaluate_scale.py                       # 1M × 384, 1000 queries
    .venv/bin/python bench/evaluate_scale.py --dim 2048 --queries 256

Random unit vectors stand in for pooled body states (the search cost does not depend on the
values); queries are noisy copies of random candidates. Prints wall time per stage, query
throughput and the peak resident memory, and checks a few ranks against a brute-force
computation in float64.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import torch

from codejepa.core import positive_int


def peak_rss_gib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 30) if sys.platform == "darwin" else r / (1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=positive_int, default=1_000_000)
    ap.add_argument("--queries", type=positive_int, default=1000)
    ap.add_argument("--dim", type=positive_int, default=384)
    ap.add_argument("--noise", type=float, default=6.0, help="query = candidate + noise × N(0, 1) per dimension")
    ap.add_argument("--budget-mib", type=int, default=256, help="group scores held per query block")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--random-pool", type=int, default=1000, help="also rank in random pools of this size (0: skip)")
    args = ap.parse_args()
    if args.queries > args.candidates or args.random_pool > args.candidates:
        ap.error("--queries and --random-pool cannot be more than --candidates (queries are drawn from them)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from codejepa.evaluate.metrics import compute_metrics
    from codejepa.evaluate.search import DenseScorer, Groups, rank_random_pools, rank_shared_pool, unit_rows

    n, d, nq = args.candidates, args.dim, args.queries
    print(f"candidates {n:,} × {d} float32 ({n * d * 4 / 2**30:.2f} GiB), {nq} queries, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    cand = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 100_000):  # generate in chunks: no float64 temporary of the whole matrix
        cand[a : a + 100_000] = rng.standard_normal((min(100_000, n - a), d), dtype=np.float32)
    true_col = rng.choice(n, size=nq, replace=False)
    queries = cand[true_col] + args.noise * rng.standard_normal((nq, d), dtype=np.float32)
    t_gen = time.perf_counter() - t0

    t0 = time.perf_counter()
    cand_unit = unit_rows(cand, inplace=True)  # normalised in place: no second copy
    del cand
    groups = Groups(np.arange(n), np.arange(n), n)  # all bodies distinct
    scorer = DenseScorer(queries, cand_unit, normalized=True)
    t_prep = time.perf_counter() - t0
    print(f"generate {t_gen:.1f} s, normalise {t_prep:.1f} s, peak RSS so far {peak_rss_gib():.2f} GiB")

    t0 = time.perf_counter()
    res = rank_shared_pool(scorer, true_col, groups, budget_bytes=args.budget_mib << 20)
    t_search = time.perf_counter() - t0
    m = compute_metrics(res.ranks)
    print(f"shared pool of {n:,}: {t_search:.1f} s for {nq} queries ({nq / t_search:.1f} queries/s, "
          f"{nq * n / t_search / 1e6:.1f} M scores/s); rank@1 {m['rank@1']:.3f}, MRR {m['mrr']:.3f}, "
          f"median rank {m['median_rank']:.0f}; peak RSS {peak_rss_gib():.2f} GiB")

    # Brute-force check of a few queries in float64.
    check = np.arange(min(5, nq))
    for i in check:
        q = torch.as_tensor(queries[i], dtype=torch.float64)
        q /= q.norm()
        s = torch.cat([cand_unit[a : a + 65536].double() @ q for a in range(0, n, 65536)]).numpy()
        want = int((s >= s[true_col[i]]).sum())
        # float32 vs float64 scores may differ in the last bits: near-ties may move a rank.
        near = int((np.abs(s - s[true_col[i]]) < 1e-6).sum())
        assert abs(int(res.ranks[i]) - want) <= near, (i, res.ranks[i], want)
    print(f"brute-force float64 check of {len(check)} queries: ok")

    if args.random_pool:
        t0 = time.perf_counter()
        rp = rank_random_pools(scorer, true_col, groups, args.random_pool, (0, 1, 2), budget_bytes=args.budget_mib << 20)
        t_rp = time.perf_counter() - t0
        mr = compute_metrics(rp.ranks)
        print(f"random pools of {args.random_pool} (3 seeds) drawn from {n:,}: {t_rp:.1f} s; rank@1 {mr['rank@1']:.3f}, "
              f"MRR {mr['mrr']:.3f}; peak RSS {peak_rss_gib():.2f} GiB")
    print(f"peak RSS {peak_rss_gib():.2f} GiB (limit of the target machine: 24 GiB)")


if __name__ == "__main__":
    main()
