"""embed_corpus stores exactly the teacher's states at the right positions; planning and sharding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _embed_fixtures import make_record, sample_records, write_corpus
from codejepa.embed.run import EmbedError, EmbedSettings, embed_corpus, parse_shard, plan_batches, shard_of
from codejepa.embed.store import open_store
from codejepa.embed.teacher import Teacher
from codejepa.embed.template import SegmentTokenizer, Tokenized


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
@pytest.mark.parametrize("mode", ["in_context", "body_only"])
def test_stored_states_are_the_teachers_own(kind: str, mode: str, teachers: dict[str, Teacher], tmp_path: Path) -> None:
    teacher = teachers[kind]
    records = sample_records(9)
    corpus = write_corpus(tmp_path / "c", records)
    embed_corpus(corpus, tmp_path / "s.h5", EmbedSettings(store_dtype="float32", target_mode=mode, batch_tokens=700),
                 teacher=teacher)
    seg = SegmentTokenizer(teacher.tokenizer, teacher.kind, 512)
    pre, suf = list(seg.prefix), list(seg.suffix)

    def run(ids: list[int]) -> torch.Tensor:
        t = torch.tensor([ids])
        return teacher.forward(t, torch.ones_like(t))[0]

    with open_store(tmp_path / "s.h5") as s:
        assert s.meta.target_mode == mode and s.meta.teacher_kind == kind
        where = s.index_of()
        for rec in records:
            tok = seg.encode([rec])[0]
            assert isinstance(tok, Tokenized)
            ctx, sig, body = tok.context.tolist(), tok.signature.tolist(), tok.body.tolist()
            x, y = s.inputs(where[rec.id]), s.body(where[rec.id])
            inputs_ids = pre + ctx + sig + (suf if kind == "bidirectional" else [])
            assert x.token_ids.tolist() == inputs_ids and y.token_ids.tolist() == body
            assert x.segments == {"context": (len(pre), len(pre) + len(ctx)),
                                  "signature": (len(pre) + len(ctx), len(pre) + len(ctx) + len(sig))}
            assert x.special.tolist() == [True] * len(pre) + [False] * (len(ctx) + len(sig)) + [True] * (len(inputs_ids) - len(pre) - len(ctx) - len(sig))
            np.testing.assert_allclose(x.states, run(inputs_ids).numpy(), atol=1e-5)
            if mode == "in_context":
                full = run(pre + ctx + sig + body + (suf if kind == "bidirectional" else []))
                want = full[len(pre) + len(ctx) + len(sig):][: len(body)]
            else:
                want = run(pre + body + (suf if kind == "bidirectional" else []))[len(pre):][: len(body)]
            np.testing.assert_allclose(y.states, want.numpy(), atol=1e-5)


def test_plan_batches_respects_budget_padding_and_phases() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, size=300).tolist()
    phases = rng.integers(0, 2, size=300).tolist()
    batches = plan_batches(lengths, phases, batch_tokens=2000, max_seqs=64, max_padding=0.1)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(300))
    seen_phase1 = False
    for b in batches:
        ls = [lengths[i] for i in b]
        assert len({phases[i] for i in b}) == 1
        seen_phase1 |= phases[b[0]] == 1
        assert not (seen_phase1 and phases[b[0]] == 0), "phase 0 runs first"
        assert len(b) <= 64 and (len(b) == 1 or len(b) * max(ls) <= 2000)
        assert 1 - sum(ls) / (len(b) * max(ls)) <= 0.1 + 1e-9
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert 1 - sum(lengths) / padded < 0.1
    assert plan_batches([5000], [1], batch_tokens=100) == [[0]]  # longer than the budget: alone


def test_sharding_is_deterministic_and_balanced(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [f"id{i}" for i in range(4000)]
    counts = np.bincount([shard_of(i, 4) for i in ids], minlength=4)
    assert counts.min() > 900 and [shard_of(i, 4) for i in ids[:50]] == [shard_of(i, 4) for i in ids[:50]]
    assert parse_shard("2/4") == (2, 4)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parse_shard(None) is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (1, 3)
    with pytest.raises(EmbedError, match="under torchrun each rank takes its shard"):
        parse_shard("0/3")  # every rank would write shard 0
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(EmbedError):
            parse_shard(bad)


def test_records_skipped_after_the_last_window_are_counted(teachers: dict[str, Teacher], tmp_path: Path) -> None:
    """Skipped records that close the corpus (no embeddable record after them) still count: the
    run must end complete, with its skips recorded, not as an unfinished store."""
    records = sample_records(3) + [make_record(f"empty{i}", body="", split="train") for i in range(2)]
    corpus = write_corpus(tmp_path / "c", records)
    res = embed_corpus(corpus, tmp_path / "s.h5", EmbedSettings(window_tokens=1, batch_tokens=700),
                       teacher=teachers["causal"])
    assert res.written == 3 and res.skipped == {"empty body": 2} and res.complete
    with open_store(tmp_path / "s.h5") as s:
        assert s.complete is True and s.meta.extra["skipped"] == {"empty body": 2}


def test_a_resumed_run_skips_finished_batches_and_ends_as_an_uninterrupted_one(teachers: dict[str, Teacher],
                                                                               tmp_path: Path) -> None:
    """A rerun recomputes the same plan but runs only the batches that hold a record not yet
    committed, and the store it completes equals the one an uninterrupted run writes."""
    teacher = teachers["causal"]
    corpus = write_corpus(tmp_path / "c", sample_records(24))
    settings = EmbedSettings(batch_tokens=300)
    full = embed_corpus(corpus, tmp_path / "full.h5", settings, teacher=teacher)
    assert full.batches > 3
    forward, calls = teacher.forward, {"n": 0}

    def stopped(ids, mask):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return forward(ids, mask)

    teacher.forward = stopped  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            embed_corpus(corpus, tmp_path / "part.h5", settings, teacher=teacher)
    finally:
        teacher.forward = forward  # type: ignore[method-assign]
    with open_store(tmp_path / "part.h5") as s:
        done = len(s)
    assert 0 < done < 24
    again = embed_corpus(corpus, tmp_path / "part.h5", settings, teacher=teacher)
    assert again.already == done and again.written == 24 - done and again.complete
    assert again.batches == full.batches - 2  # the two finished batches are not run again
    with open_store(tmp_path / "full.h5") as a, open_store(tmp_path / "part.h5") as b:
        assert list(a.ids) == list(b.ids)
        for i in range(len(a)):
            assert np.array_equal(a.inputs(i).states, b.inputs(i).states)
            assert np.array_equal(a.body(i).states, b.body(i).states)


def test_a_store_records_the_code_that_appended_to_it_and_the_libraries(teachers: dict[str, Teacher], tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A store embedded in stages by two versions of the code keeps its first version and says
    which others appended records; the library versions stand beside them."""
    import codejepa.embed.run as run_mod

    corpus = write_corpus(tmp_path / "c", sample_records(9))
    monkeypatch.setattr(run_mod, "code_version", lambda: "0.1.0+gfirst")
    embed_corpus(corpus, tmp_path / "s.h5", EmbedSettings(splits=("train",)), teacher=teachers["causal"])
    monkeypatch.setattr(run_mod, "code_version", lambda: "0.1.0+gsecond")
    embed_corpus(corpus, tmp_path / "s.h5", EmbedSettings(), teacher=teachers["causal"])
    with open_store(tmp_path / "s.h5") as s:
        assert s.meta.code_version == "0.1.0+gfirst" and s.meta.extra["resumed_with"] == ["0.1.0+gsecond"]
        assert {"python", "torch", "transformers", "h5py", "numpy"} <= set(s.meta.extra["versions"])
