"""The embed stage: a frozen teacher's per-token states of every record, in an HDF5 store.

``codejepa.embed.open_store(PATH)`` is the reader API the later stages use (see
:mod:`codejepa.embed.store`); :func:`codejepa.embed.run.embed_corpus` writes a store and
:func:`codejepa.embed.merge.merge_stores` joins shards;
:func:`codejepa.embed.probe.compute_probe_view` writes a store's probe view beside it. Names are resolved lazily so that
importing the package (the CLI does) loads neither h5py nor torch.
"""

from __future__ import annotations

from codejepa.core import lazy_exports

_EXPORTS = {
    "open_store": "codejepa.embed.store",
    "Store": "codejepa.embed.store",
    "StoreMeta": "codejepa.embed.store",
    "StoreError": "codejepa.embed.store",
    "StoreWriter": "codejepa.embed.store",
    "PendingRecord": "codejepa.embed.store",
    "EmbedSettings": "codejepa.embed.run",
    "embed_corpus": "codejepa.embed.run",
    "merge_stores": "codejepa.embed.merge",
    "ProbeSettings": "codejepa.embed.probe",
    "compute_probe_view": "codejepa.embed.probe",
    "read_probe_view": "codejepa.embed.probe",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
