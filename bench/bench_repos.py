"""Where the benchmark's projects come from: the shared folder beside the repository.

``make-repos`` and the pinned lists (``python-40.txt``) live in ``../shared/bench-repos`` in
the development setup; a clone elsewhere names that folder with ``--shared DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "bench-repos"


def add_shared_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shared", type=Path, default=SHARED,
                    help="the folder with make-repos and python-40.txt (default: ../shared/bench-repos beside the repository)")


def require_shared_files(prog: str, *paths: Path) -> None:
    """Exit with one line naming the first missing file, instead of a traceback later."""
    for need in paths:
        if not need.is_file():
            sys.exit(f"{prog}: {need} not found. The benchmark's projects come from the shared folder beside "
                     "the repository (../shared/bench-repos: make-repos and python-40.txt); name it with --shared DIR.")
