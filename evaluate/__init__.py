"""The evaluate stage: instance-level retrieval that a category prototype cannot pass.

Public API (imported lazily, so that ``codejepa --help`` does not import torch)::

    from codejepa.evaluate import evaluate_retrieval, compare_saved

    res = evaluate_retrieval("store.h5", ["runs/mlp"], split="test", pool="split",
                             spaces="all", baselines="all", out_dir="eval/")
    res.row("ridge", "whitened").metrics["rank@1"]      # MetricCI(value, low, high)
    res.warnings                                          # collapse and fit warnings, one line each
    compare_saved("eval/", "mlp@whitened", "ridge@whitened")  # paired bootstrap, p-value

Modules: :mod:`.metrics` (ranks → metrics, chance levels, repository bootstrap, paired
comparison), :mod:`.search` (exact blocked search over distinct bodies), :mod:`.spaces`
(raw / centered / whitened, fitted on train), :mod:`.baselines`, :mod:`.pools`,
:mod:`.diagnostics` (collapse), :mod:`.hubness` (CSLS rows), :mod:`.siblings` (the
sibling softmax: ``+sib`` rows), :mod:`.report` and :mod:`.plots` (outputs),
:mod:`.retrieval` (the whole evaluation).
"""

from __future__ import annotations

from codejepa.core import lazy_exports

_LAZY = {
    "evaluate_retrieval": "codejepa.evaluate.retrieval",
    "RetrievalResult": "codejepa.evaluate.retrieval",
    "EvaluateError": "codejepa.evaluate.errors",
    "compare_saved": "codejepa.evaluate.report",
    "load_result": "codejepa.evaluate.report",
}
__all__ = list(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
