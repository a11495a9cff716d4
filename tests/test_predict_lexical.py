"""Training for the BM25 hybrid (loss.lexical_weight): the offset, the loss, the selection."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _predict_fixtures import make_store, write_corpus  # noqa: E402

from codejepa.predict import losses  # noqa: E402
from codejepa.predict.batching import BatchingError  # noqa: E402
from codejepa.predict.config import ConfigError, resolve_config  # noqa: E402
from codejepa.predict.lexical import LexicalOffsets, lexical_offset  # noqa: E402
from codejepa.predict.metrics import retrieval_ranks  # noqa: E402
from codejepa.predict.train import curves_figure, train  # noqa: E402

torch.set_num_threads(1)
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


def texts(rid: str) -> tuple[str, str]:
    """Each function shares one rare identifier between its signature and its body."""
    repo, j = rid.split("::f")
    name = f"{WORDS[int(j) % 10]}_{repo}_{j}"
    return f"def fetch_{name}(self):", f"return self.{name}_value + common"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # noisy bodies: the cosine alone finds few of them (val MRR about 0.4), BM25 almost all
    return make_store(tmp_path_factory.mktemp("store") / "s.h5", noise=3.0)


def test_offsets_are_standardised_bm25_that_find_the_shared_identifier() -> None:
    sigs = [texts(f"r::f{j}")[0] for j in range(40)]
    bodies = [texts(f"r::f{j}")[1] for j in range(40)]
    lex = LexicalOffsets(sigs, bodies, ref_size=40)
    z = lex.z(np.arange(40)).numpy()
    assert z.shape == (40, 40)
    assert np.allclose(z.mean(1), 0, atol=1e-5) and np.allclose(z.std(1), 1, atol=1e-4)  # ref = every body
    assert (z.argmax(1) == np.arange(40)).all()
    sub = lex.z(np.array([3, 7]), np.array([7, 3, 0])).numpy()  # rows × cols, same standardisation
    assert np.allclose(sub, z[[3, 7]][:, [7, 3, 0]])
    small = LexicalOffsets(sigs, bodies, ref_size=8, seed=1)
    assert len(small.ref) == 8 and len(small) == 40
    zs = small.z(np.arange(40)).numpy()[:, small.ref]  # standardised over the reference sample, not every body
    spread = zs.std(1) > 0  # (a query that finds none of the 8 bodies has all-zero offsets there)
    assert spread.sum() > 10 and np.allclose(zs.mean(1), 0, atol=1e-5) and np.allclose(zs.std(1)[spread], 1, atol=1e-4)
    # a signature that shares no identifier with any body: zero offsets, not a NaN that poisons the loss
    lone = LexicalOffsets(sigs + ["def unrelated_xyz():"], bodies + ["pass"])
    assert np.array_equal(lone.z(np.array([40])).numpy(), np.zeros((1, 41), np.float32))
    with pytest.raises(ValueError, match="signatures"):
        LexicalOffsets(sigs, bodies[:3])


def test_the_offset_enters_infonce_and_the_validation_ranks_in_cosine_units() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    plain = losses.infonce(pred, target, 0.1)
    assert torch.allclose(losses.infonce(pred, target, 0.1, offset=torch.zeros(6, 6)), plain)
    assert losses.infonce(pred, target, 0.1, offset=torch.eye(6)) < plain  # the hybrid favours the true pairs
    ref = F.normalize(torch.randn(32, 8, generator=g), dim=-1)
    off = lexical_offset(pred, torch.eye(6), ref, 0.5)
    sd = (F.normalize(pred, dim=-1) @ ref.T).std(1)
    assert torch.allclose(off.diagonal(), 0.5 * sd) and not off.requires_grad
    # the validation ranks: cosine alone is at chance on unrelated vectors, the hybrid follows BM25
    sigs = [texts(f"r::f{j}")[0] for j in range(30)]
    lex = LexicalOffsets(sigs, [texts(f"r::f{j}")[1] for j in range(30)])
    p, t = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    dense = retrieval_ranks(p, t)
    assert torch.equal(retrieval_ranks(p, t, lexical=(lex, 0.0)), dense)
    hybrid = retrieval_ranks(p, t, lexical=(lex, 5.0))
    assert (hybrid == 1).float().mean() > 0.9 > (dense == 1).float().mean()


def test_training_with_the_offset_selects_on_the_hybrid(store_path: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_corpus(tmp_path / "corpus", store_path, texts)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = losses.compute_loss

    def spy(out, pooled, slots, cfg, to_score=None, lexical=None, **kw):
        if lexical is not None:
            seen.append(lexical)
        return real(out, pooled, slots, cfg, to_score, lexical, **kw)

    monkeypatch.setattr(losses, "compute_loss", spy)
    over = {"model.mlp_hidden": "32", "model.linear_skip": "ridge", "loss.infonce_weight": 1.0,
            "loss.lexical_weight": 0.5, "train.batch_size": 16, "train.epochs": 2, "train.plot_every_s": -1,
            "data.corpus": str(corpus)}
    res = train(store_path, resolve_config("mlp", overrides=over), tmp_path / "lex", device="cpu")
    assert seen and all(z.shape == (16, 16) and ref.shape[1] == 32 for z, ref in seen)
    z = seen[0][0]  # each query's own body shares its rare identifier: the diagonal stands out
    assert (z.diagonal() > z.masked_fill(torch.eye(16, dtype=torch.bool), -1e9).amax(1)).all()
    log = [json.loads(line) for line in (tmp_path / "lex" / "log.jsonl").read_text().splitlines()]
    epochs = [e for e in log if e.get("event") in ("start_val", "epoch")]
    assert epochs and all("val_mrr_dense" in e for e in epochs)
    # BM25 alone finds these bodies: the hybrid MRR (the selection) is far above the cosine's
    assert all(e["val_mrr"] > 0.9 and e["val_mrr"] > e["val_mrr_dense"] + 0.1 for e in epochs)
    assert res["best_val_mrr"] == max(e["val_mrr"] for e in epochs)
    fig = curves_figure([e for e in epochs if e["event"] == "epoch"], start_mrr=epochs[0]["val_mrr"])
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert "val MRR, cosine alone" in labels and any("BM25" in label and "selection" in label for label in labels)
    # without the offset nothing lexical is computed or logged
    seen.clear()
    train(store_path, resolve_config("mlp", overrides={**over, "loss.lexical_weight": 0.0}), tmp_path / "plain",
          device="cpu")
    assert not seen
    assert "val_mrr_dense" not in (tmp_path / "plain" / "log.jsonl").read_text()


def test_the_offset_needs_infonce_and_a_corpus(store_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lexical_weight"):
        resolve_config("mlp", overrides={"loss.lexical_weight": 0.5})  # the seed MLP has no InfoNCE term
    with pytest.raises(ConfigError, match="lexical_weight"):
        resolve_config("mlp", overrides={"loss.infonce_weight": 1.0, "loss.lexical_weight": -1})
    over = {"model.mlp_hidden": "32", "loss.infonce_weight": 1.0, "loss.lexical_weight": 0.5,
            "train.batch_size": 16, "train.epochs": 1, "train.plot_every_s": -1}
    with pytest.raises(BatchingError, match="loss.lexical_weight"):  # synthetic stores record no corpus
        train(store_path, resolve_config("mlp", overrides=over), tmp_path / "a", device="cpu")
    assert not (tmp_path / "a" / "run.json").exists()
