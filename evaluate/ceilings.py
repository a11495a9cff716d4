"""Ceilings: how far a predictor of a given kind could get, measured on a store.

Retrieval in the middle layers rewards knowing *which tokens* a body has. Three measurements
say how much of that a signature-conditioned predictor can reach, each ranked like the
predict stage's validation (the query split's own bodies, cosine in the whitened space
fitted on train; ties count against the query):

- **token identity (oracle)**: each body replaced by the mean, over its own tokens, of the
  train split's mean in-context state of that token id. It knows the body's bag of tokens and
  nothing of their context: what a perfect bag-of-tokens predictor would get.
- **copy (oracle)**: ridge on the pooled signature views plus the mean of the input (context +
  signature) tokens whose id reappears in the body. What a perfect copy mechanism — knowing
  which input tokens the body will use — would add to ridge.
- **learning curve**: ridge on the pooled views fitted on random subsets of the train
  repositories (λ on val), to extrapolate what more training functions would give.

The oracles read the body: they are ceilings for orientation, never methods. Every statistic
(token means, whitening, ridge) is fitted on the train split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from codejepa.evaluate.errors import EvaluateError
from codejepa.evaluate.spaces import fit_space
from codejepa.predict.metrics import retrieval_ranks
from codejepa.predict.ridge import fit_ridge


@dataclass(frozen=True)
class PassTokens:
    """One pass's flat token ids and sink flags, with per-record offsets."""

    ids: np.ndarray  # [T] int64
    special: np.ndarray  # [T] bool
    offsets: np.ndarray  # [N + 1]

    @property
    def records(self) -> np.ndarray:
        """The record index of every token."""
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))


def pass_tokens(store: Any, name: str) -> PassTokens:
    """Token ids of the ``inputs`` or ``targets`` pass of every committed record."""
    off = np.concatenate([[0], np.cumsum(store.lengths(name))]).astype(np.int64)
    return PassTokens(*store.tokens(name), off)


def bag_matrix(tokens: PassTokens, vocab: int) -> sp.csr_matrix:
    """[N, vocab] counts of each record's non-sink token ids."""
    keep = ~tokens.special
    n = len(tokens.offsets) - 1
    m = sp.csr_matrix((np.ones(int(keep.sum()), np.float64), (tokens.records[keep], tokens.ids[keep])), shape=(n, vocab))
    m.sum_duplicates()
    return m


def token_means(store: Any, body: PassTokens, idx: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean body state of each token id over the records ``idx`` [vocab, d], count per id), streamed."""
    d = store.meta.hidden_size
    sums, counts = np.zeros((vocab, d)), np.zeros(vocab)
    for run, states, special, _ in store.iter_blocks("targets", np.sort(np.asarray(idx))):
        a, b = int(body.offsets[run[0]]), int(body.offsets[run[-1] + 1])
        ids, keep = body.ids[a:b], ~special
        counts += np.bincount(ids[keep], minlength=vocab)
        sums += sp.csr_matrix((np.ones(int(keep.sum())), (ids[keep], np.flatnonzero(keep))),
                              shape=(vocab, b - a)) @ states
    means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], sums.sum(0) / max(counts.sum(), 1))
    return means, counts


def bag_queries(bag: sp.csr_matrix, means: np.ndarray) -> np.ndarray:
    """Each record's bag of token ids as the mean of their token means [N, d]."""
    rows = np.asarray(bag.sum(1)).ravel()
    return np.asarray(sp.diags(1.0 / np.maximum(rows, 1)) @ bag @ means, dtype=np.float32)


def copy_flags(inputs: PassTokens, body_bag: sp.csr_matrix) -> np.ndarray:
    """[T_inputs] whether each non-sink input token's id occurs in its own record's body."""
    flags = np.asarray(body_bag[inputs.records, inputs.ids]).ravel() > 0
    return flags & ~inputs.special


def weighted_input_means(store: Any, inputs: PassTokens, weights: np.ndarray) -> np.ndarray:
    """[N, d] per record: the ``weights``-weighted mean of its context + signature token states
    (zeros where the weights sum to 0), streamed."""
    n, d = len(inputs.offsets) - 1, store.meta.hidden_size
    seg = store.segments()
    out, tot = np.zeros((n, d)), np.zeros(n)
    for run, states, _, offs in store.iter_blocks("inputs"):
        a = int(inputs.offsets[run[0]])
        w = np.asarray(weights[a : a + len(states)], np.float64).copy()
        rec = np.repeat(np.arange(len(run)), np.diff(offs))
        pos = np.arange(len(states)) - offs[rec]
        starts, ends = seg[run, :, 0][rec], seg[run, :, 1][rec]  # [tokens, 2]: context, signature
        w[~((pos[:, None] >= starts) & (pos[:, None] < ends)).any(1)] = 0.0
        out[run] += sp.csr_matrix((w, (rec, np.arange(len(states)))), shape=(len(run), len(states))) @ states
        tot[run] += np.bincount(rec, w, minlength=len(run))
    return (out / np.where(tot > 0, tot, 1.0)[:, None]).astype(np.float32)


def _standardise(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-5
    return ((x - mu) / sd).astype(np.float32)


def ridge_ranks(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Ranks of the query split under ridge ``x → y`` fitted on ``train`` (λ by val MRR)."""
    x = _standardise(x, train)
    t = lambda i: torch.from_numpy(np.ascontiguousarray(x[i]))  # noqa: E731
    u = lambda i: torch.from_numpy(np.ascontiguousarray(y[i]))  # noqa: E731
    sol, _ = fit_ridge(t(train), u(train), t(val), u(val))
    return retrieval_ranks(t(query) @ sol.weight + sol.bias, u(query)).numpy()


def summary(ranks: np.ndarray) -> dict[str, float]:
    r = np.asarray(ranks, np.float64)
    return {"rank1": float((r == 1).mean()), "mrr": float((1.0 / r).mean()), "recall10": float((r <= 10).mean()),
            "n": int(len(r))}


def learning_curve(x: np.ndarray, bodies: np.ndarray, repos: np.ndarray, train: np.ndarray, val: np.ndarray,
                   query: np.ndarray, fractions: Sequence[float], seeds: int = 3,
                   full: dict[str, float] | None = None) -> list[dict[str, float]]:
    """Ridge (whitened space, both refitted per subset) on random subsets of the train
    repositories: per fraction, the mean and spread over ``seeds`` draws. ``full``, the
    :func:`summary` of ridge on the whole train split when the caller has it, is reused."""
    names = np.unique(repos[train])
    out = []
    done: set[int] = set()
    for frac in fractions:
        k = max(1, int(round(frac * len(names))))
        if k in done:  # two fractions of a few repositories round to one count: measured once
            continue
        done.add(k)
        rows = []
        for s in range(seeds if k < len(names) else 1):
            if k == len(names) and full is not None:
                rows.append({**full, "n_train": len(train)})
                continue
            keep = np.random.default_rng(s).choice(names, k, replace=False)
            sub = train[np.isin(repos[train], keep)]
            y = fit_space("whitened", bodies[sub]).apply(bodies)
            rows.append({**summary(ridge_ranks(x, y, sub, val, query)), "n_train": len(sub)})
        out.append({"fraction": float(frac), "repos": k, "draws": len(rows),
                    **{m: float(np.mean([r[m] for r in rows])) for m in ("n_train", "rank1", "mrr", "recall10")},
                    "rank1_sd": float(np.std([r["rank1"] for r in rows]))})
    return out


def ceilings(store: Any, *, split: str = "test", fractions: Sequence[float] = (0.25, 0.5, 1.0),
             seeds: int = 3) -> dict[str, Any]:
    """Every measurement of this module on ``store``'s ``split``: a plain dict for printing or JSON."""
    train, val, query = store.indices("train"), store.indices("val"), store.indices(split)
    if len(query) == 0:
        raise EvaluateError(f"{store.path}: the {split} split has no records")
    if len(train) < 2 or len(val) == 0:
        raise EvaluateError(f"{store.path}: ceilings need at least 2 train records and a val split "
                            f"(ridge's λ is chosen on val); it has {len(train)} train and {len(val)} val")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise EvaluateError(f"train fractions must be in (0, 1], not {bad[0]}")
    if seeds < 1:  # no draw: every learning-curve figure would be the mean of nothing
        raise EvaluateError(f"seeds (draws per train fraction) must be ≥ 1, not {seeds}")
    views = store.pooled_views(["signature", "signature_last", "body"])
    bodies = views["body"]
    x = np.concatenate([views["signature"], views["signature_last"]], axis=1)
    white = fit_space("whitened", bodies[train])
    y = white.apply(bodies)
    inp, body = pass_tokens(store, "inputs"), pass_tokens(store, "targets")
    vocab = int(max(inp.ids.max(initial=0), body.ids.max(initial=0))) + 1
    bag = bag_matrix(body, vocab)
    means, counts = token_means(store, body, train, vocab)
    oracle_bag = white.apply(bag_queries(bag, means))
    flags = copy_flags(inp, bag)
    copy_view = weighted_input_means(store, inp, flags.astype(np.float64))
    tok_in_body = np.asarray(bag.sum(1)).ravel()
    copyable = np.asarray(bag.multiply(bag_matrix(inp, vocab) > 0).sum(1)).ravel()
    q_share = copyable[query] / np.maximum(tok_in_body[query], 1)
    ridge = summary(ridge_ranks(x, y, train, val, query))
    return {
        "split": split, "queries": int(len(query)), "train_records": int(len(train)),
        "token_ids_seen_in_train_bodies": int((counts > 0).sum()),
        "body_tokens_whose_id_is_in_the_inputs": float(q_share.mean()),
        "ridge": ridge,
        "oracle_token_identity": summary(retrieval_ranks(torch.from_numpy(oracle_bag[query]),
                                                         torch.from_numpy(y[query])).numpy()),
        "oracle_copy_view_alone": summary(ridge_ranks(copy_view, y, train, val, query)),
        "ridge_plus_oracle_copy_view": summary(ridge_ranks(np.concatenate([x, copy_view], 1), y, train, val, query)),
        "learning_curve": learning_curve(x, bodies, store.repos, train, val, query, fractions, seeds, full=ridge),
    }
