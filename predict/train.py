"""Training: ``train(store, config, out_dir)`` — one process, or DDP under ``torchrun``.

A run directory holds::

    config.json    the resolved config            run.json   store path + fingerprint + meta,
    stats.pt/json  train-split normalisation                  code version, parameter count
    last.pt        model + optimizer + position   best.pt    the best epoch by val MRR
    log.jsonl      one JSON object per epoch      curves.png losses, retrieval, collapse
    .lock          held by the training writing the folder: a second one is refused

Model selection is on validation retrieval (MRR among the val split's bodies, in the
normalised pooled space, ``norm.pooled_space``), never on loss or cosine. ``last.pt`` is rewritten at every epoch
end (and every ``train.checkpoint_every_steps``), atomically; ``--resume`` continues from it
and, because the data order and masks are functions of (seed, epoch, record), gives the same
weights as an uninterrupted run. Checkpoints hold tensors and plain values only and load
with ``torch.load(weights_only=True)``.

DDP: when ``WORLD_SIZE`` > 1 (torchrun), every rank takes an equal shard of each global
batch (``train.batch_size`` is global); gradients are averaged, so a mean-reduced loss gives
the same step as one process with the whole batch, InfoNCE and the variance hinge included
(every rank scores the whole global batch; see ``losses.compute_loss``). Dropout draws its
masks per rank.
Rank 0 validates and writes the run.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import json
import math
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from codejepa.core import CodejepaError, atomic_write_bytes, atomic_write_json, exclusive, printable, read_json_object
from codejepa.core import code_version as _code_version
from codejepa.core import library_versions
from codejepa.embed.store import Store, StoreError, StoreMeta, open_store, use_split_file
from codejepa.predict import losses
from codejepa.predict.batching import corpus_columns, epoch_order
from codejepa.predict.canonical import init_score_map
from codejepa.predict.config import RESUME_REFUSED, PredictConfig, read_run_config
from codejepa.predict.data import (FeatureSpec, FeatureTable, RevealSpec, StreamingTable, batch_loader,
                                   estimate_cache_bytes, valid_records)
from codejepa.predict.lexical import LexicalOffsets
from codejepa.predict.metrics import validation_metrics
from codejepa.predict.models import build_model, count_parameters
from codejepa.predict.normalize import NormStats, compute_stats
from codejepa.predict.probe import ProbeViews, load_probe_views
from codejepa.predict.ridge import init_input_stats, init_linear_path

code_version = functools.lru_cache(maxsize=1)(_code_version)  # a git call, once per process

LOCK_FILE = ".lock"  # held by the training that writes the run folder
CKPT_FORMAT = "codejepa-predictor"
CKPT_VERSION = 1
# Settings that may change when a run is resumed (the rest must match the stored config).
RESUMABLE_CHANGES = ("train.epochs", "train.threads", "train.checkpoint_every_steps", "train.plot_every_s",
                     "data.cache_gb", "data.prefetch", "data.workers", "data.corpus")

Event = Callable[[dict[str, Any]], None]


class TrainingError(CodejepaError):
    """Training cannot start or continue; the message says why and what was kept."""


class DivergedError(TrainingError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


# -- small helpers ------------------------------------------------------------------------
def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device not in ("auto", "cpu") and re.fullmatch(r"cuda(:\d+)?", device) is None:
        raise TrainingError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {device}: CUDA is not available on this machine")
    if device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(device)


def _dist_env() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them; nonsense is one line, not a crash."""
    try:
        rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", "0"), ("WORLD_SIZE", "1"),
                                                                    ("LOCAL_RANK", "0")))
    except ValueError:
        raise TrainingError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise TrainingError(f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE, "
                            "LOCAL_RANK >= 0 (torchrun sets them)")
    if world > 1 and not dist.is_initialized() and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        raise TrainingError(f"WORLD_SIZE={world} without MASTER_ADDR/MASTER_PORT: start several ranks with torchrun")
    return rank, world, local


def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint as plain data (``weights_only=True``); anything else is refused."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"{path}: no such checkpoint") from None
    except Exception as e:  # unpickling refused (code in it), truncated or foreign file
        # torch's own message advises weights_only=False, the one thing never to do with a foreign file.
        raise TrainingError(f"{path}: not a loadable codejepa checkpoint ({type(e).__name__}: a damaged, "
                            "truncated or foreign file, or one holding code, which a weights_only load never runs)") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise TrainingError(f"{path}: not a codejepa predictor checkpoint")
    if int(ck.get("format_version", -1)) != CKPT_VERSION:
        raise TrainingError(f"{path}: checkpoint format version {ck.get('format_version')} is not supported")
    return ck


def feature_spec(cfg: PredictConfig, stats: NormStats) -> FeatureSpec:
    return FeatureSpec(cfg.model.kind, cfg.model.max_input_tokens, cfg.model.body_slots,
                       stats.in_outlier_norm, stats.body_outlier_norm,
                       tuple(cfg.model.input_views) if cfg.model.kind == "mlp" or cfg.model.linear_skip != "none"
                       else ("mean",))


def make_table(store: Store, idx: np.ndarray, spec: FeatureSpec, cache_gb: float, *, with_body: bool = True,
               progress: Callable[[int, int], None] | None = None) -> FeatureTable | StreamingTable:
    """RAM cache when the estimated size fits ``cache_gb``; else stream from the store."""
    if estimate_cache_bytes(store, idx, spec, with_body) <= cache_gb * 1e9:
        return FeatureTable(store, idx, spec, with_body=with_body, progress=progress)
    return StreamingTable(store, idx, spec, with_body=with_body)


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True)
            for k, v in batch.items() if k != "index"}


def lr_at(step: int, total: int, cfg: PredictConfig) -> float:
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for k in a.keys() | b.keys():
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update(_config_diff(va, vb, f"{prefix}{k}."))
        elif (list(va) if isinstance(va, (list, tuple)) else va) != (list(vb) if isinstance(vb, (list, tuple)) else vb):
            out[f"{prefix}{k}"] = (va, vb)
    return out


# -- the forward pass + loss of one batch -----------------------------------------------------
def batch_loss(model: torch.nn.Module, norm: Any, bt: dict[str, torch.Tensor], cfg: PredictConfig,
               reveal: torch.Tensor | None = None, lexical: tuple[torch.Tensor, torch.Tensor] | None = None,
               gather: bool = False, view: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Loss of a batch. With ``reveal`` (multi-block training) the batch is run twice in ONE
    forward — the evaluation view (all slots masked) and the revealed view — so that DDP sees
    one forward per backward; the revealed view adds a regression on its masked slots.
    ``lexical``: the batch's BM25 offset inputs (``loss.lexical_weight``, see compute_loss);
    ``gather``: a DDP training step (InfoNCE's negatives from every rank, see compute_loss);
    ``view``: the batch's raw probe views (``loss.probe_weight``, see compute_loss)."""
    pooled_t = norm.body_to_norm(bt["body"])
    slot_t = norm.slots_to_norm(bt["slots"]) if "slots" in bt else None
    view_n = None if view is None else norm.body_to_norm(view.float())
    if reveal is None:
        out = model(bt)
        loss, parts = losses.compute_loss(out, pooled_t, slot_t, cfg.loss, norm.to_score, lexical, gather=gather,
                                          view=view_n)
        return loss, parts, out
    B = len(reveal)
    both = {k: torch.cat([v, v]) for k, v in bt.items()}
    out2 = model(both, reveal=torch.cat([torch.zeros_like(reveal), reveal]))
    out = {k: v[:B] for k, v in out2.items()}
    loss, parts = losses.compute_loss(out, pooled_t, slot_t, cfg.loss, norm.to_score, lexical, gather=gather,
                                      view=view_n)
    aux_cfg = cfg.loss if cfg.loss.regression != "none" else cfg.loss.__class__(regression="smoothl1")
    aux = losses.regression(out2["slots"][B:].float(), slot_t, aux_cfg, mask=~reveal)
    parts["masked_aux"] = aux.detach()
    return loss + cfg.mask.aux_weight * aux, parts, out


@torch.no_grad()
def evaluate_table(model: torch.nn.Module, table: Any, cfg: PredictConfig, device: torch.device,
                   lexical: LexicalOffsets | None = None, probe: ProbeViews | None = None) -> dict[str, float]:
    """Val loss (train-batch-sized batches), retrieval and collapse diagnostics on a table.
    With ``lexical`` (BM25 of the table's signatures against its bodies) the selection MRR is
    the BM25 hybrid's (``loss.lexical_weight``); with ``probe`` it ranks the predictions mixed
    with their probe views at ``loss.probe_weight`` (the cosines and collapse diagnostics stay
    the predictions' own)."""
    was_training = model.training
    model.eval()
    norm = model.norm
    preds_n, preds_r, tg_n, tg_r, preds_s, tg_s = [], [], [], [], [], []
    loss_sum, n_sum = 0.0, 0
    bs = cfg.train.batch_size  # the InfoNCE term depends on the batch size: keep val loss comparable
    for a in range(0, len(table), bs):
        rows = np.arange(a, min(a + bs, len(table)))
        bt = to_device(table.batch(rows), device)
        view = probe.rows(table.index[rows], device) if probe is not None else None
        loss, _, out = batch_loss(model, norm, bt, cfg, view=view)
        loss_sum += float(loss) * len(rows)
        n_sum += len(rows)
        pn, tn = out["pooled"].float(), norm.body_to_norm(bt["body"]).float()
        preds_n.append(pn.cpu())
        preds_r.append(model.raw(out).float().cpu())
        tg_n.append(tn.cpu())
        tg_r.append(bt["body"].float().cpu())
        ps = norm.to_score(pn)  # retrieval ranks in loss.space's space
        if view is not None:
            ps = losses.probe_mix(ps, norm.to_score(norm.body_to_norm(view.float())), cfg.loss.probe_weight)
        preds_s.append(ps.cpu())
        tg_s.append(norm.to_score(tn).cpu())
    model.train(was_training)
    m = validation_metrics(torch.cat(preds_n), torch.cat(tg_n), torch.cat(preds_r), torch.cat(tg_r),
                           torch.cat(preds_s), torch.cat(tg_s),
                           lexical=(lexical, cfg.loss.lexical_weight) if lexical is not None else None)
    m["val_loss"] = loss_sum / max(1, n_sum)
    return m


# -- curves --------------------------------------------------------------------------------
def curves_figure(history: list[dict[str, Any]], title: str = "", space: str = "standardized",
                  start_mrr: float | None = None) -> Any:
    """The run's curves as a matplotlib figure; ``start_mrr`` (the ridge start's val MRR, the
    "epoch 0" that competes for best.pt) is drawn as a reference line: a learned residual must
    rise above its linear start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    # markers on the per-epoch series: a one-epoch run has no line to draw, only its point
    mk = {"marker": "o", "ms": 3}
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    ax[0, 0].plot(ep, [h["train_loss"] for h in history], **mk, label="train")
    ax[0, 0].plot(ep, [h["val_loss"] for h in history], **mk, label="val")
    ax[0, 0].set_title("loss")
    hybrid = bool(history) and "val_mrr_dense" in history[-1]
    ax[0, 1].plot(ep, [h["val_mrr"] for h in history], **mk,
                  label="val MRR of cosine + BM25 offset (selection)" if hybrid else "val MRR (selection)")
    if hybrid:
        ax[0, 1].plot(ep, [h["val_mrr_dense"] for h in history], **mk, label="val MRR, cosine alone")
    ax[0, 1].plot(ep, [h["val_rank1"] for h in history], **mk, label="val rank@1 (hybrid)" if hybrid else "val rank@1")
    ax[0, 1].plot(ep, [h["val_chance_mrr"] for h in history], "--", **mk, color="grey", label="chance MRR")
    if start_mrr is not None:
        ax[0, 1].axhline(start_mrr, ls=":", color="C0", label=f"ridge start: {'hybrid ' if hybrid else ''}val MRR {start_mrr:.3f}")
    ax[0, 1].set_ylim(0, 1)
    ax[0, 1].set_title(f"validation retrieval ({space} pooled space)")
    if space != "raw":  # in the raw space the two are one series: drawn twice, one hides the other
        ax[1, 0].plot(ep, [h["val_cos"] for h in history], **mk, label=f"val cos ({space})")
    ax[1, 0].plot(ep, [h["val_cos_raw"] for h in history], **mk, label="val cos (raw)")
    ax[1, 0].plot(ep, [h["pred_cos_to_mean"] for h in history], **mk, label="predictions: cos to own mean")
    ax[1, 0].plot(ep, [h["target_cos_to_mean"] for h in history], "--", **mk, label="targets: cos to own mean")
    ax[1, 0].set_title("cosines (never alone: see retrieval)")
    ax[1, 1].plot(ep, [h["pred_eff_rank"] for h in history], **mk, label="predictions")
    ax[1, 1].plot(ep, [h["target_eff_rank"] for h in history], "--", **mk, label="targets")
    ax[1, 1].set_title("effective rank (RankMe): collapse when predictions ≪ targets")
    for a in ax.flat:
        a.set_xlabel("epoch")
        if len(ep) <= 12:  # whole epochs only, and a one-epoch run gets its tick too
            a.set_xticks(ep)
        else:
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_curves(history: list[dict[str, Any]], path: Path, title: str = "", space: str = "standardized",
                 start_mrr: float | None = None) -> None:
    import matplotlib.pyplot as plt

    if not history:
        return
    fig = curves_figure(history, title, space, start_mrr)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# -- the run directory ----------------------------------------------------------------------
def store_values(meta: StoreMeta) -> dict[str, Any]:
    """The embedding settings outside the store's fingerprint that change its values: the
    window (which context is cut) and the dtypes. A store embedded again at the same path with
    other values is another store to a run's statistics and weights."""
    return {k: getattr(meta, k) for k in ("max_tokens", "compute_dtype", "state_dtype")}


def values_differ(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The embedding values (:func:`store_values`) that differ, as "name then vs now"; a value
    ``then`` does not record (a run or statistics from before they were recorded) is not compared."""
    return [f"{k} {then[k]} vs {v}" for k, v in now.items() if k in then and then[k] != v]


def _store_check(run: dict[str, Any], store: Store, store_path: Path) -> None:
    if differ := values_differ(run.get("store_meta") or {}, store_values(store.meta)):
        raise TrainingError(f"{store_path}: embedded with other settings since this run started (run vs store: "
                            f"{', '.join(differ)}); resume on the store it was trained on, or start a new --out")
    fp = store.fingerprint()
    if run.get("store_fingerprint") != fp:
        raise TrainingError(f"{store_path}: not this run's store or split (fingerprint {fp[:12]} vs "
                            f"{str(run.get('store_fingerprint'))[:12]}; {store_mismatch(run, store, 'training')}); "
                            "use the run's store and split file, or a new --out")


def store_mismatch(run: dict[str, Any], store: Store, doing: str) -> str:
    """Why a run (its run.json record) does not fit ``store``, in words: the store settings that
    differ, or, when they agree, the split the run was trained with against the one ``doing``
    (a training, an evaluation) uses."""
    old = run.get("store_meta") if isinstance(run.get("store_meta"), dict) else {}
    what = [f"{k} {old[k]} vs {v}" for k, v in store.meta.compatibility_key().items() if k in old and old[k] != v]
    if what:
        return "run vs store: " + ", ".join(what)
    splits = run.get("splits")
    own = "the store's own split"
    then = f"--splits {splits['file']}" if isinstance(splits, dict) and splits.get("file") else own
    now = "another --splits file" if store.split_key is not None else own
    return f"the run was trained with {then}, this {doing} uses {now}"


def run_record(run_dir: Path) -> dict[str, Any]:
    """A run folder's run.json, or {} when it is missing or damaged (for notes and hints; the
    commands that need it refuse a damaged one themselves)."""
    try:
        info = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def read_log(path: Path) -> list[dict[str, Any]]:
    """A run's log.jsonl as its events (a torn last line after a kill is left out)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line after a kill
            continue
    return out


def _append_log(path: Path, entry: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()


# -- train ---------------------------------------------------------------------------------
def train(
    store_path: str | os.PathLike[str],
    config: PredictConfig | None,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    device: str = "auto",
    on_event: Event | None = None,
    splits: str | os.PathLike[str] | None = None,
    probe: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train a predictor; returns a summary (best epoch and its metrics, paths).

    ``config=None`` with ``resume=True`` continues with the run's stored config.
    ``splits``: a split file (``codejepa corpus folds``) that replaces the store's own split,
    e.g. one fold of a cross-validation over repositories; the run records it and can only be
    resumed and evaluated with the same file.
    ``probe``: the probe view ``loss.probe_weight`` mixes into InfoNCE's query and val's
    retrieval (default: the file a resumed run recorded, else the store's ``STORE.probe.h5``;
    :mod:`codejepa.predict.probe`); refused when ``loss.probe_weight`` is 0.
    ``on_event`` receives progress events as dicts keyed by ``event``: ``stats``, ``cache``,
    ``step``, ``epoch``, ``done``, and ``warning``, ``splits``, ``probe``, ``ridge_init``, ``score_map``,
    ``start_val`` (what the CLI prints).
    Raises :class:`TrainingError` (or a store/config error) with one clear line on bad input.
    """
    emit = on_event or (lambda e: None)
    rank, world, local_rank = _dist_env()
    dev = resolve_device(device, local_rank)
    own_group = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        own_group = True
    try:
        return _train(Path(store_path), config, Path(out_dir), resume, dev, rank, world, emit,
                      None if splits is None else Path(splits), None if probe is None else Path(probe))
    except BaseException as e:
        if own_group:
            _release_frames(e)
        if world > 1 and isinstance(e, RuntimeError) and _lost_rank(e):  # not a 50-line gloo/NCCL traceback on every survivor
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise TrainingError(f"another rank stopped or lost its connection ({first}); "
                                f"{_lost_rank_advice(Path(out_dir))}") from None
        raise
    finally:
        _leave_group(own_group)


def _release_frames(e: BaseException) -> None:
    """Free what the frames of ``e``'s traceback hold, the DDP wrapper above all, while the
    process group still exists.

    The wrapper holds the group too. Freed after ``destroy_process_group`` (with the exception, at
    the end of the caller's ``except``), it is the group's last holder and destroys it with the GIL
    held. Gloo's worker thread may then still be freeing the collective that just finished, which
    needs the GIL: the rank hangs at exit (here 7 of 10 runs of six kills right after a step). Torch
    releases the GIL when the group itself is destroyed, so the wrapper must go first: here, or
    in :func:`_leave_group`'s collection when a cycle holds it."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]


def _leave_group(own: bool) -> None:
    """Destroy the process group this call started (``own``), after the garbage collector has
    freed a DDP wrapper that a reference cycle still held (see :func:`_release_frames`)."""
    if own and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _lost_rank(e: RuntimeError) -> bool:
    """Whether a collective failed because a peer rank went away."""
    if isinstance(e, getattr(dist, "DistBackendError", ())) or isinstance(e, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection reset", "connection closed", "broken pipe"))


def _lost_rank_advice(out: Path) -> str:
    # A check only rank 0 makes (a file in the way of --out, a held lock) stops it before any
    # checkpoint: then --resume has nothing to continue, and rank 0's own line says why.
    if (out / "last.pt").is_file():
        return ("the last checkpoint is kept; unless rank 0's own line names another cause, run the same torchrun "
                "command with --resume")
    return "no checkpoint was written: rank 0's message says why; run the command again once that is fixed"


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


@dataclass
class _Position:
    """Where training stands: what last.pt records besides the weights and the optimizer."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps done in the epoch after them
    global_step: int = 0
    loss_sum: float = 0.0  # that epoch's train loss so far, and over how many steps
    loss_steps: int = 0
    best_mrr: float = -1.0
    best_epoch: int = -1  # 0: the ridge start; -1: none yet
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, ckpt: dict[str, Any]) -> _Position:
        return cls(int(ckpt["epoch"]), int(ckpt["step_in_epoch"]), int(ckpt["global_step"]),
                   float(ckpt["epoch_loss_sum"]), int(ckpt["epoch_loss_steps"]), float(ckpt["best_mrr"]),
                   int(ckpt["best_epoch"]), list(ckpt["history"]))


def _train(store_path: Path, config: PredictConfig | None, out: Path, resume: bool, dev: torch.device,
           rank: int, world: int, emit: Event, splits: Path | None = None,
           probe_path: Path | None = None) -> dict[str, Any]:
    main = rank == 0
    paths = {k: out / v for k, v in dict(config="config.json", run="run.json", stats="stats.pt",
                                          stats_json="stats.json", last="last.pt", best="best.pt",
                                          log="log.jsonl", curves="curves.png").items()}
    store = open_store(store_path)
    lock = contextlib.ExitStack()  # rank 0's lock on the run folder: two trainings into one --out would interleave
    locked = False
    try:
        if main and out.is_dir():  # taken before the run there is read, so that no other writer changes it
            lock.enter_context(exclusive(out / LOCK_FILE, f"the run {out}"))
            locked = True
        if main and (note := store.incomplete_note()) is not None:
            emit({"event": "warning", "message": note})
        split_info = None
        if splits is not None:
            assignment, missing = use_split_file(store, splits)
            split_info = {"file": str(splits.resolve()), "key": assignment.key, "label": assignment.label,
                          "listed_records_not_in_store": missing}
            emit({"event": "splits", **split_info})
        # ---- checks before anything is written (every rank reaches the same verdict) ----
        existing = paths["run"].exists() or paths["last"].exists()
        if existing and not resume:
            nothing = (not paths["last"].exists() and not paths["best"].exists()
                       and not any(e.get("event") == "epoch" for e in read_log(paths["log"])))
            raise TrainingError(f"{out}: already holds a run; pass --resume to continue it or choose another --out"
                                + (" (it holds no checkpoint yet: delete it to start again with other settings)"
                                   if nothing else ""))
        ckpt = None
        changes: dict[str, tuple[Any, Any]] = {}
        if resume and existing:
            config, ckpt = _resume_point(paths, store, store_path, config, main, emit)
            # Settings a resume may change (RESUMABLE_CHANGES); train.epochs moves the learning
            # rate's schedule from here on, so config.json alone no longer retrains these weights.
            changes = _config_diff(read_run_config(paths["config"]).to_dict(), config.to_dict())
        if config is None:
            raise TrainingError("no config given and no run to resume")
        cfg = config.validate()
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        train_idx, val_idx, dropped = _usable_records(store, store_path)
        probe = _probe_views(cfg, store, store_path, probe_path, paths["run"])
        if main and probe is not None:
            emit({"event": "probe", "file": str(probe.path), "weight": cfg.loss.probe_weight})
        B = _global_batch(cfg.train.batch_size, len(train_idx), world)
        steps_per_epoch = len(train_idx) // B
        total_steps = steps_per_epoch * cfg.train.epochs
        group_keys, columns = _batch_groups(cfg, store, train_idx)
        stats_key = {"store_fingerprint": store.fingerprint(), "store_values": store_values(store.meta),
                     "train_records": int(len(train_idx)), "outlier_factor": cfg.norm.outlier_factor,
                     "eps": cfg.norm.eps, "whiten_shrink": cfg.norm.whiten_shrink}
        stale = _stats_stale(paths["stats"], stats_key)
        need_stats = stale is not None
        if ckpt is not None and stale is not None:
            raise TrainingError(f"{paths['stats']}: {stale}; the run cannot be resumed")
        if main and stale not in (None, "missing"):  # left by a start that was stopped before its first checkpoint
            emit({"event": "warning", "message": f"{paths['stats']}: {stale}; fitting them again"})
        _barrier(world)

        # ---- run directory and train-split statistics ----
        if main:
            out.mkdir(parents=True, exist_ok=True)
            if not locked:  # a new folder is locked once made; another training may have started there since
                lock.enter_context(exclusive(out / LOCK_FILE, f"the run {out}"))
                if paths["run"].exists() or paths["last"].exists():
                    raise TrainingError(f"{out}: another training started a run here meanwhile; choose another --out")
            atomic_write_json(paths["config"], cfg.to_dict())
        if need_stats:
            if main:
                _fit_stats(paths, store, train_idx, cfg, stats_key, dropped, emit)
            _barrier(world)
        stats = NormStats.from_plain(torch.load(paths["stats"], weights_only=True))

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, store.meta.hidden_size)
        model.norm.load(stats)
        model.to(dev)
        n_params = count_parameters(model)
        if main and not paths["run"].exists():
            atomic_write_json(paths["run"], {
                "format": "codejepa-predict-run", "name": cfg.name or cfg.model.kind,
                "model_kind": cfg.model.kind, "parameters": n_params, "hidden_size": store.meta.hidden_size,
                "store": str(store_path.resolve()), "store_fingerprint": store.fingerprint(),
                "store_meta": asdict(store.meta), "store_complete": store.complete, "code_version": code_version(),
                "torch": torch.__version__, "world_size": world, "device": str(dev), "threads": torch.get_num_threads(),
                "versions": library_versions("torch", "numpy", "h5py"),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "train_records": int(len(train_idx)), "val_records": int(len(val_idx)), "dropped": dropped,
                "splits": split_info, "probe": probe.record if probe is not None else None})
        o = cfg.optim
        opt = (torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam)(
            model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        pos = _Position()
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["torch_rng"].cpu())
            pos = _Position.of(ckpt)
            if not main:  # the checkpoint's loss so far is every rank's: rank 0 carries it on alone
                pos.loss_sum, pos.loss_steps = 0.0, 0
            if main:
                _trim_log(paths["log"], pos, changes)
                if changes:
                    _record_resume_changes(paths["run"], pos, changes)

        # ---- data, and the linear start (rank 0 only: DDP broadcasts rank 0's parameters and
        # buffers when it wraps the model) ----
        spec = feature_spec(cfg, stats)
        emit({"event": "cache", "split": "train", "done": 0, "total": len(train_idx)})
        train_tab = make_table(store, train_idx, spec, cfg.data.cache_gb,
                               progress=lambda a, b: emit({"event": "cache", "split": "train", "done": a, "total": b}))
        val_tab = make_table(store, val_idx, spec, cfg.data.cache_gb) if main else None
        lex_train = lex_val = None
        if cfg.loss.lexical_weight:
            assert columns is not None
            lex_train = LexicalOffsets(columns["signature"][train_idx], columns["body"][train_idx], seed=cfg.train.seed)
            lex_val = (LexicalOffsets(columns["signature"][val_idx], columns["body"][val_idx], seed=cfg.train.seed)
                       if main else None)
        if ckpt is None and main:
            _fit_start(model, opt, cfg, store, train_tab, val_tab, lex_val, probe, pos, paths, dev, emit)
        # The start's validation (this run's or, after a resume, the log's): the curves draw it,
        # and the summary reports it when no epoch beat it.
        start_val = next((e for e in reversed(read_log(paths["log"])) if e.get("event") == "start_val"),
                         None) if main else None
        start_mrr = float(start_val["val_mrr"]) if start_val else None

        multiblock = cfg.mask.strategy == "multiblock" and cfg.model.kind == "transformer"
        net = _wrap_ddp(model, cfg, dev, multiblock) if world > 1 else model
        per_rank = B // world
        # After DDP has broadcast rank 0's fitted buffers (the canonical map):
        lex_ref = _lexical_reference(model, train_tab, lex_train, dev) if lex_train is not None else None
        amp = cfg.train.amp and dev.type == "cuda"
        reveal_spec = (RevealSpec(cfg.train.seed, cfg.model.body_slots, cfg.mask.num_blocks, cfg.mask.block_frac)
                       if multiblock else None)

        if main and pos.epoch == 0 and pos.step == 0:
            _append_log(paths["log"], {"event": "start", "parameters": n_params, "steps_per_epoch": steps_per_epoch,
                                       "batch_size": B, "world_size": world, "train_records": int(len(train_idx)),
                                       "val_records": int(len(val_idx)), "stats": stats.summary(),
                                       "cache": type(train_tab).__name__, "cache_bytes": getattr(train_tab, "nbytes", 0),
                                       "time": time.time()})
        model.train()
        wait_s = step_s = 0.0
        last_plot = time.monotonic()
        ckpt_at = (f"epoch {pos.epoch} + {pos.step} steps" if pos.step else f"after epoch {pos.epoch}") if ckpt else ""
        for epoch in range(pos.epoch, cfg.train.epochs):
            perm = epoch_order(len(train_idx), np.random.default_rng([cfg.train.seed, epoch]), group_keys,
                               cfg.train.group_size)
            batches = [perm[s * B: (s + 1) * B] for s in range(pos.step, steps_per_epoch)]
            shards = [b[rank * per_rank: (rank + 1) * per_rank] for b in batches]
            loader = batch_loader(train_tab, shards, reveal=reveal_spec, epoch=epoch, prefetch=cfg.data.prefetch,
                                  workers=cfg.data.workers)
            t_epoch = time.perf_counter()
            for i, b in enumerate(loader):  # the loader runs to its end: it joins its threads there
                lr = lr_at(pos.global_step, total_steps, cfg)
                reveal = torch.from_numpy(b.pop("reveal")).to(dev) if "reveal" in b else None
                lex = None
                if lex_train is not None and lex_ref is not None:
                    lex = (lex_train.z(batches[i], batches[i]).to(dev), lex_ref)  # the global batch's
                view = probe.rows(b["index"], dev) if probe is not None else None
                # Dropout's masks: a function of the step and the rank, so ranks draw their own and a
                # resume draws what the uninterrupted run drew, whatever else used the generator.
                torch.manual_seed(cfg.train.seed * 1_000_003 + pos.global_step * world + rank)
                stepped = _step(net, model, opt, to_device(b, dev), cfg, lr, reveal, lex, world, amp, view)
                if stepped is None:
                    raise _diverged(paths, cfg, pos, epoch, lr, ckpt_at, main, start_mrr)
                loss_v, parts = stepped
                pos.step += 1
                pos.global_step += 1
                pos.loss_sum += loss_v
                pos.loss_steps += 1
                emit({"event": "step", "epoch": epoch + 1, "epochs": cfg.train.epochs, "step": pos.step,
                      "steps": steps_per_epoch, "global_step": pos.global_step, "loss": loss_v, "lr": lr, **parts})
                every = cfg.train.checkpoint_every_steps
                if every and pos.global_step % every == 0 and pos.step < steps_per_epoch:
                    # every rank takes part: the checkpoint holds the epoch's loss over all ranks
                    epoch_loss = _epoch_loss(pos, world)
                    if main:
                        save_checkpoint(paths["last"], _ckpt(model, opt, cfg, store, pos, epoch_loss))
                        ckpt_at = f"epoch {epoch} + {pos.step} steps"
            epoch_s = time.perf_counter() - t_epoch
            wait_s += loader.wait_s
            step_s += epoch_s
            # ---- epoch end: mean train loss over ranks, validation and checkpoints on rank 0 ----
            loss_sum, loss_steps = _epoch_loss(pos, world)
            pos.epoch, pos.step, pos.loss_sum, pos.loss_steps = epoch + 1, 0, 0.0, 0
            if main:
                entry = _end_epoch(model, opt, cfg, store, val_tab, lex_val, probe, pos, paths, dev,
                                   train_loss=loss_sum / max(1, loss_steps),
                                   lr=lr_at(pos.global_step, total_steps, cfg),
                                   data_wait_share=loader.wait_s / max(1e-9, epoch_s))
                ckpt_at = f"after epoch {pos.epoch}"
                pe = cfg.train.plot_every_s
                if pe >= 0 and (pos.epoch == cfg.train.epochs or time.monotonic() - last_plot >= pe):
                    write_curves(pos.history, paths["curves"],
                                 f"{cfg.name or cfg.model.kind} — {printable(store_path.name)}",
                                 cfg.norm.pooled_space, start_mrr)
                    last_plot = time.monotonic()
                emit(entry)
            _barrier(world)
        summary = {"run_dir": str(out), "best_epoch": pos.best_epoch, "best_val_mrr": pos.best_mrr,
                   "epochs": cfg.train.epochs, "parameters": n_params,
                   "best": (next((h for h in pos.history if h["epoch"] == pos.best_epoch), None) if pos.best_epoch
                            else start_val),
                   "data_wait_share": wait_s / max(1e-9, step_s)}
        if main:
            _append_log(paths["log"], {"event": "done", "best_epoch": pos.best_epoch, "best_val_mrr": pos.best_mrr,
                                       "time": time.time()})
            emit({"event": "done", **summary})
        _barrier(world)  # every rank leaves together: none tears the group down under another
        return summary
    finally:
        lock.close()
        store.close()


def _resume_point(paths: dict[str, Path], store: Store, store_path: Path, config: PredictConfig | None,
                  main: bool, emit: Event) -> tuple[PredictConfig, dict[str, Any] | None]:
    """The config to continue with and last.pt, once the run there is checked resumable."""
    run = read_json_object(paths["run"], "run record", TrainingError, RESUME_REFUSED) if paths["run"].exists() else {}
    _store_check(run, store, store_path)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if main and isinstance(run.get("world_size"), int) and run["world_size"] != world:
        emit({"event": "warning", "message": f"resumed on {world} rank(s); the run started on {run['world_size']}: "
                                             "the data order is the same, the dropout masks differ"})
    if main and run.get("code_version") not in (None, code_version()):
        emit({"event": "warning", "message": f"resumed with code {code_version()}; the run started with "
                                             f"{run['code_version']} (the log's resume line records it)"})
    stored_cfg = read_run_config(paths["config"])
    if config is None:
        config = stored_cfg
    else:
        diff = {k: v for k, v in _config_diff(stored_cfg.to_dict(), config.to_dict()).items()
                if k not in RESUMABLE_CHANGES}
        if diff:
            raise TrainingError(f"--resume with a config that differs from the run's in {sorted(diff)}; "
                                "resume without --config/--set, or start a new --out")
    if not paths["last"].exists():
        if any(e.get("event") == "epoch" for e in read_log(paths["log"])):
            # An epoch end writes last.pt before its log line: trained epochs without it mean
            # it was lost, and starting again would overwrite best.pt with an untrained start.
            raise TrainingError(f"{paths['last']} is missing, but {paths['log'].name} records trained epochs; "
                                "restore it to resume, or start a new --out")
        return config, None
    ckpt = load_checkpoint(paths["last"])
    if ckpt.get("store_fingerprint") != store.fingerprint():
        _store_check({"store_fingerprint": ckpt.get("store_fingerprint")}, store, store_path)
    reached, step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
    if config.train.epochs < reached + (step > 0):
        # It would end "done" at once, its config saying fewer epochs than its weights have had.
        raise TrainingError(f"train.epochs = {config.train.epochs} is below what this run has trained "
                            f"({reached} epochs{f' and {step} steps of the next' if step else ''}); "
                            "resume with at least that many, or start a new --out")
    if (lost := _best_lost(paths["best"], ckpt)) is not None:
        if not (int(ckpt["best_epoch"]) == int(ckpt["epoch"]) and int(ckpt["step_in_epoch"]) == 0):
            raise TrainingError(f"{lost}; last.pt (epoch {ckpt['epoch']}) is intact, but the best "
                                f"epoch's ({ckpt['best_epoch']}) weights are lost: restore best.pt, "
                                "or start a new --out")
        if main:  # the best epoch is last.pt's own: its weights are there
            save_checkpoint(paths["best"], _without_optimizer(ckpt))
            emit({"event": "warning", "message": f"{lost}; rewritten from last.pt, whose epoch "
                                                 f"({ckpt['epoch']}) is the best"})
    return config, ckpt


def _best_lost(best: Path, ckpt: dict[str, Any]) -> str | None:
    """Why the best checkpoint that ``ckpt`` (last.pt) records is gone, or None when it is there.

    Without this a resumed run that trains no further epoch ends "done" with the damage in
    place, and one that does trains on unless an epoch beats the lost best.
    """
    if int(ckpt.get("best_epoch", -1)) < 0:
        return None  # no best yet (a kill in the first epoch of a run without a ridge start)
    if not best.exists():
        return f"{best} is missing"
    try:
        load_checkpoint(best)
    except TrainingError:
        return f"{best} is damaged"
    return None


def _probe_views(cfg: PredictConfig, store: Store, store_path: Path, path: Path | None,
                 run_json: Path) -> ProbeViews | None:
    """The probe view ``loss.probe_weight`` trains with, checked (see load_probe_views); None
    when the weight is 0. A resumed run reads the view it recorded unless ``path`` says."""
    if not cfg.loss.probe_weight:
        if path is not None:
            raise TrainingError("--probe is read only with loss.probe_weight > 0 (e.g. --set loss.probe_weight=0.5)")
        return None
    recorded = run_record(run_json.parent).get("probe") if run_json.exists() else None
    return load_probe_views(store, store_path, path, recorded if isinstance(recorded, dict) else None)


def _usable_records(store: Store, store_path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The train and val records with a body token to predict, and how many of each had none."""
    train_idx, val_idx = store.indices("train"), store.indices("val")
    for split, idx in (("train", train_idx), ("val", val_idx)):
        if len(idx) == 0:
            raise TrainingError(f"{store_path}: the {split} split is empty "
                                f"({len(store)} records); training needs train and val records")
    train_ok, val_ok = valid_records(store, train_idx), valid_records(store, val_idx)
    dropped = {"train_empty_body": int((~train_ok).sum()), "val_empty_body": int((~val_ok).sum())}
    train_idx, val_idx = train_idx[train_ok], val_idx[val_ok]
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise TrainingError(f"{store_path}: no train or val record has a body token to predict")
    return train_idx, val_idx, dropped


def _global_batch(batch_size: int, n_train: int, world: int) -> int:
    """The global batch: ``train.batch_size``, or the largest that a small train split fills."""
    B = batch_size if n_train >= batch_size else n_train - n_train % world
    if B <= 0 or B % world:
        raise TrainingError(f"train.batch_size ({B}) must be a positive multiple of the {world} DDP ranks")
    return B


def _batch_groups(cfg: PredictConfig, store: Store,
                  train_idx: np.ndarray) -> tuple[np.ndarray | None, dict[str, np.ndarray] | None]:
    """The train records' batch groups (file or repository keys, or None) and the corpus
    columns that file batches and the lexical loss read (None when neither is on)."""
    columns = None
    if cfg.train.batch_groups == "file" or cfg.loss.lexical_weight:
        why = ("train.batch_groups = 'file' (or 'repo', which needs no corpus)" if cfg.train.batch_groups == "file"
               else "loss.lexical_weight")
        columns = corpus_columns(store, cfg.data.corpus or None, why=why)
    if cfg.train.batch_groups == "file":
        assert columns is not None
        return columns["file"][train_idx], columns
    if cfg.train.batch_groups == "repo":
        return store.repos[train_idx], columns
    return None, columns


def _fit_stats(paths: dict[str, Path], store: Store, train_idx: np.ndarray, cfg: PredictConfig,
               key: dict[str, Any], dropped: dict[str, int], emit: Event) -> None:
    """Fit the normalisation on the train records and save it with ``key`` (what makes it stale)."""
    emit({"event": "stats", "done": 0, "total": 2 * len(train_idx)})
    stats = compute_stats(store, train_idx, outlier_factor=cfg.norm.outlier_factor,
                          sample_records=cfg.norm.stats_sample_records, eps=cfg.norm.eps,
                          whiten_shrink=cfg.norm.whiten_shrink,
                          progress=lambda a, b: emit({"event": "stats", "done": a, "total": b}))
    save_checkpoint(paths["stats"], {"format": "codejepa-norm-stats", **key, **stats.to_plain()})
    atomic_write_json(paths["stats_json"], {**stats.summary(), "dropped": dropped})


def _step(net: torch.nn.Module, model: torch.nn.Module, opt: torch.optim.Optimizer, bt: dict[str, torch.Tensor],
          cfg: PredictConfig, lr: float, reveal: torch.Tensor | None, lex: Any, world: int,
          amp: bool, view: torch.Tensor | None = None) -> tuple[float, dict[str, float]] | None:
    """One optimiser step at ``lr``: the loss and its parts, or None (nothing updated) when the
    loss is not finite on some rank — every rank then stops at the same step."""
    for g in opt.param_groups:
        g["lr"] = lr
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        loss, parts, _ = batch_loss(net, model.norm, bt, cfg, reveal, lex, gather=world > 1, view=view)
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
    if world > 1:
        dist.all_reduce(bad)
    if float(bad) > 0:
        return None
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    return float(loss.detach()), {k: float(v) for k, v in parts.items()}


def _diverged(paths: dict[str, Path], cfg: PredictConfig, pos: _Position, epoch: int, lr: float, ckpt_at: str,
              main: bool, start_mrr: float | None) -> DivergedError:
    """Log a non-finite loss at ``pos`` and draw the curves so far; the error to raise."""
    # Without a checkpoint nothing trained is lost by starting again, and a --resume would meet
    # the same settings: the way out is a new run with other settings.
    kept = (f"the last good checkpoint is kept: {paths['last']} ({ckpt_at})" if ckpt_at
            else f"no checkpoint had been written yet (delete {paths['last'].parent} to start again)")
    if main:
        _append_log(paths["log"], {"event": "diverged", "epoch": epoch + 1, "step": pos.step,
                                   "global_step": pos.global_step, "lr": lr, "time": time.time()})
        if cfg.train.plot_every_s >= 0:
            write_curves(pos.history, paths["curves"], cfg.name or cfg.model.kind, cfg.norm.pooled_space, start_mrr)
    return DivergedError(f"loss became non-finite at epoch {epoch + 1}, step {pos.step + 1} (lr {lr:.3g}); "
                         f"{kept}; lower optim.lr or set optim.grad_clip")


def _lexical_reference(model: torch.nn.Module, train_tab: Any, lex: LexicalOffsets, dev: torch.device) -> torch.Tensor:
    """The lexical loss's reference bodies in the score space, unit length."""
    with torch.no_grad():
        bodies = to_device(train_tab.batch(lex.ref), dev)["body"]
        return F.normalize(model.norm.to_score(model.norm.body_to_norm(bodies)).float(), dim=-1)


def _stats_stale(path: Path, key: dict[str, Any]) -> str | None:
    """Why statistics left by an earlier start cannot be reused, or None when they were fitted
    the same way on the same records."""
    if not path.exists():
        return "missing"
    try:
        old = torch.load(path, weights_only=True)
        if not isinstance(old, dict):
            return "damaged"
    except Exception:  # a torn or foreign file: fit again
        return "damaged"
    if old.get("store_fingerprint") != key["store_fingerprint"]:
        return "fitted on another store"
    if "store_values" in old and old["store_values"] != key["store_values"]:  # older stats do not record them
        differ = values_differ(old["store_values"], key["store_values"])
        return f"fitted on a store embedded with other settings ({', '.join(differ)})"
    if old.get("train_records") != key["train_records"]:
        return (f"fitted on {old.get('train_records')} train records, and this store has {key['train_records']} "
                "(another store of the same corpus and teacher, or records embedded since the run started)")
    diff = sorted(k for k in key if k != "store_values" and old.get(k) != key[k])
    return f"fitted with other settings ({', '.join(diff)})" if diff else None


def _record_resume_changes(run_json: Path, pos: _Position, changes: dict[str, tuple[Any, Any]]) -> None:
    run = read_json_object(run_json, "run record", TrainingError, RESUME_REFUSED)
    run.setdefault("resumed_with_changes", []).append(
        {"epoch": pos.epoch, "step_in_epoch": pos.step, "changes": {k: list(v) for k, v in sorted(changes.items())}})
    atomic_write_json(run_json, run)


def _trim_log(log: Path, pos: _Position, changes: dict[str, tuple[Any, Any]] | None = None) -> None:
    """Drop log lines written after the checkpoint (a kill between the two) and mark the resume."""
    kept = [e for e in read_log(log) if not (e.get("event") == "epoch" and e["epoch"] > pos.epoch)]
    logged = {e["epoch"] for e in kept if e.get("event") == "epoch"}
    kept += [h for h in pos.history if h["epoch"] not in logged]
    atomic_write_bytes(log, "".join(json.dumps(e) + "\n" for e in kept).encode())
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    # The code that continues the run: another commit than run.json's is visible here.
    _append_log(log, {"event": "resume", "epoch": pos.epoch, "step_in_epoch": pos.step, "world_size": world,
                      "code_version": code_version(), "threads": torch.get_num_threads(), "time": time.time(),
                      **({"changes": {k: list(v) for k, v in sorted(changes.items())}} if changes else {})})


def _fit_start(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: PredictConfig, store: Store, train_tab: Any,
               val_tab: Any, lex_val: LexicalOffsets | None, probe: ProbeViews | None, pos: _Position,
               paths: dict[str, Path], dev: torch.device, emit: Event) -> None:
    """A new run's fitted start: input statistics, the ridge path, the canonical score map."""
    if getattr(model, "view_mu", None) is not None:
        init_input_stats(model, train_tab)
    if cfg.model.linear_skip == "ridge":
        ridge_info = init_linear_path(model, train_tab, val_tab, cfg.model.ridge_alpha,
                                      select_views=cfg.model.ridge_views == "select")
        _append_log(paths["log"], {"event": "ridge_init", **ridge_info, "time": time.time()})
        emit({"event": "ridge_init", **ridge_info})
    if cfg.loss.space == "canonical":
        score_info = init_score_map(model, train_tab)
        _append_log(paths["log"], {"event": "score_map", **score_info, "time": time.time()})
        emit({"event": "score_map", **score_info})
    if cfg.model.linear_skip == "ridge":
        # The ridge start competes for best.pt as "epoch 0": a residual that only loses on
        # val (on the demo's 2,000 records it overfits from the first epoch) falls back to
        # the linear map it started from, not to its least bad epoch.
        start_entry = {"event": "start_val", "epoch": 0, **evaluate_table(model, val_tab, cfg, dev, lex_val, probe),
                       "time": time.time()}
        pos.best_mrr, pos.best_epoch = start_entry["val_mrr"], 0
        save_checkpoint(paths["best"], _without_optimizer(_ckpt(model, opt, cfg, store, pos)))
        _append_log(paths["log"], start_entry)
        emit(start_entry)


def _wrap_ddp(model: torch.nn.Module, cfg: PredictConfig, dev: torch.device, multiblock: bool) -> torch.nn.Module:
    lo = cfg.loss
    slot_loss = multiblock or (lo.regression != "none" and lo.regression_weight != 0 and lo.regression_on == "auto")
    # A transformer whose loss reads only the pooled prediction leaves its slot head without
    # gradients; DDP must be told, or it waits for them forever.
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index] if dev.type == "cuda" else None,
        find_unused_parameters=cfg.model.kind == "transformer" and not slot_loss)


def _end_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: PredictConfig, store: Store, val_tab: Any,
               lex_val: LexicalOffsets | None, probe: ProbeViews | None, pos: _Position, paths: dict[str, Path],
               dev: torch.device, *,
               train_loss: float, lr: float, data_wait_share: float) -> dict[str, Any]:
    """Validate the epoch just finished (``pos.epoch``), checkpoint it and log it; its log entry."""
    m = evaluate_table(model, val_tab, cfg, dev, lex_val, probe)
    entry = {"event": "epoch", "epoch": pos.epoch, "global_step": pos.global_step, "lr": lr,
             "train_loss": train_loss, **m, "data_wait_share": data_wait_share, "time": time.time()}
    improved = m["val_mrr"] > pos.best_mrr
    if improved:
        pos.best_mrr, pos.best_epoch = m["val_mrr"], pos.epoch
    entry["best_epoch"] = pos.best_epoch
    pos.history.append(entry)
    ck = _ckpt(model, opt, cfg, store, pos)
    if improved:  # best first: a kill between the two leaves last.pt behind best.pt, never ahead
        save_checkpoint(paths["best"], _without_optimizer(ck))
    save_checkpoint(paths["last"], ck)
    _append_log(paths["log"], entry)
    return entry


def _epoch_loss(pos: _Position, world: int) -> tuple[float, int]:
    """The epoch's train loss sum and step count so far, over every rank (a collective under DDP)."""
    tl = torch.tensor([pos.loss_sum, float(pos.loss_steps)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(tl)
    return float(tl[0]), int(tl[1])


def _without_optimizer(ckpt: dict[str, Any]) -> dict[str, Any]:
    """best.pt: what last.pt holds but the optimizer state (nothing resumes from best.pt)."""
    return {k: v for k, v in ckpt.items() if k != "optimizer"}


def _ckpt(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: PredictConfig, store: Store,
          pos: _Position, epoch_loss: tuple[float, int] | None = None) -> dict[str, Any]:
    """last.pt's contents; ``epoch_loss``: the epoch's loss sum and steps over all ranks (default: this rank's)."""
    loss_sum, loss_steps = epoch_loss if epoch_loss is not None else (pos.loss_sum, pos.loss_steps)
    return {
        "format": CKPT_FORMAT, "format_version": CKPT_VERSION, "kind": cfg.model.kind,
        "hidden_size": store.meta.hidden_size, "config": cfg.to_dict(),
        "store_fingerprint": store.fingerprint(), "code_version": code_version(),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
        "epoch": pos.epoch, "step_in_epoch": pos.step, "global_step": pos.global_step,
        "epoch_loss_sum": loss_sum, "epoch_loss_steps": loss_steps,
        "best_mrr": pos.best_mrr, "best_epoch": pos.best_epoch, "history": [dict(h) for h in pos.history],
    }


__all__ = ["train", "TrainingError", "DivergedError", "StoreError", "load_checkpoint", "read_log", "evaluate_table",
           "resolve_device", "make_table", "feature_spec"]
