"""The ridge-residual predictor: closed-form ridge on train as the starting point, a learned residual."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _predict_fixtures import chance_mrr, make_store, mrr  # noqa: E402

from codejepa.embed.store import open_store  # noqa: E402
from codejepa.predict import load_predictor  # noqa: E402
from codejepa.predict.config import ConfigError, resolve_config  # noqa: E402
from codejepa.predict.data import FeatureTable  # noqa: E402
from codejepa.predict.models import build_model  # noqa: E402
from codejepa.predict.normalize import compute_stats  # noqa: E402
from codejepa.predict.ridge import (  # noqa: E402
    RIDGE_ALPHAS,
    fit_ridge,
    fit_ridge_views,
    init_input_stats,
    init_linear_path,
)
from codejepa.predict.train import feature_spec, train  # noqa: E402

torch.set_num_threads(1)

TINY = {"model.mlp_hidden": "64", "train.batch_size": 64, "train.epochs": 12, "train.plot_every_s": -1}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s.h5")


def numpy_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Independent closed form: (XcᵀXc + λI)⁻¹ XcᵀYc with λ relative to the mean eigenvalue."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    g = xc.T @ xc
    lam = alpha * np.trace(g) / len(g)
    w = np.linalg.solve(g + lam * np.eye(len(g)), xc.T @ yc)
    return w, ym - xm @ w


def test_fit_ridge_is_the_closed_form_and_picks_lambda_on_val() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12))
    w_true = rng.normal(size=(12, 8))
    y = x @ w_true + 0.5 * rng.normal(size=(300, 8))
    xt, yt, xv, yv = (torch.from_numpy(a) for a in (x[:200], y[:200], x[200:], y[200:]))
    sol, scores = fit_ridge(xt, yt, xv, yv, alpha=0.1)
    w, b = numpy_ridge(x[:200], y[:200], 0.1)
    assert np.allclose(sol.weight.numpy(), w, atol=1e-4) and np.allclose(sol.bias.numpy(), b, atol=1e-4)
    assert list(scores) == ["0.1"]
    best, grid = fit_ridge(xt, yt, xv, yv)  # λ from the grid: the best val MRR wins
    assert len(grid) > 3 and grid[f"{best.alpha:g}"] == max(grid.values())

def test_each_lambda_is_scored_by_val_retrieval_of_its_train_fit() -> None:
    """λ is a hyper-parameter: each one's score must be the val split's MRR of the ridge fitted
    on train (computed here independently). Scoring it on the train split itself would favour
    the least regularised λ whatever held-out data say."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(140, 16))
    y = x @ rng.normal(size=(16, 6)) + 3.0 * rng.normal(size=(140, 6))
    xt, yt, xv, yv = (torch.from_numpy(a) for a in (x[:40], y[:40], x[40:], y[40:]))
    best, grid = fit_ridge(xt, yt, xv, yv)
    want = {}
    for a in RIDGE_ALPHAS:
        w, b = numpy_ridge(x[:40], y[:40], a)
        want[f"{a:g}"] = mrr(x[40:] @ w + b, y[40:])
    assert grid == pytest.approx(want, abs=1e-6)
    assert best.alpha == max(RIDGE_ALPHAS, key=lambda a: want[f"{a:g}"]) == 0.3  # train MRR would pick the smallest


def ridge_started(st, cfg) -> tuple[torch.nn.Module, Any, Any, dict[str, Any]]:
    """A model of ``cfg`` with train statistics and its linear path at train ridge (λ 0.1)."""
    tr, va = st.indices("train"), st.indices("val")
    stats = compute_stats(st, tr, whiten_shrink=cfg.norm.whiten_shrink)
    model = build_model(cfg, st.meta.hidden_size)
    model.norm.load(stats)
    spec = feature_spec(cfg, stats)
    train_tab = FeatureTable(st, tr, spec)
    if getattr(model, "view_mu", None) is not None:
        init_input_stats(model, train_tab)
    info = init_linear_path(model, train_tab, FeatureTable(st, va, spec), alpha=0.1)
    return model, stats, spec, info


def test_linear_path_starts_at_train_ridge_in_the_whitened_space(store_path: Path) -> None:
    cfg = resolve_config("mlp", preset="ridge-residual", overrides={**TINY, "model.ridge_alpha": 0.1,
                                                                       "model.input_views": "mean"})
    with open_store(store_path) as st:
        tr, te = st.indices("train"), st.indices("test")
        model, stats, spec, info = ridge_started(st, cfg)
        assert info["alpha"] == 0.1 and info["train_records"] == len(tr)
        test_tab = FeatureTable(st, te, spec)
        model.eval()
        with torch.no_grad():
            pred = model({"sig": torch.from_numpy(test_tab.sig)})["pooled"].numpy()
        # the same ridge computed independently from the train split's pooled arrays
        tab = FeatureTable(st, tr, spec)
        x = (tab.sig - stats.sig_mu) / stats.sig_sd
        z = (tab.body - stats.pool_mu) @ stats.pool_W
        w, b = numpy_ridge(x, z, 0.1)
        ref = ((test_tab.sig - stats.sig_mu) / stats.sig_sd) @ w + b
        assert np.allclose(pred, ref, atol=1e-3)  # the residual MLP starts at exactly zero
        target = (test_tab.body - stats.pool_mu) @ stats.pool_W
        assert mrr(pred, target) > 4 * chance_mrr(len(te))


def test_linear_path_lambda_is_scored_on_val(tmp_path: Path) -> None:
    """The linear path's λ is chosen by the val MRR of the train-split ridge: the score it logs is
    the val table's retrieval by the path it writes (scored on train, the least regularised λ wins).
    A noisy store: on the module's, val retrieval is perfect at every λ."""
    noisy = make_store(tmp_path / "noisy.h5", n_repos=6, per_repo=40, noise=3.0)
    cfg = resolve_config("mlp", preset="ridge-residual", overrides={**TINY, "model.input_views": "mean"})
    with open_store(noisy) as st:
        tr, va = st.indices("train"), st.indices("val")
        stats = compute_stats(st, tr, whiten_shrink=cfg.norm.whiten_shrink)
        model = build_model(cfg, st.meta.hidden_size)
        model.norm.load(stats)
        spec = feature_spec(cfg, stats)
        train_tab, val_tab = FeatureTable(st, tr, spec), FeatureTable(st, va, spec)
    if getattr(model, "view_mu", None) is not None:
        init_input_stats(model, train_tab)
    info = init_linear_path(model, train_tab, val_tab)
    with torch.no_grad():
        pred = model.skip(model.features({"sig": torch.from_numpy(val_tab.sig)}))
        body = model.norm.body_to_norm(torch.from_numpy(val_tab.body))
    assert info["val_mrr"] == pytest.approx(mrr(pred.numpy(), body.numpy()), abs=1e-6)
    assert info["val_mrr"] < 0.9  # far from perfect: the λ grid has something to choose
    assert info["val_mrr_by_alpha"][f"{info['alpha']:g}"] == max(info["val_mrr_by_alpha"].values())


def test_ridge_residual_preset_learns_and_keeps_ridge_in_the_checkpoint(store_path: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "rr"
    events: list[dict] = []
    summary = train(store_path, resolve_config("mlp", preset="ridge-residual", overrides=TINY), run, device="cpu",
                    on_event=lambda e: events.append(e) if e["event"] in ("ridge_init", "epoch") else None)
    init = next(e for e in events if e["event"] == "ridge_init")
    best = summary["best"]
    assert best["val_mrr"] > 4 * best["val_chance_mrr"] and best["val_rank1"] > 0.3
    # training moved away from the ridge start only where val retrieval agreed
    assert best["val_mrr"] >= init["val_mrr"] - 0.02
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log].count("ridge_init") == 1
    # the ridge start is validated as "epoch 0", in the same space as ridge's own val MRR
    start = next(e for e in log if e["event"] == "start_val")
    assert start["epoch"] == 0 and start["val_mrr"] == pytest.approx(init["val_mrr"], abs=1e-4)
    assert summary["best_val_mrr"] >= start["val_mrr"]
    p = load_predictor(run)  # the ridge weights travel in the checkpoint: nothing else is needed
    assert p.model.skip is not None and float(p.model.skip.weight.detach().abs().sum()) > 0
    with open_store(store_path) as st:
        te = st.indices("test")
        pred = p.predict_pooled(st, te)
        bodies = st.pooled("body", te)
        mu = st.pooled("body", st.indices("train")).mean(0)
        assert mrr(pred - mu, bodies - mu) > 3 * chance_mrr(len(te))
    # resuming continues the trained weights: ridge is not fitted again, and the curves still
    # draw the start's val MRR (read back from the log) as the line the residual must beat
    import codejepa.predict.train as train_mod

    drawn: list[Any] = []
    monkeypatch.setattr(train_mod, "write_curves", lambda history, path, title, space, start_mrr: drawn.append(start_mrr))
    train(store_path, resolve_config("mlp", preset="ridge-residual",
                                     overrides={**TINY, "train.epochs": 13, "train.plot_every_s": 0}), run,
          device="cpu", resume=True)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log].count("ridge_init") == 1
    assert drawn == [pytest.approx(start["val_mrr"])]


def test_a_residual_that_only_loses_on_val_falls_back_to_its_ridge_start(store_path: Path, tmp_path: Path) -> None:
    # A learning rate this large wrecks the residual in its first steps: every epoch is below
    # the start on val, so best.pt must be the untouched ridge start.
    cfg = resolve_config("mlp", preset="ridge-residual", overrides={**TINY, "train.epochs": 2, "optim.lr": 3.0,
                                                                      "optim.warmup_steps": 0})
    run = tmp_path / "wrecked"
    summary = train(store_path, cfg, run, device="cpu")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    start = next(e for e in log if e["event"] == "start_val")
    epochs = [e for e in log if e["event"] == "epoch"]
    assert len(epochs) == 2 and all(e["val_mrr"] < start["val_mrr"] for e in epochs)
    assert summary["best_epoch"] == 0 and summary["best"]["val_mrr"] == start["val_mrr"]
    p = load_predictor(run)
    with open_store(store_path) as st:
        va = st.indices("val")
        pred = torch.from_numpy(p.predict_pooled(st, va, normalized=True))
        body = p.model.norm.body_to_norm(torch.from_numpy(st.pooled("body", va)))
    assert mrr(pred.numpy(), body.numpy()) == pytest.approx(start["val_mrr"], abs=1e-4)  # best.pt is the start


def test_an_epoch_that_only_ties_the_best_does_not_replace_it(store_path: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """best.pt moves only when val MRR improves: an epoch that merely ties (here every one, by a
    val MRR held constant) leaves the earlier best, the ridge start, in place."""
    from codejepa.predict import train as train_module

    real = train_module.evaluate_table
    monkeypatch.setattr(train_module, "evaluate_table", lambda *a, **k: {**real(*a, **k), "val_mrr": 0.25})
    cfg = resolve_config("mlp", preset="ridge-residual", overrides={**TINY, "train.epochs": 2})
    summary = train(store_path, cfg, tmp_path / "tied", device="cpu")
    assert summary["best_epoch"] == 0 and summary["best_val_mrr"] == 0.25
    assert torch.load(tmp_path / "tied" / "best.pt", weights_only=True)["epoch"] == 0


def test_curves_draw_the_ridge_start_as_a_reference_line() -> None:
    from codejepa.predict.train import curves_figure

    keys = ("train_loss", "val_loss", "val_mrr", "val_rank1", "val_chance_mrr", "val_cos", "val_cos_raw",
            "pred_cos_to_mean", "target_cos_to_mean", "pred_eff_rank", "target_eff_rank")
    history = [{"epoch": e, **{k: 0.1 * e for k in keys}} for e in (1, 2)]
    with_start = curves_figure(history, start_mrr=0.234)
    labels = [ln.get_label() for ln in with_start.axes[1].get_lines()]
    assert "ridge start: val MRR 0.234" in labels
    assert not any(lb.startswith("ridge start") for lb in
                   (ln.get_label() for ln in curves_figure(history).axes[1].get_lines()))
    # each cosine once: a raw-space run (the seed's) has no second space to draw
    cos_labels = [ln.get_label() for ln in curves_figure(history, space="raw").axes[2].get_lines()]
    assert len(cos_labels) == len(set(cos_labels)) and "val cos (raw)" in cos_labels
    assert "val cos (whitened)" in [ln.get_label() for ln in curves_figure(history, space="whitened").axes[2].get_lines()]
    # a one-epoch run (the demo's) still shows every series, on a whole-epoch axis
    one = curves_figure(history[:1])
    for ax in one.axes:
        assert list(ax.get_xticks()) == [1]
        assert all(ln.get_marker() not in ("None", "", None) for ln in ax.get_lines() if len(ln.get_xdata()) == 1)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_frozen_linear_path_and_linear_only_predictor(store_path: Path, tmp_path: Path) -> None:
    over = {**TINY, "train.epochs": 3, "model.linear_trainable": False, "model.ridge_alpha": 0.1,
            "model.input_views": "mean"}
    train(store_path, resolve_config("mlp", preset="ridge-residual", overrides=over), tmp_path / "frozen", device="cpu")
    # last.pt: the trained weights (best.pt may be the untouched start when no epoch beat it)
    ck = torch.load(tmp_path / "frozen" / "last.pt", weights_only=True)["model"]
    with open_store(store_path) as st:
        cfg = resolve_config("mlp", preset="ridge-residual", overrides=over)
        stats = compute_stats(st, st.indices("train"), whiten_shrink=cfg.norm.whiten_shrink)
        m = build_model(cfg, st.meta.hidden_size)
        m.norm.load(stats)
        spec = feature_spec(cfg, stats)
        init_linear_path(m, FeatureTable(st, st.indices("train"), spec), FeatureTable(st, st.indices("val"), spec), 0.1)
    assert torch.allclose(ck["skip.weight"], m.skip.weight, atol=1e-4)  # frozen: still the ridge solution
    last = max((k for k in ck if k.startswith("net.") and k.endswith(".weight")), key=lambda k: int(k.split(".")[1]))
    assert float(ck[last].abs().sum()) > 0  # the residual (zero at the start) trained
    lin = build_model(resolve_config("mlp", preset="ridge-residual", overrides={"model.mlp_hidden": ""}), 16)
    assert lin.net is None and sum(p.numel() for p in lin.parameters()) == 2 * 16 * 16 + 16  # (mean, last) → d
    with pytest.raises(ConfigError, match="linear_skip"):
        resolve_config("mlp", overrides={"model.linear_skip": "lasso"})


def test_input_views_are_the_signature_mean_and_last_token_and_train(store_path: Path, tmp_path: Path) -> None:
    over = {**TINY, "train.epochs": 4, "model.input_views": "mean,last,context"}
    cfg = resolve_config("mlp", preset="ridge-residual", overrides=over)
    with open_store(store_path) as st:
        tr = st.indices("train")
        stats = compute_stats(st, tr)
        tab = FeatureTable(st, tr[:20], feature_spec(cfg, stats))
        d = st.meta.hidden_size
        assert tab.sig.shape == (20, 3 * d)
        seg = np.asarray(st.f["inputs/segments"][: len(st)])
        for k, rec in enumerate(tr[:20]):
            inp = st.inputs(int(rec))
            (c0, c1), (s0, s1) = seg[rec]
            ok = ~inp.special & (np.linalg.norm(inp.states, axis=1) <= stats.in_outlier_norm)
            sig = inp.states[s0:s1][ok[s0:s1]]
            ctx = inp.states[c0:c1][ok[c0:c1]]
            assert np.allclose(tab.sig[k, :d], sig.mean(0), atol=1e-5)
            assert np.allclose(tab.sig[k, d : 2 * d], sig[-1], atol=1e-5)
            assert np.allclose(tab.sig[k, 2 * d :], ctx.mean(0) if len(ctx) else 0.0, atol=1e-5)
    run = tmp_path / "views"
    best = train(store_path, cfg, run, device="cpu")["best"]
    assert best["val_mrr"] > 4 * best["val_chance_mrr"]
    p = load_predictor(run)
    assert float(p.model.view_sd.min()) > 0 and p.model.skip.in_features == 3 * p.hidden_size
    with open_store(store_path) as st:  # the input statistics are the train split's, not val's
        views = FeatureTable(st, st.indices("train"), feature_spec(p.config, p.stats)).sig.astype(np.float64)
    np.testing.assert_allclose(p.model.view_mu.numpy(), views.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(p.model.view_sd.numpy(), views.std(0), rtol=1e-3, atol=1e-3)
    with open_store(store_path) as st:
        assert p.predict_pooled(st, st.indices("test")).shape == (len(st.indices("test")), st.meta.hidden_size)
    with pytest.raises(ConfigError, match="input_views"):
        resolve_config("mlp", overrides={"model.input_views": "mean,body"})
    with pytest.raises(ConfigError, match="input_views"):  # without a linear path it reads tokens only
        resolve_config("transformer", overrides={"model.input_views": "mean,last"})


TINY_TFR = {**TINY, "model.width": 32, "model.depth": 1, "model.heads": 2, "model.body_slots": 4,
            "model.max_input_tokens": 32, "train.batch_size": 32, "train.epochs": 4}


def test_transformer_residual_starts_at_ridge_learns_and_never_sees_the_body(store_path: Path, tmp_path: Path) -> None:
    cfg = resolve_config("transformer", preset="transformer-residual", overrides={**TINY_TFR, "model.ridge_alpha": 0.1})
    with open_store(store_path) as st:
        tr, te = st.indices("train"), st.indices("test")
        model, stats, spec, _ = ridge_started(st, cfg)
        train_tab, test_tab = FeatureTable(st, tr, spec), FeatureTable(st, te, spec)
        model.eval()
        with torch.no_grad():
            b = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in test_tab.batch(np.arange(len(te))).items()
                 if k != "index"}
            pred = model(b)["pooled"].numpy()
        # at the start the transformer and its MLP add exactly nothing to the train ridge
        x = (train_tab.sig - model.view_mu.numpy()) / model.view_sd.numpy()
        w, bias = numpy_ridge(x, (train_tab.body - stats.pool_mu) @ stats.pool_W, 0.1)
        ref = ((test_tab.sig - model.view_mu.numpy()) / model.view_sd.numpy()) @ w + bias
        assert np.allclose(pred, ref, atol=1e-3)
    run = tmp_path / "tfr"
    summary = train(store_path, cfg, run, device="cpu")
    assert summary["best"]["val_mrr"] > 4 * summary["best"]["val_chance_mrr"]
    p = load_predictor(run, checkpoint="last")  # trained weights; best.pt may be the start itself
    assert float(p.model.head.weight.detach().abs().sum()) > 0  # the attention path trained away from zero
    other = make_store(tmp_path / "other_bodies.h5", body_seed=7, body_len=(1, 40))
    with open_store(store_path) as a, open_store(other) as b2:
        idx = a.indices()
        assert not np.allclose(a.pooled("body", idx[:5]), b2.pooled("body", idx[:5]))
        assert np.array_equal(p.predict_pooled(a, idx), p.predict_pooled(b2, idx))  # bodies never reach it


def test_ridge_path_keeps_the_subset_of_views_that_val_prefers() -> None:
    """A view that only adds noise (and, on few train rows, overfits) is left out of the ridge
    path; a view that carries the signal is kept."""
    rng = np.random.default_rng(1)
    n, d = 300, 10
    useful = rng.normal(size=(n, d))
    y = useful @ rng.normal(size=(d, d)) + 2.0 * rng.normal(size=(n, d))
    noise = rng.normal(size=(n, 3 * d))  # three views of pure noise
    x = torch.from_numpy(np.concatenate([useful, noise], 1))
    yt = torch.from_numpy(y)
    sol, chosen, scores = fit_ridge_views(x[:60], yt[:60], x[60:], yt[60:], 4, alpha=0.01)
    assert chosen == (0,) and len(scores) == 15 and scores[(0,)] == max(scores.values())
    assert sol.weight.shape == (4 * d, d) and not sol.weight[d:].any()
    alone, _ = fit_ridge(x[:60, :d], yt[:60], x[60:, :d], yt[60:], alpha=0.01)
    assert torch.allclose(sol.weight[:d], alone.weight) and torch.allclose(sol.bias, alone.bias)
    assert scores[(0,)] > 1.5 * scores[(0, 1, 2, 3)]
    # The signal in the second view: the subset must hold it.
    x2 = torch.from_numpy(np.concatenate([noise[:, :d], useful], 1))
    _, chosen2, _ = fit_ridge_views(x2[:60], yt[:60], x2[60:], yt[60:], 2, alpha=0.01)
    assert 1 in chosen2


def test_residual_preset_logs_the_views_its_ridge_path_reads(store_path: Path, tmp_path: Path) -> None:
    over = {**TINY, "train.epochs": 1, "model.input_views": "mean,last,context", "model.linear_trainable": False}
    run = tmp_path / "select"
    train(store_path, resolve_config("mlp", preset="ridge-residual", overrides=over), run, device="cpu")
    init = next(json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
                if json.loads(line).get("event") == "ridge_init")
    assert set(init["val_mrr_by_views"]) == {"mean", "last", "context", "mean,last", "mean,context",
                                              "last,context", "mean,last,context"}
    assert init["val_mrr"] == max(init["val_mrr_by_views"].values())
    kept = init["views"].split(",")
    w = load_predictor(run).model.skip.weight.detach()
    d = w.shape[0]
    for k, v in enumerate(("mean", "last", "context")):
        assert bool(w[:, k * d : (k + 1) * d].any()) == (v in kept)
    run_all = tmp_path / "all"
    train(store_path, resolve_config("mlp", preset="ridge-residual", overrides={**over, "model.ridge_views": "all"}),
          run_all, device="cpu")
    assert all(load_predictor(run_all).model.skip.weight.detach()[:, k * d : (k + 1) * d].any() for k in range(3))
    with pytest.raises(ConfigError, match="ridge_views"):
        resolve_config("mlp", overrides={"model.ridge_views": "some"})
