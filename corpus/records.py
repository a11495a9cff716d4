"""Function records: the corpus stage's artefact, and the typed API later stages read it with.

A corpus directory holds::

    DIR/manifest.json              what was built, from what, with which settings
    DIR/repos/<repo_key>.jsonl     one JSON object per extracted function (one file per repo)

JSON Lines, one file per repository, because it streams (a reader holds one record at a
time), each file is written to a temp name and renamed when the repo is complete (a kill
never leaves a torn file that reads as valid), a repo is the unit of resume, and it is plain
text a researcher can ``grep``/``jq``. Leak filtering across splits (a held-out body that also
occurs in train, trivial held-out bodies, duplicates inside a split) depends on the whole
corpus, so it is recorded in the manifest (``dropped``: record id → reason) rather than by
rewriting repo files; :func:`load_records` applies it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codejepa.core import CodejepaError, atomic_write_lines, sha256_file, sha256_json

CORPUS_FORMAT = "codejepa-corpus"
CORPUS_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
REBUILD = "rebuild with `codejepa corpus build`"


class CorpusError(CodejepaError):
    """A corpus that cannot be read as it is; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Span:
    """A region of a file at a commit: ``file_bytes[start:end]`` is exactly the text.

    ``start``/``end`` are byte offsets (end exclusive); lines are 1-based and inclusive.
    """

    start: int
    end: int
    start_line: int
    end_line: int

    def to_list(self) -> list[int]:
        return [self.start, self.end, self.start_line, self.end_line]

    @classmethod
    def from_list(cls, v: list[int]) -> Span:
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]))


@dataclass(frozen=True, slots=True)
class ContextPiece:
    """One piece of a function's file context, with where it came from.

    ``kind`` is ``"import"`` (an import statement of the file), ``"class"`` (the header of an
    enclosing class, outermost first) or ``"sibling"`` (the signature of a function defined in
    the same scope).
    """

    kind: str
    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class FunctionRecord:
    """One function or method of a repository at a commit."""

    id: str  # stable: hash of (repo, commit, path, signature start byte)
    repo: str  # repository identity (name used for splitting)
    url: str  # the source it was built from
    commit: str  # git commit SHA, or sha256 of an sdist for pypi: sources
    path: str  # POSIX path inside the repository
    qualname: str  # as Python's __qualname__: Class.method, outer.<locals>.inner
    split: str  # "train" | "val" | "test"
    is_test: bool  # test path or test* name
    is_async: bool
    signature: str  # decorators + def header + docstring (when present)
    body: str  # the statements after the docstring (a leading comment belongs here)
    signature_span: Span
    body_span: Span
    context: tuple[ContextPiece, ...] = field(default_factory=tuple)
    body_hash: str = ""  # hash of the whitespace- and comment-normalised body
    def_line: int = 0  # 1-based line of the `def` (or `async`) keyword, as ast's FunctionDef.lineno

    @property
    def source_file(self) -> str:
        """``repo/path``: the file the function is defined in, unique across the corpus (it groups
        a file's functions, for whole-file batches and the sibling softmax)."""
        return f"{self.repo}/{self.path}"

    def context_text(self, kinds: Iterable[str] = ("import", "class", "sibling")) -> str:
        """The context pieces of the given kinds, in file order, one per line block."""
        wanted = set(kinds)
        return "\n".join(p.text for p in self.context if p.kind in wanted)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form written to the records files (spans as 4-int lists)."""
        return {
            "id": self.id,
            "repo": self.repo,
            "url": self.url,
            "commit": self.commit,
            "path": self.path,
            "qualname": self.qualname,
            "split": self.split,
            "is_test": self.is_test,
            "is_async": self.is_async,
            "signature": self.signature,
            "body": self.body,
            "signature_span": self.signature_span.to_list(),
            "body_span": self.body_span.to_list(),
            "context": [[p.kind, p.text, p.span.to_list()] for p in self.context],
            "body_hash": self.body_hash,
            "def_line": self.def_line,
        }

    def to_json(self) -> str:
        # Built by hand rather than with dataclasses.asdict, which deep-copies every
        # field and dominated the time of writing a corpus.
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FunctionRecord:
        return cls(
            id=d["id"],
            repo=d["repo"],
            url=d["url"],
            commit=d["commit"],
            path=d["path"],
            qualname=d["qualname"],
            split=d["split"],
            is_test=bool(d["is_test"]),
            is_async=bool(d.get("is_async", False)),
            signature=d["signature"],
            body=d["body"],
            signature_span=Span.from_list(d["signature_span"]),
            body_span=Span.from_list(d["body_span"]),
            context=tuple(ContextPiece(k, t, Span.from_list(s)) for k, t, s in d["context"]),
            body_hash=d.get("body_hash", ""),
            def_line=int(d.get("def_line", 0)),
        )

    @classmethod
    def from_json(cls, line: str) -> FunctionRecord:
        return cls.from_dict(json.loads(line))


def write_records(path: str | os.PathLike[str], records: Iterable[FunctionRecord]) -> int:
    """Write records as JSON Lines atomically (temp file + rename); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_lines(path, (rec.to_json() for rec in records))


def read_records(path: str | os.PathLike[str]) -> Iterator[FunctionRecord]:
    """Stream the records of one JSON Lines file; a missing or damaged file is a
    :class:`CorpusError` naming the file (and the line)."""
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield FunctionRecord.from_json(line)
    except FileNotFoundError:
        raise CorpusError(f"{path}: records file missing; {REBUILD}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: unreadable records file ({e}); {REBUILD}") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:  # JSONDecodeError is a ValueError
        raise CorpusError(f"{path}:{lineno}: damaged records file ({type(e).__name__}: {e}); {REBUILD}") from None


def read_manifest(corpus_dir: str | os.PathLike[str], *, require: Iterable[str] = ("repos",)) -> dict[str, Any]:
    """The manifest of a corpus directory, or a :class:`CorpusError` saying why not.

    ``require``: the top-level keys the caller needs (``corpus info`` also needs ``totals``).
    """
    p = Path(corpus_dir) / "manifest.json"
    if not p.is_file():
        raise CorpusError(f"{corpus_dir}: not a corpus directory (no manifest.json); run `codejepa corpus build` first")
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusError(f"{p}: unreadable corpus manifest ({e})") from None
    if isinstance(manifest, dict) and manifest.get("format") != CORPUS_FORMAT:
        raise CorpusError(f"{p}: not a codejepa corpus manifest")
    why = _manifest_damage(manifest, require)
    if why:
        raise CorpusError(f"{p}: damaged corpus manifest ({why}); {REBUILD}")
    return manifest


# The manifest's parts and their JSON types. Only "repos" is needed by every reader; the
# others are checked when present (a hand-written corpus may leave them out).
_MANIFEST_PARTS: dict[str, type] = {"repos": list, "dropped": dict, "settings": dict, "totals": dict}


def _manifest_damage(manifest: Any, require: Iterable[str]) -> str | None:
    """Why a parsed manifest cannot be used (None when it can): readers index into it
    without further checks, so a wrong shape must be refused here, in one line."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    for key in require:
        if key not in manifest:
            return f"no {key!r}"
    for key, kind in _MANIFEST_PARTS.items():
        if key in manifest and not isinstance(manifest[key], kind):
            return f"{key!r} is not a JSON {'array' if kind is list else 'object'}"
    if not all(isinstance(r, dict) for r in manifest.get("repos", [])):
        return "a 'repos' entry is not an object"
    return None


# Build settings that change what records a corpus holds; the others (workers, clone jobs,
# clone depth, work dir) change only how fast it is built.
_CONTENT_SETTINGS = ("seed", "ratios", "exclude_tests", "keep_trivial", "max_file_bytes",
                     "max_siblings", "extractor_version")


def corpus_fingerprint(manifest: dict[str, Any]) -> str:
    """A hash of what a corpus holds, for later stages to refuse a mismatched corpus.

    It covers each repo's identity, commit, split, status and record count, the content
    settings and the leak filter's ``dropped`` map — not timestamps, timings, resume flags or
    source paths, so re-running ``corpus build`` on a finished corpus (or moving it) keeps it.
    """
    settings = manifest.get("settings", {})
    return sha256_json({
        "format_version": manifest.get("format_version"),
        "settings": {k: settings.get(k) for k in _CONTENT_SETTINGS},
        "repos": [
            [r.get("name"), r.get("commit"), r.get("split"), r.get("status"), r.get("records_file"),
             r.get("functions")]
            for r in manifest.get("repos", [])
        ],
        "dropped": manifest.get("dropped", {}),
    })


def is_corpus_of(corpus_dir: str | os.PathLike[str], fingerprint: str, want: str) -> bool:
    """Whether the corpus at ``corpus_dir`` (its :func:`corpus_fingerprint`) is the one a store
    records (``want``; none recorded: no check). Stores embedded before the content fingerprint
    recorded the manifest file's sha256."""
    return not want or fingerprint == want or sha256_file(Path(corpus_dir) / "manifest.json") == want


def recorded_functions(entry: dict[str, Any]) -> int | None:
    """The number of records the build wrote for a manifest repo entry (None when a
    hand-made manifest does not say)."""
    n = entry.get("functions")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def load_records(
    corpus_dir: str | os.PathLike[str],
    splits: Iterable[str] | str | None = None,
    *,
    include_dropped: bool = False,
) -> Iterator[FunctionRecord]:
    """Stream the corpus's records, repo by repo in manifest order, file order within a repo.

    Records that the manifest marks as dropped (held-out duplicates of train bodies,
    duplicates inside a split, trivial held-out bodies) are skipped unless
    ``include_dropped``. ``splits`` restricts to the given split name or names.
    """
    manifest = read_manifest(corpus_dir)
    wanted = {splits} if isinstance(splits, str) else set(splits) if splits is not None else None
    if wanted is not None and (unknown := sorted(wanted - set(SPLITS))):
        raise CorpusError(f"unknown split {unknown[0]!r}; expected one of {list(SPLITS)}")
    dropped = {} if include_dropped else manifest.get("dropped", {})
    for repo in manifest.get("repos", []):
        if repo.get("status") != "ok" or not repo.get("records_file"):
            continue
        if wanted is not None and repo.get("split") not in wanted:
            continue
        path = Path(corpus_dir) / repo["records_file"]
        n = 0
        for n, rec in enumerate(read_records(path), 1):
            if rec.id not in dropped:
                yield rec
        # A file cut at a line boundary still parses: only the count the build recorded shows it.
        expected = recorded_functions(repo)
        if expected is not None and n != expected:
            raise CorpusError(f"{path}: damaged records file ({n} records, the build wrote {expected}); {REBUILD}")
