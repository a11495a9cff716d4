"""Synthetic corpora and stores for the evaluate tests: vectors we design, so results are known.

Body vectors are anisotropic like real teacher states: a strong common direction, a class
(category) component and a smaller instance component. Signature vectors are a noisy linear
image of the body's instance + class part, so that a linear map can learn something.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


from codejepa.corpus.records import ContextPiece, FunctionRecord, Span, corpus_fingerprint, write_records
from codejepa.embed.store import PendingRecord, StoreMeta, StoreWriter

WORDS = ("parse", "render", "fetch", "merge", "split", "token", "cache", "retry", "encode", "decode",
         "commit", "branch", "socket", "buffer", "matrix", "vector", "queue", "stack", "graph", "index")


@dataclass
class Dataset:
    store_path: Path
    corpus_dir: Path
    ids: np.ndarray
    splits: np.ndarray
    repos: np.ndarray
    bodies: np.ndarray  # [n, d] the exact pooled body vectors
    signatures: np.ndarray  # [n, d] pooled signature vectors
    classes: np.ndarray  # [n]
    meta: StoreMeta


def _span(a: int, b: int) -> Span:
    return Span(a, b, 1, 1)


def _record(rid: str, repo: str, split: str, i: int, sig: str, body: str, ctx: str, body_hash: str) -> FunctionRecord:
    return FunctionRecord(
        id=rid, repo=repo, url=f"https://example.invalid/{repo}", commit="0" * 40, path=f"pkg/mod{i % 3}.py",
        qualname=f"fn_{i}", split=split, is_test=False, is_async=False, signature=sig, body=body,
        signature_span=_span(0, len(sig)), body_span=_span(len(sig), len(sig) + len(body)),
        context=(ContextPiece("import", ctx, _span(0, len(ctx))),), body_hash=body_hash,
    )


def write_corpus(corpus_dir: Path, records: list[FunctionRecord]) -> str:
    """Write records (one file per repo) and a manifest; returns the manifest's sha256."""
    by_repo: dict[str, list[FunctionRecord]] = {}
    for r in records:
        by_repo.setdefault(r.repo, []).append(r)
    repos = []
    for name, recs in by_repo.items():
        rel = f"repos/{name}.jsonl"
        write_records(corpus_dir / rel, recs)
        repos.append({"name": name, "split": recs[0].split, "status": "ok", "records_file": rel})
    manifest = {"format": "codejepa-corpus", "format_version": 1, "repos": repos, "dropped": {}}
    (corpus_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return corpus_fingerprint(manifest)


def make_dataset(
    root: Path,
    *,
    d: int = 24,
    repos: dict[str, int] | None = None,
    per_repo: int = 25,
    n_classes: int = 3,
    common: float = 12.0,
    class_scale: float = 2.5,
    inst_scale: float = 1.0,
    sig_noise: float = 0.3,
    duplicate_test_bodies: int = 1,
    seed: int = 0,
    name: str = "store",
    text_ids: bool = True,
) -> Dataset:
    """A corpus directory and a store whose pooled body/signature vectors are known exactly.

    ``duplicate_test_bodies`` pairs of test records share one body text (and body hash) while
    their stored vectors differ, as in-context targets of a duplicated body would. With
    ``text_ids=False`` a body's text shares no word with its signature (an opaque tag keeps it
    distinct), so that BM25 is near chance and the vectors decide.
    """
    repos = repos or {"train": 8, "val": 3, "test": 4}
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    class_dirs = rng.standard_normal((n_classes, d))
    class_dirs /= np.linalg.norm(class_dirs, axis=1, keepdims=True)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    corpus_dir = root / f"{name}_corpus"
    ids, splits, repo_names, bodies, sigs, classes, recs = [], [], [], [], [], [], []
    k = 0
    for split, n_repos in repos.items():
        for r in range(n_repos):
            repo = f"{split}_repo{r}"
            for j in range(per_repo):
                c = int(rng.integers(n_classes))
                inst = rng.standard_normal(d) * inst_scale / np.sqrt(d) * 3
                body = common * u + class_scale * class_dirs[c] + inst
                sig = (class_scale * class_dirs[c] + inst) @ mix + sig_noise * rng.standard_normal(d) / np.sqrt(d) * 3
                w1, w2 = WORDS[int(rng.integers(len(WORDS)))], WORDS[int(rng.integers(len(WORDS)))]
                rid = hashlib.sha256(f"{repo}/{j}".encode()).hexdigest()[:16]
                sig_text = f"def {w1}_{w2}_{k}(self, {w2}Value):\n    \"\"\"{w1.title()} the {w2}.\"\"\""
                body_text = (f"    result = self.{w1}{w2.title()}({w2}_value)\n    return result_{k}\n" if text_ids else
                             f"    result = compute()\n    return result_{hashlib.sha256(f'tag{k}'.encode()).hexdigest()[:12]}\n")
                ids.append(rid); splits.append(split); repo_names.append(repo)
                bodies.append(body); sigs.append(sig); classes.append(c)
                recs.append((rid, repo, split, k, sig_text, body_text, f"import {w1}_lib"))
                k += 1
    bodies_a = np.array(bodies, dtype=np.float32)
    test_pos = [i for i, s in enumerate(splits) if s == "test"]
    body_hash = [hashlib.sha256(r[5].encode()).hexdigest() for r in recs]
    for p in range(duplicate_test_bodies):
        a, b = test_pos[2 * p], test_pos[2 * p + 1]
        recs[b] = recs[b][:5] + (recs[a][5],) + recs[b][6:]
        body_hash[b] = body_hash[a]
    records = [_record(*r[:7], body_hash=h) for r, h in zip(recs, body_hash)]
    manifest_sha = write_corpus(corpus_dir, records)
    meta = StoreMeta(teacher="synthetic", teacher_kind="bidirectional", hidden_size=d, layer=1,
                     num_hidden_layers=2, state_dtype="float32", corpus_dir=str(corpus_dir),
                     corpus_manifest_hash=manifest_sha, template_version=f"synthetic-{name}")
    store_path = root / f"{name}.h5"
    sigs_a = np.array(sigs, dtype=np.float32)
    pending = []
    for i in range(len(ids)):
        # Tokens deviate ±e around the designed mean, so the pooled mean is exactly it; the
        # sink token carries a huge value that must be excluded by pooling.
        e = rng.standard_normal(d).astype(np.float32) * 0.1
        sink = np.full((1, d), 50.0, np.float32)
        ctx = np.stack([sigs_a[i] * 0.5 + e, sigs_a[i] * 0.5 - e])
        sg = np.stack([sigs_a[i] + e, sigs_a[i] - e])
        inputs = np.concatenate([sink, ctx, sg])
        body = np.stack([bodies_a[i] + e, bodies_a[i] - e])
        pending.append(PendingRecord(
            id=ids[i], split=splits[i], repo=repo_names[i], truncated=False,
            input_states=inputs, input_token_ids=np.arange(5, dtype=np.int32),
            input_special=np.array([True, False, False, False, False]),
            context_span=(1, 3), signature_span=(3, 5),
            body_states=body, body_token_ids=np.arange(2, dtype=np.int32),
        ))
    with StoreWriter(store_path, meta) as w:
        for a in range(0, len(pending), 64):
            w.append(pending[a : a + 64])
    return Dataset(store_path, corpus_dir, np.array(ids, dtype=object), np.array(splits), np.array(repo_names, dtype=object),
                   bodies_a, sigs_a, np.array(classes), meta)


def write_view(store_path: Path, out: Path, view: np.ndarray, upto: int | None = None, probe_record: int = 0) -> Path:
    """A probe view file for a synthetic store (no teacher: the rows are given)."""
    from codejepa.embed.probe import ProbeMeta, _commit, _writer
    from codejepa.embed.store import open_store

    with open_store(store_path) as s:
        meta = ProbeMeta(store_fingerprint=s.meta.fingerprint(), teacher=s.meta.teacher, weights_hash="",
                         layer=s.meta.layer, hidden_size=s.meta.hidden_size, n_probes=1, min_tokens=1,
                         max_tokens=80, seed=0, probe_records=[str(s.ids[probe_record])], probe_lengths=[2])
        f = _writer(out, meta, s)
        n = len(s) if upto is None else upto
        _commit(f, s.ids[:n], view[:n].astype(np.float32), 0)
        f.close()
    return out

