"""The order in which an epoch visits the train records, and so what a batch holds.

InfoNCE's negatives are the other bodies of the batch. With a plain shuffle they almost
never come from the query's own file, yet on python-40's test repositories six in ten of
ridge's wrong first answers are a body from the same file (whose in-context states share the file's echo) and
nine in ten one from the same repository. ``train.batch_groups = "file"`` packs each batch
from runs of up to ``train.group_size`` records of one source file (runs shuffled, records
shuffled within a file), so the loss has to tell siblings apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from codejepa.core import CodejepaError
from codejepa.corpus.records import corpus_fingerprint, is_corpus_of, load_records, read_manifest
from codejepa.embed.store import Store


class BatchingError(CodejepaError):
    """Batches grouped by file, but the records' files cannot be found."""


def group_runs(keys: np.ndarray, group_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of ``keys`` cut into runs of at most ``group_size`` records sharing a key, the
    records of a key shuffled before cutting; runs in key order (the caller shuffles them)."""
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    _, inv = np.unique(keys, return_inverse=True)
    order = rng.permutation(len(keys))
    order = order[np.argsort(inv[order], kind="stable")]  # grouped by key, shuffled within
    g = inv[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if len(g) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(g)]
    return [order[c:min(b, c + group_size)] for a, b in zip(starts, ends) for c in range(a, b, group_size)]


def epoch_order(n: int, rng: np.random.Generator, keys: np.ndarray | None = None,
                group_size: int = 32) -> np.ndarray:
    """A permutation of ``range(n)``: a plain shuffle, or with ``keys`` (one group key per
    record) the :func:`group_runs` in shuffled order. Consecutive slices of it are the
    batches, so a batch holds whole runs, except where a batch edge cuts one."""
    if keys is None:
        return rng.permutation(n)
    if len(keys) != n:
        raise ValueError(f"{len(keys)} group keys for {n} records")
    runs = group_runs(keys, group_size, rng)
    return np.concatenate([runs[i] for i in rng.permutation(len(runs))]) if runs else np.zeros(0, np.int64)


def corpus_columns(store: Store, corpus_dir: str | Path | None = None, *,
                   why: str) -> dict[str, np.ndarray]:
    """``file`` (``repo/path``), ``signature`` and ``body`` text and ``body_hash`` (the corpus's
    normalised body hash, evaluate's duplicate label) of every store record, in store order,
    read from the corpus the store was embedded from (``store.meta.corpus_dir`` unless
    ``corpus_dir`` is given). ``why`` names the setting that needs them, for the error."""
    if not (corpus_dir or store.meta.corpus_dir):
        raise BatchingError(f"{why} reads the corpus the store was embedded from, and this store does not "
                            "name one; pass --set data.corpus=DIR")
    where = Path(corpus_dir or store.meta.corpus_dir)
    try:
        fingerprint = corpus_fingerprint(read_manifest(where))
    except (OSError, ValueError, CodejepaError) as e:
        raise BatchingError(f"{why} reads the corpus the store was embedded from, {where}, which cannot be "
                            f"read ({e}); pass --set data.corpus=DIR") from None
    want = store.meta.corpus_manifest_hash
    # Record ids can outlive a rebuild whose texts changed: the fingerprint says it is the same corpus.
    if not is_corpus_of(where, fingerprint, want):
        raise BatchingError(f"{why} reads the corpus the store was embedded from, and {where} is another one "
                            f"(corpus fingerprint {fingerprint[:12]}… vs the store's {want[:12]}…): it was built "
                            "again since; pass --set data.corpus=DIR of the store's corpus")
    # body_hash: the corpus's normalised body hash (evaluate's duplicate label), else the record's own id
    recs = {rec.id: (rec.source_file, rec.signature, rec.body, rec.body_hash or f"id:{rec.id}")
            for rec in load_records(where, include_dropped=True)}
    missing = [rid for rid in store.ids if rid not in recs]
    if missing:
        raise BatchingError(f"{len(missing)} store records (e.g. {missing[0]}) are not in the corpus at {where}: "
                            "it is not the corpus this store was embedded from")
    names = ("file", "signature", "body", "body_hash")
    cols = list(zip(*(recs[rid] for rid in store.ids))) or [()] * len(names)
    return {name: np.array(c, dtype=str if name in ("file", "body_hash") else object) for name, c in zip(names, cols)}


def record_files(store: Store, corpus_dir: str | Path | None = None) -> np.ndarray:
    """``repo/path`` of every store record's source file (see :func:`corpus_columns`)."""
    return corpus_columns(store, corpus_dir, why="train.batch_groups = 'file' (or 'repo', which needs no corpus)")["file"]
