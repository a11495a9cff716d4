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


@pytest.mark.parametrize("script", ["bench/embed_throughput.py", "bench/probe_throughput.py"])
def test_a_throughput_bench_prints_its_figures_and_leaves_no_folder_behind(
        script: str, teachers: dict, tmp_path: Path) -> None:
    """Without --workdir the stand-in corpus, store and random teacher go to a temporary folder
    that must be gone afterwards (a Qwen2.5-Coder-3B-shaped checkpoint is gigabytes)."""
    import os

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    kind = "bidirectional" if "embed_" in script else "causal"
    args = ["--max-records", "12", "--teacher", str(teachers[kind].ref.path), "--device", "cpu", "--dtype", "float32"]
    if "embed_" in script:
        args += ["--repeats", "1", "--naive-fraction", "1"]
    else:
        args += ["--probes", "2", "--max-tokens", "256"]
    r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert ("real tok/s" if "embed_" in script else "records/s") in r.stdout
    assert list(tmpdir.iterdir()) == []
