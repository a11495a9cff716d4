"""Extraction of one file: qualnames, signature/body boundaries, exact spans, bad input."""

from __future__ import annotations

import pytest
from _corpus_fixtures import (
    BINARY_PY,
    CRLF_PY,
    EXPECTED_MAIN,
    LATIN1_DECLARED,
    LATIN1_UNDECLARED,
    MAIN_PY,
    SYNTAX_ERROR_PY,
    UNICODE_PY,
)

from codejepa.corpus.extract import (
    ExtractSettings,
    extract_file,
    hash_normalised,
    is_test_path,
    is_trivial_hash,
    normalise_body,
)
from codejepa.corpus.records import FunctionRecord


def extract(data: bytes | str, path: str = "pkg/m.py", **kw):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return extract_file(data, path, repo="r", url="file:///r", commit="c" * 40, split="train", **kw)


def by_name(data: bytes | str, **kw) -> dict[str, FunctionRecord]:
    return {r.qualname: r for r in extract(data, **kw).records}


def assert_spans_exact(data: bytes, rec: FunctionRecord, encoding: str = "utf-8") -> None:
    for text, span in [(rec.signature, rec.signature_span), (rec.body, rec.body_span)] + [
        (p.text, p.span) for p in rec.context
    ]:
        assert data[span.start : span.end].decode(encoding) == text
        # Line numbers agree with the byte offsets.
        assert span.start_line == data[: span.start].count(b"\n") + 1
        if span.end > span.start:
            assert span.end_line == data[: span.end - 1].count(b"\n") + 1


def test_qualnames_def_lines_and_async_match_python() -> None:
    recs = by_name(MAIN_PY)
    assert {q: (r.def_line, r.is_async) for q, r in recs.items()} == EXPECTED_MAIN


def test_spans_round_trip_byte_exactly() -> None:
    data = MAIN_PY.encode()
    for rec in extract(data).records:
        assert_spans_exact(data, rec)


def test_signature_is_decorators_header_and_docstring() -> None:
    recs = by_name(MAIN_PY)
    assert recs["decorated"].signature == (
        '@decorator\n@other.decorator(arg=1)\ndef decorated(a, b=2) -> int:\n    """Docstring."""'
    )
    # A comment after the docstring is the start of the body.
    assert recs["decorated"].body == "# comment after the docstring belongs to the body\n    return a + b"
    assert recs["Outer.amethod"].signature == "@staticmethod\n    async def amethod():"
    assert recs["Outer.Inner.value"].signature.startswith("@property\n")


def test_comment_between_header_and_first_statement_belongs_to_body() -> None:
    rec = by_name(MAIN_PY)["fetch"]
    assert rec.signature == "async def fetch(url):"
    assert rec.body == "# header comment belongs to the body\n    await something(url)"


def test_one_line_def_and_docstring_only() -> None:
    recs = by_name(MAIN_PY)
    assert recs["one_liner"].signature == "def one_liner(x):"
    assert recs["one_liner"].body == "return x * 2"
    doc_only = recs["doc_only"]
    assert doc_only.signature == 'def doc_only():\n    """Only a docstring."""'
    assert doc_only.body == ""
    assert doc_only.body_span.start == doc_only.body_span.end == doc_only.signature_span.end
    assert is_trivial_hash(doc_only.body_hash)


def test_only_a_plain_string_first_statement_is_a_docstring() -> None:
    rec = by_name(MAIN_PY)["fstring_first"]
    assert rec.signature == "def fstring_first():"
    assert rec.body.startswith('f"not a docstring')
    recs = by_name('def a():\n    b"bytes"\n    return 1\n\ndef c():\n    x = 1\n    "late string"\n')
    assert recs["a"].signature == "def a():"
    assert recs["c"].signature == "def c():"
    assert recs["c"].body == 'x = 1\n    "late string"'


def test_nested_function_body_stays_inside_outer_body_only() -> None:
    recs = by_name(MAIN_PY)
    outer, helper = recs["Outer.method"], recs["Outer.method.<locals>.helper"]
    assert outer.body_span.start <= helper.signature_span.start < helper.body_span.end <= outer.body_span.end


def test_context_pieces_imports_classes_siblings_and_never_own_body() -> None:
    data = MAIN_PY.encode()
    recs = by_name(MAIN_PY)
    value = recs["Outer.Inner.value"]
    kinds = [(p.kind, p.text) for p in value.context]
    assert ("import", "import os") in kinds
    assert ("import", "from typing import (\n    Any,\n)") in kinds
    assert ("import", "import ntpath") in kinds  # module scope, under an `if`
    assert [t for k, t in kinds if k == "class"] == ["class Outer(Base, metaclass=Meta):", "class Inner:"]
    # Siblings of a module-level function: the other module-level functions, compact.
    dec = recs["decorated"]
    sibs = [p.text for p in dec.context if p.kind == "sibling"]
    assert "async def fetch(url):" in sibs
    assert 'def doc_only():' in sibs  # no docstring in a sibling piece
    assert "def conditional():" in sibs
    assert all("value" not in s and "helper" not in s for s in sibs)  # other scopes are not siblings
    # Methods of Outer see each other, not the module functions.
    meth_sibs = [p.text for p in recs["Outer.method"].context if p.kind == "sibling"]
    assert meth_sibs == ["@staticmethod\n    async def amethod():"]
    for rec in recs.values():
        for p in rec.context:
            assert not (rec.body_span.start <= p.span.start < rec.body_span.end), (rec.qualname, p)
        assert_spans_exact(data, rec)
        assert [p.span.start for p in rec.context] == sorted(p.span.start for p in rec.context)


def test_max_siblings_keeps_the_nearest() -> None:
    src = "".join(f"def f{i}():\n    return {i}\n\n" for i in range(10))
    recs = by_name(src, settings=ExtractSettings(max_siblings=2))
    assert [p.text for p in recs["f5"].context if p.kind == "sibling"] == ["def f4():", "def f6():"]
    assert [p.text for p in recs["f0"].context if p.kind == "sibling"] == ["def f1():", "def f2():"]


def test_non_ascii_identifiers_and_strings_slice_exactly() -> None:
    data = UNICODE_PY.encode("utf-8")
    recs = by_name(data)
    assert set(recs) == {"grüße", "Ñandú.méthode"}
    assert recs["grüße"].signature == "def grüße(naïve='ünïcödé 🎉'):"
    assert recs["grüße"].body == "café = 'é' * 3  # コメント\n    return café + naïve"
    for rec in recs.values():
        assert_spans_exact(data, rec)
    # Byte offsets, not character offsets: the body starts after multi-byte characters.
    assert recs["grüße"].body_span.start == data.index("café".encode())


def test_crlf_line_endings_are_kept_byte_exact() -> None:
    data = CRLF_PY.encode()
    recs = by_name(data)
    assert recs["windows"].signature == "def windows(a):\r\n    '''Doc.'''"
    assert recs["windows"].body == "x = a\r\n    return x"
    assert recs["second"].def_line == 6
    for rec in recs.values():
        assert_spans_exact(data, rec)


def test_utf8_bom_offsets_count_the_bom() -> None:
    data = b"\xef\xbb\xbfdef f():\n    return 1\n"
    (rec,) = extract(data).records
    assert rec.signature_span.start == 3 and rec.signature == "def f():"
    assert_spans_exact(data, rec)


def test_syntax_error_keeps_clean_functions_and_counts_the_rest() -> None:
    res = extract(SYNTAX_ERROR_PY)
    assert res.has_syntax_error
    assert {r.qualname for r in res.records} == {"good_before", "good_after"}
    assert res.functions_with_errors == 1


def test_latin1_with_coding_line_decodes_and_maps_offsets_back() -> None:
    res = extract(LATIN1_DECLARED)
    assert res.encoding == "iso-8859-1"
    recs = {r.qualname: r for r in res.records}
    assert set(recs) == {"café", "after"}
    assert recs["café"].body == "return 'été'"
    for rec in recs.values():
        assert_spans_exact(LATIN1_DECLARED, rec, "latin-1")


def test_undeclared_latin1_and_bad_coding_lines_are_reported_not_guessed() -> None:
    res = extract(LATIN1_UNDECLARED)
    assert res.records == [] and "does not decode" in res.skipped and "utf-8" in res.skipped
    # the same bytes on the first line: tokenize calls it a bad declaration, but there is none
    res = extract(b"NAME = 'caf\xe9'\ndef f():\n    return NAME\n")
    assert res.skipped == "does not decode as its default encoding utf-8 (byte 11)"
    res = extract(b"# coding: no-such-codec\ndef f(): pass\n")
    assert res.records == [] and "bad encoding declaration" in res.skipped
    # A declared encoding the bytes do not satisfy is reported too.
    res = extract(b"# coding: ascii\ndef f():\n    return '\xc3\xa9'\n")
    assert res.records == [] and "declared" in res.skipped


def test_binary_and_oversized_files_are_skipped_with_a_reason() -> None:
    assert "binary" in extract(BINARY_PY).skipped
    res = extract("def f():\n    return 1\n" * 100, settings=ExtractSettings(max_file_bytes=100))
    assert res.records == [] and "size limit" in res.skipped


def test_is_test_by_path_or_name_and_exclude_tests() -> None:
    src = "def test_a():\n    pass\n\nclass TestB:\n    def run(self):\n        return 1\n\ndef c():\n    return 2\n"
    recs = by_name(src)
    assert {q: r.is_test for q, r in recs.items()} == {"test_a": True, "TestB.run": True, "c": False}
    assert all(r.is_test for r in extract(src, path="tests/test_x.py").records)
    res = extract(src, settings=ExtractSettings(exclude_tests=True))
    assert [r.qualname for r in res.records] == ["c"] and res.tests_excluded == 2
    assert is_test_path("pkg/tests/helpers.py") and is_test_path("conftest.py") and is_test_path("a/foo_test.py")
    assert not is_test_path("pkg/contest.py") and not is_test_path("pkg/testimony.py")


def test_body_hash_ignores_comments_and_whitespace_but_not_code() -> None:
    a = by_name("def f(x):\n    y = x+1  # add\n\n    return y\n")["f"]
    b = by_name("class K:\n    def g(x):\n        # different comment\n        y  =  x + 1\n        return y\n")["K.g"]
    c = by_name("def h(x):\n    y = x + 2\n    return y\n")["h"]
    d = by_name("def i(x):\n    if x:\n        y = 1\n    return y\n")["i"]
    e = by_name("def j(x):\n    if x:\n        y = 1\n        return y\n")["j"]
    assert a.body_hash == b.body_hash
    assert a.body_hash != c.body_hash
    assert d.body_hash != e.body_hash  # indentation structure matters
    s = by_name("def k():\n    return '# not a comment'\n")["k"]
    t = by_name("def m():\n    return ''\n")["m"]
    assert s.body_hash != t.body_hash


@pytest.mark.parametrize(
    "body, trivial",
    [("pass", True), ("...", True), ("raise NotImplementedError", True), ("raise NotImplementedError()", True),
     ("pass  # todo", True), ("return None", False), ("raise NotImplementedError('x')", False)],
)
def test_trivial_bodies(body: str, trivial: bool) -> None:
    rec = by_name(f"def f():\n    {body}\n")["f"]
    assert is_trivial_hash(rec.body_hash) is trivial
    assert hash_normalised(normalise_body("")) != hash_normalised(normalise_body("x"))


def test_ids_are_unique_and_stable() -> None:
    a = extract(MAIN_PY).records
    b = extract(MAIN_PY).records
    assert [r.id for r in a] == [r.id for r in b]
    assert len({r.id for r in a}) == len(a)
    other = extract_file(MAIN_PY.encode(), "pkg/other.py", repo="r", url="u", commit="c" * 40, split="train").records
    assert not {r.id for r in a} & {r.id for r in other}


def test_record_json_round_trip() -> None:
    for rec in extract(UNICODE_PY).records:
        assert FunctionRecord.from_json(rec.to_json()) == rec


def test_imports_inside_a_function_or_class_are_not_context() -> None:
    """Only module-scope imports are context: an import inside a function is part of that
    function's body, and as context it would hand the body to the function's own inputs."""
    src = (
        "import json\n"
        "def f():\n    import os\n    return os.sep\n\n"
        "class K:\n    import sys\n    def m(self):\n        return 1\n\n"
        "def g():\n    return 2\n"
    )
    recs = by_name(src)
    for rec in recs.values():
        assert [p.text for p in rec.context if p.kind == "import"] == ["import json"], rec.qualname
        for p in rec.context:
            assert not (rec.body_span.start <= p.span.start < rec.body_span.end), (rec.qualname, p)


def test_a_comment_right_after_the_colon_is_body() -> None:
    """``def f():# note`` — the comment touching the colon starts the body, as one after a space does."""
    for gap in ("", "  "):
        rec = by_name(f"def f():{gap}# note\n    return 1\n")["f"]
        assert rec.signature == "def f():" and rec.body == "# note\n    return 1"


def test_a_file_of_exactly_the_size_limit_is_kept() -> None:
    """The limit is the largest size kept (``over size limit`` means strictly over)."""
    src = "def f():\n    return 1\n"
    assert [r.qualname for r in extract(src, settings=ExtractSettings(max_file_bytes=len(src))).records] == ["f"]
    assert "size limit" in extract(src, settings=ExtractSettings(max_file_bytes=len(src) - 1)).skipped


def test_a_function_under_a_broken_def_or_class_header_counts_as_an_error() -> None:
    """``class K(:`` names the methods below it and would stand in their context: they are
    counted as functions with errors, and the rest of the file is still extracted."""
    res = extract("class K(:\n    def m(self):\n        return 2\n\n"
                  "def outer(:\n    def inner():\n        return 1\n    return inner\n\n"
                  "class Fine:\n    def ok(self):\n        return 3\n")
    assert [r.qualname for r in res.records] == ["Fine.ok"]
    assert res.functions_with_errors == 3


def test_a_comment_after_a_nested_block_is_not_body() -> None:
    """tree-sitter hangs a comment after the last statement of a nested block inside the
    function; the body ends at the code, as CPython's end position does."""
    rec = by_name("def f(x):\n    if x:\n        return 1\n        # note\n\ny = 1\n")["f"]
    assert rec.body == "if x:\n        return 1"


def test_a_docstring_of_concatenated_plain_strings_is_signature() -> None:
    """Adjacent plain literals are one docstring (CPython's rule); one f-string among them is not."""
    rec = by_name('def f():\n    "a" "b"\n    return 1\n')["f"]
    assert rec.signature == 'def f():\n    "a" "b"' and rec.body == "return 1"
    rec = by_name('def f():\n    "a" f"b"\n    return 1\n')["f"]
    assert rec.signature == "def f():" and rec.body.startswith('"a" f"b"')
