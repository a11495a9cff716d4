"""The hubness correction (CSLS rows): its penalties, that it repairs hub-prone predictions, and
that it never reads the queries it ranks (the reference set is the train split's predictions)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _evaluate_fixtures import make_dataset  # noqa: E402

from codejepa.evaluate.errors import EvaluateError  # noqa: E402
from codejepa.evaluate.hubness import CSLS_BETAS, CSLS_KS, hub_penalties  # noqa: E402
from codejepa.evaluate.retrieval import evaluate_retrieval  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory):
    return make_dataset(tmp_path_factory.mktemp("hub"), duplicate_test_bodies=1)


def _method(ds, offset: float, noise: float, seed: int = 3, changed: np.ndarray | None = None):
    """Bodies + per-record noise + a common offset ``offset · v``: a shared direction in every
    prediction makes the candidates that lie along it win many queries (hubs). ``changed``
    records get other predictions (for the invariance test)."""
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal(ds.bodies.shape).astype(np.float32)
    v = rng.standard_normal(ds.bodies.shape[1]).astype(np.float32)
    v /= np.linalg.norm(v)
    pred = ds.bodies + noise * eps + offset * v
    if changed is not None:
        pred[changed] = rng.standard_normal((len(changed), ds.bodies.shape[1])).astype(np.float32) * 5
    return lambda store, idx: pred[idx]


def test_penalties_are_mean_top_k_cosines_outside_the_candidates_own_repository() -> None:
    g = torch.Generator().manual_seed(1)
    c = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    r = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    rng = np.random.default_rng(0)
    cand_repos = rng.choice(["a", "b", "c", "held-out"], 30)
    ref_repos = rng.choice(["a", "b", "c"], 50).astype("U8")
    r[:10] = c[:10]  # the first ten candidates' own predictions, identical to them
    ref_repos[:10] = cand_repos[:10]
    got = hub_penalties(c, r, (1, 5), cand_groups=cand_repos, ref_groups=ref_repos, block=7)
    s = (c @ r.T).numpy().astype(np.float64)
    for i in range(30):
        row = s[i][ref_repos != cand_repos[i]]
        for k in (1, 5):
            assert np.isclose(float(got[k][i]), np.sort(row)[::-1][:k].mean(), atol=1e-6)
    assert all(float(got[1][i]) < 0.999 for i in range(10))  # its own prediction was left out
    plain = hub_penalties(c, r, (1,))
    assert np.allclose(plain[1][:10].numpy(), 1.0, atol=1e-6)  # without groups it counts
    with pytest.raises(EvaluateError, match="k >= 1"):
        hub_penalties(c, r, (0,))
    with pytest.raises(EvaluateError, match="another repository"):
        hub_penalties(c, r, (1,), cand_groups=np.full(30, "a"), ref_groups=np.full(50, "a"))


def test_csls_repairs_hub_prone_predictions_and_leaves_clean_ones(ds) -> None:
    res = evaluate_retrieval(ds.store_path, baselines="prototype,ridge", spaces=("centered", "whitened"), n_boot=50,
                             plots=False, methods={"hubby": _method(ds, 4.0, 0.6), "clean": _method(ds, 0.0, 0.6)})
    assert {r.method for r in res.rows} == {"prototype", "ridge", "ridge+csls", "hubby", "hubby+csls", "clean",
                                             "clean+csls"}
    hubby, fixed = res.row("hubby", "whitened"), res.row("hubby+csls", "whitened")
    assert fixed.metrics["mrr"].value > 1.3 * hubby.metrics["mrr"].value
    assert fixed.settings["beta"] > 0 and fixed.settings["k"] in CSLS_KS and fixed.kind == "run"
    assert set(fixed.settings["selection_mrr"]) == {f"k={k},beta={b}" for k in CSLS_KS for b in CSLS_BETAS}
    assert fixed.settings["selection_mrr"][f"k={fixed.settings['k']},beta={fixed.settings['beta']}"] == max(
        fixed.settings["selection_mrr"].values())
    clean = res.row("clean+csls", "whitened")
    if clean.settings["beta"] == 0:  # val saw no gain: exactly the plain cosine ranking
        assert np.array_equal(clean.ranks, res.row("clean", "whitened").ranks)
    assert res.row("ridge+csls", "whitened").kind == "baseline"
    assert res.settings["hubness"]["spaces"] == ["centered", "whitened"]
    off = evaluate_retrieval(ds.store_path, baselines="prototype", spaces="whitened", n_boot=50, plots=False,
                             methods={"hubby": _method(ds, 4.0, 0.6)}, hubness_correction=False)
    assert {r.method for r in off.rows} == {"prototype", "hubby"}
    raw = evaluate_retrieval(ds.store_path, baselines="prototype", spaces="raw", n_boot=50, plots=False,
                             methods={"hubby": _method(ds, 4.0, 0.6)})
    assert {r.method for r in raw.rows} == {"prototype", "hubby"}  # no correction in the raw space
    with pytest.raises(EvaluateError, match="csls"):
        evaluate_retrieval(ds.store_path, baselines="prototype", plots=False, methods={"x+csls": _method(ds, 0, 0.1)})


def test_whole_corpus_penalties_do_not_tell_train_bodies_from_held_out_ones() -> None:
    """In a whole-corpus pool, a train body's repository siblings are among the reference
    predictions and a held-out body's are not. Where bodies share a per-repository direction,
    the penalty would tell the two apart (and rank the held-out true bodies above the train
    distractors) unless a candidate's own repository is left out."""
    rng = np.random.default_rng(5)
    d, per_repo = 16, 20
    repos = np.repeat([f"r{i}" for i in range(12)], per_repo)
    held_out = np.isin(repos, ["r10", "r11"])
    direction = {r: rng.standard_normal(d) for r in np.unique(repos)}
    bodies = np.stack([direction[r] for r in repos]) + 0.7 * rng.standard_normal((len(repos), d))
    preds = bodies[~held_out] + 0.7 * rng.standard_normal(((~held_out).sum(), d))
    unit = lambda x: torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=1)  # noqa: E731
    naive = hub_penalties(unit(bodies), unit(preds), (10,))[10].numpy()
    fair = hub_penalties(unit(bodies), unit(preds), (10,), cand_groups=repos, ref_groups=repos[~held_out])[10].numpy()
    gap = lambda r: r[~held_out].mean() - r[held_out].mean()  # noqa: E731
    assert gap(naive) > 3 * naive.std() / np.sqrt(held_out.sum())  # train bodies visibly penalised more
    assert abs(gap(fair)) < 0.5 * abs(gap(naive))


def test_csls_never_reads_the_queries_it_ranks(ds) -> None:
    """Other test queries' predictions change: this query's rank must not (the penalties come
    from train predictions, k and β from val)."""
    test = np.flatnonzero(ds.splits == "test")
    half = len(test) // 2
    a = evaluate_retrieval(ds.store_path, baselines="prototype", spaces="whitened", n_boot=50, plots=False,
                           methods={"m": _method(ds, 4.0, 0.6)})
    b = evaluate_retrieval(ds.store_path, baselines="prototype", spaces="whitened", n_boot=50, plots=False,
                           methods={"m": _method(ds, 4.0, 0.6, changed=test[half:])})
    ra, rb = a.row("m+csls", "whitened"), b.row("m+csls", "whitened")
    assert ra.settings["beta"] == rb.settings["beta"] > 0 and ra.settings["k"] == rb.settings["k"]
    assert np.array_equal(ra.ranks[:half], rb.ranks[:half])
    assert not np.array_equal(ra.ranks[half:], rb.ranks[half:])
    # The reference does matter: other train predictions change the ranking.
    train = np.flatnonzero(ds.splits == "train")
    c = evaluate_retrieval(ds.store_path, baselines="prototype", spaces="whitened", n_boot=50, plots=False,
                           methods={"m": _method(ds, 4.0, 0.6, changed=train)})
    assert not np.array_equal(ra.ranks, c.row("m+csls", "whitened").ranks) or c.row("m+csls", "whitened").settings["beta"] == 0


def test_one_train_repository_leaves_the_correction_out_with_a_note(tmp_path: Path) -> None:
    one = make_dataset(tmp_path, repos={"train": 1, "val": 2, "test": 2}, name="one")
    res = evaluate_retrieval(one.store_path, baselines="prototype,ridge", spaces="whitened", n_boot=50, plots=False,
                             methods={"m": _method(one, 0.0, 0.3)})
    assert {r.method for r in res.rows} == {"prototype", "ridge", "m"}
    assert any("m+csls left out" in n for n in res.notes) and any("ridge+csls left out" in n for n in res.notes)
