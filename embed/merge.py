"""``embed merge``: join shard stores (from ``embed run --shard I/N``) into one store.

The shards are copied record block by record block (states stay in their stored dtype), so
the merged file is an ordinary store that needs none of its inputs afterwards. A merge is
itself resumable: rerunning it continues into the same output (records already there are
skipped by id). The shards must agree on everything that makes states comparable (teacher,
weights, layer, template, tokenizer, corpus, dtypes, window) and must cover ``0..N-1`` with
each shard complete, or be unsharded stores of disjoint records (e.g. one per split).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codejepa.core import code_version
from codejepa.embed.store import PASSES, PendingRecord, StoreError, StoreMeta, StoreWriter, open_store


@dataclass
class MergeResult:
    path: Path
    shards: int
    records: int  # in the merged store
    copied: int  # by this call
    complete: bool


def _check_shards(metas: list[StoreMeta], paths: Sequence[Path], allow_partial: bool) -> None:
    keys = [{k: v for k, v in m.append_key().items() if k != "shard"} for m in metas]
    for p, k in zip(paths[1:], keys[1:]):
        if k != keys[0]:
            diff = {n: (keys[0][n], v) for n, v in k.items() if v != keys[0][n]}
            raise StoreError(f"{p}: built with other settings than {paths[0]}, cannot merge ({diff})")
    specs = [_shard_spec(m, p) for m, p in zip(metas, paths)]
    counts = {n for _, n in specs}
    if counts != {1}:
        if len(counts) != 1:
            raise StoreError(f"shards of different shard counts cannot be merged: {sorted(m.shard for m in metas)}")
        n = counts.pop()
        seen = [i for i, _ in specs]
        dup = sorted({i for i in seen if seen.count(i) > 1})
        if dup:
            raise StoreError(f"shard(s) {dup} of {n} given twice")
        missing = sorted(set(range(n)) - set(seen))
        if missing and not allow_partial:
            raise StoreError(f"shard(s) {missing} of {n} are missing (pass them, or --allow-partial)")
    if not allow_partial:
        for p, m in zip(paths, metas):
            if not m.extra.get("complete", False):
                raise StoreError(f"{p}: shard is not complete (its `embed run` has not finished); "
                                 "finish it, or merge with --allow-partial")


def merge_stores(
    shards: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    allow_partial: bool = False,
    block_records: int = 512,
    progress: Callable[[int], None] | None = None,
) -> MergeResult:
    """Copy the records of shard stores (``embed run --shard I/N``) into one store at ``out``.

    The shards must share every setting but the shard, hold no record twice and, unless
    ``allow_partial``, be all N of them and finished. Records are copied ``block_records`` at a
    time in shard order (whatever the order given); a killed merge resumes, skipping what ``out``
    holds, and ``out`` is marked complete only when every shard was. ``progress`` gets the number
    of records of each block read. Raises :class:`StoreError` with one line on bad input.
    """
    paths = [Path(p) for p in shards]
    out = Path(out)
    if not paths:
        raise StoreError("nothing to merge: give the shard stores")
    if any(p.resolve() == out.resolve() for p in paths):
        raise StoreError(f"{out}: the output cannot also be an input")
    stores = [open_store(p) for p in paths]
    try:
        # Shard order, not the command line's (a glob puts shard-10 before shard-2): the same
        # shards always merge into the same record order, so training on the store reproduces.
        order = sorted(range(len(stores)), key=lambda j: (_shard_spec(stores[j].meta, paths[j])[0], str(paths[j])))
        stores, paths = [stores[j] for j in order], [paths[j] for j in order]
        metas = [s.meta for s in stores]
        _check_shards(metas, paths, allow_partial)
        all_ids: set[str] = set()
        for p, s in zip(paths, stores):
            ids = set(s.ids.tolist())
            if len(ids) != len(s.ids) or all_ids & ids:
                raise StoreError(f"{p}: holds records that another input also holds; cannot merge overlapping stores")
            all_ids |= ids
        complete = all(m.extra.get("complete", False) for m in metas)
        if {m.shard for m in metas} != {"0/1"}:
            n = int(metas[0].shard.split("/")[1])
            complete = complete and len(metas) == n
        splits = sorted({s for m in metas for s in m.extra.get("selected_splits", [])})
        skipped: dict[str, int] = {}
        for m in metas:
            for reason, c in (m.extra.get("skipped") or {}).items():
                skipped[reason] = skipped.get(reason, 0) + int(c)
        base = asdict(metas[0])
        base.update(shard="0/1", code_version=code_version())
        base["extra"] = {
            **metas[0].extra,
            "complete": complete,
            "merged_from": [f"{p.name} ({m.shard})" for p, m in zip(paths, metas)],
            "selected_splits": splits,
            "selected": int(sum(int(m.extra.get("selected", 0)) for m in metas)),
            "skipped": skipped,
            "truncated": int(sum(int(s.truncated.sum()) for s in stores)),
        }
        meta = StoreMeta(**base)
        copied = 0
        with StoreWriter(out, meta) as w:
            w.set_extra(complete=False)  # until every record is copied: a killed merge is marked unfinished
            for s in stores:
                for a in range(0, len(s), block_records):
                    b = min(a + block_records, len(s))
                    todo = [i for i in range(a, b) if not w.has(s.ids[i])]
                    if todo:
                        copied = _append(w, _read_block(s, a, b, set(todo)), copied)
                    if progress is not None:
                        progress(b - a)
            w.set_extra(**base["extra"])
            total = w.committed
        return MergeResult(out, len(paths), total, copied, complete)
    finally:
        for s in stores:
            s.close()


def _shard_spec(meta: StoreMeta, path: Path) -> tuple[int, int]:
    """A store's shard (I, N), from its metadata's "I/N"."""
    try:
        i, n = (int(x) for x in meta.shard.split("/"))
    except ValueError:
        raise StoreError(f"{path}: its shard field {meta.shard!r} is not I/N") from None
    return i, n


def _append(w: StoreWriter, batch: list[PendingRecord], copied: int) -> int:
    before = w.committed
    w.append(batch)
    return copied + (w.committed - before)


def _read_block(s: Any, a: int, b: int, keep: set[int]) -> list[PendingRecord]:
    """Records ``a..b`` of an open store in their stored dtype (one read per dataset)."""
    raw: dict[str, dict[str, np.ndarray]] = {}
    off: dict[str, np.ndarray] = {}
    for name in PASSES:
        o = s._off[name][a : b + 1]
        lo, hi = int(o[0]), int(o[-1])
        raw[name] = {k: s.read_slice(name, k, lo, hi) for k in ("states", "token_ids", "special")}
        off[name] = o - lo
    seg = s._segments[a:b]
    out: list[PendingRecord] = []
    for j, i in enumerate(range(a, b)):
        if i not in keep:
            continue
        (ia, ib), (ta, tb) = (off["inputs"][j], off["inputs"][j + 1]), (off["targets"][j], off["targets"][j + 1])
        out.append(PendingRecord(
            id=str(s.ids[i]), split=str(s.splits[i]), repo=str(s.repos[i]), truncated=bool(s.truncated[i]),
            input_states=raw["inputs"]["states"][ia:ib], input_token_ids=raw["inputs"]["token_ids"][ia:ib],
            input_special=raw["inputs"]["special"][ia:ib],
            context_span=(int(seg[j, 0, 0]), int(seg[j, 0, 1])), signature_span=(int(seg[j, 1, 0]), int(seg[j, 1, 1])),
            body_states=raw["targets"]["states"][ta:tb], body_token_ids=raw["targets"]["token_ids"][ta:tb],
            body_special=raw["targets"]["special"][ta:tb],
        ))
    return out

