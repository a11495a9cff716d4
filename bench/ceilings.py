"""What limits retrieval at a store's layer: oracle ceilings and ridge's learning curve.

    python bench/ceilings.py STORE.h5 [--split test] [--fractions 0.25,0.5,1] [--seeds 3] [--json OUT]

Prints the measurements of :mod:`codejepa.evaluate.ceilings` (see its docstring): ridge on the
signature mean and last token beside a token-identity oracle (the body's own token ids, each
replaced by its train-split mean state), an oracle copy view (the input tokens whose id
reappears in the body) with and without ridge, and ridge refitted on fractions of the train
repositories. Ranked among the query split's own bodies, whitened space, as in training's
validation; the oracles read the body and are ceilings, not methods.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from codejepa.core import CodejepaError
from codejepa.embed.store import open_store
from codejepa.evaluate.ceilings import ceilings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--fractions", default="0.25,0.5,1")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()):
        # checked now, not after minutes of computing
        sys.exit(f"ceilings: --json {args.json}: {'a folder' if args.json.is_dir() else 'its folder does not exist'}")
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
        with open_store(args.store) as store:
            res = ceilings(store, split=args.split, fractions=fractions, seeds=args.seeds)
    except (CodejepaError, ValueError) as e:
        sys.exit(f"ceilings: {e}")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["machine"] = f"{platform.machine()}, {platform.platform()}"
    line = lambda name, m: print(f"{name:44s} rank@1 {100 * m['rank1']:5.1f}%  MRR {m['mrr']:.3f}  recall@10 {100 * m['recall10']:5.1f}%")  # noqa: E731
    print(f"{args.store.name}: {res['queries']} {args.split} queries, {res['train_records']} train records, "
          f"{res['token_ids_seen_in_train_bodies']} token ids seen in train bodies")
    print(f"body tokens whose id occurs in the inputs (context + signature): {100 * res['body_tokens_whose_id_is_in_the_inputs']:.1f}%")
    line("ridge [signature mean, last token]", res["ridge"])
    line("oracle: token identity (bag of body ids)", res["oracle_token_identity"])
    line("oracle: copy view alone (ridge)", res["oracle_copy_view_alone"])
    line("oracle: ridge + copy view", res["ridge_plus_oracle_copy_view"])
    for p in res["learning_curve"]:
        print(f"ridge on {p['repos']:3d} train repos ({p['n_train']:8.0f} functions, {p['draws']} draws): "
              f"rank@1 {100 * p['rank1']:5.1f}% (sd {100 * p['rank1_sd']:.1f})  MRR {p['mrr']:.3f}")
    print(f"wall {res['wall_s']} s on {res['machine']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
