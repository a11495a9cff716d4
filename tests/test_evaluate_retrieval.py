"""evaluate_retrieval end to end on synthetic stores: the seed's failure must be flagged."""

from __future__ import annotations

import functools
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from _evaluate_fixtures import make_dataset  # noqa: E402

from codejepa.core import CodejepaError  # noqa: E402
from codejepa.embed.store import StoreError  # noqa: E402
from codejepa.evaluate.baselines import FUSION_WEIGHTS, ReverseFit, RidgeFit  # noqa: E402
from codejepa.evaluate.errors import EvaluateError  # noqa: E402
from codejepa.evaluate.report import compare_saved, comparison_lines, render  # noqa: E402
from codejepa.evaluate.retrieval import evaluate_retrieval  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory):
    return make_dataset(tmp_path_factory.mktemp("ev"), duplicate_test_bodies=1)


def _class_prototype(ds):
    """The seed's failure: predict the train mean body of the query's category."""
    train = ds.splits == "train"
    protos = np.stack([ds.bodies[train & (ds.classes == c)].mean(0) for c in range(ds.classes.max() + 1)])
    return lambda store, idx: protos[ds.classes[idx]]


def _instance(ds, noise: float = 0.15):
    def predict(store, idx):  # deterministic: the same predictions at every call
        rng = np.random.default_rng(7)
        return ds.bodies[idx] + noise * rng.standard_normal((len(idx), ds.bodies.shape[1])).astype(np.float32)
    return predict


def test_seed_failure_is_flagged_and_instance_predictor_is_not(ds) -> None:
    res = evaluate_retrieval(ds.store_path, baselines="prototype,random,noisy_oracle", n_boot=300,
                             methods={"classproto": _class_prototype(ds), "instance": _instance(ds)},
                             noisy_of="classproto")
    n_test = int((ds.splits == "test").sum())
    assert res.pool_stats["n_queries"] == n_test
    assert res.pool_stats["n_distinct_bodies"] == n_test - 1  # one duplicated body counts once
    cp = res.row("classproto", "raw")
    assert cp.diagnostics["cosine_raw"] > 0.9  # the seed's high cosine ...
    chance = res.pool_stats["chance"]["rank@1"]
    assert cp.metrics["rank@1"].value < 6 * chance  # ... at (near) chance rank@1
    for space in ("raw", "centered", "whitened"):
        assert res.row("classproto", space).warning is not None
        assert "classproto" in res.row("classproto", space).warning
        assert res.row("instance", space).warning is None
        assert res.row("instance", space).metrics["rank@1"].value > 0.9
    assert any("WARNING classproto (raw" in w for w in res.warnings)
    assert not any(w.startswith("WARNING instance") for w in res.warnings)
    # Collapse diagnostics tell the two apart.
    inst = res.row("instance", "raw").diagnostics
    assert cp.diagnostics["rankme_pred"] < 0.5 * cp.diagnostics["rankme_target"]
    assert inst["rankme_pred"] > 0.8 * inst["rankme_target"]
    assert cp.diagnostics["pairwise_cosine_pred"] > cp.diagnostics["pairwise_cosine_target"]
    assert res.row("classproto", "centered").diagnostics["std_ratio_mean"] < 0.7
    assert res.row("classproto", "raw").hubness["top1_winner_share"] > 5 * res.row("instance", "raw").hubness["top1_winner_share"]
    # The prototype: high cosine, chance rank; in a centred space it is the zero vector, so
    # every body ties and pessimistic ranking puts the true one last.
    proto = res.row("prototype", "raw")
    assert proto.diagnostics["cosine_raw"] > 0.9 and proto.hubness["top1_winner_share"] == 1.0
    assert (res.row("prototype", "centered").ranks == res.pool_stats["n_distinct_bodies"]).all()
    # Noise as large as the class prototype's own error still retrieves instances: the
    # prototype's error is not large, it points the wrong way (all queries alike).
    noisy = res.row("noisy_oracle", "whitened")
    assert noisy.settings["error_of"] == "classproto"
    assert noisy.metrics["rank@1"].value > 3 * res.row("classproto", "whitened").metrics["rank@1"].value
    with pytest.raises(EvaluateError, match="noisy oracle: no method"):
        evaluate_retrieval(ds.store_path, baselines="noisy_oracle", noisy_of="nope", plots=False)


def test_all_baselines_outputs_and_comparison(ds, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = evaluate_retrieval(ds.store_path, out_dir=out, n_boot=200,
                             methods={"classproto": _class_prototype(ds)}, compare=[("ridge@whitened", "classproto@whitened")])
    methods = {r.method for r in res.rows}
    assert methods == {"classproto", "classproto+bm25", "random", "prototype", "signature", "ridge", "ridge+last", "nn",
                       "bm25", "ridge+bm25", "oracle", "noisy_oracle",
                       "classproto+csls", "ridge+csls", "ridge+last+csls",  # hubness-corrected rows (not raw) ...
                       "classproto+csls+bm25", "ridge+csls+bm25",  # ... and their BM25 hybrids
                       "reverse", "reverse+csls", "reverse+bm25", "reverse+csls+bm25",  # body → signature, no space
                       "bm25+sib", "classproto+bm25+sib", "ridge+bm25+sib", "classproto+csls+bm25+sib",  # sibling softmax
                       "ridge+csls+bm25+sib", "reverse+bm25+sib", "reverse+csls+bm25+sib"}
    assert not any("+csls" in r.method for r in res.rows if r.space == "raw")
    # The reverse direction (candidate body → signature views) finds instances too; its λ and
    # its CSLS settings are the selection split's best.
    rev, rev_hub = res.row("reverse", "-"), res.row("reverse+csls", "-")
    assert rev.metrics["mrr"].value > 3 * res.row("prototype", "whitened").metrics["mrr"].value
    assert rev.settings["selection_mrr"][str(rev.settings["alpha"])] == max(rev.settings["selection_mrr"].values())
    assert rev_hub.settings["selection_mrr"][f"k={rev_hub.settings['k']},beta={rev_hub.settings['beta']}"] == \
        max(rev_hub.settings["selection_mrr"].values())
    hybrid, corrected = res.row("ridge+csls+bm25", "whitened"), res.row("ridge+csls", "whitened")
    assert (hybrid.settings["k"], hybrid.settings["beta"]) == (corrected.settings["k"], corrected.settings["beta"])
    assert hybrid.settings["selection_mrr"][str(hybrid.settings["dense_weight"])] == max(hybrid.settings["selection_mrr"].values())
    for space in ("raw", "centered", "whitened"):
        assert res.row("oracle", space).metrics["rank@1"].value == 1.0  # plumbing, duplicates merged
        assert res.row("ridge", space).metrics["mrr"].value > 3 * res.row("prototype", space).metrics["mrr"].value
        assert res.row("ridge", space).settings["alpha"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
        assert res.row("ridge+last", space).metrics["mrr"].value > 3 * res.row("prototype", space).metrics["mrr"].value
        assert res.row("ridge+last", space).settings["input"] == "signature mean + signature's last token"
        assert 0.0 <= res.row("ridge+bm25", space).settings["dense_weight"] <= 1.0
        fused = res.row("classproto+bm25", space)  # every run / method is also fused with BM25, weight on val
        assert fused.kind == "run" and fused.settings["run"] == "classproto"
        assert set(fused.settings["selection_mrr"]) == {str(w) for w in FUSION_WEIGHTS}
        assert fused.settings["selection_mrr"][str(fused.settings["dense_weight"])] == max(fused.settings["selection_mrr"].values())
    plain = evaluate_retrieval(ds.store_path, baselines="bm25,reverse", spaces="whitened", n_boot=50, plots=False,
                               methods={"classproto": _class_prototype(ds)}, fuse_bm25=False, hubness_correction=False, sibling_softmax=False)
    assert {r.method for r in plain.rows} == {"classproto", "bm25", "reverse"}  # the switches reach reverse too
    with pytest.raises(EvaluateError, match="fusion, hubness-corrected and sibling rows"):
        evaluate_retrieval(ds.store_path, baselines="bm25", plots=False, methods={"x+bm25": _class_prototype(ds)})
    assert res.row("bm25", "-").metrics["mrr"].value > 2 * res.pool_stats["chance"]["mrr"]
    bm = res.row("bm25", "-").settings  # the query text was chosen on val
    assert bm["query"] in ("signature", "signature+context") and set(bm["selection_mrr"]) == {"signature", "signature+context"}
    # Files: every figure and setting, hashes of the store, ranks for later comparisons, plots.
    data = json.loads((out / "retrieval.json").read_text())
    assert data["store"]["fingerprint"] == ds.meta.fingerprint()
    assert len(data["store"]["file_sha256"]) == 64 and data["store"]["corpus_fingerprint"] == ds.meta.corpus_manifest_hash
    assert data["settings"]["pool"]["label"] == "split" and data["settings"]["ties"] == "pessimistic"
    row = next(r for r in data["rows"] if r["method"] == "ridge" and r["space"] == "whitened")
    assert set(row["metrics"]) == {"rank@1", "recall@5", "recall@10", "recall@100", "mrr", "median_rank", "mean_rank"}
    assert row["metrics"]["mrr"]["ci_low"] <= row["metrics"]["mrr"]["value"] <= row["metrics"]["mrr"]["ci_high"]
    assert row["diagnostics"]["rankme_pred"] > 0 and row["chance"]["rank@1"] > 0
    expl = [c for c in data["comparisons"] if c["a"] == "ridge@whitened" and c["b"] == "classproto@whitened"]
    assert expl and expl[0]["results"][0]["p_value"] < 0.05 and expl[0]["results"][0]["diff"] > 0
    assert set(expl[0]["cis_overlap"]) == {"rank@1", "mrr"} and "n_clusters" in expl[0]["results"][0]
    for f in ("rank_distribution.png", "projection.png", "table.txt", "ranks.npz"):
        assert (out / f).stat().st_size > 1000
    assert "ridge" in (out / "table.txt").read_text()
    # A narrow terminal leaves out the secondary columns, never cuts rank@1 or MRR short.
    mrr = f"{row['metrics']['mrr']['value']:.3f} [{row['metrics']['mrr']['ci_low']:.3f}, {row['metrics']['mrr']['ci_high']:.3f}]"
    for width, left_out in ((90, True), (250, False)):
        sio = io.StringIO()
        render(data, Console(file=sio, width=width, color_system=None))
        text = sio.getvalue()
        table = [ln for ln in text.splitlines() if ln[:1] in "┏┃│┗└┡"]
        assert max(map(len, table)) <= width and "…" not in text and mrr in text
        assert ("left out for this terminal's width: cos space" in text) == left_out
        assert ("cos space" in table[1]) != left_out
    sio = io.StringIO()  # warnings read as such without colour (a pipe, table.txt)
    render({**data, "warnings": ["the canonical map is fitted on few records", "WARNING x (raw, pool split)"]},
           Console(file=sio, width=250, color_system=None))
    assert "warning: the canonical map is fitted on few records" in sio.getvalue()
    assert "warning: WARNING" not in sio.getvalue() and "WARNING x (raw" in sio.getvalue()
    c = compare_saved(out, "ridge@whitened", "classproto@whitened", n_boot=300)
    assert c["results"][1]["metric"] == "mrr" and c["results"][1]["diff"] > 0
    # beside the paired test, whether the two rows' own CIs (as the evaluation reported them) overlap
    rows = {f"{r['method']}@{r['space']}": r["metrics"] for r in data["rows"]}
    ra, rc = rows["ridge@whitened"]["mrr"], rows["classproto@whitened"]["mrr"]
    assert c["cis_overlap"]["mrr"] == (ra["ci_low"] <= rc["ci_high"] and rc["ci_low"] <= ra["ci_high"])
    assert "their own CIs" in comparison_lines({"comparisons": [c]})[1]
    (out / "retrieval.json").write_text("{")  # the paired figures need only the ranks
    assert "cis_overlap" not in compare_saved(out, "ridge@whitened", "classproto@whitened", n_boot=50)
    with pytest.raises(EvaluateError, match="no saved result"):
        compare_saved(out, "ridge@whitened", "nope@raw")


def test_pools(ds) -> None:
    kw = dict(baselines="oracle,prototype,random", spaces="whitened", n_boot=100, methods={"inst": _instance(ds, 0.8)})
    a = evaluate_retrieval(ds.store_path, pool=20, pool_seeds=(0, 1), **kw)
    b = evaluate_retrieval(ds.store_path, pool=20, pool_seeds=(0, 1), **kw)
    n_test = int((ds.splits == "test").sum())
    ra, rb = a.row("inst", "whitened"), b.row("inst", "whitened")
    np.testing.assert_array_equal(ra.ranks, rb.ranks)  # reproducible
    assert len(ra.ranks) == 2 * n_test and ra.ranks.max() <= 20
    assert a.pool_stats["chance"]["rank@1"] == pytest.approx(1 / 20)
    c = evaluate_retrieval(ds.store_path, pool=20, pool_seeds=(5, 6), **kw)
    assert not np.array_equal(c.row("inst", "whitened").ranks, ra.ranks)
    whole = evaluate_retrieval(ds.store_path, pool="all", **kw)
    assert whole.pool_stats["n_candidates"] == len(ds.ids)
    split = evaluate_retrieval(ds.store_path, pool="split", **kw)
    # More distractors can only push the true body down.
    assert (whole.row("inst", "whitened").ranks >= split.row("inst", "whitened").ranks).all()
    repo = evaluate_retrieval(ds.store_path, pool="repo", **kw)
    assert repo.pool_stats["mean_pool_size"] < split.pool_stats["mean_pool_size"]
    assert (repo.row("inst", "whitened").ranks <= split.row("inst", "whitened").ranks).all()


def test_selection_grids_score_once_and_rank_as_without_materialising(ds, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fusion weights, CSLS and sibling settings are chosen on a selection grid: with the
    # score matrices held, BM25 scores each query of a split once (not once per weight and
    # fused method), and every row, setting and rank is the same as when nothing is held.
    import bm25s

    import codejepa.evaluate.retrieval as retrieval_mod
    import codejepa.evaluate.search as search_mod

    calls = {"n": 0}
    real = bm25s.BM25.get_scores_from_ids

    def counting(self, ids, *a, **k):
        calls["n"] += 1
        return real(self, ids, *a, **k)

    monkeypatch.setattr(bm25s.BM25, "get_scores_from_ids", counting)
    # a few queries per search block, as a pool too large for a block of many would be: a scorer
    # that is not held then recomputes its scores at every block, weight and setting
    small_blocks = functools.partial(retrieval_mod.search_task, budget_bytes=2048)
    monkeypatch.setattr(retrieval_mod, "search_task", small_blocks)
    kw = dict(baselines="ridge,bm25,reverse", spaces="whitened", n_boot=50, plots=False,
              methods={"inst": _instance(ds, 0.8)}, bm25_query="signature")
    held = evaluate_retrieval(ds.store_path, **kw)
    n_held = calls["n"]
    n_test, n_val = int((ds.splits == "test").sum()), int((ds.splits == "val").sum())
    assert n_held <= n_test + n_val  # each split's queries scored once (queries without a known token: not at all)
    monkeypatch.setattr(search_mod, "MATERIALIZE_BYTES", 0)
    calls["n"] = 0
    plain = evaluate_retrieval(ds.store_path, **kw)
    assert calls["n"] > 3 * n_held
    assert [(r.method, r.space) for r in held.rows] == [(r.method, r.space) for r in plain.rows]
    for a, b in zip(held.rows, plain.rows):
        assert {k: v for k, v in a.settings.items() if k != "spread"} == \
            {k: v for k, v in b.settings.items() if k != "spread"}, a.method
        np.testing.assert_array_equal(a.ranks, b.ranks, err_msg=f"{a.method} {a.space}")


def test_spaces_are_fitted_on_train_only(tmp_path: Path) -> None:
    # Same train data, very different val/test vectors: the fitted spaces must not move.
    from codejepa.embed.store import PendingRecord, StoreWriter, open_store

    b = make_dataset(tmp_path, name="b")

    shifted = tmp_path / "shifted.h5"
    with open_store(b.store_path) as s:
        pend = []
        for i in range(len(s)):
            inp, body = s.inputs(i), s.body(i)
            bs = body.states + (25.0 if s.splits[i] != "train" else 0.0)
            ins = inp.states * (3.0 if s.splits[i] != "train" else 1.0)  # the canonical space reads inputs too
            pend.append(PendingRecord(s.ids[i], str(s.splits[i]), s.repos[i], False, ins, inp.token_ids,
                                      inp.special, inp.segments["context"], inp.segments["signature"], bs, body.token_ids))
        meta = s.meta
    with StoreWriter(shifted, meta) as w:
        w.append(pend)
    kw = dict(baselines="prototype", n_boot=50, plots=False)
    ra = evaluate_retrieval(b.store_path, **kw)
    rb = evaluate_retrieval(shifted, **kw)
    for name in ("centered", "whitened", "canonical"):
        np.testing.assert_array_equal(ra.spaces[name].mean, rb.spaces[name].mean)
    for name in ("whitened", "canonical"):
        np.testing.assert_array_equal(ra.spaces[name].transform, rb.spaces[name].transform)
    # ... while the test targets did change.
    assert ra.row("prototype", "raw").diagnostics["cosine_raw"] != rb.row("prototype", "raw").diagnostics["cosine_raw"]
    # 200 train records for 3 × 24 dimensions: the canonical fit is flagged in the result's warnings.
    fit_warning = ra.spaces["canonical"].settings["warning"]
    assert fit_warning is not None and "200 train records" in fit_warning and fit_warning in ra.warnings


def test_clear_errors(ds, tmp_path: Path) -> None:
    with pytest.raises(CodejepaError, match="no such store"):
        evaluate_retrieval(tmp_path / "missing.h5")
    # A corpus other than the one the store was built from.
    other = tmp_path / "other_corpus"
    shutil.copytree(ds.corpus_dir, other)
    m = json.loads((other / "manifest.json").read_text())
    m["dropped"] = {ds.ids[0]: "held-out duplicate"}
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EvaluateError, match="not the one the store was embedded from"):
        evaluate_retrieval(ds.store_path, corpus_dir=other, baselines="random")
    with pytest.raises(EvaluateError, match="corpus of the store not found"):
        evaluate_retrieval(ds.store_path, corpus_dir=tmp_path / "nowhere", baselines="random")
    with pytest.raises(EvaluateError, match="unknown baseline"):
        evaluate_retrieval(ds.store_path, baselines="ridge,magic")
    with pytest.raises(EvaluateError, match="BM25 query must be"):
        evaluate_retrieval(ds.store_path, bm25_query="body")
    with pytest.raises(EvaluateError, match="unknown space"):
        evaluate_retrieval(ds.store_path, spaces="curved")
    with pytest.raises(EvaluateError, match="unknown pool"):
        evaluate_retrieval(ds.store_path, pool="everything")
    with pytest.raises(EvaluateError, match="shape"):
        evaluate_retrieval(ds.store_path, baselines="none", methods={"bad": lambda s, i: np.zeros((len(i), 3))})
    # an unknown pair is a warning, not an error: the evaluation it follows is kept
    res = evaluate_retrieval(ds.store_path, baselines="random", compare=[("ridge@raw", "random@-")], plots=False,
                             n_boot=10)
    assert any("no result 'ridge@raw'" in w for w in res.warnings) and not res.comparisons
    with pytest.raises(EvaluateError, match="no such run directory"):
        evaluate_retrieval(ds.store_path, runs=[tmp_path / "no-run"])
    with pytest.raises(EvaluateError, match="a file, not a run directory"):
        evaluate_retrieval(ds.store_path, runs=[ds.store_path])  # the store given as a run


def test_reverse_maps_bodies_onto_their_signatures() -> None:
    """Where the signature views are a linear function of the body, the reverse map puts each
    body on its own signature, in the signature side's whitened space (both fitted on train)."""
    rng = np.random.default_rng(0)
    bodies = rng.standard_normal((400, 12)).astype(np.float32) * rng.uniform(0.1, 5, 12).astype(np.float32)
    sigs = (bodies @ rng.standard_normal((12, 8)) + 3.0).astype(np.float32)
    fit = ReverseFit.fit(sigs[:300], bodies[:300])
    q, c = fit.queries(sigs[300:]), fit.candidates(bodies[300:], 1e-4)
    cos = (q * c).sum(1) / (np.linalg.norm(q, axis=1) * np.linalg.norm(c, axis=1))
    assert cos.min() > 0.99
    # whitened on train (with shrinkage): far closer to isotropic than the raw views
    assert np.linalg.cond(np.cov(fit.queries(sigs[:300]).T)) < 0.1 * np.linalg.cond(np.cov(sigs[:300].T))


def test_an_unfinished_store_is_evaluated_with_a_note(ds, tmp_path: Path) -> None:
    import h5py

    store = tmp_path / "unfinished.h5"
    shutil.copy(ds.store_path, store)
    with h5py.File(store, "r+") as f:  # as a killed `embed run` leaves it
        m = json.loads(f.attrs["meta"])
        m["extra"] = {**m.get("extra", {}), "complete": False}
        f.attrs["meta"] = json.dumps(m)
    res = evaluate_retrieval(store, corpus_dir=ds.corpus_dir, baselines="prototype,random", spaces="raw", n_boot=20,
                             plots=False)
    assert any("unfinished store" in n for n in res.notes)
    assert not any("unfinished" in n for n in evaluate_retrieval(ds.store_path, baselines="random", spaces="raw",
                                                                 n_boot=20, plots=False).notes)


def test_records_left_out_by_the_embedder_and_a_capped_pool_are_noted(ds, tmp_path: Path) -> None:
    import h5py

    store = tmp_path / "skipped.h5"
    shutil.copy(ds.store_path, store)
    with h5py.File(store, "r+") as f:  # as `embed run` records records it could not embed
        m = json.loads(f.attrs["meta"])
        m["extra"] = {**m.get("extra", {}), "skipped": {"signature longer than the window": 4}}
        f.attrs["meta"] = json.dumps(m)
    res = evaluate_retrieval(store, corpus_dir=ds.corpus_dir, baselines="random", spaces="raw", n_boot=20,
                             plots=False, pool=100000)
    notes = " ".join(res.notes)
    assert "4 records of the corpus were not embedded (signature longer than the window: 4)" in notes
    assert "--pool 100000 is more than the" in notes


def test_non_finite_states_are_a_damaged_store(ds, tmp_path: Path) -> None:
    import h5py

    store = tmp_path / "nan.h5"
    shutil.copy(ds.store_path, store)
    with h5py.File(store, "r+") as f:  # the writer refuses NaN: only damage puts one there
        f["targets/states"][0] = np.nan
    with pytest.raises(StoreError, match="damaged store: record 0 .* non-finite targets states"):
        evaluate_retrieval(store, corpus_dir=ds.corpus_dir, baselines="random", spaces="raw", n_boot=10, plots=False)


def test_random_pool_rows_pair_each_rank_with_its_repository_and_its_real_pool_size(ds) -> None:
    """Random pools repeat the queries once per seed (seed-major): each rank's repository, the
    bootstrap's unit, must be its own query's. A pool asked larger than the distinct bodies
    holds all of them: its chance level is one over their number, not one over the asked N."""
    test = ds.splits == "test"
    kw = dict(baselines="random", spaces="raw", n_boot=20, plots=False, methods={"inst": _instance(ds, 0.8)})
    res = evaluate_retrieval(ds.store_path, pool=20, pool_seeds=(0, 1, 2), **kw)
    row = res.row("inst", "raw")
    np.testing.assert_array_equal(row.clusters, np.tile(ds.repos[test].astype(str), 3))
    big = evaluate_retrieval(ds.store_path, pool=100000, pool_seeds=(0, 1), **kw)
    n = big.pool_stats["n_distinct_bodies"]
    assert big.pool_stats["mean_pool_size"] == n
    assert big.pool_stats["chance"]["rank@1"] == pytest.approx(1 / n)
    assert big.row("random", "-").ranks.max() <= n


def test_every_setting_is_chosen_on_val_whatever_the_test_predictions(ds) -> None:
    """The fusion weight, CSLS's k and β and the sibling softmax's T and β are hyper-parameters:
    chosen on the selection (val) split, they must not move, nor must any selection score,
    when every test prediction changes. Chosen on the queries, they would be tuned on the answers."""
    rng = np.random.default_rng(5)
    d = ds.bodies.shape[1]
    pred = ds.bodies + 0.6 * rng.standard_normal(ds.bodies.shape).astype(np.float32)
    other = pred.copy()
    test = np.flatnonzero(ds.splits == "test")
    other[test] = ds.bodies[test] + 2.0 * rng.standard_normal((len(test), d)).astype(np.float32)
    kw = dict(baselines="bm25,reverse", spaces="whitened", n_boot=20, plots=False, bm25_query="signature",
              fuse_reverse=True)
    a = evaluate_retrieval(ds.store_path, methods={"m": lambda store, idx: pred[idx]}, **kw)
    b = evaluate_retrieval(ds.store_path, methods={"m": lambda store, idx: other[idx]}, **kw)
    derived = [r.method for r in a.rows if r.method.startswith("m+")]
    assert {"m+bm25", "m+csls", "m+bm25+sib", "m+csls+bm25", "m+rev", "m+csls+rev+bm25+sib"} <= set(derived)
    for name in derived:
        sa, sb = a.row(name, "whitened").settings, b.row(name, "whitened").settings
        assert sa == sb, name
    assert not np.array_equal(a.row("m", "whitened").ranks, b.row("m", "whitened").ranks)


def test_fuse_reverse_scores_each_pair_in_both_directions(ds) -> None:
    """``--fuse-reverse``: a body-predicting scorer fused with the reverse baseline. Its weight
    grid's ends are the two scorers alone (1.0: the forward scorer, 0.0: reverse), so the
    grid pairs the right scorers; the fusion gets BM25 and the sibling softmax like any row,
    ridge gets the same rows as the runs do, and the progress total counts every row."""
    weak = _instance(ds, noise=1.0)
    seen: list[tuple[int, int]] = []
    res = evaluate_retrieval(ds.store_path, baselines="bm25,reverse,ridge,ridge+bm25", spaces="whitened", n_boot=50,
                             plots=False, methods={"m": weak}, fuse_reverse=True,
                             progress=lambda done, total: seen.append((done, total)))
    names = {r.method for r in res.rows}
    for base in ("m", "m+csls", "ridge", "ridge+csls"):
        assert {f"{base}+rev", f"{base}+rev+bm25", f"{base}+rev+bm25+sib"} <= names, base
    assert seen[-1] == (len(res.rows), len(res.rows))
    rev_sel = res.row("reverse", "-").settings["selection_mrr"]
    for base, forward in (("m+csls", res.row("m+csls", "whitened").settings["selection_mrr"]),
                          ("ridge+csls", res.row("ridge+csls", "whitened").settings["selection_mrr"])):
        row = res.row(f"{base}+rev", "whitened")
        grid = row.settings["selection_mrr"]
        assert grid["1.0"] == pytest.approx(max(forward.values()))
        assert grid["0.0"] == pytest.approx(max(rev_sel.values()))
        assert grid[str(row.settings["forward_weight"])] == max(grid.values())
        assert row.kind == ("run" if base.startswith("m") else "baseline")
    # A weak forward scorer gains from the other direction here (the fixture's signatures are
    # a function of the bodies, so reverse is strong): the chosen weight is not an end.
    fused, alone = res.row("m+csls+rev", "whitened"), res.row("m+csls", "whitened")
    assert 0.0 < fused.settings["forward_weight"] < 1.0
    assert fused.metrics["mrr"].value > alone.metrics["mrr"].value
    hybrid = res.row("m+csls+rev+bm25", "whitened").settings
    assert hybrid["forward_weight"] == fused.settings["forward_weight"] and "dense_weight" in hybrid
    plain = evaluate_retrieval(ds.store_path, baselines="bm25,reverse", spaces="whitened", n_boot=20, plots=False,
                               methods={"m": weak})
    assert not any("+rev" in r.method for r in plain.rows)  # opt-in
    with pytest.raises(EvaluateError, match="add reverse to --baselines"):
        evaluate_retrieval(ds.store_path, baselines="bm25", plots=False, methods={"m": weak}, fuse_reverse=True)
    for kw in (dict(baselines="reverse"), dict(baselines="bm25,reverse", fuse_bm25=False)):  # nothing to add +rev to
        with pytest.raises(EvaluateError, match="rows fused with BM25"):
            evaluate_retrieval(ds.store_path, plots=False, methods={"m": weak}, fuse_reverse=True, **kw)


def test_ridge_is_fitted_on_train_alone(ds) -> None:
    """Ridge's map is a train-split statistic: val records choose its λ and must stay out of the
    fit (the choice would be in-sample), test records all the more."""
    res = evaluate_retrieval(ds.store_path, baselines="ridge", spaces="raw", n_boot=20, plots=False,
                             hubness_correction=False)
    row = res.row("ridge", "raw")
    train, test = ds.splits == "train", ds.splits == "test"
    want = RidgeFit.fit(ds.signatures[train], ds.bodies[train]).predict(ds.signatures[test], row.settings["alpha"])
    np.testing.assert_allclose(res.projections["raw"]["ridge"], want, rtol=1e-3, atol=1e-3)
    assert row.settings["n_fit"] == train.sum()


def test_without_val_settings_are_chosen_on_held_out_train_repositories(tmp_path: Path) -> None:
    """With no val split the last fifth of the train repositories choose the settings; they must
    then be left out of every fit, or the choice is made on records the baselines were fitted on."""
    nv = make_dataset(tmp_path, repos={"train": 5, "test": 2}, per_repo=12, name="noval")
    res = evaluate_retrieval(nv.store_path, baselines="ridge", spaces="raw", n_boot=20, plots=False,
                             hubness_correction=False)
    assert res.settings["selection"] == {"fit_records": 48, "selection_records": 12}
    assert any("no val split: hyper-parameters chosen on 1 held-out train repo(s)" in n for n in res.notes)
    fit = np.isin(nv.repos, [f"train_repo{i}" for i in range(4)])  # train_repo4 (last in sorted order) held out
    want = RidgeFit.fit(nv.signatures[fit], nv.bodies[fit]).predict(nv.signatures[nv.splits == "test"],
                                                                  res.row("ridge", "raw").settings["alpha"])
    np.testing.assert_allclose(res.projections["raw"]["ridge"], want, rtol=1e-3, atol=1e-3)


def test_nn_answers_with_the_train_body_of_the_nearest_train_signature(ds) -> None:
    """The nearest-neighbour baseline copies a *train* body: that of the train signature most
    like the query's. Any other body (a test one above all) makes it a leak or a random guess."""
    from codejepa.embed.store import open_store
    from codejepa.evaluate.retrieval import load_corpus_view
    from codejepa.evaluate.search import brute_force_ranks
    from codejepa.evaluate.spaces import fit_space

    res = evaluate_retrieval(ds.store_path, baselines="nn", spaces="raw,whitened", n_boot=20, plots=False,
                             hubness_correction=False)
    train, test = ds.splits == "train", ds.splits == "test"
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    with open_store(ds.store_path) as st:
        labels = load_corpus_view(st).labels[test].astype(str)
    # in each space, signatures are searched in that space's map fitted on the TRAIN signatures
    for space, sig_space in (("raw", None), ("whitened", fit_space("whitened", ds.signatures[train], shrinkage=0.1))):
        q, keys = ds.signatures[test], ds.signatures[train]
        if sig_space is not None:
            q, keys = sig_space.apply(q), sig_space.apply(keys)
        nearest = (unit(q.astype(np.float64)) @ unit(keys.astype(np.float64)).T).argmax(1)
        body_space = res.spaces[space]
        want = brute_force_ranks(body_space.apply(ds.bodies[train][nearest]).astype(np.float64),
                                 body_space.apply(ds.bodies[test]).astype(np.float64), labels, labels)
        np.testing.assert_array_equal(res.row("nn", space).ranks, want, err_msg=space)


def test_settings_that_tie_on_val_fall_to_the_smaller_correction(ds) -> None:
    """Exact predictions rank every val query first whatever the correction: with nothing to
    gain on val, CSLS and the sibling softmax must stay off (β = 0, β = 0 being a candidate) and
    the fusion weight at its tie-break 0.5; a correction chosen without a gain is one tuned on noise."""
    res = evaluate_retrieval(ds.store_path, baselines="bm25", spaces="whitened", n_boot=20, plots=False,
                             bm25_query="signature", methods={"exact": lambda store, idx: ds.bodies[idx]})
    csls = res.row("exact+csls", "whitened")
    assert set(csls.settings["selection_mrr"].values()) == {1.0}  # a tie on val ...
    assert csls.settings["beta"] == 0.0 and np.array_equal(csls.ranks, res.row("exact", "whitened").ranks)
    assert res.row("exact+bm25", "whitened").settings["dense_weight"] == 0.5
    for name in ("exact+bm25+sib", "exact+csls+bm25+sib"):
        sib = res.row(name, "whitened")
        assert max(sib.settings["selection_mrr"].values()) == sib.settings["selection_mrr"]["T=0.125,beta=0.0"] == 1.0
        assert sib.settings["beta"] == 0.0, name


def test_the_table_shows_each_figure_under_its_own_heading() -> None:
    """The table is what a reader copies: each figure must sit under its own heading (R@5 not under
    R@10, MRR on its 0-1 scale, the top-10 winners' share under hub top10), a narrow terminal leaves
    out the least important columns first and says which, and a comparison's verdict reads a rank
    difference the right way round (a lower median rank is better)."""
    from codejepa.evaluate.report import RETRIEVAL_OPTIONAL, comparison_lines, diagnostics_table, fit_width, metrics_table

    def ci(v: float, lo: float, hi: float) -> dict[str, float]:
        return {"value": v, "ci_low": lo, "ci_high": hi}

    def cells(table) -> dict[str, list[str]]:  # noqa: ANN001
        return {c.header: list(c._cells) for c in table.columns}

    chance = {"rank@1": 0.025, "recall@5": 0.125, "recall@10": 0.25, "recall@100": 1.0, "mrr": 0.107,
              "median_rank": 20.5, "mean_rank": 20.5}
    data = {"settings": {"split": "test"},
            "pool": {"n_queries": 40, "n_query_repos": 4, "label": "split", "mean_pool_size": 40.0, "chance": chance},
            "rows": [{"method": "ridge", "space": "whitened", "kind": "baseline", "warning": None,
                      "metrics": {"rank@1": ci(0.3, 0.2, 0.4), "recall@5": ci(0.5, 0.4, 0.6),
                                  "recall@10": ci(0.6, 0.5, 0.7), "recall@100": ci(0.9, 0.8, 1.0),
                                  "mrr": ci(0.4, 0.3, 0.5), "median_rank": ci(3, 2, 4), "mean_rank": ci(7.3, 6, 8)},
                      "diagnostics": {"cosine_raw": 0.8, "cosine_space": 0.5, "std_ratio_mean": 0.9},
                      "hubness": {"top1_winner_share": 0.05, "top10_winners_share": 0.3,
                                  "top10_share_if_uniform": 0.25}}]}
    m = cells(metrics_table(data))
    heads = ("method", "rank@1", "R@5", "R@10", "R@100", "MRR", "med rank", "mean rank", "cos raw", "cos space")
    assert [m[h][1] for h in heads] == ["ridge", "30.0 [20.0, 40.0]", "50.0", "60.0", "90.0", "0.400 [0.300, 0.500]",
                                        "3", "7.3", "0.800", "0.500"]
    assert [m[h][0] for h in ("method", "R@5", "R@10", "MRR")] == ["chance", "12.5", "25.0", "0.107"]
    d = cells(diagnostics_table(data))
    assert (d["std ratio"], d["hub top1"], d["hub top10"]) == (["0.900"], ["0.050"], ["0.300"])
    narrow = fit_width(lambda drop: metrics_table(data, drop), RETRIEVAL_OPTIONAL, Console(file=io.StringIO(), width=110))
    shown = [c.header for c in narrow.columns]
    gone = [h for h in RETRIEVAL_OPTIONAL if h not in shown]
    assert "rank@1" in shown and "MRR" in shown and 0 < len(gone) < len(RETRIEVAL_OPTIONAL)
    assert gone == list(RETRIEVAL_OPTIONAL[: len(gone)]) and ", ".join(gone) in narrow.caption

    def res(metric: str, diff: float, p: float) -> dict[str, float | str]:
        return {"metric": metric, "a": 1.0, "b": 1.0 - diff, "diff": diff, "ci_low": diff, "ci_high": diff, "p_value": p}

    lines = comparison_lines({"comparisons": [{"a": "A@x", "b": "B@x", "results": [
        res("mrr", 0.1, 0.01), res("median_rank", -2.0, 0.01), res("mean_rank", 3.0, 0.01), res("rank@1", 0.1, 0.2)]}]})
    assert [ln.rsplit("(", 1)[1] for ln in lines] == ["A better)", "A better)", "B better)", "no significant difference)"]
