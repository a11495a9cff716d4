"""``loss.space = "canonical"``: InfoNCE and model selection in the evaluate stage's canonical space."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _predict_fixtures import make_store  # noqa: E402

from codejepa.embed.store import open_store  # noqa: E402
from codejepa.evaluate.spaces import fit_space  # noqa: E402
from codejepa.predict import load_predictor  # noqa: E402
from codejepa.predict.canonical import canonical_columns, canonical_fit_warning, init_score_map  # noqa: E402
from codejepa.predict.config import ConfigError, LossConfig, resolve_config  # noqa: E402
from codejepa.predict.data import FeatureTable  # noqa: E402
from codejepa.predict.losses import compute_loss, infonce  # noqa: E402
from codejepa.predict.metrics import retrieval_ranks  # noqa: E402
from codejepa.predict.models import build_model  # noqa: E402
from codejepa.predict.normalize import compute_stats  # noqa: E402
from codejepa.predict.ridge import init_input_stats  # noqa: E402
from codejepa.predict.train import feature_spec, train  # noqa: E402

torch.set_num_threads(1)

# The fixture store names no corpus: no file batches here (they have tests of their own).
TINY = {"model.mlp_hidden": "64", "train.batch_size": 64, "train.epochs": 4, "train.plot_every_s": -1,
        "train.batch_groups": "none"}
CANON = {**TINY, "loss.space": "canonical"}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # noisy enough that val retrieval is far from perfect, in either space
    return make_store(tmp_path_factory.mktemp("store") / "s.h5", n_repos=14, per_repo=60, noise=3.0)


def test_canonical_columns_are_the_mean_and_last_views() -> None:
    assert canonical_columns(("mean", "last", "first"), 4).tolist() == list(range(8))
    assert canonical_columns(("first", "last", "mean"), 2).tolist() == [2, 3, 4, 5]
    assert canonical_columns(("context",), 3).tolist() == [0, 1, 2]  # neither: every view


def test_score_map_ranks_as_the_evaluate_stages_canonical_space(store_path: Path) -> None:
    cfg = resolve_config("mlp", preset="ridge-residual", overrides=CANON)
    with open_store(store_path) as st:
        tr, te = st.indices("train"), st.indices("test")
        stats = compute_stats(st, tr, whiten_shrink=cfg.norm.whiten_shrink)
        model = build_model(cfg, st.meta.hidden_size)
        model.norm.load(stats)
        tab = FeatureTable(st, tr, feature_spec(cfg, stats))
        init_input_stats(model, tab)
        info = init_score_map(model, tab)
        assert info["views"] == "mean,last" and info["train_records"] == len(tr)
        d = st.meta.hidden_size  # 720 records for 3·d dimensions: below 10 per dimension, flagged
        assert info["warning"] is not None and info["warning"] == canonical_fit_warning(len(tr), 2 * d, d)
        assert not torch.allclose(model.norm.score_map, torch.eye(st.meta.hidden_size))
        # the evaluate stage's canonical space, fitted from the store on its own
        v = st.pooled_views(("signature", "signature_last", "body"), np.r_[tr, te])
        x = np.concatenate([v["signature"], v["signature_last"]], 1)
        space = fit_space("canonical", v["body"][: len(tr)], train_inputs=x[: len(tr)])
        ours = model.norm.to_score(model.norm.body_to_norm(torch.from_numpy(v["body"][len(tr):])))
        theirs = torch.from_numpy(space.apply(v["body"][len(tr):]))
    # the same map up to a global scale (n vs n − 1 in the covariances): equal cosines
    cos_ours = F.normalize(ours, dim=1) @ F.normalize(ours, dim=1).T
    cos_theirs = F.normalize(theirs, dim=1) @ F.normalize(theirs, dim=1).T
    assert torch.allclose(cos_ours, cos_theirs, atol=2e-3)


def test_a_model_reading_more_views_gets_the_same_map(store_path: Path) -> None:
    """The map is fitted on the signature mean and last token alone, the evaluate stage's
    canonical inputs: a model that also reads the context's mean must be scored in the same
    space, or its selection would rank in a space the evaluation never uses."""
    maps = []
    with open_store(store_path) as st:
        tr = st.indices("train")
        stats = compute_stats(st, tr)
        for views in ("mean,last", "mean,last,context"):
            cfg = resolve_config("mlp", preset="ridge-residual", overrides={**CANON, "model.input_views": views})
            model = build_model(cfg, st.meta.hidden_size)
            model.norm.load(stats)
            info = init_score_map(model, FeatureTable(st, tr, feature_spec(cfg, stats)))
            assert info["views"] == "mean,last"
            maps.append(model.norm.score_map.clone())
    torch.testing.assert_close(maps[0], maps[1])


def test_a_map_fitted_on_too_few_records_is_flagged_in_both_stages() -> None:
    assert canonical_fit_warning(11_520, 768, 384) is None
    msg = canonical_fit_warning(2_000, 768, 384)
    assert msg is not None and "2000 train records" in msg and "11520" in msg
    rng = np.random.default_rng(0)
    x, body = rng.normal(size=(100, 16)), rng.normal(size=(100, 8))
    assert fit_space("canonical", body, train_inputs=x).settings["warning"] == canonical_fit_warning(100, 16, 8)
    big = rng.normal(size=(400, 24))
    assert fit_space("canonical", big[:, 16:], train_inputs=big[:, :16]).settings["warning"] is None


def test_infonce_ranks_in_the_score_space_and_the_regression_stays_pooled() -> None:
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    m = torch.randn(8, 8, generator=g)
    cfg = LossConfig(regression="mse", infonce_weight=1.0, temperature=0.1)
    _, plain = compute_loss({"pooled": pred}, tgt, None, cfg)
    _, scored = compute_loss({"pooled": pred}, tgt, None, cfg, to_score=lambda z: z @ m)
    assert torch.isclose(scored["infonce"], infonce(pred @ m, tgt @ m, 0.1))
    assert not torch.isclose(scored["infonce"], plain["infonce"])
    assert torch.isclose(scored["regression"], ((pred - tgt) ** 2).mean())
    assert torch.isclose(scored["regression"], plain["regression"])
    with pytest.raises(ConfigError, match="loss.space"):
        resolve_config("mlp", overrides={"loss.space": "cca"})


def test_canonical_run_selects_on_canonical_val_retrieval_and_keeps_its_map(store_path: Path, tmp_path: Path) -> None:
    run = tmp_path / "canon"
    summary = train(store_path, resolve_config("mlp", preset="ridge-residual", overrides=CANON), run,
                    device="cpu")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log].count("score_map") == 1
    p = load_predictor(run)  # the map travels in the checkpoint
    smap = p.model.norm.score_map
    with open_store(store_path) as st:
        va = st.indices("val")
        pred = torch.from_numpy(p.predict_pooled(st, va, normalized=True))
        body = p.model.norm.body_to_norm(torch.from_numpy(st.pooled("body", va)))
    # the val MRR that selected the best epoch is the canonical one, not the pooled space's
    canon = float((1.0 / retrieval_ranks(pred @ smap, body @ smap).double()).mean())
    pooled = float((1.0 / retrieval_ranks(pred, body).double()).mean())
    assert summary["best"]["val_mrr"] == pytest.approx(canon, abs=1e-5)
    assert abs(canon - pooled) > 1e-4
    # the map is a train-split statistic, like every other: refitted here on the train records
    # with the run's own statistics, it is the map the run ranks with (never one fitted on val)
    fresh = copy.deepcopy(p.model)
    with open_store(store_path) as st:
        tr = st.indices("train")
        init_score_map(fresh, FeatureTable(st, tr, feature_spec(p.config, p.stats)))
    assert next(e for e in log if e["event"] == "score_map")["train_records"] == len(tr)
    torch.testing.assert_close(fresh.norm.score_map, smap, rtol=1e-4, atol=1e-5)
    # a pooled-space run has no map: checkpoints written before loss.space load unchanged
    plain = build_model(resolve_config("mlp", preset="ridge-residual", overrides=TINY), 8)
    assert "norm.score_map" not in plain.state_dict() and plain.norm.score_map is None
    assert "norm.score_map" in build_model(resolve_config("mlp", preset="ridge-residual", overrides=CANON), 8).state_dict()
