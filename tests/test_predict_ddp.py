"""DDP: two CPU processes (gloo) give the same weights as one process with the same global batch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from _evaluate_fixtures import write_view  # noqa: E402
from _predict_fixtures import ddp_worker, free_ports, make_store, write_corpus  # noqa: E402

from codejepa.embed.probe import default_probe_path  # noqa: E402
from codejepa.embed.store import open_store  # noqa: E402
from codejepa.predict.config import resolve_config  # noqa: E402
from codejepa.predict.train import train  # noqa: E402


@pytest.mark.timeout(240)
def test_two_gloo_ranks_match_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    torch.set_num_threads(1)
    store = make_store(tmp_path / "s.h5", n_repos=6, per_repo=32, n_val_repos=1, n_test_repos=1)  # 128 train
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf"]

    def texts(rid: str) -> tuple[str, str]:  # BM25 finds a body by its signature's rare name
        repo, j = rid.split("::f")
        return f"def get_{words[int(j) % 7]}_{repo}_{j}():", f"return {words[int(j) % 7]}_{repo}_{j} + common"

    corpus = write_corpus(tmp_path / "corpus", store, texts)
    with open_store(store) as st:  # a probe view beside the store, read by loss.probe_weight on every rank
        write_view(store, default_probe_path(store), st.pooled("signature", st.indices()))
    common = {"train.batch_size": 32, "train.epochs": 2, "train.plot_every_s": -1, "optim.lr": 3e-3}
    cfgs = {
        "mlp": resolve_config("mlp", overrides={**common, "model.mlp_hidden": "64,32,64"}),
        "transformer": resolve_config("transformer", overrides={
            **common, "model.width": 32, "model.depth": 1, "model.heads": 2, "model.body_slots": 4,
            "model.max_input_tokens": 16, "optim.warmup_steps": 2, "loss.infonce_weight": 0.0}),
        # ridge and the input-view statistics are fitted on rank 0 only: DDP must broadcast them;
        # InfoNCE's negatives are both ranks' bodies (no dropout: each rank draws its own masks)
        "ridge-residual": resolve_config("mlp", preset="ridge-residual", overrides={
            **common, "model.mlp_hidden": "64", "model.dropout": 0.0, "model.input_dropout": 0.0}),
        # the transformer on the ridge path: its slot head gets no gradient (pooled loss only)
        "transformer-residual": resolve_config("transformer", preset="transformer-residual", overrides={
            **common, "model.mlp_hidden": "64", "model.dropout": 0.0, "model.input_dropout": 0.0,
            "model.width": 32, "model.depth": 1, "model.heads": 2, "model.body_slots": 4,
            "model.max_input_tokens": 16}),
        # every rank scores the whole global batch: the bodies → predictions direction, the BM25
        # offset (the global batch's matrix) and the variance hinge's spread over the global batch
        "symmetric-bm25-variance": resolve_config("mlp", preset="ridge-residual", overrides={
            **common, "model.mlp_hidden": "64", "model.dropout": 0.0, "model.input_dropout": 0.0,
            "loss.symmetric": True, "loss.lexical_weight": 0.5, "loss.variance_weight": 1.0,
            "loss.variance_gamma": 2.0, "data.corpus": str(corpus)}),
        # the probe mix: each rank mixes its own rows' views before InfoNCE gathers the global batch
        "probe-mix": resolve_config("mlp", preset="ridge-residual", overrides={
            **common, "model.mlp_hidden": "64", "model.dropout": 0.0, "model.input_dropout": 0.0,
            "loss.probe_weight": 0.5}),
    }
    ports = free_ports(len(cfgs))
    jobs = [(str(store), cfg, str(tmp_path / f"ddp-{name}"), port) for (name, cfg), port in zip(cfgs.items(), ports)]
    mp.spawn(ddp_worker, args=(2, jobs), nprocs=2, join=True)
    for name, cfg in cfgs.items():
        train(store, cfg, tmp_path / f"one-{name}", device="cpu")
        one = torch.load(tmp_path / f"one-{name}" / "last.pt", weights_only=True)
        two = torch.load(tmp_path / f"ddp-{name}" / "last.pt", weights_only=True)
        assert one["global_step"] == two["global_step"] == 8
        for k, v in one["model"].items():
            assert torch.allclose(v, two["model"][k], atol=1e-5, rtol=1e-4), (name, k)
        assert abs(one["history"][-1]["val_mrr"] - two["history"][-1]["val_mrr"]) < 1e-3
    assert "WORLD_SIZE" not in os.environ
