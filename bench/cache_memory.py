"""Peak memory of building the predictor's RAM feature cache, against the size it holds.

    python bench/cache_memory.py STORE.h5 [--records 10000] [--max-input-tokens 96]

``data.cache_gb`` compares the cache's *estimated* size with the budget; this prints the
estimate, what the built cache holds and how much the process's peak resident memory rose
while building it (a transformer cache: input tokens in float16, body slots, pooled views).
Run it alone: the peak is the whole process's.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from codejepa.core import CodejepaError, positive_int
from codejepa.embed.store import open_store
from codejepa.predict.data import FeatureSpec, FeatureTable, estimate_cache_bytes


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--records", type=positive_int, default=10000, help="the first N train records")
    ap.add_argument("--max-input-tokens", type=positive_int, default=96)
    ap.add_argument("--body-slots", type=positive_int, default=8)
    a = ap.parse_args()
    with open_store(a.store) as st:
        idx = st.indices("train")[: a.records]
        spec = FeatureSpec("transformer", a.max_input_tokens, a.body_slots, float("inf"), float("inf"))
        before, t = peak_gb(), time.perf_counter()
        tab = FeatureTable(st, idx, spec)
        rise, took = peak_gb() - before, time.perf_counter() - t
        est = estimate_cache_bytes(st, idx, spec) / 1e9
    print(f"{len(idx)} train records of {a.store}, max {a.max_input_tokens} input tokens")
    print(f"estimate {est:.2f} GB   held {tab.nbytes / 1e9:.2f} GB   peak RSS rise {rise:.2f} GB "
          f"({rise / max(tab.nbytes / 1e9, 1e-9):.2f}× held)   {took:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except CodejepaError as e:
        sys.exit(f"cache_memory: {e}")
