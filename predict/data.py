"""Features per record, a RAM cache when it fits, streaming from the store when it does not,
and a background prefetcher so that a training step does not wait on I/O.

Per record (raw teacher space; normalisation happens on the device, in the model):

- ``sig``: the mean of the signature's tokens (the MLP's input);
- ``tok``/``tok_seg``: the transformer's input tokens — context then signature, sink and
  outlier tokens dropped, capped at ``max_input_tokens`` by dropping the *far* context first
  (the signature is kept whole unless it alone exceeds the cap, then its head is kept);
- ``body``: the mean of the body's tokens (the pooled target);
- ``slots``: the body's tokens average-pooled to a FIXED number of slots (contiguous chunks,
  like ``adaptive_avg_pool1d``). The slot count never depends on the body, so nothing about
  the body — its length included — can reach the predictor's inputs.

Input features are computed from the ``inputs`` pass only; prediction never reads ``targets``.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from codejepa.core import CodejepaError
from codejepa.embed.store import Store
from codejepa.predict.normalize import BLOCK_TOKENS

SEG_PAD, SEG_CONTEXT, SEG_SIGNATURE = 0, 1, 2


@dataclass(frozen=True)
class FeatureSpec:
    kind: str  # "mlp" | "transformer"
    max_input_tokens: int
    body_slots: int
    in_outlier_norm: float
    body_outlier_norm: float
    views: tuple[str, ...] = ("mean",)  # pooled input views, concatenated into ``sig``


def _keep(states: np.ndarray, special: np.ndarray, thr: float) -> np.ndarray:
    keep = ~special
    if np.isfinite(thr):
        keep &= np.linalg.norm(states, axis=1) <= thr
    return keep


def input_features(states: np.ndarray, special: np.ndarray, seg: np.ndarray, spec: FeatureSpec
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(pooled input views [len(views) · d], input tokens [L, d] | None, segment ids [L] | None) of one
    record; with the default view that is the pooled signature [d]."""
    keep = _keep(states, special, spec.in_outlier_norm)
    (c0, c1), (s0, s1) = (int(seg[0][0]), int(seg[0][1])), (int(seg[1][0]), int(seg[1][1]))
    sig = states[s0:s1][keep[s0:s1]]
    ctx = states[c0:c1][keep[c0:c1]]
    zero = np.zeros(states.shape[1], np.float32)
    pooled = sig.mean(0) if len(sig) else zero
    if tuple(spec.views) != ("mean",):
        view = {"mean": lambda: pooled, "last": lambda: sig[-1] if len(sig) else zero,
                "first": lambda: sig[0] if len(sig) else zero,
                "context": lambda: ctx.mean(0) if len(ctx) else zero}
        pooled = np.concatenate([np.asarray(view[v](), np.float32) for v in spec.views])
    if spec.kind != "transformer":
        return pooled.astype(np.float32), None, None
    cap = spec.max_input_tokens
    if len(sig) >= cap:
        sig, ctx = sig[:cap], ctx[:0]
    else:
        ctx = ctx[max(0, len(ctx) - (cap - len(sig))):]
    toks = np.concatenate([ctx, sig]) if len(ctx) else sig
    segids = np.concatenate([np.full(len(ctx), SEG_CONTEXT, np.int8), np.full(len(sig), SEG_SIGNATURE, np.int8)])
    return pooled.astype(np.float32), toks, segids


def pool_slots(x: np.ndarray, k: int) -> np.ndarray:
    """Average-pool ``x`` [m, d] into ``k`` contiguous chunks (chunks overlap when m < k)."""
    m, d = x.shape
    if m == 0:
        return np.zeros((k, d), np.float32)
    j = np.arange(k)
    starts = (j * m) // k
    ends = -((-(j + 1) * m) // k)
    cs = np.concatenate([np.zeros((1, d)), np.cumsum(x, 0, dtype=np.float64)])
    return ((cs[ends] - cs[starts]) / (ends - starts)[:, None]).astype(np.float32)


def body_features(states: np.ndarray, special: np.ndarray, spec: FeatureSpec
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """(pooled body [d], body slots [K, d] | None) of one record."""
    keep = _keep(states, special, spec.body_outlier_norm)
    if not keep.any():  # a body made only of outliers: fall back to its non-sink tokens
        keep = ~special
    b = states[keep]
    pooled = b.mean(0) if len(b) else np.zeros(states.shape[1], np.float32)
    slots = pool_slots(b, spec.body_slots) if spec.kind == "transformer" else None
    return pooled.astype(np.float32), slots


def valid_records(store: Store, idx: np.ndarray) -> np.ndarray:
    """Which of ``idx`` have at least one non-sink body token (others cannot be a target)."""
    lengths = store.lengths("targets")
    off = np.concatenate([[0], np.cumsum(lengths)])
    sp = store.special("targets")
    cs = np.concatenate([[0], np.cumsum(~sp)])
    nonspecial = cs[off[1:]] - cs[off[:-1]]
    return nonspecial[np.asarray(idx, dtype=np.int64)] > 0


def estimate_cache_bytes(store: Store, idx: np.ndarray, spec: FeatureSpec, with_body: bool = True) -> int:
    d, n = store.meta.hidden_size, len(idx)
    b = n * d * 4 * (len(spec.views) + (1 if with_body else 0))
    if spec.kind == "transformer":
        lens = np.minimum(store.lengths("inputs")[np.asarray(idx, dtype=np.int64)], spec.max_input_tokens)
        b += int(lens.sum()) * (d * 2 + 1)
        if with_body:
            b += n * spec.body_slots * d * 2
    return int(b)


class FeatureTable:
    """Features of ``idx`` (store indices) precomputed into RAM; rows follow ``idx``'s order."""

    def __init__(self, store: Store, idx: np.ndarray, spec: FeatureSpec, *, with_body: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.index = np.asarray(idx, dtype=np.int64)
        self.spec = spec
        n, d = len(self.index), store.meta.hidden_size
        row = {int(r): k for k, r in enumerate(self.index)}
        order = np.unique(self.index)
        seg = store.segments()
        self.sig = np.zeros((n, d * len(spec.views)), np.float32)
        if spec.kind == "transformer":
            # One float16 buffer sized by an upper bound of each record's kept tokens, filled in
            # place: a list of float32 arrays joined at the end peaked at 4.6× the cache's size.
            room = np.minimum(store.lengths("inputs")[self.index], spec.max_input_tokens)
            self.tok_off = np.concatenate([[0], np.cumsum(room)])
            self.tok_len = np.zeros(n, np.int64)
            self.tok = np.empty((int(self.tok_off[-1]), d), np.float16)
            self.tok_seg = np.zeros(int(self.tok_off[-1]), np.int8)
        total, done = len(order) * (2 if with_body else 1), 0
        for run, states, special, offs in store.iter_blocks("inputs", order, block_tokens=BLOCK_TOKENS):
            store.check_finite("inputs", states, run, offs)  # val and test records too: stats saw train's
            for j, rec in enumerate(run):
                a, b = int(offs[j]), int(offs[j + 1])
                k = row[int(rec)]
                self.sig[k], tok, tseg = input_features(states[a:b], special[a:b], seg[rec], spec)
                if tok is not None:
                    o = int(self.tok_off[k])
                    self.tok[o : o + len(tok)], self.tok_seg[o : o + len(tok)] = tok, tseg
                    self.tok_len[k] = len(tok)
            done += len(run)
            if progress:
                progress(done, total)
        self.body: np.ndarray | None = None
        self.slots: np.ndarray | None = None
        if with_body:
            self.body = np.zeros((n, d), np.float32)
            if spec.kind == "transformer":
                self.slots = np.zeros((n, spec.body_slots, d), np.float16)
            for run, states, special, offs in store.iter_blocks("targets", order, block_tokens=BLOCK_TOKENS):
                store.check_finite("targets", states, run, offs)
                for j, rec in enumerate(run):
                    a, b = int(offs[j]), int(offs[j + 1])
                    k = row[int(rec)]
                    pooled, slots = body_features(states[a:b], special[a:b], spec)
                    self.body[k] = pooled
                    if slots is not None:
                        self.slots[k] = slots
                done += len(run)
                if progress:
                    progress(done, total)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        """RAM held by the cached features."""
        arrays = (self.sig, self.body, self.slots, getattr(self, "tok", None), getattr(self, "tok_seg", None))
        return int(sum(a.nbytes for a in arrays if a is not None))

    def record(self, k: int) -> dict[str, Any]:
        out: dict[str, Any] = {"sig": self.sig[k]}
        if self.spec.kind == "transformer":
            a = self.tok_off[k]
            out["tok"], out["tok_seg"] = self.tok[a : a + self.tok_len[k]], self.tok_seg[a : a + self.tok_len[k]]
        if self.body is not None:
            out["body"] = self.body[k]
            if self.slots is not None:
                out["slots"] = self.slots[k]
        return out

    def batch(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        return collate([self.record(int(k)) for k in rows], self.index[np.asarray(rows, dtype=np.int64)], self.spec)


class StreamingTable:
    """The same interface as :class:`FeatureTable`, reading each record from the store on demand."""

    def __init__(self, store: Store, idx: np.ndarray, spec: FeatureSpec, *, with_body: bool = True) -> None:
        self.store, self.spec, self.with_body = store, spec, with_body
        self.index = np.asarray(idx, dtype=np.int64)
        self._seg = store.segments()

    def __len__(self) -> int:
        return len(self.index)

    def record(self, k: int) -> dict[str, Any]:
        rec = int(self.index[k])
        inp = self.store.inputs(rec)
        sig, tok, tseg = input_features(inp.states, inp.special, self._seg[rec], self.spec)
        out: dict[str, Any] = {"sig": sig}
        if tok is not None:
            out["tok"], out["tok_seg"] = tok.astype(np.float16), tseg
        if self.with_body:
            body = self.store.body(rec)
            pooled, slots = body_features(body.states, body.special, self.spec)
            out["body"] = pooled
            if slots is not None:
                out["slots"] = slots.astype(np.float16)
        return out

    def batch(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        return collate([self.record(int(k)) for k in rows], self.index[np.asarray(rows, dtype=np.int64)], self.spec)


def collate(recs: list[dict[str, Any]], index: np.ndarray, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Stack records into a batch; input tokens are right-padded (segment id 0 = padding) and
    carry their distance to the body as position (truncating far context shifts nothing)."""
    out: dict[str, np.ndarray] = {"index": index, "sig": np.stack([r["sig"] for r in recs])}
    if "body" in recs[0]:
        out["body"] = np.stack([r["body"] for r in recs])
    if spec.kind == "transformer":
        lens = [len(r["tok"]) for r in recs]
        L, d = max(1, max(lens)), recs[0]["tok"].shape[1]
        tok = np.zeros((len(recs), L, d), np.float16)  # float16 on the wire; the model computes in float32
        seg = np.zeros((len(recs), L), np.int64)
        pos = np.zeros((len(recs), L), np.int64)
        for i, (r, n) in enumerate(zip(recs, lens)):
            tok[i, :n] = r["tok"]
            seg[i, :n] = r["tok_seg"]
            pos[i, :n] = np.arange(n - 1, -1, -1)
        out["tok"], out["tok_seg"], out["tok_pos"] = tok, seg, pos
        if "slots" in recs[0]:
            out["slots"] = np.stack([r["slots"] for r in recs]).astype(np.float16)
    return out


def multiblock_reveal(rng: np.random.Generator, k: int, num_blocks: int, block_frac: float) -> np.ndarray:
    """Which of ``k`` body slots a multi-block training view reveals: all but ``num_blocks``
    random contiguous spans (at least one slot stays masked)."""
    masked = np.zeros(k, bool)
    span = max(1, int(round(block_frac * k)))
    for _ in range(max(1, num_blocks)):
        s = int(rng.integers(0, max(1, k - span + 1)))
        masked[s : s + span] = True
    return ~masked


class Prefetcher:
    """Runs ``fn(item)`` for ``items`` in order on a background thread, ``depth`` ahead.

    ``wait_s`` accumulates the time the consumer spent blocked waiting for a batch: the
    share of step time spent on data, which the benchmark reports.
    """

    _END = object()

    def __init__(self, fn: Callable[[Any], Any], items: Sequence[Any], depth: int = 4) -> None:
        self.fn, self.items, self.depth = fn, list(items), depth
        self.wait_s = 0.0

    def __iter__(self) -> Iterator[Any]:
        if self.depth <= 0:
            for it in self.items:
                t = time.perf_counter()
                out = self.fn(it)
                self.wait_s += time.perf_counter() - t
                yield out
            return
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(x: Any) -> None:
            while not stop.is_set():
                try:
                    q.put(x, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def work() -> None:
            try:
                for it in self.items:
                    if stop.is_set():
                        return
                    put(self.fn(it))
                put(self._END)
            except BaseException as e:  # handed to the consumer, raised there
                put(e)

        th = threading.Thread(target=work, daemon=True, name="codejepa-prefetch")
        th.start()
        try:
            while True:
                t = time.perf_counter()
                out = q.get()
                self.wait_s += time.perf_counter() - t
                if out is self._END:
                    break
                if isinstance(out, BaseException):
                    raise out
                yield out
        finally:
            stop.set()
            th.join(timeout=5)


@dataclass(frozen=True)
class RevealSpec:
    """Multi-block masking of training batches: a function of (seed, epoch, record) only, so
    that resuming, streaming and DDP sharding all see the same masks."""

    seed: int
    slots: int
    num_blocks: int
    block_frac: float


def add_reveal(b: dict[str, np.ndarray], reveal: RevealSpec | None, epoch: int) -> dict[str, np.ndarray]:
    if reveal is not None:
        b["reveal"] = np.stack([
            multiblock_reveal(np.random.default_rng([reveal.seed, epoch, int(i)]), reveal.slots,
                              reveal.num_blocks, reveal.block_frac) for i in b["index"]])
    return b


class _StoreBatches:
    """Batches read in DataLoader worker processes; each worker opens its own store handle
    (HDF5 handles do not survive a fork), so reads run in parallel, unlike threads under
    h5py's global lock."""

    def __init__(self, path: str, idx: np.ndarray, spec: FeatureSpec, batches: list[np.ndarray],
                 reveal: RevealSpec | None, epoch: int) -> None:
        self.path, self.idx, self.spec, self.batches = path, idx, spec, batches
        self.reveal, self.epoch = reveal, epoch
        self._pid = -1
        self._table: StreamingTable | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, np.ndarray] | CodejepaError:
        try:
            if self._table is None or self._pid != os.getpid():
                from codejepa.embed.store import open_store

                self._table, self._pid = StreamingTable(open_store(self.path), self.idx, self.spec), os.getpid()
            return add_reveal(self._table.batch(self.batches[i]), self.reveal, self.epoch)
        except CodejepaError as e:
            # Handed back as a value: raised in the worker, the DataLoader would re-raise it
            # with the worker's traceback folded into its message, not as one line.
            return e


def _no_collate(x: Any) -> Any:
    return x


def _die_with_parent(_worker_id: int) -> None:
    """A worker of a training killed with -9 must not outlive it: it would hold the run
    folder's lock (inherited with the fork) and refuse the `--resume`. Linux only."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class WorkerLoader:
    """Like :class:`Prefetcher`, with ``workers`` processes reading from the store."""

    def __init__(self, table: StreamingTable, batches: Sequence[np.ndarray], reveal: RevealSpec | None,
                 epoch: int, workers: int, depth: int) -> None:
        self.ds = _StoreBatches(str(table.store.path), table.index, table.spec, list(batches), reveal, epoch)
        self.workers, self.depth = workers, depth
        self.wait_s = 0.0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if len(self.ds) == 0:
            return
        import torch
        from torch.utils.data import DataLoader

        # Its own generator: a DataLoader draws its workers' base seed from torch's global one,
        # which would move the dropout masks of every later step (and a resume's, differently).
        dl = DataLoader(self.ds, batch_size=None, shuffle=False, num_workers=self.workers,
                        collate_fn=_no_collate, prefetch_factor=max(2, self.depth // self.workers),
                        generator=torch.Generator().manual_seed(self.ds.epoch), worker_init_fn=_die_with_parent)
        it = iter(dl)
        while True:
            t = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                return
            finally:
                self.wait_s += time.perf_counter() - t
            if isinstance(b, CodejepaError):
                raise b
            yield b


def batch_loader(table: FeatureTable | StreamingTable, batches: Sequence[np.ndarray], *, reveal: RevealSpec | None,
                 epoch: int, prefetch: int, workers: int) -> Prefetcher | WorkerLoader:
    """Batches in order, prepared ahead: worker processes when streaming with ``workers`` > 0,
    else a background thread (enough for the RAM cache, where a batch is a gather)."""
    if workers > 0 and isinstance(table, StreamingTable):
        return WorkerLoader(table, batches, reveal, epoch, workers, prefetch)
    return Prefetcher(lambda rows: add_reveal(table.batch(rows), reveal, epoch), batches, depth=prefetch)
