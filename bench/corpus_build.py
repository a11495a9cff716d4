"""Benchmark: `corpus build` of the 40 real projects against its bare floor.

    .venv/bin/python bench/corpus_build.py [--workers 2] [--repos-dir DIR] [--out DIR]

Makes the 40 git repositories with ``../shared/bench-repos/make-repos`` (downloads ~40
sdists the first time, cached afterwards), then measures, in one run and on the same files:

* clone modes of the 40 ``file://`` URLs: ``git clone --bare --depth 1``, ``git clone --bare``,
  a plain ``git clone`` (with checkout) and ``git clone --bare --shared`` of the folder (the
  build's default for local sources: no objects are copied);
* the bare floor: a plain ``git clone`` of the 40 repos plus a bare tree-sitter parse
  (``Parser.parse`` only) of every ``.py`` file of the clones, sequentially;
* the whole build (clone + parse + extract + write + leak filter), ``--workers N``, once
  with the default clone mode and once with full clones (``clone_depth=0``).

It prints repos, files, functions, seconds, functions/s and the ratio of the build to the
floor (target: at most 1.5x). On a shared machine the figures move with the load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_repos import add_shared_argument, require_shared_files


def timed(fn):  # noqa: ANN001, ANN201
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def clone_all(urls: list[str], dest: Path, *args: str) -> None:
    dest.mkdir(parents=True)
    for i, url in enumerate(urls):
        subprocess.run(["git", "clone", "-q", *args, url, str(dest / str(i))], check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--clone-jobs", type=int, default=4)
    ap.add_argument("--repos-dir", type=Path, default=None, help="where make-repos puts the 40 repos")
    add_shared_argument(ap)
    ap.add_argument("--list", type=Path, default=None, help="pinned projects (default: SHARED/python-40.txt)")
    ap.add_argument("--out", type=Path, default=None, help="corpus folder (default: a temp folder, removed)")
    args = ap.parse_args()

    from codejepa.core import default_cache_dir
    from codejepa.corpus.build import BuildSettings, build_corpus
    from codejepa.corpus.extract import parse_bytes

    make_repos, listing = args.shared / "make-repos", args.list or args.shared / "python-40.txt"
    require_shared_files("corpus_build", make_repos, listing)
    repos_dir = args.repos_dir or default_cache_dir() / "bench-repos" / listing.stem
    if subprocess.run([str(make_repos), str(listing), str(repos_dir)]).returncode != 0:
        sys.exit(f"corpus_build: {make_repos} failed (its message is above)")
    urls = [u.strip() for u in (repos_dir / "repos.txt").read_text().splitlines() if u.strip()]

    with tempfile.TemporaryDirectory(prefix="codejepa-bench-") as tmp:
        tmp_path = Path(tmp)
        # Clone modes (the first run also warms the page cache for everything after it).
        t_shallow, _ = timed(lambda: clone_all(urls, tmp_path / "shallow", "--bare", "--depth", "1"))
        t_bare, _ = timed(lambda: clone_all(urls, tmp_path / "bare", "--bare"))
        t_clone, _ = timed(lambda: clone_all(urls, tmp_path / "plain"))
        paths = [u[len("file://"):] if u.startswith("file://") else u for u in urls]
        t_shared, _ = timed(lambda: clone_all(paths, tmp_path / "shared", "--bare", "--shared"))
        for d in ("shallow", "bare", "shared"):
            shutil.rmtree(tmp_path / d)

        def parse_all() -> int:
            n = 0
            for p in sorted((tmp_path / "plain").rglob("*.py")):
                if p.is_file() and not p.is_symlink() and ".git" not in p.parts:
                    parse_bytes(p.read_bytes())
                    n += 1
            return n

        t_parse, n_parsed = timed(parse_all)
        shutil.rmtree(tmp_path / "plain")

        out = args.out or tmp_path / "corpus"
        if args.out and out.exists():
            shutil.rmtree(out)  # a fresh build, not a resume
        settings = BuildSettings(workers=args.workers, clone_jobs=args.clone_jobs)
        t_build, res = timed(lambda: build_corpus([], out, settings, repos_file=repos_dir / "repos.txt"))
        totals = res.manifest["totals"]
        size = sum(p.stat().st_size for p in (out / "repos").iterdir())
        # The same build with full clones (the floor's clone mode), for comparison.
        full = BuildSettings(workers=args.workers, clone_jobs=args.clone_jobs, clone_depth=0)
        t_full, res_full = timed(
            lambda: build_corpus([], tmp_path / "corpus-full", full, repos_file=repos_dir / "repos.txt")
        )
        assert res_full.manifest["totals"]["functions"] == totals["functions"]

    floor = t_clone + t_parse
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; workers {args.workers}")
    print(f"clone of {len(urls)} file:// repos: --bare --depth 1 {t_shallow:.2f} s | --bare (full) {t_bare:.2f} s "
          f"| plain clone {t_clone:.2f} s | --bare --shared of the local path {t_shared:.2f} s")
    print(f"bare tree-sitter parse of {n_parsed} .py files: {t_parse:.2f} s")
    print(f"bare floor (plain clone + parse): {floor:.2f} s")
    print(
        f"build: repos {totals['repos_ok']}/{totals['repos']}, files {totals['files']}, "
        f"functions {totals['functions']}, seconds {t_build:.2f}, functions/s {totals['functions'] / t_build:,.0f}, "
        f"records {size / 1e6:.1f} MB"
    )
    print(f"dropped: {totals['dropped']}; kept per split: {totals['kept_per_split']}")
    print(f"ratio build / floor: {t_build / floor:.2f}x (target <= 1.5x)")
    print(f"same build with full clones (--depth 0): {t_full:.2f} s, ratio {t_full / floor:.2f}x")


if __name__ == "__main__":
    main()
