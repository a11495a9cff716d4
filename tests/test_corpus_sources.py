"""Source strings are untrusted; archives are unpacked safely; files are read at the commit."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from _corpus_fixtures import git, make_repo

from codejepa.corpus import sources as src
from codejepa.corpus.build import BuildSettings, build_corpus


@pytest.mark.parametrize(
    "spec, url, ref, name",
    [
        ("https://github.com/psf/requests.git", "https://github.com/psf/requests.git", None, "github.com/psf/requests"),
        ("https://github.com/psf/requests@v2.32.3", "https://github.com/psf/requests", "v2.32.3", "github.com/psf/requests"),
        ("ssh://git@github.com/psf/requests.git@main", "ssh://git@github.com/psf/requests.git", "main", "github.com/psf/requests"),
        ("git@github.com:psf/requests.git", "git@github.com:psf/requests.git", None, "github.com/psf/requests"),
        ("git@github.com:psf/requests.git@release/1.0", "git@github.com:psf/requests.git", "release/1.0", "github.com/psf/requests"),
        ("git://example.org/proj", "git://example.org/proj", None, "example.org/proj"),
        ("file:///srv/repos/flask", "file:///srv/repos/flask", None, "flask"),
        ("file:///srv/repos/flask.git@abc123", "file:///srv/repos/flask.git", "abc123", "flask"),
    ],
)
def test_accepted_sources(spec: str, url: str, ref: str | None, name: str) -> None:
    s = src.parse_source(spec)
    assert (s.kind, s.url, s.ref, s.name) == ("git", url, ref, name)
    assert "/" not in s.key and s.key


def test_pypi_and_local_sources(tmp_path: Path) -> None:
    s = src.parse_source("pypi:Foo_Bar==1.2.3")
    assert (s.kind, s.url, s.name) == ("pypi", "pypi:foo-bar==1.2.3", "foo-bar")
    repo = tmp_path / "myrepo"
    make_repo(repo, {"a.py": "x = 1\n"})
    s = src.parse_source(str(repo))
    assert (s.kind, s.url, s.ref, s.name) == ("git", str(repo), None, "myrepo")
    s = src.parse_source(f"{repo}@main")
    assert (s.url, s.ref) == (str(repo), "main")
    s = src.parse_source("myrepo", cwd=tmp_path)
    assert s.url == str(repo)


@pytest.mark.parametrize(
    "spec, why",
    [
        ("ext::sh -c touch% /tmp/x", "transport helpers"),
        ("fd::17", "transport helpers"),
        ("--upload-pack=touch /tmp/x", "option"),
        ("-oProxyCommand=touch /tmp/x", "option"),
        ("ssh://-oProxyCommand=touch%20x/repo", "host"),
        ("ssh://host/-oProxyCommand=x", "option"),
        ("http://example.org/repo.git", "not allowed"),
        ("ftp://example.org/repo.git", "not allowed"),
        ("ext://sh -c touch", "not allowed"),
        ("https://example.org/repo\n--upload-pack=x", "control"),
        ("pypi:requests", "exact version"),
        ("pypi:requests>=2", "exact version"),
        ("https://example.org/repo@../../etc", "bad ref"),
        ("https://example.org/repo@-x", "bad ref"),
        ("/definitely/not/here", "no such local repository"),
        ("", "empty"),
    ],
)
def test_rejected_sources_get_one_clear_line(spec: str, why: str) -> None:
    with pytest.raises(src.SourceError) as e:
        src.parse_source(spec)
    msg = str(e.value)
    assert why in msg and "\n" not in msg


def test_local_folder_that_is_not_a_repo(tmp_path: Path) -> None:
    with pytest.raises(src.SourceError, match="not a git repository"):
        src.parse_source(str(tmp_path))


def test_hostile_sources_run_nothing_and_the_run_goes_on(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good = tmp_path / "good"
    make_repo(good, {"m.py": "def f():\n    return 1\n"})
    hostile = [
        f"ext::sh -c touch% {marker}",
        f"--upload-pack=touch {marker}",
        f"ssh://-oProxyCommand=touch%20{marker}/x",
        f"-oProxyCommand=touch {marker}",
        f"ext://sh -c touch {marker}",
    ]
    repos_file = tmp_path / "repos.txt"
    repos_file.write_text("\n".join(hostile[2:]) + "\n")
    res = build_corpus([*hostile[:2], str(good)], tmp_path / "out", BuildSettings(), repos_file=repos_file)
    assert not marker.exists()
    statuses = {r["source"]: r["status"] for r in res.repos}
    assert statuses[str(good)] == "ok"
    assert all(statuses[h] == "invalid source" for h in hostile)
    refusals = [m for m in res.messages if m.startswith("source ")]
    assert len(refusals) == len(hostile) and all("\n" not in m for m in res.messages)


def test_repos_file_comments_and_missing(tmp_path: Path) -> None:
    f = tmp_path / "r.txt"
    f.write_text("# header\nhttps://a.org/x  # trailing comment\n\n   \npypi:idna==3.10\n")
    assert src.read_repos_file(f) == ["https://a.org/x", "pypi:idna==3.10"]
    with pytest.raises(src.SourceError, match="does not exist"):
        src.read_repos_file(tmp_path / "nope.txt")


def test_files_are_read_at_the_commit_not_the_working_tree(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    first = make_repo(repo, {"a.py": "def old():\n    return 1\n", "big.py": "x = 1\n" * 50})
    second = make_repo(repo, {"a.py": "def new():\n    return 2\n"})
    (repo / "a.py").write_text("def dirty():\n    return 3\n")  # uncommitted
    (repo / "untracked.py").write_text("def u(): pass\n")
    for ref, expect in [(None, b"def new"), (first, b"def old"), ("main", b"def new")]:
        source = src.parse_source(str(repo) + (f"@{ref}" if ref else ""))
        snap = src.snapshot(source, tmp_path, max_file_bytes=100)
        assert snap.commit == (first if ref == first else second)
        files = dict(snap.files)
        assert set(files) == {"a.py"} and files["a.py"].startswith(expect)
        assert ("big.py", "over size limit (300 > 100 bytes)") in snap.skipped


def test_symlinks_and_submodule_entries_are_skipped_with_reasons(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    make_repo(repo, {"a.py": "x = 1\n", "in.py": "->a.py", "out.py": "->../../etc/x.py", "abs.py": "->/etc/x.py"})
    snap = src.snapshot(src.parse_source(str(repo)), tmp_path, max_file_bytes=10_000)
    reasons = dict(snap.skipped)
    assert [p for p, _ in snap.files] == ["a.py"]
    assert "leaves the repository" in reasons["out.py"] and "leaves the repository" in reasons["abs.py"]
    assert reasons["in.py"].startswith("symlink (-> a.py")


def test_a_submodule_and_a_link_to_the_parent_folder_are_skipped_with_their_reasons(tmp_path: Path) -> None:
    """A submodule (a gitlink entry) is named as such, not skipped silently; a symlink to ``..``
    itself leaves the repository as surely as one to ``../x``."""
    repo = tmp_path / "r"
    commit = make_repo(repo, {"a.py": "x = 1\n", "up.py": "->.."})
    git(repo, "update-index", "--add", "--cacheinfo", f"160000,{commit},vendor/lib")
    git(repo, "commit", "-q", "-m", "add a submodule entry")
    snap = src.snapshot(src.parse_source(str(repo)), tmp_path, max_file_bytes=10_000)
    reasons = dict(snap.skipped)
    assert [p for p, _ in snap.files] == ["a.py"]
    assert reasons["vendor/lib"] == "submodule (not followed)"
    assert "leaves the repository" in reasons["up.py"]


def test_empty_repository_and_missing_ref(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    with pytest.raises(src.EmptyRepository):
        src.snapshot(src.parse_source(str(empty)), tmp_path, max_file_bytes=10)
    repo = tmp_path / "r"
    make_repo(repo, {"a.py": "x = 1\n"})
    with pytest.raises(src.SourceError, match="not found"):
        src.snapshot(src.parse_source(f"{repo}@nosuchbranch"), tmp_path, max_file_bytes=10)


def _delete_object(repo: Path, sha: str) -> None:
    (repo / ".git" / "objects" / sha[:2] / sha[2:]).unlink()


def test_a_missing_source_repository_says_why(tmp_path: Path) -> None:
    # git's only stderr line comes prefixed with "stderr:" by GitPython: it is the reason.
    with pytest.raises(src.SourceError, match=r"git failed: fatal: repository .* does not exist"):
        src.snapshot(src.parse_source((tmp_path / "nope").as_uri()), tmp_path, max_file_bytes=10)


def test_a_repository_whose_objects_are_gone_is_broken_not_empty(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    make_repo(repo, {"a.py": "x = 1\n"})
    for d in (repo / ".git" / "objects").iterdir():
        if len(d.name) == 2:  # the loose objects, the commit among them
            for f in d.iterdir():
                f.unlink()
    with pytest.raises(src.SourceError, match="broken repository: HEAD points to") as e:
        src.snapshot(src.parse_source(str(repo)), tmp_path, max_file_bytes=10)
    assert not isinstance(e.value, src.EmptyRepository)


def test_a_missing_blob_skips_its_file_and_keeps_the_rest(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    make_repo(repo, {"a.py": "def a():\n    return 1\n", "b.py": "def b():\n    return 2\n",
                     "c.py": "def c():\n    return 3\n", "link.py": "->gone.py"})
    _delete_object(repo, git(repo, "rev-parse", "HEAD:b.py"))
    _delete_object(repo, git(repo, "rev-parse", "HEAD:link.py"))
    snap = src.snapshot(src.parse_source(str(repo)), tmp_path, max_file_bytes=10_000)
    assert [p for p, _ in snap.files] == ["a.py", "c.py"]
    reasons = dict(snap.skipped)
    assert "missing or corrupt" in reasons["b.py"] and "missing or corrupt" in reasons["link.py"]
    # Through a build, the repository is kept with the file listed as skipped.
    res = build_corpus([str(repo)], tmp_path / "c")
    assert res.repos[0]["status"] == "ok" and res.repos[0]["functions"] == 2
    assert {s["path"] for s in res.repos[0]["skipped"]} == {"b.py", "link.py"}
    # ... and the console says so in one line, not only the manifest: again when it resumes.
    for run in (res, build_corpus([str(repo)], tmp_path / "c")):
        said = [m for m in run.messages if "unreadable" in m]
        assert len(said) == 1 and "2 files unreadable" in said[0] and "git fsck" in said[0], run.messages


def test_a_file_name_that_is_not_utf8_is_skipped_with_that_reason(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    latin1 = "caf\udce9.py"  # b"caf\xe9.py": a Latin-1 name, kept by Python as a lone surrogate
    make_repo(repo, {"a.py": "def a():\n    return 1\n", latin1: "def b():\n    return 2\n"})
    res = build_corpus([str(repo)], tmp_path / "c")
    entry = res.repos[0]
    assert entry["status"] == "ok" and entry["functions"] == 1
    assert [s["reason"] for s in entry["skipped"]] == ["file name is not valid UTF-8"]


# --------------------------------------------------------------------------- archives


def _tar_with(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = linkname
    ti.mode = mode
    return ti


def test_malicious_tar_is_unpacked_safely(tmp_path: Path) -> None:
    outside = tmp_path / "outside.py"
    archive = tmp_path / "evil-1.0.tar.gz"
    archive.write_bytes(
        _tar_with(
            [
                (_info("evil-1.0/ok.py"), b"def ok():\n    return 1\n"),
                (_info("evil-1.0/setup.py", mode=0o4755), b"raise SystemExit('never run')\n"),
                (_info("../outside.py"), b"pwned = 1\n"),
                (_info(str(outside)), b"pwned = 2\n"),
                (_info("evil-1.0/../../outside.py"), b"pwned = 3\n"),
                (_info("evil-1.0/link.py", tarfile.SYMTYPE, "/etc/passwd"), None),
                (_info("evil-1.0/hard.py", tarfile.LNKTYPE, "/etc/passwd"), None),
                (_info("evil-1.0/dev", tarfile.CHRTYPE), None),
                (_info("evil-1.0/fifo", tarfile.FIFOTYPE), None),
                (_info("evil-1.0/link.py/x.py"), b"y = 1\n"),
            ]
        )
    )
    dest = tmp_path / "dest"
    refused = dict(src.safe_unpack(archive, dest))
    assert not outside.exists()
    created = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*"))
    assert created == ["evil-1.0", "evil-1.0/link.py", "evil-1.0/link.py/x.py", "evil-1.0/ok.py", "evil-1.0/setup.py"]
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert (dest / "evil-1.0/setup.py").stat().st_mode & 0o7777 == 0o644  # no setuid/exec bits
    assert refused["../outside.py"] == "path outside the folder"
    assert refused[str(outside)] == "path outside the folder"
    assert refused["evil-1.0/../../outside.py"] == "path outside the folder"
    assert refused["evil-1.0/link.py"] == "link" and refused["evil-1.0/hard.py"] == "link"
    assert refused["evil-1.0/dev"] == "device or special file" and refused["evil-1.0/fifo"] == "device or special file"


def test_malicious_zip_is_unpacked_safely(tmp_path: Path) -> None:
    archive = tmp_path / "evil-1.0.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("evil-1.0/ok.py", "x = 1\n")
        zf.writestr("../escape.py", "x = 2\n")
        zf.writestr("/abs.py", "x = 3\n")
        link = zipfile.ZipInfo("evil-1.0/link.py")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
    dest = tmp_path / "dest"
    refused = dict(src.safe_unpack(archive, dest))
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["evil-1.0", "evil-1.0/ok.py"]
    assert set(refused) == {"../escape.py", "/abs.py", "evil-1.0/link.py"}
    assert not (tmp_path / "escape.py").exists()


def test_pypi_source_from_cache_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "sdists"
    cache.mkdir()
    marker = tmp_path / "setup-ran"
    archive = cache / "demo_pkg-0.1.tar.gz"
    archive.write_bytes(
        _tar_with(
            [
                (_info("demo_pkg-0.1/setup.py"), f"open({str(marker)!r}, 'w').write('ran')\n".encode()),
                (_info("demo_pkg-0.1/demo/core.py"), b"def answer():\n    return 42\n"),
                (_info("demo_pkg-0.1/demo/evil.py", tarfile.SYMTYPE, "../../../x.py"), None),
            ]
        )
    )
    monkeypatch.setenv("CODEJEPA_SDIST_CACHE", str(cache))
    monkeypatch.setenv("CODEJEPA_INDEX_URL", "https://invalid.invalid/simple")  # must not be needed
    res = build_corpus(["pypi:demo-pkg==0.1"], tmp_path / "out")
    (entry,) = res.repos
    assert entry["status"] == "ok", entry
    assert entry["commit"] == src.sha256_file(archive)
    assert entry["files"] == 2 and entry["functions"] == 1
    assert {"path": "demo_pkg-0.1/demo/evil.py", "reason": "archive member refused: link"} in entry["skipped"] or any(
        "link" in s["reason"] for s in entry["skipped"]
    )
    assert not marker.exists()
    # Resumable: the cached archive's sha256 is the commit.
    again = build_corpus(["pypi:demo-pkg==0.1"], tmp_path / "out")
    assert again.repos[0].get("resumed") is True


def test_pypi_source_that_cannot_be_fetched_fails_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEJEPA_SDIST_CACHE", str(tmp_path / "sdists"))
    monkeypatch.setenv("CODEJEPA_INDEX_URL", (tmp_path / "no-index").as_uri())
    res = build_corpus(["pypi:nothing-here==1.0"], tmp_path / "out")
    assert res.repos[0]["status"] == "failed" and not res.ok
    assert "\n" not in res.messages[0] and "nothing-here" in res.messages[0]


@pytest.mark.slow
def test_pypi_download_from_the_real_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEJEPA_SDIST_CACHE", str(tmp_path / "sdists"))
    res = build_corpus(["pypi:idna==3.10"], tmp_path / "out")
    (entry,) = res.repos
    assert entry["status"] == "ok" and entry["functions"] > 50
    assert len(list((tmp_path / "sdists").glob("idna-3.10.tar.gz"))) == 1


def test_git_is_never_asked_for_other_protocols() -> None:
    env = src.git_env()
    assert env["GIT_ALLOW_PROTOCOL"] == "https:ssh:git:file" and env["GIT_TERMINAL_PROMPT"] == "0"
    # The environment really restricts git: a transport outside the list is refused by git itself.
    out = subprocess.run(
        ["git", "ls-remote", "ext::sh -c true"], env={**os.environ, **env}, capture_output=True, text=True
    )
    assert out.returncode != 0 and "not allowed" in out.stderr


def test_a_hostile_local_repository_runs_nothing(tmp_path: Path) -> None:
    """Config, hooks and attributes inside a source repo are data too, in every clone mode."""
    marker = tmp_path / "ran"
    repo = tmp_path / "hostile"
    hook = f"#!/bin/sh\necho hook >> {marker}\n"
    make_repo(repo, {".gitattributes": "*.py filter=evil diff=evil\n", "m.py": "def f():\n    return 1\n"})
    for name in ("post-checkout", "pre-upload-pack", "post-update", "reference-transaction", "fsmonitor"):
        (repo / ".git" / "hooks" / name).write_text(hook)
        (repo / ".git" / "hooks" / name).chmod(0o755)
    cmd = f"sh -c 'echo config >> {marker}'"
    for key, value in [
        ("core.fsmonitor", cmd), ("core.sshCommand", cmd), ("core.pager", cmd),
        ("filter.evil.smudge", cmd), ("filter.evil.clean", cmd), ("diff.evil.textconv", cmd),
        ("uploadpack.packObjectsHook", cmd), ("core.hooksPath", str(repo / ".git" / "hooks")),
    ]:
        git(repo, "config", key, value)
    for depth in (None, 0, 1):  # --shared of the folder, full file:// clone, shallow file:// clone
        out = tmp_path / f"out-{depth}"
        for _ in range(2):  # the second run resumes (ls-remote against the repo)
            res = build_corpus([repo.as_uri()], out, BuildSettings(clone_depth=depth))
            assert res.repos[0]["status"] == "ok" and res.repos[0]["functions"] == 1
    assert not marker.exists(), marker.read_text()
    # Positive control: the planted config is live for git commands that honour it.
    subprocess.run(["git", "-C", str(repo), "status"], capture_output=True)
    assert marker.exists()
