"""Cross-validation folds over repositories.

One repository split leaves few held-out repositories (8 of python-40's 40), and confidence
intervals over so few clusters are wide. K folds rotate the roles: the repositories are dealt
into K groups; fold k tests on group k, selects on group k+1 and trains on the rest, so every
repository is tested exactly once and the K evaluations pool into one over all of them.

Each fold gets its own leak filter (a held-out body that also occurs in that fold's train is
dropped, as the build does for its own split), computed from the corpus's per-repo index files:
no re-extraction and no re-embedding. The result is a *split file*: record id → split, which
``predict train --splits`` and ``evaluate retrieval --splits`` apply to an existing store.
Repositories pinned to train (``--train-only-file``) stay in train in every fold.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codejepa.core import CodejepaError, atomic_write_json, sha256_json
from codejepa.corpus.records import SPLITS, corpus_fingerprint, read_manifest, recorded_functions
from codejepa.corpus.split import RepoIndex, compute_dropped, load_index, split_point

SPLITS_FORMAT = "codejepa-splits"


@dataclass(frozen=True, slots=True)
class SplitAssignment:
    """Which split each record is in, for one fold (records not listed are in none)."""

    splits: dict[str, str]  # record id → train | val | test
    repos: dict[str, str]  # repository → split
    fold: int
    folds: int
    seed: int
    corpus_fingerprint: str
    key: str  # a hash of the assignment: runs and evaluations must agree on it

    @property
    def label(self) -> str:
        return f"fold {self.fold} of {self.folds} (seed {self.seed})"

    def to_json(self) -> dict[str, Any]:
        by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
        for rid, s in self.splits.items():
            by_split[s].append(rid)
        return {"format": SPLITS_FORMAT, "fold": self.fold, "folds": self.folds, "seed": self.seed,
                "corpus_fingerprint": self.corpus_fingerprint, "key": self.key, "repos": self.repos,
                "records": {s: sorted(v) for s, v in by_split.items()}}


def fold_groups(repos: list[str], folds: int, seed: int = 0) -> list[list[str]]:
    """Deal repositories into ``folds`` groups of near-equal size, in the order of their split
    hash: the same on every machine, whatever order the repositories were given in."""
    if folds < 3:
        raise CodejepaError(f"--folds {folds}: at least 3 are needed (a test, a val and a train group)")
    names = sorted(set(repos), key=lambda n: (split_point(n, seed), n))
    if len(names) < folds:
        raise CodejepaError(f"{len(names)} repositories cannot fill {folds} folds")
    return [names[i * len(names) // folds:(i + 1) * len(names) // folds] for i in range(folds)]


def fold_repo_splits(groups: list[list[str]], fold: int) -> dict[str, str]:
    """Fold ``fold``: its group is test, the next one val, the others train."""
    k = len(groups)
    if not 0 <= fold < k:
        raise CodejepaError(f"fold {fold} out of range: expected 0 to {k - 1}")
    return {name: ("test" if g == fold else "val" if g == (fold + 1) % k else "train")
            for g, names in enumerate(groups) for name in names}


def make_folds(corpus_dir: str | os.PathLike[str], folds: int, seed: int | None = None) -> list[SplitAssignment]:
    """The ``folds`` split assignments of a built corpus, each with its own leak filter.

    ``seed`` defaults to the corpus's own split seed.
    """
    manifest = read_manifest(corpus_dir)
    settings = manifest.get("settings", {})
    seed = int(settings.get("seed", 0)) if seed is None else seed
    entries = [r for r in manifest.get("repos", []) if r.get("status") == "ok" and r.get("index_file")]
    pinned = {r["name"] for r in entries if r.get("train_only")}
    groups = fold_groups([r["name"] for r in entries if r["name"] not in pinned], folds, seed)
    fp = corpus_fingerprint(manifest)
    # Each index file is read once, not once per fold.
    entries_of = {r["name"]: load_index(Path(corpus_dir) / r["index_file"], recorded_functions(r)) for r in entries}
    out = []
    for k in range(folds):
        repo_split = {**fold_repo_splits(groups, k), **{n: "train" for n in pinned}}
        indexes = [RepoIndex(name, repo_split[name], (lambda rows=rows: rows)) for name, rows in entries_of.items()]
        dropped = compute_dropped(indexes, keep_trivial=bool(settings.get("keep_trivial", False))).dropped
        splits = {rid: repo_split[name] for name, rows in entries_of.items() for rid, _ in rows if rid not in dropped}
        out.append(SplitAssignment(splits, dict(sorted(repo_split.items())), k, folds, seed, fp, _key(fp, splits)))
    return out


def _key(corpus_fp: str, splits: dict[str, str]) -> str:
    return sha256_json({"corpus": corpus_fp, "splits": sorted(splits.items())})


def write_fold(a: SplitAssignment, out_dir: str | os.PathLike[str]) -> Path:
    """Write one fold's split file, ``out_dir/fold-K.json``."""
    p = Path(out_dir) / f"fold-{a.fold}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, a.to_json())
    return p


def other_fold_files(out_dir: str | os.PathLike[str], a: SplitAssignment) -> list[str]:
    """The ``fold-K.json`` files in ``out_dir`` that belong to another cross-validation than
    ``a``'s (other K, seed or corpus): writing beside them would leave a mixed folder."""
    other = []
    for p in sorted(Path(out_dir).glob("fold-*.json")):
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            same = (d.get("folds"), d.get("seed"), d.get("corpus_fingerprint")) == (a.folds, a.seed,
                                                                                     a.corpus_fingerprint)
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            other.append(p.name)
    return other


def write_folds(corpus_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], folds: int,
                seed: int | None = None) -> list[Path]:
    """Write ``fold-K.json`` for each fold into ``out_dir``; return the paths."""
    return [write_fold(a, out_dir) for a in make_folds(corpus_dir, folds, seed)]


def read_splits(path: str | os.PathLike[str]) -> SplitAssignment:
    """Load a split file written by :func:`write_folds`, or say in one line why not."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CodejepaError(f"{p}: no such split file (write one with `codejepa corpus folds`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodejepaError(f"{p}: unreadable split file ({e})") from None
    if not isinstance(d, dict) or d.get("format") != SPLITS_FORMAT:
        raise CodejepaError(f"{p}: not a codejepa split file")
    try:
        splits = {rid: s for s in SPLITS for rid in d["records"].get(s, [])}
        if not all(isinstance(rid, str) for rid in splits):  # the key sorts them: ints would not compare
            raise TypeError("record ids must be strings")
        a = SplitAssignment(splits, dict(d["repos"]), int(d["fold"]), int(d["folds"]), int(d["seed"]),
                            str(d["corpus_fingerprint"]), str(d["key"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CodejepaError(f"{p}: damaged split file ({type(e).__name__}: {e})") from None
    if _key(a.corpus_fingerprint, splits) != a.key:
        raise CodejepaError(f"{p}: damaged split file (its records do not match its key)")
    return a
