"""BM25 between signatures and bodies, for the evaluate stage's lexical baseline and fusions,
and for training a predictor that knows it will be fused with BM25.

The evaluate stage fuses every dense method with BM25 per query, ``w·z(cos) + (1 − w)·z(BM25)``
(z: standardised over a sample of the pool), the weight chosen on val. Ranking by that is
ranking by ``cos + κ·σ_q·z_q(BM25)`` with κ = (1 − w)/w and σ_q the std of the query's
cosines. ``loss.lexical_weight = κ`` puts the same offset into InfoNCE's logits (and into the
validation retrieval that selects the checkpoint), so the predictor is trained for the hybrid
it will be scored in: what BM25 already finds costs it nothing, and its capacity goes to what
the lexical match misses. The offset uses the signatures and bodies of the train split (val
for validation): inputs and targets of training, never a held-out body.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def code_tokens(text: str) -> list[str]:
    """Identifiers split at snake_case and CamelCase boundaries, lower-cased; a compound
    identifier also keeps its whole lower-cased form (``parse_json_file`` → parse, json, file,
    parse_json_file), so exact names still match exactly."""
    out: list[str] = []
    for word in _IDENT.findall(text):
        parts: list[str] = []
        for piece in word.split("_"):
            if piece:
                parts.extend(_CAMEL.findall(piece))
        low = [p.lower() for p in parts]
        out.extend(low)
        if len(low) > 1:
            out.append(word.lower().strip("_"))
    return out


BM25_K1, BM25_B = 1.2, 0.75  # the usual Okapi defaults; retrieval.json records them


class BM25Scorer:
    """BM25 (the ``bm25s`` library) of query texts against candidate body texts.

    Scores are computed a query block at a time (each query's row over every candidate is a
    sparse product) and cached for the block, so the blocked search can slice it freely.
    """

    def __init__(self, query_texts: list[str], candidate_texts: list[str], *, k1: float = BM25_K1,
                 b: float = BM25_B) -> None:
        import bm25s

        self.n_queries = len(query_texts)
        self.n_candidates = len(candidate_texts)
        self.retriever = bm25s.BM25(k1=k1, b=b)
        docs = [code_tokens(t) or [""] for t in candidate_texts]
        self.retriever.index(docs, show_progress=False)
        vocab = self.retriever.vocab_dict
        self.query_ids = [[vocab[t] for t in code_tokens(q) if t in vocab] for q in query_texts]
        self._key: bytes | None = None
        self._rows: torch.Tensor | None = None

    def rows(self, q: np.ndarray) -> torch.Tensor:
        key = np.asarray(q, dtype=np.int64).tobytes()
        if key != self._key:
            out = np.zeros((len(q), self.n_candidates), dtype=np.float32)
            for i, qi in enumerate(q):
                ids = self.query_ids[int(qi)]
                if ids:
                    out[i] = self.retriever.get_scores_from_ids(ids)
            self._key, self._rows = key, torch.from_numpy(out)
        assert self._rows is not None
        return self._rows

    def block(self, q: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        return self.rows(q)[:, torch.as_tensor(np.asarray(cols, dtype=np.int64))]


class LexicalOffsets:
    """BM25 of one split's signatures against the same split's bodies, standardised per query
    over a fixed reference sample of those bodies (as the evaluate stage's fusion does)."""

    def __init__(self, signatures: Sequence[str], bodies: Sequence[str], *, ref_size: int = 2048, seed: int = 0) -> None:
        if len(signatures) != len(bodies):
            raise ValueError(f"{len(signatures)} signatures for {len(bodies)} bodies")
        self.bm25 = BM25Scorer(list(signatures), list(bodies))
        n = len(bodies)
        rng = np.random.default_rng(seed)
        self.ref = np.sort(rng.choice(n, size=min(ref_size, n), replace=False)) if n else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.bm25.n_candidates

    def z(self, rows: np.ndarray, cols: np.ndarray | None = None) -> torch.Tensor:
        """Standardised BM25 of the queries ``rows`` against the bodies ``cols`` (all bodies
        when None): a ``len(rows) × len(cols)`` float32 tensor."""
        rows = np.asarray(rows, dtype=np.int64)
        full = self.bm25.rows(rows)
        ref = full[:, torch.as_tensor(self.ref)]
        mu = ref.mean(1, keepdim=True)
        sd = ref.std(1, unbiased=False, keepdim=True)
        sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))
        part = full if cols is None else full[:, torch.as_tensor(np.asarray(cols, dtype=np.int64))]
        return (part - mu) / sd


def lexical_offset(scores_pred: torch.Tensor, z: torch.Tensor, reference: torch.Tensor, kappa: float) -> torch.Tensor:
    """``κ·σ_q·z``: the BM25 term in cosine units. σ_q is the std of each query's cosines
    against ``reference`` (unit rows: bodies of the reference sample, in the scoring space),
    detached, so the offset scales with the query's own spread as the fusion's z-score does."""
    with torch.no_grad():
        sd = (F.normalize(scores_pred.float(), dim=-1) @ reference.T).std(1, keepdim=True)
    return kappa * sd * z.to(sd.device, sd.dtype)
