"""CLI of the embed stage (thin: parses arguments, calls library functions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from codejepa.core import CLI_ERRORS, CodejepaError, error_line

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _callback() -> None:
    """embed stage: per-token teacher states in an HDF5 store."""


def _fail(msg: str, code: int = 1) -> None:
    from rich.console import Console

    # Never markup: a path with brackets in it would be read as a tag (or fail to parse as one).
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {msg}", style="bold red", markup=False)
    raise typer.Exit(code)


def _progress() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from codejepa.progress import Progress

    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    )


@app.command("run")
def run_cmd(
    corpus_dir: Path = typer.Argument(..., help="A corpus directory from `codejepa corpus build`."),
    out: Path = typer.Option(..., "--out", help="The store (.h5); resumed when it exists with the same settings."),
    teacher: str = typer.Option(None, "--teacher", help="Local folder or HF-cache name (default: the packaged all-MiniLM-L6-v2)."),
    layer: int = typer.Option(None, "--layer", help="hidden_states index: 0 = embeddings, L = last block, negative from the end (default L // 2)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]"),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto | float32 | bfloat16 | float16."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Window per text, special tokens included (default min(model window, 2048))."),
    batch_tokens: int = typer.Option(None, "--batch-tokens", help="Padded tokens per model batch (default 8192 on CPU, 32768 on CUDA)."),
    shard: str = typer.Option(None, "--shard", help="I/N: embed a deterministic 1/N of the records into OUT.shard-I-of-N.h5 (default RANK/WORLD_SIZE when set)."),
    split: str = typer.Option(None, "--split", help="Comma-separated splits to embed (default all)."),
    targets: str = typer.Option("in-context", "--targets", help="in-context (body read after its signature) | body-only."),
    store_dtype: str = typer.Option("float16", "--store-dtype", help="float16 (refuses values beyond its range) | float32."),
) -> None:
    """Run a frozen teacher over a corpus and store per-token states."""
    try:
        from codejepa.embed.run import EmbedSettings, embed_corpus, parse_shard, parse_splits

        if targets not in ("in-context", "body-only"):
            raise CodejepaError(f"--targets {targets!r}: expected in-context or body-only")
        settings = EmbedSettings(
            teacher=teacher, layer=layer, device=device, dtype=dtype, max_tokens=max_tokens,
            batch_tokens=batch_tokens, shard=parse_shard(shard), splits=parse_splits(split),
            target_mode=targets.replace("-", "_"), store_dtype=store_dtype,
        )
        prog = _progress()
        state: dict[str, Any] = {"tokens": 0, "t0": None}

        def on_event(event: str, info: dict[str, Any]) -> None:
            import time

            if event == "start":
                t = info["teacher"]
                prog.console.print(
                    f"teacher {t['teacher']} ({t['kind']}, layer {t['layer']}/{t['num_hidden_layers']}, "
                    f"{t['device']}, {t['compute_dtype']}) → {info['path']}", markup=False
                )
                if info["already"]:
                    prog.console.print(f"resuming: {info['already']} of {info['selected']} records already stored",
                                       markup=False)
                state["task"] = prog.add_task("embedding", total=info["selected"], completed=info["already"], rate="")
                state["t0"] = time.perf_counter()
                prog.start()
            elif event in ("commit", "skipped"):
                state["tokens"] += info.get("tokens", 0)
                dt = time.perf_counter() - state["t0"]
                prog.update(state["task"], advance=info["records"], rate=f"{state['tokens'] / max(dt, 1e-9):,.0f} tok/s")

        try:
            result = embed_corpus(corpus_dir, out, settings, progress=on_event)
        finally:
            prog.stop()
    except CLI_ERRORS as e:
        _fail(error_line(e))
        return
    except KeyboardInterrupt:
        _fail("interrupted: every committed batch is kept; run the same command again to continue", 130)
        return
    skipped = sum(result.skipped.values())
    print(
        f"{result.path}: {result.written} records written this run, {result.already} before; "
        f"{result.truncated} truncated, {skipped} skipped{f' {dict(result.skipped)}' if skipped else ''}; "
        f"padding {result.padding_fraction:.1%}; {'complete' if result.complete else 'INCOMPLETE'}",
        file=sys.stderr,
    )


@app.command("probe")
def probe_cmd(
    store: Path = typer.Argument(..., help="A store (.h5) from `codejepa embed run`."),
    out: Path = typer.Option(None, "--out", help="The probe view (default: STORE with .probe.h5); resumed when it exists."),
    probes: int = typer.Option(4, "--probes", help="How many fixed train bodies to read after each record's inputs."),
    seed: int = typer.Option(7, "--seed", help="Which train bodies (of 40–80 tokens) are the probes."),
    splits: Path = typer.Option(None, "--splits", help="A split file of `codejepa corpus folds`: probes from its train part "
                                                       "(one view per fold, each with its own --out)."),
    teacher: str = typer.Option(None, "--teacher", help="The store's teacher, if its recorded name no longer resolves (checked by weight hash)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]"),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto | float32 | bfloat16 | float16."),
    batch_tokens: int = typer.Option(None, "--batch-tokens", help="Padded tokens per model batch (default 8192 on CPU, 32768 on CUDA)."),
    shard: str = typer.Option(None, "--shard", help="I/N: the I-th of N contiguous shares of the records into OUT.shard-I-of-N.h5 "
                                                    "(default RANK/WORLD_SIZE when set); join them with `embed merge`."),
) -> None:
    """The probe view: the teacher reads fixed train bodies after each record's inputs.

    `evaluate retrieval --probe` mixes the view into the predictions."""
    try:
        from codejepa.embed.probe import ProbeSettings, compute_probe_view
        from codejepa.embed.run import parse_shard

        settings = ProbeSettings(n_probes=probes, seed=seed, teacher=teacher, device=device, dtype=dtype,
                                 batch_tokens=batch_tokens, splits=str(splits) if splits else None,
                                 shard=parse_shard(shard) if shard else None)
        prog = _progress()
        state: dict[str, Any] = {}

        def on_event(event: str, info: dict[str, Any]) -> None:
            import time

            if event == "start":
                t = info["teacher"]
                prog.console.print(f"teacher {t['teacher']} (layer {t['layer']}, {t['device']}, {t['compute_dtype']}), "
                                   f"{len(info['probes'])} probes → {info['path']}", markup=False)
                if info["already"]:
                    prog.console.print(f"resuming: {info['already']} of {info['records']} records already probed",
                                       markup=False)
                state["task"] = prog.add_task("probing", total=info["records"], completed=info["already"], rate="")
                state["t0"] = time.perf_counter()
                prog.start()
            elif event == "commit":
                dt = time.perf_counter() - state["t0"]
                prog.update(state["task"], advance=info["records"], rate=f"{info['tokens'] / max(dt, 1e-9):,.0f} tok/s")

        try:
            result = compute_probe_view(store, out, settings, progress=on_event)
        finally:
            prog.stop()
    except CLI_ERRORS as e:
        _fail(error_line(e))
        return
    except KeyboardInterrupt:
        _fail("interrupted: every committed batch is kept; run the same command again to continue", 130)
        return
    print(f"{result.path}: {result.written} records probed this run, {result.already} before; "
          f"{result.model_tokens:,} teacher tokens in {result.seconds:.0f} s", file=sys.stderr)


@app.command("merge")
def merge_cmd(
    shards: list[Path] = typer.Argument(..., help="Shard stores from `embed run --shard I/N`, or shard probe views from `embed probe --shard I/N`."),
    out: Path = typer.Option(..., "--out", help="The merged store (or probe view)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Merge even if shards are missing or unfinished (stores only)."),
) -> None:
    """Join shard stores into one store (a copy; resumable), or the shards of a probe view into one view."""
    try:
        from codejepa.embed.merge import merge_stores
        from codejepa.embed.probe import is_probe_view, merge_probe_views
        from codejepa.embed.store import open_store

        views = [is_probe_view(p) for p in shards]
        if any(views):
            if not all(views):
                raise CodejepaError(f"{shards[views.index(False)]}: not a probe view shard, unlike {shards[views.index(True)]}")
            if allow_partial:
                raise CodejepaError("--allow-partial: probe view shards are merged only when all are finished")
            pres = merge_probe_views(shards, out)
            print(f"{pres.path}: probe view of {pres.records} records from {pres.shards} shards", file=sys.stderr)
            return

        total = 0
        for p in shards:
            with open_store(p) as s:
                total += len(s)
        with _progress() as prog:
            task = prog.add_task("merging", total=total, rate="")
            res = merge_stores(shards, out, allow_partial=allow_partial, progress=lambda n: prog.advance(task, n))
    except CLI_ERRORS as e:
        _fail(error_line(e))
        return
    except KeyboardInterrupt:
        _fail("interrupted: every committed batch is kept; run the same command again to continue", 130)
        return
    print(f"{res.path}: {res.records} records from {res.shards} stores ({res.copied} copied now); "
          f"{'complete' if res.complete else 'INCOMPLETE'}", file=sys.stderr)


@app.command("info")
def info_cmd(
    store: Path = typer.Argument(..., help="A store (.h5)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metadata and counts as JSON."),
) -> None:
    """What a store holds and what produced it."""
    try:
        from codejepa.embed.store import open_store

        with open_store(store) as s:
            import numpy as np

            counts = {sp: int(np.count_nonzero(s.splits == sp)) for sp in ("train", "val", "test")}
            info = {
                "path": str(store), "records": len(s),
                "complete": s.complete,
                "checksums": s.checksummed,
                "per_split": counts,
                "truncated": int(s.truncated.sum()),
                "input_tokens": int(s.lengths("inputs").sum()), "body_tokens": int(s.lengths("targets").sum()),
                "meta": json.loads(s.meta.to_json()),
            }
    except CLI_ERRORS as e:
        _fail(error_line(e))
        return
    if as_json:
        print(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(str(store)), show_header=False)
    m = info.pop("meta")
    for k, v in info.items():
        if k == "complete":
            v = {True: "yes", False: "NO: its `embed run` stopped early or is still going", None: "not recorded"}[v]
        if k == "checksums":
            v = "Fletcher-32 per chunk" if v else "none (written before 2026-12-06)"
        if k != "path":
            t.add_row(k, escape(str(v)))
    for k, v in m.items():
        t.add_row(k, escape(json.dumps(v) if isinstance(v, dict) else str(v)))
    Console().print(t)
