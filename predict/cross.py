"""A cross-scorer: reads a query's signature tokens and one candidate body's tokens *together*
and gives the pair one score, to re-rank a first stage's top candidates
(``codejepa evaluate retrieval --rerank RUN``).

The predictors of :mod:`codejepa.predict.train` map a query to one vector and rank bodies by
cosine (a dual encoder). A joint encoder over both token sequences can compare them token by
token, which a pooled vector cannot; it is too slow to score every body, so it re-scores the
few a first stage ranks highest. On python-40 (in-context targets, 12 epochs) it added 7-21
rank@1 points to every first stage it was put behind, and (3 epochs) nothing with body-only
targets: what it reads is
the signature's echo in the in-context body states (bench/RESULTS.md, "The echo control").

Inputs, and why they are honest: the query side is the first ``query_tokens`` states of the
signature segment of the *inputs* pass (context + signature; its body is never read, nor its
length); the candidate side is the first ``body_tokens`` states of the candidate's stored
targets — the thing being ranked. Sink tokens are left out on both sides.

Training reads the train split only. Each train query's hard negatives are the top
``hard_pool`` train bodies of a ridge regression (signature mean + last token → pooled body,
whitened with train statistics) fitted on the *other* train repositories (``folds`` folds), so
they are as hard as a held-out query's; only queries whose body is among them are used —
a positive from outside that top is told apart by being unlike the negatives, a shortcut that
does not transfer (on a demo store: train loss 0.01, nothing on val). Softmax cross-entropy
over the positive and ``negatives`` of them per step. Each epoch ends with a val measure: the
positive's MRR among itself and its ``hard_pool`` ridge negatives (val pool, ridge fitted on
train), beside the ridge's own MRR on the same candidates; ``best.pt`` is the best epoch by it.

A run folder holds ``config.json``, ``run.json`` (store, fingerprint), ``last.pt`` (model,
optimizer, position: rewritten every ``checkpoint_every_steps`` steps and at epoch ends,
atomically), ``best.pt`` and ``log.jsonl``. The data order, the negatives and dropout are
functions of (seed, epoch, step), so a resumed run gives the weights of an uninterrupted one.

DDP: under ``torchrun`` (``WORLD_SIZE`` > 1) rank 0 computes the hard negatives and sends them
to every rank; each rank takes every WORLD_SIZE-th query of each global batch (``batch_size``
must be a multiple of WORLD_SIZE) and the gradients are averaged, so the weights are those of
one process (tested with two CPU ranks; dropout draws its masks per rank). Rank 0 alone holds
the run folder's lock, measures val and writes the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from codejepa.core import CodejepaError, atomic_write_json, exclusive, printable, read_json_object
from codejepa.embed.store import Store, open_store, use_split_file
from codejepa.predict.batching import BatchingError, corpus_columns
from codejepa.predict.config import CROSS_KIND, SEED_LIMIT
from codejepa.predict.normalize import _Moments
from codejepa.predict.ridge import RidgePath, fit_ridge
from codejepa.predict.train import (_dist_env, _leave_group, _lost_rank, _lost_rank_advice, _release_frames, code_version,
                                    resolve_device, save_checkpoint)

KIND = CROSS_KIND
Event = Callable[[dict[str, Any]], None]


class CrossError(CodejepaError):
    """A cross-scorer run that cannot be trained or loaded, or a store it does not fit."""


@dataclass(frozen=True)
class CrossConfig:
    query_tokens: int = 32  # the signature's first tokens read (inputs pass, sink tokens out)
    body_tokens: int = 32  # the candidate body's first tokens read
    width: int = 64
    depth: int = 2
    heads: int = 4
    dropout: float = 0.1
    hard_pool: int = 32  # hard negatives come from the cross-fitted ridge's top hard_pool train bodies
    negatives: int = 7  # drawn from them per query and step
    folds: int = 5  # train repositories are cut into this many folds for the cross-fitted ridge
    epochs: int = 12  # python-40's val measure: 0.362 after 3, 0.453 after 6, 0.519 after 12 (cosine to each total)
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    whiten_shrink: float = 0.1
    norm_sample_records: int = 4000  # train records the per-dimension token statistics come from
    val_queries: int = 1000  # val queries of the per-epoch measure
    checkpoint_every_steps: int = 50
    threads: int = 0  # torch CPU threads (0: torch's default)
    seed: int = 0

    def validate(self) -> CrossConfig:
        checks = [
            (self.query_tokens >= 1 and self.body_tokens >= 1, "query_tokens and body_tokens must be ≥ 1"),
            (self.width >= 1 and self.depth >= 1 and self.heads >= 1, "width, depth and heads must be ≥ 1"),
            (self.width % self.heads == 0, f"width {self.width} must be a multiple of heads {self.heads}"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (1 <= self.negatives <= self.hard_pool, "1 ≤ negatives ≤ hard_pool is needed"),
            (self.folds >= 2, "folds must be ≥ 2"),
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be ≥ 1"),
            (math.isfinite(self.lr) and self.lr > 0 and math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             "lr must be > 0 and weight_decay ≥ 0"),
            (0 <= self.seed < SEED_LIMIT, f"seed must be in [0, 2**32), not {self.seed}"),
            (0 <= self.whiten_shrink <= 1, "whiten_shrink must be in [0, 1]"),
            (self.norm_sample_records >= 1 and self.val_queries >= 1, "norm_sample_records and val_queries must be ≥ 1"),
            (self.checkpoint_every_steps >= 0 and self.threads >= 0, "checkpoint_every_steps and threads must be ≥ 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise CrossError(f"cross-scorer config: {msg}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CrossConfig:
        known = {f.name: f.type for f in fields(cls)}
        bad = sorted(set(d) - set(known) - {"kind"})
        if bad:
            raise CrossError(f"cross-scorer config: unknown key {bad[0]!r} (known: {', '.join(known)})")
        return cls(**{k: v for k, v in d.items() if k != "kind"}).validate()


# Settings a resumed run may change. checkpoint_every_steps and threads leave the weights as
# they would have been; epochs continues on the cosine schedule of the new total (more training,
# not the weights of any uninterrupted run).
RESUMABLE = ("epochs", "checkpoint_every_steps", "threads")


def parse_overrides(items: list[str], base: CrossConfig | None = None) -> CrossConfig:
    """``key=value`` strings over a config (the defaults when ``base`` is None); each value is
    read as its field's type, so a misspelt key or a bad number is one clear error."""
    cfg = asdict(base or CrossConfig())
    types = {f.name: type(getattr(CrossConfig(), f.name)) for f in fields(CrossConfig)}
    for item in items:
        key, sep, val = item.partition("=")
        key = key.strip().removeprefix("cross.")
        if not sep or key not in types:
            raise CrossError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        try:
            cfg[key] = types[key](val.strip())
        except ValueError:
            raise CrossError(f"--set {item!r}: {key} takes a {types[key].__name__}") from None
    return CrossConfig(**cfg).validate()


# -- the model ------------------------------------------------------------------------------------

class CrossScorer(nn.Module):
    """[CLS] + the query's signature tokens + the body's tokens, one joint pre-norm encoder; the
    score is read at [CLS]. Each side has its own input projection and learned positions, and
    its own per-dimension token standardisation (train statistics, buffers of the model)."""

    def __init__(self, d: int, cfg: CrossConfig) -> None:
        super().__init__()
        w = cfg.width
        self.pq, self.pb = nn.Linear(d, w), nn.Linear(d, w)
        self.pos_q = nn.Parameter(torch.randn(cfg.query_tokens, w) * 0.02)
        self.pos_b = nn.Parameter(torch.randn(cfg.body_tokens, w) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        layer = nn.TransformerEncoderLayer(w, cfg.heads, 4 * w, dropout=cfg.dropout, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, 1))
        for name in ("q_mean", "b_mean"):
            self.register_buffer(name, torch.zeros(d))
        for name in ("q_std", "b_std"):
            self.register_buffer(name, torch.ones(d))

    def forward(self, q: torch.Tensor, q_len: torch.Tensor, b: torch.Tensor, b_len: torch.Tensor) -> torch.Tensor:
        """``q`` [n, Lq, d], ``b`` [n, Lb, d] raw states (zero-padded), lengths [n] → scores [n]."""
        n, lq, lb = len(q), q.shape[1], b.shape[1]
        qm = torch.arange(lq, device=q.device)[None] < q_len[:, None]
        bm = torch.arange(lb, device=b.device)[None] < b_len[:, None]
        q = ((q.float() - self.q_mean) / self.q_std) * qm[..., None]
        b = ((b.float() - self.b_mean) / self.b_std) * bm[..., None]
        x = torch.cat([self.cls.expand(n, 1, -1), self.pq(q) + self.pos_q, self.pb(b) + self.pos_b], 1)
        pad = ~torch.cat([torch.ones(n, 1, dtype=torch.bool, device=q.device), qm, bm], 1)
        return self.out(self.enc(x, src_key_padding_mask=pad)[:, 0]).squeeze(-1)


@dataclass
class Windows:
    """The first tokens of each record's signature (inputs pass) and body (targets), float16,
    for the records in ``rows`` (store index → row, −1 for records not read)."""

    q: np.ndarray  # [n, Lq, d]
    q_len: np.ndarray  # [n]
    b: np.ndarray  # [n, Lb, d]
    b_len: np.ndarray  # [n]
    rows: np.ndarray  # [len(store)]

    def take(self, records: np.ndarray) -> tuple[torch.Tensor, ...]:
        r = self.rows[records]
        if np.any(r < 0):
            raise CrossError("a record's token windows were not read (call CrossRun.prepare first)")
        return (torch.from_numpy(self.q[r]), torch.from_numpy(self.q_len[r]),
                torch.from_numpy(self.b[r]), torch.from_numpy(self.b_len[r]))


def read_windows(store: Store, records: np.ndarray, lq: int, lb: int,
                 on_progress: Callable[[int, int], None] | None = None) -> Windows:
    """The windows of ``records``: the signature segment's first ``lq`` non-sink states of the
    inputs pass — never anything of the body — and the first ``lb`` non-sink body states."""
    idx = np.unique(np.asarray(records, dtype=np.int64))
    d = store.meta.hidden_size
    rows = np.full(len(store), -1, np.int64)
    rows[idx] = np.arange(len(idx))
    q, b = np.zeros((len(idx), lq, d), np.float16), np.zeros((len(idx), lb, d), np.float16)
    q_len, b_len = np.zeros(len(idx), np.int64), np.zeros(len(idx), np.int64)
    seg = store.segments()
    done = 0
    for name, arr, lens, cap in (("inputs", q, q_len, lq), ("targets", b, b_len, lb)):
        for run, states, special, offs in store.iter_blocks(name, idx, as_float32=False):
            for k, r in enumerate(run):
                keep = np.flatnonzero(~special[offs[k]: offs[k + 1]].astype(bool))
                if name == "inputs":
                    s0, s1 = seg[r, 1]
                    keep = keep[(keep >= s0) & (keep < s1)]
                keep = keep[:cap]
                arr[rows[r], : len(keep)] = states[offs[k]:][keep]
                lens[rows[r]] = len(keep)
            done += len(run)
            if on_progress is not None:
                on_progress(done, 2 * len(idx))
    return Windows(q, q_len, b, b_len, rows)


def pair_scores(model: CrossScorer, win: Windows, q_rec: np.ndarray, c_rec: np.ndarray, *,
                batch: int = 1024, device: torch.device | str = "cpu") -> np.ndarray:
    """The model's score of each (query record, candidate record) pair, float32, in eval mode."""
    out = np.empty(len(q_rec), np.float32)
    model.eval()
    with torch.no_grad():
        for a in range(0, len(q_rec), batch):
            q, ql, _, _ = win.take(q_rec[a : a + batch])
            _, _, b, bl = win.take(c_rec[a : a + batch])
            out[a : a + batch] = model(*(t.to(device) for t in (q, ql, b, bl))).float().cpu().numpy()
    return out


# -- hard negatives --------------------------------------------------------------------------------

def body_labels(store: Store, corpus_dir: str | Path | None = None) -> tuple[np.ndarray, str | None]:
    """One label per record, the corpus's normalised body hash (the evaluate stage's duplicate
    label): a duplicate body is one candidate, and never a query's negative. Without a
    readable corpus the stored body token ids stand in, with a warning."""
    try:
        return corpus_columns(store, corpus_dir, why="the cross-scorer's duplicate bodies")["body_hash"], None
    except BatchingError as e:
        ids, _ = store.tokens("targets")
        off = np.concatenate([[0], np.cumsum(store.lengths("targets"))])
        return (np.array([hashlib.blake2b(ids[off[i]: off[i + 1]].tobytes(), digest_size=12).hexdigest()
                          for i in range(len(store))]), f"{e}; equal body token ids tell duplicates instead")


@dataclass
class HardNegatives:
    """Per train query its ``hard_pool`` hardest wrong train bodies (store indices), and which
    queries have their own body among the top (the ones trained on)."""

    queries: np.ndarray  # store indices of the train queries used
    positives: np.ndarray  # [len(queries)] a store index holding each query's body
    negatives: np.ndarray  # [len(queries), hard_pool] store indices
    val_queries: np.ndarray
    val_positives: np.ndarray
    val_negatives: np.ndarray
    val_ridge_mrr: float  # the ridge's own MRR on the val candidate sets, for reference
    alpha: float
    train_in_top: float  # share of train queries whose body the cross-fitted ridge puts in the top


def _top_wrong(pred: torch.Tensor, reps: np.ndarray, true_g: np.ndarray, bodies: torch.Tensor,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's rank of its own body group (pessimistic ties) and its top ``k`` other groups
    (as store indices of their representatives), by cosine of unit rows."""
    cand = bodies[torch.from_numpy(reps)]
    ranks = np.empty(len(pred), np.int64)
    negs = np.empty((len(pred), k), np.int64)
    for a in range(0, len(pred), 2048):
        s = pred[a : a + 2048] @ cand.T
        t = torch.from_numpy(true_g[a : a + 2048])
        ranks[a : a + 2048] = (s >= s.gather(1, t[:, None])).sum(1).numpy()
        s.scatter_(1, t[:, None], float("-inf"))
        negs[a : a + 2048] = reps[s.topk(k, dim=1).indices.numpy()]
    return ranks, negs


def hard_negatives(store: Store, cfg: CrossConfig, train: np.ndarray, val: np.ndarray, labels: np.ndarray,
                   rng: np.random.Generator) -> HardNegatives:
    views = store.pooled_views(("signature", "signature_last", "body"))
    x = torch.from_numpy(np.concatenate([views["signature"], views["signature_last"]], 1))
    mom = _Moments(store.meta.hidden_size, cov=True)
    mom.add(views["body"][train])
    w_mat, _ = mom.whitening(cfg.whiten_shrink)
    y = torch.from_numpy((views["body"] - views["body"][train].mean(0)) @ w_mat)  # whitened with train statistics
    bodies = F.normalize(y, dim=1)

    def pool(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, first, inv = np.unique(labels[idx], return_index=True, return_inverse=True)
        return idx[first], inv

    reps, true_g = pool(train)
    if len(reps) <= cfg.hard_pool:
        raise CrossError(f"hard_pool {cfg.hard_pool} needs more distinct train bodies than the {len(reps)} there are")
    t_x, t_y = x[train], y[train]
    sol, _ = fit_ridge(t_x, t_y, x[val], y[val])
    repos = store.repos[train].astype(str)
    uniq = rng.permutation(np.unique(repos))
    if len(uniq) < 2:
        raise CrossError("cross-fitted hard negatives need train functions from at least 2 repositories")
    fold_of = {r: k % cfg.folds for k, r in enumerate(uniq)}
    fold = np.array([fold_of[r] for r in repos])
    pred = torch.empty_like(t_y)
    for k in range(min(cfg.folds, len(uniq))):
        path = RidgePath(t_x[fold != k], t_y[fold != k])
        s = path.solve(sol.alpha)
        pred[torch.from_numpy(fold == k)] = t_x[fold == k].float() @ s.weight + s.bias
    ranks, negs = _top_wrong(F.normalize(pred, dim=1), reps, true_g, bodies, cfg.hard_pool)
    use = ranks <= cfg.hard_pool
    if not use.any():
        raise CrossError("no train query has its body among the cross-fitted ridge's top "
                         f"{cfg.hard_pool}: nothing to train on (a larger hard_pool?)")
    # Val: the ridge fitted on all of train, the val split's own pool of bodies.
    v_reps, v_true = pool(val)
    k_val = min(cfg.hard_pool, len(v_reps) - 1)
    v_pred = F.normalize(x[val].float() @ sol.weight + sol.bias, dim=1)
    v_ranks, v_negs = _top_wrong(v_pred, v_reps, v_true, bodies, max(k_val, 1))
    v_use = np.flatnonzero(v_ranks <= k_val) if k_val >= 1 else np.empty(0, np.int64)
    v_use = np.sort(rng.choice(v_use, min(cfg.val_queries, len(v_use)), replace=False)) if len(v_use) else v_use
    return HardNegatives(train[use], reps[true_g[use]], negs[use],
                         val[v_use], v_reps[v_true[v_use]], v_negs[v_use],
                         float((1.0 / v_ranks[v_use]).mean()) if len(v_use) else float("nan"),
                         float(sol.alpha), float(use.mean()))


# -- training -------------------------------------------------------------------------------------

CKPT_FORMAT = "codejepa-cross"
CKPT_VERSION = 1


def _lr(step: int, total: int, cfg: CrossConfig) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to zero: a function of the
    step alone, so that a resumed run follows the same schedule."""
    warm = max(1, total // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return float(cfg.lr * 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warm) / max(1, total - warm)))))


def _token_stats(win: Windows, records: np.ndarray) -> dict[str, torch.Tensor]:
    """Per-dimension mean and std of the kept tokens of each side over ``records`` (train)."""
    out = {}
    for side, arr, lens in (("q", win.q, win.q_len), ("b", win.b, win.b_len)):
        r = win.rows[records]
        toks = np.concatenate([arr[i, : lens[i]].astype(np.float32) for i in r] or [np.zeros((1, arr.shape[2]), np.float32)])
        out[f"{side}_mean"] = torch.from_numpy(toks.mean(0))
        out[f"{side}_std"] = torch.from_numpy(toks.std(0) + 1e-4)
    return out


def _read_ckpt(path: Path) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CrossError(f"{path}: no such checkpoint (has an epoch of training finished?)") from None
    except Exception as e:  # torch's own message advises an unsafe load: never that for a foreign file
        raise CrossError(f"{path}: not a loadable cross-scorer checkpoint ({type(e).__name__}: damaged, "
                         "truncated or foreign)") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT or int(ck.get("format_version", -1)) != CKPT_VERSION:
        raise CrossError(f"{path}: not a cross-scorer checkpoint of this version (`codejepa predict cross` writes them)")
    return ck


def _restore_best(best: Path, ck: dict[str, Any]) -> str | None:
    """Before a resume: a lost or damaged best.pt is rewritten from last.pt when its epoch is
    the best one (its weights are there), else refused. Otherwise the run would end "done" with
    no usable best.pt, or train on unless a later epoch beat the lost one."""
    history, best_mrr = list(ck.get("history") or []), float(ck.get("best_val_mrr", float("-inf")))
    if not history:
        return None  # no epoch has ended: no best yet
    try:
        _read_ckpt(best)
        return None
    except CrossError:
        why = f"{best} is {'damaged' if best.exists() else 'missing'}"
    mrrs = [float(e.get("val_mrr", float("nan"))) for e in history]
    # The epoch that wrote best.pt: the first that reached the best measure (a later tie does not
    # replace it), or the last one when no epoch had a measure (nan keeps the last epoch).
    best_epoch = next((k + 1 for k, m in enumerate(mrrs) if m == best_mrr), len(history))
    if best_epoch != int(ck["epoch"]) or int(ck["step"]) != 0:
        raise CrossError(f"{why}; last.pt (epoch {ck['epoch']}) is intact, but the best epoch's ({best_epoch}) "
                         "weights are lost: restore best.pt, or start a new --out")
    save_checkpoint(best, {**ck, "optimizer": {}, "best_epoch": best_epoch})
    return f"{why}; rewritten from last.pt, whose epoch ({best_epoch}) is the best"


def _epoch_of(line: str) -> float:
    try:
        return float(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _val_mrr(model: CrossScorer, win: Windows, hn: HardNegatives, dev: torch.device) -> float:
    """The positive's MRR among itself and its val hard negatives (pessimistic ties)."""
    if not len(hn.val_queries):
        return float("nan")
    cand = np.concatenate([hn.val_positives[:, None], hn.val_negatives], 1)
    s = pair_scores(model, win, np.repeat(hn.val_queries, cand.shape[1]), cand.reshape(-1), device=dev).reshape(cand.shape)
    return float((1.0 / (s >= s[:, :1]).sum(1)).mean())


def train_cross(store_path: str | Path, out: str | Path, cfg: CrossConfig | None = None, *, resume: bool = False,
                overrides: list[str] | None = None, device: str = "cpu", corpus: str | Path | None = None,
                on_event: Event | None = None, splits: str | Path | None = None) -> dict[str, Any]:
    """Train a cross-scorer on ``store_path``'s train split into the run folder ``out``.

    ``resume``: continue ``out``'s run from ``last.pt`` (``overrides`` may then change only
    :data:`RESUMABLE` settings). ``corpus``: the store's corpus folder when it moved (its body
    texts tell duplicate bodies apart). ``splits``: a split file (``codejepa corpus folds``, one
    fold) instead of the store's own split, as ``predict train --splits`` (the scorer then fits
    only that fold's evaluation: its fingerprint holds the split). Returns the run record
    (``run.json``)."""
    rank, world, local_rank = _dist_env()
    dev = resolve_device(device, local_rank)
    emit = (on_event or (lambda _e: None)) if rank == 0 else (lambda _e: None)
    own_group = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # The other ranks wait while rank 0 fits the ridge of the hard negatives (minutes on a large
        # store): longer than NCCL's default timeout.
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=2))
        own_group = True
    try:
        return _train(Path(store_path), Path(out), cfg, resume, overrides or [], dev, corpus, emit, rank, world,
                      None if splits is None else Path(splits))
    except BaseException as e:
        if own_group:
            _release_frames(e)
        if world > 1 and isinstance(e, RuntimeError) and _lost_rank(e):
            raise CrossError(f"another rank stopped or lost its connection; {_lost_rank_advice(Path(out))}") from None
        raise
    finally:
        _leave_group(own_group)


def _agree(error: BaseException | None, rank: int, world: int) -> None:
    """Every rank's set-up ends here: one rank's bad input stops all of them with its message,
    rather than leaving the others waiting for it in a collective."""
    if world > 1:
        said: list[str | None] = [None] * world
        dist.all_gather_object(said, None if error is None else str(error))
        first = next(((r, m) for r, m in enumerate(said) if m is not None), None)
        if first is not None and error is None:
            raise CrossError(f"rank {first[0]}: {first[1]}")
    if error is not None:
        raise error


def _train(store_path: Path, out: Path, cfg: CrossConfig | None, resume: bool, overrides: list[str],
           dev: torch.device, corpus: str | Path | None, emit: Event, rank: int = 0, world: int = 1,
           splits: Path | None = None) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        note = None
        try:
            if out.exists() and not out.is_dir():
                raise CrossError(f"--out {out}: not a folder")
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                stack.enter_context(exclusive(out / ".lock", "a cross-scorer training"))
            setup = _setup(store_path, out, cfg, resume, overrides, world, splits)
            stack.callback(setup[0].close)
            note = _restore_best(out / "best.pt", setup[2]) if rank == 0 and setup[2] is not None else None
        except (CodejepaError, OSError) as e:
            _agree(e, rank, world)
        _agree(None, rank, world)
        if note is not None:
            emit({"event": "warning", "message": note})
        if setup[3] is not None:
            emit({"event": "splits", **setup[3]})
        return _fit(*setup, store_path, out, dev, corpus, emit, rank, world)


def _setup(store_path: Path, out: Path, cfg: CrossConfig | None, resume: bool, overrides: list[str],
           world: int, splits: Path | None = None,
           ) -> tuple[Store, CrossConfig, dict[str, Any] | None, dict[str, Any] | None]:
    """The store (with ``splits``' assignment), the config, the checkpoint to resume from and
    what the split file is, each checked (bad input: one line)."""
    last = out / "last.pt"
    ck: dict[str, Any] | None = None
    if last.exists() and not resume:
        raise CrossError(f"{out} holds a run already: continue it with --resume, or choose another --out")
    if resume:
        if not last.exists():
            raise CrossError(f"{out}: nothing to resume (no last.pt); start the run without --resume")
        ck = _read_ckpt(last)
        then = CrossConfig.from_dict(ck["config"])
        cfg = parse_overrides(overrides, then)
        changed = [k for k in asdict(cfg) if getattr(cfg, k) != getattr(then, k) and k not in RESUMABLE]
        if changed:
            raise CrossError(f"a resumed run keeps its settings; {', '.join(changed)} may not change "
                             f"(only {', '.join(RESUMABLE)} may)")
    else:
        cfg = parse_overrides(overrides, cfg)
    if cfg.batch_size % world:
        raise CrossError(f"batch_size {cfg.batch_size} must be a multiple of WORLD_SIZE {world} (each rank an equal share)")
    store = open_store(store_path)
    split_info = None
    try:
        if splits is not None:
            assignment, missing = use_split_file(store, splits)
            split_info = {"file": str(splits.resolve()), "key": assignment.key, "label": assignment.label,
                          "listed_records_not_in_store": missing}
        if ck is not None and ck["store_fingerprint"] != store.fingerprint():
            raise CrossError(f"{out} was trained on a store with other settings than {store_path} (or another "
                             "--splits file, or none): resume with that store and split")
        train, val = store.indices("train"), store.indices("val")
        if len(train) < 2 or len(val) < 2:
            raise CrossError(f"{store_path}: a cross-scorer needs train and val records (has {len(train)} and {len(val)})")
    except BaseException:
        store.close()
        raise
    return store, cfg, ck, split_info


def _fit(store: Store, cfg: CrossConfig, ck: dict[str, Any] | None, split_info: dict[str, Any] | None,
         store_path: Path, out: Path, dev: torch.device,
         corpus: str | Path | None, emit: Event, rank: int, world: int) -> dict[str, Any]:
    last, best, log = out / "last.pt", out / "best.pt", out / "log.jsonl"
    main = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fp = store.fingerprint()
    train, val = store.indices("train"), store.indices("val")
    d = store.meta.hidden_size
    emit({"event": "start", "train": len(train), "val": len(val), "resumed": ck is not None})
    box: list[Any] = [None, None]  # the hard negatives, or rank 0's error
    if main:  # one ridge for every rank: another machine's BLAS could break a tie another way
        try:
            labels, warning = body_labels(store, corpus)
            if warning:
                emit({"event": "warning", "message": warning})
            box[0] = hard_negatives(store, cfg, train, val, labels, np.random.default_rng(cfg.seed))
        except CodejepaError as e:
            if world == 1:
                raise
            box[1] = str(e)
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise CrossError(box[1] if main else f"rank 0: {box[1]}")
    hn: HardNegatives = box[0]
    if world > 1 and len(hn.queries) < world:
        raise CrossError(f"{len(hn.queries)} train queries have their body among the hard negatives: "
                         f"fewer than the {world} ranks")
    emit({"event": "hard_negatives", "queries": len(hn.queries), "share": hn.train_in_top, "alpha": hn.alpha,
          "val_queries": len(hn.val_queries), "val_ridge_mrr": hn.val_ridge_mrr})
    need = np.concatenate([hn.queries, hn.positives, hn.negatives.ravel(), hn.val_queries, hn.val_positives,
                           hn.val_negatives.ravel()])
    win = read_windows(store, need, cfg.query_tokens, cfg.body_tokens,
                       lambda a, b: emit({"event": "windows", "done": a, "total": b}))
    sample = np.random.default_rng(cfg.seed).permutation(np.unique(np.concatenate([hn.queries, hn.positives])))
    torch.manual_seed(cfg.seed)  # the initial weights: a function of the seed
    core = CrossScorer(d, cfg)
    if ck is None:
        for k, v in _token_stats(win, sample[: cfg.norm_sample_records]).items():
            getattr(core, k).copy_(v)
    core.to(dev)
    opt = torch.optim.AdamW(core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    epoch, step, history, best_mrr = 0, 0, [], float("-inf")
    if ck is not None:
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        epoch, step, history, best_mrr = int(ck["epoch"]), int(ck["step"]), list(ck["history"]), float(ck["best_val_mrr"])
    model: nn.Module = core if world == 1 else torch.nn.parallel.DistributedDataParallel(
        core, device_ids=[dev.index] if dev.type == "cuda" else None)
    per_epoch = max(1, len(hn.queries) // cfg.batch_size)
    total = cfg.epochs * per_epoch
    n_params = sum(p.numel() for p in core.parameters())
    record = {"kind": KIND, "store": str(Path(store_path).resolve()), "store_fingerprint": fp, "hidden_size": d,
              "parameters": n_params, "train_queries": len(hn.queries), "train_in_top": hn.train_in_top,
              "ridge_alpha": hn.alpha, "val_queries": len(hn.val_queries), "val_ridge_mrr": hn.val_ridge_mrr,
              "world_size": world, "splits": split_info, "code_version": code_version(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if main and ck is not None and (out / "run.json").exists():  # a resume keeps the run's first start time
        try:
            first = json.loads((out / "run.json").read_text())
        except (OSError, ValueError):  # a damaged run.json is written anew
            first = None
        if isinstance(first, dict) and isinstance(first.get("created"), str):
            record["created"] = first["created"]
        earlier = first.get("resumed_with_changes") if isinstance(first, dict) else None
        if isinstance(earlier, list):
            record["resumed_with_changes"] = earlier
    if ck is not None:
        # epochs moves the cosine schedule from here on: config.json alone no longer retrains these weights
        then = CrossConfig.from_dict(ck["config"])
        changes = {k: [getattr(then, k), getattr(cfg, k)] for k in RESUMABLE if getattr(then, k) != getattr(cfg, k)}
        if changes:
            record.setdefault("resumed_with_changes", []).append(
                {"epoch": int(ck["epoch"]), "step": int(ck["step"]), "changes": changes})
    if main:
        atomic_write_json(out / "config.json", cfg.to_dict())
        atomic_write_json(out / "run.json", record)
    emit({"event": "model", "parameters": n_params, "steps": total, "per_epoch": per_epoch})

    def ckpt(**extra: Any) -> dict[str, Any]:
        return {"format": CKPT_FORMAT, "format_version": CKPT_VERSION, "config": cfg.to_dict(),
                "store_fingerprint": fp, "hidden_size": d, "model": core.state_dict(),
                "optimizer": opt.state_dict(), "epoch": epoch, "step": step, "history": history,
                "best_val_mrr": best_mrr, **extra}

    if main and ck is None:  # a run killed before its first step can be resumed too
        save_checkpoint(last, ckpt())
    elif main and log.exists():  # entries past the checkpoint (the interrupted epoch's, a torn line): dropped
        log.write_text("".join(ln + "\n" for ln in log.read_text().splitlines() if _epoch_of(ln) <= epoch))
    # The loss window of an epoch cut by a kill: its log line then averages the same steps as an
    # uninterrupted run's (the weights match either way).
    carried = [float(x) for x in (ck.get("window") or [])] if ck is not None and step > 0 else []
    for epoch in range(epoch, cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(hn.queries))
        window, carried = carried, []
        while step < per_epoch:
            g = epoch * per_epoch + step
            rows = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            pick = np.random.default_rng([cfg.seed, epoch, step, 1])
            choice = np.stack([pick.choice(cfg.hard_pool, cfg.negatives, replace=False) for _ in rows])
            # Negatives are drawn for the whole global batch, then each rank takes its share.
            n_global = len(rows)
            rows, choice = rows[rank::world], choice[rank::world]
            cand = np.concatenate([hn.positives[rows, None], hn.negatives[rows[:, None], choice]], 1)
            q, ql, _, _ = win.take(np.repeat(hn.queries[rows], cand.shape[1]))
            _, _, b, bl = win.take(cand.reshape(-1))
            torch.manual_seed(cfg.seed * 1_000_003 + g * world + rank)  # dropout: a function of the step (and rank)
            model.train()
            logits = model(*(t.to(dev) for t in (q, ql, b, bl))).view(len(rows), -1)
            target = torch.zeros(len(rows), dtype=torch.long, device=dev)
            if world == 1:
                loss = F.cross_entropy(logits.float(), target)
                seen = loss.detach()
            else:  # DDP averages the ranks' gradients: each rank's sum over the global batch size × world,
                # so a short batch shared unequally still gives the global batch's mean loss
                local = F.cross_entropy(logits.float(), target, reduction="sum")
                loss = local * world / n_global
                seen = local.detach().clone()
                dist.all_reduce(seen)  # the global batch's loss, for the log and every rank's divergence check
                seen /= n_global
            if not torch.isfinite(seen):
                raise CrossError(f"the loss diverged at epoch {epoch} step {step} (a smaller lr?)")
            for grp in opt.param_groups:
                grp["lr"] = _lr(g, total, cfg)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(core.parameters(), 1.0)
            opt.step()
            step += 1
            window = (window + [seen.item()])[-50:]
            emit({"event": "step", "epoch": epoch + 1, "epochs": cfg.epochs, "step": step, "steps": per_epoch,
                  "loss": float(np.mean(window))})
            if main and cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and step < per_epoch:
                save_checkpoint(last, ckpt(window=window))
        mrr = _val_mrr(core, win, hn, dev) if main else float("nan")
        if world > 1:  # every rank's history and best epoch are rank 0's
            said = [mrr]
            dist.broadcast_object_list(said, src=0)
            mrr = float(said[0])
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(window)) if window else float("nan"),
                 "val_mrr": mrr, "val_ridge_mrr": hn.val_ridge_mrr}
        history.append(entry)
        improved = not mrr <= best_mrr  # nan (no val query) keeps the last epoch
        if improved:
            best_mrr = mrr if np.isfinite(mrr) else best_mrr
        if main:
            if improved:
                save_checkpoint(best, {**ckpt(), "optimizer": {}, "best_epoch": epoch + 1})
            with log.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            save_checkpoint(last, {**ckpt(), "epoch": epoch + 1, "step": 0})
        step = 0
        emit({"event": "epoch", **entry, "best": improved})
        if world > 1:  # the next epoch starts once rank 0's files of this one are written
            dist.barrier()
    record["history"] = history
    record["best_val_mrr"] = best_mrr
    if main:
        atomic_write_json(out / "run.json", record)
    emit({"event": "done", "best_val_mrr": best_mrr, "out": str(out)})
    return record


# -- loading ---------------------------------------------------------------------------------------

@dataclass
class CrossRun:
    """A trained cross-scorer, ready to score (query, candidate) record pairs of its store."""

    model: CrossScorer
    config: CrossConfig
    name: str
    store_fingerprint: str
    run_dir: Path
    epoch: int
    val_mrr: float
    device: torch.device
    windows: Windows | None = None

    def check_store(self, store: Store) -> None:
        if store.fingerprint() != self.store_fingerprint:
            raise CrossError(f"cross-scorer {self.name!r} was trained on a store with other settings than "
                             f"{store.path} (another teacher, layer, template, corpus or split file)")

    def prepare(self, store: Store, records: np.ndarray, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Read the token windows of every record that will be scored (queries and candidates)."""
        self.check_store(store)
        self.windows = read_windows(store, records, self.config.query_tokens, self.config.body_tokens, on_progress)

    def scores(self, q_rec: np.ndarray, c_rec: np.ndarray) -> np.ndarray:
        if self.windows is None:
            raise CrossError("CrossRun.prepare(store, records) first")
        return pair_scores(self.model, self.windows, np.asarray(q_rec), np.asarray(c_rec), device=self.device)


def load_cross(run_dir: str | Path, device: str = "cpu") -> CrossRun:
    """A cross-scorer run's best epoch (``torch.load(weights_only=True)``)."""
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise CrossError(f"{run}: not a cross-scorer run (no config.json; train one with `codejepa predict cross`)")
    conf = read_json_object(run / "config.json", "cross-scorer config", CrossError, "retrain the run")
    if conf.get("kind") != KIND:
        raise CrossError(f"{run}: a {conf.get('kind', 'predict')} run, not a cross-scorer (`codejepa predict cross`)")
    ck = _read_ckpt(run / "best.pt")
    cfg = CrossConfig.from_dict(ck["config"])
    model = CrossScorer(int(ck["hidden_size"]), cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise CrossError(f"{run / 'best.pt'}: weights do not fit its config ({str(e).splitlines()[0]})") from None
    dev = torch.device(device)
    return CrossRun(model.to(dev).eval(), cfg, printable(run.resolve().name) or "cross", str(ck["store_fingerprint"]),
                    run, int(ck.get("best_epoch", ck["epoch"])), float(ck["best_val_mrr"]), dev)
