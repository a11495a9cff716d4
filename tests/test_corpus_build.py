"""End to end: fixture git repos → corpus folder → load_records; resume; CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from _corpus_fixtures import EXPECTED_MAIN, GIT_ENV, fixture_files, make_repo
from typer.testing import CliRunner

from codejepa.core import CodejepaError
from codejepa.corpus import CorpusError, load_records, read_manifest
from codejepa.corpus.records import corpus_fingerprint
from codejepa.corpus.build import STATE_FILE, BuildObserver, BuildSettings, build_corpus
from codejepa.corpus.split import DROP_TRAIN_DUPLICATE, DROP_TRIVIAL, assign_split


def names_in(split: str, n: int, seed: int = 0) -> list[str]:
    out = [f"proj{i}" for i in range(1000) if assign_split(f"proj{i}", seed) == split]
    return out[:n]


@pytest.fixture()
def fixture_repo(tmp_path: Path) -> tuple[Path, str]:
    repo = tmp_path / "src" / names_in("train", 1)[0]
    commit = make_repo(repo, fixture_files())
    return repo, commit


def git_show(repo: Path, commit: str, path: str) -> bytes:
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"{commit}:{path}"], env=GIT_ENV, check=True, capture_output=True
    ).stdout


def test_build_fixture_repo_end_to_end(fixture_repo: tuple[Path, str], tmp_path: Path) -> None:
    repo, commit = fixture_repo
    out = tmp_path / "corpus"
    res = build_corpus([repo.as_uri()], out)
    assert res.ok
    m = read_manifest(out)
    assert m["format"] == "codejepa-corpus" and m["format_version"] == 1
    (entry,) = m["repos"]
    assert entry["status"] == "ok" and entry["commit"] == commit and entry["url"] == repo.as_uri()
    assert entry["split"] == "train" and entry["records_file"].startswith("repos/")
    skipped = {s["path"]: s["reason"] for s in entry["skipped"]}
    assert "binary" in skipped["pkg/binary.py"]
    assert "does not decode" in skipped["pkg/latin1_undeclared.py"]
    assert "leaves the repository" in skipped["pkg/link_outside.py"]
    assert skipped["pkg/link_inside.py"].startswith("symlink")
    assert "README.md" not in skipped
    assert entry["files"] == 8  # .py files parsed (the 5 above are skipped)
    assert entry["files_with_syntax_errors"] == 1 and entry["functions_with_errors"] == 1
    assert m["settings"]["seed"] == 0 and m["totals"]["functions"] == entry["functions"]

    recs = list(load_records(out, include_dropped=True))
    assert len(recs) == entry["functions"] == len({r.id for r in recs})
    main = {r.qualname: r for r in recs if r.path == "pkg/main.py"}
    assert {q: (r.def_line, r.is_async) for q, r in main.items()} == EXPECTED_MAIN
    assert {r.qualname for r in recs if r.path == "pkg/broken.py"} == {"good_before", "good_after"}
    assert {r.qualname for r in recs if r.path == "pkg/latin1_declared.py"} == {"café", "after"}
    # Every span round-trips byte-exactly against the file at the commit.
    blobs: dict[str, bytes] = {}
    for r in recs:
        data = blobs.setdefault(r.path, git_show(repo, commit, r.path))
        enc = "latin-1" if "latin1" in r.path else "utf-8"
        assert r.commit == commit and r.split == "train" and r.repo == repo.name
        assert data[r.signature_span.start : r.signature_span.end].decode(enc) == r.signature
        assert data[r.body_span.start : r.body_span.end].decode(enc) == r.body
        for p in r.context:
            assert data[p.span.start : p.span.end].decode(enc) == p.text
    tests = {r.qualname for r in recs if r.is_test}
    assert tests == {"test_something", "helper", "TestThing.check"}
    # Train keeps one copy of duplicate bodies only; load_records applies the manifest.
    assert {r.id for r in load_records(out)} == {r.id for r in recs} - set(m["dropped"])


def test_workers_give_identical_output(fixture_repo: tuple[Path, str], tmp_path: Path) -> None:
    repo, _ = fixture_repo
    other = tmp_path / "src" / "other"
    make_repo(other, {f"m{i}.py": "".join(f"def f{j}():\n    return {i * 100 + j}\n" for j in range(50)) for i in range(30)})
    one = build_corpus([str(repo), str(other)], tmp_path / "one", BuildSettings(workers=1))
    two = build_corpus([str(repo), str(other)], tmp_path / "two", BuildSettings(workers=2))
    for a, b in zip(one.repos, two.repos):
        assert (tmp_path / "one" / a["records_file"]).read_bytes() == (tmp_path / "two" / b["records_file"]).read_bytes()
    assert one.manifest["dropped"] == two.manifest["dropped"] and one.manifest["totals"] == two.manifest["totals"]


def test_exclude_tests(fixture_repo: tuple[Path, str], tmp_path: Path) -> None:
    repo, _ = fixture_repo
    res = build_corpus([str(repo)], tmp_path / "c", BuildSettings(exclude_tests=True))
    recs = list(load_records(tmp_path / "c", include_dropped=True))
    assert recs and not any(r.is_test for r in recs)
    assert res.repos[0]["tests_excluded"] == 3 and res.repos[0]["test_functions"] == 0


def test_held_out_duplicates_of_train_and_trivial_bodies_are_dropped(tmp_path: Path) -> None:
    (train_name,) = names_in("train", 1)
    (test_name,) = names_in("test", 1)
    shared = "def shared(x):\n    return x * 1234 + 1\n"
    train = tmp_path / train_name
    test = tmp_path / test_name
    make_repo(train, {"a.py": shared})
    make_repo(test, {"b.py": "def renamed(x):\n    # same body, other comment\n    return x*1234 + 1\n\n"
                     "def stub():\n    pass\n\ndef unique():\n    return 'only here'\n"})
    res = build_corpus([str(test), str(train)], tmp_path / "c")
    by_split = {r["name"]: r["split"] for r in res.repos}
    assert by_split == {train_name: "train", test_name: "test"}
    dropped = res.manifest["dropped"]
    recs = {r.qualname: r for r in load_records(tmp_path / "c", include_dropped=True)}
    assert dropped[recs["renamed"].id] == DROP_TRAIN_DUPLICATE
    assert dropped[recs["stub"].id] == DROP_TRIVIAL
    assert [r.qualname for r in load_records(tmp_path / "c", ["test"])] == ["unique"]
    assert res.manifest["totals"]["dropped"] == {DROP_TRAIN_DUPLICATE: 1, DROP_TRIVIAL: 1}
    # Per-split counts before and after the filter, and the trivial count of each repo.
    assert res.manifest["totals"]["functions_per_split"] == {"train": 1, "test": 3}
    assert res.manifest["totals"]["kept_per_split"] == {"train": 1, "test": 1}
    assert {r["name"]: r["trivial_functions"] for r in res.repos} == {train_name: 0, test_name: 1}
    kept = build_corpus([str(test), str(train)], tmp_path / "k", BuildSettings(keep_trivial=True))
    assert [r.qualname for r in load_records(tmp_path / "k", ["test"])] == ["stub", "unique"]
    assert kept.manifest["totals"]["kept_per_split"]["test"] == 2


def test_train_only_sources_join_train_and_move_nothing_else(tmp_path: Path) -> None:
    # An extra repository whose hash would put it in test is pinned to train; the held-out
    # repository keeps its split, and its body that also occurs in the extra code is dropped.
    (test_name, extra_name) = names_in("test", 2)
    test, extra = tmp_path / test_name, tmp_path / extra_name
    make_repo(test, {"b.py": "def copied(x):\n    return x * 4321 - 7\n\ndef unique():\n    return 'only here'\n"})
    make_repo(extra, {"e.py": "def original(x):\n    return x * 4321 - 7\n\ndef more():\n    return [1, 2, 3]\n"})
    plain = build_corpus([str(test), str(extra)], tmp_path / "plain")
    assert {r["name"]: r["split"] for r in plain.repos} == {test_name: "test", extra_name: "test"}

    extra_file = tmp_path / "extra.txt"
    extra_file.write_text(f"{extra.as_uri()}\n")
    out = tmp_path / "plus"
    r = run_cli("build", str(test), "--train-only-file", str(extra_file), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "(pinned)" in r.output
    man = read_manifest(out)
    by_name = {e["name"]: e for e in man["repos"]}
    assert by_name[test_name]["split"] == "test" and not by_name[test_name]["train_only"]
    assert by_name[extra_name]["split"] == "train" and by_name[extra_name]["train_only"]
    assert [r.qualname for r in load_records(out, ["train"])] == ["original", "more"]
    assert [r.qualname for r in load_records(out, ["test"])] == ["unique"]
    assert man["totals"]["dropped"] == {DROP_TRAIN_DUPLICATE: 1}
    # The same pin resumes both repositories; dropping the pin moves the extra one back to
    # its own split, which is a different corpus.
    again = build_corpus([str(test)], out, train_only_file=extra_file)
    assert {e["name"]: (e["split"], e.get("resumed")) for e in again.repos} == {test_name: ("test", True),
                                                                               extra_name: ("train", True)}
    assert corpus_fingerprint(again.manifest) == corpus_fingerprint(man)
    listed = build_corpus([str(test)], tmp_path / "listed", train_only=[str(extra)])  # the API's list form
    assert {e["name"]: e["split"] for e in listed.repos} == {test_name: "test", extra_name: "train"}
    assert listed.manifest["totals"]["dropped"] == {DROP_TRAIN_DUPLICATE: 1}
    unpinned = build_corpus([str(test), str(extra)], out)
    assert {e["name"]: (e["split"], e.get("resumed", False)) for e in unpinned.repos} == {
        test_name: ("test", True), extra_name: ("test", False)}
    assert corpus_fingerprint(unpinned.manifest) != corpus_fingerprint(man)


def test_resume_skips_done_repos_and_redoes_changed_ones(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_repo(a, {"a.py": "def fa():\n    return 1\n"})
    make_repo(b, {"b.py": "def fb():\n    return 2\n"})
    out = tmp_path / "c"
    first = build_corpus([str(a), b.as_uri()], out)
    files = {r["name"]: out / r["records_file"] for r in first.repos}
    stamps = {n: p.stat().st_mtime_ns for n, p in files.items()}
    again = build_corpus([str(a), b.as_uri()], out, BuildSettings(workers=2))
    assert [r.get("resumed") for r in again.repos] == [True, True]
    assert {n: p.stat().st_mtime_ns for n, p in files.items()} == stamps
    # Later stages key on the fingerprint: a resumed build (other speed settings, other
    # timings and resume flags in the manifest) is the same corpus; new content is not.
    assert corpus_fingerprint(again.manifest) == corpus_fingerprint(first.manifest)
    new_commit = make_repo(b, {"b.py": "def fb2():\n    return 3\n"})
    third = build_corpus([str(a), b.as_uri()], out)
    assert [r.get("resumed", False) for r in third.repos] == [True, False]
    assert third.repos[1]["commit"] == new_commit
    assert {r.qualname for r in load_records(out)} == {"fa", "fb2"}
    assert corpus_fingerprint(third.manifest) != corpus_fingerprint(first.manifest)
    # Different extraction settings: nothing is reused.
    fourth = build_corpus([str(a), b.as_uri()], out, BuildSettings(max_siblings=3))
    assert not any(r.get("resumed") for r in fourth.repos)


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_resume_rebuilds_a_repo_whose_finished_output_is_damaged(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_repo(a, {"a.py": "".join(f"def fa{i}():\n    return {i}\n\n" for i in range(3))})
    make_repo(b, {"b.py": "def fb():\n    return 'b'\n"})
    out = tmp_path / "c"
    first = build_corpus([str(a), str(b)], out)
    rec_a, idx_a = (out / first.repos[0][k] for k in ("records_file", "index_file"))
    whole = rec_a.read_bytes()
    # Cut mid-line, cut at a line boundary (still parses), and an index cut short: each one
    # is rebuilt with a note; the intact repo is still resumed.
    for damage in (lambda: _cut(rec_a, 40), lambda: _cut(rec_a, whole.index(b"\n") + 1), lambda: _cut(idx_a, 10)):
        damage()
        again = build_corpus([str(a), str(b)], out)
        assert [r.get("resumed", False) for r in again.repos] == [False, True]
        assert any(m.startswith(f"note: {a}: finished output is damaged, rebuilding it") for m in again.messages)
        assert rec_a.read_bytes() == whole
        assert {r.qualname for r in load_records(out)} == {"fa0", "fa1", "fa2", "fb"}


def test_damaged_corpus_files_are_one_clear_error(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    make_repo(repo, {"m.py": "".join(f"def f{i}():\n    return {i}\n\n" for i in range(3))})
    out = tmp_path / "c"
    entry = build_corpus([str(repo)], out).repos[0]
    rec = out / entry["records_file"]
    whole = rec.read_bytes()
    second_line = whole.index(b"\n") + 1
    _cut(rec, second_line + 20)  # the second record is cut short
    with pytest.raises(CorpusError, match=rf"{rec.name}:2: damaged records file"):
        list(load_records(out))
    _cut(rec, second_line)  # cut at a line boundary: parses, but is not what the build wrote
    with pytest.raises(CorpusError, match="1 records, the build wrote 3"):
        list(load_records(out))
    rec.write_bytes(b"\xff\xfe" + whole)
    with pytest.raises(CorpusError, match="unreadable records file"):
        list(load_records(out))
    rec.unlink()
    with pytest.raises(CorpusError, match="records file missing"):
        list(load_records(out))
    rec.write_bytes(whole)
    manifest = out / "manifest.json"
    good = manifest.read_text()
    for text, why in (("[1, 2]", "a JSON list, not an object"), ('{"format": "codejepa-corpus"}', "no 'repos'"),
                      ('{"format": "codejepa-corpus", "repos": {}}', "'repos' is not a JSON array"),
                      ('{"format": "codejepa-corpus", "repos": [1]}', "a 'repos' entry is not an object")):
        manifest.write_text(text)
        with pytest.raises(CorpusError, match=f"damaged corpus manifest \\({why}\\); rebuild"):
            list(load_records(out))
        r = run_cli("info", str(out))
        assert r.exit_code == 1 and "damaged corpus manifest" in r.output and "Traceback" not in r.output
    m = json.loads(good)
    del m["totals"]
    manifest.write_text(json.dumps(m))
    assert len(list(load_records(out))) == 3  # the readers of records do not need the totals
    r = run_cli("info", str(out))  # the summary does
    assert r.exit_code == 1 and "no 'totals'" in r.output


class _Interrupt(BuildObserver):
    def on_repo_done(self, entry: dict) -> None:
        if entry["status"] == "ok" and not entry.get("resumed"):  # after one newly built repo
            raise KeyboardInterrupt


def test_interrupted_run_leaves_no_half_corpus_and_resumes(tmp_path: Path) -> None:
    repos = []
    for i in range(3):
        r = tmp_path / f"r{i}"
        make_repo(r, {"m.py": f"def f{i}():\n    return {i}\n"})
        repos.append(str(r))
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        build_corpus(repos, out, BuildSettings(clone_jobs=1), observer=_Interrupt())
    # No manifest yet: nothing reads as a valid (partial) corpus.
    with pytest.raises(CodejepaError):
        list(load_records(out))
    assert (out / STATE_FILE).is_file()
    assert not list((out / "repos").glob(".*.tmp"))
    done = json.loads((out / STATE_FILE).read_text())["repos"]
    assert len(done) == 1
    # Interrupted again, in another order, before r0 comes round: r0 is still remembered.
    with pytest.raises(KeyboardInterrupt):
        build_corpus(repos[1:] + repos[:1], out, BuildSettings(clone_jobs=1), observer=_Interrupt())
    assert len(json.loads((out / STATE_FILE).read_text())["repos"]) == 2
    res = build_corpus(repos, out)
    assert sum(bool(r.get("resumed")) for r in res.repos) == 2
    assert {r.qualname for r in load_records(out, include_dropped=True)} == {"f0", "f1", "f2"}
    assert not (out / STATE_FILE).exists()


def test_ref_pin_and_bad_inputs_do_not_stop_the_run(tmp_path: Path) -> None:
    repo = tmp_path / "pinned"
    old = make_repo(repo, {"m.py": "def old():\n    return 1\n"})
    make_repo(repo, {"m.py": "def new():\n    return 2\n"})
    empty = tmp_path / "empty"
    empty.mkdir()
    subprocess.run(["git", "-C", str(empty), "init", "-q"], env=GIT_ENV, check=True)
    res = build_corpus(
        [f"{repo.as_uri()}@{old}", str(empty), "file:///no/such/repo", "https://x.invalid/repo@bad..ref"],
        tmp_path / "c",
    )
    statuses = {r["source"]: r["status"] for r in res.repos}
    assert statuses == {f"{repo.as_uri()}@{old}": "ok", str(empty): "empty repository",
                        "file:///no/such/repo": "failed", "https://x.invalid/repo@bad..ref": "invalid source"}
    assert next(r for r in res.repos if r["status"] == "ok")["commit"] == old
    assert [r.qualname for r in load_records(tmp_path / "c", include_dropped=True)] == ["old"]
    assert all("\n" not in m for m in res.messages)


def test_unpinning_a_repository_rebuilds_it_in_its_own_split(tmp_path: Path) -> None:
    """A repository built as train-only and then given as a plain source (the same spec) changes
    split: its finished records (written with split "train") must not be resumed."""
    (name,) = names_in("test", 1)
    repo = tmp_path / name
    make_repo(repo, {"m.py": "def f():\n    return 1\n"})
    out = tmp_path / "c"
    pinned = build_corpus([], out, train_only=[str(repo)])
    assert [e["split"] for e in pinned.repos] == ["train"]
    plain = build_corpus([str(repo)], out)
    assert [(e["split"], e.get("resumed", False)) for e in plain.repos] == [("test", False)]
    assert [r.split for r in load_records(out, include_dropped=True)] == ["test"]


def test_workers_keep_file_order_when_a_repo_spans_many_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks parsed by several workers finish in any order; the records file must still be in
    (path, position) order, the same bytes as a one-process build."""
    import codejepa.corpus.build as build_mod

    repo = tmp_path / "many"
    make_repo(repo, {f"m{i:02d}.py": f"def f{i}():\n    return {i}\n\ndef g{i}():\n    return -{i}\n" for i in range(24)})
    monkeypatch.setattr(build_mod, "CHUNK_BYTES", 1)  # one file per chunk
    one = build_corpus([str(repo)], tmp_path / "one", BuildSettings(workers=1))
    two = build_corpus([str(repo)], tmp_path / "two", BuildSettings(workers=2))
    recs = [(r.path, r.signature_span.start) for r in load_records(tmp_path / "two", include_dropped=True)]
    assert recs == sorted(recs) and len(recs) == 48
    assert (tmp_path / "one" / one.repos[0]["records_file"]).read_bytes() == \
        (tmp_path / "two" / two.repos[0]["records_file"]).read_bytes()


def test_a_folder_that_is_not_a_corpus_is_refused_untouched(tmp_path: Path) -> None:
    """``--out`` naming a non-empty folder that holds no corpus (a typo, a source tree) is refused
    before anything is written into it."""
    repo = tmp_path / "r"
    make_repo(repo, {"m.py": "def f():\n    return 1\n"})
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CodejepaError, match="is not a corpus; choose another"):
        build_corpus([str(repo)], out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # a project folder that happens to hold a repos/ (of git checkouts, say) is no corpus either
    (out / "repos" / "checkout").mkdir(parents=True)
    with pytest.raises(CodejepaError, match="is not a corpus; choose another"):
        build_corpus([str(repo)], out)
    assert sorted(p.name for p in out.rglob("*")) == ["checkout", "notes.txt", "repos"]
    # what a build killed before its first state file leaves is resumed
    remains = tmp_path / "killed"
    (remains / "repos").mkdir(parents=True)
    (remains / "repos" / ".x.jsonl.tmp").write_text("")
    assert build_corpus([str(repo)], remains).manifest["totals"]["kept_per_split"]


def test_missing_out_parent_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CodejepaError, match="parent folder"):
        build_corpus(["x"], tmp_path / "no" / "such" / "out")


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str):  # noqa: ANN202
    from codejepa.cli import app

    return CliRunner().invoke(app, ["corpus", *args])


def test_cli_build_and_exit_codes(fixture_repo: tuple[Path, str], tmp_path: Path) -> None:
    repo, _ = fixture_repo
    repos_file = tmp_path / "repos.txt"
    repos_file.write_text(f"# my corpus\n{repo.as_uri()}\n")
    out = tmp_path / "c"
    r = run_cli("build", "--repos-file", str(repos_file), "--out", str(out), "--workers", "2", "--seed", "0")
    assert r.exit_code == 0, r.output
    assert "functions" in r.output and repo.name in r.output
    assert read_manifest(out)["repos"][0]["status"] == "ok"
    assert {"python", "tree-sitter", "tree-sitter-python"} <= set(read_manifest(out)["versions"])
    r = run_cli("info", str(out))
    assert r.exit_code == 0 and repo.name in r.output
    entry = read_manifest(out)["repos"][0]
    for key in ("records_file", "index_file"):  # a lost file is shown, and the build brings it back
        (out / entry[key]).unlink()
        r = run_cli("info", str(out))
        assert r.exit_code == 1 and "files missing" in r.output and entry[key] in r.output, r.output
        r = run_cli("build", "--repos-file", str(repos_file), "--out", str(out), "--workers", "2", "--seed", "0")
        assert r.exit_code == 0 and run_cli("info", str(out)).exit_code == 0, r.output
    # A records file cut short (a bad copy) reads as valid JSON Lines: info re-reads it against the
    # count the build recorded, as a resumed build does, instead of calling the repository "ok".
    records = out / entry["records_file"]
    lines = records.read_text().splitlines(keepends=True)
    records.write_text("".join(lines[: len(lines) // 2]))
    r = run_cli("info", str(out))
    assert r.exit_code == 1 and "files damaged" in r.output and "not read back as built" in r.output, r.output
    assert f"{len(lines) // 2} records, the build wrote {len(lines)}" in r.output
    r = run_cli("build", "--repos-file", str(repos_file), "--out", str(out), "--workers", "2", "--seed", "0")
    assert r.exit_code == 0 and run_cli("info", str(out)).exit_code == 0, r.output

    # Nothing could be built: non-zero, one line per bad source.
    r = run_cli("build", "ext::sh -c id", "/no/such/repo", "--out", str(tmp_path / "bad"))
    assert r.exit_code == 1
    assert "transport helpers" in r.output and "no repository could be built" in r.output
    # Missing --out parent and missing repos file.
    r = run_cli("build", str(repo), "--out", str(tmp_path / "no" / "parent"))
    assert r.exit_code == 1 and "parent folder" in r.output
    assert r.output.strip().startswith("error:"), r.output  # one line: no empty progress bars above it
    # A list that cannot be read stops the build before anything is written: built without its
    # list, the corpus would replace the one there.
    before = (out / "manifest.json").read_bytes()
    for flag in ("--repos-file", "--train-only-file"):
        r = run_cli("build", str(repo), flag, str(tmp_path / "nope.txt"), "--out", str(out))
        assert r.exit_code == 1 and f"{flag}: repos file" in r.output and "does not exist; nothing was built" in r.output
    r = run_cli("build", "/no/such/repo", "--out", str(out))  # every source fails: the corpus there is kept
    assert r.exit_code == 1 and "kept as it was" in r.output
    assert (out / "manifest.json").read_bytes() == before
    assert run_cli("info", str(out)).exit_code == 0 and any(load_records(out))  # and its records still read
    r = run_cli("build", "--out", str(tmp_path / "c3"))
    assert r.exit_code == 1 and "nothing to build" in r.output
    assert "Traceback" not in r.output


def test_a_source_that_fails_is_an_error_at_the_end_and_a_dropped_one_leaves_no_files(
        fixture_repo: tuple[Path, str], tmp_path: Path) -> None:
    """A corpus that lacks a listed source must not pass for whole in a script (a benchmark
    would go on without it); a repository dropped from the list leaves no records file that
    `grep`/`jq` over repos/ would count; a source that fails this time keeps its files."""
    repo, _ = fixture_repo
    other = tmp_path / "other"
    make_repo(other, {"o.py": "def o():\n    return 0\n"})
    out = tmp_path / "c"
    assert run_cli("build", str(repo), str(other), "--out", str(out)).exit_code == 0
    files = sorted(p.name for p in (out / "repos").iterdir())
    gone = tmp_path / "other.gone"
    other.rename(gone)
    r = run_cli("build", str(repo), str(other), "--out", str(out))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"error: 1 of 2 sources were not built: {other} (invalid source)" in " ".join(r.output.split())
    assert sorted(p.name for p in (out / "repos").iterdir()) == files  # kept until it builds again or is dropped
    r = run_cli("build", str(repo), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "repos").iterdir()) == sorted(
        Path(read_manifest(out)["repos"][0][k]).name for k in ("records_file", "index_file"))


def test_two_sources_of_one_name_build_the_first_and_say_how_to_build_both(fixture_repo: tuple[Path, str],
                                                                            tmp_path: Path) -> None:
    repo, _ = fixture_repo
    other = tmp_path / "fork" / repo.name
    make_repo(other, {"m.py": "def g(x):\n    return x * 2\n"})
    res = build_corpus([str(repo), str(other)], tmp_path / "c")
    statuses = [r["status"] for r in res.manifest["repos"]]
    assert statuses == ["ok", "duplicate"]
    assert any("give a local copy a folder of another name" in m for m in res.messages)
    # which of the two is built follows their order: the command ends in an error naming the other
    r = run_cli("build", str(repo), str(other), "--out", str(tmp_path / "c"))
    assert r.exit_code == 1 and f"1 of 2 sources were not built: {other} (duplicate)" in " ".join(r.output.split())


def test_a_bad_source_whose_path_looks_like_markup_is_text(fixture_repo: tuple[Path, str], tmp_path: Path) -> None:
    """The progress line shows each source's name; a path like ``src/[/nope]`` raised rich's
    MarkupError there and lost the whole build."""
    repo, _ = fixture_repo
    r = run_cli("build", str(tmp_path / "[/nope]"), str(repo), "--out", str(tmp_path / "c"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)  # not rich's MarkupError
    assert "[/nope]" in r.output and read_manifest(tmp_path / "c")["totals"]["repos_ok"] == 1
    r = run_cli("build", str(tmp_path / "[/a]"), str(tmp_path / "[/b]"), "--out", str(tmp_path / "c"))
    assert r.exit_code == 1 and "no repository could be built" in r.output and "[/a]" in r.output.split("error:")[-1]


def test_a_source_given_both_ways_goes_to_train(tmp_path: Path) -> None:
    repo = tmp_path / "src" / names_in("test", 1)[0]  # its hash sends it to test
    make_repo(repo, fixture_files())
    res = build_corpus([str(repo)], tmp_path / "c", train_only=[str(repo)])
    (entry,) = res.manifest["repos"]
    assert entry["status"] == "ok" and entry["split"] == "train" and entry["train_only"]
    assert any("given both as a source and as train-only" in m for m in res.messages)


def test_load_records_takes_one_split_name_and_refuses_unknown_ones(fixture_repo: tuple[Path, str],
                                                                     tmp_path: Path) -> None:
    repo, _ = fixture_repo
    build_corpus([str(repo)], tmp_path / "c")
    assert len(list(load_records(tmp_path / "c", "train"))) == len(list(load_records(tmp_path / "c", ["train"]))) > 0
    with pytest.raises(CorpusError, match="unknown split 'tst'"):
        list(load_records(tmp_path / "c", ["tst"]))


def test_the_same_sources_in_another_order_are_the_same_corpus(tmp_path: Path) -> None:
    """The store embeds records in manifest order and the corpus fingerprint covers it: sources
    listed in another order must give the same manifest order and fingerprint (a store of one was
    refused against the other, and training batches followed the command line)."""
    a, b = tmp_path / "alpha", tmp_path / "beta"
    make_repo(a, {"a.py": "def fa():\n    return 1\n"})
    make_repo(b, {"b.py": "def fb():\n    return 2\n"})
    one = build_corpus([str(b), str(a)], tmp_path / "one")
    two = build_corpus([str(a), str(b)], tmp_path / "two")
    assert [r["name"] for r in one.manifest["repos"]] == [r["name"] for r in two.manifest["repos"]] == ["alpha", "beta"]
    assert corpus_fingerprint(one.manifest) == corpus_fingerprint(two.manifest)
    assert [r.id for r in load_records(tmp_path / "one", include_dropped=True)] == \
        [r.id for r in load_records(tmp_path / "two", include_dropped=True)]
