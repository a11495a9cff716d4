"""`codejepa predict train` as a user runs it."""

from __future__ import annotations

import json
import shutil
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
    out = tmp_path / "run[red]"  # brackets in a path are text, not rich markup
    runner = CliRunner()
    r = runner.invoke(app, ["predict", "train", str(store), "--model", "mlp", *SMALL, "--set", "train.epochs=2",
                            "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "MRR" in r.output and (out / "best.pt").exists() and f"→ {out}/best.pt" in r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["name"] == "seed-mlp" and cfg["train"]["epochs"] == 2
    # trained again from what the run recorded (its config.json, no --model): the same weights
    again = tmp_path / "again"
    r = runner.invoke(app, ["predict", "train", str(store), "--config", str(out / "config.json"), "--out", str(again),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads((again / "config.json").read_text()) == cfg
    a, b = (torch.load(d / "best.pt", weights_only=True)["model"] for d in (out, again))
    assert all(torch.equal(a[k], b[k]) for k in a)
    fold = tmp_path / "fold-run"  # a run of a cross-validation fold: its split file must be given again
    fold.mkdir()
    (fold / "config.json").write_text((out / "config.json").read_text())
    (fold / "run.json").write_text(json.dumps({"splits": {"file": "/cv/fold-0.json"}}))
    r = runner.invoke(app, ["predict", "train", str(store), "--config", str(fold / "config.json"), "--out",
                            str(tmp_path / "fold-again")])
    assert r.exit_code == 1 and "trained with --splits /cv/fold-0.json: pass --splits again" in " ".join(r.output.split())
    # resume with more epochs: continues from epoch 2, the run's own config otherwise
    r = runner.invoke(app, ["predict", "train", str(store), "--out", str(out), "--resume", "--set", "train.epochs=3"])
    assert r.exit_code == 0, r.output
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log if e["event"] == "epoch"] == [1, 2, 3]
    assert [e["world_size"] for e in log if e["event"] == "resume"] == [1]
    elsewhere = tmp_path / "two_ranks"  # a run started under torchrun on 2 ranks, resumed in one process
    shutil.copytree(out, elsewhere)
    info = json.loads((elsewhere / "run.json").read_text())
    (elsewhere / "run.json").write_text(json.dumps({**info, "world_size": 2}))
    r = runner.invoke(app, ["predict", "train", str(store), "--out", str(elsewhere), "--resume"])
    assert r.exit_code == 0 and "resumed on 1 rank(s); the run started on 2" in r.output, r.output
    # mistakes: one line on stderr, non-zero exit, no traceback
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(256)))
    lr_only = tmp_path / "lr.toml"
    lr_only.write_text("[optim]\nlr = 0.01\n")
    damaged, lost, bad_best, bad_last_best, bad_mid = (tmp_path / n for n in ("damaged", "lost", "bad_best",
                                                                               "bad_last_best", "bad_mid"))
    for d in (damaged, lost, bad_best, bad_last_best, bad_mid):
        shutil.copytree(out, d)
    (damaged / "config.json").write_text("{bad")
    (lost / "last.pt").unlink()
    best_before = (lost / "best.pt").read_bytes()
    for d, best_epoch in ((bad_best, 1), (bad_last_best, 3)):  # last.pt (epoch 3) names the best epoch
        ck = torch.load(d / "last.pt", weights_only=True)
        torch.save({**ck, "best_epoch": best_epoch}, d / "last.pt")
        (d / "best.pt").write_bytes(b"damaged")
    # last.pt two steps into epoch 4: the best epoch (3) is its epoch, but its weights moved on since,
    # so best.pt cannot be rewritten from it
    ck = torch.load(bad_mid / "last.pt", weights_only=True)
    torch.save({**ck, "best_epoch": 3, "step_in_epoch": 2}, bad_mid / "last.pt")
    (bad_mid / "best.pt").write_bytes(b"damaged")
    for args, msg in [
        (["--model", "mlp", "--set", "optim.lrr=1", "--out", str(tmp_path / "x")], "unknown config key 'optim.lrr'"),
        (["--model", "mlp", "--out", str(out)], "already holds a run"),
        (["--model", "cnn", "--out", str(tmp_path / "y")], "--model must be mlp or transformer"),
        (["--model", "mlp", "--device", "foo", "--out", str(tmp_path / "y")], "expected auto, cpu, cuda or cuda:N"),
        (["--model", "mlp", "--preset", "transformer-residual", "--out", str(tmp_path / "y")],
         "is a transformer preset, but --model is mlp: use --model transformer"),
        (["--model", "mlp", "--set", "model.kind=transformer", "--out", str(tmp_path / "y")],
         "model.kind = 'transformer' in --set contradicts --model mlp"),
        (["--model", "mlp", "--set", "train.checkpoint_every_steps=-5", "--out", str(tmp_path / "y")],
         "train.checkpoint_every_steps must be ≥ 0"),
        (["--model", "mlp", "--set", "model.mlp_hidden=0", "--out", str(tmp_path / "y")], "model sizes (model."),
        (["--model", "mlp", "--set", "optim.betas=[2,3]", "--out", str(tmp_path / "y")], "optim.betas must be two"),
        (["--model", "mlp", "--set", "optim.weight_decay=-1", "--out", str(tmp_path / "y")], "optim.weight_decay"),
        (["--model", "mlp", "--set", "loss.smoothl1_beta=-1", "--out", str(tmp_path / "y")], "loss.smoothl1_beta"),
        (["--model", "mlp", "--config", str(binary), "--out", str(tmp_path / "y")], "not valid TOML"),
        (["--out", str(tmp_path / "empty"), "--resume"], "no run to resume here"),
        # a preset or config file beside --resume would be silently ignored by a resume of the run's own config
        (["--out", str(out), "--resume", "--preset", "mlp-infonce"], "--model is required"),
        (["--out", str(out), "--resume", "--config", str(lr_only)], "--model is required"),  # the file names no kind
        (["--out", str(damaged), "--resume"], "a damaged run config"),
        (["--out", str(lost), "--resume"], "last.pt is missing, but log.jsonl records trained epochs"),
        (["--out", str(bad_best), "--resume"], "best.pt is damaged; last.pt (epoch 3) is intact, but the best epoch's (1)"),
        (["--out", str(bad_mid), "--resume", "--set", "train.epochs=4"],
         "best.pt is damaged; last.pt (epoch 3) is intact, but the best epoch's (3)"),
        (["--out", str(out), "--resume", "--set", "train.epochs=2"], "train.epochs = 2 is below what this run has trained (3 epochs)"),
        (["--model", "mlp", "--set", "train.seed=-1", "--out", str(tmp_path / "y")], "train.seed must be in [0, 2**32)"),
        (["--model", "mlp", "--set", "train.epochs=0", "--out", str(tmp_path / "y")], "train.epochs must be ≥ 1"),
    ]:
        r = runner.invoke(app, ["predict", "train", str(store), *args])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
    for env, msg in (({"RANK": "abc", "WORLD_SIZE": "2"}, "must be integers"), ({"WORLD_SIZE": "0"}, "need 0 <= RANK"),
                     ({"RANK": "0", "WORLD_SIZE": "2"}, "without MASTER_ADDR")):
        r = runner.invoke(app, ["predict", "train", str(store), "--model", "mlp", "--out", str(tmp_path / "y")], env=env)
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "y").exists()  # refused before anything is written
    assert (lost / "best.pt").read_bytes() == best_before  # the trained best.pt was not overwritten
    assert (bad_best / "best.pt").read_bytes() == b"damaged"  # kept for the user to restore or inspect
    # a damaged best.pt whose epoch is last.pt's own is rewritten from last.pt, with a warning
    r = runner.invoke(app, ["predict", "train", str(store), "--out", str(bad_last_best), "--resume"])
    assert r.exit_code == 0 and "rewritten from last.pt" in r.output, r.output
    best, last = (torch.load(bad_last_best / n, weights_only=True) for n in ("best.pt", "last.pt"))
    assert best["epoch"] == 3 and all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    # more epochs on a resume move the learning rate's schedule: run.json and the log's resume line say so
    r = runner.invoke(app, ["predict", "train", str(store), "--out", str(bad_last_best), "--resume",
                            "--set", "train.epochs=4"])
    assert r.exit_code == 0, r.output
    said = {"epoch": 3, "step_in_epoch": 0, "changes": {"train.epochs": [3, 4]}}
    earlier = {"epoch": 2, "step_in_epoch": 0, "changes": {"train.epochs": [2, 3]}}  # `out`'s own, copied
    assert json.loads((bad_last_best / "run.json").read_text())["resumed_with_changes"] == [earlier, said]
    resumes = [e for e in map(json.loads, (bad_last_best / "log.jsonl").read_text().splitlines()) if e["event"] == "resume"]
    assert [e.get("changes") for e in resumes] == [earlier["changes"], None, said["changes"]], resumes
    # a run folder another training holds is refused, for a resume and for a new run alike
    from codejepa.core import exclusive

    (tmp_path / "held").mkdir()
    for run_dir, args in ((out, ["--resume"]), (tmp_path / "held", ["--model", "mlp", *SMALL])):
        with exclusive(run_dir / ".lock", "test"):
            r = runner.invoke(app, ["predict", "train", str(store), "--out", str(run_dir), *args])
        assert r.exit_code == 1 and "is being written by another process" in r.output, r.output
    assert not (tmp_path / "held" / "config.json").exists()
    r = runner.invoke(app, ["predict", "train", str(store), "--out", str(tmp_path / "held"), "--model", "mlp", *SMALL,
                            "--set", "train.epochs=1"])  # an existing empty folder, once free: its lock is ours
    assert r.exit_code == 0 and (tmp_path / "held" / "best.pt").exists(), r.output
    r = runner.invoke(app, ["predict", "train", str(tmp_path / "nope.h5"), "--model", "mlp", "--out", str(tmp_path / "z")])
    assert r.exit_code == 1 and "no such store" in r.output


def test_config_prints_what_the_file_and_the_overrides_resolve_to(tmp_path: Path) -> None:
    """`predict config` shows the settings a training with the same flags would use: the TOML file
    and the --set overrides included (later wins), as JSON."""
    toml = tmp_path / "c.toml"
    toml.write_text("[optim]\nlr = 0.01\nweight_decay = 0.5\n")
    r = CliRunner().invoke(app, ["predict", "config", "--model", "transformer", "--config", str(toml),
                                 "--set", "optim.lr=0.02"])
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.stdout)
    assert (cfg["model"]["kind"], cfg["optim"]["lr"], cfg["optim"]["weight_decay"]) == ("transformer", 0.02, 0.5)
    r = CliRunner().invoke(app, ["predict", "config", "--set", "optim.lrr=1"])
    assert r.exit_code == 1 and r.output.strip().startswith("error: unknown config key") and "Traceback" not in r.output


def test_stale_statistics_say_why(tmp_path: Path) -> None:
    from codejepa.predict.train import _stats_stale

    key = {"store_fingerprint": "f", "train_records": 7, "outlier_factor": 4.0, "eps": 1e-5, "whiten_shrink": 0.1}
    p = tmp_path / "stats.pt"
    assert _stats_stale(p, key) == "missing"
    p.write_bytes(b"junk")
    assert _stats_stale(p, key) == "damaged"
    torch.save({**key, "train_records": 5}, p)
    assert "fitted on 5 train records, and this store has 7" in _stats_stale(p, key)
    torch.save({**key, "eps": 1e-3}, p)
    assert _stats_stale(p, key) == "fitted with other settings (eps)"
    torch.save(key, p)
    assert _stats_stale(p, key) is None


def test_the_resume_hint_after_an_interrupt_can_be_pasted(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import codejepa.predict.train as train_module

    calls: list[dict] = []

    def interrupted(*_a, **k):  # noqa: ANN002, ANN003, ANN202
        calls.append(k)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    store, out = tmp_path / "my store.h5", tmp_path / "my run"
    r = CliRunner().invoke(app, ["predict", "train", str(store), "--model", "mlp", "--out", str(out)])
    assert r.exit_code == 130, r.output
    assert f"codejepa predict train '{store}' --out '{out}' --resume" in r.output.replace("\n", "")
    r = CliRunner().invoke(app, ["predict", "train", str(store), "--model", "mlp", "--out", str(out),
                                 "--splits", str(tmp_path / "f.json")])  # the fold's file is part of the command
    assert f"--out '{out}' --splits {tmp_path / 'f.json'} --resume" in r.output.replace("\n", "")
    assert calls[-1]["splits"] == tmp_path / "f.json"  # and the fold's split reaches the training itself
    r = CliRunner().invoke(app, ["predict", "train", str(store), "--model", "mlp", "--out", str(out)],
                           env={"WORLD_SIZE": "2", "RANK": "0"})  # under torchrun: continue under torchrun
    assert "continue with: torchrun --nproc-per-node 2 -m codejepa.cli predict train" in r.output.replace("\n", "")


def test_a_lost_peer_rank_is_told_from_other_errors() -> None:
    from codejepa.predict.train import _lost_rank

    assert _lost_rank(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                                   "[127.0.0.1]:1234: Connection reset by peer"))
    assert not _lost_rank(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
