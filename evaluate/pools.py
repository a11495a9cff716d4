"""Candidate pools: which distinct bodies each query is ranked against.

- ``split`` (default): every body of the query split.
- ``all``: every body of the whole corpus (all splits), as the seed experiment did.
- ``N`` (an integer): the true body plus N − 1 distractors drawn from the split, per seed,
  averaged over seeds (CodeSearchNet's protocol with N = 1000); reproducible from the seeds.
- ``repo``: hard pools, the other bodies of the query's own repository.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from codejepa.evaluate.errors import EvaluateError
from codejepa.evaluate.search import (
    DEFAULT_SCORE_BUDGET,
    Groups,
    Scorer,
    SearchResult,
    rank_random_pools,
    rank_shared_pool,
)

DEFAULT_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class PoolSpec:
    kind: str  # "split" | "all" | "random" | "repo"
    size: int = 0  # random pools only
    seeds: tuple[int, ...] = DEFAULT_SEEDS

    @property
    def label(self) -> str:
        return f"random-{self.size}" if self.kind == "random" else self.kind

    def to_json(self) -> dict:
        d = {"kind": self.kind, "label": self.label}
        if self.kind == "random":
            d.update(size=self.size, seeds=list(self.seeds))
        return d


def parse_pool(spec: str | int, seeds: tuple[int, ...] = DEFAULT_SEEDS) -> PoolSpec:
    s = str(spec).strip()
    if s in ("split", "all", "repo"):
        return PoolSpec(s)
    try:
        n = int(s)
    except ValueError:
        raise EvaluateError(f"unknown pool {spec!r}; expected split, all, repo or a pool size N") from None
    if n < 2:
        raise EvaluateError(f"a random pool needs N >= 2 candidates, not {n}")
    seeds = tuple(seeds)
    # No seed would score no query at all; a negative one is refused by numpy's generator.
    if not seeds or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0 for x in seeds):
        raise EvaluateError(f"--seeds takes one or more comma-separated integers >= 0 for a random pool, "
                            f"not {','.join(map(str, seeds))!r}")
    return PoolSpec("random", n, tuple(int(x) for x in seeds))


@dataclass
class Task:
    """Queries of one split and the candidate base they are ranked against.

    ``query_idx`` and ``cand_idx`` are store indices; candidate *positions* (0..len(cand_idx)-1)
    are what scorers index. ``true_group[i]`` is query i's body group in ``groups``.
    """

    split: str
    pool: PoolSpec
    query_idx: np.ndarray
    query_repos: np.ndarray
    cand_idx: np.ndarray
    cand_labels: np.ndarray  # body hash per candidate
    groups: Groups
    true_group: np.ndarray
    query_pos_in_cand: np.ndarray  # candidate position of each query's own body
    repo_groups: dict[str, tuple[np.ndarray, Groups, np.ndarray]] = field(default_factory=dict)

    @property
    def n_queries(self) -> int:
        return len(self.query_idx)


def build_task(
    split: str,
    pool: PoolSpec,
    query_idx: np.ndarray,
    repos: np.ndarray,
    labels: np.ndarray,
    all_idx: np.ndarray | None = None,
) -> Task:
    """Queries = ``query_idx`` (store indices); ``repos``/``labels`` are per store index.

    ``all_idx`` is the whole-corpus candidate base (pool ``all``).
    """
    query_idx = np.asarray(query_idx, dtype=np.int64)
    if len(query_idx) == 0:
        raise EvaluateError(f"the {split} split has no records in this store")
    if pool.kind == "all" and all_idx is None:
        raise EvaluateError("pool 'all' needs the whole corpus's record indices")
    cand_idx = np.asarray(all_idx if pool.kind == "all" else query_idx, dtype=np.int64)
    cand_labels = np.asarray(labels, dtype=object)[cand_idx]
    groups, label_to_group = Groups.from_labels(np.arange(len(cand_idx)), cand_labels)
    qlabels = np.asarray(labels, dtype=object)[query_idx]
    true_group = np.array([label_to_group[str(lab)] for lab in qlabels], dtype=np.int64)
    pos = {int(s): i for i, s in enumerate(cand_idx)}
    try:
        qpos = np.array([pos[int(s)] for s in query_idx], dtype=np.int64)
    except KeyError:
        raise EvaluateError("a query's own body is missing from its pool") from None
    task = Task(split, pool, query_idx, np.asarray(repos, dtype=object)[query_idx], cand_idx, cand_labels,
                groups, true_group, qpos)
    if pool.kind == "repo":
        for repo in np.unique(task.query_repos.astype(str)):
            qsel = np.flatnonzero(task.query_repos.astype(str) == repo)
            csel = qpos[qsel]  # the repo's candidates are its own queries' bodies (same split)
            g, l2g = Groups.from_labels(csel, cand_labels[csel])
            tg = np.array([l2g[str(cand_labels[c])] for c in csel], dtype=np.int64)
            task.repo_groups[repo] = (qsel, g, tg)
    return task


def search_task(scorer: Scorer, task: Task, *, budget_bytes: int = DEFAULT_SCORE_BUDGET) -> SearchResult:
    """Rank every query of a task in its pool (the scorer's candidate columns are the task's
    candidate positions)."""
    kind = task.pool.kind
    if kind in ("split", "all"):
        return rank_shared_pool(scorer, task.true_group, task.groups, budget_bytes=budget_bytes)
    if kind == "random":
        return rank_random_pools(scorer, task.true_group, task.groups, task.pool.size, task.pool.seeds,
                                 budget_bytes=budget_bytes)
    if kind == "repo":
        ranks = np.empty(task.n_queries, dtype=np.int64)
        sizes = np.empty(task.n_queries, dtype=np.int64)
        top1 = np.empty(task.n_queries, dtype=np.int64)
        group_of_pos = np.empty(len(task.cand_idx), dtype=np.int64)
        group_of_pos[task.groups.cols] = task.groups.group_of_col
        for qsel, g, tg in task.repo_groups.values():
            r = rank_shared_pool(scorer, tg, g, queries=qsel, budget_bytes=budget_bytes)
            ranks[qsel], sizes[qsel] = r.ranks, r.pool_sizes
            # Winners as whole-split groups, so hubness is comparable across repositories.
            first_col = np.empty(g.n_groups, dtype=np.int64)
            first_col[g.group_of_col[::-1]] = g.cols[::-1]
            top1[qsel] = group_of_pos[first_col[r.top1_group]]
        return SearchResult(ranks, sizes, top1)
    raise EvaluateError(f"unknown pool kind {kind!r}")
