"""The corpus stage: real repositories → exact, leak-free function records.

``load_records(DIR)`` streams a built corpus as typed :class:`FunctionRecord` objects;
``build_corpus(sources, DIR, settings)`` builds one (imported lazily: it pulls in
tree-sitter and GitPython).
"""

from __future__ import annotations

from typing import Any

from codejepa.corpus.records import (
    CORPUS_FORMAT,
    CORPUS_FORMAT_VERSION,
    SPLITS,
    ContextPiece,
    CorpusError,
    FunctionRecord,
    Span,
    corpus_fingerprint,
    load_records,
    read_manifest,
    read_records,
    write_records,
)

__all__ = [
    "CORPUS_FORMAT",
    "CORPUS_FORMAT_VERSION",
    "SPLITS",
    "BuildSettings",
    "ContextPiece",
    "CorpusError",
    "FunctionRecord",
    "Span",
    "build_corpus",
    "corpus_fingerprint",
    "load_records",
    "read_manifest",
    "read_records",
    "write_records",
]


def __getattr__(name: str) -> Any:
    if name in ("build_corpus", "BuildSettings"):
        from codejepa.corpus import build

        return getattr(build, name)
    raise AttributeError(name)
