"""The evaluate CLI, and a real predictor run (codejepa.predict) evaluated end to end."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _evaluate_fixtures import make_dataset  # noqa: E402

from codejepa.cli import app  # noqa: E402
from codejepa.evaluate.errors import EvaluateError  # noqa: E402
from codejepa.evaluate.retrieval import evaluate_retrieval  # noqa: E402

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory):
    return make_dataset(tmp_path_factory.mktemp("evcli"))


def test_cli_retrieval_and_compare(ds, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", "retrieval", str(ds.store_path), "--baselines", "prototype,random,ridge,bm25",
                            "--space", "whitened", "--out", str(out), "--n-boot", "100",
                            "--compare", "ridge@whitened,prototype@whitened"])
    assert r.exit_code == 0, r.output
    assert "ridge" in r.output and "chance" in r.output and "ridge@whitened vs prototype@whitened" in r.output
    data = json.loads((out / "retrieval.json").read_text())
    assert data["settings"]["spaces"] == ["whitened"]
    assert {row["method"] for row in data["rows"]} == {"prototype", "random", "ridge", "ridge+csls", "bm25", "bm25+sib"}
    r = runner.invoke(app, ["evaluate", "retrieval", str(ds.store_path), "--baselines", "prototype,ridge,bm25", "--space",
                            "whitened", "--no-hubness", "--no-siblings", "--no-plots", "--n-boot", "50", "--out", str(tmp_path / "plain")])
    assert r.exit_code == 0, r.output
    plain = json.loads((tmp_path / "plain" / "retrieval.json").read_text())
    assert {row["method"] for row in plain["rows"]} == {"prototype", "ridge", "bm25"}
    r = runner.invoke(app, ["evaluate", "compare", str(out), "ridge@whitened", "bm25@-", "--n-boot", "200"])
    assert r.exit_code == 0, r.output
    assert "ridge@whitened vs bm25@-: rank@1" in r.output and "p = " in r.output and "their own CIs" in r.output
    # the paired test needs only the ranks; a damaged retrieval.json drops the CIs' clause, and says so
    (out / "retrieval.json").write_text('{"rows": [{"method": "ridge"}]}')
    r = runner.invoke(app, ["evaluate", "compare", str(out), "ridge@whitened", "bm25@-", "--n-boot", "200"])
    assert r.exit_code == 0 and "p = " in r.stdout and "their own CIs" not in r.stdout, r.output
    assert "note: whether the rows' own CIs overlap is not said" in r.stderr and "retrieval.json: damaged" in r.stderr
    r = runner.invoke(app, ["evaluate", "retrieval", str(ds.store_path), "--pool", "50", "--space", "raw",
                            "--baselines", "oracle,random", "--no-plots", "--n-boot", "50"])
    assert r.exit_code == 0, r.output
    assert "random-50" in r.output


def test_cli_errors_are_one_line(ds, tmp_path: Path) -> None:
    for args in (["evaluate", "retrieval", str(tmp_path / "nope.h5")],
                 ["evaluate", "retrieval", str(ds.store_path), "--space", "curved"],
                 ["evaluate", "retrieval", str(ds.store_path), "--compare", "just-one"],
                 ["evaluate", "retrieval", str(ds.store_path), "--compare", "ridge@raw,"],  # B left empty
                 ["evaluate", "compare", str(tmp_path), "a@raw", "b@raw"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert "Traceback" not in r.output
        assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output


def test_trained_predictor_run_is_evaluated(ds, tmp_path: Path) -> None:
    pytest.importorskip("codejepa.predict.api")
    from codejepa.predict.config import resolve_config
    from codejepa.predict.train import train

    cfg = resolve_config("mlp", overrides={"model.mlp_hidden": "32,32", "train.batch_size": 64, "train.epochs": 3,
                                           "optim.lr": 3e-3, "train.plot_every_s": -1})
    run = tmp_path / "run"
    train(ds.store_path, cfg, run, device="cpu")
    out = tmp_path / "eval"
    res = evaluate_retrieval(ds.store_path, [run], baselines="prototype,random,ridge,noisy_oracle", n_boot=100, out_dir=out)
    name = res.runs[0]["name"]
    row = res.row(name, "whitened")
    assert row.kind == "run" and len(row.ranks) == int((ds.splits == "test").sum())
    assert np.isfinite(row.diagnostics["cosine_raw"])
    # The noisy oracle takes its error level from the run.
    assert res.row("noisy_oracle", "raw").settings["error_of"] == name
    data = json.loads((out / "retrieval.json").read_text())
    assert data["runs"][0]["store_fingerprint"] == ds.meta.fingerprint()
    assert data["runs"][0]["checkpoint_sha256"]  # checkpoint hashes recorded
    assert {"python", "numpy", "scipy", "torch"} <= set(data["settings"]["versions"])  # and the libraries
    assert Path(data["store"]["corpus_dir"]).is_absolute()
    # The run is compared with the best baseline of each space automatically.
    assert any(c["a"] == f"{name}@whitened" and c["n_boot"] == 1000 for c in data["comparisons"])  # ≥ 1,000 resamples, said
    # A run trained on another store is refused with one clear line.
    other = make_dataset(tmp_path, name="other")
    with pytest.raises(EvaluateError, match="trained against store fingerprint .*run vs store: template_version "
                                            "synthetic-store vs synthetic-other"):
        evaluate_retrieval(other.store_path, [run], baselines="none")
    r = runner.invoke(app, ["evaluate", "retrieval", str(other.store_path), "--run", str(run), "--baselines", "none"])
    assert r.exit_code == 1 and "trained against store fingerprint" in r.output
    # A run stopped before its end, trained while its store was unfinished, gets notes saying so
    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped)
    info = json.loads((stopped / "run.json").read_text())
    (stopped / "run.json").write_text(json.dumps({**info, "store_complete": False}))
    log = (stopped / "log.jsonl").read_text().splitlines()
    (stopped / "log.jsonl").write_text("\n".join(x for x in log if '"done"' not in x and '"epoch": 3' not in x) + "\n")
    notes = " ".join(evaluate_retrieval(ds.store_path, str(stopped), baselines="none", spaces="whitened", n_boot=20,
                                        plots=False).notes)
    assert f"trained while its store was unfinished, on {info['train_records']} train records" in notes
    assert "stopped before its end (epoch 2 of 3" in notes
    assert "stopped" not in " ".join(evaluate_retrieval(ds.store_path, [run], baselines="none", spaces="whitened",
                                                        n_boot=20, plots=False).notes)
    moved = tmp_path / "moved"  # trained on another store of the same corpus and teacher (another window)
    shutil.copytree(run, moved)
    meta = {**info["store_meta"], "max_tokens": 128}
    (moved / "run.json").write_text(json.dumps({**info, "store": "/elsewhere/s.h5", "store_meta": meta,
                                                "train_records": info["train_records"] - 7}))
    notes = " ".join(evaluate_retrieval(ds.store_path, [moved], baselines="none", spaces="whitened", n_boot=20,
                                        plots=False).notes)
    assert f"was trained on another store (/elsewhere/s.h5: {info['train_records'] - 7} train records" in notes
    assert "max_tokens 128 vs" in notes
    # the same path, embedded again with another window since: a note too, the path being no proof
    (moved / "run.json").write_text(json.dumps({**info, "store_meta": meta}))
    notes = " ".join(evaluate_retrieval(ds.store_path, [moved], baselines="none", spaces="whitened", n_boot=20,
                                        plots=False).notes)
    assert f"{ds.store_path} as it was before it was embedded again ({info['train_records']} train records" in notes
    assert "max_tokens 128 vs" in notes


def test_in_sample_and_one_repository_figures_say_so(tmp_path: Path) -> None:
    one = make_dataset(tmp_path, repos={"train": 6, "val": 2, "test": 1}, name="one")
    res = evaluate_retrieval(one.store_path, baselines="prototype,ridge", spaces="whitened", n_boot=20, plots=False,
                             split="train", out_dir=tmp_path / "train")
    assert any("in-sample figures" in n for n in res.notes)
    r = runner.invoke(app, ["evaluate", "retrieval", str(one.store_path), "--baselines", "prototype", "--space",
                            "whitened", "--n-boot", "20", "--no-plots"])
    assert r.exit_code == 0 and "queries come from one repository" in r.output, r.output
    assert "CIs over queries (one repository" in " ".join(r.output.split())
    r = runner.invoke(app, ["evaluate", "retrieval", str(one.store_path), "--baselines", "none"])
    assert one_error_line(r, "nothing to evaluate")
    few = make_dataset(tmp_path, repos={"train": 6, "val": 2, "test": 3}, name="few")
    res = evaluate_retrieval(few.store_path, baselines="prototype", spaces="whitened", n_boot=20, plots=False)
    assert any("come from 3 repositories: the CIs over repositories take few distinct values" in n for n in res.notes)


def one_error_line(r, *needles: str) -> str:
    """The CLI's answer to bad input: exit 1 and one ``error:`` line saying each needle."""
    text = r.output.strip()
    assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit)), (r.exception, text)
    assert text.startswith("error:") and len(text.splitlines()) == 1, text
    assert "Traceback" not in text and "Aborted" not in text
    for n in needles:
        assert n in text, (n, text)
    return text


def fold_eval(d: Path, repos: list[str], k: int) -> Path:
    """A fold's saved evaluation as `evaluate retrieval --splits FILE --out d` writes it: the
    parts that pooling reads, five queries per repository."""
    d.mkdir(parents=True)
    clusters = np.repeat(repos, 5)
    data = {"format": "codejepa-retrieval", "format_version": 1, "settings": {"split": "test"},
            "store": {"splits": f"fold-{k}", "file_sha256": "0" * 64},
            "pool": {"label": "split", "mean_pool_size": 20.0, "n_queries": len(clusters)}, "notes": []}
    (d / "retrieval.json").write_text(json.dumps(data))
    np.savez_compressed(d / "ranks.npz", __clusters__=clusters,
                        **{"a@raw": np.random.default_rng(k).integers(1, 21, len(clusters))})
    return d


def test_out_is_checked_before_any_work(ds, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import codejepa.embed.store as store_mod
    import codejepa.evaluate.folds as folds_mod
    from codejepa.evaluate.folds import write_folds_result
    from codejepa.evaluate.report import write_outputs

    afile = tmp_path / "afile"
    afile.write_text("")

    def no_work(*_a, **_k):
        raise AssertionError("the evaluation started although its --out cannot be written")

    with monkeypatch.context() as m:
        m.setattr(store_mod, "open_store", no_work)  # an evaluation's work starts by opening the store
        for out, why in ((afile, "exists and is not a folder"), (afile / "sub", "cannot be made")):
            with pytest.raises(EvaluateError, match=why):
                evaluate_retrieval(ds.store_path, baselines="prototype", out_dir=out)
        with pytest.raises(EvaluateError, match="--n-boot"):
            evaluate_retrieval(ds.store_path, baselines="prototype", n_boot=-1)
        r = runner.invoke(app, ["evaluate", "retrieval", str(ds.store_path), "--out", str(afile)])
        one_error_line(r, str(afile), "not a folder")
        r = runner.invoke(app, ["evaluate", "retrieval", str(ds.store_path), "--n-boot", "-1"])
        one_error_line(r, "--n-boot", "-1")
        r = runner.invoke(app, ["evaluate", "retrieval", str(ds.store_path), "--pool", "10", "--seeds", ""])
        one_error_line(r, "--seeds")
    res = evaluate_retrieval(ds.store_path, baselines="prototype", spaces="raw", n_boot=10, plots=False)
    with pytest.raises(EvaluateError, match="not a folder"):
        write_outputs(res, afile)

    folds = [fold_eval(tmp_path / f"k{k}", [f"r{k}a", f"r{k}b"], k) for k in range(3)]
    pooled = []
    real_pool = folds_mod.pool_folds
    monkeypatch.setattr(folds_mod, "pool_folds", lambda *a, **k: pooled.append(1) or real_pool(*a, **k))
    for args in (["--out", str(afile)], ["--out", str(afile / "sub")]):
        r = runner.invoke(app, ["evaluate", "folds", *map(str, folds), *args])
        one_error_line(r, "not a folder")
    assert not pooled  # refused before pooling
    for n_boot in ("-1", "0"):
        one_error_line(runner.invoke(app, ["evaluate", "folds", *map(str, folds), "--n-boot", n_boot]), "--n-boot")
    with pytest.raises(EvaluateError, match="not a folder"):
        write_folds_result(real_pool(folds, n_boot=10), afile)
    r = runner.invoke(app, ["evaluate", "folds", *map(str, folds), "--n-boot", "20", "--out", str(tmp_path / "pooled")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "pooled" / "folds.json").read_text())["rows"][0]["n_queries"] == 30


def test_damaged_outputs_are_one_line_naming_the_file(ds, tmp_path: Path) -> None:
    from codejepa.evaluate.folds import pool_folds
    from codejepa.evaluate.report import compare_saved

    good = tmp_path / "good"
    evaluate_retrieval(ds.store_path, baselines="prototype,random", spaces="raw", n_boot=10, plots=False, out_dir=good,
                       hubness_correction=False, sibling_softmax=False)
    r = runner.invoke(app, ["evaluate", "compare", str(good), "prototype@raw", "random@-", "--n-boot", "20"])
    assert r.exit_code == 0, r.output
    for n_boot in ("0", "-5"):
        r = runner.invoke(app, ["evaluate", "compare", str(good), "prototype@raw", "random@-", "--n-boot", n_boot])
        one_error_line(r, "--n-boot", n_boot)
    saved = good / "ranks.npz"
    with np.load(saved) as z:
        arrays = {k: z[k] for k in z.files}
    npy, pickled, no_clusters, short, zero = io.BytesIO(), io.BytesIO(), io.BytesIO(), io.BytesIO(), io.BytesIO()
    np.save(npy, arrays["prototype@raw"])
    np.savez(pickled, **arrays, extra=np.array([{"a": 1}], dtype=object))
    np.savez(no_clusters, **{k: v for k, v in arrays.items() if k != "__clusters__"})
    np.savez(short, **arrays | {"prototype@raw": arrays["prototype@raw"][:-1]})
    np.savez(zero, **arrays | {"prototype@raw": arrays["prototype@raw"] - 1})  # 0-based: a 1/0 in the MRR
    damaged_ranks = {
        "truncated": saved.read_bytes()[:200], "random": np.random.default_rng(0).bytes(3000),
        "empty": b"",  # np.load raises EOFError, which click turns into a bare "Aborted."
        "npy": npy.getvalue(), "pickled": pickled.getvalue(), "no_clusters": no_clusters.getvalue(),
        "short": short.getvalue(), "zero": zero.getvalue(),
    }
    folds = [fold_eval(tmp_path / f"k{k}", [f"r{k}"], k) for k in range(3)]
    for name, blob in damaged_ranks.items():
        d = tmp_path / f"ranks-{name}"
        shutil.copytree(good, d)
        (d / "ranks.npz").write_bytes(blob)
        with pytest.raises(EvaluateError, match="damaged"):
            compare_saved(d, "prototype@raw", "random@-")
        r = runner.invoke(app, ["evaluate", "compare", str(d), "prototype@raw", "random@-"])
        one_error_line(r, str(d / "ranks.npz"), "damaged", f"--out {d}")
        (folds[1] / "ranks.npz").write_bytes(blob)
        r = runner.invoke(app, ["evaluate", "folds", *map(str, folds)])
        one_error_line(r, str(folds[1] / "ranks.npz"), "damaged")
    shutil.rmtree(folds[1])
    fold_eval(folds[1], ["r1"], 1)
    for blob in (b"[]", b'{"format": "codejepa-retr', b"\xff\xfe\x00", b'{"format": "other"}',
                 b'{"format": "codejepa-retrieval", "settings": [], "store": {}, "pool": {}}',
                 b'{"format": "codejepa-retrieval", "settings": {}, "store": {}, "pool": {}}',
                 b'{"format": "codejepa-retrieval", "settings": {"split": "test"},'  # no store section
                 b' "pool": {"label": "split", "mean_pool_size": 20.0, "n_queries": 5}}'):
        (folds[1] / "retrieval.json").write_bytes(blob)
        with pytest.raises(EvaluateError, match="damaged"):
            pool_folds(folds)
        r = runner.invoke(app, ["evaluate", "folds", *map(str, folds)])
        one_error_line(r, str(folds[1] / "retrieval.json"), "damaged")


def test_every_retrieval_flag_reaches_the_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag the command parses but does not pass on evaluates something else than asked, silently:
    each must arrive at evaluate_retrieval as given."""
    import codejepa.evaluate.retrieval as retrieval_mod

    seen: dict = {}

    def capture(store, runs, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.update(kw, store=store, runs=runs)
        raise EvaluateError("captured")

    monkeypatch.setattr(retrieval_mod, "evaluate_retrieval", capture)
    r = runner.invoke(app, ["evaluate", "retrieval", str(tmp_path / "s.h5"), "--run", str(tmp_path / "r"),
                            "--split", "val", "--pool", "repo", "--space", "raw", "--baselines", "ridge",
                            "--ridge-input", "inputs", "--shrinkage", "0.3", "--n-boot", "77", "--seeds", "4,5",
                            "--no-plots", "--bm25-query", "signature", "--no-fuse-bm25", "--no-hubness",
                            "--no-siblings", "--sib-fusion", "joint", "--noisy-of", "ridge", "--out", str(tmp_path / "o"),
                            "--corpus", str(tmp_path / "c"), "--splits", str(tmp_path / "f.json"),
                            "--probe", str(tmp_path / "p.h5"), "--probe-select", "plain", "--probe-weights", "0,0.5",
                            "--compare", "ridge@raw,bm25@-", "--fuse-reverse"])
    one_error_line(r, "captured")
    want = {"store": tmp_path / "s.h5", "runs": [tmp_path / "r"], "split": "val", "pool": "repo", "spaces": "raw",
            "baselines": "ridge", "ridge_input": "inputs", "whitening_shrinkage": 0.3, "n_boot": 77,
            "pool_seeds": (4, 5), "plots": False, "bm25_query": "signature", "fuse_bm25": False,
            "hubness_correction": False, "sibling_softmax": False, "sib_fusion": "joint", "noisy_of": "ridge", "out_dir": tmp_path / "o",
            "corpus_dir": tmp_path / "c", "splits": tmp_path / "f.json", "probe": tmp_path / "p.h5",
            "probe_select": "plain", "probe_weights": "0,0.5", "compare": [("ridge@raw", "bm25@-")],
            "fuse_reverse": True}
    assert {k: seen.get(k) for k in want} == want


def test_probe_flags_without_a_probe_view_say_they_do_nothing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--probe-select or --probe-weights alone changes nothing: the user learns it, and the evaluation
    still runs (with the defaults passed on), while --probe alone says nothing about them."""
    import codejepa.evaluate.retrieval as retrieval_mod

    seen: dict = {}

    def capture(store, runs, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.update(kw)
        raise EvaluateError("captured")

    monkeypatch.setattr(retrieval_mod, "evaluate_retrieval", capture)
    for flag, value in (("--probe-select", "plain"), ("--probe-weights", "0,1")):
        r = runner.invoke(app, ["evaluate", "retrieval", str(tmp_path / "s.h5"), flag, value])
        assert f"{flag} has no effect without --probe" in r.output and "captured" in r.output, r.output
        assert seen["probe"] is None
    r = runner.invoke(app, ["evaluate", "retrieval", str(tmp_path / "s.h5"), "--probe", str(tmp_path / "p.h5")])
    assert "no effect" not in r.output and seen["probe_select"] == "chain" and seen["probe_weights"] is None, r.output


def test_ctrl_c_during_an_evaluation_exits_130_saying_what_was_kept(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A script driving the evaluations tells an interrupt (130) from a failed evaluation (1)."""
    import codejepa.evaluate.retrieval as retrieval_mod

    def interrupted(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(retrieval_mod, "evaluate_retrieval", interrupted)
    r = runner.invoke(app, ["evaluate", "retrieval", str(tmp_path / "s.h5")])
    assert r.exit_code == 130 and "interrupted: the results were not saved" in r.output, r.output


def test_help_lists_every_baseline_on_a_narrow_terminal() -> None:
    from codejepa.evaluate.baselines import BASELINE_NAMES

    r = runner.invoke(app, ["evaluate", "retrieval", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0, r.output
    assert max(map(len, r.output.splitlines())) <= 80
    assert set(BASELINE_NAMES) <= set(re.findall(r"[\w+]+", r.output)), r.output


def test_a_compare_typo_keeps_the_evaluation(ds, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    r = runner.invoke(app, ["evaluate", "retrieval", str(ds.store_path), "--baselines", "prototype,random",
                            "--space", "raw", "--n-boot", "10", "--no-plots", "--out", str(out),
                            "--compare", "prototype@raw,random@-;prototype@rwa,random@-"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "retrieval.json").read_text())
    assert [(c["a"], c["b"]) for c in data["comparisons"]] == [("prototype@raw", "random@-")]
    assert any("--compare prototype@rwa,random@- skipped: no result 'prototype@rwa'" in w for w in data["warnings"])


def test_a_cut_rewrite_leaves_no_older_result_beside_the_new_ranks(ds, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import codejepa.evaluate.plots as plots

    out = tmp_path / "eval"
    evaluate_retrieval(ds.store_path, baselines="random", spaces="raw", n_boot=10, out_dir=out, plots=False)
    assert (out / "retrieval.json").is_file()

    def full_disk(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "plot_rank_distribution", full_disk)
    with pytest.raises(EvaluateError, match="cannot write the results"):
        evaluate_retrieval(ds.store_path, baselines="random,prototype", spaces="raw", n_boot=10, out_dir=out)
    assert (out / "ranks.npz").is_file() and not (out / "retrieval.json").exists()


def test_an_evaluation_without_plots_removes_the_earlier_ones(ds, tmp_path: Path) -> None:
    """Plots left from an earlier evaluation into the same --out would read as this one's."""
    out = tmp_path / "eval"
    first = evaluate_retrieval(ds.store_path, baselines="prototype,ridge", spaces="whitened", n_boot=10, out_dir=out)
    assert {Path(first.files["rank_plot"]).name, Path(first.files["projection_plot"]).name} <= \
        {p.name for p in out.iterdir()}
    evaluate_retrieval(ds.store_path, baselines="random", spaces="raw", n_boot=10, out_dir=out, plots=False)
    assert sorted(p.name for p in out.iterdir()) == ["ranks.npz", "retrieval.json", "table.txt"]
