"""Hubness correction of dense retrieval scores (CSLS), with a reference set from the train split.

Regression predictions crowd towards the middle of the target space, so a few candidate bodies
lie close to *many* predictions ("hubs") and win queries that are not theirs. CSLS (Lample et
al., 2018, word translation) scores a query q against a candidate c as

    cos(q, c) − β · r(c),   r(c) = mean cosine of c to its k nearest reference predictions,

which ranks exactly like the symmetric ``2 cos − r(q) − r(c)`` form (r(q) is constant per query).
Here the reference predictions are the method's predictions for the **train** split, never the
queries being evaluated, so the correction is fitted like every other statistic: a candidate's
penalty depends on the model and the train signatures only, not on the test queries.

A candidate's penalty leaves out the predictions of its own repository. Without that, in a
whole-corpus pool a train body would be penalised by its repository siblings' predictions
while a held-out body (whose repository is not in train) would not: the penalty would tell
held-out bodies from train bodies, and the true body of a test query is always held out.
k and β are chosen on the selection (val) split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from codejepa.evaluate.errors import EvaluateError
from codejepa.evaluate.search import DenseScorer, MaterializedScorer, _as_index

CSLS_KS = (10, 50)
CSLS_BETAS = (0.0, 0.25, 0.5, 1.0)  # 0 = plain cosine: on val the correction can only be chosen if it helps
SUFFIX = "+csls"


def hub_penalties(cands_unit: torch.Tensor, refs_unit: torch.Tensor, ks: Sequence[int], *,
                  cand_groups: np.ndarray | None = None, ref_groups: np.ndarray | None = None,
                  block: int = 2048) -> dict[int, torch.Tensor]:
    """``k → r(c)``: each candidate's mean cosine to its k nearest reference rows (both unit-norm).

    With ``cand_groups``/``ref_groups`` (repositories), the reference rows of a candidate's own
    group are left out. Blocked over candidates: at most ``block × len(refs)`` similarities
    are held at once.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise EvaluateError("CSLS needs k >= 1")
    n_ref = refs_unit.shape[0]
    if n_ref == 0:
        raise EvaluateError("CSLS needs reference predictions (an empty train split)")
    cg = rg = None
    if cand_groups is not None and ref_groups is not None:
        _, codes = np.unique(np.concatenate([np.asarray(cand_groups, dtype=str), np.asarray(ref_groups, dtype=str)]),
                             return_inverse=True)
        cg, rg = torch.from_numpy(codes[: len(cand_groups)]), torch.from_numpy(codes[len(cand_groups):])
    largest = n_ref - (int(torch.bincount(rg).max()) if rg is not None else 0)  # fewest rows a candidate keeps
    kmax = min(ks[-1], largest)
    if kmax < 1:
        raise EvaluateError("CSLS needs reference predictions from another repository than the candidate's")
    top = torch.empty((cands_unit.shape[0], kmax), dtype=torch.float32)
    for a in range(0, cands_unit.shape[0], block):
        b = min(a + block, cands_unit.shape[0])
        s = cands_unit[a:b] @ refs_unit.T
        if cg is not None:
            s.masked_fill_(cg[a:b, None] == rg[None, :], float("-inf"))
        top[a:b] = s.topk(kmax, dim=1).values
    return {k: top[:, : min(k, kmax)].mean(1) for k in ks}


class HubScorer:
    """A dense scorer's cosines minus β times each candidate column's hub penalty."""

    def __init__(self, dense: DenseScorer | MaterializedScorer, penalty: torch.Tensor, beta: float) -> None:
        if penalty.shape[0] != dense.n_cols:
            raise EvaluateError("one hub penalty per candidate is needed")
        self.dense, self.penalty, self.beta = dense, penalty.float(), float(beta)
        self.n_queries = dense.n_queries

    def block(self, q: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        s = self.dense.block(q, cols)
        return s if self.beta == 0.0 else s - self.beta * self.penalty[_as_index(cols)][None, :]
