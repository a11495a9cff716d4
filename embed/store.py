"""The HDF5 store of per-token teacher states: its layout, a writer and the reader API.

Layout (one file)::

    /                 attrs: format, format_version, meta (JSON of :class:`StoreMeta`)
    /records          split [N] uint8, truncated [N] bool,
                      id_utf8 [B] uint8 + id_end [N] int64 (record i's id is
                      id_utf8[id_end[i-1]:id_end[i]]), repo_utf8 + repo_end likewise
                      attrs: committed (records fully written; readers trust only these)
    /inputs           the pass over [leading specials] + file context + signature
        states    [T, d]  float16 (float32 when a value would overflow float16)
        token_ids [T]     int32
        special   [T]     bool   (BOS / [CLS] / [SEP] sink tokens: stored, marked)
        offsets   [N+1]   int64  record i's tokens are offsets[i]:offsets[i+1]
        segments  [N,2,2] int32  [context a,b), [signature a,b) relative to the record start
    /targets          the body tokens' states (in context, or from a body-only pass)
        states, token_ids, special, offsets as above

Ragged per-token states live in flat, chunked, resizable datasets with an offsets index,
not one dataset per record. The writer appends a batch to every dataset, flushes, and only
then raises ``committed``: a reader (and a resumed writer) ignores anything past it.

Strings are stored as ragged UTF-8 bytes, not as HDF5 variable-length strings: those live
in a global heap that a kill -9 mid-write can leave inconsistent with the datasets, after
which the resumed writer fails with "bad heap index" (measured; see
tests/test_embed_resume.py). Fixed-type, truncatable datasets have no such shared state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
from scipy import sparse

from codejepa.core import CodejepaError, sha256_json

if TYPE_CHECKING:
    from codejepa.corpus.folds import SplitAssignment

STORE_FORMAT = "codejepa-store"
STORE_FORMAT_VERSION = 2
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SPLIT_NAMES = np.array(["train", "val", "test"])
PASSES = ("inputs", "targets")
FLOAT16_MAX = float(np.finfo(np.float16).max)
# A checksum per chunk: damage inside the file (a bad disk, a bad copy) is then a clear error
# when read, not NaNs or wrong states passed on to training. Measured here: about 1 ms per MB
# written and 0.5 ms per MB read (150 MB of float16 states: 0.09 → 0.26 s, 0.08 → 0.16 s).
# Stores written before it carry none and read as before.
CHECKSUM = {"fletcher32": True}


class StoreError(CodejepaError):
    """A store that cannot be read or appended to, with one clear line saying why."""


@dataclass(frozen=True)
class StoreMeta:
    """What produced a store: enough to refuse a mismatched input with one clear line."""

    teacher: str
    teacher_kind: str  # "causal" | "bidirectional"
    hidden_size: int
    layer: int  # index into the model's hidden_states (0 = embeddings), non-negative
    num_hidden_layers: int
    hidden_states_convention: str = "hf-hidden_states-index; pre-final-norm unless layer == num_hidden_layers"
    teacher_revision: str = ""
    weights_hash: str = ""
    state_dtype: str = "float16"
    compute_dtype: str = "float32"
    template_version: str = ""
    tokenizer_hash: str = ""
    corpus_dir: str = ""
    corpus_manifest_hash: str = ""
    code_version: str = ""
    target_mode: str = "in_context"  # "in_context" | "body_only"
    max_tokens: int = 0
    shard: str = "0/1"
    extra: dict[str, Any] = field(default_factory=dict)

    def compatibility_key(self) -> dict[str, Any]:
        """The settings two stores (or a store and a checkpoint) must share to be mixed."""
        return {
            k: getattr(self, k)
            for k in ("teacher", "weights_hash", "layer", "hidden_size", "template_version",
                      "tokenizer_hash", "target_mode", "corpus_manifest_hash")
        }

    def append_key(self) -> dict[str, Any]:
        """What a store and a run must share for the run to append to it: the compatibility
        key plus the settings that change stored values without changing what they mean
        to a reader (compute and storage dtype, window, shard)."""
        key = self.compatibility_key()
        for k in ("teacher_kind", "compute_dtype", "state_dtype", "max_tokens", "shard",
                  "hidden_states_convention", "num_hidden_layers"):
            key[k] = getattr(self, k)
        return key

    def fingerprint(self) -> str:
        return sha256_json(self.compatibility_key())

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> StoreMeta:
        d = json.loads(s)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class RecordStates:
    """One record's stored data for one pass (float32 states)."""

    states: np.ndarray  # [n, d]
    token_ids: np.ndarray  # [n]
    special: np.ndarray  # [n] bool
    segments: dict[str, tuple[int, int]]  # inputs only: "context", "signature" → [a, b)


@dataclass
class PendingRecord:
    """What the writer needs for one record (states as float32 or float16 numpy arrays)."""

    id: str
    split: str
    repo: str
    truncated: bool
    input_states: np.ndarray  # [n_in, d]
    input_token_ids: np.ndarray  # [n_in]
    input_special: np.ndarray  # [n_in] bool
    context_span: tuple[int, int]  # token range inside the inputs
    signature_span: tuple[int, int]
    body_states: np.ndarray  # [n_body, d]
    body_token_ids: np.ndarray  # [n_body]
    body_special: np.ndarray | None = None


STRING_FIELDS = ("id", "repo")


def _read_strings(group: h5py.Group, name: str, n: int) -> np.ndarray:
    """The first ``n`` strings of a ragged UTF-8 field, as an object array of str."""
    ends = group[f"{name}_end"][:n]
    raw = group[f"{name}_utf8"][: int(ends[-1]) if n else 0].tobytes()
    starts = np.concatenate([[0], ends[:-1]]) if n else ends
    return np.array([raw[a:b].decode("utf-8") for a, b in zip(starts.tolist(), ends.tolist())], dtype=object)


class StoreWriter:
    """Appends records to a store in committed batches; resumes an existing compatible store.

    ``StoreWriter(path, meta)`` creates the file, or reopens it when it exists with the same
    :meth:`StoreMeta.compatibility_key` (anything past ``committed`` is truncated away);
    a store built with another teacher, layer or template raises :class:`StoreError`.
    """

    def __init__(self, path: str | os.PathLike[str], meta: StoreMeta, *, chunk_tokens: int = 256) -> None:
        self.path = Path(path)
        self.meta = meta
        if meta.state_dtype not in ("float16", "float32"):
            raise StoreError(f"state dtype must be float16 or float32, not {meta.state_dtype}")
        self._dtype = np.dtype(meta.state_dtype)
        if self.path.exists():
            existing = read_meta(self.path)
            old_key, new_key = existing.append_key(), meta.append_key()
            if old_key != new_key:
                diff = {k: (v, new_key.get(k)) for k, v in old_key.items() if v != new_key.get(k)}
                # The commonest case named in words: the corpus was built again since (a new commit,
                # a source added or dropped), and its records are not the store's any more.
                corpus = f"its corpus {meta.corpus_dir}" if meta.corpus_dir else "its corpus"
                why = (f"{corpus} was built again since this store was embedded from it; "
                       if "corpus_manifest_hash" in diff else "")
                if why and existing.corpus_dir and meta.corpus_dir and existing.corpus_dir != meta.corpus_dir:
                    why = f"this store was embedded from another corpus, {existing.corpus_dir}; "
                raise StoreError(
                    f"{self.path}: built with other settings, refusing to append ({why}"
                    f"stored vs requested: {diff}); use another --out"
                )
            self.f = _open_h5(self.path, "r+")
            self.meta = existing
            try:
                self._truncate_to_committed()
                self._ids = set(_read_strings(self.f["records"], "id", self.committed).tolist())
            except (KeyError, OSError, ValueError) as e:
                self.f.close()
                raise StoreError(f"{self.path}: damaged store, cannot resume it ({e})") from None
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # libver="earliest" on purpose: the newer superblock (v3) marks the file "open for
            # write" on disk, and after a kill -9 HDF5 refuses to open it at all (h5clear
            # needed). With the old superblock, a killed store reopens and the ``committed``
            # mark says what to trust (tests/test_embed_resume.py kills a real process).
            try:
                self.f = h5py.File(self.path, "w", libver="earliest")
            except OSError as e:
                raise StoreError(f"{self.path}: cannot create the store ({e})") from None
            self._create(chunk_tokens)
            self._ids = set()

    # -- layout ---------------------------------------------------------------------------
    def _create(self, chunk_tokens: int) -> None:
        f, d = self.f, self.meta.hidden_size
        f.attrs["format"] = STORE_FORMAT
        f.attrs["format_version"] = STORE_FORMAT_VERSION
        f.attrs["meta"] = self.meta.to_json()
        r = f.create_group("records")
        r.attrs["committed"] = 0
        for name in STRING_FIELDS:
            r.create_dataset(f"{name}_utf8", (0,), maxshape=(None,), dtype=np.uint8, chunks=(65536,), **CHECKSUM)
            r.create_dataset(f"{name}_end", (0,), maxshape=(None,), dtype=np.int64, chunks=(4096,), **CHECKSUM)
        r.create_dataset("split", (0,), maxshape=(None,), dtype=np.uint8, chunks=(4096,), **CHECKSUM)
        r.create_dataset("truncated", (0,), maxshape=(None,), dtype=bool, chunks=(4096,), **CHECKSUM)
        for name in PASSES:
            g = f.create_group(name)
            g.create_dataset("states", (0, d), maxshape=(None, d), dtype=self._dtype, chunks=(chunk_tokens, d),
                             **CHECKSUM)
            g.create_dataset("token_ids", (0,), maxshape=(None,), dtype=np.int32, chunks=(8192,), **CHECKSUM)
            g.create_dataset("special", (0,), maxshape=(None,), dtype=bool, chunks=(8192,), **CHECKSUM)
            g.create_dataset("offsets", (1,), maxshape=(None,), dtype=np.int64, chunks=(4096,), data=[0], **CHECKSUM)
        f["inputs"].create_dataset("segments", (0, 2, 2), maxshape=(None, 2, 2), dtype=np.int32, chunks=(4096, 2, 2),
                                   **CHECKSUM)
        f.flush()

    @property
    def committed(self) -> int:
        return int(self.f["records"].attrs["committed"])

    def _truncate_to_committed(self) -> None:
        n = self.committed
        r = self.f["records"]
        for name in ("split", "truncated"):
            r[name].resize((n,))
        for name in STRING_FIELDS:
            end = int(r[f"{name}_end"][n - 1]) if n else 0
            r[f"{name}_end"].resize((n,))
            r[f"{name}_utf8"].resize((end,))
        for name in PASSES:
            g = self.f[name]
            t = int(g["offsets"][n])
            g["offsets"].resize((n + 1,))
            for ds in ("states", "token_ids", "special"):
                g[ds].resize((t,) + g[ds].shape[1:])
        self.f["inputs/segments"].resize((n, 2, 2))
        self.f.flush()

    # -- writing --------------------------------------------------------------------------
    def has(self, record_id: str) -> bool:
        return record_id in self._ids

    def _check_range(self, a: np.ndarray, rid: str) -> None:
        if not np.all(np.isfinite(a)):
            raise StoreError(f"record {rid}: teacher states contain NaN/inf; refusing to store them")
        if self._dtype == np.float16 and a.size and float(np.abs(a).max()) > FLOAT16_MAX:
            raise StoreError(
                f"record {rid}: a state value ({float(np.abs(a).max()):.3g}) exceeds float16's range; "
                "re-run with --store-dtype float32 into a new store"
            )

    def _check_batch(self, batch: Sequence[PendingRecord],
                     per_pass: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]) -> None:
        bad = [p.split for p in batch if p.split not in SPLIT_CODES]
        if bad:
            raise StoreError(f"unknown split {bad[0]!r}; expected one of {list(SPLIT_CODES)}")
        for name, items in per_pass.items():
            for (s, t, sp), p in zip(items, batch):
                if s.shape[0] != len(t) or len(sp) != len(t) or (s.ndim != 2 or s.shape[1] != self.meta.hidden_size):
                    raise StoreError(f"record {p.id}: {name} states/token ids/special mask disagree in shape")
                self._check_range(s, p.id)

    def append(self, batch: Sequence[PendingRecord]) -> int:
        """Append and commit a batch; returns the number of records now committed."""
        batch = [p for p in batch if p.id not in self._ids]
        if not batch:
            return self.committed
        per_pass = {
            "inputs": [(p.input_states, p.input_token_ids, p.input_special) for p in batch],
            "targets": [
                (p.body_states, p.body_token_ids,
                 p.body_special if p.body_special is not None else np.zeros(len(p.body_token_ids), bool))
                for p in batch
            ],
        }
        self._check_batch(batch, per_pass)  # before anything is written
        need = sum((p.input_states.shape[0] + p.body_states.shape[0]) * p.input_states.shape[1] for p in batch)
        ensure_free_space(self.path, need * np.dtype(self.meta.state_dtype).itemsize)
        n0 = self.committed
        n1 = n0 + len(batch)
        r = self.f["records"]
        for name in ("split", "truncated"):
            r[name].resize((n1,))
        r["split"][n0:n1] = [SPLIT_CODES[p.split] for p in batch]
        r["truncated"][n0:n1] = [bool(p.truncated) for p in batch]
        for name in STRING_FIELDS:
            encoded = [getattr(p, name).encode("utf-8") for p in batch]
            b0 = int(r[f"{name}_end"][n0 - 1]) if n0 else 0
            ends = b0 + np.cumsum([len(e) for e in encoded], dtype=np.int64)
            r[f"{name}_end"].resize((n1,))
            r[f"{name}_end"][n0:n1] = ends
            r[f"{name}_utf8"].resize((int(ends[-1]),))
            if ends[-1] > b0:
                r[f"{name}_utf8"][b0 : int(ends[-1])] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        for name, items in per_pass.items():
            g = self.f[name]
            lengths = np.array([len(t) for _, t, _ in items], dtype=np.int64)
            t0 = int(g["offsets"][n0])
            t1 = t0 + int(lengths.sum())
            for ds in ("states", "token_ids", "special"):
                g[ds].resize((t1,) + g[ds].shape[1:])
            if t1 > t0:
                g["states"][t0:t1] = np.concatenate([s for s, _, _ in items]).astype(self._dtype)
                g["token_ids"][t0:t1] = np.concatenate([t for _, t, _ in items]).astype(np.int32)
                g["special"][t0:t1] = np.concatenate([sp for _, _, sp in items]).astype(bool)
            g["offsets"].resize((n1 + 1,))
            g["offsets"][n0 + 1 : n1 + 1] = t0 + np.cumsum(lengths)
        seg = self.f["inputs/segments"]
        seg.resize((n1, 2, 2))
        seg[n0:n1] = np.array([[p.context_span, p.signature_span] for p in batch], dtype=np.int32)
        # Data first, then the commit mark: a kill between the two loses only this batch.
        self.f.flush()
        r.attrs["committed"] = n1
        self.f.flush()
        self._ids.update(p.id for p in batch)
        return n1

    def set_extra(self, **kv: Any) -> None:
        """Update free-form metadata (counters such as truncated records)."""
        meta = StoreMeta.from_json(self.f.attrs["meta"])
        extra = dict(meta.extra)
        extra.update(kv)
        self.meta = StoreMeta(**{**asdict(meta), "extra": extra})
        self.f.attrs["meta"] = self.meta.to_json()
        self.f.flush()

    def close(self) -> None:
        if getattr(self, "f", None) is not None and self.f.id.valid:
            self.f.flush()
            self.f.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FREE_SPACE_MARGIN = 256 << 20  # bytes kept free beyond the batch itself (HDF5 metadata, other writers)


def ensure_free_space(path: Path, need: int) -> None:
    """Refuse to write ``need`` more bytes beside ``path`` when the disk cannot hold them: HDF5
    does not always report a full disk, and a chunk it failed to write reads back as zeros in
    a store that looks whole. The batches committed before are kept."""
    import shutil

    free = shutil.disk_usage(path.parent).free  # the file exists: its folder does
    if free < 2 * need + FREE_SPACE_MARGIN:
        raise StoreError(f"{path}: only {free / 1e6:,.0f} MB free on its disk, too little for the next batch "
                         f"({need / 1e6:,.1f} MB and a margin); the committed batches are kept: free space and "
                         "run the same command again")


def open_format_file(path: Path, mode: str, *, fmt: str, version: int, what: str, writer: str,
                     error: type[CodejepaError], redo: str) -> h5py.File:
    """Open one of codejepa's HDF5 files (``what``: "store", "probe view"), turning each way
    it can be unusable into one ``error`` line: locked by a running ``writer`` command,
    unreadable, another kind of HDF5 file, or another format version (``redo`` says what to do)."""
    if mode != "w" and path.is_file() and path.stat().st_size == 0:
        # HDF5 opening an empty file for appending makes it an empty HDF5 file: refuse, untouched.
        raise error(f"{path}: an empty file, not a {what}; {redo}")
    try:
        f = h5py.File(path, mode)
    except OSError as e:
        # HDF5 says "unable to lock file" for a file another process holds; a bare "lock"
        # would also match the "sblock" of a truncated file's message.
        if "unable to lock file" in str(e).lower():
            raise error(f"{path}: the {what} is open for writing in another process (an `{writer}` still going?)") from None
        if "permission denied" in str(e).lower():
            how = "" if mode == "r" else " for writing"
            raise error(f"{path}: permission denied (the {what} cannot be opened{how})") from None
        if "truncated file" in str(e).lower():
            raise error(f"{path}: a truncated {what} (cut short by a full disk or an interrupted copy?); {redo}") from None
        raise error(f"{path}: not a readable {what} (corrupt or foreign file: {e})") from None
    if mode == "w":
        return f
    try:
        fmt_found, found = f.attrs.get("format"), int(f.attrs.get("format_version", -1))
    except (OSError, TypeError, ValueError) as e:
        f.close()
        raise error(f"{path}: a damaged {what} (its attributes cannot be read: {e}); {redo}") from None
    if fmt_found != fmt:
        f.close()
        other = f" (it is a {fmt_found})" if isinstance(fmt_found, str) and fmt_found.startswith("codejepa") else ""
        raise error(f"{path}: an HDF5 file, but not a codejepa {what}{other}")
    if found != version:
        f.close()
        raise error(f"{path}: {what} format version {found} is not supported (this codejepa reads version {version}); {redo}")
    return f


def _open_h5(path: str | os.PathLike[str], mode: str = "r") -> h5py.File:
    p = Path(path)
    if p.is_dir():
        raise StoreError(f"{p}: a folder, not a store file (name the .h5 file)")
    if not p.is_file():
        raise StoreError(f"{p}: no such store (run `codejepa embed run` first)")
    return open_format_file(p, mode, fmt=STORE_FORMAT, version=STORE_FORMAT_VERSION, what="store", writer="embed run",
                            error=StoreError, redo="re-run `codejepa embed run` into a new store")


def read_meta(path: str | os.PathLike[str]) -> StoreMeta:
    with _open_h5(path) as f:
        try:
            return StoreMeta.from_json(f.attrs["meta"])
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{path}: damaged store metadata ({e})") from None


class Store:
    """Read access to a store: metadata, per-record states and streamed pooled views.

    Only committed records are visible. States come back as float32.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.f = _open_h5(self.path)
        try:
            self.meta = StoreMeta.from_json(self.f.attrs["meta"])
            self.n = int(self.f["records"].attrs["committed"])
            r = self.f["records"]
            self.ids: np.ndarray = _read_strings(r, "id", self.n)
            self.splits: np.ndarray = SPLIT_NAMES[r["split"][: self.n]]
            self.split_key: str | None = None  # set by use_splits: the assignment's hash
            self.repos: np.ndarray = _read_strings(r, "repo", self.n)
            self.truncated: np.ndarray = r["truncated"][: self.n].astype(bool)
            self._off = {name: self.f[name]["offsets"][: self.n + 1] for name in PASSES}
            self._segments = self.f["inputs/segments"][: self.n]
        except (KeyError, OSError, ValueError, IndexError) as e:  # IndexError: a split code out of range
            self.f.close()
            raise StoreError(f"{self.path}: damaged store ({type(e).__name__}: {e})") from None

    def __len__(self) -> int:
        return self.n

    @property
    def checksummed(self) -> bool:
        """Whether the store's chunks carry checksums (stores written since 2026-12-06)."""
        return bool(self.f["targets/states"].fletcher32)

    @property
    def complete(self) -> bool | None:
        """Whether the `embed run` (or `embed merge`) that wrote the store finished: False for a
        killed or partial one, whose records are a subset of the corpus; None when not recorded."""
        done = self.meta.extra.get("complete")
        return None if done is None else bool(done)

    def incomplete_note(self) -> str | None:
        """One line for the commands that read an unfinished store, or None."""
        if self.complete is not False:
            return None
        return (f"{self.path}: an unfinished store ({self.n} records; its `embed run` was stopped or is still going): "
                "results cover only the records it holds; rerun `codejepa embed run` to complete it")

    def use_splits(self, splits: Mapping[str, str], key: str) -> int:
        """Replace the stored split by another assignment (record id → split), for this
        reader only; records it does not list are in no split (``indices(None)`` still
        returns them: they stay candidates of a whole-corpus pool). ``key`` names the
        assignment and becomes part of :meth:`fingerprint`, so that a run trained on one
        assignment is refused on another. Returns how many listed records the store lacks."""
        bad = {s for s in splits.values() if s not in SPLIT_CODES}
        if bad:
            raise StoreError(f"unknown split {sorted(bad)[0]!r}; expected one of {list(SPLIT_CODES)}")
        self.splits = np.array([splits.get(rid, "") for rid in self.ids], dtype=SPLIT_NAMES.dtype)
        self.split_key = key
        return len(splits) - int((self.splits != "").sum())

    def fingerprint(self) -> str:
        """What runs trained on this store record and are checked against: the metadata's
        fingerprint, plus the split assignment's key when :meth:`use_splits` replaced it."""
        fp = self.meta.fingerprint()
        return fp if self.split_key is None else sha256_json({"store": fp, "splits": self.split_key})

    def indices(self, split: str | None = None) -> np.ndarray:
        """Record indices of a split (all committed records when ``split`` is None)."""
        if split is None:
            return np.arange(self.n)
        if split not in SPLIT_CODES:
            raise StoreError(f"unknown split {split!r}; expected one of {list(SPLIT_CODES)}")
        return np.flatnonzero(self.splits == split)

    def checked_indices(self, indices: Any) -> np.ndarray:
        """``indices`` as an int64 array of this store's records, or a :class:`StoreError`
        (a boolean mask, fractional or out-of-range indices would read the wrong records)."""
        a = np.asarray(indices)
        if a.dtype == bool:
            raise StoreError("record indices, not a boolean mask, are expected (np.flatnonzero(mask) gives them)")
        if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise StoreError(f"record indices must be a 1-D array of integers, not {a.dtype} of shape {a.shape}")
        a = a.astype(np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.n):
            raise StoreError(f"record index {int(a.min() if a.min() < 0 else a.max())} is out of range: "
                             f"{self.path} holds {self.n} records")
        return a

    def index_of(self) -> dict[str, int]:
        return {rid: i for i, rid in enumerate(self.ids)}

    def read_slice(self, name: str, dataset: str, a: int, b: int) -> np.ndarray:
        """Rows ``a:b`` of one dataset of a pass (``inputs`` or ``targets``), as stored; a chunk
        that fails its checksum (or cannot be read at all) raises :class:`StoreError`."""
        try:
            x = self.f[name][dataset][a:b]
        except OSError as e:
            raise StoreError(f"{self.path}: damaged store: {name}/{dataset} rows {a}..{b - 1} do not read back "
                             f"({e}); embed it again into a new store") from None
        return x

    def non_finite(self, name: str, record: int) -> StoreError:
        """The error for a record whose states in pass ``name`` hold NaN or inf. The writer
        refuses them, so it is damage that a store without checksums (written before they were
        added) shows only this way; read on, it would poison the statistics and the training
        (a linear-algebra traceback, or a loss that diverges and blames the learning rate).
        Readers check what they compute anyway where they can (token norms, pooled means); the
        predictor's RAM cache scans each float32 block it has just converted (a third of what the
        conversion costs, once per training)."""
        return StoreError(f"{self.path}: damaged store: record {record} ({self.ids[record]}) has non-finite "
                          f"{name} states (the writer refuses them); embed it again into a new store")

    def check_finite(self, name: str, values: np.ndarray, run: np.ndarray, offs: np.ndarray) -> None:
        """Raise :meth:`non_finite` for the first record of an :meth:`iter_blocks` block whose
        tokens' ``values`` (the states, or one value per token such as its norm) are not finite."""
        ok = np.isfinite(values)
        if ok.ndim > 1:
            ok = ok.all(axis=1)
        bad = np.flatnonzero(~ok)
        if len(bad):
            raise self.non_finite(name, int(run[np.searchsorted(offs, bad[0], side="right") - 1]))

    def _read(self, name: str, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= i < self.n:
            raise StoreError(f"record index {i} is out of range: {self.path} holds {self.n} records")
        a, b = int(self._off[name][i]), int(self._off[name][i + 1])
        states = self.read_slice(name, "states", a, b).astype(np.float32)
        if not np.isfinite(states).all():
            raise self.non_finite(name, i)
        return states, self.read_slice(name, "token_ids", a, b), self.read_slice(name, "special", a, b)

    def inputs(self, i: int) -> RecordStates:
        s, t, sp = self._read("inputs", i)
        seg = self._segments[i]
        return RecordStates(s, t, sp, {"context": (int(seg[0, 0]), int(seg[0, 1])),
                                       "signature": (int(seg[1, 0]), int(seg[1, 1]))})

    def body(self, i: int) -> RecordStates:
        s, t, sp = self._read("targets", i)
        return RecordStates(s, t, sp, {"body": (0, len(t))})

    def lengths(self, name: str) -> np.ndarray:
        """Tokens per record in a pass (``inputs`` or ``targets``)."""
        return np.diff(self._off[name])

    def segments(self) -> np.ndarray:
        """[N, 2, 2] the context and signature token spans of every record's inputs pass."""
        return self._segments.copy()

    def tokens(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Flat token ids (int64) and sink flags (bool) of every committed record in a pass
        (``inputs`` or ``targets``), in record order; :meth:`lengths` splits them."""
        if name not in PASSES:
            raise StoreError(f"unknown pass {name!r}; expected one of {list(PASSES)}")
        end = int(self._off[name][-1])
        return self.read_slice(name, "token_ids", 0, end).astype(np.int64), self.special(name)

    def special(self, name: str) -> np.ndarray:
        """The flat sink flags alone (bool) of a pass, as :meth:`tokens` gives them, without the ids."""
        if name not in PASSES:
            raise StoreError(f"unknown pass {name!r}; expected one of {list(PASSES)}")
        return self.read_slice(name, "special", 0, int(self._off[name][-1])).astype(bool)

    def iter_blocks(
        self, name: str, indices: np.ndarray | None = None, block_tokens: int = 1 << 18, *, as_float32: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Stream (record indices, float32 states, special mask, offsets within the block).

        Contiguous runs of records are read with one slice each, so a sequential scan reads
        the file once; memory is bounded by ``block_tokens`` (plus one long record).
        ``as_float32=False`` yields the states as stored (float16), for callers that convert
        only the rows they keep.
        """
        idx = np.arange(self.n) if indices is None else np.asarray(indices)
        off = self._off[name]
        start = 0
        while start < len(idx):
            stop = start + 1
            while (stop < len(idx) and idx[stop] == idx[stop - 1] + 1
                   and off[idx[stop] + 1] - off[idx[start]] <= block_tokens):
                stop += 1
            run = idx[start:stop]
            a, b = int(off[run[0]]), int(off[run[-1] + 1])
            states = self.read_slice(name, "states", a, b)
            if as_float32:
                states = states.astype(np.float32)
            special = self.read_slice(name, "special", a, b)
            yield run, states, special, off[run[0] : run[-1] + 2] - a
            start = stop

    POOLED_VIEWS = ("body", "signature", "context", "inputs", "signature_last")

    def pooled(self, view: str, indices: np.ndarray | None = None, *, exclude_special: bool = True) -> np.ndarray:
        """Mean-pooled states per record, streamed: ``view`` is ``body``, ``signature``,
        ``context`` or ``inputs`` (context + signature), or ``signature_last`` (the state of
        the signature's last token, not pooled). Sink tokens are excluded by default; a record
        with no token in the view gets zeros."""
        return self.pooled_views((view,), indices, exclude_special=exclude_special)[view]

    def pooled_views(self, views: tuple[str, ...] | list[str], indices: np.ndarray | None = None, *,
                     exclude_special: bool = True) -> dict[str, np.ndarray]:
        """Several views of :meth:`pooled` with one read of each pass."""
        bad = [v for v in views if v not in self.POOLED_VIEWS]
        if bad:
            raise StoreError(f"unknown view {bad[0]!r}")
        if indices is not None:
            asked = self.checked_indices(indices)
            idx, where = np.unique(asked, return_inverse=True)  # a repeated record is read once
            if len(idx) < len(asked):
                got = self.pooled_views(views, idx, exclude_special=exclude_special)
                return {v: a[where] for v, a in got.items()}
        idx = np.arange(self.n) if indices is None else np.asarray(asked)
        out = {v: np.zeros((len(idx), self.meta.hidden_size), dtype=np.float32) for v in views}
        pos = {int(i): k for k, i in enumerate(idx)}
        for name in ("targets", "inputs"):
            mine = [v for v in views if (v == "body") == (name == "targets")]
            if not mine:
                continue
            segmented = any(v not in ("body", "inputs") for v in mine)  # needs each token's position
            # Vectorised over a block: each view is a token mask; only the kept rows are
            # converted from float16, and each view's means are one sparse product.
            for run, states, special, offs in self.iter_blocks(name, idx, as_float32=False):
                lens = np.diff(offs)
                owner_of = np.repeat(np.arange(len(run)), lens)
                local = np.arange(len(states)) - np.repeat(offs[:-1], lens) if segmented else None
                rows = np.fromiter((pos[int(r)] for r in run), dtype=np.int64, count=len(run))
                for view in mine:
                    keep = ~special if exclude_special else np.ones(len(states), dtype=bool)
                    if view not in ("body", "inputs"):
                        assert local is not None
                        seg = self._segments[run][:, 0 if view == "context" else 1]
                        keep = keep & (local >= seg[owner_of, 0]) & (local < seg[owner_of, 1])
                    sel = np.flatnonzero(keep)
                    owner = owner_of[sel]  # sorted: tokens come in record order
                    counts = np.bincount(owner, minlength=len(run))
                    has = counts > 0
                    if view == "signature_last":
                        last = np.searchsorted(owner, np.arange(len(run)), side="right") - 1
                        out[view][rows[has]] = states[sel[last[has]]].astype(np.float32)
                    else:
                        # the mean as one sparse product: [records × kept tokens] of 1/count
                        w = (1.0 / counts[owner]).astype(np.float32)
                        avg = sparse.csr_matrix((w, (owner, np.arange(len(sel)))), shape=(len(run), len(sel)))
                        out[view][rows[has]] = (avg @ states[sel].astype(np.float32))[has]
        for view, a in out.items():  # a non-finite state makes its record's mean non-finite
            bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
            if len(bad):
                raise self.non_finite("targets" if view == "body" else "inputs", int(idx[bad[0]]))
        return out

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def use_split_file(store: Store, path: str | os.PathLike[str]) -> tuple[SplitAssignment, int]:
    """Apply a split file (``codejepa corpus folds``) to an open store, after checking that it
    was made from the store's corpus. Returns the assignment and how many of its records the
    store lacks (the records the store's own leak filter dropped or its window skipped)."""
    from codejepa.corpus.folds import read_splits

    a = read_splits(path)
    want = store.meta.corpus_manifest_hash
    if want and a.corpus_fingerprint != want:
        raise StoreError(f"{path}: made from another corpus than {store.path} was embedded from "
                         f"(corpus fingerprint {a.corpus_fingerprint[:12]} vs {want[:12]})")
    missing = store.use_splits(a.splits, a.key)
    return a, missing


def open_store(path: str | os.PathLike[str]) -> Store:
    """Open a store for reading; a missing, corrupt or foreign file raises :class:`StoreError`."""
    return Store(path)
