"""A store where the category is in the pooled states and the instance only in the tokens:
what a cross-scorer can read and a pooled first stage cannot.

Each record has a class (one of ``n_classes``) and a key vector of its own. Every token of
its signature carries the class direction, every token of its body a fixed linear image of
it; the first two tokens of both sides carry +key and −key, so the key cancels out of every
mean and is absent from the signature's last token. A pooled first stage (ridge from the
signature mean and last token) therefore finds the class and ranks the instances inside it at
random — the "category prototype" of the seed experiment —, while a model that compares the
first tokens of both sides can tell the instance. Body texts are opaque tags: BM25 is at chance.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from _evaluate_fixtures import _record, write_corpus
from codejepa.embed.store import PendingRecord, StoreMeta, StoreWriter


def make_token_store(root: Path, *, d: int = 16, repos: dict[str, int] | None = None, per_repo: int = 40,
                     n_classes: int = 12, noise: float = 0.3, class_scale: float = 1.0, seed: int = 0, name: str = "tokens") -> Path:
    repos = repos or {"train": 10, "val": 3, "test": 3}
    rng = np.random.default_rng(seed)
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    classes = class_scale * rng.standard_normal((n_classes, d)).astype(np.float32)
    corpus_dir = root / f"{name}_corpus"
    records, pending = [], []
    k = 0
    for split, n_repos in repos.items():
        for r in range(n_repos):
            repo = f"{split}_repo{r}"
            for j in range(per_repo):
                rid = hashlib.sha256(f"{name}/{repo}/{j}".encode()).hexdigest()[:16]
                tag = hashlib.sha256(f"tag{k}".encode()).hexdigest()[:12]
                sig_text = f"def fn_{k}(x):"
                body_text = f"    return t_{tag}\n"
                records.append(_record(rid, repo, split, k, sig_text, body_text, "import os",
                                       hashlib.sha256(body_text.encode()).hexdigest()))
                c = classes[rng.integers(n_classes)]
                key = rng.standard_normal(d).astype(np.float32)
                signs = np.array([1.0, -1.0, 0.0], np.float32)[:, None]

                def side(center: np.ndarray) -> np.ndarray:
                    return center + signs * key + noise * rng.standard_normal((3, d)).astype(np.float32)

                sig, body = side(c), side(c @ rot)
                ctx = (c + rng.standard_normal((2, d))).astype(np.float32)
                sink = np.full((1, d), 50.0, np.float32)
                n_in = 1 + len(ctx) + len(sig)
                pending.append(PendingRecord(
                    id=rid, split=split, repo=repo, truncated=False,
                    input_states=np.concatenate([sink, ctx, sig]), input_token_ids=np.arange(n_in, dtype=np.int32),
                    input_special=np.array([True] + [False] * (n_in - 1)),
                    context_span=(1, 3), signature_span=(3, n_in),
                    body_states=body, body_token_ids=np.arange(len(body), dtype=np.int32)))
                k += 1
    manifest_sha = write_corpus(corpus_dir, records)
    meta = StoreMeta(teacher="synthetic", teacher_kind="bidirectional", hidden_size=d, layer=1, num_hidden_layers=2,
                     state_dtype="float32", corpus_dir=str(corpus_dir), corpus_manifest_hash=manifest_sha,
                     template_version=f"synthetic-{name}")
    path = root / f"{name}.h5"
    with StoreWriter(path, meta) as w:
        for a in range(0, len(pending), 64):
            w.append(pending[a : a + 64])
    return path


def cross_ddp_worker(rank: int, world: int, jobs: list) -> None:
    """One DDP rank (torch.multiprocessing.spawn) of ``train_cross``, env as torchrun sets it.
    Each training step's pair count goes to ``OUT.pairs-RANK``; a job that fails writes its
    one-line message to ``OUT.error-RANK`` instead. A fifth item ``kill_at`` stops every rank in
    its training step of that number, which then writes ``OUT.ddp-alive-RANK``: how many DDP
    wrappers outlived the group, the stop in hand."""
    import gc
    import json
    import os

    import torch
    from torch.nn.parallel import DistributedDataParallel

    from codejepa.predict.cross import CrossError, CrossScorer, train_cross

    class Killed(Exception):
        pass

    torch.set_num_threads(1)
    forward = CrossScorer.forward
    for store, cfg, out, port, *kill in jobs:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        pairs: list[int] = []

        def counted(self, q, *rest, _pairs=pairs, _kill=kill[0] if kill else 0):  # type: ignore[no-untyped-def]
            if self.training:
                _pairs.append(int(q.shape[0]))
                if len(_pairs) == _kill:
                    raise Killed
            return forward(self, q, *rest)

        CrossScorer.forward = counted
        try:
            train_cross(store, out, cfg, device="cpu")
        except CrossError as e:
            Path(f"{out}.error-{rank}").write_text(str(e))
        except Killed:
            alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
            Path(f"{out}.ddp-alive-{rank}").write_text(str(alive))
        finally:
            CrossScorer.forward = forward
        Path(f"{out}.pairs-{rank}").write_text(json.dumps(pairs))
