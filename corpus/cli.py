"""CLI of the corpus stage (thin: parses arguments, calls library functions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from codejepa.corpus.extract import ExtractSettings
from codejepa.corpus.split import DEFAULT_RATIOS

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
_DEFAULTS = ExtractSettings()  # the options' defaults are the library's (BuildSettings takes them from here)


@app.callback()
def _callback() -> None:
    """corpus stage."""


class _RichObserver:
    """Renders build progress (repos, files, functions) on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        from codejepa.progress import Progress

        self.console = Console(stderr=True)
        # No auto-refresh thread: parsing workers are forked, which must not happen while
        # another thread runs. Events refresh the display instead.
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[extra]}", markup=False),  # a repository's name is text, not markup
            TimeElapsedColumn(),
            console=self.console,
            auto_refresh=False,
            transient=False,
        )
        self.repos = self.progress.add_task("repos", total=None, extra="")
        self.files = self.progress.add_task("files", total=0, extra="")
        self.functions = 0
        self.shown = False

    def __enter__(self) -> _RichObserver:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.shown:
            self.progress.refresh()
            self.progress.stop()

    def _show(self) -> None:
        # The bars appear with the build's first event: a refused --out or list file is then
        # one error line, not empty bars above it.
        if not self.shown:
            self.shown = True
            self.progress.start()

    def on_start(self, n_sources: int) -> None:
        self._show()
        self.progress.update(self.repos, total=n_sources)
        self.progress.refresh()

    def on_message(self, line: str) -> None:
        self._show()
        self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self.progress.refresh()

    def on_repo_files(self, name: str, n_files: int) -> None:
        total = self.progress.tasks[self.files].total or 0
        self.progress.update(self.files, total=total + n_files)
        self.progress.refresh()

    def on_files_done(self, n_files: int, n_functions: int) -> None:
        self.functions += n_functions
        self.progress.update(self.files, advance=n_files, extra=f"{self.functions:,} functions")
        self.progress.refresh()

    def on_repo_done(self, entry: dict[str, Any]) -> None:
        if entry.get("resumed"):
            total = self.progress.tasks[self.files].total or 0
            self.progress.update(self.files, total=total + entry["files"], advance=entry["files"])
            self.functions += entry["functions"]
            self.progress.update(self.files, extra=f"{self.functions:,} functions")
        self.progress.update(self.repos, advance=1, extra=entry["name"])
        self.progress.refresh()


def _missing_files(manifest: dict[str, Any], corpus: Path) -> dict[str, list[str]]:
    """repo name → the files a built repository's manifest entry names that are not there."""
    missing = {}
    for r in manifest["repos"]:
        if r.get("status") == "ok":
            gone = [r[k] for k in ("records_file", "index_file")
                    if isinstance(r.get(k), str) and not (corpus / r[k]).is_file()]
            if gone:
                missing[r["name"]] = gone
    return missing


def _damaged(manifest: dict[str, Any], corpus: Path, missing: dict[str, list[str]]) -> dict[str, str]:
    """repo name → why a built repository's files (there, not missing) do not read back as the
    records the build wrote: a truncated or edited file would otherwise pass as "ok"."""
    from codejepa.corpus.build import output_damage

    return {r["name"]: why for r in manifest["repos"]
            if r.get("status") == "ok" and r["name"] not in missing
            and all(isinstance(r.get(k), str) for k in ("records_file", "index_file"))
            and (why := output_damage(r, corpus))}


def _summary(manifest: dict[str, Any], missing: dict[str, list[str]] | None = None,
             damaged: dict[str, str] | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="corpus", show_footer=True)
    table.add_column("repo", footer="total")
    table.add_column("split")
    table.add_column("status")
    t = manifest["totals"]
    table.add_column("files", justify="right", footer=f"{t['files']:,}")
    table.add_column("functions", justify="right", footer=f"{t['functions']:,}")
    table.add_column("tests", justify="right", footer=f"{t['test_functions']:,}")
    table.add_column("skipped files", justify="right", footer=f"{t['files_skipped']:,}")
    for r in manifest["repos"]:
        status = r["status"] + (" (resumed)" if r.get("resumed") else "")
        if missing and r["name"] in missing:
            status = "[red]files missing[/red]"
        if damaged and r["name"] in damaged:
            status = "[red]files damaged[/red]"
        table.add_row(
            escape(r["name"]), (r.get("split") or "-") + (" (pinned)" if r.get("train_only") else ""), status, f"{r['files']:,}", f"{r['functions']:,}",
            f"{r.get('test_functions', 0):,}", str(len(r.get("skipped", []))),
        )
    console = Console()
    console.print(table)
    kept = t.get("kept_per_split", {})
    dropped = ", ".join(f"{v:,} {k}" for k, v in sorted(t.get("dropped", {}).items())) or "none"
    console.print(
        f"kept per split: train {kept.get('train', 0):,}, val {kept.get('val', 0):,}, test {kept.get('test', 0):,}"
        f" — dropped: {dropped}",
        highlight=False,
    )


@app.command()
def build(
    sources: Optional[list[str]] = typer.Argument(  # noqa: UP007 - typer needs Optional here
        None, help="git URLs (https, ssh, git, file), local git repos, pypi:NAME==VERSION; @REF pins a ref."
    ),
    out: Path = typer.Option(..., "--out", help="Corpus folder to write (its parent must exist)."),
    repos_file: Optional[Path] = typer.Option(None, "--repos-file", help="One source a line, # comments."),  # noqa: UP007
    train_only_file: Optional[Path] = typer.Option(  # noqa: UP007
        None, "--train-only-file",
        help="Sources (one a line) that always go to the train split: extra training code beside a fixed benchmark.",
    ),
    workers: int = typer.Option(1, "--workers", min=1, help="Parsing processes."),
    seed: int = typer.Option(0, "--seed", help="Seed of the per-repo split."),
    split: str = typer.Option("/".join(f"{r * 100:g}" for r in DEFAULT_RATIOS), "--split",
                              help="train/val/test proportions of repos."),
    exclude_tests: bool = typer.Option(False, "--exclude-tests", help="Leave out test functions and test files."),
    keep_trivial: bool = typer.Option(False, "--keep-trivial", help="Keep trivial bodies (pass, ..., raise NotImplementedError) in val/test."),
    max_file_bytes: int = typer.Option(_DEFAULTS.max_file_bytes, "--max-file-bytes", min=1, help="Skip larger files."),
    max_siblings: int = typer.Option(_DEFAULTS.max_siblings, "--max-siblings", min=0,
                                     help="Sibling signatures kept in a function's context."),
    clone_jobs: int = typer.Option(4, "--clone-jobs", min=1, help="Concurrent clones/downloads."),
    depth: Optional[int] = typer.Option(  # noqa: UP007
        None, "--depth", min=0,
        help="Clone depth (0 = full). Default: a --shared clone for local/file:// sources, 1 for network URLs without @REF.",
    ),
) -> None:
    """Clone repositories, extract every function with exact spans, split by repository."""
    from codejepa.core import CLI_ERRORS, CodejepaError, error_line
    from codejepa.corpus.build import BuildSettings, build_corpus
    from codejepa.corpus.split import parse_ratios

    try:
        settings = BuildSettings(
            seed=seed,
            ratios=parse_ratios(split),
            exclude_tests=exclude_tests,
            keep_trivial=keep_trivial,
            max_file_bytes=max_file_bytes,
            max_siblings=max_siblings,
            workers=workers,
            clone_jobs=clone_jobs,
            clone_depth=depth,
        )
        if not sources and repos_file is None and train_only_file is None:
            raise CodejepaError("nothing to build: give SOURCE arguments, --repos-file or --train-only-file")
        with _RichObserver() as obs:
            result = build_corpus(sources or [], out, settings, repos_file=repos_file,
                                  train_only_file=train_only_file, observer=obs)
    except CLI_ERRORS as e:
        typer.echo(f"error: {error_line(e)}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: finished repositories are kept; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    _summary(result.manifest)
    # A script (or a benchmark) must not go on with a corpus that silently lacks a source; two
    # sources of one name are one of them too (which one is built would follow their order).
    failed = [r for r in result.manifest["repos"] if r["status"] != "ok"]
    names = ", ".join(f"{r['source']} ({r['status']})" for r in failed)
    if not result.ok:
        typer.echo(f"error: no repository could be built ({names}); a corpus already there is kept as it was",
                   err=True)
        raise typer.Exit(1)
    typer.echo(f"wrote {result.out_dir / 'manifest.json'}", err=True)
    if failed:
        n = len(result.manifest["repos"])
        typer.echo(f"error: {len(failed)} of {n} sources were not built: {names}; the corpus holds the others "
                   "(see the lines above; fix or remove those sources and run the same command again: what is "
                   "built is resumed)", err=True)
        raise typer.Exit(1)


@app.command()
def info(corpus: Path = typer.Argument(..., help="A corpus folder.")) -> None:
    """Summary of a built corpus (per-repo table and totals)."""
    from codejepa.core import CLI_ERRORS, error_line
    from codejepa.corpus.records import REBUILD, read_manifest

    try:
        manifest = read_manifest(corpus, require=("repos", "totals"))
    except CLI_ERRORS as e:
        typer.echo(f"error: {error_line(e)}", err=True)
        raise typer.Exit(1) from None
    missing = _missing_files(manifest, corpus)
    damaged = _damaged(manifest, corpus, missing)
    _summary(manifest, missing, damaged)
    if missing:
        files = ", ".join(f for gone in missing.values() for f in gone)
        which = "1 built repository has lost its" if len(missing) == 1 else f"{len(missing)} built repositories have lost their"
        typer.echo(f"error: {which} files ({files}); "
                   f"{REBUILD} (the same sources and --out: it rebuilds only those)", err=True)
    if damaged:
        which = "1 built repository's files do" if len(damaged) == 1 else f"{len(damaged)} built repositories' files do"
        typer.echo(f"error: {which} not read back as built (first: {next(iter(damaged.values()))}); "
                   f"{REBUILD} (the same sources and --out: it rebuilds only those)", err=True)
    if missing or damaged:
        raise typer.Exit(1)


@app.command()
def folds(
    corpus: Path = typer.Argument(..., help="A built corpus folder."),
    out: Path = typer.Option(..., "--out", help="Folder to write fold-0.json … fold-(K-1).json into."),
    k: int = typer.Option(5, "--folds", min=3, help="Number of folds (each tests on about 1/K of the repositories)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the dealing order (default: the corpus's split seed)."),  # noqa: UP007
) -> None:
    """Split files for a K-fold cross-validation over repositories.

    For --splits of predict train and evaluate retrieval: fold k tests on group k, selects on
    group k+1, trains on the rest, with its own leak filter. Nothing is re-extracted or
    re-embedded."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from codejepa.core import CLI_ERRORS, CodejepaError, error_line
    from codejepa.corpus.folds import make_folds, other_fold_files, write_fold

    try:
        table = Table(title=escape(f"{k} folds over repositories, in {out}"))
        for col in ("file", "test repos", "val repos", "train repos", "train", "val", "test"):
            table.add_column(col, justify="left" if col == "file" else "right")
        assignments = make_folds(corpus, k, seed)
        if assignments and (other := other_fold_files(out, assignments[0])):
            raise CodejepaError(f"{out} holds fold files of another cross-validation ({', '.join(other)}); "
                                "choose another --out, or delete them")
        for a in assignments:
            p = write_fold(a, out)
            repos = list(a.repos.values())
            recs = list(a.splits.values())
            table.add_row(p.name, *(str(repos.count(s)) for s in ("test", "val", "train")),
                          *(f"{recs.count(s):,}" for s in ("train", "val", "test")))
        Console().print(table)
    except CLI_ERRORS as e:
        typer.echo(f"error: {error_line(e)}", err=True)
        raise typer.Exit(1) from None
