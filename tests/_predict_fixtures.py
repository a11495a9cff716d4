"""Synthetic stores with learnable structure, for the predict stage's tests and benchmark.

Each record has a latent z. Its signature tokens are z plus token noise; its context tokens
carry the repository's vector (uninformative about the body); its body tokens are a fixed
random function of z (linear part + a tanh nonlinearity) plus token noise. Every token also
carries a strong common direction (the anisotropy that made the seed's cosine look good),
inputs start with a huge sink token (marked special), and a few context tokens have an
outlier norm (not marked) — the predictor must filter both.

Inputs come from one random stream and bodies from another (``body_seed``), so two stores
with the same ``seed`` and different ``body_seed`` have identical inputs and different bodies
(states and lengths) — for the test that the body never reaches the predictor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from codejepa.corpus.records import CORPUS_FORMAT, FunctionRecord, Span, write_records
from codejepa.embed.store import PendingRecord, StoreMeta, StoreWriter, open_store

FILES_PER_REPO = 5


def file_of(j: int) -> str:
    return f"pkg/mod{j % FILES_PER_REPO}.py"


def write_corpus(root: Path, store_path: Path,
                 texts: Callable[[str], tuple[str, str]] = lambda rid: ("def f():", "pass")) -> Path:
    """A corpus whose records are the store's, function j of a repo in file ``file_of(j)``;
    ``texts(record id)`` gives its signature and body text."""
    with open_store(store_path) as st:
        ids, repos = list(st.ids), list(st.repos)
    span = Span(0, 1, 1, 1)
    entries = []
    for repo in dict.fromkeys(repos):
        recs = [FunctionRecord(id=i, repo=repo, url="file:///x", commit="0" * 40,
                               path=file_of(int(i.split("::f")[1])), qualname="f", split="train",
                               is_test=False, is_async=False, signature=texts(i)[0], body=texts(i)[1],
                               signature_span=span, body_span=span)
                for i, r in zip(ids, repos) if r == repo]
        write_records(root / "repos" / f"{repo}.jsonl", recs)
        entries.append({"name": repo, "status": "ok", "split": "train", "records_file": f"repos/{repo}.jsonl"})
    (root / "manifest.json").write_text(json.dumps({"format": CORPUS_FORMAT, "repos": entries}))
    return root


def synthetic_meta(d: int = 32, teacher: str = "synthetic/teacher", max_tokens: int = 0) -> StoreMeta:
    return StoreMeta(teacher=teacher, teacher_kind="causal", hidden_size=d, layer=2, num_hidden_layers=4,
                     template_version="synthetic-1", state_dtype="float16", max_tokens=max_tokens)


def make_store(path: str | Path, *, d: int = 32, n_repos: int = 10, per_repo: int = 40, seed: int = 0,
               body_seed: int = 0, n_val_repos: int = 1, n_test_repos: int = 1, teacher: str = "synthetic/teacher",
               anisotropy: float = 8.0, noise: float = 0.3, body_len: tuple[int, int] = (2, 20),
               max_tokens: int = 0, outlier_bodies: int = 0) -> Path:
    """A synthetic store; the first ``outlier_bodies`` records have bodies made only of
    outlier-norm tokens (every token × 60)."""
    path = Path(path)
    rin = np.random.default_rng([seed, 0])
    rbody = np.random.default_rng([seed, 1, body_seed])
    maps = np.random.default_rng([seed, 2])  # the fixed "teacher" function sig → body
    M = maps.normal(size=(d, d)) / np.sqrt(d)
    A = maps.normal(size=(d, 2 * d)) / np.sqrt(d)
    Bm = maps.normal(size=(2 * d, d)) / np.sqrt(2 * d)
    common = maps.normal(size=d)
    common *= anisotropy / np.linalg.norm(common) * np.sqrt(d) / 4
    sink = maps.normal(size=d) * 40.0
    n_train_repos = n_repos - n_val_repos - n_test_repos
    records = []
    for r in range(n_repos):
        split = "train" if r < n_train_repos else ("val" if r < n_train_repos + n_val_repos else "test")
        repo_vec = rin.normal(size=d)
        for j in range(per_repo):
            z = rin.normal(size=d)
            n_sig, n_ctx = int(rin.integers(3, 9)), int(rin.integers(0, 13))
            sig = z + noise * rin.normal(size=(n_sig, d)) + common
            ctx = repo_vec + rin.normal(size=(n_ctx, d)) + common
            if n_ctx and rin.random() < 0.2:  # an outlier-norm token, not marked special
                ctx[int(rin.integers(0, n_ctx))] *= 60.0
            inp = np.concatenate([sink[None], ctx, sig]).astype(np.float32)
            special = np.zeros(len(inp), bool)
            special[0] = True
            g = z @ M + 0.7 * np.tanh(z @ A) @ Bm
            n_body = int(rbody.integers(body_len[0], body_len[1] + 1))
            body = (g + noise * rbody.normal(size=(n_body, d)) + common).astype(np.float32)
            if len(records) < outlier_bodies:
                body *= 60.0
            records.append(PendingRecord(
                id=f"repo{r}::f{j}", split=split, repo=f"repo{r}", truncated=False,
                input_states=inp, input_token_ids=np.arange(len(inp), dtype=np.int32), input_special=special,
                context_span=(1, 1 + n_ctx), signature_span=(1 + n_ctx, 1 + n_ctx + n_sig),
                body_states=body, body_token_ids=np.arange(n_body, dtype=np.int32),
            ))
    with StoreWriter(path, synthetic_meta(d, teacher, max_tokens)) as w:
        for a in range(0, len(records), 64):
            w.append(records[a : a + 64])
    return path


class Killed(Exception):
    """Raised from the progress callback by :func:`train_killed_at`: a kill mid-run."""


def train_killed_at(store: str | Path, cfg: object, out: str | Path, global_step: int) -> None:
    """Start a run and kill it when it reports ``global_step`` (what it checkpointed stays)."""
    from codejepa.predict.train import train

    def kill(e: dict) -> None:
        if e["event"] == "step" and e["global_step"] == global_step:
            raise Killed

    try:
        train(store, cfg, out, device="cpu", on_event=kill)
    except Killed:
        return
    raise AssertionError(f"the run ended before step {global_step}")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free local ports, one fresh rendezvous per DDP job."""
    import socket

    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            if (p := s.getsockname()[1]) not in ports:
                ports.append(p)
    return ports


def ddp_worker(rank: int, world: int, jobs: list) -> None:
    """Entry point of one DDP rank (torch.multiprocessing.spawn): env as torchrun sets it.
    Each job gets its own port: a fresh rendezvous, never a stale store of the previous one.
    A job is ``(store, cfg, out, port)``, or with two more items ``kill_at, resume``: every rank
    stops when it reports that global step (0: never), and ``resume`` continues ``out``. A killed
    rank writes ``out/ddp-alive-RANK``: how many DDP wrappers outlived the group, the stop in hand."""
    import gc
    import os

    import torch
    from torch.nn.parallel import DistributedDataParallel

    from codejepa.predict.train import train

    torch.set_num_threads(1)
    for store, cfg, out, port, *rest in jobs:
        kill_at, resume = rest if rest else (0, False)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))

        def kill(e: dict, at: int = kill_at) -> None:
            if at and e["event"] == "step" and e["global_step"] == at:
                raise Killed

        try:
            train(store, None if resume else cfg, out, resume=resume, device="cpu", on_event=kill)
        except Killed:
            alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
            (Path(out) / f"ddp-alive-{rank}").write_text(str(alive))


def chance_mrr(n: int) -> float:
    """MRR of a random ranking among n candidates."""
    return sum(1.0 / k for k in range(1, n + 1)) / n


def mrr(pred: np.ndarray, cand: np.ndarray) -> float:
    """Independent of the package: cosine retrieval of row i's candidate i, ties pessimistic."""
    p = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    c = cand / np.linalg.norm(cand, axis=1, keepdims=True)
    s = p @ c.T
    return float((1.0 / (s >= np.diag(s)[:, None]).sum(1)).mean())
