"""``corpus build``: sources → ``DIR/repos/<key>.jsonl`` + ``DIR/manifest.json``.

The run is a small pipeline: a thread pool clones (git is a subprocess, so threads overlap
it) and reads each repo's ``.py`` blobs at the commit; files go to a process pool in
chunks for parsing and extraction (``workers``), which returns ready-to-write JSON lines;
the main process writes each finished repo atomically and records it in
``DIR/.build-state.json``. Only when every source is done does it compute the leak filter
over the per-repo index files and atomically write ``manifest.json`` — so the manifest a
reader sees is always a complete, consistent build, and a killed run resumes from the
state file: repos already done at the same commit with the same settings are not redone.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codejepa.core import (
    CodejepaError,
    atomic_write_json,
    atomic_write_lines,
    code_version,
    library_versions,
    printable,
    sha256_json,
)
from codejepa.corpus import sources as src
from codejepa.corpus.extract import EXTRACTOR_VERSION, ExtractSettings, extract_file, is_trivial_hash
from codejepa.corpus.records import (
    CORPUS_FORMAT,
    CORPUS_FORMAT_VERSION,
    REBUILD,
    read_manifest,
    read_records,
    recorded_functions,
)
from codejepa.corpus.split import DEFAULT_RATIOS, RepoIndex, assign_split, compute_dropped, load_index, read_index

STATE_FILE = ".build-state.json"
CHUNK_BYTES = 512 * 1024  # files are sent to workers in chunks of about this many bytes


_EXTRACT_DEFAULTS = ExtractSettings()


@dataclass(frozen=True, slots=True)
class BuildSettings:
    """How ``corpus build`` splits and extracts: the split's seed and train/val/test ratios (of
    repositories), what is extracted (tests, file size limit, siblings kept as context), the leak
    filter's treatment of trivial bodies, and the parallelism (parsing workers, clones at once,
    clone depth), which changes no record."""

    seed: int = 0
    ratios: tuple[float, float, float] = DEFAULT_RATIOS
    exclude_tests: bool = _EXTRACT_DEFAULTS.exclude_tests
    keep_trivial: bool = False
    max_file_bytes: int = _EXTRACT_DEFAULTS.max_file_bytes
    max_siblings: int = _EXTRACT_DEFAULTS.max_siblings
    workers: int = 1  # parsing processes; 1 = parse in this process
    clone_jobs: int = 4  # concurrent clones / downloads
    # None: a --shared clone for local/file:// sources, --depth 1 for network URLs without a
    # ref, else full; 0: always a full clone; N: --depth N.
    clone_depth: int | None = None
    work_dir: str | None = None  # where temporary clones go (default: the system temp folder)

    def extract_settings(self) -> ExtractSettings:
        return ExtractSettings(self.max_file_bytes, self.max_siblings, self.exclude_tests)

    def repo_settings(self) -> dict[str, Any]:
        """Everything that changes a repo's records file: resume only when these match."""
        return {
            "seed": self.seed,
            "ratios": list(self.ratios),
            "exclude_tests": self.exclude_tests,
            "max_file_bytes": self.max_file_bytes,
            "max_siblings": self.max_siblings,
            "extractor_version": EXTRACTOR_VERSION,
        }

    def depth_for(self, source: src.Source) -> int | None:
        """The ``depth`` argument of :func:`sources.clone` for this source."""
        if self.clone_depth is not None:
            return self.clone_depth if self.clone_depth > 0 else _FULL
        if src.local_path(source) is not None or source.ref:
            return None
        return 1


_FULL = 0  # sources.clone: a falsy non-None depth means a plain full clone


class BuildObserver:
    """Receives progress events; the CLI renders them with rich. Default: silent."""

    def on_start(self, n_sources: int) -> None: ...

    def on_message(self, line: str) -> None: ...

    def on_repo_files(self, name: str, n_files: int) -> None: ...

    def on_files_done(self, n_files: int, n_functions: int) -> None: ...

    def on_repo_done(self, entry: dict[str, Any]) -> None: ...


@dataclass(slots=True)
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    messages: list[str] = field(default_factory=list)

    @property
    def repos(self) -> list[dict[str, Any]]:
        return self.manifest["repos"]

    @property
    def ok(self) -> bool:
        """False when nothing could be built (the CLI's exit code)."""
        return any(r["status"] == "ok" for r in self.repos)


# Records are UTF-8 JSON and name their file: a name that is not UTF-8 cannot be one.
NON_UTF8_NAME = "file name is not valid UTF-8"


def _is_utf8_name(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # bytes that did not decode, kept as lone surrogates
        return False
    return True


# --------------------------------------------------------------------------- workers


def _extract_chunk(
    files: list[tuple[str, bytes]], meta: tuple[str, str, str, str], settings: ExtractSettings
) -> list[dict[str, Any]]:
    """Extract a chunk of files (runs in a worker process); returns plain data only."""
    repo, url, commit, split = meta
    out = []
    for path, data in files:
        try:
            res = extract_file(data, path, repo=repo, url=url, commit=commit, split=split, settings=settings)
        except Exception as e:  # noqa: BLE001 - one bad file never loses the repo
            out.append({"path": path, "skipped": f"extractor error: {type(e).__name__}: {e}"})
            continue
        out.append(
            {
                "path": path,
                "skipped": res.skipped,
                "syntax_error": res.has_syntax_error,
                "errors": res.functions_with_errors,
                "tests_excluded": res.tests_excluded,
                "records": [
                    (r.signature_span.start, r.to_json(), r.id, r.body_hash, r.is_test) for r in res.records
                ],
            }
        )
    return out


def _chunks(files: list[tuple[str, bytes]]) -> list[list[tuple[str, bytes]]]:
    chunks: list[list[tuple[str, bytes]]] = []
    cur: list[tuple[str, bytes]] = []
    size = 0
    for f in files:
        cur.append(f)
        size += len(f[1])
        if size >= CHUNK_BYTES:
            chunks.append(cur)
            cur, size = [], 0
    if cur:
        chunks.append(cur)
    return chunks


# --------------------------------------------------------------------------- the build


@dataclass(slots=True, eq=False)
class _RepoJob:
    """A cloned repository on its way through the parsing workers."""

    source: src.Source
    entry: dict[str, Any]
    started: float
    meta: tuple[str, str, str, str] = ("", "", "", "")  # (name, url, commit, split) for the records
    chunks: list[list[tuple[str, bytes]]] = field(default_factory=list)  # its files, as sent to workers
    pending: int = 0  # chunks still being parsed
    results: list[dict[str, Any]] = field(default_factory=list)


def _new_entry(spec: str, source: src.Source | None, settings: BuildSettings, *, train_only: bool = False) -> dict[str, Any]:
    name = source.name if source else spec
    split = "train" if train_only else assign_split(name, settings.seed, settings.ratios)
    return {
        "name": name,
        "source": spec,
        "url": source.url if source else spec,
        "ref": source.ref if source else None,
        "commit": None,
        "split": split if source else None,
        "train_only": train_only,
        "status": "pending",
        "message": None,
        "records_file": None,
        "index_file": None,
        "files": 0,
        "functions": 0,
        "test_functions": 0,
        "trivial_functions": 0,
        "tests_excluded": 0,
        "files_with_syntax_errors": 0,
        "functions_with_errors": 0,
        "skipped": [],
        "settings_hash": sha256_json(settings.repo_settings()),
        "seconds": 0.0,
    }


def _previous_entries(out: Path) -> dict[str, dict[str, Any]]:
    prev: dict[str, dict[str, Any]] = {}
    if (out / "manifest.json").is_file():
        try:
            for r in read_manifest(out).get("repos", []):
                prev[r["name"]] = r
        except CodejepaError:
            pass
    state = out / STATE_FILE
    if state.is_file():
        try:
            for r in json.loads(state.read_text(encoding="utf-8")).get("repos", {}).values():
                prev[r["name"]] = r
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    return prev


def _reusable(prev: dict[str, Any] | None, entry: dict[str, Any], out: Path) -> bool:
    return bool(
        prev
        and prev.get("status") == "ok"
        and prev.get("settings_hash") == entry["settings_hash"]
        and prev.get("split") == entry["split"]
        and prev.get("url") == entry["url"]
        and prev.get("ref") == entry["ref"]
        and prev.get("records_file")
        and prev.get("index_file")
        and (out / prev["records_file"]).is_file()
        and (out / prev["index_file"]).is_file()
    )


def output_damage(prev: dict[str, Any], out: Path) -> str | None:
    """Why a finished repo's files cannot be reused (None when intact).

    Files are written atomically, so damage comes from outside (a truncated copy, a full
    disk, a hand edit); a resumed repo must read back as the records the build wrote, else
    every later stage would silently see fewer functions.
    """
    expected = recorded_functions(prev)
    try:
        n = sum(1 for _ in read_records(out / prev["records_file"]))
        load_index(out / prev["index_file"], expected)
    except CodejepaError as e:
        return str(e).removesuffix(f"; {REBUILD}")  # the build is what rebuilds it
    if expected is not None and n != expected:
        return f"{out / prev['records_file']}: {n} records, the build wrote {expected}"
    return None


def _peek_commit(source: src.Source) -> str | None:
    if source.kind == "pypi":
        name, version = source.url[len("pypi:"):].split("==", 1)
        cached = src.find_cached_sdist(name, version)
        return src.sha256_file(cached) if cached else None
    return src.remote_commit(source)


def _noop() -> None:
    return None


def _worker_init(parent: int) -> None:
    # Ctrl-C reaches the whole process group; the parent handles it and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's "stop as on Ctrl-C": a worker just ends
    # A parent killed outright (SIGKILL, OOM) must not leave workers waiting forever.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    except (OSError, AttributeError):  # not Linux: poll instead
        import threading

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def _start_pool(workers: int) -> cf.ProcessPoolExecutor:
    """A process pool whose workers all exist before any clone thread starts.

    Fork is cheap (workers inherit the imported parser) and works from scripts without a
    ``__main__`` guard, but must not happen while other threads run; with the fork
    context, 3.11's executor launches every worker at the first submit, so one no-op task
    before the clone pool starts is enough. Elsewhere spawn is used.
    """
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),))
    pool.submit(_noop).result()
    return pool


def build_corpus(
    sources: Sequence[str],
    out_dir: str | os.PathLike[str],
    settings: BuildSettings = BuildSettings(),
    *,
    repos_file: str | os.PathLike[str] | None = None,
    train_only: Sequence[str] = (),
    train_only_file: str | os.PathLike[str] | None = None,
    observer: BuildObserver | None = None,
) -> BuildResult:
    """Build (or resume) a corpus in ``out_dir``; see the module doc.

    Sources in ``train_only`` (and ``train_only_file``) go to the train split whatever their
    hash says: extra training code beside a fixed benchmark. Adding them moves no other
    repository (the split is per repository), but the leak filter drops every held-out body
    that also occurs in them.

    Bad sources, failed clones and bad files are recorded with one line each and the run
    goes on; :class:`CodejepaError` is raised when the output folder cannot be made or a list
    file cannot be read (a corpus built without its list would replace the one there). When
    no repository could be built, an existing corpus's manifest is left as it was.
    """
    out = Path(out_dir)
    _check_out(out)
    listed: list[tuple[str, bool]] = []
    for path, pinned, flag in ((repos_file, False, "--repos-file"), (train_only_file, True, "--train-only-file")):
        if path is not None:
            try:
                listed += [(spec, pinned) for spec in src.read_repos_file(path)]
            except src.SourceError as e:
                raise CodejepaError(f"{flag}: {e}; nothing was built") from None
    (out / "repos").mkdir(parents=True, exist_ok=True)
    unpinned = [*sources, *(s for s, p in listed if not p)]
    pinned = [*train_only, *(s for s, p in listed if p)]
    build = _Build(out, settings, observer or BuildObserver())
    # A source asked for both ways goes to train, as train-only promises; said once.
    both = sorted(set(unpinned) & set(pinned))
    for spec in both:
        build.say(f"note: {spec} is given both as a source and as train-only: it goes to the train split")
    specs = [(spec, False) for spec in unpinned if spec not in both] + [(spec, True) for spec in pinned]

    entries, todo = build.plan(specs)
    build.run(todo)
    manifest = _write_manifest(out, entries, settings)
    build.state_path.unlink(missing_ok=True)
    _remove_unlisted(out, manifest)
    n_splits = Counter(r["split"] for r in entries if r["status"] == "ok")
    empty = [s for s in ("train", "val", "test") if n_splits[s] == 0]
    if entries and any(r["status"] == "ok" for r in entries) and empty:
        build.say(f"note: no repository landed in {', '.join(empty)} "
                  "(split is per repo, from --seed; try another seed or more repos)")
    return BuildResult(out, manifest, build.messages)


_REPO_FILES = (".jsonl", ".index.tsv")  # a repository's records and index files in repos/


def _remove_unlisted(out: Path, manifest: dict[str, Any]) -> None:
    """Delete the records and index files of repositories the manifest no longer lists (dropped
    from the sources): `grep`/`jq` over ``repos/`` would count them. Only after a build where
    every source was built: a source that failed this time (a network error) keeps its files."""
    if any(r["status"] not in ("ok", "duplicate") for r in manifest["repos"]):
        return
    listed = {r.get(k) for r in manifest["repos"] for k in ("records_file", "index_file")}
    for p in (out / "repos").iterdir():
        if p.is_file() and p.name.endswith(_REPO_FILES) and f"repos/{p.name}" not in listed:
            p.unlink()


def _check_out(out: Path) -> None:
    if not out.parent.is_dir():
        raise CodejepaError(f"--out {out}: the parent folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise CodejepaError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").exists() and not (out / STATE_FILE).exists():
        if not _corpus_remains(out):
            raise CodejepaError(f"--out {out}: folder exists, is not empty and is not a corpus; choose another")


def _corpus_remains(out: Path) -> bool:
    """A build killed before its first state file leaves only ``repos/`` with records and index
    files (and their temporary files); any other folder that holds a ``repos/`` is not ours."""
    if {p.name for p in out.iterdir()} != {"repos"} or not (out / "repos").is_dir():
        return False
    return all(p.is_file() and p.name.endswith((*_REPO_FILES, ".tmp")) for p in (out / "repos").iterdir())


_Todo = tuple[src.Source, dict[str, Any]]  # a source to build, and its manifest entry


class _Build:
    """One run of :func:`build_corpus`: what it has said, what it has finished (the state
    file), and the pipeline of clones and parsing workers that gets the rest done."""

    def __init__(self, out: Path, settings: BuildSettings, obs: BuildObserver) -> None:
        self.out, self.settings, self.obs = out, settings, obs
        self.messages: list[str] = []
        self.state_path = out / STATE_FILE
        self.previous = _previous_entries(out)
        # Carried forward, so that a run interrupted twice still remembers what the first finished.
        self.state: dict[str, dict[str, Any]] = {n: e for n, e in self.previous.items() if e.get("status") == "ok"}

    def say(self, line: str) -> None:
        self.messages.append(line)
        self.obs.on_message(line)

    def plan(self, specs: list[tuple[str, bool]]) -> tuple[list[dict[str, Any]], list[_Todo]]:
        """Every source's manifest entry, and the sources to build (bad and duplicate ones are
        entries already done); finished output that reads back damaged is forgotten."""
        entries: list[dict[str, Any]] = []
        todo: list[_Todo] = []
        seen: dict[str, str] = {}
        for spec, pinned in specs:
            try:
                source = src.parse_source(spec)
            except src.SourceError as e:
                entry = _new_entry(spec, None, self.settings)
                entry.update(status="invalid source", message=str(e))
                entries.append(entry)
                self.say(str(e))
                continue
            entry = _new_entry(spec, source, self.settings, train_only=pinned)
            if source.name in seen:
                entry.update(status="duplicate",
                             message=f"{spec}: same repository name {source.name!r} as {seen[source.name]}; skipped "
                                     "(a repository's name keys its split and records: give a local copy a folder "
                                     "of another name to build both)")
                entry["name"] = f"{source.name} (duplicate: {spec})"
                entries.append(entry)
                self.say(entry["message"])
                continue
            seen[source.name] = spec
            entries.append(entry)
            todo.append((source, entry))
        self.obs.on_start(len(entries))
        for entry in entries:
            if entry["status"] != "pending":
                self.obs.on_repo_done(entry)
        for source, entry in todo:
            prev = self.previous.get(source.name)
            why = output_damage(prev, self.out) if _reusable(prev, entry, self.out) else None
            if why:
                self.say(f"note: {source.spec}: finished output is damaged, rebuilding it ({why})")
                del self.previous[source.name]
                self.state.pop(source.name, None)
        return entries, todo

    def run(self, todo: list[_Todo]) -> None:
        """Clone (a thread pool) and parse (a process pool, ``workers`` > 1) every source of
        ``todo``, with at most ``max(2, clone_jobs)`` repositories' files in memory at once."""
        settings = self.settings
        ex = settings.extract_settings()
        pool = _start_pool(settings.workers) if settings.workers > 1 else None
        clones = cf.ThreadPoolExecutor(max(1, settings.clone_jobs), thread_name_prefix="clone")
        max_open = max(2, settings.clone_jobs)
        queue = list(todo)
        prep: dict[cf.Future[Any], tuple[src.Source, dict[str, Any], float]] = {}
        parsing: dict[cf.Future[Any], _RepoJob] = {}
        open_jobs: set[_RepoJob] = set()
        try:
            while queue or prep or parsing:
                while queue and len(prep) + len(open_jobs) < max_open:
                    source, entry = queue.pop(0)
                    prep[clones.submit(self._prepare, source, entry)] = (source, entry, time.perf_counter())
                done, _ = cf.wait([*prep, *parsing], return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    if fut in prep:
                        job = self._prepared(fut, *prep.pop(fut))
                        if job is None:
                            continue
                        if pool is None:
                            for ch in job.chunks:
                                self._parsed(job, _extract_chunk(ch, job.meta, ex))
                            self._finish(job)
                            continue
                        job.pending = len(job.chunks)
                        for ch in job.chunks:
                            parsing[pool.submit(_extract_chunk, ch, job.meta, ex)] = job
                        if job.chunks:
                            open_jobs.add(job)
                        else:
                            self._finish(job)
                    else:
                        job = parsing.pop(fut)
                        job.pending -= 1
                        try:
                            self._parsed(job, fut.result())
                        except Exception as e:  # noqa: BLE001 - e.g. a worker killed by the OS
                            job.entry.update(status="error", message=f"{job.source.spec}: a parsing worker "
                                                                     f"failed: {type(e).__name__}: {e}")
                        if job.pending == 0:
                            open_jobs.discard(job)
                            if job.entry["status"] == "error":
                                self._fail(job.entry, "error", job.entry["message"])
                            else:
                                self._finish(job)
        finally:
            clones.shutdown(wait=True, cancel_futures=True)
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _save_state(self) -> None:
        atomic_write_json(self.state_path, {"format": "codejepa-corpus-state", "repos": self.state})

    def _prepare(self, source: src.Source, entry: dict[str, Any]) -> src.Snapshot | dict[str, Any]:
        """(In a clone thread.) The finished entry when the source is unchanged, else its files."""
        prev = self.previous.get(source.name)
        if _reusable(prev, entry, self.out):
            commit = _peek_commit(source)
            if commit is not None and commit == prev["commit"]:
                return prev
        s = self.settings
        return src.snapshot(source, s.work_dir or tempfile.gettempdir(), max_file_bytes=s.max_file_bytes,
                            depth=s.depth_for(source))

    def _prepared(self, fut: cf.Future[Any], source: src.Source, entry: dict[str, Any],
                  started: float) -> _RepoJob | None:
        """A finished clone: the repository's parsing job, or None when it is already done
        (failed, or resumed from an earlier run)."""
        try:
            got = fut.result()
        except src.EmptyRepository as e:
            self._fail(entry, "empty repository", str(e))
            return None
        except src.SourceError as e:
            self._fail(entry, "failed", str(e))
            return None
        except Exception as e:  # noqa: BLE001 - a bug in one repo must not stop the run
            self._fail(entry, "error", f"{source.spec}: {type(e).__name__}: {e}")
            return None
        if isinstance(got, dict):  # resumed: identical commit and settings
            entry.clear()
            entry.update(got, resumed=True)
            self.state[entry["name"]] = entry
            self._save_state()
            self._say_damaged(entry)
            self.obs.on_repo_done(entry)
            return None
        entry["commit"] = got.commit
        files = [(p, data) for p, data in got.files if _is_utf8_name(p)]
        entry["skipped"] = [{"path": p, "reason": r} for p, r in got.skipped] + [
            {"path": p, "reason": NON_UTF8_NAME} for p, _ in got.files if not _is_utf8_name(p)]
        self._say_damaged(entry)
        self.obs.on_repo_files(source.name, len(files))
        return _RepoJob(source, entry, started, meta=(source.name, source.url, got.commit, entry["split"]),
                        chunks=_chunks(files))

    def _say_damaged(self, entry: dict[str, Any]) -> None:
        # The build goes on without these files, but a corpus quietly missing part of a
        # repository must not pass unnoticed: the console says so, once per repository.
        bad = [s["path"] for s in entry.get("skipped", ()) if src.is_unreadable_blob(s["reason"])]
        if bad:
            self.say(f"{entry['name']}: {len(bad)} file{'s' if len(bad) > 1 else ''} unreadable, first "
                     f"{printable(bad[0])}: git objects missing or corrupt (damaged repository; try "
                     "`git fsck` and clone it again); built without them")

    def _parsed(self, job: _RepoJob, results: list[dict[str, Any]]) -> None:
        job.results.extend(results)
        self.obs.on_files_done(len(results), sum(len(r.get("records", ())) for r in results))

    def _fail(self, entry: dict[str, Any], status: str, message: str) -> None:
        entry.update(status=status, message=message)
        self.state[entry["name"]] = entry
        self._save_state()
        self.say(message)
        self.obs.on_repo_done(entry)

    def _finish(self, job: _RepoJob) -> None:
        """Write a parsed repository's records and index (atomically) and record it as done."""
        entry = job.entry
        rows: list[tuple[str, int, str, str, str, bool]] = []
        skipped = list(entry["skipped"])
        for f in sorted(job.results, key=lambda r: r["path"]):
            if f.get("skipped"):
                skipped.append({"path": f["path"], "reason": f["skipped"]})
                continue
            entry["files"] += 1
            entry["files_with_syntax_errors"] += int(f["syntax_error"])
            entry["functions_with_errors"] += f["errors"]
            entry["tests_excluded"] += f["tests_excluded"]
            for start, line, rid, h, is_test in f["records"]:
                rows.append((f["path"], start, line, rid, h, is_test))
        rows.sort(key=lambda r: (r[0], r[1]))
        records_file = f"repos/{job.source.key}.jsonl"
        index_file = f"repos/{job.source.key}.index.tsv"
        atomic_write_lines(self.out / records_file, [r[2] for r in rows])
        atomic_write_lines(self.out / index_file, [f"{r[3]}\t{r[4]}" for r in rows])
        entry.update(
            status="ok",
            records_file=records_file,
            index_file=index_file,
            functions=len(rows),
            test_functions=sum(1 for r in rows if r[5]),
            trivial_functions=sum(1 for r in rows if is_trivial_hash(r[4])),
            skipped=skipped,
            seconds=round(time.perf_counter() - job.started, 3),
        )
        self.state[entry["name"]] = entry
        self._save_state()
        self.obs.on_repo_done(entry)


def _write_manifest(out: Path, entries: list[dict[str, Any]], settings: BuildSettings) -> dict[str, Any]:
    # By name, not in the order the sources were given: the store embeds the records in this
    # order and its fingerprint covers it, so the same sources listed otherwise are one corpus.
    entries = sorted(entries, key=lambda r: str(r["name"]))
    ok = [r for r in entries if r["status"] == "ok"]
    drop = compute_dropped(
        (RepoIndex(r["name"], r["split"], (lambda p=str(out / r["index_file"]): read_index(p))) for r in ok),
        keep_trivial=settings.keep_trivial,
    )
    totals = {
        "repos": len(entries),
        "repos_ok": len(ok),
        "repos_failed": len(entries) - len(ok),
        "files": sum(r["files"] for r in ok),
        "files_skipped": sum(len(r["skipped"]) for r in ok),
        "functions": sum(r["functions"] for r in ok),
        "test_functions": sum(r["test_functions"] for r in ok),
        "functions_with_errors": sum(r["functions_with_errors"] for r in ok),
        "dropped": dict(drop.counts),
        "repos_per_split": dict(Counter(r["split"] for r in ok)),
        "functions_per_split": dict(drop.total),
        "kept_per_split": dict(drop.kept),
    }
    manifest = {
        "format": CORPUS_FORMAT,
        "format_version": CORPUS_FORMAT_VERSION,
        "code_version": code_version(),
        "versions": library_versions("tree-sitter", "tree-sitter-python", "GitPython"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {**asdict(settings), "ratios": list(settings.ratios), "extractor_version": EXTRACTOR_VERSION},
        "repos": entries,
        "totals": totals,
        "dropped": drop.dropped,
    }
    # A run where every source failed (a typo in a list) must not replace a built corpus.
    if ok or not (out / "manifest.json").exists():
        atomic_write_json(out / "manifest.json", manifest)
    return manifest

