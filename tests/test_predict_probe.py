"""Training for the probe mix (loss.probe_weight): the mix, the loss, the selection, the checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _evaluate_fixtures import write_view  # noqa: E402
from _predict_fixtures import make_store, train_killed_at  # noqa: E402

from codejepa.embed.probe import default_probe_path  # noqa: E402
from codejepa.embed.store import open_store  # noqa: E402
from codejepa.predict import load_predictor, losses  # noqa: E402
from codejepa.predict.config import ConfigError, LossConfig, resolve_config  # noqa: E402
from codejepa.predict.probe import ProbeViewError  # noqa: E402
from codejepa.predict.train import TrainingError, evaluate_table, feature_spec, make_table, train  # noqa: E402

torch.set_num_threads(1)

OVER = {"model.mlp_hidden": "32", "train.batch_size": 32, "train.epochs": 2, "train.plot_every_s": -1,
        "loss.probe_weight": 0.5}


def cfg_for(**extra: object):
    return resolve_config("mlp", preset="ridge-residual", overrides={**OVER, **extra})


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s.h5", n_repos=6, per_repo=40, noise=3.0)


def oracle_view(store_path: Path, out: Path, probe_record: int = 0) -> Path:
    """A view that is each record's own pooled body: no real view may carry the body, but here
    it makes the mix's effect on the val ranking unmistakable."""
    with open_store(store_path) as st:
        view = st.pooled("body", st.indices())
    return write_view(store_path, out, view, probe_record=probe_record)


def test_probe_mix_is_the_evaluate_stages_mix_and_trains_the_prediction_only() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(6, 8, generator=g, requires_grad=True)
    view = torch.randn(6, 8, generator=g, requires_grad=True)
    m = losses.probe_mix(pred, view, 0.3)
    ref = F.normalize(0.7 * F.normalize(pred, dim=-1) + 0.3 * F.normalize(view, dim=-1), dim=-1)
    assert torch.allclose(m, ref * pred.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(losses.probe_mix(pred, view, 0.0), pred, atol=1e-6)
    m.sum().backward()
    assert pred.grad is not None and view.grad is None  # the view is a constant of the loss
    # InfoNCE ranks the mix; the regression term reads the prediction alone
    target = torch.randn(6, 8, generator=g)
    cfg = LossConfig(regression="mse", infonce_weight=1.0, temperature=0.1, probe_weight=0.3)
    _, parts = losses.compute_loss({"pooled": pred}, target, None, cfg, view=view)
    assert torch.isclose(parts["infonce"], losses.infonce(losses.probe_mix(pred, view, 0.3), target, 0.1))
    assert torch.isclose(parts["regression"], ((pred - target) ** 2).mean())
    _, plain = losses.compute_loss({"pooled": pred}, target, None, LossConfig(infonce_weight=1.0, temperature=0.1),
                                   view=view)  # weight 0: the view is not read
    assert torch.isclose(plain["infonce"], losses.infonce(pred, target, 0.1))


def test_training_ranks_and_selects_on_the_mix(store_path: Path, tmp_path: Path) -> None:
    view = oracle_view(store_path, tmp_path / "oracle.probe.h5")
    events: list[dict] = []
    train(store_path, cfg_for(), tmp_path / "mix", device="cpu", probe=view, on_event=events.append)
    train(store_path, cfg_for(**{"loss.probe_weight": 0.0}), tmp_path / "plain", device="cpu")
    log = {name: [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
           for name in ("mix", "plain")}
    start = {name: next(e for e in log[name] if e["event"] == "start_val") for name in log}
    # the same ridge start: mixed half-way with each body itself, val finds nearly every body
    assert start["mix"]["val_mrr"] > 0.95 > start["plain"]["val_mrr"] + 0.1
    assert start["mix"]["val_cos"] == pytest.approx(start["plain"]["val_cos"])  # diagnostics: the prediction's own
    # training steps read each batch row's own view: mixed with its own body, InfoNCE is easy (a
    # view of other records, e.g. a misaligned index, makes it harder than no view at all)
    losses_of = {name: [e["train_loss"] for e in log[name] if e["event"] == "epoch"] for name in log}
    assert all(m < 0.8 * p for m, p in zip(losses_of["mix"], losses_of["plain"], strict=True))
    assert any(e["event"] == "probe" and e["weight"] == 0.5 for e in events)
    info = json.loads((tmp_path / "mix" / "run.json").read_text())
    with open_store(store_path) as st:
        assert info["probe"]["file"] == str(view.resolve()) and info["probe"]["probe_records"] == [str(st.ids[0])]
        # the checkpoint predicts without any view; val's selection MRR was the mix's
        p = load_predictor(tmp_path / "mix")
        val = st.indices("val")
        tab = make_table(st, val, feature_spec(p.config, p.stats), 1.0)
        alone = evaluate_table(p.model, tab, p.config, torch.device("cpu"))
    best = max(e["val_mrr"] for e in log["mix"] if e["event"] in ("start_val", "epoch"))
    assert alone["val_mrr"] < best - 0.1
    assert json.loads((tmp_path / "plain" / "run.json").read_text())["probe"] is None


def test_the_view_is_checked_before_training(store_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="probe_weight"):
        cfg_for(**{"loss.probe_weight": 1.0})  # the view alone trains nothing
    with pytest.raises(ConfigError, match="infonce"):
        resolve_config("mlp", overrides={"loss.probe_weight": 0.5})  # the seed MLP has no InfoNCE term
    with pytest.raises(ProbeViewError, match="needs the probe view"):  # no STORE.probe.h5 beside the store
        train(store_path, cfg_for(), tmp_path / "none", device="cpu")
    good = oracle_view(store_path, tmp_path / "v.probe.h5")
    with pytest.raises(TrainingError, match="only with loss.probe_weight"):
        train(store_path, cfg_for(**{"loss.probe_weight": 0.0}), tmp_path / "zero", device="cpu", probe=good)
    with open_store(store_path) as st:
        first_val = int(st.indices("val")[0])
        n = len(st)
    leaky = oracle_view(store_path, tmp_path / "leaky.probe.h5", probe_record=first_val)
    with pytest.raises(ProbeViewError, match="not in this split's train part"):
        train(store_path, cfg_for(), tmp_path / "leaky", device="cpu", probe=leaky)
    with open_store(store_path) as st:
        view = st.pooled("body", st.indices())
    part = write_view(store_path, tmp_path / "part.probe.h5", view, upto=n - 5)
    with pytest.raises(ProbeViewError, match=f"covers {n - 5} of {n}"):
        train(store_path, cfg_for(), tmp_path / "part", device="cpu", probe=part)
    assert not any((tmp_path / d / "best.pt").exists() for d in ("none", "zero", "leaky", "part"))


def test_a_resumed_run_reads_the_view_it_started_with(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s.h5", n_repos=6, per_repo=40, noise=3.0)
    rng = np.random.default_rng(0)
    with open_store(store) as st:
        view = st.pooled("body", st.indices()) + 3.0 * rng.normal(size=(len(st), st.meta.hidden_size))
    write_view(store, default_probe_path(store), view)  # the default: the store's sidecar
    cfg = cfg_for(**{"train.checkpoint_every_steps": 2, "train.epochs": 3})
    train(store, cfg, tmp_path / "a", device="cpu")
    train_killed_at(store, cfg, tmp_path / "b", 4)  # after the step-2 checkpoint
    # another view (other probes) is refused; the recorded one continues to the same weights
    other = write_view(store, tmp_path / "other.probe.h5", view, probe_record=1)
    with pytest.raises(ProbeViewError, match="not the probe view this run was trained with"):
        train(store, None, tmp_path / "b", device="cpu", resume=True, probe=other)
    train(store, None, tmp_path / "b", device="cpu", resume=True)
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_passes_the_view_and_evaluate_says_what_the_run_is_for(store_path: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from codejepa.cli import app
    from codejepa.evaluate.retrieval import LoadedRun, _probe_trained_note

    view = oracle_view(store_path, tmp_path / "o.probe.h5")
    args = ["predict", "train", str(store_path), "--model", "mlp", "--preset", "ridge-residual",
            *[a for k, v in OVER.items() for a in ("--set", f"{k}={v}")], "--set", "train.epochs=1"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run"), "--probe", str(view)])
    assert r.exit_code == 0, r.output
    assert "mixed with its probe view at weight 0.5" in r.output
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run2"), "--probe", str(tmp_path / "missing.h5")])
    assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output
    run = LoadedRun("m", str(tmp_path / "run"), load_predictor(tmp_path / "run"), {})
    note = _probe_trained_note(run, None)
    assert note and "loss.probe_weight = 0.5" in note[0] and "--probe" in note[0]
    assert _probe_trained_note(run, view) == []
