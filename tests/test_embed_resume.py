"""Resume after kill -9 (a real process, killed for real), sharding and merge."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _embed_fixtures import make_tiny_bert, make_tiny_qwen2, sample_records, write_corpus
from codejepa.embed.merge import merge_stores
from codejepa.embed.run import EmbedSettings, embed_corpus, shard_of, shard_path
from codejepa.embed.store import PASSES, StoreError, open_store

CHILD = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from codejepa.embed.run import EmbedSettings, embed_corpus
    corpus, out, teacher = sys.argv[1:4]
    def progress(event, info):
        if event == "commit":
            print("commit", info["records"], flush=True)
            time.sleep(0.02)  # spread the run out so that the kill lands in the middle
    embed_corpus(corpus, out, EmbedSettings(teacher=teacher, device="cpu", dtype="float32",
                 batch_tokens=300, window_tokens=1500), progress=progress)
    print("done", flush=True)
""")


def _run_child(script: Path, corpus: Path, out: Path, teacher: Path, kill_after: int | None) -> bool:
    """Run an embed in a child process; SIGKILL it after ``kill_after`` commits. True if killed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, str(script), str(corpus), str(out), str(teacher)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    commits = 0
    assert p.stdout is not None
    for line in p.stdout:
        if line.startswith("commit"):
            commits += 1
            if kill_after is not None and commits >= kill_after:
                time.sleep(random.uniform(0, 0.03))
                p.send_signal(signal.SIGKILL)
                p.wait()
                return True
    rc = p.wait()
    assert rc == 0, p.stderr.read() if p.stderr else rc
    return False


def _dump(path: Path) -> dict[str, np.ndarray]:
    """Everything a reader can see, as arrays."""
    with open_store(path) as s:
        n = len(s)
        out = {"ids": s.ids.astype(str), "splits": s.splits, "repos": s.repos.astype(str), "truncated": s.truncated,
               "segments": s.f["inputs/segments"][:n]}
        for name in PASSES:
            off = s.f[name]["offsets"][: n + 1]
            out[f"{name}/offsets"] = off
            for ds in ("states", "token_ids", "special"):
                out[f"{name}/{ds}"] = s.f[name][ds][: off[-1]]
        return out


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(kind: str, tmp_path: Path) -> None:
    random.seed(kind)
    teacher = make_tiny_qwen2(tmp_path / "t") if kind == "causal" else make_tiny_bert(tmp_path / "t")
    corpus = write_corpus(tmp_path / "corpus", sample_records(90, repos=5))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ref, out = tmp_path / "ref.h5", tmp_path / "out.h5"
    assert _run_child(script, corpus, out, teacher, kill_after=2)
    with open_store(out) as s:  # the killed store opens, holds part of the work, and says it is unfinished
        first = len(s)
        assert s.complete is False and "unfinished store" in (s.incomplete_note() or "")
    assert 0 < first < 90
    if kind == "causal":
        assert _run_child(script, corpus, out, teacher, kill_after=2)  # killed again, later on
        with open_store(out) as s:
            assert first < len(s) < 90
    assert not _run_child(script, corpus, out, teacher, None)
    # the uninterrupted reference, in this process with the child's settings
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embed_corpus(corpus, ref, EmbedSettings(teacher=str(teacher), device="cpu", dtype="float32",
                                                batch_tokens=300, window_tokens=1500))
    finally:
        torch.set_num_threads(threads)
    a, b = _dump(ref), _dump(out)
    assert len(a["ids"]) == 90
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    with open_store(out) as s:
        assert s.meta.extra["complete"] is True and s.complete is True and s.incomplete_note() is None


WRITER_CHILD = textwrap.dedent("""
    import sys, numpy as np
    from codejepa.embed.store import StoreWriter, StoreMeta, PendingRecord
    meta = StoreMeta(teacher="t", teacher_kind="causal", hidden_size=16, layer=1, num_hidden_layers=2)
    rng = np.random.default_rng(int(sys.argv[2]))
    w = StoreWriter(sys.argv[1], meta)
    k = w.committed
    print("ready", flush=True)
    while True:
        batch = []
        for _ in range(20):
            n, m = int(rng.integers(5, 200)), int(rng.integers(5, 300))
            batch.append(PendingRecord(f"r{k}", "train", "x", False, rng.standard_normal((n, 16)), np.arange(n),
                np.zeros(n, bool), (0, 1), (1, n), rng.standard_normal((m, 16)), np.arange(m)))
            k += 1
        w.append(batch)
""")


def test_store_killed_mid_write_reopens_and_resumes(tmp_path: Path) -> None:
    """A writer appending flat out, killed at random moments (mostly inside an append).

    The file grows as fast as the disk takes it; hidden size 16 keeps it small on a shared CI disk.
    """
    script = tmp_path / "w.py"
    script.write_text(WRITER_CHILD)
    path = tmp_path / "s.h5"
    seen = 0
    for trial in range(4):
        p = subprocess.Popen([sys.executable, str(script), str(path), str(trial)], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(0.3 + random.random() * 0.5)
        p.send_signal(signal.SIGKILL)
        p.wait()
        with open_store(path) as s:
            n = len(s)
            assert list(s.ids) == [f"r{i}" for i in range(n)]
            assert s.lengths("targets").sum() == s.f["targets/offsets"][n]
            if n:
                s.body(n - 1)  # the last committed record reads back
        assert n >= seen
        seen = n
    assert seen > 0


def test_two_shards_merged_equal_one_unsharded_run(tmp_path: Path) -> None:
    from codejepa.embed.teacher import Teacher, resolve_teacher

    teacher = Teacher(resolve_teacher(str(make_tiny_bert(tmp_path / "t"))), device="cpu", dtype="float32")
    corpus = write_corpus(tmp_path / "corpus", sample_records(40, repos=4))
    full = embed_corpus(corpus, tmp_path / "full.h5", EmbedSettings(batch_tokens=600), teacher=teacher)
    assert full.complete and full.written == 40
    shards = []
    for i in range(2):
        r = embed_corpus(corpus, tmp_path / "s.h5", EmbedSettings(batch_tokens=600, shard=(i, 2)), teacher=teacher)
        assert r.path == shard_path(tmp_path / "s.h5", i, 2) and r.complete
        with open_store(r.path) as s:
            assert all(shard_of(x, 2) == i for x in s.ids)
            assert 0 < len(s) < 40
        shards.append(r.path)
    with pytest.raises(StoreError, match="missing"):
        merge_stores(shards[:1], tmp_path / "partial.h5")

    def stop(_n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a merge stopped after its first block of records
        merge_stores(shards, tmp_path / "merged.h5", block_records=8, progress=stop)
    with open_store(tmp_path / "merged.h5") as m:
        assert 0 < len(m) < 40 and m.complete is False
    res = merge_stores(shards, tmp_path / "merged.h5")  # resumed
    assert res.records == 40 and res.complete
    with open_store(tmp_path / "full.h5") as f, open_store(tmp_path / "merged.h5") as m:
        assert set(f.ids) == set(m.ids) and m.meta.shard == "0/1" and m.meta.extra["complete"]
        assert m.meta.compatibility_key() == f.meta.compatibility_key()
        where = m.index_of()
        for i, rid in enumerate(f.ids):
            j = where[rid]
            assert f.splits[i] == m.splits[j] and f.repos[i] == m.repos[j] and f.truncated[i] == m.truncated[j]
            for get in (lambda s, k: s.inputs(k), lambda s, k: s.body(k)):
                x, y = get(f, i), get(m, j)
                assert np.array_equal(x.token_ids, y.token_ids) and np.array_equal(x.special, y.special)
                assert x.segments == y.segments
                # other batch neighbours → float noise, then float16 rounding: one ulp at most
                np.testing.assert_allclose(y.states, x.states, rtol=2e-3, atol=2e-3)
    # rerunning into the merged store finds nothing left to do
    again = embed_corpus(corpus, tmp_path / "merged.h5", EmbedSettings(batch_tokens=600), teacher=teacher)
    assert again.written == 0 and again.already == 40 and again.complete
    # a shard of another layer is never merged in
    other = Teacher(resolve_teacher(str(tmp_path / "t")), layer=2, device="cpu", dtype="float32")
    o = embed_corpus(corpus, tmp_path / "o.h5", EmbedSettings(batch_tokens=600, shard=(1, 2)), teacher=other)
    with pytest.raises(StoreError, match="other settings"):
        merge_stores([shards[0], o.path], tmp_path / "bad.h5")


def test_refuses_to_append_to_a_store_of_another_layer(tmp_path: Path) -> None:
    from codejepa.embed.teacher import Teacher, resolve_dtype, resolve_teacher

    tdir = make_tiny_qwen2(tmp_path / "t")
    corpus = write_corpus(tmp_path / "corpus", sample_records(6))
    embed_corpus(corpus, tmp_path / "s.h5", EmbedSettings(teacher=str(tdir), device="cpu"))
    before = (tmp_path / "s.h5").read_bytes()
    with pytest.raises(StoreError, match="refusing to append"):
        embed_corpus(corpus, tmp_path / "s.h5", EmbedSettings(teacher=str(tdir), layer=1, device="cpu"))
    with pytest.raises(StoreError, match="refusing to append"):
        embed_corpus(corpus, tmp_path / "s.h5", EmbedSettings(teacher=str(tdir), device="cpu", target_mode="body_only"))
    # the other compute dtype than the store's "auto" (bf16 on a CPU with native bf16, else fp32)
    other = "float32" if resolve_dtype("auto", "cpu") != "float32" else "bfloat16"
    t = Teacher(resolve_teacher(str(tdir)), device="cpu", dtype=other)
    with pytest.raises(StoreError, match="compute_dtype"):
        embed_corpus(corpus, tmp_path / "s.h5", EmbedSettings(), teacher=t)
    assert (tmp_path / "s.h5").read_bytes() == before
    meta = json.loads(open_store(tmp_path / "s.h5").meta.to_json())
    assert meta["layer"] == 2 and meta["corpus_manifest_hash"]


def test_float16_overflow_stops_with_one_line_and_keeps_finished_work(tmp_path: Path) -> None:
    from codejepa.embed.teacher import Teacher, resolve_teacher

    teacher = Teacher(resolve_teacher(str(make_tiny_qwen2(tmp_path / "t"))), device="cpu", dtype="float32")
    corpus = write_corpus(tmp_path / "corpus", sample_records(20))
    forward = teacher.forward
    calls = {"n": 0}

    def exploding(ids, mask):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        out = forward(ids, mask)
        return out * 1e6 if calls["n"] > 2 else out

    teacher.forward = exploding  # type: ignore[method-assign]
    with pytest.raises(StoreError, match="float16") as e:
        embed_corpus(corpus, tmp_path / "s.h5", EmbedSettings(batch_tokens=200), teacher=teacher)
    assert "\n" not in str(e.value)
    with open_store(tmp_path / "s.h5") as s:
        assert 0 < len(s) < 20 and np.isfinite(s.body(0).states).all()
    teacher.forward = forward  # type: ignore[method-assign]
    r = embed_corpus(corpus, tmp_path / "s.h5", EmbedSettings(batch_tokens=200), teacher=teacher)
    assert r.complete and r.already > 0


def _shard_store(path: Path, index: int, count: int, ids: list[int], *, complete: bool = True) -> Path:
    """A shard store written directly (no teacher): record k has k + 2 input and k + 3 body tokens."""
    from codejepa.embed.store import PendingRecord, StoreMeta, StoreWriter

    meta = StoreMeta(teacher="t", teacher_kind="causal", hidden_size=4, layer=1, num_hidden_layers=2,
                     shard=f"{index}/{count}")
    with StoreWriter(path, meta) as w:
        for k in ids:
            rng = np.random.default_rng(k)
            special = np.zeros(k + 2, bool)
            special[0] = True
            w.append([PendingRecord(
                f"r{k}", ["train", "val", "test"][k % 3], f"repo{k % 2}", k % 4 == 0,
                rng.standard_normal((k + 2, 4)).astype(np.float32), np.arange(k + 2) + 10 * k, special,
                (1, 1 + k % 2), (1 + k % 2, k + 2), rng.standard_normal((k + 3, 4)).astype(np.float32),
                np.arange(k + 3) + 100 * k)])
        w.set_extra(complete=complete, selected=len(ids), skipped={"empty body": 1})
    return path


def test_merge_copies_every_block_exactly_and_a_partial_merge_is_not_complete(tmp_path: Path) -> None:
    """Records copied in several blocks (offsets relative to each block) read back exactly as in
    their shard; a merge missing a shard (--allow-partial) is never marked complete."""
    a = _shard_store(tmp_path / "a.h5", 0, 2, [0, 2, 4, 6, 8, 10, 12])
    b = _shard_store(tmp_path / "b.h5", 1, 2, [1, 3, 5, 7, 9])
    res = merge_stores([a, b], tmp_path / "m.h5", block_records=3)
    assert res.records == 12 and res.complete
    with open_store(tmp_path / "m.h5") as m, open_store(a) as sa, open_store(b) as sb:
        assert m.meta.extra["truncated"] == int(sa.truncated.sum() + sb.truncated.sum())
        assert m.meta.extra["selected"] == 12 and m.meta.extra["skipped"] == {"empty body": 2}
        where = m.index_of()
        for s in (sa, sb):
            for i, rid in enumerate(s.ids):
                j = where[rid]
                assert (m.splits[j], m.repos[j], m.truncated[j]) == (s.splits[i], s.repos[i], s.truncated[i])
                for get in (lambda st, k: st.inputs(k), lambda st, k: st.body(k)):
                    x, y = get(s, i), get(m, j)
                    assert np.array_equal(x.states, y.states) and np.array_equal(x.token_ids, y.token_ids)
                    assert np.array_equal(x.special, y.special) and x.segments == y.segments
    part = merge_stores([a], tmp_path / "p.h5", allow_partial=True)
    assert part.records == 7 and not part.complete
    with open_store(tmp_path / "p.h5") as p:
        assert p.complete is False


def test_shards_merge_in_shard_order_whatever_the_command_line_order(tmp_path: Path) -> None:
    """A glob lists shard-10 before shard-2: the merged store must not depend on the order the
    shards are given in (training on it shuffles by record index)."""
    a = _shard_store(tmp_path / "a.h5", 0, 2, [0, 2, 4])
    b = _shard_store(tmp_path / "b.h5", 1, 2, [1, 3])
    merge_stores([b, a], tmp_path / "ba.h5")
    merge_stores([a, b], tmp_path / "ab.h5")
    with open_store(tmp_path / "ba.h5") as ba, open_store(tmp_path / "ab.h5") as ab:
        assert list(ba.ids) == list(ab.ids) == ["r0", "r2", "r4", "r1", "r3"]
        assert ba.meta.extra["merged_from"] == ab.meta.extra["merged_from"]
    odd = _shard_store(tmp_path / "odd.h5", "x", 2, [5])  # type: ignore[arg-type]  # a hand-edited shard field
    with pytest.raises(StoreError, match="its shard field 'x/2' is not I/N"):
        merge_stores([a, odd], tmp_path / "odd-merged.h5")
