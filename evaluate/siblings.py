"""Sibling softmax: a query competes with the other functions of its own source file.

Most wrong top-1 bodies of a good predictor come from the query's own file: siblings share
its imports, names and idioms, so their bodies look alike in the teacher's space (in the
python-40 plus store, 59% of the wrong winners came from the query's file, which holds 1.9%
of the pool). But the query's siblings are queries too, and their signatures are part of its
file context: when a candidate body fits a sibling's signature better than the query's, it
is more likely the sibling's body. The inverted softmax of cross-modal retrieval (Smith et
al., 2017), restricted to the file, scores query q against candidate c as

    s(q, c) − β · T · log Σ_{q' ∈ file(q)} exp(s(q', c) / T),

where the sum runs over the query split's functions of q's file, q included (for a function
alone in its file the correction is ``(1 − β) · s``, which keeps its ranking). It reads only
the siblings' *inputs* (their predictions or query texts), never a body, so it is as honest
as the scores it wraps. T is set in units of the wrapped scores' spread (the median per-query
standard deviation over a sample of the selection pool), and T and β are chosen on the
selection (val) split, where β = 0 (no correction) is always a candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from codejepa.evaluate.errors import EvaluateError
from codejepa.evaluate.search import Scorer, ScoreSampleStats

SIB_TEMPERATURES = (0.125, 0.25, 0.5, 1.0)  # × the wrapped scores' spread
# 1: the full inverted softmax over the file's queries. Fine where val's optimum lies: with
# steps of 0.25, β 0.5 and 0.75 tied on val to 0.001 MRR yet moved test rank@1 by 3 points.
SIB_BETAS = (0.0, 0.25, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0)
SUFFIX = "+sib"
# Where a BM25-fused row's +sib row takes its fusion weight: the +bm25 row's, or its own
# (chosen again with T and β, see RowWriter._fused_siblings_on_selection).
SIB_FUSION = ("inherit", "joint")


class SiblingScorer:
    """A scorer's scores minus β·T·logsumexp over the query's file siblings' scores (T absolute).
    ``lse``: the files' log-sum-exp over every column at this T, computed before (see
    :class:`SiblingGrid`); without it each block computes its files' own."""

    def __init__(self, base: Scorer, files: Sequence[str] | np.ndarray, temperature: float, beta: float, *,
                 lse: torch.Tensor | None = None) -> None:
        files = np.asarray(files, dtype=str)
        if len(files) != base.n_queries:
            raise EvaluateError(f"one source file per query is needed ({len(files)} for {base.n_queries} queries)")
        if temperature <= 0:
            raise EvaluateError(f"the sibling softmax needs a positive temperature, not {temperature}")
        self.base, self.t, self.beta, self.lse = base, float(temperature), float(beta), lse
        self.n_queries = base.n_queries
        _, self.file_of = np.unique(files, return_inverse=True)
        # Members of each file, contiguous: order[start[f]:start[f + 1]] are file f's query positions.
        self.order = np.argsort(self.file_of, kind="stable")
        self.start = np.searchsorted(self.file_of[self.order], np.arange(int(self.file_of.max(initial=-1)) + 2))

    def file_lse(self, fs: np.ndarray, cols: np.ndarray) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor]:
        """logsumexp(s / T) over the members of each file of ``fs`` (sorted), per column; with the
        member rows, each row's file (local to ``fs``) and the rows' scores."""
        rows = np.concatenate([self.order[self.start[f]: self.start[f + 1]] for f in fs])
        s = self.base.block(rows, cols).float()
        f_local = torch.from_numpy(np.searchsorted(fs, self.file_of[rows]))
        x = s / self.t
        idx = f_local[:, None].expand_as(x)
        mx = torch.full((len(fs), x.shape[1]), float("-inf")).scatter_reduce_(0, idx, x, reduce="amax")
        se = torch.zeros_like(mx).index_add_(0, f_local, torch.exp(x - mx[f_local]))
        return mx + se.log(), rows, f_local, s

    def block(self, q: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        q = np.asarray(q, dtype=np.int64)
        if self.beta == 0.0:
            return self.base.block(q, cols)
        if self.lse is not None:
            c = torch.as_tensor(np.asarray(cols, dtype=np.int64))
            return self.base.block(q, cols).float() - (self.beta * self.t) * self.lse[torch.from_numpy(self.file_of[q])][:, c]
        fs = np.unique(self.file_of[q])
        lse, rows, f_local, s = self.file_lse(fs, cols)
        where = np.empty(self.n_queries, dtype=np.int64)
        where[rows] = np.arange(len(rows))
        qi = torch.from_numpy(where[q])
        return s[qi] - (self.beta * self.t) * lse[f_local[qi]]


class SiblingGrid:
    """One scorer's sibling softmax at many (T, β), as a selection grid needs it: the files'
    log-sum-exp over all ``n_cols`` columns is computed once per T (it does not depend on β),
    which is most of a :class:`SiblingScorer` block's work (``bench/sibling_grid.py``)."""

    def __init__(self, base: Scorer, files: Sequence[str] | np.ndarray, n_cols: int, *, rows_per_chunk: int = 512) -> None:
        self.base, self.files, self.n_cols, self.rows_per_chunk = base, files, n_cols, rows_per_chunk
        self._lse: dict[float, torch.Tensor] = {}

    def scorer(self, temperature: float, beta: float) -> SiblingScorer:
        sc = SiblingScorer(self.base, self.files, temperature, beta)
        if beta == 0.0:
            return sc
        t = float(temperature)
        if t not in self._lse:
            n_files = len(sc.start) - 1
            cols = np.arange(self.n_cols)
            lse = torch.empty((n_files, self.n_cols), dtype=torch.float32)
            f0 = 0
            while f0 < n_files:  # whole files per chunk, about rows_per_chunk member rows each
                f1 = max(f0 + 1, int(np.searchsorted(sc.start, sc.start[f0] + self.rows_per_chunk, side="right")) - 1)
                f1 = min(f1, n_files)
                lse[f0:f1] = sc.file_lse(np.arange(f0, f1), cols)[0]
                f0 = f1
            self._lse[t] = lse
        sc.lse = self._lse[t]
        return sc


def score_spread(scorer: Scorer, n_cols: int) -> float:
    """The median per-query standard deviation of a scorer's scores over a sample of its pool:
    the unit of the sibling temperature, so that one grid fits cosines and fused z-scores alike."""
    sd = ScoreSampleStats(scorer, np.arange(n_cols)).std
    return float(sd.median()) if len(sd) else 1.0
