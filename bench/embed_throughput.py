"""Throughput of `codejepa embed run` against the bare model on the same tokens.

Prints, for one set of records and one teacher:

- real (non-pad) tokens/s of ``embed_corpus`` end to end (reading, tokenizing, batching,
  teacher, gathering states, HDF5 writes), model loading excluded;
- real tokens/s of a bare ``model(**batch)`` loop over exactly the same padded batches
  (the ceiling), and the ratio end-to-end / bare (target >= 0.85);
- padding fraction of the bucketed plan, store MB/s;
- real tokens/s of a naive loop: fixed batch size, corpus order, padded to the longest,
  and the speed-up of the bucketed run over it (target >= 3x);
- with ``--compare-dtypes`` (CPU): bare-loop tokens/s in float32 and bfloat16 autocast and
  the per-token cosine between them — the measurement behind ``--dtype auto``.

Records come from a corpus directory (``--corpus``) or, without one, from functions of the
standard library parsed with ``ast`` (a stand-in corpus for this bench only).

    python bench/embed_throughput.py                                  # CPU, MiniLM
    python bench/embed_throughput.py --corpus CORPUS --teacher Qwen/Qwen2.5-Coder-3B --device cuda
    python bench/embed_throughput.py --random-qwen-3b-config --device cuda   # no weights needed
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def stdlib_corpus(folder: Path, max_records: int) -> Path:
    """A corpus directory of stdlib functions: signature (decorators, header, docstring),
    body, and the module's imports plus the enclosing class header as context."""
    from codejepa.corpus.records import ContextPiece, FunctionRecord, Span, write_records

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    records: dict[str, list[FunctionRecord]] = {}
    n = 0
    for path in files:
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = src.splitlines(keepends=True)
        starts = np.cumsum([0] + [len(ln) for ln in lines]).tolist()

        def off(line: int, col: int) -> int:
            return int(starts[line - 1]) + col

        imports = [n_ for n_ in tree.body if isinstance(n_, (ast.Import, ast.ImportFrom))][:12]
        ctx_imports = tuple(
            ContextPiece("import", ast.get_source_segment(src, i) or "", Span(off(i.lineno, i.col_offset), off(i.end_lineno or i.lineno, i.end_col_offset or 0), i.lineno, i.end_lineno or i.lineno))
            for i in imports
        )
        split = ["train", "val", "test"][int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 10 % 3]
        repo = path.relative_to(root).parts[0].removesuffix(".py")
        parents: dict[ast.AST, ast.ClassDef] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for child in node.body:
                    parents[child] = node
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
                continue
            first = node.body[0]
            has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) and isinstance(first.value.value, str)
            rest = node.body[1:] if has_doc else node.body
            if not rest:
                continue
            start_line = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            sig_start = off(start_line, node.decorator_list[0].col_offset if node.decorator_list else node.col_offset)
            sig_end = off(first.end_lineno or first.lineno, first.end_col_offset or 0) if has_doc else off(rest[0].lineno, 0) - 1
            body_start = off(rest[0].lineno, rest[0].col_offset)
            body_end = off(node.end_lineno or node.lineno, node.end_col_offset or 0)
            signature, body = src[sig_start:sig_end], src[body_start:body_end]
            ctx = ctx_imports
            if node in parents:
                c = parents[node]
                header = lines[c.lineno - 1].rstrip("\n")
                ctx = ctx + (ContextPiece("class", header, Span(off(c.lineno, 0), off(c.lineno, len(header)), c.lineno, c.lineno)),)
            rid = hashlib.sha256(f"{path}:{sig_start}".encode()).hexdigest()[:16]
            records.setdefault(repo, []).append(FunctionRecord(
                id=rid, repo=repo, url="stdlib", commit="stdlib", path=str(path.relative_to(root)), qualname=node.name,
                split=split, is_test=False, is_async=isinstance(node, ast.AsyncFunctionDef), signature=signature, body=body,
                signature_span=Span(sig_start, sig_end, start_line, first.end_lineno or node.lineno),
                body_span=Span(body_start, body_end, rest[0].lineno, node.end_lineno or node.lineno), context=ctx,
            ))
            n += 1
            if n >= max_records:
                break
        if n >= max_records:
            break
    import json

    entries = []
    for repo, recs in records.items():
        rel = f"repos/{repo}.jsonl"
        write_records(folder / rel, recs)
        entries.append({"name": repo, "split": recs[0].split, "status": "ok", "records_file": rel})
    (folder / "manifest.json").write_text(json.dumps({"format": "codejepa-corpus", "format_version": 1, "repos": entries, "dropped": {}}))
    return folder


QWEN25_CODER_3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
    num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
    rms_norm_eps=1e-6, tie_word_embeddings=True,
)


def random_qwen_3b(folder: Path, corpus: Path, device: str, **overrides: Any) -> Path:
    """Qwen2.5-Coder-3B's exact architecture with random weights, saved like a real
    checkpoint (bf16), with a byte-level BPE tokenizer trained here on the corpus."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from codejepa.corpus.records import load_records

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(32000, overrides.get("vocab_size", 32000)), special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator((r.signature + "\n" + r.body for r in load_records(corpus)), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    cfg = Qwen2Config(**{**QWEN25_CODER_3B, **overrides}, architectures=["Qwen2ForCausalLM"],
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device if device.startswith("cuda") else "cpu"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, help="a corpus directory (default: stdlib functions)")
    ap.add_argument("--max-records", type=int, default=300, help="records for the stdlib stand-in corpus")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--random-qwen-3b-config", action="store_true", help="a random Qwen2.5-Coder-3B-shaped teacher")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--naive-batch", type=int, default=32)
    ap.add_argument("--naive-fraction", type=float, default=0.34, help="share of the naive loop's batches timed")
    ap.add_argument("--compare-dtypes", action="store_true", help="CPU: float32 vs bfloat16 autocast, bare loop")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the bare and end-to-end runs (best kept)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the corpus, store and teacher here (default: a temporary folder, removed at the end)")
    args = ap.parse_args(argv)
    if args.workdir is None:  # a throwaway folder, removed afterwards: it may hold a checkpoint of gigabytes
        with tempfile.TemporaryDirectory(prefix="codejepa-bench-") as tmp:
            return _bench(args, Path(tmp))
    return _bench(args, args.workdir)


def _bench(args: argparse.Namespace, work: Path) -> None:
    import torch

    from codejepa.embed.run import (
        DEFAULT_BATCH_TOKENS,
        DEFAULT_MAX_TOKENS,
        EmbedSettings,
        build_sequences,
        embed_corpus,
        iter_windows,
        pad_batch,
        plan_batches,
        select_records,
    )
    from codejepa.embed.teacher import Teacher, resolve_teacher
    from codejepa.embed.template import SegmentTokenizer

    work.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus or stdlib_corpus(work / "corpus", args.max_records)
    teacher_name = args.teacher
    if args.random_qwen_3b_config:
        t0 = time.perf_counter()
        teacher_name = str(random_qwen_3b(work / "qwen3b-random", corpus, args.device))
        print(f"random Qwen2.5-Coder-3B-shaped checkpoint written in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    teacher = Teacher(resolve_teacher(teacher_name), layer=args.layer, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    on_cuda = teacher.device.startswith("cuda")
    max_tokens = args.max_tokens or min(teacher.max_positions or DEFAULT_MAX_TOKENS, DEFAULT_MAX_TOKENS)
    batch_tokens = args.batch_tokens or DEFAULT_BATCH_TOKENS["cuda" if on_cuda else "cpu"]
    settings = EmbedSettings(max_tokens=max_tokens, batch_tokens=batch_tokens)
    seg = SegmentTokenizer(teacher.tokenizer, teacher.kind, max_tokens)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    # the plan embed_corpus makes, rebuilt here for the bare loop
    planned: list[tuple[Any, Any]] = []
    corpus_order: list[np.ndarray] = []
    real = padded = 0
    for window, _ in iter_windows(select_records(corpus, None, (0, 1)), seg, settings.window_tokens):
        seqs = build_sequences(window, seg, teacher.kind, settings.target_mode)
        corpus_order.extend(s.ids for s in sorted(seqs, key=lambda s: s.rec))
        for b in plan_batches([len(s.ids) for s in seqs], [s.phase for s in seqs], batch_tokens,
                              settings.max_batch_seqs, settings.max_padding):
            ids, mask = pad_batch([seqs[i] for i in b], seg.pad_id)
            real += int(mask.sum())
            padded += mask.size
            planned.append((torch.from_numpy(ids).to(teacher.device), torch.from_numpy(mask).to(teacher.device)))
    n_records = sum(1 for _ in select_records(corpus, None, (0, 1)))
    print(f"teacher {teacher.name} ({teacher.kind}, layer {teacher.layer}/{teacher.num_hidden_layers}, "
          f"{teacher.device}, compute {teacher.compute_dtype}); loaded in {load_s:.1f}s; torch threads {torch.get_num_threads()}")
    print(f"{n_records} records, {real:,} real tokens in {len(planned)} bucketed batches; "
          f"max_tokens {max_tokens}, batch_tokens {batch_tokens}")

    def bare(t: Teacher, batches: list[tuple[Any, Any]]) -> float:
        sync()
        t0 = time.perf_counter()
        for ids, mask in batches:
            t.forward(ids, mask)
        sync()
        return time.perf_counter() - t0

    bare(teacher, planned[: max(1, len(planned) // 10)])  # warm-up
    # interleaved repeats, best of each: on a shared machine the noise is one-sided
    bare_s = float("inf")
    res = None
    for _ in range(args.repeats):
        bare_s = min(bare_s, bare(teacher, planned))
        store = work / "bench.h5"
        store.unlink(missing_ok=True)
        r = embed_corpus(corpus, store, settings, teacher=teacher)
        assert r.model_tokens == real, (r.model_tokens, real)
        if res is None or r.seconds < res.seconds:
            res = r
    assert res is not None
    e2e = real / res.seconds
    bare_tps = real / bare_s

    # naive: corpus order, fixed batch size, padded to the longest of each batch
    naive_batches = [corpus_order[i : i + args.naive_batch] for i in range(0, len(corpus_order), args.naive_batch)]
    # an evenly spaced sample of the naive batches, so that it sees the corpus's length mix
    k = max(1, int(len(naive_batches) * args.naive_fraction))
    sample_idx = np.unique(np.linspace(0, len(naive_batches) - 1, k).round().astype(int))
    k = len(sample_idx)
    n_real = n_pad = 0
    timed: list[tuple[Any, Any]] = []
    for group in (naive_batches[i] for i in sample_idx):
        T = max(len(x) for x in group)
        ids = np.full((len(group), T), seg.pad_id, dtype=np.int64)
        mask = np.zeros((len(group), T), dtype=np.int64)
        for j, x in enumerate(group):
            ids[j, : len(x)] = x
            mask[j, : len(x)] = 1
        n_real += int(mask.sum())
        n_pad += mask.size
        timed.append((torch.from_numpy(ids).to(teacher.device), torch.from_numpy(mask).to(teacher.device)))
    naive_tps = n_real / bare(teacher, timed)

    mb = res.bytes_written / 1e6
    print()
    print(f"{'embed run, end to end':38s} {e2e:12,.0f} real tok/s  ({res.seconds:.1f}s)")
    print(f"{'bare model(**batch), same batches':38s} {bare_tps:12,.0f} real tok/s  ({bare_s:.1f}s)")
    print(f"{'ratio end-to-end / bare':38s} {e2e / bare_tps:12.3f}   (target >= 0.85)")
    print(f"{'  of the end-to-end run: in the teacher':38s} {res.model_seconds / res.seconds:12.1%}  "
          f"({res.model_seconds:.1f}s; bare loop {bare_s:.1f}s)")
    print(f"{'padding fraction, bucketed':38s} {res.padding_fraction:12.3%}")
    print(f"{'padding fraction, naive (timed sample)':38s} {1 - n_real / n_pad:12.3%}")
    print(f"{f'naive loop (batch {args.naive_batch}, corpus order)':38s} {naive_tps:12,.0f} real tok/s  "
          f"({k}/{len(naive_batches)} batches timed)")
    print(f"{'speed-up bucketed end to end / naive':38s} {e2e / naive_tps:12.2f}x  (target >= 3x)")
    print(f"{'store written':38s} {mb:12.1f} MB; {mb / max(res.writer_busy_s, 1e-9):,.0f} MB/s while writing, "
          f"{mb / res.seconds:,.1f} MB/s over the run; writer busy {res.writer_busy_s / res.seconds:.1%} of the run")

    if args.compare_dtypes and not on_cuda:
        sample = planned[: max(2, len(planned) // 3)]
        other = "float32" if teacher.compute_dtype != "float32" else "bfloat16"
        t2 = Teacher(resolve_teacher(teacher_name), layer=teacher.layer, device="cpu", dtype=other)
        speeds = {}
        for t in (teacher, t2):
            bare(t, sample[:1])
            speeds[t.compute_dtype] = sum(int(m.sum()) for _, m in sample) / bare(t, sample)
        cos = []
        for ids, mask in sample[:4]:
            a, b = teacher.forward(ids, mask).float(), t2.forward(ids, mask).float()
            c = torch.nn.functional.cosine_similarity(a, b, dim=-1)[mask.bool()]
            cos.append(c)
        cos_all = torch.cat(cos)
        print(f"{'bare loop float32':38s} {speeds['float32']:12,.0f} real tok/s")
        print(f"{'bare loop bfloat16 autocast':38s} {speeds['bfloat16']:12,.0f} real tok/s  "
              f"({speeds['bfloat16'] / speeds['float32']:.2f}x)")
        print(f"{'per-token cosine bf16 vs fp32':38s} mean {cos_all.mean():.6f}, min {cos_all.min():.6f}")
    if args.workdir is not None:
        print(f"\nworkdir: {work}")


if __name__ == "__main__":
    from codejepa.core import CodejepaError

    try:
        sys.exit(main())
    except CodejepaError as e:  # a missing corpus, a teacher that cannot be loaded: one line
        sys.exit(f"embed_throughput: {e}")
