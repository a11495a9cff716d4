"""CLI of the evaluate stage (thin: parses arguments, calls library functions)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _callback() -> None:
    """Instance-level retrieval against honest baselines."""


def _fail(msg: str, code: int = 1) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"error: {msg}", style="bold red", soft_wrap=True, markup=False, highlight=False)
    raise typer.Exit(code)


def _out_console():
    """stdout console; the tables need ~150 columns, so a pipe or a file gets that width."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def _parse_compare(spec: Optional[str]) -> list[tuple[str, str]]:
    from codejepa.evaluate.errors import EvaluateError

    if not spec:
        return []
    pairs = []
    for item in spec.split(";"):
        parts = [p.strip() for p in item.split(",")]
        if len(parts) != 2 or not all(parts):
            raise EvaluateError(f"--compare takes A,B (METHOD@SPACE keys, e.g. ridge@whitened,bm25@-), not {item!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


@app.command("retrieval")
def retrieval(
    store: Path = typer.Argument(..., help="The HDF5 store (codejepa embed run)."),
    run: list[Path] = typer.Option([], "--run", help="A predictor run directory (repeatable)."),
    split: str = typer.Option("test", help="Query split: train, val or test."),
    pool: str = typer.Option("split", help="split | all | repo | N (random pools of N, averaged over seeds)."),
    space: str = typer.Option("all", help="raw | centered | whitened | canonical | all, or a comma list."),
    # The names are spaced so that a narrow terminal's help wraps them instead of cutting them short.
    baselines: str = typer.Option("all", help="all | none | a comma list of: random, prototype, signature, ridge, "
                                              "ridge+last, nn, bm25, ridge+bm25, reverse, oracle, noisy_oracle."),
    out: Optional[Path] = typer.Option(None, help="Output folder (retrieval.json, table.txt, ranks.npz, PNGs); "
                                                  "without it the table is printed and nothing is saved "
                                                  "(`evaluate compare` reads a saved folder)."),
    corpus: Optional[Path] = typer.Option(None, help="Corpus folder, when it moved since the store was built."),
    compare: Optional[str] = typer.Option(None, help="Paired bootstrap of A,B (METHOD@SPACE); ';' separates pairs."),
    ridge_input: str = typer.Option("signature", help="Pooled input view for ridge: signature | inputs | context."),
    shrinkage: float = typer.Option(0.1, help="Whitening covariance shrinkage toward the identity."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for the CIs."),
    seeds: str = typer.Option("0,1,2", help="Seeds of the random pools (pool N)."),
    noisy_of: Optional[str] = typer.Option(None, help="Method whose error level the noisy oracle copies "
                                                      "(default: the first run, else ridge)."),
    bm25_query: str = typer.Option("auto", help="BM25 query text: signature | signature+context | auto "
                                                 "(chosen on val)."),
    fuse_bm25: bool = typer.Option(True, "--fuse-bm25/--no-fuse-bm25",
                                   help="Also fuse each run with BM25 (a RUN+bm25 row, weight chosen on val)."),
    hubness: bool = typer.Option(True, "--hubness/--no-hubness",
                                 help="Also score ridge, ridge+last and each run with a hubness correction (CSLS "
                                      "against its train-split predictions; NAME+csls rows, k and β chosen on val)."),
    siblings: bool = typer.Option(True, "--siblings/--no-siblings",
                                  help="Also score BM25 and every BM25-fused row with the sibling softmax (each query "
                                       "competes with its own file's other functions; NAME+sib rows, T and β chosen on val)."),
    sib_fusion: str = typer.Option("inherit", "--sib-fusion", help="Where a BM25-fused row's +sib row takes its "
                                   "fusion weight: inherit (the +bm25 row's) or joint (chosen again with T and β, "
                                   "on the +sib row's own val MRR)."),
    fuse_reverse: bool = typer.Option(False, "--fuse-reverse", help="Also fuse every BM25-fused row's scorer (ridge, "
                                                                    "each run, plain and +csls) with the reverse baseline's "
                                                                    "scores: NAME+rev rows, with +bm25 and +sib of their own."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the PNG plots."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="A split file of `codejepa corpus folds` (one fold) "
                                                                 "instead of the store's own split; runs must share it."),
    probe: Optional[Path] = typer.Option(None, "--probe", help="The store's probe view (`codejepa embed probe`): adds a "
                                                               "NAME+probe row for every run and for ridge+last, and "
                                                               "the view alone as the baseline probe."),
    probe_select: Optional[str] = typer.Option(None, "--probe-select", help="What val scores the probe weight by: chain "
                                               "(the default: the mix's most corrected row, re-ranking included) or "
                                               "plain (its own cosines). Only with --probe."),
    probe_weights: Optional[str] = typer.Option(None, "--probe-weights", help="Comma list of the probe weights val "
                                                "chooses from (default 0, 0.05, …, 0.6, 0.7, …, 1). Only with --probe."),
    rerank: Optional[Path] = typer.Option(None, "--rerank", help="A cross-scorer run (`codejepa predict cross`): adds "
                                                                 "NAME+rerank rows, each row's top K re-scored by it."),
    rerank_k: int = typer.Option(50, "--rerank-k", help="Candidates per query the cross-scorer re-scores."),
    rerank_rows: str = typer.Option("*", "--rerank-rows", help="Comma list of row names or globs to re-rank, e.g. "
                                                               "'*+bm25,*+sib' (rows with a val scorer: bm25, reverse, "
                                                               "+csls, +bm25, +sib)."),
) -> None:
    """Rank each query's true body among the pool's distinct bodies, for every method and space."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from codejepa.core import CLI_ERRORS, error_line
    from codejepa.evaluate.report import render
    from codejepa.evaluate.retrieval import evaluate_retrieval
    from codejepa.progress import Progress

    err = Console(stderr=True)
    try:
        pool_seeds = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        _fail(f"--seeds takes comma-separated integers, not {seeds!r}")
        return
    for flag, given in (("--probe-select", probe_select), ("--probe-weights", probe_weights)):
        if given is not None and probe is None:
            # Not an error: the evaluation is still the one asked for, but a user who meant to
            # mix the probe view in should learn that it was not.
            err.print(f"note: {flag} has no effect without --probe (no probe view is mixed in)",
                      markup=False, highlight=False)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=err, transient=True) as bar:
            job = bar.add_task("evaluating", total=None)
            result = evaluate_retrieval(
                store, run, split=split, pool=pool, spaces=space, baselines=baselines, out_dir=out,
                corpus_dir=corpus, compare=_parse_compare(compare), ridge_input=ridge_input,
                whitening_shrinkage=shrinkage, n_boot=n_boot, pool_seeds=pool_seeds, plots=not no_plots,
                noisy_of=noisy_of, bm25_query=bm25_query, fuse_bm25=fuse_bm25, hubness_correction=hubness,
                sibling_softmax=siblings, sib_fusion=sib_fusion, splits=splits, probe=probe,
                probe_select=probe_select or "chain", probe_weights=probe_weights,
                rerank=rerank, rerank_k=rerank_k,
                rerank_rows=rerank_rows, fuse_reverse=fuse_reverse,
                log=lambda m: bar.update(job, description=escape(m[:70])),
                progress=lambda done, total: bar.update(job, completed=done, total=total),
            )
    except CLI_ERRORS as e:
        _fail(error_line(e))
        return
    except KeyboardInterrupt:
        _fail("interrupted: the results were not saved (or only in part); run the same command again", 130)
        return
    render(result.to_json(), _out_console())
    if result.out_dir is not None:
        err.print(f"wrote {', '.join(result.files.values())}", markup=False, highlight=False, soft_wrap=True)


@app.command("compare")
def compare_cmd(
    out_dir: Path = typer.Argument(..., help="An evaluation's --out folder."),
    a: str = typer.Argument(..., help="METHOD@SPACE, e.g. mlp@whitened."),
    b: str = typer.Argument(..., help="METHOD@SPACE, e.g. ridge@whitened or bm25@-."),
    n_boot: int = typer.Option(2000, help="Bootstrap resamples."),
) -> None:
    """Paired bootstrap (over the same queries, resampling repositories): does A beat B?"""
    from codejepa.core import CLI_ERRORS, error_line
    from codejepa.evaluate.report import compare_saved, comparison_lines

    try:
        c = compare_saved(out_dir, a, b, n_boot=n_boot)
    except CLI_ERRORS as e:
        _fail(error_line(e))
        return
    for line in comparison_lines({"comparisons": [c]}):
        _out_console().print(line, markup=False, highlight=False, soft_wrap=True)
    if c.get("note"):
        print(c["note"], file=sys.stderr)


@app.command("folds")
def folds_cmd(
    eval_dirs: list[Path] = typer.Argument(..., help="The --out folders of each fold's `evaluate retrieval --splits`."),
    out: Optional[Path] = typer.Option(None, help="Folder for folds.json and folds.txt; without it the table is only printed."),
    compare: Optional[str] = typer.Option(None, help="Paired bootstrap of A,B (METHOD@SPACE); ';' separates pairs."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for the CIs."),
) -> None:
    """Pool a cross-validation's folds: one table over every fold's test repositories."""
    from codejepa.core import CLI_ERRORS, error_line
    from codejepa.evaluate.folds import pool_folds, render_folds, write_folds_result
    from codejepa.evaluate.report import check_out_dir

    try:
        if out is not None:
            check_out_dir(out)  # before pooling, not after it
        res = pool_folds(eval_dirs, compare=_parse_compare(compare), n_boot=n_boot)
        files = write_folds_result(res, out) if out is not None else {}
    except CLI_ERRORS as e:
        _fail(error_line(e))
        return
    render_folds(res, _out_console())
    if files:
        from rich.console import Console

        Console(stderr=True).print(f"wrote {', '.join(files.values())}", markup=False, highlight=False, soft_wrap=True)
