"""The README's two commands are make targets: what they are given must reach them intact."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_demo_dir_reaches_the_demo_as_one_name_not_as_shell_text(tmp_path: Path) -> None:
    """`make demo DEMO_DIR=...` once pasted the value into the recipe's shell line: a space
    split it, and `;` ran what followed. The demo script reads it from the environment."""
    injected = tmp_path / "injected"
    odd = f"{tmp_path}/a b;touch {injected};"
    show = 'showdir: ; @bash -c \'printf "[%s]\\n" "$$DEMO_DIR"\''  # what bench/demo.sh sees
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "--eval", show, "showdir", f"DEMO_DIR={odd}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == f"[{odd}]\n", r.stdout + r.stderr
    assert not injected.exists()
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "--eval", show, "showdir"], capture_output=True, text=True,
                       timeout=60, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.stdout == f"[{tmp_path}/.cache/codejepa/demo]\n", r.stdout + r.stderr  # the default, exported too
    r = subprocess.run(["make", "-n", "-C", str(ROOT), "demo", f"DEMO_DIR={odd}"], capture_output=True, text=True,
                       timeout=60)
    assert "bench/demo.sh" in r.stdout and odd not in r.stdout  # not in the recipe's text at all
