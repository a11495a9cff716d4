"""Hubness correction of dense retrieval scores (CSLS), with a reference set from the train split.

Regression predictions crowd towards the middle of the target space, so a few candidate bodies
lie close to *many* predictions ("hubs") and win queries that are not theirs. CSLS (Lample et
al., 2018, word translation) scores a query q against a candidate c as

    cos(q, c) − β · r(c),   r(c) = mean cosine of c to its k nearest reference predictions,

which ranks exactly like the symmetric ``2 cos − r(q) − r(c)`` form (r(q) is constant per query).
Here the reference predictions are the method's predictions for the **train** split, never the
queries being evaluated, so the correction is fitted like every other statistic: a candidate's
penalty depends on the model and the train signatures only, not on the test queries. A
candidate that is itself a train record is not its own neighbour (its own prediction is left
out of its reference set). k and β are chosen on the selection (val) split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from codejepa.evaluate.errors import EvaluateError
from codejepa.evaluate.search import DenseScorer, _as_index

CSLS_KS = (10, 50)
CSLS_BETAS = (0.0, 0.25, 0.5, 1.0)  # 0 = plain cosine: on val the correction can only be chosen if it helps
SUFFIX = "+csls"


def hub_penalties(cands_unit: torch.Tensor, refs_unit: torch.Tensor, ks: Sequence[int], *,
                  cand_ids: np.ndarray | None = None, ref_ids: np.ndarray | None = None,
                  block: int = 2048) -> dict[int, torch.Tensor]:
    """``k → r(c)``: each candidate's mean cosine to its k nearest reference rows (both unit-norm).

    With ``cand_ids``/``ref_ids`` (store indices), a candidate's own reference row is left out.
    Blocked over candidates: at most ``block × len(refs)`` similarities are held at once.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise EvaluateError("CSLS needs k >= 1")
    n_ref = refs_unit.shape[0]
    if n_ref == 0:
        raise EvaluateError("CSLS needs reference predictions (an empty train split)")
    kmax = min(ks[-1], n_ref - 1 if cand_ids is not None else n_ref)
    if kmax < 1:
        raise EvaluateError("CSLS needs at least 2 reference predictions")
    own = None
    if cand_ids is not None and ref_ids is not None:
        order = np.argsort(ref_ids, kind="stable")
        sorted_ids = np.asarray(ref_ids)[order]
        pos = np.searchsorted(sorted_ids, cand_ids)
        hit = (pos < len(sorted_ids)) & (sorted_ids[np.minimum(pos, len(sorted_ids) - 1)] == cand_ids)
        own = np.where(hit, order[np.minimum(pos, len(sorted_ids) - 1)], -1)
    top = torch.empty((cands_unit.shape[0], kmax), dtype=torch.float32)
    for a in range(0, cands_unit.shape[0], block):
        b = min(a + block, cands_unit.shape[0])
        s = cands_unit[a:b] @ refs_unit.T
        if own is not None:
            rows = np.flatnonzero(own[a:b] >= 0)
            if len(rows):
                s[torch.from_numpy(rows), torch.from_numpy(own[a:b][rows])] = float("-inf")
        top[a:b] = s.topk(kmax, dim=1).values
    return {k: top[:, : min(k, kmax)].mean(1) for k in ks}


class HubScorer:
    """A dense scorer's cosines minus β times each candidate column's hub penalty."""

    def __init__(self, dense: DenseScorer, penalty: torch.Tensor, beta: float) -> None:
        if penalty.shape[0] != dense.c.shape[0]:
            raise EvaluateError("one hub penalty per candidate is needed")
        self.dense, self.penalty, self.beta = dense, penalty.float(), float(beta)
        self.n_queries = dense.n_queries

    def block(self, q: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        s = self.dense.block(q, cols)
        return s if self.beta == 0.0 else s - self.beta * self.penalty[_as_index(cols)][None, :]
