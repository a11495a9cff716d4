"""``embed run``: a corpus through a frozen teacher into a store, resumably and fast.

What each record costs the teacher (see :mod:`codejepa.embed.template` for the text):

- causal teacher, in-context targets: one pass over the whole text; the inputs are the
  states of [sink] + context + signature, the targets those of the body. Causal attention
  means no input position can see the body.
- bidirectional teacher, in-context targets: a pass over the whole text gives the body
  states; a second pass over [sink] + context + signature + [end] alone gives the inputs,
  because in a single bidirectional pass every input token attends to the body.
- body-only targets (either kind): a pass over [sink] + body (+ [end]) gives the targets and
  a pass over context + signature gives the inputs.

Speed: records are read in windows of about ``window_tokens`` tokens; inside a window the
passes are sorted by length and cut into batches by a padded-token budget, so padding is
small without holding the corpus in memory. Model batches run under
``torch.inference_mode``; a writer thread commits finished records to HDF5 while the model
computes the next batch.

Resume: the windows and batches are a pure function of the corpus, the shard and the
settings, never of what is already stored. A rerun recomputes the plan, skips every batch
whose records are all committed, and recomputes a partly committed batch whole (the writer
drops the records it has). Each record's states thus come from the same batch as in an
uninterrupted run and records are committed in the same order: the final store is the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codejepa.core import CodejepaError, code_version, library_versions, torchrun_ranks
from codejepa.corpus.records import SPLITS, FunctionRecord, corpus_fingerprint, load_records, read_manifest
from codejepa.embed.store import FLOAT16_MAX, PendingRecord, StoreError, StoreMeta, StoreWriter, read_meta
from codejepa.embed.template import TEMPLATE_VERSION, SegmentTokenizer, Skipped, Tokenized

DEFAULT_MAX_TOKENS = 2048
DEFAULT_BATCH_TOKENS = {"cpu": 8192, "cuda": 32768}
TARGET_MODES = ("in_context", "body_only")


class EmbedError(CodejepaError):
    """Bad settings or input for ``embed run`` / ``embed merge``."""


# -- settings and sharding ---------------------------------------------------------------

@dataclass(frozen=True)
class EmbedSettings:
    """What ``embed run`` stores and how fast: the teacher, its layer, the device and compute
    dtype, the window and batch sizes, the shard and splits embedded, the targets (the body read
    after its signature, or alone) and the dtype the states are stored in."""

    teacher: str | None = None  # None: the packaged all-MiniLM-L6-v2
    layer: int | None = None  # hidden_states index; None: num_hidden_layers // 2
    device: str = "auto"
    dtype: str = "auto"  # compute dtype
    max_tokens: int | None = None  # window; None: min(model positions, DEFAULT_MAX_TOKENS)
    batch_tokens: int | None = None  # padded tokens per model batch; None: by device
    shard: tuple[int, int] | None = None  # (index, count); None: RANK/WORLD_SIZE or (0, 1)
    splits: tuple[str, ...] | None = None  # None: all
    target_mode: str = "in_context"
    store_dtype: str = "float16"
    window_tokens: int = 1 << 18  # tokens per sorting window (bounds memory)
    max_batch_seqs: int = 1024
    max_padding: float = 0.1  # a batch is closed before its padding exceeds this fraction


MIN_MAX_TOKENS = 16  # a sink, an end token and room for a signature and a body


def check_sizes(max_tokens: int | None, batch_tokens: int | None) -> None:
    """Refuse a window or batch size that cannot work, before any model is loaded (None: the default)."""
    if max_tokens is not None and max_tokens < MIN_MAX_TOKENS:
        raise EmbedError(f"--max-tokens {max_tokens}: the window needs at least {MIN_MAX_TOKENS} tokens")
    if batch_tokens is not None and batch_tokens < 1:
        raise EmbedError(f"--batch-tokens {batch_tokens}: a batch needs at least one token (omit it for the default)")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` → ``(I, N)``; ``None`` → from ``RANK``/``WORLD_SIZE`` when set, else None."""
    if text is None:
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            text = f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}"
        else:
            return None
    elif torchrun_ranks() > 1:
        # every rank would write the one shard named, and all but one would be refused its lock
        raise EmbedError(f"--shard {text}: under torchrun each rank takes its shard from RANK/WORLD_SIZE; "
                         "leave --shard out, or run without torchrun")
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise EmbedError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise EmbedError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def shard_of(record_id: str, count: int) -> int:
    """The shard a record belongs to: a hash of its id, so every rank agrees without talking."""
    return int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big") % count


def shard_path(out: str | os.PathLike[str], index: int, count: int) -> Path:
    """Where shard ``index`` of ``count`` is written: ``STEM.shard-I-of-N.SUFFIX``."""
    out = Path(out)
    if count == 1:
        return out
    return out.with_name(f"{out.stem}.shard-{index}-of-{count}{out.suffix or '.h5'}")


def parse_splits(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if not names:  # an empty selection would embed nothing and mark the store complete
        raise EmbedError(f"--split {text!r}: names no split; expected a subset of {','.join(SPLITS)}")
    bad = [s for s in names if s not in SPLITS]
    if bad:
        raise EmbedError(f"--split {text!r}: unknown split(s) {bad}; expected a subset of {','.join(SPLITS)}")
    return names


def select_records(
    corpus_dir: str | os.PathLike[str], splits: Iterable[str] | None, shard: tuple[int, int]
) -> Iterator[FunctionRecord]:
    i, n = shard
    for rec in load_records(corpus_dir, splits):
        if n == 1 or shard_of(rec.id, n) == i:
            yield rec


# -- planning (pure) ---------------------------------------------------------------------

@dataclass
class Seq:
    """One teacher pass over one record: its ids and which positions are stored where."""

    rec: int  # index of the record in its window
    ids: np.ndarray
    inputs: tuple[int, int] | None  # positions stored as the record's inputs
    body: tuple[int, int] | None  # positions stored as the record's targets
    phase: int  # 0: input-only passes (run first in a window), 1: the others


def build_sequences(
    window: Sequence[Tokenized], seg: SegmentTokenizer, kind: str, target_mode: str
) -> list[Seq]:
    pre = np.asarray(seg.prefix, np.int32)
    suf = np.asarray(seg.suffix, np.int32)
    p, sfx = len(pre), len(suf)
    seqs: list[Seq] = []
    for k, t in enumerate(window):
        c, s, b = len(t.context), len(t.signature), len(t.body)
        n_in = p + c + s
        if kind == "causal" and target_mode == "in_context":
            seqs.append(Seq(k, np.concatenate([pre, t.context, t.signature, t.body]), (0, n_in), (n_in, n_in + b), 1))
            continue
        seqs.append(Seq(k, np.concatenate([pre, t.context, t.signature, suf]), (0, n_in + sfx), None, 0))
        if target_mode == "in_context":
            seqs.append(Seq(k, np.concatenate([pre, t.context, t.signature, t.body, suf]), None, (n_in, n_in + b), 1))
        else:
            seqs.append(Seq(k, np.concatenate([pre, t.body, suf]), None, (p, p + b), 1))
    return seqs


def plan_batches(
    lengths: Sequence[int],
    phases: Sequence[int],
    batch_tokens: int,
    max_seqs: int = 1024,
    max_padding: float = 0.1,
) -> list[list[int]]:
    """Batches of sequence indices: phase by phase, longest first. A batch's padded size
    (count × its longest length) stays within ``batch_tokens`` (a longer sequence runs
    alone), and a batch is closed before its padding would exceed ``max_padding``."""
    order = sorted(range(len(lengths)), key=lambda i: (phases[i], -lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        if cur:
            n, longest = len(cur) + 1, lengths[cur[0]]
            if (
                phases[cur[0]] != phases[i]
                or n * longest > batch_tokens
                or n > max_seqs
                or 1.0 - (real + lengths[i]) / (n * longest) > max_padding
            ):
                batches.append(cur)
                cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    if cur:
        batches.append(cur)
    return batches


def pad_batch(seqs: Sequence[Seq], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``input_ids`` and ``attention_mask`` (int64) for a batch."""
    T = max(len(s.ids) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    for j, s in enumerate(seqs):
        ids[j, : len(s.ids)] = s.ids
        mask[j, : len(s.ids)] = 1
    return ids, mask


def iter_windows(
    records: Iterable[FunctionRecord], seg: SegmentTokenizer, window_tokens: int, chunk: int = 256
) -> Iterator[tuple[list[Tokenized], list[Skipped]]]:
    """Tokenized records grouped into windows of about ``window_tokens`` full-text tokens.

    Boundaries depend only on the records and the tokenizer, so a resumed run sees the same
    windows as the first."""
    window: list[Tokenized] = []
    skipped: list[Skipped] = []
    tokens = 0
    buf: list[FunctionRecord] = []

    def drain() -> Iterator[tuple[list[Tokenized], list[Skipped]]]:
        nonlocal window, skipped, tokens
        for t in seg.encode(buf):
            if isinstance(t, Skipped):
                skipped.append(t)
                continue
            window.append(t)
            tokens += len(t.context) + len(t.signature) + len(t.body)
            if tokens >= window_tokens:
                yield window, skipped
                window, skipped, tokens = [], [], 0
        buf.clear()

    for rec in records:
        buf.append(rec)
        if len(buf) >= chunk:
            yield from drain()
    yield from drain()
    if window or skipped:
        yield window, skipped


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` on a background thread, ``depth`` ahead: reading and tokenizing the
    next window (the Rust tokenizer releases the GIL) overlaps the teacher's compute."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    end = object()
    failure: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        try:
            for it in items:
                if stop.is_set():
                    return
                q.put(it)
        except BaseException as e:  # re-raised in the consumer
            failure.append(e)
        finally:
            q.put(end)

    th = threading.Thread(target=work, name="codejepa-window-reader", daemon=True)
    th.start()
    try:
        while (it := q.get()) is not end:
            yield it
        if failure:
            raise failure[0]
    finally:
        stop.set()
        while th.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(timeout=0.01)


# -- the writer thread ------------------------------------------------------------------

class BackgroundWriter:
    """Commits finished records on a thread so HDF5 I/O overlaps the model's compute.

    Whatever has queued up when the thread is free is committed as one batch (one flush).
    An error in the thread is raised in the caller at its next :meth:`put` or at
    :meth:`close`."""

    _STOP = object()

    def __init__(self, writer: StoreWriter, on_commit: Callable[[int, int], None] | None = None,
                 max_queued: int = 16) -> None:
        self.writer = writer
        self.on_commit = on_commit
        self.q: queue.Queue[Any] = queue.Queue(maxsize=max_queued)
        self.error: BaseException | None = None
        self.busy_s = 0.0
        self.bytes_written = 0
        self._thread = threading.Thread(target=self._run, name="codejepa-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stop = False
        while not stop:
            items = [self.q.get()]
            while True:
                try:
                    items.append(self.q.get_nowait())
                except queue.Empty:
                    break
            batch: list[PendingRecord] = []
            for it in items:
                if it is self._STOP:
                    stop = True
                else:
                    batch.extend(it)
            if not batch or self.error is not None:
                continue
            t0 = time.perf_counter()
            try:
                before = self.writer.committed
                self.writer.append(batch)
                itemsize = np.dtype(self.writer.meta.state_dtype).itemsize
                self.bytes_written += sum(
                    (p.input_states.shape[0] + p.body_states.shape[0]) * p.input_states.shape[1] * itemsize
                    for p in batch
                )
                if self.on_commit is not None:
                    self.on_commit(self.writer.committed - before, sum(len(p.body_token_ids) + len(p.input_token_ids) for p in batch))
            except BaseException as e:  # reported to the model thread
                self.error = e
            self.busy_s += time.perf_counter() - t0

    def put(self, records: list[PendingRecord]) -> None:
        if self.error is not None:
            raise self.error
        if records:
            self.q.put(records)

    def close(self) -> None:
        self.q.put(self._STOP)
        self._thread.join()
        if self.error is not None:
            raise self.error


# -- the run ------------------------------------------------------------------------------

@dataclass
class EmbedResult:
    path: Path
    selected: int = 0  # records of the corpus selected (split, shard)
    already: int = 0  # of them, committed before this run
    written: int = 0  # committed by this run
    skipped: dict[str, int] = field(default_factory=dict)  # reason → count
    truncated: int = 0  # truncated records in the store
    model_tokens: int = 0  # real (non-pad) tokens run through the teacher by this run
    padded_tokens: int = 0  # including padding
    batches: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0  # in the teacher (and gathering its states), of ``seconds``
    writer_busy_s: float = 0.0
    bytes_written: int = 0
    complete: bool = False
    meta: StoreMeta | None = None

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.model_tokens / self.padded_tokens if self.padded_tokens else 0.0


ProgressFn = Callable[[str, dict[str, Any]], None]


def make_meta(teacher: Any, seg: SegmentTokenizer, corpus_dir: Path, settings: EmbedSettings,
              shard: tuple[int, int], batch_tokens: int = 0) -> StoreMeta:
    return StoreMeta(
        teacher=teacher.name,
        teacher_kind=teacher.kind,
        hidden_size=teacher.hidden_size,
        layer=teacher.layer,
        num_hidden_layers=teacher.num_hidden_layers,
        hidden_states_convention=_convention(),
        teacher_revision=teacher.ref.revision,
        weights_hash=teacher.weights_hash,
        state_dtype=settings.store_dtype,
        compute_dtype=teacher.compute_dtype,
        template_version=TEMPLATE_VERSION,
        tokenizer_hash=seg.fingerprint(),
        corpus_dir=str(corpus_dir.resolve()),
        corpus_manifest_hash=corpus_fingerprint(read_manifest(corpus_dir)),
        code_version=code_version(),
        target_mode=settings.target_mode,
        max_tokens=seg.max_tokens,
        shard=f"{shard[0]}/{shard[1]}",
        extra={
            "template": seg.describe(),
            "device": teacher.device,
            "autocast": bool(getattr(teacher, "_autocast", False)),
            "cut_model": teacher.cut,
            "batching": {"batch_tokens": batch_tokens, "window_tokens": settings.window_tokens,
                         "max_padding": settings.max_padding},
        },
    )


def _convention() -> str:
    from codejepa.embed.teacher import CONVENTION

    return CONVENTION


def _precheck(path: Path, settings: EmbedSettings, teacher: Any) -> None:
    """A corrupt or foreign file, or a store of another teacher or layer, is refused before
    the teacher's weights are read (the full check runs when the writer opens the store)."""
    from codejepa.embed.teacher import load_config, resolve_layer, resolve_teacher

    old = read_meta(path)
    if teacher is not None:
        name, layer = teacher.name, teacher.layer
    else:
        ref = resolve_teacher(settings.teacher)
        name = ref.name
        layer = resolve_layer(settings.layer, int(load_config(ref).num_hidden_layers), ref.name)
    diff = {k: v for k, v in {"teacher": (old.teacher, name), "layer": (old.layer, layer),
                              "target_mode": (old.target_mode, settings.target_mode)}.items() if v[0] != v[1]}
    if diff:
        raise StoreError(f"{path}: built with other settings, refusing to append (stored vs requested: {diff}); use another --out")


def embed_corpus(
    corpus_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    settings: EmbedSettings = EmbedSettings(),
    *,
    progress: ProgressFn | None = None,
    teacher: Any = None,
) -> EmbedResult:
    """Embed a corpus's records into a store (resuming it when it exists).

    ``out`` is the store path of an unsharded run; with ``settings.shard = (I, N)``, N > 1,
    the store is :func:`shard_path` ``(out, I, N)``. ``teacher`` may be passed pre-loaded
    (tests, benchmarks); otherwise it is loaded from ``settings``.
    """
    from codejepa.embed.teacher import open_teacher

    t_start = time.perf_counter()
    corpus_dir = Path(corpus_dir)
    read_manifest(corpus_dir)  # a clear error for a non-corpus before any model is loaded
    _check_settings(settings)
    shard = settings.shard or parse_shard(None) or (0, 1)
    path = shard_path(out, *shard)
    if path.exists():
        _precheck(path, settings, teacher)  # one clear line before any model is loaded

    if teacher is None:
        teacher = open_teacher(settings.teacher, layer=settings.layer, device=settings.device, dtype=settings.dtype)
    window_max = teacher.max_positions or DEFAULT_MAX_TOKENS
    max_tokens = settings.max_tokens if settings.max_tokens is not None else min(window_max, DEFAULT_MAX_TOKENS)
    if max_tokens > window_max:
        raise EmbedError(f"--max-tokens {max_tokens} exceeds the teacher's window of {window_max} positions")
    seg = SegmentTokenizer(teacher.tokenizer, teacher.kind, max_tokens)
    dev_kind = "cuda" if teacher.device.startswith("cuda") else "cpu"
    batch_tokens = settings.batch_tokens if settings.batch_tokens is not None else DEFAULT_BATCH_TOKENS[dev_kind]
    meta = make_meta(teacher, seg, corpus_dir, settings, shard, batch_tokens)

    selected = sum(1 for _ in select_records(corpus_dir, settings.splits, shard))
    writer = StoreWriter(path, meta)
    writer.set_extra(complete=False)  # until this run ends: a killed run leaves the store marked unfinished
    if writer.committed and writer.meta.code_version != meta.code_version:
        # The store's code_version is its first run's; records appended by other code say so here.
        later = [v for v in writer.meta.extra.get("resumed_with", []) if v != meta.code_version]
        writer.set_extra(resumed_with=[*later, meta.code_version])
    result = EmbedResult(path=path, selected=selected, meta=writer.meta)
    result.already = sum(
        1 for r in select_records(corpus_dir, settings.splits, shard) if writer.has(r.id)
    ) if writer.committed else 0
    emit = progress or (lambda event, info: None)
    emit("start", {"path": str(path), "selected": selected, "already": result.already, "teacher": teacher.describe()})

    def on_commit(n: int, tokens: int) -> None:
        result.written += n
        emit("commit", {"records": n, "tokens": tokens})

    bg = BackgroundWriter(writer, on_commit)
    stack = contextlib.ExitStack()
    try:
        windows = prefetch(iter_windows(select_records(corpus_dir, settings.splits, shard), seg, settings.window_tokens))
        stack.callback(windows.close)
        for window, skipped in windows:
            for s in skipped:
                result.skipped[s.reason] = result.skipped.get(s.reason, 0) + 1
            if skipped:
                emit("skipped", {"records": len(skipped)})
            todo = [not writer.has(t.id) for t in window]
            if not any(todo):
                continue
            seqs = build_sequences(window, seg, teacher.kind, settings.target_mode)
            plan = plan_batches([len(s.ids) for s in seqs], [s.phase for s in seqs], batch_tokens,
                                settings.max_batch_seqs, settings.max_padding)
            remaining = [0] * len(window)  # passes still to run per record
            for s in seqs:
                remaining[s.rec] += 1
            got_inputs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
            got_body: dict[int, np.ndarray] = {}
            for b in plan:
                batch = [seqs[i] for i in b]
                if not any(todo[s.rec] for s in batch):
                    continue
                states = _forward(teacher, batch, seg.pad_id, settings.store_dtype, result)
                bg.put(_collect(batch, states, window, todo, remaining, got_inputs, got_body, seg))
        bg.close()
    except BaseException:
        # Commit what is finished, then report: a failure never loses finished work.
        with contextlib.suppress(BaseException):
            bg.close()
        writer.close()
        raise
    finally:
        stack.close()
    result.writer_busy_s = bg.busy_s
    result.bytes_written = bg.bytes_written
    _finish(writer, result, settings, selected)
    result.seconds = time.perf_counter() - t_start
    emit("done", asdict_light(result))
    return result


def _check_settings(settings: EmbedSettings) -> None:
    check_sizes(settings.max_tokens, settings.batch_tokens)
    if settings.target_mode not in TARGET_MODES:
        raise EmbedError(f"target mode {settings.target_mode!r}: expected one of {TARGET_MODES}")
    if settings.store_dtype not in ("float16", "float32"):
        raise EmbedError(f"store dtype {settings.store_dtype!r}: expected float16 or float32")


def _forward(teacher: Any, batch: list[Seq], pad_id: int, store_dtype: str, result: EmbedResult) -> np.ndarray:
    """One padded teacher batch: its sequences' kept states (see :func:`_gather`), counted in ``result``."""
    import torch

    ids, mask = pad_batch(batch, pad_id)
    result.model_tokens += int(mask.sum())
    result.padded_tokens += mask.size
    result.batches += 1
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    if teacher.device.startswith("cuda"):
        ids_t = ids_t.pin_memory().to(teacher.device, non_blocking=True)
        mask_t = mask_t.pin_memory().to(teacher.device, non_blocking=True)
    t_model = time.perf_counter()
    hidden = teacher.forward(ids_t, mask_t)
    states = _gather(hidden, batch, store_dtype)  # waits for the device
    result.model_seconds += time.perf_counter() - t_model
    return states


def _finish(writer: StoreWriter, result: EmbedResult, settings: EmbedSettings, selected: int) -> None:
    """Record in the store whether every selected record is in it, and what was left out; close it."""
    result.complete = result.already + result.written + sum(result.skipped.values()) == selected
    result.truncated = int(np.count_nonzero(writer.f["records/truncated"][: writer.committed]))
    writer.set_extra(complete=result.complete, selected_splits=list(settings.splits or SPLITS), selected=selected,
                     versions=library_versions("torch", "transformers", "h5py", "numpy"),
                     skipped=result.skipped, truncated=result.truncated)
    result.meta = writer.meta
    writer.close()


def _collect(batch: list[Seq], states: np.ndarray, window: list[Tokenized], todo: list[bool], remaining: list[int],
             got_inputs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], got_body: dict[int, np.ndarray],
             seg: SegmentTokenizer) -> list[PendingRecord]:
    """Hand a batch's states (its sequences' kept ranges, concatenated) to their records;
    the records whose every pass has now run, ready to store. A record of a body-only store
    gets its inputs and its body from two passes, which may fall in different batches."""
    done: list[PendingRecord] = []
    at = 0
    for s in batch:
        for rng, is_body in ((s.inputs, False), (s.body, True)):
            if rng is None:
                continue
            n = rng[1] - rng[0]
            part = states[at : at + n]
            at += n
            if not todo[s.rec]:
                continue
            if is_body:
                got_body[s.rec] = part
            else:
                special = np.zeros(n, dtype=bool)
                special[: len(seg.prefix)] = True
                if s.body is None and seg.suffix:  # an inputs-only pass ends in [end]
                    special[n - len(seg.suffix):] = True
                got_inputs[s.rec] = (part, s.ids[rng[0] : rng[1]], special)
        remaining[s.rec] -= 1
        if remaining[s.rec] == 0 and todo[s.rec]:
            done.append(_pending(window[s.rec], got_inputs.pop(s.rec), got_body.pop(s.rec), len(seg.prefix)))
    return done


def asdict_light(r: EmbedResult) -> dict[str, Any]:
    d = asdict(r)
    d.pop("meta", None)
    d["path"] = str(r.path)
    d["padding_fraction"] = r.padding_fraction
    return d


def _gather(hidden: Any, batch: Sequence[Seq], store_dtype: str) -> np.ndarray:
    """The stored positions of a batch, in batch order (inputs before body per sequence),
    as one host array; on CUDA cast to float16 on the device when every value fits."""
    import torch

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    for j, s in enumerate(batch):
        for rng in (s.inputs, s.body):
            if rng is not None:
                rows.append(np.full(rng[1] - rng[0], j, dtype=np.int64))
                cols.append(np.arange(rng[0], rng[1], dtype=np.int64))
    dev = hidden.device
    r = torch.from_numpy(np.concatenate(rows)).to(dev, non_blocking=True)
    c = torch.from_numpy(np.concatenate(cols)).to(dev, non_blocking=True)
    sel = hidden[r, c]
    if dev.type == "cpu":
        # the writer thread checks the range and casts, off the model's thread
        return (sel if sel.dtype in (torch.float16, torch.float32) else sel.float()).numpy()
    if store_dtype == "float16" and sel.dtype != torch.float16:
        ok = bool(torch.isfinite(sel).all()) and (sel.numel() == 0 or float(sel.abs().max()) <= FLOAT16_MAX)
        # Out of range stays float32 so that the writer's overflow check names the record.
        sel = sel.to(torch.float16) if ok else sel.float()
    elif sel.dtype not in (torch.float16, torch.float32):
        sel = sel.float()
    return sel.cpu().numpy()


def _pending(t: Tokenized, inputs: tuple[np.ndarray, np.ndarray, np.ndarray], body: np.ndarray,
             prefix: int) -> PendingRecord:
    states, ids, special = inputs
    c, s = len(t.context), len(t.signature)
    return PendingRecord(
        id=t.id, split=t.split, repo=t.repo, truncated=t.truncated,
        input_states=states, input_token_ids=ids, input_special=special,
        context_span=(prefix, prefix + c), signature_span=(prefix + c, prefix + c + s),
        body_states=body, body_token_ids=t.body, body_special=np.zeros(len(t.body), dtype=bool),
    )
