"""Repository split and leak filtering.

The split is decided per repository from a hash of (seed, repo name) alone, so it is the
same on every machine, and adding or removing a repository never moves another one. The
price is that the realised proportions only approach 80/10/10 as the number of repos grows
(with a handful of repos a split may be empty: the build warns).

Leak filtering needs the whole corpus, so it runs after all repos are extracted, over the
small per-repo index files (record id, body hash), and produces the manifest's ``dropped``
map: record id → reason. Repos are visited in name order and records in file order, so
which copy of a duplicate survives does not depend on the order sources were given in.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from codejepa.core import CodejepaError
from codejepa.corpus.extract import is_trivial_hash
from codejepa.corpus.records import REBUILD, SPLITS, CorpusError

DROP_TRIVIAL = "trivial body in a held-out split"
DROP_TRAIN_DUPLICATE = "body also occurs in train"
DROP_SPLIT_DUPLICATE = "duplicate body within the split"


def parse_ratios(text: str) -> tuple[float, float, float]:
    """``"80/10/10"`` (or ``"0.8,0.1,0.1"``) → fractions summing to 1."""
    parts = [p for p in text.replace(",", "/").split("/") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise CodejepaError(f"split ratios {text!r}: expected three numbers like 80/10/10") from None
    if len(vals) != 3 or not all(math.isfinite(v) and v >= 0 for v in vals) or sum(vals) <= 0:
        raise CodejepaError(f"split ratios {text!r}: expected three finite non-negative numbers like 80/10/10")
    total = sum(vals)
    return (vals[0] / total, vals[1] / total, vals[2] / total)


def split_point(name: str, seed: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, repo name)."""
    h = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


DEFAULT_RATIOS = (0.8, 0.1, 0.1)  # train/val/test shares of the repositories


def assign_split(name: str, seed: int = 0, ratios: tuple[float, float, float] = DEFAULT_RATIOS) -> str:
    u = split_point(name, seed)
    if u < ratios[0]:
        return "train"
    if u < ratios[0] + ratios[1]:
        return "val"
    return "test"


@dataclass(frozen=True, slots=True)
class RepoIndex:
    """What leak filtering needs of one repository."""

    name: str
    split: str
    entries: Callable[[], Iterable[tuple[str, str]]]  # (record id, body hash), file order


@dataclass(slots=True)
class DropResult:
    dropped: dict[str, str]
    counts: Counter[str]  # reason → n
    kept: Counter[str]  # split → n kept
    total: Counter[str]  # split → n before filtering


def compute_dropped(repos: Iterable[RepoIndex], *, keep_trivial: bool = False) -> DropResult:
    """Which records ``load_records`` must skip, and why.

    * val/test: a trivial body (unless ``keep_trivial``), a body that occurs in train, or a
      body already seen in the same split;
    * train: a body already seen in train (one copy is kept).

    With ``keep_trivial`` trivial bodies are kept in every split and exempt from the
    duplicate rules (they are duplicates by nature, and would otherwise all be dropped as
    train duplicates).
    """
    by_split: dict[str, list[RepoIndex]] = {s: [] for s in SPLITS}
    for r in repos:
        if r.split not in by_split:
            raise CodejepaError(f"repo {r.name}: unknown split {r.split!r}")
        by_split[r.split].append(r)
    dropped: dict[str, str] = {}
    counts: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    total: Counter[str] = Counter()
    train_hashes: set[str] = set()
    for split in SPLITS:  # train first: its hashes decide the held-out drops
        seen = train_hashes if split == "train" else set()
        for repo in sorted(by_split[split], key=lambda r: r.name):
            for rid, h in repo.entries():
                total[split] += 1
                reason = None
                trivial = is_trivial_hash(h)
                if trivial and keep_trivial:
                    kept[split] += 1  # kept everywhere, exempt from the duplicate rules
                    continue
                if split != "train" and trivial:
                    reason = DROP_TRIVIAL
                elif split != "train" and h in train_hashes:
                    reason = DROP_TRAIN_DUPLICATE
                elif h in seen:
                    reason = DROP_SPLIT_DUPLICATE
                if reason is None:
                    seen.add(h)
                    kept[split] += 1
                else:
                    dropped[rid] = reason
                    counts[reason] += 1
    return DropResult(dropped, counts, kept, total)


def read_index(path: str) -> Iterator[tuple[str, str]]:
    """Stream a repo's index file: one ``id<TAB>body_hash`` a line."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            rid, _, h = line.rstrip("\n").partition("\t")
            if rid:
                yield rid, h


def load_index(path: str | os.PathLike[str], rows: int | None) -> list[tuple[str, str]]:
    """A repo's whole index file, checked against the ``rows`` the build recorded (None: not
    known); a :class:`CorpusError` naming the file when it is missing, unreadable or cut short
    (a truncated index would otherwise silently shrink every split made from it)."""
    try:
        entries = list(read_index(str(path)))
    except FileNotFoundError:
        raise CorpusError(f"{path}: index file missing; {REBUILD}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: unreadable index file ({e}); {REBUILD}") from None
    if rows is not None and len(entries) != rows:
        raise CorpusError(f"{path}: damaged index file ({len(entries)} rows, the build wrote {rows}); {REBUILD}")
    return entries
