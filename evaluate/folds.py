"""Pooling the evaluations of a cross-validation over repositories into one result.

Each fold (``corpus folds``, then ``predict train --splits`` and ``evaluate retrieval --splits``)
ranks its own test repositories' queries among its own pool, with every statistic and
hyper-parameter fitted on that fold's train and val. Pooled, the folds cover every repository
once: the metrics are the means over all their queries, and the confidence intervals resample
all the repositories, so they narrow with the square root of the number of folds. Each query
keeps the rank it had in its own fold's pool; the pools' sizes are reported beside the table.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from codejepa.core import atomic_write_bytes, atomic_write_json
from codejepa.evaluate.errors import EvaluateError
from codejepa.evaluate.metrics import MetricCI, bootstrap_cis, check_n_boot, cis_overlap, paired_bootstrap
from codejepa.evaluate.report import (
    JSON_FILE,
    RANKS_FILE,
    add_columns,
    add_row,
    check_out_dir,
    comparison_lines,
    damaged_error,
    fit_width,
    load_ranks,
    load_result,
)

FOLDS_JSON = "folds.json"
# Options that change what a row measures: every pooled fold must have used the same.
SAME_SETTINGS = ("ridge_input", "whitening_shrinkage", "bm25_query")
FOLDS_TABLE = "folds.txt"


@dataclass
class PooledRow:
    key: str  # METHOD@SPACE, as in each fold's ranks.npz
    n_queries: int
    metrics: dict[str, MetricCI]
    per_fold_rank1: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "n_queries": self.n_queries, "per_fold_rank@1": self.per_fold_rank1,
                "metrics": {k: v.to_json() for k, v in self.metrics.items()}}


@dataclass
class PooledResult:
    folds: list[dict[str, Any]]  # per fold: dir, split label, queries, repositories, pool size
    rows: list[PooledRow]
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": "codejepa-folds", "folds": self.folds, "rows": [r.to_json() for r in self.rows],
                "comparisons": self.comparisons, "notes": self.notes,
                "ci": "95% percentile bootstrap over all folds' test repositories"}


def _load_fold(d: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    data = load_result(d)
    pool = data["pool"]
    # The fields pooling reads: a hand-edited or truncated-but-valid file fails here, not later.
    if not isinstance(pool.get("mean_pool_size"), (int, float)) or "label" not in pool or "split" not in data["settings"]:
        raise damaged_error(d / JSON_FILE, d, "no pool size, pool or split")
    ranks, clusters = load_ranks(d)
    if pool.get("n_queries") != len(clusters):  # e.g. the ranks of a later evaluation whose write was cut
        raise damaged_error(d / RANKS_FILE, d, f"{len(clusters)} queries, and retrieval.json says {pool.get('n_queries')}")
    return data, ranks, clusters


def pool_folds(eval_dirs: Sequence[str | Path], *, compare: Sequence[tuple[str, str]] = (), n_boot: int = 1000,
               seed: int = 0) -> PooledResult:
    """Pool the saved evaluations of the folds of one cross-validation (see the module doc).

    Refuses folds that share a test repository, mix stores, query splits or pool kinds, or were
    not evaluated with a split file; keeps the rows that every fold has. ``compare`` adds paired
    bootstraps of A − B (``METHOD@SPACE`` keys) over all the folds' queries, with whether the
    two methods' own CIs overlap.
    """
    if len(eval_dirs) < 2:
        raise EvaluateError("pooling needs the evaluations of at least two folds")
    check_n_boot(n_boot)
    folds, all_ranks, all_clusters = [], [], []
    together = _OneCrossValidation()
    keys: set[str] | None = None
    for d in map(Path, eval_dirs):
        data, ranks, clusters = _load_fold(d)
        together.add(d, data, clusters)
        all_ranks.append(ranks)
        all_clusters.append(clusters)
        keys = set(ranks) if keys is None else keys & set(ranks)
        folds.append({"dir": str(d), "split_key": data["store"]["splits"], "notes": data.get("notes", []),
                      "n_queries": int(len(clusters)), "n_repos": int(len(np.unique(clusters))),
                      "pool": data["pool"].get("label"), "mean_pool_size": data["pool"].get("mean_pool_size")})
    notes = together.notes(len(folds))
    assert keys is not None
    dropped = sorted(set().union(*map(set, all_ranks)) - keys)
    if dropped:
        notes.append(f"rows missing from some fold, left out: {', '.join(dropped)}")
    if not keys:
        raise EvaluateError("the folds have no method row in common")
    clusters = np.concatenate(all_clusters)
    rows = []
    for k in sorted(keys):
        r = np.concatenate([f[k] for f in all_ranks])
        rows.append(PooledRow(k, int(len(r)), bootstrap_cis(r, clusters, n_boot=n_boot, seed=seed),
                              [float(np.mean(f[k] <= 1)) for f in all_ranks]))
    rows.sort(key=lambda row: -row.metrics["mrr"].value)
    by_key = {r.key: r for r in rows}
    comparisons = []
    for a, b in compare:
        if missing := [k for k in (a, b) if k not in by_key]:  # a typo must not throw the pooled result away
            notes.append(f"--compare {a},{b} skipped: no pooled row {missing[0]!r} "
                         f"(rows: {', '.join(sorted(by_key))})")
            continue
        res = paired_bootstrap(np.concatenate([f[a] for f in all_ranks]), np.concatenate([f[b] for f in all_ranks]),
                               clusters, n_boot=max(n_boot, 2000), seed=seed)
        comparisons.append({"a": a, "b": b, "n_boot": max(n_boot, 2000), "results": [c.to_json() for c in res],
                            "cis_overlap": cis_overlap(by_key[a].metrics, by_key[b].metrics)})
    return PooledResult(folds, rows, comparisons, notes)


class _OneCrossValidation:
    """The checks that the evaluations pooled are the folds of one cross-validation: each on
    its own split file, with the same options, store, query split and pool kind, no repository
    tested twice, their split files from one `corpus folds`."""

    def __init__(self) -> None:
        self.seen_repos: dict[str, str] = {}
        self.kinds: set[tuple[str, str]] = set()
        self.stores: dict[str, str] = {}  # store file sha256 → first fold evaluated on it
        self.first_how: tuple[dict[str, Any], str] | None = None
        self.cv: dict[tuple[Any, ...], list[int]] = {}  # (folds, seed, corpus) → the fold numbers pooled

    def add(self, d: Path, data: dict[str, Any], clusters: np.ndarray) -> None:
        if not (data.get("store") or {}).get("splits"):
            raise EvaluateError(f"{d}: evaluated on the store's own split; evaluate each fold with --splits "
                                "(a file of `codejepa corpus folds`)")
        self.kinds.add((str(data["settings"].get("split")), str(data["pool"].get("label"))))
        if len(self.kinds) > 1:
            raise EvaluateError(f"the folds were evaluated differently (query split, pool): {sorted(self.kinds)}")
        how = {k: data["settings"].get(k) for k in SAME_SETTINGS}
        if self.first_how is None:
            self.first_how = (how, str(d))
        elif diff := sorted(k for k in SAME_SETTINGS if how[k] != self.first_how[0][k]):
            raise EvaluateError(f"{d} was evaluated with other settings than {self.first_how[1]} "
                                f"({', '.join(f'{k}: {how[k]} vs {self.first_how[0][k]}' for k in diff)}): "
                                "pool evaluations made with the same options")
        self.stores.setdefault(str(data["store"].get("file_sha256")), str(d))
        if len(self.stores) > 1:
            raise EvaluateError(f"{d} was evaluated on another store than {next(iter(self.stores.values()))}: "
                                "the folds of one cross-validation share one store")
        for repo in np.unique(clusters):
            if repo in self.seen_repos:
                raise EvaluateError(f"repository {repo} is tested in two folds ({self.seen_repos[repo]} and {d}): "
                                    "pool the folds of one cross-validation")
            self.seen_repos[repo] = str(d)
        sf = data["settings"].get("split_file")  # absent in evaluations older than the record
        if isinstance(sf, dict):
            self.cv.setdefault((sf.get("folds"), sf.get("seed"), sf.get("corpus_fingerprint")), []).append(sf.get("fold"))
            if len(self.cv) > 1:
                got = "; ".join(f"{k[0]} folds, seed {k[1]}" for k in self.cv)
                raise EvaluateError(f"{d}: its split file comes from another cross-validation than the folds before "
                                    f"it ({got}, or another corpus): pool the folds of one `corpus folds`")

    def notes(self, n_folds: int) -> list[str]:
        """What the pooled table must say: folds left out, folds whose cross-validation is unrecorded."""
        notes = []
        if len(self.cv) == 1:
            (k, _, _), pooled = next(iter(self.cv.items()))
            if isinstance(k, int) and (left := sorted(set(range(k)) - set(pooled))):
                notes.append(f"folds {', '.join(map(str, left))} of the {k} are not pooled: the table covers "
                             f"{len(pooled)} of {k} folds' test repositories")
        if len(self.cv) != 1 or sum(map(len, self.cv.values())) != n_folds:
            notes.append("some evaluations do not record their split file's cross-validation (made by an older "
                         "codejepa): that the folds belong together was checked by their repositories only")
        return notes


def folds_table(res: PooledResult, drop: Collection[str] = ()) -> Table:
    """The pooled table; ``drop`` names columns to leave out (see :func:`fit_width`)."""
    n_q = sum(f["n_queries"] for f in res.folds)
    n_r = sum(f["n_repos"] for f in res.folds)
    sizes = ", ".join(f"{f['mean_pool_size']:.0f}" for f in res.folds)
    t = Table(title=f"{len(res.folds)} folds pooled: {n_q} queries from {n_r} repositories (pools of {sizes} bodies)",
              caption="rank@1 / recall in %, 95% CIs over all the folds' repositories")
    cols = ("method@space", "rank@1", "MRR", "R@10", "rank@1 per fold")
    keep = add_columns(t, cols, drop, left=("method@space",))
    for r in res.rows:
        m = r.metrics
        cells = (r.key, f"{100 * m['rank@1'].value:.1f} [{100 * m['rank@1'].low:.1f}, {100 * m['rank@1'].high:.1f}]",
                 f"{m['mrr'].value:.3f} [{m['mrr'].low:.3f}, {m['mrr'].high:.3f}]",
                 f"{100 * m['recall@10'].value:.1f}", " ".join(f"{100 * x:.1f}" for x in r.per_fold_rank1))
        add_row(t, keep, cells)
    return t


def render_folds(res: PooledResult, console: Console) -> None:
    console.print(fit_width(lambda drop: folds_table(res, drop), ("R@10", "rank@1 per fold"), console))
    plain = {"soft_wrap": True, "markup": False, "highlight": False}
    for line in comparison_lines({"comparisons": res.comparisons}):
        console.print(line, **plain)
    for n in res.notes:
        console.print(f"note: {n}", style="yellow", **plain)


def write_folds_result(res: PooledResult, out_dir: str | Path) -> dict[str, str]:
    """Write folds.json and folds.txt into ``out_dir`` (callers check it with :func:`check_out_dir`
    before pooling, so that a bad folder is refused first)."""
    out = check_out_dir(out_dir)
    sio = io.StringIO()
    render_folds(res, Console(file=sio, width=200, color_system=None))
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / FOLDS_JSON, res.to_json())
        atomic_write_bytes(out / FOLDS_TABLE, sio.getvalue().encode())
    except OSError as e:  # a full disk or a folder removed meanwhile: one line, not a traceback
        raise EvaluateError(f"{out}: cannot write the pooled result ({e})") from None
    return {"json": str(out / FOLDS_JSON), "table": str(out / FOLDS_TABLE)}
