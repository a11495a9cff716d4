"""Collapse diagnostics: does a predictor predict *instances*, or one prototype for all?

A collapsed predictor has predictions that are much more alike than the targets (high mean
pairwise cosine, small per-dimension spread, low effective rank), sit close to the train-mean
prototype, and one or a few candidates win most queries (hubness).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from codejepa.evaluate.metrics import MetricCI


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean_pairwise_cosine(x: np.ndarray) -> float:
    """Mean cosine over all pairs i ≠ j, in O(n·d) via the norm of the sum of unit vectors."""
    u = _unit(x)
    n = len(u)
    if n < 2:
        return float("nan")
    s = u.sum(0)
    self_sim = float(np.sum(np.linalg.norm(u, axis=1) ** 2))
    return float((s @ s - self_sim) / (n * (n - 1)))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(_unit(a) * _unit(b), axis=1)))


def effective_rank(x: np.ndarray) -> float:
    """RankMe: exp of the entropy of the normalised singular values of the matrix as it is (not
    centred: in the raw space a shared direction that dominates shows as a low rank; the
    training log's centred figure is :func:`codejepa.predict.metrics.centred_effective_rank`)."""
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum() + 1e-12
    return float(np.exp(-np.sum(p * np.log(p))))


def r_squared(pred: np.ndarray, target: np.ndarray) -> float:
    """Pooled R² over dimensions: 1 − SSE / total variance of the targets around their mean."""
    t = np.asarray(target, dtype=np.float64)
    sse = float(np.sum((np.asarray(pred, dtype=np.float64) - t) ** 2))
    sst = float(np.sum((t - t.mean(0)) ** 2))
    return 1.0 - sse / sst if sst > 0 else float("nan")


def hubness(top1: np.ndarray | None, n_candidates: int, k: int = 10) -> dict[str, float] | None:
    """Share of top-1 wins taken by the most frequent winner and the ``k`` most frequent winners,
    and the share the top-``k`` would take if wins were spread like the queries' own bodies."""
    if top1 is None or len(top1) == 0:
        return None
    counts = np.sort(np.bincount(np.asarray(top1, dtype=np.int64)))[::-1]
    n = len(top1)
    return {
        "top1_winner_share": float(counts[0] / n),
        f"top{k}_winners_share": float(counts[:k].sum() / n),
        f"top{k}_share_if_uniform": float(min(k, n, n_candidates) / n),
        "distinct_winners_per_query": float(len(np.flatnonzero(counts)) / n),
    }


@dataclass(frozen=True)
class Diagnostics:
    values: dict[str, float | None]

    def to_json(self) -> dict[str, float | None]:
        return {k: (None if v is None or (isinstance(v, float) and not np.isfinite(v)) else v)
                for k, v in self.values.items()}


def target_statistics(target_raw: np.ndarray, target_space: np.ndarray, prototype_raw: np.ndarray) -> dict[str, float]:
    """The targets' side of the diagnostics: computed once per space, shared by every method."""
    t = np.asarray(target_space, np.float64)
    proto = np.asarray(prototype_raw, np.float64)[None, :]
    return {
        "pairwise_cosine_target": mean_pairwise_cosine(t),
        "rankme_target": effective_rank(t),
        "target_cosine_to_prototype_raw": mean_cosine(target_raw, np.repeat(proto, len(target_raw), 0)),
    }


def vector_diagnostics(
    pred_raw: np.ndarray,
    target_raw: np.ndarray,
    pred_space: np.ndarray,
    target_space: np.ndarray,
    prototype_raw: np.ndarray,
    space_mean: np.ndarray | None,
    target_stats: dict[str, float] | None = None,
) -> Diagnostics:
    """Every collapse diagnostic of predictions vs targets, raw and in the evaluated space."""
    ts = target_stats or target_statistics(target_raw, target_space, prototype_raw)
    p, t = np.asarray(pred_space, np.float64), np.asarray(target_space, np.float64)
    sd_t = t.std(0)
    # Only directions where the targets spread: the canonical space weights uncorrelated
    # directions by ~0, and any prediction's spread there over ~0 would swamp the mean.
    spread = sd_t > 1e-6 * max(float(sd_t.max(initial=0.0)), 1e-30)
    ratio = p.std(0)[spread] / sd_t[spread] if spread.any() else np.array([np.nan])
    centre = space_mean if space_mean is not None else np.asarray(prototype_raw, np.float64)
    # In a centered/whitened space the mean is already removed: centring again changes nothing.
    pc = p - (0.0 if space_mean is not None else centre)
    tc = t - (0.0 if space_mean is not None else centre)
    proto = np.asarray(prototype_raw, np.float64)[None, :]
    return Diagnostics({
        "cosine_raw": mean_cosine(pred_raw, target_raw),
        "cosine_space": mean_cosine(p, t),
        "centred_cosine": mean_cosine(pc, tc),
        "r2": r_squared(p, t),
        "pairwise_cosine_pred": mean_pairwise_cosine(p),
        "pairwise_cosine_target": ts["pairwise_cosine_target"],
        "std_ratio_mean": float(np.mean(ratio)),
        "std_ratio_median": float(np.median(ratio)),
        "rankme_pred": effective_rank(p),
        "rankme_target": ts["rankme_target"],
        "cosine_to_prototype_raw": mean_cosine(pred_raw, np.repeat(proto, len(pred_raw), 0)),
        "target_cosine_to_prototype_raw": ts["target_cosine_to_prototype_raw"],
    })


def collapse_warning(
    method: str,
    space: str,
    pool: str,
    rank1: MetricCI,
    references: dict[str, MetricCI],
) -> str | None:
    """A warning line when ``rank1``'s CI does not lie wholly above every reference's
    (the train-mean prototype, the random ranking): no evidence of instance-level retrieval."""
    beaten_by = [name for name, ref in references.items()
                 if not (np.isfinite(rank1.low) and rank1.low > ref.high)]
    if not beaten_by:
        return None
    refs = ", ".join(f"{n} {references[n].value:.1%} [{references[n].low:.1%}, {references[n].high:.1%}]" for n in beaten_by)
    return (f"WARNING {method} ({space}, pool {pool}): rank@1 {rank1.value:.1%} "
            f"[{rank1.low:.1%}, {rank1.high:.1%}] is not above {refs} with non-overlapping 95% CIs "
            f"— no evidence it retrieves instances rather than a prototype")
