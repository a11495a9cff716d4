"""``evaluate retrieval --probe``: NAME+probe rows mix a store's probe view into each method."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _evaluate_fixtures import make_dataset, write_view  # noqa: E402

import codejepa.evaluate.probe as probe_mod  # noqa: E402
from codejepa.evaluate.errors import EvaluateError  # noqa: E402
from codejepa.evaluate.probe import mix_probe  # noqa: E402
from codejepa.evaluate.retrieval import evaluate_retrieval  # noqa: E402
from codejepa.evaluate.spaces import fit_space  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory):
    return make_dataset(tmp_path_factory.mktemp("probe"), duplicate_test_bodies=0, text_ids=False)


def _class_prototype(ds):
    train = ds.splits == "train"
    protos = np.stack([ds.bodies[train & (ds.classes == c)].mean(0) for c in range(ds.classes.max() + 1)])
    return lambda store, idx: protos[ds.classes[idx]]


def test_mix_is_a_rotation_towards_the_probe_in_the_whitened_space() -> None:
    rng = np.random.default_rng(0)
    bodies = rng.standard_normal((200, 6)).astype(np.float32) * np.arange(1, 7) + 5
    white = fit_space("whitened", bodies)
    q, p = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((4, 6)).astype(np.float32)
    np.testing.assert_array_equal(mix_probe(q, p, 0.0, white), q)
    qw, pw, mw = white.apply(q), white.apply(p), white.apply(mix_probe(q, p, 1.0, white))
    np.testing.assert_allclose(np.linalg.norm(mw, axis=1), np.linalg.norm(qw, axis=1), rtol=1e-4)  # |q| kept
    cos = (mw * pw).sum(1) / np.linalg.norm(mw, axis=1) / np.linalg.norm(pw, axis=1)
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)  # weight 1: the probe's direction
    half = white.apply(mix_probe(q, p, 0.5, white))
    u = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(u(half), u(u(qw) + u(pw)), atol=1e-5)
    # weights that tie on val: the smaller one, so the probe is used only where it helps
    mix = probe_mod.ProbeMix(base=lambda store, idx: q[idx], probes=p, whitened=white)
    mix.choose(lambda w: 0.5)
    assert mix.weight == 0.0 and len(mix.selection_mrr) == len(probe_mod.PROBE_WEIGHTS)
    mix.choose(lambda w: 1.0 - abs(w - 0.3))  # otherwise the best one
    assert mix.weight == 0.3 and mix(None, np.arange(4)).tolist() == mix.mixed(None, np.arange(4), 0.3).tolist()
    # a val score that keeps rising is followed to the probe view alone (session 39's optimum lay
    # at 0.6, the old grid's edge)
    mix.choose(lambda w: w)
    assert mix.weight == 1.0 and mix.selection_mrr["1.0"] == 1.0


def test_probe_rows_find_what_the_probe_knows_with_every_correction(ds, tmp_path: Path) -> None:
    # A probe view that knows each record's instance (its body, noisy): mixed into the seed's
    # category prototype it must find bodies the prototype alone cannot.
    rng = np.random.default_rng(3)
    view = ds.bodies + 0.6 * rng.standard_normal(ds.bodies.shape).astype(np.float32)
    path = write_view(ds.store_path, tmp_path / "v.probe.h5", view)
    res = evaluate_retrieval(ds.store_path, spaces="whitened,canonical", baselines="ridge+last,bm25", n_boot=100,
                             plots=False, methods={"classproto": _class_prototype(ds)}, probe=path)
    methods = {r.method for r in res.rows}
    for m in ("classproto+probe", "ridge+last+probe", "classproto+probe+csls", "classproto+probe+bm25",
              "classproto+probe+csls+bm25+sib", "ridge+last+probe+csls+bm25+sib"):
        assert m in methods, m
    base, mixed = res.row("classproto", "whitened"), res.row("classproto+probe", "whitened")
    assert mixed.metrics["rank@1"].value > base.metrics["rank@1"].value + 0.2
    assert mixed.kind == "run" and res.row("ridge+last+probe", "whitened").kind == "baseline"
    assert res.row("ridge+last+probe+csls+bm25+sib", "canonical").kind == "baseline"
    w = res.settings["probe"]["weights"]
    assert set(w) == {"classproto+probe", "ridge+last+probe"} and w["classproto+probe"] > 0
    sel = res.settings["probe"]["selection_mrr"]["classproto+probe"]
    assert sel[str(w["classproto+probe"])] == max(sel.values())  # the weight is val's best
    assert mixed.settings["probe_weight"] == w["classproto+probe"] and mixed.settings["base"] == "classproto"
    # Runs are compared with the best baseline, the probe-mixed ridge+last among them.
    assert any(c["b"].startswith("ridge+last+probe") for c in res.comparisons if c["a"] == "classproto+probe@canonical")
    # The view alone is a baseline with every correction; a mix at weight 1 is the view alone.
    for m in ("probe", "probe+csls", "probe+csls+bm25+sib"):
        assert res.row(m, "canonical").kind == "baseline", m
    alone = evaluate_retrieval(ds.store_path, spaces="whitened,canonical", baselines="ridge+last,bm25", n_boot=20,
                               plots=False, methods={"classproto": _class_prototype(ds)}, probe=path,
                               probe_weights="1")
    for m in ("", "+csls", "+csls+bm25+sib"):
        for space in ("whitened", "canonical"):
            np.testing.assert_array_equal(alone.row(f"probe{m}", space).ranks,
                                          alone.row(f"classproto+probe{m}", space).ranks)
    # a method whose name a probe row would take is refused in one line, before any work
    for taken in ("probe", "classproto+probe"):
        with pytest.raises(EvaluateError, match=f"method name '{re.escape(taken)}' is taken"):
            evaluate_retrieval(ds.store_path, baselines="ridge+last", plots=False, probe=path,
                               methods={"classproto": _class_prototype(ds), taken: _class_prototype(ds)})


def test_chain_select_scores_each_weight_by_the_most_corrected_row(ds, tmp_path: Path) -> None:
    """``--probe-select chain``: each weight's val score is the val MRR the most corrected row
    (canonical + CSLS + BM25 + sib) reaches with it, so at the chosen weight it is that row's own
    best val setting; and the choice is still val's best."""
    rng = np.random.default_rng(3)
    view = ds.bodies + 0.6 * rng.standard_normal(ds.bodies.shape).astype(np.float32)
    path = write_view(ds.store_path, tmp_path / "v.probe.h5", view)
    kw = dict(spaces="whitened,canonical", baselines="ridge+last,bm25", n_boot=50, plots=False,
              methods={"classproto": _class_prototype(ds)}, probe=path)
    res = evaluate_retrieval(ds.store_path, **kw)  # chain: the default
    info = res.settings["probe"]
    assert info["select"] == "chain (canonical space)"
    for name in ("classproto+probe", "ridge+last+probe"):
        w, sel = info["weights"][name], info["selection_mrr"][name]
        assert sel[str(w)] == max(sel.values())
        final = res.row(f"{name}+csls+bm25+sib", "canonical")
        assert sel[str(w)] == pytest.approx(max(final.settings["selection_mrr"].values()), abs=1e-12)
        # every weight's stage settings are kept, and at the chosen weight they are the rows' own
        chain = info["selection_chain"][name]
        assert set(chain) == set(sel) and all(chain[k]["sib"]["mrr"] == sel[k] for k in sel)
        stages = chain[str(w)]
        assert list(stages) == ["plain", "csls", "bm25", "sib"]
        csls = res.row(f"{name}+csls", "canonical").settings
        assert (stages["csls"]["k"], stages["csls"]["beta"]) == (csls["k"], csls["beta"])
        assert stages["bm25"]["dense_weight"] == final.settings["dense_weight"]
        assert (stages["sib"]["temperature"], stages["sib"]["beta"]) == (final.settings["temperature"],
                                                                         final.settings["beta"])
    plain = evaluate_retrieval(ds.store_path, probe_select="plain", **kw)
    assert plain.settings["probe"]["select"] == "plain"
    assert plain.settings["probe"]["selection_mrr"] != info["selection_mrr"]  # another criterion
    assert "selection_chain" not in plain.settings["probe"]
    # with the +sib row's own fusion weight (--sib-fusion joint) the chain scores that row too
    joint = evaluate_retrieval(ds.store_path, sib_fusion="joint", probe_weights="0,0.5", **kw)
    for name in ("classproto+probe", "ridge+last+probe"):
        w = joint.settings["probe"]["weights"][name]
        sib = joint.settings["probe"]["selection_chain"][name][str(w)]["sib"]
        final = joint.row(f"{name}+csls+bm25+sib", "canonical").settings
        assert (sib["dense_weight"], sib["temperature"], sib["beta"]) == (final["dense_weight"], final["temperature"],
                                                                          final["beta"])
        assert sib["mrr"] == pytest.approx(max(final["selection_mrr"].values()), abs=1e-12)
    with pytest.raises(EvaluateError, match="--probe-select must be one of plain, chain"):
        evaluate_retrieval(ds.store_path, probe_select="final", **kw)
    # the grid val chooses from is the user's to set (a past grid, or a finer one), and is recorded
    coarse = evaluate_retrieval(ds.store_path, probe_select="plain", probe_weights="0.5, 0, 0.5", **kw)
    assert coarse.settings["probe"]["grid"] == [0.0, 0.5]
    assert all(set(v) == {"0.0", "0.5"} for v in coarse.settings["probe"]["selection_mrr"].values())
    for name, sel in coarse.settings["probe"]["selection_mrr"].items():
        assert sel == {w: plain.settings["probe"]["selection_mrr"][name][w] for w in sel}  # the same scores
    for bad in ("", "0,x", "0,1.5", "-0.1", "nan"):
        with pytest.raises(EvaluateError, match="--probe-weights takes"):
            evaluate_retrieval(ds.store_path, probe_weights=bad, **kw)


def test_weight_zero_reproduces_the_method_exactly(ds, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    path = write_view(ds.store_path, tmp_path / "v.probe.h5", rng.standard_normal(ds.bodies.shape).astype(np.float32))
    res = evaluate_retrieval(ds.store_path, spaces="whitened,canonical", baselines="ridge+last,bm25", n_boot=50,
                             plots=False, methods={"classproto": _class_prototype(ds)}, probe=path,
                             probe_weights=(0.0,))
    assert res.settings["probe"]["grid"] == [0.0] and set(res.settings["probe"]["weights"].values()) == {0.0}
    for base, suffixes, spaces in (
        ("classproto", ("", "+csls", "+csls+bm25+sib"), ("whitened", "canonical")),
        # ridge+last+probe is one method with the whitened space's λ, where the mix is made
        # (the baseline re-chooses λ per space) and the plain baseline has no BM25 hybrid.
        ("ridge+last", ("", "+csls"), ("whitened",)),
    ):
        for suffix in suffixes:
            for space in spaces:
                a, b = res.row(f"{base}{suffix}", space), res.row(f"{base}+probe{suffix}", space)
                np.testing.assert_array_equal(a.ranks, b.ranks)


def test_probe_view_errors_are_one_clear_line(ds, tmp_path: Path) -> None:
    view = np.zeros_like(ds.bodies)
    partial = write_view(ds.store_path, tmp_path / "part.probe.h5", view, upto=10)
    with pytest.raises(EvaluateError, match=r"covers 10 of \d+ records"):
        evaluate_retrieval(ds.store_path, baselines="ridge+last", plots=False, probe=partial)
    with pytest.raises(EvaluateError, match="no probe view"):
        evaluate_retrieval(ds.store_path, baselines="ridge+last", plots=False, probe=tmp_path / "none.h5")
    whole = write_view(ds.store_path, tmp_path / "whole.probe.h5", view)
    with pytest.raises(EvaluateError, match="none is being evaluated"):
        evaluate_retrieval(ds.store_path, baselines="bm25", plots=False, probe=whole)
    # Under another split (a fold), a probe that is now a query would read its own body: refused.
    from codejepa.corpus.folds import SplitAssignment, _key, write_fold

    probe_at = int(np.flatnonzero(ds.splits == "train")[0])  # a train record's body as the probe ...
    role = {ds.repos[probe_at]: "test", "val_repo0": "val"}  # ... in a fold that tests its repository
    splits = {str(r): role.get(repo, "train") for r, repo in zip(ds.ids, ds.repos)}
    fp = ds.meta.corpus_manifest_hash
    fold = write_fold(SplitAssignment(splits, {}, 0, 3, 0, fp, _key(fp, splits)), tmp_path / "folds")
    leaky = write_view(ds.store_path, tmp_path / "leaky.probe.h5", view, probe_record=probe_at)
    evaluate_retrieval(ds.store_path, baselines="ridge+last", plots=False, probe=leaky, n_boot=20)  # own split: fine
    with pytest.raises(EvaluateError, match="not in this split's train part"):
        evaluate_retrieval(ds.store_path, baselines="ridge+last", plots=False, probe=leaky, splits=fold)
    # Evaluating train itself: the probe records are queries there, each reading its own body.
    with pytest.raises(EvaluateError, match="queries of the evaluated train split"):
        evaluate_retrieval(ds.store_path, split="train", baselines="ridge+last", plots=False, probe=leaky)
    other = make_dataset(tmp_path / "other", seed=1, name="other")
    with pytest.raises(EvaluateError, match="another store|not the first"):
        evaluate_retrieval(other.store_path, baselines="ridge+last", plots=False, probe=whole)


def test_cli_adds_probe_rows_and_reports_a_bad_view_in_one_line(ds, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from codejepa.cli import app

    runner = CliRunner()
    rng = np.random.default_rng(5)
    path = write_view(ds.store_path, tmp_path / "v.probe.h5",
                      ds.bodies + 0.6 * rng.standard_normal(ds.bodies.shape).astype(np.float32))
    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", "retrieval", str(ds.store_path), "--baselines", "ridge+last", "--space", "whitened",
                            "--no-hubness", "--probe", str(path), "--out", str(out), "--n-boot", "50", "--no-plots"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "retrieval.json").read_text())
    assert {row["method"] for row in data["rows"]} == {"ridge+last", "ridge+last+probe", "probe"}
    assert data["settings"]["probe"]["path"] == str(path) and "ridge+last+probe" in r.output
    bad = tmp_path / "bad.probe.h5"
    bad.write_text("no")
    r = runner.invoke(app, ["evaluate", "retrieval", str(ds.store_path), "--baselines", "ridge+last", "--probe", str(bad)])
    assert r.exit_code == 1 and "not a readable probe view" in r.output and "Traceback" not in r.output
