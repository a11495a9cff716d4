"""The HDF5 store: layout round trip, reader API, refusals and crash-safe commits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from codejepa.embed.store import PendingRecord, StoreError, StoreMeta, StoreWriter, open_store, read_meta

D = 8


def meta(**kw: object) -> StoreMeta:
    base = StoreMeta(teacher="t", teacher_kind="causal", hidden_size=D, layer=2, num_hidden_layers=4,
                     template_version="1", tokenizer_hash="tok", weights_hash="w", corpus_manifest_hash="c")
    return replace(base, **kw)


def rec(i: int, n_in: int = 5, n_body: int = 7, split: str = "train", scale: float = 1.0) -> PendingRecord:
    rng = np.random.default_rng(i)
    special = np.zeros(n_in, bool)
    special[0] = True
    return PendingRecord(
        id=f"id{i}", split=split, repo=f"repo{i % 2}", truncated=i % 3 == 0,
        input_states=(rng.standard_normal((n_in, D)) * scale).astype(np.float32),
        input_token_ids=np.arange(n_in) + i, input_special=special,
        context_span=(1, 2), signature_span=(2, n_in),
        body_states=rng.standard_normal((n_body, D)).astype(np.float32), body_token_ids=np.arange(n_body),
    )


def test_round_trip_and_reader_api(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    recs = [rec(i, 3 + i, 2 + 2 * i, split=["train", "val", "test"][i % 3]) for i in range(7)]
    recs[0].input_states[0] = 5000.0  # a sink-sized value, within float16
    with StoreWriter(p, meta(), chunk_tokens=4) as w:
        w.append(recs[:3])
        w.append(recs[3:] + recs[:1])  # a record already stored is not duplicated
        assert w.committed == 7
    with open_store(p) as s:
        assert len(s) == 7 and list(s.ids) == [r.id for r in recs]
        assert list(s.indices("val")) == [1, 4] and list(s.splits[:3]) == ["train", "val", "test"]
        assert list(s.truncated) == [r.truncated for r in recs]
        for i, r in enumerate(recs):
            x = s.inputs(i)
            np.testing.assert_allclose(x.states, r.input_states, rtol=1e-3, atol=1e-3)
            assert x.states.dtype == np.float32
            assert np.array_equal(x.token_ids, r.input_token_ids) and np.array_equal(x.special, r.input_special)
            assert x.segments == {"context": (1, 2), "signature": (2, len(r.input_token_ids))}
            np.testing.assert_allclose(s.body(i).states, r.body_states, rtol=1e-3, atol=1e-3)
        assert list(s.lengths("targets")) == [len(r.body_token_ids) for r in recs]
        # flat token ids and spans, split by lengths(), equal the per-record reads
        ids, special = s.tokens("inputs")
        cut = np.cumsum(s.lengths("inputs"))[:-1]
        for r, t, sk in zip(recs, np.split(ids, cut), np.split(special, cut)):
            assert t.dtype == np.int64 and sk.dtype == bool
            assert np.array_equal(t, r.input_token_ids) and np.array_equal(sk, r.input_special)
        assert np.array_equal(np.concatenate([r.body_token_ids for r in recs]), s.tokens("targets")[0])
        assert np.array_equal(s.special("inputs"), special)  # the flags alone, without reading the ids
        assert s.segments().shape == (7, 2, 2) and s.segments()[3].tolist() == [[1, 2], [2, len(recs[3].input_token_ids)]]
        with pytest.raises(StoreError, match="unknown pass"):
            s.tokens("body")
        with pytest.raises(StoreError, match="unknown pass"):
            s.special("body")
        # pooled views: streamed, sinks excluded, per segment
        idx = np.array([0, 2, 3, 6])
        body = s.pooled("body", idx)
        sig = s.pooled("signature", idx)
        inputs = s.pooled("inputs", idx)
        both = s.pooled_views(["body", "signature_last", "signature"], idx)  # one read per pass, same values
        for k, i in enumerate(idx):
            r = recs[i]
            np.testing.assert_allclose(body[k], r.body_states.mean(0), atol=2e-3)
            np.testing.assert_allclose(sig[k], r.input_states[2:].mean(0), atol=2e-3)
            np.testing.assert_allclose(inputs[k], r.input_states[1:].mean(0), atol=2e-3)
            np.testing.assert_allclose(both["signature_last"][k], r.input_states[-1], atol=2e-3)
        np.testing.assert_array_equal(both["body"], body)
        np.testing.assert_array_equal(both["signature"], sig)
        # a whole-store read (one block of many records) gives every view the per-record mean
        every = s.pooled_views(["signature", "context", "signature_last", "inputs", "body"])
        with_sinks = s.pooled("inputs", exclude_special=False)
        for i, r in enumerate(recs):
            np.testing.assert_allclose(every["signature"][i], r.input_states[2:].mean(0), atol=2e-3)
            np.testing.assert_allclose(every["context"][i], r.input_states[1:2].mean(0), atol=2e-3)
            np.testing.assert_allclose(every["signature_last"][i], r.input_states[-1], atol=2e-3)
            np.testing.assert_allclose(every["inputs"][i], r.input_states[1:].mean(0), atol=2e-3)
            np.testing.assert_allclose(every["body"][i], r.body_states.mean(0), atol=2e-3)
            np.testing.assert_allclose(with_sinks[i], r.input_states.mean(0), rtol=1e-3, atol=2e-3)
        with pytest.raises(StoreError, match="unknown view"):
            s.pooled("signature_first", idx)
        blocks = list(s.iter_blocks("targets", np.arange(7), block_tokens=10))
        assert sum(len(b[0]) for b in blocks) == 7 and len(blocks) > 1


def test_a_view_with_no_token_pools_to_zeros_and_leaves_its_neighbours_alone(tmp_path: Path) -> None:
    recs = [rec(i, 6, 3) for i in range(4)]
    recs[1] = replace(recs[1], context_span=(1, 1))  # no context
    recs[2] = replace(recs[2], signature_span=(6, 6), context_span=(1, 6))  # no signature
    recs[3].input_special[:] = True  # only sinks
    p = tmp_path / "s.h5"
    with StoreWriter(p, meta()) as w:
        w.append(recs)
    with open_store(p) as s:
        v = s.pooled_views(["context", "signature", "signature_last", "inputs"])
    assert not v["context"][1].any() and not v["signature"][2].any() and not v["signature_last"][2].any()
    assert all(not v[k][3].any() for k in v)
    np.testing.assert_allclose(v["context"][2], recs[2].input_states[1:].mean(0), atol=2e-3)
    np.testing.assert_allclose(v["signature"][1], recs[1].input_states[2:].mean(0), atol=2e-3)
    np.testing.assert_allclose(v["signature_last"][0], recs[0].input_states[-1], atol=2e-3)


def test_float16_overflow_and_nan_are_refused(tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "a.h5", meta()) as w:
        with pytest.raises(StoreError, match="float16"):
            w.append([rec(1, scale=1e6)])
        bad = rec(2)
        bad.body_states[0, 0] = np.nan
        with pytest.raises(StoreError, match="NaN"):
            w.append([bad])
        assert w.committed == 0
        # refused before anything is written: no dataset grew (the body pass is checked last)
        assert all(w.f[k].shape[0] == 0 for k in ("records/split", "records/id_end", "inputs/states"))
    with StoreWriter(tmp_path / "b.h5", meta(state_dtype="float32")) as w:
        inf = rec(3)
        inf.input_states[1, 2] = np.inf  # float32 holds inf: only the finiteness check stops it
        with pytest.raises(StoreError, match="NaN/inf"):
            w.append([inf])
        w.append([rec(1, scale=1e6)])
    with open_store(tmp_path / "b.h5") as s:
        assert np.abs(s.inputs(0).states).max() > 1e5


def test_refuses_other_settings_and_foreign_files(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p, meta()) as w:
        w.append([rec(0)])
    for other in (meta(layer=3), meta(teacher="u"), meta(template_version="2"), meta(compute_dtype="bfloat16"),
                  meta(shard="1/2"), meta(max_tokens=99)):
        with pytest.raises(StoreError, match="refusing to append") as e:
            StoreWriter(p, other)
        assert "built again" not in str(e.value)
    with pytest.raises(StoreError, match="its corpus /c was built again since this store was embedded from it"):
        StoreWriter(p, meta(corpus_dir="/c", corpus_manifest_hash="rebuilt"))
    q = tmp_path / "from-a.h5"
    with StoreWriter(q, meta(corpus_dir="/a")) as w:
        w.append([rec(0)])
    with pytest.raises(StoreError, match="this store was embedded from another corpus, /a;"):
        StoreWriter(q, meta(corpus_dir="/b", corpus_manifest_hash="b's"))
    with StoreWriter(p, meta(code_version="later")) as w:  # same settings: resumes
        assert w.committed == 1
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all" * 10)
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1, 2]
    for path, msg in ((tmp_path / "junk.h5", "corrupt or foreign"), (tmp_path / "foreign.h5", "not a codejepa store"),
                      (tmp_path / "missing.h5", "no such store")):
        with pytest.raises(StoreError, match=msg) as e:
            open_store(path)
        assert "\n" not in str(e.value)
        with pytest.raises(StoreError):
            StoreWriter(path, meta()) if path.exists() else read_meta(path)


def test_uncommitted_tail_is_invisible_and_dropped_on_resume(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p, meta()) as w:
        w.append([rec(0), rec(1)])
    # what a kill between the data writes and the commit mark leaves behind
    with h5py.File(p, "r+") as f:
        for ds in ("split", "truncated", "id_end", "repo_end"):
            f["records"][ds].resize((3,))
        u = f["records/id_utf8"]
        u.resize((u.shape[0] + 5,))
        u[-5:] = np.frombuffer(b"ghost", np.uint8)
        f["records/id_end"][2] = u.shape[0]
        g = f["targets"]
        g["states"].resize((g["states"].shape[0] + 50, D))
        g["offsets"].resize((4,))
        g["offsets"][3] = g["states"].shape[0]
    with open_store(p) as s:
        assert list(s.ids) == ["id0", "id1"] and s.lengths("targets").sum() == 14
    with StoreWriter(p, meta()) as w:
        assert not w.has("ghost")
        w.append([rec(2)])
    with open_store(p) as s:
        assert list(s.ids) == ["id0", "id1", "id2"]
        np.testing.assert_allclose(s.body(2).states, rec(2).body_states, atol=2e-3)
        # cutting the tail away must not cut into the committed records before it
        for i in range(3):
            np.testing.assert_allclose(s.inputs(i).states, rec(i).input_states, atol=2e-3)
            np.testing.assert_allclose(s.body(i).states, rec(i).body_states, atol=2e-3)
            assert s.body(i).token_ids.tolist() == rec(i).body_token_ids.tolist()


def test_other_format_version_gets_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "codejepa-store"
        f.attrs["format_version"] = 1
    with pytest.raises(StoreError, match="format version 1 is not supported"):
        open_store(path)


def test_truncated_or_damaged_files_are_named_so_not_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p, meta()) as w:
        w.append([rec(0), rec(1)])
    data = p.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])  # a copy cut short: HDF5's message mentions "sblock"
    with pytest.raises(StoreError, match="truncated store") as e:
        open_store(cut)
    assert "another process" not in str(e.value)

    def unreadable(self: object, *a: object, **k: object) -> None:
        raise OSError("Can't synchronously read data (bad global heap collection signature)")

    monkeypatch.setattr(h5py.AttributeManager, "get", unreadable)  # the header opens, its attributes do not
    with pytest.raises(StoreError, match="damaged store .*attributes cannot be read") as e:
        open_store(p)
    assert "\n" not in str(e.value)


def test_a_disk_too_full_for_the_next_batch_stops_before_writing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    p = tmp_path / "s.h5"
    with StoreWriter(p, meta()) as w:
        w.append([rec(0)])
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(1 << 30, (1 << 30) - (1 << 20), 1 << 20))
        with pytest.raises(StoreError, match="MB free on its disk.*committed batches are kept"):
            w.append([rec(1)])
    monkeypatch.undo()
    with open_store(p) as s:
        assert list(s.ids) == ["id0"]


def test_bytes_damaged_inside_the_states_fail_their_checksum_in_one_line(tmp_path: Path) -> None:
    """A store whose header and bookkeeping are intact but whose states were damaged on disk:
    without checksums it would read back as plausible numbers (or NaNs) and train on them."""
    p = tmp_path / "s.h5"
    with StoreWriter(p, meta(), chunk_tokens=4) as w:
        w.append([rec(i) for i in range(6)])
    with h5py.File(p, "r") as f:
        ds = f["targets/states"]
        assert ds.fletcher32
        hit = ds.id.get_chunk_info(2)  # rows 8..11: record 1's body
    with open(p, "r+b") as fh:
        fh.seek(hit.byte_offset + 8)
        fh.write(bytes(8))
    with open_store(p) as s:  # what it holds is still listed ...
        assert len(s) == 6
        np.testing.assert_allclose(s.body(0).states, rec(0).body_states, rtol=1e-3, atol=1e-3)
        for read in (lambda: s.body(1), lambda: s.pooled("body")):  # ... the damage is named
            with pytest.raises(StoreError, match=r"damaged store: targets/states rows .* do not read back") as e:
                read()
            assert "\n" not in str(e.value)
        assert s.pooled("signature").shape == (6, D)  # the other pass reads on


def test_a_damaged_split_code_is_a_damaged_store(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p, meta()) as w:
        w.append([rec(0), rec(1)])
    with h5py.File(p, "r+") as f:
        f["records/split"][0] = 255  # bytes damaged in place: no split has that code
    with pytest.raises(StoreError, match="damaged store"):
        open_store(p)


def test_permission_denied_is_named_not_called_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p, meta()) as w:
        w.append([rec(0)])
    real = h5py.File

    def denied(path: object, mode: str = "r", **kw: object) -> h5py.File:
        if mode != "r":  # as a read-only file or folder answers (root ignores chmod, so simulated)
            raise OSError(f"[Errno 13] Unable to synchronously open file (unable to open file: name = '{path}', "
                          "errno = 13, error message = 'Permission denied')")
        return real(path, mode, **kw)

    monkeypatch.setattr(h5py, "File", denied)
    with pytest.raises(StoreError, match="permission denied .*for writing"):
        StoreWriter(p, meta())
    with pytest.raises(StoreError, match="cannot create the store .*Permission denied"):
        StoreWriter(tmp_path / "new.h5", meta())
    with open_store(p) as s:  # reading still works
        assert len(s) == 1


def test_pooled_rows_follow_the_indices_asked_and_bad_indices_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    with StoreWriter(p, meta()) as w:
        w.append([rec(i) for i in range(4)])
    with open_store(p) as s:
        once = s.pooled("body", np.array([3, 1]))
        rep = s.pooled_views(("body", "signature"), np.array([3, 3, 1, 3]))
        assert np.array_equal(rep["body"], once[[0, 0, 1, 0]])  # a repeated record was zeros but its last row
        assert np.array_equal(rep["signature"][1], s.pooled("signature", np.array([3]))[0])
        for idx, msg in ((s.splits == "train", "not a boolean mask"), (np.array([0.5]), "integers"),
                         (np.array([-1]), "out of range"), (np.array([4]), "out of range")):
            with pytest.raises(StoreError, match=msg):
                s.pooled("body", idx)
        with pytest.raises(StoreError, match="record index 9 is out of range"):
            s.inputs(9)
