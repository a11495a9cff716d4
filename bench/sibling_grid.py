"""Time of the sibling softmax's val grid: one log-sum-exp per (T, β) against one per T.

    python bench/sibling_grid.py [--queries 5362] [--per-file 10] [--threads 1]

Each ``+sib`` row chooses T and β on a grid of 53 settings over the selection split's score
matrix (python-40: 5,362 val queries and candidates). A :class:`SiblingScorer` computes its
files' log-sum-exp in every pass, though it depends on T only; :class:`SiblingGrid` computes
it once per T. This scores a random matrix with files of ``--per-file`` queries in a row (as
the store orders records) both ways, prints each grid's seconds and checks that the two give
the same numbers.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from codejepa.core import positive_int
from codejepa.evaluate.search import DenseScorer, MaterializedScorer
from codejepa.evaluate.siblings import SIB_BETAS, SIB_TEMPERATURES, SiblingGrid, SiblingScorer


def full_pass(scorer: SiblingScorer, n: int, block: int = 256) -> torch.Tensor:
    """Each query's count of candidates scored above its own (the work of one ranking pass)."""
    out = []
    for q0 in range(0, n, block):
        q = np.arange(q0, min(n, q0 + block))
        s = scorer.block(q, np.arange(n))
        out.append((s > s[torch.arange(len(q)), torch.from_numpy(q)][:, None]).sum(1))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=positive_int, default=5362)
    ap.add_argument("--per-file", type=positive_int, default=10)
    ap.add_argument("--threads", type=positive_int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n, rng = a.queries, np.random.default_rng(0)
    q, c = (rng.standard_normal((n, 384)).astype(np.float32) for _ in range(2))
    base = MaterializedScorer(DenseScorer(q, c), n)
    files = (np.arange(n) // a.per_file).astype(str)
    settings = [(t, b) for t in SIB_TEMPERATURES for b in SIB_BETAS if b > 0 or t == SIB_TEMPERATURES[0]]
    t0 = time.perf_counter()
    old = [full_pass(SiblingScorer(base, files, 0.05 * t, b), n) for t, b in settings]
    t1 = time.perf_counter()
    grid = SiblingGrid(base, files, n)
    new = [full_pass(grid.scorer(0.05 * t, b), n) for t, b in settings]
    t2 = time.perf_counter()
    same = all(torch.equal(x, y) for x, y in zip(old, new))
    print(f"{len(settings)} settings, {n} queries × {n} candidates, files of {a.per_file}, {a.threads} thread(s)")
    print(f"  one log-sum-exp per (T, β) (SiblingScorer): {t1 - t0:6.1f} s")
    print(f"  one per T (SiblingGrid):                    {t2 - t1:6.1f} s  ({(t1 - t0) / (t2 - t1):.1f}x)")
    print(f"  the same counts for every setting: {same}")


if __name__ == "__main__":
    main()
