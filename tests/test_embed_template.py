"""The text template: segment-wise tokenization, sink tokens and the truncation rule."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from _embed_fixtures import make_record, make_tiny_qwen2, minilm_dir
from codejepa.embed.template import SegmentTokenizer, Skipped, Tokenized, fit_window, render


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_qwen2(tmp_path_factory.mktemp("q")), local_files_only=True)


@pytest.fixture(scope="module")
def bert_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


def test_fit_window_drops_farthest_context_first_then_body_tail() -> None:
    # three pieces of 10 tokens at distances 300, 50, 900; separator 1; signature 20
    ctx, dist = [10, 10, 10], [300, 50, 900]
    f = fit_window(ctx, dist, 1, 20, 40, budget=200, body_reserve=100)
    assert f.fits and f.keep_context == (True, True, True) and f.body_tokens == 40
    f = fit_window(ctx, dist, 1, 20, 40, budget=200, body_reserve=155)  # inputs get 45 of 51: the farthest goes
    assert f.keep_context == (True, True, False) and f.body_tokens == 40
    f = fit_window(ctx, dist, 1, 20, 40, budget=200, body_reserve=165)  # 35: then the 300 one
    assert f.keep_context == (False, True, False) and f.body_tokens == 40
    f = fit_window(ctx, dist, 1, 20, 400, budget=200, body_reserve=100)  # a long body: its tail is cut
    assert f.keep_context == (True, True, True) and f.body_tokens == 200 - 51
    f = fit_window(ctx, dist, 1, 20, 40, budget=20, body_reserve=10)  # the signature is never cut: skip
    assert not f.fits
    assert not fit_window([], [], 1, 5, 0, budget=100, body_reserve=50).fits  # an empty body is skipped


def test_fit_window_boundaries_and_ties() -> None:
    """Inputs that exactly fill their share keep every piece (the share is inclusive), and among
    pieces equally far from the signature the earlier one (further up the file) goes first."""
    f = fit_window([10, 10, 10], [300, 50, 900], 1, 20, 40, budget=200, body_reserve=149)  # inputs 51 of 51
    assert f.keep_context == (True, True, True) and f.body_tokens == 40
    f = fit_window([10, 10, 10], [300, 50, 900], 1, 20, 40, budget=200, body_reserve=150)  # 51 of 50: one goes
    assert f.keep_context == (True, True, False)
    f = fit_window([10, 10, 10], [7, 7, 7], 1, 20, 40, budget=200, body_reserve=155)
    assert f.keep_context == (False, True, True)
    f = fit_window([10, 10, 10], [7, 7, 7], 1, 20, 40, budget=200, body_reserve=165)
    assert f.keep_context == (False, False, True)


def test_kept_context_never_depends_on_the_body() -> None:
    for body in (1, 10, 100, 1000, 10_000):
        f = fit_window([30, 30, 30], [3, 2, 1], 1, 20, body, budget=200, body_reserve=110)
        assert f.keep_context == (False, True, True)


def test_render_shows_the_function_at_module_level() -> None:
    r = render(make_record("a", signature="def f(x):", body="y = x\n    return y\n"))
    assert r.signature == "def f(x):\n" and r.body == "    y = x\n    return y\n"
    # a method, as the corpus cuts it: def and first statement without their indentation
    r = render(make_record("b", signature='def f(self):\n        """Doc.\n\n        More."""',
                           body='x = 1\n        if x:\n            return """a\n  b"""\n'))
    assert r.signature == 'def f(self):\n    """Doc.\n\n    More."""\n'
    assert r.body == '    x = 1\n    if x:\n        return """a\nb"""\n'
    r = render(make_record("c", signature="@property\n    def f(self):", body="return 1"))  # decorated method
    assert r.signature == "@property\ndef f(self):\n" and r.body == "    return 1"
    r = render(make_record("d", signature='def f():\n        """Doc."""', body="return 1"))
    assert r.body == "    return 1"
    assert render(make_record("e", body="    return 1\n")).body == "    return 1\n"


def test_segments_are_tokenized_apart_and_decode_exactly(qwen_tok) -> None:
    seg = SegmentTokenizer(qwen_tok, "causal", 512)
    assert seg.prefix == (qwen_tok.eos_token_id,) and seg.suffix == ()  # the sink is the doc boundary
    sig = 'def héllo(a, b):\n    """Dœc ✓."""'
    a = seg.encode([make_record("a", signature=sig, body="return a + b\n", context=("import os", "import sys"))])[0]
    b = seg.encode([make_record("a", signature=sig, body=")\n" + "x" * 50, context=("import os", "import sys"))])[0]
    assert isinstance(a, Tokenized) and isinstance(b, Tokenized)
    # no token straddles the signature/body boundary: signature ids do not depend on the body
    assert np.array_equal(a.signature, b.signature) and np.array_equal(a.context, b.context)
    rd = render(make_record("a", signature=sig, body="return a + b\n", context=("import os", "import sys")))
    assert qwen_tok.decode(a.signature.tolist()) == rd.signature
    assert qwen_tok.decode(a.body.tolist()) == rd.body
    assert qwen_tok.decode(a.context.tolist()) == "".join(rd.context) + "\n"
    assert not a.truncated


def test_bert_sinks_and_no_builtin_padding(bert_tok) -> None:
    seg = SegmentTokenizer(bert_tok, "bidirectional", 512)
    assert bert_tok.convert_ids_to_tokens(list(seg.prefix)) == ["[CLS]"]
    assert bert_tok.convert_ids_to_tokens(list(seg.suffix)) == ["[SEP]"]
    t = seg.encode([make_record("a", body="    return 1\n")])[0]
    # the packaged tokenizer.json pads/truncates to 128; the template must not inherit that
    assert isinstance(t, Tokenized) and 0 < len(t.body) < 10


def test_truncation_flags_and_skips(qwen_tok) -> None:
    ctx = tuple(f"import module_number_{i}" for i in range(12))
    body = "".join(f"    v{i} = {i}\n" for i in range(60))
    full = SegmentTokenizer(qwen_tok, "causal", 4096).encode([make_record("a", body=body, context=ctx)])[0]
    n_ctx, n_sig, n_body = len(full.context), len(full.signature), len(full.body)
    assert not full.truncated
    # inputs get half the window: some context goes, the nearest pieces stay
    window = 1 + 2 * (n_sig + n_ctx // 2)
    small = SegmentTokenizer(qwen_tok, "causal", window)
    t = small.encode([make_record("a", body=body, context=ctx)])[0]
    assert t.truncated and 0 < t.dropped_context < 12
    assert len(t.context) + n_sig <= small.body_reserve + (window - 1) % 2
    kept_text = qwen_tok.decode(t.context.tolist())
    assert "module_number_11" in kept_text and "module_number_0\n" not in kept_text  # fixture distances grow backwards
    # a shorter body keeps exactly the same context: the inputs do not reveal the body's length
    t2 = small.encode([make_record("a", body="    return 1\n", context=ctx)])[0]
    assert np.array_equal(t2.context, t.context) and t2.dropped_context == t.dropped_context
    assert t2.body_cut == 0 and t2.truncated  # context dropped alone still marks the record truncated
    # the body gets the rest of the window and loses its tail
    assert len(t.body) == min(n_body, window - 1 - len(t.context) - n_sig)
    assert np.array_equal(t.body, full.body[: len(t.body)]) and np.array_equal(t.signature, full.signature)
    # a signature longer than the inputs' half: all context goes, the body still gets the rest
    tiny = SegmentTokenizer(qwen_tok, "causal", 1 + n_sig + 5)
    t = tiny.encode([make_record("a", body=body, context=ctx)])[0]
    assert t.truncated and len(t.context) == 0 and len(t.body) == 5 and t.body_cut == n_body - 5
    # a signature that alone fills the window is skipped, never cut
    s = SegmentTokenizer(qwen_tok, "causal", n_sig).encode([make_record("a", body=body, context=ctx)])[0]
    assert isinstance(s, Skipped) and "signature" in s.reason


def test_a_batch_encodes_each_record_as_alone(qwen_tok) -> None:
    """Records are tokenized as one flat batch of pieces; each record's segments must come out as
    when it is encoded alone, whatever the numbers of context pieces before it (none, several)."""
    seg = SegmentTokenizer(qwen_tok, "causal", 512)
    recs = [make_record("a", context=()), make_record("b", body="    return 2\n", context=("import os", "import sys")),
            make_record("c", signature="def g(y):", body="", context=()),
            make_record("d", body="    return 4\n", context=("import json",))]
    together = seg.encode(recs)
    for rec, got in zip(recs, together):
        alone = seg.encode([rec])[0]
        if isinstance(alone, Skipped):
            assert got == alone and alone.reason == "empty body"
            continue
        assert isinstance(got, Tokenized) and got.id == rec.id
        for part in ("context", "signature", "body"):
            assert np.array_equal(getattr(got, part), getattr(alone, part)), (rec.id, part)


def test_context_after_the_signature_counts_its_distance_too() -> None:
    """A sibling defined below the function is as far from the signature as one the same number
    of bytes above it: farthest-first dropping must not keep a distant later piece over a near one."""
    rec = make_record("a", context=("import os", "def later():"))
    sig_at = rec.signature_span.start
    near, far = rec.context
    rec = replace(rec, context=(replace(near, span=replace(near.span, start=sig_at - 100)),
                                replace(far, span=replace(far.span, start=sig_at + 5000))))
    assert render(rec).context_distance == (100, 5000)
