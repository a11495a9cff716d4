"""``embed probe``: the teacher's reading of a body position after each record's own inputs.

A *probe* is a fixed train body, the same token sequence for every record. For each record
the teacher reads ``[sink] context signature PROBE [end]`` — the record's own inputs pass
(the stored token ids: nothing of its body, not even the body's length) with the probe where
the body would be — and the probe view is the mean state over the probe's tokens at the
store's layer, averaged over several probes. In-context body states echo the context and
signature the teacher saw before them; the probe view measures that echo directly, with
a body the query does not own. On python-40 it lifted retrieval with every correction by
1.7 points for the transformer and 4.0 for ridge (bench/RESULTS.md, "Predictor ablations").

A bidirectional teacher needs a pass per probe (the inputs attend to the probe). A causal one
reads the inputs once per record: the probes follow them in one pass, each attending to the
inputs and to itself only (:func:`shared_prefix_mask`), with the same states.

The view lives in a sidecar HDF5 file beside the store (``STORE.probe.h5``): the store itself
is never opened for writing. Rows follow the store's record order; a run commits them chunk
by chunk, so a kill loses at most one chunk and a rerun continues where it stopped. A store
that grew since (a resumed ``embed run``) gets its new records probed on the next run.

Past one machine: ``torchrun … embed probe STORE`` (or ``--shard I/N``) gives each rank a
contiguous share of the store's records, written to ``STORE.probe.shard-I-of-N.h5``;
``codejepa embed merge`` joins the shards into the one view ``evaluate`` reads. Each shard
resumes like the whole view; a shard's range is fixed by the store's size when it was
started, so shard a finished store.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from codejepa.core import CodejepaError, code_version
from codejepa.embed.store import CHECKSUM, Store, StoreError, ensure_free_space, open_format_file, open_store
from codejepa.embed.template import pad_token_id

PROBE_FORMAT = "codejepa-probe-view"
PROBE_FORMAT_VERSION = 1


class ProbeError(CodejepaError):
    """A probe view that cannot be computed, resumed or read, with one clear line."""


@dataclass(frozen=True)
class ProbeSettings:
    """The probe view's settings: how many fixed train bodies are read after each record's
    inputs, their length range and the seed that draws them, and how the teacher runs (device,
    dtype, batch, shared inputs for a causal teacher, shard, split file)."""

    n_probes: int = 4
    min_tokens: int = 40  # a probe is a train body of min..max tokens: a typical body's length
    max_tokens: int = 80
    seed: int = 7
    teacher: str | None = None  # None: the store's own teacher
    splits: str | None = None  # a split file (`corpus folds`): probes from its train part
    device: str = "auto"
    dtype: str = "auto"
    batch_tokens: int | None = None  # padded tokens per model batch; None: as `embed run`
    chunk_records: int = 256  # records committed at a time: what a kill can lose
    share_prefix: bool = True  # causal teachers: one pass per record for all probes (see below)
    shard: tuple[int, int] | None = None  # (I, N): the I-th of N contiguous shares; None: RANK/WORLD_SIZE or all


@dataclass(frozen=True)
class ProbeMeta:
    """What produced a probe view; a rerun with other settings is refused."""

    store_fingerprint: str
    teacher: str
    weights_hash: str
    layer: int
    hidden_size: int
    n_probes: int
    min_tokens: int
    max_tokens: int
    seed: int
    probe_records: list[str]  # the record ids whose bodies are the probes
    probe_lengths: list[int]
    splits: str = ""  # the split file's key when the probes were drawn from one
    shard: str = ""  # "I/N" for a shard's file, "" for a whole view
    start: int = 0  # the store records this file holds: start .. stop (-1: to the store's end)
    stop: int = -1
    compute_dtype: str = ""
    code_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> dict[str, Any]:
        """The fields two runs must share to write into the same view."""
        return {k: v for k, v in asdict(self).items() if k not in ("compute_dtype", "code_version", "extra")}

    @classmethod
    def from_json(cls, s: str) -> ProbeMeta:
        d = json.loads(s)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ProbeResult:
    path: Path
    records: int  # rows in the view after this run
    written: int  # rows computed by this run
    already: int
    model_tokens: int = 0
    seconds: float = 0.0
    shared_prefix: bool = False  # one pass per record (causal teacher) instead of one per probe


def default_probe_path(store_path: str | Path) -> Path:
    """``x.h5`` → ``x.probe.h5``: the sidecar beside its store."""
    p = Path(store_path)
    return p.with_name(p.stem + ".probe.h5")


# -- pure parts ---------------------------------------------------------------------------

def choose_probes(store: Store, settings: ProbeSettings) -> tuple[np.ndarray, list[np.ndarray]]:
    """The probe records (indices) and their body token ids: ``n_probes`` train bodies of
    ``min_tokens..max_tokens`` tokens, drawn with ``seed``. Train bodies only, so that no
    evaluated body is ever read into another record's view."""
    train = store.indices("train")
    special = store.special("targets")
    lens = store.lengths("targets")
    owner = np.repeat(np.arange(len(lens)), lens)
    plain = lens - np.bincount(owner[special], minlength=len(lens))  # sink tokens do not count
    ok = train[(plain[train] >= settings.min_tokens) & (plain[train] <= settings.max_tokens)]
    if settings.n_probes < 1:
        raise ProbeError(f"--probes {settings.n_probes}: at least one probe is needed")
    if len(ok) < settings.n_probes:
        raise ProbeError(f"{store.path}: {len(ok)} train bodies of {settings.min_tokens}–{settings.max_tokens} tokens, "
                         f"fewer than the {settings.n_probes} probes asked for")
    pick = np.random.default_rng(settings.seed).choice(ok, settings.n_probes, replace=False)
    out = []
    for i in pick:
        b = store.body(int(i))
        out.append(b.token_ids[~b.special].astype(np.int64))
    return pick, out


def probe_sequence(inputs_ids: np.ndarray, inputs_special: np.ndarray, probe: np.ndarray,
                   window: int) -> tuple[np.ndarray, int, int]:
    """A record's inputs pass with the probe where the body would be: before the trailing
    sink tokens ([SEP]) of a bidirectional pass, at the end of a causal one. The probe is cut
    to the window. Returns the ids and the probe's span."""
    n = len(inputs_ids)
    trail = 0
    while trail < n - 1 and inputs_special[n - 1 - trail]:
        trail += 1
    head = n - trail
    p = probe[: max(window - n, 0)]
    if len(p) == 0:
        raise ProbeError(f"a record's inputs fill the teacher's window of {window} tokens: no room for a probe")
    ids = np.concatenate([inputs_ids[:head], p, inputs_ids[head:]]).astype(np.int64)
    return ids, head, head + len(p)


@dataclass(frozen=True)
class ProbeSeq:
    """One teacher pass: a record's inputs followed by one probe, or (shared prefix) by all."""

    rec: int  # the record's row in its chunk
    ids: np.ndarray
    spans: tuple[tuple[int, int], ...]  # the probes' positions
    segments: np.ndarray | None = None  # shared prefix: 0 = the inputs, k + 1 = probe k


def shared_prefix_sequence(prefix: np.ndarray, probes: Sequence[np.ndarray], window: int) -> ProbeSeq:
    """A causal record's inputs once, then every probe. With :func:`shared_prefix_mask` each
    probe attends to the inputs and to itself only, at the positions it would have right
    after the inputs, so its states equal those of its own pass ``inputs + probe`` — the
    inputs are run once instead of once per probe."""
    n = len(prefix)
    parts, spans, segs = [np.asarray(prefix, np.int64)], [], [np.zeros(n, np.int64)]
    at = n
    for k, p in enumerate(probes):
        p = np.asarray(p[: max(window - n, 0)], np.int64)
        if len(p) == 0:
            raise ProbeError(f"a record's inputs fill the teacher's window of {window} tokens: no room for a probe")
        parts.append(p)
        segs.append(np.full(len(p), k + 1, np.int64))
        spans.append((at, at + len(p)))
        at += len(p)
    return ProbeSeq(-1, np.concatenate(parts), tuple(spans), np.concatenate(segs))


def shared_prefix_mask(batch: Sequence[ProbeSeq], length: int) -> tuple[np.ndarray, np.ndarray]:
    """``[B, 1, T, T]`` boolean attention (True = attend) and ``[B, T]`` position ids for a
    right-padded batch of :func:`shared_prefix_sequence` passes. A padding row attends to
    itself only, so that no row is empty (an empty row gives NaN states)."""
    allowed = np.zeros((len(batch), 1, length, length), dtype=bool)
    positions = np.zeros((len(batch), length), dtype=np.int64)
    causal = np.tril(np.ones((length, length), dtype=bool))
    for j, s in enumerate(batch):
        assert s.segments is not None
        n = len(s.ids)
        seg = s.segments
        same = (seg[None, :] == 0) | (seg[None, :] == seg[:, None])
        allowed[j, 0, :n, :n] = causal[:n, :n] & same
        pad = np.arange(n, length)
        allowed[j, 0, pad, pad] = True
        prefix = int((seg == 0).sum())
        positions[j, :prefix] = np.arange(prefix)
        for a, b in s.spans:
            positions[j, a:b] = np.arange(prefix, prefix + b - a)
    return allowed, positions


# -- the sidecar file -------------------------------------------------------------------------

def _open_probe_file(path: Path, mode: str) -> h5py.File:
    return open_format_file(path, mode, fmt=PROBE_FORMAT, version=PROBE_FORMAT_VERSION, what="probe view",
                            writer="embed probe", error=ProbeError, redo="delete it and rerun `codejepa embed probe`")


def _ids(f: h5py.File, n: int) -> np.ndarray:
    return np.array(f["ids"].asstr()[:n], dtype=object)


def _check_ids(f: h5py.File, store: Store, path: Path, start: int = 0, *,
               advice: str = "delete it or pass another --out") -> int:
    n = int(f.attrs["committed"])
    ids = _ids(f, n)
    if start + n > len(store) or not np.array_equal(ids, store.ids[start:start + n].astype(object)):
        raise ProbeError(f"{path}: its records are not records {start}..{start + n - 1} of {store.path} "
                         f"(made from another store or a re-embedded one); {advice}")
    return n


@dataclass(frozen=True)
class ProbeView:
    """A complete-or-partial probe view read back for a store: ``view[i]`` is record ``i``'s."""

    path: Path
    meta: ProbeMeta
    view: np.ndarray  # [n_records_of_the_store, hidden] float32; rows past ``committed`` are zero
    committed: int


def read_probe_view(path: str | Path, store: Store) -> ProbeView:
    """Read a probe view and check it belongs to ``store`` (same teacher, layer and records)."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"{path}: no probe view (compute it with `codejepa embed probe {shlex.quote(str(store.path))}`)")
    with _open_probe_file(path, "r") as f:
        try:
            meta = ProbeMeta.from_json(f.attrs["meta"])
            if meta.shard:
                raise ProbeError(f"{path}: shard {meta.shard} of a probe view; join the shards with `codejepa embed merge`")
            n = _check_ids(f, store, path, advice="pass the probe view made from this store (its own file is "
                                                  "kept: it is valid for the store it was made from)")
            view = np.zeros((len(store), meta.hidden_size), np.float32)
            view[:n] = f["view"][:n]
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise ProbeError(f"{path}: damaged probe view ({e})") from None
    if meta.store_fingerprint != store.meta.fingerprint():
        raise ProbeError(f"{path}: computed for another store (teacher, layer or corpus differ from {store.path})")
    return ProbeView(path, meta, view, n)


def probes_outside_train(meta: ProbeMeta, store: Store) -> list[str]:
    """The probe records of a view that are not in ``store``'s train part (its own split, or
    the split file applied to it). A probe is read after every record: a probe body that is
    a val or test record's own would leak that body into every record's view."""
    where = store.index_of()
    return [r for r in meta.probe_records if r not in where or store.splits[where[r]] != "train"]


# -- computing it -----------------------------------------------------------------------------

def compute_probe_view(
    store_path: str | Path,
    out: str | Path | None = None,
    settings: ProbeSettings = ProbeSettings(),
    *,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
    teacher: Any = None,
    max_chunks: int | None = None,
) -> ProbeResult:
    """Compute (or continue) the probe view of every committed record of a store.

    ``teacher`` may be passed pre-loaded (tests); otherwise the store's own teacher is
    loaded at its layer and checked against the store's weight hash. ``max_chunks`` stops
    after that many chunks (tests of resumption)."""

    from codejepa.embed.run import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_TOKENS, shard_path

    t0 = time.perf_counter()
    emit = progress or (lambda _e, _i: None)
    shard = _checked_shard(settings)
    path = shard_path(Path(out) if out is not None else default_probe_path(store_path), *shard)
    if path.resolve() == Path(store_path).resolve():
        raise ProbeError(f"--out {path} is the store itself; a probe view is a file of its own "
                         f"(by default {default_probe_path(store_path)})")
    try:
        store = open_store(store_path)
    except StoreError as e:
        raise ProbeError(str(e)) from None
    try:
        smeta = store.meta
        split_key = ""
        if settings.splits is not None:
            from codejepa.embed.store import use_split_file

            try:
                split_key = use_split_file(store, settings.splits)[0].key
            except StoreError as e:
                raise ProbeError(str(e)) from None
        pick, probes = choose_probes(store, settings)
        # A shard's share is fixed by the store's size now; a whole view follows the store as it grows.
        start, stop = (0, -1) if shard[1] == 1 else (shard[0] * len(store) // shard[1], (shard[0] + 1) * len(store) // shard[1])
        end = len(store) if stop < 0 else stop
        teacher = _store_teacher(store, settings, teacher)
        meta = ProbeMeta(
            store_fingerprint=smeta.fingerprint(), teacher=smeta.teacher, weights_hash=smeta.weights_hash,
            layer=smeta.layer, hidden_size=smeta.hidden_size, n_probes=settings.n_probes,
            min_tokens=settings.min_tokens, max_tokens=settings.max_tokens, seed=settings.seed,
            probe_records=[str(store.ids[i]) for i in pick], probe_lengths=[len(p) for p in probes], splits=split_key,
            shard="" if shard[1] == 1 else f"{shard[0]}/{shard[1]}", start=start, stop=stop,
            compute_dtype=teacher.compute_dtype, code_version=code_version(),
        )
        f = _writer(path, meta, store)
        try:
            already = int(f.attrs["committed"])
            result = ProbeResult(path, already, 0, already)
            emit("start", {"path": str(path), "records": end - start, "already": already,
                           "teacher": teacher.describe(), "probes": meta.probe_records})
            window = smeta.max_tokens or teacher.max_positions or DEFAULT_MAX_TOKENS
            dev_kind = "cuda" if str(teacher.device).startswith("cuda") else "cpu"
            batch_tokens = settings.batch_tokens if settings.batch_tokens is not None else DEFAULT_BATCH_TOKENS[dev_kind]
            pad_id = pad_token_id(teacher.tokenizer)
            all_ids, all_sp = store.tokens("inputs")
            off = np.concatenate([[0], np.cumsum(store.lengths("inputs"))])
            mask_kind = teacher.custom_mask_kind() if settings.share_prefix else None
            result.shared_prefix = mask_kind is not None
            chunks = 0
            for a in range(start + already, end, settings.chunk_records):
                if max_chunks is not None and chunks >= max_chunks:
                    break
                b = min(a + settings.chunk_records, end)
                inputs = [(all_ids[int(off[r]):int(off[r + 1])], all_sp[int(off[r]):int(off[r + 1])]) for r in range(a, b)]
                seqs = _sequences(inputs, probes, window, shared=mask_kind is not None)
                feats, tokens = _probe_means(teacher, seqs, (b - a, smeta.hidden_size), len(probes), batch_tokens,
                                             pad_id, mask_kind)
                result.model_tokens += tokens
                _commit(f, store.ids[a:b], feats, a - start)
                result.written += b - a
                result.records = b - start
                chunks += 1
                emit("commit", {"records": b - a, "tokens": result.model_tokens})
        finally:
            f.close()
    finally:
        store.close()
    result.seconds = time.perf_counter() - t0
    emit("done", {"records": result.records, "written": result.written})
    return result


def _checked_shard(settings: ProbeSettings) -> tuple[int, int]:
    """The shard (I, N) this call computes, once the settings are checked."""
    from codejepa.embed.run import EmbedError, check_sizes, parse_shard

    if settings.seed < 0:
        raise ProbeError(f"--seed {settings.seed}: expected a non-negative integer")
    try:
        check_sizes(None, settings.batch_tokens)
        return settings.shard or parse_shard(None) or (0, 1)
    except EmbedError as e:  # a bad batch size, or RANK/WORLD_SIZE set to nonsense
        raise ProbeError(str(e)) from None


def _store_teacher(store: Store, settings: ProbeSettings, teacher: Any) -> Any:
    """The teacher the store was embedded with, at its layer (loaded unless given), or a ProbeError."""
    from codejepa.embed.teacher import open_teacher

    smeta = store.meta
    if teacher is None:
        teacher = open_teacher(settings.teacher or smeta.teacher, layer=smeta.layer,
                               device=settings.device, dtype=settings.dtype)
    if teacher.weights_hash != smeta.weights_hash or teacher.layer != smeta.layer:
        raise ProbeError(f"teacher {teacher.name} (layer {teacher.layer}) is not the one {store.path} was embedded "
                         f"with ({smeta.teacher}, layer {smeta.layer}, weights {smeta.weights_hash[:12]})")
    return teacher


def _sequences(inputs: Sequence[tuple[np.ndarray, np.ndarray]], probes: Sequence[np.ndarray], window: int, *,
               shared: bool) -> list[ProbeSeq]:
    """The teacher passes for a chunk of records (their input ids and special-token flags):
    one per record and probe, or with ``shared`` one per record that reads its inputs once
    for all probes (a causal teacher, whose inputs have no trailing sink token)."""
    seqs: list[ProbeSeq] = []
    for rec, (x, sp) in enumerate(inputs):
        if shared:
            seqs.append(dataclasses.replace(shared_prefix_sequence(x, probes, window), rec=rec))
            continue
        for p in probes:
            ids, s0, s1 = probe_sequence(x, sp, p, window)
            seqs.append(ProbeSeq(rec, ids, ((s0, s1),)))
    return seqs


def _probe_means(teacher: Any, seqs: Sequence[ProbeSeq], shape: tuple[int, int], n_probes: int, batch_tokens: int,
                 pad_id: int, mask_kind: str | None) -> tuple[np.ndarray, int]:
    """Each record's view (the mean of each probe's states, averaged over the probes) from
    the passes ``seqs``, run in length-planned batches; and the tokens the teacher read."""
    import torch

    from codejepa.embed.run import pad_batch, plan_batches

    feats = np.zeros(shape, np.float64)  # [records, hidden size]
    tokens = 0
    for batch_ix in plan_batches([len(s.ids) for s in seqs], [0] * len(seqs), batch_tokens):
        batch = [seqs[i] for i in batch_ix]
        ids, mask = pad_batch(batch, pad_id)  # type: ignore[arg-type]
        weights = np.zeros(ids.shape, np.float32)
        for j, s in enumerate(batch):
            for s0, s1 in s.spans:
                weights[j, s0:s1] = 1.0 / (s1 - s0) / n_probes
        ids_t, mask_t, pos_t = torch.from_numpy(ids), torch.from_numpy(mask), None
        if batch[0].segments is not None:
            allowed, positions = shared_prefix_mask(batch, ids.shape[1])
            mask_t, pos_t = torch.from_numpy(allowed), torch.from_numpy(positions).to(teacher.device)
            if mask_kind == "additive":
                dt = teacher.model.dtype
                mask_t = torch.zeros(allowed.shape, dtype=dt).masked_fill_(~mask_t, torch.finfo(dt).min)
        hidden = teacher.forward(ids_t.to(teacher.device), mask_t.to(teacher.device), pos_t)
        w = torch.from_numpy(weights).to(hidden.device)
        means = torch.einsum("bt,btd->bd", w, hidden.float()).cpu().numpy()
        for j, s in enumerate(batch):
            feats[s.rec] += means[j]
        tokens += int(mask.sum())
    return feats.astype(np.float32), tokens


def _writer(path: Path, meta: ProbeMeta, store: Store) -> h5py.File:
    """Open the sidecar for appending (checking it matches), or create it."""
    if path.exists():
        f = _open_probe_file(path, "a")
        try:
            old = ProbeMeta.from_json(f.attrs["meta"])
            if old.key() != meta.key():
                diff = sorted(k for k in meta.key() if old.key().get(k) != meta.key()[k])
                raise ProbeError(f"{path}: computed with other settings ({', '.join(diff)} differ); "
                                 "delete it or pass another --out")
            _check_ids(f, store, path, meta.start)
        except ProbeError:
            f.close()
            raise
        except (KeyError, TypeError, ValueError) as e:
            f.close()
            raise ProbeError(f"{path}: damaged probe view ({e}); delete it and rerun") from None
        return f
    return _create(path, meta)


def _create(path: Path, meta: ProbeMeta) -> h5py.File:
    path.parent.mkdir(parents=True, exist_ok=True)
    f = _open_probe_file(path, "w")
    f.attrs["format"] = PROBE_FORMAT
    f.attrs["format_version"] = PROBE_FORMAT_VERSION
    f.attrs["meta"] = json.dumps(asdict(meta), sort_keys=True)
    f.attrs["committed"] = 0
    f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(1024,))  # no filter takes strings
    f.create_dataset("view", shape=(0, meta.hidden_size), maxshape=(None, meta.hidden_size), dtype=np.float32,
                     chunks=(256, meta.hidden_size), **CHECKSUM)
    f.flush()
    return f


def _commit(f: h5py.File, ids: Sequence[str], view: np.ndarray, at: int) -> None:
    """Rows first, then the committed count: a kill in between leaves the rows unread."""
    try:
        ensure_free_space(Path(f.filename), view.nbytes)
    except StoreError as e:
        raise ProbeError(str(e)) from None
    n = at + len(ids)
    for name in ("ids", "view"):
        if f[name].shape[0] < n:
            f[name].resize(n, axis=0)
    f["ids"][at:n] = np.asarray(ids, dtype=object)
    f["view"][at:n] = view
    f.flush()
    f.attrs["committed"] = n
    f.flush()


# -- shards -----------------------------------------------------------------------------------

def is_probe_view(path: str | Path) -> bool:
    """Whether ``path`` is a probe view file (whole or shard); False for anything else."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == PROBE_FORMAT
    except OSError:
        return False


@dataclass
class ProbeMergeResult:
    path: Path
    shards: int
    records: int


def merge_probe_views(shards: Sequence[str | Path], out: str | Path) -> ProbeMergeResult:
    """Join the shard files of one ``embed probe --shard I/N`` job (all N, each finished)
    into one whole view. The output is written beside ``out`` and renamed into place, so a
    crash never leaves half a view; an existing ``out`` is refused, not overwritten."""
    paths, out = [Path(p) for p in shards], Path(out)
    if not paths:
        raise ProbeError("no shard files given")
    if out.exists():
        raise ProbeError(f"{out} exists; delete it or pass another --out")
    parts: list[tuple[ProbeMeta, Path, int]] = []
    for p in paths:
        if not p.is_file():
            raise ProbeError(f"{p}: no such probe view shard")
        with _open_probe_file(p, "r") as f:
            try:
                parts.append((ProbeMeta.from_json(f.attrs["meta"]), p, int(f.attrs["committed"])))
            except (KeyError, TypeError, ValueError) as e:
                raise ProbeError(f"{p}: damaged probe view ({e})") from None
    whole = [str(p) for m, p, _ in parts if not m.shard]
    if whole:
        raise ProbeError(f"{whole[0]}: a whole probe view, not a shard of one")

    def common(m: ProbeMeta) -> dict[str, Any]:
        return {k: v for k, v in m.key().items() if k not in ("shard", "start", "stop")}

    first = parts[0][0]
    for m, p, _ in parts[1:]:
        if common(m) != common(first):
            diff = sorted(k for k in common(first) if common(m).get(k) != common(first)[k])
            raise ProbeError(f"{p}: computed with other settings than {parts[0][1]} ({', '.join(diff)} differ)")
    specs = [tuple(int(x) for x in m.shard.split("/")) for m, _, _ in parts]  # (I, N)
    count = specs[0][1]
    by_index = {i: part for (i, _), part in zip(specs, parts)}
    if any(n != count for _, n in specs) or len(by_index) != len(parts):
        raise ProbeError("the shards are not one job's: each I of N once, with one N")
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise ProbeError(f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing")
    ordered = [by_index[i] for i in range(count)]
    at = 0
    for m, p, n in ordered:
        if m.start != at:
            raise ProbeError(f"{p}: starts at record {m.start}, not {at} (shards of stores of different sizes?)")
        if n != m.stop - m.start:
            raise ProbeError(f"{p}: {n} of its {m.stop - m.start} records done; finish it (rerun its `embed probe`) first")
        at = m.stop
    tmp = out.with_name(out.name + ".part")
    # A whole view again: a later `embed probe` continues it as the store grows.
    f = _create(tmp, dataclasses.replace(first, shard="", start=0, stop=-1))
    try:
        for m, p, n in ordered:
            with _open_probe_file(p, "r") as g:
                _commit(f, _ids(g, n), g["view"][:n], m.start)
    finally:
        f.close()
    tmp.replace(out)
    return ProbeMergeResult(out, count, at)
