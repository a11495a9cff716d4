"""`codejepa predict train` as a user runs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _predict_fixtures import make_store  # noqa: E402

from codejepa.cli import app  # noqa: E402

torch.set_num_threads(1)
SMALL = ["--set", "model.mlp_hidden=32,16,32", "--set", "train.batch_size=64", "--set", "train.plot_every_s=-1"]


def test_cli_trains_resumes_and_reports_errors_in_one_line(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s.h5", n_repos=6, per_repo=32)
    out = tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(app, ["predict", "train", str(store), "--model", "mlp", *SMALL, "--set", "train.epochs=2",
                            "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "MRR" in r.output and (out / "best.pt").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["name"] == "seed-mlp" and cfg["train"]["epochs"] == 2
    # resume with more epochs: continues from epoch 2, the run's own config otherwise
    r = runner.invoke(app, ["predict", "train", str(store), "--out", str(out), "--resume", "--set", "train.epochs=3"])
    assert r.exit_code == 0, r.output
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log if e["event"] == "epoch"] == [1, 2, 3]
    # mistakes: one line on stderr, non-zero exit, no traceback
    for args, msg in [
        (["--model", "mlp", "--set", "optim.lrr=1", "--out", str(tmp_path / "x")], "unknown config key 'optim.lrr'"),
        (["--model", "mlp", "--out", str(out)], "already holds a run"),
        (["--model", "cnn", "--out", str(tmp_path / "y")], "--model must be mlp or transformer"),
    ]:
        r = runner.invoke(app, ["predict", "train", str(store), *args])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(app, ["predict", "train", str(tmp_path / "nope.h5"), "--model", "mlp", "--out", str(tmp_path / "z")])
    assert r.exit_code == 1 and "no such store" in r.output
