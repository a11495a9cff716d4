"""The benchmark scripts on a machine without the shared folder beside the repository (a clone
in a new folder): one clear line that names what is missing and how to name it, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["bench/pipeline.py", "bench/corpus_build.py"])
def test_a_missing_shared_folder_is_one_clear_line(script: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / script), "--shared", str(tmp_path / "nowhere"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert f"{tmp_path / 'nowhere' / 'make-repos'} not found" in r.stderr and "--shared DIR" in r.stderr
    assert not (tmp_path / "out" / "repos").exists()


def test_a_make_repos_that_cannot_run_is_one_clear_line(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "make-repos").write_text("#!/bin/sh\n")  # present, but not executable
    (shared / "python-40.txt").write_text("pypi:example==1.0\n")
    r = subprocess.run([sys.executable, str(ROOT / "bench/pipeline.py"), "--shared", str(shared),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert f"pipeline: cannot run {shared / 'make-repos'}" in r.stderr
