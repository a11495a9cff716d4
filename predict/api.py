"""The predict stage's public API for later stages (evaluate): load a trained run, predict.

    from codejepa.predict import load_predictor

    p = load_predictor("runs/mlp", device="cpu")      # best.pt (weights_only=True) + config + stats
    p.name, p.store_fingerprint                       # run folder name; Store.fingerprint() of the training store (and split)
    q = p.predict_pooled(store, store.indices("test"))  # [n, hidden_size] float32, RAW teacher space

``predict_pooled`` returns, for each record, the predicted MEAN-POOLED body state (sink and
outlier-norm tokens excluded, as in training) in the teacher's raw space, computed from the
``inputs`` pass (context + signature) only: the body — its length included — is never read.
A store whose fingerprint differs from the training store's raises :class:`PredictorError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codejepa.core import CodejepaError, printable, read_json_object
from codejepa.embed.store import Store, StoreError
from codejepa.predict.config import PredictConfig, from_dict
from codejepa.predict.data import FeatureTable, estimate_cache_bytes
from codejepa.predict.models import build_model
from codejepa.predict.normalize import NormStats
from codejepa.predict.train import feature_spec, load_checkpoint, resolve_device, to_device


class PredictorError(CodejepaError):
    """A run that cannot be loaded, or a store it cannot be applied to."""


class Predictor:
    """A trained predictor, ready to predict pooled body embeddings for a store's records."""

    def __init__(self, model: torch.nn.Module, config: PredictConfig, stats: NormStats, *, name: str,
                 store_fingerprint: str, hidden_size: int, device: torch.device, run_dir: Path | None = None,
                 epoch: int = -1, metrics: dict[str, Any] | None = None) -> None:
        self.model, self.config, self.stats = model.eval(), config, stats
        self.name, self.store_fingerprint, self.hidden_size = name, store_fingerprint, hidden_size
        self.device, self.run_dir, self.epoch, self.metrics = device, run_dir, epoch, metrics or {}

    def __repr__(self) -> str:
        return f"Predictor({self.name!r}, {self.config.model.kind}, d={self.hidden_size}, epoch={self.epoch})"

    def check_store(self, store: Store) -> None:
        """Refuse (one PredictorError line) a store other than the one this run was trained on."""
        if not hasattr(store, "fingerprint"):
            raise PredictorError(f"an open store is expected (codejepa.embed.open_store(path)), not {type(store).__name__}")
        fp = store.fingerprint()
        if fp != self.store_fingerprint:
            raise PredictorError(
                f"predictor {self.name!r} was trained on a store with other settings than {store.path} "
                f"(fingerprint {self.store_fingerprint[:12]} vs {fp[:12]}: another teacher, layer, template, "
                "corpus or split file); use a store embedded with the same settings, and the same --splits"
            )

    @torch.no_grad()
    def predict_pooled(self, store: Store, indices: Any, *, batch_size: int = 256,
                       chunk_bytes: float = 1e9, normalized: bool = False) -> np.ndarray:
        """[len(indices), hidden_size] float32 predicted mean body states, raw teacher space
        (``normalized=True``: the normalised pooled space the model was selected in, see ``norm.pooled_space``)."""
        self.check_store(store)
        try:
            idx = store.checked_indices(np.asarray(indices).reshape(-1))  # a mask or floats would pick wrong records
        except StoreError as e:
            raise PredictorError(str(e)) from None
        out = np.zeros((len(idx), self.hidden_size), np.float32)
        if len(idx) == 0:
            return out
        spec = feature_spec(self.config, self.stats)
        uniq, inverse = np.unique(idx, return_inverse=True)
        res = np.zeros((len(uniq), self.hidden_size), np.float32)
        # The cache's own estimate (every input view, the records' real lengths) per record.
        per_record = max(1.0, estimate_cache_bytes(store, uniq, spec, with_body=False) / len(uniq))
        chunk = max(1, int(chunk_bytes // per_record))
        for c in range(0, len(uniq), chunk):  # features of one chunk in RAM at a time: bounded memory
            tab = FeatureTable(store, uniq[c : c + chunk], spec, with_body=False)
            for a in range(0, len(tab), batch_size):
                rows = np.arange(a, min(a + batch_size, len(tab)))
                o = self.model(to_device(tab.batch(rows), self.device))
                y = o["pooled"] if normalized else self.model.raw(o)
                res[c + a : c + a + len(rows)] = y.float().cpu().numpy()
        out[:] = res[inverse]
        return out


def load_predictor(run_dir: str | os.PathLike[str], device: str = "cpu", *, checkpoint: str = "best") -> Predictor:
    """Load a run's config, normalisation stats and best (or ``last``) checkpoint.

    The checkpoint is read with ``torch.load(weights_only=True)``: a checkpoint is data.
    """
    run = Path(run_dir)
    if not (run / "config.json").is_file() or not (run / "run.json").is_file():
        raise PredictorError(f"{run}: not a predict run directory (no config.json/run.json; "
                             "train one with `codejepa predict train`)")
    path = run / f"{checkpoint}.pt"
    if not path.is_file():
        raise PredictorError(f"{path}: no such checkpoint (has an epoch of training finished?)")
    dev = resolve_device(device)
    try:
        ck = load_checkpoint(path, "cpu")
    except CodejepaError as e:
        raise PredictorError(str(e)) from None
    info = read_json_object(run / "run.json", "run record", PredictorError, "retrain the run")
    cfg = from_dict(ck["config"])
    d = int(ck["hidden_size"])
    model = build_model(cfg, d)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise PredictorError(f"{path}: weights do not fit the run's config ({str(e).splitlines()[0]})") from None
    stats = model.norm.stats()
    if (run / "stats.pt").is_file():
        try:  # only the counts are read from it (the statistics themselves live in the checkpoint)
            stats.counts = dict(NormStats.from_plain(torch.load(run / "stats.pt", weights_only=True)).counts)
        except Exception as e:  # torch's own message advises an unsafe load
            raise PredictorError(f"{run / 'stats.pt'}: damaged or foreign statistics file ({type(e).__name__}); "
                                 "retrain the run, or delete it to evaluate without its counts") from None
    model.to(dev)
    best = next((h for h in ck.get("history", []) if h.get("epoch") == ck.get("best_epoch")), None)
    # The run folder's name: what the user chose to tell runs apart (the preset is in .config.name).
    name = printable(run.resolve().name) or str(info.get("name", "predictor"))
    return Predictor(model, cfg, stats, name=name, store_fingerprint=ck["store_fingerprint"],
                     hidden_size=d, device=dev, run_dir=run, epoch=int(ck.get("epoch", -1)), metrics=best)
