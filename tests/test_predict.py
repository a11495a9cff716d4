"""The predict stage: configs, models, data, training behaviour, the public API."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _predict_fixtures import chance_mrr, make_store, mrr, train_killed_at  # noqa: E402

from codejepa.core import CodejepaError  # noqa: E402
from codejepa.embed.store import open_store  # noqa: E402
from codejepa.predict import PredictorError, load_predictor  # noqa: E402
from codejepa.predict.config import ConfigError, apply_overrides, load_toml, parse_set, resolve_config  # noqa: E402
from codejepa.predict.data import FeatureSpec, input_features, pool_slots  # noqa: E402
from codejepa.predict.models import build_model, count_parameters  # noqa: E402
from codejepa.predict.train import DivergedError, TrainingError, load_checkpoint, train  # noqa: E402

torch.set_num_threads(1)

TINY_MLP = {"model.mlp_hidden": "64,32,64", "train.batch_size": 64, "train.epochs": 15, "optim.lr": 3e-3,
            "train.plot_every_s": -1}
TINY_TF = {"model.width": 32, "model.depth": 1, "model.heads": 2, "model.body_slots": 4, "model.max_input_tokens": 16,
           "train.batch_size": 64, "train.epochs": 10, "optim.warmup_steps": 5, "optim.lr": 3e-3,
           "train.plot_every_s": -1}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s.h5")


def weights(run: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return torch.load(run / name, weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


# -- config and models --------------------------------------------------------------------
def test_seed_mlp_is_the_seeds_network_with_5252608_parameters() -> None:
    cfg = resolve_config("mlp", preset="seed-mlp")
    assert count_parameters(build_model(cfg, 2048)) == 5_252_608
    assert (cfg.loss.regression, cfg.loss.infonce_weight, cfg.optim.name) == ("smoothl1", 0.0, "adam")
    assert (cfg.norm.pooled_space, cfg.norm.standardize_input) == ("raw", False)  # the seed trained on raw states
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.min_lr_ratio) == (1e-3, 1e-4, 0.0)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.model.mlp_hidden) == (256, 100, (1024, 512, 1024))


def test_config_overrides_toml_and_errors(tmp_path: Path) -> None:
    cfg = resolve_config("transformer", overrides=parse_set(
        ["optim.lr=3e-4", "model.depth=2", "train.amp=true", "model.mlp_hidden=8,4", "optim.betas=(0.8, 0.9)"]))
    assert (cfg.optim.lr, cfg.model.depth, cfg.train.amp) == (3e-4, 2, True)
    assert cfg.model.mlp_hidden == (8, 4) and cfg.optim.betas == (0.8, 0.9) and cfg.model.kind == "transformer"
    toml = tmp_path / "c.toml"
    toml.write_text('name = "mine"\n[optim]\nlr = 0.01\n[model]\nmlp_hidden = [16, 8]\n[loss]\ninfonce_weight = 1\n')
    assert load_toml(toml)["optim.lr"] == 0.01
    cfg = resolve_config("mlp", file=toml, overrides={"optim.lr": "0.02"})
    assert (cfg.name, cfg.optim.lr, cfg.model.mlp_hidden, cfg.loss.infonce_weight) == ("mine", 0.02, (16, 8), 1.0)
    # without a model the file must name its kind, as a run's config.json does; none is refused, not guessed
    with pytest.raises(ConfigError, match="--model is required"):
        resolve_config(None, file=toml)
    tfr = tmp_path / "config.json"
    tfr.write_text(json.dumps(resolve_config("transformer", overrides={"model.depth": 3}).to_dict()))
    assert (resolve_config(None, file=tfr).model.kind, resolve_config(None, file=tfr).model.depth) == ("transformer", 3)
    with pytest.raises(ConfigError, match="is a mlp preset, but the config file's model.kind is transformer: "
                                          "set model.kind = 'mlp' in the config file, or a preset of the transformer"):
        resolve_config(None, preset="ridge-residual", file=tfr)
    # an error names where the kind came from: the user gave no --model
    with pytest.raises(ConfigError, match="model.kind = 'mlp' in --set contradicts the config file's model.kind transformer"):
        resolve_config(None, file=tfr, overrides={"model.kind": "mlp"})
    foreign = tmp_path / "foreign.toml"
    foreign.write_text('[model]\nkind = "lstm"\n')
    with pytest.raises(ConfigError, match="the config file's model.kind must be mlp or transformer, not 'lstm'"):
        resolve_config(None, file=foreign)
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*optim.lr"):
        resolve_config("mlp", overrides={"optim.lrr": "1"})
    with pytest.raises(ConfigError, match="model.depth"):
        resolve_config("mlp", overrides={"model.depth": "two"})
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["optim.lr"])
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_config("mlp", preset="nope")
    with pytest.raises(ConfigError, match="model.heads"):
        resolve_config("transformer", overrides={"model.width": 30, "model.heads": 4})
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_config("mlp", file=bad)
    with pytest.raises(ConfigError, match="loss is empty"):
        apply_overrides(resolve_config("mlp"), {"loss.regression": "none"}).validate()
    with pytest.raises(ConfigError, match="loss is empty"):
        apply_overrides(resolve_config("mlp"), {"loss.regression_weight": 0}).validate()


def test_config_values_that_would_be_misread_are_refused() -> None:
    """A setting is taken as written or refused: never rounded (depth 2.5 → 2), never a
    boolean read as a count (true → 1), never a third beta dropped, and every bound that
    training would otherwise run into (a beta of 1, a shrinkage above 1) is checked up front."""
    cfg = resolve_config("mlp")
    for key, value, msg in (("model.depth", 2.5, "model.depth"), ("model.depth", True, "model.depth"),
                            ("optim.betas", "0.8,0.9,0.99", "expected 2 values"),
                            ("optim.betas", "(0.9, 1.0)", "optim.betas"),
                            ("norm.whiten_shrink", "1.5", "whiten_shrink")):
        with pytest.raises(ConfigError, match=msg):
            apply_overrides(cfg, {key: value}).validate()
    assert apply_overrides(cfg, {"model.depth": 3.0}).model.depth == 3  # a TOML float that is a whole number
    assert [apply_overrides(cfg, {"train.amp": v}).train.amp for v in ("on", "off", "yes", "0")] == [True, False, True, False]
    # The transformer reads the extra input views only through a linear path: without one they would be ignored.
    with pytest.raises(ConfigError, match="model.input_views needs"):
        resolve_config("transformer", overrides={"model.input_views": "mean,last"})
    assert resolve_config("transformer", overrides={"model.input_views": "mean,last",
                                                    "model.linear_skip": "zero"}).model.input_views == ("mean", "last")


def test_transformer_standardises_its_inputs_ignores_padding_and_predicts_at_its_mask_tokens() -> None:
    """What no learning curve shows: input tokens are standardised with the train statistics, a
    record's prediction does not depend on the padding its batch adds, the slots are read at the
    K mask tokens (blocks made identity: the prediction is the mask tokens' own, whatever the
    input), and with a linear path the mask tokens are conditioned on the pooled views."""
    torch.manual_seed(0)
    small = {"model.width": 16, "model.depth": 1, "model.heads": 2, "model.body_slots": 3, "model.max_input_tokens": 8}
    d = 4
    model = build_model(resolve_config("transformer", overrides=small), d).eval()
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 5, d, generator=g)
    seg, pos = torch.tensor([[1, 1, 2, 2, 2], [2, 2, 0, 0, 0]]), torch.tensor([[4, 3, 2, 1, 0], [1, 0, 0, 0, 0]])
    batch = {"sig": torch.zeros(2, d), "tok": u, "tok_seg": seg, "tok_pos": pos}
    mu, sd = torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.5
    with torch.no_grad():
        ref = model(batch)["slots"]  # in_mu = 0, in_sd = 1
        model.norm.in_mu.copy_(mu)
        model.norm.in_sd.copy_(sd)
        raw = u * sd + mu
        torch.testing.assert_close(model({**batch, "tok": raw})["slots"], ref)
        alone = {"sig": torch.zeros(1, d), "tok": raw[1:, :2], "tok_seg": seg[1:, :2], "tok_pos": pos[1:, :2]}
        torch.testing.assert_close(model(alone)["slots"][0], ref[1])  # the same record without padding
        for blk in model.blocks:
            for lin in (blk.proj, blk.mlp[2]):
                lin.weight.zero_()
                lin.bias.zero_()
        out = model({**batch, "tok": raw})["slots"]
        want = model.out(model.ln_f(model.mask_token + model.slot_emb + model.seg_emb.weight[3]))
        torch.testing.assert_close(out, want.expand_as(out))
        skip = build_model(resolve_config("transformer", overrides={**small, "model.linear_skip": "zero"}), d).eval()
        moved = skip({**batch, "sig": torch.randn(2, d, generator=g)})["slots"]
        assert not torch.allclose(moved, skip(batch)["slots"])  # the slots read the pooled views


def test_a_frozen_linear_path_is_not_counted_as_trained_parameters() -> None:
    """run.json records the trainable parameters: a frozen ridge path (model.linear_trainable = false)
    is not among them."""
    over = {"model.mlp_hidden": "8", "model.input_views": "mean"}
    free = build_model(resolve_config("mlp", preset="ridge-residual", overrides=over), 16)
    frozen = build_model(resolve_config("mlp", preset="ridge-residual",
                                        overrides={**over, "model.linear_trainable": False}), 16)
    assert count_parameters(free) - count_parameters(frozen) == 16 * 16 + 16


def test_slots_and_input_truncation() -> None:
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    s = pool_slots(x, 3)
    assert np.allclose(s, [[1, 2], [5, 6], [9, 10]])
    assert np.allclose(pool_slots(x, 3).mean(0), x.mean(0))
    short = pool_slots(x[:2], 4)  # fewer tokens than slots: chunks repeat tokens, never empty
    assert short.shape == (4, 2) and np.isfinite(short).all() and np.allclose(short[0], x[0]) and np.allclose(short[-1], x[1])
    d = 4
    states = np.arange(12 * d, dtype=np.float32).reshape(12, d)
    special = np.zeros(12, bool)
    special[0] = True
    seg = np.array([[1, 8], [8, 12]])  # 7 context tokens, 4 signature tokens
    spec = FeatureSpec("transformer", max_input_tokens=6, body_slots=2, in_outlier_norm=float("inf"), body_outlier_norm=float("inf"))
    sig, tok, segids = input_features(states, special, seg, spec)
    assert np.allclose(sig, states[8:12].mean(0))
    assert np.allclose(tok, states[6:12])  # the far context (tokens 1..5) dropped first
    assert segids.tolist() == [1, 1, 2, 2, 2, 2]
    spec3 = FeatureSpec("transformer", 3, 2, float("inf"), float("inf"))
    _, tok, segids = input_features(states, special, seg, spec3)
    assert np.allclose(tok, states[8:11]) and segids.tolist() == [2, 2, 2]


def test_input_positions_count_back_from_the_body() -> None:
    """A batch's input tokens carry their distance to the body as position (the last signature
    token is 0): cutting far context then shifts no token's position, and padding carries none."""
    from codejepa.predict.data import collate

    spec = FeatureSpec("transformer", 8, 2, float("inf"), float("inf"))
    recs = [{"sig": np.zeros(2, np.float32), "tok": np.ones((n, 2), np.float32), "tok_seg": np.full(n, 2, np.int8)}
            for n in (3, 1)]
    b = collate(recs, np.array([0, 1]), spec)
    assert b["tok_pos"].tolist() == [[2, 1, 0], [0, 0, 0]]
    assert b["tok_seg"].tolist() == [[2, 2, 2], [2, 0, 0]]


def test_train_split_statistics_match_a_direct_computation(store_path: Path) -> None:
    from codejepa.predict.normalize import compute_stats

    with open_store(store_path) as st:
        tr = st.indices("train")
        stats = compute_stats(st, tr, outlier_factor=10.0)
        toks, sigs, bodies, n_out = [], [], [], 0
        for i in tr:
            inp, body = st.inputs(int(i)), st.body(int(i))
            keep = ~inp.special & (np.linalg.norm(inp.states, axis=1) <= stats.in_outlier_norm)
            n_out += int((~inp.special & ~keep).sum())
            toks.append(inp.states[keep])
            a, b = inp.segments["signature"]
            sigs.append(inp.states[a:b][keep[a:b]].mean(0))
            bodies.append(body.states.mean(0))
    toks, sigs, bodies = np.concatenate(toks), np.stack(sigs), np.stack(bodies)
    assert n_out == stats.counts["input_outliers"] > 0 and stats.counts["input_special"] == len(tr)
    for mine, ref in ((stats.in_mu, toks.mean(0)), (stats.in_sd, toks.std(0)), (stats.sig_mu, sigs.mean(0)),
                      (stats.sig_sd, sigs.std(0)), (stats.pool_mu, bodies.mean(0)), (stats.pool_sd, bodies.std(0))):
        assert np.allclose(mine, ref, rtol=1e-4, atol=1e-4)


def test_train_statistics_pool_the_bodies_as_the_targets_are_pooled(tmp_path: Path) -> None:
    """A body made only of outlier-norm tokens is a target (body_features falls back to its
    non-sink tokens), so the train statistics count it the same way, not as an empty body."""
    from codejepa.predict.data import FeatureSpec, body_features
    from codejepa.predict.normalize import compute_stats

    with open_store(make_store(tmp_path / "s.h5", outlier_bodies=3)) as st:
        tr = st.indices("train")
        stats = compute_stats(st, tr, outlier_factor=10.0)
        spec = FeatureSpec("mlp", 8, 2, stats.in_outlier_norm, stats.body_outlier_norm)
        pooled = np.stack([body_features(st.body(int(i)).states, st.body(int(i)).special, spec)[0] for i in tr])
    assert stats.counts["empty_body"] == 0 and stats.counts["body_outliers"] > 0
    assert np.allclose(stats.pool_mu, pooled.mean(0), rtol=1e-4, atol=1e-4)
    assert np.allclose(stats.pool_sd, pooled.std(0), rtol=1e-4, atol=1e-4)


def test_pooled_whitening_is_the_shrunk_train_covariance_whatever_the_block_size(
        store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pool_W`` whitens the train split's pooled bodies with their covariance shrunk towards
    its mean eigenvalue (W⁻¹W⁻¹ = 0.9·Σ + 0.1·tr Σ/d·I). The statistics are streamed in blocks:
    where a block ends must not change them (the covariance is centred on the split's mean)."""
    import codejepa.predict.normalize as normalize

    with open_store(store_path) as st:
        tr = st.indices("train")
        bodies = np.stack([st.body(int(i)).states.mean(0) for i in tr]).astype(np.float64)
        monkeypatch.setattr(normalize, "BLOCK_TOKENS", 64)  # dozens of blocks instead of one
        stats = normalize.compute_stats(st, tr, whiten_shrink=0.1)
    cov = np.cov(bodies.T, bias=True)
    d = len(cov)
    want = 0.9 * cov + 0.1 * np.trace(cov) / d * np.eye(d)
    winv = stats.pool_Winv.astype(np.float64)
    np.testing.assert_allclose(winv @ winv, want, atol=1e-3 * np.trace(cov) / d)
    np.testing.assert_allclose(stats.pool_W.astype(np.float64) @ winv, np.eye(d), atol=1e-3)
    np.testing.assert_allclose(stats.pool_mu, bodies.mean(0), rtol=1e-4, atol=1e-4)


# -- training -------------------------------------------------------------------------------
def test_mlp_with_infonce_learns_instances_and_api_predicts_raw(store_path: Path, tmp_path: Path) -> None:
    run = tmp_path / "mlp"
    cfg = resolve_config("mlp", preset="mlp-infonce", overrides={**TINY_MLP, "train.plot_every_s": 3600})
    summary = train(store_path, cfg, run, device="cpu")
    best = summary["best"]
    assert best["val_mrr"] > 4 * best["val_chance_mrr"] and best["val_rank1"] > 0.3
    # the seed's recipe (SmoothL1 on raw, anisotropic states), same budget: high raw cosine,
    # predictions collapsed onto their mean, retrieval far below the InfoNCE model
    seed = train(store_path, resolve_config("mlp", preset="seed-mlp", overrides=TINY_MLP), tmp_path / "seed",
                 device="cpu")["best"]
    assert seed["val_cos_raw"] > 0.8 and seed["pred_cos_to_mean_raw"] > 0.95
    assert seed["val_mrr"] < best["val_mrr"] - 0.3
    # run directory: self-describing, log per epoch, curves
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epochs = [e for e in log if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, cfg.train.epochs + 1))
    for key in ("train_loss", "val_loss", "val_cos", "val_rank1", "val_mrr", "pred_cos_to_mean", "pred_eff_rank", "target_eff_rank"):
        assert np.isfinite(epochs[-1][key])
    info = json.loads((run / "run.json").read_text())
    with open_store(store_path) as st:
        assert info["store_fingerprint"] == st.meta.fingerprint() and info["code_version"]
        assert (run / "curves.png").stat().st_size > 10_000
        stats = json.loads((run / "stats.json").read_text())["counts"]
        n_train = len(st.indices("train"))
        assert stats["input_special"] == n_train and stats["input_outliers"] > 0
        # the public API: raw-space predictions on the test split retrieve their own bodies
        p = load_predictor(run)
        assert p.store_fingerprint == st.meta.fingerprint() and p.name == "mlp"  # the run folder, not the preset
        test = st.indices("test")
        pred = p.predict_pooled(st, test)
        assert pred.shape == (len(test), 32) and pred.dtype == np.float32
        again = p.predict_pooled(st, test[::-1])
        assert np.allclose(again, pred[::-1], atol=1e-5)
        # a chunk of 7 records' features at a time, batches of 3: the same predictions, each in its row
        chunked = p.predict_pooled(st, test, chunk_bytes=7 * 32 * 4, batch_size=3)
        assert np.allclose(chunked, pred, atol=1e-5)
        # a mask, fractional indices, a path for the store: one clear error, not wrong records
        for store_arg, idx, msg in ((st, st.splits == "test", "not a boolean mask"), (st, [1.7], "integers"),
                                    (st, [len(st)], "out of range"), (str(store_path), [0], "an open store")):
            with pytest.raises(PredictorError, match=msg):
                p.predict_pooled(store_arg, idx)
        bodies = st.pooled("body", test)
        train_mean = st.pooled("body", st.indices("train")).mean(0)
        learned = mrr(pred - train_mean, bodies - train_mean)
        prototype = mrr(np.repeat(train_mean[None] + 1e-3, len(test), 0) - train_mean, bodies - train_mean)
        assert learned > 3 * chance_mrr(len(test)) and prototype <= 1.5 * chance_mrr(len(test))
        # high raw cosine of the prototype is what fooled the seed
        cos = (train_mean @ bodies.T) / np.linalg.norm(train_mean) / np.linalg.norm(bodies, axis=1)
        assert cos.mean() > 0.8


def test_transformer_learns_and_never_sees_the_body(store_path: Path, tmp_path: Path) -> None:
    other = make_store(tmp_path / "other_bodies.h5", body_seed=7, body_len=(1, 40))
    run = tmp_path / "tf"
    cfg = resolve_config("transformer", overrides={**TINY_TF, "mask.strategy": "multiblock"})
    summary = train(store_path, cfg, run, device="cpu")
    assert summary["best"]["val_mrr"] > 3 * summary["best"]["val_chance_mrr"]
    p = load_predictor(run)
    with open_store(store_path) as a, open_store(other) as b:
        assert a.meta.fingerprint() == b.meta.fingerprint()
        idx = a.indices()
        assert not np.array_equal(a.lengths("targets"), b.lengths("targets"))
        assert not np.allclose(a.pooled("body", idx[:5]), b.pooled("body", idx[:5]))
        pa, pb = p.predict_pooled(a, idx), p.predict_pooled(b, idx)
        assert np.array_equal(pa, pb)
        assert np.std(pa, axis=0).mean() > 1e-3  # not a constant


def test_a_store_embedded_again_with_other_values_is_another_store(tmp_path: Path) -> None:
    """The fingerprint (teacher, layer, template, corpus) leaves out the window and the dtypes:
    a store embedded again at the same path with another window must not resume a run trained
    on the old one (its epochs would mix two stores), and statistics left by a start on the old
    one are fitted again, with the reason said."""
    store = make_store(tmp_path / "s.h5", n_repos=6, per_repo=20, max_tokens=256)
    cfg = resolve_config("mlp", preset="mlp-infonce", overrides={**TINY_MLP, "train.epochs": 2,
                                                                  "train.checkpoint_every_steps": 1})
    train(store, cfg, tmp_path / "done", device="cpu")
    train_killed_at(store, cfg, tmp_path / "killed", 1)
    store.unlink()
    make_store(store, n_repos=6, per_repo=20, max_tokens=128)
    with pytest.raises(TrainingError, match=r"embedded with other settings since this run started "
                                            r"\(run vs store: max_tokens 256 vs 128\)"):
        train(store, None, tmp_path / "killed", device="cpu", resume=True)
    fresh = tmp_path / "fresh"  # what a start stopped between its statistics and its run record leaves
    fresh.mkdir()
    (fresh / "stats.pt").write_bytes((tmp_path / "done" / "stats.pt").read_bytes())
    events: list[dict] = []
    train(store, cfg, fresh, device="cpu", on_event=events.append)
    assert any(e["event"] == "warning" and "fitted on a store embedded with other settings (max_tokens 256 vs 128); "
               "fitting them again" in e["message"] for e in events)
    assert torch.load(fresh / "stats.pt", weights_only=True)["store_values"]["max_tokens"] == 128


def test_a_resume_under_other_code_is_said_and_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run.json keeps the code that started the run: a resume by another commit warns and its
    log line records the code (and threads) that continued it; the run records its libraries."""
    import codejepa.predict.train as train_mod

    store = make_store(tmp_path / "s.h5", n_repos=6, per_repo=20)
    cfg = resolve_config("mlp", preset="mlp-infonce", overrides={**TINY_MLP, "train.epochs": 2,
                                                                  "train.checkpoint_every_steps": 1})
    train_killed_at(store, cfg, tmp_path / "run", 2)  # after the step-1 checkpoint
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["threads"] >= 1 and {"python", "torch", "numpy", "h5py"} <= set(info["versions"])
    monkeypatch.setattr(train_mod, "code_version", lambda: "0.1.0+glater")
    events: list[dict] = []
    train(store, None, tmp_path / "run", device="cpu", resume=True, on_event=events.append)
    assert any(e["event"] == "warning" and f"resumed with code 0.1.0+glater; the run started with "
               f"{info['code_version']}" in e["message"] for e in events)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["code_version"] for e in log if e["event"] == "resume"] == ["0.1.0+glater"]


def test_resume_after_kill_equals_uninterrupted_and_is_deterministic(store_path: Path, tmp_path: Path) -> None:
    over = {**TINY_TF, "train.epochs": 3, "train.checkpoint_every_steps": 3, "mask.strategy": "multiblock",
            "model.dropout": 0.1}
    cfg = resolve_config("transformer", overrides=over)
    train(store_path, cfg, tmp_path / "a", device="cpu")
    train(store_path, cfg, tmp_path / "b", device="cpu")
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))  # same seed → same weights

    train_killed_at(store_path, cfg, tmp_path / "c", 8)  # mid-epoch 2, after the step-6 checkpoint
    assert load_checkpoint(tmp_path / "c" / "last.pt")["global_step"] == 6
    train(store_path, None, tmp_path / "c", resume=True, device="cpu")
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "c"))
    assert_same_weights(weights(tmp_path / "a", "best.pt"), weights(tmp_path / "c", "best.pt"))
    log = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log if e["event"] == "epoch"] == [1, 2, 3]
    assert any(e["event"] == "resume" for e in log)


def test_streaming_from_the_store_equals_the_ram_cache(store_path: Path, tmp_path: Path) -> None:
    """Where batches come from is a performance setting: the weights must not depend on it. With
    dropout on, a worker pool that drew from torch's global generator moved every later mask."""
    over = {**TINY_TF, "train.epochs": 2, "model.dropout": 0.1}
    train(store_path, resolve_config("transformer", overrides=over), tmp_path / "cache", device="cpu")
    for name, extra in {"stream": {"data.prefetch": 0, "data.workers": 0},
                        "workers": {"data.workers": 2, "mask.strategy": "multiblock"}}.items():
        if name == "workers":  # multi-block masks drawn in worker processes must match the in-process ones
            over = {**over, "mask.strategy": "multiblock"}
            train(store_path, resolve_config("transformer", overrides=over), tmp_path / "cache-mb", device="cpu")
        train(store_path, resolve_config("transformer", overrides={**over, "data.cache_gb": 0, **extra}),
              tmp_path / name, device="cpu")
        assert json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])["cache"] == "StreamingTable"
        ref = tmp_path / ("cache" if name == "stream" else "cache-mb")
        assert_same_weights(weights(ref), weights(tmp_path / name), atol=1e-6)


def test_a_store_damaged_under_the_loader_workers_is_one_line(store_path: Path, tmp_path: Path) -> None:
    """A chunk that fails its checksum while worker processes read batches: the DataLoader would
    re-raise the worker's error with its traceback folded into the message."""
    import shutil

    import h5py

    from codejepa.embed.store import StoreError
    from codejepa.predict.data import StreamingTable, WorkerLoader

    p = tmp_path / "s.h5"
    shutil.copy(store_path, p)
    with h5py.File(p, "r") as f:
        hit = f["inputs/states"].id.get_chunk_info(1)
    with open(p, "r+b") as fh:
        fh.seek(hit.byte_offset + 64)
        fh.write(b"\x07" * 32)
    spec = FeatureSpec("transformer", 16, 0, float("inf"), float("inf"))
    with open_store(p) as st:
        table = StreamingTable(st, st.indices("train"), spec)
        loader = WorkerLoader(table, [np.arange(k, k + 8) for k in range(0, len(table), 8)], None, 0, 2, 4)
        with pytest.raises(StoreError, match="damaged store: inputs/states rows") as e:
            for _ in loader:
                pass
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_runs_checkpoint_mid_epoch_by_default(store_path: Path, tmp_path: Path) -> None:
    """An epoch of a big store lasts half an hour: without a setting, a kill mid-epoch must
    keep the last 100-step checkpoint, not only the previous epoch's."""
    cfg = resolve_config("mlp", overrides={**TINY_MLP, "train.batch_size": 2, "train.epochs": 1})
    assert cfg.train.checkpoint_every_steps == 100
    train_killed_at(store_path, cfg, tmp_path / "run", 150)  # one epoch is 160 steps here
    assert load_checkpoint(tmp_path / "run" / "last.pt")["global_step"] == 100


def test_ram_cache_records_equal_the_stores_record_by_record(store_path: Path) -> None:
    """The cache writes each record's tokens into one preallocated float16 buffer (sized by an
    upper bound, so records keep gaps): every record must read back as the streaming table's."""
    from codejepa.predict.data import FeatureTable, StreamingTable, estimate_cache_bytes

    spec = FeatureSpec("transformer", 10, 4, 50.0, float("inf"))  # a cap of 10: far context is cut
    with open_store(store_path) as st:
        idx = st.indices("train")[::-1][:60]  # not in store order
        cached, streamed = FeatureTable(st, idx, spec), StreamingTable(st, idx, spec)
        assert cached.nbytes <= estimate_cache_bytes(st, idx, spec)
        dropped = 0
        for k in range(len(idx)):
            a, b = cached.record(k), streamed.record(k)
            assert a.keys() == b.keys() and a["tok"].dtype == np.float16
            for key in a:
                assert np.array_equal(a[key], b[key]), (k, key)
            dropped += int(cached.tok_off[k + 1] - cached.tok_off[k]) - len(a["tok"])
        assert dropped > 0  # some records kept fewer tokens than their room (sinks, outliers)


def test_nan_loss_stops_with_one_message_and_keeps_the_last_good_checkpoint(
        store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from codejepa.predict import losses

    real = losses.compute_loss
    calls = {"n": 0}

    def poisoned(out, *a, **k):
        loss, parts = real(out, *a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 7 else loss), parts  # 5 steps/epoch + 1 val batch

    monkeypatch.setattr(losses, "compute_loss", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(DivergedError, match=r"non-finite at epoch 2.*last good checkpoint is kept.*after epoch 1"):
        train(store_path, resolve_config("mlp", overrides=TINY_MLP), run, device="cpu")
    ck = load_checkpoint(run / "last.pt")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert any(json.loads(x)["event"] == "diverged" for x in (run / "log.jsonl").read_text().splitlines())
    load_predictor(run)  # the best checkpoint still serves


def test_bad_inputs_give_one_clear_error(store_path: Path, tmp_path: Path) -> None:
    cfg = resolve_config("mlp", overrides={**TINY_MLP, "train.epochs": 1})
    run = tmp_path / "r"
    train(store_path, cfg, run, device="cpu")
    with pytest.raises(TrainingError, match="already holds a run"):
        train(store_path, cfg, run, device="cpu")
    foreign = make_store(tmp_path / "foreign.h5", teacher="another/teacher")
    with pytest.raises(TrainingError, match="not this run's store .*run vs store: teacher synthetic/teacher vs "
                                            "another/teacher"):
        train(foreign, cfg, run, resume=True, device="cpu")
    with pytest.raises(TrainingError, match="differs from the run's"):
        train(store_path, apply_overrides(cfg, {"optim.lr": 0.5}), run, resume=True, device="cpu")
    with open_store(foreign) as st, pytest.raises(PredictorError, match="other settings"):
        load_predictor(run).predict_pooled(st, [0, 1])
    no_val = make_store(tmp_path / "noval.h5", n_val_repos=0)
    with pytest.raises(TrainingError, match="val split is empty"):
        train(no_val, cfg, tmp_path / "r2", device="cpu")
    with pytest.raises(CodejepaError, match="no such store"):
        train(tmp_path / "missing.h5", cfg, tmp_path / "r3", device="cpu")
    with pytest.raises(PredictorError, match="not a predict run"):
        load_predictor(tmp_path)
    # torch.manual_seed's traceback, a nan loss, a DataLoader's own error mid-run
    for key, value in (("train.seed", 2**40), ("optim.lr", float("inf")), ("data.workers", -1)):
        with pytest.raises(ConfigError, match=key):
            resolve_config("mlp", overrides={key: value})
    stopped = tmp_path / "stopped"  # a run stopped before its first checkpoint: starting again loses nothing
    stopped.mkdir()
    (stopped / "run.json").write_text((run / "run.json").read_text())
    with pytest.raises(TrainingError, match="holds no checkpoint yet: delete it to start again"):
        train(store_path, cfg, stopped, device="cpu")


def test_a_lost_rank_advises_resume_only_where_a_checkpoint_is(tmp_path: Path) -> None:
    """A check only rank 0 makes (a file in the way of --out) stops it before any checkpoint: the
    other ranks' "run with --resume" would then send the user to a run that does not exist."""
    from codejepa.predict.train import _lost_rank_advice

    assert "no checkpoint was written: rank 0's message says why" in _lost_rank_advice(tmp_path)
    (tmp_path / "last.pt").write_bytes(b"")
    assert "the last checkpoint is kept" in _lost_rank_advice(tmp_path) and "--resume" in _lost_rank_advice(tmp_path)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("model", ["mlp", "ridge-residual"])
def test_non_finite_states_are_a_damaged_store_not_a_divergence(store_path: Path, tmp_path: Path, split: str,
                                                                model: str) -> None:
    """The writer refuses NaN and inf: one in a store is damage. Read on, it made a linear-algebra
    traceback (ridge) or a loss that diverged and blamed the learning rate (the MLP)."""
    import shutil

    import h5py

    from codejepa.embed.store import StoreError

    p = tmp_path / "nan.h5"
    shutil.copy(store_path, p)
    with open_store(p) as st:
        rec = int(st.indices(split)[3])
        row = int(st.lengths("targets")[:rec].sum())
        rid = st.ids[rec]
    with h5py.File(p, "r+") as f:
        f["targets/states"][row + 1] = np.nan
    cfg = (resolve_config("mlp", preset="ridge-residual", overrides={"train.epochs": 1, "train.plot_every_s": -1})
           if model == "ridge-residual" else resolve_config("mlp", overrides={**TINY_MLP, "train.epochs": 1}))
    with pytest.raises(StoreError, match=f"damaged store: record {rec} \\({rid}\\) has non-finite targets states"):
        train(p, cfg, tmp_path / "run", device="cpu")


def test_checkpoints_are_data_and_code_is_refused(store_path: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    train(store_path, resolve_config("mlp", overrides={**TINY_MLP, "train.epochs": 1}), run, device="cpu")
    for name in ("best.pt", "last.pt", "stats.pt"):
        assert isinstance(torch.load(run / name, weights_only=True), dict)
    ck = torch.load(run / "best.pt", weights_only=True)
    ck["payload"] = Path("/etc/passwd")  # any non-plain object: a weights_only load must refuse it
    torch.save(ck, run / "best.pt")
    with pytest.raises(PredictorError, match="weights_only"):
        load_predictor(run)
    del ck["payload"]
    torch.save(ck, run / "best.pt")
    # a checkpoint that is missing, or whose weights do not fit its config: one clear error each
    with pytest.raises(PredictorError, match=r"no such checkpoint \(has an epoch of training finished"):
        load_predictor(run, checkpoint="nope")
    torch.save({**ck, "config": {**ck["config"], "model": {**ck["config"]["model"], "mlp_hidden": [8]}}}, run / "odd.pt")
    with pytest.raises(PredictorError, match="weights do not fit the run's config"):
        load_predictor(run, checkpoint="odd")
    with open_store(store_path) as st:  # no records asked, none predicted
        assert load_predictor(run).predict_pooled(st, np.array([], np.int64)).shape == (0, 32)
    (run / "stats.pt").write_bytes(b"not a torch file")
    with pytest.raises(PredictorError, match="stats.pt: damaged or foreign statistics file"):
        load_predictor(run)
    (run / "run.json").write_text("{cut")  # a damaged run record: the documented error, not a JSONDecodeError
    with pytest.raises(PredictorError, match="run.json: a damaged run record"):
        load_predictor(run, checkpoint="best")


def test_every_loss_term_and_norm_option_trains(store_path: Path, tmp_path: Path) -> None:
    over = {**TINY_TF, "train.epochs": 2, "loss.regression": "mse", "loss.cosine_weight": 0.5,
            "loss.infonce_weight": 1.0, "loss.variance_weight": 1.0, "norm.input_token_ln": True,
            "norm.outlier_factor": 0.0, "mask.strategy": "multiblock", "optim.name": "adam", "optim.grad_clip": 0.5}
    parts: dict[str, float] = {}
    train(store_path, resolve_config("transformer", overrides=over), tmp_path / "all", device="cpu",
          on_event=lambda e: parts.update(e) if e["event"] == "step" else None)
    for key in ("regression", "cosine", "infonce", "variance", "masked_aux"):
        assert np.isfinite(parts[key]), key
    stats = json.loads((tmp_path / "all" / "stats.json").read_text())
    assert stats["counts"]["input_outliers"] == 0 and stats["in_outlier_norm"] is None


def test_infonce_labels_its_own_body_and_the_variance_hinge_penalises_low_spread() -> None:
    """InfoNCE's class for prediction i is its own body, row i of the targets (extra rows are
    more negatives); the symmetric form adds the bodies → predictions direction (the transposed logits);
    the variance hinge penalises a spread below γ (collapse), never one above it."""
    from codejepa.predict.losses import infonce, variance_hinge

    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(5, 8, generator=g), torch.randn(9, 8, generator=g)
    cos = F.normalize(pred, dim=-1) @ F.normalize(tgt, dim=-1).T
    assert torch.isclose(infonce(pred, tgt, 0.1), F.cross_entropy(cos / 0.1, torch.arange(5)))  # more bodies than queries
    sq = cos[:, :5] / 0.1  # the square case: prediction i against body i
    want = 0.5 * (F.cross_entropy(sq, torch.arange(5)) + F.cross_entropy(sq.T, torch.arange(5)))
    assert torch.isclose(infonce(pred, tgt[:5], 0.1, symmetric=True), want)
    assert float(variance_hinge(torch.randn(64, 4, generator=g) * 3.0, 1.0)) == 0.0
    assert float(variance_hinge(torch.ones(64, 4), 1.0)) == pytest.approx(1.0 - 0.01, abs=1e-6)


def test_records_without_a_body_token_are_no_targets() -> None:
    """A body of sink tokens only (or none) has nothing to predict: such records must be left
    out of train and val, where their pooled target would be a zero vector."""
    from codejepa.predict.data import valid_records

    class Targets:  # lengths 3, 2, 0, 1; the non-sink token is record 0's second
        def lengths(self, name: str) -> np.ndarray:
            return np.array([3, 2, 0, 1])

        def special(self, name: str) -> np.ndarray:
            return np.array([True, False, True, True, True, True])

    assert valid_records(Targets(), np.array([3, 0, 2, 1])).tolist() == [False, True, False, False]


def test_masked_regression_and_blocked_val_ranks() -> None:
    """The multi-block regression averages over the masked slots only (revealed ones are the
    model's inputs); validation ranks, blocked over queries, are each query's own target's
    rank, ties counting against it (a duplicate of the true body ranks it 2nd)."""
    from codejepa.predict.config import LossConfig
    from codejepa.predict.losses import regression
    from codejepa.predict.metrics import retrieval_ranks

    pred, target = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    target[0, 0] = 2.0  # error 4 per dimension on slot (0, 0), none elsewhere
    mask = torch.tensor([[True, False, False], [False, True, False]])
    cfg = LossConfig(regression="mse")
    assert float(regression(pred, target, cfg, mask=mask)) == pytest.approx(4.0 / 2)
    assert float(regression(pred, target, cfg, mask=~mask)) == 0.0
    g = torch.Generator().manual_seed(0)
    tgt = torch.randn(20, 6, generator=g)
    tgt[7] = tgt[3]  # two identical targets: each query of the pair ranks 2nd at best
    pred = tgt + 0.8 * torch.randn(20, 6, generator=g)
    pred[3] = tgt[3]
    s = (F.normalize(pred, dim=1) @ F.normalize(tgt, dim=1).T).numpy()
    want = (s >= np.diag(s)[:, None]).sum(1)
    assert want[3] == 2
    for block in (1024, 7, 1):
        assert retrieval_ranks(pred, tgt, block=block).tolist() == want.tolist()


def test_whitened_pooled_space_round_trips_and_learns(store_path: Path, tmp_path: Path) -> None:
    run = tmp_path / "w"
    cfg = resolve_config("mlp", preset="mlp-infonce", overrides={**TINY_MLP, "norm.pooled_space": "whitened"})
    best = train(store_path, cfg, run, device="cpu")["best"]
    assert best["val_mrr"] > 4 * best["val_chance_mrr"]
    norm = load_predictor(run).model.norm
    with open_store(store_path) as st:
        x = torch.from_numpy(st.pooled("body", st.indices("train")))
    z = norm.body_to_norm(x)
    assert torch.allclose(norm.pooled_to_raw(z), x, atol=1e-3 * float(x.abs().max()))
    cov = torch.cov(z.T)  # whitened train bodies: near-identity covariance (shrinkage 0.1 keeps it below 1)
    assert float((cov - torch.diag(torch.diag(cov))).abs().max()) < 0.2
    assert 0.5 < float(torch.diag(cov).mean()) < 1.5


def test_an_unfinished_store_trains_with_a_warning_and_the_run_records_it(tmp_path: Path) -> None:
    import h5py

    path = make_store(tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:  # as a killed `embed run` leaves it
        m = json.loads(f.attrs["meta"])
        m["extra"] = {**m.get("extra", {}), "complete": False}
        f.attrs["meta"] = json.dumps(m)
    events: list[dict] = []
    train(path, resolve_config("mlp", overrides={**TINY_MLP, "train.epochs": 1}), tmp_path / "r", device="cpu",
          on_event=events.append)
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and "unfinished store" in warnings[0]
    assert json.loads((tmp_path / "r" / "run.json").read_text())["store_complete"] is False
