"""Training throughput of both predictors on a store, and the share of step time spent
waiting for data (target: under 10%).

    python bench/predict_train.py STORE.h5 [--models mlp,transformer] [--epochs 1] [--cache auto|stream]
    python bench/predict_train.py --synthetic 2000 [--dim 384]   # no real store yet: a synthetic one

It runs the real ``train()`` (one epoch by default) and times it from its step events:
samples/s over the steps after the first few, and the data-wait share measured by the
training loop itself (time blocked on the prefetch queue / time in the epoch loop), and the RAM
cache's size beside the process's peak resident memory (one model per call reads it alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from codejepa.core import CodejepaError, positive_int
from codejepa.embed.store import PendingRecord, StoreMeta, StoreWriter, open_store
from codejepa.predict.config import PRESETS, resolve_config
from codejepa.predict.train import train


def synthetic_store(path: Path, n: int, d: int, seed: int = 0) -> Path:
    """Random states with the shape of real records (context ~150, signature ~30, body ~100 tokens)."""
    rng = np.random.default_rng(seed)
    meta = StoreMeta(teacher="bench/synthetic", teacher_kind="bidirectional", hidden_size=d, layer=3,
                     num_hidden_layers=6, template_version="bench")
    with StoreWriter(path, meta) as w:
        batch = []
        for i in range(n):
            nc, ns, nb = int(rng.integers(20, 300)), int(rng.integers(8, 60)), int(rng.integers(10, 250))
            inp = rng.normal(size=(2 + nc + ns, d)).astype(np.float16)
            sp = np.zeros(len(inp), bool)
            sp[[0, -1]] = True
            split = "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test")
            batch.append(PendingRecord(f"r{i}", split, f"repo{i % 50}", False, inp, np.zeros(len(inp), np.int32), sp,
                                       (1, 1 + nc), (1 + nc, 1 + nc + ns), rng.normal(size=(nb, d)).astype(np.float16),
                                       np.zeros(nb, np.int32)))
            if len(batch) == 256:
                w.append(batch)
                batch = []
        w.append(batch)
    return path


def bench(store: Path, model: str, epochs: int, cache: str, device: str, overrides: dict) -> dict:
    times: list[float] = []
    events: dict = {}

    def on_event(e: dict) -> None:
        if e["event"] == "step":
            times.append(time.perf_counter())
            events["batch"] = e
        elif e["event"] == "cache" and "cache_t0" not in events:
            events["cache_t0"] = time.perf_counter()

    over = {"train.epochs": epochs, "train.plot_every_s": -1, **overrides}
    if cache == "stream":
        over["data.cache_gb"] = 0
    # a model kind (mlp, transformer) or a preset name (seed-mlp, transformer-small, ...)
    if model in PRESETS:
        cfg = resolve_config(PRESETS[model]["model.kind"], preset=model, overrides=over)
    else:
        cfg = resolve_config(model, overrides=over)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = train(store, cfg, Path(tmp) / "run", device=device, on_event=on_event)
        total = time.perf_counter() - t0
        log = (Path(tmp) / "run" / "log.jsonl").read_text()
    skip = min(3, max(0, len(times) - 2))
    steps = len(times) - 1 - skip
    # the batch trained with: train.batch_size, or all the train records when they are fewer
    B = next((json.loads(x)["batch_size"] for x in log.splitlines() if '"event": "start"' in x), cfg.train.batch_size)
    rate = steps * B / (times[-1] - times[skip]) if steps > 0 else float("nan")
    return {"model": model, "params": summary["parameters"], "batch": B, "steps": len(times),
            "samples_per_s": rate, "data_wait_share": summary["data_wait_share"],
            "cache_build_s": (times[0] - events["cache_t0"]) if times and "cache_t0" in events else float("nan"),
            "total_s": total, "cache": "StreamingTable" if "StreamingTable" in log else "FeatureTable",
            "cache_gb": json.loads(log.splitlines()[0]).get("cache_bytes", 0) / 1e9,
            # ru_maxrss is the process's peak so far (KiB on Linux): run one model per call to read it alone
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "best_val_mrr": summary["best_val_mrr"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", nargs="?", help="a store from `codejepa embed run`")
    ap.add_argument("--synthetic", type=int, default=0, help="build a synthetic store of N records instead")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--models", default="mlp,transformer", help="model kinds or preset names, comma-separated")
    ap.add_argument("--epochs", type=positive_int, default=1)
    ap.add_argument("--cache", choices=("auto", "stream"), default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = dict(s.split("=", 1) for s in a.set)
    with tempfile.TemporaryDirectory() as tmp:
        if a.synthetic:
            t = time.perf_counter()
            store = synthetic_store(Path(tmp) / "synthetic.h5", a.synthetic, a.dim)
            print(f"synthetic store: {a.synthetic} records, d={a.dim} ({time.perf_counter() - t:.1f}s to write) — "
                  "NOT a real corpus")
        elif a.store:
            store = Path(a.store)
        else:
            ap.error("give a STORE or --synthetic N")
        with open_store(store) as st:
            print(f"store {store}: {len(st)} records, teacher {st.meta.teacher} layer {st.meta.layer}, "
                  f"d={st.meta.hidden_size}, train {len(st.indices('train'))}")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch "
              f"{torch.__version__}, threads {torch.get_num_threads()}, device {a.device}")
        print(f"{'model':<12}{'params':>11}{'batch':>7}{'steps':>7}{'samples/s':>12}{'data wait':>11}"
              f"{'cache build':>13}{'total':>9}{'cache GB':>10}{'peak RSS':>10}  cache")
        for m in a.models.split(","):
            r = bench(store, m, a.epochs, a.cache, a.device, overrides)
            print(f"{r['model']:<12}{r['params']:>11,}{r['batch']:>7}{r['steps']:>7}{r['samples_per_s']:>12.1f}"
                  f"{100 * r['data_wait_share']:>10.1f}%{r['cache_build_s']:>12.1f}s{r['total_s']:>8.1f}s"
                  f"{r['cache_gb']:>10.2f}{r['peak_rss_gb']:>10.2f}  {r['cache']}")
            if r["samples_per_s"] != r["samples_per_s"]:  # nan
                print(f"  {r['model']}: {r['steps']} steps are too few to time (the first ones warm up): "
                      "give more --epochs")


if __name__ == "__main__":
    try:
        main()
    except CodejepaError as e:
        sys.exit(f"predict_train: {e}")
