"""Ceilings (evaluate/ceilings.py): token means, copy flags and weighted views against brute force,
and the oracles ranking as an oracle should on a store whose states are made of token identities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from codejepa.embed.store import PendingRecord, StoreMeta, StoreWriter, open_store
from codejepa.evaluate.ceilings import (bag_matrix, ceilings, copy_flags, learning_curve, pass_tokens, token_means,
                                        weighted_input_means)

V, D = 60, 24


def _token_store(path: Path, *, n_repos: int = 8, per_repo: int = 30, seed: int = 0, with_val: bool = True) -> Path:
    """States = a fixed embedding of the token id + noise. A body reuses some of its signature's
    ids and adds ids of its own, so the body's bag of ids identifies it and a copy view helps."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(V, D)) * 2.0
    sink = rng.normal(size=D) * 30.0
    meta = StoreMeta(teacher="synthetic/tokens", teacher_kind="bidirectional", hidden_size=D, layer=1,
                     num_hidden_layers=2, template_version="t1")
    recs = []
    for r in range(n_repos):
        split = "train" if r < n_repos - 2 else ("val" if r == n_repos - 2 and with_val else "test")
        for j in range(per_repo):
            ctx = rng.integers(1, V, size=int(rng.integers(0, 5)))
            sig = rng.integers(1, V, size=5)
            body = np.concatenate([rng.choice(sig, 2), rng.integers(1, V, size=4)])
            ids = np.concatenate([[0], ctx, sig])
            inp = np.concatenate([sink[None], emb[ctx] + 0.1 * rng.normal(size=(len(ctx), D)),
                                  emb[sig] + 0.1 * rng.normal(size=(len(sig), D))]).astype(np.float32)
            special = np.zeros(len(ids), bool)
            special[0] = True
            recs.append(PendingRecord(
                id=f"r{r}::f{j}", split=split, repo=f"r{r}", truncated=False, input_states=inp,
                input_token_ids=ids.astype(np.int32), input_special=special,
                context_span=(1, 1 + len(ctx)), signature_span=(1 + len(ctx), 1 + len(ctx) + len(sig)),
                body_states=(emb[body] + 0.1 * rng.normal(size=(len(body), D))).astype(np.float32),
                body_token_ids=body.astype(np.int32)))
    with StoreWriter(path, meta) as w:
        w.append(recs)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    with open_store(_token_store(tmp_path_factory.mktemp("ceil") / "s.h5")) as s:
        yield s


def test_token_means_match_brute_force(store) -> None:
    body = pass_tokens(store, "targets")
    train = store.indices("train")
    means, counts = token_means(store, body, train, V)
    sums, n = np.zeros((V, D)), np.zeros(V)
    for i in train:
        b = store.body(int(i))
        for tid, st in zip(b.token_ids[~b.special], b.states[~b.special]):
            sums[tid] += st
            n[tid] += 1
    seen = n > 0
    np.testing.assert_array_equal(counts, n)
    np.testing.assert_allclose(means[seen], sums[seen] / n[seen, None], rtol=1e-5, atol=1e-4)


def test_copy_flags_and_weighted_views_match_brute_force(store) -> None:
    inp, body = pass_tokens(store, "inputs"), pass_tokens(store, "targets")
    flags = copy_flags(inp, bag_matrix(body, V))
    view = weighted_input_means(store, inp, flags.astype(float))
    everything = weighted_input_means(store, inp, np.ones(len(inp.ids)))
    np.testing.assert_allclose(everything, store.pooled("inputs"), rtol=1e-5, atol=1e-4)
    for i in (0, 7, len(store) - 1):
        a = int(inp.offsets[i])
        x, b = store.inputs(i), store.body(i)
        want = np.array([(not s) and t in set(b.token_ids.tolist()) for t, s in zip(x.token_ids, x.special)])
        np.testing.assert_array_equal(flags[a : a + len(want)], want)
        expected = x.states[want].mean(0) if want.any() else np.zeros(D)
        np.testing.assert_allclose(view[i], expected, rtol=1e-5, atol=1e-4)


def test_oracles_rank_as_ceilings(store) -> None:
    res = ceilings(store, fractions=(0.5, 1.0), seeds=2)
    assert res["queries"] == 30
    # The body's own ids identify it; the signature predicts only the two reused ids.
    assert res["oracle_token_identity"]["rank1"] >= 0.9
    assert res["oracle_token_identity"]["rank1"] > res["ridge"]["rank1"] + 0.2
    assert res["ridge_plus_oracle_copy_view"]["mrr"] > res["ridge"]["mrr"]
    assert 0.2 < res["body_tokens_whose_id_is_in_the_inputs"] < 0.8
    curve = res["learning_curve"]
    assert [p["fraction"] for p in curve] == [0.5, 1.0]
    assert curve[0]["n_train"] < curve[1]["n_train"] == res["train_records"]
    assert curve[1]["rank1"] == pytest.approx(res["ridge"]["rank1"])  # reused, not refitted
    # Refitted on the whole train split, the curve's last point is the same ridge.
    views = store.pooled_views(["signature", "signature_last", "body"])
    x = np.concatenate([views["signature"], views["signature_last"]], axis=1)
    (refit,) = learning_curve(x, views["body"], store.repos, store.indices("train"), store.indices("val"),
                              store.indices("test"), (1.0,))
    assert refit["rank1"] == pytest.approx(res["ridge"]["rank1"]) and refit["n_train"] == res["train_records"]
    assert refit["draws"] == 1  # every draw of all the repositories is the same fit
    # a subset's point is ridge and whitening refitted on that subset's records alone
    train, names = store.indices("train"), np.unique(store.repos[store.indices("train")])
    (half,) = learning_curve(x, views["body"], store.repos, train, store.indices("val"), store.indices("test"), (0.5,),
                             seeds=1)
    sub = train[np.isin(store.repos[train], np.random.default_rng(0).choice(names, half["repos"], replace=False))]
    (own,) = learning_curve(x, views["body"], store.repos, sub, store.indices("val"), store.indices("test"), (1.0,))
    assert half["n_train"] == own["n_train"] == len(sub) < len(train)
    assert (half["rank1"], half["mrr"]) == pytest.approx((own["rank1"], own["mrr"]))
    # token means come from the train bodies only: the oracle must not read the test bodies' own states
    body = pass_tokens(store, "targets")
    in_train = np.isin(body.records, train) & ~body.special
    assert res["token_ids_seen_in_train_bodies"] == len(np.unique(body.ids[in_train]))
    # fractions that round to one repository count are measured once
    same = learning_curve(x, views["body"], store.repos, store.indices("train"), store.indices("val"),
                          store.indices("test"), (1.0, 0.999), seeds=1)
    assert [p["fraction"] for p in same] == [1.0]


def test_inputs_are_standardised_with_train_statistics() -> None:
    """Ridge's inputs are scaled with the train split's mean and spread: statistics of the query
    split would leak it into the fit."""
    from codejepa.evaluate.ceilings import _standardise

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3)) * 2 + 1
    x[30:] += 50.0  # the query split, far away
    z = _standardise(x, np.arange(30))
    np.testing.assert_allclose(z[:30].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:30].std(0), 1, atol=1e-4)


def test_bad_requests_are_one_line_errors(store, tmp_path: Path) -> None:
    from codejepa.core import CodejepaError
    from codejepa.evaluate.errors import EvaluateError

    with pytest.raises(EvaluateError, match="fractions must be in"):
        ceilings(store, fractions=(0.0, 1.0))
    with pytest.raises(CodejepaError, match="unknown split"):
        ceilings(store, split="nope")
    with open_store(_token_store(tmp_path / "noval.h5", with_val=False)) as s:
        with pytest.raises(EvaluateError, match="need at least 2 train records and a val split"):
            ceilings(s)
