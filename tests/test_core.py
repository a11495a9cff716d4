"""Shared helpers of codejepa.core that every stage leans on."""

from __future__ import annotations

import hashlib
import os
import sys
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
    (tmp_path / "cache" / "file-hashes.json").write_text("[]")  # JSON, but not the cache's shape
    assert core.cached_sha256_file(f) == hashlib.sha256(b"abc" * 1000 + b"more").hexdigest()
    assert len(reads) == 4
    # rewritten in place at the same size (a store re-embedded): the new mtime says it changed
    st = f.stat()
    f.write_bytes(b"xyz" * 1000 + b"more")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert core.cached_sha256_file(f) == hashlib.sha256(b"xyz" * 1000 + b"more").hexdigest()
    # another file of the same size copied over it with its times set back (cp; touch -r)
    st = f.stat()
    other = tmp_path / "other.h5"
    other.write_bytes(b"uvw" * 1000 + b"more")
    other.replace(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert core.cached_sha256_file(f) == hashlib.sha256(b"uvw" * 1000 + b"more").hexdigest()
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


def test_the_hash_cache_waits_for_a_concurrent_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two evaluations hashing at once share the cache file: the second waits for the first's
    lock (held only to merge the entries) instead of failing with Busy."""
    import threading

    monkeypatch.setenv("CODEJEPA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    f = tmp_path / "store.h5"
    f.write_bytes(b"abc")
    held, release = threading.Event(), threading.Event()

    def other_run() -> None:
        with core.exclusive(tmp_path / "cache" / "file-hashes.json.lock", "the hash cache"):
            held.set()
            release.wait(5)

    t = threading.Thread(target=other_run)
    t.start()
    assert held.wait(5)
    threading.Timer(0.2, release.set).start()
    try:
        assert core.cached_sha256_file(f) == hashlib.sha256(b"abc").hexdigest()
    finally:
        release.set()
        t.join()
    assert hashlib.sha256(b"abc").hexdigest() in core._read_hash_cache(tmp_path / "cache" / "file-hashes.json").values()


def test_error_line_names_the_file_and_the_kind_of_os_error(tmp_path: Path) -> None:
    from codejepa.core import CodejepaError, error_line

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(FileExistsError) as e:
        blocker.mkdir()
    assert error_line(e.value) == f"{blocker}: a file is in the way (a folder was to be made here)"
    assert error_line(OSError("Can't synchronously read data")) == \
        "I/O error (Can't synchronously read data); a damaged file or a full disk?"
    assert error_line(CodejepaError("one line")) == "one line"


def test_a_file_in_the_way_of_an_output_folder_is_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from codejepa.cli import app

    sys.path.insert(0, str(Path(__file__).parent))
    from _predict_fixtures import make_store

    store = make_store(tmp_path / "s.h5")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    r = CliRunner().invoke(app, ["predict", "train", str(store), "--model", "mlp", "--out", str(blocker)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.output.strip() == f"error: {blocker}: a file is in the way (a folder was to be made here)"


def test_printable_shows_non_utf8_file_name_bytes_as_replacement_characters() -> None:
    name = os.fsdecode(b"bad\xffname.h5")  # how Python hands such a path over: a lone surrogate
    assert core.printable(name) == "bad\ufffdname.h5" and core.printable("plain.h5") == "plain.h5"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_title(core.printable(name))  # the raw name raises TypeError inside matplotlib
    plt.close(fig)


@pytest.mark.parametrize("task, transient, expected", [
    (False, False, ""), (True, True, ""), (True, False, "step"),
])
def test_progress_to_a_pipe_prints_no_stray_blank_line(task: bool, transient: bool, expected: str) -> None:
    # A command refused before its first step prints its error line right after its output.
    import io

    from rich.console import Console
    from rich.progress import TextColumn

    from codejepa.progress import Progress

    out = io.StringIO()
    with Progress(TextColumn("{task.description}"), console=Console(file=out, width=40), transient=transient) as bar:
        if task:
            bar.add_task("step", total=3)
    assert out.getvalue() == (f"{expected}\n" if expected else "")


def test_progress_to_a_file_writes_a_plain_line_now_and_then(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job in the background (output to a file) says where it is every ``line_every_s``; a
    terminal gets the bar alone."""
    import io

    from rich.console import Console
    from rich.progress import TextColumn

    from codejepa.progress import Progress

    monkeypatch.setattr(Progress, "line_every_s", 0.0)
    for interactive in (False, True):
        out = io.StringIO()
        console = Console(file=out, width=60, force_terminal=interactive, force_interactive=interactive)
        with Progress(TextColumn("{task.description}"), console=console, transient=True) as bar:
            job = bar.add_task("embedding", total=2)
            bar.advance(job)
            bar.update(job, description="writing", advance=1)
        if interactive:
            assert "1/2  00:00:00" not in out.getvalue()
        else:
            assert out.getvalue().splitlines() == ["embedding  1/2  00:00:00", "writing  2/2  00:00:00"]
    monkeypatch.setattr(Progress, "line_every_s", 3600.0)
    out = io.StringIO()
    with Progress(TextColumn("{task.description}"), console=Console(file=out, width=60), transient=True) as bar:
        bar.advance(bar.add_task("embedding", total=2))
    assert out.getvalue() == ""


def test_atomic_writes_honour_the_umask_like_files_written_in_place(tmp_path: Path) -> None:
    # mkstemp makes 0600 files: a shared corpus's manifest would be unreadable to a collaborator
    old = os.umask(0o022)
    try:
        core.atomic_write_json(tmp_path / "a.json", {"x": 1})
        (tmp_path / "b.txt").write_text("x")
        os.umask(0o077)
        core.atomic_write_bytes(tmp_path / "c.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c.bin").stat().st_mode & 0o777 == 0o600


def test_a_failed_atomic_write_leaves_no_temp_file_behind(tmp_path: Path) -> None:
    """A write that fails at the rename (here: a folder in the way) must not leave its hidden
    temp file: resumed runs retry, and each try would leave one more (a store-sized one for a checkpoint)."""
    (tmp_path / "out.json").mkdir()
    (tmp_path / "out.json" / "keep").write_text("x")
    with pytest.raises(OSError):
        core.atomic_write_json(tmp_path / "out.json", {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_json_file_of_another_shape_is_one_error_line(tmp_path: Path) -> None:
    """A run's config.json holding a list (hand-edited, or another tool's file) is refused in one line
    that says what to do, instead of a traceback from the code that reads its keys."""
    p = tmp_path / "config.json"
    p.write_text("[1, 2]")
    with pytest.raises(core.CodejepaError, match=r"a damaged run config \(not a JSON object\); start anew") as e:
        core.read_json_object(p, "run config", core.CodejepaError, "start anew")
    assert "\n" not in str(e.value)


def test_exclusive_refuses_a_second_holder_at_once(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    with core.exclusive(lock, "the run"):
        with pytest.raises(core.Busy, match="the run is being written by another process"):
            with core.exclusive(lock, "the run"):
                pass
    with core.exclusive(lock, "the run"):  # released
        pass


def test_positive_int_refuses_what_a_bench_cannot_measure() -> None:
    import argparse

    assert core.positive_int("3") == 3
    for bad in ("0", "-5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            core.positive_int(bad)


def test_commands_without_ranks_are_refused_under_torchrun(tmp_path: Path) -> None:
    """Under torchrun every rank runs the command line: an evaluation would write one --out twice
    at once, a merge race for its lock. Only the commands that share a job between ranks run."""
    import subprocess

    from codejepa.cli import one_process_only

    torchrun = {"WORLD_SIZE": "2", "RANK": "1"}
    assert [core.torchrun_ranks(e) for e in ({}, {"WORLD_SIZE": "1"}, {"WORLD_SIZE": "0"}, {"WORLD_SIZE": "x"},
                                             {"WORLD_SIZE": " 4 "})] == [1, 1, 1, 1, 4]
    for argv in (["embed", "run", "c", "--out", "s.h5"], ["predict", "train", "s.h5"], ["predict", "cross", "s.h5"],
                 ["embed", "probe", "s.h5"], ["--help"], ["evaluate", "--help"]):
        assert one_process_only(argv, torchrun) is None, argv
    for argv in (["evaluate", "retrieval", "s.h5"], ["embed", "merge", "a.h5", "--out", "s.h5"], ["corpus", "build", "x"]):
        assert one_process_only(argv, {}) is None and one_process_only(argv, {"WORLD_SIZE": "1"}) is None
        assert f"`codejepa {argv[0]} {argv[1]}` runs in one process" in one_process_only(argv, torchrun)
    exe = Path(sys.executable).with_name("codejepa")
    r = subprocess.run([str(exe), "evaluate", "retrieval", str(tmp_path / "s.h5"), "--out", str(tmp_path / "e")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, **torchrun})
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: `codejepa evaluate retrieval` runs in one process, not once per torchrun rank (WORLD_SIZE=2); "
        "start it without torchrun"], r.stderr
    assert not (tmp_path / "e").exists()
