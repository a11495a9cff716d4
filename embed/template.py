"""The text the teacher reads for a record, tokenized segment by segment.

Template version 1 (recorded in every store as ``template_version``)::

    [sink]  context piece 1 "\\n" ... context piece k "\\n" "\\n"  signature "\\n"  body  [end]

- ``[sink]``: the tokenizer's own leading special tokens ([CLS] for BERT, BOS for Llama-style
  tokenizers). A causal tokenizer that adds none (Qwen2) gets its end-of-text token, the
  document boundary it saw in pre-training, so that the attention sink is a designated
  token rather than the first context token. Sink tokens are stored and marked ``special``.
- context: the record's :class:`~codejepa.corpus.records.ContextPiece` texts (imports,
  enclosing class headers, sibling signatures) in file order, one per line, then a blank line.
- signature: decorators, ``def`` header and docstring, ending in a newline.
- body: the statements after the docstring. The corpus cuts signature and body at their
  first character, which drops those lines' indentation; the function is shown as if
  defined at module level (``def`` at column 0, docstring and body dedented to four
  spaces, the body's first line re-indented) so that the teacher reads ordinary code.
- ``[end]``: the tokenizer's trailing special tokens ([SEP]) — bidirectional teachers only.

Every piece is tokenized on its own and the ids are joined: no token straddles a segment
boundary, so no BPE merge carries body characters into a signature token, and the
signature's tokens do not depend on what follows. The segment spans are therefore exact
by construction (no offset matching is needed).

Truncation to the teacher's window (``max_tokens``, counting special tokens) drops whole
context pieces first, farthest from the signature first, then cuts the body's tail; the
signature is never cut. Which context survives is decided without looking at the body:
context + signature must fit in the window minus a fixed body reserve (half the window);
the body then gets the rest. (Dropping context only when the whole text overflows would
make the inputs reveal the body's length — a leak.) A record whose signature leaves no
room for a single body token is skipped and counted.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from codejepa.corpus.records import FunctionRecord

TEMPLATE_VERSION = "1"
CONTEXT_SEPARATOR = "\n"


@dataclass(frozen=True)
class Rendered:
    """A record as template text pieces, before tokenization."""

    context: tuple[str, ...]  # one text per context piece, file order, each ending in "\n"
    context_distance: tuple[int, ...]  # bytes between a piece and the signature (drop order)
    signature: str
    body: str


_INDENT = re.compile(r"[ \t]*")


def _indent(line: str) -> str:
    return _INDENT.match(line).group()  # type: ignore[union-attr]


def _body_indent(body: str, signature: str) -> str:
    """The indentation the body's statements had in the file: from the body's own later
    lines, else the ``def`` line's (when decorators precede it) plus four, else the
    docstring's, else four spaces."""
    later = [ln for ln in body.split("\n")[1:] if ln.strip()]
    if later:
        # Lines inside multi-line strings can sit anywhere: the block's indentation is the
        # one candidate with which the body parses as a block.
        candidates = sorted({_indent(ln) for ln in later if _indent(ln)}, key=len)
        for cand in candidates:
            try:
                ast.parse("if 1:\n" + cand + body)
                return cand
            except (SyntaxError, ValueError):
                continue
        if candidates:
            return candidates[0]
    lines = signature.split("\n")
    at = next((k for k, ln in enumerate(lines) if ln.lstrip().startswith(("def ", "async def "))), 0)
    if at > 0:
        return _indent(lines[at]) + "    "
    doc = [ln for ln in lines[at + 1 :] if ln.strip()]
    if doc:
        found = min((_indent(ln) for ln in doc), key=len)
        if found:
            return found
    return "    "


def _dedent(text: str, n: int) -> str:
    """Remove up to ``n`` leading spaces from every line but the first."""
    if n <= 0:
        return text
    lines = text.split("\n")
    return "\n".join([lines[0]] + [ln[min(n, len(ln) - len(ln.lstrip(" "))):] for ln in lines[1:]])


def render(rec: FunctionRecord) -> Rendered:
    """Template v1 text pieces of a record (pure).

    The corpus cuts the signature at its first character and the body at its first
    statement, so their first lines have lost their indentation. The function is shown as
    if defined at module level: ``def`` at column 0, the rest dedented by the same amount
    (body and docstring at four spaces), the body's first line re-indented.
    """
    sig_at = rec.signature_span.start
    context = tuple(p.text.rstrip("\n") + "\n" for p in rec.context)
    distance = tuple(abs(sig_at - p.span.start) for p in rec.context)
    indent = _body_indent(rec.body, rec.signature)
    spaces = indent.strip(" ") == ""
    shift = len(indent) - 4 if spaces else 0
    signature = _dedent(rec.signature, shift)
    signature = signature if signature.endswith("\n") else signature + "\n"
    body = rec.body
    if body and not body[0].isspace():
        body = ("    " if spaces else indent) + body
    body = _dedent(body, shift)
    return Rendered(context, distance, signature, body)


@dataclass(frozen=True)
class Fit:
    """Which context pieces survive and how many body tokens are kept."""

    keep_context: tuple[bool, ...]
    body_tokens: int
    fits: bool  # False: the signature leaves no room for a body token; the record is skipped

    @property
    def dropped_context(self) -> int:
        return sum(not k for k in self.keep_context)


def fit_window(
    context_lengths: Sequence[int],
    context_distance: Sequence[int],
    separator_length: int,
    signature_length: int,
    body_length: int,
    budget: int,
    body_reserve: int,
) -> Fit:
    """Truncation rule (pure). ``budget`` is the window minus the special tokens.

    1. Context pieces are dropped, farthest from the signature first, until context +
       signature fit in ``budget - body_reserve``. This never looks at the body: which
       context the inputs keep must not tell how long the body is.
    2. The body gets the rest of the window and loses its tail if it is longer.
    The signature is never cut; when it leaves no room for a body token the record does
    not fit (it is skipped). The context separator counts while a piece is kept.
    """
    keep = [True] * len(context_lengths)

    def inputs() -> int:
        ctx = sum(n for n, k in zip(context_lengths, keep) if k)
        return ctx + (separator_length if any(keep) else 0) + signature_length

    # Farthest first; among equals the earlier piece goes first (it is further up the file).
    order = sorted(range(len(keep)), key=lambda i: (-context_distance[i], i))
    for i in order:
        if inputs() <= budget - body_reserve:
            break
        keep[i] = False
    room = budget - inputs()
    if room < 1 or body_length < 1:
        return Fit(tuple(keep), 0, False)
    return Fit(tuple(keep), min(body_length, room), True)


@dataclass
class Tokenized:
    """A record's token ids per segment, after truncation."""

    id: str
    split: str
    repo: str
    context: np.ndarray  # the kept pieces (+ separator), joined
    signature: np.ndarray
    body: np.ndarray
    truncated: bool
    dropped_context: int = 0
    body_cut: int = 0  # body tokens cut from the tail


@dataclass
class Skipped:
    id: str
    reason: str


def pad_token_id(tokenizer: Any) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else its end of text
    (Qwen2's tokenizers have no pad token of their own), else 0. Padded positions are
    masked out, so the choice never reaches a state."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


@dataclass(frozen=True)
class SegmentTokenizer:
    """Tokenizes records per template v1 with a teacher's fast tokenizer."""

    tokenizer: Any
    kind: str  # "causal" | "bidirectional"
    max_tokens: int
    prefix: tuple[int, ...] = field(init=False)
    suffix: tuple[int, ...] = field(init=False)
    backend: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from tokenizers import Tokenizer

        # A private copy without the padding/truncation a tokenizer.json may carry
        # (all-MiniLM-L6-v2's pads and cuts everything to 128): the template decides both.
        backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        object.__setattr__(self, "backend", backend)
        probe = "x"
        plain = backend.encode(probe, add_special_tokens=False).ids
        full = backend.encode(probe, add_special_tokens=True).ids
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
        prefix, suffix = ((), ()) if at is None else (tuple(full[:at]), tuple(full[at + len(plain):]))
        if self.kind == "causal":
            suffix = ()  # nothing after the body matters to a causal teacher; store none
            if not prefix:
                sink = self.tokenizer.bos_token_id
                if sink is None:
                    sink = self.tokenizer.eos_token_id
                prefix = () if sink is None else (int(sink),)
        object.__setattr__(self, "prefix", tuple(int(t) for t in prefix))
        object.__setattr__(self, "suffix", tuple(int(t) for t in suffix))
        if self.max_tokens < len(self.prefix) + len(self.suffix) + 2:
            raise ValueError(f"max_tokens {self.max_tokens} leaves no room for text")

    @property
    def body_reserve(self) -> int:
        """Tokens of the window that context + signature leave to the body, whatever the body."""
        return (self.max_tokens - len(self.prefix) - len(self.suffix)) // 2

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def fingerprint(self) -> str:
        """Hash of everything that decides the ids: the tokenizer itself and the specials."""
        h = hashlib.sha256(self.backend.to_str().encode())
        h.update(json.dumps({"prefix": self.prefix, "suffix": self.suffix, "template": TEMPLATE_VERSION}).encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        conv = self.tokenizer.convert_ids_to_tokens
        return {
            "template_version": TEMPLATE_VERSION,
            "prefix_tokens": conv(list(self.prefix)),
            "suffix_tokens": conv(list(self.suffix)),
            "max_tokens": self.max_tokens,
            "body_reserve": self.body_reserve,
        }

    def _ids(self, texts: list[str]) -> list[np.ndarray]:
        enc = self.backend.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in enc]

    def encode(self, records: Sequence[FunctionRecord]) -> list[Tokenized | Skipped]:
        rendered = [render(r) for r in records]
        texts: list[str] = [CONTEXT_SEPARATOR]
        for rd in rendered:
            texts.extend(rd.context)
            texts.append(rd.signature)
            texts.append(rd.body)
        ids = self._ids(texts)
        sep = ids[0]
        budget = self.max_tokens - len(self.prefix) - len(self.suffix)
        out: list[Tokenized | Skipped] = []
        k = 1
        for rec, rd in zip(records, rendered):
            ctx = ids[k : k + len(rd.context)]
            sig = ids[k + len(rd.context)]
            body = ids[k + len(rd.context) + 1]
            k += len(rd.context) + 2
            fit = fit_window([len(c) for c in ctx], rd.context_distance, len(sep), len(sig), len(body), budget,
                             self.body_reserve)
            if not fit.fits:
                reason = "empty body" if len(body) == 0 else "signature longer than the window"
                out.append(Skipped(rec.id, reason))
                continue
            kept = [c for c, keep in zip(ctx, fit.keep_context) if keep]
            context = np.concatenate(kept + [sep]) if kept else np.zeros(0, np.int32)
            cut = len(body) - fit.body_tokens
            out.append(Tokenized(
                rec.id, rec.split, rec.repo, context.astype(np.int32), sig, body[: fit.body_tokens],
                truncated=bool(fit.dropped_context or cut), dropped_context=fit.dropped_context, body_cut=cut,
            ))
        return out
