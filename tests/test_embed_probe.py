"""`embed probe`: the teacher's states over a fixed train body read after each record's inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _embed_fixtures import sample_records, write_corpus
from codejepa.cli import app
from codejepa.embed.probe import (
    ProbeError,
    ProbeSettings,
    choose_probes,
    compute_probe_view,
    default_probe_path,
    probe_sequence,
    read_probe_view,
)
from codejepa.embed.run import EmbedSettings, embed_corpus
from codejepa.embed.store import open_store
from codejepa.embed.teacher import Teacher

# The sample bodies are short: any train body may be a probe.
ANY = ProbeSettings(n_probes=2, min_tokens=1, max_tokens=10_000, chunk_records=4)


def _store(tmp: Path, teacher: Teacher, records=None) -> Path:
    corpus = write_corpus(tmp / "c", records or sample_records(14))
    embed_corpus(corpus, tmp / "s.h5", EmbedSettings(store_dtype="float32", batch_tokens=600), teacher=teacher)
    return tmp / "s.h5"


def test_probe_sequence_puts_the_probe_where_the_body_would_be() -> None:
    ids, special = np.array([101, 5, 6, 7, 102]), np.array([True, False, False, False, True])
    seq, a, b = probe_sequence(ids, special, np.array([40, 41, 42]), window=512)
    assert seq.tolist() == [101, 5, 6, 7, 40, 41, 42, 102] and (a, b) == (4, 7)
    seq, a, b = probe_sequence(ids[:4], special[:4], np.array([40, 41, 42]), window=6)  # causal: no [end]
    assert seq.tolist() == [101, 5, 6, 7, 40, 41] and (a, b) == (4, 6)  # cut to the window
    with pytest.raises(ProbeError, match="no room"):
        probe_sequence(ids, special, np.array([40]), window=5)


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_view_is_the_mean_over_the_probes_tokens_after_the_records_inputs(kind: str, teachers, tmp_path: Path) -> None:
    teacher = teachers[kind]
    store_path = _store(tmp_path, teacher)
    res = compute_probe_view(store_path, settings=ANY, teacher=teacher)
    assert res.path == default_probe_path(store_path) == tmp_path / "s.probe.h5"
    with open_store(store_path) as s:
        pick, probes = choose_probes(s, ANY)
        assert len(pick) == 2 and set(s.splits[pick]) == {"train"}
        for i, p in zip(pick, probes):
            assert p.tolist() == s.body(int(i)).token_ids.tolist()
        pv = read_probe_view(res.path, s)
        assert pv.committed == len(s) == res.written and pv.meta.probe_records == [str(s.ids[i]) for i in pick]
        for i in range(len(s)):
            x = s.inputs(i)
            tail = 1 if kind == "bidirectional" else 0
            want = []
            for p in probes:
                ids = x.token_ids.tolist()
                seq = ids[: len(ids) - tail] + p.tolist() + ids[len(ids) - tail:]
                t = torch.tensor([seq])
                h = teacher.forward(t, torch.ones_like(t))[0]
                want.append(h[len(ids) - tail: len(ids) - tail + len(p)].mean(0).numpy())
            np.testing.assert_allclose(pv.view[i], np.mean(want, 0), atol=2e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_causal_teacher_reads_the_inputs_once_for_all_probes_with_the_same_result(attn: str, teachers, tmp_path: Path) -> None:
    teacher = teachers["causal"]
    store_path = _store(tmp_path, teacher)
    before = teacher.model.config._attn_implementation
    teacher.model.config._attn_implementation = attn
    try:
        assert teacher.custom_mask_kind() == {"sdpa": "bool", "eager": "additive"}[attn]
        settings = dataclasses.replace(ANY, n_probes=3)
        shared = compute_probe_view(store_path, tmp_path / "shared.h5", settings, teacher=teacher)
        naive = compute_probe_view(store_path, tmp_path / "naive.h5", dataclasses.replace(settings, share_prefix=False),
                                   teacher=teacher)
    finally:
        teacher.model.config._attn_implementation = before
    assert shared.shared_prefix and not naive.shared_prefix
    with open_store(store_path) as s:
        assert naive.model_tokens - shared.model_tokens == 2 * int(s.lengths("inputs").sum())  # inputs once, not 3×
        np.testing.assert_allclose(read_probe_view(shared.path, s).view, read_probe_view(naive.path, s).view, atol=2e-5)
    assert teachers["bidirectional"].custom_mask_kind() is None  # an encoder's inputs see the probe: no sharing


def test_probe_lengths_are_inclusive_and_only_train_bodies_qualify(teachers, tmp_path: Path) -> None:
    """``min_tokens..max_tokens`` is an inclusive range: a train body of exactly that many tokens
    is a probe; no val/test body ever is, whatever its length."""
    store_path = _store(tmp_path, teachers["causal"])
    with open_store(store_path) as s:
        lens = s.lengths("targets")
        train = s.indices("train")
        length = int(lens[train[0]])
        exact = {int(i) for i in train if lens[i] == length}
        pick, probes = choose_probes(s, ProbeSettings(n_probes=len(exact), min_tokens=length, max_tokens=length))
        assert set(pick.tolist()) == exact and all(len(p) == length for p in probes)
        # a held-out body whose length no train body has: asking for exactly it finds nothing
        only = next(int(lens[i]) for i in np.flatnonzero(s.splits != "train") if lens[i] not in lens[train])
        with pytest.raises(ProbeError, match="0 train bodies"):
            choose_probes(s, ProbeSettings(n_probes=1, min_tokens=only, max_tokens=only))


def test_a_records_own_body_never_reaches_its_view(teachers, tmp_path: Path) -> None:
    teacher = teachers["bidirectional"]
    recs = sample_records(14)
    test_rec = next(k for k, r in enumerate(recs) if r.split == "test")
    changed = list(recs)
    changed[test_rec] = dataclasses.replace(recs[test_rec], body="    return completely_different(x, y, z) * 1000\n")
    views = []
    for name, rs in (("a", recs), ("b", changed)):
        sp = _store(tmp_path / name, teacher, rs)
        compute_probe_view(sp, settings=ANY, teacher=teacher)
        with open_store(sp) as s:
            views.append(read_probe_view(default_probe_path(sp), s).view[s.index_of()[recs[test_rec].id]])
            body_len = len(s.body(s.index_of()[recs[test_rec].id]).token_ids)
        views[-1] = (views[-1], body_len)
    assert views[0][1] != views[1][1]  # the body (and its length) did change ...
    # ... and the view did not (up to float rounding: the store's record order, and so the
    # batches the record shares, follow the bodies' lengths)
    np.testing.assert_allclose(views[0][0], views[1][0], atol=1e-6, rtol=0)


def test_a_killed_run_resumes_to_the_same_view_and_refuses_other_settings(teachers, tmp_path: Path) -> None:
    teacher = teachers["causal"]
    store_path = _store(tmp_path, teacher)
    whole = compute_probe_view(store_path, tmp_path / "whole.h5", ANY, teacher=teacher)
    part = compute_probe_view(store_path, tmp_path / "part.h5", ANY, teacher=teacher, max_chunks=1)
    assert part.written == 4 and part.records == 4
    with open_store(store_path) as s:
        assert read_probe_view(part.path, s).committed == 4
    rest = compute_probe_view(store_path, tmp_path / "part.h5", ANY, teacher=teacher)
    assert rest.already == 4 and rest.written == whole.written - 4
    with open_store(store_path) as s:
        np.testing.assert_array_equal(read_probe_view(part.path, s).view, read_probe_view(whole.path, s).view)
    with pytest.raises(ProbeError, match="other settings.*n_probes"):
        compute_probe_view(store_path, tmp_path / "part.h5", dataclasses.replace(ANY, n_probes=3), teacher=teacher)
    with pytest.raises(ProbeError, match="not the one"):
        compute_probe_view(store_path, tmp_path / "x.h5", ANY, teacher=teachers["bidirectional"])
    # another store's view: computing into it is refused with "another --out", reading it as this
    # store's with "pass the view made from this store" (it is valid for its own store)
    (tmp_path / "b").mkdir()
    other = _store(tmp_path / "b", teacher, sample_records(12))
    with pytest.raises(ProbeError, match="delete it or pass another --out"):
        compute_probe_view(other, tmp_path / "whole.h5", ANY, teacher=teacher)
    with open_store(other) as s, pytest.raises(ProbeError, match="pass the probe view made from this store"):
        read_probe_view(tmp_path / "whole.h5", s)


def test_a_disk_too_full_for_the_next_chunk_stops_the_view_and_keeps_what_was_committed(
        teachers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    teacher = teachers["causal"]
    store_path = _store(tmp_path, teacher)
    compute_probe_view(store_path, tmp_path / "part.h5", ANY, teacher=teacher, max_chunks=1)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(1 << 30, (1 << 30) - (1 << 20), 1 << 20))
    with pytest.raises(ProbeError, match="MB free on its disk.*committed batches are kept"):
        compute_probe_view(store_path, tmp_path / "part.h5", ANY, teacher=teacher)
    monkeypatch.undo()
    with open_store(store_path) as s:
        assert read_probe_view(tmp_path / "part.h5", s).committed == 4
    assert compute_probe_view(store_path, tmp_path / "part.h5", ANY, teacher=teacher).already == 4


def test_shards_resume_and_merge_into_the_whole_view(teachers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from codejepa.embed.probe import merge_probe_views

    teacher = teachers["causal"]
    store_path = _store(tmp_path, teacher)
    whole = compute_probe_view(store_path, tmp_path / "whole.h5", ANY, teacher=teacher)
    out = tmp_path / "v.h5"
    # Shard 0 of 3 is killed after one chunk; shard 2 comes from RANK/WORLD_SIZE, as under torchrun.
    part = compute_probe_view(store_path, out, dataclasses.replace(ANY, shard=(0, 3), chunk_records=2), teacher=teacher,
                              max_chunks=1)
    assert part.path == tmp_path / "v.shard-0-of-3.h5" and part.records == 2
    shard_files = [part.path, compute_probe_view(store_path, out, dataclasses.replace(ANY, shard=(1, 3)), teacher=teacher).path]
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    shard_files.append(compute_probe_view(store_path, out, ANY, teacher=teacher).path)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert shard_files[2] == tmp_path / "v.shard-2-of-3.h5"
    with pytest.raises(ProbeError, match="2 of its 4 records done; finish it"):
        merge_probe_views(shard_files, out)  # shard 0 is unfinished
    assert not out.exists()
    rest = compute_probe_view(store_path, out, dataclasses.replace(ANY, shard=(0, 3)), teacher=teacher)
    assert rest.already == 2 and rest.records == 14 // 3 == 4
    with pytest.raises(ProbeError, match="1/3 missing"):
        merge_probe_views([shard_files[0], shard_files[2]], out)
    with pytest.raises(ProbeError, match="each I of N once"):
        merge_probe_views([*shard_files, shard_files[1]], out)
    with open_store(store_path) as s, pytest.raises(ProbeError, match="shard 1/3 of a probe view"):
        read_probe_view(shard_files[1], s)
    res = merge_probe_views(shard_files[::-1], out)
    assert (res.records, res.shards) == (14, 3)
    with open_store(store_path) as s:
        merged, ref = read_probe_view(out, s), read_probe_view(whole.path, s)
        assert merged.committed == 14 and merged.meta.key() == ref.meta.key()
        np.testing.assert_allclose(merged.view, ref.view, atol=1e-6)
    with pytest.raises(ProbeError, match="exists"):
        merge_probe_views(shard_files, out)
    with pytest.raises(ProbeError, match="whole probe view"):
        merge_probe_views([whole.path], tmp_path / "w2.h5")
    # The merged view is a whole one: a rerun finds nothing left to do.
    assert compute_probe_view(store_path, out, ANY, teacher=teacher).written == 0


def test_probes_of_a_fold_come_from_its_train_part(teachers, tmp_path: Path) -> None:
    from codejepa.corpus.folds import SplitAssignment, _key, read_splits, write_fold

    teacher = teachers["bidirectional"]
    recs = sample_records(20, repos=5)
    store_path = _store(tmp_path, teacher, recs)
    with open_store(store_path) as s:
        fp = s.meta.corpus_manifest_hash
    # A fold whose test repository is a train repository of the store's own split.
    role = {"repo0": "test", "repo1": "val"}
    splits = {r.id: role.get(r.repo, "train") for r in recs}
    fold = write_fold(SplitAssignment(splits, {}, 0, 5, 0, fp, _key(fp, splits)), tmp_path / "folds")
    res = compute_probe_view(store_path, tmp_path / "fold.probe.h5", dataclasses.replace(ANY, n_probes=3, splits=str(fold)),
                             teacher=teacher)
    with open_store(store_path) as s:
        meta = read_probe_view(res.path, s).meta
    assert meta.splits == read_splits(fold).key
    assert all(splits[r] == "train" for r in meta.probe_records)


def test_cli_probes_with_the_default_teacher_and_fails_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    # The default probes are train bodies of 40–80 tokens: give the train records such bodies.
    body = "".join(f"    acc = acc + item_{j} * {j}\n" for j in range(5)) + "    return acc\n"
    recs = [dataclasses.replace(r, body=body + f"    # {r.id}\n") if r.split == "train" else r for r in sample_records(15)]
    corpus = write_corpus(tmp_path / "corpus", recs)
    store = tmp_path / "store.h5"
    assert runner.invoke(app, ["embed", "run", str(corpus), "--out", str(store), "--device", "cpu"]).exit_code == 0
    r = runner.invoke(app, ["embed", "probe", str(store), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "15 records probed this run" in r.output
    with open_store(store) as s:
        pv = read_probe_view(default_probe_path(store), s)
        assert pv.committed == 15 and pv.meta.n_probes == 4 and pv.meta.layer == 3
        assert all(40 <= n <= 80 for n in pv.meta.probe_lengths) and np.isfinite(pv.view).all()
    r = runner.invoke(app, ["embed", "probe", str(store), "--probes", "40"])
    assert r.exit_code == 1 and "fewer than the 40 probes" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad.probe.h5"
    bad.write_bytes(b"not hdf5 at all")
    r = runner.invoke(app, ["embed", "probe", str(store), "--out", str(bad)])
    assert r.exit_code == 1 and "not a readable probe view" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["embed", "probe", str(store), "--out", str(store)])  # not "a corrupt probe view"
    assert r.exit_code == 1 and "is the store itself" in r.output and "Traceback" not in r.output
    with open_store(store) as s:
        assert len(s) == 15
    empty = tmp_path / "empty.probe.h5"
    empty.touch()  # HDF5 would make an empty file an empty HDF5 file, then refuse that
    r = runner.invoke(app, ["embed", "probe", str(store), "--out", str(empty)])
    assert r.exit_code == 1 and "an empty file, not a probe view" in r.output and empty.stat().st_size == 0
    for i in (0, 1):
        r = runner.invoke(app, ["embed", "probe", str(store), "--device", "cpu", "--shard", f"{i}/2", "--out", str(tmp_path / "v.h5")])
        assert r.exit_code == 0, r.output
    shards = [str(tmp_path / f"v.shard-{i}-of-2.h5") for i in (0, 1)]
    r = runner.invoke(app, ["embed", "merge", *shards, "--out", str(tmp_path / "v.h5")])
    assert r.exit_code == 0 and "probe view of 15 records from 2 shards" in r.output, r.output
    with open_store(store) as s:
        # bfloat16 where the CPU has it: other batches round differently (float32: the test above)
        np.testing.assert_allclose(read_probe_view(tmp_path / "v.h5", s).view, pv.view, atol=3e-3)
    r = runner.invoke(app, ["embed", "merge", shards[0], str(store), "--out", str(tmp_path / "w.h5")])
    assert r.exit_code == 1 and "not a probe view shard" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["embed", "probe", str(store), "--shard", "2/2"])
    assert r.exit_code == 1 and "need 0 <= I < N" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("attrs, message", [
    ({"format": "something-else", "format_version": 1}, "an HDF5 file, but not a codejepa probe view"),
    ({"format": "codejepa-store", "format_version": 1}, "not a codejepa probe view .it is a codejepa-store."),
    ({"format": "codejepa-probe-view", "format_version": 99}, "probe view format version 99 is not supported"),
])
def test_a_foreign_or_newer_view_is_refused_in_one_line(attrs: dict, message: str, teachers: dict[str, Teacher],
                                                        tmp_path: Path) -> None:
    import h5py

    store = _store(tmp_path, teachers["bidirectional"])
    path = tmp_path / "x.probe.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs)
    with open_store(store) as s, pytest.raises(ProbeError, match=message):
        read_probe_view(path, s)
    with pytest.raises(ProbeError, match=message):  # and computing into it leaves it as it is
        compute_probe_view(store, path, ANY, teacher=teachers["bidirectional"])
    with h5py.File(path, "r") as f:
        assert dict(f.attrs) == attrs and not list(f)
