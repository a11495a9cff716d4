"""The predict stage: predictors that learn a frozen teacher's body states from the states of
a function's context and signature (`codejepa predict train`).

Public API (imported lazily, so that ``codejepa --help`` does not import torch)::

    from codejepa.predict import load_predictor, Predictor, resolve_config
    from codejepa.predict.train import train

- ``load_predictor(run_dir, device="cpu") -> Predictor``: config, normalisation stats and the
  best checkpoint (``torch.load(weights_only=True)``).
- ``Predictor.name``, ``Predictor.store_fingerprint`` (the training store's
  ``Store.fingerprint()``: its metadata's, and the split file's when trained with one), ``Predictor.predict_pooled(store, indices)`` →
  ``[len(indices), hidden_size]`` float32 predicted mean-pooled body states in the teacher's
  RAW space, from context + signature states only; a store with another fingerprint raises
  :class:`PredictorError` (a ``CodejepaError``).
- ``train(store_path, config, out_dir, resume=False, device="auto")``: see
  :mod:`codejepa.predict.train`.
"""

from __future__ import annotations

from codejepa.core import lazy_exports

_LAZY = {
    "load_predictor": "codejepa.predict.api",
    "Predictor": "codejepa.predict.api",
    "PredictorError": "codejepa.predict.api",
    "TrainingError": "codejepa.predict.train",
    "DivergedError": "codejepa.predict.train",
    "PredictConfig": "codejepa.predict.config",
    "ConfigError": "codejepa.predict.config",
    "resolve_config": "codejepa.predict.config",
}
__all__ = list(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
