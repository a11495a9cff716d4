"""The rows of the methods that predict a body *vector*, in one space.

Runs, ``--probe`` mixes and the vector baselines (prototype, signature, ridge, ridge+last, nn,
oracle, noisy oracle) each give query vectors in teacher space; :func:`space_rows` maps them
and the candidates into one fitted space, searches each exactly, and adds the ``+csls`` rows
(hubness against the method's own train-split predictions), the ``+bm25`` fusions (with
their ``+sib`` rows) and, with ``--fuse-reverse``, the ``+rev`` fusions that
:class:`~codejepa.evaluate.rows.RowWriter` derives. Everything the
rows need is prepared once per evaluation in :class:`VectorInputs`; only the space changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from codejepa.evaluate.baselines import RIDGE_ALPHAS, RidgeFit, nearest_rows, noisy_oracle
from codejepa.evaluate.diagnostics import target_statistics, vector_diagnostics
from codejepa.evaluate.errors import EvaluateError
from codejepa.evaluate.hubness import SUFFIX as CSLS_SUFFIX
from codejepa.evaluate.pools import Task, search_task
from codejepa.evaluate.probe import SUFFIX as PROBE_SUFFIX
from codejepa.evaluate.probe import ProbeMix
from codejepa.evaluate.rows import FUSED_SUFFIX, RowWriter, selection_mrr
from codejepa.evaluate.search import DenseScorer, unit_rows
from codejepa.evaluate.spaces import Space, fit_space

# name → (kind, raw teacher-space queries, the same in the space, settings)
Vectors = dict[str, tuple[str, np.ndarray, np.ndarray, dict[str, Any]]]


@dataclass
class VectorInputs:
    """What the vector methods of one evaluation read, fitted or predicted once for all spaces."""

    names: tuple[str, ...]  # the baselines asked for
    bodies: np.ndarray  # pooled body state of every store record (raw)
    sigs: np.ndarray | None  # pooled signature state of every record
    ridge_x: np.ndarray | None  # ridge's input view of every record
    ridge_input: str
    last_x: np.ndarray | None  # [signature mean, last signature token] of every record
    train_idx: np.ndarray
    fit_idx: np.ndarray  # where baselines are fitted (train, or part of it without val)
    sel_idx: np.ndarray  # where their settings are chosen (val)
    q_idx: np.ndarray  # the queries
    task: Task
    sel_task: Task | None
    repos: np.ndarray  # repository of every record
    prototype: np.ndarray  # train-mean body
    targets_raw: np.ndarray  # the queries' true bodies
    cand_raw: np.ndarray  # the pool's candidate bodies
    ridge: RidgeFit | None
    ridge_last: RidgeFit | None
    run_preds: dict[str, np.ndarray]  # runs, methods and probe mixes: the queries' predictions
    sel_preds: dict[str, np.ndarray]  # … of the selection split (fusion weights, CSLS settings)
    ref_preds: dict[str, np.ndarray]  # … of the fit split (the hubness reference)
    mixes: dict[str, ProbeMix]
    method_kinds: dict[str, str]  # methods that are baselines (ridge+last+probe, probe)
    hub_methods: list[str]
    fuse_runs: bool
    shrinkage: float
    noisy_of: str | None
    seed: int
    notes: list[str]


def space_rows(inp: VectorInputs, out: RowWriter, sname: str, sp: Space, *, hubness: bool,
               projections: dict[str, dict[str, np.ndarray]]) -> None:
    """Every vector method's rows in the space ``sp`` (named ``sname``), then their ``+csls``
    rows (when ``hubness``) and their ``+bm25`` fusions; query vectors of a few methods go to
    ``projections[sname]`` for the projection plot."""
    # One unit-norm candidate matrix shared by every method; a centred/whitened one is a
    # fresh array that can be normalised in place (raw space returns the bodies themselves).
    cand_unit = unit_rows(sp.apply(inp.cand_raw), inplace=sname != "raw")
    sel_c = sp.apply(inp.bodies[inp.sel_task.cand_idx]) if inp.sel_task is not None else None
    targ_s = sp.apply(inp.targets_raw)
    vec, ridge_alpha = _vectors(inp, sname, sp, sel_c, targ_s)
    _search(inp, out, sname, sp, vec, cand_unit, targ_s, projections)
    if hubness and inp.sel_task is not None:
        _csls_rows(inp, out, sname, sp, vec, ridge_alpha, cand_unit, sel_c)
    if out.fusing:
        _fusion_rows(inp, out, sname, sp, vec, ridge_alpha, cand_unit, sel_c)


def _vectors(inp: VectorInputs, sname: str, sp: Space, sel_c: np.ndarray | None,
             targ_s: np.ndarray) -> tuple[Vectors, float | None]:
    """Each vector method's queries, raw and in the space, with its settings; and ridge's λ here."""
    names, q_idx, sel_idx, sel_task = inp.names, inp.q_idx, inp.sel_idx, inp.sel_task
    vec: Vectors = {}

    def put(name: str, kind: str, raw: np.ndarray, settings: dict | None = None) -> None:
        vec[name] = (kind, raw, sp.apply(raw), settings or {})

    def select_alpha(fit: RidgeFit, x: np.ndarray) -> tuple[float, dict[float, float]]:
        # λ per space: multi-output ridge commutes with the space's linear map, so one
        # fit serves all spaces; only the retrieval-optimal λ differs.
        sc = {a: selection_mrr(DenseScorer(sp.apply(fit.predict(x[sel_idx], a)), sel_c), sel_task) for a in RIDGE_ALPHAS}
        return max(sc, key=lambda a: (sc[a], a)), sc

    for rname, pr in inp.run_preds.items():
        mix = inp.mixes.get(rname)
        put(rname, inp.method_kinds.get(rname, "run"), pr,
            {"probe_weight": mix.weight, "base": rname[: -len(PROBE_SUFFIX)]} if mix is not None else None)
    if "prototype" in names:
        put("prototype", "baseline", np.repeat(inp.prototype[None, :], len(q_idx), 0))
    if "signature" in names:
        put("signature", "baseline", inp.sigs[q_idx])
    ridge_alpha = None
    if inp.ridge is not None and sel_task is not None:
        ridge_alpha, scores = select_alpha(inp.ridge, inp.ridge_x)
        if "ridge" in names or "ridge+bm25" in names or "noisy_oracle" in names:
            put("ridge", "baseline", inp.ridge.predict(inp.ridge_x[q_idx], ridge_alpha),
                {"alpha": ridge_alpha, "lambda": ridge_alpha * inp.ridge.scale, "input": inp.ridge_input,
                 "selection_mrr": {str(k): v for k, v in scores.items()}, "n_fit": len(inp.fit_idx)})
    if inp.ridge_last is not None and sel_task is not None and inp.last_x is not None:
        a_last, sc_last = select_alpha(inp.ridge_last, inp.last_x)
        put("ridge+last", "baseline", inp.ridge_last.predict(inp.last_x[q_idx], a_last),
            {"alpha": a_last, "input": "signature mean + signature's last token",
             "selection_mrr": {str(k): v for k, v in sc_last.items()}, "n_fit": len(inp.fit_idx)})
    if "nn" in names:
        # Signatures are searched among signatures: the canonical map is a body-side one.
        sig_space = fit_space("whitened" if sname == "canonical" else sname, inp.sigs[inp.train_idx],
                              shrinkage=inp.shrinkage)
        nn = nearest_rows(sig_space.apply(inp.sigs[q_idx]), sig_space.apply(inp.sigs[inp.train_idx]))
        put("nn", "baseline", inp.bodies[inp.train_idx][nn], {"searched": "train signatures"})
    if "oracle" in names:
        put("oracle", "baseline", inp.targets_raw)
    if "noisy_oracle" in names:
        ref = inp.noisy_of or next(iter(inp.run_preds), None) or ("ridge" if "ridge" in vec else None)
        if ref is not None and ref not in vec:
            raise EvaluateError(f"noisy oracle: no method {ref!r} to take the error level from "
                                f"(available: {', '.join(sorted(vec))})")
        if ref is not None:
            _, raw_r, sp_r, _ = vec[ref]
            noisy = noisy_oracle(targ_s, sp_r, inp.seed)
            vec["noisy_oracle"] = ("baseline", noisy if sname == "raw" else raw_r, noisy,
                                   {"error_of": ref, "noise": "isotropic, in this space"})
        else:
            inp.notes.append("noisy_oracle skipped: no run and no ridge to take the error level from")
    return vec, ridge_alpha


def _search(inp: VectorInputs, out: RowWriter, sname: str, sp: Space, vec: Vectors, cand_unit: np.ndarray,
            targ_s: np.ndarray, projections: dict[str, dict[str, np.ndarray]]) -> None:
    """One row per vector method: exact search with collapse diagnostics."""
    targ_stats = target_statistics(inp.targets_raw, targ_s, inp.prototype)
    for name, (kind, raw, qs, settings) in vec.items():
        if name == "ridge" and "ridge" not in inp.names:
            continue  # fitted for ridge+bm25 or the noisy oracle only
        out.say(f"searching {name} in {sname} space")
        res = search_task(DenseScorer(qs, cand_unit, normalized=True), inp.task)
        diag = vector_diagnostics(raw, inp.targets_raw, qs, targ_s, inp.prototype, sp.mean, targ_stats).to_json()
        if name == "noisy_oracle" and sname != "raw":
            for k in ("cosine_raw", "cosine_to_prototype_raw"):
                diag[k] = None  # the noise lives in this space; it has no raw vector
        out.add(name, kind, sname, res, settings, diag)
        if kind == "run" or name in ("prototype", "ridge", "oracle"):
            projections.setdefault(sname, {})[name] = qs
    projections.setdefault(sname, {})["__targets__"] = targ_s


def _csls_rows(inp: VectorInputs, out: RowWriter, sname: str, sp: Space, vec: Vectors, ridge_alpha: float | None,
               cand_unit: np.ndarray, sel_c: np.ndarray) -> None:
    """``NAME+csls`` for each hubness method: its cosines minus β × each candidate's hubness
    against the method's train-split predictions (k and β chosen on selection MRR), and the
    corrected scores' fusion with BM25 where the plain ones get one."""
    one_repo = len(np.unique(inp.repos[inp.fit_idx].astype(str))) < 2
    sel_unit: list[np.ndarray] = []  # normalised once, on the first method that needs it

    def csls(name: str, ref_raw: np.ndarray, sel_raw: np.ndarray) -> None:
        kind, _, test_space, _ = vec[name]
        if one_repo:
            note = f"{name}{CSLS_SUFFIX} left out: its penalty needs train predictions from more than one repository"
            inp.notes.extend([note] if note not in inp.notes else [])
            return
        if not sel_unit:
            sel_unit.append(unit_rows(sel_c))
        out.say(f"hubness of the candidates against {name}'s train predictions ({sname} space)")
        hub_sel, hub_test, kb, grid = out.hub_corrected(DenseScorer(sp.apply(sel_raw), sel_unit[0], normalized=True),
                                                        DenseScorer(test_space, cand_unit, normalized=True),
                                                        unit_rows(sp.apply(ref_raw), inplace=True))
        info = {**kb, "reference": f"{name}'s predictions for {len(inp.fit_idx)} train records, "
                                   "those of the candidate's own repository left out"}
        out.add(f"{name}{CSLS_SUFFIX}", kind, sname, search_task(hub_test, inp.task), {**info, "selection_mrr": grid})
        out.rerank(f"{name}{CSLS_SUFFIX}", kind, sname, hub_sel, hub_test, info)
        if out.fusing and ((name in inp.run_preds and inp.fuse_runs) or (name == "ridge" and "ridge+bm25" in inp.names)):
            # The hybrid of the corrected scores, as ridge+bm25 / RUN+bm25 are of the plain ones.
            out.fuse(f"{name}{CSLS_SUFFIX}{FUSED_SUFFIX}", kind, sname, hub_sel, hub_test, info)
            out.with_reverse(f"{name}{CSLS_SUFFIX}", kind, sname, hub_sel, hub_test, info)

    for hname in inp.hub_methods:
        if hname == "ridge" and inp.ridge is not None and "ridge" in vec:
            csls("ridge", inp.ridge.predict(inp.ridge_x[inp.fit_idx], ridge_alpha),
                 inp.ridge.predict(inp.ridge_x[inp.sel_idx], ridge_alpha))
        elif hname == "ridge+last" and inp.ridge_last is not None and "ridge+last" in vec:
            a_last = vec["ridge+last"][3]["alpha"]
            csls("ridge+last", inp.ridge_last.predict(inp.last_x[inp.fit_idx], a_last),
                 inp.ridge_last.predict(inp.last_x[inp.sel_idx], a_last))
        elif hname in inp.ref_preds:
            csls(hname, inp.ref_preds[hname], inp.sel_preds[hname])


def _fusion_rows(inp: VectorInputs, out: RowWriter, sname: str, sp: Space, vec: Vectors, ridge_alpha: float | None,
                 cand_unit: np.ndarray, sel_c: np.ndarray) -> None:
    """``ridge+bm25`` and ``RUN+bm25``: the plain cosines fused with BM25 (weight on selection MRR)."""
    def dense(q_sel: np.ndarray, q_test: np.ndarray) -> tuple[DenseScorer, DenseScorer]:
        return DenseScorer(sp.apply(q_sel), sel_c), DenseScorer(q_test, cand_unit, normalized=True)

    if "ridge+bm25" in inp.names and inp.ridge is not None:
        ridge_sc = dense(inp.ridge.predict(inp.ridge_x[inp.sel_idx], ridge_alpha), vec["ridge"][2])
        out.fuse("ridge+bm25", "baseline", sname, *ridge_sc, {"alpha": ridge_alpha})
        out.with_reverse("ridge", "baseline", sname, *ridge_sc, {"alpha": ridge_alpha})
    for rname, pr_sel in inp.sel_preds.items() if inp.fuse_runs else ():
        kind, run_sc = inp.method_kinds.get(rname, "run"), dense(pr_sel, vec[rname][2])
        out.fuse(f"{rname}{FUSED_SUFFIX}", kind, sname, *run_sc, {"run": rname})
        out.with_reverse(rname, kind, sname, *run_sc, {"run": rname})
