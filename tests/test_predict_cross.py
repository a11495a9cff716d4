"""The cross-scorer (`codejepa predict cross`): what it reads, that it learns what a pooled
first stage cannot see, that a killed run resumes to the same weights, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _cross_fixtures import cross_ddp_worker, make_token_store
from _evaluate_fixtures import make_dataset, write_view
from _predict_fixtures import free_ports
from codejepa.cli import app
from codejepa.embed.store import open_store
from codejepa.predict.cross import CrossConfig, CrossError, load_cross, read_windows, train_cross

FAST = dict(hard_pool=16, negatives=7, width=32, heads=2, depth=1, batch_size=16, dropout=0.0, query_tokens=3,
            body_tokens=3, lr=3e-3, threads=1)


@pytest.fixture(scope="module")
def token_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_token_store(tmp_path_factory.mktemp("tokens"), per_repo=100, n_classes=60)


@pytest.fixture(scope="module")
def trained(token_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cross") / "run"
    # Two blocks: matching a key across the two sides takes one attention to gather it and
    # one to compare. One block escaped chance within 20 epochs for some seeds and CPUs only
    # (val MRR 0.19 → 0.22 for seed 0 on an AVX-512 machine); two reach 0.68–0.96 for seeds 0–3.
    return out, train_cross(token_store, out, CrossConfig(**{**FAST, "depth": 2}, epochs=20))


def test_windows_hold_the_signature_of_the_inputs_pass_and_the_body_never_on_the_query_side(token_store: Path) -> None:
    st = open_store(token_store)
    recs = np.array([0, 5, 17, len(st) - 1])
    win = read_windows(st, recs, 2, 3)
    for r in recs:
        inp, body = st.inputs(int(r)), st.body(int(r))
        s0, s1 = inp.segments["signature"]
        sig = inp.states[s0:s1][~inp.special[s0:s1]]
        np.testing.assert_allclose(win.q[win.rows[r]], sig[:2], atol=1e-2)  # float16 windows
        np.testing.assert_allclose(win.b[win.rows[r]], body.states[~body.special][:3], atol=1e-2)
        assert win.q_len[win.rows[r]] == 2 and win.b_len[win.rows[r]] == 3
    # A record not read is refused rather than scored with zeros.
    with pytest.raises(CrossError, match="not read"):
        win.take(np.array([1]))


def test_the_cross_scorer_learns_the_instance_a_pooled_first_stage_cannot_see(token_store: Path,
                                                                             trained: tuple[Path, dict]) -> None:
    """In the token store ridge sees only the class; the key that tells instances apart is in
    the first tokens alone. Trained on train, the scorer must beat the ridge on val's hard
    candidates, and its re-ranking must lift ridge+last+csls on the test split."""
    from codejepa.evaluate import evaluate_retrieval

    out, rec = trained
    hist = rec["history"]
    assert rec["best_val_mrr"] == max(h["val_mrr"] for h in hist) > hist[0]["val_mrr"] + 0.03
    assert json.loads((out / "run.json").read_text())["best_val_mrr"] == rec["best_val_mrr"]
    assert [json.loads(ln)["epoch"] for ln in (out / "log.jsonl").read_text().splitlines()] == list(range(1, 21))
    res = evaluate_retrieval(token_store, [], baselines="ridge+last", spaces="whitened", n_boot=200,
                             rerank=out, rerank_k=16, rerank_rows="ridge+last+csls")
    first, again = res.row("ridge+last+csls", "whitened"), res.row("ridge+last+csls+rerank", "whitened")
    assert again.settings["rerank_weight"] > 0 and again.settings["rerank_k"] == 16
    assert again.metrics["rank@1"].value > first.metrics["rank@1"].value + 0.05
    assert again.metrics["mrr"].value > first.metrics["mrr"].value
    # Only the rows asked for are re-ranked.
    assert [r.method for r in res.rows if r.method.endswith("+rerank")] == ["ridge+last+csls+rerank"]
    assert res.settings["rerank"]["name"] == "run" and res.settings["rerank"]["k"] == 16
    # each pair once: at most the val and test queries × K
    assert 0 < res.settings["rerank"]["pairs_scored"] <= 16 * (300 + 300)
    # Per-repository pools are not re-ranked (their top K is another pool's): said, not hidden.
    res = evaluate_retrieval(token_store, [], baselines="ridge+last", spaces="whitened", n_boot=50, pool="repo",
                             rerank=out)
    assert not [r for r in res.rows if r.method.endswith("+rerank")]
    assert any("no row re-ranked" in n for n in res.notes)


def test_chain_select_scores_the_probe_weight_after_the_re_ranking(token_store: Path, trained: tuple[Path, dict],
                                                                    tmp_path: Path) -> None:
    """``--probe-select chain`` with ``--rerank``: a weight's val score is what the re-ranked
    row reaches on val with it (the re-ranking's own best val weight)."""
    from codejepa.evaluate import evaluate_retrieval

    st = open_store(token_store)
    rng = np.random.default_rng(0)
    bodies = np.stack([st.body(i).states[~st.body(i).special].mean(0) for i in range(len(st))]).astype(np.float32)
    view = bodies + rng.standard_normal(bodies.shape).astype(np.float32) * bodies.std()
    probe = write_view(token_store, tmp_path / "v.probe.h5", view, probe_record=int(st.indices("train")[0]))
    res = evaluate_retrieval(token_store, [], baselines="ridge+last", spaces="whitened", n_boot=50, plots=False,
                             probe=probe, probe_select="chain", rerank=trained[0], rerank_k=16,
                             rerank_rows="ridge+last+probe+csls")
    info = res.settings["probe"]
    w, sel = info["weights"]["ridge+last+probe"], info["selection_mrr"]["ridge+last+probe"]
    assert info["select"] == "chain (whitened space)" and sel[str(w)] == max(sel.values())
    again = res.row("ridge+last+probe+csls+rerank", "whitened")
    assert sel[str(w)] == pytest.approx(max(again.settings["selection_mrr"].values()), abs=1e-12)
    stages = info["selection_chain"]["ridge+last+probe"][str(w)]
    assert list(stages) == ["plain", "csls", "rerank"] and stages["rerank"]["weight"] == again.settings["rerank_weight"]


def test_duplicate_bodies_are_the_evaluate_stages(tmp_path: Path) -> None:
    """A body shared by two records is one label, as evaluate counts it (never a negative of
    its own query)."""
    from codejepa.evaluate.retrieval import load_corpus_view
    from codejepa.predict.cross import body_labels

    ds = make_dataset(tmp_path, repos={"train": 4, "val": 2, "test": 2}, per_repo=10, duplicate_test_bodies=2)
    st = open_store(ds.store_path)
    labels, warning = body_labels(st)
    assert warning is None
    assert list(labels) == list(load_corpus_view(st).labels)
    assert len(set(labels)) == len(st) - 2


def _small(tmp: Path) -> Path:
    return make_dataset(tmp, repos={"train": 6, "val": 2, "test": 2}, per_repo=20).store_path


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    store = _small(tmp_path)
    cfg = CrossConfig(**{**FAST, "hard_pool": 6, "negatives": 3, "batch_size": 8, "dropout": 0.1},
                      epochs=3, checkpoint_every_steps=4)
    whole = tmp_path / "whole"
    train_cross(store, whole, cfg)

    def kill(e: dict) -> None:
        if e["event"] == "step" and e["epoch"] == 2 and e["step"] == 6:  # past the checkpoint at step 4
            raise Killed

    part = tmp_path / "part"
    with pytest.raises(Killed):
        train_cross(store, part, cfg, on_event=kill)
    assert [json.loads(ln)["epoch"] for ln in (part / "log.jsonl").read_text().splitlines()] == [1]
    first = json.loads((part / "run.json").read_text())
    (part / "run.json").write_text(json.dumps({**first, "created": "2000-01-01T00:00:00+00:00"}))
    rec = train_cross(store, part, resume=True)
    assert json.loads((part / "run.json").read_text())["created"] == "2000-01-01T00:00:00+00:00"  # the first start
    a = torch.load(whole / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [h["epoch"] for h in rec["history"]] == [1, 2, 3]
    # the cut epoch's loss averages the same steps as the uninterrupted run's, not only those after the resume
    assert rec["history"] == json.loads((whole / "run.json").read_text())["history"]
    assert "resumed_with_changes" not in json.loads((part / "run.json").read_text())
    assert [json.loads(ln)["epoch"] for ln in (part / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert load_cross(part).val_mrr == load_cross(whole).val_mrr


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    store = _small(tmp_path)
    runner = CliRunner()
    small = ["--set", "hard_pool=6", "--set", "negatives=3", "--set", "width=16", "--set", "heads=2",
             "--set", "batch_size=8", "--set", "epochs=1", "--set", "threads=1"]
    out = tmp_path / "run"

    def fails(args: list[str], *want: str) -> None:
        r = runner.invoke(app, args)
        assert r.exit_code == 1, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and all(w in lines[0] for w in want), r.output

    fails(["predict", "cross", str(store), "--out", str(out), "--set", "wdth=8"], "wdth=8", "width")
    fails(["predict", "cross", str(store), "--out", str(out), "--set", "width=x"], "takes a int")
    fails(["predict", "cross", str(store), "--out", str(out), "--set", "negatives=40"], "negatives ≤ hard_pool")
    fails(["predict", "cross", str(store), "--out", str(out), "--resume"], "nothing to resume")
    fails(["predict", "cross", str(tmp_path / "none.h5"), "--out", str(out)], "none.h5")
    r = runner.invoke(app, ["predict", "cross", str(store), "--out", str(out), *small])
    assert r.exit_code == 0, r.output
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    fails(["predict", "cross", str(store), "--out", str(out), *small], "--resume")
    # the predictor's trainer, on a cross-scorer run or its config: not "unknown config key 'kind'"
    fails(["predict", "train", str(store), "--out", str(out), "--resume"], "a cross-scorer run's config")
    fails(["predict", "train", str(store), "--model", "mlp", "--config", str(out / "config.json"),
           "--out", str(tmp_path / "p")], "a cross-scorer run's config")
    fails(["predict", "cross", str(store), "--out", str(out), "--resume", "--set", "width=8"], "width may not change")
    # A lost best.pt whose epoch is last.pt's own is rewritten from it; the run does not end
    # "done" without one (an earlier best epoch's loss: test_a_lost_best_epoch_is_refused_...).
    (out / "best.pt").unlink()
    r = runner.invoke(app, ["predict", "cross", str(store), "--out", str(out), "--resume", "--set", "epochs=2"])
    assert r.exit_code == 0 and "best.pt is missing; rewritten from last.pt, whose epoch (1)" in r.output, r.output
    assert load_cross(out).epoch in (1, 2)
    # more epochs move the schedule: config.json alone no longer retrains these weights, and run.json says so
    assert json.loads((out / "run.json").read_text())["resumed_with_changes"] == [
        {"epoch": 1, "step": 0, "changes": {"epochs": [1, 2]}}]
    for bad in ("seed=-1", "seed=99999999999999999999999", "lr=inf"):  # torch.manual_seed's traceback, a nan loss
        fails(["predict", "cross", str(store), "--out", str(tmp_path / "new"), *small, "--set", bad], bad.split("=")[0])
    (out / "last.pt").write_bytes(b"not a checkpoint")
    fails(["predict", "cross", str(store), "--out", str(out), "--resume"], "last.pt", "not a loadable")
    # evaluate: a run of another store, a folder that is no cross-scorer, a predictor run
    other = make_dataset(tmp_path / "o", repos={"train": 6, "val": 2, "test": 2}, per_repo=20, seed=3,
                         name="other").store_path
    fails(["evaluate", "retrieval", str(other), "--baselines", "bm25", "--rerank", str(out)], "other settings")
    fails(["evaluate", "retrieval", str(store), "--baselines", "bm25", "--rerank", str(tmp_path)], "not a cross-scorer run")
    fails(["evaluate", "retrieval", str(store), "--baselines", "bm25", "--rerank", str(out), "--rerank-k", "0"], "--rerank-k")


def test_a_lost_best_epoch_is_refused_and_a_damaged_store_named(tmp_path: Path) -> None:
    import shutil

    import h5py

    from codejepa.embed.store import StoreError
    from codejepa.predict.cross import _restore_best

    ck = {"history": [{"val_mrr": 0.5}, {"val_mrr": 0.4}], "best_val_mrr": 0.5, "epoch": 2, "step": 0}
    with pytest.raises(CrossError, match=r"best.pt is missing; last.pt \(epoch 2\) is intact, but the best epoch's \(1\)"):
        _restore_best(tmp_path / "best.pt", ck)
    assert not (tmp_path / "best.pt").exists()
    # Non-finite states (the writer refuses them: damage) stop the run before it trains on them.
    store = tmp_path / "nan.h5"
    shutil.copy(_small(tmp_path / "d"), store)
    with h5py.File(store, "r+") as f:
        f["targets/states"][3] = np.inf
    with pytest.raises(StoreError, match=r"damaged store: record \d+ \(\w+\) has non-finite targets states"):
        train_cross(store, tmp_path / "x", CrossConfig(**{**FAST, "hard_pool": 6, "negatives": 3, "batch_size": 8}))


@pytest.mark.timeout(240)
def test_two_gloo_ranks_train_the_weights_of_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.multiprocessing as mp

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    store = _small(tmp_path)
    cfg = CrossConfig(**{**FAST, "hard_pool": 6, "negatives": 3, "batch_size": 8}, epochs=2, checkpoint_every_steps=4)
    ports = free_ports(4)
    odd = CrossConfig(**{**FAST, "hard_pool": 6, "negatives": 3, "batch_size": 7}, epochs=1)
    wide = CrossConfig(**{**FAST, "hard_pool": 500, "negatives": 3, "batch_size": 8}, epochs=1)
    jobs = [(str(store), cfg, str(tmp_path / "ddp"), ports[0]), (str(store), odd, str(tmp_path / "odd"), ports[1]),
            (str(store), wide, str(tmp_path / "wide"), ports[2]), (str(store), cfg, str(tmp_path / "cut"), ports[3], 3)]
    mp.spawn(cross_ddp_worker, args=(2, jobs), nprocs=2, join=True)
    # stopped mid-step, each rank frees its DDP wrapper before the group: freed after it, the
    # wrapper could destroy the group with the GIL held while gloo's thread waited for it (a hang)
    assert [(tmp_path / f"cut.ddp-alive-{r}").read_text() for r in (0, 1)] == ["0", "0"]
    rec = train_cross(store, tmp_path / "one", cfg)
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert one["epoch"] == two["epoch"] == 2
    for k, v in one["model"].items():  # biases the softmax cannot see (key bias, the score's offset) get
        if k.endswith("weight"):       # zero gradients, whose rounding noise Adam turns into full steps
            assert torch.allclose(v, two["model"][k], atol=1e-5, rtol=1e-4), k
    runs = [load_cross(tmp_path / "one"), load_cross(tmp_path / "ddp")]
    with open_store(store) as st:
        pairs = np.random.default_rng(0).integers(0, len(st), size=(2, 200))
        s1, s2 = (r.prepare(st, np.unique(pairs)) or r.scores(*pairs) for r in runs)
    assert np.allclose(s1 - s1.mean(), s2 - s2.mean(), atol=1e-4)  # the same scores, up to that offset
    ddp_run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert ddp_run["world_size"] == 2 and abs(ddp_run["best_val_mrr"] - rec["best_val_mrr"]) < 1e-3
    assert [h["train_loss"] for h in ddp_run["history"]] == pytest.approx([h["train_loss"] for h in rec["history"]], rel=1e-4)
    for r in (0, 1):  # each rank scored its half of every batch: the query and its 3 negatives
        pairs = json.loads((tmp_path / f"ddp.pairs-{r}").read_text())
        assert len(pairs) == 2 * rec["train_queries"] // 8 and set(pairs) == {4 * 4}
    # a batch that cannot be shared equally, or an error on rank 0 alone (its hard negatives):
    # every rank stops with one line, nothing is trained
    for r in (0, 1):
        assert "batch_size 7 must be a multiple of WORLD_SIZE 2" in (tmp_path / f"odd.error-{r}").read_text()
    assert not (tmp_path / "odd" / "last.pt").exists()
    assert "hard_pool 500 needs more distinct train bodies" in (tmp_path / "wide.error-0").read_text()
    assert (tmp_path / "wide.error-1").read_text().startswith("rank 0: hard_pool 500")
    assert not (tmp_path / "wide" / "last.pt").exists()
