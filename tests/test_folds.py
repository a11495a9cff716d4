"""Cross-validation over repositories: split files (corpus), their use by a store, a run and an
evaluation, and the pooled result over the folds (evaluate)."""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import asdict
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _evaluate_fixtures import make_dataset  # noqa: E402

from codejepa.cli import app  # noqa: E402
from codejepa.core import CodejepaError  # noqa: E402
from codejepa.corpus.folds import fold_groups, fold_repo_splits, make_folds, read_splits, write_folds  # noqa: E402
from codejepa.corpus.records import read_records  # noqa: E402
from codejepa.embed.store import StoreError, open_store, use_split_file  # noqa: E402
from codejepa.evaluate.errors import EvaluateError  # noqa: E402
from codejepa.evaluate.folds import pool_folds, render_folds  # noqa: E402
from codejepa.evaluate.retrieval import evaluate_retrieval  # noqa: E402

torch.set_num_threads(1)
runner = CliRunner()


def add_index_files(corpus_dir: Path) -> dict[str, str]:
    """Give a fixture corpus the per-repo index files a real build writes (id, body hash);
    the corpus fingerprint does not cover them. Returns record id → repo."""
    mpath = corpus_dir / "manifest.json"
    manifest = json.loads(mpath.read_text())
    owner = {}
    for r in manifest["repos"]:
        recs = list(read_records(corpus_dir / r["records_file"]))
        r["index_file"] = r["records_file"].replace(".jsonl", ".index.tsv")
        (corpus_dir / r["index_file"]).write_text("".join(f"{x.id}\t{x.body_hash}\n" for x in recs))
        owner.update({x.id: r["name"] for x in recs})
    mpath.write_text(json.dumps(manifest))
    return owner


def test_groups_partition_the_repositories_whatever_their_order() -> None:
    names = [f"org/repo{i}" for i in range(23)]
    groups = fold_groups(names, 5)
    assert sorted(n for g in groups for n in g) == sorted(names)
    assert {len(g) for g in groups} <= {4, 5}
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    assert fold_groups(shuffled, 5) == groups
    assert fold_groups(names, 5, seed=1) != groups
    for k in range(5):
        s = fold_repo_splits(groups, k)
        assert [n for n in names if s[n] == "test"] == [n for n in names if n in groups[k]]
        assert {n for n in names if s[n] == "val"} == set(groups[(k + 1) % 5])
    # every repository is tested in exactly one fold
    tested = [n for k in range(5) for n, s in fold_repo_splits(groups, k).items() if s == "test"]
    assert sorted(tested) == sorted(names)
    with pytest.raises(CodejepaError, match="at least 3"):
        fold_groups(names, 2)
    with pytest.raises(CodejepaError, match="cannot fill"):
        fold_groups(names[:4], 5)


def _index_corpus(root: Path) -> Path:
    """Six repos and one pinned to train; repo a and repo b share the body hash h-shared."""
    c = root / "corpus"
    (c / "repos").mkdir(parents=True)
    repos = []
    for name in ("a", "b", "c", "d", "e", "f", "pinned"):
        rows = [(f"{name}:{j}", f"h-{name}-{j}") for j in range(4)]
        if name == "b":
            rows.append(("b:shared", "h-shared"))
        if name == "a":
            rows.append(("a:shared", "h-shared"))
        (c / "repos" / f"{name}.index.tsv").write_text("".join(f"{i}\t{h}\n" for i, h in rows))
        repos.append({"name": name, "split": "train", "status": "ok", "records_file": f"repos/{name}.jsonl",
                      "index_file": f"repos/{name}.index.tsv", "train_only": name == "pinned", "functions": len(rows)})
    (c / "manifest.json").write_text(json.dumps({"format": "codejepa-corpus", "format_version": 1, "repos": repos,
                                                 "dropped": {}, "settings": {"seed": 0}}))
    return c


def test_each_fold_has_its_own_leak_filter_and_pinned_repos_stay_in_train(tmp_path: Path) -> None:
    corpus = _index_corpus(tmp_path)
    folds = make_folds(corpus, 3)
    tested = sorted(r for a in folds for r, s in a.repos.items() if s == "test")
    assert tested == ["a", "b", "c", "d", "e", "f"]  # each once; the pinned repo never
    for a in folds:
        assert a.repos["pinned"] == "train" and all(a.splits[f"pinned:{j}"] == "train" for j in range(4))
        sa, sb = a.repos["a"], a.repos["b"]
        kept = {rid for rid in ("a:shared", "b:shared") if rid in a.splits}
        if sa == "train" and sb == "train":
            assert kept == {"a:shared"}  # one train copy is kept (repos in name order)
        elif sa == "train":
            assert kept == {"a:shared"}  # b's held-out copy leaks from train: dropped
        elif sb == "train":
            assert kept == {"b:shared"}
        else:
            assert len(kept) == 1 or sa != sb  # two held-out splits: each keeps its own
        assert all(f"{r}:0" in a.splits for r in "abcdef")  # the rest is kept
    assert len({a.key for a in folds}) == 3
    paths = write_folds(corpus, tmp_path / "folds", 3)
    back = read_splits(paths[1])
    assert back.splits == folds[1].splits and back.repos == folds[1].repos and back.key == folds[1].key
    assert back.label == "fold 1 of 3 (seed 0)"
    # A damaged or foreign file is one clear error, not a traceback.
    d = json.loads(paths[1].read_text())
    d["records"]["test"] = d["records"]["test"][1:]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(CodejepaError, match="do not match its key"):
        read_splits(bad)
    bad.write_text("{")
    with pytest.raises(CodejepaError, match="unreadable split file"):
        read_splits(bad)
    with pytest.raises(CodejepaError, match="no such split file"):
        read_splits(tmp_path / "missing.json")
    r = runner.invoke(app, ["corpus", "folds", str(corpus), "--out", str(tmp_path / "cli"), "--folds", "3"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["fold-0.json", "fold-1.json", "fold-2.json"]
    assert read_splits(tmp_path / "cli" / "fold-2.json").key == folds[2].key
    r = runner.invoke(app, ["corpus", "folds", str(corpus), "--out", str(tmp_path / "cli"), "--folds", "3"])
    assert r.exit_code == 0, r.output  # the same folds again: rewritten
    r = runner.invoke(app, ["corpus", "folds", str(corpus), "--out", str(tmp_path / "cli"), "--folds", "4"])
    assert r.exit_code == 1 and "holds fold files of another cross-validation" in r.output, r.output
    assert not (tmp_path / "cli" / "fold-3.json").exists()


def _set_manifest(corpus: Path, **settings: object) -> None:
    m = json.loads((corpus / "manifest.json").read_text())
    m["settings"].update(settings)
    (corpus / "manifest.json").write_text(json.dumps(m))


def test_folds_follow_the_corpus_seed_and_keep_trivial_settings(tmp_path: Path) -> None:
    """Without ``--seed`` the folds deal repositories with the corpus's own split seed, and each
    fold's leak filter keeps trivial bodies when the corpus was built with ``--keep-trivial``
    (else the fold's held-out splits lose records the build promised to keep)."""
    from codejepa.corpus.extract import hash_normalised, normalise_body

    corpus = _index_corpus(tmp_path)
    stub = hash_normalised(normalise_body("pass"))
    for name in ("a", "b", "c", "d", "e", "f"):
        with open(corpus / "repos" / f"{name}.index.tsv", "a") as f:
            f.write(f"{name}:stub\t{stub}\n")
    m = json.loads((corpus / "manifest.json").read_text())
    for r in m["repos"]:
        r["functions"] += r["name"] != "pinned"
    (corpus / "manifest.json").write_text(json.dumps(m))
    _set_manifest(corpus, seed=5, keep_trivial=True)
    names = ["a", "b", "c", "d", "e", "f"]
    folds = make_folds(corpus, 3)
    groups = fold_groups(names, 3, seed=5)
    assert fold_groups(names, 3, seed=0) != groups  # the seed decides the deal here
    for k, a in enumerate(folds):
        assert a.seed == 5 and {n for n, s in a.repos.items() if s == "test"} == set(groups[k])
        assert all(a.splits[f"{n}:stub"] == a.repos[n] for n in names)  # every trivial copy kept
    _set_manifest(corpus, keep_trivial=False)
    for a in make_folds(corpus, 3):  # without it only train keeps one copy
        assert [n for n in names if f"{n}:stub" in a.splits] == [min(n for n in names if a.repos[n] == "train")]


def test_fold_files_of_another_corpus_are_not_mixed_in(tmp_path: Path) -> None:
    """A folder already holding fold files of another corpus (same K and seed) is refused: the
    folds of two corpora side by side would be pooled as one cross-validation."""
    corpus = _index_corpus(tmp_path)
    out = tmp_path / "folds"
    r = runner.invoke(app, ["corpus", "folds", str(corpus), "--out", str(out), "--folds", "3"])
    assert r.exit_code == 0, r.output
    m = json.loads((corpus / "manifest.json").read_text())
    m["repos"] = [e for e in m["repos"] if e["name"] != "f"]  # another corpus: one repository fewer
    (corpus / "manifest.json").write_text(json.dumps(m))
    r = runner.invoke(app, ["corpus", "folds", str(corpus), "--out", str(out), "--folds", "3"])
    assert r.exit_code == 1 and "holds fold files of another cross-validation" in r.output, r.output


def test_a_damaged_index_or_split_file_is_one_clear_error(tmp_path: Path) -> None:
    corpus = _index_corpus(tmp_path)
    idx = corpus / "repos" / "c.index.tsv"
    whole = idx.read_bytes()
    idx.write_bytes(whole[:whole.index(b"\n") + 1])  # cut short: every fold would silently shrink
    with pytest.raises(CodejepaError, match="c.index.tsv: damaged index file .1 rows, the build wrote 4."):
        make_folds(corpus, 3)
    idx.write_bytes(whole + b"\xbb\n")
    with pytest.raises(CodejepaError, match="c.index.tsv: unreadable index file"):
        make_folds(corpus, 3)
    r = runner.invoke(app, ["corpus", "folds", str(corpus), "--out", str(tmp_path / "f"), "--folds", "3"])
    assert r.exit_code == 1 and "unreadable index file" in r.output
    assert not (tmp_path / "f").exists()
    idx.write_bytes(whole)
    # Record ids that are not strings: refused in one line, not a TypeError when sorting them.
    d = make_folds(corpus, 3)[0].to_json()
    d["records"]["train"][:1] = [1, 2]
    bad = tmp_path / "ints.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(CodejepaError, match="damaged split file .*record ids must be strings"):
        read_splits(bad)


@pytest.fixture(scope="module")
def cv(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("folds")
    ds = make_dataset(root, repos={"train": 6, "val": 3, "test": 3}, per_repo=20, duplicate_test_bodies=0)
    owner = add_index_files(ds.corpus_dir)
    paths = write_folds(ds.corpus_dir, root / "folds", 3)
    return ds, owner, paths, root


def test_a_split_file_replaces_the_stores_split_and_its_fingerprint(cv) -> None:
    ds, owner, paths, _ = cv
    with open_store(ds.store_path) as store:
        own_fp = store.fingerprint()
        assert own_fp == ds.meta.fingerprint()
        a, missing = use_split_file(store, paths[0])
        assert missing == 0
        test_repos = {r for r, s in a.repos.items() if s == "test"}
        assert {owner[i] for i in store.ids[store.indices("test")]} == test_repos
        assert len(store.indices("train")) + len(store.indices("val")) + len(store.indices("test")) == len(store)
        fp0 = store.fingerprint()
        use_split_file(store, paths[1])
        assert len({own_fp, fp0, store.fingerprint()}) == 3
        store.use_splits({store.ids[0]: "test"}, "only-one")
        assert list(store.indices("test")) == [0] and len(store.indices("train")) == 0
        assert len(store.indices()) == len(store)  # unlisted records stay candidates of a whole pool
        # listed records the store lacks (its own leak filter or window dropped them) are counted
        assert store.use_splits({store.ids[0]: "test", "no-such-record": "val"}, "one-missing") == 1
        with pytest.raises(StoreError, match="unknown split"):
            store.use_splits({store.ids[0]: "holdout"}, "x")
    other = make_dataset(cv[3], name="other")
    with open_store(other.store_path) as store, pytest.raises(StoreError, match="another corpus"):
        use_split_file(store, paths[0])


def test_a_cross_scorer_trained_on_a_fold_reranks_that_fold_only(cv, tmp_path: Path) -> None:
    """`predict cross --splits`: hard negatives and training from the fold's train split, its
    run.json names the file, evaluate re-ranks that fold with it and refuses it on another fold
    (whose test repositories it may have trained on) or on the store's own split."""
    from codejepa.predict.cross import CrossConfig, CrossError, train_cross

    ds, owner, paths, _ = cv
    cfg = CrossConfig(hard_pool=8, negatives=3, width=16, heads=2, depth=1, batch_size=8, epochs=1, query_tokens=2,
                      body_tokens=2, threads=1)
    run = tmp_path / "cross-k0"
    events: list[dict] = []
    rec = train_cross(ds.store_path, run, cfg, splits=paths[0], on_event=events.append)
    fold = read_splits(paths[0])
    assert rec["splits"]["key"] == fold.key and rec["splits"]["label"] == "fold 0 of 3 (seed 0)"
    assert json.loads((run / "run.json").read_text())["splits"]["key"] == fold.key
    assert any(e["event"] == "splits" for e in events)
    with open_store(ds.store_path) as store:
        use_split_file(store, paths[0])
        fold_train = set(store.ids[store.indices("train")])
    start = next(e for e in events if e["event"] == "start")
    assert start["train"] == len(fold_train) != int((ds.splits == "train").sum())
    r = evaluate_retrieval(ds.store_path, [], splits=paths[0], baselines="bm25", spaces="whitened", n_boot=20,
                           plots=False, rerank=run, rerank_rows="bm25")
    reranked = r.row("bm25+rerank", "-")
    assert {str(x) for x in reranked.clusters} == {n for n, s in fold.repos.items() if s == "test"}
    for other in ({"splits": paths[1]}, {}):
        with pytest.raises(EvaluateError, match="--rerank: .*other settings"):
            evaluate_retrieval(ds.store_path, [], baselines="bm25", spaces="whitened", plots=False, rerank=run,
                               rerank_rows="bm25", **other)
    with pytest.raises(CrossError, match="another --splits file"):
        train_cross(ds.store_path, run, resume=True, splits=paths[1])
    # the command line passes the file on and says which fold it trains on
    sets = [a for k, v in asdict(cfg).items() for a in ("--set", f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}")]
    res = runner.invoke(app, ["predict", "cross", str(ds.store_path), "--out", str(tmp_path / "cli"), "--splits",
                              str(paths[1]), *sets])
    assert res.exit_code == 0, res.output
    assert "split from" in res.output and "fold 1 of 3" in res.output
    assert json.loads((tmp_path / "cli" / "run.json").read_text())["splits"]["key"] == read_splits(paths[1]).key


def test_folds_train_evaluate_and_pool_over_every_repository(cv, tmp_path: Path) -> None:
    from codejepa.predict.config import resolve_config
    from codejepa.predict.train import train

    ds, owner, paths, _ = cv
    cfg = resolve_config("mlp", overrides={"model.mlp_hidden": "32", "train.batch_size": 32, "train.epochs": 1,
                                           "train.plot_every_s": -1})
    evals = []
    for k, p in enumerate(paths):
        run = tmp_path / f"k{k}" / "mlp"  # the same run name in every fold: its rows pool
        res = train(ds.store_path, cfg, run, device="cpu", splits=p)
        assert np.isfinite(res["best_val_mrr"])
        info = json.loads((run / "run.json").read_text())["splits"]
        assert info["key"] == read_splits(p).key and info["label"] == f"fold {k} of 3 (seed 0)"
        out = tmp_path / f"k{k}" / "eval"
        r = evaluate_retrieval(ds.store_path, [run], splits=p, baselines="prototype,ridge", spaces="whitened",
                               n_boot=50, out_dir=out, plots=False, hubness_correction=False)
        test_repos = {n for n, s in read_splits(p).repos.items() if s == "test"}
        assert {str(x) for x in r.row("mlp", "whitened").clusters} == test_repos
        evals.append(out)
    # A run is refused on another fold's split (its test repositories were its train) and on the
    # store's own split; resuming it with another split file is refused too.
    with pytest.raises(EvaluateError, match=f"the run was trained with --splits .*{paths[0].name}, this evaluation "
                                            "uses another --splits file"):
        evaluate_retrieval(ds.store_path, [tmp_path / "k0" / "mlp"], splits=paths[1], baselines="none", plots=False)
    with pytest.raises(EvaluateError, match=r"fingerprint .*this evaluation uses the store's own split"):
        evaluate_retrieval(ds.store_path, [tmp_path / "k0" / "mlp"], baselines="none", plots=False)
    with pytest.raises(CodejepaError, match="the run was trained with --splits .*fold-0.json, this training uses "
                                            "another --splits file"):
        train(ds.store_path, None, tmp_path / "k0" / "mlp", resume=True, device="cpu", splits=paths[1])

    pooled = pool_folds(evals, compare=[("mlp@whitened", "prototype@whitened")], n_boot=100)
    n_test = sum(sum(s == "test" for s in read_splits(p).repos.values()) for p in paths)
    assert n_test == 12
    row = {r.key: r for r in pooled.rows}["mlp@whitened"]
    assert row.n_queries == len(ds.ids)  # every record is a test query in exactly one fold
    assert len(row.per_fold_rank1) == 3
    ranks = [np.load(e / "ranks.npz")["mlp@whitened"] for e in evals]
    assert row.metrics["rank@1"].value == pytest.approx(np.mean(np.concatenate(ranks) <= 1))
    assert row.metrics["rank@1"].low <= row.metrics["rank@1"].value <= row.metrics["rank@1"].high
    # the CIs resample all the folds' test repositories (12), not their queries
    from codejepa.evaluate.metrics import bootstrap_cis
    from codejepa.evaluate.report import load_ranks

    clusters = np.concatenate([load_ranks(e)[1] for e in evals])
    assert len(np.unique(clusters)) == 12
    assert row.metrics == bootstrap_cis(np.concatenate(ranks), clusters, n_boot=100, seed=0)
    proto = {r.key: r for r in pooled.rows}["prototype@whitened"]
    assert row.metrics["mrr"].value > proto.metrics["mrr"].value
    c = pooled.comparisons[0]
    assert c["results"][0]["metric"] == "rank@1" and c["results"][0]["diff"] > 0
    assert c["cis_overlap"]["rank@1"] == (row.metrics["rank@1"].low <= proto.metrics["rank@1"].high)
    narrow = io.StringIO()  # an 80-column terminal drops the per-fold column, not the CIs
    render_folds(pooled, Console(file=narrow, width=80, color_system=None))
    m = row.metrics["mrr"]
    assert f"{m.value:.3f} [{m.low:.3f}, {m.high:.3f}]" in narrow.getvalue() and "…" not in narrow.getvalue()
    assert "left out for this terminal's width: R@10, rank@1 per fold" in " ".join(narrow.getvalue().split())

    r = runner.invoke(app, ["evaluate", "folds", *map(str, evals), "--out", str(tmp_path / "pooled"),
                            "--compare", "mlp@whitened,prototype@whitened", "--n-boot", "50"])
    assert r.exit_code == 0, r.output
    assert "3 folds pooled" in r.output and "CIs" in r.output
    # how many of the 12 test repositories each side wins, beside the pooled difference
    assert re.search(r"A better in \d+ of 12 repositories, B in \d+", " ".join(r.output.split()))
    assert json.loads((tmp_path / "pooled" / "folds.json").read_text())["rows"]
    # The same fold twice, or an evaluation on the store's own split, cannot be pooled.
    with pytest.raises(EvaluateError, match="tested in two folds"):
        pool_folds([evals[0], evals[0]])
    own = tmp_path / "own"
    evaluate_retrieval(ds.store_path, [], baselines="prototype", spaces="whitened", n_boot=20, out_dir=own, plots=False)
    with pytest.raises(EvaluateError, match="with --splits"):
        pool_folds([evals[0], own])
    foreign = tmp_path / "foreign"  # fold 1's evaluation, as if made on another store
    foreign.mkdir()
    (foreign / "ranks.npz").write_bytes((evals[1] / "ranks.npz").read_bytes())
    data = json.loads((evals[1] / "retrieval.json").read_text())
    data["store"]["file_sha256"] = "0" * 64
    (foreign / "retrieval.json").write_text(json.dumps(data))
    with pytest.raises(EvaluateError, match="another store"):
        pool_folds([evals[0], foreign, evals[2]])
    r = runner.invoke(app, ["evaluate", "folds", str(evals[0]), str(evals[0])])
    assert r.exit_code == 1 and "tested in two folds" in r.output and "Traceback" not in r.output
    # Folds of another cross-validation (other K or seed) are refused; missing folds are noted;
    # a --compare typo is a note, not the loss of the pooled result.
    other = tmp_path / "other"
    other.mkdir()
    (other / "ranks.npz").write_bytes((evals[1] / "ranks.npz").read_bytes())
    data = json.loads((evals[1] / "retrieval.json").read_text())
    assert data["settings"]["split_file"]["fold"] == 1 and data["settings"]["split_file"]["folds"] == 3
    data["settings"]["split_file"]["seed"] = 5
    (other / "retrieval.json").write_text(json.dumps(data))
    with pytest.raises(EvaluateError, match="another cross-validation .*3 folds, seed 0; 3 folds, seed 5"):
        pool_folds([evals[0], other])
    data = json.loads((evals[1] / "retrieval.json").read_text())
    data["settings"]["ridge_input"] = "context"
    (other / "retrieval.json").write_text(json.dumps(data))
    with pytest.raises(EvaluateError, match="other settings than .*ridge_input: context vs signature"):
        pool_folds([evals[0], other])
    data["settings"]["ridge_input"], data["settings"]["split"] = "signature", "val"  # val queries beside test ones
    (other / "retrieval.json").write_text(json.dumps(data))
    with pytest.raises(EvaluateError, match=r"evaluated differently \(query split, pool\)"):
        pool_folds([evals[0], other])
    data["settings"]["split"], data["pool"]["n_queries"] = "test", 3  # ranks of another evaluation
    (other / "retrieval.json").write_text(json.dumps(data))
    with pytest.raises(EvaluateError, match="ranks.npz: damaged .*queries, and retrieval.json says 3"):
        pool_folds([evals[0], other])
    two = pool_folds(evals[:2], compare=[("nope@whitened", "prototype@whitened")], n_boot=20)
    assert "folds 2 of the 3 are not pooled" in " ".join(two.notes)
    assert "--compare nope@whitened,prototype@whitened skipped: no pooled row 'nope@whitened'" in " ".join(two.notes)
    assert not two.comparisons and two.rows
