"""Experiment: a learned cross-scorer re-ranking a first stage's top K.

The toolkit's own stage is ``codejepa predict cross`` + ``codejepa evaluate retrieval --rerank``
(``codejepa.predict.cross``, ``codejepa.evaluate.rerank``), which re-ranks every row of an
evaluation, the sibling-softmax rows included. This script is the experiment that led there,
kept to reproduce the figures recorded with it and for its pooled-vector comparison
(``--arch pooled``).

    python bench/cross_rerank.py STORE.h5 [--first ridge|hybrid] [--space whitened|canonical]
                                 [--arch tokens|pooled] [--Lq 32] [--Lb 32] [--d 64] [--epochs 3] [--K 50]
                                 [--load MODEL.pt] [--out RESULT.json]

The predictors of `codejepa predict` map a query to one vector and rank bodies by cosine (a
dual encoder). This script measures what a cross-scorer adds: a small transformer reads the
query's signature token states (the inputs pass: nothing of its body) and one candidate body's
token states (the stored targets) *together* and gives the pair one score; it re-scores the
first stage's top K, and its per-query z-score is added to the first stage's with a weight
chosen on val MRR. Candidates outside the top K keep their first-stage rank.

First stages: ``ridge`` — ridge+last in the given space (or ``--run``'s predictions);
``hybrid`` — the same minus CSLS's hub penalty, fused with BM25 (signature query), k, β and the
fusion weight chosen on val MRR (evaluate's grids; evaluate's sibling softmax is not applied).
Test-split pool of distinct bodies (evaluate's body labels), pessimistic ties, CIs and the
paired bootstrap over test repositories with evaluate's own functions.

Training (train split only): each train query's hard negatives are the top ``--Ktrain`` train
bodies of a ridge+last fitted on the *other* train repositories (5 folds), so they are as hard as
a held-out query's; only queries whose body is among them are used (a positive from outside
the top is told apart by being unlike the negatives: a shortcut that does not transfer).
Softmax cross-entropy over the positive and ``--neg`` sampled negatives. ``--arch pooled``
scores [prediction ⊙ body, |prediction − body|, the query's views, the body] with an MLP
instead (pooled vectors only: the comparison that shows what the tokens add).

Measured figures and commands: bench/RESULTS.md, "A cross-scorer re-ranks the top 50".
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from codejepa.core import CodejepaError
from codejepa.embed.store import open_store
from codejepa.evaluate.baselines import FUSION_WEIGHTS, RIDGE_ALPHAS, RidgeFit
from codejepa.evaluate.hubness import CSLS_BETAS, CSLS_KS, hub_penalties
from codejepa.evaluate.metrics import bootstrap_cis, compute_metrics, paired_bootstrap
from codejepa.evaluate.retrieval import load_corpus_view
from codejepa.evaluate.spaces import fit_space
from codejepa.predict.cross import read_windows
from codejepa.predict.lexical import BM25Scorer

RERANK_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, float("inf"))  # inf: the cross-scorer alone


class Cross(nn.Module):
    """[CLS] + the query's signature tokens + the body's tokens, one joint encoder; the score
    is read at [CLS]. Positions are learned per side."""

    def __init__(self, din: int, d: int, layers: int, heads: int, lq: int, lb: int) -> None:
        super().__init__()
        self.pq, self.pb = nn.Linear(din, d), nn.Linear(din, d)
        self.pos_q = nn.Parameter(torch.randn(lq, d) * 0.02)
        self.pos_b = nn.Parameter(torch.randn(lb, d) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))

    def forward(self, q: torch.Tensor, qmask: torch.Tensor, b: torch.Tensor, bmask: torch.Tensor) -> torch.Tensor:
        n = len(q)
        x = torch.cat([self.cls.expand(n, 1, -1), self.pq(q) + self.pos_q, self.pb(b) + self.pos_b], 1)
        pad = ~torch.cat([torch.ones(n, 1, dtype=torch.bool), qmask, bmask], 1)
        return self.out(self.enc(x, src_key_padding_mask=pad)[:, 0]).squeeze(-1)


class Pooled(nn.Module):
    """An MLP over pooled vectors: [prediction ⊙ body, |prediction − body|, query views, body],
    beside the scaled cosine of prediction and body."""

    def __init__(self, pred: torch.Tensor, bodies: torch.Tensor, views: torch.Tensor, hidden: int) -> None:
        super().__init__()
        d = bodies.shape[1]
        self.pred, self.bodies, self.views = pred, bodies, views
        self.net = nn.Sequential(nn.Linear(5 * d, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, 1))
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, qi: torch.Tensor, bi: torch.Tensor) -> torch.Tensor:
        p, b = self.pred[qi] * 8, self.bodies[bi] * 8  # unit vectors scaled to about unit entries
        cos = (self.pred[qi] * self.bodies[bi]).sum(1)
        return self.scale * cos + self.net(torch.cat([p * b, (p - b).abs(), self.views[qi] * 8, b], 1)).squeeze(-1)


def zrows(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)


def zrows_t(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path)
    ap.add_argument("--first", default="ridge", choices=["ridge", "hybrid"])
    ap.add_argument("--space", default="whitened", choices=["whitened", "canonical"])
    ap.add_argument("--arch", default="tokens", choices=["tokens", "pooled"])
    ap.add_argument("--K", type=int, default=50, help="first-stage candidates re-scored per query")
    ap.add_argument("--Ktrain", type=int, default=32, help="hard negatives drawn from the cross-fitted top Ktrain")
    ap.add_argument("--neg", type=int, default=7, help="negatives per query in a training step")
    ap.add_argument("--Lq", type=int, default=32, help="signature tokens read (the first ones, sink tokens out)")
    ap.add_argument("--Lb", type=int, default=32, help="body tokens read (the first ones, sink tokens out)")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512, help="--arch pooled: the MLP's width")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load", type=Path, default=None, help="a trained cross-scorer's state dict: no training")
    ap.add_argument("--run", type=Path, default=None,
                    help="a `predict train` run whose predictions replace ridge+last in the first stage "
                         "(training's hard negatives still come from the cross-fitted ridge+last)")
    ap.add_argument("--out", type=Path, default=None,
                    help="result JSON, the model beside it as .pt (default: STORE's folder/cross-rerank.json)")
    args = ap.parse_args()
    if args.out is None:  # beside the store, not in whatever folder the script was started from
        args.out = args.store.parent / "cross-rerank.json"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    st = open_store(args.store)
    cv = load_corpus_view(st)
    n_rec, dim = len(st), st.meta.hidden_size
    tr, va, te = (st.indices(s) for s in ("train", "val", "test"))
    log(f"{n_rec} records: train {len(tr)} val {len(va)} test {len(te)}")
    if min(len(tr), len(va), len(te)) < 2:
        raise CodejepaError(f"{args.store}: the experiment needs train, val and test records (has {len(tr)}, "
                            f"{len(va)}, {len(te)})")

    # -- first stage: ridge+last in the space, every statistic from train ----------------------
    views = st.pooled_views(("signature", "signature_last", "body"))
    x = np.concatenate([views["signature"], views["signature_last"]], 1)
    y = views["body"]
    space = fit_space(args.space, y[tr], train_inputs=x[tr] if args.space == "canonical" else None)
    ridge = RidgeFit.fit(x[tr], y[tr])
    bodies = F.normalize(torch.from_numpy(space.apply(y)), dim=1)
    labels = np.asarray(cv.labels, dtype=str)

    def pool_of(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A representative record of each distinct body among idx, and each query's group."""
        _, first, inv = np.unique(labels[idx], return_index=True, return_inverse=True)
        return idx[first], inv

    def predict(idx: np.ndarray, alpha: float, fit: RidgeFit = ridge) -> torch.Tensor:
        return F.normalize(torch.from_numpy(space.apply(fit.predict(x[idx], alpha))), dim=1)

    first_run = None
    if args.run is not None:
        from codejepa.predict.api import load_predictor
        first_run = load_predictor(args.run)

    def first_pred(idx: np.ndarray, alpha: float) -> torch.Tensor:
        """The first stage's query vectors: the run's predictions, else ridge+last's."""
        if first_run is None:
            return predict(idx, alpha)
        return F.normalize(torch.from_numpy(space.apply(first_run.predict_pooled(st, idx))), dim=1)

    def ranks_of(s: torch.Tensor, true_g: np.ndarray) -> np.ndarray:
        return (s >= s.gather(1, torch.from_numpy(true_g)[:, None])).sum(1).numpy()  # pessimistic ties

    def dense_top(q_idx: np.ndarray, k: int, pred: torch.Tensor) -> tuple:
        reps, true_g = pool_of(q_idx)
        ranks = np.empty(len(q_idx), dtype=np.int64)
        topi = np.empty((len(q_idx), k), dtype=np.int64)
        tops = np.empty((len(q_idx), k), dtype=np.float32)
        for a in range(0, len(q_idx), 2048):
            s = pred[a : a + 2048] @ bodies[reps].T
            ranks[a : a + 2048] = ranks_of(s, true_g[a : a + 2048])
            v, i = s.topk(min(k, s.shape[1]), dim=1)
            topi[a : a + 2048], tops[a : a + 2048] = i.numpy(), v.numpy()
        return reps, true_g, ranks, topi, tops

    sel = {a: compute_metrics(dense_top(va, 1, predict(va, a))[2])["mrr"] for a in RIDGE_ALPHAS}
    alpha = max(sel, key=sel.get)
    log(f"ridge+last α {alpha} (val MRR {sel[alpha]:.3f})")

    hybrid_settings: dict[str, tuple] = {}
    hub_refs: list[torch.Tensor] = []  # the first stage's train predictions, computed once

    def hybrid_top(q_idx: np.ndarray, k: int, split: str) -> tuple:
        """Ridge+last − β·hub penalty, fused with BM25; k, β, weight chosen on val's matrix."""
        reps, true_g = pool_of(q_idx)
        dense = first_pred(q_idx, alpha) @ bodies[reps].T
        if not hub_refs:
            hub_refs.append(first_pred(tr, alpha))
        pen = hub_penalties(bodies[reps], hub_refs[0], CSLS_KS, cand_groups=st.repos[reps],
                            ref_groups=st.repos[tr])
        bm = BM25Scorer([cv.signature_texts[i] for i in q_idx], [cv.body_texts[i] for i in reps]).rows(np.arange(len(q_idx)))
        zb = zrows_t(bm)

        def combine(kk: int, beta: float, w: float) -> torch.Tensor:
            return w * zrows_t(dense - beta * pen[kk][None, :]) + (1 - w) * zb

        if split == "val":
            grid = {(kk, b, w): float((1.0 / ranks_of(combine(kk, b, w), true_g)).mean())
                    for kk in CSLS_KS for b in CSLS_BETAS for w in FUSION_WEIGHTS}
            hybrid_settings["val"] = max(grid, key=grid.get)
            log(f"hybrid first stage: CSLS k, β, BM25 fusion weight = {hybrid_settings['val']} "
                f"(val MRR {grid[hybrid_settings['val']]:.4f})")
        s = combine(*hybrid_settings["val"])
        v, i = s.topk(min(k, s.shape[1]), dim=1)
        return reps, true_g, ranks_of(s, true_g), i.numpy(), v.numpy().astype(np.float32)

    # -- token tensors: the signature's first Lq tokens, the body's first Lb (sink tokens out) -----
    q_tok = np.zeros((n_rec, args.Lq, dim), np.float16)
    q_len = np.zeros(n_rec, np.int64)
    b_tok = np.zeros((n_rec, args.Lb, dim), np.float16)
    b_len = np.zeros(n_rec, np.int64)
    if args.arch == "tokens":  # the toolkit's windows of every record: rows are record indices
        win = read_windows(st, np.arange(n_rec), args.Lq, args.Lb)
        q_tok, q_len, b_tok, b_len = win.q, win.q_len, win.b, win.b_len
        log("token states read")

    def norm_stats(arr: np.ndarray, lens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        sub = rng.choice(tr, min(4000, len(tr)), replace=False)
        toks = np.concatenate([arr[i, : lens[i]].astype(np.float32) for i in sub])
        return torch.from_numpy(toks.mean(0)), torch.from_numpy(toks.std(0) + 1e-4)

    if args.arch == "tokens":
        (qm, qs), (bm_, bs_) = norm_stats(q_tok, q_len), norm_stats(b_tok, b_len)

    def side(arr: np.ndarray, lens: np.ndarray, mean: torch.Tensor, std: torch.Tensor, cap: int,
             idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.arange(cap)[None] < torch.from_numpy(lens[idx])[:, None]
        return ((torch.from_numpy(arr[idx].astype(np.float32)) - mean) / std) * m[..., None], m

    # Train queries get cross-fitted predictions (5 folds of train repositories).
    pred_all = predict(np.arange(n_rec), alpha)
    fold_of = {r: k % 5 for k, r in enumerate(rng.permutation(np.unique(st.repos[tr])))}
    fold = np.array([fold_of[r] for r in st.repos[tr]])
    for k in range(5):
        fit = RidgeFit.fit(x[tr[fold != k]], y[tr[fold != k]])
        pred_all[torch.from_numpy(tr[fold == k])] = predict(tr[fold == k], alpha, fit)
    log("cross-fitted train predictions")

    if args.arch == "tokens":
        model: nn.Module = Cross(dim, args.d, args.layers, args.heads, args.Lq, args.Lb)
    else:
        sig_space = fit_space("whitened", x[tr][:, :dim])
        last_space = fit_space("whitened", x[tr][:, dim:])
        qviews = torch.from_numpy(np.concatenate([sig_space.apply(x[:, :dim]), last_space.apply(x[:, dim:])], 1))
        qviews = qviews / qviews[torch.from_numpy(tr)].norm(dim=1).mean()
        model = Pooled(pred_all, bodies, qviews, args.hidden)
    log(f"cross-scorer ({args.arch}): {sum(p.numel() for p in model.parameters()):,} parameters")

    def scores(qi: np.ndarray, bi: np.ndarray) -> torch.Tensor:
        if args.arch == "pooled":
            return model(torch.from_numpy(qi), torch.from_numpy(bi))
        q, qmask = side(q_tok, q_len, qm, qs, args.Lq, qi)
        b, bmask = side(b_tok, b_len, bm_, bs_, args.Lb, bi)
        return model(q, qmask, b, bmask)

    # -- training ---------------------------------------------------------------------------------
    if not 1 <= args.neg <= args.Ktrain < len(pool_of(tr)[0]):
        raise CodejepaError(f"--neg {args.neg} ≤ --Ktrain {args.Ktrain} < the train split's "
                            f"{len(pool_of(tr)[0])} distinct bodies is needed")
    reps_tr, tg_tr, rk_tr, topi_tr, _ = dense_top(tr, args.Ktrain + 1, pred_all[torch.from_numpy(tr)])
    log(f"train, cross-fitted: rank@1 {100 * (rk_tr == 1).mean():.1f}% in the train pool")
    use = tr[rk_tr <= args.Ktrain]
    log(f"{len(use)} train queries with their body in the top {args.Ktrain}")
    pos_in_tr = {int(r): k for k, r in enumerate(tr)}
    negs = np.stack([reps_tr[topi_tr[k][topi_tr[k] != tg_tr[k]][: args.Ktrain]] for k in range(len(tr))])
    if args.load:
        try:  # missing, damaged, or trained with another --arch/--Lq/--Lb/--d/--layers: one line
            model.load_state_dict(torch.load(args.load))
        except (OSError, RuntimeError, pickle.UnpicklingError) as e:
            raise CodejepaError(f"--load {args.load}: not a cross-scorer of these settings "
                                f"({str(e).splitlines()[0]})") from None
        log(f"loaded {args.load}: no training")
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
        steps = args.epochs * (len(use) // args.bs)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=max(steps, 1), pct_start=0.05)
        log(f"training {steps} steps of {args.bs} queries × (1 + {args.neg}) candidates")
        step, window = 0, []
        for ep in range(args.epochs):
            model.train()
            order = rng.permutation(use)
            for a in range(0, len(order) - args.bs + 1, args.bs):
                qb = order[a : a + args.bs]
                ks = np.array([pos_in_tr[int(r)] for r in qb])
                choice = np.stack([rng.choice(args.Ktrain, args.neg, replace=False) for _ in qb])
                cand = np.concatenate([reps_tr[tg_tr[ks]][:, None], negs[ks][np.arange(len(qb))[:, None], choice]], 1)
                logits = scores(np.repeat(qb, 1 + args.neg), cand.reshape(-1)).view(len(qb), 1 + args.neg)
                loss = F.cross_entropy(logits, torch.zeros(len(qb), dtype=torch.long))
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                window = (window + [loss.item()])[-100:]
                if step % 100 == 0:
                    log(f"epoch {ep} step {step}/{steps} loss {np.mean(window):.3f} (last 100 steps)")

    # -- re-ranking: weight on val, figures on test ------------------------------------------------
    def rerank(q_idx: np.ndarray, split: str) -> dict[str, np.ndarray]:
        if args.first == "hybrid":
            reps, true_g, ranks0, topi, tops = hybrid_top(q_idx, args.K, split)
        else:
            reps, true_g, ranks0, topi, tops = dense_top(q_idx, args.K, first_pred(q_idx, alpha))
        k = topi.shape[1]  # the pool may hold fewer than K bodies
        qi, bi = np.repeat(q_idx, k), reps[topi].reshape(-1)
        model.eval()
        with torch.no_grad():
            rr = np.concatenate([scores(qi[a : a + 1024], bi[a : a + 1024]).numpy()
                                 for a in range(0, len(qi), 1024)]).reshape(len(q_idx), k)
        return dict(true_g=true_g, ranks0=ranks0, topi=topi, tops=tops, rr=rr, repos=st.repos[q_idx])

    def fused_ranks(ev: dict[str, np.ndarray], w: float) -> np.ndarray:
        f = zrows(ev["tops"]) + w * zrows(ev["rr"]) if np.isfinite(w) else ev["rr"]
        hit = ev["topi"] == ev["true_g"][:, None]
        ranks = ev["ranks0"].copy()  # a body outside the top K keeps its rank (> K)
        for n in np.flatnonzero(hit.any(1)):
            j = np.flatnonzero(hit[n])[0]
            ranks[n] = int((f[n] >= f[n, j]).sum())
        return ranks

    ev_val = rerank(va, "val")
    val_mrr = {w: compute_metrics(fused_ranks(ev_val, w))["mrr"] for w in RERANK_WEIGHTS}
    w_best = max(val_mrr, key=val_mrr.get)
    log("val MRR by weight: " + ", ".join(f"{w}: {m:.4f}" for w, m in val_mrr.items()) + f" → {w_best}")
    ev = rerank(te, "test")
    first, reranked, alone = ev["ranks0"], fused_ranks(ev, w_best), fused_ranks(ev, float("inf"))
    res: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "ridge_alpha": alpha,
                 "hybrid_settings": hybrid_settings.get("val"), "rerank_weight": w_best,
                 "val_mrr": {str(k): v for k, v in val_mrr.items()}, "n_test": len(first),
                 "first_stage_recall@K": float((first <= args.K).mean()), "wall_s": round(time.time() - t0, 1)}
    for name, r in (("first stage", first), ("re-ranked", reranked), ("cross-scorer alone (top K)", alone)):
        ci = bootstrap_cis(r, ev["repos"])
        res[name] = {m: ci[m].to_json() for m in ("rank@1", "mrr")}
        log(f"{name:28s} rank@1 {100 * ci['rank@1'].value:.1f} [{100 * ci['rank@1'].low:.1f}, "
            f"{100 * ci['rank@1'].high:.1f}]  MRR {ci['mrr'].value:.3f}")
    for c in paired_bootstrap(reranked, first, ev["repos"]):
        log(f"paired re-ranked − first stage, {c.metric}: {c.diff:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}] "
            f"p = {c.p_value:.3f}")
        res[f"paired_{c.metric}"] = c.to_json()
    args.out.write_text(json.dumps(res, indent=1))
    if not args.load:
        torch.save(model.state_dict(), args.out.with_suffix(".pt"))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except CodejepaError as e:  # a missing store, a run of another store: one line
        sys.exit(f"cross_rerank: {e}")
