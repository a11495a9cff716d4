"""The leak test: a record's stored input states carry nothing of its body.

For each kind of teacher (a tiny causal Qwen2, a tiny BERT, and the real packaged
all-MiniLM-L6-v2), three corpora that differ only in the bodies (B) or only in the
signatures (C) are embedded; the input states must be unchanged by B and changed by C.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from _embed_fixtures import make_record, make_tiny_bert, make_tiny_qwen2, write_corpus
from codejepa.embed.run import EmbedSettings, embed_corpus
from codejepa.embed.store import open_store
from codejepa.embed.teacher import Teacher, resolve_teacher


def _records() -> list:
    out = []
    for i in range(6):
        body = f"    s = 'жж{'ж' * i}'\n" + "".join(f"    t{j} = s * {j}\n" for j in range(i + 1)) + "    return t0\n"
        out.append(make_record(
            f"r{i}", repo=f"repo{i % 2}", split="train" if i % 2 else "test",
            signature=f"def func_{i}(x, n={i}):\n    \"\"\"Doc {i}.\"\"\"", body=body,
            # the last record's context overflows the inputs' half of the window: truncated
            context=tuple(f"import mod{j}" for j in range(60 if i == 5 else i % 3)),
        ))
    return out


def _embed(tmp: Path, name: str, records: list, teacher: Teacher, **kw: object) -> dict[str, tuple]:
    corpus = write_corpus(tmp / f"corpus-{name}", records)
    settings = EmbedSettings(store_dtype="float32", max_tokens=256, **kw)  # type: ignore[arg-type]
    embed_corpus(corpus, tmp / f"{name}.h5", settings, teacher=teacher)
    with open_store(tmp / f"{name}.h5") as s:
        out = {rid: (s.inputs(i), s.body(i)) for i, rid in enumerate(s.ids)}
        out["truncated"] = {rid for rid, t in zip(s.ids, s.truncated) if t}  # type: ignore[assignment]
        return out


@pytest.fixture(scope="module", params=["tiny-qwen2", "tiny-bert", "minilm"])
def teacher(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Teacher:
    tmp = tmp_path_factory.mktemp(request.param)
    path = {"tiny-qwen2": lambda: make_tiny_qwen2(tmp / "m"), "tiny-bert": lambda: make_tiny_bert(tmp / "m"),
            "minilm": lambda: None}[request.param]()
    torch.set_num_threads(1)
    return Teacher(resolve_teacher(None if path is None else str(path)), device="cpu", dtype="float32")


@pytest.mark.parametrize("batching", ["bucketed", "one-per-batch"])
def test_body_never_reaches_inputs(teacher: Teacher, batching: str, tmp_path: Path) -> None:
    kw = {"batch_tokens": 1} if batching == "one-per-batch" else {"batch_tokens": 4096}
    a_recs = _records()
    # B: other bodies (other lengths too); C: other signatures
    b_recs = [replace(r, body="    return 'щщ'\n" * (2 + k % 3)) for k, r in enumerate(a_recs)]
    b_recs[5] = replace(a_recs[5], body="    return 'щщ'\n" * 300)  # long enough to be cut
    c_recs = [replace(r, signature=r.signature.replace("n=", "m=")) for r in a_recs]
    a = _embed(tmp_path, "a", a_recs, teacher, **kw)
    b = _embed(tmp_path, "b", b_recs, teacher, **kw)
    c = _embed(tmp_path, "c", c_recs, teacher, **kw)
    assert a["r5"][0].segments["context"][1] - a["r5"][0].segments["context"][0] > 0
    assert "r5" in a["truncated"] and "r5" in b["truncated"]  # context dropped in A; and body cut in B
    assert len(b["r5"][0].token_ids) + len(b["r5"][1].token_ids) == 256  # B's long body fills the window
    for rid in (k for k in a if k != "truncated"):
        (ia, ta), (ib, tb), (ic, _) = a[rid], b[rid], c[rid]
        assert np.array_equal(ia.token_ids, ib.token_ids) and ia.segments == ib.segments
        np.testing.assert_allclose(ib.states, ia.states, rtol=0, atol=1e-6)
        if teacher.kind == "bidirectional" and batching == "one-per-batch":
            # the inputs pass does not contain the body at all: batched alike, bit-identical
            assert np.array_equal(ib.states, ia.states)
        sig = slice(*ia.segments["signature"])
        assert np.abs(ic.states[sig] - ia.states[sig]).max() > 1e-3, "a signature change must show"
        assert ta.states.shape != tb.states.shape or np.abs(ta.states - tb.states).max() > 1e-3


def test_causal_inputs_bit_identical_when_batched_alike(tmp_path: Path) -> None:
    """Same token count, one sequence per batch: the causal pass has identical shapes, so the
    prefix states must be bit-identical whatever the body says."""
    torch.set_num_threads(1)
    teacher = Teacher(resolve_teacher(str(make_tiny_qwen2(tmp_path / "m"))), device="cpu", dtype="float32")
    a_recs = _records()
    b_recs = [replace(r, body=r.body.replace("ж", "щ")) for r in a_recs]  # same byte-level token count
    a = _embed(tmp_path, "a", a_recs, teacher, batch_tokens=1)
    b = _embed(tmp_path, "b", b_recs, teacher, batch_tokens=1)
    for rid in (k for k in a if k != "truncated"):
        assert len(a[rid][1].token_ids) == len(b[rid][1].token_ids)
        assert not np.array_equal(a[rid][1].token_ids, b[rid][1].token_ids)
        assert np.array_equal(a[rid][0].states, b[rid][0].states)


def test_a_single_bidirectional_pass_would_leak(tmp_path: Path) -> None:
    """Why the second pass exists: in one bidirectional pass the signature states move with the body."""
    teacher = Teacher(resolve_teacher(str(make_tiny_bert(tmp_path / "m"))), device="cpu", dtype="float32")
    tok = teacher.tokenizer
    sig = tok("def f(x):", add_special_tokens=False)["input_ids"]
    outs = []
    for body in ("return x", "raise ValueError(x)"):
        ids = [tok.cls_token_id, *sig, *tok(body, add_special_tokens=False)["input_ids"], tok.sep_token_id]
        t = torch.tensor([ids])
        outs.append(teacher.forward(t, torch.ones_like(t))[0, 1 : 1 + len(sig)])
    assert (outs[0] - outs[1]).abs().max() > 1e-3
