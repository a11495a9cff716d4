"""The rows of one evaluation: each method's ranks with CIs, and the variants any scorer can get.

A :class:`RowWriter` turns a scorer's search into a :class:`MethodRow` (bootstrap CIs over the
query repositories, hubness of its top-1 wins) and derives the corrected rows from it:
``NAME+bm25`` (fused with BM25's scores), ``NAME+csls`` (the hubness correction) and
``NAME+sib`` (the sibling softmax), each setting chosen on the selection split's MRR, never on
the queries'. :func:`reverse_rows` adds the ``reverse`` baseline (bodies mapped to the
signature views they imply) with its variants; with ``--fuse-reverse`` a body-predicting
scorer also gets ``NAME+rev``, fused with ``reverse`` (the pair scored in both directions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from codejepa.evaluate.baselines import FUSION_WEIGHTS, RIDGE_ALPHAS, ReverseFit
from codejepa.evaluate.diagnostics import hubness
from codejepa.evaluate.hubness import CSLS_KS, CSLS_BETAS, HubScorer, hub_penalties
from codejepa.evaluate.hubness import SUFFIX as CSLS_SUFFIX
from codejepa.evaluate.metrics import MetricCI, bootstrap_cis, chance_metrics, compute_metrics
from codejepa.evaluate.pools import Task, search_task
from codejepa.evaluate.rerank import POOLS as RERANK_POOLS
from codejepa.evaluate.rerank import RERANK_WEIGHTS, Reranker, RerankScorer
from codejepa.evaluate.rerank import SUFFIX as RERANK_SUFFIX
from codejepa.evaluate.search import (
    SCORE_SAMPLE,
    DenseScorer,
    FusedScorer,
    ScoreSampleStats,
    SearchResult,
    materialized,
    unit_rows,
)
from codejepa.evaluate.siblings import SIB_BETAS, SIB_TEMPERATURES, SiblingGrid, SiblingScorer, score_spread
from codejepa.evaluate.siblings import SUFFIX as SIB_SUFFIX

Log = Callable[[str], None]
NO_SPACE = "-"  # methods that do not depend on the vector space (random, BM25)
FUSED_SUFFIX = "+bm25"  # a run's scores fused with BM25's: NAME+bm25
REVERSE_SUFFIX = "+rev"  # a body-predicting scorer fused with the reverse baseline's: NAME+rev
# NAME+csls: its scores hubness-corrected; NAME+sib: its scores with the sibling softmax;
# NAME+rerank: its top K re-scored by a cross-scorer
RESERVED_SUFFIXES = (FUSED_SUFFIX, REVERSE_SUFFIX, CSLS_SUFFIX, SIB_SUFFIX, RERANK_SUFFIX)


@dataclass
class MethodRow:
    method: str
    kind: str  # "run" | "baseline"
    space: str
    pool: str
    metrics: dict[str, MetricCI]
    chance: dict[str, float]
    n_queries: int
    ranks: np.ndarray
    clusters: np.ndarray
    diagnostics: dict[str, float | None] | None = None
    hubness: dict[str, float] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    warning: str | None = None

    @property
    def key(self) -> str:
        return f"{self.method}@{self.space}"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method, "kind": self.kind, "space": self.space, "pool": self.pool,
            "n_queries": self.n_queries,
            "metrics": {k: v.to_json() for k, v in self.metrics.items()},
            "chance": self.chance, "diagnostics": self.diagnostics, "hubness": self.hubness,
            "settings": self.settings, "warning": self.warning,
        }


def selection_mrr(scorer: Any, task: Task) -> float:
    """The MRR a scorer reaches on a task: what every setting is chosen by (on the selection split)."""
    return compute_metrics(search_task(scorer, task).ranks)["mrr"]


def pool_sizes(task: Task) -> np.ndarray:
    """Each query's number of distinct candidate bodies (per random-pool seed, tiled)."""
    k = task.pool.kind
    if k in ("split", "all"):
        return np.full(task.n_queries, task.groups.n_groups)
    if k == "random":
        return np.tile(np.full(task.n_queries, min(task.pool.size, task.groups.n_groups)), len(task.pool.seeds))
    sizes = np.empty(task.n_queries, dtype=np.int64)
    for qsel, g, _ in task.repo_groups.values():
        sizes[qsel] = g.n_groups
    return sizes


@dataclass
class RowWriter:
    """The rows of one evaluation, and the variants any scorer can get: ``+bm25`` (fused with
    BM25's scores), ``+sib`` (the sibling softmax) and the CSLS correction behind ``+csls``;
    each variant's setting is chosen on the selection split's MRR, never on the queries'."""

    task: Task
    sel_task: Task | None
    pool_label: str
    n_boot: int
    seed: int
    expected: int  # rows the progress bar expects
    say: Log
    progress: Callable[[int, int], None] | None
    sibling_softmax: bool
    files_q: np.ndarray  # source file of each query
    files_sel: np.ndarray | None  # … and of each selection query
    repos: np.ndarray  # repository of every store record
    fit_idx: np.ndarray  # the train records the hubness references come from
    bm25_test: Any = None
    bm25_sel: Any = None
    reranker: Reranker | None = None  # --rerank: NAME+rerank rows
    reverse: tuple[Any, Any] | None = None  # --fuse-reverse: the reverse baseline's (selection, test) scorers
    # "joint": a BM25-fused row's +sib row re-chooses the fusion weight with its own T and β
    # (coordinate ascent on its val MRR); "inherit": it keeps the +bm25 row's weight
    sib_fusion: str = "inherit"
    rows: list[MethodRow] = field(default_factory=list)
    sizes: np.ndarray = field(init=False)
    clusters: np.ndarray = field(init=False)
    chance: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.sizes = pool_sizes(self.task)
        self.clusters = np.tile(self.task.query_repos.astype(str), len(self.sizes) // self.task.n_queries)
        self.chance = chance_metrics(self.sizes)

    @property
    def fusing(self) -> bool:
        return self.sel_task is not None and self.bm25_test is not None and self.bm25_sel is not None

    def add(self, method: str, kind: str, space: str, res: SearchResult, settings: dict | None = None,
            diag: dict | None = None) -> MethodRow:
        task = self.task
        cis = bootstrap_cis(res.ranks, self.clusters, n_boot=self.n_boot, seed=self.seed)
        row = MethodRow(method, kind, space, self.pool_label, cis, self.chance, task.n_queries, res.ranks,
                        self.clusters, diag, hubness(res.top1_group, task.groups.n_groups), settings or {})
        self.rows.append(row)
        if self.progress is not None:
            self.progress(len(self.rows), max(self.expected, len(self.rows)))
        self.say(f"{method:>14} {space:>9}: rank@1 {cis['rank@1'].value:.1%}  MRR {cis['mrr'].value:.3f}")
        return row

    def siblings(self, name: str, kind: str, space: str, sel_scorer: Any, test_scorer: Any, settings: dict,
                 fused_test: tuple[Any, Any] | None = None) -> None:
        """``name+sib``: a scorer with the sibling softmax over each query's file; T (in units of
        the scores' spread on the selection pool) and β chosen on selection MRR. ``fused_test``:
        the scorer is a BM25 fusion (``sel_scorer`` a :class:`FusedScorer`) of these two test
        scorers; with ``sib_fusion == "joint"`` its weight is chosen again with T and β."""
        if not self.sibling_softmax or self.sel_task is None:
            return
        if fused_test is not None and self.sib_fusion == "joint":
            w, t, beta, spread, grid, sib_sel = self._fused_siblings_on_selection(sel_scorer)
            test_scorer = FusedScorer(*fused_test, w, np.arange(len(self.task.cand_idx)))
            settings = {**settings, "dense_weight": w, "dense_weight_of_bm25_row": sel_scorer.w}
        else:
            t, beta, spread, grid, sib_sel = self._siblings_on_selection(sel_scorer)
        self.say(f"searching {name}{SIB_SUFFIX} in {space} space (T {t} × {spread:.3g}, β {beta})")
        sib_test = SiblingScorer(test_scorer, self.files_q, t * spread, beta)
        info = {**settings, "temperature": t, "spread": spread, "beta": beta,
                "siblings": "the query split's functions of the query's own source file, itself included"}
        self.add(f"{name}{SIB_SUFFIX}", kind, space, search_task(sib_test, self.task),
                 {**info, "selection_mrr": {f"T={a},beta={b}": v for (a, b), v in grid.items()}})
        self.rerank(f"{name}{SIB_SUFFIX}", kind, space, sib_sel, sib_test, info)

    def _siblings_on_selection(self, sel_scorer: Any) -> tuple[float, float, float, dict, SiblingScorer]:
        """The sibling softmax's T (in units of the scores' spread) and β with the best
        selection MRR (ties to the smaller β), the spread, the grid and the selection scorer."""
        sel_task = self.sel_task
        assert sel_task is not None and self.files_sel is not None
        n_c = len(sel_task.cand_idx)
        base = materialized(sel_scorer, n_c)
        spread = score_spread(base, n_c)
        sib = SiblingGrid(base, self.files_sel, n_c)
        grid = {(t, b): selection_mrr(sib.scorer(t * spread, b), sel_task)
                for t in SIB_TEMPERATURES for b in SIB_BETAS if b > 0 or t == SIB_TEMPERATURES[0]}
        t, beta = max(grid, key=lambda tb: (grid[tb], -tb[1]))
        return t, beta, spread, grid, sib.scorer(t * spread, beta)

    def _fused_siblings_on_selection(self, fused_sel: FusedScorer,
                                     rounds: int = 2) -> tuple[float, float, float, float, dict, SiblingScorer]:
        """The sibling softmax over ``w · z(a) + (1 − w) · z(b)`` (``fused_sel``'s scorers and
        statistics, as :meth:`_fusion_on_selection` made them) with w chosen for the ``+sib``
        row itself: T and β at ``fused_sel``'s weight (the ``+bm25`` row's), then the weight at that T and
        β, then T and β again wherever the weight moved (each step only where val's MRR rises).
        Why: the fusion weight best for the ``+bm25`` row is not the best under the softmax; on
        python-40 a switch from 0.9 to 0.85 (0.002 of val MRR for ``+bm25``) cost the ``+sib``
        row 0.02. Returns the weight, T, β, the spread, the (T, β) grid and the selection scorer."""
        sel_task = self.sel_task
        assert sel_task is not None and self.files_sel is not None
        n_c = len(sel_task.cand_idx)
        cols = np.arange(n_c)

        def fused(w: float) -> FusedScorer:
            return FusedScorer(fused_sel.a, fused_sel.b, w, cols, stats=(fused_sel.sa, fused_sel.sb))

        w = fused_sel.w
        t, beta, spread, grid, sib = self._siblings_on_selection(fused_sel)
        best = grid[(t, beta)]
        for _ in range(rounds):
            scores = {}
            for v in FUSION_WEIGHTS:
                base = materialized(fused(v), n_c)
                sib_v = SiblingGrid(base, self.files_sel, n_c).scorer(t * score_spread(base, n_c), beta)
                scores[v] = selection_mrr(sib_v, sel_task)
            v = max(scores, key=lambda k: (scores[k], -abs(k - w)))  # ties stay at the current weight
            if scores[v] <= best:
                break
            w = v
            t, beta, spread, grid, sib = self._siblings_on_selection(fused(w))
            best = grid[(t, beta)]  # ≥ scores[v]: the old T and β are on the grid
        return w, t, beta, spread, grid, sib

    def _fusion_on_selection(self, a_sel: Any, b_sel: Any) -> tuple[float, dict, FusedScorer]:
        """The weight of ``w · z(a) + (1 − w) · z(b)`` with the best selection MRR (ties to
        0.5), its grid, and the fused selection scorer."""
        assert self.sel_task is not None
        cols_sel = np.arange(len(self.sel_task.cand_idx))
        a_sel, b_sel = materialized(a_sel, len(cols_sel)), materialized(b_sel, len(cols_sel))
        st = (ScoreSampleStats(a_sel, cols_sel), ScoreSampleStats(b_sel, cols_sel))
        wsc = {w: selection_mrr(FusedScorer(a_sel, b_sel, w, cols_sel, stats=st), self.sel_task)
               for w in FUSION_WEIGHTS}
        w = max(wsc, key=lambda k: (wsc[k], -abs(k - 0.5)))
        return w, wsc, FusedScorer(a_sel, b_sel, w, cols_sel, stats=st)

    def _fusion(self, a_sel: Any, b_sel: Any, a_test: Any, b_test: Any) -> tuple[float, dict, FusedScorer, FusedScorer]:
        """:meth:`_fusion_on_selection`, and the fused test scorer with the chosen weight."""
        w, wsc, fused_sel = self._fusion_on_selection(a_sel, b_sel)
        return w, wsc, fused_sel, FusedScorer(a_test, b_test, w, np.arange(len(self.task.cand_idx)))

    def fuse(self, name: str, kind: str, space: str, dense_sel: Any, dense_test: Any, settings: dict) -> None:
        """``name``: a dense scorer fused with BM25's scores, the weight chosen on selection MRR
        (``dense_sel`` scores the selection split, ``dense_test`` the task); then its ``+sib`` row."""
        assert self.sel_task is not None and self.bm25_sel is not None
        w, wsc, fused_sel, fused = self._fusion(dense_sel, self.bm25_sel, dense_test, self.bm25_test)
        self.say(f"searching {name} in {space} space (weight {w})")
        self.add(name, kind, space, search_task(fused, self.task),
                 {"dense_weight": w, **settings, "selection_mrr": {str(k): v for k, v in wsc.items()},
                  "normalisation": f"per-query z-score over a fixed sample of {SCORE_SAMPLE} pool candidates"})
        self.rerank(name, kind, space, fused_sel, fused, {"dense_weight": w, **settings})
        self.siblings(name, kind, space, fused_sel, fused, {"dense_weight": w, **settings},
                      fused_test=(dense_test, self.bm25_test))

    def with_reverse(self, name: str, kind: str, space: str, dense_sel: Any, dense_test: Any, settings: dict) -> None:
        """``name+rev``: a body-predicting scorer fused with ``reverse`` — the same pair scored in
        the other direction (the candidate's implied signature views against the query's) — the
        weight chosen on selection MRR; then its ``+bm25`` row (and that row's ``+sib``)."""
        if self.reverse is None:
            return
        rev_sel, rev_test = self.reverse
        w, wsc, both_sel, both = self._fusion(dense_sel, rev_sel, dense_test, rev_test)
        rname = f"{name}{REVERSE_SUFFIX}"
        self.say(f"searching {rname} in {space} space (weight {w})")
        info = {**settings, "forward_weight": w}
        self.add(rname, kind, space, search_task(both, self.task),
                 {**info, "selection_mrr": {str(k): v for k, v in wsc.items()},
                  "reverse": "the reverse baseline's scores (candidate body → signature views), z-scored per query"})
        self.rerank(rname, kind, space, both_sel, both, info)
        if self.fusing:
            self.fuse(f"{rname}{FUSED_SUFFIX}", kind, space, both_sel, both, info)

    def rerank(self, name: str, kind: str, space: str, sel_scorer: Any, test_scorer: Any, settings: dict) -> None:
        """``name+rerank``: the scorer's top K per query re-scored by the cross-scorer
        (:mod:`codejepa.evaluate.rerank`), the fusion weight chosen on selection MRR."""
        rr = self.reranker
        if not self._reranks(name):
            return
        assert rr is not None
        n_rec = len(self.repos)
        w, grid, top_k = self._rerank_on_selection(sel_scorer)
        self.say(f"re-ranking {name} in {space} space: top {top_k} by {rr.cross.name} (weight {w})")
        test = materialized(test_scorer, len(self.task.cand_idx))  # one pass for the top K and the ranks
        top = rr.top(test, self.task, n_rec)
        self.add(f"{name}{RERANK_SUFFIX}", kind, space, search_task(RerankScorer(test, top, w), self.task),
                 {**settings, "rerank_weight": w, "rerank_k": int(top.cols.shape[1]), "cross_scorer": rr.cross.name,
                  "cross_scorer_epoch": rr.cross.epoch, "selection_mrr": {str(k): v for k, v in grid.items()}})

    def _reranks(self, name: str) -> bool:
        rr = self.reranker
        return (rr is not None and self.sel_task is not None and self.task.pool.kind in RERANK_POOLS
                and rr.wants(name))

    def _rerank_on_selection(self, sel_scorer: Any) -> tuple[float, dict, int]:
        """The re-ranking weight with the best selection MRR (ties to the smaller), its grid and K."""
        rr, sel_task = self.reranker, self.sel_task
        assert rr is not None and sel_task is not None
        base_sel = materialized(sel_scorer, len(sel_task.cand_idx))
        top_sel = rr.top(base_sel, sel_task, len(self.repos))
        grid = {w: selection_mrr(RerankScorer(base_sel, top_sel, w), sel_task) for w in RERANK_WEIGHTS}
        return max(grid, key=lambda k: (grid[k], -k)), grid, int(top_sel.cols.shape[1])

    def _csls_on_selection(self, dense_sel: DenseScorer, refs: Any) -> tuple[int, float, dict, HubScorer]:
        """CSLS's k and β with the best selection MRR (ties to the smaller correction), the
        grid and the corrected selection scorer."""
        assert self.sel_task is not None
        sel_task = self.sel_task
        pen_sel = hub_penalties(dense_sel.c, refs, CSLS_KS, cand_groups=self.repos[sel_task.cand_idx],
                                ref_groups=self.repos[self.fit_idx])
        base = materialized(dense_sel, len(sel_task.cand_idx))
        grid = {(k, b): selection_mrr(HubScorer(base, pen_sel[k], b), sel_task) for k in CSLS_KS for b in CSLS_BETAS}
        k, beta = max(grid, key=lambda kb: (grid[kb], -kb[1]))
        return k, beta, grid, HubScorer(base, pen_sel[k], beta)

    def hub_corrected(self, dense_sel: DenseScorer, dense_test: DenseScorer, refs: Any) -> tuple[HubScorer, HubScorer, dict, dict]:
        """CSLS of a dense scorer: its cosines minus β × each candidate's mean cosine to its k
        nearest ``refs`` (unit rows of train-split vectors, the candidate's own repository left
        out); k and β chosen on selection MRR, ties to the smaller correction. Returns the
        corrected selection and test scorers, {k, beta} and the selection grid."""
        k, beta, grid, hub_sel = self._csls_on_selection(dense_sel, refs)
        pen = hub_penalties(dense_test.c, refs, [k], cand_groups=self.repos[self.task.cand_idx],
                            ref_groups=self.repos[self.fit_idx])[k]
        return (hub_sel, HubScorer(dense_test, pen, beta), {"k": k, "beta": beta},
                {f"k={a},beta={b}": v for (a, b), v in grid.items()})

    def chain_selection(self, name: str, dense_sel: DenseScorer, refs: Any | None, *, fuse: bool) -> tuple[float, dict]:
        """The selection MRR of ``name``'s most corrected row as this evaluation makes it: CSLS
        (against ``refs``; none: no CSLS), the BM25 fusion (``fuse``) and its sibling softmax,
        and the re-ranking, each setting chosen on the selection split as the rows choose it. What
        a setting upstream of the rows (the probe weight) is chosen by; no test query is read.
        Also returns each stage's chosen setting and the selection MRR after it: each stage is
        chosen on its own, so a switch upstream shows as a step in the final MRR."""
        assert self.sel_task is not None
        s: Any = dense_sel
        trace: dict[str, Any] = {"plain": {"mrr": selection_mrr(dense_sel, self.sel_task)}}
        if refs is not None:
            k, beta, grid, s = self._csls_on_selection(dense_sel, refs)
            name += CSLS_SUFFIX
            trace["csls"] = {"k": k, "beta": beta, "mrr": grid[(k, beta)]}
        if fuse and self.fusing:  # the sibling softmax follows the BM25 fusion, as in the rows
            w, wsc, s = self._fusion_on_selection(s, self.bm25_sel)
            name += FUSED_SUFFIX
            trace["bm25"] = {"dense_weight": w, "mrr": wsc[w]}
            if self.sibling_softmax:
                if self.sib_fusion == "joint":
                    w, t, beta, _, grid, s = self._fused_siblings_on_selection(s)
                else:
                    t, beta, _, grid, s = self._siblings_on_selection(s)
                name += SIB_SUFFIX
                trace["sib"] = {"dense_weight": w, "temperature": t, "beta": beta, "mrr": grid[(t, beta)]}
        if self._reranks(name):
            w, grid, _ = self._rerank_on_selection(s)
            trace["rerank"] = {"weight": w, "mrr": grid[w]}
        return list(trace.values())[-1]["mrr"], trace


def reverse_rows(out: RowWriter, last_x: np.ndarray, bodies: np.ndarray, cand_raw: np.ndarray, fit_idx: np.ndarray,
                  sel_idx: np.ndarray, q_idx: np.ndarray, shrinkage: float, *, fuse: bool, hubness_correction: bool,
                  keep: bool = False) -> None:
    """``reverse`` (each candidate body mapped to the signature views it implies, ridge fitted
    on train, λ on selection) and its ``+bm25``, ``+csls`` and ``+csls+bm25`` rows; with ``keep``
    its plain scorers stay on ``out`` for the ``NAME+rev`` rows of the vector methods."""
    out.say("reverse: ridge from whitened bodies to the whitened signature views")
    sel_task = out.sel_task
    assert sel_task is not None
    rev = ReverseFit.fit(last_x[fit_idx], bodies[fit_idx], shrinkage=shrinkage)
    rev_q_sel = unit_rows(rev.queries(last_x[sel_idx]))
    sel_bodies = bodies[sel_task.cand_idx]
    rev_sc = {a: selection_mrr(DenseScorer(rev_q_sel, rev.candidates(sel_bodies, a)), sel_task) for a in RIDGE_ALPHAS}
    a_rev = max(rev_sc, key=lambda a: (rev_sc[a], a))
    rev_sel = DenseScorer(rev_q_sel, rev.candidates(sel_bodies, a_rev))
    rev_test = DenseScorer(rev.queries(last_x[q_idx]), rev.candidates(cand_raw, a_rev))
    rev_info = {"alpha": a_rev, "direction": "candidate body → signature mean + last token, whitened (train)",
                "selection_mrr": {str(k): v for k, v in rev_sc.items()}, "n_fit": len(fit_idx)}
    out.add("reverse", "baseline", NO_SPACE, search_task(rev_test, out.task), rev_info)
    scored_sel = materialized(rev_sel, len(sel_task.cand_idx))  # one pass for re-ranking and every fusion
    if keep:
        out.reverse = (scored_sel, rev_test)
    out.rerank("reverse", "baseline", NO_SPACE, scored_sel, rev_test, {"alpha": a_rev})
    if out.fusing and fuse:
        out.fuse(f"reverse{FUSED_SUFFIX}", "baseline", NO_SPACE, scored_sel, rev_test, {"alpha": a_rev})
    if hubness_correction and len(np.unique(out.repos[fit_idx].astype(str))) > 1:
        # Space-free like the row itself, so no --space choice turns it off. The reference:
        # the train split's own signature views, what the queries are made of.
        out.say("hubness of the reverse candidates against the train signatures")
        hub_sel, hub_test, kb, grid = out.hub_corrected(rev_sel, rev_test, unit_rows(rev.queries(last_x[fit_idx]), inplace=True))
        info = {**kb, "alpha": a_rev, "reference": f"signature views of {len(fit_idx)} train "
                "records, those of the candidate's own repository left out"}
        out.add(f"reverse{CSLS_SUFFIX}", "baseline", NO_SPACE, search_task(hub_test, out.task), {**info, "selection_mrr": grid})
        out.rerank(f"reverse{CSLS_SUFFIX}", "baseline", NO_SPACE, hub_sel, hub_test, info)
        if out.fusing and fuse:
            out.fuse(f"reverse{CSLS_SUFFIX}{FUSED_SUFFIX}", "baseline", NO_SPACE, hub_sel, hub_test, info)

