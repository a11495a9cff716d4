"""Rendering a retrieval result: rich tables, ``retrieval.json``, ranks for later comparisons."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from codejepa.core import atomic_write_bytes, atomic_write_json
from codejepa.evaluate.errors import EvaluateError
from codejepa.evaluate.metrics import MetricCI, check_n_boot, cis_overlap, paired_bootstrap

RANKS_FILE = "ranks.npz"
JSON_FILE = "retrieval.json"
TABLE_FILE = "table.txt"
# Columns a narrow terminal leaves out, first to last, so that rank@1 and MRR with their CIs
# are never cut short; table.txt (200 columns) keeps them all.
RETRIEVAL_OPTIONAL = ("cos space", "cos raw", "mean rank", "R@100", "R@5", "med rank", "R@10")
DIAGNOSTIC_OPTIONAL = ("hub top10", "centred cos", "R²", "cos→proto", "std ratio", "hub top1", "RankMe pred/tgt")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(m: dict[str, float], pct: bool = True, digits: int = 3) -> str:
    f = _pct if pct else (lambda v: f"{v:.{digits}f}")
    return f"{f(m['value'])} [{f(m['ci_low'])}, {f(m['ci_high'])}]"


def _num(v: Any, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def fit_width(build: Callable[[tuple[str, ...]], Table], optional: Sequence[str], console: Console) -> Table:
    """The fullest version of a table that fits ``console``: ``build(left_out)`` makes the table
    without the named columns, and ``optional`` columns are left out in order until it fits (or
    none is left; the method names then fold). The caption says which ones are missing."""
    for k in range(len(optional) + 1):
        t = build(tuple(optional[:k]))
        # measured without the console's cap, which would clip every table to fit
        if console.measure(t, options=console.options.update_width(1 << 16)).maximum <= console.width:
            break
    if k:
        t.caption = f"{t.caption or ''}\nleft out for this terminal's width: {', '.join(optional[:k])}"
    return t


def add_columns(t: Table, cols: Sequence[str], drop: Collection[str] = (), *,
                left: Collection[str] = ("method", "space")) -> list[bool]:
    """Add the columns of ``cols`` not in ``drop``; the first (the method's name) may fold,
    numbers never wrap. Returns which of ``cols`` were kept, for :func:`add_row`."""
    keep = [c not in drop for c in cols]
    for j, (col, k) in enumerate(zip(cols, keep)):
        if k:
            t.add_column(col, justify="left" if col in left else "right", no_wrap=j > 0,
                         overflow="fold" if j == 0 else "ellipsis", min_width=16 if j == 0 else None)
    return keep


def add_row(t: Table, keep: list[bool], cells: Sequence[str], **kw: Any) -> None:
    """Add a row of one cell per column of :func:`add_columns`, the left-out ones skipped."""
    t.add_row(*(c for c, k in zip(cells, keep) if k), **kw)


def metrics_table(data: dict[str, Any], drop: Collection[str] = ()) -> Table:
    """The retrieval table (metrics with CIs, chance row), built from ``retrieval.json``'s
    content so that a saved result renders the same, without the columns named in ``drop``."""
    pool = data["pool"]
    title = (f"Retrieval on {data['settings']['split']}: {pool['n_queries']} queries from {pool['n_query_repos']} repos, "
             f"pool {pool['label']} (mean {pool['mean_pool_size']:.0f} distinct bodies)")
    # One repository leaves nothing to resample at that level: the bootstrap resamples queries.
    over = "repositories" if pool["n_query_repos"] > 1 else "queries (one repository: optimistic)"
    t = Table(title=title, caption=f"rank@1 / recall in %, 95% CIs over {over}; ties pessimistic")
    keep = add_columns(t, ("method", "space", "rank@1", "R@5", "R@10", "R@100", "MRR", "med rank", "mean rank",
                            "cos raw", "cos space"), drop)
    ch = pool["chance"]
    add_row(t, keep, ("chance", "", _pct(ch["rank@1"]), _pct(ch["recall@5"]), _pct(ch["recall@10"]),
                   _pct(ch["recall@100"]), f"{ch['mrr']:.3f}", f"{ch['median_rank']:.0f}", f"{ch['mean_rank']:.0f}",
                   "", ""), style="dim")
    for r in data["rows"]:
        m, d = r["metrics"], r["diagnostics"] or {}
        style = "bold red" if r["warning"] else ("bold" if r["kind"] == "run" else None)
        add_row(t, keep, (r["method"], r["space"], _ci(m["rank@1"]), _pct(m["recall@5"]["value"]),
                       _pct(m["recall@10"]["value"]), _pct(m["recall@100"]["value"]), _ci(m["mrr"], pct=False),
                       f"{m['median_rank']['value']:.0f}", f"{m['mean_rank']['value']:.1f}",
                       _num(d.get("cosine_raw")), _num(d.get("cosine_space"))), style=style)
    return t


def diagnostics_table(data: dict[str, Any], drop: Collection[str] = ()) -> Table:
    """The collapse diagnostics table without the columns named in ``drop``."""
    dt = Table(title="Collapse diagnostics (predictions vs targets)",
               caption="pairwise cos: mean cosine between different queries; std ratio: per-dimension std of "
                       "predictions / targets; RankMe: effective rank; hub: share of top-1 wins of the top winner")
    dkeep = add_columns(dt, ("method", "space", "pairwise cos pred/tgt", "std ratio", "RankMe pred/tgt", "cos→proto",
                              "R²", "centred cos", "hub top1", "hub top10"), drop)
    for r in data["rows"]:
        d, h = r["diagnostics"], r["hubness"] or {}
        if d is None and not h:
            continue
        d = d or {}
        top10 = next((v for k, v in h.items() if k.startswith("top") and k.endswith("winners_share")), None)
        add_row(dt, dkeep, (r["method"], r["space"],
                         f"{_num(d.get('pairwise_cosine_pred'))} / {_num(d.get('pairwise_cosine_target'))}",
                         _num(d.get("std_ratio_mean")),
                         f"{_num(d.get('rankme_pred'), 1)} / {_num(d.get('rankme_target'), 1)}",
                         _num(d.get("cosine_to_prototype_raw")), _num(d.get("r2")), _num(d.get("centred_cosine")),
                         _num(h.get("top1_winner_share")), _num(top10)),
             style="bold red" if r["warning"] else None)
    return dt


def comparison_lines(data: dict[str, Any]) -> list[str]:
    out = []
    for c in data.get("comparisons", []):
        for res in c["results"]:
            verdict = ("A better" if res["diff"] > 0 else "B better") if res["p_value"] < 0.05 else "no significant difference"
            if res["metric"] in ("median_rank", "mean_rank") and res["p_value"] < 0.05:
                verdict = "A better" if res["diff"] < 0 else "B better"
            ov = (c.get("cis_overlap") or {}).get(res["metric"])
            out.append(f"{c['a']} vs {c['b']}: {res['metric']} {res['a']:.4f} vs {res['b']:.4f}, "
                       f"diff {res['diff']:+.4f} [{res['ci_low']:+.4f}, {res['ci_high']:+.4f}], "
                       f"p = {res['p_value']:.4f} ({verdict}){cluster_wins(res)}"
                       + ("" if ov is None else ("; their own CIs overlap" if ov else "; their own CIs do not overlap")))
    return out


def cluster_wins(res: dict[str, Any]) -> str:
    """"; A better in 7 of 8 repositories, B in 1" (absent from results saved before it was kept)."""
    if "clusters_a_better" not in res:
        return ""
    unit = res.get("cluster_unit", "repository")
    plural = {"repository": "repositories", "query": "queries"}.get(unit, unit + "s")
    return f"; A better in {res['clusters_a_better']} of {res['n_clusters']} {plural}, B in {res['clusters_b_better']}"


def render(data: dict[str, Any], console: Console) -> None:
    console.print(fit_width(lambda drop: metrics_table(data, drop), RETRIEVAL_OPTIONAL, console))
    console.print(fit_width(lambda drop: diagnostics_table(data, drop), DIAGNOSTIC_OPTIONAL, console))
    plain = {"soft_wrap": True, "markup": False, "highlight": False}
    for line in comparison_lines(data):
        console.print(line, **plain)
    for n in data.get("notes", []):
        console.print(f"note: {n}", style="yellow", **plain)
    for w in data.get("warnings", []):  # the collapse flags say WARNING themselves; a pipe shows no colour
        console.print(w if w.startswith("WARNING") else f"warning: {w}", style="bold red", **plain)


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Refuse an output folder that cannot be made or written, before any work is done: the
    evaluation it would hold is lost when writing fails at the end."""
    out = Path(out_dir)
    near = out
    while not (near.exists() or near.is_symlink()) and near != near.parent:
        near = near.parent
    if not near.is_dir():
        where = "exists and is not a folder" if near == out else f"cannot be made: {near} is not a folder"
        raise EvaluateError(f"--out {out} {where}; give a new or an existing folder")
    if not os.access(near, os.W_OK | os.X_OK):
        raise EvaluateError(f"--out {out}: {near} is not writable; give a folder you can write to")
    return out


def write_outputs(result: Any, out_dir: Path, *, plots: bool = True) -> dict[str, str]:
    """Write retrieval.json, ranks.npz, table.txt and the plots into ``out_dir``."""
    try:
        return _write_outputs(result, out_dir, plots=plots)
    except OSError as e:  # a full disk or a folder removed meanwhile: one line, not a traceback
        raise EvaluateError(f"{out_dir}: cannot write the results ({e})") from None


def _write_outputs(result: Any, out_dir: Path, *, plots: bool) -> dict[str, str]:
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = result.to_json()
    files = {"json": str(out_dir / JSON_FILE), "ranks": str(out_dir / RANKS_FILE), "table": str(out_dir / TABLE_FILE)}
    # The figures first, the plots after them, retrieval.json last: an interrupted write leaves
    # the ranks and the table, and retrieval.json only once everything is there. An earlier
    # evaluation's retrieval.json goes first, or it would describe the new ranks beside it.
    from codejepa.evaluate.plots import PROJECTION_PLOT, RANK_PLOT

    # So are its plots: kept beside a --no-plots evaluation (or one without projections) they
    # would show the earlier figures as this one's.
    for name in (JSON_FILE, RANK_PLOT, PROJECTION_PLOT):
        (out_dir / name).unlink(missing_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, __clusters__=np.asarray(result.rows[0].clusters if result.rows else [], dtype=str),
                        **{r.key: r.ranks for r in result.rows})
    atomic_write_bytes(out_dir / RANKS_FILE, buf.getvalue())
    sio = io.StringIO()
    render(data, Console(file=sio, width=200, color_system=None))
    atomic_write_bytes(out_dir / TABLE_FILE, sio.getvalue().encode())
    if plots:
        from codejepa.evaluate.plots import plot_projection, plot_rank_distribution

        files["rank_plot"] = str(plot_rank_distribution(data, result.rows, out_dir))
        proj = plot_projection(result.projections, out_dir)
        if proj is not None:
            files["projection_plot"] = str(proj)
    data["files"] = files
    atomic_write_json(out_dir / JSON_FILE, data)
    result.out_dir, result.files = out_dir, files
    return files


def damaged_error(p: Path, out_dir: str | Path, why: str) -> EvaluateError:
    """The one line for a damaged or foreign file of an evaluation's folder."""
    return EvaluateError(f"{p}: damaged or not an evaluation's file ({why}); re-run "
                         f"`codejepa evaluate retrieval ... --out {out_dir}`")


def load_result(out_dir: str | Path) -> dict[str, Any]:
    """``retrieval.json`` of an evaluation's folder; a damaged or foreign file is refused."""
    p = Path(out_dir) / JSON_FILE
    if not p.is_file():
        raise EvaluateError(f"{p}: no retrieval result here (run `codejepa evaluate retrieval ... --out {out_dir}`)")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise damaged_error(p, out_dir, f"unreadable JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != "codejepa-retrieval":
        raise damaged_error(p, out_dir, "not a codejepa-retrieval result")
    missing = [k for k in ("settings", "store", "pool") if not isinstance(data.get(k), dict)]
    if missing:
        raise damaged_error(p, out_dir, f"no {', '.join(missing)} section")
    return data


def load_ranks(out_dir: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The saved per-query ranks of every ``METHOD@SPACE`` row of an evaluation, and each
    query's repository; a damaged or foreign ``ranks.npz`` is refused in one line."""
    p = Path(out_dir) / RANKS_FILE
    if not p.is_file():
        raise EvaluateError(f"{p}: no saved ranks here (run `codejepa evaluate retrieval ... --out {out_dir}`)")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    # A damaged zip fails in many ways (BadZipFile, zlib.error, ValueError, OSError); an empty
    # file raises EOFError, which click would turn into a bare "Aborted."; a plain .npy has no
    # context manager (AttributeError/TypeError).
    except Exception as e:
        raise damaged_error(p, out_dir, f"{type(e).__name__}: {e}") from None
    clusters = arrays.pop("__clusters__", None)
    if clusters is None or clusters.ndim != 1 or clusters.dtype.kind not in "US":
        raise damaged_error(p, out_dir, "no repository of each query")
    for k, r in arrays.items():
        if r.shape != clusters.shape or r.dtype.kind not in "iu" or (len(r) and r.min() < 1):
            raise damaged_error(p, out_dir, f"{k!r} is not one 1-based rank per query")
    return arrays, clusters.astype(str)


def compare_saved(out_dir: str | Path, a: str, b: str, *, n_boot: int = 2000, seed: int = 0,
                  metrics: tuple[str, ...] = ("rank@1", "mrr")) -> dict[str, Any]:
    """Paired bootstrap of two saved methods (``METHOD@SPACE`` keys) of one evaluation."""
    check_n_boot(n_boot)
    ranks, cl = load_ranks(out_dir)
    for k in (a, b):
        if k not in ranks:
            raise EvaluateError(f"no saved result {k!r}; available: {', '.join(sorted(ranks))}")
    comps = paired_bootstrap(ranks[a], ranks[b], cl, metrics=metrics, n_boot=n_boot, seed=seed)
    out: dict[str, Any] = {"a": a, "b": b, "results": [c.to_json() for c in comps]}
    cis, why = _saved_cis(out_dir)
    if a in cis and b in cis:
        out["cis_overlap"] = cis_overlap(cis[a], cis[b], metrics)
    elif why:
        out["note"] = why
    return out


def _saved_cis(out_dir: str | Path) -> tuple[dict[str, dict[str, MetricCI]], str | None]:
    """Each saved row's own intervals as the evaluation reported them, and why there are none
    where ``retrieval.json`` is missing or damaged (the paired figures need only the ranks)."""
    try:
        rows = load_result(out_dir).get("rows") or []
        return {f"{r['method']}@{r['space']}": {m: MetricCI(v["value"], v["ci_low"], v["ci_high"])
                                                for m, v in r["metrics"].items()} for r in rows}, None
    except (EvaluateError, KeyError, TypeError, AttributeError) as e:
        what = str(e) if isinstance(e, EvaluateError) else f"{Path(out_dir) / JSON_FILE}: damaged ({type(e).__name__})"
        return {}, f"note: whether the rows' own CIs overlap is not said: {what}"
