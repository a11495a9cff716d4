"""``NAME+probe`` methods: a method's prediction mixed with the record's probe view.

The probe view (``codejepa embed probe``, :mod:`codejepa.embed.probe`) is the teacher's own
reading of a body position after the query's context and signature. It is mixed into a
method's query vector in the whitened space, where both are comparable directions::

    q' = |q| · unit((1 − w) · unit(q) + w · unit(probe)),   q and probe whitened,

and mapped back to teacher space, so that every space and correction of the evaluation (the
canonical map, CSLS, the BM25 fusion, the sibling softmax) applies to ``NAME+probe`` as to
``NAME``. The weight ``w`` is chosen on the selection (val) split's MRR, like every other
setting; ``w = 0`` is on the grid, so the probe is only used where it helps on val. Which MRR
(``--probe-select``): ``chain`` (the default), the mix's most corrected row (CSLS, BM25, sibling
softmax, re-ranking, with their settings chosen on val for each weight) in the canonical space
where it is evaluated (else the whitened one); or ``plain``, the mix's own cosines in the
whitened space. The corrections change which weight is best: CSLS takes out the direction the
probe view shares across queries, so on python-40 the plain cosines chose 0.25 and the
corrected rows 0.6 (the edge of the grid then; 0.8 on today's grid to 1), which lifted the
re-ranked rows by 2.6–3.4 points on test.

The view alone is a baseline of its own, the ``probe`` row: the teacher's reading with no
predictor trained at all, given every correction the mixes get (a mix at ``w = 1`` ranks as it
does). A predictor mixed with the view earns its place only where it beats that row: on
python-40's middle layer the view alone, re-ranked, came within 0.9 points of the best mix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from codejepa.evaluate.spaces import Space

SUFFIX = "+probe"
VIEW_ROW = "probe"  # the probe view alone as the query: a baseline that trains no predictor
# 0.05 steps where the plain cosines peak (0.25 on python-40), 0.1 steps on to the probe view
# alone (1.0), where the corrected rows' optimum may lie (0.6, the old grid's edge, in session 39).
PROBE_WEIGHTS = tuple(round(0.05 * k, 2) for k in range(12)) + tuple(round(0.6 + 0.1 * k, 1) for k in range(5))
SELECT = ("plain", "chain")  # what the weight is chosen by (see above)


def weight_grid(weights: str | Sequence[float] | None) -> tuple[float, ...]:
    """The probe weights val chooses from: ``None`` for :data:`PROBE_WEIGHTS`, else a comma list
    (or sequence) of weights in [0, 1], returned sorted and without repeats. Raises ``ValueError``
    with one line on anything else."""
    if weights is None:
        return PROBE_WEIGHTS
    items = [w.strip() for w in weights.split(",")] if isinstance(weights, str) else list(weights)
    try:
        grid = sorted({float(w) for w in items if w != ""})
    except (TypeError, ValueError):
        raise ValueError(f"--probe-weights takes comma-separated numbers in [0, 1], not {weights!r}") from None
    if not grid or not all(0.0 <= w <= 1.0 for w in grid):  # NaN fails the range test too
        raise ValueError(f"--probe-weights takes one or more weights in [0, 1], not {weights!r}")
    return tuple(grid)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)


def mix_probe(queries: np.ndarray, probes: np.ndarray, weight: float, whitened: Space) -> np.ndarray:
    """Raw query vectors with the probe view mixed in at ``weight`` (pure; ``weight = 0``
    returns a copy of the queries, so that a zero weight reproduces the method exactly)."""
    if weight == 0:
        return queries.astype(np.float32, copy=True)
    q = whitened.apply(queries).astype(np.float64)
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    m = _unit((1.0 - weight) * _unit(q) + weight * _unit(whitened.apply(probes).astype(np.float64))) * norm
    # Back to teacher space through the whitening map's inverse (ZCA: symmetric, full rank).
    assert whitened.transform is not None and whitened.mean is not None
    raw = np.linalg.solve(whitened.transform.astype(np.float64).T, m.T).T + whitened.mean
    return raw.astype(np.float32)


@dataclass
class ProbeMix:
    """``base(store, idx)`` mixed with the probe view at a weight chosen on val."""

    base: Callable[[Any, np.ndarray], np.ndarray] | None  # set once the predictors are loaded
    probes: np.ndarray  # [n_records, d] raw probe view of the store
    whitened: Space | None  # set once the train split's whitening is fitted
    weight: float = 0.0
    selection_mrr: dict[str, float] | None = None
    # --probe-select chain: per weight, each correction's setting chosen on val and the MRR after it
    selection_chain: dict[str, dict[str, Any]] = field(default_factory=dict)

    def mixed(self, store: Any, idx: np.ndarray, weight: float) -> np.ndarray:
        """Raw queries of ``idx`` mixed at ``weight`` (any weight, not only the chosen one)."""
        assert self.base is not None and self.whitened is not None
        return mix_probe(np.asarray(self.base(store, idx), np.float32), self.probes[idx], weight, self.whitened)

    def choose(self, score_of: Callable[[float], float], weights: Sequence[float] | None = None) -> None:
        """Pick ``weight``: the one of ``weights`` (default :data:`PROBE_WEIGHTS`) with the best
        selection-split score ``score_of(weight)``; ties go to the smaller weight."""
        scores = {w: score_of(w) for w in (PROBE_WEIGHTS if weights is None else weights)}
        self.weight = max(scores, key=lambda w: (scores[w], -w))
        self.selection_mrr = {str(w): float(v) for w, v in scores.items()}

    def __call__(self, store: Any, idx: np.ndarray) -> np.ndarray:
        return self.mixed(store, idx, self.weight)


class Memo:
    """A predictor whose ``predict_pooled`` results are kept per index set: a run mixed with
    the probe view is predicted once for its own rows and its ``+probe`` rows."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self._cache: dict[bytes, np.ndarray] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.predictor, name)

    def predict_pooled(self, store: Any, idx: np.ndarray) -> np.ndarray:
        key = np.asarray(idx, np.int64).tobytes()
        if key not in self._cache:
            self._cache[key] = np.asarray(self.predictor.predict_pooled(store, idx), np.float32)
        return self._cache[key]
