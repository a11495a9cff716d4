"""The python-40 benchmark: the whole pipeline on 40 real projects, stage by stage, timed.

    python bench/pipeline.py [--out ~/.cache/codejepa/bench40] [--layer N] [--targets in-context]
                             [--stages corpus,embed,train,evaluate,ceilings]  (+ probe, cross: opt-in)
                             [--models seed-mlp,ridge-residual,ridge-residual-files,transformer-residual,transformer-residual-files]
                             [--extra-train bench/extra-train.txt] [--folds 5]

Runs exactly the commands a user would (``codejepa corpus build``, ``embed run``, ``predict
train``, ``evaluate retrieval``) so that the figures it prints are what the README's commands
give. Every stage resumes: embedding the 40 projects takes hours on a CPU, so run this in the
background (``nohup python bench/pipeline.py &``) and again in a later session; a killed run
continues where it stopped. Held-out splits are embedded first, so a partial store can already
be evaluated against the baselines. Writes OUT/timings.json (wall seconds per stage, machine)
and the evaluation's table under OUT/eval-*/.

The ``probe`` stage (opt-in: ``--stages corpus,embed,probe,train,evaluate,ceilings``) runs
``codejepa embed probe`` after the embedding (four more teacher passes per record: about twice
the embedding's time) and gives the evaluations ``--probe``, so that every run and ridge+last
also get a ``NAME+probe`` row.

The ``cross`` stage (opt-in, like ``probe``) trains the cross-scorer (``codejepa predict cross``,
12 epochs: about an hour on one CPU thread) after the predictors, and gives the evaluations
``--rerank`` with ``--rerank-rows`` (``--rerank-rows``' default: every row with all the
corrections, and BM25 + sib), so that those rows also get a ``NAME+rerank`` row: the best rows
of the README's table. With ``--folds``, one scorer per fold (``predict cross --splits``).

``--extra-train LIST`` is the data-scaling variant: the projects of LIST (pinned like
python-40's) join the corpus in the train split only (``corpus build --train-only-file``), so
val and test stay python-40's repositories; its corpus, store, runs and evaluations are named
``…-plus``.

``--folds K`` is the cross-validation variant: after the corpus and the store (built once),
``codejepa corpus folds`` deals the repositories into K groups; each fold trains the models and
evaluates with ``--splits`` (test-split pool), and ``evaluate folds`` pools the K evaluations
into one table over every repository (OUT/folds/pooled-TAG/). The runs and evaluations go under
OUT/folds/kK/; the single-split train, evaluate and ceilings stages are not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_repos import add_shared_argument, require_shared_files

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], timings: dict[str, float], key: str) -> None:
    print(f"\n$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        result = subprocess.run(cmd)
    except OSError as e:  # a missing or non-executable program: one line, not a traceback
        sys.exit(f"pipeline: cannot run {cmd[0]}: {e.strerror}")
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
    if result.returncode != 0:
        sys.exit(f"pipeline: `{' '.join(cmd[:3])}` failed with exit code {result.returncode}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "codejepa" / "bench40")
    add_shared_argument(ap)
    ap.add_argument("--list", type=Path, default=None, help="pinned projects (default: SHARED/python-40.txt)")
    ap.add_argument("--layer", type=int, default=None, help="teacher layer (default: the middle block)")
    ap.add_argument("--targets", default="in-context", choices=["in-context", "body-only"])
    ap.add_argument("--stages", default="corpus,embed,train,evaluate,ceilings")
    ap.add_argument("--models", default="seed-mlp,ridge-residual,ridge-residual-files,transformer-residual,transformer-residual-files",
                    help="comma list of predict presets to train (model kind inferred from the name)")
    ap.add_argument("--set", action="append", default=[], help="extra --set for every predict train")
    ap.add_argument("--extra-train", type=Path, default=None,
                    help="pinned projects (name==version a line) added to the train split only")
    ap.add_argument("--folds", type=int, default=0, help="K-fold cross-validation over repositories (0: the corpus's split)")
    ap.add_argument("--rerank-rows", default="*+csls+bm25+sib,bm25+sib",
                    help="evaluate retrieval's --rerank-rows, with the cross stage")
    ap.add_argument("--fold-eval", default="--space canonical --baselines random,prototype,ridge,ridge+last,bm25,ridge+bm25,reverse "
                    "--no-plots", help="evaluate retrieval options of each fold (with --folds)")
    args = ap.parse_args()

    exe = shutil.which("codejepa") or str(Path(sys.executable).with_name("codejepa"))
    out: Path = args.out.expanduser()
    stages = set(args.stages.split(","))
    requested = sorted(stages)
    presets = [m for m in args.models.split(",") if m]
    check_request(stages, presets, args.folds)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"pipeline: --out {out}: {e.strerror or e}")
    tag = f"L{args.layer if args.layer is not None else 'mid'}-{args.targets}"
    if args.extra_train:
        tag = f"plus-{tag}"
    corpus = out / ("corpus-plus" if args.extra_train else "corpus")
    store = out / f"store-{tag}.h5"
    timings: dict[str, float] = {}

    if "corpus" in stages:
        make_repos, listing = args.shared / "make-repos", args.list or args.shared / "python-40.txt"
        require_shared_files("pipeline", make_repos, listing, *([args.extra_train] if args.extra_train else []))
        repos = out / "repos"
        run([str(make_repos), str(listing), str(repos)], timings, "make_repos_s")
        extra: list[str] = []
        if args.extra_train:
            run([str(make_repos), str(args.extra_train), str(out / "extra-repos")], timings, "make_repos_s")
            extra = ["--train-only-file", str(out / "extra-repos" / "repos.txt")]
        run([exe, "corpus", "build", "--repos-file", str(repos / "repos.txt"), *extra, "--out", str(corpus),
             "--workers", str(os.cpu_count() or 1)], timings, "corpus_build_s")

    if "embed" in stages:
        base = [exe, "embed", "run", str(corpus), "--out", str(store), "--targets", args.targets]
        if args.layer is not None:
            base += ["--layer", str(args.layer)]
        # Held-out first: a store interrupted later can already be evaluated.
        run(base + ["--split", "test,val"], timings, "embed_s")
        run(base + ["--split", "train,val,test"], timings, "embed_s")

    probe = store.with_name(store.stem + ".probe.h5")  # embed probe's default beside the store
    if "probe" in stages:
        run([exe, "embed", "probe", str(store)], timings, "probe_s")

    if args.folds:
        cross_validate(args, exe, out, corpus, store, tag, presets, stages, timings)
        stages -= {"train", "cross", "evaluate", "ceilings"}
    runs = []
    for preset in presets:
        run_dir = out / "runs" / f"{tag}-{preset}"
        runs.append(run_dir)
        if "train" in stages:
            run(train_cmd(exe, store, run_dir, preset, [a for s in args.set for a in ("--set", s)], []),
                timings, f"train_{preset}_s")

    cross = out / "runs" / f"{tag}-cross"
    if "cross" in stages:
        train_cross(exe, store, cross, [], timings)

    if "evaluate" in stages:
        for pool in ("split", "all"):
            cmd = [exe, "evaluate", "retrieval", str(store), "--pool", pool, "--out", str(out / f"eval-{tag}-{pool}")]
            cmd += ["--probe", str(probe)] if "probe" in stages else []
            cmd += rerank_args(args, cross, stages)
            for r in runs:
                if (r / "best.pt").is_file():
                    cmd += ["--run", str(r)]
                else:
                    print(f"pipeline: {r} has no best.pt (not trained: add the train stage): left out", file=sys.stderr)
            run(cmd, timings, f"evaluate_{pool}_s")

    if "ceilings" in stages:  # oracle ceilings and ridge's learning curve (bench/ceilings.py)
        run([sys.executable, str(ROOT / "bench" / "ceilings.py"), str(store), "--json", str(out / f"ceilings-{tag}.json")],
            timings, "ceilings_s")

    record = {
        "folds": args.folds,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "store": str(store),
        "stages": requested,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    path = out / f"timings-{tag}.json"
    try:
        history = json.loads(path.read_text()) if path.is_file() else []
        if not isinstance(history, list):
            raise ValueError("not a list")
    except (OSError, ValueError) as e:  # the stages' outputs are kept; the damaged record is set aside
        kept = path.with_name(path.name + ".damaged")
        path.replace(kept)
        print(f"pipeline: {path}: unreadable ({e}); moved to {kept.name}, a new record started", file=sys.stderr)
        history = []
    history.append(record)
    path.write_text(json.dumps(history, indent=2) + "\n")
    print(json.dumps(record, indent=2))


STAGES = ("corpus", "embed", "probe", "train", "cross", "evaluate", "ceilings")


def check_request(stages: set[str], presets: list[str], folds: int) -> None:
    """Refuse, before hours of work, what a later stage would refuse or silently skip."""
    from codejepa.predict.config import PRESETS

    unknown = sorted(stages - set(STAGES))
    if unknown:
        sys.exit(f"pipeline: --stages: unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    bad = [m for m in presets if m not in PRESETS]
    if bad:
        sys.exit(f"pipeline: --models: unknown preset(s) {', '.join(bad)}; the presets are {', '.join(PRESETS)}")
    if folds and folds < 3:  # as `corpus folds` requires, which runs only after the corpus and the store
        sys.exit(f"pipeline: --folds {folds}: 0 (the corpus's own split) or at least 3")


def _finished(run_dir: Path) -> bool:
    """A predict train run's log.jsonl holds its ``done`` event."""
    log = run_dir / "log.jsonl"
    return log.is_file() and '"event": "done"' in log.read_text()


def _cross_finished(run_dir: Path) -> bool:
    """predict cross writes its epochs' history into run.json once the last epoch is done."""
    try:
        return "history" in json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def train_cross(exe: str, store: Path, run_dir: Path, extra: list[str], timings: dict[str, float]) -> None:
    """``predict cross`` into ``run_dir``: started, resumed from its last.pt, or skipped when done."""
    if not _cross_finished(run_dir):
        resume = ["--resume"] if (run_dir / "last.pt").is_file() else []
        run([exe, "predict", "cross", str(store), "--out", str(run_dir), *extra, *resume], timings, "cross_s")


def rerank_args(args: argparse.Namespace, cross: Path, stages: set[str]) -> list[str]:
    return ["--rerank", str(cross), "--rerank-rows", args.rerank_rows] if "cross" in stages else []


def train_cmd(exe: str, store: Path, run_dir: Path, preset: str, sets: list[str], extra: list[str]) -> list[str]:
    kind = "transformer" if preset.startswith("transformer") else "mlp"
    if (run_dir / "last.pt").is_file():
        return [exe, "predict", "train", str(store), "--out", str(run_dir), "--resume", *extra, *sets]
    return [exe, "predict", "train", str(store), "--model", kind, "--preset", preset, "--out", str(run_dir), *extra, *sets]


def cross_validate(args: argparse.Namespace, exe: str, out: Path, corpus: Path, store: Path, tag: str,
                   presets: list[str], stages: set[str], timings: dict[str, float]) -> None:
    """Train and evaluate every fold (each step skipped when its output is complete), then pool.
    With the cross stage the evaluations are new folders (``…-rerank``): a fold evaluated
    before without re-ranking would otherwise be skipped as done."""
    folds = out / ("folds-plus" if args.extra_train else "folds")
    if not (folds / f"fold-{args.folds - 1}.json").is_file():
        run([exe, "corpus", "folds", str(corpus), "--out", str(folds), "--folds", str(args.folds)], timings, "folds_s")
    sets = [a for s in args.set for a in ("--set", s)]
    suffix = "-rerank" if "cross" in stages else ""
    evals = []
    for k in range(args.folds):
        split_file, fold_dir = folds / f"fold-{k}.json", folds / f"k{k}"
        runs = [fold_dir / f"{tag}-{p}" for p in presets]
        if "train" in stages:
            for preset, run_dir in zip(presets, runs):
                if not _finished(run_dir):
                    run(train_cmd(exe, store, run_dir, preset, sets, ["--splits", str(split_file)]), timings, f"train_{preset}_s")
        cross = fold_dir / f"{tag}-cross"
        if "cross" in stages:
            train_cross(exe, store, cross, ["--splits", str(split_file)], timings)
        ev = fold_dir / f"eval-{tag}-split{suffix}"
        evals.append(ev)
        if "evaluate" in stages and not (ev / "ranks.npz").is_file():
            run([exe, "evaluate", "retrieval", str(store), "--splits", str(split_file), *args.fold_eval.split(),
                 *rerank_args(args, cross, stages),
                 *[a for r in runs if (r / "best.pt").is_file() for a in ("--run", str(r))], "--out", str(ev)],
                timings, "evaluate_split_s")
    if "evaluate" in stages:
        run([exe, "evaluate", "folds", *map(str, evals), "--out", str(folds / f"pooled-{tag}{suffix}")], timings, "evaluate_folds_s")


if __name__ == "__main__":
    main()
