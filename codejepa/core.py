"""Small helpers shared by every stage. Imports no stage."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from codejepa import __version__

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]


class CodejepaError(Exception):
    """An expected failure with one clear, user-facing line (no traceback at the CLI)."""


def printable(name: str) -> str:
    """A file name fit for a title, a legend or JSON: bytes that are not UTF-8 (kept by Python as
    lone surrogates, which matplotlib and json refuse) shown as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_json_object(path: Path, what: str, error: type[CodejepaError], redo: str) -> dict[str, Any]:
    """A JSON file that must hold an object (``what`` names it in the message); unreadable,
    not JSON or another shape: one ``error`` line ending in what to do (``redo``)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: a damaged {what} ({e}); {redo}") from None
    if not isinstance(d, dict):
        raise error(f"{path}: a damaged {what} (not a JSON object); {redo}")
    return d


# What the commands turn into one line besides their own errors: the operating system's and
# HDF5's I/O errors (a full disk, a file damaged in the middle that no header check can see).
CLI_ERRORS: tuple[type[BaseException], ...] = (CodejepaError, OSError)


def error_line(e: BaseException) -> str:
    """The one line a command prints for one of :data:`CLI_ERRORS`."""
    if isinstance(e, CodejepaError):
        return str(e)
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    for kind, what in _OS_ERROR_WORDS:
        if isinstance(e, kind):
            return f"{where}{what}"
    return f"{where}I/O error ({getattr(e, 'strerror', None) or e}); a damaged file or a full disk?"


_OS_ERROR_WORDS: tuple[tuple[type[OSError], str], ...] = (
    (FileExistsError, "a file is in the way (a folder was to be made here)"),
    (NotADirectoryError, "a file where a folder is needed"),
    (IsADirectoryError, "a folder where a file is needed"),
    (FileNotFoundError, "no such file or folder"),
    (PermissionError, "permission denied"),
)


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one.

    Recorded in every artefact so that a result can be traced to the code that made it.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        # Uncommitted changes get a hash of their diff: two different edits are two versions.
        diff = subprocess.run(
            ["git", "-C", str(root), "diff", "HEAD", "--no-ext-diff", "--binary"],
            capture_output=True, timeout=10, check=True,
        ).stdout
        dirty = f".dirty{hashlib.sha256(diff).hexdigest()[:8]}" if diff else ""
        return f"{__version__}+g{sha}{dirty}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def library_versions(*names: str) -> dict[str, str]:
    """Python's and the named distributions' versions ("not installed" for a missing one):
    what a result depends on beside the code, recorded with it."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
    """A temp file in ``path``'s folder, fsynced and renamed over ``path`` when the block ends;
    removed when it raises. A kill at any moment leaves the old file or the new one, never a
    torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; a file written in place would get 0666 less the umask,
        # and a corpus, run or evaluation shared with a collaborator must read alike.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`_atomic_file`)."""
    with _atomic_file(path, "wb") as f:
        f.write(data)


def atomic_write_lines(path: str | os.PathLike[str], lines: Iterable[str]) -> int:
    """Write ``lines`` (streamed: one held at a time), each ending in a newline, to ``path``
    atomically; returns how many."""
    n = 0
    with _atomic_file(path, "w") as f:
        for line in lines:
            f.write(line)
            f.write("\n")
            n += 1
    return n


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def torchrun_ranks(env: Mapping[str, str] | None = None) -> int:
    """How many ranks torchrun started this process among (its ``WORLD_SIZE``; 1 outside it or
    for a value that is no count: the commands that use the ranks check it strictly)."""
    world = (os.environ if env is None else env).get("WORLD_SIZE", "").strip()
    return int(world) if world.isdigit() and int(world) > 1 else 1


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts and sizes: a bench given 0 or -5 would measure nonsense."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not a positive integer")
    return n


def default_cache_dir() -> Path:
    """Where long jobs write by default: outside the repository, survives a session."""
    return Path(os.environ.get("CODEJEPA_CACHE", Path.home() / ".cache" / "codejepa"))


def cached_sha256_file(path: str | os.PathLike[str], cache_name: str = "file-hashes.json") -> str:
    """:func:`sha256_file`, remembered by (resolved path, size, mtime, inode, ctime) in a JSON
    file of the cache folder: a multi-GB store or weight file is read once, not at every use. A
    file that changes (an embedding run resumed) gets a new size or mtime and is hashed again,
    and so does one copied over it with its mtime set back (``touch -r``: the ctime moves);
    an unwritable cache only costs the re-hash. Concurrent runs merge their entries under
    a lock, so one does not drop what another has just added."""
    target = Path(path).resolve()
    st = target.stat()
    key = f"{target}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"
    cache_path = default_cache_dir() / cache_name
    digest = _read_hash_cache(cache_path).get(key)
    if isinstance(digest, str):
        return digest
    digest = sha256_file(target)
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(cache_path.with_name(cache_path.name + ".lock"), wait=True):
            atomic_write_json(cache_path, {**_read_hash_cache(cache_path), key: digest})
    except OSError:
        pass
    return digest


def _read_hash_cache(path: Path) -> dict[str, Any]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


class Busy(CodejepaError):
    """Another process holds the lock of an output that is being written."""


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str = "", *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (created when missing): with ``wait``
    until the holder lets go, else raise :class:`Busy` at once (two writers of one output must
    not interleave; ``what`` names it). POSIX flock, so a killed holder releases it; elsewhere
    no lock."""
    with open(lock_path, "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise Busy(f"{what} is being written by another process (its lock: {lock_path})") from None
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def lazy_exports(module: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``exports[name]`` on first use.

    Stage packages re-export their API this way so that ``import codejepa.<stage>`` (and
    ``codejepa --help``) does not pull in torch, h5py or transformers.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
