"""``evaluate_retrieval``: every method, in every space, in one pool, with CIs and diagnostics.

A *method* is anything that produces query vectors (in teacher space) or scores for the
query split's functions: trained predictors (``--run``) and the baselines alike. Each is
searched exactly against the pool's distinct bodies, and reported beside the train-mean
prototype and a random ranking, with a warning when it does not clear them.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from codejepa.core import CodejepaError, cached_sha256_file, code_version, library_versions, sha256_file
from codejepa.evaluate.baselines import FUSION_WEIGHTS, RIDGE_ALPHAS, BM25Scorer, RidgeFit, parse_baselines
from codejepa.evaluate.diagnostics import collapse_warning
from codejepa.evaluate.errors import EvaluateError
from codejepa.evaluate.hubness import CSLS_BETAS, CSLS_KS
from codejepa.evaluate.hubness import SUFFIX as CSLS_SUFFIX
from codejepa.evaluate.metrics import MetricCI, PairedComparison, check_n_boot, cis_overlap, paired_bootstrap
from codejepa.evaluate.pools import PoolSpec, Task, build_task, parse_pool, search_task
from codejepa.evaluate.probe import Memo, ProbeMix
from codejepa.evaluate.probe import weight_grid as probe_weight_grid
from codejepa.evaluate.probe import SELECT as PROBE_SELECT
from codejepa.evaluate.probe import SUFFIX as PROBE_SUFFIX
from codejepa.evaluate.probe import VIEW_ROW as PROBE_VIEW_ROW
from codejepa.evaluate.rerank import DEFAULT_K as DEFAULT_RERANK_K
from codejepa.evaluate.rerank import POOLS as RERANK_POOLS
from codejepa.evaluate.rerank import RERANK_WEIGHTS, Reranker
from codejepa.evaluate.rows import (
    FUSED_SUFFIX,
    NO_SPACE,
    RESERVED_SUFFIXES,
    MethodRow,
    RowWriter,
    reverse_rows,
    selection_mrr,
)
from codejepa.evaluate.search import SCORE_SAMPLE, DenseScorer, SearchResult, materialized, unit_rows
from codejepa.evaluate.siblings import SIB_BETAS, SIB_FUSION, SIB_TEMPERATURES
from codejepa.evaluate.siblings import SUFFIX as SIB_SUFFIX
from codejepa.evaluate.spaces import SPACE_NAMES, Space, fit_space
from codejepa.evaluate.vector_rows import VectorInputs, space_rows
from codejepa.predict.lexical import BM25_B, BM25_K1

Log = Callable[[str], None]
REFERENCE_BASELINES = ("prototype", "random")
NOT_FLAGGED = ("prototype", "random", "oracle")


# -- inputs -----------------------------------------------------------------------------------
@dataclass
class CorpusView:
    """What evaluation needs from the corpus, per store index."""

    labels: np.ndarray  # normalised body hash (duplicate bodies share one)
    query_texts: list[str]  # signature + file context (BM25 queries)
    signature_texts: list[str]  # the signature alone (decorators, def line, docstring)
    body_texts: list[str]  # BM25 documents
    files: np.ndarray  # "repo/path" of each record's source file (the sibling softmax's groups)
    corpus_dir: str
    corpus_fingerprint: str
    verified: bool = True  # False when the store recorded no manifest hash to check against


def load_corpus_view(store: Any, corpus_dir: str | os.PathLike[str] | None = None) -> CorpusView:
    """Join the corpus records to the store's record ids; refuse a corpus the store was not
    built from (manifest hash mismatch)."""
    from codejepa.corpus.records import corpus_fingerprint, is_corpus_of, load_records, read_manifest

    d = Path(corpus_dir if corpus_dir else store.meta.corpus_dir or "")
    manifest = d / "manifest.json"
    if not str(d) or not manifest.is_file():
        raise EvaluateError(
            f"corpus of the store not found at {str(d) or '(unrecorded)'}: pass --corpus DIR "
            "(body texts are needed for BM25 and to merge duplicate bodies)"
        )
    try:
        sha = corpus_fingerprint(read_manifest(d))
    except CodejepaError as e:
        raise EvaluateError(str(e)) from None
    want = store.meta.corpus_manifest_hash
    if not is_corpus_of(d, sha, want):
        raise EvaluateError(
            f"{manifest}: corpus fingerprint {sha[:12]}… differs from the store's {want[:12]}…; "
            "this corpus is not the one the store was embedded from"
        )
    pos = store.index_of()
    n = len(store.ids)
    labels = np.empty(n, dtype=object)
    qt: list[str] = [""] * n
    st: list[str] = [""] * n
    bt: list[str] = [""] * n
    files = np.empty(n, dtype=object)
    found = np.zeros(n, dtype=bool)
    try:
        for rec in load_records(d, include_dropped=True):
            i = pos.get(rec.id)
            if i is None:
                continue
            labels[i] = rec.body_hash or f"id:{rec.id}"
            ctx = rec.context_text()
            qt[i] = rec.signature + ("\n" + ctx if ctx else "")
            st[i] = rec.signature
            bt[i] = rec.body
            files[i] = rec.source_file
            found[i] = True
    except CodejepaError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise EvaluateError(f"{d}: unreadable corpus ({e})") from None
    if not found.all():
        missing = store.ids[~found]
        raise EvaluateError(
            f"{len(missing)} store record(s) are not in the corpus at {d} (first: {missing[0]}); "
            "wrong corpus for this store"
        )
    return CorpusView(labels, qt, st, bt, files, str(d), sha, verified=bool(want))


# -- results ----------------------------------------------------------------------------------
@dataclass
class RetrievalResult:
    """One evaluation: a row per method × space (ranks, metrics with CIs, diagnostics), the
    paired comparisons, warnings and notes for the reader, the settings, store, runs and pool it
    was made with; :meth:`row` finds a row, ``files`` names what was written."""

    rows: list[MethodRow]
    comparisons: list[dict[str, Any]]
    warnings: list[str]
    notes: list[str]
    settings: dict[str, Any]
    store: dict[str, Any]
    runs: list[dict[str, Any]]
    pool_stats: dict[str, Any]
    out_dir: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    # Query and target vectors of a few methods, for the 2-D projection plot.
    projections: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    spaces: dict[str, Space] = field(default_factory=dict)  # as fitted on train

    def row(self, method: str, space: str) -> MethodRow:
        for r in self.rows:
            if r.method == method and r.space == space:
                return r
        raise KeyError(f"{method}@{space}")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "codejepa-retrieval", "format_version": 1,
            "settings": self.settings, "store": self.store, "runs": self.runs,
            "pool": self.pool_stats, "rows": [r.to_json() for r in self.rows],
            "comparisons": self.comparisons, "warnings": self.warnings, "notes": self.notes,
        }


# -- runs ---------------------------------------------------------------------------------------
@dataclass
class LoadedRun:
    name: str
    run_dir: str
    predictor: Any
    info: dict[str, Any]


def _checkpoint_hashes(run_dir: Path) -> dict[str, str]:
    out = {}
    for p in sorted(run_dir.rglob("*")):
        if p.is_file() and p.suffix in (".pt", ".safetensors", ".bin", ".ckpt"):
            out[str(p.relative_to(run_dir))] = sha256_file(p)
    return out


def load_runs(run_dirs: Sequence[str | os.PathLike[str]], store: Any) -> list[LoadedRun]:
    """Load predictors and refuse any trained against another store (fingerprint mismatch)."""
    if not run_dirs:
        return []
    try:
        from codejepa.predict import load_predictor
    except ImportError as e:
        raise EvaluateError(f"cannot evaluate --run: the predict stage is not available ({e})") from None
    fp = store.fingerprint()
    runs, names = [], set()
    for rd in run_dirs:
        rd = Path(rd)
        if not rd.is_dir():
            raise EvaluateError(f"{rd}: a file, not a run directory (--run takes a `predict train --out` folder)"
                                if rd.is_file() else f"{rd}: no such run directory")
        try:
            p = load_predictor(rd, device="cpu")
        except CodejepaError:
            raise
        except Exception as e:  # a foreign or damaged run: one line, not a traceback
            raise EvaluateError(f"{rd}: cannot load a predictor ({type(e).__name__}: {e})") from None
        if p.store_fingerprint != fp:
            raise EvaluateError(
                f"{rd}: trained against store fingerprint {str(p.store_fingerprint)[:12]}…, but {store.path} "
                f"is {fp[:12]}… ({_mismatch(rd, store)}); evaluate it on the store and split it was trained on"
            )
        name = str(p.name)
        if name in names or name in parse_baselines("all") or name.endswith(RESERVED_SUFFIXES):
            name = f"run:{name}"  # "+bm25"/"+csls" names are derived rows'; a run must not take one
        k = 2
        while name in names:
            name, k = f"{p.name}#{k}", k + 1
        names.add(name)
        runs.append(LoadedRun(name, str(rd), p, {
            "name": name, "run_dir": str(rd.resolve()), "store_fingerprint": p.store_fingerprint,
            "checkpoint_sha256": _checkpoint_hashes(rd), "notes": _run_notes(rd, name, store),
        }))
    return runs


def _mismatch(run_dir: Path, store: Any) -> str:
    """Why a run does not fit ``store``, from its run.json (see :func:`codejepa.predict.train.store_mismatch`)."""
    from codejepa.predict.train import run_record, store_mismatch

    info = run_record(run_dir)
    if not info:
        return "other teacher, layer, template, target mode, corpus or --splits file"
    return store_mismatch(info, store, "evaluation")


def _probe_trained_note(run: LoadedRun, probe: Any) -> list[str]:
    """A run trained for the probe mix (``loss.probe_weight``), evaluated without ``--probe``:
    its own row ranks a residual meant to complement the view, not a prediction of the body."""
    w = run.predictor.config.loss.probe_weight
    if probe is not None or not w:
        return []
    return [f"run {run.name} was trained to be mixed with its probe view (loss.probe_weight = {w:g}): its row "
            f"alone is not what it was trained for; add --probe for its {run.name}{PROBE_SUFFIX} rows"]


def _run_notes(run_dir: Path, name: str, store: Any) -> list[str]:
    """What a reader of a run's row must know about how the run came to be: trained on another
    store of the same fingerprint (another window, other records) or while its store was
    unfinished (it saw other train records than the baselines are fitted on), or stopped
    before its last epoch (its best.pt is the best of the epochs it had)."""
    from codejepa.predict.config import read_run_config
    from codejepa.predict.train import read_log, run_record, store_values, values_differ

    notes = []
    info = run_record(run_dir)
    n_train, trained_on = int((store.splits == "train").sum()), info.get("train_records", "?")
    then = info.get("store_meta") if isinstance(info.get("store_meta"), dict) else {}
    # The fingerprint (teacher, layer, template, corpus) agrees; the window, the dtypes or the
    # records may not, on another store or on this one embedded again at the same path.
    differ = values_differ(then, store_values(store.meta))
    other_path = bool(info.get("store")) and Path(str(info["store"])) != Path(store.path).resolve()
    if differ or (other_path and trained_on != n_train):
        where = (f"another store ({info['store']}: " if other_path
                 else f"{store.path} as it was before it was embedded again (")
        notes.append(f"run {name} was trained on {where}{trained_on} train records, this one has {n_train}"
                     f"{'; ' + ', '.join(differ) if differ else ''}): its statistics and inputs are that "
                     "store's, the baselines are fitted on this one")
    elif info.get("store_complete") is False:
        notes.append(f"run {name} was trained while its store was unfinished, on {trained_on} "
                     f"train records; the store now has {n_train}, and the baselines are fitted on them")
    try:
        events = [e for e in read_log(run_dir / "log.jsonl") if isinstance(e, dict)]
    except OSError:
        return notes
    if events and not any(e.get("event") == "done" for e in events):
        epochs = [e.get("epoch") for e in events if e.get("event") == "epoch"]
        try:  # config.json: the plan as last resumed (best.pt's copy may predate a longer resume)
            planned: Any = read_run_config(run_dir / "config.json").train.epochs
        except CodejepaError:
            planned = "?"
        notes.append(f"run {name} stopped before its end (epoch {max(epochs, default=0)} of {planned}; no `done` in "
                     "its log): its best.pt is the best of the epochs it had (`predict train --resume` finishes it)")
    return notes


class _FnPredictor:
    def __init__(self, fn: Callable[[Any, np.ndarray], np.ndarray]) -> None:
        self.fn = fn

    def predict_pooled(self, store: Any, idx: np.ndarray) -> np.ndarray:
        return self.fn(store, idx)


def _predict(run: LoadedRun, store: Any, idx: np.ndarray) -> np.ndarray:
    try:
        out = np.asarray(run.predictor.predict_pooled(store, idx), dtype=np.float32)
    except CodejepaError:
        raise
    except Exception as e:
        raise EvaluateError(f"{run.run_dir}: prediction failed ({type(e).__name__}: {e})") from None
    if out.shape != (len(idx), store.meta.hidden_size):
        raise EvaluateError(
            f"{run.run_dir}: predictions have shape {out.shape}, expected {(len(idx), store.meta.hidden_size)}"
        )
    if not np.all(np.isfinite(out)):
        raise EvaluateError(f"{run.run_dir}: predictions contain NaN/inf")
    return out


# -- evaluation -----------------------------------------------------------------------------------
def _selection_split(store: Any, train_idx: np.ndarray, val_idx: np.ndarray, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices to fit baselines on, and to choose their hyper-parameters on.

    Normally train and val. Without a usable val split, the last fifth of the train
    repositories (in sorted order) is held out for selection instead, and a note says so.
    """
    if len(val_idx) >= 2:
        return train_idx, val_idx
    repos = np.unique(store.repos[train_idx].astype(str))
    if len(repos) >= 2:
        held = set(repos[-max(1, len(repos) // 5):])
        sel = np.array([r in held for r in store.repos[train_idx].astype(str)])
        notes.append(f"no val split: hyper-parameters chosen on {len(held)} held-out train repo(s)")
        return train_idx[~sel], train_idx[sel]
    notes.append("no val split and a single train repo: hyper-parameters chosen on train itself (optimistic)")
    return train_idx, train_idx


def evaluate_retrieval(
    store_path: str | os.PathLike[str],
    runs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] = (),
    *,
    split: str = "test",
    pool: str | int = "split",
    spaces: Sequence[str] | str = "all",
    baselines: Sequence[str] | str | None = "all",
    out_dir: str | os.PathLike[str] | None = None,
    corpus_dir: str | os.PathLike[str] | None = None,
    compare: Sequence[tuple[str, str]] = (),
    ridge_input: str = "signature",
    whitening_shrinkage: float = 0.1,
    n_boot: int = 1000,
    seed: int = 0,
    pool_seeds: tuple[int, ...] = (0, 1, 2),
    plots: bool = True,
    methods: Mapping[str, Callable[[Any, np.ndarray], np.ndarray]] | None = None,
    noisy_of: str | None = None,
    bm25_query: str = "auto",
    fuse_bm25: bool = True,
    hubness_correction: bool = True,
    sibling_softmax: bool = True,
    sib_fusion: str = "inherit",
    splits: str | os.PathLike[str] | None = None,
    probe: str | os.PathLike[str] | None = None,
    probe_select: str = "chain",
    probe_weights: Sequence[float] | str | None = None,
    rerank: str | os.PathLike[str] | None = None,
    rerank_k: int = DEFAULT_RERANK_K,
    rerank_rows: Sequence[str] | str = "*",
    fuse_reverse: bool = False,
    log: Log | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RetrievalResult:
    """Evaluate runs and baselines by exact retrieval; write ``retrieval.json`` (and plots)
    to ``out_dir`` when given. Raises :class:`EvaluateError` with one line on bad input.

    ``log`` receives a line per step and ``progress`` (rows done, rows expected) after each
    method × space row, for a progress bar. ``noisy_of`` names the vector method whose per-query error norm the noisy oracle copies
    (default: the first run, else ridge). ``methods`` adds query-vector methods beside the runs: ``name → f(store, indices)``
    returning raw teacher-space predictions ``[len(indices), hidden_size]`` of the bodies.
    With ``fuse_bm25`` (and BM25 among the baselines) every run and method also gets a
    ``NAME+bm25`` row: its scores fused with BM25's as ridge+bm25 is, the weight chosen on val.
    With ``hubness_correction``, ridge, ridge+last and every run and method also get a ``NAME+csls`` row
    in each space but raw: cosine minus β × the candidate's hubness against the method's own
    train-split predictions (see :mod:`codejepa.evaluate.hubness`), k and β chosen on val.
    With ``sibling_softmax``, BM25 and every BM25-fused row (runs and baselines alike) also get a
    ``NAME+sib`` row: each query competes for a candidate with the other queries of its own source
    file (see :mod:`codejepa.evaluate.siblings`), T and β chosen on val; ``sib_fusion`` says where a
    BM25-fused row's ``+sib`` row takes its fusion weight from: ``inherit`` (the ``+bm25`` row's)
    or ``joint`` (chosen again with T and β, on the ``+sib`` row's own val MRR).
    ``splits``: a split file (``codejepa corpus folds``) replacing the store's own split; runs must
    have been trained with the same file. Pool the folds' results with :func:`pool_folds`.
    ``probe``: the store's probe view (``codejepa embed probe``); every run and method, and ridge+last,
    then also gets a ``NAME+probe`` method: its predictions mixed with the probe view at a weight
    chosen on val (see :mod:`codejepa.evaluate.probe`), with every correction the others get;
    ``probe_select`` says what val scores the weight by: ``chain`` (the mix's most corrected row,
    with every correction and the re-ranking) or ``plain`` (its own cosines); ``probe_weights`` the
    weights it chooses from (default :data:`~codejepa.evaluate.probe.PROBE_WEIGHTS`).
    ``rerank``: a cross-scorer run (``codejepa predict cross``) trained on this store; every row
    with a selection-split scorer (BM25, reverse, and the ``+csls``, ``+bm25`` and ``+sib`` rows)
    whose name matches a ``rerank_rows`` glob then also gets ``NAME+rerank``: its top
    ``rerank_k`` candidates re-scored, the weight chosen on val (see :mod:`codejepa.evaluate.rerank`;
    split and all pools only).
    ``fuse_reverse`` (needs the ``reverse`` baseline): every row fused with BM25 above — ridge,
    each run and method, plain and ``+csls`` — also gets ``NAME+rev``, its scores fused with
    reverse's (the pair scored in both directions; weight chosen on val), with ``+bm25`` and
    ``+sib`` rows of its own.
    """
    from codejepa.embed.store import open_store

    say = log or (lambda _m: None)
    if isinstance(runs, (str, os.PathLike)):  # one run folder (iterated, a string would be its characters)
        runs = [runs]
    space_names, names, pspec = _checked_arguments(spaces, baselines, ridge_input, bm25_query, pool, pool_seeds,
                                                   n_boot, out_dir)
    if not names and not runs and not methods:
        raise EvaluateError("nothing to evaluate: no --run and --baselines none")
    if sib_fusion not in SIB_FUSION:
        raise EvaluateError(f"--sib-fusion must be one of {', '.join(SIB_FUSION)}, not {sib_fusion!r}")
    if probe_select not in PROBE_SELECT:
        raise EvaluateError(f"--probe-select must be one of {', '.join(PROBE_SELECT)}, not {probe_select!r}")
    try:
        probe_grid = probe_weight_grid(probe_weights)
    except ValueError as e:
        raise EvaluateError(str(e)) from None
    if fuse_reverse and "reverse" not in names:
        raise EvaluateError("--fuse-reverse fuses rows with the reverse baseline: add reverse to --baselines")
    if fuse_reverse and not (fuse_bm25 and {"bm25", "ridge+bm25"} & set(names)):
        # Otherwise the flag would silently add nothing: only BM25-fused rows get +rev.
        raise EvaluateError("--fuse-reverse adds +rev to the rows fused with BM25: add bm25 to --baselines "
                            "and leave out --no-fuse-bm25")
    notes: list[str] = []
    split_file: dict[str, Any] | None = None

    store = open_store(store_path)
    try:
        meta = store.meta
        notes += _store_notes(store, say)
        if splits is not None:
            split_file = _use_split_file(store, splits, notes)
        loaded = load_runs(runs, store)
        for r in loaded:
            for note in r.info["notes"] + _probe_trained_note(r, probe):
                notes.append(note)
                say(f"note: {note}")
        mixes: dict[str, ProbeMix] = {}
        method_kinds: dict[str, str] = {}  # methods that are baselines (ridge+last+probe, probe)
        probe_info: dict[str, Any] = {}
        if probe is not None:
            loaded, methods, mixes, probe_info = _with_probe_mixes(probe, store, split, names, loaded, methods)
            method_kinds = {f"ridge+last{PROBE_SUFFIX}": "baseline", PROBE_VIEW_ROW: "baseline"}
        method_runs = _method_runs(methods or {}, loaded)
        say(f"reading corpus texts and pooling {len(store)} stored records")
        cv = load_corpus_view(store, corpus_dir)
        if not cv.verified:
            notes.append(f"the store records no corpus manifest hash: {cv.corpus_dir} could not be verified as its corpus")
        all_idx = np.arange(len(store))
        bodies, sigs, ridge_x, last_x = _pooled_inputs(store, names, space_names, ridge_input)
        need_sig = sigs is not None
        train_idx, val_idx, q_idx = store.indices("train"), store.indices("val"), store.indices(split)
        if len(q_idx) == 0:
            raise EvaluateError(f"the {split} split has no records in {store.path}")
        if len(train_idx) < 2 and (set(space_names) - {"raw"} or {"prototype", "ridge", "nn"} & set(names)):
            raise EvaluateError(f"{store.path}: fewer than 2 train records; train-split statistics cannot be fitted")
        need_ridge = need_sig and bool({"ridge", "ridge+bm25"} & set(names) or (
            "noisy_oracle" in names and (noisy_of == "ridge" or (noisy_of is None and not loaded and not methods))))
        need_bm25 = bool({"bm25", "ridge+bm25"} & set(names))
        fuse_runs = fuse_bm25 and need_bm25 and bool(loaded or methods)
        hub_spaces = [s for s in space_names if s != "raw"] if hubness_correction else []
        hub_methods = ([r.name for r in loaded] + list(methods or {})
                       + [n for n in ("ridge", "ridge+last") if n in names and need_sig]) if hub_spaces else []
        need_sel = (need_ridge or "ridge+last" in names or "reverse" in names or fuse_runs or (need_bm25 and bm25_query == "auto")
                    or bool(hub_methods) or bool(mixes))
        fit_idx, sel_idx = _selection_split(store, train_idx, val_idx, notes) if need_sel else (train_idx, val_idx)
        notes += _query_split_notes(split, store.repos[q_idx], selects=need_sel or bool(loaded))

        task = build_task(split, pspec, q_idx, store.repos, cv.labels, all_idx)
        if pspec.kind == "random" and pspec.size > task.groups.n_groups:
            notes.append(f"--pool {pspec.size} is more than the {task.groups.n_groups} distinct bodies there are: "
                         f"each pool holds all of them (as --pool split)")
        sel_task = build_task("selection", PoolSpec("split"), sel_idx, store.repos, cv.labels) if need_sel else None
        say(f"{task.n_queries} queries against {task.groups.n_groups} distinct bodies "
            f"({len(task.cand_idx)} candidates, pool {pspec.label})")
        spaces_fit: dict[str, Space] = {
            s: fit_space(s, bodies[train_idx], shrinkage=whitening_shrinkage,
                         train_inputs=last_x[train_idx] if s == "canonical" else None) for s in space_names}
        space_warnings = [w for sp_ in spaces_fit.values() if (w := sp_.settings.get("warning"))]
        for w in space_warnings:
            say(f"warning: {w}")
        whole = len(task.cand_idx) == len(bodies) and np.array_equal(task.cand_idx, all_idx)

        ridge_last = RidgeFit.fit(last_x[fit_idx], bodies[fit_idx]) if "ridge+last" in names else None
        bm25_test, bm25_sel, bm25_settings = (
            _bm25_scorers(cv, bm25_query, task, sel_task, q_idx, sel_idx, need_sel_scores=(
                "ridge+bm25" in names or fuse_runs or ("reverse" in names and fuse_bm25) or (sibling_softmax and "bm25" in names)),
                say=say) if need_bm25 else (None, None, {}))

        vector_baselines = [n for n in names if n in ("prototype", "signature", "ridge", "ridge+last", "nn", "oracle",
                                                      "noisy_oracle")]
        expected = _expected_rows(names, len(space_names), len(loaded) + len(method_runs), len(vector_baselines),
                                  fuse_runs=fuse_runs, reverse_bm25=need_bm25 and fuse_bm25, hub_spaces=len(hub_spaces),
                                  hub_methods=hub_methods, hubness_correction=hubness_correction,
                                  sibling_softmax=sibling_softmax, both_directions=fuse_reverse)
        reranker, rerank_info = _reranker(rerank, rerank_k, rerank_rows, store, task, sel_task, notes, say)
        out = RowWriter(task, sel_task, pspec.label, n_boot, seed, expected, say, progress, sibling_softmax,
                        cv.files[q_idx], cv.files[sel_idx] if sel_task is not None else None, store.repos, fit_idx,
                        bm25_test, bm25_sel, reranker, sib_fusion=sib_fusion)
        if mixes:
            assert sel_task is not None
            chain = (_ProbeChain(out, hub_methods, fuse_runs, "canonical" if "canonical" in spaces_fit else "whitened")
                     if probe_select == "chain" else None)
            _choose_probe_weights(mixes, store, spaces_fit, bodies, train_idx, fit_idx, sel_idx, sel_task, last_x,
                                  ridge_last, whitening_shrinkage, say, chain, probe_grid)
            probe_info["grid"] = list(probe_grid)
            probe_info["weights"] = {k: m.weight for k, m in mixes.items()}
            probe_info["selection_mrr"] = {k: m.selection_mrr for k, m in mixes.items()}
            if chain is not None:
                probe_info["selection_chain"] = {k: m.selection_chain for k, m in mixes.items()}
            probe_info["select"] = probe_select if chain is None else f"chain ({chain.space_name} space)"
        run_preds = {r.name: _predict(r, store, q_idx) for r in [*loaded, *method_runs]}
        sel_preds: dict[str, np.ndarray] = {}
        ref_preds: dict[str, np.ndarray] = {}  # train-split predictions: the hubness reference
        if fuse_runs or hub_methods:  # fusion weights and CSLS settings are chosen on the selection split
            say("predicting the selection split" + (" and the train split (hubness reference)" if hub_methods else ""))
            sel_preds = {r.name: _predict(r, store, sel_idx) for r in [*loaded, *method_runs]}
        if hub_methods:
            ref_preds = {r.name: _predict(r, store, fit_idx) for r in [*loaded, *method_runs]}
        inp = VectorInputs(
            names=names, bodies=bodies, sigs=sigs, ridge_x=ridge_x, ridge_input=ridge_input, last_x=last_x,
            train_idx=train_idx, fit_idx=fit_idx, sel_idx=sel_idx, q_idx=q_idx, task=task, sel_task=sel_task,
            repos=store.repos,
            # float64 mean as the spaces compute it, so that centring maps the prototype to exact 0.
            prototype=(bodies[train_idx].astype(np.float64).mean(0).astype(np.float32) if len(train_idx)
                       else np.zeros(meta.hidden_size, np.float32)),
            targets_raw=bodies[q_idx],
            cand_raw=bodies if whole else bodies[task.cand_idx],  # no copy of a whole-corpus pool
            ridge=RidgeFit.fit(ridge_x[fit_idx], bodies[fit_idx]) if need_ridge else None, ridge_last=ridge_last,
            run_preds=run_preds, sel_preds=sel_preds, ref_preds=ref_preds, mixes=mixes, method_kinds=method_kinds,
            hub_methods=hub_methods, fuse_runs=fuse_runs, shrinkage=whitening_shrinkage, noisy_of=noisy_of,
            seed=seed, notes=notes)

        if "random" in names:
            rng = np.random.default_rng(seed)
            out.add("random", "baseline", NO_SPACE, SearchResult(rng.integers(1, out.sizes + 1), out.sizes, None))
        if bm25_test is not None and "bm25" in names:
            say("BM25 search")
            out.add("bm25", "baseline", NO_SPACE, search_task(bm25_test, task), bm25_settings)
            if bm25_sel is not None:
                out.rerank("bm25", "baseline", NO_SPACE, bm25_sel, bm25_test, {"query": bm25_settings["query"]})
                out.siblings("bm25", "baseline", NO_SPACE, bm25_sel, bm25_test, {"query": bm25_settings["query"]})
        if "reverse" in names and sel_task is not None and last_x is not None:
            reverse_rows(out, last_x, bodies, inp.cand_raw, fit_idx, sel_idx, q_idx, whitening_shrinkage,
                         fuse=fuse_bm25, hubness_correction=hubness_correction, keep=fuse_reverse)
        projections: dict[str, dict[str, np.ndarray]] = {}
        for sname in space_names:
            space_rows(inp, out, sname, spaces_fit[sname], hubness=sname in hub_spaces and bool(hub_methods),
                       projections=projections)

        rows = out.rows
        if reranker is not None:
            rerank_info["pairs_scored"] = reranker.n_scored
        warnings = space_warnings + _flag(rows)
        comparisons = _auto_comparisons(rows, n_boot, seed)
        for a, b in compare:
            try:
                comparisons.append(_compare_rows(rows, a, b, n_boot, seed))
            except EvaluateError as e:  # a typo in a pair must not throw the whole evaluation away
                warnings.append(f"--compare {a},{b} skipped: {e} (`codejepa evaluate compare` reads the saved ranks)")
        settings = {
            "split": split, "pool": pspec.to_json(), "spaces": space_names, "baselines": list(names),
            "ridge_input": ridge_input, "ridge_alphas": list(RIDGE_ALPHAS), "fusion_weights": list(FUSION_WEIGHTS),
            "whitening_shrinkage": whitening_shrinkage, "n_boot": n_boot, "seed": seed, "noisy_of": noisy_of,
            "bm25_query": bm25_query, "fuse_bm25": fuse_runs, "fuse_reverse": fuse_reverse,
            **_fixed_settings(hub_spaces, hub_methods, sibling_softmax, sib_fusion),
            "selection": {"fit_records": int(len(fit_idx)), "selection_records": int(len(sel_idx))},
            "probe": probe_info or None, "rerank": rerank_info or None, "split_file": split_file, "code_version": code_version(),
            "versions": library_versions("numpy", "scipy", "torch", "h5py", "bm25s", "transformers"),
        }
        result = RetrievalResult(rows, comparisons, warnings, notes, settings, _store_record(store, cv),
                                 [r.info for r in loaded], _pool_record(pspec, task, out), projections=projections,
                                 spaces=spaces_fit)
    finally:
        store.close()
    if out_dir is not None:
        from codejepa.evaluate.report import write_outputs

        write_outputs(result, Path(out_dir), plots=plots)
    return result


def _reranker(rerank: str | os.PathLike[str] | None, k: int, patterns: Sequence[str] | str, store: Any, task: Task,
              sel_task: Task | None, notes: list[str], say: Log) -> tuple[Reranker | None, dict[str, Any]]:
    """The loaded cross-scorer of ``--rerank``, its token windows read for every query and
    candidate it may score; None (with a note) where nothing can be re-ranked."""
    if rerank is None:
        return None, {}
    from codejepa.predict.cross import CrossError, load_cross

    pats = tuple(p.strip() for p in (patterns.split(",") if isinstance(patterns, str) else patterns) if p.strip())
    if not pats:
        raise EvaluateError("--rerank-rows needs at least one row name or glob")
    try:
        cross = load_cross(rerank)
        cross.check_store(store)
    except CrossError as e:
        raise EvaluateError(f"--rerank: {e}") from None
    if task.pool.kind not in RERANK_POOLS or sel_task is None:
        why = f"the {task.pool.label} pool" if sel_task is not None else "no selection split"
        notes.append(f"--rerank {cross.name}: no row re-ranked ({why}; re-ranking is for the split and all pools)")
        return None, {}
    records = np.concatenate([task.query_idx, task.cand_idx, sel_task.query_idx, sel_task.cand_idx])
    say(f"reading the token windows of {len(np.unique(records))} records for the cross-scorer {cross.name}")
    cross.prepare(store, records)
    info = {"cross_scorer": str(Path(rerank)), "name": cross.name, "epoch": cross.epoch,
            "val_mrr_at_training": cross.val_mrr, "k": k, "rows": list(pats), "weights": list(RERANK_WEIGHTS),
            "config": cross.config.to_dict()}
    return Reranker(cross, k, pats), info


def _store_notes(store: Any, say: Log) -> list[str]:
    """Notes on what the store leaves out: an unfinished embedding, records it skipped."""
    notes = []
    if (unfinished := store.incomplete_note()) is not None:
        notes.append(unfinished)
        say(f"warning: {unfinished}")
    extra = store.meta.extra
    skipped = extra.get("skipped") if isinstance(extra.get("skipped"), dict) else {}
    if n_skipped := sum(v for v in skipped.values() if isinstance(v, int)):
        # e.g. the longest signatures, which do not fit the window: the figures leave them out
        notes.append(f"{n_skipped} records of the corpus were not embedded "
                     f"({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))}): they are neither "
                     "queries nor candidates")
    return notes


def _method_runs(methods: Mapping[str, Callable[[Any, np.ndarray], np.ndarray]],
                 loaded: Sequence[LoadedRun]) -> list[LoadedRun]:
    """Query-vector methods as runs; a name that a run, a baseline or a derived row has is refused."""
    taken = {x.name for x in loaded} | set(parse_baselines("all"))
    for name in methods:
        if name in taken or name.endswith(RESERVED_SUFFIXES):
            raise EvaluateError(f"method name {name!r} is already taken (or ends in {FUSED_SUFFIX!r}, {CSLS_SUFFIX!r} "
                                f"or {SIB_SUFFIX!r}, which name the fusion, hubness-corrected and sibling rows)")
    return [LoadedRun(m, f"method {m}", _FnPredictor(fn), {}) for m, fn in methods.items()]


def _query_split_notes(split: str, query_repos: np.ndarray, *, selects: bool) -> list[str]:
    """What a reader must know about the query split: in-sample, selected on, one repository."""
    notes = []
    if split == "val" and selects:
        notes.append("evaluating on val, where ridge's λ, the BM25 query and the fusion weights are chosen and "
                     "each run's best.pt was selected: optimistic for them")
    if split == "train":
        notes.append("evaluating on train, where every statistic, ridge and the runs were fitted: in-sample "
                     "figures, not a held-out result")
    n_repos = len(np.unique(query_repos.astype(str)))
    if n_repos < 2:
        notes.append(f"the {split} queries come from one repository: the CIs resample queries, not "
                     "repositories (narrower than a CI over repositories would be)")
    elif n_repos < 5:
        # A bootstrap over k clusters has few distinct resamples: its percentiles move in steps.
        notes.append(f"the {split} queries come from {n_repos} repositories: the CIs over repositories take "
                     "few distinct values and are coarse (a cross-validation, `corpus folds`, tests more)")
    return notes


def _fixed_settings(hub_spaces: list[str], hub_methods: list[str], sibling_softmax: bool,
                    sib_fusion: str) -> dict[str, Any]:
    """The grids and conventions every evaluation records beside its own arguments."""
    return {
        "hubness": {"spaces": hub_spaces, "methods": hub_methods, "ks": list(CSLS_KS), "betas": list(CSLS_BETAS)},
        "sibling_softmax": {"on": sibling_softmax, "temperatures": list(SIB_TEMPERATURES), "betas": list(SIB_BETAS),
                            "temperature_unit": f"median per-query score std over {SCORE_SAMPLE} selection candidates",
                            "fusion_weight": sib_fusion},
        "ci": "95% percentile bootstrap over repositories", "ties": "pessimistic",
        "distinct_bodies": "candidates with equal normalised body hash count once (best member scores)",
    }


def _checked_arguments(spaces: Sequence[str] | str | None, baselines: Sequence[str] | str | None, ridge_input: str,
                       bm25_query: str, pool: str | int, pool_seeds: tuple[int, ...], n_boot: int,
                       out_dir: str | os.PathLike[str] | None) -> tuple[list[str], tuple[str, ...], PoolSpec]:
    """The spaces, the baselines and the pool, once every argument is checked: before any work."""
    space_names = list(SPACE_NAMES) if spaces in ("all", None) else (
        [x.strip() for x in spaces.split(",") if x.strip()] if isinstance(spaces, str) else list(spaces))
    for s in space_names:
        if s not in SPACE_NAMES:
            raise EvaluateError(f"unknown space {s!r}; expected raw, centered, whitened, canonical or all")
    names = parse_baselines(baselines) if isinstance(baselines, str) or baselines is None else tuple(baselines)
    parse_baselines(",".join(names) or "none")  # validate
    if ridge_input not in ("signature", "inputs", "context"):
        raise EvaluateError(f"ridge input view must be signature, inputs or context, not {ridge_input!r}")
    if bm25_query not in ("auto", "signature", "signature+context"):
        raise EvaluateError(f"BM25 query must be auto, signature or signature+context, not {bm25_query!r}")
    pspec = parse_pool(pool, pool_seeds)
    check_n_boot(n_boot)
    if out_dir is not None:
        from codejepa.evaluate.report import check_out_dir

        check_out_dir(out_dir)  # now, not after the whole evaluation has run
    return space_names, names, pspec


def _pooled_inputs(store: Any, names: Sequence[str], space_names: Sequence[str], ridge_input: str,
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Every record's pooled body, and the pooled input views the baselines and spaces need:
    the signature mean (None when none needs it), ridge's input view, and ridge+last's
    [signature mean, last signature token]."""
    all_idx = np.arange(len(store))
    bodies = store.pooled("body", all_idx)  # a non-finite state is refused there, as damage
    canonical = "canonical" in space_names  # fitted on the ridge+last inputs: signature mean + last token
    need_sig = canonical or any(n in names for n in ("signature", "ridge", "ridge+last", "nn", "ridge+bm25", "reverse",
                                                     "noisy_oracle"))
    need_last = "ridge+last" in names or "reverse" in names or canonical
    want = (["signature"] if need_sig else []) + (["signature_last"] if need_last else []) + (
        [ridge_input] if need_sig and ridge_input != "signature" else [])
    views = store.pooled_views(want, all_idx) if want else {}
    sigs = views.get("signature")
    ridge_x = views.get(ridge_input) if need_sig else None
    last_x = np.concatenate([sigs, views["signature_last"]], axis=1) if need_last else None
    return bodies, sigs, ridge_x, last_x


def _expected_rows(names: Sequence[str], n_spaces: int, n_runs: int, n_vector_baselines: int, *, fuse_runs: bool,
                   reverse_bm25: bool, hub_spaces: int, hub_methods: Sequence[str], hubness_correction: bool,
                   sibling_softmax: bool, both_directions: bool = False) -> int:
    """How many rows the evaluation writes (the progress bar's total)."""
    n_vec_fused = (n_spaces * (n_runs * fuse_runs + ("ridge+bm25" in names))
                   + hub_spaces * ((n_runs if fuse_runs else 0) + ("ridge+bm25" in names and "ridge" in hub_methods)))
    n_fused = ("reverse" in names) * (1 + hubness_correction) * reverse_bm25 + n_vec_fused
    n_rev = n_vec_fused * both_directions  # each: NAME+rev, NAME+rev+bm25 and its +sib
    return (("random" in names) + ("bm25" in names) * (1 + sibling_softmax) + ("reverse" in names) * (1 + hubness_correction)
            + n_spaces * (n_runs + n_vector_baselines) + hub_spaces * len(hub_methods) + n_fused * (1 + sibling_softmax)
            + n_rev * (2 + sibling_softmax))


def _store_record(store: Any, cv: CorpusView) -> dict[str, Any]:
    meta = store.meta
    return {
        "path": str(Path(store.path).resolve()), "fingerprint": store.fingerprint(), "splits": store.split_key,
        "file_sha256": cached_sha256_file(store.path), "meta": meta.__dict__ | {"extra": dict(meta.extra)},
        "corpus_dir": str(Path(cv.corpus_dir).resolve()), "corpus_fingerprint": cv.corpus_fingerprint,
    }


def _pool_record(pspec: PoolSpec, task: Task, out: RowWriter) -> dict[str, Any]:
    return {
        "label": pspec.label, "n_queries": int(task.n_queries),
        "n_query_repos": int(len(np.unique(task.query_repos.astype(str)))),
        "n_candidates": int(len(task.cand_idx)), "n_distinct_bodies": int(task.groups.n_groups),
        "mean_pool_size": float(np.mean(out.sizes)), "chance": out.chance,
    }


def _use_split_file(store: Any, splits: str | os.PathLike[str], notes: list[str]) -> dict[str, Any]:
    """Replace the store's split by a ``corpus folds`` split file's, with a note saying so;
    which fold of which cross-validation it is (``evaluate folds`` checks that they agree)."""
    from codejepa.embed.store import StoreError, use_split_file

    try:
        assignment, missing = use_split_file(store, splits)
    except StoreError as e:
        raise EvaluateError(str(e)) from None
    notes.append(f"split from {splits}: {assignment.label}"
                 + (f"; {missing} of its records are not in the store" if missing else ""))
    return {"file": str(Path(splits).resolve()), "fold": assignment.fold, "folds": assignment.folds,
            "seed": assignment.seed, "corpus_fingerprint": assignment.corpus_fingerprint}


def _bm25_scorers(cv: CorpusView, bm25_query: str, task: Task, sel_task: Task | None, q_idx: np.ndarray,
                  sel_idx: np.ndarray, *, need_sel_scores: bool, say: Log) -> tuple[Any, Any, dict[str, Any]]:
    """BM25's scores of the queries against the pool, and of the selection split against its own
    pool when a fusion or the sibling softmax needs them; with the query text chosen on selection
    MRR when ``bm25_query`` is auto."""
    say("indexing body texts for BM25")
    query_sets = {"signature": cv.signature_texts, "signature+context": cv.query_texts}
    sel_docs = [cv.body_texts[i] for i in sel_task.cand_idx] if sel_task is not None else []
    mode = bm25_query
    settings: dict[str, Any] = {}
    if bm25_query == "auto":
        # The query text is a hyper-parameter like any other: chosen on val. (On real
        # code the whole file context mostly adds noise to a signature's words.)
        sel_mrr = {m: selection_mrr(BM25Scorer([t[i] for i in sel_idx], sel_docs), sel_task) for m, t in query_sets.items()}
        mode = max(sel_mrr, key=lambda m: sel_mrr[m])
        settings["selection_mrr"] = sel_mrr
    settings.update(query=mode, k1=BM25_K1, b=BM25_B, tokens="identifiers split at snake_case/CamelCase")
    texts = query_sets[mode]
    # BM25 is held to twice the budget of the others: recomputing it costs a Python loop
    # per query, a dense score a matrix product (python-40's whole corpus: 1.1 GB).
    test = materialized(BM25Scorer([texts[i] for i in q_idx], [cv.body_texts[i] for i in task.cand_idx]),
                        len(task.cand_idx), budget_factor=2)
    sel = None
    if need_sel_scores and sel_task is not None:
        sel = materialized(BM25Scorer([texts[i] for i in sel_idx], sel_docs), len(sel_docs))
    return test, sel, settings


def _with_probe_mixes(probe: str | os.PathLike[str], store: Any, split: str, names: Sequence[str],
                      loaded: list[LoadedRun], methods: Mapping[str, Any] | None
                      ) -> tuple[list[LoadedRun], dict[str, Any], dict[str, ProbeMix], dict[str, Any]]:
    """The runs and methods with a ``NAME+probe`` mix of each (and of ridge+last) and the view
    alone (``probe``, a baseline) among the methods; each predictor memoised, since its plain
    row and its mix ask for the same records."""
    mixes, probe_info = _probe_mixes(probe, store, split, names, loaded, methods)
    view = next(iter(mixes.values())).probes
    loaded = [replace(r, predictor=Memo(r.predictor)) for r in loaded]
    memo = {m: Memo(_FnPredictor(fn)).predict_pooled for m, fn in (methods or {}).items()}
    for bname, mix in mixes.items():
        if mix.base is None and bname != f"ridge+last{PROBE_SUFFIX}":
            base = next((r for r in loaded if f"{r.name}{PROBE_SUFFIX}" == bname), None)
            mix.base = base.predictor.predict_pooled if base is not None else memo[bname[: -len(PROBE_SUFFIX)]]
    return loaded, {**memo, **mixes, PROBE_VIEW_ROW: lambda _s, idx: view[idx]}, mixes, probe_info


def _probe_mixes(probe: str | os.PathLike[str], store: Any, split: str, names: Sequence[str],
                 loaded: list[LoadedRun], methods: Mapping[str, Any] | None
                 ) -> tuple[dict[str, ProbeMix], dict[str, Any]]:
    """Read the probe view and name a ``+probe`` mix for each run, method and ridge+last; their
    bases and weights are filled in once the predictors and the selection split are ready.
    Refuses probe records outside the train part or among the queries of ``split``."""
    from dataclasses import asdict

    from codejepa.embed.probe import ProbeError, probes_outside_train, read_probe_view

    try:
        pv = read_probe_view(probe, store)
    except ProbeError as e:
        raise EvaluateError(str(e)) from None
    if pv.committed < len(store):
        raise EvaluateError(f"{probe}: the probe view covers {pv.committed} of {len(store)} records; "
                            f"finish it first (`codejepa embed probe {shlex.quote(str(store.path))} --out {shlex.quote(str(probe))}` resumes it)")
    if outside := probes_outside_train(pv.meta, store):
        raise EvaluateError(f"{probe}: probe record(s) {', '.join(outside)} are not in this split's train part; "
                            "compute a view for this split (`codejepa embed probe STORE --splits FILE --out …`)")
    queries = set(store.ids[store.indices(split)].tolist())
    asked = [r for r in pv.meta.probe_records if r in queries]
    if asked:
        # Evaluating train itself: the probe bodies are then queries, each answered by its own body.
        raise EvaluateError(f"{probe}: probe record(s) {', '.join(asked)} are queries of the evaluated {split} split "
                            "(a leak of their own bodies); evaluate val or test with this view")
    bases = [r.name for r in loaded] + list(methods or {}) + (["ridge+last"] if "ridge+last" in names else [])
    if not bases:
        raise EvaluateError("--probe mixes the probe view into runs, methods or ridge+last: none is being evaluated")
    mixes = {f"{b}{PROBE_SUFFIX}": ProbeMix(None, pv.view, None) for b in bases}  # type: ignore[arg-type]
    taken = {r.name for r in loaded} | set(methods or {})
    for m in [*mixes, PROBE_VIEW_ROW]:
        if m in taken:
            raise EvaluateError(f"method name {m!r} is taken: with --probe it names a probe row "
                                f"({PROBE_VIEW_ROW!r} the view alone, NAME{PROBE_SUFFIX} the mixes)")
    return mixes, {"path": str(pv.path), "meta": asdict(pv.meta)}


@dataclass
class _ProbeChain:
    """``--probe-select chain``: what a probe weight is scored by — the mix's most corrected
    row, as the rows will make it (see :meth:`RowWriter.chain_selection`); each weight's
    stage settings are kept on the mix (``ProbeMix.selection_chain``)."""

    out: RowWriter
    hub_methods: list[str]
    fuse: bool
    space_name: str  # the canonical space where it is evaluated, else the whitened one

    def score(self, mix: ProbeMix, name: str, store: Any, sp: Space, sel_unit: np.ndarray, sel_idx: np.ndarray,
              fit_idx: np.ndarray) -> Callable[[float], float]:
        def mrr(w: float) -> float:
            dense = DenseScorer(sp.apply(mix.mixed(store, sel_idx, w)), sel_unit, normalized=True)
            refs = (unit_rows(sp.apply(mix.mixed(store, fit_idx, w)), inplace=True)
                    if name in self.hub_methods else None)
            score, trace = self.out.chain_selection(name, dense, refs, fuse=self.fuse)
            mix.selection_chain[str(w)] = trace
            return score
        return mrr


def _choose_probe_weights(mixes: dict[str, ProbeMix], store: Any, spaces_fit: dict[str, Space], bodies: np.ndarray,
                          train_idx: np.ndarray, fit_idx: np.ndarray, sel_idx: np.ndarray, sel_task: Task,
                          last_x: np.ndarray | None, ridge_last: RidgeFit | None, shrinkage: float, say: Log,
                          chain: _ProbeChain | None, grid: Sequence[float]) -> None:
    """Each mix's weight on the selection split: scored by its plain cosines in the whitened
    space where it mixes, or (``chain``) by its most corrected row in the canonical space (the
    whitened one where the canonical is not evaluated); each chosen among ``grid``."""
    white = spaces_fit.get("whitened") or fit_space("whitened", bodies[train_idx], shrinkage=shrinkage)
    sel_c = unit_rows(white.apply(bodies[sel_task.cand_idx]), inplace=True)

    def mrr_of(q: np.ndarray) -> float:
        return selection_mrr(DenseScorer(white.apply(q), sel_c, normalized=True), sel_task)

    rl_name = f"ridge+last{PROBE_SUFFIX}"
    if rl_name in mixes and ridge_last is not None and last_x is not None:
        # ridge+last's λ for the mix: the whitened space's, where the mix is made.
        sc = {a: mrr_of(ridge_last.predict(last_x[sel_idx], a)) for a in RIDGE_ALPHAS}
        alpha = max(sc, key=lambda a: (sc[a], a))
        mixes[rl_name].base = lambda _s, idx: ridge_last.predict(last_x[idx], alpha)
    if chain is not None:
        sp = spaces_fit.get(chain.space_name) or white
        sp_sel = unit_rows(sp.apply(bodies[sel_task.cand_idx]), inplace=True)
    for name, mix in mixes.items():
        mix.whitened = white
        if chain is None:
            say(f"choosing the probe weight of {name} on the selection split")
            mix.choose(lambda w, mix=mix: mrr_of(mix.mixed(store, sel_idx, w)), grid)
        else:
            say(f"choosing the probe weight of {name} on the selection split by its most corrected row "
                f"({chain.space_name} space)")
            mix.choose(chain.score(mix, name, store, sp, sp_sel, sel_idx, fit_idx), grid)


def _flag(rows: list[MethodRow]) -> list[str]:
    """Warn for every method whose rank@1 does not clear the prototype and random ranking."""
    out = []
    by = {(r.method, r.space): r for r in rows}
    for r in rows:
        if r.method in NOT_FLAGGED:
            continue
        refs: dict[str, MetricCI] = {}
        proto = by.get(("prototype", r.space)) or by.get(("prototype", "raw"))
        if proto is not None:
            refs[f"prototype ({proto.space})"] = proto.metrics["rank@1"]
        rnd = by.get(("random", NO_SPACE))
        if rnd is not None:
            refs["random"] = rnd.metrics["rank@1"]
        if not refs:
            continue
        w = collapse_warning(r.method, r.space, r.pool, r.metrics["rank@1"], refs)
        if w:
            r.warning = w
            out.append(w)
    return out


def _compare_rows(rows: list[MethodRow], a: str, b: str, n_boot: int, seed: int) -> dict[str, Any]:
    keys = {r.key: r for r in rows}
    for k in (a, b):
        if k not in keys:
            raise EvaluateError(f"no result {k!r} to compare; available: {', '.join(sorted(keys))}")
    ra, rb = keys[a], keys[b]
    # At least 1,000 resamples whatever --n-boot: a p-value's resolution is 1/(n + 1).
    n = max(n_boot, 1000)
    comps: list[PairedComparison] = paired_bootstrap(ra.ranks, rb.ranks, ra.clusters, n_boot=n, seed=seed)
    return {"a": a, "b": b, "n_boot": n, "results": [c.to_json() for c in comps],
            "cis_overlap": cis_overlap(ra.metrics, rb.metrics)}


def _auto_comparisons(rows: list[MethodRow], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Each run against the best non-oracle baseline of its space (by MRR)."""
    out = []
    for r in rows:
        if r.kind != "run":
            continue
        cands = [b for b in rows if b.kind == "baseline" and b.method not in ("oracle", "noisy_oracle")
                 and b.space in (r.space, NO_SPACE)]
        if not cands:
            continue
        best = max(cands, key=lambda b: b.metrics["mrr"].value)
        c = _compare_rows(rows, r.key, best.key, n_boot, seed)
        c["why"] = "run vs the best baseline of its space"
        out.append(c)
    return out
