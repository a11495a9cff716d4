"""The probe view as a training signal (``loss.probe_weight``).

Evaluate's ``+probe`` rows mix each query's prediction with its probe view (``codejepa embed
probe``: the teacher's own reading of a body position after the query's context and
signature). A predictor trained alone, then mixed, spends its capacity on what the view
already holds: on python-40 the view alone came within a point of the best mix. With
``loss.probe_weight = w`` InfoNCE ranks the mix the evaluation will rank, so the residual
is trained for what the view lacks; validation (model selection) scores the same mix.

The view reads nothing of the record's body (``embed probe`` is tested for that), and its
probes must be train bodies of the run's own split: a probe that were a val record's body
would sit in every val query's view.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codejepa.core import CodejepaError
from codejepa.embed.probe import ProbeError, default_probe_path, probes_outside_train, read_probe_view
from codejepa.embed.store import Store


class ProbeViewError(CodejepaError):
    """A probe view that training cannot use: missing, unfinished, another store's, leaky."""


@dataclass
class ProbeViews:
    """A finished probe view held in memory, one row per store record (raw teacher space)."""

    path: Path
    view: torch.Tensor  # [n_records, hidden] float32
    record: dict[str, Any]  # what run.json keeps: the file and the probes that made it

    def rows(self, index: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """The raw views of store records ``index``."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return self.view[idx].to(device, non_blocking=True)


def view_record(path: Path, meta: Any) -> dict[str, Any]:
    """What identifies a view for a run: resuming with another view would change the loss."""
    return {"file": str(path.resolve()), "probe_records": list(meta.probe_records), "seed": int(meta.seed),
            "n_probes": int(meta.n_probes), "splits": meta.splits}


def load_probe_views(store: Store, store_path: Path, path: str | os.PathLike[str] | None = None,
                     recorded: dict[str, Any] | None = None) -> ProbeViews:
    """Read the probe view at ``path`` (default: the run's ``recorded`` file, else the store's
    sidecar ``STORE.probe.h5``) and check it can train this run: complete, made for this
    store, its probes in the train part of the store's (current) split, and, on a resumed run,
    the view the run started with. Raises :class:`ProbeViewError` with one line."""
    if path is None:
        path = recorded["file"] if recorded else default_probe_path(store_path)
    path = Path(path)
    try:
        pv = read_probe_view(path, store)
    except ProbeError as e:
        raise ProbeViewError(f"loss.probe_weight needs the probe view: {e}") from None
    if pv.committed < len(store):
        raise ProbeViewError(f"{path}: the probe view covers {pv.committed} of {len(store)} records; finish it first "
                             f"(`codejepa embed probe {shlex.quote(str(store_path))} --out {shlex.quote(str(path))}` "
                             "resumes it)")
    if outside := probes_outside_train(pv.meta, store):
        raise ProbeViewError(f"{path}: probe record(s) {', '.join(outside)} are not in this split's train part "
                             "(their bodies would be in the val queries' views); compute a view for this split "
                             "(`codejepa embed probe STORE --splits FILE --out …`)")
    record = view_record(path, pv.meta)
    if recorded is not None and {k: v for k, v in record.items() if k != "file"} != \
            {k: v for k, v in recorded.items() if k != "file"}:
        raise ProbeViewError(f"{path}: not the probe view this run was trained with ({recorded.get('file')}: "
                             "other probes); resume with that view, or start a new --out")
    return ProbeViews(path, torch.from_numpy(pv.view), record)
