"""Throughput of `codejepa embed probe` with a causal teacher: one pass per record for all
probes (the inputs read once, a 4D mask) against one pass per probe.

Prints records/s, teacher tokens and wall time of both ways over the same store, their
ratio, and the largest difference between the two views (they must agree to float rounding).
By default the teacher is a small random model of Qwen2.5-Coder-3B's architecture (the real
one's shape with ``--random-qwen-3b-config``, weights not needed), over a stand-in corpus of
standard-library functions (bench/embed_throughput.py's).

    python bench/probe_throughput.py                                   # CPU, small random Qwen2
    python bench/probe_throughput.py --random-qwen-3b-config --layer 18 --device cuda
    python bench/probe_throughput.py --teacher Qwen/Qwen2.5-Coder-3B --layer 18 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import random_qwen_3b, stdlib_corpus  # noqa: E402

SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-records", type=int, default=300)
    ap.add_argument("--teacher", default=None, help="a causal teacher (default: a small random Qwen2)")
    ap.add_argument("--random-qwen-3b-config", action="store_true", help="random weights, Qwen2.5-Coder-3B's shape")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-tokens", type=int, default=1024, help="the store's window (inputs get half)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the corpus, store and teacher here (default: a temporary folder, removed at the end)")
    args = ap.parse_args(argv)
    if args.workdir is None:  # a throwaway folder, removed afterwards: it may hold a checkpoint of gigabytes
        with tempfile.TemporaryDirectory(prefix="codejepa-bench-probe-") as tmp:
            return _bench(args, Path(tmp))
    return _bench(args, args.workdir)


def _bench(args: argparse.Namespace, work: Path) -> None:
    from codejepa.embed.probe import ProbeSettings, compute_probe_view, read_probe_view
    from codejepa.embed.run import EmbedSettings, embed_corpus
    from codejepa.embed.store import open_store
    from codejepa.embed.teacher import Teacher, resolve_teacher

    work.mkdir(parents=True, exist_ok=True)
    corpus = stdlib_corpus(work / "corpus", args.max_records)
    name = args.teacher
    if name is None:
        name = str(random_qwen_3b(work / "qwen-random", corpus, args.device,
                                  **({} if args.random_qwen_3b_config else SMALL)))
    teacher = Teacher(resolve_teacher(name), layer=args.layer, device=args.device, dtype=args.dtype)
    if teacher.kind != "causal":
        raise SystemExit(f"{teacher.name} is a {teacher.kind} teacher: only a causal one shares the inputs")
    store = work / "store.h5"
    embed_corpus(corpus, store, EmbedSettings(max_tokens=args.max_tokens), teacher=teacher)
    with open_store(store) as s:
        n, inputs = len(s), int(s.lengths("inputs").sum())
    # Probes of any length: the stand-in corpus's train split is small.
    base = ProbeSettings(n_probes=args.probes, min_tokens=20, max_tokens=200)
    print(f"teacher {teacher.name} (layer {teacher.layer}/{teacher.num_hidden_layers}, {teacher.device}, "
          f"{teacher.compute_dtype}, attention {teacher.model.config._attn_implementation}); {n} records, "
          f"{inputs / n:.0f} input tokens a record on average; {args.probes} probes")
    compute_probe_view(store, work / "warm.h5", base, teacher=teacher, max_chunks=1)  # warm-up
    results = {}
    for label, share in (("one pass per probe", False), ("inputs once (shared)", True)):
        out = work / f"{'shared' if share else 'naive'}.probe.h5"
        out.unlink(missing_ok=True)
        t0 = time.perf_counter()
        r = compute_probe_view(store, out, dataclasses.replace(base, share_prefix=share), teacher=teacher)
        dt = time.perf_counter() - t0
        results[share] = (r, dt)
        print(f"{label:22s} {n / dt:8.1f} records/s  {r.model_tokens:>10,} teacher tokens  {dt:7.1f} s")
    with open_store(store) as s:
        diff = float(np.abs(read_probe_view(work / "shared.probe.h5", s).view
                            - read_probe_view(work / "naive.probe.h5", s).view).max())
    (rn, tn), (rs, ts) = results[False], results[True]
    print(f"speed-up {tn / ts:.2f}x with {rs.model_tokens / rn.model_tokens:.0%} of the tokens; "
          f"largest difference between the views {diff:.2e}")


if __name__ == "__main__":
    from codejepa.core import CodejepaError

    try:
        main()
    except CodejepaError as e:
        sys.exit(f"probe_throughput: {e}")
