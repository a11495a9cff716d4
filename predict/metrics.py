"""Validation metrics used for model selection and collapse diagnostics (training-time only;
the evaluate stage does the full, honest evaluation with baselines and intervals)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from codejepa.predict.lexical import LexicalOffsets


def retrieval_ranks(pred: torch.Tensor, target: torch.Tensor, block: int = 1024,
                    lexical: tuple[LexicalOffsets, float] | None = None) -> torch.Tensor:
    """1-based rank of each query's own target among all targets by cosine; ties count
    against the query (pessimistic). Blocked: never an N×N matrix at once. With ``lexical``
    (BM25 of these queries against these targets, and κ) the rank is by the hybrid score
    ``cos + κ·σ_q·z(BM25)``, σ_q the std of the query's cosines over the reference sample."""
    p, t = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
    ranks = torch.empty(len(p), dtype=torch.long)
    for a in range(0, len(p), block):
        sims = p[a : a + block] @ t.T
        if lexical is not None:
            lex, kappa = lexical
            sd = sims[:, torch.as_tensor(lex.ref)].std(1, keepdim=True)
            sims = sims + kappa * sd * lex.z(np.arange(a, a + len(sims)))
        own = sims.gather(1, torch.arange(a, a + len(sims)).unsqueeze(1))
        ranks[a : a + block] = (sims >= own).sum(1)  # includes itself → rank ≥ 1
    return ranks


def centred_effective_rank(x: torch.Tensor) -> float:
    """RankMe of the centred matrix: exp of the entropy of its normalised singular values. The
    training log's ``eff.rank``: centred, so that the common direction every prediction shares
    does not count (the evaluate stage's ``rankme`` reads each space's vectors as they are)."""
    x = x.double()
    if len(x) < 2:
        return 1.0
    x = x - x.mean(0)
    # singular values from the eigenvalues of the smaller Gram matrix: much cheaper than an SVD
    g = x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T
    s = torch.linalg.eigvalsh(g).clamp(min=0).sqrt()
    if float(s.sum()) <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def mean_cos_to_mean(x: torch.Tensor) -> float:
    """Mean cosine of the rows to their own mean: near 1 when predictions collapse."""
    return float(F.cosine_similarity(x.float(), x.float().mean(0, keepdim=True), dim=-1).mean())


def validation_metrics(pred_norm: torch.Tensor, tgt_norm: torch.Tensor, pred_raw: torch.Tensor,
                       tgt_raw: torch.Tensor, pred_score: torch.Tensor, tgt_score: torch.Tensor,
                       lexical: tuple[LexicalOffsets, float] | None = None) -> dict[str, float]:
    """Retrieval (model selection) in the scoring space (``pred_score``/``tgt_score``: the
    normalised pooled space, or ``loss.space``'s map of it), cosines and collapse diagnostics.
    With ``lexical`` the selection MRR is the BM25 hybrid's, and the cosine's alone is
    reported beside it (``val_mrr_dense``)."""
    ranks = retrieval_ranks(pred_score, tgt_score, lexical=lexical).double()
    n = len(ranks)
    extra: dict[str, float] = {}
    if lexical is not None:
        dense = retrieval_ranks(pred_score, tgt_score).double()
        extra = {"val_mrr_dense": float((1.0 / dense).mean()), "val_rank1_dense": float((dense == 1).double().mean())}
    return {
        "val_mrr": float((1.0 / ranks).mean()),
        "val_rank1": float((ranks == 1).double().mean()),
        "val_recall10": float((ranks <= 10).double().mean()),
        "val_median_rank": float(ranks.median()),
        "val_chance_mrr": float(sum(1.0 / k for k in range(1, n + 1)) / n) if n else math.nan,
        "val_cos": float(F.cosine_similarity(pred_norm, tgt_norm, dim=-1).mean()),
        "val_cos_raw": float(F.cosine_similarity(pred_raw, tgt_raw, dim=-1).mean()),
        "pred_cos_to_mean": mean_cos_to_mean(pred_norm),
        "target_cos_to_mean": mean_cos_to_mean(tgt_norm),
        "pred_cos_to_mean_raw": mean_cos_to_mean(pred_raw),
        "pred_eff_rank": centred_effective_rank(pred_norm),
        "target_eff_rank": centred_effective_rank(tgt_norm),
        "pred_std_ratio": float(pred_norm.float().std(0).mean() / tgt_norm.float().std(0).mean().clamp(min=1e-12)),
        **extra,
    }
