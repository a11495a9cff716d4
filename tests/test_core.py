"""Shared helpers of codejepa.core that every stage leans on."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import codejepa.core as core


def test_cached_sha256_reads_a_file_once_and_again_when_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEJEPA_CACHE", str(tmp_path / "cache"))
    reads: list[Path] = []
    real = core.sha256_file

    def counting(path, *a, **k):
        reads.append(Path(path))
        return real(path, *a, **k)

    monkeypatch.setattr(core, "sha256_file", counting)
    f = tmp_path / "store.h5"
    f.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert core.cached_sha256_file(f) == want and core.cached_sha256_file(f) == want
    assert len(reads) == 1  # the second call came from the cache file
    with f.open("ab") as fh:  # a resumed run appends: new size, new hash
        fh.write(b"more")
    assert core.cached_sha256_file(f) == hashlib.sha256(b"abc" * 1000 + b"more").hexdigest()
    assert len(reads) == 2
    # a corrupt cache file costs a re-hash, never an error; an unwritable one as well
    (tmp_path / "cache" / "file-hashes.json").write_text("{not json")
    assert core.cached_sha256_file(f) == hashlib.sha256(b"abc" * 1000 + b"more").hexdigest()
    assert len(reads) == 3
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "cache").chmod(0o500)
        try:
            f.write_bytes(b"x")
            assert core.cached_sha256_file(f) == hashlib.sha256(b"x").hexdigest()
        finally:
            (tmp_path / "cache").chmod(0o700)


def test_cached_sha256_keeps_what_a_concurrent_run_added_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEJEPA_CACHE", str(tmp_path / "cache"))
    cache_file = tmp_path / "cache" / "file-hashes.json"
    real = core.sha256_file

    def slow_hash_while_another_run_writes(path, *a, **k):
        # another evaluation finishes its own (long) hash while this one is hashing
        core.atomic_write_json(cache_file, {**core._read_hash_cache(cache_file), "other|1|1": "feed"})
        return real(path, *a, **k)

    (tmp_path / "cache").mkdir()
    f = tmp_path / "store.h5"
    f.write_bytes(b"abc")
    monkeypatch.setattr(core, "sha256_file", slow_hash_while_another_run_writes)
    assert core.cached_sha256_file(f) == hashlib.sha256(b"abc").hexdigest()
    cache = core._read_hash_cache(cache_file)
    assert cache["other|1|1"] == "feed" and hashlib.sha256(b"abc").hexdigest() in cache.values()
