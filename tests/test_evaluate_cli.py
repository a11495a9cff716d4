"""The evaluate CLI, and a real predictor run (codejepa.predict) evaluated end to end."""

from __future__ import annotations

import json
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
    assert "ridge@whitened vs bm25@-: rank@1" in r.output and "p = " in r.output
    r = runner.invoke(app, ["evaluate", "retrieval", str(ds.store_path), "--pool", "50", "--space", "raw",
                            "--baselines", "oracle,random", "--no-plots", "--n-boot", "50"])
    assert r.exit_code == 0, r.output
    assert "random-50" in r.output


def test_cli_errors_are_one_line(ds, tmp_path: Path) -> None:
    for args in (["evaluate", "retrieval", str(tmp_path / "nope.h5")],
                 ["evaluate", "retrieval", str(ds.store_path), "--space", "curved"],
                 ["evaluate", "retrieval", str(ds.store_path), "--compare", "just-one"],
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
    # The run is compared with the best baseline of each space automatically.
    assert any(c["a"] == f"{name}@whitened" for c in data["comparisons"])
    # A run trained on another store is refused with one clear line.
    other = make_dataset(tmp_path, name="other")
    with pytest.raises(EvaluateError, match="trained against store fingerprint"):
        evaluate_retrieval(other.store_path, [run], baselines="none")
    r = runner.invoke(app, ["evaluate", "retrieval", str(other.store_path), "--run", str(run), "--baselines", "none"])
    assert r.exit_code == 1 and "trained against store fingerprint" in r.output
