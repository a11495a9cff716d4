"""One Python file's bytes → its functions as :class:`FunctionRecord` pieces, with exact spans.

Parsing is tree-sitter (``tree-sitter-python``); one query per file finds the functions,
comments and imports, and a short walk up each function's parents gives its scope and
enclosing classes (a query cannot express "nearest enclosing def or class").

Decisions a reader of the records needs to know:

* **Spans** are byte offsets into the file exactly as stored at the commit, so
  ``file_bytes[start:end]`` is the text, and text is decoded from exactly those bytes.
  A file that is not UTF-8 (a PEP 263 coding line, honoured with :func:`tokenize.detect_encoding`
  as CPython does) is parsed as its UTF-8 re-encoding and every offset is mapped back.
* **Signature** = decorators + ``def`` header + docstring when there is one (the block's
  first statement, a plain string literal, as :func:`ast.get_docstring` sees it), as one
  contiguous span, so a comment between decorators or before the docstring is part of it.
* **Body** = from the first comment or statement after the docstring (or after the header's
  ``:`` when there is no docstring) to the end of the last statement. A comment after the
  colon on the ``def`` line is therefore body; comments after the last statement are not
  (tree-sitter attaches them by indentation, which would make the span unstable). A
  docstring-only function has an empty body span at the end of its signature.
* **Context** pieces, each with its span: the file's module-scope imports (including those
  under ``if``/``try`` at module level, never imports inside a function or class), the
  enclosing class headers (decorators + ``class`` line up to its colon, outermost first) and
  the *compact* signatures of sibling functions (decorators + ``def`` header, no docstring) of
  the same scope: at most ``max_siblings`` of them, the nearest in file order, because a
  module with hundreds of functions would otherwise store a quadratic amount of context.
  Nothing in a function's context lies inside its own body.
* **Syntax errors**: tree-sitter always produces a tree; a function is kept only when its
  own subtree (decorators included) has no ERROR or MISSING node *and* no ancestor is an
  ERROR node (its scope, hence its qualname, would be a guess). The others are counted.
* **body_hash** hashes the body with comments removed (tree-sitter's comment nodes, so a
  ``#`` inside a string is kept), blank lines dropped, each line's indentation replaced by
  its rank among the body's indentation widths, runs of whitespace collapsed and the
  whitespace next to punctuation removed. So ``x=1`` and ``x = 1  # set`` hash alike, and
  so does the same method indented as a nested function.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import io
import re
import tokenize
from dataclasses import dataclass, field

import tree_sitter
import tree_sitter_python

from codejepa.corpus.records import ContextPiece, FunctionRecord, Span

EXTRACTOR_VERSION = 1  # bump when records for the same bytes would change

PY_LANGUAGE = tree_sitter.Language(tree_sitter_python.language())

_QUERY_SOURCE = """
(function_definition) @fn
(comment) @comment
[(import_statement) (import_from_statement) (future_import_statement)] @import
"""

_TEST_DIRS = frozenset({"test", "tests", "testing"})
_TRIVIAL_BODIES = ("", "pass", "...", "raise NotImplementedError", "raise NotImplementedError()")


@dataclass(frozen=True, slots=True)
class ExtractSettings:
    max_file_bytes: int = 1_000_000
    max_siblings: int = 16
    exclude_tests: bool = False


@dataclass(slots=True)
class FileResult:
    """What one file gave: its records, or why it was skipped."""

    path: str
    records: list[FunctionRecord] = field(default_factory=list)
    skipped: str | None = None  # reason, when the file gave nothing
    encoding: str = "utf-8"
    has_syntax_error: bool = False
    functions_with_errors: int = 0  # functions dropped because of ERROR/MISSING nodes
    tests_excluded: int = 0


class FileSkip(Exception):
    """The file cannot be extracted; the message is the reason recorded in the manifest."""


# --------------------------------------------------------------------------- helpers

_parser: tree_sitter.Parser | None = None
_query: tree_sitter.Query | None = None


def _tools() -> tuple[tree_sitter.Parser, tree_sitter.Query]:
    # Built lazily once per process (worker processes included): neither pickles.
    global _parser, _query
    if _parser is None or _query is None:
        _parser = tree_sitter.Parser(PY_LANGUAGE)
        _query = tree_sitter.Query(PY_LANGUAGE, _QUERY_SOURCE)
    return _parser, _query


def parse_bytes(data: bytes) -> tree_sitter.Tree:
    """A bare tree-sitter parse (used by the benchmark's floor as well)."""
    return _tools()[0].parse(data)


def detect_encoding(data: bytes) -> str:
    """The file's source encoding as CPython decides it (BOM, PEP 263 line, else UTF-8).

    Raises :class:`FileSkip` for binary data, a bad coding line, or bytes that do not decode.
    """
    if b"\x00" in data:
        raise FileSkip("binary file (contains NUL bytes)")
    try:
        enc, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as e:
        raise FileSkip(f"bad encoding declaration: {e.msg if hasattr(e, 'msg') else e}") from None
    try:
        data.decode(enc)
    except UnicodeDecodeError as e:
        how = "default" if enc == "utf-8" else "declared"
        raise FileSkip(f"does not decode as its {how} encoding {enc} (byte {e.start})") from None
    except LookupError:
        raise FileSkip(f"unknown encoding {enc}") from None
    return enc


def is_test_path(path: str) -> bool:
    parts = path.split("/")
    name = parts[-1]
    if any(p.lower() in _TEST_DIRS for p in parts[:-1]):
        return True
    return name.startswith("test_") or name.endswith("_test.py") or name in ("tests.py", "test.py", "conftest.py")


_WS = re.compile(r"[ \t\f\v]+")
# A space next to punctuation (outside a word) is never significant to Python's tokenizer.
_PUNCT_WS = re.compile(r" (?=[^\w\s])|(?<=[^\w\s]) ")


def normalise_body(text: str, first_indent: int = 0) -> str:
    """Canonical form of a body whose comments are already removed (see module doc)."""
    widths: list[int] = []
    kept: list[str] = []
    for i, line in enumerate(text.splitlines()):
        content = line.strip()
        if not content:
            continue
        if i == 0:
            widths.append(first_indent)
        else:
            prefix = line[: len(line) - len(line.lstrip())]
            widths.append(len(prefix.expandtabs(8)) if "\t" in prefix else len(prefix))
        kept.append(content)
    ranks = {w: str(r) for r, w in enumerate(sorted(set(widths)))}
    joined = _PUNCT_WS.sub("", _WS.sub(" ", "\n".join(kept)))
    return "\n".join(f"{ranks[w]}|{c}" for w, c in zip(widths, joined.split("\n")))


def hash_normalised(norm: str) -> str:
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).hexdigest()


TRIVIAL_BODY_HASHES = frozenset(hash_normalised(normalise_body(b)) for b in _TRIVIAL_BODIES)


def is_trivial_hash(body_hash: str) -> bool:
    """``pass``, ``...``, a bare ``raise NotImplementedError`` or an empty body."""
    return body_hash in TRIVIAL_BODY_HASHES


def record_id(repo: str, commit: str, path: str, start: int) -> str:
    key = f"{repo}\x00{commit}\x00{path}\x00{start}".encode()
    return hashlib.blake2b(key, digest_size=10).hexdigest()


class _OffsetMap:
    """Maps byte offsets of the UTF-8 re-encoding back to the original file's offsets."""

    def __init__(self, data: bytes, encoding: str) -> None:
        dec = codecs.getincrementaldecoder(encoding)()
        u8 = [0]
        orig = [0]
        for i in range(len(data)):
            out = dec.decode(data[i : i + 1])
            for ch in out:
                u8.append(u8[-1] + len(ch.encode("utf-8")))
                orig.append(i + 1)
        out = dec.decode(b"", final=True)
        for ch in out:
            u8.append(u8[-1] + len(ch.encode("utf-8")))
            orig.append(len(data))
        self._u8, self._orig = u8, orig

    def __call__(self, off: int) -> int:
        i = bisect.bisect_left(self._u8, off)
        return self._orig[i]


# --------------------------------------------------------------------------- extraction


def extract_file(
    data: bytes,
    path: str,
    *,
    repo: str,
    url: str,
    commit: str,
    split: str,
    settings: ExtractSettings = ExtractSettings(),
) -> FileResult:
    """Every function and method of one file, or the reason the file was skipped."""
    result = FileResult(path=path)
    if len(data) > settings.max_file_bytes:
        result.skipped = f"over size limit ({len(data)} > {settings.max_file_bytes} bytes)"
        return result
    try:
        enc = detect_encoding(data)
    except FileSkip as e:
        result.skipped = str(e)
        return result
    result.encoding = enc
    slice_enc = "utf-8" if enc in ("utf-8", "utf-8-sig") else enc
    if slice_enc == "utf-8":
        parsed, to_orig = data, None
    else:
        parsed = data.decode(enc).encode("utf-8")
        to_orig = _OffsetMap(data, enc)

    parser, query = _tools()
    tree = parser.parse(parsed)
    root = tree.root_node
    result.has_syntax_error = root.has_error
    caps = tree_sitter.QueryCursor(query).captures(root)
    fns = sorted(caps.get("fn", []), key=lambda n: n.start_byte)
    comments = sorted((c.start_byte, c.end_byte) for c in caps.get("comment", []))
    comment_starts = [c[0] for c in comments]

    def ob(off: int) -> int:
        return off if to_orig is None else to_orig(off)

    def text(start: int, end: int) -> str:
        return data[ob(start) : ob(end)].decode(slice_enc)

    def span(start_node: tree_sitter.Node, end_node: tree_sitter.Node, *, use_end_of_start: bool = False) -> Span:
        s_byte = start_node.end_byte if use_end_of_start else start_node.start_byte
        s_row = (start_node.end_point if use_end_of_start else start_node.start_point).row
        e_byte, e_row = end_node.end_byte, end_node.end_point.row
        if e_byte <= s_byte:  # empty span
            return Span(ob(s_byte), ob(s_byte), s_row + 1, s_row + 1)
        return Span(ob(s_byte), ob(e_byte), s_row + 1, e_row + 1)

    def without_comments(start: int, end: int) -> str:
        i = bisect.bisect_left(comment_starts, start)
        parts, pos = [], start
        while i < len(comments) and comments[i][0] < end:
            cs, ce = comments[i]
            parts.append(text(pos, cs))
            pos = min(ce, end)
            i += 1
        parts.append(text(pos, end))
        return "".join(parts)

    # Module-scope imports: shared by every function of the file.
    imports: list[ContextPiece] = []
    for imp in sorted(caps.get("import", []), key=lambda n: n.start_byte):
        if _scope_of(imp)[0].type == "module" and not imp.has_error:
            imports.append(ContextPiece("import", text(imp.start_byte, imp.end_byte), span(imp, imp)))

    path_is_test = is_test_path(path)
    # First pass: which functions survive, their scope, compact signature.
    infos: list[_FnInfo] = []
    by_scope: dict[int, list[_FnInfo]] = {}
    for fn in fns:
        outer = fn.parent if fn.parent is not None and fn.parent.type == "decorated_definition" else fn
        scope, chain, broken = _scope_of(outer)
        if broken or outer.has_error:
            result.functions_with_errors += 1
            continue
        colon = _header_colon(fn)
        if colon is None:
            result.functions_with_errors += 1
            continue
        info = _FnInfo(fn, outer, colon, chain)
        info.piece = ContextPiece("sibling", text(outer.start_byte, colon.end_byte), span(outer, colon))
        infos.append(info)
        group = by_scope.setdefault(scope.id, [])
        info.scope_id, info.index = scope.id, len(group)
        group.append(info)

    class_cache: dict[int, ContextPiece | None | bool] = {}
    for info in infos:
        fn, outer, colon, chain = info.fn, info.outer, info.colon, info.chain
        name = _name(fn)
        qual: list[str] = []
        class_pieces: list[ContextPiece] = []
        in_test_class = False
        for anc in chain:  # innermost first
            if anc.type == "function_definition":
                qual.append("<locals>")
                qual.append(_name(anc))
            else:
                cname = _name(anc)
                qual.append(cname)
                in_test_class = in_test_class or cname.startswith("Test")
                piece = class_cache.get(anc.id, False)
                if piece is False:
                    a_outer = anc.parent if anc.parent is not None and anc.parent.type == "decorated_definition" else anc
                    a_colon = _header_colon(anc)
                    piece = None
                    if a_colon is not None:
                        piece = ContextPiece("class", text(a_outer.start_byte, a_colon.end_byte), span(a_outer, a_colon))
                    class_cache[anc.id] = piece
                if piece is not None:
                    class_pieces.append(piece)
        qualname = ".".join([*reversed(qual), name])
        is_test = path_is_test or name.startswith("test") or in_test_class
        if is_test and settings.exclude_tests:
            result.tests_excluded += 1
            continue

        # Docstring and body boundaries.
        block = fn.child_by_field_name("body")
        stmts = [c for c in block.named_children if c.type != "comment"] if block is not None else []
        doc = stmts[0] if stmts and _is_docstring(stmts[0]) else None
        sig_end = doc if doc is not None else colon
        after = sig_end.end_byte
        # Candidates for the body start: comments after the colon that tree-sitter hangs on
        # the function node itself, then the block's children.
        body_first = None
        for c in fn.children:
            if c.type == "comment" and c.start_byte >= after:
                body_first = c
                break
        if body_first is None and block is not None:
            for c in block.named_children:
                if c.start_byte >= after:
                    body_first = c
                    break
        rest = [s for s in stmts if s.start_byte >= after]
        if rest and body_first is not None:
            last = _last_code_node(rest[-1])
            body_span = span(body_first, last)
            body_text = text(body_first.start_byte, last.end_byte)
            first_line_start = parsed.rfind(b"\n", 0, body_first.start_byte) + 1
            indent_bytes = parsed[first_line_start : body_first.start_byte]
            first_indent = len(indent_bytes.expandtabs(8)) if not indent_bytes.strip() else 0
            norm = normalise_body(without_comments(body_first.start_byte, last.end_byte), first_indent)
        else:
            body_span = span(sig_end, sig_end, use_end_of_start=True)
            body_text = ""
            norm = normalise_body("")
        sig_span = span(outer, sig_end)

        # Siblings: the nearest functions of the same scope, compact signature only.
        group, pos, m = by_scope[info.scope_id], info.index, settings.max_siblings
        window = group[max(0, pos - m) : pos] + group[pos + 1 : pos + 1 + m]
        near = sorted(window, key=lambda g: (abs(g.index - pos), g.index))[:m]
        context = sorted([*imports, *class_pieces, *(g.piece for g in near)], key=_piece_order)

        start = ob(outer.start_byte)
        result.records.append(
            FunctionRecord(
                id=record_id(repo, commit, path, start),
                repo=repo,
                url=url,
                commit=commit,
                path=path,
                qualname=qualname,
                split=split,
                is_test=is_test,
                is_async=fn.children[0].type == "async",
                signature=text(outer.start_byte, sig_end.end_byte),
                body=body_text,
                signature_span=sig_span,
                body_span=body_span,
                context=tuple(context),
                body_hash=hash_normalised(norm),
                def_line=fn.start_point.row + 1,
            )
        )
    return result


@dataclass(slots=True, eq=False)
class _FnInfo:
    fn: tree_sitter.Node
    outer: tree_sitter.Node
    colon: tree_sitter.Node
    chain: list[tree_sitter.Node]  # enclosing defs and classes, innermost first
    scope_id: int = 0
    index: int = 0  # position among the functions of its scope, in file order
    piece: ContextPiece | None = None  # its compact signature, as a sibling's context piece


def _piece_order(p: ContextPiece) -> tuple[int, str]:
    return (p.span.start, p.kind)


def _scope_of(node: tree_sitter.Node) -> tuple[tree_sitter.Node, list[tree_sitter.Node], bool]:
    """(nearest enclosing def/class/module, all enclosing defs and classes, inside an ERROR?)."""
    chain: list[tree_sitter.Node] = []
    broken = False
    n = node.parent
    scope = None
    while n is not None:
        t = n.type
        if t in ("function_definition", "class_definition"):
            chain.append(n)
            if scope is None:
                scope = n
        elif t == "ERROR":
            broken = True
        elif t == "module" and scope is None:
            scope = n
        n = n.parent
    return (scope if scope is not None else node), chain, broken


def _name(node: tree_sitter.Node) -> str:
    n = node.child_by_field_name("name")
    return n.text.decode("utf-8") if n is not None and n.text is not None else "?"


def _last_code_node(node: tree_sitter.Node) -> tree_sitter.Node:
    """The last token of ``node`` that is code, not a comment.

    tree-sitter hangs a comment that follows the last statement of a nested block inside
    the enclosing compound statement; CPython's end position, and the body span, stop at
    the code.
    """
    while node.child_count:
        for child in reversed(node.children):
            if child.type != "comment":
                node = child
                break
        else:
            return node
    return node


def _header_colon(node: tree_sitter.Node) -> tree_sitter.Node | None:
    """The ``:`` that ends a def or class header (the last one before the body)."""
    colon = None
    for c in node.children:
        if c.type == ":":
            colon = c
        elif c.type == "block":
            break
    return colon


def _is_docstring(stmt: tree_sitter.Node) -> bool:
    """A plain (not f-, not bytes) string literal statement, as CPython's docstring rule."""
    if stmt.type != "expression_statement" or stmt.named_child_count != 1:
        return False
    e = stmt.named_children[0]
    while e.type == "parenthesized_expression" and e.named_child_count == 1:
        e = e.named_children[0]
    parts = [e] if e.type == "string" else e.named_children if e.type == "concatenated_string" else None
    if not parts:
        return False
    for p in parts:
        if p.type != "string":
            return False
        start = p.children[0] if p.child_count else None
        prefix = (start.text or b"").lower() if start is not None and start.type == "string_start" else b""
        if b"f" in prefix or b"b" in prefix or b"t" in prefix:
            return False
    return True

