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

EXTRACTOR_VERSION = 2  # bump when records for the same bytes would change

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


_CODING_LINE = re.compile(rb"^[ \t\f]*#.*?coding[:=]")  # PEP 263's pattern


def detect_encoding(data: bytes) -> str:
    """The file's source encoding as CPython decides it (BOM, PEP 263 line, else UTF-8).

    Raises :class:`FileSkip` for binary data, a bad coding line, or bytes that do not decode.
    """
    if b"\x00" in data:
        raise FileSkip("binary file (contains NUL bytes)")
    try:
        enc, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as e:
        # tokenize says "invalid or missing encoding declaration" for a first line that is not
        # UTF-8 even without any declaration: then the file's bytes are what is wrong.
        if not any(_CODING_LINE.match(line) for line in data.splitlines()[:2]):
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as u:
                raise FileSkip(f"does not decode as its default encoding utf-8 (byte {u.start})") from None
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
    if enc in ("utf-8", "utf-8-sig"):
        parsed, to_orig, slice_enc = data, None, "utf-8"
    else:
        parsed, to_orig, slice_enc = data.decode(enc).encode("utf-8"), _OffsetMap(data, enc), enc

    parser, query = _tools()
    tree = parser.parse(parsed)  # held while its nodes are in use
    root = tree.root_node
    result.has_syntax_error = root.has_error
    caps = tree_sitter.QueryCursor(query).captures(root)
    src = _FileText(data, parsed, slice_enc, to_orig,
                    sorted((c.start_byte, c.end_byte) for c in caps.get("comment", [])))

    # Module-scope imports: shared by every function of the file.
    imports = [ContextPiece("import", src.text(imp.start_byte, imp.end_byte), src.span(imp, imp))
               for imp in sorted(caps.get("import", []), key=lambda n: n.start_byte)
               if _scope_of(imp)[0].type == "module" and not imp.has_error]
    infos, by_scope = _clean_functions(sorted(caps.get("fn", []), key=lambda n: n.start_byte), src, result)
    path_is_test = is_test_path(path)
    class_cache: dict[int, ContextPiece | None] = {}
    for info in infos:
        name = _name(info.fn)
        scopes, class_pieces, in_test_class = _enclosing(info.chain, src, class_cache)
        is_test = path_is_test or name.startswith("test") or in_test_class
        if is_test and settings.exclude_tests:
            result.tests_excluded += 1
            continue
        sig_end, body_span, body_text, norm = _body(info, src)
        # Siblings: the nearest functions of the same scope, compact signature only.
        group, pos, m = by_scope[info.scope_id], info.index, settings.max_siblings
        window = group[max(0, pos - m) : pos] + group[pos + 1 : pos + 1 + m]
        near = sorted(window, key=lambda g: (abs(g.index - pos), g.index))[:m]
        context = sorted([*imports, *class_pieces, *(g.piece for g in near if g.piece is not None)], key=_piece_order)
        outer = info.outer
        result.records.append(
            FunctionRecord(
                id=record_id(repo, commit, path, src.ob(outer.start_byte)),
                repo=repo,
                url=url,
                commit=commit,
                path=path,
                qualname=".".join([*scopes, name]),
                split=split,
                is_test=is_test,
                is_async=info.fn.children[0].type == "async",
                signature=src.text(outer.start_byte, sig_end.end_byte),
                body=body_text,
                signature_span=src.span(outer, sig_end),
                body_span=body_span,
                context=tuple(context),
                body_hash=hash_normalised(norm),
                def_line=info.fn.start_point.row + 1,
            )
        )
    return result


@dataclass(frozen=True, slots=True)
class _FileText:
    """One file as parsed (UTF-8 bytes) and as stored: text and spans come from the stored bytes."""

    data: bytes  # as stored at the commit
    parsed: bytes  # what tree-sitter read: ``data`` re-encoded as UTF-8 when it was not
    encoding: str  # of ``data``
    to_orig: _OffsetMap | None  # parsed offset → stored offset (None: the same)
    comments: list[tuple[int, int]]  # the comment nodes' parsed byte ranges, in order

    def ob(self, off: int) -> int:
        return off if self.to_orig is None else self.to_orig(off)

    def text(self, start: int, end: int) -> str:
        return self.data[self.ob(start) : self.ob(end)].decode(self.encoding)

    def span(self, start_node: tree_sitter.Node, end_node: tree_sitter.Node, *, use_end_of_start: bool = False) -> Span:
        s_byte = start_node.end_byte if use_end_of_start else start_node.start_byte
        s_row = (start_node.end_point if use_end_of_start else start_node.start_point).row
        e_byte, e_row = end_node.end_byte, end_node.end_point.row
        if e_byte <= s_byte:  # empty span
            return Span(self.ob(s_byte), self.ob(s_byte), s_row + 1, s_row + 1)
        return Span(self.ob(s_byte), self.ob(e_byte), s_row + 1, e_row + 1)

    def without_comments(self, start: int, end: int) -> str:
        i = bisect.bisect_left(self.comments, (start, -1))
        parts, pos = [], start
        while i < len(self.comments) and self.comments[i][0] < end:
            cs, ce = self.comments[i]
            parts.append(self.text(pos, cs))
            pos = min(ce, end)
            i += 1
        parts.append(self.text(pos, end))
        return "".join(parts)

    def indent_of(self, node: tree_sitter.Node) -> int:
        """The width of the whitespace before ``node`` on its line (0 when code precedes it)."""
        line_start = self.parsed.rfind(b"\n", 0, node.start_byte) + 1
        before = self.parsed[line_start : node.start_byte]
        return len(before.expandtabs(8)) if not before.strip() else 0


@dataclass(slots=True, eq=False)
class _FnInfo:
    fn: tree_sitter.Node
    outer: tree_sitter.Node  # the decorated_definition around ``fn``, or ``fn``
    colon: tree_sitter.Node
    chain: list[tree_sitter.Node]  # enclosing defs and classes, innermost first
    scope_id: int = 0
    index: int = 0  # position among the functions of its scope, in file order
    piece: ContextPiece | None = None  # its compact signature, as a sibling's context piece


def _clean_functions(fns: list[tree_sitter.Node], src: _FileText,
                     result: FileResult) -> tuple[list[_FnInfo], dict[int, list[_FnInfo]]]:
    """The functions without syntax errors (the others are counted in ``result``), and each
    scope's functions in file order: the candidates for each other's sibling context."""
    infos: list[_FnInfo] = []
    by_scope: dict[int, list[_FnInfo]] = {}
    for fn in fns:
        outer = fn.parent if fn.parent is not None and fn.parent.type == "decorated_definition" else fn
        scope, chain, broken = _scope_of(outer)
        colon = None if broken or outer.has_error else _header_colon(fn)
        if colon is None:
            result.functions_with_errors += 1
            continue
        info = _FnInfo(fn, outer, colon, chain)
        info.piece = ContextPiece("sibling", src.text(outer.start_byte, colon.end_byte), src.span(outer, colon))
        infos.append(info)
        group = by_scope.setdefault(scope.id, [])
        info.scope_id, info.index = scope.id, len(group)
        group.append(info)
    return infos, by_scope


def _enclosing(chain: list[tree_sitter.Node], src: _FileText,
               class_cache: dict[int, ContextPiece | None]) -> tuple[list[str], list[ContextPiece], bool]:
    """The qualname's enclosing parts (outermost first), the enclosing class headers as
    context pieces, and whether a class named ``Test…`` encloses the function."""
    qual: list[str] = []
    class_pieces: list[ContextPiece] = []
    in_test_class = False
    for anc in chain:  # innermost first
        if anc.type == "function_definition":
            qual += ["<locals>", _name(anc)]
            continue
        cname = _name(anc)
        qual.append(cname)
        in_test_class = in_test_class or cname.startswith("Test")
        if anc.id not in class_cache:
            a_outer = anc.parent if anc.parent is not None and anc.parent.type == "decorated_definition" else anc
            a_colon = _header_colon(anc)
            class_cache[anc.id] = (None if a_colon is None else
                                   ContextPiece("class", src.text(a_outer.start_byte, a_colon.end_byte),
                                                src.span(a_outer, a_colon)))
        if (piece := class_cache[anc.id]) is not None:
            class_pieces.append(piece)
    return qual[::-1], class_pieces, in_test_class


def _body(info: _FnInfo, src: _FileText) -> tuple[tree_sitter.Node, Span, str, str]:
    """Where the signature ends (the docstring, or the header's colon), the body's span and
    text, and its normalised form for the hash."""
    fn, colon = info.fn, info.colon
    block = fn.child_by_field_name("body")
    stmts = [c for c in block.named_children if c.type != "comment"] if block is not None else []
    sig_end = stmts[0] if stmts and _is_docstring(stmts[0]) else colon
    after = sig_end.end_byte
    # Candidates for the body start: comments after the colon that tree-sitter hangs on the
    # function node itself, then the block's children.
    body_first = next((c for c in fn.children if c.type == "comment" and c.start_byte >= after), None)
    if body_first is None and block is not None:
        body_first = next((c for c in block.named_children if c.start_byte >= after), None)
    rest = [s for s in stmts if s.start_byte >= after]
    if not rest or body_first is None:
        return sig_end, src.span(sig_end, sig_end, use_end_of_start=True), "", normalise_body("")
    last = _last_code_node(rest[-1])
    norm = normalise_body(src.without_comments(body_first.start_byte, last.end_byte), src.indent_of(body_first))
    return sig_end, src.span(body_first, last), src.text(body_first.start_byte, last.end_byte), norm


def _piece_order(p: ContextPiece) -> tuple[int, str]:
    return (p.span.start, p.kind)


def _scope_of(node: tree_sitter.Node) -> tuple[tree_sitter.Node, list[tree_sitter.Node], bool]:
    """(nearest enclosing def/class/module, all enclosing defs and classes, inside an ERROR or
    under a def/class header with one?)."""
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
            # A broken enclosing header (``class K(:``) would name the function and stand in its context.
            broken = broken or any(c.has_error for c in n.children if c.type != "block")
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

