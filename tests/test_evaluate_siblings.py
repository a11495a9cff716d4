"""The sibling softmax (NAME+sib rows): its formula, that it repairs confusions between the
functions of one file, and that it reads nothing but the query's own file's queries."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _evaluate_fixtures import make_dataset  # noqa: E402

from codejepa.evaluate.errors import EvaluateError  # noqa: E402
from codejepa.evaluate.retrieval import evaluate_retrieval, load_corpus_view  # noqa: E402
from codejepa.evaluate.search import MaterializedScorer  # noqa: E402
from codejepa.evaluate.siblings import SIB_BETAS, SIB_TEMPERATURES, SiblingGrid, SiblingScorer  # noqa: E402

torch.set_num_threads(1)


class _Matrix:
    def __init__(self, s: np.ndarray) -> None:
        self.s, self.n_queries = torch.from_numpy(s.astype(np.float32)), s.shape[0]

    def block(self, q: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        return self.s[torch.as_tensor(q)][:, torch.as_tensor(cols)]


def test_scores_are_the_inverted_softmax_over_the_querys_file() -> None:
    rng = np.random.default_rng(0)
    s = rng.standard_normal((23, 17))
    files = rng.choice(["a.py", "b.py", "c.py", "lonely.py"], 23)
    files[5] = "alone.py"
    t, beta = 0.3, 0.6
    ref = np.empty_like(s)
    for i in range(23):
        sib = s[files == files[i]] / t
        m = sib.max(0)
        ref[i] = s[i] - beta * t * (m + np.log(np.exp(sib - m).sum(0)))
    sc = SiblingScorer(_Matrix(s), files, t, beta)
    q, cols = np.array([7, 0, 5, 22, 3]), np.array([16, 2, 3, 4, 9])  # unordered, partial blocks
    assert np.allclose(sc.block(q, cols).numpy(), ref[np.ix_(q, cols)], atol=1e-5)
    assert np.allclose(sc.block(np.arange(23), np.arange(17)).numpy(), ref, atol=1e-5)
    # A function alone in its file: (1 − β)·s, the same ranking as without the correction.
    assert np.allclose(ref[5], (1 - beta) * s[5]) and np.allclose(sc.block(np.array([5]), np.arange(17)).numpy()[0], ref[5], atol=1e-5)
    # the grid's scorers (the files' log-sum-exp computed once per T, in chunks of whole files) agree
    grid = SiblingGrid(_Matrix(s), files, 17, rows_per_chunk=4)
    for b in (beta, 0.3):  # s − b·T·lse, where ref = s − β·T·lse
        assert np.allclose(grid.scorer(t, b).block(q, cols).numpy(), (s - b * (s - ref) / beta)[np.ix_(q, cols)],
                           atol=1e-5)
    assert len(grid._lse) == 1  # one log-sum-exp for both β
    assert torch.equal(grid.scorer(t, beta).block(q, cols), sc.block(q, cols))  # the same numbers, bit for bit
    plain = SiblingScorer(_Matrix(s), files, t, 0.0)
    assert torch.equal(plain.block(q, cols), _Matrix(s).block(q, cols))
    cached = MaterializedScorer(_Matrix(s), 17, q_block=4)
    assert torch.equal(cached.block(q, cols), _Matrix(s).block(q, cols))
    with pytest.raises(EvaluateError, match="one source file per query"):
        SiblingScorer(_Matrix(s), files[:-1], t, beta)
    with pytest.raises(EvaluateError, match="positive temperature"):
        SiblingScorer(_Matrix(s), files, 0.0, beta)


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory):
    return make_dataset(tmp_path_factory.mktemp("sib"), per_repo=30, duplicate_test_bodies=0, text_ids=False)


def _file_offset(ds, offset: float, noise: float, seed: int = 4, changed: np.ndarray | None = None):
    """Each prediction is its body plus noise plus one random offset shared by its source file:
    the bodies that lie along the offset win the whole file's queries, the confusion between
    siblings that the correction targets. ``changed`` records get random predictions (for the
    invariance test)."""
    from codejepa.embed.store import open_store

    with open_store(ds.store_path) as st:
        files = load_corpus_view(st).files.astype(str)
    rng = np.random.default_rng(seed)
    pred = ds.bodies + noise * rng.standard_normal(ds.bodies.shape).astype(np.float32)
    for f in np.unique(files):
        pred[files == f] += offset * rng.standard_normal(ds.bodies.shape[1]).astype(np.float32)
    if changed is not None:
        pred[changed] = rng.standard_normal((len(changed), ds.bodies.shape[1])).astype(np.float32) * 5
    return lambda store, idx: pred[idx]


def test_sibling_softmax_repairs_confusions_within_a_file(ds) -> None:
    res = evaluate_retrieval(ds.store_path, baselines="bm25", spaces="whitened", n_boot=50, plots=False,
                             hubness_correction=False, methods={"filey": _file_offset(ds, 1.0, 0.3)})
    assert {r.method for r in res.rows} == {"filey", "filey+bm25", "filey+bm25+sib", "bm25", "bm25+sib"}
    fused, fixed = res.row("filey+bm25", "whitened"), res.row("filey+bm25+sib", "whitened")
    assert fixed.metrics["rank@1"].value > fused.metrics["rank@1"].value + 0.3  # 49% → 96% when written
    assert fixed.kind == "run" and fixed.settings["beta"] > 0 and fixed.settings["temperature"] in SIB_TEMPERATURES
    assert fixed.settings["dense_weight"] == fused.settings["dense_weight"]  # it wraps the fused row as chosen
    grid = fixed.settings["selection_mrr"]
    assert len(grid) == len(SIB_TEMPERATURES) * (len(SIB_BETAS) - 1) + 1  # β = 0 is one candidate, not one per T
    assert grid[f"T={fixed.settings['temperature']},beta={fixed.settings['beta']}"] == max(grid.values())
    bm = res.row("bm25+sib", "-")
    assert bm.kind == "baseline" and bm.settings["query"] == res.row("bm25", "-").settings["query"]
    if bm.settings["beta"] == 0:  # val saw no gain: exactly BM25's ranking
        assert np.array_equal(bm.ranks, res.row("bm25", "-").ranks)
    assert res.settings["sibling_softmax"]["on"] is True
    with pytest.raises(EvaluateError, match="sibling rows"):
        evaluate_retrieval(ds.store_path, baselines="bm25", plots=False, methods={"x+sib": _file_offset(ds, 1.0, 0.3)})


def test_joint_fusion_weight_is_chosen_for_the_sib_row_itself(ds) -> None:
    """``sib_fusion="joint"``: the +sib row re-chooses the BM25 fusion weight with its own T and β,
    so its val MRR is never below the inherited weight's, and the move is recorded."""
    kw = dict(baselines="bm25", spaces="whitened", n_boot=20, plots=False, hubness_correction=False,
              methods={"filey": _file_offset(ds, 2.0, 1.0)})
    rows = {}
    for mode in ("inherit", "joint"):
        res = evaluate_retrieval(ds.store_path, sib_fusion=mode, **kw)
        assert res.settings["sibling_softmax"]["fusion_weight"] == mode
        rows[mode] = (res.row("filey+bm25", "whitened"), res.row("filey+bm25+sib", "whitened"))
    (fused, inherit), (fused_j, joint) = rows["inherit"], rows["joint"]
    assert fused.settings == fused_j.settings and np.array_equal(fused.ranks, fused_j.ranks)  # +bm25 untouched
    assert inherit.settings["dense_weight"] == fused.settings["dense_weight"]
    assert joint.settings["dense_weight_of_bm25_row"] == fused.settings["dense_weight"]
    assert joint.settings["dense_weight"] != fused.settings["dense_weight"]  # this fixture moves it (0.95 → 0.97)
    best_i, best_j = max(inherit.settings["selection_mrr"].values()), max(joint.settings["selection_mrr"].values())
    assert best_j > best_i
    grid = joint.settings["selection_mrr"]
    assert grid[f"T={joint.settings['temperature']},beta={joint.settings['beta']}"] == best_j
    with pytest.raises(EvaluateError, match="--sib-fusion must be one of inherit, joint"):
        evaluate_retrieval(ds.store_path, sib_fusion="both", **kw)


def test_a_querys_rank_depends_only_on_its_own_files_queries(ds) -> None:
    """Predictions of every test query outside one file change: that file's ranks must not (the
    correction's sum runs over the file's queries; T and β come from val)."""
    from codejepa.embed.store import open_store

    with open_store(ds.store_path) as st:
        files = load_corpus_view(st).files.astype(str)
    test = np.flatnonzero(ds.splits == "test")
    keep = files[test] == files[test[0]]
    kw = dict(baselines="bm25", spaces="whitened", n_boot=50, plots=False, hubness_correction=False)
    a = evaluate_retrieval(ds.store_path, methods={"m": _file_offset(ds, 1.0, 0.3)}, **kw)
    b = evaluate_retrieval(ds.store_path, methods={"m": _file_offset(ds, 1.0, 0.3, changed=test[~keep])}, **kw)
    ra, rb = a.row("m+bm25+sib", "whitened"), b.row("m+bm25+sib", "whitened")
    assert ra.settings["beta"] == rb.settings["beta"] > 0 and ra.settings["temperature"] == rb.settings["temperature"]
    assert np.array_equal(ra.ranks[keep], rb.ranks[keep])
    assert not np.array_equal(ra.ranks[~keep], rb.ranks[~keep])
