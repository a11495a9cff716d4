"""The benchmark scripts on a machine without the shared folder beside the repository (a clone
in a new folder): one clear line that names what is missing and how to name it, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["bench/pipeline.py", "bench/corpus_build.py"])
def test_a_missing_shared_folder_is_one_clear_line(script: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / script), "--shared", str(tmp_path / "nowhere"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert f"{tmp_path / 'nowhere' / 'make-repos'} not found" in r.stderr and "--shared DIR" in r.stderr
    assert not (tmp_path / "out" / "repos").exists()


@pytest.mark.parametrize("args, said", [
    (["--stages", "embd"], "--stages: unknown stage(s) embd"),  # a typo ran nothing and exited 0
    (["--stages", "evaluate", "--models", "transformer-residul"], "--models: unknown preset(s) transformer-residul"),
    (["--folds", "2"], "--folds 2: 0 (the corpus's own split) or at least 3"),  # refused only after hours before
    (["--out", "afile"], "--out afile:"),  # a file in the way: a FileExistsError traceback before
])
def test_the_pipeline_refuses_a_bad_request_before_any_stage(args: list[str], said: str, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    r = subprocess.run([sys.executable, str(ROOT / "bench/pipeline.py"), "--shared", str(tmp_path / "nowhere"),
                        *(["--out", str(tmp_path / "out")] if "--out" not in args else []), *args],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith(f"pipeline: {said}"), r.stderr
    assert not (tmp_path / "out").exists()


def test_ceilings_refuses_no_draws_and_an_unwritable_json_before_computing(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _evaluate_fixtures import make_dataset

    store = make_dataset(tmp_path / "d", repos={"train": 4, "val": 1, "test": 1}, per_repo=8).store_path
    for args, said in ((["--seeds", "0"], "seeds (draws per train fraction) must be ≥ 1, not 0"),
                       (["--json", str(tmp_path)], "a folder"),
                       (["--json", str(tmp_path / "no" / "c.json")], "its folder does not exist")):
        r = subprocess.run([sys.executable, str(ROOT / "bench/ceilings.py"), str(store), *args],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode != 0 and "Traceback" not in r.stderr and said in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_damaged_timings_record_is_set_aside_not_a_traceback_after_the_stages(tmp_path: Path) -> None:
    import json
    import shutil

    sys.path.insert(0, str(Path(__file__).parent))
    from _evaluate_fixtures import make_dataset

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(make_dataset(tmp_path / "d", repos={"train": 4, "val": 1, "test": 1}, per_repo=8).store_path,
                out / "store-Lmid-in-context.h5")
    (out / "timings-Lmid-in-context.json").write_text("{broken")
    r = subprocess.run([sys.executable, str(ROOT / "bench/pipeline.py"), "--out", str(out), "--stages", "ceilings"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "timings-Lmid-in-context.json: unreadable" in r.stderr
    assert (out / "timings-Lmid-in-context.json.damaged").read_text() == "{broken"
    [record] = json.loads((out / "timings-Lmid-in-context.json").read_text())
    assert record["stages"] == ["ceilings"] and record["timings_s"]["ceilings_s"] > 0
    assert (out / "ceilings-Lmid-in-context.json").is_file()


def test_a_make_repos_that_cannot_run_is_one_clear_line(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "make-repos").write_text("#!/bin/sh\n")  # present, but not executable
    (shared / "python-40.txt").write_text("pypi:example==1.0\n")
    r = subprocess.run([sys.executable, str(ROOT / "bench/pipeline.py"), "--shared", str(shared),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert f"pipeline: cannot run {shared / 'make-repos'}" in r.stderr


@pytest.mark.parametrize("script", ["bench/embed_throughput.py", "bench/probe_throughput.py"])
def test_a_throughput_bench_prints_its_figures_and_leaves_no_folder_behind(
        script: str, teachers: dict, tmp_path: Path) -> None:
    """Without --workdir the stand-in corpus, store and random teacher go to a temporary folder
    that must be gone afterwards (a Qwen2.5-Coder-3B-shaped checkpoint is gigabytes)."""
    import os

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    kind = "bidirectional" if "embed_" in script else "causal"
    args = ["--max-records", "12", "--teacher", str(teachers[kind].ref.path), "--device", "cpu", "--dtype", "float32"]
    if "embed_" in script:
        args += ["--repeats", "1", "--naive-fraction", "1"]
    else:
        args += ["--probes", "2", "--max-tokens", "256"]
    r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert ("real tok/s" if "embed_" in script else "records/s") in r.stdout
    assert list(tmpdir.iterdir()) == []


def test_the_cross_rerank_experiment_runs_and_reloads_to_the_same_figures(tmp_path: Path) -> None:
    """bench/cross_rerank.py end to end on a small store (hybrid first stage, canonical space),
    then its saved scorer evaluated again with --load: every figure must come back identical,
    and each row must be a real retrieval result over the test split's queries."""
    import json
    import os

    sys.path.insert(0, str(Path(__file__).parent))
    from _evaluate_fixtures import make_dataset

    ds = make_dataset(tmp_path, repos={"train": 8, "val": 3, "test": 4}, per_repo=25)
    small = ["--K", "10", "--Ktrain", "8", "--neg", "3", "--d", "16", "--heads", "2", "--bs", "8",
             "--threads", "1", "--first", "hybrid", "--space", "canonical"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "rr.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench/cross_rerank.py"), str(ds.store_path), *small,
                        "--epochs", "2", "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "re-ranked" in r.stdout and out.with_suffix(".pt").is_file()
    first = json.loads(out.read_text())
    assert first["n_test"] == int((ds.splits == "test").sum())
    for row in ("first stage", "re-ranked", "cross-scorer alone (top K)"):
        v = first[row]["rank@1"]
        assert 0.0 <= v["ci_low"] <= v["value"] <= v["ci_high"] <= 1.0
    assert first["val_mrr"]["0.0"] > 0 and first["rerank_weight"] in [float(w) for w in first["val_mrr"]]
    again = tmp_path / "again.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench/cross_rerank.py"), str(ds.store_path), *small,
                        "--load", str(out.with_suffix(".pt")), "--out", str(again)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    second = json.loads(again.read_text())
    # Without --out the result goes beside the store, not into the folder the script ran from.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "bench/cross_rerank.py"), str(ds.store_path), *small,
                        "--load", str(out.with_suffix(".pt"))], capture_output=True, text=True, timeout=300, env=env,
                       cwd=elsewhere)
    assert r.returncode == 0, r.stderr + r.stdout
    assert (ds.store_path.parent / "cross-rerank.json").is_file() and not list(elsewhere.iterdir())
    for key in ("first stage", "re-ranked", "cross-scorer alone (top K)", "val_mrr", "rerank_weight", "hybrid_settings"):
        assert second[key] == first[key], key


def test_the_cross_rerank_first_stage_is_evaluates_row(tmp_path: Path) -> None:
    """The experiment's first stage from a trained run (--run, whitened, no corrections) ranks
    the test queries as `evaluate retrieval` ranks that run's whitened row: the re-ranking's
    figures stand on the toolkit's own pool, space and ties."""
    import json
    import os

    sys.path.insert(0, str(Path(__file__).parent))
    from _evaluate_fixtures import make_dataset

    from codejepa.evaluate import evaluate_retrieval
    from codejepa.predict.config import resolve_config
    from codejepa.predict.train import train

    ds = make_dataset(tmp_path, repos={"train": 8, "val": 3, "test": 4}, per_repo=25, duplicate_test_bodies=0)
    cfg = resolve_config("mlp", overrides={"model.mlp_hidden": "32,32", "train.batch_size": 64, "train.epochs": 3,
                                           "optim.lr": 3e-3, "train.plot_every_s": -1})
    run = tmp_path / "run"
    train(ds.store_path, cfg, run, device="cpu")
    res = evaluate_retrieval(ds.store_path, [run], baselines="ridge+last", spaces="whitened", n_boot=100,
                             out_dir=tmp_path / "eval")
    want = {m: res.row(res.runs[0]["name"], "whitened").metrics[m].value for m in ("rank@1", "mrr")}
    out = tmp_path / "rr.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench/cross_rerank.py"), str(ds.store_path), "--run", str(run),
                        "--K", "10", "--Ktrain", "8", "--neg", "3", "--d", "16", "--heads", "2", "--bs", "8",
                        "--epochs", "1", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr + r.stdout
    got = json.loads(out.read_text())["first stage"]
    for m, v in want.items():
        assert abs(got[m]["value"] - v) < 1e-6, (m, got[m]["value"], v)


def test_the_cross_rerank_experiment_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _evaluate_fixtures import make_dataset

    r = subprocess.run([sys.executable, str(ROOT / "bench/cross_rerank.py"), str(tmp_path / "none.h5")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "cross_rerank: " in r.stderr and "no such store" in r.stderr
    ds = make_dataset(tmp_path, repos={"train": 2, "val": 1, "test": 1}, per_repo=10)  # 20 train bodies
    r = subprocess.run([sys.executable, str(ROOT / "bench/cross_rerank.py"), str(ds.store_path), "--Ktrain", "32"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--Ktrain 32" in r.stderr, r.stderr
    wrong = tmp_path / "wrong.pt"
    wrong.write_bytes(b"not a state dict")
    r = subprocess.run([sys.executable, str(ROOT / "bench/cross_rerank.py"), str(ds.store_path), "--Ktrain", "8",
                        "--neg", "3", "--load", str(wrong)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "not a cross-scorer" in r.stderr, r.stderr


def test_the_pipelines_cross_stage_trains_the_scorer_once_and_reranks_both_evaluations(tmp_path: Path) -> None:
    """The opt-in cross stage: `predict cross` into runs/TAG-cross (resumed when its last.pt is
    there, skipped once its run.json holds the history), and both evaluations get --rerank with
    the rows asked for; with --folds one scorer per fold, on its split file. A stand-in
    `codejepa` on PATH records each command the pipeline runs."""
    import json
    import os

    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "codejepa"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def pipeline(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "bench/pipeline.py"), "--out", str(out), "--stages",
                               "cross,evaluate", "--models", "ridge-residual", *extra],
                              capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)

    r = pipeline("--rerank-rows", "bm25+sib")
    assert r.returncode == 0, r.stderr
    lines = calls.read_text().splitlines()
    store, cross = out / "store-Lmid-in-context.h5", out / "runs" / "Lmid-in-context-cross"
    assert lines[0] == f"predict cross {store} --out {cross}"
    evals = [ln for ln in lines if ln.startswith("evaluate retrieval")]
    assert len(evals) == 2 and all(f"--rerank {cross} --rerank-rows bm25+sib" in ln for ln in evals)

    calls.unlink()
    cross.mkdir(parents=True)
    (cross / "last.pt").write_bytes(b"")  # an interrupted scorer: continued, not started again
    assert pipeline().returncode == 0
    assert calls.read_text().splitlines()[0] == f"predict cross {store} --out {cross} --resume"
    assert "--rerank-rows *+csls+bm25+sib,bm25+sib" in calls.read_text()

    calls.unlink()
    (cross / "run.json").write_text(json.dumps({"history": [{"epoch": 1}]}))  # finished: not trained again
    assert pipeline().returncode == 0
    assert not any(ln.startswith("predict cross") for ln in calls.read_text().splitlines())

    # with folds: one scorer per fold, on that fold's split file, and each fold's evaluation re-ranked by its own
    calls.unlink()
    folds = out / "folds"
    folds.mkdir()
    for k in range(3):
        (folds / f"fold-{k}.json").write_text("{}")
    assert pipeline("--folds", "3").returncode == 0
    lines = calls.read_text().splitlines()
    for k in range(3):
        kc = folds / f"k{k}" / "Lmid-in-context-cross"
        assert f"predict cross {store} --out {kc} --splits {folds / f'fold-{k}.json'}" in lines
        ev = next(ln for ln in lines if ln.startswith("evaluate retrieval") and f"fold-{k}.json" in ln)
        assert f"--rerank {kc} " in ev and ev.endswith(f"--out {folds / f'k{k}' / 'eval-Lmid-in-context-split-rerank'}")
    assert not any(ln.startswith("predict cross") and "--splits" not in ln for ln in lines)
    assert lines[-1].startswith("evaluate folds") and lines[-1].endswith(f"--out {folds / 'pooled-Lmid-in-context-rerank'}")
